//! A metadata service (Firecracker's MMDS v2) on loopback for tests: a
//! session token from `PUT /latest/api/token`, then the metadata JSON on
//! `GET /` with that token; anything else is refused as MMDS refuses it.
//! A [`Fault`] makes it misbehave (garbage, 500s, slow answers) until
//! cleared, for the tests of envd facing a broken metadata service.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha512};

/// The hex SHA-512 of `text`, as MMDS publishes the access-token hash.
pub fn sha512_hex(text: &str) -> String {
    Sha512::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// How the service misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// It answers as MMDS does.
    None,
    /// The metadata read answers 200 with a body that is not JSON.
    Garbage,
    /// Every request answers 500.
    ServerError,
    /// The connection gets bytes that are not HTTP at all.
    NotHttp,
    /// Every answer comes this late.
    Slow(Duration),
}

/// A metadata service on loopback that insists on the v2 session token.
pub struct Mmds {
    pub port: u16,
    stop: Arc<AtomicBool>,
    fault: Arc<Mutex<Fault>>,
    /// Successful metadata reads so far.
    pub reads: Arc<AtomicU64>,
    /// Requests of any kind so far.
    pub requests: Arc<AtomicU64>,
    metadata: Arc<Mutex<Value>>,
}

impl Mmds {
    pub fn start(metadata: Value) -> Mmds {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind metadata service");
        Mmds::serve(listener, metadata)
    }

    /// A port nothing listens on yet; `serve_on` brings the service up later.
    pub fn reserve_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    pub fn serve_on(port: u16, metadata: Value) -> Mmds {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("rebind metadata port");
        Mmds::serve(listener, metadata)
    }

    /// A service that misbehaves from the start.
    pub fn start_faulty(metadata: Value, fault: Fault) -> Mmds {
        let mmds = Mmds::start(metadata);
        mmds.set_fault(fault);
        mmds
    }

    /// Changes how the service answers from the next request on.
    pub fn set_fault(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
    }

    pub fn serve(listener: TcpListener, metadata: Value) -> Mmds {
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let metadata = Arc::new(Mutex::new(metadata));
        let m = metadata.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let fault = Arc::new(Mutex::new(Fault::None));
        let reads = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let (s, f, r, q) = (stop.clone(), fault.clone(), reads.clone(), requests.clone());
        std::thread::spawn(move || {
            let tokens = Mutex::new(Vec::<String>::new());
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false).unwrap();
                        q.fetch_add(1, Ordering::SeqCst);
                        let fault = *f.lock().unwrap();
                        Mmds::answer(stream, &m, &tokens, &r, fault);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Mmds { port, stop, fault, reads, requests, metadata }
    }

    /// Replaces what the service answers from now on (as the host rewrites
    /// it before resuming a snapshot into a new sandbox).
    pub fn set(&self, metadata: Value) {
        *self.metadata.lock().unwrap() = metadata;
    }

    fn answer(
        stream: TcpStream,
        metadata: &Mutex<Value>,
        tokens: &Mutex<Vec<String>>,
        reads: &AtomicU64,
        fault: Fault,
    ) {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).is_err() {
            return;
        }
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
            }
        }
        let mut stream = stream;
        match fault {
            Fault::None | Fault::Garbage => {}
            Fault::ServerError => {
                let body = "internal error";
                let _ = write!(
                    stream,
                    "HTTP/1.1 500 Internal Server Error\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                return;
            }
            Fault::NotHttp => {
                let _ = stream.write_all(b"\x00\xffnot http at all\r\n\r\n");
                return;
            }
            Fault::Slow(delay) => std::thread::sleep(delay),
        }
        let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
        let (status, body) = match request_line.split_whitespace().take(2).collect::<Vec<_>>()[..] {
            ["PUT", "/latest/api/token"] if header("x-metadata-token-ttl-seconds").is_some() => {
                let token = format!("session-{}", tokens.lock().unwrap().len());
                tokens.lock().unwrap().push(token.clone());
                ("200 OK", token)
            }
            ["PUT", "/latest/api/token"] => ("400 Bad Request", String::new()),
            ["GET", "/"] => match header("x-metadata-token") {
                Some(token) if tokens.lock().unwrap().contains(&token) && fault == Fault::Garbage => {
                    ("200 OK", "{\"instanceID\": [garbage".to_owned())
                }
                Some(token) if tokens.lock().unwrap().contains(&token) => {
                    reads.fetch_add(1, Ordering::SeqCst);
                    ("200 OK", metadata.lock().unwrap().to_string())
                }
                _ => ("401 Unauthorized", String::new()),
            },
            _ => ("404 Not Found", String::new()),
        };
        let _ =
            write!(stream, "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Mmds {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
