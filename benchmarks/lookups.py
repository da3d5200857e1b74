"""CPU per upstream DNS lookup through Resolver.resolve, without SPF.

    python benchmarks/lookups.py [--lookups N] [--concurrency C]

Starts the bench's DNS zone server (no delay) in a subprocess and resolves
the TXT records of N sender domains no lookup has asked for before, C at a
time, through one Resolver (c-ares on the loop, as the server runs it).
Prints the process CPU per lookup over the timed part (after 200 warm-up
lookups): the floor a cold request's ~2-3 upstream lookups put under its
CPU, whatever SPF evaluation costs on top.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import subprocess
import sys
import time

from spfpolicy import eventloop
from spfpolicy.bench.zone import domain_for
from spfpolicy.resolver import DnsTempError, Resolver

WARMUP = 200


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _run(nameserver: str, lookups: int, concurrency: int) -> None:
    resolver = Resolver([nameserver])
    names = [domain_for(1, 500_000 + i).name for i in range(lookups + WARMUP)]
    slots = asyncio.Semaphore(concurrency)

    async def one(name: str) -> None:
        async with slots:
            with contextlib.suppress(DnsTempError):  # the zone's SERVFAIL domains
                await resolver.resolve(name, "TXT")

    await asyncio.gather(*(one(name) for name in names[:WARMUP]))
    cpu, wall = _cpu(), time.perf_counter()
    await asyncio.gather(*(one(name) for name in names[WARMUP:]))
    cpu, wall = _cpu() - cpu, time.perf_counter() - wall
    print(
        f"{cpu / lookups * 1e6:.1f} us CPU per lookup, {lookups / wall:,.0f} lookups/s, "
        f"{resolver.stats.upstream_queries - WARMUP} queries"
    )
    await resolver.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lookups", type=int, default=8000)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    zone = subprocess.Popen(
        [sys.executable, "-m", "spfpolicy.bench.zone", "--delay", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert zone.stdout is not None
        nameserver = zone.stdout.readline().strip()
        with eventloop.runner() as runner:
            runner.run(_run(nameserver, args.lookups, args.concurrency))
    finally:
        zone.terminate()
        zone.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
