//! What watchers report for envd's own transfers (uploads and compose).
//!
//! A transfer writes a hidden temporary file beside its destination and
//! renames it into place (`transfer`). The reference writes the
//! destination itself, so its watchers see, for a new file, a create
//! (`O_CREAT`), a chmod (`fchown`), writes and, with metadata, a chmod
//! (`setxattr`); for an existing file, a chmod (`chown`), a write (the
//! truncate), writes and the metadata chmod. envd's temporary goes through
//! the same steps in the same order, so a watcher hides the temporary's
//! name, keeps the kinds of its events, and when the temporary arrives
//! under its destination's name reports them there:
//!
//! 1. runs of one kind become one event, as the kernel merges a repeat
//!    that has not been read yet (a file written in many chunks is one
//!    write, whatever the reader's timing);
//! 2. a temporary that replaces a file (named with the replace tag) drops
//!    its create and reports the truncate's write after the first chmod
//!    even when nothing was written;
//! 3. a temporary renamed away before any of its events were seen (the
//!    watch started late, or more temporaries were open than are tracked)
//!    reports what an upload of that kind reports.
//!
//! A temporary removed instead of renamed (a failed or cut-off upload)
//! leaves no trace. Memory is bounded: at most [`MAX_OPEN`] temporaries
//! and [`MAX_MOVED`] renames in flight are remembered.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;

use super::event_kind::{EventKind, kinds};
use super::inotify::RawEvent;
use super::transfer::{is_replacing_temp, is_temp_name};

/// Temporaries whose events are kept at once.
const MAX_OPEN: usize = 1024;
/// Renames away from temporaries waiting for their arrival.
const MAX_MOVED: usize = 256;
/// Kinds kept per temporary; the steps of one transfer need five.
const MAX_KINDS: usize = 16;

/// What a raw event means for the watcher.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    /// Not about a transfer: report it as usual.
    Other,
    /// About a temporary: report nothing.
    Hidden,
    /// A transfer arrived at the event's name: report these.
    Arrived(Vec<EventKind>),
}

/// The transfers one watcher has seen in progress.
#[derive(Debug, Default)]
pub(crate) struct TempEvents {
    /// Kinds so far, per (watch, temporary name).
    open: HashMap<(i32, OsString), Vec<EventKind>>,
    /// Renamed away: the rename's cookie and what its arrival reports.
    moved: VecDeque<(u32, Vec<EventKind>)>,
}

impl TempEvents {
    /// Takes one raw event, in the order read.
    pub(crate) fn see(&mut self, raw: &RawEvent) -> Seen {
        let Some(name) = raw.name.as_ref() else { return Seen::Other };
        if is_temp_name(name) {
            self.see_temp(raw.wd, name, raw);
            return Seen::Hidden;
        }
        if raw.mask & libc::IN_MOVED_TO != 0
            && let Some(at) = self.moved.iter().position(|(cookie, _)| *cookie == raw.cookie)
            && let Some((_, report)) = self.moved.remove(at)
        {
            return Seen::Arrived(report);
        }
        Seen::Other
    }

    fn see_temp(&mut self, wd: i32, name: &OsString, raw: &RawEvent) {
        let key = (wd, name.clone());
        if raw.mask & libc::IN_MOVED_FROM != 0 {
            let seen = self.open.remove(&key).unwrap_or_default();
            if self.moved.len() >= MAX_MOVED {
                self.moved.pop_front();
            }
            self.moved.push_back((raw.cookie, report(seen, is_replacing_temp(name))));
            return;
        }
        if raw.mask & libc::IN_DELETE != 0 {
            self.open.remove(&key);
            return;
        }
        if !self.open.contains_key(&key) && self.open.len() >= MAX_OPEN {
            return;
        }
        let seen = self.open.entry(key).or_default();
        for kind in kinds(raw.mask) {
            if seen.last() != Some(&kind) && seen.len() < MAX_KINDS {
                seen.push(kind);
            }
        }
    }
}

/// What a temporary's arrival reports, from the kinds seen on it.
fn report(seen: Vec<EventKind>, replaces: bool) -> Vec<EventKind> {
    use EventKind::{Chmod, Create, Write};
    if !replaces {
        return if seen.first() == Some(&Create) { seen } else { vec![Create, Chmod, Write] };
    }
    let mut out: Vec<EventKind> = Vec::with_capacity(seen.len() + 1);
    for kind in seen.into_iter().filter(|k| *k != Create) {
        if out.last() != Some(&kind) {
            out.push(kind);
        }
    }
    if out.first() != Some(&Chmod) {
        out.insert(0, Chmod);
    }
    if out.get(1) != Some(&Write) {
        out.insert(1, Write);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::EventKind::{Chmod, Create, Write};
    use super::*;

    fn raw(mask: u32, cookie: u32, name: &str) -> RawEvent {
        RawEvent { wd: 1, mask, cookie, name: Some(name.into()) }
    }

    fn upload(temp: &str, steps: &[u32]) -> Seen {
        let mut events = TempEvents::default();
        for mask in steps {
            assert_eq!(events.see(&raw(*mask, 0, temp)), Seen::Hidden);
        }
        assert_eq!(events.see(&raw(libc::IN_MOVED_FROM, 7, temp)), Seen::Hidden);
        assert_eq!(events.see(&raw(libc::IN_MOVED_TO, 8, "f")), Seen::Other, "another rename");
        events.see(&raw(libc::IN_MOVED_TO, 7, "f"))
    }

    #[test]
    fn arrivals_report_the_reference_steps() {
        let (attrib, modify) = (libc::IN_ATTRIB, libc::IN_MODIFY);
        let new = ".f.envd-upload.abc.tmp";
        let steps = [libc::IN_CREATE, attrib, modify, modify, modify];
        assert_eq!(upload(new, &steps), Seen::Arrived(vec![Create, Chmod, Write]));
        assert_eq!(upload(new, &[libc::IN_CREATE, attrib]), Seen::Arrived(vec![Create, Chmod]));
        assert_eq!(upload(new, &[]), Seen::Arrived(vec![Create, Chmod, Write]), "watch started late");
        let replace = ".f.envd-replace.abc.tmp";
        let steps = [libc::IN_CREATE, attrib, attrib, modify, attrib];
        assert_eq!(upload(replace, &steps), Seen::Arrived(vec![Chmod, Write, Chmod]));
        assert_eq!(upload(replace, &[libc::IN_CREATE, attrib]), Seen::Arrived(vec![Chmod, Write]));
    }

    #[test]
    fn a_removed_temporary_leaves_nothing() {
        let mut events = TempEvents::default();
        let temp = ".f.envd-upload.abc.tmp";
        events.see(&raw(libc::IN_CREATE, 0, temp));
        assert_eq!(events.see(&raw(libc::IN_DELETE, 0, temp)), Seen::Hidden);
        assert!(events.open.is_empty() && events.moved.is_empty());
        assert_eq!(events.see(&raw(libc::IN_CREATE, 0, "f")), Seen::Other);
    }
}
