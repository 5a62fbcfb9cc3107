//! Running a command: the round trip of `true`, bursts of concurrent
//! commands, and how soon each daemon answers after its exec.
//!
//! envd runs `/bin/true` itself; sshd runs the remote command through the
//! user's shell (`bash -c true`, which execs `true`), as it always does.

use std::ffi::CString;
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use prost::Message;
use serde_json::json;

use crate::common::pb::{self, process_event::Event};
use crate::common::{Client, Envd, rpc};
use crate::openssh::OpenSsh;

/// How a Start request is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    Json,
    Proto,
}

/// Runs `cmd args…` through envd's `Start` and reads the stream to its
/// end; panics unless the process exited 0.
pub async fn envd_run(client: &Client, wire: Wire, cmd: &str, args: &[&str]) {
    let mut stream = match wire {
        Wire::Json => {
            let request = json!({"process": {"cmd": cmd, "args": args}, "stdin": false});
            client.stream(rpc::START, &request, &[]).await
        }
        Wire::Proto => client.stream_proto(rpc::START, &pb::start_request(cmd, args).encode_to_vec(), &[]).await,
    };
    let mut exited = false;
    while let Some(frame) = stream.next_frame().await {
        if frame.is_end() {
            assert!(frame.end_error().is_none(), "Start {cmd} failed: {:?}", frame.json());
        } else {
            exited |= ended_ok(wire, &frame.payload);
        }
    }
    assert!(exited, "Start {cmd}: no end event with exit status 0");
}

fn ended_ok(wire: Wire, payload: &[u8]) -> bool {
    match wire {
        Wire::Json => {
            let message: serde_json::Value = serde_json::from_slice(payload).expect("a JSON StartResponse");
            let end = &message["event"]["end"];
            end.is_object() && end.get("exitCode").is_none_or(|code| code == 0)
        }
        Wire::Proto => {
            let response = pb::StartResponse::decode(payload).expect("a StartResponse");
            matches!(response.event.and_then(|e| e.event), Some(Event::End(end)) if end.status == "exit status 0")
        }
    }
}

/// Start→end of `/bin/true` over the client's kept-alive connection.
pub async fn envd_round_trips(client: &Client, wire: Wire, warmup: usize, runs: usize) -> Vec<Duration> {
    let mut times = Vec::with_capacity(runs);
    for i in 0..warmup + runs {
        let began = Instant::now();
        envd_run(client, wire, "/bin/true", &[]).await;
        if i >= warmup {
            times.push(began.elapsed());
        }
    }
    times
}

/// Start→end of `/bin/true`, each over a new TCP connection.
pub async fn envd_fresh_round_trips(envd: &Envd, user: &str, runs: usize) -> Vec<Duration> {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let began = Instant::now();
        let client = envd.client().with_user(user);
        envd_run(&client, Wire::Json, "/bin/true", &[]).await;
        times.push(began.elapsed());
    }
    times
}

/// `ssh bench true` as a channel on the master, or over a new connection.
pub fn ssh_round_trips(ssh: &OpenSsh, fresh: bool, warmup: usize, runs: usize) -> Vec<Duration> {
    let mut times = Vec::with_capacity(runs);
    for i in 0..warmup + runs {
        let began = Instant::now();
        let mut command = if fresh { ssh.ssh_fresh(&["true"]) } else { ssh.ssh(&["true"]) };
        let status = command.stdout(Stdio::null()).status().expect("ssh");
        assert!(status.success(), "ssh bench true: {status}");
        if i >= warmup {
            times.push(began.elapsed());
        }
    }
    times
}

/// posix_spawn of `/bin/true`, returning its pid.
fn spawn_true() -> libc::pid_t {
    let path = CString::new("/bin/true").expect("no NUL");
    let argv = [path.as_ptr(), std::ptr::null()];
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    let mut pid: libc::pid_t = 0;
    // SAFETY: a NUL-terminated path, argv and envp arrays that outlive
    // the call; default attributes and file actions.
    let rc = unsafe {
        libc::posix_spawn(
            &mut pid,
            path.as_ptr(),
            std::ptr::null(),
            std::ptr::null(),
            argv.as_ptr() as *const *mut libc::c_char,
            envp.as_ptr() as *const *mut libc::c_char,
        )
    };
    assert_eq!(rc, 0, "posix_spawn /bin/true");
    pid
}

fn wait_pid(pid: libc::pid_t) {
    let mut status = 0;
    // SAFETY: waits for a child this process spawned.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(waited, pid, "waitpid");
}

/// posix_spawn + waitpid of `/bin/true`, as directly as it gets.
pub fn raw_round_trips(warmup: usize, runs: usize) -> Vec<Duration> {
    let mut times = Vec::with_capacity(runs);
    for i in 0..warmup + runs {
        let began = Instant::now();
        wait_pid(spawn_true());
        if i >= warmup {
            times.push(began.elapsed());
        }
    }
    times
}

/// `count` Start calls of `/bin/true` at once (one connection each, as a
/// pool of HTTP/1.1 connections serves them); time until all ended.
pub async fn envd_burst(client: &Client, count: usize) -> Duration {
    let began = Instant::now();
    join_all((0..count).map(|_| envd_run(client, Wire::Json, "/bin/true", &[]))).await;
    began.elapsed()
}

/// `count` `ssh bench true` at once, all channels on the master.
pub fn ssh_burst(ssh: &OpenSsh, count: usize) -> Duration {
    let began = Instant::now();
    let children: Vec<_> =
        (0..count).map(|_| ssh.ssh(&["true"]).stdout(Stdio::null()).spawn().expect("spawning ssh")).collect();
    for mut child in children {
        let status = child.wait().expect("ssh");
        assert!(status.success(), "ssh bench true in a burst: {status}");
    }
    began.elapsed()
}

/// `count` posix_spawns of `/bin/true`, then a waitpid of each.
pub fn raw_burst(count: usize) -> Duration {
    let began = Instant::now();
    let pids: Vec<_> = (0..count).map(|_| spawn_true()).collect();
    pids.into_iter().for_each(wait_pid);
    began.elapsed()
}

/// Exec of envd until its first 204 on `/health`, `samples` times.
pub fn envd_ready_times(binary: &std::path::Path, samples: usize) -> Vec<Duration> {
    (0..samples).map(|_| Envd::options().binary(binary).start().ready_after()).collect()
}

/// Exec of sshd until its banner arrives, `samples` times.
pub fn sshd_ready_times(samples: usize) -> Vec<Duration> {
    (0..samples).map(|_| OpenSsh::ready_time()).collect()
}
