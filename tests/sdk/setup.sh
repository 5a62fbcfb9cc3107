#!/usr/bin/env bash
# Creates (or reuses) the virtualenv for the real-SDK interop suite.
#
#   tests/sdk/setup.sh            # idempotent; fast when already complete
#
# Location: $ENVD_SDK_VENV, else <repo>/.cache/sdk-venv (ignored by git).
# Interpreter: $PYTHON, else python3 (must be >= 3.11: e2b 2.63 uses
# typing.Unpack/Self). Packages come from PyPI only, pinned in
# requirements.txt. A stamp file holds a hash of the requirements and of the
# interpreter version; when it matches, nothing is done.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${ENVD_SDK_VENV:-$repo/.cache/sdk-venv}"
python="${PYTHON:-python3}"
requirements="$here/requirements.txt"
stamp="$venv/.envd-sdk-stamp"

if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
    echo "setup.sh: $python is $("$python" --version 2>&1); the e2b SDK needs Python >= 3.11" >&2
    exit 1
fi

want="$( { "$python" -c 'import sys; print(sys.version)'; cat "$requirements"; } | sha256sum | cut -d' ' -f1)"

if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi

echo "setup.sh: building $venv" >&2
mkdir -p "$(dirname "$venv")"
# --clear: a half-built venv from an interrupted run is started over.
"$python" -m venv --clear "$venv"
"$venv/bin/python" -m pip install --quiet --no-input --disable-pip-version-check \
    -r "$requirements"
# Fail here, not in the middle of a test run, if the install is unusable.
"$venv/bin/python" -c 'import e2b, pytest, pytest_asyncio, pytest_timeout'
echo "$want" > "$stamp"
echo "setup.sh: done" >&2
