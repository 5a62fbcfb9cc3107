//! The events address of the host (`/init` `hyperloopIP`): `/etc/hosts`
//! maps `events.e2b.local` to it, so programs in the sandbox reach the
//! host's event endpoint by name. The name is taken off every line that
//! has it (a line left without names goes), then one line is appended,
//! formatted as the reference's hosts-file library writes it; an entry that
//! is already right leaves the file untouched.

use std::net::IpAddr;
use std::path::Path;

use super::system_files;

/// The name the sandbox's event reporting resolves.
pub const EVENTS_HOST: &str = "events.e2b.local";

/// Points `events.e2b.local` at `address` in the hosts file at `path`.
pub fn set_events_address(path: &Path, address: IpAddr) -> std::io::Result<()> {
    let hosts = match std::fs::read_to_string(path) {
        Ok(hosts) => hosts,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(err) => return Err(err),
    };
    match with_events_address(&hosts, &address.to_string()) {
        Some(updated) => system_files::replace(path, updated.as_bytes(), 0o644),
        None => Ok(()),
    }
}

/// `hosts` with the events entry pointing at `address`; `None` when it
/// already does, exactly once.
pub fn with_events_address(hosts: &str, address: &str) -> Option<String> {
    let current: Vec<&str> = hosts.lines().filter(|line| names_of(line).contains(&EVENTS_HOST)).collect();
    if let [line] = current.as_slice()
        && names_of(line) == [EVENTS_HOST]
        && line.split_whitespace().next() == Some(address)
    {
        return None;
    }
    let mut out = String::with_capacity(hosts.len() + 64);
    for line in hosts.lines() {
        let names = names_of(line);
        if !names.contains(&EVENTS_HOST) {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let (entry, comment) = split_comment(line);
        let address_of_line = entry.split_whitespace().next().unwrap_or("");
        let rest: Vec<&str> = names.into_iter().filter(|n| *n != EVENTS_HOST).collect();
        if rest.is_empty() {
            continue;
        }
        out.push_str(&format!("{address_of_line:<16} {}", rest.join(" ")));
        if let Some(comment) = comment {
            out.push_str(&format!(" #{comment}"));
        }
        out.push('\n');
    }
    out.push_str(&format!("{address:<16} {EVENTS_HOST}\n"));
    Some(out)
}

/// The host names of a hosts-file line (none for comments and blanks).
fn names_of(line: &str) -> Vec<&str> {
    let (entry, _) = split_comment(line);
    entry.split_whitespace().skip(1).collect()
}

fn split_comment(line: &str) -> (&str, Option<&str>) {
    match line.split_once('#') {
        Some((entry, comment)) => (entry, Some(comment)),
        None => (line, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_entry_is_replaced_never_duplicated() {
        let base = "127.0.0.1 localhost\n# comment\n";
        let first = with_events_address(base, "10.0.0.1").unwrap();
        assert_eq!(first, "127.0.0.1 localhost\n# comment\n10.0.0.1         events.e2b.local\n");
        assert_eq!(with_events_address(&first, "10.0.0.1"), None);
        let second = with_events_address(&first, "fd00::2").unwrap();
        assert_eq!(second.matches(EVENTS_HOST).count(), 1, "{second}");
        assert!(second.ends_with("fd00::2          events.e2b.local\n"));
        let shared = with_events_address("10.0.0.9 other events.e2b.local # kept\n", "10.0.0.1").unwrap();
        assert_eq!(shared, "10.0.0.9         other # kept\n10.0.0.1         events.e2b.local\n");
    }
}
