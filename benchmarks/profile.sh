#!/bin/sh
# Profile a spfpolicy server under bench load with py-spy.
#   benchmarks/profile.sh WORKLOAD [SECONDS] [OUT.svg]      (needs: pip install py-spy)
# Starts the bench's DNS zone server and `spfpolicy serve` on a unix socket,
# drives them with `spfpolicy bench --connect`, and records the server with
# py-spy (flame graph OUT.svg plus a top-functions listing OUT.txt).
set -eu
workload=${1:-zipf}
seconds=${2:-30}
out=${3:-profile-$workload.svg}
seed=${SEED:-1}
dir=$(mktemp -d)
trap 'kill $server $dns 2>/dev/null; rm -rf "$dir"' EXIT INT TERM

python -m spfpolicy.bench.zone --seed "$seed" --delay "${DNS_DELAY:-0.02}" > "$dir/dns" &
dns=$!
while [ ! -s "$dir/dns" ]; do sleep 0.1; done
nameserver=$(head -1 "$dir/dns")
printf 'debugLevel = 1\nLog_Target = stderr\n' > "$dir/spfpolicy.conf"
spfpolicy serve -c "$dir/spfpolicy.conf" --listen "unix:$dir/sock" \
    --nameserver "$nameserver" 2> "$dir/server.log" &
server=$!
while [ ! -S "$dir/sock" ]; do sleep 0.1; done

py-spy record --pid "$server" --duration "$seconds" --rate 200 --format flamegraph \
    -o "$out" --nonblocking &
spy=$!
py-spy record --pid "$server" --duration "$seconds" --rate 200 --format raw \
    -o "$dir/raw.txt" --nonblocking &
spy_raw=$!
spfpolicy bench -w "$workload" --seed "$seed" --connect "unix:$dir/sock" --dns "$nameserver" \
    -n 0 -d "$seconds" --no-progress
wait $spy $spy_raw || true
python "$(dirname "$0")/top_functions.py" "$dir/raw.txt" > "${out%.svg}.txt"
cat "${out%.svg}.txt"
