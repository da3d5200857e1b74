"""CPU per request of the unique workload when every DNS answer is cached.

    python benchmarks/unique_cached.py [--requests N] [--keep-results]

Starts the bench's DNS zone server (no delay) in a subprocess, answers the
first N requests of the `unique` workload once through a PolicyServer
(Debian's default policyd-spf.conf as the bench uses it, debugLevel 1,
logging to a file), so that every DNS answer they need is cached; then,
three times, empties the SPF result cache, the verdict memo, the
per-message memory and the plan store (plans off, as a domain seen once
never gets one) and answers the same requests again, one at a time, the
way a connection answers them: their bytes fed to a RequestParser,
``answer_now``, ``answer`` for a request that has to wait, and the
response encoded. Prints the process CPU per request of each round.

What a unique request costs besides its upstream lookups and its socket
calls: parsing, two pyspf evaluations per message from cached records, the
decision, the log line. Add the lookups' own cost (`benchmarks/lookups.py
--floor`, about 1.9 per request) for what a cold request cannot cost less
than with this code. The few SERVFAIL names are asked again each round (temperror
answers are not cached).

With --keep-results the SPF result cache stays too: each round is then
new messages whose checks' outcomes are known (no pyspf, no plan), the
way a second MX host answers them from the shared cache, less the Redis
read.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from benchsetup import bench_server, workload_messages, zone_server

from spfpolicy.bench.workloads import WorkloadKind
from spfpolicy.checks import DnsChecks
from spfpolicy.lifecycle import tune_garbage_collector
from spfpolicy.memory import InstanceMemory, VerdictMemo
from spfpolicy.protocol import PolicyRequest, RequestParser, encode_response

ROUNDS = 3


def unique_requests(count: int) -> list[bytes]:
    """The first ``count`` requests of the unique workload."""
    messages = workload_messages(WorkloadKind.UNIQUE, count)
    return [data for message in messages for data in message][:count]


def parsed(data: list[bytes]) -> list[PolicyRequest]:
    out = []
    for chunk in data:
        parser = RequestParser()
        parser.feed(chunk)
        request = parser.next_request()
        assert request is not None
        out.append(request)
    return out


async def measure(count: int, nameserver: str, workdir: Path, *, keep_results: bool) -> None:
    async with bench_server(nameserver, workdir) as server:
        settings = server.settings
        data = unique_requests(count)
        warm = parsed(data)
        for start in range(0, len(warm), 50):  # 50 at a time, the lookups overlapping
            await asyncio.gather(*(server.answer(r) for r in warm[start : start + 50]))
        tune_garbage_collector()
        asked = server.resolver.stats.upstream_queries
        for round_ in range(ROUNDS):
            if keep_results:
                server.checks.plans = None
            else:
                server.checks = DnsChecks(
                    server.evaluator,
                    void_limit=settings.void_limit,
                    result_cache_size=settings.result_cache_size,
                    result_cache_ttl=settings.result_cache_ttl,
                    plans=False,
                )
            server.memo = VerdictMemo(settings, settings.result_cache_size)
            server.memory = InstanceMemory(settings.instance_cache_size, settings.instance_ttl)
            parser = RequestParser()
            cpu = time.process_time()
            for chunk in data:  # as a connection answers them, one at a time
                parser.feed(chunk)
                request = parser.next_request()
                assert request is not None
                now = server.answer_now(request)
                if not isinstance(now, str):
                    now = await server.answer(request, now or None)
                encode_response(now)
            cpu = time.process_time() - cpu
            print(
                f"round {round_ + 1}: {cpu / len(data) * 1e6:.1f} us CPU per request "
                f"({len(data)} requests, "
                f"{server.resolver.stats.upstream_queries - asked} upstream queries since warm)"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--keep-results", action="store_true", help="keep the SPF result cache")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, zone_server() as nameserver:
        asyncio.run(measure(args.requests, nameserver, Path(tmp), keep_results=args.keep_results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
