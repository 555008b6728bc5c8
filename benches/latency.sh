#!/usr/bin/env bash
# Latency at the same load: palisade, nginx and HAProxy, each proxy pinned to CPU 0, all
# offered the same fixed request rate by h2load (HTTP/1.1, CPU 1, with the backends), in
# alternating rounds; prints per-request latency percentiles (medians over the rounds).
#
#   benches/latency.sh                          # 3 rounds x 10 s at 5,000 and 15,000 req/s
#   benches/latency.sh --rates 2000 --rounds 2 --duration 5
#
# Why not peers.sh: wrk keeps a fixed number of requests in flight, so each proxy runs at
# its own saturation and p99 mixes speed with queueing. Here every proxy gets the same
# offered load, well below saturation, so p99 is the latency a proxy adds.
#
# The proxies mirror peers.sh's configs (one worker / thread each, keep-alive upstream
# pools, round robin over three nginx backends). Installs nginx, haproxy and h2load
# (nghttp2-client) with apt-get when missing. Every request stays on 127.0.0.1, every run
# is bounded by --duration. "direct" is h2load straight to one backend: the harness's own
# floor. "clustered" is the share of the requests at or above p99 that started in the
# worst 1 % of the run's 10 ms windows: on a shared machine, stalls put much of the tail
# in a few windows for every proxy alike, and then p99 says more about the machine than
# about the proxy.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

rates="5000,15000"
rounds=3
duration=10
conns=32
while [ $# -gt 0 ]; do
  case "$1" in
    --rates) rates="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --duration) duration="$2"; shift 2 ;;
    --connections) conns="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "benches/latency.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
for n in "$rounds" "$duration" "$conns"; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "benches/latency.sh: not a positive number: $n" >&2; exit 2; }
done
[ "$duration" -le 120 ] || { echo "benches/latency.sh: --duration is at most 120" >&2; exit 2; }

missing=()
command -v nginx >/dev/null 2>&1 || missing+=(nginx-light)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

cargo build --release --quiet
bin="$root/target/release/palisade"

work=$(mktemp -d /tmp/palisade-latency.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/tmp" "$work/log"

proxy_port=18480
backend_ports=(18481 18482 18483)

{
  echo "daemon off; master_process off; worker_processes 1;"
  echo "pid $work/backends.pid; error_log $work/log/backends.log warn;"
  echo "events { worker_connections 4096; }"
  echo "http { access_log off; keepalive_timeout 75s; keepalive_requests 1000000;"
  echo "  client_body_temp_path $work/tmp; proxy_temp_path $work/tmp;"
  for p in "${backend_ports[@]}"; do
    echo "  server { listen 127.0.0.1:$p backlog=4096; location / { default_type text/plain; return 200 \"ok\\n\"; } }"
  done
  echo "}"
} > "$work/backends.conf"

{
  echo "daemon off; master_process off; worker_processes 1;"
  echo "pid $work/nginx.pid; error_log $work/log/nginx.log warn;"
  echo "events { worker_connections 4096; }"
  echo "http { access_log off; keepalive_timeout 75s; keepalive_requests 1000000; tcp_nodelay on;"
  echo "  client_body_temp_path $work/tmp; proxy_temp_path $work/tmp;"
  echo "  upstream backends {"
  for p in "${backend_ports[@]}"; do echo "    server 127.0.0.1:$p;"; done
  echo "    keepalive 64; keepalive_requests 1000000; keepalive_timeout 60s; }"
  echo "  server { listen 127.0.0.1:$proxy_port backlog=4096;"
  echo "    location / { proxy_pass http://backends; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
  echo "}"
} > "$work/nginx.conf"

{
  echo "global"
  echo "    nbthread 1"
  echo "    maxconn 4000"
  echo "defaults"
  echo "    mode http"
  echo "    option http-keep-alive"
  echo "    timeout connect 5s"
  echo "    timeout client 60s"
  echo "    timeout server 60s"
  echo "    http-reuse always"
  echo "frontend fe"
  echo "    bind 127.0.0.1:$proxy_port"
  echo "    default_backend be"
  echo "backend be"
  echo "    balance roundrobin"
  i=1; for p in "${backend_ports[@]}"; do echo "    server s$i 127.0.0.1:$p"; i=$((i + 1)); done
} > "$work/haproxy.cfg"

{
  echo '[server]'
  echo "listen = [\"127.0.0.1:$proxy_port\"]"
  echo 'access_log = false'
  echo '[admin]'
  echo 'listen = "127.0.0.1:18489"'
  echo '[[routes]]'
  echo 'name = "bench"'
  echo 'upstream = "bench"'
  echo '[upstreams.bench]'
  echo 'balance = "round_robin"'
  printf 'backends = ['
  sep=''
  for p in "${backend_ports[@]}"; do printf '%s{ addr = "127.0.0.1:%s" }' "$sep" "$p"; sep=', '; done
  echo ']'
  echo '[upstreams.bench.retry]'
  echo 'attempts = 0'
} > "$work/palisade.toml"

start_proxy() {
  case "$1" in
    direct) proxy_pid=""; return 0 ;;
    palisade) taskset -c 0 "$bin" run -c "$work/palisade.toml" --log-level warn 2>"$work/log/palisade.log" & ;;
    nginx) taskset -c 0 nginx -p "$work/" -c "$work/nginx.conf" & ;;
    haproxy) taskset -c 0 haproxy -db -f "$work/haproxy.cfg" >"$work/log/haproxy.log" 2>&1 & ;;
  esac
  proxy_pid=$!
  for _ in $(seq 100); do
    curl -s -o /dev/null "http://127.0.0.1:$proxy_port/" && return 0
    sleep 0.1
  done
  echo "benches/latency.sh: $1 did not come up on 127.0.0.1:$proxy_port" >&2
  exit 1
}

