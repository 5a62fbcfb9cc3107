"""`sandbox.pty` of the async e2b 2.63 SDK (`AsyncSandbox`) against the real
envd: the same terminal RPCs as the sync client (CONTRACT.md 3.2, 3.5, 3.6,
3.9), with output delivered to an `on_data` callback by the handle's task,
plus the long-lived `StreamInput` handle for PTY input.

Typed commands print markers split with `''` (`echo rea''dy` prints
`ready`), so the echo of the typed line never matches what is waited for.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import pwd
import re
import time
import uuid
from typing import List, Optional, Union

import pytest
from e2b import (
    AsyncCommandInputHandle,
    CommandExitException,
    InvalidArgumentException,
    NotFoundException,
    PtySize,
    TimeoutException,
)

from envd_harness import TEST_USER, proc_alive

_counter = itertools.count(1)


async def eventually(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return predicate()


def sleep_children(pid: int, arg: str) -> List[int]:
    """Live children of `pid` whose argv is `sleep <arg>`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")[:-1]
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] not in (b"Z", b"X") and argv == [b"sleep", arg.encode()]:
            found.append(int(entry))
    return found


class AsyncTerminal:
    """One PTY session: output from `on_data`, input typed through the SDK."""

    def __init__(self, sandbox):
        self.sandbox = sandbox
        self.handle = None
        self.pid = 0
        self.result = None
        self.error: Optional[BaseException] = None
        self.done = False
        self._buf = bytearray()
        self._changed = asyncio.Event()
        self._waiter: Optional[asyncio.Task] = None

    async def _on_data(self, chunk: bytes) -> None:
        assert isinstance(chunk, bytes)
        self._buf.extend(chunk)
        self._changed.set()

    def _attach(self, handle) -> "AsyncTerminal":
        self.handle = handle
        self.pid = handle.pid
        self._waiter = asyncio.create_task(self._wait())
        return self

    async def create(self, size: PtySize = PtySize(rows=24, cols=80), **kwargs) -> "AsyncTerminal":
        return self._attach(await self.sandbox.pty.create(size, on_data=self._on_data, **kwargs))

    async def connect(self, pid: int, **kwargs) -> "AsyncTerminal":
        return self._attach(await self.sandbox.pty.connect(pid, on_data=self._on_data, **kwargs))

    async def _wait(self) -> None:
        try:
            self.result = await self.handle.wait()
        except BaseException as e:  # noqa: BLE001 - kept for the test to inspect
            self.error = e
        finally:
            self.done = True
            self._changed.set()

    @property
    def output(self) -> bytes:
        return bytes(self._buf)

    def mark(self) -> int:
        return len(self._buf)

    async def type(self, data: Union[str, bytes]) -> None:
        if isinstance(data, str):
            data = data.encode()
        await self.sandbox.pty.send_stdin(self.pid, data)

    async def expect(self, pattern: bytes, since: int = 0, timeout: float = 15.0) -> "re.Match[bytes]":
        regex = re.compile(pattern, re.S)
        deadline = time.monotonic() + timeout
        while True:
            self._changed.clear()
            m = regex.search(bytes(self._buf), since)
            if m:
                return m
            left = deadline - time.monotonic()
            if left <= 0 or self.done:
                raise AssertionError(
                    f"{pattern!r} not seen in the terminal output (ended={self.done}, "
                    f"error={self.error!r}); output since mark:\n{bytes(self._buf[since:])[-1500:]!r}"
                )
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))
            except asyncio.TimeoutError:
                pass

    async def wait_ready(self) -> None:
        mark = self.mark()
        await self.type("echo rea''dy\n")
        await self.expect(rb"(?<!')ready\r\n", since=mark)

    async def run(self, command: str, timeout: float = 15.0) -> str:
        """Types `command` at the prompt; returns what it printed (CRLF → LF)."""
        token = f"a{next(_counter)}x{uuid.uuid4().hex[:6]}"
        split = f"{token[:2]}''{token[2:]}"
        mark = self.mark()
        await self.type(f"echo {split}-b; {command}; echo {split}-e\n")
        tok = re.escape(token.encode())
        m = await self.expect(tok + rb"-b\r\n(.*?)" + tok + rb"-e\r\n", since=mark, timeout=timeout)
        return m.group(1).decode("utf-8", "replace").replace("\r\n", "\n")

    async def wait_end(self, timeout: float = 15.0) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self._waiter), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"PTY {self.pid} did not end; output tail:\n{self.output[-1500:]!r}")

    async def close(self) -> None:
        if self._waiter is None:
            return
        if not self.done:
            try:
                await self.sandbox.pty.kill(self.pid)
            except Exception:
                pass
            try:
                await asyncio.wait_for(asyncio.shield(self._waiter), 10)
            except asyncio.TimeoutError:
                self._waiter.cancel()


