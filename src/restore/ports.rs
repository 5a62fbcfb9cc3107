//! The TCP ports a process tree listens on, read from /proc: the socket
//! inodes among the open fds of the process and its descendants, matched
//! against the LISTEN entries of `/proc/net/tcp` and `/proc/net/tcp6`.
//! Nothing is opened but /proc files, so a scan never disturbs the
//! processes it looks at.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;

/// State code of a listening socket in `/proc/net/tcp*`.
const TCP_LISTEN: &str = "0A";

/// The ports `pid` and its descendants listen on, ascending.
pub fn listening_ports(proc_root: &Path, pid: u32) -> BTreeSet<u16> {
    let inodes: HashSet<u64> =
        process_tree(proc_root, pid).into_iter().flat_map(|p| socket_inodes(proc_root, p)).collect();
    if inodes.is_empty() {
        return BTreeSet::new();
    }
    let listening = listening_sockets(proc_root);
    inodes.iter().filter_map(|inode| listening.get(inode).copied()).collect()
}

/// `pid` and every live descendant of it.
fn process_tree(proc_root: &Path, pid: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(entries) = std::fs::read_dir(proc_root) {
        for entry in entries.flatten() {
            let Some(child) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            if let Some(parent) = parent_of(proc_root, child) {
                children.entry(parent).or_default().push(child);
            }
        }
    }
    let mut tree = vec![pid];
    let mut next = 0;
    while let Some(&current) = tree.get(next) {
        next += 1;
        if let Some(kids) = children.get(&current) {
            tree.extend(kids.iter().filter(|k| !tree.contains(k)).copied().collect::<Vec<_>>());
        }
    }
    tree
}

/// The parent pid, from the fields after the command name in `stat`
/// (the name itself may hold spaces and parentheses).
fn parent_of(proc_root: &Path, pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(1)?.parse().ok()
}

/// The start time of `pid` in clock ticks since boot (`stat` field 22):
/// with the pid, it names one process even across pid reuse.
pub fn start_time(proc_root: &Path, pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// Inodes of the sockets among the fds of `pid` (`socket:[12345]`).
fn socket_inodes(proc_root: &Path, pid: u32) -> Vec<u64> {
    let Ok(fds) = std::fs::read_dir(proc_root.join(pid.to_string()).join("fd")) else { return Vec::new() };
    fds.flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let target = target.to_str()?;
            target.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// Listening sockets by inode, with their local port.
fn listening_sockets(proc_root: &Path) -> HashMap<u64, u16> {
    ["net/tcp", "net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(proc_root.join(table)).ok())
        .flat_map(|text| text.lines().skip(1).filter_map(parse_listen_line).collect::<Vec<_>>())
        .collect()
}

/// One line of `/proc/net/tcp*`: `sl local rem st ... uid timeout inode`.
fn parse_listen_line(line: &str) -> Option<(u64, u16)> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.get(3) != Some(&TCP_LISTEN) {
        return None;
    }
    let port_hex = fields.get(1)?.rsplit(':').next()?;
    let port = u16::from_str_radix(port_hex, 16).ok()?;
    let inode = fields.get(9)?.parse().ok()?;
    Some((inode, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listen_entries_only() {
        let listen = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4242 1 0000000000000000 100 0 0 10 0";
        assert_eq!(parse_listen_line(listen), Some((4242, 8080)));
        let established = listen.replace(" 0A ", " 01 ");
        assert_eq!(parse_listen_line(&established), None);
        let v6 = "   0: 00000000000000000000000000000000:C383 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77 1 0000000000000000 100 0 0 10 0";
        assert_eq!(parse_listen_line(v6), Some((77, 50051)));
    }

    #[test]
    fn finds_this_process_listening() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let ports = listening_ports(Path::new("/proc"), std::process::id());
        assert!(ports.contains(&port), "{ports:?} lacks {port}");
        assert!(start_time(Path::new("/proc"), std::process::id()).is_some());
    }
}
