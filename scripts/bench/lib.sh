# shellcheck shell=bash
# Shared plumbing for the benchmarks in scripts/bench: a scratch area on
# /dev/shm (and /tmp), background processes tracked by pid and stopped in a
# safe order (nbd-cbw before the NBD servers it talks to: nbdkit 1.32 ignores
# SIGTERM while a client is connected), bounded waits, and cleanup on exit.
#
# Source it, then call bench_init NAME. Everything it starts with bench_spawn
# is stopped by pid, never by name, when the script exits.

BENCH_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BENCH_DIR="$BENCH_REPO/scripts/bench"
NBD_CBW_BIN="$BENCH_REPO/bin/nbd-cbw"
BENCH_HELPER="$BENCH_DIR/cbw-helper.js"

declare -a BENCH_PIDS=()
declare -A BENCH_KIND=()
BENCH_SHM=""
BENCH_TMP=""
BENCH_LAST_PID=""
declare -a BENCH_EXIT_HOOKS=()

bench_log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
bench_die() {
  bench_log "error: $*"
  exit 1
}

# bench_init NAME: scratch dirs, traps.
bench_init() {
  local name=$1
  BENCH_SHM=$(mktemp -d "/dev/shm/nbd-cbw-bench-$name.XXXXXX") || bench_die "cannot create a directory on /dev/shm"
  BENCH_TMP=$(mktemp -d "/tmp/nbd-cbw-bench-$name.XXXXXX") || bench_die "cannot create a directory in /tmp"
  trap bench_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  trap 'exit 129' HUP
}

# bench_on_exit CMD: run CMD (a string) at exit, before processes are stopped.
bench_on_exit() { BENCH_EXIT_HOOKS+=("$1"); }

bench_cleanup() {
  local rc=$? h
  trap - EXIT INT TERM HUP
  for h in "${BENCH_EXIT_HOOKS[@]}"; do eval "$h" || true; done
  bench_stop_all
  [ -n "$BENCH_SHM" ] && rm -rf -- "$BENCH_SHM"
  [ -n "$BENCH_TMP" ] && rm -rf -- "$BENCH_TMP"
  exit "$rc"
}

# bench_alive PID: the process exists and is not a zombie.
bench_alive() {
  local st
  [ -r "/proc/$1/stat" ] || return 1
  st=$(sed -E 's/^.*\) (.).*$/\1/' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

# bench_spawn KIND LOG CMD...: start CMD in the background; pid in BENCH_LAST_PID.
# KIND orders the shutdown: cbw, client, nbdkit, qemu-nbd.
bench_spawn() {
  local kind=$1 log=$2
  shift 2
  "$@" </dev/null >"$log" 2>&1 &
  BENCH_LAST_PID=$!
  BENCH_PIDS+=("$BENCH_LAST_PID")
  BENCH_KIND[$BENCH_LAST_PID]=$kind
}

# bench_stop PID [SECONDS]: SIGTERM, wait (bounded), then SIGKILL; reap.
bench_stop() {
  local pid=$1 t=${2:-15} i kind=${BENCH_KIND[$1]:-?}
  if bench_alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < t * 10; i++)); do
      bench_alive "$pid" || break
      sleep 0.1
    done
    if bench_alive "$pid"; then
      bench_log "pid $pid ($kind) still running ${t}s after SIGTERM: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      for ((i = 0; i < 50; i++)); do
        bench_alive "$pid" || break
        sleep 0.1
      done
    fi
  fi
  wait "$pid" 2>/dev/null || true
  local keep=() p
  for p in "${BENCH_PIDS[@]}"; do [ "$p" != "$pid" ] && keep+=("$p"); done
  BENCH_PIDS=("${keep[@]}")
  unset "BENCH_KIND[$pid]"
}

