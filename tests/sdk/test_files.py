"""`sandbox.files` of the e2b 2.63 SDK (sync and async) against the real envd.

Covers CONTRACT.md 3.10-3.13 (Filesystem service, EntryInfo, watchers) and
4.6-4.8, 5.5 (/files with gzip, metadata, signed URLs), the way users call
them. Every path lives under a per-test scratch directory.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pytest
from e2b import (
    AuthenticationException,
    FileNotFoundException,
    FileType,
    FilesystemEventType,
    InvalidArgumentException,
    NotFoundException,
)

from envd_harness import wait_until


@pytest.fixture
def scratch(test_user):
    """A fresh directory owned by root; removed afterwards."""
    path = f"/tmp/envd-sdk-files-{uuid.uuid4().hex[:10]}"
    os.makedirs(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- write and read ------------------------------------------------------------


def test_write_and_read_text_and_bytes(sandbox, scratch, test_user):
    info = sandbox.files.write(f"{scratch}/a/b/hello.txt", "héllo\n")
    assert (info.name, info.path, info.type) == ("hello.txt", f"{scratch}/a/b/hello.txt", FileType.FILE)
    assert sandbox.files.read(f"{scratch}/a/b/hello.txt") == "héllo\n"
    st = os.stat(f"{scratch}/a/b/hello.txt")
    assert (st.st_uid, st.st_gid) == (test_user.pw_uid, test_user.pw_gid), "owned by the default user"
    assert os.stat(f"{scratch}/a").st_uid == test_user.pw_uid, "created parents too"

    payload = bytes(range(256)) * 1000
    sandbox.files.write(f"{scratch}/blob.bin", payload)
    assert bytes(sandbox.files.read(f"{scratch}/blob.bin", format="bytes")) == payload
    assert b"".join(sandbox.files.read(f"{scratch}/blob.bin", format="stream")) == payload
    assert bytes(sandbox.files.read(f"{scratch}/blob.bin", format="bytes", gzip=True)) == payload


def test_streams_iterables_and_gzip_uploads(sandbox, scratch):
    data = os.urandom(3 << 20)
    sandbox.files.write(f"{scratch}/stream.bin", io.BytesIO(data))
    assert bytes(sandbox.files.read(f"{scratch}/stream.bin", format="bytes")) == data
    chunks = [b"chunk-%d;" % i for i in range(1000)]
    sandbox.files.write(f"{scratch}/iter.txt", iter(chunks))
    assert sandbox.files.read(f"{scratch}/iter.txt") == b"".join(chunks).decode()
    sandbox.files.write(f"{scratch}/gz.txt", "compressed " * 1000, gzip=True)
    assert sandbox.files.read(f"{scratch}/gz.txt") == "compressed " * 1000
    sandbox.files.write(f"{scratch}/octet.txt", "plain", use_octet_stream=True)
    assert sandbox.files.read(f"{scratch}/octet.txt") == "plain"


def test_write_many_files_in_one_request(sandbox, scratch):
    entries = [{"path": f"{scratch}/many/{i}.txt", "data": f"file {i}"} for i in range(5)]
    infos = sandbox.files.write_files(entries)
    assert [i.name for i in infos] == [f"{i}.txt" for i in range(5)]
    for i in range(5):
        assert sandbox.files.read(f"{scratch}/many/{i}.txt") == f"file {i}"


def test_metadata_round_trip(sandbox, scratch):
    info = sandbox.files.write(f"{scratch}/m.txt", "x", metadata={"Owner": "alice", "stage": "raw"})
    assert info.metadata == {"owner": "alice", "stage": "raw"}
    assert sandbox.files.get_info(f"{scratch}/m.txt").metadata == {"owner": "alice", "stage": "raw"}
    with pytest.raises(InvalidArgumentException):
        sandbox.files.write(f"{scratch}/bad.txt", "x", metadata={"k": "caf\u00e9"})
    assert not os.path.exists(f"{scratch}/bad.txt")


def test_read_errors(sandbox, scratch):
    with pytest.raises(FileNotFoundException):
        sandbox.files.read(f"{scratch}/missing.txt")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.read(scratch)
    with pytest.raises(InvalidArgumentException):
        sandbox.files.read("~root/x")
    with pytest.raises(AuthenticationException):
        sandbox.files.read(f"{scratch}/missing.txt", user="no-such-user-xyz")


# -- entries -----------------------------------------------------------------


def test_list_exists_info_and_symlinks(sandbox, scratch):
    os.makedirs(f"{scratch}/d/e/f")
    with open(f"{scratch}/d/file.txt", "w") as f:
        f.write("12345")
    os.symlink(f"{scratch}/d/file.txt", f"{scratch}/link")
    os.symlink("nowhere", f"{scratch}/broken")

    top = sandbox.files.list(scratch)
    assert [e.name for e in top] == ["d", "link"], "broken links are dropped by the SDK"
    deep = sandbox.files.list(scratch, depth=3)
    assert [e.path[len(scratch):] for e in deep] == ["/d", "/d/e", "/d/e/f", "/d/file.txt", "/link"]

    info = sandbox.files.get_info(f"{scratch}/d/file.txt")
    assert (info.type, info.size, info.permissions, info.owner) == (FileType.FILE, 5, "-rw-r--r--", "root")
    assert abs(info.modified_time.timestamp() - os.stat(f"{scratch}/d/file.txt").st_mtime) < 1
    link = sandbox.files.get_info(f"{scratch}/link")
    assert link.type == FileType.SYMLINK
    assert link.symlink_target == f"{scratch}/d/file.txt"

    assert sandbox.files.exists(f"{scratch}/d")
    assert not sandbox.files.exists(f"{scratch}/nope")
    with pytest.raises(FileNotFoundException):
        sandbox.files.get_info(f"{scratch}/nope")


def test_make_dir_rename_remove(sandbox, scratch, test_user):
    assert sandbox.files.make_dir(f"{scratch}/x/y") is True
    assert sandbox.files.make_dir(f"{scratch}/x/y") is False, "an existing directory"
    assert os.stat(f"{scratch}/x/y").st_uid == test_user.pw_uid
    sandbox.files.write(f"{scratch}/x/y/f.txt", "moved")
    info = sandbox.files.rename(f"{scratch}/x/y/f.txt", f"{scratch}/z/new.txt")
    assert (info.name, info.path) == ("new.txt", f"{scratch}/z/new.txt")
    assert sandbox.files.read(f"{scratch}/z/new.txt") == "moved"
    with pytest.raises(NotFoundException):
        sandbox.files.rename(f"{scratch}/gone", f"{scratch}/g2")
    sandbox.files.remove(f"{scratch}/x")
    assert not os.path.exists(f"{scratch}/x")
    sandbox.files.remove(f"{scratch}/x")  # missing is fine


def test_relative_paths_use_the_home(sandbox, test_user):
    name = f"envd-sdk-rel-{uuid.uuid4().hex[:8]}.txt"
    try:
        info = sandbox.files.write(name, "home")
        assert info.path == os.path.join(test_user.pw_dir, name)
        assert sandbox.files.read(f"~/{name}") == "home"
    finally:
        sandbox.files.remove(name)


# -- watchers ----------------------------------------------------------------


def test_sync_watch_dir_polls_recursive_events(sandbox, scratch):
    handle = sandbox.files.watch_dir(scratch, recursive=True)
    try:
        os.makedirs(f"{scratch}/sub")
        time.sleep(0.2)
        with open(f"{scratch}/sub/new.txt", "w") as f:
            f.write("x")
        events = []

        def seen():
            events.extend(handle.get_new_events())
            return any(e.name == "sub/new.txt" and e.type == FilesystemEventType.WRITE for e in events)

        assert wait_until(seen, timeout=10), events
        names = [(e.name, e.type) for e in events]
        assert ("sub", FilesystemEventType.CREATE) in names
        assert ("sub/new.txt", FilesystemEventType.CREATE) in names
    finally:
        handle.stop()


def test_sync_watch_then_write_then_poll_sees_every_event(sandbox, scratch):
    """The upstream suite's iterated watch: `watch_dir`, `write`, then one
    `get_new_events` with no pause, which must hold the new file's three
    events (create, chmod, write). Repeated, since a poll answered before
    envd read the last inotify records misses some only now and then."""
    for round_ in range(100):
        watched = f"{scratch}/iterated-{round_}"
        sandbox.files.make_dir(watched)
        handle = sandbox.files.watch_dir(watched)
        try:
            sandbox.files.write(f"{watched}/f.txt", "This file will be watched.")
            events = [(e.name, e.type) for e in handle.get_new_events()]
            assert events == [
                ("f.txt", FilesystemEventType.CREATE),
                ("f.txt", FilesystemEventType.CHMOD),
                ("f.txt", FilesystemEventType.WRITE),
            ], f"round {round_}"
        finally:
            handle.stop()


def test_sync_watch_dir_on_a_file_fails(sandbox, scratch):
    with open(f"{scratch}/f", "w"):
        pass
    with pytest.raises(InvalidArgumentException):
        sandbox.files.watch_dir(f"{scratch}/f")


async def test_async_write_read_and_streaming_watch(async_sandbox, scratch):
    events = []
    handle = await async_sandbox.files.watch_dir(scratch, on_event=events.append, recursive=True, include_entry=True)
    try:
        await async_sandbox.files.write(f"{scratch}/deep/a.txt", "async")
        assert await async_sandbox.files.read(f"{scratch}/deep/a.txt") == "async"
        for _ in range(100):
            if any(e.name == "deep/a.txt" for e in events):
                break
            await asyncio.sleep(0.05)
        created = [e for e in events if e.name == "deep/a.txt" and e.type == FilesystemEventType.CREATE]
        assert created, events
        assert any(e.name == "deep" for e in events)
    finally:
        await handle.stop()
    entries = await async_sandbox.files.list(scratch, depth=2)
    assert [e.name for e in entries] == ["deep", "a.txt"]


# -- signed URLs --------------------------------------------------------------


def _local(url: str, envd) -> str:
    """The SDK builds URLs for the sandbox host; point them at this envd."""
    parts = urllib.parse.urlsplit(url)
    base = urllib.parse.urlsplit(envd.url)
    return urllib.parse.urlunsplit((base.scheme, base.netloc, parts.path, parts.query, ""))


def _fetch(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_signed_download_and_upload_urls(fresh_envd, scratch):
    token = uuid.uuid4().hex + uuid.uuid4().hex
    assert fresh_envd.post_init({"accessToken": token}).status == 204
    sbx = fresh_envd.sandbox(token=token)
    sbx.files.write(f"{scratch}/s.txt", "signed content")

    status, body = _fetch(_local(sbx.download_url(f"{scratch}/s.txt"), fresh_envd))
    assert (status, body) == (200, b"signed content")
    status, _ = _fetch(_local(sbx.download_url(f"{scratch}/s.txt", use_signature_expiration=60), fresh_envd))
    assert status == 200
    status, body = _fetch(_local(sbx.download_url(f"{scratch}/s.txt", use_signature_expiration=-10), fresh_envd))
    assert status == 401 and b"expired" in body
    tampered = _local(sbx.download_url(f"{scratch}/s.txt"), fresh_envd).replace("s.txt", "t.txt", 1)
    assert _fetch(tampered)[0] == 401
    unsigned = f"{fresh_envd.url}/files?path={urllib.parse.quote(scratch + '/s.txt')}"
    assert _fetch(unsigned)[0] == 401

    boundary = "sdkboundary"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"u.txt\"\r\n\r\n"
        f"uploaded via url\r\n--{boundary}--\r\n"
    ).encode()
    url = _local(sbx.upload_url(f"{scratch}/u.txt"), fresh_envd)
    status, _ = _fetch(url, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200
    assert sbx.files.read(f"{scratch}/u.txt") == "uploaded via url"
