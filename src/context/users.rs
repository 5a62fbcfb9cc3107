//! The guest's user database, read from `/etc/passwd` and `/etc/group` on
//! every lookup (no NSS, as the reference): templates add users at build
//! time and the files are small. Names by id, asked for every entry of a
//! listing, come from a copy kept while the file is unchanged (`names`).

use std::path::{Path, PathBuf};

use super::names::Kept;

/// A user that processes can run as and files can be owned by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Login name.
    pub name: String,
    /// Numeric user id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory.
    pub home: PathBuf,
    /// Primary group first, then every group that lists the user.
    pub groups: Vec<u32>,
}

/// Why a user could not be found.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// The name is not in the user database.
    #[error("user '{0}' does not exist")]
    Unknown(String),
    /// The user database could not be read.
    #[error("reading {path}: {source}")]
    Database {
        /// The file that failed.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

const PASSWD: &str = "/etc/passwd";
const GROUP: &str = "/etc/group";

/// Looks a user up by name.
pub fn lookup(name: &str) -> Result<User, UserError> {
    static USERS: Kept<String, User> = Kept::new();
    let (passwd, group) = (Path::new(PASSWD), Path::new(GROUP));
    USERS.get_or_find(&[passwd, group], name.to_owned(), || lookup_in(passwd, group, name))
}

/// The name of a uid, if the database has one.
pub fn user_name(uid: u32) -> Option<String> {
    static USER_NAMES: Kept<u32, Option<String>> = Kept::new();
    let passwd = Path::new(PASSWD);
    let find = || read(passwd).map(|text| passwd_entries(&text).find(|e| e.uid == uid).map(|e| e.name.to_owned()));
    USER_NAMES.get_or_find(&[passwd], uid, find).ok().flatten()
}

/// The user with this uid, if the database has one (the first entry when
/// several names share it).
pub fn by_uid(uid: u32) -> Option<User> {
    lookup(&user_name(uid)?).ok()
}

/// The name of a gid, if the database has one.
pub fn group_name(gid: u32) -> Option<String> {
    static GROUP_NAMES: Kept<u32, Option<String>> = Kept::new();
    let group = Path::new(GROUP);
    let find = || read(group).map(|text| group_entries(&text).find(|e| e.gid == gid).map(|e| e.name.to_owned()));
    GROUP_NAMES.get_or_find(&[group], gid, find).ok().flatten()
}

fn read(path: &Path) -> Result<String, UserError> {
    std::fs::read_to_string(path).map_err(|source| UserError::Database { path: path.to_owned(), source })
}

fn lookup_in(passwd_path: &Path, group_path: &Path, name: &str) -> Result<User, UserError> {
    let passwd = read(passwd_path)?;
    let entry = passwd_entries(&passwd).find(|e| e.name == name).ok_or_else(|| UserError::Unknown(name.to_owned()))?;
    // A missing /etc/group leaves the user with only the primary group.
    let group = std::fs::read_to_string(group_path).unwrap_or_default();
    let mut groups = vec![entry.gid];
    for g in group_entries(&group) {
        if g.members.split(',').any(|m| m == name) && !groups.contains(&g.gid) {
            groups.push(g.gid);
        }
    }
    Ok(User { name: name.to_owned(), uid: entry.uid, gid: entry.gid, home: PathBuf::from(entry.home), groups })
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: &'a str,
}

/// Well-formed `/etc/passwd` lines; malformed ones are skipped.
fn passwd_entries(text: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    text.lines().filter(|l| !l.starts_with('#')).filter_map(|line| {
        let mut f = line.split(':');
        let name = f.next()?;
        let _password = f.next()?;
        let uid = f.next()?.parse().ok()?;
        let gid = f.next()?.parse().ok()?;
        let _gecos = f.next()?;
        let home = f.next()?;
        Some(PasswdEntry { name, uid, gid, home })
    })
}

/// Well-formed `/etc/group` lines; malformed ones are skipped.
fn group_entries(text: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    text.lines().filter(|l| !l.starts_with('#')).filter_map(|line| {
        let mut f = line.split(':');
        let name = f.next()?;
        let _password = f.next()?;
        let gid = f.next()?.parse().ok()?;
        let members = f.next().unwrap_or("");
        Some(GroupEntry { name, gid, members })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_user_with_supplementary_groups() {
        let dir = std::env::temp_dir().join(format!("envd-users-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let passwd = dir.join("passwd");
        let group = dir.join("group");
        std::fs::write(
            &passwd,
            "root:x:0:0:root:/root:/bin/bash\nbroken line\nuser:x:1000:1000::/home/user:/bin/bash\n",
        )
        .unwrap();
        std::fs::write(&group, "root:x:0:\nuser:x:1000:\nsudo:x:27:user\ndocker:x:999:other,user\nnope:x:5:other\n")
            .unwrap();
        let user = lookup_in(&passwd, &group, "user").unwrap();
        assert_eq!(user.uid, 1000);
        assert_eq!(user.home, PathBuf::from("/home/user"));
        assert_eq!(user.groups, vec![1000, 27, 999]);
        assert!(matches!(lookup_in(&passwd, &group, "ghost"), Err(UserError::Unknown(_))));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn real_root_exists() {
        let root = lookup("root").unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(user_name(0).as_deref(), Some("root"));
        assert_eq!(group_name(0).as_deref(), Some("root"));
    }
}
