//! A metadata service with Firecracker's MMDS v2 protocol, on host
//! loopback. qemu's `guestfwd` (through socat) makes it the guest's
//! 169.254.169.254:80.
//!
//! - `PUT /latest/api/token` with `X-metadata-token-ttl-seconds: 1..=21600`
//!   returns a new session token (text); without a valid TTL: 400.
//! - `GET /` (or `/key`) with a valid `X-metadata-token`: the metadata. With
//!   `Accept: application/json` the whole object (or the key's value) as
//!   JSON, otherwise IMDS-style text (key names, or the plain value).
//!   Missing or unknown token: 401.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// Firecracker's bounds for the token TTL.
const MAX_TTL_SECONDS: u64 = 21600;

/// What the guest did, for the checks.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    /// Tokens handed out.
    pub tokens: u64,
    /// Metadata reads answered with 200.
    pub reads: u64,
    /// Requests refused with 401.
    pub unauthorized: u64,
    /// Malformed requests (400, 404, 405).
    pub bad: u64,
}

#[derive(Debug, Default)]
struct Shared {
    metadata: Mutex<Value>,
    tokens: Mutex<HashSet<String>>,
    counters: Mutex<Counters>,
    next_token: AtomicU64,
    stop: AtomicBool,
}

/// The running service; stops when dropped.
#[derive(Debug)]
pub struct Mmds {
    /// The loopback port it listens on.
    pub port: u16,
    shared: Arc<Shared>,
}

impl Mmds {
    /// Starts serving `metadata` on 127.0.0.1 (a free port).
    pub fn start(metadata: Value) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared { metadata: Mutex::new(metadata), ..Default::default() });
        let serving = shared.clone();
        std::thread::spawn(move || {
            while !serving.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let shared = serving.clone();
                        std::thread::spawn(move || {
                            let _ = handle(stream, &shared);
                        });
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        });
        Ok(Self { port, shared })
    }

    /// Replaces the metadata (as the orchestrator does before a resume).
    pub fn set(&self, metadata: Value) {
        *self.shared.metadata.lock().expect("metadata lock") = metadata;
    }

    /// Forgets every session token (a restored Firecracker VM starts with
    /// an empty token store).
    pub fn forget_tokens(&self) {
        self.shared.tokens.lock().expect("tokens lock").clear();
    }

    /// What has been asked so far.
    pub fn counters(&self) -> Counters {
        self.shared.counters.lock().expect("counters lock").clone()
    }

    /// Waits until the guest has read the metadata at least `reads` times.
    pub fn wait_reads(&self, reads: u64, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.counters().reads >= reads {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Mmds {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

fn handle(stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or("").to_owned(), parts.next().unwrap_or("").to_owned());
    let mut headers = Vec::new();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim_end().is_empty() {
            break;
        }
        if let Some((name, value)) = header.trim_end().split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    if let Some(length) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        let mut body = vec![0u8; length.min(1 << 16)];
        reader.read_exact(&mut body)?;
    }
    let (status, content_type, body) = answer(shared, &method, &path, &header);
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        _ => "Method Not Allowed",
    };
    let mut writer = stream;
    write!(
        writer,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    writer.write_all(body.as_bytes())?;
    writer.flush()
}

fn answer(
    shared: &Shared,
    method: &str,
    path: &str,
    header: &dyn Fn(&str) -> Option<String>,
) -> (u16, &'static str, String) {
    let count = |f: fn(&mut Counters)| f(&mut shared.counters.lock().expect("counters lock"));
    match (method, path) {
        ("PUT", "/latest/api/token") => {
            let ttl = header("x-metadata-token-ttl-seconds").and_then(|v| v.parse::<u64>().ok());
            if !matches!(ttl, Some(1..=MAX_TTL_SECONDS)) || header("x-forwarded-for").is_some() {
                count(|c| c.bad += 1);
                return (400, "text/plain", "invalid or missing X-metadata-token-ttl-seconds".into());
            }
            let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
            let token = format!("e2e-{:x}-{nanos:x}", shared.next_token.fetch_add(1, Ordering::Relaxed));
            shared.tokens.lock().expect("tokens lock").insert(token.clone());
            count(|c| c.tokens += 1);
            (200, "text/plain", token)
        }
        ("GET", _) => {
            let valid =
                header("x-metadata-token").is_some_and(|t| shared.tokens.lock().expect("tokens lock").contains(&t));
            if !valid {
                count(|c| c.unauthorized += 1);
                return (401, "text/plain", "missing or invalid X-metadata-token".into());
            }
            let metadata = shared.metadata.lock().expect("metadata lock").clone();
            let key = path.trim_start_matches('/');
            let value = if key.is_empty() { Some(&metadata) } else { metadata.get(key) };
            let Some(value) = value else {
                count(|c| c.bad += 1);
                return (404, "text/plain", "not found".into());
            };
            count(|c| c.reads += 1);
            if header("accept").is_some_and(|a| a.contains("application/json")) {
                (200, "application/json", value.to_string())
            } else {
                let text = match value {
                    Value::Object(map) => map.keys().cloned().collect::<Vec<_>>().join("\n"),
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (200, "text/plain", text)
            }
        }
        _ => {
            count(|c| c.bad += 1);
            (405, "text/plain", "method not allowed".into())
        }
    }
}
