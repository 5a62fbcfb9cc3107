//! `Connect-Timeout-Ms` (checked before any handler runs) and
//! `Keepalive-Ping-Interval` (read by every server stream): any header
//! value is accepted or refused, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = envd::server::parsers::valid_timeout(data);
    let Ok(value) = http::HeaderValue::from_bytes(data) else { return };
    let mut headers = http::HeaderMap::new();
    headers.insert("keepalive-ping-interval", value);
    let interval = envd::server::parsers::keepalive_interval(&headers);
    assert!(!interval.is_zero(), "a zero interval would spin");
});
