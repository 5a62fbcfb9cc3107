//! The state file read at start-up: damage is an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = envd::context::state::SavedContext::parse(data);
});
