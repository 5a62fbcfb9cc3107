//! Download headers: `Accept-Encoding` negotiation (CONTRACT 4.6), the
//! `Content-Disposition` value, and the content type of a file.

use std::path::Path;

/// How a download is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    /// As is, with ranges and conditionals.
    Identity,
    /// Streamed through gzip.
    Gzip,
}

/// No encoding the client accepts is available (HTTP 406).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotAcceptable;

/// Picks the encoding for `Accept-Encoding` (absent: identity). A
/// conditional or range request is always served as identity.
pub fn negotiate(accept: Option<&str>, conditional: bool) -> Result<Coding, NotAcceptable> {
    let Some(accept) = accept else { return Ok(Coding::Identity) };
    let mut items: Vec<(String, f32)> = accept
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q=").or_else(|| p.trim().strip_prefix("Q=")))
                .map(|q| q.trim().parse::<f32>().unwrap_or(0.0))
                .next()
                .unwrap_or(1.0);
            (name, q)
        })
        .collect();
    let has = |name: &str, pred: fn(f32) -> bool| items.iter().any(|(n, q)| n == name && pred(*q));
    let identity_rejected = has("identity", |q| q <= 0.0) || (has("*", |q| q <= 0.0) && !has("identity", |q| q > 0.0));
    let fallback = if identity_rejected { Err(NotAcceptable) } else { Ok(Coding::Identity) };
    if conditional {
        return fallback;
    }
    // Stable: equal weights keep the client's order.
    items.sort_by(|a, b| b.1.total_cmp(&a.1));
    for (name, q) in &items {
        if *q <= 0.0 {
            continue;
        }
        match name.as_str() {
            "identity" => return Ok(Coding::Identity),
            "*" => return Ok(if identity_rejected { Coding::Gzip } else { Coding::Identity }),
            "gzip" => return Ok(Coding::Gzip),
            _ => {}
        }
    }
    fallback
}

/// `inline; filename=...` as Go's `mime.FormatMediaType` writes it: bare
/// when the name is a token, quoted when printable ASCII, else RFC 2231.
pub fn content_disposition(name: &str) -> String {
    const TSPECIALS: &[u8] = b"()<>@,;:\\\"/[]?=";
    let is_token = !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && !TSPECIALS.contains(&b));
    if is_token {
        return format!("inline; filename={name}");
    }
    if name.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        let escaped = name.replace('\\', "\\\\").replace('"', "\\\"");
        return format!("inline; filename=\"{escaped}\"");
    }
    let mut encoded = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
            encoded.push(char::from(b));
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    format!("inline; filename*=utf-8''{encoded}")
}

/// Go's built-in extension table (`mime.TypeByExtension`), plus a few
/// common types.
const MIME_TYPES: &[(&str, &str)] = &[
    ("avif", "image/avif"),
    ("css", "text/css; charset=utf-8"),
    ("csv", "text/csv; charset=utf-8"),
    ("gif", "image/gif"),
    ("gz", "application/gzip"),
    ("htm", "text/html; charset=utf-8"),
    ("html", "text/html; charset=utf-8"),
    ("jpeg", "image/jpeg"),
    ("jpg", "image/jpeg"),
    ("js", "text/javascript; charset=utf-8"),
    ("json", "application/json"),
    ("md", "text/markdown; charset=utf-8"),
    ("mjs", "text/javascript; charset=utf-8"),
    ("mp3", "audio/mpeg"),
    ("mp4", "video/mp4"),
    ("pdf", "application/pdf"),
    ("png", "image/png"),
    ("svg", "image/svg+xml"),
    ("tar", "application/x-tar"),
    ("txt", "text/plain; charset=utf-8"),
    ("wasm", "application/wasm"),
    ("webp", "image/webp"),
    ("xml", "text/xml; charset=utf-8"),
    ("zip", "application/zip"),
];

/// The content type for a file name's extension, if known.
pub fn type_by_extension(path: &Path) -> Option<&'static str> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    MIME_TYPES.iter().find(|(e, _)| *e == ext).map(|(_, t)| *t)
}

/// A content type from the first bytes of a file: text when they are
/// UTF-8 without control characters other than whitespace.
pub fn sniff(head: &[u8]) -> &'static str {
    let text = match std::str::from_utf8(head) {
        Ok(text) => Some(text),
        // A multi-byte character cut off at the end of the sample.
        Err(e) if e.error_len().is_none() => std::str::from_utf8(&head[..e.valid_up_to()]).ok(),
        Err(_) => None,
    };
    match text {
        Some(text) if !text.chars().any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t' | '\x0c')) => {
            "text/plain; charset=utf-8"
        }
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_rules() {
        use Coding::*;
        let n = |a: Option<&str>| negotiate(a, false);
        assert_eq!(n(None), Ok(Identity));
        assert_eq!(n(Some("")), Ok(Identity));
        assert_eq!(n(Some("gzip, deflate")), Ok(Gzip));
        assert_eq!(n(Some("deflate, br")), Ok(Identity));
        assert_eq!(n(Some("identity, gzip")), Ok(Identity));
        assert_eq!(n(Some("identity;q=0.5, gzip")), Ok(Gzip));
        assert_eq!(n(Some("GZIP;q=0.1, identity;q=0.2")), Ok(Identity));
        assert_eq!(n(Some("*")), Ok(Identity));
        assert_eq!(n(Some("*;q=0")), Err(NotAcceptable));
        assert_eq!(n(Some("*;q=0, gzip")), Ok(Gzip));
        assert_eq!(n(Some("*;q=0, identity;q=1")), Ok(Identity));
        assert_eq!(n(Some("identity;q=0, *")), Ok(Gzip));
        assert_eq!(n(Some("identity;q=0, br")), Err(NotAcceptable));
        assert_eq!(n(Some("gzip;q=0")), Ok(Identity));
        assert_eq!(negotiate(Some("gzip"), true), Ok(Identity));
        assert_eq!(negotiate(Some("identity;q=0, gzip"), true), Err(NotAcceptable));
    }

    #[test]
    fn disposition_like_go() {
        assert_eq!(content_disposition("a.txt"), "inline; filename=a.txt");
        assert_eq!(content_disposition("my file.txt"), "inline; filename=\"my file.txt\"");
        assert_eq!(content_disposition("é.txt"), "inline; filename*=utf-8''%C3%A9.txt");
    }

    #[test]
    fn content_types() {
        assert_eq!(type_by_extension(Path::new("/a/b.JSON")), Some("application/json"));
        assert_eq!(type_by_extension(Path::new("/a/b")), None);
        assert_eq!(sniff(b"hello\nworld"), "text/plain; charset=utf-8");
        assert_eq!(sniff(b"\x00\x01\x02"), "application/octet-stream");
        assert_eq!(sniff(&"é".as_bytes()[..1]), "text/plain; charset=utf-8");
    }
}
