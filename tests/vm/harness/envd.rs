//! envd as the orchestrator and the SDKs see it: `/health`, `/init`,
//! `/fsfreeze`, and the Process service over Connect JSON on HTTP/1.1
//! (CONTRACT.md 1.4, 1.5): server streams are 5-byte envelopes, the last
//! one flagged end-of-stream and carrying JSON.

use std::io::{self, Read};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

use super::http::{self, Response, StreamingResponse};

/// Envelope flag: the end-of-stream frame.
const END_STREAM: u8 = 0x02;
/// Envelope flag: compressed payload (never asked for here).
const COMPRESSED: u8 = 0x01;
/// Per-connection I/O timeout for quick calls.
const QUICK: Duration = Duration::from_secs(10);

/// Who a process runs as: the default user (no `Authorization`, as the
/// SDKs send for envd >= 0.4.0) or a named one (`Basic base64("name:")`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum As<'a> {
    /// No `Authorization` header: envd's default user.
    Default,
    /// `Authorization: Basic` for this user.
    User(&'a str),
}

/// A finished process.
#[derive(Debug, Clone, Default)]
pub struct Finished {
    /// Its pid, from the start event.
    pub pid: u32,
    /// Everything it wrote to stdout.
    pub stdout: String,
    /// Everything it wrote to stderr.
    pub stderr: String,
    /// The end event's exit code (-1 when killed by a signal).
    pub exit_code: i64,
    /// The end event's status text.
    pub status: String,
}

/// envd behind a forwarded port.
#[derive(Debug, Clone)]
pub struct Envd {
    /// The host port forwarded to the guest's 49983.
    pub port: u16,
    /// Sent as `X-Access-Token` when set.
    pub token: Option<String>,
}

impl Envd {
    /// `GET /health`: the status, or an error when nothing answered.
    pub fn health(&self, timeout: Duration) -> io::Result<u16> {
        Ok(http::request(self.port, "GET", "/health", &[], b"", timeout)?.status)
    }

