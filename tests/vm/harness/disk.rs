//! The test's private copy of the root image: envd is written into it with
//! debugfs (no mount, no rebuild of the cached image), and after a hard stop
//! the host checks the filesystem with e2fsprogs.
//! Only this regular file is ever inspected: nothing on the host is frozen.

use std::fs;
use std::path::Path;
use std::process::Command;

fn run(program: &str, args: &[&str], env: &[(&str, &str)]) -> Result<(bool, String), String> {
    let output = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .map_err(|e| format!("running {program}: {e} (run tests/vm/setup.sh)"))?;
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    Ok((output.status.success(), text))
}

/// `cp --sparse=always image disk`.
pub fn copy_image(image: &Path, disk: &Path) -> Result<(), String> {
    let (ok, text) = run("cp", &["--sparse=always", &image.display().to_string(), &disk.display().to_string()], &[])?;
    if ok { Ok(()) } else { Err(format!("copying {}: {text}", image.display())) }
}

/// Writes `source` into the ext4 image as `target` (root-owned, `mode`)
/// with `debugfs -w`, replacing an existing file; the directory must exist.
pub fn put_file(disk: &Path, source: &Path, target: &str, mode: u32) -> Result<(), String> {
    let script = format!(
        "rm {target}\nwrite {} {target}\nset_inode_field {target} uid 0\nset_inode_field {target} gid 0\n\
         set_inode_field {target} mode 0100{mode:o}\n",
        source.display()
    );
    let commands = disk.with_extension("debugfs");
    fs::write(&commands, script).map_err(|e| format!("{}: {e}", commands.display()))?;
    let disk = disk.display().to_string();
    let (ok, text) = run("debugfs", &["-w", "-f", &commands.display().to_string(), &disk], &[])?;
    if !ok {
        return Err(format!("debugfs on {disk}: {text}"));
    }
    let (_, stat) = run("debugfs", &["-R", &format!("stat {target}"), &disk], &[])?;
    if !stat.contains("Type: regular") {
        return Err(format!("debugfs did not write {target}: {text}"));
    }
    Ok(())
}

/// What the host sees in the image after the VM is gone.
#[derive(Debug, Clone)]
pub struct FsState {
    /// `dumpe2fs -h`: "Filesystem state: clean".
    pub clean: bool,
    /// The journal still needs replaying (the superblock has needs_recovery).
    pub needs_recovery: bool,
    /// `e2fsck -fn` exited 0.
    pub fsck_ok: bool,
    /// e2fsck's output, when it was not.
    pub fsck_output: String,
}

/// Reads the superblock and runs a read-only `e2fsck -fn`.
pub fn inspect(disk: &Path) -> Result<FsState, String> {
    let disk = disk.display().to_string();
    let (_, header) = run("dumpe2fs", &["-h", &disk], &[])?;
    let state = header.lines().find(|l| l.starts_with("Filesystem state:")).unwrap_or("");
    let features = header.lines().find(|l| l.starts_with("Filesystem features:")).unwrap_or("");
    // The guest clock starts in the future (qemu -rtc base): do not let
    // e2fsck call superblock times in the future an error.
    let config = std::env::temp_dir().join("envd-vm-e2fsck.conf");
    fs::write(&config, "[options]\n\tbroken_system_clock = 1\n").map_err(|e| e.to_string())?;
    let config = config.display().to_string();
    let (fsck_ok, fsck_output) = run("e2fsck", &["-fn", &disk], &[("E2FSCK_CONFIG", config.as_str())])?;
    Ok(FsState {
        clean: state.contains("clean") && !state.contains("not clean"),
        needs_recovery: features.contains("needs_recovery"),
        fsck_ok,
        fsck_output,
    })
}
