//! The HTTP side of envd from outside: `/health`, `/metrics`, `/envs`,
//! `/init` and the access token, the version, routing errors, CORS,
//! stream framing and content types, binary protobuf against the test
//! vectors, and h2c (CONTRACT.md 1.3–1.13, 4.1–4.5, 5.1).

// A test stops at the first thing that is not as expected: unwrap is how it says so.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::pb::{self, process_event::Event, process_event::data_event::Output};
use common::*;
use http::{Method, StatusCode, Version};
use prost::Message;
use serde_json::{Value, json};

const TOKEN: &str = "5f0d1c1e4b7a4c8e9d2b3a6f7e8d9c0b1a2f3e4d5c6b7a8f9e0d1c2b3a4f5e6d";
const UNAUTHORIZED_MESSAGE: &str =
    "unauthorized access, please provide a valid access token or method signing if supported";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_version(text: &str) -> (u64, u64, u64) {
    let parts: Vec<u64> = text
        .trim()
        .split('.')
        .map(|p| p.parse().unwrap_or_else(|_| panic!("not MAJOR.MINOR.PATCH: {text:?}")))
        .collect();
    assert_eq!(parts.len(), 3, "not MAJOR.MINOR.PATCH: {text:?}");
    (parts[0], parts[1], parts[2])
}

// --- /health, /metrics, /envs, version -------------------------------------------

#[tokio::test]
async fn health_is_204_no_store() {
    let envd = Envd::start();
    let reply = envd.client().get("/health").await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    assert_eq!(reply.header("cache-control"), "no-store");
    assert!(reply.body.is_empty());
    let reply = envd.client().send(Method::POST, "/health", &[], Bytes::new()).await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED, "wrong method on a known path");
    let reply = envd.client().get("/no-such-route").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn version_flags_and_header() {
    for flag in ["--version", "-version"] {
        let output = Command::new(Envd::binary()).arg(flag).output().unwrap();
        assert!(output.status.success(), "{flag}: {output:?}");
        let version = String::from_utf8(output.stdout).unwrap();
        assert!(parse_version(&version) >= (0, 6, 6), "{flag}: {version}");
    }
    let printed = String::from_utf8(Command::new(Envd::binary()).arg("--version").output().unwrap().stdout).unwrap();
    let envd = Envd::start();
    let client = envd.client();
    let ok = client.post_json("/init", &json!({})).await;
    assert_eq!(ok.status, StatusCode::NO_CONTENT);
    assert_eq!(ok.header("x-envd-version"), printed.trim());
    let refused = client.post_json("/init", &json!({"accessToken": ""})).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert_eq!(refused.header("x-envd-version"), printed.trim(), "on errors too");
}

#[tokio::test]
async fn metrics_are_complete_and_plausible() {
    let envd = Envd::start();
    let client = envd.client();
    client.get("/metrics").await;
    let reply = client.get("/metrics").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.header("content-type").starts_with("application/json"));
    assert_eq!(reply.header("cache-control"), "no-store");
    let m = reply.json();
    let fields = [
        "ts",
        "cpu_count",
        "cpu_used_pct",
        "mem_total_mib",
        "mem_used_mib",
        "mem_total",
        "mem_used",
        "mem_cache",
        "disk_used",
        "disk_total",
    ];
    for field in fields {
        assert!(m.get(field).is_some_and(Value::is_number), "{field} missing or not a number: {m}");
    }
    let int = |f: &str| m[f].as_u64().unwrap_or_else(|| panic!("{f} is not an unsigned integer: {m}"));
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    assert!(int("ts").abs_diff(now) <= 5, "ts {} vs now {now}", int("ts"));
    let cpus = std::thread::available_parallelism().unwrap().get() as u64;
    assert_eq!(int("cpu_count"), cpus);
    let pct = m["cpu_used_pct"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&pct), "cpu_used_pct {pct}");
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let mem_total_kib: u64 = meminfo.lines().next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_eq!(int("mem_total"), mem_total_kib * 1024);
    assert_eq!(int("mem_total_mib"), int("mem_total") >> 20);
    assert!(int("mem_used") > 0 && int("mem_used") < int("mem_total"));
    assert_eq!(int("mem_used_mib"), int("mem_used") >> 20);
    assert!(int("mem_cache") < int("mem_total"));
    assert!(int("disk_total") > 0 && int("disk_used") > 0 && int("disk_used") <= int("disk_total"));
}

