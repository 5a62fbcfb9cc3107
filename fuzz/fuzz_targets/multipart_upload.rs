//! `POST /files` multipart bodies, read by the same multer configuration
//! as the upload handler. Input: `[chunk size, content-type line \n, body…]`;
//! the body arrives in chunks of that size, so boundaries fall anywhere.
#![no_main]
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

thread_local! {
    static RUNTIME: tokio::runtime::Runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
}

fuzz_target!(|data: &[u8]| {
    let [chunk, rest @ ..] = data else { return };
    let split = rest.iter().position(|b| *b == b'\n').unwrap_or(rest.len());
    let content_type = String::from_utf8_lossy(&rest[..split]).into_owned();
    let body = rest.get(split + 1..).unwrap_or_default();
    let chunks = body.chunks(usize::from(*chunk).max(1)).map(Bytes::copy_from_slice).collect();
    RUNTIME.with(|runtime| {
        let _ = runtime.block_on(envd::server::parsers::read_multipart(&content_type, chunks));
    });
});
