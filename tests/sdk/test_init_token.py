"""POST /init (4.5) and the access token (5.1) as the SDK experiences them.

Each test gets its own envd (`fresh_envd`), so a token or default user set
here never reaches another test. envd runs with --dev: no MMDS, so the
/init authorisation table reduces to "first /init is free; afterwards the
request must carry the current token".
"""

from __future__ import annotations

import datetime
import secrets

import pytest
from e2b import AuthenticationException

TOKEN_HEX_LEN = 64


def new_token() -> str:
    token = secrets.token_hex(32)
    assert len(token) == TOKEN_HEX_LEN
    return token


def rfc3339(offset_seconds: float = 0.0) -> str:
    now = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=offset_seconds)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"  # nanosecond form, as the orchestrator sends


def test_init_empty_body_is_204_with_version_header(fresh_envd):
    res = fresh_envd.post_init(b"")
    assert res.status == 204, res.body
    version = res.headers.get("x-envd-version", "")
    assert version and version.count(".") == 2 and not version.startswith("v"), version
    assert fresh_envd.post_init({}).status == 204


def test_init_invalid_json_is_400(fresh_envd):
    res = fresh_envd.post_init(b"{not json")
    assert res.status == 400
    assert "x-envd-version" in res.headers


def test_token_enforced_for_sdk(fresh_envd):
    open_sbx = fresh_envd.sandbox()
    assert open_sbx.commands.run("echo before").stdout == "before\n"

    token = new_token()
    res = fresh_envd.post_init({"accessToken": token})
    assert res.status == 204, res.body

    # Without the token: every RPC is refused with a plain 401 (5.1), which
    # the SDK maps to AuthenticationException for unary and streaming calls.
    with pytest.raises(AuthenticationException):
        open_sbx.commands.run("echo nope")
    with pytest.raises(AuthenticationException):
        open_sbx.commands.list()
    with pytest.raises(AuthenticationException):
        open_sbx.commands.kill(1)  # not "False": auth comes before lookup

    # A wrong token is refused the same way.
    wrong = fresh_envd.sandbox(token=new_token())
    with pytest.raises(AuthenticationException):
        wrong.commands.run("echo nope")

    # With the token the SDK works.
    good = fresh_envd.sandbox(token=token)
    assert good.commands.run("echo with-token").stdout == "with-token\n"
    handle = good.commands.run("cat", background=True, stdin=True)
    good.commands.send_stdin(handle.pid, "x\n")
    good.commands.close_stdin(handle.pid)
    assert handle.wait().stdout == "x\n"
    assert good.is_running()

    # /health stays open (exempt).
    assert fresh_envd.http("GET", "/health").status == 204
    assert open_sbx.is_running()


def test_unauthorised_rpc_is_plain_401_json(fresh_envd):
    token = new_token()
    assert fresh_envd.post_init({"accessToken": token}).status == 204
    res = fresh_envd.http(
        "POST",
        "/process.Process/List",
        b"{}",
        {"Content-Type": "application/json", "Connect-Protocol-Version": "1"},
    )
    assert res.status == 401
    body = res.json()
    assert body["code"] == 401  # an integer, not a Connect code string
    assert isinstance(body["message"], str) and body["message"]
    ok = fresh_envd.http(
        "POST",
        "/process.Process/List",
        b"{}",
        {"Content-Type": "application/json", "Connect-Protocol-Version": "1", "X-Access-Token": token},
    )
    assert ok.status == 200, ok.body


@pytest.mark.asyncio
async def test_token_enforced_for_async_sdk(fresh_envd):
    token = new_token()
    assert fresh_envd.post_init({"accessToken": token}).status == 204
    with pytest.raises(AuthenticationException):
        await (await fresh_envd.async_sandbox()).commands.run("true")
    sbx = await fresh_envd.async_sandbox(token=token)
    assert (await sbx.commands.run("echo ok")).stdout == "ok\n"
    handle = await sbx.commands.run("cat", background=True, stdin=True)
    async with sbx.commands.stream_input(handle.pid) as stream:
        await stream.send("streamed\n")
    await handle.close_stdin()
    assert (await handle.wait()).stdout == "streamed\n"


