# Sourced by benches/cpu_split.sh and benches/callgrind.sh: the three nginx backends and
# the proxies under test, configured as ../shared/bench/peers.sh configures them (round
# robin over the three backends, keep-alive to them, one worker, no access log).
#
# bench_init BASE makes the work directory ($work, removed on exit, with every process
# in $pids killed) and picks the ports, all on 127.0.0.1:
#   BASE+1..BASE+3  the backends: "ok\n" on /, 16 KiB on /16k
#   BASE+10         palisade (its admin API on BASE+11)
#   BASE+20         nginx
#   BASE+30         HAProxy
# bench_write_configs writes backends.conf, palisade.toml, nginx.conf and haproxy.cfg
# into $work; bench_start_backends starts the backends on CPU 1.

# bench_require TOOL... : installs the Debian packages of any missing tool (root).
bench_require() {
  local missing=() tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local packages=() t
  for t in "${missing[@]}"; do
    case "$t" in
      nginx) packages+=(nginx-light) ;;
      h2load) packages+=(nghttp2-client) ;;
      objdump | addr2line) packages+=(binutils) ;;
      callgrind_control) packages+=(valgrind) ;;
      *) packages+=("$t") ;;
    esac
  done
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
}

bench_cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}

bench_init() {
  local base="$1"
  work=$(mktemp -d /tmp/palisade-bench.XXXXXX)
  pids=()
  trap bench_cleanup EXIT
  backend_ports=($((base + 1)) $((base + 2)) $((base + 3)))
  palisade_port=$((base + 10))
  admin_port=$((base + 11))
  nginx_port=$((base + 20))
  haproxy_port=$((base + 30))
}

bench_write_configs() {
  local b1="${backend_ports[0]}" b2="${backend_ports[1]}" b3="${backend_ports[2]}"
  mkdir -p "$work/www" "$work/tmp"
  head -c 16384 /dev/zero | tr '\0' 'x' >"$work/www/16k"
  local temp_paths="client_body_temp_path $work/tmp; proxy_temp_path $work/tmp; fastcgi_temp_path $work/tmp; uwsgi_temp_path $work/tmp; scgi_temp_path $work/tmp;"
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
    listen 127.0.0.1:$b1; listen 127.0.0.1:$b2; listen 127.0.0.1:$b3;
    location / { return 200 "ok\n"; }
    location = /16k { root $work/www; }
  }
}
NGINX
  cat >"$work/palisade.toml" <<TOML
[server]
listen = ["127.0.0.1:$palisade_port"]
access_log = false
[admin]
listen = "127.0.0.1:$admin_port"
[[routes]]
name = "all"
upstream = "b"
[upstreams.b]
balance = "round_robin"
backends = [{ addr = "127.0.0.1:$b1" }, { addr = "127.0.0.1:$b2" }, { addr = "127.0.0.1:$b3" }]
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
    server 127.0.0.1:$b1; server 127.0.0.1:$b2; server 127.0.0.1:$b3;
    keepalive 64;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
  }
  server {
    listen 127.0.0.1:$nginx_port backlog=4096;
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
    bind 127.0.0.1:$haproxy_port
    default_backend be
backend be
    balance roundrobin
    server s1 127.0.0.1:$b1
    server s2 127.0.0.1:$b2
    server s3 127.0.0.1:$b3
HAPROXY
}

bench_start_backends() {
  taskset -c 1 nginx -c "$work/backends.conf" -p "$work" &
  pids+=($!)
}

# bench_wait_answering NAME PORT PATH: waits (up to 20 s) for a 2xx on PATH.
bench_wait_answering() {
  local _
  for _ in $(seq 200); do
    curl -sf -o /dev/null "http://127.0.0.1:$2$3" && return 0
    sleep 0.1
  done
  echo "$1 did not answer on 127.0.0.1:$2" >&2
  return 1
}
