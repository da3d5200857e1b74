"""CPU per cold request in-process, and the decision attempts behind it.

    python benchmarks/cold_attempts.py [--requests N] [--dns-delay SECONDS]

Starts the bench's DNS zone server (20 ms per answer by default) in a
subprocess and answers the first N requests of the `unique` workload
through a PolicyServer (Debian's default policyd-spf.conf as the bench uses
it, debugLevel 1, logging to a file) on uvloop: 100 messages at a time, a
message's recipients one after another, each request tried with
``answer_now`` first and then ``answer``, as a connection does. No sockets.

Prints the process CPU per request and, per request: the decision attempts
that stopped at a missing answer and those that decided (``_decide`` calls,
counted by wrapping it), pyspf evaluations that waited for DNS
(``SpfEvaluator.check``) and those that joined one already in flight for
the same check, and plan builds. The zone server's CPU is its own process's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import uvloop
from benchsetup import answer_all, bench_server, workload_messages, zone_server
from unique_cached import parsed

from spfpolicy import deciding
from spfpolicy.bench.workloads import WorkloadKind
from spfpolicy.evaluator import SpfEvaluator
from spfpolicy.lifecycle import tune_garbage_collector

COUNTS: Counter[str] = Counter()


def _count_attempts() -> None:
    attempt = deciding._decide

    def counted(*args: Any) -> Any:
        try:
            decision = attempt(*args)
        except deciding._Missing:
            COUNTS["stopped"] += 1
            raise
        COUNTS["decided"] += 1
        return decision

    deciding._decide = counted  # type: ignore[assignment]
    check = SpfEvaluator.check

    async def evaluated(self: SpfEvaluator, *args: Any, **kwargs: Any) -> Any:
        COUNTS["evaluations"] += 1
        return await check(self, *args, **kwargs)

    SpfEvaluator.check = evaluated  # type: ignore[method-assign]


async def measure(count: int, nameserver: str, workdir: Path) -> None:
    async with bench_server(nameserver, workdir) as server:
        tune_garbage_collector()
        messages = [parsed(m) for m in workload_messages(WorkloadKind.UNIQUE, count)]
        count = sum(len(m) for m in messages)
        _count_attempts()
        cpu = time.process_time()
        await answer_all(server, messages)
        cpu = time.process_time() - cpu
        plans = server.checks.plans
        builds = plans.builds if plans is not None else 0
        flights = getattr(server.checks, "joined", 0)  # older trees have no such count
        print(
            f"{cpu / count * 1e6:.1f} us CPU per request ({count} requests); per request: "
            f"{COUNTS['stopped'] / count:.2f} attempts stopped, "
            f"{COUNTS['decided'] / count:.2f} decided, "
            f"{COUNTS['evaluations'] / count:.2f} evaluations waited for DNS, "
            f"{flights / count:.2f} joined one in flight, {builds / count:.3f} plan builds"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--dns-delay", type=float, default=0.02)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, zone_server(delay=args.dns_delay) as nameserver:
        uvloop.run(measure(args.requests, nameserver, Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
