#!/bin/bash
# packaging/build-deb.sh [--binary PATH] [--out DIR]
#
# Builds the envd Debian package with plain dpkg-deb (no cargo-deb):
#   /usr/bin/envd                        the binary (default target/release/envd;
#                                        built with `cargo build --release` when missing)
#   /lib/systemd/system/envd.service     systemd/envd.service
#   postinst                             enables the unit (deb-systemd-helper, as
#                                        debhelper does), restarts it on a live system
# Prints the path of the .deb (default directory target/debian/) on stdout.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=lib/release.sh
. "$REPO/packaging/lib/release.sh"
BIN=""
OUT="$REPO/target/debian"
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) BIN=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-deb.sh: unknown argument '$1'" >&2; exit 64 ;;
  esac
done

if [ -z "$BIN" ]; then
  BIN="$REPO/target/release/envd"
  if [ ! -x "$BIN" ]; then
    echo "build-deb.sh: $BIN missing, running cargo build --release" >&2
    (cd "$REPO" && cargo build --release --bin envd >&2)
  fi
fi
[ -x "$BIN" ] || { echo "build-deb.sh: no executable at $BIN" >&2; exit 1; }

VERSION=$(release_version "$REPO")
[ -n "$VERSION" ] || { echo "build-deb.sh: no version in Cargo.toml" >&2; exit 1; }
ARCH=$(dpkg --print-architecture)
# The newest glibc symbol version the binary needs; none for a static build.
GLIBC=$(objdump -T "$BIN" 2>/dev/null | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -Vu | tail -1 || true)
SOURCE_DATE_EPOCH=$(release_epoch "$REPO")
export SOURCE_DATE_EPOCH

STAGE=$(mktemp -d "${TMPDIR:-/tmp}/envd-deb.XXXXXX")
chmod 0755 "$STAGE"
trap 'rm -rf "$STAGE"' EXIT
install -D -m 0755 "$BIN" "$STAGE/usr/bin/envd"
install -D -m 0644 "$REPO/systemd/envd.service" "$STAGE/lib/systemd/system/envd.service"
mkdir -p "$STAGE/DEBIAN"

{
  echo "Package: envd"
  echo "Version: $VERSION"
  echo "Architecture: $ARCH"
  echo "Maintainer: envd developers <envd@localhost>"
  echo "Section: admin"
  echo "Priority: optional"
  echo "Installed-Size: $(du -sk --apparent-size "$STAGE/usr" "$STAGE/lib" | awk '{s+=$1} END {print s}')"
  [ -z "$GLIBC" ] || echo "Depends: libc6 (>= $GLIBC)"
  # /init's NFS volumes need mount.nfs; its CA goes into the system bundle.
  echo "Recommends: nfs-common, ca-certificates"
  echo "Description: sandbox agent for E2B-compatible microVMs"
  echo " envd runs inside every sandbox VM and serves processes, terminals and"
  echo " files to the E2B SDKs and the orchestrator over Connect on port 49983."
  echo " It is started early at boot by systemd (envd.service)."
} > "$STAGE/DEBIAN/control"

# Maintainer scripts. Under `dpkg --root` they run chrooted into the target
# root, where no systemd is running: enabling is then only the symlink.
cat > "$STAGE/DEBIAN/postinst" <<'SCRIPT'
#!/bin/sh
set -e
if [ "$1" = configure ] || [ "$1" = abort-upgrade ] || [ "$1" = abort-deconfigure ] || [ "$1" = abort-remove ]; then
  if command -v deb-systemd-helper >/dev/null 2>&1; then
    deb-systemd-helper unmask envd.service >/dev/null || true
    deb-systemd-helper enable envd.service >/dev/null || true
  else
    mkdir -p /etc/systemd/system/sysinit.target.wants
    ln -sf /lib/systemd/system/envd.service /etc/systemd/system/sysinit.target.wants/envd.service
  fi
  if [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null || true
    # KillMode=process: restarting envd leaves the user's processes running.
    systemctl restart envd.service || true
  fi
fi
exit 0
SCRIPT
cat > "$STAGE/DEBIAN/prerm" <<'SCRIPT'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
  systemctl stop envd.service || true
fi
exit 0
SCRIPT
cat > "$STAGE/DEBIAN/postrm" <<'SCRIPT'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
  systemctl --system daemon-reload >/dev/null || true
fi
if [ "$1" = remove ] && command -v deb-systemd-helper >/dev/null 2>&1; then
  deb-systemd-helper mask envd.service >/dev/null || true
fi
if [ "$1" = purge ]; then
  if command -v deb-systemd-helper >/dev/null 2>&1; then
    deb-systemd-helper purge envd.service >/dev/null || true
    deb-systemd-helper unmask envd.service >/dev/null || true
  fi
  rm -f /etc/systemd/system/sysinit.target.wants/envd.service
  rm -rf /var/lib/envd
fi
exit 0
SCRIPT
chmod 0755 "$STAGE/DEBIAN/postinst" "$STAGE/DEBIAN/prerm" "$STAGE/DEBIAN/postrm"

mkdir -p "$OUT"
DEB="$(cd "$OUT" && pwd)/envd_${VERSION}_${ARCH}.deb"
dpkg-deb --root-owner-group -Zxz -z6 --build "$STAGE" "$DEB" >/dev/null
echo "$DEB"
