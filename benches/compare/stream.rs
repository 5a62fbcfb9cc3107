//! Bytes flowing out of a command and a keystroke echoed by a terminal:
//! stdout of `head -c N /dev/zero` read to the end, and one byte typed
//! into `cat` on a pseudo-terminal until the terminal's echo comes back.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use prost::Message;
use serde_json::json;

use crate::common::pb::{self, process_event::Event, process_event::data_event::Output};
use crate::common::{Client, ProcEvent, proc_event, rpc};
use crate::exec::Wire;
use crate::openssh::OpenSsh;

const HEAD: &str = "/usr/bin/head";

fn head_args(bytes: u64) -> [String; 3] {
    ["-c".into(), bytes.to_string(), "/dev/zero".into()]
}

/// Bytes of stdout in one stream frame (0 for other events).
fn stdout_len(wire: Wire, payload: &[u8]) -> u64 {
    match wire {
        Wire::Json => {
            let message: serde_json::Value = serde_json::from_slice(payload).expect("a JSON StartResponse");
            match proc_event(&message) {
                ProcEvent::Stdout(data) => data.len() as u64,
                _ => 0,
            }
        }
        Wire::Proto => match pb::StartResponse::decode(payload).expect("a StartResponse").event.and_then(|e| e.event) {
            Some(Event::Data(pb::process_event::DataEvent { output: Some(Output::Stdout(data)) })) => data.len() as u64,
            _ => 0,
        },
    }
}

/// How long envd takes to deliver `bytes` of a command's stdout.
pub async fn envd_stdout(client: &Client, wire: Wire, bytes: u64) -> Duration {
    let args = head_args(bytes);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let began = Instant::now();
    let mut stream = match wire {
        Wire::Json => {
            let request = json!({"process": {"cmd": HEAD, "args": args}, "stdin": false});
            client.stream(rpc::START, &request, &[]).await
        }
        Wire::Proto => client.stream_proto(rpc::START, &pb::start_request(HEAD, &args).encode_to_vec(), &[]).await,
    };
    let mut received = 0u64;
    while let Some(frame) = stream.next_frame().await {
        if frame.is_end() {
            assert!(frame.end_error().is_none(), "Start head failed: {:?}", frame.json());
        } else {
            received += stdout_len(wire, &frame.payload);
        }
    }
    let took = began.elapsed();
    assert_eq!(received, bytes, "stdout bytes through envd");
    took
}

/// Reads a child's stdout to its end; returns the byte count.
fn drain(mut command: Command) -> u64 {
    let mut child = command.stdout(Stdio::piped()).spawn().expect("spawning the reader's command");
    let mut stdout = child.stdout.take().expect("piped");
    let mut buf = vec![0u8; 64 * 1024];
    let mut received = 0u64;
    loop {
        match stdout.read(&mut buf).expect("reading stdout") {
            0 => break,
            n => received += n as u64,
        }
    }
    assert!(child.wait().expect("waiting").success(), "the command failed");
    received
}

/// `ssh bench head -c N /dev/zero` over the master, read to the end.
pub fn ssh_stdout(ssh: &OpenSsh, bytes: u64) -> Duration {
    let args = head_args(bytes);
    let remote: Vec<&str> = std::iter::once("head").chain(args.iter().map(String::as_str)).collect();
    let began = Instant::now();
    assert_eq!(drain(ssh.ssh(&remote)), bytes, "stdout bytes through ssh");
    began.elapsed()
}

/// The same command's stdout read straight from a pipe.
pub fn raw_stdout(bytes: u64) -> Duration {
    let mut command = Command::new(HEAD);
    command.args(head_args(bytes));
    let began = Instant::now();
    assert_eq!(drain(command), bytes, "stdout bytes through a pipe");
    began.elapsed()
}

/// The key typed in round `i`: letters in turn, so that each echo is
/// told apart from the previous one.
fn key(i: usize) -> u8 {
    b'a' + (i % 26) as u8
}

