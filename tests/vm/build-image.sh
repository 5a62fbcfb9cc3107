#!/bin/bash
# tests/vm/build-image.sh: kernel + initramfs + root image for the VM
# end-to-end test (recipe: ../shared/VM-TESTING.md), with the real envd
# baked in through the same steps as packaging/bake-rootfs.sh.
#
# Cached under $REPO/.cache/vm/image-KEY/ (KEY = hash of the build scripts,
# the unit and the kernel version); a cache hit returns in about a second.
# The envd binary is not part of the key: the test writes the freshly built
# binary into its own copy of root.img with debugfs, so a code change never
# rebuilds the image. Prints the image directory (vmlinuz, initrd.cpio,
# root.img) as the last line on stdout. Needs root and tests/vm/setup.sh.
#
# Env: ENVD_VM_CACHE  cache directory (default $REPO/.cache/vm; point it
#                outside the work tree to share it between clones)
#      ENVD_BIN  binary for the image's .deb (default: target/debug/envd,
#                else target/release/envd, else `cargo build --bin envd`;
#                target/ is $CARGO_TARGET_DIR when set)
#      ENVD_VM_REBUILD=1  ignore the cache
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=../../packaging/lib/rootfs.sh
. "$REPO/packaging/lib/rootfs.sh"
CACHE=${ENVD_VM_CACHE:-$REPO/.cache/vm}
log() { echo "build-image: $*" >&2; }

# Debian removes superseded kernel ABIs from the mirror: ask, never hard-code.
KVER=$(apt-cache depends linux-image-cloud-amd64 | sed -n 's/.*Depends: linux-image-//p' | head -1)
[ -n "$KVER" ] || { log "no linux-image-cloud-amd64 in the package lists (run tests/vm/setup.sh)"; exit 1; }
KEY=$( { cat "$REPO/tests/vm/build-image.sh" "$REPO/packaging/lib/rootfs.sh" "$REPO/packaging/lib/release.sh" "$REPO/packaging/build-deb.sh" \
          "$REPO/systemd/envd.service"; echo "$KVER"; } | sha256sum | cut -c1-16)
IMG=$CACHE/image-$KEY
if [ -z "${ENVD_VM_REBUILD:-}" ] && [ -f "$IMG/root.img" ] && [ -f "$IMG/initrd.cpio" ] && [ -f "$IMG/vmlinuz" ]; then
  log "cached $IMG (kernel $KVER)"
  echo "$IMG"
  exit 0