#[tokio::test]
async fn envs_lists_the_default_env_vars() {
    let envd = Envd::start();
    let client = envd.client();
    let reply = client.get("/envs").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("cache-control"), "no-store");
    assert_eq!(reply.json(), json!({"E2B_SANDBOX": "false"}));
}

// --- /init and the access token ---------------------------------------------------

#[tokio::test]
async fn init_env_vars_replace_and_internal_keys_stay() {
    let envd = Envd::start();
    let client = envd.client();
    let init = |body: Value| {
        let client = client.clone();
        async move {
            let reply = client.post_json("/init", &body).await;
            assert_eq!(reply.status, StatusCode::NO_CONTENT, "{body}: {}", reply.text());
            assert_eq!(reply.header("cache-control"), "no-store");
        }
    };
    init(json!({"envVars": {"A": "1", "B": "2"}})).await;
    assert_eq!(client.get("/envs").await.json(), json!({"A": "1", "B": "2", "E2B_SANDBOX": "false"}));
    init(json!({"envVars": {"C": "3", "E2B_SANDBOX": "hijacked", "E2B_SANDBOX_ID": "x"}})).await;
    assert_eq!(client.get("/envs").await.json(), json!({"C": "3", "E2B_SANDBOX": "false"}), "replaced, internal kept");
    // No envVars field: unchanged; empty body: allowed.
    init(json!({"defaultUser": "root"})).await;
    let reply = client.send(Method::POST, "/init", &[], Bytes::new()).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    assert_eq!(client.get("/envs").await.json(), json!({"C": "3", "E2B_SANDBOX": "false"}));
    // Malformed JSON: 400.
    let reply = client.send(Method::POST, "/init", &[("content-type", "application/json")], "{").await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    // The new env reaches processes.
    let run = client.run(&bash("echo $C"), &[]).await;
    assert_eq!(run.stdout_str(), "3\n");
}

#[tokio::test]
async fn stale_init_changes_nothing() {
    let envd = Envd::start();
    let client = envd.client();
    let now = SystemTime::now();
    let newer = common::time::rfc3339(now);
    let older = common::time::rfc3339(now - Duration::from_secs(10));
    let reply = client.post_json("/init", &json!({"envVars": {"V": "new"}, "timestamp": newer})).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT, "{}", reply.text());
    for timestamp in [&older, &newer] {
        let reply = client
            .post_json("/init", &json!({"envVars": {"V": "stale"}, "accessToken": TOKEN, "timestamp": timestamp}))
            .await;
        assert_eq!(reply.status, StatusCode::NO_CONTENT, "a stale /init still succeeds");
    }
    assert_eq!(client.get("/envs").await.json(), json!({"V": "new", "E2B_SANDBOX": "false"}));
    assert_eq!(client.get("/metrics").await.status, StatusCode::OK, "the stale token was not applied");
}

