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

# Every run sees /run, /dev/shm and /tmp as a machine booted a minute ago
# has them: empty (a boot mounts /run and /dev/shm as new tmpfs and clears
# /tmp). The run goes on in a mount namespace of its own where they are new
# and empty, so whatever a test, the bench, an SDK runner or the VM harness
# needs there has to be created by the script that needs it, and a machine
# where something made it once cannot hide that. The machine's own /run,
# /dev/shm and /tmp are not touched. ENVD_TEST_FRESH_BOOT marks the inner run.
if [[ -z "${ENVD_TEST_FRESH_BOOT:-}" ]]; then
    exec unshare --mount --propagation private -- env ENVD_TEST_FRESH_BOOT=1 bash "$repo/scripts/test.sh" "$@"
fi
fresh_tmp="$(mktemp -d /var/tmp/envd-test-tmp.XXXXXX)"
# --one-file-system: a test that failed to unmount its image under /tmp
# loses nothing but its own files.
trap 'rm -rf --one-file-system "$fresh_tmp"' EXIT
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
# The one thing a boot's tmpfiles make there that the system relies on:
# /var/lock points to it.
install -d -m 1777 /run/lock
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
chmod 1777 "$fresh_tmp"
mount --bind "$fresh_tmp" /tmp

step() { printf '\n==> %s\n' "$*"; }

step "fresh-boot paths: /run, /dev/shm and /tmp are empty"
# (/run/lock is made above; /run/mount is mount(8)'s own record of the
# bind mount.)
leftover="$(find /run /dev/shm /tmp -mindepth 1 -not -path /run/lock -not -path '/run/mount*' | head -5)"
if [[ -n "$leftover" ]]; then
    echo "scripts/test.sh: not a fresh-boot view, found: $leftover" >&2
    exit 1
fi

step "packages the integration tests need"
# iptables: the metadata route's self-heal (tests/mmds_route.rs, in a
# network namespace of the test's own).
if ! command -v iptables >/dev/null; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends iptables
fi

step "build"
cargo build --all-targets

step "lints: rustfmt and clippy (warnings are errors; the [lints] table of Cargo.toml)"
cargo fmt --check
cargo clippy --all-targets -- -D warnings

step "unit and integration tests"
cargo test --no-fail-fast

step "E2B Python SDK against envd"
bash tests/sdk/run.sh

step "E2B JS SDK against envd"
bash tests/sdk-js/run.sh

step "static build in a root without glibc or systemd: the SDK, then OpenRC"
bash tests/static-root/run.sh

step "fuzz smoke run: every fuzz target for a few seconds"
bash scripts/fuzz.sh --smoke

step "benchmark smoke run (every figure produced; speed is not judged)"
bash scripts/bench.sh --quick --out target/bench-quick

if [[ -z "${ENVD_SKIP_VM:-}" && -x tests/vm/run.sh ]]; then
    step "VM end-to-end: memory resume and cold boot"
    # The image is cached outside the clone so fresh clones reuse it.
    ENVD_VM_CACHE="${ENVD_VM_CACHE:-/var/cache/envd-vm}" bash tests/vm/run.sh
fi
