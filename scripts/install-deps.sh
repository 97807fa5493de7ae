#!/usr/bin/env bash
# Install what nbd-cbw's tests and benchmarks run against: real NBD peers from
# Debian (qemu-img/qemu-io/qemu-nbd, nbdkit, nbdinfo/nbdcopy, fio), then the
# npm dependencies and the native addon. Safe to run again: installs only
# what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(qemu-utils nbdkit libnbd-bin fio "$@")
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}" >&2
  SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund
fi
npm run --silent build
