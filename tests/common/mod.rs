//! Shared harness for the integration tests: runs the real `envd` binary on
//! a free loopback port and talks to it from outside, the way the SDKs and
//! the orchestrator do (Connect JSON and binary protobuf, unary, server
//! stream and client stream, over HTTP/1.1 or h2c).
//!
//! ```ignore
//! mod common;
//! use common::*;
//!
//! #[tokio::test]
//! async fn echo() {
//!     let envd = Envd::start();
//!     let run = envd.client().run(&bash("echo hi"), &[]).await;
//!     assert_eq!(run.stdout_str(), "hi\n");
//! }
//! ```
//!
//! Every test starts its own daemon (`Envd::start`, or `Envd::options()`
//! for flags, env vars and a `nice` wrapper) with its own state directory;
//! it is killed, with every process it started, when the `Envd` is dropped
//! (processes whose start event a JSON stream saw are found by session even
//! after their parent died). It also dies with the thread that started it,
//! so never keep one in a `static`.
//!
//! The pieces: [`Client`] (plain requests, Connect unary calls in JSON or
//! protobuf, server streams as [`ConnectStream`] read envelope by envelope,
//! client streams as [`InputStream`] fed message by message), [`Run`] (a
//! process stream collected with its order checked), [`test_user`] (a real
//! OS user with a supplementary group) and [`pb`] (hand-written prost
//! messages for binary tests).
//!
//! The tests must run as root: envd switches users and resets priorities.
//! Not being root is a failure, never a silent skip.

#![allow(dead_code)]

pub mod attacker;
pub mod cgroup;
pub mod collector;
pub mod footprint;
pub mod host_setup;
pub mod mmds;
pub mod pb;
pub mod time;
pub mod tmpfs;

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, Method, Request, StatusCode, Version};
use http_body::Frame as BodyFrame;
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

/// RPC paths of the Process service.
pub mod rpc {
    pub const LIST: &str = "/process.Process/List";
    pub const CONNECT: &str = "/process.Process/Connect";
    pub const START: &str = "/process.Process/Start";
    pub const UPDATE: &str = "/process.Process/Update";
    pub const STREAM_INPUT: &str = "/process.Process/StreamInput";
    pub const SEND_INPUT: &str = "/process.Process/SendInput";
    pub const SEND_SIGNAL: &str = "/process.Process/SendSignal";
    pub const CLOSE_STDIN: &str = "/process.Process/CloseStdin";
}

/// RPC paths of the Filesystem service.
pub mod fs_rpc {
    pub const STAT: &str = "/filesystem.Filesystem/Stat";
    pub const MAKE_DIR: &str = "/filesystem.Filesystem/MakeDir";
    pub const MOVE: &str = "/filesystem.Filesystem/Move";
    pub const LIST_DIR: &str = "/filesystem.Filesystem/ListDir";
    pub const REMOVE: &str = "/filesystem.Filesystem/Remove";
    pub const WATCH_DIR: &str = "/filesystem.Filesystem/WatchDir";
    pub const CREATE_WATCHER: &str = "/filesystem.Filesystem/CreateWatcher";
    pub const GET_WATCHER_EVENTS: &str = "/filesystem.Filesystem/GetWatcherEvents";
    pub const REMOVE_WATCHER: &str = "/filesystem.Filesystem/RemoveWatcher";
}

/// The next filesystem event of a WatchDir stream, skipping keep-alives.
pub async fn next_fs_event(stream: &mut ConnectStream) -> Value {
    loop {
        let frame = stream.next_frame().await.expect("stream still open");
        assert!(!frame.is_end(), "stream ended: {:?}", frame.end_error());
        let message = frame.json();
        if message.get("keepalive").is_none() {
            return message["filesystem"].clone();
        }
    }
}

/// How long any single wait on envd may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(30);
/// How long envd may take to answer `/health` after its start.
const STARTUP: Duration = Duration::from_secs(10);

/// Panics unless the tests run as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "the envd integration tests must run as root (envd switches users); euid is {euid}");
}

// ---------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------

/// How to start envd: extra flags, environment, a wrapper command.
#[derive(Debug, Clone, Default)]
pub struct EnvdOptions {
    binary: Option<PathBuf>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    wrapper: Vec<String>,
    stalled_stderr: Option<Arc<std::sync::Barrier>>,
}

