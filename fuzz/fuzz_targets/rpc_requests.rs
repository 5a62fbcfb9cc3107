//! Every RPC of both services, as envd's server reads it: any method, any
//! Connect/gRPC/gRPC-Web content type (JSON or binary), optional gzip and
//! `Connect-Timeout-Ms`, and arbitrary body bytes (envelopes for streams,
//! with their flags and compression bit). The request goes through the
//! same routing checks, limits, framing and decoding as in the daemon;
//! the handlers only turn the decoded view into an owned message, so the
//! fuzzer never spawns a process or touches a file.
//!
//! Input: `[method, protocol, options, timeout digits…, body…]`.
#![no_main]

use std::sync::Arc;

use axum::body::Body;
use connectrpc::{InboundStream, RequestContext, ServiceRequest, ServiceResult, ServiceStream};
use envd::proto::{filesystem as fs, process as ps};
use futures_util::StreamExt;
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

const METHODS: [&str; 17] = [
    "/process.Process/List",
    "/process.Process/Connect",
    "/process.Process/Start",
    "/process.Process/Update",
    "/process.Process/StreamInput",
    "/process.Process/SendInput",
    "/process.Process/SendSignal",
    "/process.Process/CloseStdin",
    "/filesystem.Filesystem/Stat",
    "/filesystem.Filesystem/MakeDir",
    "/filesystem.Filesystem/Move",
    "/filesystem.Filesystem/ListDir",
    "/filesystem.Filesystem/Remove",
    "/filesystem.Filesystem/WatchDir",
    "/filesystem.Filesystem/CreateWatcher",
    "/filesystem.Filesystem/GetWatcherEvents",
    "/filesystem.Filesystem/RemoveWatcher",
];

/// (content type, header naming the body's compression).
const PROTOCOLS: [(&str, &str); 8] = [
    ("application/json", "content-encoding"),
    ("application/proto", "content-encoding"),
    ("application/connect+json", "connect-content-encoding"),
    ("application/connect+proto", "connect-content-encoding"),
    ("application/grpc", "grpc-encoding"),
    ("application/grpc+json", "grpc-encoding"),
    ("application/grpc-web+proto", "grpc-encoding"),
    ("application/grpc-web+json", "grpc-encoding"),
];

/// Handlers that decode and drop: the parse is what is under test.
struct Decoding;

macro_rules! unary {
    ($name:ident, $req:ty, $resp:ty) => {
        async fn $name(&self, _: RequestContext, request: ServiceRequest<'_, $req>) -> ServiceResult<$resp> {
            drop(request.to_owned_message());
            Ok(connectrpc::Response::new(<$resp>::default()))
        }
    };
}

macro_rules! server_stream {
    ($name:ident, $req:ty, $resp:ty) => {
        async fn $name(
            &self,
            _: RequestContext,
            request: ServiceRequest<'_, $req>,
        ) -> ServiceResult<ServiceStream<$resp>> {
            drop(request.to_owned_message());
            let stream: ServiceStream<$resp> = Box::pin(futures_util::stream::empty());
            Ok(connectrpc::Response::new(stream))
        }
    };
}

#[allow(refining_impl_trait)]
impl ps::Process for Decoding {
    unary!(list, ps::ListRequest, ps::ListResponse);
    server_stream!(connect, ps::ConnectRequest, ps::ConnectResponse);
    server_stream!(start, ps::StartRequest, ps::StartResponse);
    unary!(update, ps::UpdateRequest, ps::UpdateResponse);
    unary!(send_input, ps::SendInputRequest, ps::SendInputResponse);
    unary!(send_signal, ps::SendSignalRequest, ps::SendSignalResponse);
    unary!(close_stdin, ps::CloseStdinRequest, ps::CloseStdinResponse);

    async fn stream_input(
        &self,
        _: RequestContext,
        mut requests: InboundStream<ps::StreamInputRequest>,
    ) -> ServiceResult<ps::StreamInputResponse> {
        while let Some(message) = requests.next().await {
            drop(message?.to_owned_message());
        }
        Ok(connectrpc::Response::new(ps::StreamInputResponse::default()))
    }
}

#[allow(refining_impl_trait)]
impl fs::Filesystem for Decoding {
    unary!(stat, fs::StatRequest, fs::StatResponse);
    unary!(make_dir, fs::MakeDirRequest, fs::MakeDirResponse);
    unary!(r#move, fs::MoveRequest, fs::MoveResponse);
    unary!(list_dir, fs::ListDirRequest, fs::ListDirResponse);
    unary!(remove, fs::RemoveRequest, fs::RemoveResponse);
    server_stream!(watch_dir, fs::WatchDirRequest, fs::WatchDirResponse);
    unary!(create_watcher, fs::CreateWatcherRequest, fs::CreateWatcherResponse);
    unary!(get_watcher_events, fs::GetWatcherEventsRequest, fs::GetWatcherEventsResponse);
    unary!(remove_watcher, fs::RemoveWatcherRequest, fs::RemoveWatcherResponse);
}

type RpcService = tower::util::BoxCloneService<http::Request<Body>, axum::response::Response, std::convert::Infallible>;

thread_local! {
    static RUNTIME: tokio::runtime::Runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    static SERVICE: RpcService = {
        let service = Arc::new(Decoding);
        let router = connectrpc::Router::new()
            .add_service::<_, ps::ProcessRegisterMarker>(service.clone())
            .add_service::<_, fs::FilesystemRegisterMarker>(service);
        tower::util::BoxCloneService::new(envd::server::parsers::rpc_service(router))
    };
}

fuzz_target!(|data: &[u8]| {
    let [method, protocol, options, rest @ ..] = data else { return };
    let method = METHODS[usize::from(*method) % METHODS.len()];
    let (content_type, encoding_header) = PROTOCOLS[usize::from(*protocol) % PROTOCOLS.len()];
    let timeout_len = usize::from(options >> 4).min(rest.len());
    let (timeout, body) = rest.split_at(timeout_len);
    let mut request = http::Request::post(method).header("content-type", content_type);
    if content_type.starts_with("application/grpc") {
        request = request.header("te", "trailers");
    } else {
        request = request.header("connect-protocol-version", "1");
    }
    if options & 1 != 0 {
        request = request.header(encoding_header, "gzip");
    }
    if options & 2 != 0 {
        let Ok(value) = http::HeaderValue::from_bytes(timeout) else { return };
        let name = if content_type.starts_with("application/grpc") { "grpc-timeout" } else { "connect-timeout-ms" };
        request = request.header(name, value);
    }
    let Ok(request) = request.body(Body::from(body.to_vec())) else { return };
    let service = SERVICE.with(Clone::clone);
    RUNTIME.with(|runtime| {
        runtime.block_on(async move {
            let Ok(response) = service.oneshot(request).await;
            let _ = response.into_body().collect().await;
        })
    });
});
