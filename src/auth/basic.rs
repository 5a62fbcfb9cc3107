//! The user named by `Authorization: Basic base64("<user>:<password>")`.

use base64::Engine;

/// The user name in a Basic header, or `None` when the header is absent,
/// not Basic, undecodable or has no `:` (then the default user applies).
pub fn basic_user(header: Option<&[u8]>) -> Option<String> {
    let header = std::str::from_utf8(header?).ok()?.trim();
    let (scheme, encoded) = header.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, _password) = decoded.split_once(':')?;
    Some(user.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_vectors() {
        assert_eq!(basic_user(Some(b"Basic dXNlcjo=")).as_deref(), Some("user"));
        assert_eq!(basic_user(Some(b"basic cm9vdDo=")).as_deref(), Some("root"));
        assert_eq!(basic_user(Some(b"Bearer cm9vdDo=")), None);
        assert_eq!(basic_user(Some(b"Basic !!!")), None);
        // "root" without a colon
        assert_eq!(basic_user(Some(b"Basic cm9vdA==")), None);
        assert_eq!(basic_user(None), None);
    }
}
