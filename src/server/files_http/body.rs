//! Request bodies of uploads as byte streams: an idle timeout on the raw
//! body, optional gzip decoding, and fairness towards parsers that drain
//! whatever is ready (multer would otherwise inflate a whole gzip bomb
//! into its buffer in one poll).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use async_compression::tokio::bufread::GzipDecoder;
use axum::body::Body;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio_util::io::{ReaderStream, StreamReader};

/// Decoded bytes per chunk of a gzip body.
const DECODED_CHUNK: usize = 64 * 1024;
/// Bytes a stream hands out in a row before letting others run.
const FAIR_SHARE: usize = 256 * 1024;

/// A body as a stream of chunks.
pub type ByteStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

/// The request body's `Content-Encoding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEncoding {
    /// Absent or `identity`.
    Identity,
    /// `gzip`.
    Gzip,
}

/// `raw` decoded per `encoding`.
pub fn decode(raw: ByteStream, encoding: BodyEncoding) -> ByteStream {
    match encoding {
        BodyEncoding::Identity => raw,
        BodyEncoding::Gzip => {
            let mut decoder = GzipDecoder::new(StreamReader::new(raw));
            // Go's gzip reader accepts concatenated members.
            decoder.multiple_members(true);
            Box::pin(ReaderStream::with_capacity(decoder, DECODED_CHUNK))
        }
    }
}

/// Chunks in flight between the body reader and the upload.
const PUMP_QUEUE: usize = 2;

/// The raw body as a stream with at most `idle` between two chunks (then
/// a `TimedOut` error), read by its own task. When the consumer
/// gives up early (a refused or failed upload), the task keeps reading and
/// discarding the rest, so that a client still sending gets to read the
/// answer instead of a reset connection.
pub fn reader(body: Body, idle: Duration) -> ByteStream {
    let (tx, rx) = tokio::sync::mpsc::channel(PUMP_QUEUE);
    tokio::spawn(pump(body, tx, idle));
    Box::pin(futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|chunk| (chunk, rx)) }))
}

/// Reads and drops up to `limit` bytes of a refused request's body in the
/// background, so that a client still sending reads the refusal instead
/// of a reset connection; past the limit the connection is dropped.
pub fn discard(body: Body, idle: Duration, limit: usize) {
    tokio::spawn(async move {
        let mut chunks = body.into_data_stream();
        let mut seen = 0usize;
        while let Ok(Some(Ok(chunk))) = tokio::time::timeout(idle, chunks.next()).await {
            seen = seen.saturating_add(chunk.len());
            if seen > limit {
                return;
            }
        }
    });
}

async fn pump(body: Body, tx: tokio::sync::mpsc::Sender<io::Result<Bytes>>, idle: Duration) {
    let mut chunks = body.into_data_stream();
    let mut draining = false;
    loop {
        let next = match tokio::time::timeout(idle, chunks.next()).await {
            Ok(Some(Ok(chunk))) => Ok(chunk),
            Ok(Some(Err(err))) => Err(io::Error::other(err)),
            Ok(None) => return,
            Err(_elapsed) => Err(io::Error::new(io::ErrorKind::TimedOut, "upload body idle")),
        };
        let failed = next.is_err();
        if !draining && tx.send(next).await.is_err() {
            draining = true;
        }
        if failed {
            return;
        }
    }
}

/// Bytes of a multipart body outside file contents (preamble, part
/// headers, other fields) that may be held at once. The parser buffers
/// these whole, so without a bound one small gzip body could inflate into
/// gigabytes of "preamble".
pub const MULTIPART_OVERHEAD_MAX: usize = 64 * 1024;
/// What the parser may hold besides that: file content not yet handed out,
/// at most two fair shares (one read while parsing the part's headers, one
/// for the next chunk), each with a chunk (raw or decoded) over its end.
const MULTIPART_SLACK: usize = 2 * (FAIR_SHARE + DECODED_CHUNK + crate::server::limits::MAX_READ_BUFFER);

/// Counts the bytes a multipart parser has taken in against the file
/// content it has handed out, and fails the stream once the difference,
/// what the parser holds that is not file content, passes the limit.
pub struct Metered {
    inner: Fair,
    taken_in: usize,
    handed_out: Arc<AtomicUsize>,
}

/// The file content handed out by the parser, counted by the caller.
#[derive(Debug, Clone, Default)]
pub struct HandedOut(Arc<AtomicUsize>);

impl HandedOut {
    /// Counts `bytes` more of file content.
    pub fn add(&self, bytes: usize) {
        self.0.fetch_add(bytes, Ordering::Relaxed);
    }
}

impl Metered {
    /// Meters `inner` against what `handed_out` counts.
    pub fn new(inner: ByteStream, handed_out: &HandedOut) -> Self {
        Self { inner: Fair::new(inner), taken_in: 0, handed_out: handed_out.0.clone() }
    }
}

/// The error a metered stream fails with.
pub fn multipart_overhead_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::FileTooLarge,
        format!("multipart body has more than {} KiB outside file contents", MULTIPART_OVERHEAD_MAX / 1024),
    )
}

impl Stream for Metered {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let held = self.taken_in.saturating_sub(self.handed_out.load(Ordering::Relaxed));
        if held > MULTIPART_OVERHEAD_MAX + MULTIPART_SLACK {
            return Poll::Ready(Some(Err(multipart_overhead_error())));
        }
        let next = Pin::new(&mut self.inner).poll_next(cx);
        if let Poll::Ready(Some(Ok(chunk))) = &next {
            self.taken_in += chunk.len();
        }
        next
    }
}

/// Wraps a stream so that it returns `Pending` (and wakes itself at once)
/// after handing out [`FAIR_SHARE`] bytes in a row.
pub struct Fair {
    inner: ByteStream,
    run: usize,
}

impl Fair {
    /// Wraps `inner`.
    pub fn new(inner: ByteStream) -> Self {
        Self { inner, run: 0 }
    }
}

impl Stream for Fair {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.run >= FAIR_SHARE {
            self.run = 0;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let next = self.inner.as_mut().poll_next(cx);
        match &next {
            Poll::Ready(Some(Ok(chunk))) => self.run += chunk.len(),
            Poll::Pending => self.run = 0,
            Poll::Ready(_) => {}
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_compression::tokio::bufread::GzipEncoder;
    use tokio::io::AsyncReadExt;

    async fn gzip(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        GzipEncoder::new(data).read_to_end(&mut out).await.unwrap();
        out
    }

    async fn collect(mut stream: ByteStream) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn gzip_members_concatenate_and_garbage_fails() {
        let mut body = gzip(b"hello ").await;
        body.extend(gzip(b"world").await);
        let stream = decode(reader(Body::from(body), Duration::from_secs(5)), BodyEncoding::Gzip);
        assert_eq!(collect(stream).await.unwrap(), b"hello world");
        let stream = decode(reader(Body::from("not gzip at all"), Duration::from_secs(5)), BodyEncoding::Gzip);
        assert!(collect(stream).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_body_times_out() {
        let (_tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(1);
        let body =
            Body::from_stream(futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|c| (c, rx)) },
            ));
        let err = collect(reader(body, Duration::from_secs(3))).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
