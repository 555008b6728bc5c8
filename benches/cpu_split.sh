#!/usr/bin/env bash
# Where a proxy's core time per request goes: user space (the proxy's own code) or the
# kernel (syscalls, and the loopback TCP stack that runs in the sender's context).
# palisade (bare), nginx and HAProxy run side by side, each pinned to CPU 0 with one
# worker, round robin over three nginx backends with keep-alive, like peers.sh; wrk
# (64 connections) and the backends share CPU 1. Rounds alternate between the proxies;
# each round reads the proxy process's user and system CPU time (all its threads, from
# /proc/PID/stat) before and after, and divides by the requests wrk completed.
#
#   benches/cpu_split.sh                     # 8 rounds x 3 s each, path /
#   benches/cpu_split.sh --rounds 12 --duration 3 --path /16k
#   PALISADE_BIN=/tmp/old/palisade benches/cpu_split.sh   # another build of palisade
#
# Prints the median user, system and total microseconds per request of each proxy, and
# the most palisade could be ahead of nginx here if its own code cost nothing: nginx's
# total over palisade's system time alone. Nothing runs beyond 127.0.0.1 and every round
# is bounded. Installs nginx, haproxy and wrk with apt-get when missing (root, Debian).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
rounds=8
duration=3
path=/
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds="$2"; shift 2 ;;
    --duration) duration="$2"; shift 2 ;;
    --path) path="$2"; shift 2 ;;
    *) echo "usage: benches/cpu_split.sh [--rounds N] [--duration SECONDS] [--path / | /16k]" >&2; exit 2 ;;
  esac
done

. "$root/benches/lib/side_by_side.sh"
bench_require nginx haproxy wrk
# PALISADE_BIN=path measures another build (an older commit's, for an A/B against the
# same nginx and HAProxy runs) instead of this tree's.
if [[ -n "${PALISADE_BIN:-}" ]]; then
  bin="$PALISADE_BIN"
else
  cargo build --release --quiet
  bin="$root/target/release/palisade"
fi
bench_init 19600
bench_write_configs
bench_start_backends

declare -A pid_of port_of
port_of[palisade]=$palisade_port
port_of[nginx]=$nginx_port
port_of[haproxy]=$haproxy_port
taskset -c 0 "$bin" run -c "$work/palisade.toml" --log-level warn 2>"$work/palisade.log" &
pids+=($!)
pid_of[palisade]=$!
taskset -c 0 nginx -c "$work/nginx.conf" -p "$work" &
pids+=($!)
pid_of[nginx]=$!
taskset -c 0 haproxy -db -f "$work/haproxy.cfg" 2>"$work/haproxy.log" &
pids+=($!)
pid_of[haproxy]=$!
for name in palisade nginx haproxy; do
  bench_wait_answering "benches/cpu_split.sh: $name" "${port_of[$name]}" "$path" || exit 1
  # Warm up: connections to the backends, allocator caches.
  taskset -c 1 wrk -t1 -c64 -d1s "http://127.0.0.1:${port_of[$name]}$path" >/dev/null 2>&1
done

hz=$(getconf CLK_TCK)
# CPU 0's busy ticks (everything but idle and iowait), as peers.sh counts its us/req.
core_busy() { awk '/^cpu0 / {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
results="$work/rounds.txt"
: >"$results"
for r in $(seq "$rounds"); do
  for name in palisade nginx haproxy; do
    pid=${pid_of[$name]}
    read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$pid/stat")
    c0=$(core_busy)
    out=$(taskset -c 1 timeout $((duration + 10)) wrk -t1 -c64 -d"${duration}s" \
      "http://127.0.0.1:${port_of[$name]}$path" 2>&1)
    c1=$(core_busy)
    read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$pid/stat")
    reqs=$(echo "$out" | awk '/requests in/ {print $1}')
    echo "$r $name ${reqs:-0} $((u1 - u0)) $((s1 - s0)) $((c1 - c0))" >>"$results"
    echo "round $r $name: ${reqs:-0} requests"
  done
done

python3 - "$results" "$hz" "$path" <<'PY'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
hz, path = int(sys.argv[2]), sys.argv[3]
per = {}
for r, name, reqs, user, system, core in rows:
    reqs = int(reqs)
    if reqs > 0:
        us = 1e6 / hz / reqs
        per.setdefault(name, []).append((int(user) * us, int(system) * us, int(core) * us))
med = {}
print(f"path {path}: CPU microseconds per request, medians of {len(rows) // 3} rounds")
print("user, system: the proxy process's own time; core: all of CPU 0's busy time (what")
print("peers.sh's us/req counts: also softirq work not charged to the process)")
print(f"{'proxy':10} {'user':>7} {'system':>7} {'total':>7} {'user %':>7} {'core':>7}")
for name in ("palisade", "nginx", "haproxy"):
    if name not in per:
        print(f"{name:10} (no requests)")
        continue
    u = statistics.median(x[0] for x in per[name])
    s = statistics.median(x[1] for x in per[name])
    t = statistics.median(x[0] + x[1] for x in per[name])
    c = statistics.median(x[2] for x in per[name])
    med[name] = (u, s, t)
    print(f"{name:10} {u:7.2f} {s:7.2f} {t:7.2f} {u / t:7.0%} {c:7.2f}")
if "palisade" in med and "nginx" in med:
    pu, ps, pt = med["palisade"]
    print(f"palisade vs nginx by total: {med['nginx'][2] / pt:.2f}x; "
          f"with zero user time it could be at most {med['nginx'][2] / ps:.2f}x")
if "palisade" in med and "haproxy" in med:
    print(f"palisade vs HAProxy by total: {med['haproxy'][2] / med['palisade'][2]:.2f}x")
PY