# Stop everything still tracked: clients of the NBD servers first.
bench_stop_all() {
  local kind i pid
  for kind in cbw client nbdkit qemu-nbd; do
    for ((i = ${#BENCH_PIDS[@]} - 1; i >= 0; i--)); do
      pid=${BENCH_PIDS[i]:-}
      [ -n "$pid" ] && [ "${BENCH_KIND[$pid]:-}" = "$kind" ] && bench_stop "$pid"
    done
  done
  for pid in "${BENCH_PIDS[@]}"; do bench_stop "$pid"; done
  BENCH_PIDS=()
}

# bench_wait_socket PATH PID [SECONDS] [LOG]: until PATH is a socket; fails if PID dies.
bench_wait_socket() {
  local path=$1 pid=$2 t=${3:-20} log=${4:-} i
  for ((i = 0; i < t * 20; i++)); do
    [ -S "$path" ] && return 0
    if ! bench_alive "$pid"; then
      bench_log "pid $pid (${BENCH_KIND[$pid]:-?}) exited before creating $path"
      [ -n "$log" ] && [ -s "$log" ] && sed 's/^/    /' "$log" >&2
      return 1
    fi
    sleep 0.05
  done
  bench_log "timed out after ${t}s waiting for $path"
  [ -n "$log" ] && [ -s "$log" ] && sed 's/^/    /' "$log" >&2
  return 1
}

# Servers. Each sets BENCH_LAST_PID and waits until the socket is there.

# start_qemu_nbd SOCK FILE LOG
start_qemu_nbd() {
  bench_spawn qemu-nbd "$3" qemu-nbd -f raw -t --shared=8 -x disk -k "$1" "$2"
  bench_wait_socket "$1" "$BENCH_LAST_PID" 20 "$3"
}

# start_nbdkit SOCK LOG ARGS... (plugin, filters, parameters)
start_nbdkit() {
  local sock=$1 log=$2
  shift 2
  bench_spawn nbdkit "$log" nbdkit --exit-with-parent -U "$sock" -f "$@"
  bench_wait_socket "$sock" "$BENCH_LAST_PID" 20 "$log"
}

# start_cbw SOCK SOURCE_URI LOG [PROFILE_DIR] [EXTRA SERVE ARGS...]
# The control socket is SOCK.ctl. With PROFILE_DIR, node runs with --cpu-prof.
start_cbw() {
  local sock=$1 src=$2 log=$3 prof=${4:-}
  shift 4 2>/dev/null || shift $#
  local node_args=()
  if [ -n "$prof" ]; then
    mkdir -p "$prof"
    node_args=(--cpu-prof "--cpu-prof-dir=$prof")
  fi
  # BENCH_NODE_ARGS: extra node options for nbd-cbw (e.g. --trace-gc), for
  # tuning experiments; its output lands in the run's log (BENCH_KEEP_LOGS).
  local extra=()
  read -r -a extra <<<"${BENCH_NODE_ARGS:-}"
  node_args+=("${extra[@]}")
  # The launcher itself, as users run it (its tuned V8 options included).
  NBD_CBW_NODE_ARGS="${node_args[*]}" bench_spawn cbw "$log" "$NBD_CBW_BIN" serve --source "$src" -U "$sock" -f --exit-with-parent "$@"
  bench_wait_socket "$sock" "$BENCH_LAST_PID" 30 "$log" && bench_wait_socket "$sock.ctl" "$BENCH_LAST_PID" 10 "$log"
}

# cbw_cli ARGS...: the nbd-cbw CLI, bounded.
cbw_cli() { timeout -k 5 60 node "$NBD_CBW_BIN" "$@"; }

# helper ARGS...: the node helper (JSON parsing, reports).
helper() { timeout -k 5 120 node "$BENCH_HELPER" "$@"; }

# now_ns: monotonic-enough wall clock in nanoseconds.
now_ns() { date +%s%N; }

# steal_ticks: CPU time the hypervisor gave to others while this machine
# wanted it (the steal column of /proc/stat), in clock ticks over all CPUs.
steal_ticks() { awk '/^cpu / { print $9 }' /proc/stat; }

# page_reporting: this kernel's free page reporting settings, or nothing.
# A VM whose balloon driver reports free memory hands what one run frees
# back to its host, and the next run's first touches of it cost far more
# (BENCHMARKS.md, ninth session): worth knowing when figures swing.
page_reporting() {
  local p=/sys/module/page_reporting/parameters s
  [ -r "$p/page_reporting_order" ] || return 0
  s="order $(cat "$p/page_reporting_order")"
  [ -r "$p/min_free_ms" ] && s+=", min_free_ms $(cat "$p/min_free_ms")"
  [ -r "$p/reported_kib" ] && s+=", $(($(cat "$p/reported_kib") / 1048576)) GiB reported since boot"
  echo "$s"
}

# mono_us: the monotonic clock V8's CPU profiles use (process.hrtime), in us.
mono_us() { node -p 'String(process.hrtime.bigint() / 1000n)'; }

# mem_available_gib: MemAvailable in GiB (integer).
mem_available_gib() { awk '/^MemAvailable:/ { printf "%d\n", $2 / 1048576 }' /proc/meminfo; }

# make_random FILE SIZE_MIB: FILE filled with random data.
make_random() {
  timeout 600 dd if=/dev/urandom of="$1" bs=1M count="$2" iflag=fullblock status=none ||
    bench_die "cannot write $2 MiB of random data to $1"
}