impl EnvdOptions {
    /// Adds flags after `--dev --port N --state-dir D`.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an env var of the envd process (e.g. `PATH`).
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Runs envd through a wrapper that execs it, e.g. `["nice", "-n", "-5"]`.
    pub fn wrapper<I, S>(mut self, wrapper: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.wrapper = wrapper.into_iter().map(Into::into).collect();
        self
    }

    /// Nobody reads envd's stderr until `release` is waited on by a second
    /// party (a log sink that has stopped, as journald during a freeze).
    pub fn stalled_stderr(mut self, release: Arc<std::sync::Barrier>) -> Self {
        self.stalled_stderr = Some(release);
        self
    }

    /// Uses another envd binary (the benchmark picks the release build).
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// Starts envd and waits until `GET /health` answers 204.
    pub fn start(self) -> Envd {
        require_root();
        // A port picked here may be taken by someone else before envd binds
        // it; then envd exits at once and another port is tried.
        let mut last_failure = String::new();
        for _ in 0..5 {
            match Envd::try_start(&self) {
                Ok(envd) => return envd,
                Err(failure) => last_failure = failure,
            }
        }
        panic!("envd did not start: {last_failure}");
    }
}

/// The envd binary cargo built for this test or bench, and its profile.
pub fn binary_and_profile() -> (PathBuf, &'static str) {
    let built = Envd::binary();
    let profile = if built.components().any(|c| c.as_os_str() == "release") { "release" } else { "debug" };
    (built, profile)
}

/// A running envd, killed (with every process it started) on drop.
pub struct Envd {
    child: Child,
    port: u16,
    /// Pids of start events seen by its clients: each leads a session
    /// whose members are killed on drop, even once the leader is gone.
    sessions: Sessions,
    state_dir: PathBuf,
    stderr: Arc<Mutex<Vec<u8>>>,
    ready_after: Duration,
}

impl Envd {
    /// envd with the default flags: `--dev --bind 127.0.0.1 --port <free>`.
    pub fn start() -> Envd {
        Envd::options().start()
    }

    /// Options for a customised start.
    pub fn options() -> EnvdOptions {
        EnvdOptions::default()
    }

    /// The envd binary cargo built for these tests.
    pub fn binary() -> PathBuf {
        PathBuf::from(env!("CARGO_BIN_EXE_envd"))
    }

