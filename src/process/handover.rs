//! The processes' part of a live upgrade: the outgoing image exports every
//! running process and recently ended one ([`ProcessesPart`]); the
//! incoming image adopts each running one, its pid and its fds, so it is
//! listed, connectable, killable and reaped as if started there, with the
//! output written meanwhile kept for its first subscriber.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::record::ProcessRecord;
use super::table::{Ended, ProcessTable};
use super::tree::ProcessTree;
use super::waiter::Waiter;
use super::{Entry, Fds, ProcessError, ProcessHandle, fanout, register, supervise};
use crate::host::command_cgroup::CommandCgroup;
use crate::record::{CarriedFds, Carry, NamesFds};

/// All adopted processes together keep at most this much output for
/// their first subscribers.
const ADOPTED_OUTPUT_BUDGET: usize = 64 << 20;

/// The processes as the handover names them (its `processes` and `ended`
/// sections).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessesPart {
    /// Running processes.
    #[serde(default)]
    pub processes: Vec<ProcessRecord>,
    /// Recently ended processes, for a late `Connect`.
    #[serde(default)]
    pub ended: Vec<Ended>,
}

impl ProcessesPart {
    /// Each running process's requested env vars, by pid: they are not
    /// serialised with the part (see [`super::CommandConfig::envs`]).
    pub fn envs(&self) -> BTreeMap<u32, BTreeMap<String, String>> {
        self.processes.iter().map(|p| (p.pid, p.command.envs.clone())).collect()
    }

    /// Gives each running process back the env vars [`Self::envs`] took.
    pub fn set_envs(&mut self, mut envs: BTreeMap<u32, BTreeMap<String, String>>) {
        for process in &mut self.processes {
            process.command.envs = envs.remove(&process.pid).unwrap_or_default();
        }
    }
}

impl NamesFds for ProcessesPart {
    fn fds_mut(&mut self) -> Vec<&mut std::os::fd::RawFd> {
        self.processes.fds_mut()
    }
}

/// What [`ProcessTable::resume`] took over.
#[derive(Debug, Default)]
pub struct Resumed {
    /// The adopted processes.
    pub adopted: Vec<Arc<ProcessHandle>>,
    /// Running processes that could not be adopted.
    pub failed: usize,
    /// End events kept again.
    pub retained: usize,
}

impl ProcessTable {
    /// Every process as the next image takes it over, its fds passed
    /// through `carry`; consistent while the table is paused.
    pub fn export(&self, carry: &mut Carry) -> std::io::Result<ProcessesPart> {
        let now = Instant::now();
        let mut processes: Vec<ProcessRecord> = self.list().iter().map(|h| h.record(now)).collect();
        for fd in processes.fds_mut() {
            *fd = carry(*fd)?;
        }
        Ok(ProcessesPart { processes, ended: self.ended() })
    }

    /// Adopts the processes of an earlier image, their fds taken from
    /// `fds`, and keeps its end events.
    pub fn resume(self: &Arc<Self>, part: ProcessesPart, fds: &mut CarriedFds) -> Resumed {
        let keep_output = output_kept_per_process(part.processes.len());
        let mut resumed = Resumed { retained: part.ended.len(), ..Default::default() };
        for record in part.processes {
            let pid = record.pid;
            let owned = Fds {
                stdout: fds.take_named(record.stdout_fd),
                stderr: fds.take_named(record.stderr_fd),
                stdin: fds.take_named(record.stdin_fd),
                pty: fds.take_named(record.pty_fd),
            };
            match adopt(self, record, owned, keep_output) {
                Ok(handle) => resumed.adopted.push(handle),
                Err(err) => {
                    tracing::warn!(pid, "process not adopted: {err}");
                    resumed.failed += 1;
                }
            }
        }
        self.restore_ended(part.ended);
        resumed
    }
}

/// What each of `adopted` processes keeps for its first subscriber: a
/// share of a bound on all of them, so many adopted processes cannot make
/// envd hold more than that.
fn output_kept_per_process(adopted: usize) -> usize {
    (ADOPTED_OUTPUT_BUDGET / adopted.max(1)).min(fanout::BACKLOG_BYTES)
}

/// Takes over a running child: it is listed, connectable, killable (its
/// own cgroup included) and reaped as if started here, and its output
/// waits for the first subscriber. Returns its handle.
fn adopt(
    table: &Arc<ProcessTable>,
    record: ProcessRecord,
    fds: Fds,
    keep_output: usize,
) -> Result<Arc<ProcessHandle>, ProcessError> {
    // Every field is named, so one added to the record is taken over or
    // said here why not.
    let ProcessRecord {
        pid,
        tag,
        command,
        // Taken from the carried fds by the caller.
        stdout_fd: _,
        stderr_fd: _,
        stdin_fd: _,
        pty_fd: _,
        deadline_ms,
        reaped,
        cgroup,
    } = record;
    let waiter = match reaped.clone() {
        Some(end) => Waiter::Reaped(end),
        None => Waiter::pidfd(pid).map_err(ProcessError::Io)?,
    };
    let alive = reaped.is_none();
    let tree = match cgroup.map(|dir| CommandCgroup::reopen(&dir).map_err(|err| (dir, err))) {
        Some(Ok(cgroup)) => ProcessTree::Cgroup(Arc::new(cgroup)),
        Some(Err((dir, err))) => {
            tracing::warn!(pid, cgroup = %dir.display(), "its cgroup is not reachable, kill walks /proc: {err}");
            ProcessTree::Walk
        }
        None => ProcessTree::Walk,
    };
    let deadline = deadline_ms.map(|ms| Instant::now() + Duration::from_millis(ms));
    let entry = Entry { pid, tag, config: command, fds, tree, deadline, reaped };
    let (handle, readers, _) = register(table, entry, Some(keep_output))?;
    if alive {
        // Its own waiter reaps it, never the orphan reaper (which starts
        // only after every adoption).
        table.children().spawning().register(handle.pid());
    }
    tokio::spawn(supervise(table.clone(), handle.clone(), waiter, readers, deadline));
    Ok(handle)
}

