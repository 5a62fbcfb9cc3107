//! Generates the Rust types and Connect service traits from `proto/` with no
//! system `protoc`: protox parses the files, connectrpc-build emits the code.

use std::path::PathBuf;

use prost::Message;

const PROTOS: [&str; 2] = ["process.proto", "filesystem.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed=proto/{proto}");
    }
    record_commit();
    let descriptors = protox::Compiler::new(["proto"])?
        .include_source_info(true)
        .include_imports(true)
        .open_files(PROTOS)?
        .file_descriptor_set();
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("envd.fds.bin");
    write_if_changed(&descriptor_path, &descriptors.encode_to_vec())?;
    connectrpc_build::Config::new()
        .files(&PROTOS)
        .descriptor_set(&descriptor_path)
        .include_file("_connectrpc.rs")
        .compile()?;
    Ok(())
}

/// Rewriting an unchanged descriptor set would bump its mtime, and since
/// the generated code registers it as an input, every `cargo build` would
/// then rebuild the crate.
fn write_if_changed(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    if std::fs::read(path).is_ok_and(|existing| existing == bytes) {
        return Ok(());
    }
    std::fs::write(path, bytes)
}

/// The commit `--commit` prints, when the source is a git checkout.
fn record_commit() {
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok());
    if let Some(commit) = commit {
        println!("cargo:rustc-env=ENVD_COMMIT={}", commit.trim());
    }
    // Only paths that exist: a missing one (a worktree's `.git` is a file)
    // would rerun this script, and relink envd, on every build.
    for name in ["HEAD", "refs/heads"] {
        let path = std::process::Command::new("git")
            .args(["rev-parse", "--git-path", name])
            .output()
            .ok()
            .filter(|out| out.status.success())
            .and_then(|out| String::from_utf8(out.stdout).ok());
        if let Some(path) = path.map(|p| p.trim().to_owned()).filter(|p| std::path::Path::new(p).exists()) {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}
