//! The kinds of a filesystem event, as inotify reports them and the wire
//! names them; shared by the watcher and the transfer-event filter.

/// What happened to an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum EventKind {
    /// Created or moved in.
    Create,
    /// Content modified.
    Write,
    /// Deleted.
    Remove,
    /// Moved away or renamed.
    Rename,
    /// Attributes changed.
    Chmod,
}

/// The contract's order for one record: CREATE, RENAME, CHMOD, WRITE, REMOVE.
pub(crate) fn kinds(mask: u32) -> impl Iterator<Item = EventKind> {
    [
        (libc::IN_CREATE | libc::IN_MOVED_TO, EventKind::Create),
        (libc::IN_MOVED_FROM | libc::IN_MOVE_SELF, EventKind::Rename),
        (libc::IN_ATTRIB, EventKind::Chmod),
        (libc::IN_MODIFY, EventKind::Write),
        (libc::IN_DELETE | libc::IN_DELETE_SELF, EventKind::Remove),
    ]
    .into_iter()
    .filter(move |(bits, _)| mask & bits != 0)
    .map(|(_, kind)| kind)
}