#[tokio::test]
async fn access_token_guards_everything_but_health() {
    let envd = Envd::start();
    let open = envd.client();
    assert_eq!(open.get("/envs").await.status, StatusCode::OK, "no token before /init");
    let reply = open.post_json("/init", &json!({"accessToken": ""})).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "an empty token is a decode error");
    let reply = open.send(Method::POST, "/init", &[], r#"{"accessToken":"a\u0041"}"#).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "a token with an escape is a decode error");
    let reply = open.post_json("/init", &json!({"accessToken": TOKEN})).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT, "{}", reply.text());

    let wrong = envd.client().with_header("x-access-token", "wrong");
    let right = envd.client().with_header("x-access-token", TOKEN);
    let expect_401 = |reply: Reply, what: &str| {
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{what}: {}", reply.text());
        assert!(reply.header("content-type").starts_with("application/json"), "{what}");
        assert_eq!(reply.json(), json!({"code": 401, "message": UNAUTHORIZED_MESSAGE}), "{what}");
    };
    for client in [&open, &wrong] {
        expect_401(client.get("/envs").await, "/envs");
        expect_401(client.get("/metrics").await, "/metrics");
        expect_401(client.unary(rpc::LIST, &json!({}), &[]).await, "List");
        let start = bash("echo never").to_string();
        let body = envelope(0, start.as_bytes());
        let reply = client.send(Method::POST, rpc::START, &[("content-type", "application/connect+json")], body).await;
        expect_401(reply, "Start (a stream, still plain 401 JSON)");
        assert_eq!(client.get("/health").await.status, StatusCode::NO_CONTENT);
    }
    assert_eq!(right.get("/envs").await.status, StatusCode::OK);
    assert_eq!(right.get("/metrics").await.status, StatusCode::OK);
    assert_eq!(right.run(&bash("echo ok"), &[]).await.stdout_str(), "ok\n");

    // /init checks the body's token, not the header.
    let reply = right.post_json("/init", &json!({"accessToken": "another"})).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "a new token needs the old one");
    let reply = right.post_json("/init", &json!({})).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "clearing needs authorisation");
    let reply = open.post_json("/init", &json!({"accessToken": TOKEN, "envVars": {"X": "1"}})).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT, "the same token re-inits");
    assert_eq!(right.get("/envs").await.json()["X"], "1");
    expect_401(open.get("/envs").await, "/envs after re-init");
}

// --- routing errors ----------------------------------------------------------------