    /// Polls `/health` every 100 ms until it answers 204; returns how long
    /// that took. `alive` is asked between attempts (e.g. "qemu still runs").
    pub fn wait_ready(
        &self,
        timeout: Duration,
        mut alive: impl FnMut() -> Result<(), String>,
    ) -> Result<Duration, String> {
        let start = Instant::now();
        let mut last = String::from("no attempt");
        while start.elapsed() < timeout {
            alive()?;
            match self.health(Duration::from_secs(1)) {
                Ok(204) => return Ok(start.elapsed()),
                Ok(status) => last = format!("/health answered {status}"),
                Err(err) => last = format!("/health: {err}"),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!("envd not ready after {timeout:?} ({last})"))
    }

    fn token_header(&self) -> Vec<(&str, &str)> {
        self.token.as_deref().map(|t| vec![("X-Access-Token", t)]).unwrap_or_default()
    }

    /// `POST /init` with this JSON body (also sends `X-Access-Token`, as the
    /// orchestrator does).
    pub fn init(&self, body: &Value) -> io::Result<Response> {
        let mut headers = self.token_header();
        headers.push(("Content-Type", "application/json"));
        http::request(self.port, "POST", "/init", &headers, body.to_string().as_bytes(), Duration::from_secs(30))
    }

    /// `POST <path>` with the token and an empty body.
    pub fn post(&self, path: &str, timeout: Duration) -> io::Result<Response> {
        http::request(self.port, "POST", path, &self.token_header(), b"", timeout)
    }

    /// `GET <path>` with the token.
    pub fn get(&self, path: &str) -> io::Result<Response> {
        http::request(self.port, "GET", path, &self.token_header(), b"", QUICK)
    }

    /// `Process.List`: (pid, tag) of every live process.
    pub fn list(&self) -> Result<Vec<(u32, Option<String>)>, String> {
        let mut headers = self.token_header();
        headers.push(("Content-Type", "application/json"));
        headers.push(("Connect-Protocol-Version", "1"));
        let response = http::request(self.port, "POST", "/process.Process/List", &headers, b"{}", QUICK)
            .map_err(|e| format!("Process.List: {e}"))?;
        if response.status != 200 {
            return Err(format!("Process.List answered {}: {}", response.status, response.text()));
        }
        let value: Value = serde_json::from_slice(&response.body).map_err(|e| format!("Process.List JSON: {e}"))?;
        Ok(value["processes"]
            .as_array()
            .map(|list| {
                list.iter()
                    .map(|p| (p["pid"].as_u64().unwrap_or(0) as u32, p["tag"].as_str().map(str::to_owned)))
                    .collect()
            })
            .unwrap_or_default())
    }

    fn start_stream(
        &self,
        who: As<'_>,
        tag: Option<&str>,
        cmd: &str,
        args: &[&str],
        timeout: Duration,
    ) -> Result<StartStream, String> {
        let mut request = json!({ "process": { "cmd": cmd, "args": args } });
        if let Some(tag) = tag {
            request["tag"] = json!(tag);
        }
        self.stream(who, "Start", &request, timeout).map_err(|e| format!("{cmd}: {e}"))
    }

    /// A server-streaming Process RPC (`Start` or `Connect`).
    fn stream(&self, who: As<'_>, rpc: &str, request: &Value, timeout: Duration) -> Result<StartStream, String> {
        let payload = request.to_string();
        let mut body = Vec::with_capacity(payload.len() + 5);
        body.push(0);
        body.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        body.extend_from_slice(payload.as_bytes());
        let basic;
        let mut headers = self.token_header();
        headers.push(("Content-Type", "application/connect+json"));
        headers.push(("Connect-Protocol-Version", "1"));
        if let As::User(user) = who {
            basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:")));
            headers.push(("Authorization", &basic));
        }
        let path = format!("/process.Process/{rpc}");
        let response = http::send(self.port, "POST", &path, &headers, &body, timeout)
            .map_err(|e| format!("Process.{rpc}: {e}"))?;
        if response.status != 200 {
            let mut text = Vec::new();
            let mut response = response;
            let status = response.status;
            let _ = response.read_to_end(&mut text);
            return Err(format!("Process.{rpc} answered HTTP {status}: {}", String::from_utf8_lossy(&text)));
        }
        Ok(StartStream { response })
    }

    /// Starts `script` under bash with a stdin pipe and keeps its start
    /// stream: the pid and the stream of its output.
    pub fn spawn_with_stdin(&self, tag: &str, script: &str) -> Result<(u32, OutputStream), String> {
        let request = json!({ "process": { "cmd": "/bin/bash", "args": ["-c", script] }, "tag": tag, "stdin": true });
        let mut stream = self.stream(As::Default, "Start", &request, QUICK)?;
        match stream.next().map_err(|e| format!("start with stdin: {e}"))? {
            Frame::Message(event) => match event["event"]["start"]["pid"].as_u64() {
                Some(pid) => Ok((pid as u32, OutputStream(stream))),
                None => Err(format!("first event is not a start event: {event}")),
            },
            Frame::End(trailer) => Err(format!("start with stdin failed: {trailer}")),
            Frame::Eof => Err("start with stdin: connection closed".into()),
        }
    }

    /// `Process.Connect` to `pid`: its output from now on.
    pub fn connect(&self, pid: u32, timeout: Duration) -> Result<OutputStream, String> {
        let mut stream = self.stream(As::Default, "Connect", &json!({ "process": { "pid": pid } }), timeout)?;
        match stream.next().map_err(|e| format!("connect to {pid}: {e}"))? {
            Frame::Message(event) if event["event"]["start"]["pid"].as_u64() == Some(u64::from(pid)) => {
                Ok(OutputStream(stream))
            }
            other => Err(format!("connect to {pid}: first frame {other:?}")),
        }
    }

    /// `Process.SendInput`: `data` to the process's stdin.
    pub fn send_stdin(&self, pid: u32, data: &[u8]) -> Result<(), String> {
        let stdin = base64::engine::general_purpose::STANDARD.encode(data);
        let body = json!({ "process": { "pid": pid }, "input": { "stdin": stdin } }).to_string();
        let mut headers = self.token_header();
        headers.push(("Content-Type", "application/json"));
        headers.push(("Connect-Protocol-Version", "1"));
        let response = http::request(self.port, "POST", "/process.Process/SendInput", &headers, body.as_bytes(), QUICK)
            .map_err(|e| format!("Process.SendInput: {e}"))?;
        if response.status != 200 {
            return Err(format!("Process.SendInput answered {}: {}", response.status, response.text()));
        }
        Ok(())
    }

    /// Runs `cmd args` to completion and returns its output and end event.
    pub fn run(
        &self,
        who: As<'_>,
        tag: Option<&str>,
        cmd: &str,
        args: &[&str],
        timeout: Duration,
    ) -> Result<Finished, String> {
        let deadline = Instant::now() + timeout;
        let mut stream = self.start_stream(who, tag, cmd, args, timeout)?;
        let mut finished = Finished::default();
        let mut ended = false;
        loop {
            if Instant::now() > deadline {
                return Err(format!("{cmd}: no end event within {timeout:?}"));
            }
            match stream.next().map_err(|e| format!("{cmd}: reading the stream: {e}"))? {
                Frame::Message(event) => {
                    let event = &event["event"];
                    if let Some(pid) = event["start"]["pid"].as_u64() {
                        finished.pid = pid as u32;
                    } else if let Some(data) = event.get("data") {
                        if let Some(b64) = data["stdout"].as_str() {
                            finished.stdout.push_str(&decode(b64)?);
                        } else if let Some(b64) = data["stderr"].as_str() {
                            finished.stderr.push_str(&decode(b64)?);
                        }
                    } else if let Some(end) = event.get("end") {
                        finished.exit_code = end["exitCode"].as_i64().unwrap_or(0);
                        finished.status = end["status"].as_str().unwrap_or("").to_owned();
                        ended = true;
                    }
                }
                Frame::End(trailer) => {
                    if let Some(error) = trailer.get("error") {
                        return Err(format!("{cmd}: stream ended with error {error}"));
                    }
                    if !ended {
                        return Err(format!("{cmd}: stream ended without an end event"));
                    }
                    return Ok(finished);
                }
                Frame::Eof => return Err(format!("{cmd}: connection closed before the end-of-stream frame")),
            }
        }
    }

    /// `bash -l -c script`, the way the SDKs run commands; fails unless it
    /// exits 0.
    pub fn sh(&self, who: As<'_>, script: &str) -> Result<Finished, String> {
        self.sh_tagged(who, None, script, Duration::from_secs(60))
    }

    /// [`Envd::sh`] with a tag and a timeout.
    pub fn sh_tagged(
        &self,
        who: As<'_>,
        tag: Option<&str>,
        script: &str,
        timeout: Duration,
    ) -> Result<Finished, String> {
        let finished = self.run(who, tag, "/bin/bash", &["-l", "-c", script], timeout)?;
        if finished.exit_code != 0 {
            return Err(format!(
                "`{script}` failed: {} (stdout {:?}, stderr {:?})",
                finished.status, finished.stdout, finished.stderr
            ));
        }
        Ok(finished)
    }

    /// Starts a long-running command, waits for its start event and hangs
    /// up: envd keeps the process running (CONTRACT.md 3.2). Returns the pid.
    pub fn spawn_detached(&self, who: As<'_>, tag: &str, script: &str) -> Result<u32, String> {
        let mut stream = self.start_stream(who, Some(tag), "/bin/bash", &["-l", "-c", script], QUICK)?;
        match stream.next().map_err(|e| format!("detached start: {e}"))? {
            Frame::Message(event) => event["event"]["start"]["pid"]
                .as_u64()
                .map(|pid| pid as u32)
                .ok_or_else(|| format!("first event is not a start event: {event}")),
            Frame::End(trailer) => Err(format!("detached start failed: {trailer}")),
            Frame::Eof => Err("detached start: connection closed".into()),
        }
    }
}

fn decode(b64: &str) -> Result<String, String> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| format!("base64 output: {e}"))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// One frame of a Connect server stream.
#[derive(Debug)]
enum Frame {
    /// A message envelope, as JSON.
    Message(Value),
    /// The end-of-stream envelope's JSON (`{}` or `{"error":...}`).
    End(Value),
    /// The body ended without an end-of-stream envelope.
    Eof,
}

