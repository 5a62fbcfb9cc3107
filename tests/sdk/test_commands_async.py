"""`sandbox.commands` of the async e2b 2.63 SDK (`AsyncSandbox`) against the
real envd. Same RPCs as the sync client, plus the long-lived `StreamInput`
handle that only the async client has (3.6).
"""

from __future__ import annotations

import asyncio
import hashlib
import shlex
import time
import uuid

import pytest
from e2b import (
    AsyncCommandInputHandle,
    AuthenticationException,
    CommandExitException,
    InvalidArgumentException,
    NotFoundException,
    SandboxException,
    TimeoutException,
)

from envd_harness import pids_with_cmdline, proc_alive


def marker() -> str:
    return "m" + uuid.uuid4().hex[:12]


async def eventually(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return True
        await asyncio.sleep(interval)
    return False


async def test_stdout_stderr_exit(async_sandbox):
    res = await async_sandbox.commands.run("echo out; echo err >&2")
    assert (res.stdout, res.stderr, res.exit_code, res.error) == ("out\n", "err\n", 0, None)


async def test_nonzero_exit_raises(async_sandbox):
    with pytest.raises(CommandExitException) as info:
        await async_sandbox.commands.run("echo so-far; echo bad >&2; exit 9")
    assert info.value.exit_code == 9
    assert info.value.stdout == "so-far\n"
    assert info.value.stderr == "bad\n"
    assert info.value.error == "exit status 9"


async def test_missing_command_exits_127(async_sandbox):
    with pytest.raises(CommandExitException) as info:
        await async_sandbox.commands.run("definitely-not-a-command-" + marker())
    assert info.value.exit_code == 127


async def test_async_callbacks(async_sandbox):
    out, err = [], []

    async def on_out(chunk):
        await asyncio.sleep(0)
        out.append(chunk)

    res = await async_sandbox.commands.run(
        "for i in 1 2 3; do echo $i; echo e$i >&2; done",
        on_stdout=on_out,
        on_stderr=err.append,
    )
    assert "".join(out) == "1\n2\n3\n" == res.stdout
    assert "".join(err) == "e1\ne2\ne3\n"


async def test_broken_utf8(async_sandbox):
    res = await async_sandbox.commands.run(r"printf 'a\xffb\n'")
    assert res.stdout == "a\ufffdb\n"


async def test_envs_cwd_user(async_sandbox, test_user):
    res = await async_sandbox.commands.run(
        'echo "$A"; pwd; whoami', envs={"A": "x y"}, cwd="/tmp"
    )
    assert res.stdout == f"x y\n/tmp\n{test_user.pw_name}\n"
    res = await async_sandbox.commands.run('whoami; echo "$HOME"; id -u', user="root")
    assert res.stdout == "root\n/root\n0\n"


async def test_nonexistent_cwd(async_sandbox):
    with pytest.raises(InvalidArgumentException):
        await async_sandbox.commands.run("true", cwd="/does/not/exist/" + marker())


async def test_unknown_user(async_sandbox):
    with pytest.raises(AuthenticationException):
        await async_sandbox.commands.run("true", user="nouser" + marker()[:6])


async def test_timeout_kills_process(async_sandbox):
    arg = f"30.{uuid.uuid4().int % 10**9:09d}"
    handle = await async_sandbox.commands.run(f"exec sleep {arg}", background=True, timeout=2)
    pid = handle.pid
    assert proc_alive(pid)
    start = time.monotonic()
    with pytest.raises((TimeoutException, CommandExitException)):
        await handle.wait()
    assert time.monotonic() - start < 10
    assert await eventually(lambda: not proc_alive(pid), timeout=5), "process survived its timeout"
    assert not pids_with_cmdline(arg)


async def test_foreground_timeout(async_sandbox):
    start = time.monotonic()
    with pytest.raises(TimeoutException):
        await async_sandbox.commands.run("exec sleep 30", timeout=2)
    assert time.monotonic() - start < 10


async def test_background_connect_list_kill(envd, async_sandbox):
    m = marker()
    handle = await async_sandbox.commands.run(
        f"sleep 1; echo {m}; exec sleep 60", background=True, envs={"M": m}
    )
    procs = await async_sandbox.commands.list()
    info = next(p for p in procs if p.pid == handle.pid)
    assert info.cmd == "/bin/bash"
    assert info.args == ["-l", "-c", f"sleep 1; echo {m}; exec sleep 60"]
    assert info.envs == {"M": m}

    other = await envd.async_sandbox()
    joined = await other.commands.connect(handle.pid)
    assert joined.pid == handle.pid
    assert await eventually(lambda: joined.stdout == f"{m}\n", timeout=10)

    assert await other.commands.kill(handle.pid) is True
    for h in (handle, joined):
        with pytest.raises(CommandExitException) as exc:
            await h.wait()
        assert exc.value.exit_code == -1
    assert await eventually(
        lambda: _absent(async_sandbox, handle.pid), timeout=5
    )
    assert await async_sandbox.commands.kill(handle.pid) is False
    assert await handle.kill() is False


async def _absent(sbx, pid) -> bool:
    return all(p.pid != pid for p in await sbx.commands.list())


async def test_connect_unknown_pid(async_sandbox):
    with pytest.raises(NotFoundException):
        await async_sandbox.commands.connect(999_999_999)


async def test_disconnect_and_reconnect(envd, async_sandbox):
    handle = await async_sandbox.commands.run("sleep 1.5; echo later", background=True)
    await handle.disconnect()
    await asyncio.sleep(0.2)
    assert proc_alive(handle.pid)
    res = await (await envd.async_sandbox()).commands.connect(handle.pid)
    assert (await res.wait()).stdout == "later\n"


async def test_send_stdin_close_stdin(async_sandbox):
    handle = await async_sandbox.commands.run("cat", background=True, stdin=True)
    await handle.send_stdin("line one\n")
    await async_sandbox.commands.send_stdin(handle.pid, b"line two\n")
    await handle.close_stdin()
    res = await handle.wait()
    assert res.exit_code == 0
    assert res.stdout == "line one\nline two\n"


async def test_stream_input_handle(async_sandbox):
    handle = await async_sandbox.commands.run("cat", background=True, stdin=True)
    stream = async_sandbox.commands.stream_input(handle.pid)
    assert isinstance(stream, AsyncCommandInputHandle)
    # The request body is consumed incrementally: input sent on the open
    # stream reaches the process before the stream is closed.
    await stream.send("first\n")
    assert await eventually(lambda: handle.stdout == "first\n", timeout=10), (
        "StreamInput data was not delivered while the stream was open"
    )
    await stream.send(b"second\n")
    await stream.close()
    await handle.close_stdin()
    res = await handle.wait()
    assert res.stdout == "first\nsecond\n"


async def test_stream_input_context_manager(async_sandbox):
    handle = await async_sandbox.commands.run("cat", background=True, stdin=True)
    async with async_sandbox.commands.stream_input(handle.pid) as stream:
        for i in range(50):
            await stream.send(f"{i}\n")
    await handle.close_stdin()
    res = await handle.wait()
    assert res.stdout == "".join(f"{i}\n" for i in range(50))


async def test_stream_input_unknown_pid(async_sandbox):
    stream = async_sandbox.commands.stream_input(999_999_999)
    with pytest.raises(NotFoundException):
        await stream.close()


async def test_close_stdin_unknown_pid(async_sandbox):
    with pytest.raises(NotFoundException):
        await async_sandbox.commands.close_stdin(999_999_999)


async def test_send_stdin_when_disabled(async_sandbox):
    handle = await async_sandbox.commands.run("exec sleep 30", background=True)
    try:
        with pytest.raises(SandboxException) as info:
            await async_sandbox.commands.send_stdin(handle.pid, "x")
        assert not isinstance(info.value, NotFoundException)
    finally:
        await handle.kill()


async def test_many_concurrent_commands(async_sandbox):
    start = time.monotonic()
    results = await asyncio.gather(
        *(async_sandbox.commands.run(f"sleep 0.5; echo {i}") for i in range(20))
    )
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(20)]
    assert time.monotonic() - start < 15


