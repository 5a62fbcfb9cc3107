"""Starts the real envd binary and builds e2b SDK handles that talk to it.

How the e2b 2.63 SDK is pointed at a local envd without the E2B API (read
from the installed package, e2b/connection_config.py and
e2b/sandbox_sync/main.py):

* Debug mode (`debug=True` or `E2B_DEBUG=true`) makes `Sandbox.connect(id)`
  and `Sandbox.create()` skip the API entirely: sandbox id as given (create:
  `debug_sandbox_id`), envd version assumed `99.99.99`, no access token.
* The envd base URL is `ConnectionConfig.get_sandbox_url()`: `sandbox_url`
  (option or `E2B_SANDBOX_URL`) wins over everything; otherwise debug mode
  gives `http://localhost:<ConnectionConfig.envd_port>` = 49983 (a class
  attribute, hard-coded). So passing `sandbox_url="http://127.0.0.1:<port>"`
  lets every test envd listen on a free port.
* The access token is only sent as the `X-Access-Token` header taken from
  `ConnectionConfig(extra_sandbox_headers=...)`; `Sandbox.connect` in debug
  mode never sets it, so a handle with a token is built with the
  (deprecated but working) constructor, exactly as `_cls_connect_sandbox`
  does after an API call.
"""

from __future__ import annotations

import ctypes
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from e2b import AsyncSandbox, ConnectionConfig, Sandbox
from e2b.envd.versions import ENVD_DEBUG_FALLBACK

REPO = Path(__file__).resolve().parents[2]
SANDBOX_ID = "debug_sandbox_id"
TEST_USER = os.environ.get("ENVD_TEST_USER", "envdtest")


def envd_binary() -> Path:
    raw = os.environ.get("ENVD_BIN") or "target/debug/envd"
    path = Path(raw)
    if not path.is_absolute():
        path = REPO / path
    return path


