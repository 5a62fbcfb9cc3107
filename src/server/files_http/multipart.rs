//! Multipart bodies of `POST /files`: the boundary taken from the content
//! type and the multer reader over the (decoded, metered) body stream. The
//! upload handler and the fuzz target read bodies through these same
//! functions, so a limit set here holds for both: whoever reads the parts
//! counts the file content it takes in `handed_out`, and the parser may hold
//! only a little besides (see `body::Metered`).

use bytes::Bytes;

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
    multer::Multipart::new(Metered::new(stream, handed_out), boundary)
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
}