def test_token_cannot_be_cleared_or_replaced_without_it(fresh_envd):
    token = new_token()
    assert fresh_envd.post_init({"accessToken": token}).status == 204
    # No token in the body: "access token reset not authorized".
    assert fresh_envd.post_init({}).status == 401
    # A different token: "access token validation failed".
    assert fresh_envd.post_init({"accessToken": new_token()}).status == 401
    # The X-Access-Token header is not what /init checks; the body is.
    assert fresh_envd.post_init({}, headers={"X-Access-Token": token}).status == 401
    # The old token still works for the SDK.
    assert fresh_envd.sandbox(token=token).commands.run("echo still").stdout == "still\n"
    # Re-sending the same token (a resume) is allowed.
    assert fresh_envd.post_init({"accessToken": token}).status == 204


def test_init_env_vars_reach_commands(fresh_envd):
    res = fresh_envd.post_init({"envVars": {"INIT_A": "alpha", "INIT_B": "beta"}})
    assert res.status == 204, res.body
    sbx = fresh_envd.sandbox()
    out = sbx.commands.run('echo "$INIT_A $INIT_B"').stdout
    assert out == "alpha beta\n"
    # Per-call envs override /init's (3.2 ordering).
    out = sbx.commands.run('echo "$INIT_A"', envs={"INIT_A": "override"}).stdout
    assert out == "override\n"
    # A later /init replaces the set: INIT_B disappears.
    assert fresh_envd.post_init({"envVars": {"INIT_A": "again"}}).status == 204
    out = sbx.commands.run('echo "${INIT_A}|${INIT_B-unset}"').stdout
    assert out == "again|unset\n"


def test_init_default_user_and_workdir(fresh_envd, test_user):
    sbx = fresh_envd.sandbox()
    assert sbx.commands.run("whoami").stdout == test_user.pw_name + "\n"
    res = fresh_envd.post_init({"defaultUser": "root", "defaultWorkdir": "/tmp"})
    assert res.status == 204, res.body
    out = sbx.commands.run('whoami; pwd; echo "$HOME"').stdout
    assert out == "root\n/tmp\n/root\n"
    # Explicit user still wins; cwd stays the default workdir for an empty cwd.
    out = sbx.commands.run("whoami; pwd", user=test_user.pw_name).stdout
    assert out == f"{test_user.pw_name}\n/tmp\n"
    # An empty defaultUser does not reset it.
    assert fresh_envd.post_init({"defaultUser": ""}).status == 204
    assert sbx.commands.run("whoami").stdout == "root\n"


def test_stale_init_changes_nothing(fresh_envd):
    token = new_token()
    newer, older = rfc3339(0), rfc3339(-1)
    body = {"accessToken": token, "timestamp": newer, "envVars": {"STALE": "first"}}
    assert fresh_envd.post_init(body).status == 204
    body = {"accessToken": token, "timestamp": older, "envVars": {"STALE": "second"}}
    assert fresh_envd.post_init(body).status == 204  # accepted, but ignored
    sbx = fresh_envd.sandbox(token=token)
    assert sbx.commands.run('echo "$STALE"').stdout == "first\n"


def test_default_user_survives_restart_via_state_file(fresh_envd, test_user):
    """DESIGN.md: defaultUser/envVars from /init are persisted and reloaded."""
    res = fresh_envd.post_init({"defaultUser": "root", "envVars": {"KEPT": "yes"}})
    assert res.status == 204
    # Restart on the same state dir (the cold-boot path), without a new /init.
    fresh_envd.restart()
    out = fresh_envd.sandbox().commands.run('whoami; echo "$KEPT"').stdout
    assert out == "root\nyes\n"


def test_commands_fail_cleanly_after_token_without_it(fresh_envd):
    """A background handle opened before /init set a token keeps its stream;
    new calls without the token are refused."""
    sbx = fresh_envd.sandbox()
    handle = sbx.commands.run("sleep 1; echo done", background=True)
    token = new_token()
    assert fresh_envd.post_init({"accessToken": token}).status == 204
    assert handle.wait().stdout == "done\n"
    with pytest.raises(AuthenticationException):
        sbx.commands.connect(handle.pid)
    with pytest.raises(AuthenticationException):
        sbx.commands.run("exit 1")
