//! Path arguments of every RPC and `/files` call: a default workdir, a
//! newline, then the requested path. Resolution never panics, and an
//! absolute answer never keeps a `..` that a relative request introduced.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let (workdir, path) = text.split_once('\n').unwrap_or(("", text));
        let home = std::path::Path::new("/home/user");
        if let Ok(resolved) = envd::context::paths::resolve(path, home, Some(workdir)) {
            if !path.is_empty() && !path.starts_with('/') && !path.starts_with('~') {
                assert!(resolved.is_absolute(), "{path:?} -> {resolved:?}");
                assert!(!resolved.components().any(|c| c == std::path::Component::ParentDir), "{path:?} -> {resolved:?}");
            }
        }
    }
});
