"""Fixtures for the real-SDK interop suite: a real envd, real e2b handles.

* `envd`           session-wide envd (default user `envdtest`), shared by
                   every module that does not change its state;
* `fresh_envd`     a brand-new envd for one test (for /init and token tests,
                   whose effects must not leak);
* `sandbox`        a sync `e2b.Sandbox` on `envd` (debug mode, no API);
* `async_sandbox`  an `e2b.AsyncSandbox` on `envd`;
* `post_init`      POST /init with a JSON body to `envd`;
* `test_user`      the passwd entry of the default user.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Debug mode: no E2B API calls, plain http to the sandbox URL. Set before the
# SDK is imported (some of its settings are read at import time).
os.environ["E2B_DEBUG"] = "true"
for _var in ("E2B_SANDBOX_URL", "E2B_API_KEY", "E2B_ACCESS_TOKEN", "E2B_HTTP_VERSION"):
    os.environ.pop(_var, None)

from envd_harness import TEST_USER, Envd, ensure_test_user, envd_binary  # noqa: E402


def pytest_report_header(config):
    return [f"envd binary: {envd_binary()}", f"default user: {TEST_USER}"]


@pytest.fixture(scope="session")
def log_dir() -> Path:
    path = Path(os.environ.get("ENVD_TEST_LOG_DIR") or tempfile.mkdtemp(prefix="envd-sdk-logs-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def test_user():
    if os.geteuid() != 0:
        pytest.fail("the SDK interop tests run envd as root; run them as root")
    return ensure_test_user()


def _new_envd(log_dir: Path, name: str) -> Envd:
    return Envd(binary=envd_binary(), default_user=TEST_USER, log_dir=log_dir, name=name)


@pytest.fixture(scope="session")
def envd(test_user, log_dir):
    daemon = _new_envd(log_dir, "envd-shared").start()
    yield daemon
    daemon.cleanup()


@pytest.fixture
def fresh_envd(test_user, log_dir, request):
    name = "envd-" + request.node.name.replace("[", "-").replace("]", "").replace("/", "_")[:60]
    daemon = _new_envd(log_dir, name).start()
    yield daemon
    daemon.cleanup()


@pytest.fixture(autouse=True)
def _envd_must_survive(request):
    """A test that crashed the shared daemon fails, with the daemon's log."""
    yield
    if "envd" in request.fixturenames:
        daemon = request.getfixturevalue("envd")
        if not daemon.alive():
            log = daemon.log_tail()
            daemon.start()  # later tests get a working daemon again
            pytest.fail(f"envd died during this test; log tail:\n{log}")


@pytest.fixture
def sandbox(envd):
    return envd.sandbox()


@pytest.fixture
async def async_sandbox(envd):
    return await envd.async_sandbox()


@pytest.fixture
def post_init(envd):
    return envd.post_init
