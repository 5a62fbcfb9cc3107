"""`sandbox.commands` of the sync e2b 2.63 SDK against the real envd.

Every test drives the published client; the expectations come from
CONTRACT.md sections 3.2-3.9 (Process service) and 1.10 (timeouts).
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
import uuid

import pytest
from e2b import (
    AuthenticationException,
    CommandExitException,
    InvalidArgumentException,
    NotFoundException,
    SandboxException,
    TimeoutException,
)

from envd_harness import pids_with_cmdline, proc_alive, wait_until


def marker() -> str:
    return "m" + uuid.uuid4().hex[:12]


# -- foreground run: output and exit status ---------------------------------


def test_stdout(sandbox):
    res = sandbox.commands.run("echo hello")
    assert res.stdout == "hello\n"
    assert res.stderr == ""
    assert res.exit_code == 0
    assert res.error is None


def test_stderr_and_stdout_are_separate(sandbox):
    res = sandbox.commands.run("echo to-out; echo to-err >&2")
    assert res.stdout == "to-out\n"
    assert res.stderr == "to-err\n"
    assert res.exit_code == 0


def test_nonzero_exit_raises_with_output(sandbox):
    with pytest.raises(CommandExitException) as info:
        sandbox.commands.run("echo partial; echo oops >&2; exit 7")
    e = info.value
    assert e.exit_code == 7
    assert e.stdout == "partial\n"
    assert e.stderr == "oops\n"
    assert e.error == "exit status 7"


@pytest.mark.parametrize("code", [1, 2, 42, 255])
def test_exit_codes(sandbox, code):
    with pytest.raises(CommandExitException) as info:
        sandbox.commands.run(f"exit {code}")
    assert info.value.exit_code == code
    assert info.value.error == f"exit status {code}"


def test_missing_command_exits_127(sandbox):
    name = "no-such-command-" + marker()
    with pytest.raises(CommandExitException) as info:
        sandbox.commands.run(name)
    assert info.value.exit_code == 127
    assert name in info.value.stderr
    assert "not found" in info.value.stderr


def test_multiline_output_is_exact(sandbox):
    res = sandbox.commands.run("seq 1 20000")
    assert res.stdout == "".join(f"{i}\n" for i in range(1, 20001))


def test_on_stdout_and_on_stderr_callbacks(sandbox):
    out, err = [], []
    res = sandbox.commands.run(
        "for i in 1 2 3; do echo o$i; echo e$i >&2; sleep 0.05; done",
        on_stdout=out.append,
        on_stderr=err.append,
    )
    assert "".join(out) == "o1\no2\no3\n" == res.stdout
    assert "".join(err) == "e1\ne2\ne3\n" == res.stderr


def test_output_arrives_while_running(sandbox):
    """Data events are flushed as produced, not held until the end."""
    seen = []
    first_at = []
    start = time.monotonic()

    def on_stdout(chunk):
        if not first_at:
            first_at.append(time.monotonic() - start)
        seen.append(chunk)

    sandbox.commands.run("echo early; sleep 2; echo late", on_stdout=on_stdout)
    assert "".join(seen) == "early\nlate\n"
    assert first_at[0] < 1.5, f"first output took {first_at[0]:.2f}s: stream not flushed per event"


def test_broken_utf8_does_not_crash(sandbox):
    res = sandbox.commands.run(r"printf '\xff\xfe'; echo; printf 'ok\n'; printf '\xc3' >&2")
    assert res.stdout == "\ufffd\ufffd\nok\n"
    assert res.stderr == "\ufffd"


def test_utf8_split_across_events(sandbox):
    # The euro sign's bytes arrive in two data events; envd must pass raw
    # bytes through and the SDK decodes incrementally.
    res = sandbox.commands.run(r"printf '\xe2\x82'; sleep 0.3; printf '\xac\n'")
    assert res.stdout == "\u20ac\n"


def test_multibyte_text_bulk_is_exact(sandbox):
    # 3.2 MB of 1-4 byte characters: 32 KiB read boundaries split characters.
    line = "€ü漢字🙂 abc\n"
    res = sandbox.commands.run(f"yes '{line[:-1]}' | head -n 200000")
    assert res.stdout == line * 200000


def test_empty_output(sandbox):
    res = sandbox.commands.run("true")
    assert res.stdout == "" and res.stderr == "" and res.exit_code == 0


# -- environment, cwd, user --------------------------------------------------


def test_envs_reach_the_process(sandbox):
    res = sandbox.commands.run(
        'printf "%s|%s|%s" "$FOO" "$WITH_SPACE" "$EMPTY_IS_SET${EMPTY_IS_SET+set}"',
        envs={"FOO": "bar", "WITH_SPACE": "a b  c", "EMPTY_IS_SET": ""},
    )
    assert res.stdout == "bar|a b  c|set"


def test_request_envs_override_home_and_user(sandbox):
    res = sandbox.commands.run('echo "$USER $HOME"', envs={"USER": "x", "HOME": "/y"})
    assert res.stdout == "x /y\n"


def test_envd_environment_is_not_leaked(sandbox):
    # Only PATH/HOME/USER/LOGNAME, default env vars and request envs are set
    # by envd (3.2); the test runner's own variables must not reach the child.
    res = sandbox.commands.run("env")
    names = {line.split("=", 1)[0] for line in res.stdout.splitlines() if "=" in line}
    assert "E2B_DEBUG" not in names
    assert "PYTEST_CURRENT_TEST" not in names
    for required in ("PATH", "HOME", "USER", "LOGNAME"):
        assert required in names


def test_e2b_sandbox_env_in_dev_mode(sandbox):
    # Internal default env var (5.3): "false" outside Firecracker (--dev).
    assert sandbox.commands.run('echo "$E2B_SANDBOX"').stdout == "false\n"


def test_end_waits_for_grandchild_holding_stdout(sandbox):
    # Reference behaviour (3.2): the end event follows EOF on the pipes, so
    # output of a backgrounded grandchild is still delivered.
    start = time.monotonic()
    res = sandbox.commands.run("(sleep 1.5; echo late) & echo early")
    assert res.stdout == "early\nlate\n"
    assert time.monotonic() - start >= 1.4


def test_cwd(sandbox):
    assert sandbox.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert sandbox.commands.run("pwd", cwd="/").stdout == "/\n"


def test_default_cwd_is_home_of_default_user(sandbox, test_user):
    assert sandbox.commands.run("pwd").stdout == test_user.pw_dir + "\n"


def test_relative_and_tilde_cwd_resolve_against_home(sandbox, test_user):
    sub = "sub-" + marker()
    sandbox.commands.run(f"mkdir -p {sub}/dir")
    try:
        assert sandbox.commands.run("pwd", cwd=f"{sub}/dir").stdout == f"{test_user.pw_dir}/{sub}/dir\n"
        assert sandbox.commands.run("pwd", cwd=f"~/{sub}").stdout == f"{test_user.pw_dir}/{sub}\n"
    finally:
        sandbox.commands.run(f"rm -rf {sub}")
    assert sandbox.commands.run("pwd", cwd="~", user="root").stdout == "/root\n"


def test_nonexistent_cwd_is_invalid_argument(sandbox):
    with pytest.raises(InvalidArgumentException) as info:
        sandbox.commands.run("pwd", cwd="/nonexistent-" + marker())
    assert "does not exist" in str(info.value)


def test_default_user(sandbox, test_user):
    res = sandbox.commands.run('whoami; id -u; id -g; echo "$HOME"; echo "$USER"; echo "$LOGNAME"')
    assert res.stdout.splitlines() == [
        test_user.pw_name,
        str(test_user.pw_uid),
        str(test_user.pw_gid),
        test_user.pw_dir,
        test_user.pw_name,
        test_user.pw_name,
    ]


def test_user_root(sandbox):
    res = sandbox.commands.run('whoami; id -u; echo "$HOME"', user="root")
    assert res.stdout.splitlines() == ["root", "0", "/root"]


def test_explicit_default_user_name(sandbox, test_user):
    res = sandbox.commands.run("whoami", user=test_user.pw_name)
    assert res.stdout == test_user.pw_name + "\n"


def test_unknown_user_is_authentication_error(sandbox):
    with pytest.raises(AuthenticationException):
        sandbox.commands.run("true", user="no-such-user-" + marker()[:8])


def test_files_created_by_command_belong_to_user(sandbox, test_user):
    path = f"/tmp/owned-{marker()}"
    try:
        res = sandbox.commands.run(f"touch {path} && stat -c '%u:%g' {path}")
        assert res.stdout == f"{test_user.pw_uid}:{test_user.pw_gid}\n"
    finally:
        sandbox.commands.run(f"rm -f {path}", user="root")


def test_stdin_is_closed_by_default(sandbox):
    # The SDK sends "stdin": false: `cat` must see EOF at once, not hang.
    res = sandbox.commands.run("cat; echo done", timeout=10)
    assert res.stdout == "done\n"


# -- timeouts ----------------------------------------------------------------


def test_timeout_kills_foreground_command(sandbox):
    arg = f"30.{uuid.uuid4().int % 10**9:09d}"  # unique argv to find it in /proc
    start = time.monotonic()
    with pytest.raises(TimeoutException):
        sandbox.commands.run(f"exec sleep {arg}", timeout=2)
    elapsed = time.monotonic() - start
    assert elapsed < 10, f"timeout=2 took {elapsed:.1f}s"
    # Connect-Timeout-Ms is the process lifetime (1.10): envd kills it.
    assert wait_until(lambda: not pids_with_cmdline(arg), timeout=5), "process survived its timeout"
    assert not [p for p in sandbox.commands.list() if arg in " ".join(p.args)]


def test_timeout_kills_background_command(sandbox):
    arg = f"30.{uuid.uuid4().int % 10**9:09d}"
    handle = sandbox.commands.run(f"exec sleep {arg}", background=True, timeout=2)
    pid = handle.pid
    assert proc_alive(pid)
    assert any(p.pid == pid for p in sandbox.commands.list())
    start = time.monotonic()
    with pytest.raises((TimeoutException, CommandExitException)):
        handle.wait()
    assert time.monotonic() - start < 10
    assert wait_until(lambda: not proc_alive(pid), timeout=5), "process survived its timeout"
    assert wait_until(lambda: all(p.pid != pid for p in sandbox.commands.list()), timeout=5)


def test_timeout_zero_means_no_limit(sandbox):
    res = sandbox.commands.run("sleep 1.5; echo fine", timeout=0)
    assert res.stdout == "fine\n"


# -- background commands, connect, list, kill ----------------------------------


def test_background_then_connect_from_second_handle(envd, sandbox):
    handle = sandbox.commands.run(
        "sleep 1; for i in 1 2 3 4 5; do echo tick $i; sleep 0.3; done",
        background=True,
    )
    other = envd.sandbox()
    joined = other.commands.connect(handle.pid)
    assert joined.pid == handle.pid
    res = joined.wait()
    assert res.exit_code == 0
    # Connect gets live output only (no replay), but it attached before the
    # first tick, so it sees all of them.
    assert res.stdout == "".join(f"tick {i}\n" for i in range(1, 6))
    # The original stream got everything too (fan-out to every subscriber).
    assert handle.wait().stdout == res.stdout


def test_list_shows_background_command(sandbox):
    m = marker()
    handle = sandbox.commands.run(
        f"exec sleep 30 # {m}", background=True, envs={"LIST_VAR": m}, cwd="/tmp"
    )
    try:
        procs = {p.pid: p for p in sandbox.commands.list()}
        assert handle.pid in procs
        info = procs[handle.pid]
        assert info.cmd == "/bin/bash"
        assert info.args == ["-l", "-c", f"exec sleep 30 # {m}"]
        assert info.envs == {"LIST_VAR": m}
        assert info.cwd == "/tmp"
        assert info.tag is None
    finally:
        handle.kill()


def test_list_cwd_is_none_when_not_sent(sandbox):
    handle = sandbox.commands.run("exec sleep 30", background=True)
    try:
        info = next(p for p in sandbox.commands.list() if p.pid == handle.pid)
        assert info.cwd is None
        assert info.envs == {}
    finally:
        handle.kill()


def test_kill_returns_true_then_false(sandbox):
    handle = sandbox.commands.run("exec sleep 60", background=True)
    pid = handle.pid
    assert sandbox.commands.kill(pid) is True
    with pytest.raises(CommandExitException) as info:
        handle.wait()
    assert info.value.exit_code == -1
    assert info.value.error == "signal: killed"
    assert wait_until(lambda: not proc_alive(pid), timeout=5)
    assert wait_until(lambda: all(p.pid != pid for p in sandbox.commands.list()), timeout=5)
    assert sandbox.commands.kill(pid) is False
    assert handle.kill() is False


def test_kill_unknown_pid_is_false(sandbox):
    assert sandbox.commands.kill(999_999_999) is False


def test_kill_ends_stream_even_if_grandchild_holds_stdout(sandbox):
    # After a signal envd stops waiting for output EOF (3.2/3.7); the
    # grandchild keeps the stdout pipe open and survives the kill.
    arg = f"60.{uuid.uuid4().int % 10**9:09d}"
    handle = sandbox.commands.run(f"sleep {arg} & sleep {arg}; echo never", background=True)
    try:
        assert wait_until(lambda: len(pids_with_cmdline(arg)) == 2, timeout=5)
        start = time.monotonic()
        assert handle.kill() is True
        with pytest.raises(CommandExitException) as info:
            handle.wait()
        assert info.value.exit_code == -1
        assert time.monotonic() - start < 10
    finally:
        for pid in pids_with_cmdline(arg):
            os.kill(pid, signal.SIGKILL)


def test_connect_unknown_pid_is_not_found(sandbox):
    with pytest.raises(NotFoundException):
        sandbox.commands.connect(999_999_999)


def test_connect_after_exit(sandbox):
    handle = sandbox.commands.run("echo bye; exit 3", background=True)
    pid = handle.pid
    with pytest.raises(CommandExitException):
        handle.wait()
    # Either the 30 s retention cache answers with the end event, or the
    # process is simply not found; both are allowed by the contract (3.3).
    try:
        late = sandbox.commands.connect(pid)
    except NotFoundException:
        return
    with pytest.raises(CommandExitException) as info:
        late.wait()
    assert info.value.exit_code == 3


def test_disconnect_keeps_process_running(envd, sandbox):
    handle = sandbox.commands.run("sleep 1.5; echo after", background=True)
    pid = handle.pid
    handle.disconnect()
    time.sleep(0.3)
    assert proc_alive(pid)
    assert any(p.pid == pid for p in sandbox.commands.list())
    res = envd.sandbox().commands.connect(pid).wait()
    assert res.stdout == "after\n"


def test_iterating_handle_yields_output(sandbox):
    handle = sandbox.commands.run("echo a; echo b >&2", background=True)
    outs, errs = [], []
    for stdout, stderr, _pty in handle:
        if stdout:
            outs.append(stdout)
        if stderr:
            errs.append(stderr)
    assert "".join(outs) == "a\n"
    assert "".join(errs) == "b\n"


def test_concurrent_commands(envd):
    results = {}

    def work(i):
        results[i] = envd.sandbox().commands.run(f"sleep 0.5; echo {i}").stdout

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {i: f"{i}\n" for i in range(8)}
    assert time.monotonic() - start < 10, "commands were serialised"


# -- stdin -----------------------------------------------------------------------


def test_send_stdin_then_close_stdin(sandbox):
    handle = sandbox.commands.run("cat", background=True, stdin=True)
    handle.send_stdin("hello\n")
    handle.send_stdin(b"bytes \xe2\x82\xac\n")
    sandbox.commands.send_stdin(handle.pid, "via commands\n")
    handle.close_stdin()
    res = handle.wait()
    assert res.exit_code == 0
    assert res.stdout == "hello\nbytes \u20ac\nvia commands\n"


def test_close_stdin_twice_is_ok(sandbox):
    # The command outlives its stdin, so the second close finds it running.
    handle = sandbox.commands.run("cat; sleep 1", background=True, stdin=True)
    sandbox.commands.close_stdin(handle.pid)
    sandbox.commands.close_stdin(handle.pid)
    assert handle.wait().exit_code == 0


def test_send_stdin_without_stdin_fails(sandbox):
    handle = sandbox.commands.run("exec sleep 30", background=True)  # stdin=False
    try:
        # envd answers `internal` ("stdin not enabled or closed", 3.6).
        with pytest.raises(SandboxException) as info:
            sandbox.commands.send_stdin(handle.pid, "x")
        assert not isinstance(info.value, NotFoundException)
    finally:
        handle.kill()


def test_send_stdin_unknown_pid_is_not_found(sandbox):
    with pytest.raises(NotFoundException):
        sandbox.commands.send_stdin(999_999_999, "x")


def test_stream_input_sync(sandbox):
    handle = sandbox.commands.run("cat", background=True, stdin=True)
    sandbox.commands.stream_input(handle.pid, ["one\n", b"two\n", "three\n"])
    handle.close_stdin()
    res = handle.wait()
    assert res.stdout == "one\ntwo\nthree\n"


def test_stream_input_unknown_pid_is_not_found(sandbox):
    with pytest.raises(NotFoundException):
        sandbox.commands.stream_input(999_999_999, ["x"])


def test_stdin_large_roundtrip(sandbox):
    # 2 MB through stdin in 64 KiB pieces, echoed back by sha256sum.
    chunk = ("0123456789abcdef" * 4096)  # 64 KiB of ASCII
    total = chunk * 32
    handle = sandbox.commands.run("sha256sum", background=True, stdin=True)
    for _ in range(32):
        handle.send_stdin(chunk)
    handle.close_stdin()
    res = handle.wait()
    assert res.stdout.split()[0] == hashlib.sha256(total.encode()).hexdigest()


# -- volume ----------------------------------------------------------------------


@pytest.mark.slow
def test_100mb_output_is_byte_exact(sandbox):
    path = f"/tmp/envd-sdk-big-{marker()}.b64"
    try:
        # 75,000,000 random bytes -> 101,315,790 bytes of base64 text (76 per line).
        made = sandbox.commands.run(
            f"head -c 75000000 /dev/urandom | base64 -w 76 > {path} && "
            f"stat -c %s {path} && sha256sum {path}",
            timeout=120,
        )
        size_line, sum_line = made.stdout.splitlines()
        want_size, want_sum = int(size_line), sum_line.split()[0]
        assert want_size > 100_000_000

        digest = hashlib.sha256()
        received = [0, 0]  # bytes, chunks

        def on_stdout(text):
            data = text.encode("ascii")
            digest.update(data)
            received[0] += len(data)
            received[1] += 1

        start = time.monotonic()
        res = sandbox.commands.run(
            f"cat {path}", on_stdout=on_stdout, retain_output=False, timeout=180
        )
        elapsed = time.monotonic() - start
        assert res.exit_code == 0
        assert received[0] == want_size
        assert digest.hexdigest() == want_sum
        print(f"100 MB: {received[1]} chunks in {elapsed:.1f}s")
    finally:
        sandbox.commands.run(f"rm -f {path}", user="root")
