#!/bin/sh
# The scenarios of docs/performance.md, with the commands of its table.
#   benchmarks/run_all.sh [OUTDIR]
# Needs Debian's policyd-spf for the baseline (apt-get install postfix-policyd-spf-python)
# and matplotlib for the plots (pip install 'spfpolicy[bench]').
set -eu
out=${1:-bench-results}
mkdir -p "$out"
uptime

# zipf against Debian's policyd-spf run like spawn(8), same DNS and workload, C=100, 20 ms.
spfpolicy bench -w zipf -c 100 -n 40000 -d 45 --baseline-cmd '/usr/bin/policyd-spf {conf}' \
    --json "$out/zipf_vs_policyd.json" --plot "$out/zipf_vs_policyd.png"

# The baseline's ~450 processes load the machine for a while as they exit.
sleep 20

# hot against the bare parse-and-DUNNO server (the ceiling), same run.
spfpolicy bench -w hot -n 100000 -d 20 --target spfpolicy --target bare \
    --json "$out/hot_vs_bare.json"

# unique (cold cache): p50 against the critical path (printed in RTTs) x 20 ms.
spfpolicy bench -w unique -n 20000 -d 30 --json "$out/unique.json"

# memory: fill the DNS cache (100,000 entries) with fresh names until it evicts.
spfpolicy bench -w unique -n 120000 -d 90 --dns-delay 0.002 --json "$out/memory.json"

# 1,000 connections against 100.
spfpolicy bench -w zipf -c 100 -n 30000 -d 45 --json "$out/zipf_c100.json"
spfpolicy bench -w zipf -c 1000 -n 30000 -d 45 --json "$out/zipf_c1000.json"
uptime
