//! The metadata service's JSON document (instance and template ids, log
//! address, token hash, default user and workdir): any bytes parse or are
//! refused, never a panic; a token hash is then taken as envd takes it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(metadata) = envd::host::mmds::parse_metadata(data) else { return };
    if let Some(hash) = &metadata.access_token_hash {
        let guard = envd::auth::AccessGuard::default();
        guard.set_token_hash(hash);
        let _ = guard.is_secured();
    }
});