/// Processes to take over, for the round-trip tests of the modules that
/// track them.
#[cfg(test)]
pub(crate) mod testing {
    use std::time::{Duration, Instant};

    use super::super::spawn::StdioMode;
    use super::super::{CommandConfig, StartSpec};
    use crate::host::cgroups::Placement;

    /// A start as the user running the tests, with every field of the
    /// command set (tag, args, env vars, cwd, deadline).
    pub(crate) fn started_as_me(cmd: &str, args: &[&str], tag: &str, stdio: StdioMode) -> StartSpec {
        let me = nix::unistd::User::from_uid(nix::unistd::getuid()).unwrap().unwrap();
        StartSpec {
            config: CommandConfig {
                cmd: cmd.into(),
                args: args.iter().map(|a| (*a).to_owned()).collect(),
                envs: [("HANDOVER_SECRET".to_owned(), format!("value-of-{tag}"))].into(),
                cwd: Some("/tmp".into()),
            },
            tag: Some(tag.into()),
            user: crate::context::users::lookup(&me.name).unwrap(),
            cwd: "/tmp".into(),
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            stdio,
            deadline: Some(Instant::now() + Duration::from_secs(60)),
            placement: Placement::Outside,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::spawn::StdioMode;
    use super::super::{Event, start};
    use super::testing::started_as_me;
    use super::*;
    use crate::record::carry_into;
    use crate::record::fds::testing::claimed;

    /// Fd numbers differ between two exports and the deadline moves on;
    /// everything else must be equal.
    fn comparable(mut part: ProcessesPart) -> ProcessesPart {
        part.processes.sort_by_key(|p| p.pid);
        for process in &mut part.processes {
            for fd in process.fds_mut() {
                *fd = 0;
            }
            process.deadline_ms = process.deadline_ms.map(|ms| ms.div_ceil(10_000));
        }
        for ended in &mut part.ended {
            ended.age = Duration::ZERO;
        }
        part
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_field_of_a_process_survives_export_serialise_and_resume() {
        let table = Arc::new(ProcessTable::default());
        let piped = start(&table, started_as_me("sleep", &["30"], "piped", StdioMode::Pipes { stdin: true })).await;
        let pty = start(&table, started_as_me("sleep", &["31"], "pty", StdioMode::Pty { cols: 80, rows: 24 })).await;
        let mut short =
            start(&table, started_as_me("true", &[], "short", StdioMode::Pipes { stdin: false })).await.unwrap();
        while let Some(event) = short.events.recv().await {
            if matches!(event, Event::End(_)) {
                break;
            }
        }
        let (piped, pty) = (piped.unwrap(), pty.unwrap());
        while table.ended().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        let mut carried = Vec::new();
        let part = table.export(&mut |fd| carry_into(fd, &mut carried)).unwrap();
        assert_eq!(part.processes.len(), 2);
        assert!(part.processes.iter().all(|p| p.tag.is_some() && p.command.cwd.is_some() && p.deadline_ms.is_some()));
        assert!(part.processes.iter().any(|p| p.stdin_fd.is_some() && p.stdout_fd.is_some() && p.stderr_fd.is_some()));
        assert!(part.processes.iter().any(|p| p.pty_fd.is_some()));
        assert_eq!(part.ended.len(), 1);

        let mut part = part;
        for ended in &mut part.ended {
            // Written down in whole milliseconds.
            ended.age = Duration::from_millis(ended.age.as_millis() as u64);
        }
        let json = serde_json::to_string(&part).unwrap();
        assert!(!json.contains("value-of-"), "env values stay out of the serialised part: {json}");
        let mut read_back: ProcessesPart = serde_json::from_str(&json).unwrap();
        read_back.set_envs(part.envs());
        assert_eq!(read_back, part, "serialising loses nothing");

        let mut fds = claimed(carried);
        let next = Arc::new(ProcessTable::default());
        let resumed = next.resume(read_back, &mut fds);
        assert_eq!((resumed.adopted.len(), resumed.failed, resumed.retained), (2, 0, 1));
        let again = next.export(&mut |fd| Ok(fd)).unwrap();
        assert_eq!(comparable(again), comparable(part), "resuming loses nothing");

        for handle in [&piped.handle, &pty.handle] {
            // SAFETY: kill(2) of a child that is not reaped yet.
            unsafe { libc::kill(handle.pid() as libc::pid_t, libc::SIGKILL) };
        }
    }

    #[test]
    fn adopted_processes_share_one_bound_on_kept_output() {
        assert_eq!(output_kept_per_process(1), fanout::BACKLOG_BYTES);
        assert_eq!(output_kept_per_process(0), fanout::BACKLOG_BYTES);
        for count in [64, 100, 1_000, 100_000] {
            assert!(output_kept_per_process(count) * count <= ADOPTED_OUTPUT_BUDGET, "{count}");
        }
        assert_eq!(output_kept_per_process(100), ADOPTED_OUTPUT_BUDGET / 100);
    }
}
