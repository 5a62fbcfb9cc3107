//! `POST /init` bodies: any bytes are answered, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = envd::host::init::check_body(data);
});
