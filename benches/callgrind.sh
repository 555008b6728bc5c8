#!/usr/bin/env bash
# Repeatable per-request costs, palisade against nginx, from valgrind's callgrind (the
# machine's noise does not move them): instructions, locked instructions (atomic
# read-modify-writes: `lock`-prefixed, `xchg` with memory, `mfence`; each one a full
# barrier costing ~6 ns here, against ~0.4 ns for a plain add), and the misses of
# callgrind's simulated caches (first-level instruction and data caches, last level).
# Both proxies run under callgrind, pinned to CPU 0, with one worker, round robin over
# three nginx backends with keep-alive on CPU 1; h2load sends the requests (8
# connections) after a warm-up, and only the measured requests are counted.
#
#   benches/callgrind.sh                      # 20,000 requests to /
#   benches/callgrind.sh --requests 5000 --path /16k
#   benches/callgrind.sh --sites 25           # also palisade's 25 busiest locked sites
#   PALISADE_BIN=/tmp/old/palisade benches/callgrind.sh   # another build
#
# The per-site list names the call chain (inlined frames included) when the binary has
# line tables: this script builds with CARGO_PROFILE_RELEASE_DEBUG=line-tables-only into
# target/profiling (same code as the release build, plus line tables).
# Installs valgrind, nginx, h2load (nghttp2-client) and binutils with apt-get when missing
# (root, Debian). Nothing runs beyond 127.0.0.1 and the request count is bounded.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
requests=20000
path=/
sites=0
while [ $# -gt 0 ]; do
  case "$1" in
    --requests) requests="$2"; shift 2 ;;
    --path) path="$2"; shift 2 ;;
    --sites) sites="$2"; shift 2 ;;
    *) echo "usage: benches/callgrind.sh [--requests N] [--path / | /16k] [--sites N]" >&2; exit 2 ;;
  esac
done

. "$root/benches/lib/side_by_side.sh"
bench_require valgrind callgrind_control nginx h2load objdump addr2line curl
if [[ -n "${PALISADE_BIN:-}" ]]; then
  bin="$PALISADE_BIN"
else
  CARGO_PROFILE_RELEASE_DEBUG=line-tables-only CARGO_TARGET_DIR="$root/target/profiling" \
    cargo build --release --quiet
  bin="$root/target/profiling/release/palisade"
fi
bench_init 19700
bench_write_configs
bench_start_backends

# measure NAME PORT CMD...: runs CMD under callgrind with instrumentation off, warms it
# up, counts $requests requests, and leaves the profile in $work/NAME.out.
measure() {
  local name="$1" port="$2"
  shift 2
  taskset -c 0 valgrind --tool=callgrind --instr-atstart=no --cache-sim=yes \
    --dump-instr=yes --callgrind-out-file="$work/$name.%p" "$@" >"$work/$name.log" 2>&1 &
  local pid=$!
  pids+=("$pid")
  bench_wait_answering "benches/callgrind.sh: $name" "$port" "$path" || { tail -5 "$work/$name.log" >&2; exit 1; }
  taskset -c 1 h2load --h1 -n 2000 -c 8 "http://127.0.0.1:$port$path" >/dev/null
  callgrind_control -i on "$pid" >/dev/null 2>&1
  local out
  out=$(taskset -c 1 h2load --h1 -n "$requests" -c 8 "http://127.0.0.1:$port$path")
  callgrind_control -i off "$pid" >/dev/null 2>&1
  callgrind_control -d "$pid" >/dev/null 2>&1
  if ! grep -q "status codes: $requests 2xx" <<<"$out"; then
    echo "$name: not every request got a 2xx:" >&2
    grep -E "requests:|status codes" <<<"$out" >&2
    exit 1
  fi
  kill -INT "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  # The dump holds the measured requests; the profile written at exit holds the rest.
  cp "$work/$name.$pid.1" "$work/$name.out"
}

measure palisade "$palisade_port" "$bin" run -c "$work/palisade.toml" --log-level warn
measure nginx "$nginx_port" nginx -c "$work/nginx.conf" -p "$work"

python3 "$root/benches/callgrind_costs.py" "$requests" "$sites" \
  "palisade=$work/palisade.out" "nginx=$work/nginx.out"
