#!/usr/bin/env bash
# Runs every test suite: unit and integration tests (the real binary, real
# users, a real ext4 image, real cgroups), the real E2B Python and JS SDKs
# against the daemon, and the end-to-end VM test of both resume paths.
#
# Must run as root. Installs what it needs (Debian packages, a Python
# virtualenv with the SDK, the JS SDK from npm, a cached VM image) on first use.
#
#   scripts/test.sh            everything
#   ENVD_SKIP_VM=1 scripts/test.sh   everything but the VM test
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

if [[ "$(id -u)" != 0 ]]; then
    echo "scripts/test.sh: run as root (envd switches users, mounts, freezes)" >&2
    exit 1
fi

step() { printf '\n==> %s\n' "$*"; }

step "build"
cargo build --all-targets

step "unit and integration tests"
cargo test --no-fail-fast

step "E2B Python SDK against envd"
bash tests/sdk/run.sh

step "E2B JS SDK against envd"
bash tests/sdk-js/run.sh

step "fuzz smoke run: every fuzz target for a few seconds"
bash scripts/fuzz.sh --smoke

step "benchmark smoke run (every figure produced; speed is not judged)"
bash scripts/bench.sh --quick --out target/bench-quick

if [[ -z "${ENVD_SKIP_VM:-}" && -x tests/vm/run.sh ]]; then
    step "VM end-to-end: memory resume and cold boot"
    # The image is cached outside the clone so fresh clones reuse it.
    ENVD_VM_CACHE="${ENVD_VM_CACHE:-/var/cache/envd-vm}" bash tests/vm/run.sh
fi
