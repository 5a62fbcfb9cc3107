//! The query of `/files` on a secured sandbox: binding (path, username,
//! signature, signature_expiration), the expiration, and the signature
//! check. Input: `[operation, query…]`.
#![no_main]
use envd::auth::signature::Operation;
use envd::auth::{AccessGuard, Secret};
use libfuzzer_sys::fuzz_target;

const TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

thread_local! {
    static RUNTIME: tokio::runtime::Runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    static GUARD: AccessGuard = {
        let guard = AccessGuard::default();
        guard.set_token(Some(Secret::new(TOKEN.into())));
        guard
    };
}

fuzz_target!(|data: &[u8]| {
    let [op, query @ ..] = data else { return };
    let op = if op & 1 == 0 { Operation::Read } else { Operation::Write };
    let Ok(uri) = http::Uri::try_from([b"/files?", query].concat()) else { return };
    let granted = RUNTIME.with(|runtime| {
        GUARD.with(|guard| runtime.block_on(envd::server::parsers::check_signed_query(guard, &uri, op)))
    });
    // Only the token's own signature of exactly these parameters grants access.
    if granted.is_ok() {
        let query = uri.query().unwrap_or("");
        assert!(query.contains("signature=v1_"), "granted without a signature: {query:?}");
    }
});
