"""The exact bytes the SDK depends on, checked with a raw HTTP/1.1 client.

The requests copy what e2b 2.63 (connectrpc 0.12.1 over pyqwest) actually
sends in debug mode, captured from the wire:

    POST /process.Process/Start HTTP/1.1
    content-type: application/connect+json
    connect-protocol-version: 1
    connect-content-encoding: identity
    connect-accept-encoding: identity
    connect-timeout-ms: 60000
    keepalive-ping-interval: 50
    accept-encoding: zstd,gzip,br
    user-agent: connectrpc/0.12.1
    e2b-sandbox-id: debug_sandbox_id
    e2b-sandbox-port: 49983
    transfer-encoding: chunked          <- even for one request message

These are things the SDK cannot show directly (framing, keep-alives,
headers), but on which it (or the JS SDK, or a proxy) relies.
"""

from __future__ import annotations

import http.client
import json
import struct
import time
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

SDK_STREAM_HEADERS = {
    "Content-Type": "application/connect+json",
    "Connect-Protocol-Version": "1",
    "Connect-Content-Encoding": "identity",
    "Connect-Accept-Encoding": "identity",
    "Accept-Encoding": "zstd,gzip,br",
    "User-Agent": "connectrpc/0.12.1",
    "E2b-Sandbox-Id": "debug_sandbox_id",
    "E2b-Sandbox-Port": "49983",
}
SDK_UNARY_HEADERS = {
    "Content-Type": "application/json",
    "Connect-Protocol-Version": "1",
    "Content-Encoding": "identity",
    "Accept-Encoding": "identity",
    "Connect-Timeout-Ms": "60000",
    "User-Agent": "connectrpc/0.12.1",
    "E2b-Sandbox-Id": "debug_sandbox_id",
    "E2b-Sandbox-Port": "49983",
}


def envelope(message: dict, flags: int = 0) -> bytes:
    payload = json.dumps(message).encode()
    return struct.pack(">BI", flags, len(payload)) + payload


def parse_envelopes(body: bytes) -> List[Tuple[int, dict]]:
    out = []
    while body:
        flags, length = struct.unpack(">BI", body[:5])
        out.append((flags, json.loads(body[5:5 + length])))
        body = body[5 + length:]
    return out


class Stream:
    """One server-stream call; frames are read as they arrive."""

    def __init__(self, envd, method: str, message: dict, headers: Optional[Dict[str, str]] = None,
                 timeout: float = 30.0):
        self.conn = http.client.HTTPConnection("127.0.0.1", envd.port, timeout=timeout)
        hdrs = {**SDK_STREAM_HEADERS, **(headers or {})}
        # Chunked request body, like pyqwest.
        self.conn.request("POST", method, body=iter([envelope(message)]), headers=hdrs,
                          encode_chunked=True)
        self.response = self.conn.getresponse()

    def frames(self) -> Iterator[Tuple[int, dict, float]]:
        while True:
            head = self.response.read(5)
            if not head:
                return
            assert len(head) == 5, f"truncated envelope header {head!r}"
            flags, length = struct.unpack(">BI", head)
            payload = self.response.read(length)
            assert len(payload) == length
            yield flags, json.loads(payload), time.monotonic()
            if flags & 0x02:
                rest = self.response.read()
                assert rest == b"", f"bytes after the end-stream frame: {rest[:100]!r}"
                return

    def all(self) -> List[Tuple[int, dict]]:
        try:
            return [(f, m) for f, m, _ in self.frames()]
        finally:
            self.conn.close()


def unary(envd, method: str, message: dict, headers: Optional[Dict[str, str]] = None):
    return envd.http("POST", method, json.dumps(message).encode(),
                     {**SDK_UNARY_HEADERS, **(headers or {})})


def start_request(cmd: str, **extra) -> dict:
    return {"process": {"cmd": "/bin/bash", "args": ["-l", "-c", cmd], **extra}, "stdin": False}


