//! "Ensure parents" (CONTRACT 3.1): create every missing directory down to
//! a target, owned by the requesting user; leave existing ones untouched.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use super::{FsError, Owner};

/// Mode of created directories, before the umask.
const DIR_MODE: u32 = 0o755;

/// Makes `path` and its missing ancestors directories. Each created one is
/// `chown`ed to `owner`; an existing non-directory component fails.
pub fn ensure_dirs(path: &Path, owner: Owner) -> Result<(), FsError> {
    let mut current = PathBuf::new();
    for component in path.components() {
        current.push(component);
        match std::fs::metadata(&current) {
            Ok(meta) if meta.is_dir() => continue,
            Ok(_) => return Err(FsError::ParentIsFile(current)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_one(&current, owner)?,
            Err(e) => return Err(FsError::io_strict("stat", &current, e)),
        }
    }
    Ok(())
}

fn create_one(path: &Path, owner: Owner) -> Result<(), FsError> {
    match std::fs::DirBuilder::new().mode(DIR_MODE).create(path) {
        Ok(()) => std::os::unix::fs::chown(path, Some(owner.uid), Some(owner.gid))
            .map_err(|e| FsError::io_strict("chown", path, e)),
        // Someone else created it meanwhile: fine if it is a directory.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => match std::fs::metadata(path) {
            Ok(meta) if meta.is_dir() => Ok(()),
            _ => Err(FsError::ParentIsFile(path.to_owned())),
        },
        Err(e) => Err(FsError::io_strict("mkdir", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn creates_missing_dirs_owned_by_the_user() {
        let root = std::env::temp_dir().join(format!("envd-dirs-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        let owner = Owner { uid: 1234, gid: 4321 };
        ensure_dirs(&root.join("a/b/c"), owner).unwrap();
        let meta = std::fs::metadata(root.join("a/b")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (1234, 4321), "tests run as root");
        // The pre-existing root kept its owner.
        assert_eq!(std::fs::metadata(&root).unwrap().uid(), nix::unistd::geteuid().as_raw());
        std::fs::write(root.join("file"), b"x").unwrap();
        assert!(matches!(ensure_dirs(&root.join("file/sub"), owner), Err(FsError::ParentIsFile(_))));
        std::fs::remove_dir_all(root).unwrap();
    }
}
