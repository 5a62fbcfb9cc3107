//! envd beside OpenSSH and beside the raw operation, in one run on
//! loopback: prints one table, writes it as Markdown and JSON, and draws
//! an SVG chart of the ratios. Asserts nothing about time; `--quick`
//! (smaller sizes and counts) checks only that every figure was produced.
//!
//! Run through `scripts/bench.sh` (as root): it installs OpenSSH when
//! missing and builds the release binaries. By hand:
//! `cargo bench --bench compare -- [--quick] [--out DIR]`.
//!
//! Order: the start-up times first (each daemon started and stopped
//! alone), then one envd and one sshd with its master connection, idle
//! memory, then each figure in turn with envd's VmHWM reset before it.
//! envd runs its commands as the same unprivileged user sshd logs in as.

// A test stops at the first thing that is not as expected: unwrap is how it says so.
#![allow(clippy::unwrap_used)]

#[path = "../../tests/common/mod.rs"]
mod common;

mod bare_http;
mod chart;
mod exec;
mod figure;
mod files;
mod goals;
mod machine;
mod openssh;
mod report;
mod sftp;
mod stream;

use std::path::PathBuf;
use std::time::Duration;

use common::{Client, Envd};
use exec::Wire;
use figure::{Figure, Measure, Side, Unit};
use openssh::{BENCH_USER, OpenSsh};

/// How often envd looks for freed memory to give back (`envd::memory`).
const CHECK_EVERY: Duration = Duration::from_secs(2);

/// Sizes and counts of one run.
struct Settings {
    quick: bool,
    out: PathBuf,
    warmup: usize,
    rounds: usize,
    fresh_rounds: usize,
    ready_samples: usize,
    big: u64,
    fs_rounds: usize,
    list_entries: usize,
    pty_rounds: usize,
    bursts: [usize; 2],
    /// Groups of figures to run (`--only`); all when empty.
    only: Vec<String>,
}

impl Settings {
    fn from_args() -> Settings {
        let mut quick = false;
        let mut out = PathBuf::from("target/bench");
        let mut only = Vec::new();
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quick" => quick = true,
                "--only" => {
                    let groups = args.next().unwrap_or_else(|| usage("--only needs groups"));
                    only = groups.split(',').map(str::to_owned).collect();
                    if let Some(bad) = only.iter().find(|g| !GROUPS.contains(&g.as_str())) {
                        usage(&format!("unknown group {bad}; groups: {}", GROUPS.join(", ")));
                    }
                }
                "--out" => out = args.next().map(PathBuf::from).unwrap_or_else(|| usage("--out needs a directory")),
                // cargo bench passes --bench to every bench binary.
                "--bench" => {}
                other => usage(&format!("unknown argument {other}")),
            }
        }
        let scale = |full: usize, small: usize| if quick { small } else { full };
        Settings {
            quick,
            out,
            warmup: scale(50, 5),
            rounds: scale(1000, 30),
            fresh_rounds: scale(30, 3),
            ready_samples: scale(20, 3),
            big: if quick { 32 << 20 } else { 1 << 30 },
            fs_rounds: scale(1000, 30),
            list_entries: 1000,
            pty_rounds: scale(500, 20),
            bursts: if quick { [10, 100] } else { [100, 1000] },
            only,
        }
    }

    /// Whether the figures of `group` run.
    fn runs(&self, group: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|g| g == group)
    }

    fn size_name(&self) -> String {
        if self.big >= 1 << 30 { format!("{} GiB", self.big >> 30) } else { format!("{} MiB", self.big >> 20) }
    }
}

/// The groups `--only` picks from, in the order they run.
const GROUPS: [&str; 6] = ["ready", "footprint", "exec", "streams", "files", "bursts"];

fn usage(problem: &str) -> ! {
    eprintln!("{problem}\nusage: cargo bench --bench compare -- [--quick] [--out DIR] [--only GROUP,…]");
    std::process::exit(2)
}

/// Runs `f` with envd's VmHWM reset first; returns its result and the peak.
fn with_peak<T>(envd: &Envd, f: impl FnOnce() -> T) -> (T, f64) {
    machine::reset_peak(envd.pid());
    let result = f();
    (result, machine::peak_mib(envd.pid()))
}

