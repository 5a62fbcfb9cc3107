//! Lookups that every request makes, kept while the database files are
//! unchanged: the caller's user by name (each RPC resolves it), and names
//! of uids and gids for entries (owner and group of every `Stat`, `ListDir`
//! entry and watcher event). Each lookup still looks at the files (one
//! `stat` each), so a user added by `useradd` is seen at once, but a file
//! is read and parsed again only when its identity (inode, size, mtime,
//! ctime) changed.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Mutex;

/// What identifies one version of a database file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Version {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Version {
    fn of(path: &Path) -> Option<Version> {
        let meta = std::fs::metadata(path).ok()?;
        Some(Version {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        })
    }
}

/// Values found in the database, valid for one version of its files.
#[derive(Debug)]
pub(super) struct Kept<K, V> {
    cached: Mutex<Option<KeptFor<K, V>>>,
}

/// The versions of the files (`None`: missing) and what was found in them.
type KeptFor<K, V> = (Vec<Option<Version>>, HashMap<K, V>);

impl<K: std::hash::Hash + Eq, V: Clone> Kept<K, V> {
    pub(super) const fn new() -> Self {
        Self { cached: Mutex::new(None) }
    }

    /// The value kept for `key` while `files` are as they were when it was
    /// found; else `find`'s, kept when it finds one.
    pub(super) fn get_or_find<E>(&self, files: &[&Path], key: K, find: impl FnOnce() -> Result<V, E>) -> Result<V, E> {
        let versions: Vec<Option<Version>> = files.iter().map(|f| Version::of(f)).collect();
        {
            let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
            match cached.as_ref() {
                Some((seen, _)) if *seen != versions => *cached = None,
                Some((_, values)) => {
                    if let Some(value) = values.get(&key) {
                        return Ok(value.clone());
                    }
                }
                None => {}
            }
        }
        let value = find()?;
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        let (seen, values) = cached.get_or_insert_with(|| (versions.clone(), HashMap::new()));
        // Only a value read from these very versions is kept.
        if *seen == versions && versions.iter().all(Option::is_some) {
            values.insert(key, value.clone());
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_values_go_when_a_file_changes() {
        let file = std::env::temp_dir().join(format!("envd-kept-{}", std::process::id()));
        std::fs::write(&file, "a").unwrap();
        let kept: Kept<&str, String> = Kept::new();
        let read = || std::fs::read_to_string(&file).map_err(|e| e.to_string());
        assert_eq!(kept.get_or_find(&[file.as_path()], "k", read), Ok("a".to_owned()));
        assert_eq!(
            kept.get_or_find(&[file.as_path()], "k", || Err::<String, _>("kept, not read".to_owned())),
            Ok("a".to_owned())
        );
        let next = file.with_extension("new");
        std::fs::write(&next, "b").unwrap();
        std::fs::rename(&next, &file).unwrap();
        assert_eq!(kept.get_or_find(&[file.as_path()], "k", read), Ok("b".to_owned()), "read again after a change");
        // Edited in place, same size: the ctime changes.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&file, "c").unwrap();
        assert_eq!(kept.get_or_find(&[file.as_path()], "k", read), Ok("c".to_owned()), "read again after an edit");
        assert_eq!(
            kept.get_or_find(&[file.as_path()], "gone", || Err::<String, _>("no such".to_owned())),
            Err("no such".to_owned())
        );
        std::fs::remove_file(&file).unwrap();
        assert!(kept.get_or_find(&[file.as_path()], "k", read).is_err(), "a database that is gone is read, and fails");
    }
}
