//! Streaming uploads and downloads.
//!
//! An upload goes to a temporary file beside its destination and is
//! renamed over it only once complete, so a failed, cut-off or disk-full
//! upload never leaves a partial file and never destroys the old content.
//! Targets that are more than a name (hard-linked files, mount points,
//! kernel files, FIFOs and devices) are written in place instead; see
//! `in_place` for which and why.
//!
//! The temporary file goes through the reference's steps in the
//! reference's order, so that watchers, which hide the temporary's name
//! and report its events under the destination's once it is renamed
//! there (`temp_events`), show what the reference shows: created
//! (`O_CREAT`), given to the user (`fchown`; a replaced file's mode and
//! `user.*` attributes are copied then too), written, then its
//! `user.e2b.*` attributes rewritten. A temporary for a file that already
//! exists is tagged `envd-replace` rather than `envd-upload`: there the
//! reference creates nothing, it only truncates.
//! Chunks pass through a short bounded queue to one blocking writer, so
//! memory stays flat whatever the size, and network reads overlap disk
//! writes. An upload is acknowledged only once durable: the file is
//! fsync'd before the rename and its directory after it, so a crash or a
//! hard stop right after the answer loses nothing.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{File, Permissions};
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use nix::fcntl::OFlag;
use nix::sys::stat::{FileStat, Mode, fstat};
use nix::unistd::{UnlinkatFlags, unlinkat};

use super::access::{Need, Perms};
use super::in_place::{self, InPlace};
use super::metadata::Metadata;
use super::resolve::{Located, Walk, locate};
use super::{FsError, Owner, base_name, random, xattr};

/// Mode of created files, before the umask.
pub const FILE_MODE: u32 = 0o666;
/// Chunks queued for the writer; with the server's read sizes this bounds
/// an upload's buffered bytes to a few MiB.
const WRITE_QUEUE: usize = 8;
/// The longest part of the destination name kept in a temporary name, so
/// that the temporary name stays under NAME_MAX.
const TEMP_NAME_KEEP: usize = 200;

/// Tag in the names of upload temporaries for new files.
pub(crate) const UPLOAD_TAG: &str = "envd-upload";
/// Tag in the names of upload temporaries that replace an existing file.
pub(crate) const REPLACE_TAG: &str = "envd-replace";
/// Tag in the names of compose temporaries.
pub(crate) const COMPOSE_TAG: &str = "e2b-compose";

/// Whether `name` is one of envd's transfer temporaries
/// (`.<name>.<tag>.<random>.tmp`); watchers hide them.
pub fn is_temp_name(name: &std::ffi::OsStr) -> bool {
    let name = name.as_bytes();
    let tagged = |tag: &str| {
        let dotted = format!(".{tag}.");
        name.windows(dotted.len()).any(|w| w == dotted.as_bytes())
    };
    name.starts_with(b".") && name.ends_with(b".tmp") && [UPLOAD_TAG, REPLACE_TAG, COMPOSE_TAG].into_iter().any(tagged)
}

/// Whether the temporary `name` replaces an existing file.
pub(crate) fn is_replacing_temp(name: &std::ffi::OsStr) -> bool {
    let dotted = format!(".{REPLACE_TAG}.");
    is_temp_name(name) && name.as_bytes().windows(dotted.len()).any(|w| w == dotted.as_bytes())
}

/// A file written by an upload or compose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The destination as requested.
    pub path: PathBuf,
    /// Its base name.
    pub name: String,
    /// Its `user.e2b.*` metadata as read back from disk.
    pub metadata: BTreeMap<String, String>,
}

/// A temporary file beside its destination, in the destination's open
/// directory, removed unless it was renamed into place.
#[derive(Debug)]
pub(crate) struct TempPath {
    dir: OwnedFd,
    name: Option<OsString>,
    /// For messages: the temporary's path as the request would name it.
    shown: PathBuf,
}

impl TempPath {
    fn path(&self) -> &Path {
        &self.shown
    }

