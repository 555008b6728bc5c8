#!/usr/bin/env bash
# Side-by-side load benchmark: palisade, nginx and HAProxy on the same core, in the same
# run, through ../shared/bench/peers.sh (see its README for what it measures and why the
# us/req column is the fair speed measure on 2 cores).
#
#   benches/load.sh                      # defaults: 3 rounds x 10 s
#   benches/load.sh --rounds 2 --duration 3 --peers nginx,haproxy   # a quick look
#   benches/load.sh --features full      # palisade with every feature of the example
#                                        # config on (see below), vs the same peers
#
# --features bare (default): round robin, keep-alive pool, retries off, no access log.
# --features full: also active health checks every second, a rate limit per client that
# never trips, an allow list, retries with a budget, passive outlier detection, and the
# access log written to a file. Metrics are always on. Compare the two runs through their
# ratio to nginx in the same run (the machine drifts between runs).
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

features=bare
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --features) features="${2:-}"; shift 2 ;;
    --features=*) features="${1#--features=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
case "$features" in
  bare|full) ;;
  *) echo "benches/load.sh: --features must be bare or full" >&2; exit 2 ;;
esac

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
  if [ "$features" = full ]; then
    echo '[upstreams.bench.health]'
    echo 'path = "/"'
    echo 'interval = "1s"'
    echo 'timeout = "500ms"'
    echo '[upstreams.bench.passive]'
    echo 'consecutive_failures = 5'
    echo '[upstreams.bench.retry]'
    echo 'attempts = 2'
    echo 'budget_percent = 20'
  else
    echo '[upstreams.bench.retry]'
    echo 'attempts = 0'
  fi
} > "\$cfg"
if [ "$features" = full ]; then
  # The route gains an allow list and a limit no client reaches; the access log (JSON,
  # one line per request) goes to a file.
  sed -i 's/^upstream = "bench"\$/upstream = "bench"\nallow = ["127.0.0.0\/8"]\n[routes.rate_limit]\nrequests_per_second = 10000000.0\nburst = 10000000/; s/^access_log = false\$/access_log = true/' "\$cfg"
  # Not beside the config: palisade watches the config's directory, and a file written
  # there on every request would wake the watcher on every request.
  mkdir -p "\$PEERS_WORKDIR/log"
  exec "$bin" run -c "\$cfg" --log-level info --log-format json 2>"\$PEERS_WORKDIR/log/palisade-access.log"
fi
exec "$bin" run -c "\$cfg" --log-level warn
CMD
)
exec "$peers" --proxy-cmd "$proxy_cmd" --proxy-name "palisade-$features" "${args[@]}"
