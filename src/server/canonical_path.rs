//! One spelling per route. The request path is percent-decoded and cleaned
//! (empty and `.` segments dropped, `..` resolved, no trailing slash), as
//! Go's `path.Clean` does, before anything matches on it: the token check
//! and the router then see the same path, so `//init`, `/init/`, `/%69nit`,
//! `/./init` and `/files/../init` are all `/init`, with `/init`'s checks,
//! and no spelling of a token-checked route passes as an exempt one.

use std::borrow::Cow;

use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};

/// Bytes a decoded path may hold that a URI path may not: encoded again.
const NOT_IN_A_PATH: &AsciiSet =
    &CONTROLS.add(b' ').add(b'"').add(b'#').add(b'%').add(b'<').add(b'>').add(b'?').add(b'`').add(b'{').add(b'}');

/// A path that has no meaning as a route.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RoutePathError {
    /// A percent-escape decodes to bytes that are not UTF-8.
    #[error("the request path is not valid UTF-8 once decoded: {0}")]
    NotUtf8(String),
    /// Cleaned, it does not make a URI again (cannot happen for what
    /// [`canonical`] returns; kept so that no path is ever passed on as sent).
    #[error("the request path cannot be used: {0}")]
    Unusable(String),
}

/// The path as routes are matched on; borrowed when it is already so
/// (the common case costs one scan).
pub fn canonical(path: &str) -> Result<Cow<'_, str>, RoutePathError> {
    if is_canonical(path) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = percent_decode_str(path).decode_utf8().map_err(|_| RoutePathError::NotUtf8(path.to_owned()))?;
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            name => segments.push(name),
        }
    }
    let cleaned = format!("/{}", segments.join("/"));
    Ok(Cow::Owned(utf8_percent_encode(&cleaned, NOT_IN_A_PATH).to_string()))
}

fn is_canonical(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else { return false };
    rest.is_empty() || (!path.contains('%') && rest.split('/').all(|segment| !matches!(segment, "" | "." | "..")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_of_a_route_is_the_route() {
        for spelling in [
            "/init",
            "//init",
            "/init/",
            "/init//",
            "/%69nit",
            "/%69%6E%69%74",
            "/./init",
            "/files/../init",
            "/files/%2E%2E/init",
            "/files%2F..%2Finit",
            "/../init",
            "/a/b/../../init/.",
        ] {
            assert_eq!(canonical(spelling).as_deref(), Ok("/init"), "{spelling}");
        }
    }

    #[test]
    fn canonical_paths_are_kept_as_they_are() {
        for path in ["/", "/health", "/files/compose", "/process.Process/Start", "/filesystem.Filesystem/ListDir"] {
            assert!(matches!(canonical(path), Ok(Cow::Borrowed(p)) if p == path), "{path}");
        }
    }

    #[test]
    fn the_root_and_what_climbs_above_it_are_the_root() {
        for spelling in ["", "//", "/.", "/..", "/../..", "/%2F"] {
            assert_eq!(canonical(spelling).as_deref(), Ok("/"), "{spelling:?}");
        }
    }

    #[test]
    fn decoded_bytes_that_a_path_cannot_hold_are_encoded_again() {
        assert_eq!(canonical("/files/%20x/").as_deref(), Ok("/files/%20x"));
        assert_eq!(canonical("/a%25b/").as_deref(), Ok("/a%25b"));
        assert_eq!(canonical("/a%3Fb").as_deref(), Ok("/a%3Fb"));
        assert_eq!(canonical("/caf%C3%A9").as_deref(), Ok("/caf%C3%A9"));
    }

    #[test]
    fn an_escape_that_is_not_utf8_is_refused() {
        assert_eq!(canonical("/%ff%fe/init"), Err(RoutePathError::NotUtf8("/%ff%fe/init".into())));
    }
}
