//! Who may call what. Every route and RPC envd serves is called with no
//! token, a wrong token, the right token and (on `/files`) a valid and an
//! expired signature, in three phases: before the first `/init` (no token),
//! after an `/init` that set the token, and after a cold restart on the
//! same state directory, where only the token's SHA-512 hash is known, from
//! a metadata service. Each cell must be what CONTRACT.md 4.5, 5.1, 5.5 and
//! 7.2 say; the matrix is printed and every wrong cell is listed.
//!
//! Also: processes of a non-root user have no capabilities and no fd above
//! 2, and no log line (envd runs with `--verbose`) carries the token, a
//! signature, an env value or uploaded content.
//!
//! Nothing here touches the machine: envd runs with `--no-cgroups` (so
//! `/freeze` writes no cgroup) and in `--dev` without `--freeze-path` (so
//! `/fsfreeze` is refused by its handler, 409, and freezes nothing).

// A test stops at the first thing that is not as expected: unwrap is how it says so.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use common::mmds::{Mmds, sha512_hex};
use common::{Envd, Reply, Scratch, envelope, fs_rpc as fs, rpc, test_user};
use http::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Distinctive values: any of them in a log line is a leak.
const TOKEN: &str = "a11ce5ec7e57a11ce5ec7e57a11ce5ec7e57a11ce5ec7e57a11ce5ec7e57a11c";
const WRONG_TOKEN: &str = "0bad0bad0bad0bad0bad0bad0bad0bad0bad0bad0bad0bad0bad0bad0bad0bad";
const INIT_ENV_VALUE: &str = "init-env-value-7f3e19c2";
const START_ENV_VALUE: &str = "start-env-value-4b8d06e1";
const CONTENT: &str = "uploaded-content-91c5d7a3";
/// Newer than any clock: every `/init` of the matrix after the first one
/// with this timestamp is stale, so it is judged but changes nothing.
const STALE_AFTER_FIRST: &str = "2099-01-01T00:00:00Z";
const NO_SUCH_PID: u32 = 999_999_999;
const UNAUTHORIZED_ACCESS: &str =
    "unauthorized access, please provide a valid access token or method signing if supported";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// envd started without a token, no `/init` yet.
    Fresh,
    /// An `/init` set the token.
    Token,
    /// Restarted on the same state directory; the metadata service knows the hash.
    Cold,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Credential {
    None,
    WrongToken,
    RightToken,
    Signature,
    ExpiredSignature,
}

const CREDENTIALS: [Credential; 5] = [
    Credential::None,
    Credential::WrongToken,
    Credential::RightToken,
    Credential::Signature,
    Credential::ExpiredSignature,
];

/// How a route is protected (CONTRACT.md 5.1 exempt table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Guard {
    /// `GET /health`, CORS preflights.
    Open,
    /// `X-Access-Token`.
    Token,
    /// Header token or signature.
    Files,
    /// The body's `accessToken` against the token or the MMDS hash.
    Init,
    /// `/init` with the token only in the header, which `/init` ignores.
    InitHeaderOnly,
}

impl Guard {
    fn is_init(self) -> bool {
        matches!(self, Guard::Init | Guard::InitHeaderOnly)
    }
}

