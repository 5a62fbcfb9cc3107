#!/bin/bash
# tests/vm/run.sh [--release] [--stress N] [-- extra test-binary args]
#
# The VM end-to-end test, start to finish: host packages (tests/vm/setup.sh),
# the image (tests/vm/build-image.sh, cached under .cache/vm/), then
# tests/vm_e2e.rs under cargo. Exits non-zero on any failure. Run as root.
#
#   --release    test target/release/envd (built if needed) instead of the
#                debug binary cargo builds for the test
#   --stress N   instead of the end-to-end flow, N filesystem-only cycles
#                (write, freeze, kill, cold boot, verify); reports lost writes
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
RELEASE="" STRESS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --release) RELEASE=1; shift ;;
    --stress) STRESS=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run.sh: unknown argument '$1'" >&2; exit 64 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "tests/vm/run.sh: run as root (apt-get, debootstrap)" >&2; exit 1; }
START=$(date +%s)
stamp() { echo "[vm] $* ($(( $(date +%s) - START )) s)" >&2; }

tests/vm/setup.sh
stamp "host packages ready"
# Builds the debug envd too, which an uncached image build packages.
cargo test --test vm_e2e --no-run >&2
if [ -n "$RELEASE" ]; then
  cargo build --release --bin envd >&2
  export ENVD_VM_BINARY=${CARGO_TARGET_DIR:-$REPO/target}/release/envd
fi
stamp "test built"
ENVD_VM_IMAGE=$(tests/vm/build-image.sh | tail -1)
export ENVD_VM_IMAGE
stamp "image ready: $ENVD_VM_IMAGE"

if [ -n "$STRESS" ]; then
  export ENVD_VM_STRESS_CYCLES=$STRESS
  TEST=vm_stress_filesystem_cycles
else
  TEST=vm_e2e_both_resume_paths
fi
status=0
cargo test --test vm_e2e -- --ignored --exact "$TEST" --nocapture --test-threads=1 "$@" || status=$?
stamp "done, exit $status"
exit $status
