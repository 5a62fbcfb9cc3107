//! Everything a command started, for signals: its own cgroup where cgroup
//! v2 placement is on (exact), otherwise a best-effort walk of `/proc`.
//!
//! The walk, in order, and why:
//! 1. collect the leader, every process in its session or process group,
//!    and every descendant of those by parent pid;
//! 2. SIGSTOP them and collect again until nothing new appears: a stopped
//!    process cannot fork, and a stopped parent keeps its children's parent
//!    link, so the set stops growing;
//! 3. deliver the signal, then SIGCONT (unless SIGKILL), so that stopped
//!    processes act on it.
//!
//! What the walk cannot find: a process that left the leader's session and
//! process group and whose parent had already exited before the kill (a
//! finished double fork). It was re-parented to envd, the subreaper, and no
//! longer says which command it came from. Only the cgroup reaches it.

use std::collections::HashSet;
use std::sync::Arc;

use nix::sys::signal::Signal;

use crate::host::command_cgroup::CommandCgroup;

/// Rounds of collect-and-stop before the walk signals what it has.
const MAX_WALK_ROUNDS: usize = 32;

/// How a command's processes are found.
#[derive(Debug)]
pub(super) enum ProcessTree {
    /// Exactly the members of its own cgroup.
    Cgroup(Arc<CommandCgroup>),
    /// Best effort: session, process group and descendants of the leader.
    Walk,
}

/// One process as `/proc/<pid>/stat` shows it.
#[derive(Debug, Clone, Copy)]
pub(super) struct ProcEntry {
    pub pid: u32,
    pub ppid: u32,
    pgid: u32,
    sid: u32,
    start_time: u64,
}

/// A process that existed when the signal was sent, recognisable even if
/// its pid is reused later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Member {
    pid: u32,
    start_time: u64,
}

impl Member {
    /// The process with this pid now, if any.
    pub fn of(pid: u32) -> Option<Member> {
        member(pid)
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether it still exists, zombie included (a zombie still answers
    /// `kill -0`).
    pub fn exists(&self) -> bool {
        read_entry(self.pid).is_some_and(|e| e.start_time == self.start_time)
    }
}

impl ProcessTree {
    /// Sends `signal` to every process of the tree led by `leader` and
    /// returns the processes that were there; `leader_alive` false: the
    /// leader was reaped and its pid names nobody of the tree.
    pub async fn signal(&self, leader: u32, leader_alive: bool, signal: Signal) -> std::io::Result<Vec<Member>> {
        match self {
            ProcessTree::Cgroup(cgroup) => {
                let members = cgroup.members().into_iter().filter_map(member).collect();
                cgroup.signal(signal).await?;
                Ok(members)
            }
            ProcessTree::Walk => Ok(walk_and_signal(leader, leader_alive, signal)),
        }
    }

    /// Whether processes of the tree may be left that the snapshot of
    /// members does not show (born after it).
    pub fn is_populated(&self) -> bool {
        match self {
            ProcessTree::Cgroup(cgroup) => cgroup.is_populated(),
            ProcessTree::Walk => false,
        }
    }

    /// The cgroup, to remove once the command is over.
    pub fn cgroup(&self) -> Option<&Arc<CommandCgroup>> {
        match self {
            ProcessTree::Cgroup(cgroup) => Some(cgroup),
            ProcessTree::Walk => None,
        }
    }
}

fn walk_and_signal(leader: u32, leader_alive: bool, signal: Signal) -> Vec<Member> {
    let me = std::process::id();
    let mut stopped: HashSet<u32> = HashSet::new();
    let mut found = Vec::new();
    for _ in 0..MAX_WALK_ROUNDS {
        let fresh: Vec<ProcEntry> = collect(leader, leader_alive)
            .into_iter()
            .filter(|e| e.pid != me && e.pid != 1 && !stopped.contains(&e.pid))
            .collect();
        if fresh.is_empty() {
            break;
        }
        for entry in fresh {
            send(entry.pid, Signal::SIGSTOP);
            stopped.insert(entry.pid);
            found.push(Member { pid: entry.pid, start_time: entry.start_time });
        }
    }
    for member in &found {
        send(member.pid, signal);
    }
    if signal != Signal::SIGKILL {
        found.iter().for_each(|m| send(m.pid, Signal::SIGCONT));
    }
    found
}

/// The leader (while alive), its session and process group, and their
/// descendants.
///
/// Once the leader is reaped, its pid is free: a process that has it now
/// is someone else's, and so is every group or session with that number
/// (the kernel gives a pid out again only when no group or session uses
/// it). Then nothing is matched by it.
fn collect(leader: u32, leader_alive: bool) -> Vec<ProcEntry> {
    let table = scan_proc();
    let reused = !leader_alive && table.iter().any(|e| e.pid == leader);
    let in_tree =
        |e: &&ProcEntry| (leader_alive && e.pid == leader) || (!reused && (e.sid == leader || e.pgid == leader));
    let mut found: HashSet<u32> = table.iter().filter(in_tree).map(|e| e.pid).collect();
    loop {
        let before = found.len();
        for entry in &table {
            if found.contains(&entry.ppid) {
                found.insert(entry.pid);
            }
        }
        if found.len() == before {
            break;
        }
    }
    table.into_iter().filter(|e| found.contains(&e.pid)).collect()
}

/// Every process now.
pub(super) fn scan_proc() -> Vec<ProcEntry> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter_map(read_entry)
        .collect()
}

/// The session of `pid`, while it exists (a zombie's too).
pub(super) fn session_of(pid: u32) -> Option<u32> {
    read_entry(pid).map(|e| e.sid)
}

fn member(pid: u32) -> Option<Member> {
    read_entry(pid).map(|e| Member { pid, start_time: e.start_time })
}

/// Parses `/proc/<pid>/stat`; the command name may hold any byte, so the
/// fields are counted from its closing parenthesis.
fn read_entry(pid: u32) -> Option<ProcEntry> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 1..)?.split_whitespace().collect();
    // proc(5) field N is index N - 3 here.
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(ProcEntry {
        pid,
        ppid: u32::try_from(field(4)?).ok()?,
        pgid: u32::try_from(field(5)?).ok()?,
        sid: u32::try_from(field(6)?).ok()?,
        start_time: field(22)?,
    })
}

fn send(pid: u32, signal: Signal) {
    let Ok(pid) = i32::try_from(pid) else { return };
    // Exited meanwhile: ESRCH, nothing to do.
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_stat_line() {
        let me = read_entry(std::process::id()).expect("own /proc entry");
        assert_eq!(me.ppid, std::os::unix::process::parent_id());
        assert!(Member::of(me.pid).is_some_and(|m| m.exists()));
    }

    #[test]
    fn a_changed_start_time_is_another_process() {
        let me = Member::of(std::process::id()).expect("own /proc entry");
        let other = Member { start_time: me.start_time + 1, ..me };
        assert!(!other.exists(), "a reused pid is not the remembered process");
    }
}
