#!/bin/bash
# packaging/bake-rootfs.sh [options] OUTPUT.img
#
# Bakes envd into a root filesystem template and writes it as an ext4 image
# (mke2fs -d: no mount, no loop device). Run as root.
#
#   --rootfs DIR     start from this root filesystem directory (changed in
#                    place: envd is installed into it, the user is added).
#                    Without it, a minimal Debian bookworm (minbase + systemd)
#                    is built with debootstrap in a scratch directory.
#   --include PKGS   extra Debian packages for the debootstrap root (comma-separated)
#   --tarball FILE   debootstrap from a --make-tarball archive instead of the mirror
#   --deb FILE       the envd package (default: packaging/build-deb.sh builds
#                    it from target/release/envd)
#   --user NAME      the template's default user (default: user, uid 1000,
#                    home /home/NAME, bash)
#   --size SIZE      image size as mke2fs takes it (default: 2G; the file is sparse)
#
# The image boots with the kernel's root= pointing at it; systemd then
# starts envd (envd.service, enabled into sysinit.target) on every boot.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=lib/rootfs.sh
. "$REPO/packaging/lib/rootfs.sh"

ROOTFS="" INCLUDE="" TARBALL="" DEB="" USERNAME=user SIZE=2G OUTPUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --rootfs) ROOTFS=$2; shift 2 ;;
    --include) INCLUDE=$2; shift 2 ;;
    --tarball) TARBALL=$2; shift 2 ;;
    --deb) DEB=$2; shift 2 ;;
    --user) USERNAME=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "bake-rootfs.sh: unknown option '$1'" >&2; exit 64 ;;
    *) [ -z "$OUTPUT" ] || { echo "bake-rootfs.sh: one output image only" >&2; exit 64; }; OUTPUT=$1; shift ;;
  esac
done
[ -n "$OUTPUT" ] || { echo "usage: bake-rootfs.sh [--rootfs DIR] [--deb FILE] [--user NAME] [--size SIZE] OUTPUT.img" >&2; exit 64; }
[ "$(id -u)" = 0 ] || { echo "bake-rootfs.sh: run as root (debootstrap, chroot, file ownership)" >&2; exit 1; }

SCRATCH=""
trap '[ -z "$SCRATCH" ] || rm -rf "$SCRATCH"' EXIT
if [ -z "$ROOTFS" ]; then
  SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/envd-rootfs.XXXXXX")
  ROOTFS=$SCRATCH/rootfs
  echo "bake-rootfs.sh: debootstrap bookworm into $ROOTFS" >&2
  rootfs_debootstrap "$ROOTFS" "$INCLUDE" "$TARBALL"
  printf '/dev/root / ext4 rw,relatime 0 1\n' > "$ROOTFS/etc/fstab"
  echo sandbox > "$ROOTFS/etc/hostname"
  printf '127.0.0.1 localhost\n127.0.1.1 sandbox\n' > "$ROOTFS/etc/hosts"
fi
[ -d "$ROOTFS" ] || { echo "bake-rootfs.sh: $ROOTFS is not a directory" >&2; exit 1; }

[ -n "$DEB" ] || DEB=$("$REPO/packaging/build-deb.sh")
rootfs_install_deb "$ROOTFS" "$DEB"
rootfs_add_default_user "$ROOTFS" "$USERNAME"
[ -z "$SCRATCH" ] || rootfs_slim "$ROOTFS"
rootfs_make_image "$ROOTFS" "$OUTPUT" "$SIZE"
echo "bake-rootfs.sh: wrote $OUTPUT (envd $(dpkg-deb -f "$DEB" Version), default user $USERNAME)" >&2
