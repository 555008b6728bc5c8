#!/usr/bin/env bash
# What every feature costs, measured the only way this shared machine allows: palisade bare
# and palisade with every feature on, running side by side in the same run, offered the
# same load in alternating short rounds, each pinned to CPU 0 (wrk and the backends on
# CPU 1). For each round: the proxy process's CPU time (all its threads, user + system,
# from /proc) over the requests it answered = CPU microseconds per request. Prints both
# medians and the median of the paired (same-time) ratios: full's throughput as a share of
# bare's when the proxy's core is the bottleneck.
#
#   benches/features_ab.sh                   # 12 rounds x 2 s each, path /
#   benches/features_ab.sh --rounds 20 --duration 3 --path /16k
#
# "full" is `load.sh --features full`'s set: active health checks every second, passive
# outlier detection, retries with a budget, an allow list, a per-client rate limit that
# never trips, metrics, and the JSON access log written to a file. Runs across separate
# load.sh invocations drift by 20 % and more here (steal time); alternating 2-second rounds
# in one run see the same machine. Everything listens on 127.0.0.1 and every round is
# bounded. Installs nginx and wrk with apt-get when missing (root, Debian).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
rounds=12
duration=2
path=/
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds="$2"; shift 2 ;;
    --duration) duration="$2"; shift 2 ;;
    --path) path="$2"; shift 2 ;;
    *) echo "usage: benches/features_ab.sh [--rounds N] [--duration SECONDS] [--path / | /16k]" >&2; exit 2 ;;
  esac
done

. "$root/benches/lib/side_by_side.sh"
bench_require nginx wrk
cargo build --release --quiet
bin="$root/target/release/palisade"
# The backends on 19501-19503 (CPU 1); the two palisades' configs are written below.
bench_init 19500
bench_write_configs
bench_start_backends

backends='backends = [{ addr = "127.0.0.1:19501" }, { addr = "127.0.0.1:19502" }, { addr = "127.0.0.1:19503" }]'
cat >"$work/bare.toml" <<TOML
[server]
listen = ["127.0.0.1:19510"]
access_log = false
[admin]
listen = "127.0.0.1:19511"
[[routes]]
name = "all"
upstream = "b"
[upstreams.b]
$backends
[upstreams.b.retry]
attempts = 0
TOML
cat >"$work/full.toml" <<TOML
[server]
listen = ["127.0.0.1:19520"]
access_log = true
[admin]
listen = "127.0.0.1:19521"
[[routes]]
name = "all"
upstream = "b"
allow = ["127.0.0.0/8"]
[routes.rate_limit]
requests_per_second = 10000000.0
burst = 10000000
[upstreams.b]
$backends
[upstreams.b.health]
path = "/"
interval = "1s"
timeout = "500ms"
[upstreams.b.passive]
consecutive_failures = 5
[upstreams.b.retry]
attempts = 2
budget_percent = 20
TOML
taskset -c 0 "$bin" run -c "$work/bare.toml" --log-level warn --log-format json 2>/dev/null &
pids+=($!)
bare_pid=$!
taskset -c 0 "$bin" run -c "$work/full.toml" --log-level info --log-format json 2>"$work/full.log" &
pids+=($!)
full_pid=$!
for port in 19510 19520; do
  for _ in $(seq 100); do
    curl -sf -o /dev/null "http://127.0.0.1:$port$path" && break
    sleep 0.1
  done
done

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
results="$work/rounds.txt"
: >"$results"
for r in $(seq "$rounds"); do
  for variant in bare full; do
    if [ "$variant" = bare ]; then pid=$bare_pid; port=19510; else pid=$full_pid; port=19520; fi
    t0=$(ticks "$pid")
    out=$(taskset -c 1 wrk -t1 -c32 -d"${duration}s" "http://127.0.0.1:$port$path" 2>&1)
    t1=$(ticks "$pid")
    reqs=$(echo "$out" | awk '/requests in/ {print $1}')
    echo "$r $variant $reqs $((t1 - t0))" >>"$results"
    echo "round $r $variant: $reqs requests, $(( (t1 - t0) * 1000000 / hz / (reqs > 0 ? reqs : 1) )) us/req"
  done
done
echo "access lines written by full: $(grep -c '"target":"palisade::access"' "$work/full.log" || true)"

python3 - "$results" "$hz" <<'PY'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
hz = int(sys.argv[2])
cost = {"bare": {}, "full": {}}
for r, variant, reqs, ticks in rows:
    if int(reqs) > 0:
        cost[variant][r] = int(ticks) / hz * 1e6 / int(reqs)
bare = statistics.median(cost["bare"].values())
full = statistics.median(cost["full"].values())
paired = [cost["bare"][r] / cost["full"][r] for r in cost["bare"] if r in cost["full"]]
print(f"median CPU per request: bare {bare:.1f} us, full {full:.1f} us")
print(f"full's throughput vs bare (CPU-bound): {bare / full:.1%} (medians), "
      f"{statistics.median(paired):.1%} (median of same-round pairs)")
PY