stop_proxy() {
  [ -n "$proxy_pid" ] || return 0
  kill "$proxy_pid" 2>/dev/null || true
  wait "$proxy_pid" 2>/dev/null || true
  for _ in $(seq 50); do
    ss -ltn "sport = :$proxy_port" | grep -q LISTEN || return 0
    sleep 0.1
  done
}

taskset -c 1 nginx -p "$work/" -c "$work/backends.conf" &
pids+=($!)
for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:${backend_ports[0]}/" && break; sleep 0.1; done
if ss -ltn "sport = :$proxy_port" | grep -q LISTEN; then
  echo "benches/latency.sh: 127.0.0.1:$proxy_port is already in use" >&2
  exit 1
fi

results="$work/results.tsv"
: > "$results"
IFS=',' read -r -a rate_list <<< "$rates"
for round in $(seq "$rounds"); do
  echo "round $round/$rounds" >&2
  for proxy in palisade nginx haproxy direct; do
    start_proxy "$proxy"
    port=$proxy_port
    [ "$proxy" = direct ] && port=${backend_ports[0]}
    for rate in "${rate_list[@]}"; do
      [[ "$rate" =~ ^[1-9][0-9]*$ ]] || { echo "benches/latency.sh: bad rate $rate" >&2; exit 2; }
      per_client=$(( (rate + conns - 1) / conns ))
      log="$work/log/$proxy-$rate-$round.tsv"
      # Warm-up excluded from the log; the rate is per connection.
      taskset -c 1 h2load --h1 -c "$conns" --rps "$per_client" -D "$duration" \
        --warm-up-time 1 --log-file "$log" "http://127.0.0.1:$port/" > "$work/log/h2load.out" 2>&1 || true
      python3 - "$proxy" "$rate" "$round" "$log" "$duration" >> "$results" <<'PY'
import collections, sys
proxy, rate, rnd, path, duration = sys.argv[1:]
rows, errors = [], 0
for line in open(path):
    parts = line.split()
    if len(parts) < 3:
        continue
    if parts[1] != "200":
        errors += 1
    rows.append((int(parts[0]), int(parts[2])))
lat = sorted(us for _, us in rows)
def pct(p):
    return lat[min(len(lat) - 1, int(len(lat) * p))] / 1000.0 if lat else float("nan")
# How clustered the slowest 1 % is: the share of the requests at or above p99 that
# started in the worst 1 % of the run's 10 ms windows. Stalls of the machine put many
# slow requests in a few windows, for every proxy alike.
clustered = float("nan")
if lat:
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    windows = {start // 10000 for start, _ in rows}
    slow = collections.Counter(start // 10000 for start, us in rows if us >= p99)
    worst = sum(n for _, n in slow.most_common(max(1, len(windows) // 100)))
    clustered = 100.0 * worst / max(1, sum(slow.values()))
print("\t".join([proxy, rate, rnd, str(len(lat) / float(duration)), str(pct(0.5)),
                 str(pct(0.9)), str(pct(0.99)), str(pct(0.999)),
                 str(lat[-1] / 1000.0 if lat else float("nan")), str(errors), str(clustered)]))
PY
      echo "  $proxy @ $rate req/s: $(tail -1 "$results" | cut -f4,7 | awk '{printf "%.0f req/s, p99 %.3f ms", $1, $2}')" >&2
    done
    stop_proxy
  done
done

python3 - "$results" "$rounds" "$duration" "$conns" <<'PY'
import statistics, sys
path, rounds, duration, conns = sys.argv[1:]
rows = {}
for line in open(path):
    p, rate, rnd, rps, p50, p90, p99, p999, mx, err, clustered = line.rstrip("\n").split("\t")
    rows.setdefault((p, int(rate)), []).append(
        (float(rps), float(p50), float(p90), float(p99), float(p999), float(mx), int(err),
         float(clustered)))
print(f"median of {rounds} rounds, {duration} s each, {conns} connections, fixed offered rate (h2load --rps)")
print(f"{'proxy':<10}{'rate':>8}{'got/s':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'p99.9 ms':>10}{'max ms':>9}{'errs':>6}{'clustered':>11}  p99 vs nginx")
for rate in sorted({r for _, r in rows}):
    nginx = rows.get(("nginx", rate))
    nginx_p99 = statistics.median(x[3] for x in nginx) if nginx else None
    for proxy in ("palisade", "nginx", "haproxy", "direct"):
        v = rows.get((proxy, rate))
        if not v:
            continue
        med = [statistics.median(x[i] for x in v) for i in range(6)]
        errs = sum(x[6] for x in v)
        clustered = statistics.median(x[7] for x in v)
        ratio = f"{med[3] / nginx_p99:.2f}x" if nginx_p99 else "-"
        print(f"{proxy:<10}{rate:>8}{med[0]:>9.0f}{med[1]:>9.3f}{med[2]:>9.3f}{med[3]:>9.3f}{med[4]:>10.3f}{med[5]:>9.3f}{errs:>6}{clustered:>10.0f}%  {ratio}")
print("clustered: the share of the requests at or above p99 that started in the worst 1 % of")
print("the run's 10 ms windows (median over rounds); high when stalls of the machine, not the")
print("proxy's own cost per request, make the tail.")
PY