    fn try_start(options: &EnvdOptions) -> Result<Envd, String> {
        let port = free_port();
        let state_dir = std::env::temp_dir().join(format!("envd-test-state-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&state_dir).map_err(|e| format!("creating {}: {e}", state_dir.display()))?;
        let binary = options.binary.clone().unwrap_or_else(Envd::binary);
        let mut argv: Vec<String> = options.wrapper.clone();
        argv.push(binary.display().to_string());
        argv.extend(
            [
                "--dev",
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--state-dir",
                &state_dir.display().to_string(),
            ]
            .map(str::to_owned),
        );
        argv.extend(options.args.iter().cloned());
        let mut command = Command::new(&argv[0]);
        command.args(&argv[1..]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        for (name, value) in &options.env {
            command.env(name, value);
        }
        // SAFETY: prctl is async-signal-safe; envd must not outlive the test.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
                Ok(())
            });
        }
        let started_at = Instant::now();
        let mut child = command.spawn().map_err(|e| format!("spawning {argv:?}: {e}"))?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut pipe = child.stderr.take().expect("stderr is piped");
        let sink = stderr.clone();
        let stalled = options.stalled_stderr.clone();
        std::thread::spawn(move || {
            if let Some(release) = stalled {
                release.wait();
            }
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        let mut envd =
            Envd { child, port, sessions: Sessions::default(), state_dir, stderr, ready_after: Duration::ZERO };
        loop {
            if health_ok(port) {
                envd.ready_after = started_at.elapsed();
                return Ok(envd);
            }
            if let Ok(Some(status)) = envd.child.try_wait() {
                std::thread::sleep(Duration::from_millis(50));
                return Err(format!(
                    "envd {argv:?} exited with {status} before answering /health; stderr:\n{}",
                    envd.stderr()
                ));
            }
            if started_at.elapsed() > STARTUP {
                panic!(
                    "envd {argv:?} did not answer GET /health with 204 within {STARTUP:?}; stderr:\n{}",
                    envd.stderr()
                );
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    /// The port envd listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// envd's pid (the wrapper's, which is the same after its exec).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How long the start took until `/health` answered.
    pub fn ready_after(&self) -> Duration {
        self.ready_after
    }

    /// Everything envd wrote to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Whether envd is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// A client over HTTP/1.1 with a connection pool.
    pub fn client(&self) -> Client {
        Client::new(self.port, false, self.sessions.clone())
    }

    /// A client speaking HTTP/2 with prior knowledge (h2c).
    pub fn h2c_client(&self) -> Client {
        Client::new(self.port, true, self.sessions.clone())
    }

    /// A line of `/proc/<envd>/status`, e.g. `VmRSS`, in KiB.
    pub fn status_kib(&self, field: &str) -> u64 {
        proc_status_kib(self.pid(), field)
    }
}

impl Drop for Envd {
    fn drop(&mut self) {
        let pid = self.child.id() as i32;
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut victims = descendants(pid, &sessions);
        victims.push(pid);
        for victim in victims {
            // SAFETY: kill(2) on processes this harness started (envd and
            // its descendants); at worst ESRCH.
            unsafe { libc::kill(victim, libc::SIGKILL) };
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.state_dir);
        if std::thread::panicking() {
            eprintln!("--- envd stderr (port {}) ---\n{}--- end of envd stderr ---", self.port, self.stderr());
        }
    }
}

/// A loopback port free at the time of the call.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free loopback port").port()
}

/// One blocking `GET /health` over a fresh connection: 204 or not.
pub fn health_ok(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut line = String::new();
    let _ = std::io::BufReader::new(stream).read_line(&mut line);
    line.starts_with("HTTP/1.1 204")
}

/// Fails naming every line of the logs (`(whose, text)`) that contains one
/// of `secrets` (`(what, value)`). The logs must be debug logs
/// (`--verbose`): a scan of a quiet log would prove little.
pub fn assert_no_secret_logged(logs: &[(&str, String)], secrets: &[(&str, String)]) {
    let mut hits = Vec::new();
    for (whose, log) in logs {
        assert!(log.contains(" DEBUG "), "{whose} did not log at debug level: run it with --verbose");
        for line in log.lines() {
            for (what, _) in secrets.iter().filter(|(_, value)| line.contains(value.as_str())) {
                hits.push(format!("{whose}: {what} in: {line}"));
            }
        }
    }
    assert!(hits.is_empty(), "secrets in the log:\n{}", hits.join("\n"));
}

/// A numeric field of `/proc/<pid>/status` (the `kB` figures).
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Fields of `/proc/<pid>/stat` after the command name: index 0 is the
/// state (field 3 in proc(5)), so field N of proc(5) is index N - 3.
pub fn proc_stat(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Whether a process with this pid exists (and is not a zombie).
pub fn pid_alive(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|fields| fields[0] != "Z")
}

type Sessions = Arc<Mutex<HashSet<i32>>>;

/// Every process descending from `root`, including those reparented away
/// but still in a session one of its descendants leads or led.
fn descendants(root: i32, sessions: &HashSet<i32>) -> Vec<i32> {
    let mut table = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let Some(fields) = proc_stat(pid) else { continue };
            let ppid: i32 = fields[1].parse().unwrap_or(0);
            let sid: i32 = fields[3].parse().unwrap_or(0);
            table.push((pid as i32, ppid, sid));
        }
    }
    let mut found: HashSet<i32> = HashSet::from([root]);
    found.extend(table.iter().filter(|(_, _, sid)| sessions.contains(sid)).map(|(pid, _, _)| *pid));
    loop {
        let before = found.len();
        for &(pid, ppid, sid) in &table {
            if found.contains(&ppid) || (sid != root && found.contains(&sid)) {
                found.insert(pid);
            }
        }
        if found.len() == before {
            break;
        }
    }
    found.remove(&root);
    found.into_iter().collect()
}

// ---------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------

type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ReqBody = BoxBody<Bytes, BoxError>;

/// A small HTTP client for one envd; cloning shares the connection pool.
#[derive(Clone)]
pub struct Client {
    base: String,
    http: HyperClient<HttpConnector, ReqBody>,
    headers: Vec<(String, String)>,
    sessions: Sessions,
}

/// A complete (non-streamed) response.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON (panics with the body if it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?} (status {})", self.text(), self.status))
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header as text ("" when absent).
    pub fn header(&self, name: &str) -> &str {
        header_str(&self.headers, name)
    }
}

/// A header as text ("" when absent).
pub fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers.get(name).map_or("", |v| v.to_str().unwrap_or("<not text>"))
}