    /// Renames the file over the entry `target` names, in the same
    /// directory; from then on it is not removed. A symlink there is
    /// replaced, never followed.
    pub(crate) fn persist(mut self, target: &Located) -> Result<(), FsError> {
        let temp = self.name.take().unwrap_or_default();
        nix::fcntl::renameat(&self.dir, temp.as_os_str(), &self.dir, target.name()).map_err(|e| {
            self.name = Some(temp);
            FsError::io_strict("rename", target.path(), e.into())
        })
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if let Some(name) = self.name.take()
            && let Err(err) = unlinkat(&self.dir, name.as_os_str(), UnlinkatFlags::NoRemoveDir)
        {
            tracing::warn!(path = %self.shown.display(), "removing temporary file: {err}");
        }
    }
}

/// Creates a fresh temporary file beside `target`, in its directory, named
/// from `tag`, mode [`FILE_MODE`] less the umask, owned by `owner`.
pub(crate) fn create_temp(target: &Located, tag: &str, owner: Owner) -> Result<(File, TempPath), FsError> {
    let base = target.name().as_bytes();
    let base = if base == b"." { b"file".as_slice() } else { base };
    let keep = String::from_utf8_lossy(&base[..base.len().min(TEMP_NAME_KEEP)]).into_owned();
    let name = OsString::from(format!(".{keep}.{tag}.{}.tmp", random::lower_alnum(12)));
    let shown = target.path().parent().unwrap_or(Path::new("/")).join(&name);
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = nix::fcntl::openat(target.dir(), name.as_os_str(), flags, Mode::from_bits_truncate(FILE_MODE))
        .map_err(|e| FsError::io_strict("create", &shown, e.into()))?;
    let guard = TempPath { dir: target.dup_dir()?, name: Some(name), shown };
    let file = File::from(fd);
    std::os::unix::fs::fchown(&file, Some(owner.uid), Some(owner.gid))
        .map_err(|e| FsError::io_strict("chown", guard.path(), e))?;
    Ok((file, guard))
}

/// Where an upload's bytes go.
#[derive(Debug)]
enum Destination {
    /// A temporary file, renamed over the target at the end.
    Temp(TempPath),
    /// The existing target itself.
    InPlace(InPlace),
}

/// An upload in progress. Dropping it before [`Upload::commit`] removes
/// the temporary file and leaves the destination as it was (an in-place
/// write stays as far as it got).
#[derive(Debug)]
pub struct Upload {
    requested: PathBuf,
    target: Located,
    destination: Destination,
    queue: Option<mpsc::Sender<Bytes>>,
    writer: Option<JoinHandle<Result<File, FsError>>>,
}

impl Upload {
    /// Prepares an upload to `target` for `owner`: ensures the parents,
    /// follows a symlink at the target (its file is written through),
    /// refuses a directory or a target a symlink's owner may not write,
    /// then opens a target to write in place or creates the temporary
    /// file. An existing file's permission bits and `user.*` attributes
    /// carry over.
    pub async fn begin(target: PathBuf, owner: Owner) -> Result<Self, FsError> {
        let prepared = tokio::task::spawn_blocking(move || prepare(target, owner)).await;
        let (requested, real, file, destination) = prepared.map_err(|e| join_error(&e))??;
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let writer_path = match &destination {
            Destination::Temp(temp) => temp.path().to_owned(),
            Destination::InPlace(_) => requested.clone(),
        };
        let writer = tokio::task::spawn_blocking(move || write_all(file, rx, &writer_path));
        Ok(Self { requested, target: real, destination, queue: Some(tx), writer: Some(writer) })
    }

    /// Queues a chunk; fails with the writer's error once it has failed.
    pub async fn write(&mut self, chunk: Bytes) -> Result<(), FsError> {
        let Some(queue) = &self.queue else { return self.writer_result().await.map(drop) };
        if queue.send(chunk).await.is_err() {
            self.queue = None;
            return self.writer_result().await.map(drop);
        }
        Ok(())
    }

