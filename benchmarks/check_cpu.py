"""CPU per evaluation through SpfEvaluator.check when every answer is cached.

    python benchmarks/check_cpu.py [--domains N]

Starts the bench's DNS zone server (no delay) in a subprocess, evaluates N
of its sender domains twice to fill the DNS cache, then times five rounds
of ten new clients per domain through ``SpfEvaluator.check``: the path of
an evaluation that may wait for lookups (pyspf in a runner greenlet, the
task that drives it), here with none to wait for. Prints the best round's
process CPU per evaluation. Beside ``benchmarks/plan_cpu.py``, which times
``check_now`` (no greenlet) on the same kind of records, the difference is
what driving an evaluation costs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

from benchsetup import zone_server

from spfpolicy import eventloop
from spfpolicy.bench.zone import domain_for
from spfpolicy.evaluator import SpfEvaluator
from spfpolicy.lifecycle import tune_garbage_collector
from spfpolicy.resolver import Resolver

ROUNDS = 5
CLIENTS = 10


async def _run(nameserver: str, count: int) -> None:
    resolver = Resolver([nameserver])
    evaluator = SpfEvaluator(resolver)
    domains = [domain_for(1, 1000 + i).name for i in range(count)]
    for client in ("192.0.2.1", "192.0.2.2"):  # the second pass finds what prefetches left
        for domain in domains:
            await evaluator.check(client, f"a@{domain}", "h.example")
        await asyncio.sleep(0.3)
    tune_garbage_collector()  # as the server does once started
    asked = resolver.stats.upstream_queries
    best = float("inf")
    for round_ in range(ROUNDS):
        cpu = time.process_time()
        for k in range(CLIENTS):
            for domain in domains:
                await evaluator.check(f"198.51.{round_}.{k}", f"a@{domain}", "h.example")
        best = min(best, (time.process_time() - cpu) / (CLIENTS * len(domains)))
    print(
        f"check() over cached records: {best * 1e6:.1f} us CPU per evaluation "
        f"(best of {ROUNDS} rounds of {CLIENTS * len(domains)}; "
        f"{resolver.stats.upstream_queries - asked} upstream queries meanwhile, "
        "for the zone's SERVFAIL names)"
    )
    await resolver.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", type=int, default=300)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the zone's failing names would be logged
    with zone_server() as nameserver, eventloop.runner() as runner:
        runner.run(_run(nameserver, args.domains))
    return 0


if __name__ == "__main__":
    sys.exit(main())
