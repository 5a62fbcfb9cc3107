//! `Authorization: Basic` headers.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = envd::auth::basic_user(Some(data));
});
