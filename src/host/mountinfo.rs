//! What is mounted where, read from `/proc/self/mountinfo` (proc(5)). On
//! its own because it is a reader of the kernel's table, apart from the
//! volumes that consult it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// What is mounted at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct MountEntry {
    /// Filesystem type (`nfs`, `tmpfs`, ...).
    pub(super) fstype: String,
    /// The mount source (`host:/export` for NFS).
    pub(super) source: String,
}

/// The topmost mount at exactly `path`, from `/proc/self/mountinfo`.
pub(super) fn mount_at(path: &Path) -> Option<MountEntry> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_mount_at(&table, path)
}

fn parse_mount_at(table: &str, path: &Path) -> Option<MountEntry> {
    let wanted = path.to_str()?;
    table
        .lines()
        .filter_map(parse_mountinfo_line)
        .filter(|line| line.point == wanted)
        .map(|line| line.entry)
        .next_back()
}

/// One mount point of each writable filesystem on a block device (a
/// filesystem mounted at several points, by bind mounts, once).
pub(super) fn writable_disk_mounts() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo").map(|table| parse_writable_disks(&table)).unwrap_or_default()
}

fn parse_writable_disks(table: &str) -> Vec<PathBuf> {
    let mut seen = BTreeSet::new();
    table
        .lines()
        .filter_map(parse_mountinfo_line)
        .filter(|line| line.entry.source.starts_with("/dev/") && line.writable && seen.insert(line.device))
        .map(|line| PathBuf::from(line.point))
        .collect()
}

/// One line of mountinfo (proc(5)).
struct MountLine<'a> {
    /// `major:minor` of the filesystem: the same for its bind mounts.
    device: &'a str,
    point: String,
    /// Read-write both as mounted here and as a superblock.
    writable: bool,
    entry: MountEntry,
}

fn parse_mountinfo_line(line: &str) -> Option<MountLine<'_>> {
    let (mount, superblock) = line.split_once(" - ")?;
    let mut fields = mount.split(' ');
    let device = fields.nth(2)?;
    let point = unescape_octal(fields.nth(1)?);
    let options = fields.next()?;
    let mut rest = superblock.split(' ');
    let fstype = rest.next()?.to_owned();
    let source = unescape_octal(rest.next()?);
    let super_options = rest.next().unwrap_or("");
    let read_write = |options: &str| options.split(',').any(|o| o == "rw");
    let writable = read_write(options) && read_write(super_options);
    Some(MountLine { device, point, writable, entry: MountEntry { fstype, source } })
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let digits = bytes.get(i + 1..i + 4);
        if bytes[i] == b'\\'
            && let Some(digits) = digits
            && digits.iter().all(|d| (b'0'..=b'7').contains(d))
        {
            out.push(digits.iter().fold(0u8, |n, d| n.wrapping_mul(8).wrapping_add(d - b'0')));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_are_read() {
        let table = "22 1 0:21 / /proc rw,nosuid - proc proc rw\n\
            90 22 0:50 / /mnt/my\\040vol rw,relatime shared:1 - nfs 10.0.0.1:/vol rw,vers=3\n\
            91 90 0:51 / /mnt/my\\040vol rw - tmpfs tmpfs rw\n";
        let top = parse_mount_at(table, Path::new("/mnt/my vol")).unwrap();
        assert_eq!(top, MountEntry { fstype: "tmpfs".into(), source: "tmpfs".into() });
        assert!(parse_mount_at(table, Path::new("/mnt")).is_none());
    }

    #[test]
    fn writable_disks_are_listed_once_each() {
        let table = "25 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
            26 25 254:0 /home /srv/home rw - ext4 /dev/vda rw\n\
            27 25 254:16 / /mnt/ro ro - ext4 /dev/vdb ro\n\
            28 25 254:32 / /mnt/data\\040x rw - xfs /dev/vdc rw\n\
            29 25 0:30 / /tmp rw - tmpfs tmpfs rw\n\
            30 25 0:51 / /mnt/nfs rw - nfs 10.0.0.1:/vol rw\n";
        assert_eq!(parse_writable_disks(table), [PathBuf::from("/"), PathBuf::from("/mnt/data x")]);
    }
}
