#!/usr/bin/env bash
# envd beside OpenSSH and beside the raw operations, in one run on loopback:
# builds the release binaries, starts envd and a private sshd, prints one
# table and writes it as Markdown, JSON and an SVG chart.
#
# Must run as root (envd switches users; sshd needs its privilege
# separation). Installs Debian's openssh-server and sftp-server when missing.
#
#   scripts/bench.sh                 the full run (1 GiB transfers, 1,000 runs)
#   scripts/bench.sh --quick         the smoke test: every figure produced, no speed judged
#   scripts/bench.sh --out DIR       where bench.md, bench.json, bench.svg go (default target/bench)
#   scripts/bench.sh --only exec,bursts   only these groups of figures (ready, footprint, exec,
#                                    streams, files, bursts)
#
# ENVD_BENCH_DIR picks the scratch filesystem for the transfers (default the
# temp dir; the full run needs 2 GiB free there).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

if [[ "$(id -u)" != 0 ]]; then
    echo "scripts/bench.sh: run as root (envd switches users, sshd separates privileges)" >&2
    exit 1
fi

if [[ ! -x /usr/sbin/sshd || ! -x /usr/lib/openssh/sftp-server ]]; then
    echo "==> installing openssh-server (for the comparison)"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        openssh-server openssh-sftp-server openssh-client
fi

# `cargo bench` builds envd and the bench with the release profile; the bench
# runs the envd binary built beside it.
exec cargo bench --bench compare -- "$@"