def test_start_stream_framing(envd):
    call = Stream(envd, "/process.Process/Start", start_request("echo hi; exit 3"),
                  {"Connect-Timeout-Ms": "60000", "Keepalive-Ping-Interval": "50"})
    res = call.response
    assert res.status == 200
    # The Python client compares the subtype literally: no parameters allowed.
    assert res.getheader("Content-Type") == "application/connect+json"
    assert res.getheader("Content-Length") is None
    assert res.getheader("Transfer-Encoding", "").lower() == "chunked"
    assert res.getheader("Content-Encoding") in (None, "identity")
    frames = call.all()
    assert [f for f, _ in frames[:-1]] == [0] * (len(frames) - 1)
    assert frames[-1] == (2, {})
    events = [m["event"] for _, m in frames[:-1]]
    assert list(events[0]) == ["start"] and events[0]["start"]["pid"] > 0
    assert events[-1] == {"end": {"exitCode": 3, "exited": True,
                                  "status": "exit status 3", "error": "exit status 3"}}
    data = [e["data"] for e in events[1:-1] if "data" in e]
    assert data == [{"stdout": "aGkK"}]  # base64 of "hi\n", padded


def test_success_end_event_omits_defaults(envd):
    frames = Stream(envd, "/process.Process/Start", start_request("true")).all()
    end = frames[-2][1]["event"]["end"]
    assert end == {"exited": True, "status": "exit status 0"}


def test_killed_end_event(envd):
    call = Stream(envd, "/process.Process/Start", start_request("exec sleep 30"))
    frames = call.frames()
    _, first, _ = next(frames)
    pid = first["event"]["start"]["pid"]
    res = unary(envd, "/process.Process/SendSignal",
                {"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"})
    assert res.status == 200 and res.json() == {}
    rest = [m for _, m, _ in frames]
    call.conn.close()
    assert rest[-1] == {}
    assert rest[-2]["event"]["end"] == {"exitCode": -1, "status": "signal: killed",
                                        "error": "signal: killed"}


def test_keepalive_events_are_sent(envd):
    call = Stream(envd, "/process.Process/Start", start_request("sleep 3.5; echo x"),
                  {"Keepalive-Ping-Interval": "1"})
    frames = [(m, t) for _, m, t in call.frames()]
    call.conn.close()
    kinds = [next(iter(m["event"])) if "event" in m else "eos" for m, _ in frames]
    assert kinds[0] == "start" and kinds[-2:] == ["end", "eos"]
    keepalives = [t for (m, t), k in zip(frames, kinds) if k == "keepalive"]
    assert len(keepalives) >= 2, kinds
    assert frames[kinds.index("keepalive")][0] == {"event": {"keepalive": {}}}


@pytest.mark.parametrize("value", ["0", "-5", "abc"])
def test_bad_keepalive_interval_does_not_crash(envd, value):
    frames = Stream(envd, "/process.Process/Start", start_request("echo ok"),
                    {"Keepalive-Ping-Interval": value}).all()
    assert frames[-1] == (2, {})
    assert envd.alive()


def test_error_before_first_message_is_200_end_stream(envd):
    call = Stream(envd, "/process.Process/Start",
                  start_request("true", cwd="/nonexistent/dir/for/envd"))
    assert call.response.status == 200
    frames = call.all()
    assert len(frames) == 1
    flags, body = frames[0]
    assert flags == 2
    assert body["error"]["code"] == "invalid_argument"
    assert "does not exist" in body["error"]["message"]


def test_connect_unknown_pid_stream_error(envd):
    frames = Stream(envd, "/process.Process/Connect", {"process": {"pid": 999999999}}).all()
    assert frames == [(2, {"error": {"code": "not_found",
                                     "message": "process with pid 999999999 not found"}})]


def test_unary_error_shape(envd):
    res = unary(envd, "/process.Process/SendSignal",
                {"process": {"pid": 999999999}, "signal": "SIGNAL_SIGKILL"})
    assert res.status == 404
    assert res.headers["content-type"].split(";")[0] == "application/json"
    body = res.json()
    assert body["code"] == "not_found"


def test_unary_list_json(envd):
    res = unary(envd, "/process.Process/List", {})
    assert res.status == 200
    assert res.headers["content-type"] == "application/json"
    assert res.headers.get("content-encoding") in (None, "identity")
    assert isinstance(res.json().get("processes", []), list)


