"""CPU per request of a second MX host answering from the shared cache, without sockets.

    python benchmarks/second_host.py [--requests N] [--rounds K] [--local]

Issue 14's second host in-process. Starts a throwaway redis-server (Debian's,
on a unix socket) and the bench's DNS zone server (20 ms per answer); a
first PolicyServer with Shared_Cache on that Redis answers the first N
requests of the `unique` workload from cold, which writes their DNS
answers and SPF outcomes to Redis. Then, K times, a new PolicyServer on the
same Redis (an empty first level, as a second MX host has) answers the
same messages as a connection does (``benchsetup.answer_all``: 100
messages at a time, each request parsed from its bytes, ``answer_now``,
the read of the outcome Redis holds, ``answer_read``, the response
encoded). Prints the process CPU per request of each round, with Redis's
hits: the second host's cost less its socket calls.

With --local, each round's server then answers the same messages once
more, its verdict memo and per-message memory emptied (plans off) but its
result cache kept: the outcomes now come from its first level, through the
same harness, so the difference between the two figures is what reading
them from Redis costs. Compare also with ``unique_cached.py
--keep-results`` (outcomes in the first level, requests one at a time) and
with ``cold_attempts.py`` (the first host's cold requests).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import uvloop
from benchsetup import answer_all, bench_server, redis_server, workload_messages, zone_server
from unique_cached import parsed

from spfpolicy.bench.workloads import WorkloadKind
from spfpolicy.lifecycle import tune_garbage_collector
from spfpolicy.memory import InstanceMemory, VerdictMemo
from spfpolicy.server import PolicyServer


async def timed(server: PolicyServer, messages: list[list[bytes]]) -> float:
    """Process CPU seconds to answer ``messages``."""
    cpu = time.process_time()
    await answer_all(server, messages)
    return time.process_time() - cpu


async def measure(
    count: int, rounds: int, nameserver: str, redis_url: str, workdir: Path, *, local: bool
) -> None:
    messages = workload_messages(WorkloadKind.UNIQUE, count)
    requests = sum(len(m) for m in messages)
    extra = f"Shared_Cache = {redis_url}\n"
    (workdir / "first").mkdir()
    async with bench_server(nameserver, workdir / "first", extra) as first:
        assert first.resolver.shared is not None
        await first.resolver.shared.connect()
        await answer_all(first, [parsed(m) for m in messages])  # closing it sends its writes
    tune_garbage_collector()
    for round_ in range(rounds):
        (workdir / f"second{round_}").mkdir()
        async with bench_server(nameserver, workdir / f"second{round_}", extra) as second:
            shared = second.resolver.shared
            assert shared is not None
            await shared.connect()
            cpu = await timed(second, messages)
            stats = shared.stats
            line = (
                f"round {round_ + 1}: {cpu / requests * 1e6:.1f} us CPU per request "
                f"({requests} requests; Redis: {stats.result_hits} outcomes found, "
                f"{stats.result_misses} not; {stats.hits} DNS answers found, {stats.misses} not; "
                f"{stats.read_batches} read trips; "
                f"{second.resolver.stats.upstream_queries} upstream queries)"
            )
            if local:
                settings = second.settings
                second.memo = VerdictMemo(settings, settings.result_cache_size)
                second.memory = InstanceMemory(settings.instance_cache_size, settings.instance_ttl)
                second.checks.plans = None
                cpu = await timed(second, messages)
                line += f"; from the first level: {cpu / requests * 1e6:.1f} us"
            print(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local", action="store_true", help="then the same from the first level")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory() as tmp,
        redis_server() as redis_url,
        zone_server(delay=0.02) as nameserver,
    ):
        uvloop.run(
            measure(args.requests, args.rounds, nameserver, redis_url, Path(tmp), local=args.local)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