/// Keystroke to echo through envd: `SendInput` (unary JSON, as the SDKs
/// type) into `cat` on a terminal, until the byte is in the PTY stream.
pub async fn envd_pty_echo(client: &Client, warmup: usize, samples: usize) -> Vec<Duration> {
    let start = json!({"process": {"cmd": "/bin/cat"}, "pty": {"size": {"cols": 80, "rows": 24}}});
    let mut stream = client.stream(rpc::START, &start, &[]).await;
    let pid = match stream.next_event().await {
        ProcEvent::Start(pid) => pid,
        other => panic!("expected the start event, got {other:?}"),
    };
    let mut times = Vec::with_capacity(samples);
    for i in 0..warmup + samples {
        let typed = key(i);
        let input = json!({"process": {"pid": pid}, "input": {"pty": base64::engine::general_purpose::STANDARD.encode([typed])}});
        let began = Instant::now();
        let echoed = async {
            loop {
                match stream.next_event().await {
                    ProcEvent::Pty(data) if data.contains(&typed) => return began.elapsed(),
                    ProcEvent::Pty(_) | ProcEvent::Keepalive => {}
                    other => panic!("unexpected event on the terminal: {other:?}"),
                }
            }
        };
        let (took, _) = tokio::join!(echoed, client.call(rpc::SEND_INPUT, &input));
        if i >= warmup {
            times.push(took);
        }
    }
    client.kill(pid).await;
    while !matches!(stream.next_event().await, ProcEvent::Finished(_)) {}
    times
}

/// Writes one key at a time and reads until its echo, `warmup + samples`
/// times.
fn echo_rounds(input: &mut impl Write, output: &mut impl Read, warmup: usize, samples: usize) -> Vec<Duration> {
    let mut times = Vec::with_capacity(samples);
    let mut buf = [0u8; 256];
    for i in 0..warmup + samples {
        let typed = key(i);
        let began = Instant::now();
        input.write_all(&[typed]).expect("typing");
        input.flush().expect("typing");
        loop {
            let n = output.read(&mut buf).expect("reading the echo");
            assert!(n > 0, "the terminal closed");
            if buf[..n].contains(&typed) {
                break;
            }
        }
        if i >= warmup {
            times.push(began.elapsed());
        }
    }
    times
}

/// Keystroke to echo through `ssh -tt bench cat` on the master.
pub fn ssh_pty_echo(ssh: &OpenSsh, warmup: usize, samples: usize) -> Vec<Duration> {
    let mut child = ssh.ssh(&["-tt", "cat"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("ssh -tt");
    let mut input = child.stdin.take().expect("piped");
    let mut output = child.stdout.take().expect("piped");
    let times = echo_rounds(&mut input, &mut output, warmup, samples);
    let _ = child.kill();
    let _ = child.wait();
    times
}

/// Keystroke to echo on a local pseudo-terminal with `cat` on its other
/// side: the kernel's line discipline and nothing else.
pub fn raw_pty_echo(warmup: usize, samples: usize) -> Vec<Duration> {
    let (mut master, slave) = open_pty();
    let mut cat = Command::new("/bin/cat");
    cat.stdin(Stdio::from(slave.try_clone().expect("dup")))
        .stdout(Stdio::from(slave.try_clone().expect("dup")))
        .stderr(Stdio::from(slave));
    // SAFETY: setsid is async-signal-safe; the child leads a new session
    // as a terminal's program does.
    unsafe {
        cat.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cat.spawn().expect("spawning cat on a pty");
    let mut reader = master.try_clone().expect("dup of the pty master");
    let times = echo_rounds(&mut master, &mut reader, warmup, samples);
    let _ = child.kill();
    let _ = child.wait();
    times
}

fn open_pty() -> (File, OwnedFd) {
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two fds into the given ints; the name,
    // termios and winsize pointers may be null.
    let rc =
        unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), std::ptr::null()) };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just opened by openpty and are owned here only.
    unsafe { (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}