fn main() {
    common::require_root();
    let settings = Settings::from_args();
    machine::raise_fd_limit();
    let mut machine = machine::describe();
    let (binary, profile) = common::binary_and_profile();
    println!("envd binary: {} ({profile}); {}", binary.display(), machine.describe());
    openssh::bench_user();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");

    let mut figures = Vec::new();
    if settings.runs("ready") {
        figures.push(start_up(&binary, &settings));
    }
    let envd = Envd::options().binary(&binary).start();
    let ssh = OpenSsh::start();
    let client = envd.client().with_user(BENCH_USER);
    runtime.block_on(exec::envd_run(&client, Wire::Json, "/bin/true", &[]));
    std::thread::sleep(Duration::from_millis(300));
    let s = &settings;
    if s.runs("footprint") {
        figures.extend(footprint(&binary, &envd, &ssh));
    }
    if s.runs("exec") {
        figures.extend(round_trips(&runtime, &envd, &client, &ssh, s));
    }
    if s.runs("streams") {
        figures.extend(streams(&runtime, &envd, &client, &ssh, s));
    }
    if s.runs("files") {
        figures.extend(file_figures(&runtime, &envd, &client, &ssh, s));
    }
    if s.runs("bursts") {
        figures.extend(bursts(&runtime, &envd, &ssh, s));
        figures.push(idle_after_bursts(&envd));
    }
    drop(ssh);
    drop(envd);
    machine.load_after = machine::load_average();
    finish(&figures, &machine, &settings);
}

fn start_up(binary: &std::path::Path, settings: &Settings) -> Figure {
    let envd = exec::envd_ready_times(binary, settings.ready_samples);
    let sshd = exec::sshd_ready_times(settings.ready_samples);
    Figure::new("ready", "exec → ready (envd: /health 204; sshd: banner)", Unit::Time)
        .with(Side::Envd, Measure::latencies(envd, format!("{} starts", settings.ready_samples)))
        .with(Side::OpenSsh, Measure::latencies(sshd, format!("{} starts of sshd -D", settings.ready_samples)))
}

fn footprint(binary: &std::path::Path, envd: &Envd, ssh: &OpenSsh) -> Vec<Figure> {
    let binary = binary.display().to_string();
    let ssh_size = machine::file_mib(openssh::SSHD) + machine::file_mib(openssh::SFTP_SERVER);
    vec![
        Figure::new("idle_rss", "RSS idle", Unit::Mib)
            .with(Side::Envd, Measure::once(machine::rss_mib(envd.pid()), "VmRSS after one command"))
            .with(
                Side::OpenSsh,
                Measure::once(
                    ssh.daemon_rss_mib(),
                    "VmRSS of every sshd process: listener and the master's connection",
                ),
            ),
        Figure::new("binary_size", "binary size", Unit::Mib)
            .with(Side::Envd, Measure::once(machine::file_mib(&binary), "stripped release binary (links libc only)"))
            .with(
                Side::OpenSsh,
                Measure::once(
                    ssh_size,
                    "sshd + sftp-server (Debian; libcrypto and others are shared libraries besides)",
                ),
            ),
    ]
}

/// envd's resident memory once the bursts are over: what a day of
/// commands leaves behind.
fn idle_after_bursts(envd: &Envd) -> Figure {
    // Past envd's check for memory to give back (every 2 s).
    std::thread::sleep(crate::CHECK_EVERY + Duration::from_secs(1));
    let how = format!("VmRSS {} s after the last burst", (crate::CHECK_EVERY + Duration::from_secs(1)).as_secs());
    Figure::new("idle_rss_after_bursts", "RSS idle after the bursts", Unit::Mib)
        .with(Side::Envd, Measure::once(machine::rss_mib(envd.pid()), how))
}

fn round_trips(
    runtime: &tokio::runtime::Runtime,
    envd: &Envd,
    client: &Client,
    ssh: &OpenSsh,
    s: &Settings,
) -> Vec<Figure> {
    let (warmup, rounds) = (s.warmup, s.rounds);
    let ssh_rounds = rounds.min(if s.quick { 10 } else { 300 });
    let (json, json_peak) =
        with_peak(envd, || runtime.block_on(exec::envd_round_trips(client, Wire::Json, warmup, rounds)));
    let (proto, proto_peak) =
        with_peak(envd, || runtime.block_on(exec::envd_round_trips(client, Wire::Proto, warmup, rounds)));
    // One measurement of the raw baseline serves both figures.
    let raw = exec::raw_round_trips(warmup, rounds);
    let mut exec_true = Figure::new("exec_true", "exec round trip of `true`", Unit::Time)
        .with(Side::Envd, Measure::latencies(json, format!("Start→end event, kept-alive connection, {rounds} runs")))
        .with(Side::EnvdProto, Measure::latencies(proto, format!("the same in binary protobuf, {rounds} runs")))
        .with(
            Side::OpenSsh,
            Measure::latencies(
                exec::ssh_round_trips(ssh, false, 5, ssh_rounds),
                format!("`ssh host true` on the master, {ssh_rounds} runs"),
            ),
        )
        .with(Side::Raw, Measure::latencies(raw.clone(), format!("posix_spawn + waitpid, {rounds} runs")));
    exec_true.envd_peak_rss = Some(json_peak.max(proto_peak));
    let fresh = s.fresh_rounds;
    let (envd_fresh, fresh_peak) =
        with_peak(envd, || runtime.block_on(exec::envd_fresh_round_trips(envd, BENCH_USER, fresh)));
    let mut exec_fresh = Figure::new("exec_true_fresh", "exec round trip of `true`, new connection each", Unit::Time)
        .with(Side::Envd, Measure::latencies(envd_fresh, format!("new TCP connection + Start, {fresh} runs")))
        .with(
            Side::OpenSsh,
            Measure::latencies(
                exec::ssh_round_trips(ssh, true, 0, fresh),
                format!("`ssh host true` with ControlPath=none (key exchange, auth), {fresh} runs"),
            ),
        )
        .with(Side::Raw, Measure::latencies(raw, "posix_spawn + waitpid"));
    exec_fresh.envd_peak_rss = Some(fresh_peak);
    vec![exec_true, exec_fresh]
}

