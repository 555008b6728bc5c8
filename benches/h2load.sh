#!/usr/bin/env bash
# HTTPS + HTTP/2 load through palisade with h2load (Debian's nghttp2-client): TLS
# termination, ALPN h2, streams multiplexed on a few connections, to one echo backend.
#
#   benches/h2load.sh                 # 100,000 requests, 10 connections x 10 streams
#   benches/h2load.sh -n 20000 -c 4 -m 20
#
# Installs nghttp2-client when missing (root, Debian); generates a throwaway certificate
# with openssl; everything listens on 127.0.0.1 and the run is bounded by -n.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
command -v h2load >/dev/null 2>&1 || {
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client >/dev/null
}
cargo build --release --quiet
bin="$root/target/release/palisade"
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT INT TERM

openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=localhost" \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
  -keyout "$work/key.pem" -out "$work/cert.pem" >/dev/null 2>&1

"$bin" echo --listen 127.0.0.1:9191 --name h2load --log-level warn & pids+=($!)
cat > "$work/palisade.toml" <<TOML
[server]
listen = ["127.0.0.1:8088"]
access_log = false
[[server.tls]]
listen = "127.0.0.1:8443"
cert = "cert.pem"
key = "key.pem"
[admin]
listen = "127.0.0.1:9912"
[[routes]]
upstream = "echo"
[upstreams.echo]
backends = [{ addr = "127.0.0.1:9191" }]
TOML
"$bin" run -c "$work/palisade.toml" --log-level warn & pids+=($!)
for _ in $(seq 50); do
  (exec 3<>/dev/tcp/127.0.0.1/8443) 2>/dev/null && break
  sleep 0.1
done

args=("$@")
[ ${#args[@]} -gt 0 ] || args=(-n 100000 -c 10 -m 10)
h2load "${args[@]}" https://127.0.0.1:8443/health
