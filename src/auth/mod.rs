//! Who may call envd: the access token (or, after a cold boot, its SHA-512
//! hash from the metadata service), signed `/files` URLs, and the user
//! named by `Authorization: Basic`.

pub mod basic;
pub mod signature;
pub mod token;

pub use basic::basic_user;
pub use token::{AccessGuard, AuthState, Secret};

/// Constant-time equality of two byte strings (the length is not secret).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keep the optimiser from short-circuiting the fold.
    std::hint::black_box(diff) == 0
}

/// Lowercase hex SHA-512 of `text`, the form the metadata service carries.
pub fn sha512_hex(text: &str) -> String {
    use sha2::{Digest, Sha512};
    let digest = Sha512::digest(text.as_bytes());
    let mut out = String::with_capacity(128);
    for byte in digest {
        use std::fmt::Write;
        let _ = write!(out, "{byte:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_of_empty_token_matches_contract() {
        assert_eq!(
            sha512_hex(""),
            "cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e"
        );
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
