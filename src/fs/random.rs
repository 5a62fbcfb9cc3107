//! Random names: watcher ids and temporary file suffixes.

use std::io::Read;

const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// `len` random characters from `[a-z0-9]`.
pub fn lower_alnum(len: usize) -> String {
    let mut bytes = vec![0u8; len];
    fill(&mut bytes);
    // 256 % 36 != 0 makes a slight bias; these are names, not secrets.
    bytes.iter().map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()])).collect()
}

fn fill(buf: &mut [u8]) {
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(buf));
    if read.is_err() {
        // No /dev/urandom (odd chroots): fall back to the hasher's random
        // keys mixed with a counter, still unique per process.
        use std::hash::{BuildHasher, Hasher};
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        for chunk in buf.chunks_mut(8) {
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
            let value = hasher.finish().to_le_bytes();
            chunk.copy_from_slice(&value[..chunk.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_have_the_right_shape() {
        let a = super::lower_alnum(20);
        assert_eq!(a.len(), 20);
        assert!(a.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
        assert_ne!(a, super::lower_alnum(20));
    }
}
