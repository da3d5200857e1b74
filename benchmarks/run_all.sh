#!/bin/sh
# The scenarios of docs/performance.md, each bounded to about a minute per target.
#   benchmarks/run_all.sh [OUTDIR]
# Needs Debian's policyd-spf for the baseline (apt-get install postfix-policyd-spf-python)
# and matplotlib for the plots (pip install 'spfpolicy[plot]').
set -eu
out=${1:-bench-results}
mkdir -p "$out"
uptime

# zipf against Debian's policyd-spf run like spawn(8), same DNS and workload, C=100, 20 ms.
spfpolicy bench -w zipf -c 100 -n 40000 -d 60 --baseline-cmd '/usr/bin/policyd-spf {conf}' \
    --json "$out/zipf_vs_policyd.json" --plot "$out/zipf_vs_policyd.png"

# hot against the bare parse-and-DUNNO server (the ceiling), same run.
spfpolicy bench -w hot -n 200000 -d 30 --target spfpolicy --target bare \
    --json "$out/hot_vs_bare.json"

# unique (cold cache): p50 against the critical path (printed in RTTs) x 20 ms.
spfpolicy bench -w unique -n 40000 -d 60 --json "$out/unique.json"

# memory: fill the DNS cache with fresh names (upstream queries ~ cache entries).
spfpolicy bench -w unique -n 60000 -d 90 --dns-delay 0.002 --json "$out/memory.json"

# 1,000 connections against 100.
spfpolicy bench -w zipf -c 100 -n 30000 -d 45 --json "$out/zipf_c100.json"
spfpolicy bench -w zipf -c 1000 -n 30000 -d 45 --json "$out/zipf_c1000.json"
uptime
