#!/usr/bin/env bash
# Side-by-side load benchmark: palisade, nginx and HAProxy on the same core, in the same
# run, through ../shared/bench/peers.sh (see its README for what it measures and why the
# us/req column is the fair speed measure on 2 cores).
#
#   benches/load.sh                      # defaults: 3 rounds x 10 s
#   benches/load.sh --rounds 2 --duration 3 --peers nginx,haproxy   # a quick look
#
# Installs nginx, haproxy and wrk with apt-get when missing (root, Debian), builds
# palisade in release, and writes palisade's config from the harness's environment:
# round robin over the three backends, keep-alive upstream pool, no health checks, no
# access log. Every request stays on 127.0.0.1 and every run is bounded by --duration.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
peers="${PEERS_SH:-$root/../shared/bench/peers.sh}"
[ -x "$peers" ] || { echo "benches/load.sh: $peers not found" >&2; exit 2; }

missing=()
for tool in nginx haproxy wrk; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: nginx-light haproxy wrk" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light haproxy wrk >/dev/null
fi

cargo build --release --quiet
bin="$root/target/release/palisade"

# Run by peers.sh with PEERS_LISTEN, PEERS_BACKENDS and PEERS_WORKDIR set.
proxy_cmd=$(cat <<CMD
set -e
cfg="\$PEERS_WORKDIR/palisade-bench.toml"
{
  echo '[server]'
  echo "listen = [\"\$PEERS_LISTEN\"]"
  echo 'access_log = false'
  echo '[admin]'
  echo 'listen = "127.0.0.1:9911"'
  echo '[[routes]]'
  echo 'name = "bench"'
  echo 'upstream = "bench"'
  echo '[upstreams.bench]'
  echo 'balance = "round_robin"'
  printf 'backends = ['
  sep=''
  for b in \$(echo "\$PEERS_BACKENDS" | tr ',' ' '); do printf '%s{ addr = "%s" }' "\$sep" "\$b"; sep=', '; done
  echo ']'
  echo '[upstreams.bench.retry]'
  echo 'attempts = 0'
} > "\$cfg"
exec "$bin" run -c "\$cfg" --log-level warn
CMD
)
exec "$peers" --proxy-cmd "$proxy_cmd" --proxy-name palisade "$@"
