#!/usr/bin/env bash
# Runs the JS SDK interop suite (node's built-in test runner) against the
# envd binary.
#
#   tests/sdk-js/run.sh                                  # setup + every test file
#   tests/sdk-js/run.sh tests/sdk-js/test/pty.test.mjs   # only these files
#   tests/sdk-js/run.sh --test-name-pattern=watch        # extra args go to node
#
# ENVD_BIN   envd binary (default <repo>/target/debug/envd; built with
#            `cargo build` when that default is missing)
# ENVD_ARGS  replaces the extra flags the harness passes (see harness.mjs)
# Exit code: node's, and 1 when no test ran.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

bash "$here/setup.sh" || { echo "run.sh: setup failed" >&2; exit 1; }

if [[ -z "${ENVD_BIN:-}" && ! -x "$repo/target/debug/envd" ]]; then
    echo "run.sh: $repo/target/debug/envd missing; running cargo build" >&2
    (cd "$repo" && cargo build --bin envd) || { echo "run.sh: cargo build failed" >&2; exit 1; }
fi

# The harness points every handle at its own envd; nothing from the caller's
# environment may redirect the SDK elsewhere.
unset E2B_DEBUG E2B_SANDBOX_URL E2B_API_KEY E2B_ACCESS_TOKEN E2B_DOMAIN E2B_API_URL

files=()
args=()
for arg in "$@"; do
    if [[ "$arg" != -* && -f "$arg" ]]; then files+=("$(cd "$(dirname "$arg")" && pwd)/$(basename "$arg")"); else args+=("$arg"); fi
done
if [[ ${#files[@]} -eq 0 ]]; then files=("$here"/test/*.test.mjs); fi

tap="$(mktemp)"
trap 'rm -f "$tap"' EXIT
cd "$here"
node --test --test-timeout=120000 \
    --test-reporter=spec --test-reporter-destination=stdout \
    --test-reporter=tap --test-reporter-destination="$tap" \
    "${args[@]}" "${files[@]}"
rc=$?
passed="$(sed -n 's/^# pass \([0-9]*\)$/\1/p' "$tap" | tail -1)"
failed="$(sed -n 's/^# fail \([0-9]*\)$/\1/p' "$tap" | tail -1)"
if [[ $(( ${passed:-0} + ${failed:-0} )) -eq 0 ]]; then
    echo "run.sh: no test ran; treating as failure" >&2
    exit 1
fi
exit $rc
