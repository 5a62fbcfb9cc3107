//! The host's timestamps: parsing never panics or overflows.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = envd::host::clock::parse_rfc3339(text);
    }
});
