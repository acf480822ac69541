#!/usr/bin/env bash
# `make cluster-demo`: three relays and HAProxy on loopback, with
# contrib/haproxy.cfg as shipped but for its addresses: the balancer on
# 127.0.0.1:$PORT (3000), the relays on the three ports after it. Every
# channel lives on one relay; try
#   curl -d hello localhost:3000/jobs   and   curl localhost:3000/jobs
# and see which relay made the pair: curl localhost:3001/status (3002, 3003).
# Ctrl-C stops them all. BIN picks the patchcord binary.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/patchcord}
PORT=${PORT:-3000}
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
[ -x "$HAPROXY" ] || { echo "cluster-demo: HAProxy is not installed (Debian: apt install haproxy)" >&2; exit 1; }
[ -x "$BIN" ] || { echo "cluster-demo: no $BIN (make build first)" >&2; exit 1; }

dir=$(mktemp -d)
pids=()
stop() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap stop EXIT INT TERM

# The relays share one key (hooks minted on one work on all; the relays
# prove with it that they take answers for each other).
export PATCHCORD_SECRET_KEY
PATCHCORD_SECRET_KEY=$(head -c 32 /dev/urandom | base64)
conf=$(sed -e "s/^    bind :3000$/    bind 127.0.0.1:$PORT/" contrib/haproxy.cfg)
for i in 1 2 3; do
  port=$((PORT + i))
  conf=$(printf '%s\n' "$conf" | sed -e "s/^    server relay$i 127.0.0.1:300$i$/    server relay$i 127.0.0.1:$port/")
  "$BIN" --listen "127.0.0.1:$port" --shard-tag "relay$i" --trust-proxy 127.0.0.1 \
    --cluster-url "http://127.0.0.1:$PORT" --quiet > /dev/null &
  pids+=($!)
done
printf '%s\n' "$conf" > "$dir/haproxy.cfg"
# -n: fewer connections than the shipped 20,000, which need root's limits.
"$HAPROXY" -db -n 4000 -f "$dir/haproxy.cfg" &
pids+=($!)
echo "cluster-demo: HAProxy on http://127.0.0.1:$PORT, relays on $((PORT + 1)), $((PORT + 2)), $((PORT + 3)); Ctrl-C stops"
wait -n "${pids[@]}" || true
echo "cluster-demo: a process ended; stopping the others" >&2
