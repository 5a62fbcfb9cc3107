# packaging/lib/release.sh: what every package of envd is stamped with,
# shared by packaging/build-deb.sh and packaging/build-static.sh. Source it.

# release_version REPO: the version in REPO's Cargo.toml [package].
release_version() {
  sed -n '/^\[package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$1/Cargo.toml" | head -1
}

# release_epoch REPO: SOURCE_DATE_EPOCH if set, else the time of REPO's
# last commit (else now): the fixed time stamped on every packaged file.
release_epoch() {
  echo "${SOURCE_DATE_EPOCH:-$(git -C "$1" log -1 --format=%ct 2>/dev/null || date +%s)}"
}