fi
[ "$(id -u)" = 0 ] || { log "needs root (debootstrap, chroot)"; exit 1; }
START=$(date +%s)
mkdir -p "$CACHE"
WORK=$(mktemp -d "$CACHE/build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# ---- 1. kernel: the Debian cloud kernel (virtio drivers are modules). The
# .deb is kept across image rebuilds.
KDEB_DIR=$CACHE/kernel-$KVER
if ! ls "$KDEB_DIR"/linux-image-"$KVER"_*.deb >/dev/null 2>&1; then
  rm -rf "$CACHE"/kernel-*; mkdir -p "$KDEB_DIR"
  (cd "$KDEB_DIR" && { apt-get download "linux-image-$KVER" 2>/dev/null || { apt-get update -qq && apt-get download "linux-image-$KVER"; }; }) >&2
fi
dpkg -x "$KDEB_DIR"/linux-image-"$KVER"_*.deb "$WORK/kernel"
cp "$WORK/kernel/boot/vmlinuz-$KVER" "$WORK/vmlinuz"

# ---- 2. root filesystem: minbase + systemd (no udev), busybox for the initramfs
R=$WORK/rootfs
log "debootstrap bookworm"
# nfs-kernel-server: the guest serves the NFS export that envd
# mounts as an /init volume.
rootfs_debootstrap "$R" kmod,iproute2,busybox-static,nfs-kernel-server
mkdir -p "$R/lib/modules"; cp -a "$WORK/kernel/lib/modules/$KVER" "$R/lib/modules/"
chroot "$R" depmod "$KVER"
keep=$(chroot "$R" modprobe -a -S "$KVER" --show-depends \
  virtio_pci virtio_net virtio_blk virtio_rng vmw_vsock_virtio_transport nfs nfsv3 nfsd \
  | awk '$1=="insmod"{print $2}' | sort -u)
T=$WORK/modules
for f in $keep; do mkdir -p "$T$(dirname "$f")"; cp -a "$R$f" "$T$f"; done
rm -rf "$R/lib/modules/$KVER/kernel"; cp -a "$T/lib/modules/$KVER/kernel" "$R/lib/modules/$KVER/"
chroot "$R" depmod "$KVER"
printf 'virtio_rng\nvmw_vsock_virtio_transport\n' > "$R/etc/modules-load.d/vm.conf"

echo vm > "$R/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 vm\n' > "$R/etc/hosts"
printf '/dev/root / ext4 rw,relatime 0 1\n' > "$R/etc/fstab"

# Static network matching qemu -netdev user,net=169.254.169.0/24: the slirp
# network contains the metadata address, so guestfwd can serve it.
cat > "$R/usr/local/sbin/vm-net" <<'SH'
#!/bin/sh
[ -e /sys/class/net/eth0 ] || modprobe -a virtio_pci virtio_net
i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
ip -batch - <<EOB
link set lo up
link set eth0 up
addr add 169.254.169.15/24 dev eth0
route add default via 169.254.169.2
EOB
SH
chmod +x "$R/usr/local/sbin/vm-net"
cat > "$R/etc/systemd/system/vm-net.service" <<'UNIT'
[Unit]
Description=Static network for the test VM
DefaultDependencies=no
Before=network.target
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/vm-net
[Install]
WantedBy=sysinit.target
UNIT
rootfs_enable_unit "$R" vm-net.service

# The NFS server for the volume test: the export, and the server starts
# only once the test has asked for it (the marker persists across cold
# boots), so boots of runs that do not use it stay as fast.
mkdir -p "$R/srv/nfs/e2e"; chmod 0777 "$R/srv/nfs/e2e"
# The test's relay on the host (tests/vm/harness/host_setup.rs) reaches the
# server through qemu's host forwards, from the slirp host address, on
# unprivileged ports; it finds mountd on a fixed port.
echo '/srv/nfs/e2e 169.254.169.0/24(rw,sync,no_subtree_check,no_root_squash,insecure)' > "$R/etc/exports"
printf '\n[mountd]\nport=20048\n' >> "$R/etc/nfs.conf"
mkdir -p "$R/etc/systemd/system/nfs-server.service.d"
printf '[Unit]\nConditionPathExists=/etc/envd-test-nfs\n' > "$R/etc/systemd/system/nfs-server.service.d/e2e.conf"
# Under TCG that server is up well after envd (it waits for the network),
# while a sandbox's NFS server is the host's, up before the boot: after a
# cold boot, commands here wait longer for the volume to come back.
mkdir -p "$R/etc/systemd/system/envd.service.d"
printf '[Service]\nExecStart=\nExecStart=/usr/bin/envd --volume-wait 60\n' \
  > "$R/etc/systemd/system/envd.service.d/e2e-volumes.conf"

# ---- 3. envd, as a template gets it: the .deb and the default user
BIN=${ENVD_BIN:-}
if [ -z "$BIN" ]; then
  TARGET=${CARGO_TARGET_DIR:-$REPO/target}
  for BIN in "$TARGET/debug/envd" "$TARGET/release/envd" ""; do [ -z "$BIN" ] || [ -x "$BIN" ] && break; done
  if [ -z "$BIN" ]; then (cd "$REPO" && cargo build --bin envd >&2); BIN=$TARGET/debug/envd; fi
fi
DEB=$("$REPO/packaging/build-deb.sh" --binary "$BIN" --out "$WORK")
rootfs_install_deb "$R" "$DEB"
# The test VM's address stands in for the sandbox's forward address
# (169.254.0.21): the host reaches guest servers on localhost through it.
mkdir -p "$R/etc/systemd/system/envd.service.d"
printf '[Service]\nExecStart=\nExecStart=/usr/bin/envd --forward-address 169.254.169.15\n' \
  > "$R/etc/systemd/system/envd.service.d/forward.conf"
rootfs_add_default_user "$R" user 1000

# ---- 4. boot trimming (about half the userspace boot time under TCG)
mkdir -p "$R/etc/systemd/system-generators"
for g in "$R"/usr/lib/systemd/system-generators/*; do ln -sf /dev/null "$R/etc/systemd/system-generators/${g##*/}"; done
chroot "$R" systemctl set-default multi-user.target >/dev/null 2>&1
mkdir -p "$R/etc/systemd/journald.conf.d"
# Volatile journal; everything also goes to the serial console, so a run
# whose envd never answers still shows why.
printf '[Journal]\nStorage=volatile\nForwardToConsole=yes\nTTYPath=/dev/ttyS0\nMaxLevelConsole=info\n' \
  > "$R/etc/systemd/journald.conf.d/vm.conf"