#[tokio::test]
async fn routing_errors() {
    let envd = Envd::start();
    let client = envd.client();
    let json_type = [("content-type", "application/json")];

    for path in ["/process.Process/Nope", "/nope.Service/Call", "/filesystem.Nope/Stat"] {
        let reply = client.send(Method::POST, path, &json_type, "{}").await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{path}");
    }
    let reply = client.get(rpc::LIST).await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.header("allow"), "POST");

    let reply = client.send(Method::POST, rpc::LIST, &[("content-type", "text/plain")], "{}").await;
    assert_eq!(reply.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let accepted = reply.header("accept-post").to_owned();
    assert!(
        accepted.contains("application/json") && accepted.contains("application/proto"),
        "Accept-Post: {accepted:?}"
    );
    let reply = client.send(Method::POST, rpc::START, &json_type, bash("true").to_string()).await;
    assert_eq!(reply.status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "a unary type on a stream method");
    let reply =
        client.send(Method::POST, rpc::LIST, &[("content-type", "application/connect+json")], envelope(0, b"{}")).await;
    assert_eq!(reply.status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "a stream type on a unary method");

    let (status, error) = client.call_err(rpc::LIST, &json!("not an object")).await;
    assert_eq!((status, error.code.as_str()), (StatusCode::BAD_REQUEST, "invalid_argument"));
    for body in ["{", ""] {
        let reply = client.send(Method::POST, rpc::LIST, &json_type, body).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{body:?}");
        assert_eq!(reply.json()["code"], "invalid_argument", "{body:?}");
    }
    // Case-insensitive type with a charset; unknown fields ignored.
    let reply = client
        .send(Method::POST, rpc::LIST, &[("content-type", "Application/JSON; charset=utf-8")], r#"{"unknown":1}"#)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    for timeout in ["abc", "-1", "12345678901"] {
        let (status, error) = {
            let reply = client.unary(rpc::LIST, &json!({}), &[("connect-timeout-ms", timeout)]).await;
            (reply.status, reply.json())
        };
        assert_eq!((status, error["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_argument")), "{timeout}");
        let mut stream = client.stream(rpc::START, &bash("echo never"), &[("connect-timeout-ms", timeout)]).await;
        assert_eq!(stream.status, StatusCode::OK);
        let frame = stream.next_frame().await.unwrap();
        assert_eq!(frame.end_error().map(|e| e.code), Some("invalid_argument".into()), "{timeout}");
    }
    let reply = client.unary(rpc::LIST, &json!({}), &[("connect-protocol-version", "2")]).await;
    assert_eq!(reply.json()["code"], "invalid_argument", "Connect-Protocol-Version 2");

    // gzip request bodies are accepted, unknown encodings are unimplemented.
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gzip, b"{}").unwrap();
    let reply = client.unary(rpc::LIST, &json!({}), &[("content-encoding", "identity")]).await;
    assert_eq!(reply.status, StatusCode::OK);
    let reply = client
        .send(
            Method::POST,
            rpc::LIST,
            &[("content-type", "application/json"), ("content-encoding", "gzip")],
            gzip.finish().unwrap(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let reply = client.unary(rpc::LIST, &json!({}), &[("content-encoding", "br")]).await;
    assert_eq!((reply.status, reply.json()["code"].as_str()), (StatusCode::NOT_IMPLEMENTED, Some("unimplemented")));
    assert!(health_ok(envd.port()));
}

// --- CORS ----------------------------------------------------------------------------

#[tokio::test]
async fn cors_preflight_needs_no_token() {
    let envd = Envd::start();
    let client = envd.client();
    assert_eq!(client.post_json("/init", &json!({"accessToken": TOKEN})).await.status, StatusCode::NO_CONTENT);
    let asked = "authorization,x-access-token,connect-protocol-version,content-type,keepalive-ping-interval";
    for path in [rpc::START, "/envs", "/files"] {
        let reply = client
            .send(
                Method::OPTIONS,
                path,
                &[
                    ("origin", "https://app.example"),
                    ("access-control-request-method", "POST"),
                    ("access-control-request-headers", asked),
                ],
                Bytes::new(),
            )
            .await;
        assert_eq!(reply.status, StatusCode::NO_CONTENT, "{path}");
        assert_eq!(reply.header("access-control-allow-origin"), "*");
        let methods: Vec<&str> = reply.header("access-control-allow-methods").split(',').map(str::trim).collect();
        for method in ["HEAD", "GET", "POST", "PUT", "PATCH", "DELETE"] {
            assert!(methods.contains(&method), "{method} not allowed: {methods:?}");
        }
        assert_eq!(reply.header("access-control-allow-headers").to_ascii_lowercase(), asked);
        assert_eq!(reply.header("access-control-max-age"), "7200");
        let vary = reply.headers.get_all("vary").iter().map(|v| v.to_str().unwrap()).collect::<Vec<_>>().join(", ");
        for name in ["Origin", "Access-Control-Request-Method", "Access-Control-Request-Headers"] {
            assert!(vary.contains(name), "Vary lacks {name}: {vary}");
        }
        assert!(reply.header("access-control-allow-credentials").is_empty());
    }

    // Actual requests, even refused ones, carry the CORS headers.
    let reply = client.send(Method::GET, "/envs", &[("origin", "https://app.example")], Bytes::new()).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.header("access-control-allow-origin"), "*");
    let exposed = reply.header("access-control-expose-headers").to_owned();
    for name in [
        "Grpc-Status",
        "Grpc-Message",
        "Grpc-Status-Details-Bin",
        "Location",
        "Cache-Control",
        "X-Content-Type-Options",
    ] {
        assert!(exposed.contains(name), "{name} not exposed: {exposed}");
    }
    assert!(reply.headers.get_all("vary").iter().any(|v| v.to_str().unwrap().contains("Origin")));
}

// --- stream framing and content types ---------------------------------------------------

