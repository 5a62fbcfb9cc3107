//! User metadata of uploaded files, stored as `user.e2b.<key>` extended
//! attributes, with the contract's limits (CONTRACT 4.7 step 4): they keep
//! every set within what ext4 can hold in one xattr block.

use std::collections::BTreeMap;

use super::xattr::E2B_PREFIX;

/// Longest key: 255 bytes of xattr name less the `user.e2b.` prefix.
pub const MAX_KEY_BYTES: usize = 255 - E2B_PREFIX.len();
/// Largest total of `len("user.e2b.") + len(key) + len(value)` over a set.
pub const MAX_TOTAL_BYTES: usize = 4096;

/// Why a metadata set was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MetadataError {
    /// A key with nothing in it.
    #[error("metadata key must not be empty")]
    EmptyKey,
    /// A key over [`MAX_KEY_BYTES`].
    #[error("metadata key '{0}' is longer than {MAX_KEY_BYTES} bytes")]
    KeyTooLong(String),
    /// A key outside printable ASCII.
    #[error("metadata key must be printable ASCII")]
    KeyNotPrintable,
    /// A value outside printable ASCII.
    #[error("metadata value of '{0}' must be printable ASCII")]
    ValueNotPrintable(String),
    /// The set is over [`MAX_TOTAL_BYTES`].
    #[error("metadata is {0} bytes, more than the {MAX_TOTAL_BYTES} allowed")]
    TooLarge(usize),
}

/// A validated metadata set: keys lowercase, everything printable ASCII.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata(BTreeMap<String, String>);

impl Metadata {
    /// Validates `(key, value)` pairs; keys are lowercased, and the first
    /// value of a repeated key wins.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Result<Self, MetadataError> {
        let mut map = BTreeMap::new();
        let mut total = 0usize;
        for (key, value) in pairs {
            if key.is_empty() {
                return Err(MetadataError::EmptyKey);
            }
            if !printable(key.as_bytes()) {
                return Err(MetadataError::KeyNotPrintable);
            }
            let key = key.to_ascii_lowercase();
            if key.len() > MAX_KEY_BYTES {
                return Err(MetadataError::KeyTooLong(key));
            }
            if !printable(value) {
                return Err(MetadataError::ValueNotPrintable(key));
            }
            if map.contains_key(&key) {
                continue;
            }
            total += E2B_PREFIX.len() + key.len() + value.len();
            // Printable ASCII is UTF-8.
            map.insert(key, String::from_utf8_lossy(value).into_owned());
        }
        if total > MAX_TOTAL_BYTES {
            return Err(MetadataError::TooLarge(total));
        }
        Ok(Self(map))
    }

    /// The pairs, by key.
    pub fn as_map(&self) -> &BTreeMap<String, String> {
        &self.0
    }
}

fn printable(bytes: &[u8]) -> bool {
    bytes.iter().all(|b| (0x20..=0x7e).contains(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_rules() {
        let ok = Metadata::from_pairs([("Owner", b"me".as_slice()), ("x", b"a b~".as_slice())]).unwrap();
        assert_eq!(ok.as_map().get("owner").map(String::as_str), Some("me"));
        assert_eq!(Metadata::from_pairs([("", b"v".as_slice())]), Err(MetadataError::EmptyKey));
        assert!(matches!(Metadata::from_pairs([("k", b"\x01".as_slice())]), Err(MetadataError::ValueNotPrintable(_))));
        assert!(matches!(Metadata::from_pairs([("k", "é".as_bytes())]), Err(MetadataError::ValueNotPrintable(_))));
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        assert!(matches!(Metadata::from_pairs([(long.as_str(), b"v".as_slice())]), Err(MetadataError::KeyTooLong(_))));
        let max_key = "k".repeat(MAX_KEY_BYTES);
        assert!(Metadata::from_pairs([(max_key.as_str(), b"v".as_slice())]).is_ok());
        // 9 + 1 + 4086 = 4096 fits; one more byte does not.
        let value = vec![b'v'; 4086];
        assert!(Metadata::from_pairs([("a", value.as_slice())]).is_ok());
        let value = vec![b'v'; 4087];
        assert_eq!(Metadata::from_pairs([("a", value.as_slice())]), Err(MetadataError::TooLarge(4097)));
    }
}