/// What a request that passed the auth layers gets from its handler.
#[derive(Clone, Copy, Debug)]
enum Success {
    Status(u16),
    /// Routes whose handler may change (`/upgrade`, `/collapse`).
    NotUnauthorized,
    /// HTTP 200 and an end-of-stream frame with this error code (or none).
    Stream(Option<&'static str>),
}

#[derive(Clone, Copy, Debug)]
enum Refusal {
    /// The middleware's JSON 401.
    TokenCheck,
    /// `/files`' JSON 401, with this message when the contract names one.
    Files(Option<&'static str>),
    /// `/init`'s plain-text 401.
    Init(&'static str),
}

#[derive(Clone, Copy, Debug)]
enum Expect {
    Pass(Success),
    Refuse(Refusal),
}

/// One request, before credentials are added to the headers.
struct Call {
    method: Method,
    path: String,
    headers: Vec<(&'static str, String)>,
    body: Bytes,
}

impl Call {
    fn new(method: Method, path: impl Into<String>) -> Call {
        Call { method, path: path.into(), headers: Vec::new(), body: Bytes::new() }
    }

    fn body(mut self, content_type: &'static str, body: impl Into<Bytes>) -> Call {
        self.headers.push(("content-type", content_type.into()));
        self.body = body.into();
        self
    }
}

fn unary(path: &str, message: Value) -> Call {
    Call::new(Method::POST, path).body("application/json", message.to_string())
}

fn stream(path: &str, message: Value) -> Call {
    Call::new(Method::POST, path).body("application/connect+json", envelope(0, message.to_string().as_bytes()))
}

/// Paths the calls use; `n` makes each cell's files its own.
struct Fixture {
    dir: Scratch,
    /// Every signature sent, for the log scan.
    signatures: std::sync::Mutex<Vec<String>>,
}

impl Fixture {
    fn file(&self, name: &str, n: usize) -> String {
        self.dir.s(&format!("{name}-{n}"))
    }

    fn existing_file(&self, name: &str, n: usize) -> String {
        let path = self.file(name, n);
        std::fs::write(&path, CONTENT).unwrap();
        path
    }
}

struct Route {
    label: String,
    guard: Guard,
    success: Success,
    call: fn(&Fixture, Credential, usize) -> Call,
    /// How the call's path is spelled (see [`SPELLINGS`]).
    spelling: Spelling,
}

type Spelling = fn(&str) -> String;

/// Other spellings of a route's path: each must reach the route with the
/// route's own checks (and only those), as its plain spelling does.
const SPELLINGS: [(&str, Spelling); 7] = [
    ("//", |path| format!("/{path}")),
    ("trailing /", |path| format!("{path}/")),
    ("%-escaped", |path| {
        let (first, rest) = path[1..].split_at(1);
        format!("/%{:02X}{rest}", first.as_bytes()[0])
    }),
    ("/.", |path| format!("/.{path}")),
    ("/files/..", |path| format!("/files/..{path}")),
    ("/health/..", |path| format!("/health/..{path}")),
    ("%2F..%2F", |path| format!("/health%2F..%2F{}", &path[1..])),
];

fn as_spelled(path: &str, spelling: Spelling) -> String {
    match path.split_once('?') {
        Some((path, query)) => format!("{}?{query}", spelling(path)),
        None => spelling(path),
    }
}

/// `routes` and, for each HTTP route (not an RPC), a row per spelling; the
/// `/init` rows stay last, every header-only one before the others.
fn with_spellings(routes: Vec<Route>) -> Vec<Route> {
    let (init, other): (Vec<Route>, Vec<Route>) = routes.into_iter().partition(|r| r.guard.is_init());
    let spelled = |routes: &[Route]| -> Vec<Route> {
        let http = routes.iter().filter(|r| r.label.split_once(' ').is_some_and(|(_, path)| path.starts_with('/')));
        http.flat_map(|route| {
            SPELLINGS.iter().map(|(name, spelling)| Route {
                label: format!("{} ({name})", route.label),
                spelling: *spelling,
                ..*route
            })
        })
        .collect()
    };
    let (header_only, full): (Vec<Route>, Vec<Route>) =
        init.into_iter().partition(|r| r.guard == Guard::InitHeaderOnly);
    let mut all = spelled(&other);
    all.splice(0..0, other.iter().map(|r| Route { label: r.label.clone(), ..*r }));
    for group in [header_only, full] {
        let spelled = spelled(&group);
        all.extend(group);
        all.extend(spelled);
    }
    all
}

fn signature(path: &str, operation: &str, expiration: i64) -> String {
    let raw = format!("{path}:{operation}::{TOKEN}:{expiration}");
    format!("v1_{}", base64::engine::general_purpose::STANDARD_NO_PAD.encode(Sha256::digest(raw.as_bytes())))
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

fn percent_encode(text: &str) -> String {
    text.replace('%', "%25").replace('+', "%2B").replace('/', "%2F").replace('=', "%3D")
}

/// `/files?path=…`, signed (validly, or validly but expired) when asked.
fn files_query(fixture: &Fixture, path: &str, operation: &str, credential: Credential) -> String {
    let expiration = match credential {
        Credential::Signature => unix_now() + 3600,
        Credential::ExpiredSignature => unix_now() - 3600,
        _ => return format!("/files?path={}", percent_encode(path)),
    };
    let signature = signature(path, operation, expiration);
    fixture.signatures.lock().unwrap().push(signature.clone());
    let signature = percent_encode(&signature);
    format!("/files?path={}&signature={signature}&signature_expiration={expiration}", percent_encode(path))
}

fn init_call(credential: Credential, token_in_body: bool) -> Call {
    let mut body = json!({"timestamp": STALE_AFTER_FIRST, "envVars": {"MATRIX_INIT": INIT_ENV_VALUE}});
    match credential {
        Credential::WrongToken if token_in_body => body["accessToken"] = json!(WRONG_TOKEN),
        Credential::RightToken if token_in_body => body["accessToken"] = json!(TOKEN),
        _ => {}
    }
    Call::new(Method::POST, "/init").body("application/json", body.to_string())
}

fn pid_target() -> Value {
    json!({"process": {"pid": NO_SUCH_PID}})
}

const NOT_FOUND: Success = Success::Status(404);

/// Every route and RPC (proto/process.proto, proto/filesystem.proto). The
/// two `/init` rows come last: in the cold phase the right token's `/init`
/// brings the raw token back, which would change the cells after it.
fn routes() -> Vec<Route> {
    use Guard::*;
    use Success::*;
    let route =
        |label: &str, guard, success, call| Route { label: label.into(), guard, success, call, spelling: |p| p.into() };
    vec![
        route("GET /health", Open, Status(204), |_, _, _| Call::new(Method::GET, "/health")),
        route("OPTIONS preflight", Open, Status(204), |_, _, _| {
            let mut call = Call::new(Method::OPTIONS, rpc::START);
            call.headers.push(("origin", "https://example.com".into()));
            call.headers.push(("access-control-request-method", "POST".into()));
            call
        }),
        route("GET /envs", Token, Status(200), |_, _, _| Call::new(Method::GET, "/envs")),
        route("GET /metrics", Token, Status(200), |_, _, _| Call::new(Method::GET, "/metrics")),
        route("GET /files", Files, Status(200), |f, c, n| {
            Call::new(Method::GET, files_query(f, &f.existing_file("download", n), "read", c))
        }),
        route("POST /files", Files, Status(200), |f, c, n| {
            Call::new(Method::POST, files_query(f, &f.file("upload", n), "write", c))
                .body("application/octet-stream", CONTENT)
        }),
        route("POST /files/compose", Token, Status(200), |f, _, n| {
            let sources = [f.existing_file("part-a", n), f.existing_file("part-b", n)];
            let body = json!({"source_paths": sources, "destination": f.file("composed", n)});
            Call::new(Method::POST, "/files/compose").body("application/json", body.to_string())
        }),
        route("POST /freeze", Token, Status(204), |_, _, _| Call::new(Method::POST, "/freeze")),
        route("POST /unfreeze", Token, Status(204), |_, _, _| Call::new(Method::POST, "/unfreeze")),
        route("POST /fsfreeze", Token, Status(409), |_, _, _| Call::new(Method::POST, "/fsfreeze")),
        route("POST /fsthaw", Token, Status(204), |_, _, _| Call::new(Method::POST, "/fsthaw")),
        // Another target than the one upgrade path: refused after auth, so
        // a granted call does not actually replace envd mid-matrix.
        route("POST /upgrade", Token, NotUnauthorized, |_, _, _| {
            let mut call = Call::new(Method::POST, "/upgrade");
            call.headers.push(("x-envd-upgrade-bin", "/nonexistent/envd".into()));
            call
        }),
        route("POST /collapse", Token, NotUnauthorized, |_, _, _| Call::new(Method::POST, "/collapse")),
        route("Process/List", Token, Status(200), |_, _, _| unary(rpc::LIST, json!({}))),
        route("Process/Connect", Token, Stream(Some("not_found")), |_, _, _| stream(rpc::CONNECT, pid_target())),
        route("Process/Start", Token, Stream(None), |_, _, _| {
            let process = json!({"cmd": "/bin/true", "envs": {"MATRIX_START": START_ENV_VALUE}});
            stream(rpc::START, json!({"process": process, "stdin": false}))
        }),
        route("Process/Update", Token, NOT_FOUND, |_, _, _| {
            unary(rpc::UPDATE, json!({"process": {"pid": NO_SUCH_PID}, "pty": {"size": {"cols": 80, "rows": 24}}}))
        }),
        route("Process/StreamInput", Token, Stream(Some("not_found")), |_, _, _| {
            stream(rpc::STREAM_INPUT, json!({"start": pid_target()}))
        }),
        route("Process/SendInput", Token, NOT_FOUND, |_, _, _| {
            let stdin = base64::engine::general_purpose::STANDARD.encode(CONTENT);
            unary(rpc::SEND_INPUT, json!({"process": {"pid": NO_SUCH_PID}, "input": {"stdin": stdin}}))
        }),
        route("Process/SendSignal", Token, NOT_FOUND, |_, _, _| {
            unary(rpc::SEND_SIGNAL, json!({"process": {"pid": NO_SUCH_PID}, "signal": "SIGNAL_SIGTERM"}))
        }),
        route("Process/CloseStdin", Token, NOT_FOUND, |_, _, _| unary(rpc::CLOSE_STDIN, pid_target())),
        route("Filesystem/Stat", Token, Status(200), |f, _, _| unary(fs::STAT, json!({"path": f.dir.s("")}))),
        route("Filesystem/MakeDir", Token, Status(200), |f, _, n| {
            unary(fs::MAKE_DIR, json!({"path": f.file("made", n)}))
        }),
        route("Filesystem/Move", Token, Status(200), |f, _, n| {
            unary(fs::MOVE, json!({"source": f.existing_file("move-from", n), "destination": f.file("move-to", n)}))
        }),
        route("Filesystem/ListDir", Token, Status(200), |f, _, _| {
            unary(fs::LIST_DIR, json!({"path": f.dir.s(""), "depth": 1}))
        }),
        route("Filesystem/Remove", Token, Status(200), |f, _, n| {
            unary(fs::REMOVE, json!({"path": f.existing_file("remove", n)}))
        }),
        route("Filesystem/WatchDir", Token, Stream(Some("not_found")), |f, _, n| {
            stream(fs::WATCH_DIR, json!({"path": f.file("not-there", n)}))
        }),
        route("Filesystem/CreateWatcher", Token, Status(200), |f, _, _| {
            unary(fs::CREATE_WATCHER, json!({"path": f.dir.s("")}))
        }),
        route("Filesystem/GetWatcherEvents", Token, NOT_FOUND, |_, _, _| {
            unary(fs::GET_WATCHER_EVENTS, json!({"watcherId": "wnosuchwatcher"}))
        }),
        route("Filesystem/RemoveWatcher", Token, NOT_FOUND, |_, _, _| {
            unary(fs::REMOVE_WATCHER, json!({"watcherId": "wnosuchwatcher"}))
        }),
        route("POST /init (header only)", InitHeaderOnly, Status(204), |_, c, _| init_call(c, false)),
        route("POST /init", Init, Status(204), |_, c, _| init_call(c, true)),
    ]
}

/// Signatures exist only on `/files`.
fn applies(guard: Guard, credential: Credential) -> bool {
    guard == Guard::Files || !matches!(credential, Credential::Signature | Credential::ExpiredSignature)
}

/// The contract's answer for one cell.
fn expected(route: &Route, phase: Phase, credential: Credential) -> Expect {
    use Credential::*;
    let pass = Expect::Pass(route.success);
    if route.guard == Guard::Open || phase == Phase::Fresh {
        // No token is enforced before the first /init (5.1); /init is then
        // first-time setup (4.5).
        return pass;
    }
    let refuse = Expect::Refuse;
    match (route.guard, credential) {
        (Guard::Token | Guard::Files | Guard::Init, RightToken) => pass,
        (Guard::Token, _) => refuse(Refusal::TokenCheck),
        (Guard::Files, None) => refuse(Refusal::Files(Some("missing signature query parameter"))),
        (Guard::Files, WrongToken) => refuse(Refusal::Files(Some("access token present in header but does not match"))),
        // Only the raw token verifies a signature; after a cold boot only
        // its hash is known, so signature-only calls are refused (7.2).
        (Guard::Files, Signature | ExpiredSignature) if phase == Phase::Cold => refuse(Refusal::Files(Option::None)),
        (Guard::Files, Signature) => pass,
        (Guard::Files, _) => refuse(Refusal::Files(Some("signature is already expired"))),
        (Guard::Init, WrongToken) => refuse(Refusal::Init("access token validation failed")),
        (Guard::Init | Guard::InitHeaderOnly, _) => refuse(Refusal::Init("access token reset not authorized")),
        (Guard::Open, _) => pass,
    }
}

/// Whether a reply is what was expected; the reason when not.
fn judge(expect: Expect, reply: &Reply) -> Result<(), String> {
    let status = reply.status.as_u16();
    match expect {
        Expect::Pass(Success::Status(want)) if status == want => Ok(()),
        Expect::Pass(Success::NotUnauthorized) if status != 401 => Ok(()),
        Expect::Pass(Success::Stream(want)) if status == 200 => {
            let got = end_error_code(&reply.body)?;
            if got.as_deref() == want { Ok(()) } else { Err(format!("stream ended with {got:?}, expected {want:?}")) }
        }
        Expect::Pass(_) => Err(format!("status {status}: {}", reply.text())),
        Expect::Refuse(_) if status != 401 => Err(format!("status {status}, expected 401: {}", reply.text())),
        Expect::Refuse(Refusal::Init(message)) => {
            if reply.text() == message {
                Ok(())
            } else {
                Err(format!("body {:?}, expected {message:?}", reply.text()))
            }
        }
        Expect::Refuse(Refusal::TokenCheck) => json_refusal(reply, Some(UNAUTHORIZED_ACCESS)),
        Expect::Refuse(Refusal::Files(message)) => json_refusal(reply, message),
    }
}

/// CONTRACT.md 4.1: `{"code":401,"message":…}` and a newline, as JSON.
fn json_refusal(reply: &Reply, message: Option<&str>) -> Result<(), String> {
    let body: Value = serde_json::from_slice(&reply.body).map_err(|e| format!("not JSON ({e}): {}", reply.text()))?;
    let message_ok = message.is_none_or(|m| body["message"] == m) && body["message"].is_string();
    let shape_ok = body["code"] == 401 && body.as_object().is_some_and(|o| o.len() == 2);
    let headers_ok = reply.header("content-type") == "application/json; charset=utf-8"
        && reply.header("x-content-type-options") == "nosniff";
    if !message_ok || !shape_ok || !headers_ok || !reply.body.ends_with(b"\n") {
        return Err(format!("body {:?} ({:?}), expected message {message:?}", reply.text(), reply.headers));
    }
    Ok(())
}

/// The error code of a Connect stream's end frame (`None`: success).
fn end_error_code(body: &[u8]) -> Result<Option<String>, String> {
    let mut rest = body;
    while rest.len() >= 5 {
        let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
        let (flags, payload) = (rest[0], rest.get(5..5 + len).ok_or("truncated envelope")?);
        rest = &rest[5 + len..];
        if flags & 0x02 != 0 {
            let end: Value = serde_json::from_slice(payload).map_err(|e| format!("end frame: {e}"))?;
            return Ok(end["error"]["code"].as_str().map(str::to_owned));
        }
    }
    Err(format!("no end-of-stream frame in {}", String::from_utf8_lossy(body)))
}

struct Cell {
    status: Option<u16>,
    wrong: Option<String>,
}

async fn run_phase(envd: &Envd, fixture: &Fixture, routes: &[Route], phase: Phase, n: &mut usize) -> Vec<Vec<Cell>> {
    let client = envd.client();
    let mut rows: Vec<Vec<Cell>> = Vec::new();
    for route in routes {
        let mut cells = Vec::new();
        for credential in CREDENTIALS {
            if !applies(route.guard, credential) {
                cells.push(Cell { status: None, wrong: None });
                continue;
            }
            *n += 1;
            let call = (route.call)(fixture, credential, *n);
            let mut headers: Vec<(&str, &str)> = call.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            match credential {
                Credential::WrongToken => headers.push(("x-access-token", WRONG_TOKEN)),
                Credential::RightToken => headers.push(("x-access-token", TOKEN)),
                _ => {}
            }
            let path = as_spelled(&call.path, route.spelling);
            let reply = client.send(call.method, &path, &headers, call.body).await;
            let wrong = judge(expected(route, phase, credential), &reply).err();
            cells.push(Cell { status: Some(reply.status.as_u16()), wrong });
        }
        rows.push(cells);
    }
    rows
}

fn print_and_check(routes: &[Route], phases: &[Phase], matrix: &[Vec<Vec<Cell>>]) {
    let mut out = format!("{:<42}", "route \\ phase: credential");
    for phase in phases {
        out.push_str(&format!("| {:<29}", format!("{phase:?}: none wrong right sig exp")));
    }
    out.push('\n');
    let mut wrong = Vec::new();
    for (r, route) in routes.iter().enumerate() {
        out.push_str(&format!("{:<42}", route.label));
        for (p, phase) in phases.iter().enumerate() {
            out.push_str("| ");
            for (c, cell) in matrix[p][r].iter().enumerate() {
                let text = match (cell.status, &cell.wrong) {
                    (None, _) => "  -  ".to_owned(),
                    (Some(status), None) => format!(" {status} "),
                    (Some(status), Some(why)) => {
                        wrong.push(format!("{} / {phase:?} / {:?}: {why}", route.label, CREDENTIALS[c]));
                        format!("!{status}!")
                    }
                };
                out.push_str(&text);
                out.push(' ');
            }
        }
        out.push('\n');
    }
    println!("{out}(!…! marks a cell that differs from CONTRACT.md)");
    assert!(wrong.is_empty(), "{} wrong cells:\n{}", wrong.len(), wrong.join("\n"));
}

/// Everything that must never reach a log; a signature's distinctive
/// part both raw and percent-encoded, as a logged URL would carry it.
fn secrets(signatures: &[String]) -> Vec<(&'static str, String)> {
    let mut secrets = vec![
        ("the token", TOKEN.to_owned()),
        ("the wrong token", WRONG_TOKEN.to_owned()),
        ("an /init env value", INIT_ENV_VALUE.to_owned()),
        ("a Process.Start env value", START_ENV_VALUE.to_owned()),
        ("file content", CONTENT.to_owned()),
    ];
    for signature in signatures {
        let core = signature.trim_start_matches("v1_");
        secrets.extend([("a signature", core.to_owned()), ("a signature", percent_encode(core))]);
    }
    secrets
}

fn envd_args(state: &Scratch, run_dir: &Scratch, mmds: Option<&Mmds>) -> Vec<String> {
    let mut args = vec!["--verbose", "--no-cgroups", "--state-dir", &state.s(""), "--run-dir", &run_dir.s("")]
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
    if let Some(mmds) = mmds {
        args.extend(["--mmds-address".to_owned(), mmds.address()]);
    }
    args
}

async fn wait_until_token_accepted(envd: &Envd) {
    let client = envd.client().with_header("X-Access-Token", TOKEN);
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.get("/envs").await.status != 200 {
        assert!(Instant::now() < deadline, "the restarted envd never accepted the token");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn every_route_answers_each_credential_as_the_contract_says() {
    let (state, run_dir) = (Scratch::new("auth-state"), Scratch::new("auth-run"));
    let fixture = Fixture { dir: Scratch::new("auth-files"), signatures: Default::default() };
    let routes = with_spellings(routes());
    let mut n = 0;

    let envd = Envd::options().args(envd_args(&state, &run_dir, None)).start();
    let fresh = run_phase(&envd, &fixture, &routes, Phase::Fresh, &mut n).await;
    assert_eq!(envd.client().get("/envs").await.status, 200, "the fresh phase must leave envd open");
    let init = json!({"accessToken": TOKEN, "envVars": {"MATRIX_INIT": INIT_ENV_VALUE}});
    assert_eq!(envd.client().post_json("/init", &init).await.status, 204);
    let token = run_phase(&envd, &fixture, &routes, Phase::Token, &mut n).await;
    let first_log = envd.stderr();
    drop(envd);

    let mmds =
        Mmds::start(json!({"instanceID": "sbx-auth", "envID": "tpl-auth", "accessTokenHash": sha512_hex(TOKEN)}));
    let envd = Envd::options().args(envd_args(&state, &run_dir, Some(&mmds))).start();
    wait_until_token_accepted(&envd).await;
    let cold = run_phase(&envd, &fixture, &routes, Phase::Cold, &mut n).await;

    print_and_check(&routes, &[Phase::Fresh, Phase::Token, Phase::Cold], &[fresh, token, cold]);
    let secrets = secrets(&fixture.signatures.lock().unwrap());
    common::assert_no_secret_logged(
        &[("envd before the restart", first_log), ("envd after it", envd.stderr())],
        &secrets,
    );
}

/// Runs `cmd args…` directly (no shell in between) as `client`'s user,
/// on pipes or a terminal, and returns its output with `\r\n` made `\n`.
async fn output_of(client: &common::Client, cmd: &str, args: &[&str], pty: bool) -> String {
    let mut start = json!({"process": {"cmd": cmd, "args": args, "envs": {"MATRIX_START": START_ENV_VALUE}}});
    if pty {
        start["pty"] = json!({"size": {"cols": 200, "rows": 50}});
    } else {
        start["stdin"] = json!(false);
    }
    let run = client.run(&start, &[]).await;
    assert_eq!(run.exit_code(), 0, "{cmd} {args:?} (pty: {pty}) failed: {}", run.stderr_str());
    let output = if pty { String::from_utf8_lossy(&run.pty).into_owned() } else { run.stdout_str() };
    output.replace("\r\n", "\n")
}

#[tokio::test]
async fn a_non_root_process_has_no_capabilities_and_no_inherited_fds() {
    let user = test_user();
    let (state, run_dir) = (Scratch::new("caps-state"), Scratch::new("caps-run"));
    // envd itself inherits an fd without close-on-exec (as from a careless
    // supervisor), and holds the pipes and terminal of a running process.
    let inherit_fd_7 = ["/bin/sh", "-c", "exec 7</dev/null; exec \"$0\" \"$@\""];
    let envd = Envd::options().wrapper(inherit_fd_7).args(envd_args(&state, &run_dir, None)).start();
    let client = envd.client().with_user(&user.name);
    let mut sleeper = client.stream(rpc::START, &json!({"process": {"cmd": "/bin/sleep", "args": ["60"]}}), &[]).await;
    let common::ProcEvent::Start(sleeper_pid) = sleeper.next_event().await else { panic!("no start event") };
    for pty in [false, true] {
        let status =
            output_of(&client, "/bin/grep", &["-E", "^(Uid|Cap(Eff|Prm|Amb)):", "/proc/self/status"], pty).await;
        let field = |name: &str| {
            let line = status.lines().find(|l| l.starts_with(&format!("{name}:")));
            line.unwrap_or_else(|| panic!("no {name} in {status:?}")).split_whitespace().skip(1).collect::<Vec<_>>()
        };
        assert_eq!(field("Uid"), vec![user.uid.to_string(); 4], "pty: {pty}: not running as the test user");
        for set in ["CapEff", "CapPrm", "CapAmb"] {
            assert_eq!(field(set), ["0000000000000000"], "pty: {pty}: {set} must be empty:\n{status}");
        }
        // `ls` lists its own fds: 0-2 and the one it opened to read the
        // directory (the lowest free number, 3). Anything else was inherited.
        let fds = output_of(&client, "/bin/ls", &["-1", "/proc/self/fd"], pty).await;
        assert_eq!(fds.lines().collect::<Vec<_>>(), ["0", "1", "2", "3"], "pty: {pty}: inherited fds");
    }
    client.kill(sleeper_pid).await;
    common::assert_no_secret_logged(&[("envd", envd.stderr())], &secrets(&[]));
}
