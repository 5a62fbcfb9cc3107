# packaging/lib/rootfs.sh: steps for baking envd into a root filesystem
# template, shared by packaging/bake-rootfs.sh (the user-facing script) and
# tests/vm/build-image.sh (the VM test image). Source it; every function
# takes the root directory first. Needs root and, for debootstrap, the
# package debootstrap (Debian's own mirror is the only place it contacts).

# What envd runs at run time besides the C library: mount.nfs for the NFS
# volumes of /init, and the system CA bundle that /init's CA is added to.
ROOTFS_ENVD_PACKAGES=nfs-common,ca-certificates

# rootfs_debootstrap DIR PKGS [TARBALL]: a minimal Debian bookworm (minbase)
# in DIR with systemd as init, envd's run-time packages and the
# comma-separated PKGS.
rootfs_debootstrap() {
  local root=$1 pkgs=$2 tarball=${3:-}
  local include=systemd,systemd-sysv,$ROOTFS_ENVD_PACKAGES${pkgs:+,$pkgs}
  rm -rf "$root"
  if [ -n "$tarball" ]; then
    debootstrap --variant=minbase --include="$include" --unpack-tarball="$(realpath "$tarball")" bookworm "$root" >&2
  else
    debootstrap --variant=minbase --include="$include" bookworm "$root" >&2
  fi
  : > "$root/etc/resolv.conf"     # debootstrap copied the host's
}

# rootfs_enable_unit DIR UNIT: the symlink `systemctl enable` would make,
# for every target in the unit's WantedBy=, without running systemctl.
rootfs_enable_unit() {
  local root=$1 unit=$2 file target
  for file in "$root/etc/systemd/system/$unit" "$root/lib/systemd/system/$unit" "$root/usr/lib/systemd/system/$unit"; do
    [ -f "$file" ] && break
  done
  [ -f "$file" ] || { echo "rootfs_enable_unit: $unit not found in $root" >&2; return 1; }
  for target in $(sed -n 's/^WantedBy=//p' "$file"); do
    mkdir -p "$root/etc/systemd/system/$target.wants"
    ln -sfn "/lib/systemd/system/$unit" "$root/etc/systemd/system/$target.wants/$unit"
  done
}

# rootfs_install_deb DIR DEB: installs the envd package. With a dpkg
# database in DIR it is a real install (`dpkg --root`: dependencies checked,
# the package recorded, its postinst run chrooted into DIR, which enables
# the unit); otherwise the files are copied in (following the root's own
# directory symlinks, e.g. a merged /usr) and the unit is enabled by symlink.
rootfs_install_deb() {
  local root=$1 deb=$2
  if [ -f "$root/var/lib/dpkg/status" ] && [ -x "$root/bin/sh" ]; then
    dpkg --root="$root" --force-unsafe-io -i "$deb" >&2
  else
    local tmp f
    tmp=$(mktemp -d)
    dpkg-deb -x "$deb" "$tmp"
    (cd "$tmp" && find . -type f) | while read -r f; do
      install -D -m "$(stat -c %a "$tmp/$f")" "$tmp/$f" "$root/$f"
    done
    rm -rf "$tmp"
  fi
  # Idempotent, and covers a root whose postinst could not enable it.
  rootfs_enable_unit "$root" envd.service
}

# rootfs_add_default_user DIR [NAME] [UID]: the template's default user
# (what /init's defaultUser names): home /home/NAME, login shell bash.
rootfs_add_default_user() {
  local root=$1 name=${2:-user} uid=${3:-1000}
  if grep -q "^$name:" "$root/etc/passwd" 2>/dev/null; then
    return 0
  fi
  if [ -x "$root/usr/sbin/useradd" ]; then
    chroot "$root" /usr/sbin/useradd --create-home --home-dir "/home/$name" --shell /bin/bash --uid "$uid" --user-group "$name"
    return
  fi
  # A root without the shadow tools: the same entries by hand.
  mkdir -p "$root/etc" "$root/home/$name"
  echo "$name:x:$uid:$uid::/home/$name:/bin/bash" >> "$root/etc/passwd"
  echo "$name:x:$uid:" >> "$root/etc/group"
  [ ! -f "$root/etc/shadow" ] || echo "$name:!:$(( $(date +%s) / 86400 )):0:99999:7:::" >> "$root/etc/shadow"
  [ ! -d "$root/etc/skel" ] || cp -a "$root/etc/skel/." "$root/home/$name/"
  chown -R "$uid:$uid" "$root/home/$name"
  chmod 0750 "$root/home/$name"
}

# rootfs_slim DIR: drops package caches, docs and manuals (debootstrap
# leaves ~40 MB of .debs behind).
rootfs_slim() {
  local root=$1
  rm -rf "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
         "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/* "$root"/usr/share/info/*
}

# rootfs_make_image DIR IMAGE SIZE [LABEL]: an ext4 image straight from the
# directory (`mke2fs -d`, no mount, no loop device). SIZE as mke2fs takes it
# (e.g. 1G); the file is sparse.
rootfs_make_image() {
  local root=$1 image=$2 size=$3 label=${4:-root}
  rm -f "$image"
  mke2fs -q -t ext4 -L "$label" -d "$root" "$image" "$size"
}