/// A Connect error (from a unary error body or an end-stream frame).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    pub code: String,
    pub message: String,
}

impl Client {
    fn new(port: u16, h2c: bool, sessions: Sessions) -> Client {
        let mut builder = HyperClient::builder(TokioExecutor::new());
        builder.pool_idle_timeout(Duration::from_secs(30));
        if h2c {
            builder.http2_only(true);
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Client {
            base: format!("http://127.0.0.1:{port}"),
            http: builder.build(connector),
            headers: Vec::new(),
            sessions,
        }
    }

    /// A plain HTTP/1.1 client of another server on loopback.
    pub fn for_port(port: u16) -> Client {
        Client::new(port, false, Sessions::default())
    }

    /// This client with a header sent on every request (token, user).
    pub fn with_header(mut self, name: &str, value: &str) -> Client {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// This client as the user `name` (`Authorization: Basic`).
    pub fn with_user(self, name: &str) -> Client {
        self.with_header("authorization", &basic(name))
    }

    fn build(&self, method: Method, path: &str, headers: &[(&str, &str)], body: ReqBody) -> Request<ReqBody> {
        let mut request = Request::builder().method(method).uri(format!("{}{path}", self.base));
        for (name, value) in &self.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(body).expect("a valid request")
    }

    /// Sends a request and returns the response head with its live body.
    pub async fn open(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: ReqBody,
    ) -> http::Response<Incoming> {
        let request = self.build(method.clone(), path, headers, body);
        tokio::time::timeout(PATIENCE, self.http.request(request))
            .await
            .unwrap_or_else(|_| panic!("no response head to {method} {path} within {PATIENCE:?}"))
            .unwrap_or_else(|e| panic!("{method} {path}: {e:?}"))
    }

    /// Sends a request and reads the whole response.
    pub async fn send(&self, method: Method, path: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Reply {
        let response = self.open(method.clone(), path, headers, full(body)).await;
        let (parts, body) = response.into_parts();
        let body = tokio::time::timeout(PATIENCE, body.collect())
            .await
            .unwrap_or_else(|_| panic!("response body of {method} {path} did not end within {PATIENCE:?}"))
            .unwrap_or_else(|e| panic!("reading the body of {method} {path}: {e}"))
            .to_bytes();
        Reply { status: parts.status, version: parts.version, headers: parts.headers, body }
    }

    /// Sends a request whose connection may drop (a daemon that execs):
    /// the error instead of a panic.
    pub async fn try_send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: ReqBody,
    ) -> Result<Reply, String> {
        let request = self.build(method, path, headers, body);
        let response = tokio::time::timeout(PATIENCE, self.http.request(request))
            .await
            .map_err(|_| "no response head".to_owned())?
            .map_err(|e| format!("{e:?}"))?;
        let (parts, body) = response.into_parts();
        let body = tokio::time::timeout(PATIENCE, body.collect())
            .await
            .map_err(|_| "no response body".to_owned())?
            .map_err(|e| format!("{e:?}"))?
            .to_bytes();
        Ok(Reply { status: parts.status, version: parts.version, headers: parts.headers, body })
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Reply {
        self.send(Method::GET, path, &[], Bytes::new()).await
    }

    /// `POST path` with a JSON body (e.g. `/init`).
    pub async fn post_json(&self, path: &str, body: &Value) -> Reply {
        self.send(Method::POST, path, &[("content-type", "application/json")], body.to_string()).await
    }

    /// A Connect unary call with JSON.
    pub async fn unary(&self, rpc: &str, message: &Value, headers: &[(&str, &str)]) -> Reply {
        let headers = with_headers(&[("content-type", "application/json"), ("connect-protocol-version", "1")], headers);
        self.send(Method::POST, rpc, &headers, message.to_string()).await
    }

    /// A Connect unary call with binary protobuf.
    pub async fn unary_proto(&self, rpc: &str, message: Vec<u8>, headers: &[(&str, &str)]) -> Reply {
        let headers =
            with_headers(&[("content-type", "application/proto"), ("connect-protocol-version", "1")], headers);
        self.send(Method::POST, rpc, &headers, message).await
    }

    /// A Connect unary JSON call that must succeed; returns the message.
    pub async fn call(&self, rpc: &str, message: &Value) -> Value {
        let reply = self.unary(rpc, message, &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{rpc} {message} failed: {}", reply.text());
        reply.json()
    }

    /// A Connect unary JSON call that must fail; returns the error.
    pub async fn call_err(&self, rpc: &str, message: &Value) -> (StatusCode, RpcError) {
        let reply = self.unary(rpc, message, &[]).await;
        assert_ne!(reply.status, StatusCode::OK, "{rpc} {message} unexpectedly succeeded: {}", reply.text());
        assert_eq!(reply.header("content-type"), "application/json", "Connect error bodies are JSON");
        (reply.status, rpc_error(&reply.json()))
    }

    /// A Connect server-stream call with JSON.
    pub async fn stream(&self, rpc: &str, message: &Value, headers: &[(&str, &str)]) -> ConnectStream {
        let body = envelope(0, message.to_string().as_bytes());
        let headers =
            with_headers(&[("content-type", "application/connect+json"), ("connect-protocol-version", "1")], headers);
        ConnectStream::new(self.open(Method::POST, rpc, &headers, full(body)).await, self.sessions.clone())
    }

    /// A Connect server-stream call with binary protobuf.
    pub async fn stream_proto(&self, rpc: &str, message: &[u8], headers: &[(&str, &str)]) -> ConnectStream {
        let body = envelope(0, message);
        let headers =
            with_headers(&[("content-type", "application/connect+proto"), ("connect-protocol-version", "1")], headers);
        ConnectStream::new(self.open(Method::POST, rpc, &headers, full(body)).await, self.sessions.clone())
    }

    /// Opens a Connect client-stream call with JSON whose request body is
    /// sent message by message, as [`InputStream::send`] is called.
    pub fn client_stream(&self, rpc: &str, headers: &[(&str, &str)]) -> InputStream {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let headers =
            with_headers(&[("content-type", "application/connect+json"), ("connect-protocol-version", "1")], headers);
        let request = self.build(Method::POST, rpc, &headers, ChannelBody { rx }.boxed());
        let http = self.http.clone();
        let rpc = rpc.to_owned();
        let sessions = self.sessions.clone();
        let response = tokio::spawn(async move {
            let response = http.request(request).await.unwrap_or_else(|e| panic!("{rpc}: {e:?}"));
            ConnectStream::new(response, sessions)
        });
        InputStream { tx: Some(tx), response }
    }

    /// Starts a process (JSON) and collects its stream to the end; the
    /// run must succeed (start, …, end, then a clean end of stream).
    pub async fn run(&self, start: &Value, headers: &[(&str, &str)]) -> Run {
        let run = self.stream(rpc::START, start, headers).await.collect().await;
        assert!(run.error.is_none(), "Start {start} failed: {:?}", run.error);
        assert!(run.end.is_some(), "Start {start}: no end event");
        run
    }

    /// The processes `List` reports, by pid.
    pub async fn list(&self) -> HashMap<u32, Value> {
        let reply = self.call(rpc::LIST, &json!({})).await;
        let processes = reply.get("processes").and_then(Value::as_array).cloned().unwrap_or_default();
        processes.into_iter().map(|p| (p["pid"].as_u64().expect("pid") as u32, p)).collect()
    }

    /// `SendSignal` SIGKILL to a pid (must succeed).
    pub async fn kill(&self, pid: u32) {
        self.call(rpc::SEND_SIGNAL, &json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"})).await;
    }
}

fn with_headers<'a>(defaults: &[(&'a str, &'a str)], extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut headers: Vec<_> =
        defaults.iter().filter(|(d, _)| !extra.iter().any(|(e, _)| e.eq_ignore_ascii_case(d))).copied().collect();
    headers.extend_from_slice(extra);
    headers
}

/// A whole request body.
pub fn full(body: impl Into<Bytes>) -> ReqBody {
    http_body_util::Full::new(body.into()).map_err(|never: Infallible| match never {}).boxed()
}

/// `Authorization: Basic base64("<user>:")`, as the SDKs send it.
pub fn basic(user: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:")))
}

/// A Connect envelope: flags, big-endian length, payload.
pub fn envelope(flags: u8, payload: &[u8]) -> Bytes {
    let mut frame = Vec::with_capacity(5 + payload.len());
    frame.push(flags);
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    frame.into()
}

fn rpc_error(error: &Value) -> RpcError {
    RpcError {
        code: error["code"].as_str().unwrap_or_else(|| panic!("error without a string code: {error}")).to_owned(),
        message: error["message"].as_str().unwrap_or("").to_owned(),
    }
}

/// A request body fed from a channel: each `Bytes` is sent as it comes.
struct ChannelBody {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<BodyFrame<Bytes>, BoxError>>> {
        self.rx.poll_recv(cx).map(|chunk| chunk.map(|c| Ok(BodyFrame::data(c))))
    }
}

/// The sending side of a client-stream call.
pub struct InputStream {
    tx: Option<tokio::sync::mpsc::Sender<Bytes>>,
    response: tokio::task::JoinHandle<ConnectStream>,
}

impl InputStream {
    /// Sends one JSON message envelope.
    pub async fn send(&self, message: &Value) {
        self.send_raw(envelope(0, message.to_string().as_bytes())).await;
    }

    /// Sends raw request-body bytes.
    pub async fn send_raw(&self, bytes: Bytes) {
        let tx = self.tx.as_ref().expect("stream still open");
        // A send fails once envd has answered and the body is dropped; the
        // answer tells the test why.
        let _ = tx.send(bytes).await;
    }

    /// Whether envd already answered (e.g. it ended the call early).
    pub fn answered(&self) -> bool {
        self.response.is_finished()
    }

    /// The response, without closing the request body first.
    pub async fn response(&mut self) -> ConnectStream {
        tokio::time::timeout(PATIENCE, &mut self.response)
            .await
            .expect("client-stream response")
            .expect("response task")
    }

    /// Ends the request body and waits for the response.
    pub async fn finish(mut self) -> ConnectStream {
        self.tx.take();
        self.response().await
    }
}

// ---------------------------------------------------------------------------
// Streams
// ---------------------------------------------------------------------------

/// One envelope of a Connect stream response.
#[derive(Debug, Clone)]
pub struct Frame {
    pub flags: u8,
    pub payload: Bytes,
}

impl Frame {
    /// The end-of-stream frame (flag 0x02).
    pub fn is_end(&self) -> bool {
        self.flags & 0x02 != 0
    }

    /// The payload as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.payload)
            .unwrap_or_else(|e| panic!("frame payload is not JSON ({e}): {:?}", String::from_utf8_lossy(&self.payload)))
    }

    /// The error an end-of-stream frame carries, if any.
    pub fn end_error(&self) -> Option<RpcError> {
        assert!(self.is_end(), "not an end-of-stream frame");
        self.json().get("error").map(rpc_error)
    }
}

/// A server-stream response read envelope by envelope, as bytes arrive.
pub struct ConnectStream {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    body: Incoming,
    buf: BytesMut,
    body_done: bool,
    sessions: Sessions,
}

/// A process event (`StartResponse`/`ConnectResponse`) or the stream end.
#[derive(Debug, Clone, PartialEq)]
pub enum ProcEvent {
    Start(u32),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Pty(Vec<u8>),
    Keepalive,
    /// The `EndEvent` as JSON.
    End(Value),
    /// The end-of-stream frame: `None` on success.
    Finished(Option<RpcError>),
}

impl ConnectStream {
    fn new(response: http::Response<Incoming>, sessions: Sessions) -> ConnectStream {
        let (parts, body) = response.into_parts();
        ConnectStream {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body,
            buf: BytesMut::new(),
            body_done: false,
            sessions,
        }
    }

    /// A response header as text.
    pub fn header(&self, name: &str) -> &str {
        header_str(&self.headers, name)
    }

    /// The next envelope; `None` once the body ended cleanly between
    /// envelopes. Panics on a truncated envelope or after [`PATIENCE`].
    pub async fn next_frame(&mut self) -> Option<Frame> {
        self.next_frame_within(PATIENCE).await.unwrap_or_else(|| panic!("no stream frame within {PATIENCE:?}"))
    }

    /// Like [`next_frame`](Self::next_frame), but `None` (outer) when
    /// nothing complete arrived within `wait`.
    pub async fn next_frame_within(&mut self, wait: Duration) -> Option<Option<Frame>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize;
                if self.buf.len() >= 5 + len {
                    let flags = self.buf[0];
                    self.buf.advance(5);
                    let payload = self.buf.split_to(len).freeze();
                    return Some(Some(Frame { flags, payload }));
                }
            }
            if self.body_done {
                assert!(self.buf.is_empty(), "stream body ended inside an envelope ({} bytes left)", self.buf.len());
                return Some(None);
            }
            let frame = match tokio::time::timeout_at(deadline, self.body.frame()).await {
                Err(_elapsed) => return None,
                Ok(frame) => frame,
            };
            match frame {
                None => self.body_done = true,
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => panic!("reading the stream body: {e}"),
            }
        }
    }