@pytest.fixture
async def terminal(async_sandbox):
    """await open(size=24x80, sandbox=None, **pty.create kwargs) -> AsyncTerminal; killed at teardown."""
    opened: List[AsyncTerminal] = []

    async def open_(size: PtySize = PtySize(rows=24, cols=80), sb=None, **kwargs) -> AsyncTerminal:
        term = AsyncTerminal(sb or async_sandbox)
        opened.append(term)
        return await term.create(size, **kwargs)

    yield open_
    for term in opened:
        await term.close()


async def test_create_typed_commands_and_list(async_sandbox, terminal):
    term = await terminal()
    assert term.pid > 0 and proc_alive(term.pid)
    await term.wait_ready()
    mark = term.mark()
    await term.type("echo $((6*7))\n")
    await term.expect(rb"echo \$\(\(6\*7\)\)\r\n.*?[\r\n]42\r\n", since=mark)
    assert await term.run("echo $$") == f"{term.pid}\n"
    assert re.fullmatch(r"/dev/pts/\d+\n", await term.run("tty"))
    assert await term.run("shopt -q login_shell && echo lo''gin-yes") == "login-yes\n"

    info = next(p for p in await async_sandbox.commands.list() if p.pid == term.pid)
    assert (info.cmd, info.args) == ("/bin/bash", ["-i", "-l"])
    assert info.envs == {"TERM": "xterm-256color", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


async def test_size_and_resize(async_sandbox, terminal):
    term = await terminal(PtySize(rows=31, cols=97))
    await term.wait_ready()
    assert await term.run("stty size") == "31 97\n"
    await async_sandbox.pty.resize(term.pid, PtySize(rows=45, cols=132))
    assert await term.run("stty size") == "45 132\n"
    assert await term.run("echo $LINES $COLUMNS") == "45 132\n"


async def test_login_shell_as_default_user(terminal):
    home = pwd.getpwnam(TEST_USER).pw_dir
    term = await terminal()
    await term.wait_ready()
    assert await term.run("whoami") == f"{TEST_USER}\n"
    assert await term.run("echo $HOME; pwd") == f"{home}\n{home}\n"
    assert "i" in await term.run("echo $-")


async def test_user_cwd_envs(terminal):
    term = await terminal(user="root", cwd="/tmp", envs={"PTY_VAR": "a b", "LANG": "C"})
    await term.wait_ready()
    assert await term.run("whoami; pwd; echo $HOME") == "root\n/tmp\n/root\n"
    # TERM and LC_ALL as the SDK fills them in; LANG as the caller overrode it.
    assert await term.run('echo "$PTY_VAR|$TERM|$LANG|$LC_ALL"') == "a b|xterm-256color|C|C.UTF-8\n"


async def test_missing_cwd_is_invalid_argument(async_sandbox):
    with pytest.raises(InvalidArgumentException):
        await async_sandbox.pty.create(
            PtySize(rows=24, cols=80), on_data=lambda _: None, cwd="/no/such/dir-" + uuid.uuid4().hex
        )


async def test_kill(async_sandbox, terminal):
    term = await terminal()
    await term.wait_ready()
    assert await term.handle.kill() is True
    await term.wait_end(10)
    assert isinstance(term.error, CommandExitException), repr(term.error)
    assert term.error.exit_code == -1
    assert term.error.error == "signal: killed"
    assert await eventually(lambda: not proc_alive(term.pid), 5)
    assert await async_sandbox.pty.kill(term.pid) is False


async def test_exit_3(terminal):
    term = await terminal()
    await term.wait_ready()
    await term.type("exit 3\n")
    await term.wait_end(10)
    assert isinstance(term.error, CommandExitException), repr(term.error)
    assert (term.error.exit_code, term.error.error) == (3, "exit status 3")


async def test_ctrl_d_ends_the_shell(terminal):
    term = await terminal()
    await term.wait_ready()
    await asyncio.sleep(0.3)  # readline is waiting for the next line
    await term.type(b"\x04")
    await term.wait_end(10)
    assert term.error is None, repr(term.error)
    assert term.result.exit_code == 0
    assert b"logout" in term.output


async def test_ctrl_c_interrupts_sleep(terminal):
    term = await terminal()
    await term.wait_ready()
    await term.type("sleep 100\n")
    assert await eventually(lambda: sleep_children(term.pid, "100"), 10), "sleep 100 did not start"
    sleeper = sleep_children(term.pid, "100")[0]
    await asyncio.sleep(0.1)
    start = time.monotonic()
    await term.type(b"\x03")
    assert await eventually(lambda: not proc_alive(sleeper), 5), "Ctrl-C did not stop sleep 100"
    assert time.monotonic() - start < 1.0
    mark = term.mark()
    await term.type("echo sta''tus-$?\n")
    assert (await term.expect(rb"status-(\d+)\r\n", since=mark)).group(1) == b"130"
    assert not term.done


async def test_connect_from_second_handle(envd, terminal):
    first = await terminal()
    await first.wait_ready()
    other = await envd.async_sandbox()
    second = await AsyncTerminal(other).connect(first.pid)
    try:
        assert second.pid == first.pid
        m1, m2 = first.mark(), second.mark()
        await second.type("echo $((7*6))\n")
        await first.expect(rb"[\r\n]42\r\n", since=m1)
        await second.expect(rb"[\r\n]42\r\n", since=m2)
        assert await first.run("echo fr''om-first") == "from-first\n"
        await second.expect(rb"(?<!')from-first\r\n", since=m2)
        # Resize through the second client is seen by the shell.
        await other.pty.resize(first.pid, PtySize(rows=20, cols=70))
        assert await first.run("stty size") == "20 70\n"
        await first.type("exit 4\n")
        await first.wait_end(10)
        await second.wait_end(10)
        for t in (first, second):
            assert isinstance(t.error, CommandExitException), repr(t.error)
            assert t.error.exit_code == 4
    finally:
        await second.close()


async def test_disconnect_and_reconnect(async_sandbox, terminal):
    first = await terminal()
    await first.wait_ready()
    await first.handle.disconnect()
    await asyncio.sleep(0.2)
    assert proc_alive(first.pid)
    again = await AsyncTerminal(async_sandbox).connect(first.pid)
    try:
        # No replay of earlier output: only what happens after the connect.
        assert b"ready" not in again.output
        assert await again.run("echo ba''ck") == "back\n"
    finally:
        await again.close()


async def test_stream_input_to_pty(async_sandbox, terminal):
    term = await terminal()
    await term.wait_ready()
    stream = async_sandbox.pty.stream_input(term.pid)
    assert isinstance(stream, AsyncCommandInputHandle)
    mark = term.mark()
    await stream.send(b"echo str''eam-")
    await stream.send("one\n")
    await term.expect(rb"(?<!')stream-one\r\n", since=mark)
    await stream.send(b"exit 6\n")
    await stream.close()
    await term.wait_end(10)
    assert isinstance(term.error, CommandExitException)
    assert term.error.exit_code == 6


async def test_timeout_kills_the_terminal(terminal):
    term = await terminal(timeout=2)
    await term.wait_ready()
    await term.wait_end(15)
    assert isinstance(term.error, TimeoutException), repr(term.error)
    assert await eventually(lambda: not proc_alive(term.pid), 5)


async def test_bad_pids(async_sandbox):
    with pytest.raises(NotFoundException):
        await async_sandbox.pty.resize(999_999_999, PtySize(rows=24, cols=80))
    with pytest.raises(NotFoundException):
        await async_sandbox.pty.send_stdin(999_999_999, b"x")
    with pytest.raises(NotFoundException):
        await async_sandbox.pty.connect(999_999_999, on_data=lambda _: None)
    assert await async_sandbox.pty.kill(999_999_999) is False