async def test_10mb_output_both_streams(async_sandbox):
    digest_out, digest_err = hashlib.sha256(), hashlib.sha256()
    sizes = [0, 0]

    def out(t):
        digest_out.update(t.encode())
        sizes[0] += len(t)

    def err(t):
        digest_err.update(t.encode())
        sizes[1] += len(t)

    # Deterministic text: both streams at once, interleaved by the kernel.
    cmd = (
        "seq 1 700000 & "
        "seq 700001 1400000 >&2; wait"
    )
    res = await async_sandbox.commands.run(
        cmd, on_stdout=out, on_stderr=err, retain_output=False, timeout=120
    )
    assert res.exit_code == 0
    want_out = "".join(f"{i}\n" for i in range(1, 700001)).encode()
    want_err = "".join(f"{i}\n" for i in range(700001, 1400001)).encode()
    assert sizes == [len(want_out), len(want_err)]
    assert digest_out.hexdigest() == hashlib.sha256(want_out).hexdigest()
    assert digest_err.hexdigest() == hashlib.sha256(want_err).hexdigest()


# -- reattaching to a long-lived stdio server (E2B issues #1352, #1587) --------

# Answers each line "<id> <size>" with "<id>:" and <size> bytes, on one line.
LINE_ECHO_SERVER = r"""
import sys
for line in sys.stdin:
    ident, size = line.split()
    sys.stdout.write(ident + ":" + "x" * int(size) + "\n")
    sys.stdout.flush()
"""


async def test_a_reattached_stream_delivers_every_response_of_any_size(async_sandbox):
    """After `connect(pid)` to a running stdio server, `on_stdout` gets every
    byte written after it attached, in order, also once responses of 8 KB
    and 64 KB went by, over many connect/disconnect rounds."""
    server = await async_sandbox.commands.run(
        "python3 -c " + shlex.quote(LINE_ECHO_SERVER), background=True, stdin=True, timeout=0
    )
    try:
        for rnd in range(20):
            received: list[str] = []
            joined = await async_sandbox.commands.connect(server.pid, on_stdout=received.append, timeout=0)
            expected = ""
            for i, size in enumerate([8192, 10, 65536, 8000, 70000, 1]):
                ident = f"r{rnd}-{i}"
                await async_sandbox.commands.send_stdin(server.pid, f"{ident} {size}\n")
                expected += f"{ident}:{'x' * size}\n"
                arrived = await eventually(lambda: len("".join(received)) >= len(expected), timeout=15)
                got = "".join(received)
                assert arrived and got == expected, (
                    f"round {rnd}, response {i} ({size} bytes): got {len(got)} of {len(expected)} bytes"
                )
            await joined.disconnect()
    finally:
        await server.kill()
