//! A log collector on loopback for tests, as the host runs one: takes
//! `POST`s of one JSON object each (HTTP/1.1, kept-alive connections) and
//! answers as told: at once, after a delay, or with 500.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

/// How the collector answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// 200 at once; the line is kept.
    Ok,
    /// 200 after this long; the line is kept.
    After(Duration),
    /// 500 at once; the line is not kept.
    Error,
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub content_type: String,
    pub body: String,
}

#[derive(Default)]
struct State {
    answer: Mutex<Option<Answer>>,
    kept: Mutex<Vec<Received>>,
    refused: Mutex<Vec<Received>>,
    requests: Mutex<u64>,
}

/// The collector; stops accepting when dropped.
pub struct Collector {
    pub port: u16,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
}

impl Collector {
    /// A collector on a free port.
    pub fn start(answer: Answer) -> Collector {
        Collector::serve(TcpListener::bind("127.0.0.1:0").expect("bind collector"), answer)
    }

    /// A collector on `port` (reserved earlier while nothing listened).
    pub fn start_on(port: u16, answer: Answer) -> Collector {
        Collector::serve(TcpListener::bind(("127.0.0.1", port)).expect("rebind collector port"), answer)
    }

    fn serve(listener: TcpListener, answer: Answer) -> Collector {
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let state = Arc::new(State { answer: Mutex::new(Some(answer)), ..State::default() });
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (stop.clone(), state.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false).unwrap();
                        let (st, s) = (st.clone(), s.clone());
                        std::thread::spawn(move || serve_connection(stream, &st, &s));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Collector { port, state, stop }
    }

    /// The URL to put into the metadata's `address`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/logs", self.port)
    }

    /// Changes how further requests are answered.
    pub fn answer(&self, answer: Answer) {
        *self.state.answer.lock().unwrap() = Some(answer);
    }

    /// Requests received so far, answered or not.
    pub fn requests(&self) -> u64 {
        *self.state.requests.lock().unwrap()
    }

    /// The requests kept so far.
    pub fn received(&self) -> Vec<Received> {
        self.state.kept.lock().unwrap().clone()
    }

    /// The requests answered with 500 so far.
    pub fn refused(&self) -> Vec<Received> {
        self.state.refused.lock().unwrap().clone()
    }

    /// The kept lines, parsed (a body that is not JSON fails the test).
    pub fn lines(&self) -> Vec<Value> {
        self.received()
            .iter()
            .map(|r| serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", r.body)))
            .collect()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn serve_connection(stream: TcpStream, state: &State, stop: &AtomicBool) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    while !stop.load(Ordering::SeqCst) {
        let Some(received) = read_request(&mut reader) else { return };
        *state.requests.lock().unwrap() += 1;
        let answer = state.answer.lock().unwrap().unwrap_or(Answer::Ok);
        let status = match answer {
            Answer::Ok => "200 OK",
            Answer::After(delay) => {
                std::thread::sleep(delay);
                "200 OK"
            }
            Answer::Error => "500 Internal Server Error",
        };
        if answer == Answer::Error {
            state.refused.lock().unwrap().push(received);
        } else {
            state.kept.lock().unwrap().push(received);
        }
        if write!(writer, "HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").is_err() {
            return;
        }
    }
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Received> {
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).ok()? == 0 {
        return None;
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or_default().to_owned();
    let (mut length, mut content_type) = (0usize, String::new());
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().unwrap_or(0),
                "content-type" => content_type = value.trim().to_owned(),
                _ => {}
            }
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).ok()?;
    Some(Received { path, content_type, body: String::from_utf8_lossy(&body).into_owned() })
}
