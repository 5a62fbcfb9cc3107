#!/bin/bash
# packaging/build-static.sh [--binary PATH] [--out DIR]
#
# Builds envd as one fully static executable (glibc linked in,
# -C target-feature=+crt-static: no loader, no shared library, no NSS
# module; users and groups come from /etc/passwd and /etc/group, read by
# envd itself) and ships it for templates without glibc or systemd
# (Alpine and other musl-based images, OpenRC) as a tarball to unpack at /:
#   usr/bin/envd           the static binary (default: built into
#                          target/x86_64-unknown-linux-gnu/release/envd)
#   etc/init.d/envd        the OpenRC service (packaging/openrc/envd)
#   etc/conf.d/envd        its settings (ENVD_ARGS, empty in a VM)
# Refuses a binary that ldd finds dynamic. Prints the tarball's path (default
# directory target/static/) on stdout.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=lib/release.sh
. "$REPO/packaging/lib/release.sh"
TARGET=x86_64-unknown-linux-gnu
BIN=""
OUT="$REPO/target/static"
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) BIN=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-static.sh: unknown argument '$1'" >&2; exit 64 ;;
  esac
done

if [ -z "$BIN" ]; then
  # The flag goes to the target only (with --target, build scripts and
  # proc macros stay dynamic, as they must), in a target directory of its
  # own, so the dynamic builds are not rebuilt.
  (cd "$REPO" && CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --target "$TARGET" --bin envd >&2)
  BIN="${CARGO_TARGET_DIR:-$REPO/target}/$TARGET/release/envd"
fi
[ -x "$BIN" ] || { echo "build-static.sh: no executable at $BIN" >&2; exit 1; }

# Static: ldd finds no loader and no shared library to name.
if ! ldd "$BIN" 2>&1 | grep -Eq 'statically linked|not a dynamic executable'; then
  echo "build-static.sh: $BIN is dynamically linked:" >&2
  ldd "$BIN" >&2 || true
  exit 1
fi

VERSION=$(release_version "$REPO")
[ -n "$VERSION" ] || { echo "build-static.sh: no version in Cargo.toml" >&2; exit 1; }
SOURCE_DATE_EPOCH=$(release_epoch "$REPO")
export SOURCE_DATE_EPOCH

STAGE=$(mktemp -d "${TMPDIR:-/tmp}/envd-static.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
install -D -m 0755 "$BIN" "$STAGE/usr/bin/envd"
install -D -m 0755 "$REPO/packaging/openrc/envd" "$STAGE/etc/init.d/envd"
install -d -m 0755 "$STAGE/etc/conf.d"
printf '%s\n' '# Flags for envd (see envd --help); none are needed in a VM.' 'ENVD_ARGS=""' >"$STAGE/etc/conf.d/envd"
chmod 0644 "$STAGE/etc/conf.d/envd"

mkdir -p "$OUT"
TARBALL="$OUT/envd-${VERSION}-$(uname -m)-static.tar.gz"
# Reproducible: fixed owner, order and times.
tar --create --gzip --file "$TARBALL" --directory "$STAGE" --owner=0 --group=0 --numeric-owner \
  --sort=name --mtime="@$SOURCE_DATE_EPOCH" usr etc
echo "$TARBALL"