fn streams(
    runtime: &tokio::runtime::Runtime,
    envd: &Envd,
    client: &Client,
    ssh: &OpenSsh,
    s: &Settings,
) -> Vec<Figure> {
    let big = s.big;
    let (json, json_peak) = with_peak(envd, || runtime.block_on(stream::envd_stdout(client, Wire::Json, big)));
    let (proto, proto_peak) = with_peak(envd, || runtime.block_on(stream::envd_stdout(client, Wire::Proto, big)));
    let mut stdout = Figure::new("stdout", format!("stdout of a command printing {}", s.size_name()), Unit::Rate)
        .with(Side::Envd, Measure::rate(big, json, "Start stream, base64 in JSON, decoded"))
        .with(Side::EnvdProto, Measure::rate(big, proto, "Start stream, binary protobuf"))
        .with(
            Side::OpenSsh,
            Measure::rate(big, stream::ssh_stdout(ssh, big), "`ssh host head -c …` on the master, default cipher"),
        )
        .with(Side::Raw, Measure::rate(big, stream::raw_stdout(big), "read from a pipe, 64 KiB reads"));
    stdout.envd_peak_rss = Some(json_peak.max(proto_peak));
    let rounds = s.pty_rounds;
    let (echo, echo_peak) = with_peak(envd, || runtime.block_on(stream::envd_pty_echo(client, 10, rounds)));
    let mut pty = Figure::new("pty_echo", "PTY keystroke echo round trip", Unit::Time)
        .with(
            Side::Envd,
            Measure::latencies(echo, format!("SendInput (JSON) to `cat` on a PTY until the echo, {rounds} keys")),
        )
        .with(
            Side::OpenSsh,
            Measure::latencies(
                stream::ssh_pty_echo(ssh, 10, rounds),
                format!("`ssh -tt host cat` on the master, {rounds} keys"),
            ),
        )
        .with(
            Side::Raw,
            Measure::latencies(
                stream::raw_pty_echo(10, rounds),
                format!("openpty + `cat`, write to the master until the echo, {rounds} keys"),
            ),
        );
    pty.envd_peak_rss = Some(echo_peak);
    vec![stdout, pty]
}

