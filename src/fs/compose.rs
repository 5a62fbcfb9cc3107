//! Compose (CONTRACT 4.8): concatenate files into a destination through a
//! temporary file, rename it into place, then delete the sources.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat};
use nix::unistd::{UnlinkatFlags, unlinkat};

use super::access::{Need, Perms};
use super::resolve::{Located, Walk, locate};
use super::transfer::{COMPOSE_TAG, Written, create_temp};
use super::{FsError, Owner, base_name, xattr};

/// A source, checked and opened before anything is written.
struct Source {
    /// Where the source's name is (removed at the end).
    entry: Located,
    /// Its content, opened through any symlink at the name.
    file: File,
}

/// Concatenates `sources` in order into `destination` for `owner`.
/// Blocking: run it off the async workers.
///
/// Every source is resolved, checked and opened, and the destination's
/// directory resolved and checked, before anything is created; the
/// sources go only once the destination is in place.
pub fn compose(sources: &[PathBuf], destination: &Path, owner: Owner) -> Result<Written, FsError> {
    let inputs = sources.iter().map(|source| open_source(source, destination)).collect::<Result<Vec<_>, _>>()?;
    let target = locate(destination, Walk { create: Some(owner), follow_final: false })?;
    // A name leading to a directory is one, as `stat` of the path would say.
    if fstatat(target.dir(), target.name(), AtFlags::empty()).is_ok_and(|stat| Perms::of(&stat).is_dir()) {
        return Err(FsError::IsADirectory(destination.to_owned()));
    }
    target.require(Need::ChangeEntry, target.lstat()?.as_ref())?;
    let (mut out, temp) = create_temp(&target, COMPOSE_TAG, owner)?;
    for mut input in inputs.iter().map(|source| &source.file) {
        // std::io::copy between files uses copy_file_range: no user-space buffer.
        std::io::copy(&mut input, &mut out).map_err(|e| FsError::io_strict("write", destination, e))?;
    }
    out.sync_all().map_err(|e| FsError::io_strict("fsync", destination, e))?;
    let metadata = xattr::read_e2b_fd(out.as_fd());
    nix::unistd::close(out).map_err(|e| FsError::io_strict("close", destination, e.into()))?;
    temp.persist(&target)?;
    target.sync_dir()?;
    for source in &inputs {
        let entry = &source.entry;
        if let Err(err) = unlinkat(entry.dir(), entry.name(), UnlinkatFlags::NoRemoveDir) {
            tracing::warn!(path = %entry.path().display(), "compose: removing source: {err}");
        }
    }
    Ok(Written { path: destination.to_owned(), name: base_name(destination), metadata })
}

/// Resolves and opens one source: a regular file (through a symlink at its
/// name, which is what gets removed) that the users whose symlinks lead
/// there could read, and remove.
fn open_source(source: &Path, destination: &Path) -> Result<Source, FsError> {
    if source == destination {
        return Err(FsError::Conflict(format!("source '{}' is the destination", source.display())));
    }
    let entry = locate(source, Walk::default())?;
    entry.require(Need::Remove, entry.lstat()?.as_ref())?;
    let content = entry.follow_final()?;
    let fd = content.open(OFlag::O_RDONLY | OFlag::O_NONBLOCK)?;
    let stat = fstat(&fd).map_err(|e| FsError::io_strict("stat", source, e.into()))?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(FsError::NotARegularFile(source.to_owned()));
    }
    content.require(Need::Read, Some(&stat))?;
    Ok(Source { entry, file: File::from(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concatenates_then_removes_sources() {
        let dir = std::env::temp_dir().join(format!("envd-compose-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        std::fs::write(&a, b"one,").unwrap();
        std::fs::write(&b, b"two").unwrap();
        let owner = Owner { uid: 0, gid: 0 };
        let dest = dir.join("out/joined");
        assert!(matches!(compose(&[a.clone(), a.clone()], &a, owner), Err(FsError::Conflict(_))));
        assert!(matches!(compose(&[dir.join("missing")], &dest, owner), Err(FsError::NotFound(_))));
        assert!(matches!(compose(std::slice::from_ref(&dir), &dest, owner), Err(FsError::NotARegularFile(_))));
        let written = compose(&[a.clone(), b.clone()], &dest, owner).unwrap();
        assert_eq!(written.name, "joined");
        assert_eq!(std::fs::read(&dest).unwrap(), b"one,two");
        assert!(!a.exists() && !b.exists());
        assert_eq!(std::fs::read_dir(dir.join("out")).unwrap().count(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
