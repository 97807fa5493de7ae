#!/usr/bin/env bash
# The main job end to end on a local image, no other server needed:
#   1. make a 1 GiB disk image (512 MiB of data, the rest sparse) and keep a
#      copy of it as it is now, to check the backup against at the end;
#   2. serve it with nbd-cbw and start a backup to a local file, throttled so
#      it takes a few seconds;
#   3. while it runs, a "guest" (qemu-io) overwrites data all over the disk;
#   4. show progress, then check that the backup equals the disk as it was
#      when the backup started, even though the disk itself has changed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh >&2

work=$(mktemp -d "${TMPDIR:-/tmp}/nbd-cbw-demo.XXXXXX")
trap 'rm -rf "$work"' EXIT
disk=$work/disk.raw
echo "== making a 1 GiB disk image with 512 MiB of data in $work"
truncate -s 1G "$disk"
for i in 0 2 4 6 8 10 12 14; do
  dd if=/dev/urandom of="$disk" bs=1M seek=$((i * 64)) count=64 conv=notrunc status=none
done
cp --sparse=always "$disk" "$work/disk-at-start.raw"

cat > "$work/guest.sh" <<'GUEST'
set -eu
echo "== guest: writing over the disk while the backup runs"
for i in $(seq 0 39); do
  off=$(( (i * 26) % 1000 ))
  qemu-io -f raw -t none "$uri" -c "write -P $((i % 200 + 17)) ${off}M 4M" -c "write -z $((off + 5))M 1M" >/dev/null
done
echo "== guest: done (40 x 5 MiB of writes); the backup meanwhile:"
nbd-cbw backup status
echo "== waiting for the backup to finish"
nbd-cbw backup wait
GUEST

export PATH="$PWD/bin:$PATH"
echo "== serving the disk and backing it up to $work/backup.raw (throttled to 40 MiB/s so the guest writes land while it runs)"
bin/nbd-cbw serve --source "file:$disk" -U - \
  --backup-to "file:$work/backup.raw" --speed 40M --buffer 256M \
  --run "sh $work/guest.sh"

echo "== checking"
if cmp -s "$disk" "$work/disk-at-start.raw"; then
  echo "unexpected: the guest's writes did not change the disk" >&2
  exit 1
fi
echo "the disk has changed since the backup started (the guest wrote to it)"
if cmp "$work/backup.raw" "$work/disk-at-start.raw"; then
  echo "OK: the backup is byte for byte the disk as it was when the backup started"
else
  echo "FAILED: the backup differs from the disk at the start" >&2
  exit 1
fi
