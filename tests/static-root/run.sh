#!/usr/bin/env bash
# tests/static-root/run.sh: the static envd where there is no glibc and no
# systemd. Must run as root.
#
# 1. The static tarball (packaging/build-static.sh) is unpacked into a root
#    that holds only Debian's busybox-static, /etc/passwd, /etc/group and
#    /etc/hosts, with a bash that is busybox's ash (the SDKs start
#    commands with /bin/bash; an Alpine template installs bash).
# 2. envd runs there, chrooted in a mount namespace of its own (/proc,
#    /dev and a tmpfs /run mounted into the root), and the real Python SDK
#    runs a command as a non-root user, uploads and downloads a file and
#    opens a PTY (check_sdk.py); envd reads the metadata service by a
#    name only the root's /etc/hosts holds (no NSS module there reads it).
# 3. Debian's openrc is added to the same root (with the shared libraries
#    its own binaries need: envd needs none) and the tarball's OpenRC
#    service is driven by openrc-run (the script's interpreter): start,
#    envd answers with the unit's priorities, logs where OpenRC keeps them,
#    a killed envd is started again, stop.
#
# ENVD_STATIC_TARBALL  use this tarball instead of building one
# ENVD_SDK_VENV        the SDK virtualenv (default <repo>/.cache/sdk-venv)
# Debian packages are downloaded once into <repo>/.cache/static-root-debs.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${ENVD_SDK_VENV:-$repo/.cache/sdk-venv}"
debs="$repo/.cache/static-root-debs"
die() { echo "static-root: $*" >&2; exit 1; }
step() { printf '  -- %s\n' "$*"; }

[[ "$(id -u)" == 0 ]] || die "run as root (chroot, mounts)"
bash "$repo/tests/sdk/setup.sh" || die "SDK setup failed"

tarball="${ENVD_STATIC_TARBALL:-}"
if [[ -z "$tarball" ]]; then
    step "static build and tarball"
    tarball="$(bash "$repo/packaging/build-static.sh")"
fi
[[ -f "$tarball" ]] || die "no tarball at $tarball"

step "Debian packages: busybox-static, and openrc with its libraries"
mkdir -p "$debs"
packages=(busybox-static openrc libeinfo1 librc1)
missing=()
for package in "${packages[@]}"; do
    compgen -G "$debs/${package}_*.deb" >/dev/null || missing+=("$package")