rm -f "$R"/etc/systemd/system/getty.target.wants/getty@tty1.service
chroot "$R" systemctl mask apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
  e2scrub_reap.service fstrim.timer systemd-pstore.service getty@tty1.service getty.target remote-fs.target \
  sys-kernel-debug.mount sys-kernel-tracing.mount dev-hugepages.mount \
  modprobe@configfs.service modprobe@dm_mod.service modprobe@fuse.service modprobe@loop.service \
  modprobe@drm.service modprobe@efi_pstore.service systemd-journal-flush.service systemd-random-seed.service \
  systemd-update-utmp.service systemd-update-utmp-runlevel.service kmod-static-nodes.service \
  systemd-sysusers.service proc-sys-fs-binfmt_misc.automount systemd-binfmt.service \
  systemd-ask-password-console.path systemd-ask-password-wall.path systemd-firstboot.service \
  systemd-repart.service systemd-logind.service >/dev/null 2>&1
rootfs_slim "$R"

# ---- 5. initramfs: load the virtio modules, mount /dev/vda, switch_root
MODS="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk failover net_failover virtio_net"
I=$WORK/initramfs
mkdir -p "$I"/{bin,dev,proc,newroot,lib/modules}
cp "$R/bin/busybox" "$I/bin/"
for m in $MODS; do cp "$(find "$R/lib/modules/$KVER" -name "$m.ko")" "$I/lib/modules/"; done
mknod "$I/dev/console" c 5 1
cat > "$I/init" <<SH
#!/bin/busybox sh
export PATH=/bin
busybox mount -t devtmpfs devtmpfs /dev
for m in $MODS; do busybox insmod /lib/modules/\$m.ko; done
i=0; while [ ! -b /dev/vda ] && [ \$i -lt 250 ]; do busybox usleep 20000; i=\$((i+1)); done
busybox mount -t ext4 -o rw /dev/vda /newroot || { echo "initramfs: cannot mount /dev/vda"; busybox poweroff -f; }
busybox umount /dev
exec busybox switch_root /newroot /sbin/init
SH
chmod 755 "$I/init"
(cd "$I" && find . -print0 | cpio --null -o -H newc --quiet) > "$WORK/initrd.cpio"

# ---- 6. the image, and publish the cache entry atomically
rootfs_make_image "$R" "$WORK/root.img" 2G
rm -rf "$IMG.new"; mkdir -p "$IMG.new"
mv "$WORK/vmlinuz" "$WORK/initrd.cpio" "$WORK/root.img" "$IMG.new/"
echo "$KVER" > "$IMG.new/KERNEL"
rm -rf "$IMG"; mv "$IMG.new" "$IMG"
for old in "$CACHE"/image-*; do [ "$old" = "$IMG" ] || rm -rf "$old"; done
log "built $IMG (kernel $KVER) in $(( $(date +%s) - START )) s"
echo "$IMG"
