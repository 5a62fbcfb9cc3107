//! A long-lived stdio server reattached to across a memory snapshot (E2B
//! issues #1352, #1587): the stream a client held dies with the host's
//! side of the connection, and a new `Connect` to the same pid gets every
//! byte the server writes afterwards, whatever the size of its answers.

use super::envd::{Envd, OutputStream};

/// Answers each line `<id> <size>` with `<id>:` and `size` bytes, on one line.
pub const LINE_ECHO: &str =
    r#"while read -r id size; do printf '%s:' "$id"; head -c "$size" /dev/zero | tr '\0' x; echo; done"#;
/// Its tag.
pub const TAG: &str = "line-echo";

/// One request to the server and its whole answer through `stream`.
pub fn round(envd: &Envd, pid: u32, stream: &mut OutputStream, id: &str, size: usize) -> Result<(), String> {
    envd.send_stdin(pid, format!("{id} {size}\n").as_bytes())?;
    let want = format!("{id}:{}\n", "x".repeat(size));
    let got = stream.stdout(want.len()).map_err(|e| format!("{id} ({size} bytes): {e}"))?;
    if got == want { Ok(()) } else { Err(format!("{id}: {} bytes, not the {} expected", got.len(), want.len())) }
}

/// Three connect rounds, each answered with 8 KB, 64 KB and a few bytes.
pub fn reconnect_rounds(envd: &Envd, pid: u32) -> Result<(), String> {
    for connect in 0..3 {
        let mut stream = envd.connect(pid, std::time::Duration::from_secs(10))?;
        for (i, size) in [8192, 65536, 10].into_iter().enumerate() {
            round(envd, pid, &mut stream, &format!("c{connect}-{i}"), size)?;
        }
    }
    Ok(())
}
