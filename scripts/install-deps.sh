#!/usr/bin/env bash
# Install what nbd-cbw runs against: real NBD peers from Debian
# (qemu-img/qemu-io/qemu-nbd, nbdkit, nbdinfo/nbdcopy, fio), with --all also
# what the tests and benchmarks need, then the npm dependencies and the native
# addon. Safe to run again: installs only what is missing.
# Usage: install-deps.sh [--all] [EXTRA-DEBIAN-PACKAGE...]
set -euo pipefail
cd "$(dirname "$0")/.."

# The demo needs only the NBD peers; the tests and benchmarks need the rest:
# a real Prometheus, qemu-storage-daemon (qemu-system-common), gnuplot for
# the benchmark plots, util-linux's `script` (bsdutils) for the CLI's terminal
# output, and a single-node Ceph (mon, osd, radosgw, qemu's rbd
# driver) for the distributed targets.
core=(qemu-utils nbdkit libnbd-bin fio)
full=(prometheus qemu-system-common gnuplot-nox bsdutils ceph-mon ceph-osd radosgw ceph-common qemu-block-extra)
if [ "${1:-}" = "--all" ]; then
  shift
  packages=("${core[@]}" "${full[@]}" "$@")
else
  packages=("${core[@]}" "$@")
fi
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
