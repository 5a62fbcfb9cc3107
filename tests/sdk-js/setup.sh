#!/usr/bin/env bash
# Installs the JS SDK interop suite's dependencies (the published e2b JS SDK,
# and for the browser test esbuild and puppeteer-core, pinned with every
# transitive package in package-lock.json) into tests/sdk-js/node_modules
# from the npm registry, and Debian's Chromium (never a browser download).
#
#   tests/sdk-js/setup.sh        # idempotent; a no-op when already installed
#
# Needs node >= 20.18.1 (e2b 2.51.0's engines) and npm. A stamp file holds a
# hash of package.json, package-lock.json and the node version; when it
# matches, nothing is done.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
stamp="$here/node_modules/.envd-sdk-js-stamp"

for tool in node npm; do
    command -v "$tool" >/dev/null || { echo "setup.sh: $tool not found (node >= 20.18.1 and npm are needed)" >&2; exit 1; }
done
if ! node -e '
    const [a, b, c] = process.versions.node.split(".").map(Number)
    const ok = a >= 22 || (a === 20 && (b > 18 || (b === 18 && c >= 1)))
    process.exit(ok ? 0 : 1)'; then
    echo "setup.sh: node $(node --version) is too old; e2b 2.51.0 needs >=20.18.1 <21 || >=22" >&2
    exit 1
fi

if ! command -v "${CHROMIUM:-/usr/bin/chromium}" >/dev/null; then
    echo "setup.sh: installing Debian's chromium for the browser test" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

want="$( { node --version; cat "$here/package.json" "$here/package-lock.json"; } | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -f "$here/node_modules/e2b/package.json" ]]; then
    exit 0
fi

echo "setup.sh: installing $here/node_modules" >&2
# `npm ci`: exactly the lockfile, node_modules rebuilt from scratch. No
# install scripts run (none of these packages needs one).
(cd "$here" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
# Fail here, not in the middle of a test run, if the install is unusable.
(cd "$here" && node --input-type=module -e '
    import { Sandbox } from "e2b"
    import fs from "node:fs"
    const v = JSON.parse(fs.readFileSync("node_modules/e2b/package.json", "utf8")).version
    if (v !== "2.51.0" || typeof Sandbox.connect !== "function") { console.error("setup.sh: unexpected e2b " + v); process.exit(1) }')
echo "$want" > "$stamp"
echo "setup.sh: done" >&2
