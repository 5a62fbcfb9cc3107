//! A size-limited tmpfs mounted for one test: a real full disk.

use std::path::{Path, PathBuf};

/// A size-limited tmpfs, unmounted when dropped.
pub struct SmallFs(pub PathBuf);

impl SmallFs {
    /// Mounts a tmpfs of `size` (e.g. `"1m"`) at `at`, creating the directory.
    pub fn mount(at: &Path, size: &str) -> SmallFs {
        std::fs::create_dir_all(at).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "envd-test-tmpfs"])
            .arg(at)
            .status()
            .expect("running mount");
        assert!(status.success(), "mounting a {size} tmpfs at {} (the tests run as root)", at.display());
        SmallFs(at.to_owned())
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