def ensure_test_user(name: str = TEST_USER) -> pwd.struct_passwd:
    """The OS user envd runs commands as by default; created when missing."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    if os.geteuid() != 0:
        raise RuntimeError(f"user {name!r} is missing and the tests are not root")
    subprocess.run(["useradd", "-m", "-s", "/bin/bash", name], check=True)
    return pwd.getpwnam(name)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # envd is killed if the test runner dies (e.g. pytest-timeout's
    # os._exit), so no daemon outlives its run holding a port.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass
class HttpResponse:
    status: int
    headers: Dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http_request(
    url: str,
    method: str = "GET",
    body: Optional[bytes] = None,
    headers: Optional[Dict[str, str]] = None,
    timeout: float = 10.0,
) -> HttpResponse:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as res:
            return HttpResponse(res.status, {k.lower(): v for k, v in res.headers.items()}, res.read())
    except urllib.error.HTTPError as e:
        return HttpResponse(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())


@dataclass
class Envd:
    """One envd process on a free loopback port, with its own state dir."""

    binary: Path
    default_user: str
    log_dir: Path
    name: str = "envd"
    extra_args: Optional[Sequence[str]] = None
    port: int = 0
    proc: Optional[subprocess.Popen] = None
    state_dir: Optional[Path] = None
    log_path: Optional[Path] = None
    starts: int = 0
    _log_file: Any = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _args(self) -> List[str]:
        env_args = os.environ.get("ENVD_ARGS")
        if self.extra_args is not None:
            extra = list(self.extra_args)
        elif env_args is not None:
            extra = env_args.split()
        else:
            # Own state dir: /init's defaultUser/envVars are persisted there
            # and must not leak into the next instance or the host's
            # /var/lib/envd. Loopback only: nothing on the network sees it.
            extra = ["--state-dir", str(self.state_dir), "--bind", "127.0.0.1"]
        return [
            str(self.binary),
            "--dev",
            "--port",
            str(self.port),
            "--default-user",
            self.default_user,
            *extra,
        ]

    def start(self, timeout: float = 30.0) -> "Envd":
        if not self.binary.exists():
            raise RuntimeError(
                f"envd binary {self.binary} does not exist; run `cargo build` or set ENVD_BIN"
            )
        last_error = ""
        for _attempt in range(3):  # a free port can be taken between probe and bind
            self.starts += 1
            self.port = free_port()
            if self.state_dir is None:
                # Kept across restart(): a restart is a cold boot of the same
                # machine, which finds the state file written before.
                self.state_dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-state-"))
            self.log_path = self.log_dir / f"{self.name}-{self.starts}.log"
            self._log_file = open(self.log_path, "wb")
            self.proc = subprocess.Popen(
                self._args(),
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
                cwd="/",
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    last_error = f"envd exited with {self.proc.returncode}:\n{self.log_tail()}"
                    break
                try:
                    res = http_request(self.url + "/health", timeout=1.0)
                    if res.status == 204:
                        return self
                    last_error = f"GET /health answered {res.status}, want 204"
                except OSError as e:
                    last_error = f"GET /health: {e}"
                time.sleep(0.05)
            else:
                self.stop()
                raise RuntimeError(f"envd did not become healthy in {timeout}s: {last_error}\n{self.log_tail()}")
            self.stop()
        raise RuntimeError(f"envd failed to start: {last_error}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def cleanup(self) -> None:
        """Stop and remove the state dir (logs are kept)."""
        self.stop()
        if self.state_dir is not None:
            shutil.rmtree(self.state_dir, ignore_errors=True)
            self.state_dir = None

    def restart(self) -> "Envd":
        """Stop and start again on the same state dir (a new port)."""
        self.stop()
        return self.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_bytes().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    # -- plain HTTP API ----------------------------------------------------

    def http(self, method: str, path: str, body: Optional[bytes] = None,
             headers: Optional[Dict[str, str]] = None, timeout: float = 10.0) -> HttpResponse:
        return http_request(self.url + path, method, body, headers, timeout)

    def post_init(self, body: Union[Dict[str, Any], bytes, None] = None,
                  headers: Optional[Dict[str, str]] = None) -> HttpResponse:
        """POST /init as the orchestrator does: JSON body, all fields optional."""
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if isinstance(body, dict):
            data = json.dumps(body).encode()
        else:
            data = body if body is not None else b""
        return self.http("POST", "/init", data, hdrs)

    # -- SDK handles -------------------------------------------------------

    def sandbox(self, token: Optional[str] = None, **opts: Any) -> Sandbox:
        """A sync SDK handle on this envd, built the way users do in debug mode."""
        if token is None and not opts:
            return Sandbox.connect(SANDBOX_ID, debug=True, sandbox_url=self.url)
        return Sandbox(**self._sandbox_opts(token, **opts))

    async def async_sandbox(self, token: Optional[str] = None, **opts: Any) -> AsyncSandbox:
        if token is None and not opts:
            return await AsyncSandbox.connect(SANDBOX_ID, debug=True, sandbox_url=self.url)
        return AsyncSandbox(**self._sandbox_opts(token, **opts))

    def _sandbox_opts(self, token: Optional[str], **opts: Any) -> Dict[str, Any]:
        # Mirrors Sandbox._cls_connect_sandbox after a successful API call.
        headers = {
            "E2b-Sandbox-Id": SANDBOX_ID,
            "E2b-Sandbox-Port": str(ConnectionConfig.envd_port),
        }
        if token is not None:
            headers["X-Access-Token"] = token
        config = ConnectionConfig(
            debug=True,
            sandbox_url=self.url,
            extra_sandbox_headers=headers,
            **opts,
        )
        return dict(
            sandbox_id=SANDBOX_ID,
            sandbox_domain=None,
            envd_version=ENVD_DEBUG_FALLBACK,
            envd_access_token=token,
            traffic_access_token=None,
            connection_config=config,
        )


# -- host-side process checks (envd runs on this host, so its pids are ours) --


def proc_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(b")", 1)[1].split()[0]
    return state not in (b"Z", b"X")


def pids_with_cmdline(needle: str) -> List[int]:
    """Pids of live processes whose argv contains `needle` as one argument."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if needle.encode() in argv and proc_alive(int(entry)):
            found.append(int(entry))
    return found


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
