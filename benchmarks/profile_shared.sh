#!/bin/sh
# Profile the second of two MX hosts sharing one Redis (issue 14's case).
#   benchmarks/profile_shared.sh [REQUESTS] [CONNECTIONS] [SECONDS]   (needs py-spy)
# RATE=samples per second (default 500); RAW=FILE keeps py-spy's stacks.
# Starts Redis on a unix socket, the bench's DNS zone and two `spfpolicy serve`
# with Shared_Cache on it; runs the unique workload against the first, then
# the same messages against the second while py-spy records it; prints both
# bench lines, each host's shared_cache stats line and the second's top
# functions.
set -eu
n=${1:-8000}
c=${2:-100}
seconds=${3:-5}
dir=$(mktemp -d)
trap 'kill $s1 $s2 $dns $redis 2>/dev/null; rm -rf "$dir"' EXIT INT TERM
redis-server --port 0 --unixsocket "$dir/redis.sock" --save '' --appendonly no \
    --dir "$dir" --logfile "$dir/redis.log" &
redis=$!
python -m spfpolicy.bench.zone --seed 1 --delay "${DNS_DELAY:-0.02}" > "$dir/dns" &
dns=$!
while [ ! -s "$dir/dns" ] || [ ! -S "$dir/redis.sock" ]; do sleep 0.1; done
nameserver=$(head -1 "$dir/dns")
printf 'debugLevel = 1\nStats_Interval = 1\nLog_Target = stderr\nShared_Cache = unix://%s/redis.sock\n' \
    "$dir" > "$dir/spfpolicy.conf"
spfpolicy serve -c "$dir/spfpolicy.conf" --listen "unix:$dir/s1" --nameserver "$nameserver" \
    2> "$dir/s1.log" &
s1=$!
spfpolicy serve -c "$dir/spfpolicy.conf" --listen "unix:$dir/s2" --nameserver "$nameserver" \
    2> "$dir/s2.log" &
s2=$!
while [ ! -S "$dir/s1" ] || [ ! -S "$dir/s2" ]; do sleep 0.1; done
bench() {
    spfpolicy bench -w unique --seed 1 --connect "unix:$dir/$1" --dns "$nameserver" \
        -n "$n" -c "$c" --no-progress | sed -n 3,4p
}
bench s1
sleep 1.2
grep -o 'shared_cache.*' "$dir/s1.log" | tail -1
py-spy record --pid "$s2" --duration "$seconds" --rate ${RATE:-500} --format raw \
    -o "$dir/raw.txt" --nonblocking > /dev/null 2>&1 &
spy=$!
sleep 0.5
bench s2
wait $spy || true
sleep 1.2
grep -o 'shared_cache.*' "$dir/s2.log" | tail -1
if [ -n "${RAW:-}" ]; then cp "$dir/raw.txt" "$RAW"; fi
python "$(dirname "$0")/top_functions.py" "$dir/raw.txt" 25
