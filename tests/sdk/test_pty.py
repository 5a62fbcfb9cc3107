"""`sandbox.pty` of the sync e2b 2.63 SDK against the real envd.

A terminal is `bash -i -l` on a pseudo-terminal (CONTRACT.md 3.2, 3.5, 3.6,
3.9): what the test types goes in through `pty.send_stdin` (SendInput with
`pty` bytes), what the terminal shows comes back as raw `data.pty` events,
echo and escape sequences included. A reader thread collects them while the
test types.

Typed commands print markers split with `''` (`echo rea''dy` prints
`ready`), so the echo of the typed line never matches what is waited for.
"""

from __future__ import annotations

import itertools
import os
import pwd
import re
import tempfile
import threading
import time
import uuid
from typing import List, Optional, Union

import pytest
from e2b import (
    CommandExitException,
    InvalidArgumentException,
    NotFoundException,
    PtySize,
    SandboxException,
    TimeoutException,
)

from envd_harness import TEST_USER, proc_alive, wait_until

_counter = itertools.count(1)


def children_of(pid: int) -> List[int]:
    """Live direct children of `pid` (envd runs on this host, so its pids are ours)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] not in (b"Z", b"X"):
            found.append(int(entry))
    return found


def cmdline(pid: int) -> List[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode() for a in f.read().split(b"\0") if a]
    except OSError:
        return []


class Terminal:
    """One PTY session: output gathered by a thread, input typed through the SDK."""

    def __init__(self, sandbox, handle):
        self.sandbox = sandbox
        self.handle = handle
        self.pid = handle.pid
        self.result = None
        self.error: Optional[BaseException] = None
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._done = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            self.result = self.handle.wait(on_pty=self._on_data)
        except BaseException as e:  # noqa: BLE001 - kept for the test to inspect
            self.error = e
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def _on_data(self, chunk: bytes) -> None:
        assert isinstance(chunk, bytes)
        with self._cond:
            self._buf.extend(chunk)
            self._cond.notify_all()

    @property
    def output(self) -> bytes:
        with self._cond:
            return bytes(self._buf)

    @property
    def done(self) -> bool:
        with self._cond:
            return self._done

    def mark(self) -> int:
        with self._cond:
            return len(self._buf)

    def type(self, data: Union[str, bytes]) -> None:
        if isinstance(data, str):
            data = data.encode()
        self.sandbox.pty.send_stdin(self.pid, data)

    def expect(self, pattern: Union[bytes, "re.Pattern[bytes]"], since: int = 0,
               timeout: float = 15.0) -> "re.Match[bytes]":
        """Waits until `pattern` occurs in the output after offset `since`."""
        regex = re.compile(pattern, re.S) if isinstance(pattern, bytes) else pattern
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = regex.search(bytes(self._buf), since)
                if m:
                    return m
                left = deadline - time.monotonic()
                if left <= 0 or self._done:
                    tail = bytes(self._buf[since:])[-1500:]
                    raise AssertionError(
                        f"{regex.pattern!r} not seen in the terminal output "
                        f"(ended={self._done}, error={self.error!r}); output since mark:\n{tail!r}"
                    )
                self._cond.wait(min(left, 0.5))

    def wait_ready(self) -> None:
        """bash has read its profile and answers typed lines."""
        mark = self.mark()
        self.type("echo rea''dy\n")
        self.expect(rb"(?<!')ready\r\n", since=mark)

    def run(self, command: str, timeout: float = 15.0) -> str:
        """Types `command` at the prompt; returns what it printed (CRLF → LF)."""
        token = f"t{next(_counter)}x{uuid.uuid4().hex[:6]}"
        split = f"{token[:2]}''{token[2:]}"
        mark = self.mark()
        self.type(f"echo {split}-b; {command}; echo {split}-e\n")
        m = self.expect(re.escape(token.encode()) + rb"-b\r\n(.*?)" + re.escape(token.encode()) + rb"-e\r\n",
                        since=mark, timeout=timeout)
        return m.group(1).decode("utf-8", "replace").replace("\r\n", "\n")

    def wait_end(self, timeout: float = 15.0) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"PTY {self.pid} did not end; output tail:\n{self.output[-1500:]!r}"

    def close(self) -> None:
        if not self.done:
            try:
                self.sandbox.pty.kill(self.pid)
            except Exception:
                pass
            self._thread.join(10)


@pytest.fixture
def terminal(sandbox):
    """open(size=24x80, sandbox=None, **pty.create kwargs) -> Terminal; killed at teardown."""
    opened: List[Terminal] = []

    def open_(size: PtySize = PtySize(rows=24, cols=80), sb=None, **kwargs) -> Terminal:
        sb = sb or sandbox
        term = Terminal(sb, sb.pty.create(size, **kwargs))
        opened.append(term)
        return term

    yield open_
    for term in opened:
        term.close()


# -- create, input, output ----------------------------------------------------


def test_create_starts_an_interactive_login_bash(sandbox, terminal):
    term = terminal()
    assert term.pid > 0 and proc_alive(term.pid)
    term.wait_ready()
    # The pid is the shell's own (envd's wrapper shell execs).
    assert term.run("echo $$").strip() == str(term.pid)
    assert "i" in term.run("echo $-")
    assert term.run("shopt -q login_shell && echo lo''gin-yes || echo lo''gin-no").strip() == "login-yes"

    infos = {p.pid: p for p in sandbox.commands.list()}
    assert term.pid in infos, infos
    info = infos[term.pid]
    assert info.cmd == "/bin/bash"
    assert info.args == ["-i", "-l"]
    assert info.envs == {"TERM": "xterm-256color", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    assert info.cwd is None
    assert info.tag is None


def test_typed_command_is_echoed_and_answered(terminal):
    term = terminal()
    term.wait_ready()
    mark = term.mark()
    term.type("echo $((6*7))\n")
    # The terminal echoes what was typed, then the shell prints the result.
    m = term.expect(rb"echo \$\(\(6\*7\)\)\r\n(.*?)42\r\n", since=mark)
    assert b"42" not in m.group(1)


def test_tty_is_a_pts_and_the_controlling_terminal(terminal):
    term = terminal()
    term.wait_ready()
    assert re.fullmatch(r"/dev/pts/\d+\n", term.run("tty")), term.output[-500:]
    # stdin, stdout and stderr are all the terminal.
    assert term.run("[ -t 0 ] && [ -t 1 ] && [ -t 2 ] && echo al''l-tty").strip() == "all-tty"
    # The shell leads its own session (field 6 of /proc/<pid>/stat).
    assert term.run("cut -d' ' -f6 /proc/$$/stat").strip() == str(term.pid), "bash is not a session leader"
    # Job control: a command run from the prompt gets its own process group
    # (field 5), which is the terminal's foreground group (field 8).
    pgrp, tpgid = term.run("sh -c 'exec cut -d\" \" -f5,8 /proc/$$/stat'").split()
    assert pgrp == tpgid != str(term.pid), (pgrp, tpgid)


def test_stty_size_is_the_requested_size(terminal):
    term = terminal(PtySize(rows=33, cols=101))
    term.wait_ready()
    assert term.run("stty size") == "33 101\n"
    assert term.run("echo $LINES $COLUMNS") == "33 101\n"


def test_resize_then_stty_size(sandbox, terminal):
    term = terminal(PtySize(rows=24, cols=80))
    term.wait_ready()
    assert term.run("stty size") == "24 80\n"
    sandbox.pty.resize(term.pid, PtySize(rows=50, cols=160))
    assert term.run("stty size") == "50 160\n"
    # readline got SIGWINCH and bash updated LINES/COLUMNS.
    assert term.run("echo $LINES $COLUMNS") == "50 160\n"
    sandbox.pty.resize(term.pid, PtySize(rows=10, cols=40))
    assert term.run("stty size") == "10 40\n"


def test_resize_delivers_sigwinch_to_the_foreground_job(sandbox, terminal):
    term = terminal()
    term.wait_ready()
    mark = term.mark()
    term.type("bash -c 'trap \"stty size; echo go''t-winch; exit 0\" WINCH; echo wa''iting; "
              "while :; do sleep 0.05; done'\n")
    term.expect(rb"(?<!')waiting\r\n", since=mark)
    mark = term.mark()
    sandbox.pty.resize(term.pid, PtySize(rows=30, cols=90))
    term.expect(rb"30 90\r\ngot-winch\r\n", since=mark, timeout=5)


def test_utf8_in_and_out(terminal):
    term = terminal()
    term.wait_ready()
    assert term.run("echo 'héllo €'") == "héllo €\n"
    assert term.run(r"printf '\xe2\x82\xac\n'") == "€\n"


def test_large_output_arrives_complete(terminal):
    term = terminal(PtySize(rows=24, cols=200))
    term.wait_ready()
    out = term.run("seq 1 20000", timeout=30)
    assert out == "".join(f"{i}\n" for i in range(1, 20001))


# -- create options: user, cwd, envs -------------------------------------------


def test_default_user_login_environment(terminal):
    home = pwd.getpwnam(TEST_USER).pw_dir
    term = terminal()
    term.wait_ready()
    assert term.run("whoami") == f"{TEST_USER}\n"
    assert term.run("echo $HOME") == f"{home}\n"
    assert term.run("echo $USER $LOGNAME") == f"{TEST_USER} {TEST_USER}\n"
    assert term.run("pwd") == f"{home}\n"


def test_user_root(terminal):
    term = terminal(user="root")
    term.wait_ready()
    assert term.run("whoami") == "root\n"
    assert term.run("echo $HOME; pwd") == "/root\n/root\n"
    assert term.run("id -u") == "0\n"


def test_cwd(terminal):
    cwd = tempfile.mkdtemp(prefix="envd-pty-cwd-", dir="/tmp")
    try:
        os.chmod(cwd, 0o755)
        term = terminal(cwd=cwd)
        term.wait_ready()
        assert term.run("pwd") == f"{cwd}\n"
    finally:
        os.rmdir(cwd)


def test_missing_cwd_is_invalid_argument(sandbox):
    with pytest.raises(InvalidArgumentException) as info:
        sandbox.pty.create(PtySize(rows=24, cols=80), cwd="/no/such/dir-" + uuid.uuid4().hex)
    assert "does not exist" in str(info.value)


def test_envs_and_term_lang_lc_all(terminal):
    term = terminal(envs={"PTY_VAR": "hello world", "E2B_X": "1"})
    term.wait_ready()
    assert term.run('echo "$PTY_VAR|$E2B_X"') == "hello world|1\n"
    # What the SDK sends when the caller does not override them.
    assert term.run('echo "$TERM|$LANG|$LC_ALL"') == "xterm-256color|C.UTF-8|C.UTF-8\n"


def test_term_override(terminal):
    term = terminal(envs={"TERM": "vt100"})
    term.wait_ready()
    assert term.run('echo "$TERM|$LANG|$LC_ALL"') == "vt100|C.UTF-8|C.UTF-8\n"


def test_stream_input_to_pty(sandbox, terminal):
    term = terminal()
    term.wait_ready()
    mark = term.mark()
    # StreamInput with `pty` data: chunks arrive in order over one request.
    sandbox.pty.stream_input(term.pid, [b"echo str''eam-", "one; ", b"echo $((40+2))\n"])
    term.expect(rb"(?<!')stream-one\r\n42\r\n", since=mark)


# -- ending a terminal ----------------------------------------------------------


def test_kill(sandbox, terminal):
    term = terminal()
    term.wait_ready()
    start = time.monotonic()
    assert term.handle.kill() is True
    term.wait_end(10)
    assert time.monotonic() - start < 5
    assert isinstance(term.error, CommandExitException), repr(term.error)
    assert term.error.exit_code == -1
    assert term.error.error == "signal: killed"
    assert wait_until(lambda: not proc_alive(term.pid), 5)
    assert term.pid not in [p.pid for p in sandbox.commands.list()]
    # Already gone: kill reports "not found" as False.
    assert sandbox.pty.kill(term.pid) is False


def test_kill_through_pty_module(sandbox, terminal):
    term = terminal()
    term.wait_ready()
    assert sandbox.pty.kill(term.pid) is True
    term.wait_end(10)
    assert isinstance(term.error, CommandExitException)
    assert term.error.exit_code == -1


def test_exit_3_reports_exit_code_3(terminal):
    term = terminal()
    term.wait_ready()
    term.type("exit 3\n")
    term.wait_end(10)
    assert isinstance(term.error, CommandExitException), repr(term.error)
    assert term.error.exit_code == 3
    assert term.error.error == "exit status 3"


def test_ctrl_d_at_empty_prompt_ends_the_shell(terminal):
    term = terminal()
    term.wait_ready()
    time.sleep(0.3)  # readline is waiting for the next line
    term.type(b"\x04")
    term.wait_end(10)
    assert term.error is None, repr(term.error)
    assert term.result.exit_code == 0
    assert term.result.error is None
    assert b"logout" in term.output  # what a login shell says on EOF


def test_ctrl_c_interrupts_the_foreground_job(terminal):
    term = terminal()
    term.wait_ready()
    term.type("sleep 100\n")
    sleeper = []

    def sleeping():
        sleeper[:] = [p for p in children_of(term.pid) if cmdline(p) == ["sleep", "100"]]
        return bool(sleeper)

    assert wait_until(sleeping, 10), "sleep 100 did not start"
    time.sleep(0.1)
    term.type(b"\x03")
    # sleep 100 ending within seconds can only be the interrupt.
    assert wait_until(lambda: not proc_alive(sleeper[0]), 5), "Ctrl-C did not stop sleep 100"
    assert wait_until(lambda: b"^C" in term.output, 10), "the terminal never echoed ^C"
    # The shell survived and reports the interrupt (128 + SIGINT).
    mark = term.mark()
    term.type("echo sta''tus-$?\n")
    assert term.expect(rb"status-(\d+)\r\n", since=mark).group(1) == b"130"
    assert not term.done


def test_job_control(terminal):
    term = terminal()
    term.wait_ready()
    mark = term.mark()
    term.type("sleep 100 &\n")
    m = term.expect(rb"\[1\] (\d+)\r\n", since=mark)
    job_pid = int(m.group(1))
    assert proc_alive(job_pid)
    assert "Running" in term.run("jobs")
    mark = term.mark()
    term.type("fg\n")
    term.expect(rb"sleep 100\r\n", since=mark)
    time.sleep(0.3)
    mark = term.mark()
    term.type(b"\x1a")  # Ctrl-Z stops the foreground job
    term.expect(rb"Stopped", since=mark)
    assert "Stopped" in term.run("jobs")
    term.run("kill -KILL %1; wait")
    assert wait_until(lambda: not proc_alive(job_pid), 5)
    assert not term.done


def test_timeout_kills_the_terminal(terminal):
    term = terminal(timeout=2)
    term.wait_ready()
    term.wait_end(15)
    assert isinstance(term.error, TimeoutException), repr(term.error)
    assert wait_until(lambda: not proc_alive(term.pid), 5)


# -- a second client ------------------------------------------------------------


def test_connect_from_second_handle_receives_output(envd, terminal):
    first = terminal()
    first.wait_ready()
    other = envd.sandbox()  # an independent SDK handle (own connections)
    second = Terminal(other, other.pty.connect(first.pid))
    try:
        assert second.pid == first.pid
        # Input from the second client, output on both.
        mark1, mark2 = first.mark(), second.mark()
        second.type("echo $((6*7))\n")
        first.expect(rb"[\r\n]42\r\n", since=mark1)
        second.expect(rb"[\r\n]42\r\n", since=mark2)
        # Input from the first client reaches the second one's stream.
        assert first.run("echo fr''om-first") == "from-first\n"
        second.expect(rb"(?<!')from-first\r\n")
        # The end is seen by both.
        first.type("exit 5\n")
        first.wait_end(10)
        second.wait_end(10)
        for t in (first, second):
            assert isinstance(t.error, CommandExitException), repr(t.error)
            assert t.error.exit_code == 5
    finally:
        second.close()


def test_disconnect_keeps_the_terminal_running(sandbox):
    handle = sandbox.pty.create(PtySize(rows=24, cols=80))
    try:
        handle.disconnect()  # closes the Start stream; the shell lives on
        time.sleep(0.3)
        assert proc_alive(handle.pid)
        again = Terminal(sandbox, sandbox.pty.connect(handle.pid))
        try:
            again.wait_ready()
            assert again.run("echo sti''ll-here") == "still-here\n"
        finally:
            again.close()
    finally:
        sandbox.pty.kill(handle.pid)


# -- bad input ------------------------------------------------------------------


def test_connect_unknown_pid(sandbox):
    with pytest.raises(NotFoundException):
        sandbox.pty.connect(999_999_999)


def test_resize_unknown_pid(sandbox):
    with pytest.raises(NotFoundException):
        sandbox.pty.resize(999_999_999, PtySize(rows=24, cols=80))


def test_send_stdin_unknown_pid(sandbox):
    with pytest.raises(NotFoundException):
        sandbox.pty.send_stdin(999_999_999, b"x")


def test_send_stdin_after_exit_is_not_found(terminal):
    term = terminal()
    term.wait_ready()
    term.type("exit 0\n")
    term.wait_end(10)
    assert term.error is None and term.result.exit_code == 0
    with pytest.raises(NotFoundException):
        term.type("echo too late\n")


def test_resize_a_process_without_pty(sandbox):
    handle = sandbox.commands.run("sleep 30", background=True)
    try:
        with pytest.raises(SandboxException) as info:
            sandbox.pty.resize(handle.pid, PtySize(rows=24, cols=80))
        assert not isinstance(info.value, NotFoundException)
    finally:
        handle.kill()