    /// The next process event of a JSON `Start`/`Connect` stream.
    pub async fn next_event(&mut self) -> ProcEvent {
        let frame = self.next_frame().await.expect("the stream ended without an end-of-stream frame");
        if frame.is_end() {
            return ProcEvent::Finished(frame.end_error());
        }
        assert_eq!(frame.flags, 0, "unexpected envelope flags");
        let event = proc_event(&frame.json());
        if let ProcEvent::Start(pid) = event {
            self.record_session(pid);
        }
        event
    }

    /// Remembers a started pid so that its session is killed with envd
    /// (done for JSON process streams; call it for others).
    pub fn record_session(&self, pid: u32) {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner()).insert(pid as i32);
    }

    /// Reads a JSON process stream to its end, checking the order: start,
    /// then data and keep-alives, then end, then a clean end of stream (or
    /// only an end-of-stream error), and nothing after it.
    pub async fn collect(mut self) -> Run {
        let mut run = Run::default();
        loop {
            match self.next_event().await {
                ProcEvent::Start(pid) => {
                    assert!(run.events.is_empty(), "start event after other events: {:?}", run.events);
                    run.pid = Some(pid);
                    run.events.push("start");
                    continue;
                }
                ProcEvent::Finished(error) => {
                    run.error = error;
                    break;
                }
                _ if run.pid.is_none() => panic!("the first event was not the start event"),
                _ if run.end.is_some() => panic!("an event followed the end event"),
                ProcEvent::Stdout(data) => {
                    run.stdout.extend_from_slice(&data);
                    run.events.push("stdout");
                }
                ProcEvent::Stderr(data) => {
                    run.stderr.extend_from_slice(&data);
                    run.events.push("stderr");
                }
                ProcEvent::Pty(data) => {
                    run.pty.extend_from_slice(&data);
                    run.events.push("pty");
                }
                ProcEvent::Keepalive => {
                    run.keepalives += 1;
                    run.events.push("keepalive");
                }
                ProcEvent::End(end) => {
                    run.end = Some(end);
                    run.events.push("end");
                }
            }
        }
        assert!(self.next_frame().await.is_none(), "data after the end-of-stream frame");
        run
    }
}

