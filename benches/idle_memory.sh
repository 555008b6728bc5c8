#!/usr/bin/env bash
# Memory per idle keep-alive client connection: palisade vs nginx, same machine, same run.
#
#   benches/idle_memory.sh              # 10,000 connections (default)
#   benches/idle_memory.sh 2000         # fewer
#
# Each proxy (one worker / one core) fronts the same echo backend. A Python client opens
# N connections to it, sends one request on each (so each has served a request and is
# now an idle keep-alive connection), then holds them. RSS of the proxy process is read
# from /proc before and after; (after - before) / N is the cost of one idle connection.
# Everything listens on 127.0.0.1 and stops at the end. Installs nginx with apt-get when
# missing (root, Debian).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
n="${1:-10000}"
ulimit -n $((n + 1024))

if ! command -v nginx >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null
fi
cargo build --release --quiet
bin="$root/target/release/palisade"
work=$(mktemp -d /tmp/palisade-idle.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

backend=127.0.0.1:19401
"$bin" echo --listen "$backend" --name idle --log-level warn &
pids+=($!)

cat >"$work/palisade.toml" <<TOML
[server]
listen = ["127.0.0.1:19402"]
access_log = false
[server.limits]
max_connections = $((n + 100))
[server.timeouts]
idle = "300s"
[admin]
listen = "127.0.0.1:19403"
[[routes]]
name = "idle"
upstream = "idle"
[upstreams.idle]
backends = [{ addr = "$backend" }]
TOML
taskset -c 0 "$bin" run -c "$work/palisade.toml" --log-level warn &
pids+=($!)
palisade_pid=$!

mkdir -p "$work/nginx"
cat >"$work/nginx/nginx.conf" <<NGINX
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile $((n + 1024));
error_log $work/nginx/error.log warn;
pid $work/nginx/nginx.pid;
events { worker_connections $((n + 200)); }
http {
  access_log off;
  keepalive_timeout 300s;
  keepalive_requests 100000;
  client_body_temp_path $work/nginx;
  proxy_temp_path $work/nginx;
  fastcgi_temp_path $work/nginx;
  uwsgi_temp_path $work/nginx;
  scgi_temp_path $work/nginx;
  upstream b { server $backend; keepalive 32; }
  server {
    listen 127.0.0.1:19404;
    location / { proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
NGINX
taskset -c 0 nginx -c "$work/nginx/nginx.conf" -p "$work/nginx" &
pids+=($!)
nginx_pid=$!

for port in 19402 19404; do
  for _ in $(seq 100); do
    curl -sf -o /dev/null "http://127.0.0.1:$port/" && break
    sleep 0.1
  done
done

cat >"$work/hold.py" <<'PY'
import socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
req = b"GET / HTTP/1.1\r\nHost: idle\r\n\r\n"
socks = []
# One connection at a time: each serves its request, then stays open and idle (a burst of
# N concurrent requests would also open up to N upstream connections).
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(10)
    s.sendall(req)
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += s.recv(65536)
    socks.append(s)
print("ready", flush=True)
time.sleep(float(sys.argv[3]))
PY

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

measure() { # name pid port
  local name=$1 pid=$2 port=$3 before after
  before=$(rss_kib "$pid")
  python3 "$work/hold.py" "$port" "$n" 6 >"$work/$name.out" &
  local holder=$!
  for _ in $(seq 600); do grep -q ready "$work/$name.out" 2>/dev/null && break; sleep 0.1; done
  sleep 2
  after=$(rss_kib "$pid")
  wait "$holder"
  printf '%-9s %8d %12d %12d %14d\n' "$name" "$n" "$before" "$after" $(( (after - before) * 1024 / n ))
}

printf '%-9s %8s %12s %12s %14s\n' proxy conns "RSS before" "RSS after" "bytes/conn"
printf '%-9s %8s %12s %12s %14s\n' "" "" "(KiB)" "(KiB)" ""
measure palisade "$palisade_pid" 19402
measure nginx "$nginx_pid" 19404
