//! The floor of a unary RPC: a bare HTTP/1.1 server on loopback (hyper,
//! keep-alive, an empty 200 for every request, the body read and dropped)
//! and the bench's own client sending it a request shaped like a Stat call.
//! What envd adds to a unary call is its ratio to this.

use std::net::TcpListener as StdListener;
use std::time::{Duration, Instant};

use http::Method;
use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use crate::common::Client;

/// A bare server on its own thread and runtime; lives as long as the bench.
pub struct BareHttp {
    pub port: u16,
}

impl BareHttp {
    pub fn start() -> BareHttp {
        let listener = StdListener::bind("127.0.0.1:0").expect("a loopback port for the bare server");
        let port = listener.local_addr().expect("its address").port();
        listener.set_nonblocking(true).expect("non-blocking listener");
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
            runtime.block_on(serve(listener));
        });
        BareHttp { port }
    }
}

async fn serve(listener: StdListener) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = service_fn(|request: hyper::Request<Incoming>| async move {
                // Read the request body as a real handler would, then drop it.
                let _ = request.into_body().collect().await;
                Ok::<_, std::convert::Infallible>(hyper::Response::new(Empty::<Bytes>::new()))
            });
            let _ = http1::Builder::new().keep_alive(true).serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// `runs` POSTs of a Stat-sized JSON body on one kept-alive connection.
pub async fn round_trips(client: &Client, path: &str, runs: usize) -> Vec<Duration> {
    let body = format!("{{\"path\":\"{path}\"}}");
    let headers = [("content-type", "application/json")];
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let began = Instant::now();
        let reply = client.send(Method::POST, "/filesystem.Filesystem/Stat", &headers, body.clone()).await;
        times.push(began.elapsed());
        assert_eq!(reply.status, 200, "the bare server answers 200");
    }
    times
}