#[tokio::test]
async fn stream_responses_are_chunked_with_exact_content_types() {
    let envd = Envd::start();
    let client = envd.client();
    for request_type in
        ["application/connect+json", "application/connect+json; charset=utf-8", "Application/Connect+JSON"]
    {
        let stream = client
            .stream(
                rpc::START,
                &bash("echo hi"),
                &[
                    ("content-type", request_type),
                    ("connect-content-encoding", "identity"),
                    ("connect-accept-encoding", "identity"),
                    ("user-agent", "e2b-python-sdk/2.63.0"),
                    ("keepalive-ping-interval", "50"),
                    ("connect-timeout-ms", "60000"),
                ],
            )
            .await;
        assert_eq!(stream.status, StatusCode::OK);
        assert_eq!(stream.version, Version::HTTP_11);
        assert_eq!(stream.header("content-type"), "application/connect+json", "request type {request_type}");
        assert!(stream.header("content-length").is_empty(), "a stream has no Content-Length");
        assert_eq!(stream.header("transfer-encoding"), "chunked");
        let run = stream.collect().await;
        assert_eq!(run.stdout_str(), "hi\n");
    }
    let request = pb::start_request("/bin/bash", &["-c", "echo hi"]).encode_to_vec();
    let stream = client.stream_proto(rpc::START, &request, &[]).await;
    assert_eq!(stream.header("content-type"), "application/connect+proto");
    assert!(stream.header("content-length").is_empty());
    assert_eq!(stream.header("transfer-encoding"), "chunked");

    // Unary answers echo their codec.
    assert_eq!(client.unary(rpc::LIST, &json!({}), &[]).await.header("content-type"), "application/json");
    let reply = client.unary_proto(rpc::LIST, Vec::new(), &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("content-type"), "application/proto");
}

#[tokio::test]
async fn the_start_event_is_flushed_before_the_process_ends() {
    let envd = Envd::start();
    let mut stream = envd.client().stream(rpc::START, &bash("echo first; sleep 30"), &[]).await;
    let start = stream.next_frame_within(Duration::from_secs(5)).await.expect("start event flushed at once");
    assert!(start.is_some());
    let data = stream.next_frame_within(Duration::from_secs(5)).await.expect("data event flushed at once").unwrap();
    assert_eq!(proc_event(&data.json()), ProcEvent::Stdout(b"first\n".to_vec()));
}

// --- binary protobuf --------------------------------------------------------------------

fn decode_event(frame: &Frame) -> Event {
    assert_eq!(frame.flags, 0, "a message envelope");
    let response = pb::StartResponse::decode(frame.payload.clone()).expect("a StartResponse");
    // Deterministic encoding: re-encoding gives the same bytes.
    assert_eq!(hex(&response.encode_to_vec()), hex(&frame.payload), "re-encoded bytes differ");
    response.event.and_then(|e| e.event).expect("an event")
}