/// Decodes one JSON process event message (`{"event":{...}}`).
pub fn proc_event(message: &Value) -> ProcEvent {
    let event = message.get("event").and_then(Value::as_object).unwrap_or_else(|| panic!("no event in {message}"));
    assert_eq!(event.len(), 1, "exactly one event kind expected: {message}");
    let (kind, body) = event.iter().next().unwrap();
    match kind.as_str() {
        "start" => {
            ProcEvent::Start(body["pid"].as_u64().unwrap_or_else(|| panic!("start without pid: {message}")) as u32)
        }
        "data" => {
            let data = body.as_object().unwrap_or_else(|| panic!("bad data event: {message}"));
            assert_eq!(data.len(), 1, "exactly one output kind expected: {message}");
            let (stream, text) = data.iter().next().unwrap();
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(text.as_str().expect("base64 string"))
                .unwrap_or_else(|e| panic!("bad base64 in {message}: {e}"));
            match stream.as_str() {
                "stdout" => ProcEvent::Stdout(bytes),
                "stderr" => ProcEvent::Stderr(bytes),
                "pty" => ProcEvent::Pty(bytes),
                other => panic!("unknown output {other}"),
            }
        }
        "end" => ProcEvent::End(body.clone()),
        "keepalive" => ProcEvent::Keepalive,
        other => panic!("unknown event {other}: {message}"),
    }
}