    /// Finishes the upload: flushes, writes `metadata`, renames into place.
    pub async fn commit(mut self, metadata: &Metadata) -> Result<Written, FsError> {
        self.queue = None;
        let file = self.writer_result().await?;
        let metadata = metadata.as_map().clone();
        let Upload { requested, target, destination, .. } = self;
        let finished = tokio::task::spawn_blocking(move || -> Result<Written, FsError> {
            let metadata = match destination {
                Destination::Temp(temp) => finish_temp(file, &metadata, temp, &target)?,
                Destination::InPlace(kind) => finish_in_place(file, &metadata, kind, &requested)?,
            };
            Ok(Written { name: base_name(&requested), path: requested, metadata })
        });
        finished.await.map_err(|e| join_error(&e))?
    }

    async fn writer_result(&mut self) -> Result<File, FsError> {
        match self.writer.take() {
            Some(writer) => writer.await.map_err(|e| join_error(&e))?,
            None => Err(FsError::Io {
                op: "write",
                path: self.requested.clone(),
                source: std::io::Error::other("upload writer already finished"),
            }),
        }
    }
}

type Prepared = (PathBuf, Located, File, Destination);

fn prepare(requested: PathBuf, owner: Owner) -> Result<Prepared, FsError> {
    let target = locate(&requested, Walk { create: Some(owner), follow_final: true })?;
    let existing = target.lstat()?;
    if existing.is_some_and(|stat| Perms::of(&stat).is_dir()) {
        return Err(FsError::IsADirectory(requested));
    }
    target.require(Need::Write, existing.as_ref())?;
    if existing.is_some()
        && let Some((file, kind)) = in_place::open(&target, owner)?
    {
        return Ok((requested, target, file, Destination::InPlace(kind)));
    }
    let tag = if existing.is_some() { REPLACE_TAG } else { UPLOAD_TAG };
    let (file, temp) = create_temp(&target, tag, owner)?;
    if let Some(stat) = existing {
        // Replacing keeps what an in-place truncate would have kept.
        file.set_permissions(Permissions::from_mode(stat.st_mode & 0o777))
            .map_err(|e| FsError::io_strict("chmod", temp.path(), e))?;
        copy_attrs(&target, &stat, &file);
    }
    Ok((requested, target, file, Destination::Temp(temp)))
}

/// Copies the `user.*` attributes of the regular file `target` names, if
/// it is still the one `stat` describes, as a truncate would keep them;
/// the upload's metadata then rewrites the `user.e2b.*` ones. Best effort.
fn copy_attrs(target: &Located, stat: &FileStat, to: &File) {
    if stat.st_mode & libc::S_IFMT != libc::S_IFREG {
        return;
    }
    let Ok(old) = target.open(OFlag::O_RDONLY | OFlag::O_NONBLOCK) else { return };
    if fstat(&old).is_ok_and(|now| (now.st_dev, now.st_ino) == (stat.st_dev, stat.st_ino)) {
        xattr::copy_user_attrs(old.as_fd(), to.as_fd());
    }
}

/// Metadata, fsync, close, rename over the target, fsync of the directory:
/// acknowledged only once durable.
fn finish_temp(
    file: File,
    metadata: &BTreeMap<String, String>,
    temp: TempPath,
    target: &Located,
) -> Result<BTreeMap<String, String>, FsError> {
    xattr::write_e2b(file.as_fd(), metadata).map_err(|e| FsError::io_strict("set metadata", temp.path(), e))?;
    let metadata = xattr::read_e2b_fd(file.as_fd());
    file.sync_all().map_err(|e| FsError::io_strict("fsync", temp.path(), e))?;
    // Close explicitly: some filesystems report write errors only here.
    nix::unistd::close(file).map_err(|e| FsError::io_strict("close", temp.path(), e.into()))?;
    temp.persist(target)?;
    target.sync_dir()?;
    Ok(metadata)
}

/// Metadata where the file can hold it, fsync where it stores data, close.
fn finish_in_place(
    file: File,
    metadata: &BTreeMap<String, String>,
    kind: InPlace,
    path: &Path,
) -> Result<BTreeMap<String, String>, FsError> {
    if kind != InPlace::Node {
        xattr::write_e2b(file.as_fd(), metadata).map_err(|e| FsError::io_strict("set metadata", path, e))?;
    }
    let metadata = xattr::read_e2b_fd(file.as_fd());
    if kind.stores_data() {
        file.sync_all().map_err(|e| FsError::io_strict("fsync", path, e))?;
    }
    nix::unistd::close(file).map_err(|e| FsError::io_strict("close", path, e.into()))?;
    Ok(metadata)
}