/// The transfers' scratch dir, writable by the bench user (envd and sshd
/// write uploads as that user); needs twice the transfer size free.
fn scratch_dir() -> PathBuf {
    let base = std::env::var_os("ENVD_BENCH_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
    let dir = base.join(format!("envd-bench-files-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("the bench's scratch dir");
    let chown = std::process::Command::new("chown").arg(BENCH_USER).arg(&dir).status();
    assert!(chown.is_ok_and(|s| s.success()), "chown of the scratch dir");
    dir
}

fn file_figures(
    runtime: &tokio::runtime::Runtime,
    envd: &Envd,
    client: &Client,
    ssh: &OpenSsh,
    s: &Settings,
) -> Vec<Figure> {
    let dir = scratch_dir();
    let (source, target) = (dir.join("source.bin"), dir.join("target.bin"));
    files::write_pseudo_random(&source, s.big);
    let once = |took: Duration| {
        let _ = std::fs::remove_file(&target);
        took
    };
    let raw_copy = || Measure::rate(s.big, once(files::raw_copy(&source, &target)), "std::fs::copy (copy_file_range)");
    let durable_copy = Measure::rate(
        s.big,
        once(files::raw_durable_copy(&source, &target)),
        "std::fs::copy to a temporary + fsync + rename + directory fsync (the work of a durable upload)",
    );
    let (multipart, up_peak) =
        with_peak(envd, || once(files::envd_upload_multipart(envd, BENCH_USER, &source, &target)));
    let octet = once(files::envd_upload_octet(envd, BENCH_USER, &source, &target));
    let mut upload = Figure::new("upload", format!("upload of {}", s.size_name()), Unit::Rate)
        .with(Side::Envd, Measure::rate(s.big, multipart, "POST /files, multipart/form-data as the SDKs send it"))
        .with(
            Side::EnvdProto,
            Measure::rate(s.big, octet, "POST /files, application/octet-stream body (no protobuf on /files)"),
        )
        .with(
            Side::OpenSsh,
            Measure::rate(s.big, once(files::sftp_upload(ssh, &source, &target)), "`sftp put` on the master"),
        )
        .with(Side::Raw, durable_copy);
    upload.envd_peak_rss = Some(up_peak);
    let (get, down_peak) = with_peak(envd, || once(runtime.block_on(files::envd_download(client, &source, &target))));
    let mut download = Figure::new("download", format!("download of {}", s.size_name()), Unit::Rate)
        .with(Side::Envd, Measure::rate(s.big, get, "GET /files into a local file"))
        .with(
            Side::OpenSsh,
            Measure::rate(s.big, once(files::sftp_download(ssh, &source, &target)), "`sftp get` on the master"),
        )
        .with(Side::Raw, raw_copy());
    download.envd_peak_rss = Some(down_peak);
    let list_dir = dir.join("list");
    std::fs::create_dir_all(&list_dir).expect("the listed dir");
    for i in 0..s.list_entries {
        std::fs::write(list_dir.join(format!("entry-{i:04}")), b"x").expect("a listed entry");
    }
    let stat = fs_figure(runtime, envd, client, ssh, s, (&source, false));
    let list = fs_figure(runtime, envd, client, ssh, s, (&list_dir, true));
    let _ = std::fs::remove_dir_all(&dir);
    vec![upload, download, stat, list]
}

fn fs_figure(
    runtime: &tokio::runtime::Runtime,
    envd: &Envd,
    client: &Client,
    ssh: &OpenSsh,
    s: &Settings,
    (path, list): (&std::path::Path, bool),
) -> Figure {
    let (rounds, entries) = (s.fs_rounds, s.list_entries);
    let rounds = if list { rounds / 10 } else { rounds }.max(3);
    let (json, json_peak) =
        with_peak(envd, || runtime.block_on(files::envd_fs_latency(client, Wire::Json, path, list, rounds)));
    let (proto, proto_peak) =
        with_peak(envd, || runtime.block_on(files::envd_fs_latency(client, Wire::Proto, path, list, rounds)));
    let (id, title, rpc) = if list {
        ("list_dir", format!("listing a directory of {entries} entries"), "ListDir depth 1")
    } else {
        ("stat", "Stat of one file".to_owned(), "Stat")
    };
    let mut figure = Figure::new(id, title, Unit::Time)
        .with(Side::Envd, Measure::latencies(json, format!("{rpc}, unary JSON, {rounds} calls")))
        .with(Side::EnvdProto, Measure::latencies(proto, format!("{rpc}, unary binary protobuf, {rounds} calls")))
        .with(
            Side::OpenSsh,
            Measure::latencies(
                files::sftp_fs_latency(ssh, path, list, entries, rounds),
                format!(
                    "SFTP {} requests on the master, {rounds} times",
                    if list { "OPENDIR/READDIR…/CLOSE" } else { "STAT" }
                ),
            ),
        )
        .with(Side::Raw, fs_floor(runtime, path, list, entries, rounds));
    figure.envd_peak_rss = Some(json_peak.max(proto_peak));
    figure
}

/// What a call cannot go under: for ListDir the listing itself, for Stat
/// (one syscall) the HTTP round trip that carries it.
fn fs_floor(
    runtime: &tokio::runtime::Runtime,
    path: &std::path::Path,
    list: bool,
    entries: usize,
    rounds: usize,
) -> Measure {
    if list {
        return Measure::latencies(files::raw_fs_latency(path, list, entries, rounds), "readdir + lstat of each entry");
    }
    let bare = bare_http::BareHttp::start();
    let client = Client::for_port(bare.port);
    let path = path.display().to_string();
    runtime.block_on(bare_http::round_trips(&client, &path, 10));
    Measure::latencies(
        runtime.block_on(bare_http::round_trips(&client, &path, rounds)),
        format!("a bare keep-alive HTTP/1.1 round trip (hyper, empty 200) of a Stat-sized POST, {rounds} calls"),
    )
}

fn bursts(runtime: &tokio::runtime::Runtime, envd: &Envd, ssh: &OpenSsh, s: &Settings) -> Vec<Figure> {
    let mut figures = Vec::new();
    for (id, rss_id, count) in
        [("burst_small", "burst_small_rss", s.bursts[0]), ("burst_large", "burst_large_rss", s.bursts[1])]
    {
        // A client of its own: its pool of `count` connections closes with it.
        let client = envd.client().with_user(BENCH_USER);
        let (took, peak) = with_peak(envd, || runtime.block_on(exec::envd_burst(&client, count)));
        drop(client);
        // The pool's connections close in tasks of this runtime: give them
        // their turn, or envd keeps serving them, idle, for the rest of the run.
        runtime.block_on(async { tokio::time::sleep(Duration::from_millis(300)).await });
        let sampler = machine::PeakSampler::start(ssh.sshd_pid(), "sshd");
        let ssh_took = exec::ssh_burst(ssh, count);
        let ssh_peak = sampler.finish();
        let mut total = Figure::new(id, format!("{count} concurrent `true`, total time"), Unit::Time)
            .with(Side::Envd, Measure::once(took.as_secs_f64(), "Start calls at once, one HTTP/1.1 connection each"))
            .with(
                Side::OpenSsh,
                Measure::once(ssh_took.as_secs_f64(), "`ssh host true` processes at once, channels on the master"),
            )
            .with(
                Side::Raw,
                Measure::once(exec::raw_burst(count).as_secs_f64(), "posix_spawn each, then waitpid each"),
            );
        total.envd_peak_rss = Some(peak);
        figures.push(total);
        figures.push(
            Figure::new(rss_id, format!("peak RSS during {count} concurrent `true`"), Unit::Mib)
                .with(Side::Envd, Measure::once(peak, "VmHWM"))
                .with(Side::OpenSsh, Measure::once(ssh_peak, "sum of VmRSS over sshd processes, sampled every 5 ms")),
        );
    }
    figures
}

fn finish(figures: &[Figure], machine: &figure::Machine, settings: &Settings) {
    let mut table = report::table(figures, machine);
    table.push('\n');
    table.push_str(&report::growth(
        figures,
        "burst_small",
        "burst_large",
        (settings.bursts[1] / settings.bursts[0]) as f64,
    ));
    table.push_str(&report::growth(
        figures,
        "burst_small_rss",
        "burst_large_rss",
        (settings.bursts[1] / settings.bursts[0]) as f64,
    ));
    println!("\n{table}");
    std::fs::create_dir_all(&settings.out).expect("the output dir");
    let json = report::json(figures, machine, settings.quick);
    let pretty = serde_json::to_string_pretty(&json).expect("JSON");
    for (name, text) in [("bench.md", table), ("bench.json", pretty), ("bench.svg", chart::svg(figures, machine))] {
        let path = settings.out.join(name);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        println!("wrote {}", path.display());
    }
    let mut wanted = expected();
    if !settings.only.is_empty() {
        // Only the figures of the groups asked for are expected.
        wanted.retain(|(id, _)| figures.iter().any(|f| f.id == *id));
    }
    let problems = report::check(figures, &wanted);
    if !problems.is_empty() {
        eprintln!("figures missing or not finite:\n  {}", problems.join("\n  "));
        std::process::exit(1);
    }
}

/// Every figure a run must produce, with the sides each must have.
fn expected() -> Vec<(&'static str, &'static [Side])> {
    const ALL: &[Side] = &[Side::Envd, Side::EnvdProto, Side::OpenSsh, Side::Raw];
    const NO_PROTO: &[Side] = &[Side::Envd, Side::OpenSsh, Side::Raw];
    const VERSUS_SSH: &[Side] = &[Side::Envd, Side::OpenSsh];
    vec![
        ("ready", VERSUS_SSH),
        ("idle_rss", VERSUS_SSH),
        ("binary_size", VERSUS_SSH),
        ("exec_true", ALL),
        ("exec_true_fresh", NO_PROTO),
        ("stdout", ALL),
        ("pty_echo", NO_PROTO),
        ("upload", ALL),
        ("download", NO_PROTO),
        ("stat", ALL),
        ("list_dir", ALL),
        ("burst_small", NO_PROTO),
        ("burst_large", NO_PROTO),
        ("burst_small_rss", VERSUS_SSH),
        ("burst_large_rss", VERSUS_SSH),
        ("idle_rss_after_bursts", &[Side::Envd]),
    ]
}
