//! Compose (CONTRACT 4.8): concatenate files into a destination through a
//! temporary file, rename it into place, then delete the sources.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::transfer::{Written, create_temp};
use super::{FsError, Owner, base_name, ensure_dirs, xattr};

/// Concatenates `sources` in order into `destination` for `owner`.
/// Blocking: run it off the async workers.
pub fn compose(sources: &[PathBuf], destination: &Path, owner: Owner) -> Result<Written, FsError> {
    for source in sources {
        if source == destination {
            return Err(FsError::Conflict(format!("source '{}' is the destination", source.display())));
        }
        let meta = std::fs::metadata(source).map_err(|e| FsError::io("stat", source, e))?;
        if !meta.is_file() {
            return Err(FsError::NotARegularFile(source.clone()));
        }
    }
    if let Some(parent) = destination.parent() {
        ensure_dirs(parent, owner)?;
    }
    if std::fs::metadata(destination).is_ok_and(|m| m.is_dir()) {
        return Err(FsError::IsADirectory(destination.to_owned()));
    }
    let (mut out, temp) = create_temp(destination, super::transfer::COMPOSE_TAG, owner)?;
    for source in sources {
        let mut input = File::open(source).map_err(|e| FsError::io("open", source, e))?;
        // std::io::copy between files uses copy_file_range: no user-space buffer.
        std::io::copy(&mut input, &mut out).map_err(|e| FsError::io_strict("write", destination, e))?;
    }
    out.sync_all().map_err(|e| FsError::io_strict("fsync", destination, e))?;
    nix::unistd::close(out).map_err(|e| FsError::io_strict("close", destination, e.into()))?;
    temp.persist(destination)?;
    super::transfer::sync_parent(destination)?;
    for source in sources {
        if let Err(err) = std::fs::remove_file(source) {
            tracing::warn!(path = %source.display(), "compose: removing source: {err}");
        }
    }
    Ok(Written { path: destination.to_owned(), name: base_name(destination), metadata: xattr::read_e2b(destination) })
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
