#!/usr/bin/env bash
# Runs the real-SDK interop suite against the envd binary.
#
#   tests/sdk/run.sh [pytest args...]
#
# ENVD_BIN   envd binary (default <repo>/target/debug/envd; built with
#            `cargo build` when that default is missing)
# ENVD_ARGS  replaces the extra flags the harness passes (see envd_harness.py)
# Exit code: pytest's, except that "no tests collected" (5) is a failure.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${ENVD_SDK_VENV:-$repo/.cache/sdk-venv}"

bash "$here/setup.sh" || { echo "run.sh: setup failed" >&2; exit 1; }

if [[ -z "${ENVD_BIN:-}" && ! -x "$repo/target/debug/envd" ]]; then
    echo "run.sh: $repo/target/debug/envd missing; running cargo build" >&2
    (cd "$repo" && cargo build --bin envd) || { echo "run.sh: cargo build failed" >&2; exit 1; }
fi

# Test paths given? Then only those; else the whole suite.
targets=("$here")
for arg in "$@"; do
    if [[ "$arg" != -* && -e "${arg%%::*}" ]]; then targets=(); break; fi
done

cd "$repo"
PYTHONDONTWRITEBYTECODE=1 "$venv/bin/python" -m pytest -p no:cacheprovider \
    -c "$here/pytest.ini" --rootdir "$here" "${targets[@]}" "$@"
rc=$?
if [[ $rc -eq 5 ]]; then
    echo "run.sh: pytest collected no tests; treating as failure" >&2
    exit 1
fi
exit $rc
