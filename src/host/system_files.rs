//! Replacing a system file (`/etc/hosts`, the CA bundle) that other
//! programs read at any moment: the new content goes to a temporary file
//! next to it, is fsync'd and renamed over the old one, so a reader sees
//! either the old or the new file, never a half-written one. A file that
//! is itself a mount point (a container's bind-mounted `/etc/hosts`)
//! cannot be renamed over; it is rewritten in place instead.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Replaces `path` with `contents`, readable by everyone (`mode`).
pub fn replace(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let temporary = path.with_file_name(format!(".{name}.envd-new"));
    let written = write_new(&temporary, contents, mode).and_then(|()| std::fs::rename(&temporary, path));
    match written {
        Ok(()) => {
            if let Some(dir) = path.parent() {
                // Best effort: these files are rebuilt from the state file after a cold boot.
                let _ = std::fs::File::open(dir).and_then(|dir| dir.sync_all());
            }
            Ok(())
        }
        Err(err) if matches!(err.raw_os_error(), Some(libc::EBUSY | libc::EXDEV)) => {
            let _ = std::fs::remove_file(&temporary);
            let mut file = std::fs::OpenOptions::new().write(true).truncate(true).open(path)?;
            file.write_all(contents)?;
            file.sync_all()
        }
        Err(err) => {
            let _ = std::fs::remove_file(&temporary);
            Err(err)
        }
    }
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(path)?;
    // The umask may have narrowed the mode; other users must read these files.
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    file.write_all(contents)?;
    file.sync_all()
}
