//! Multipart bodies of `POST /files`: the boundary taken from the content
//! type and the multer reader over the (decoded, metered) body stream. The
//! upload handler and the fuzz target read bodies through these same
//! functions, so a limit set here holds for both: whoever reads the parts
//! counts the file content it takes in `handed_out`, and the parser may hold
//! only a little besides (see `body::Metered`).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::Stream;

use super::FilesError;
use super::body::{ByteStream, HandedOut, Metered};

/// The `boundary` parameter of a multipart content type.
pub fn boundary(content_type: &str) -> Result<String, FilesError> {
    content_type
        .split(';')
        .skip(1)
        .filter_map(|param| param.split_once('='))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("boundary"))
        .map(|(_, value)| value.trim().trim_matches('"').to_owned())
        .filter(|b| !b.is_empty())
        .ok_or_else(|| FilesError::BadRequest("multipart body without a boundary".into()))
}

/// The parts of a multipart body, as the upload reads them; the reader
/// adds each file chunk it takes to `handed_out`.
pub fn parts(stream: ByteStream, boundary: String, handed_out: &HandedOut) -> multer::Multipart<'static> {
    multer::Multipart::new(LateEnd { inner: Metered::new(stream, handed_out), end_seen: false }, boundary)
}

/// A stream whose end is reported one poll late (`Pending`, woken at
/// once, then the end). multer 3.1, looking for the first boundary, polls
/// the body twice in one call and fails with "incomplete multipart
/// stream" when the second poll brings both the body's data and its end,
/// before it has searched that data: a valid upload whose client sent it
/// whole as the parser first looked was refused (about 1 in 5,000 small
/// uploads). Reported late, the end always comes in a call of its own.
struct LateEnd {
    inner: Metered,
    end_seen: bool,
}

impl Stream for LateEnd {
    type Item = std::io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // The inner stream is never polled past its end.
        if self.end_seen {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(None) => {
                self.end_seen = true;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            polled => polled,
        }
    }
}

/// One part of a body read by [`read_all`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartSummary {
    /// The form field name.
    pub name: Option<String>,
    /// The part's file name (a full path for uploads).
    pub file_name: Option<String>,
    /// Bytes of content.
    pub len: usize,
}

/// Reads a whole multipart body given in `chunks` the way the upload does
/// (boundary, then every part to its end), keeping only a summary of each
/// part; for the fuzz target and tests.
#[doc(hidden)]
pub async fn read_all(content_type: &str, chunks: Vec<Bytes>) -> Result<Vec<PartSummary>, FilesError> {
    let boundary = boundary(content_type)?;
    let stream: ByteStream = Box::pin(futures_util::stream::iter(chunks.into_iter().map(Ok)));
    let handed_out = HandedOut::default();
    let mut parts = parts(stream, boundary, &handed_out);
    let mut summaries = Vec::new();
    let invalid = |e: multer::Error| FilesError::BadRequest(format!("invalid multipart body: {e}"));
    while let Some(mut field) = parts.next_field().await.map_err(invalid)? {
        let name = field.name().map(str::to_owned);
        let file_name = field.file_name().map(str::to_owned);
        let mut len = 0usize;
        while let Some(chunk) = field.chunk().await.map_err(invalid)? {
            handed_out.add(chunk.len());
            len = len.saturating_add(chunk.len());
        }
        summaries.push(PartSummary { name, file_name, len });
    }
    Ok(summaries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_parts_split_anywhere() {
        let body =
            b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"/tmp/a b.txt\"\r\n\r\nhello\r\n\
                     --XyZ\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\n\r\n--XyZ--\r\n";
        for split in [1, 7, 40, body.len()] {
            let chunks = body.chunks(split).map(Bytes::copy_from_slice).collect();
            let parts = read_all("multipart/form-data; boundary=\"XyZ\"", chunks).await.unwrap();
            assert_eq!(parts.len(), 2, "split {split}");
            assert_eq!(parts[0].file_name.as_deref(), Some("/tmp/a b.txt"));
            assert_eq!((parts[0].len, parts[1].name.as_deref(), parts[1].len), (5, Some("other"), 0));
        }
        assert!(read_all("multipart/form-data", Vec::new()).await.is_err());
    }

    #[tokio::test]
    async fn a_body_whose_end_comes_with_its_only_chunk_is_read_whole() {
        // The body's sender hands over its only chunk and closes between
        // the parser's first poll (nothing yet) and its second.
        let body = Bytes::from_static(
            b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f\"\r\n\r\nhello\r\n--XyZ--\r\n",
        );
        let mut polls = 0;
        let stream = futures_util::stream::poll_fn(move |cx| {
            polls += 1;
            match polls {
                1 => {
                    cx.waker().wake_by_ref();
                    std::task::Poll::Pending
                }
                2 => std::task::Poll::Ready(Some(Ok(body.clone()))),
                _ => std::task::Poll::Ready(None),
            }
        });
        let handed_out = HandedOut::default();
        let mut parts = parts(Box::pin(stream), "XyZ".to_owned(), &handed_out);
        let mut field = parts.next_field().await.unwrap().expect("the file part");
        assert_eq!(field.chunk().await.unwrap().as_deref(), Some(&b"hello"[..]));
        assert!(field.chunk().await.unwrap().is_none());
        drop(field);
        assert!(parts.next_field().await.unwrap().is_none());
    }
}