done
if ((${#missing[@]})); then
    (cd "$debs" && { apt-get download "${missing[@]}" 2>/dev/null || { apt-get update -qq && apt-get download "${missing[@]}"; }; })
fi

work="$(mktemp -d /var/tmp/envd-static-root.XXXXXX)"
root="$work/root"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    # envd and the supervisor run in mount namespaces of their own: the
    # root's mounts go with them. Whatever still runs from the root is
    # stopped before it is removed.
    for proc in /proc/[0-9]*; do
        [[ "$(readlink "$proc/root" 2>/dev/null)" == "$root" ]] && kill -9 "${proc#/proc/}" 2>/dev/null
    done
    sleep 0.5
    rm -rf --one-file-system "$work"
}
trap cleanup EXIT

step "a root of busybox, passwd, group, hosts and the tarball"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,root,home/user,proc,dev,run,var/lib,var/log}
install -d -m 1777 "$root/tmp"
ln -s /run "$root/var/run"
dpkg-deb -x "$(ls "$debs"/busybox-static_*.deb)" "$work/busybox"
install -m 0755 "$work/busybox/bin/busybox" "$root/bin/busybox"
chroot "$root" /bin/busybox --install -s
printf '#!/bin/sh\nexec /bin/busybox ash "$@"\n' >"$root/bin/bash"
chmod 0755 "$root/bin/bash"
printf 'root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\nuser:x:1000:\n' >"$root/etc/group"
printf '127.0.0.1 localhost\n127.0.0.1 metadata.envd-test\n' >"$root/etc/hosts"
chown 1000:1000 "$root/home/user"
tar -xzf "$tarball" -C "$root"
ldd "$root/usr/bin/envd" 2>&1 | grep -Eq 'not a dynamic executable|statically linked' ||
    die "envd is dynamic: $(ldd "$root/usr/bin/envd" 2>&1)"
# Besides busybox's applet links, the root holds just these files.
files="$(cd "$root" && find . -type f | sort | tr '\n' ' ')"
[[ "$files" == "./bin/bash ./bin/busybox ./etc/conf.d/envd ./etc/group ./etc/hosts ./etc/init.d/envd ./etc/passwd ./usr/bin/envd " ]] ||
    die "unexpected files in the root: $files"

# Runs a command chrooted into the root, in a mount namespace of its own
# with /proc and /dev mounted there (the root's /run starts empty).
in_root() {
    unshare --mount --propagation private --fork -- bash -c '
        root=$1; shift
        mount -t proc proc "$root/proc"
        mount --rbind /dev "$root/dev"
        exec chroot "$root" "$@"' in_root "$root" "$@"
}

wait_health() {
    local port=$1
    for _ in $(seq 100); do
        python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' \
            "http://127.0.0.1:$port/health" 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

step "envd chrooted, driven by the Python SDK"
python3 "$here/mmds.py" "$work/mmds.port" "$work/mmds.reads" &
pids+=($!)
for _ in $(seq 50); do [[ -s "$work/mmds.port" ]] && break; sleep 0.1; done
port="$(free_port)"
in_root /usr/bin/envd --dev --port "$port" --mmds-address "metadata.envd-test:$(cat "$work/mmds.port")" \
    >"$work/envd.log" 2>&1 &
pids+=($!)
wait_health "$port" || { cat "$work/envd.log" >&2; die "envd in the root never answered"; }
"$venv/bin/python" "$here/check_sdk.py" "http://127.0.0.1:$port" "$root" "$work/mmds.reads" ||
    { cat "$work/envd.log" >&2; die "the SDK checks failed"; }
kill "${pids[@]}" 2>/dev/null || true
wait 2>/dev/null || true
pids=()

step "the OpenRC service under Debian's openrc-run"
for package in openrc libeinfo1 librc1; do
    dpkg-deb -x "$(ls "$debs/${package}"_*.deb)" "$root"
done
# openrc's binaries are dynamic: give them their libraries and loader.
for library in $(LD_LIBRARY_PATH="$root/lib/x86_64-linux-gnu" ldd "$root/sbin/openrc-run" "$root/sbin/supervise-daemon" \
    "$root/lib/rc/bin/checkpath" | awk '$3 ~ /^\// {print $3} $1 ~ /^\/lib64\// {print $1}' | sort -u); do
    [[ -e "$root$library" ]] || install -D -m 0755 "$(readlink -f "$library")" "$root$library"
done
# What a system that OpenRC booted has and this root lacks: the state
# directories openrc makes in /run at boot, the localmount service
# (nothing to mount here), and the files Debian's openrc reads for
# insserv.
mkdir -p "$root"/run/openrc/{daemons,exclusive,failed,hotplugged,inactive,options,scheduled,started,starting,stopping,tmp,wasinactive}
touch "$root/run/openrc/softlevel" "$root/etc/insserv.conf"
mkdir -p "$root/etc/insserv.conf.d"
printf '#!/sbin/openrc-run\ndescription="the root is mounted already"\nstart() { return 0; }\n' >"$root/etc/init.d/localmount"
chmod 0755 "$root/etc/init.d/localmount"
port="$(free_port)"
printf 'ENVD_ARGS="--dev --port %s"\n' "$port" >"$root/etc/conf.d/envd"
in_root /etc/init.d/envd start >"$work/openrc.log" 2>&1 || { cat "$work/openrc.log" >&2; die "start failed"; }
wait_health "$port" || { cat "$work/openrc.log" >&2; die "the OpenRC service never answered"; }
envd_pid() { pgrep -f "^/usr/bin/envd --dev --port $port" | head -1 || true; }
first="$(envd_pid)"
[[ -n "$first" ]] || die "no envd process under supervise-daemon"
supervisor="$(ps -o ppid= -p "$first" | tr -d ' ')"
[[ "$(cat "/proc/$supervisor/comm")" == "supervise-daemo"* ]] || die "envd's parent is $(cat "/proc/$supervisor/comm")"
[[ "$(cut -d' ' -f19 "/proc/$first/stat")" == "-20" ]] || die "envd's nice is not -20"
# A lower oom_score_adj and a higher hard limit need CAP_SYS_RESOURCE,
# which a VM's root has and some build machines' root lacks.
if grep -q "Max open files *1048576" "/proc/$$/limits" || (ulimit -Hn 1048576) 2>/dev/null; then
    grep -q "Max open files *1048576" "/proc/$first/limits" || die "envd's open-file limit: $(grep 'open files' "/proc/$first/limits")"
    [[ "$(cat "/proc/$first/oom_score_adj")" == "-1000" ]] || die "envd's oom_score_adj is not -1000"
else
    echo "  (open-file limit and oom_score_adj not checked: this machine's root lacks CAP_SYS_RESOURCE)"
fi
[[ "$(stat -c %a "$root/var/lib/envd")" == 700 ]] || die "/var/lib/envd is not 0700"
grep -q "envd listening" "$root/var/log/envd/envd.log" || die "no log in /var/log/envd/envd.log"
kill -9 "$first"
for _ in $(seq 50); do
    second="$(envd_pid)"
    [[ -n "$second" && "$second" != "$first" ]] && break
    sleep 0.2
done
[[ -n "$second" && "$second" != "$first" ]] || die "a killed envd was not started again"
wait_health "$port" || die "the restarted envd never answered"
in_root /etc/init.d/envd stop >>"$work/openrc.log" 2>&1 || { cat "$work/openrc.log" >&2; die "stop failed"; }
for _ in $(seq 50); do [[ -z "$(envd_pid)" ]] && break; sleep 0.1; done
[[ -z "$(envd_pid)" ]] || die "envd still runs after stop"
echo "static-root: the static envd serves the SDK from a busybox root; its OpenRC service starts, respawns and stops it"
