//! Messages and service traits generated from `proto/` by `build.rs`.

#![allow(missing_docs, clippy::all)]

connectrpc::include_generated!();