def test_stream_input_chunked_incremental(envd):
    """StreamInput's body is consumed as it arrives (the async SDK keeps it open)."""
    start = Stream(envd, "/process.Process/Start",
                   {"process": {"cmd": "/bin/bash", "args": ["-l", "-c", "cat"]}})
    frames = start.frames()
    pid = next(frames)[1]["event"]["start"]["pid"]

    conn = http.client.HTTPConnection("127.0.0.1", envd.port, timeout=30)
    conn.putrequest("POST", "/process.Process/StreamInput", skip_accept_encoding=True)
    for k, v in {**SDK_STREAM_HEADERS, "Connect-Timeout-Ms": "60000",
                 "Transfer-Encoding": "chunked"}.items():
        conn.putheader(k, v)
    conn.endheaders()

    def send_chunk(data: bytes) -> None:
        conn.send(b"%x\r\n%s\r\n" % (len(data), data))

    send_chunk(envelope({"start": {"process": {"pid": pid}}}))
    send_chunk(envelope({"data": {"input": {"stdin": "cGluZwo="}}}))  # "ping\n"
    # The echo must come back while the input stream is still open.
    _, msg, _ = next(frames)
    assert msg == {"event": {"data": {"stdout": "cGluZwo="}}}
    send_chunk(envelope({"keepalive": {}}))
    conn.send(b"0\r\n\r\n")
    res = conn.getresponse()
    assert res.status == 200
    assert res.getheader("Content-Type") == "application/connect+json"
    body = res.read()
    conn.close()
    assert parse_envelopes(body) == [(0, {}), (2, {})]

    unary(envd, "/process.Process/CloseStdin", {"process": {"pid": pid}})
    rest = [m for _, m, _ in frames]
    start.conn.close()
    assert rest[-2]["event"]["end"]["exited"] is True


def test_health(envd):
    res = envd.http("GET", "/health")
    assert res.status == 204
    assert res.body == b""
    assert res.headers.get("cache-control") == "no-store"


def _late_chunked_request(sock, path: str, extra: bytes = b"") -> None:
    """Headers first, the chunked body 200 ms later: how pyqwest sends a
    request body that is not ready at once (always for streaming calls)."""
    sock.sendall(
        b"POST " + path.encode() + b" HTTP/1.1\r\nHost: envd\r\n"
        b"Content-Type: application/connect+json\r\nConnect-Protocol-Version: 1\r\n"
        + extra + b"Transfer-Encoding: chunked\r\n\r\n"
    )
    time.sleep(0.2)
    body = envelope({"process": {"cmd": "/bin/true"}})
    sock.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))


def _read_response(sock) -> bytes:
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.parametrize("case", ["unauthorized", "unknown-path"])
def test_early_error_response_keeps_connection_usable(fresh_envd, case):
    """An error answered before the request body was read must not break the
    connection the client is still writing to (or has pooled).

    Go's net/http drains up to 256 KiB of an unread body after the handler
    returns, so the connection stays usable; otherwise it sends
    `Connection: close`. The SDK pools HTTP/1.1 connections: a silent close
    shows up as "Broken pipe" while writing the body, or "connection closed
    before message completed" on the next call that reuses the connection.
    """
    import socket

    if case == "unauthorized":
        assert fresh_envd.post_init({"accessToken": "a" * 64}).status == 204
        path = "/process.Process/Start"
    else:
        path = "/process.Process/NoSuchMethod"
    sock = socket.create_connection(("127.0.0.1", fresh_envd.port))
    try:
        _late_chunked_request(sock, path)
        head = _read_response(sock)
        assert head.startswith(b"HTTP/1.1 4"), head[:100]
        if b"connection: close" in head.lower():
            return  # announced close: the client will not reuse it
        time.sleep(0.2)
        # Same connection, second request: must get an answer.
        _late_chunked_request(sock, path)
        second = _read_response(sock)
        assert second.startswith(b"HTTP/1.1 "), (
            "connection was closed after an early error without `Connection: close` "
            f"and without draining the request body; got {second[:100]!r}"
        )
    except BrokenPipeError:
        pytest.fail("envd closed the connection while the request body was being sent")
    finally:
        sock.close()