/// A process stream read to its end.
#[derive(Debug, Default)]
pub struct Run {
    pub pid: Option<u32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub pty: Vec<u8>,
    pub keepalives: usize,
    /// The `EndEvent` as JSON.
    pub end: Option<Value>,
    /// The end-of-stream error, if the stream failed.
    pub error: Option<RpcError>,
    /// Event kinds in arrival order.
    pub events: Vec<&'static str>,
}

impl Run {
    pub fn pid(&self) -> u32 {
        self.pid.expect("no start event")
    }

    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// The end event (panics if there was none).
    pub fn end(&self) -> &Value {
        self.end.as_ref().unwrap_or_else(|| panic!("no end event (error: {:?})", self.error))
    }

    /// `exitCode` of the end event (0 when omitted, as JSON omits it).
    pub fn exit_code(&self) -> i64 {
        self.end().get("exitCode").map_or(0, |c| c.as_i64().expect("integer exitCode"))
    }
}

/// A `Start` request running `script` in `/bin/bash -c` with stdin off.
pub fn bash(script: &str) -> Value {
    json!({"process": {"cmd": "/bin/bash", "args": ["-c", script]}, "stdin": false})
}

/// Polls `check` every 20 ms until it holds, for at most `wait`.
pub async fn eventually(wait: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check()
}

