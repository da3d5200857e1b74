"""CPU per request with a shared level that holds nothing, against none.

    python benchmarks/shared_miss.py [--requests N] [--chunks K] [--dns-delay SECONDS]
                                     [--without answers|outcomes|writes]

Issue 14's cost of the shared level at a hit rate of 0, without the load
generator and the machine's other work between two runs: one process, two
PolicyServers with the bench's configuration (see benchsetup.py), one
without Shared_Cache and one with it on a throwaway redis-server (Debian's,
on a unix socket) that only it writes to, answer the same requests of the
`zipf` workload from a cold start, K chunks each, taking turns chunk by
chunk (100 messages at a time, a message's recipients one after another,
``answer_now``, the read of an outcome Redis may hold, then ``answer``, as a
connection does: ``benchsetup.answer_all``; no sockets of ours).
The server with the shared level misses in Redis for all but what it wrote
itself and has in its first level already: the bench's `--shared-cache -w
zipf` case. Prints the process CPU per request of each chunk for both and
the ratio of the totals (off / on: the throughput ratio a CPU-bound server
would show). The two servers share the process, so the collector's work is
shared too; the zone server's CPU is its own process's.

--without takes one part of the shared level away from the server that has
it, to see what that part costs: ``answers`` (DNS answers neither read nor
written: SPF outcomes only), ``outcomes`` (DNS answers only), ``writes``
(reads only).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import uvloop
from benchsetup import answer_all, bench_server, redis_server, workload_messages, zone_server
from unique_cached import parsed

from spfpolicy.bench.workloads import WorkloadKind
from spfpolicy.lifecycle import tune_garbage_collector


def per_chunk(signed: list[float]) -> list[float]:
    """on - off per chunk, from each chunk's two signed figures in turn."""
    return [signed[i] + signed[i + 1] for i in range(0, len(signed) - 1, 2)]


async def measure(
    count: int, chunks: int, nameserver: str, redis_url: str, workdir: Path, without: str
) -> None:
    messages = [parsed(m) for m in workload_messages(WorkloadKind.ZIPF, count)]
    size = -(-len(messages) // chunks)
    parts = [messages[i : i + size] for i in range(0, len(messages), size)]
    (workdir / "off").mkdir()
    (workdir / "on").mkdir()
    async with contextlib.AsyncExitStack() as stack:
        off = await stack.enter_async_context(bench_server(nameserver, workdir / "off"))
        on = await stack.enter_async_context(
            bench_server(nameserver, workdir / "on", f"Shared_Cache = {redis_url}\n")
        )
        shared = on.resolver.shared
        assert shared is not None
        await shared.connect()
        if without == "answers":
            on.resolver.shared = None
        elif without == "outcomes":
            on.checks.shared = None
        elif without == "writes":
            shared._queue = lambda *entry: None
        tune_garbage_collector()
        totals = {"off": [0.0, 0], "on": [0.0, 0]}
        differences = []
        for index, part in enumerate(parts):
            requests = sum(len(m) for m in part)
            line = []
            for name, server in (
                (("off", off), ("on", on))
                if index % 2
                else (
                    ("on", on),
                    ("off", off),
                )
            ):
                cpu = time.process_time()
                await answer_all(server, part)
                cpu = time.process_time() - cpu
                totals[name][0] += cpu
                totals[name][1] += requests
                line.append(f"{name} {cpu / requests * 1e6:6.1f}")
                differences.append((cpu if name == "on" else -cpu) / requests * 1e6)
            print(f"chunk {index + 1}: {requests} requests, us CPU per request: {', '.join(line)}")
        per = {name: cpu / n * 1e6 for name, (cpu, n) in totals.items()}
        stats = shared.stats
        print(
            f"total: off {per['off']:.1f}, on {per['on']:.1f} us per request; "
            f"off / on {per['off'] / per['on']:.3f}; the shared level "
            f"{per['on'] - per['off']:+.1f} us per request (median of the chunks' "
            f"{statistics.median(per_chunk(differences)):+.1f}); Redis: {stats.hits} answer hits, "
            f"{stats.misses} misses, {stats.result_hits} result hits, "
            f"{stats.result_misses} misses, {stats.writes + stats.result_writes} written; "
            f"{stats.read_batches} read trips of {stats.read_keys} keys, "
            f"{sum(stats.latency_counts) - stats.read_batches} write trips"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--chunks", type=int, default=10)
    parser.add_argument("--dns-delay", type=float, default=0.02)
    parser.add_argument("--without", choices=("answers", "outcomes", "writes"), default="")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory() as tmp,
        redis_server() as redis_url,
        zone_server(delay=args.dns_delay) as nameserver,
    ):
        uvloop.run(
            measure(args.requests, args.chunks, nameserver, redis_url, Path(tmp), args.without)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
