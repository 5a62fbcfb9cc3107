//! Path resolution shared by every path argument: RPC paths, process `cwd`,
//! `/files` paths. Relative paths resolve against the user's home, not the
//! default workdir: the SDKs depend on it.

use std::path::{Component, Path, PathBuf};

/// Why a path could not be resolved.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    /// `~name` forms name another user's home, which is not supported.
    #[error("path '{0}' uses '~user' expansion, which is not supported")]
    OtherUsersHome(String),
}

/// Resolves `path` for a user whose home is `home`.
///
/// An empty path becomes `default_workdir` when one is set, else the home.
pub fn resolve(path: &str, home: &Path, default_workdir: Option<&str>) -> Result<PathBuf, PathError> {
    let path = match (path, default_workdir) {
        ("", Some(workdir)) if !workdir.is_empty() => workdir,
        _ => path,
    };
    if let Some(rest) = path.strip_prefix('~') {
        if rest.is_empty() {
            return Ok(home.to_owned());
        }
        if rest.starts_with('/') || rest.starts_with('\\') {
            return Ok(clean(&home.join(rest.trim_start_matches(['/', '\\']))));
        }
        return Err(PathError::OtherUsersHome(path.to_owned()));
    }
    if path.starts_with('/') {
        return Ok(PathBuf::from(path));
    }
    Ok(clean(&home.join(path)))
}

/// Lexical cleaning as Go's `filepath.Clean`: no `.`, `..` collapsed, no
/// trailing slash, `..` above the root stays at the root.
pub fn clean(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    let mut relative = Vec::new();
    let absolute = path.is_absolute();
    for component in path.components() {
        match component {
            Component::Normal(part) => relative.push(part),
            Component::ParentDir => {
                if relative.pop().is_none() && !absolute {
                    relative.push(std::ffi::OsStr::new(".."));
                }
            }
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
    }
    if !absolute {
        out = PathBuf::new();
    }
    for part in relative {
        out.push(part);
    }
    if out.as_os_str().is_empty() { PathBuf::from(".") } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(path: &str, workdir: Option<&str>) -> Result<PathBuf, PathError> {
        resolve(path, Path::new("/home/user"), workdir)
    }

    #[test]
    fn resolution_rules() {
        assert_eq!(r("", None).unwrap(), PathBuf::from("/home/user"));
        assert_eq!(r("", Some("/work")).unwrap(), PathBuf::from("/work"));
        assert_eq!(r("~", None).unwrap(), PathBuf::from("/home/user"));
        assert_eq!(r("~/a/b", None).unwrap(), PathBuf::from("/home/user/a/b"));
        assert_eq!(r("a/../b", Some("/work")).unwrap(), PathBuf::from("/home/user/b"));
        assert_eq!(r("../../../etc", None).unwrap(), PathBuf::from("/etc"));
        assert_eq!(r("/abs/./x", None).unwrap(), PathBuf::from("/abs/./x"));
        assert!(matches!(r("~root/x", None), Err(PathError::OtherUsersHome(_))));
    }

    #[test]
    fn clean_matches_go() {
        assert_eq!(clean(Path::new("/a/b/../c/./d/")), PathBuf::from("/a/c/d"));
        assert_eq!(clean(Path::new("/..")), PathBuf::from("/"));
    }
}
