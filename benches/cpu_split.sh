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

missing=()
for tool in nginx haproxy wrk; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light haproxy wrk >/dev/null
fi
# PALISADE_BIN=path measures another build (an older commit's, for an A/B against the
# same nginx and HAProxy runs) instead of this tree's.
if [[ -n "${PALISADE_BIN:-}" ]]; then
  bin="$PALISADE_BIN"
else
  cargo build --release --quiet
  bin="$root/target/release/palisade"
fi
work=$(mktemp -d /tmp/palisade-split.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# Three backends on CPU 1: a 3-byte answer on /, 16 KiB on /16k.
mkdir -p "$work/www" "$work/tmp"
head -c 16384 /dev/zero | tr '\0' 'x' >"$work/www/16k"
temp_paths="client_body_temp_path $work/tmp; proxy_temp_path $work/tmp; fastcgi_temp_path $work/tmp; uwsgi_temp_path $work/tmp; scgi_temp_path $work/tmp;"
cat >"$work/backends.conf" <<NGINX
daemon off;
master_process off;
worker_processes 1;
error_log $work/backends-error.log warn;
pid $work/backends.pid;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 10000000;
  $temp_paths
  server {
    listen 127.0.0.1:19601; listen 127.0.0.1:19602; listen 127.0.0.1:19603;
    location / { return 200 "ok\n"; }
    location = /16k { root $work/www; }
  }
}
NGINX
taskset -c 1 nginx -c "$work/backends.conf" -p "$work" &
pids+=($!)

# The proxies, configured as peers.sh configures them.
cat >"$work/palisade.toml" <<TOML
[server]
listen = ["127.0.0.1:19610"]
access_log = false
[admin]
listen = "127.0.0.1:19611"
[[routes]]
name = "all"
upstream = "b"
[upstreams.b]
balance = "round_robin"
backends = [{ addr = "127.0.0.1:19601" }, { addr = "127.0.0.1:19602" }, { addr = "127.0.0.1:19603" }]
[upstreams.b.retry]
attempts = 0
TOML
cat >"$work/nginx.conf" <<NGINX
daemon off;
master_process off;
worker_processes 1;
error_log $work/nginx-error.log warn;
pid $work/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_timeout 75s;
  keepalive_requests 1000000;
  tcp_nodelay on;
  $temp_paths
  upstream backends {
    server 127.0.0.1:19601; server 127.0.0.1:19602; server 127.0.0.1:19603;
    keepalive 64;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
  }
  server {
    listen 127.0.0.1:19620 backlog=4096;
    location / {
      proxy_pass http://backends;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
NGINX
cat >"$work/haproxy.cfg" <<HAPROXY
global
    nbthread 1
    maxconn 4000
defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    http-reuse always
frontend fe
    bind 127.0.0.1:19630
    default_backend be
backend be
    balance roundrobin
    server s1 127.0.0.1:19601
    server s2 127.0.0.1:19602
    server s3 127.0.0.1:19603
HAPROXY

declare -A pid_of port_of
port_of[palisade]=19610
port_of[nginx]=19620
port_of[haproxy]=19630
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
  up=""
  for _ in $(seq 100); do
    if curl -sf -o /dev/null "http://127.0.0.1:${port_of[$name]}$path"; then up=1; break; fi
    sleep 0.1
  done
  [ -n "$up" ] || { echo "benches/cpu_split.sh: $name did not answer on ${port_of[$name]}" >&2; exit 1; }
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
