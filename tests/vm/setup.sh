#!/bin/bash
# tests/vm/setup.sh: host packages for the VM end-to-end test, all from
# Debian. Idempotent; returns at once when everything is already there.
set -euo pipefail
PKGS="qemu-system-x86 debootstrap socat cpio e2fsprogs binutils"

installed() {
  local p
  for p in $PKGS; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || return 1
  done
}
# build-image.sh reads the kernel version from the package lists.
have_lists() {
  apt-cache depends linux-image-cloud-amd64 2>/dev/null | grep -q 'Depends: linux-image-'
}

if installed && have_lists; then
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "tests/vm/setup.sh: needs root for apt-get" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $PKGS >/dev/null
installed
