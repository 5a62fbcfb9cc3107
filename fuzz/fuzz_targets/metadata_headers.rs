//! `X-Metadata-*` upload headers: validation never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let pairs: Vec<(&str, &[u8])> =
        text.lines().filter_map(|l| l.split_once(':')).map(|(k, v)| (k, v.as_bytes())).collect();
    let _ = envd::fs::metadata::Metadata::from_pairs(pairs);
});