// ---------------------------------------------------------------------------
// OS users
// ---------------------------------------------------------------------------

/// A real OS user for the tests, with one supplementary group.
#[derive(Debug, Clone)]
pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    /// The supplementary group listing this user in `/etc/group`.
    pub extra_group: String,
    pub extra_gid: u32,
}

/// The name of the shared test user.
pub const TEST_USER: &str = "envdtest";
const TEST_GROUP: &str = "envdtestgrp";

/// The test user `envdtest` (created with a home directory when missing)
/// and its supplementary group `envdtestgrp`. Idempotent.
pub fn test_user() -> TestUser {
    static LOCK: Mutex<()> = Mutex::new(());
    let _one_at_a_time = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    require_root();
    if passwd_entry(TEST_USER).is_none() {
        // 9: the user exists (another test binary created it meanwhile).
        run_tool("useradd", &["-m", "-s", "/bin/bash", TEST_USER], &[9]);
    }
    if group_entry(TEST_GROUP).is_none() {
        run_tool("groupadd", &["-f", TEST_GROUP], &[]);
    }
    if !group_entry(TEST_GROUP).is_some_and(|(_, members)| members.iter().any(|m| m == TEST_USER)) {
        run_tool("usermod", &["-aG", TEST_GROUP, TEST_USER], &[]);
    }
    let (uid, gid, home) = passwd_entry(TEST_USER).expect("test user in /etc/passwd");
    let (extra_gid, _) = group_entry(TEST_GROUP).expect("test group in /etc/group");
    assert!(Path::new(&home).is_dir(), "home {home} of {TEST_USER} is missing");
    TestUser { name: TEST_USER.into(), uid, gid, home: home.into(), extra_group: TEST_GROUP.into(), extra_gid }
}

fn run_tool(tool: &str, args: &[&str], also_ok: &[i32]) {
    let status = Command::new(tool).args(args).status().unwrap_or_else(|e| panic!("running {tool}: {e}"));
    let code = status.code().unwrap_or(-1);
    assert!(status.success() || also_ok.contains(&code), "{tool} {args:?} failed with {status}");
}

fn passwd_entry(name: &str) -> Option<(u32, u32, String)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd
        .lines()
        .find_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            (f.len() >= 7 && f[0] == name).then(|| (f[2].parse().ok(), f[3].parse().ok(), f[5].to_owned()))
        })
        .and_then(|(uid, gid, home)| Some((uid?, gid?, home)))
}

fn group_entry(name: &str) -> Option<(u32, Vec<String>)> {
    let group = std::fs::read_to_string("/etc/group").ok()?;
    group.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 3 || f[0] != name {
            return None;
        }
        let members =
            f.get(3).map_or(Vec::new(), |m| m.split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect());
        Some((f[2].parse().ok()?, members))
    })
}

/// A directory for one test, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("envd-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }

    pub fn s(&self, rel: &str) -> String {
        self.path(rel).display().to_string()
    }

    /// Names in a directory, sorted (temporary files would show here).
    pub fn names(&self, rel: &str) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.path(rel))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
