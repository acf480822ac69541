#!/usr/bin/env bash
# The named-pipe bench: the same bash client against pipe-io-server's echo
# server and against `patchcord fifo` with a local relay. Prints one line
# per figure, `scenario|figure|value|unit`, for the bench harness
# (benches/relay.rs, `--only fifo`); or one `SKIP|reason` line.
#
# Usage: fifo.sh PATCHCORD_BINARY MESSAGES
set -euo pipefail
bin=$1
n=$2
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
    sleep 0.3
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
trap '' PIPE

if ! command -v python3 >/dev/null 2>&1; then
    echo "SKIP|python3 is not installed"
    exit 0
fi
if ! python3 -c 'import pipe_io_server' 2>/dev/null; then
    echo "SKIP|pipe-io-server is not installed (pip install pipe-io-server==1.0.3)"
    exit 0
fi
hz=$(getconf CLK_TCK)

now() { date +%s%N; }
# CPU seconds (user + system) of the processes given.
cpu() {
    local total=0 pid fields
    for pid in "$@"; do
        read -r -a fields < <(sed 's/.*) //' "/proc/$pid/stat")
        total=$((total + fields[11] + fields[12]))
    done
    echo "$total"
}
# Peak RSS in KiB of the processes given, summed.
rss() {
    local total=0 pid kib
    for pid in "$@"; do
        kib=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status")
        total=$((total + kib))
    done
    echo "$total"
}
report() { echo "$1|$2|$3|$4"; }
# Waits until path $1 exists, at most 10 s.
wait_for() {
    for _ in $(seq 200); do [ -e "$1" ] && return 0; sleep 0.05; done
    echo "timed out waiting for $1" >&2
    return 1
}

# The client: $1 writes to the server, $2 is read from it.
round_trips() {
    local to=$1 from=$2 i line
    exec 7<"$from"
    for ((i = 0; i < n; i++)); do
        printf 'message %d\n' "$i" >"$to"
        IFS= read -r line <&7
    done
    exec 7<&-
}
one_way() {
    local to=$1 from=$2
    head -n "$n" <"$from" >"$work/got" &
    local reader=$!
    for ((i = 0; i < n; i++)); do printf 'message %d\n' "$i"; done >"$to"
    wait "$reader"
    [ "$(wc -l <"$work/got")" -eq "$n" ]
}
# Runs the client against a server whose processes are $pids_of_server.
measure() {
    local label=$1 to=$2 from=$3
    shift 3
    local start cpu0 elapsed cpu1
    cpu0=$(cpu "$@"); start=$(now)
    round_trips "$to" "$from"
    elapsed=$(( $(now) - start )); cpu1=$(cpu "$@")
    report "$label" "echo round trips per second" "$(echo "$n * 1000000000 / $elapsed" | bc)" "trips/s"
    report "$label" "server CPU per round trip" "$(echo "scale=1; ($cpu1 - $cpu0) * 1000000 / $hz / $n" | bc)" "us"
    cpu0=$(cpu "$@"); start=$(now)
    one_way "$to" "$from"
    elapsed=$(( $(now) - start )); cpu1=$(cpu "$@")
    report "$label" "messages per second, one way" "$(echo "$n * 1000000000 / $elapsed" | bc)" "msg/s"
    report "$label" "server CPU per message" "$(echo "scale=1; ($cpu1 - $cpu0) * 1000000 / $hz / $n" | bc)" "us"
    report "$label" "server peak RSS" "$(echo "scale=2; $(rss "$@") / 1024" | bc)" "MiB"
}

# ── pipe-io-server 1.0.3: its README's echo server ──
cat >"$work/echo.py" <<'PY'
import sys
from pipe_io_server import PipeIOServer
class EchoPipeIOServer(PipeIOServer):
    def handle_message(self, message):
        self.send_message(message)
with EchoPipeIOServer(sys.argv[1], sys.argv[2]) as pipe_io:
    pipe_io.wait()
PY
python3 "$work/echo.py" "$work/pio-in" "$work/pio-out" &
pio=$!
disown "$pio"
pids+=("$pio")
wait_for "$work/pio-out"
sleep 0.2
measure "pipe-io-server 1.0.3 echo" "$work/pio-in" "$work/pio-out" "$pio"

# ── patchcord: a relay, the echo server as a bash loop behind one bridge,
#    the client behind another ──
"$bin" serve --listen 127.0.0.1:0 -q >"$work/relay.out" 2>/dev/null &
relay=$!
disown "$relay"
pids+=("$relay")
wait_for "$work/relay.out"
for _ in $(seq 100); do grep -q listening "$work/relay.out" && break; sleep 0.05; done
url=$(sed -n 's/^listening on //p' "$work/relay.out")
echo_bridge=$("$bin" fifo -q -b "$work/echo" --server "$url" --recv echo/in --send echo/out)
pids+=("$echo_bridge")
(
    trap '' PIPE
    while IFS= read -r line; do printf '%s\n' "$line"; done <"$work/echo/recv" >"$work/echo/send"
) &
echo_loop=$!
disown "$echo_loop"
pids+=("$echo_loop")
client=$("$bin" fifo -q -b "$work/client" --server "$url" --send echo/in --recv echo/out)
pids+=("$client")
# The server side counted: the relay, both bridges and the bash echo loop.
measure "patchcord fifo echo" "$work/client/send" "$work/client/recv" \
    "$relay" "$echo_bridge" "$client" "$echo_loop"

# ── buffered readers: three messages waiting, three `head -n1` readers ──
kill -INT "$pio" 2>/dev/null || true
cat >"$work/three.py" <<'PY'
import sys, time
from pipe_io_server import PipeIOServer
class Three(PipeIOServer):
    def handle_message(self, message):
        pass
with Three(sys.argv[1], sys.argv[2]) as pipe_io:
    for i in (1, 2, 3):
        pipe_io.send_message(b"m%d" % i)
    pipe_io.wait()
PY
python3 "$work/three.py" "$work/three-in" "$work/three-out" &
three=$!
disown "$three"
pids+=("$three")
wait_for "$work/three-out"
sleep 0.3
got=0
for _ in 1 2 3; do
    line=$(timeout 2 head -n1 <"$work/three-out" || true)
    [ -n "$line" ] && got=$((got + 1))
done
report "3 messages, 3 head -n1 readers" "pipe-io-server: messages lost" "$((3 - got))" "of 3"
reader=$("$bin" fifo -q -b "$work/strict" --server "$url" --recv three)
pids+=("$reader")
senders=()
for i in 1 2 3; do
    curl -s --max-time 10 -d "m$i" "$url/three" >/dev/null &
    senders+=($!)
done
got=0
for _ in 1 2 3; do
    line=$(timeout 5 head -n1 <"$work/strict/recv" || true)
    [ -n "$line" ] && got=$((got + 1))
done
wait "${senders[@]}" || true
report "3 messages, 3 head -n1 readers" "patchcord fifo: messages lost" "$((3 - got))" "of 3"