#[derive(Debug)]
struct StartStream {
    response: StreamingResponse,
}

/// A process's output as a `Start` or `Connect` stream delivers it.
#[derive(Debug)]
pub struct OutputStream(StartStream);

impl OutputStream {
    /// Reads stdout until it holds `len` bytes; fails on an end, an error
    /// or a read that times out first.
    pub fn stdout(&mut self, len: usize) -> Result<String, String> {
        let mut stdout = String::new();
        while stdout.len() < len {
            match self.0.next().map_err(|e| format!("after {} of {len} bytes: {e}", stdout.len()))? {
                Frame::Message(event) => {
                    if let Some(b64) = event["event"]["data"]["stdout"].as_str() {
                        stdout.push_str(&decode(b64)?);
                    }
                }
                other => return Err(format!("after {} of {len} bytes: {other:?}", stdout.len())),
            }
        }
        Ok(stdout)
    }
}

impl StartStream {
    fn next(&mut self) -> io::Result<Frame> {
        let mut head = [0u8; 5];
        let mut got = 0;
        while got < head.len() {
            let n = self.response.read(&mut head[got..])?;
            if n == 0 {
                return if got == 0 { Ok(Frame::Eof) } else { Err(io::ErrorKind::UnexpectedEof.into()) };
            }
            got += n;
        }
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut payload = vec![0u8; len];
        self.response.read_exact(&mut payload)?;
        if head[0] & COMPRESSED != 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "compressed envelope, none was asked for"));
        }
        let value: Value =
            serde_json::from_slice(&payload).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok(if head[0] & END_STREAM != 0 { Frame::End(value) } else { Frame::Message(value) })
    }
}
