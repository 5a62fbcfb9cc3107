"""The static envd, running chrooted in a root of busybox alone, driven
through the real e2b Python SDK: a command as a non-root user, an upload
and a download, a PTY; and the metadata service read by a host name that only
the root's /etc/hosts knows (no NSS module there reads it).

    check_sdk.py URL ROOT MMDS_READS_FILE
"""

import sys
import time
from pathlib import Path

from e2b import PtySize, Sandbox

url, root, mmds_reads = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
sandbox = Sandbox.connect("debug_sandbox_id", debug=True, sandbox_url=url)

# A command as the non-root user the root's /etc/passwd names.
result = sandbox.commands.run('id -un; id -u; id -G; echo "$HOME"; pwd', user="user")
lines = result.stdout.split()
assert lines == ["user", "1000", "1000", "/home/user", "/home/user"], result.stdout
result = sandbox.commands.run("id -un", user="root")
assert result.stdout.strip() == "root", result.stdout

# Upload and download, as that user: the file lands in the root, theirs.
payload = bytes(range(256)) * 4096
sandbox.files.write("/home/user/upload.bin", payload, user="user")
landed = root / "home/user/upload.bin"
assert landed.read_bytes() == payload, "the uploaded file differs"
assert (landed.stat().st_uid, landed.stat().st_gid) == (1000, 1000), landed.stat()
assert sandbox.files.read("/home/user/upload.bin", format="bytes", user="user") == bytes(payload)
names = [entry.name for entry in sandbox.files.list("/home/user", user="user")]
assert "upload.bin" in names, names

# A PTY: the shell answers what is typed into it.
output = bytearray()
terminal = sandbox.pty.create(PtySize(rows=24, cols=80), user="user", timeout=30)
sandbox.pty.send_stdin(terminal.pid, b"echo pty-$((6*7)); exit\n")
terminal.wait(on_pty=output.extend)
assert b"pty-42" in output, bytes(output)

# The metadata service was reached by a name only the root's /etc/hosts knows.
deadline = time.time() + 10
while time.time() < deadline and int(mmds_reads.read_text() or 0) == 0:
    time.sleep(0.2)
assert int(mmds_reads.read_text() or 0) > 0, "envd never read the metadata service by host name"
print("static envd in a busybox root: command as user, upload, download, PTY, metadata by host name: ok")
