//! A minimal HTTP/1.1 client over std's `TcpStream`: one request per
//! connection (`Connection: close`), chunked or sized bodies. Enough to
//! talk to envd through qemu's host forwarding without an async runtime,
//! and to read a Connect server stream incrementally.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// A response whose body has been read completely.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Header names in lower case, in arrival order.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl Response {
    /// The first header with this (lower-case) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A response whose head has been read; the body is read on demand.
#[derive(Debug)]
pub struct StreamingResponse {
    /// The status code.
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    body: Body,
}

#[derive(Debug)]
enum Body {
    Chunked { reader: BufReader<TcpStream>, left_in_chunk: usize, done: bool },
    Sized { reader: BufReader<TcpStream>, left: usize },
    UntilEof(BufReader<TcpStream>),
}

/// Sends one request to 127.0.0.1:`port` and reads the response head.
pub fn send(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> io::Result<StreamingResponse> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut writer = &stream;
    writer.write_all(head.as_bytes())?;
    writer.write_all(body)?;
    writer.flush()?;
    let mut reader = BufReader::new(stream);
    let (status, headers) = read_head(&mut reader)?;
    let chunked = headers.iter().any(|(n, v)| n == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    let length = headers.iter().find(|(n, _)| n == "content-length").and_then(|(_, v)| v.trim().parse::<usize>().ok());
    let body = if method == "HEAD" || status == 204 || status == 304 {
        Body::Sized { reader, left: 0 }
    } else if chunked {
        Body::Chunked { reader, left_in_chunk: 0, done: false }
    } else if let Some(left) = length {
        Body::Sized { reader, left }
    } else {
        Body::UntilEof(reader)
    };
    Ok(StreamingResponse { status, headers, body })
}

/// Sends one request and reads the whole response.
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> io::Result<Response> {
    let mut response = send(port, method, path, headers, body, timeout)?;
    let mut body = Vec::new();
    response.read_to_end(&mut body)?;
    Ok(Response { status: response.status, headers: response.headers, body })
}

fn read_head(reader: &mut BufReader<TcpStream>) -> io::Result<(u16, Vec<(String, String)>)> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before a response"));
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed inside the head"));
        }
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        if let Some((name, value)) = trimmed.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    Ok((status, headers))
}

impl Read for StreamingResponse {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.body {
            Body::UntilEof(reader) => reader.read(buf),
            Body::Sized { reader, left } => {
                if *left == 0 {
                    return Ok(0);
                }
                let want = buf.len().min(*left);
                let got = reader.read(&mut buf[..want])?;
                if got == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "body shorter than Content-Length"));
                }
                *left -= got;
                Ok(got)
            }
            Body::Chunked { reader, left_in_chunk, done } => {
                if *done {
                    return Ok(0);
                }
                if *left_in_chunk == 0 {
                    let mut line = String::new();
                    if reader.read_line(&mut line)? == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "connection closed inside a chunked body",
                        ));
                    }
                    let size = line.trim().split(';').next().unwrap_or("");
                    let size = usize::from_str_radix(size, 16)
                        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("bad chunk size {line:?}")))?;
                    if size == 0 {
                        // Trailers, then the empty line.
                        loop {
                            line.clear();
                            if reader.read_line(&mut line)? == 0 || line.trim_end().is_empty() {
                                break;
                            }
                        }
                        *done = true;
                        return Ok(0);
                    }
                    *left_in_chunk = size;
                }
                let want = buf.len().min(*left_in_chunk);
                let got = reader.read(&mut buf[..want])?;
                if got == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed inside a chunk"));
                }
                *left_in_chunk -= got;
                if *left_in_chunk == 0 {
                    let mut crlf = [0u8; 2];
                    reader.read_exact(&mut crlf)?;
                }
                Ok(got)
            }
        }
    }
}