fn write_all(mut file: File, mut queue: mpsc::Receiver<Bytes>, path: &Path) -> Result<File, FsError> {
    while let Some(chunk) = queue.blocking_recv() {
        file.write_all(&chunk).map_err(|e| FsError::io_strict("write", path, e))?;
    }
    Ok(file)
}

fn join_error(err: &tokio::task::JoinError) -> FsError {
    FsError::Io { op: "run blocking task", path: PathBuf::new(), source: std::io::Error::other(err.to_string()) }
}

/// A file opened for download.
#[derive(Debug)]
pub struct Download {
    /// The open file.
    pub file: File,
    /// Its size in bytes when opened.
    pub len: u64,
    /// Its modification time.
    pub modified: Option<std::time::SystemTime>,
}

/// Opens `path` (following symlinks) for download; a directory is refused.
pub fn open_download(path: &Path) -> Result<Download, FsError> {
    let located = locate(path, Walk { create: None, follow_final: true })?;
    // Non-blocking so that opening a fifo cannot hang a worker; it changes
    // nothing for regular files.
    let fd = located.open(OFlag::O_RDONLY | OFlag::O_NONBLOCK)?;
    let stat = fstat(&fd).map_err(|e| FsError::io_strict("stat", path, e.into()))?;
    if Perms::of(&stat).is_dir() {
        return Err(FsError::IsADirectory(path.to_owned()));
    }
    located.require(Need::Read, Some(&stat))?;
    let file = File::from(fd);
    let meta = file.metadata().map_err(|e| FsError::io_strict("stat", path, e))?;
    Ok(Download { file, len: meta.len(), modified: meta.modified().ok() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("envd-transfer-{}-{}", std::process::id(), random::lower_alnum(6)));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn commit_replaces_and_drop_leaves_nothing() {
        let dir = dir();
        let target = dir.join("sub/f.txt");
        let owner = Owner { uid: 0, gid: 0 };
        let mut upload = Upload::begin(target.clone(), owner).await.unwrap();
        upload.write(Bytes::from_static(b"hello ")).await.unwrap();
        upload.write(Bytes::from_static(b"world")).await.unwrap();
        let written = upload.commit(&Metadata::default()).await.unwrap();
        assert_eq!((written.name.as_str(), written.path.as_path()), ("f.txt", target.as_path()));
        assert_eq!(std::fs::read(&target).unwrap(), b"hello world");

        let mut aborted = Upload::begin(target.clone(), owner).await.unwrap();
        aborted.write(Bytes::from_static(b"partial")).await.unwrap();
        drop(aborted);
        assert_eq!(std::fs::read(&target).unwrap(), b"hello world");
        assert_eq!(entries(&dir.join("sub")), ["f.txt"]);

        assert!(matches!(Upload::begin(dir.clone(), owner).await, Err(FsError::IsADirectory(_))));
        assert!(is_temp_name(".f.txt.envd-upload.abc123def456.tmp".as_ref()));
        assert!(!is_temp_name("f.txt.envd-upload.tmp".as_ref()));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn uploads_write_through_symlinks_and_keep_modes() {
        use std::os::unix::fs::MetadataExt;
        let dir = dir();
        std::fs::write(dir.join("real"), b"old").unwrap();
        std::fs::set_permissions(dir.join("real"), Permissions::from_mode(0o750)).unwrap();
        std::os::unix::fs::symlink("real", dir.join("link")).unwrap();
        let mut upload = Upload::begin(dir.join("link"), Owner { uid: 0, gid: 0 }).await.unwrap();
        upload.write(Bytes::from_static(b"new")).await.unwrap();
        upload.commit(&Metadata::default()).await.unwrap();
        assert!(std::fs::symlink_metadata(dir.join("link")).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read(dir.join("real")).unwrap(), b"new");
        assert_eq!(std::fs::metadata(dir.join("real")).unwrap().mode() & 0o777, 0o750);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
