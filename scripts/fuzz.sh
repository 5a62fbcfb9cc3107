#!/usr/bin/env bash
# Builds the fuzz targets in fuzz/ and runs each for a while, then prints
# a table (target, seconds, execs, corpus, result). Exits non-zero if any
# target found a crash, a timeout or an out-of-memory input (the input is
# saved under fuzz/artifacts/<target>/).
#
#   scripts/fuzz.sh 600                10 minutes per target
#   scripts/fuzz.sh --smoke            a few seconds per target (CI)
#   scripts/fuzz.sh 120 rpc_requests   only the named targets
#   FUZZ_SKIP_BUILD=1 scripts/fuzz.sh 600   reuse the binaries of the last build
#
# Installs cargo-fuzz into ~/.cargo/bin when it is missing. Uses the stable
# toolchain with RUSTC_BOOTSTRAP=1 (cargo-fuzz needs nightly flags). The
# corpus of each target grows in fuzz/corpus/<target>/ (not committed);
# an empty one is seeded with a few valid inputs first.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

usage() {
    echo "usage: scripts/fuzz.sh <seconds per target> | --smoke  [target ...]" >&2
    exit 2
}

[[ $# -ge 1 ]] || usage
case "$1" in
    --smoke) seconds=5 ;;
    *[!0-9]* | "") usage ;;
    *) seconds="$1" ;;
esac
shift

export RUSTC_BOOTSTRAP=1
export PATH="$HOME/.cargo/bin:$PATH"
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "==> installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

if [[ $# -gt 0 ]]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi
if [[ -z "${FUZZ_SKIP_BUILD:-}" ]]; then
    echo "==> building the fuzz targets"
    cargo fuzz build
fi

# Writes a Connect envelope: flags, big-endian length, payload.
envelope() {
    local flags="$1" payload="$2" n=${#2}
    printf "\\x$(printf %02x "$flags")"
    printf "\\x$(printf %02x $((n >> 24 & 255)))\\x$(printf %02x $((n >> 16 & 255)))"
    printf "\\x$(printf %02x $((n >> 8 & 255)))\\x$(printf %02x $((n & 255)))"
    printf '%s' "$payload"
}

# A few valid inputs per target, so that the fuzzer starts past the framing.
seed() {
    local dir="fuzz/corpus/$1"
    mkdir -p "$dir"
    [[ -z "$(ls -A "$dir")" ]] || return 0
    case "$1" in
        rpc_requests)
            # [method, protocol, options] then the body (see the target).
            { printf '\x02\x02\x00'
              envelope 0 '{"process":{"cmd":"ls","args":["-l"],"envs":{"A":"b"},"cwd":"/tmp"},"pty":{"size":{"cols":80,"rows":24}},"tag":"t"}'
            } >"$dir/start-json"
            { printf '\x04\x02\x00'
              envelope 0 '{"start":{"process":{"pid":1}}}'
              envelope 0 '{"data":{"input":{"stdin":"aGk="}}}'
              envelope 2 '{}'
            } >"$dir/stream-input-json"
            printf '\x08\x00\x00{"path":"/tmp"}' >"$dir/stat-json"
            printf '\x06\x00\x00{"process":{"tag":"t"},"signal":"SIGNAL_SIGKILL"}' >"$dir/signal-json"
            printf '\x0a\x01\x00\x0a\x02/a\x12\x02/b' >"$dir/move-proto"
            { printf '\x0d\x03\x00'; envelope 0 $'\x0a\x04/tmp\x10\x01'; } >"$dir/watch-proto"
            { printf '\x03\x04\x00'; envelope 0 $'\x0a\x02\x08\x01\x12\x04\x0a\x02\x08\x18'; } >"$dir/update-grpc"
            printf '\x0e\x00\x32500{"path":"/tmp","recursive":true}' >"$dir/watcher-timeout"
            ;;
        rpc_headers) printf '60000' >"$dir/timeout"; printf ' 30 ' >"$dir/interval" ;;
        multipart_upload)
            printf '\x07multipart/form-data; boundary="XyZ"\n--XyZ\r\nContent-Disposition: form-data; name="file"; filename="/tmp/a.txt"\r\nContent-Type: text/plain\r\n\r\nhello\r\n--XyZ--\r\n' >"$dir/one-file"
            ;;
        signed_query)
            printf '\x01path=%%2Fhome%%2Fuser%%2Fa.txt&username=user&signature=v1_abc&signature_expiration=1767225600' >"$dir/write"
            ;;
        mmds_metadata)
            printf '{"instanceID":"i","envID":"e","address":"a","accessTokenHash":"AB12","defaultUser":"user","defaultWorkdir":"/home/user"}' >"$dir/full"
            ;;
    esac
}

bin_dir="fuzz/target/$(rustc -vV | sed -n 's/^host: //p')/release"
results=()
failed=0
logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT
for target in "${targets[@]}"; do
    seed "$target"
    echo "==> fuzzing $target for ${seconds}s"
    log="$logs/$target.log"
    start=$(date +%s)
    status=0
    mkdir -p "fuzz/artifacts/$target"
    # The binary built above, run directly: a commit made meanwhile (the
    # build records it) does not rebuild envd between two targets.
    "$bin_dir/$target" "fuzz/corpus/$target" -artifact_prefix="fuzz/artifacts/$target/" \
        -max_total_time="$seconds" -timeout=30 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1 || status=$?
    elapsed=$(($(date +%s) - start))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    corpus=$(find "fuzz/corpus/$target" -type f | wc -l)
    if [[ $status -eq 0 ]]; then
        result=ok
    else
        failed=1
        result="FAILED (exit $status)"
        artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
        [[ -n "$artifact" ]] && result="$result: $artifact"
        tail -n 40 "$log" >&2
    fi
    results+=("$(printf '%-18s %8s %12s %8s  %s' "$target" "$elapsed" "${execs:-?}" "$corpus" "$result")")
done

printf '\n%-18s %8s %12s %8s  %s\n' target seconds execs corpus result
printf '%s\n' "${results[@]}"
exit "$failed"