#[tokio::test]
async fn binary_protobuf_matches_the_contract_vectors() {
    // The hand-written messages agree with the vectors themselves.
    let start = pb::StartResponse {
        event: Some(pb::ProcessEvent { event: Some(Event::Start(pb::process_event::StartEvent { pid: 1234 })) }),
    };
    assert_eq!(hex(&start.encode_to_vec()), "0a050a0308d209");
    let keepalive = pb::StartResponse {
        event: Some(pb::ProcessEvent { event: Some(Event::Keepalive(pb::process_event::KeepAlive {})) }),
    };
    assert_eq!(hex(&keepalive.encode_to_vec()), "0a022200");

    let envd = Envd::start();
    let client = envd.client();

    // exit 0, with output on the way.
    let request = pb::start_request("/bin/bash", &["-c", "printf hello; exit 0"]).encode_to_vec();
    let mut stream = client.stream_proto(rpc::START, &request, &[]).await;
    let Event::Start(started) = decode_event(&stream.next_frame().await.unwrap()) else { panic!("no start event") };
    assert!(started.pid > 0);
    let mut stdout = Vec::new();
    let end = loop {
        let frame = stream.next_frame().await.unwrap();
        match decode_event(&frame) {
            Event::Data(pb::process_event::DataEvent { output: Some(Output::Stdout(data)) }) => stdout.extend(data),
            Event::End(_) => break frame,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(stdout, b"hello");
    assert_eq!(hex(&end.payload), "0a131a1110011a0d65786974207374617475732030", "end of `exit 0`");
    let finish = stream.next_frame().await.unwrap();
    assert!(finish.is_end());
    assert_eq!(finish.json(), json!({}), "the end-of-stream frame is JSON even for proto");
    assert!(stream.next_frame().await.is_none());

    // SIGKILL, sent as binary protobuf too.
    let request = pb::start_request("/bin/sleep", &["30"]).encode_to_vec();
    let mut stream = client.stream_proto(rpc::START, &request, &[]).await;
    let Event::Start(started) = decode_event(&stream.next_frame().await.unwrap()) else { panic!("no start event") };
    let signal = pb::SendSignalRequest { process: pb::pid_selector(started.pid), signal: pb::Signal::Sigkill as i32 };
    let reply = client.unary_proto(rpc::SEND_SIGNAL, signal.encode_to_vec(), &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert!(reply.body.is_empty(), "an empty message is zero bytes");
    let end = stream.next_frame().await.unwrap();
    assert_eq!(
        hex(&end.payload),
        "0a241a2208011a0e7369676e616c3a206b696c6c6564220e7369676e616c3a206b696c6c6564",
        "end of a SIGKILL"
    );
    assert!(stream.next_frame().await.unwrap().is_end());

    // exit 3: sint32 3 on the wire is the varint 6.
    let request = pb::start_request("/bin/bash", &["-c", "exit 3"]).encode_to_vec();
    let mut stream = client.stream_proto(rpc::START, &request, &[]).await;
    decode_event(&stream.next_frame().await.unwrap());
    let Event::End(end) = decode_event(&stream.next_frame().await.unwrap()) else { panic!("no end event") };
    assert_eq!(
        end,
        pb::process_event::EndEvent {
            exit_code: 3,
            exited: true,
            status: "exit status 3".into(),
            error: Some("exit status 3".into())
        }
    );

    // A unary List in protobuf reports the process config byte-for-byte.
    let mut request = pb::start_request("/bin/sleep", &["30"]);
    request.tag = Some("proto".into());
    request.process.as_mut().unwrap().cwd = Some(String::new());
    let mut stream = client.stream_proto(rpc::START, &request.encode_to_vec(), &[]).await;
    let Event::Start(started) = decode_event(&stream.next_frame().await.unwrap()) else { panic!("no start event") };
    let reply = client.unary_proto(rpc::LIST, Vec::new(), &[]).await;
    let listed = pb::ListResponse::decode(reply.body).unwrap();
    let info = listed.processes.iter().find(|p| p.pid == started.pid).expect("listed");
    assert_eq!(info.tag.as_deref(), Some("proto"));
    assert_eq!(info.config.as_ref().unwrap().cwd.as_deref(), Some(""), "an optional set to \"\" keeps its presence");
    client.kill(started.pid).await;
}

// --- h2c -------------------------------------------------------------------------------

#[tokio::test]
async fn h2c_prior_knowledge_works() {
    let envd = Envd::start();
    let client = envd.h2c_client();
    let reply = client.get("/health").await;
    assert_eq!((reply.status, reply.version), (StatusCode::NO_CONTENT, Version::HTTP_2));
    let stream = client.stream(rpc::START, &bash("echo over h2; exit 4"), &[]).await;
    assert_eq!(stream.version, Version::HTTP_2);
    assert_eq!(stream.header("content-type"), "application/connect+json");
    let run = stream.collect().await;
    assert_eq!(run.stdout_str(), "over h2\n");
    assert_eq!(run.exit_code(), 4);
    let reply = client.unary(rpc::LIST, &json!({}), &[]).await;
    assert_eq!((reply.status, reply.version), (StatusCode::OK, Version::HTTP_2));
}
