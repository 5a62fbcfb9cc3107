//! An independent gRPC client (tonic over h2c, hand-written prost
//! messages, no code generation) calling Start and List on the real
//! binary: the same paths serve gRPC besides Connect (CONTRACT.md 1.2).

// A test stops at the first thing that is not as expected: unwrap is how it says so.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::pb::{self, process_event::Event, process_event::data_event::Output};
use common::*;
use http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};
use tonic_prost::ProstCodec;

async fn channel(envd: &Envd) -> Channel {
    Endpoint::from_shared(format!("http://{}", envd.addr()))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("an h2c connection to envd")
}

async fn grpc_client(envd: &Envd) -> tonic::client::Grpc<Channel> {
    let mut grpc = tonic::client::Grpc::new(channel(envd).await);
    grpc.ready().await.expect("channel ready");
    grpc
}

/// Runs a `Start` over gRPC to its end: (pid, stdout, stderr, end).
async fn start(
    grpc: &mut tonic::client::Grpc<Channel>,
    request: tonic::Request<pb::StartRequest>,
) -> (u32, Vec<u8>, Vec<u8>, pb::process_event::EndEvent) {
    grpc.ready().await.unwrap();
    let codec: ProstCodec<pb::StartRequest, pb::StartResponse> = ProstCodec::default();
    let response =
        grpc.server_streaming(request, PathAndQuery::from_static(rpc::START), codec).await.expect("Start over gRPC");
    let mut stream = response.into_inner();
    let (mut pid, mut stdout, mut stderr, mut end) = (None, Vec::new(), Vec::new(), None);
    while let Some(message) =
        tokio::time::timeout(PATIENCE, stream.message()).await.expect("a gRPC message in time").unwrap()
    {
        let event = message.event.and_then(|e| e.event).expect("an event");
        match event {
            Event::Start(start) => {
                assert!(pid.is_none(), "two start events");
                pid = Some(start.pid);
            }
            _ if pid.is_none() => panic!("{event:?} before the start event"),
            _ if end.is_some() => panic!("{event:?} after the end event"),
            Event::Data(data) => match data.output {
                Some(Output::Stdout(bytes)) => stdout.extend(bytes),
                Some(Output::Stderr(bytes)) => stderr.extend(bytes),
                other => panic!("unexpected output {other:?}"),
            },
            Event::Keepalive(_) => {}
            Event::End(e) => end = Some(e),
        }
    }
    (pid.expect("a start event"), stdout, stderr, end.expect("an end event"))
}

#[tokio::test]
async fn start_streams_over_grpc() {
    let envd = Envd::start();
    let mut grpc = grpc_client(&envd).await;

    let request = pb::start_request("/bin/bash", &["-c", "echo out; echo err >&2; exit 3"]);
    let (pid, stdout, stderr, end) = start(&mut grpc, tonic::Request::new(request)).await;
    assert!(pid > 0);
    assert_eq!(stdout, b"out\n");
    assert_eq!(stderr, b"err\n");
    assert_eq!(
        end,
        pb::process_event::EndEvent {
            exit_code: 3,
            exited: true,
            status: "exit status 3".into(),
            error: Some("exit status 3".into())
        }
    );

    // Request envs and a user in metadata (Basic, as the orchestrator sends).
    let mut request = pb::start_request("/bin/bash", &["-c", "echo $GREETING; whoami"]);
    request.process.as_mut().unwrap().envs = HashMap::from([("GREETING".into(), "hello".into())]);
    let mut request = tonic::Request::new(request);
    request.metadata_mut().insert("authorization", basic("root").parse().unwrap());
    let (_, stdout, _, end) = start(&mut grpc, request).await;
    assert_eq!(String::from_utf8(stdout).unwrap(), "hello\nroot\n");
    assert_eq!(end.status, "exit status 0");
    assert_eq!(end.error, None);
}

#[tokio::test]
async fn list_over_grpc_sees_a_running_process() {
    let envd = Envd::start();
    let mut grpc = grpc_client(&envd).await;

    // A process started over Connect, listed over gRPC.
    let mut connect = envd
        .client()
        .stream(
            rpc::START,
            &serde_json::json!({
                "process": {"cmd": "/bin/sleep", "args": ["30"], "envs": {"K": "V"}, "cwd": "/tmp"},
                "tag": "grpc-listed",
            }),
            &[],
        )
        .await;
    let ProcEvent::Start(pid) = connect.next_event().await else { panic!("no start event") };

    grpc.ready().await.unwrap();
    let codec: ProstCodec<pb::ListRequest, pb::ListResponse> = ProstCodec::default();
    let listed = grpc
        .unary(tonic::Request::new(pb::ListRequest {}), PathAndQuery::from_static(rpc::LIST), codec)
        .await
        .expect("List over gRPC")
        .into_inner();
    let info = listed.processes.iter().find(|p| p.pid == pid).unwrap_or_else(|| panic!("{pid} not listed: {listed:?}"));
    assert_eq!(info.tag.as_deref(), Some("grpc-listed"));
    assert_eq!(
        info.config,
        Some(pb::ProcessConfig {
            cmd: "/bin/sleep".into(),
            args: vec!["30".into()],
            envs: HashMap::from([("K".into(), "V".into())]),
            cwd: Some("/tmp".into()),
        })
    );

    // A gRPC error status: SendSignal to an unknown pid is NOT_FOUND.
    grpc.ready().await.unwrap();
    let codec: ProstCodec<pb::SendSignalRequest, pb::SendSignalResponse> = ProstCodec::default();
    let request = pb::SendSignalRequest { process: pb::pid_selector(999_999_999), signal: pb::Signal::Sigkill as i32 };
    let status = grpc
        .unary(tonic::Request::new(request), PathAndQuery::from_static(rpc::SEND_SIGNAL), codec)
        .await
        .expect_err("unknown pid");
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert_eq!(status.message(), "process with pid 999999999 not found");

    envd.client().kill(pid).await;
    assert!(matches!(connect.next_event().await, ProcEvent::End(_)));
}
