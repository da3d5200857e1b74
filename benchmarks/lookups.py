"""CPU per upstream DNS lookup through Resolver.resolve, without SPF.

    python benchmarks/lookups.py [--lookups N] [--concurrency C] [--floor | --shared]

Starts the bench's DNS zone server (no delay) in a subprocess and resolves
the TXT records of N sender domains no lookup has asked for before, C at a
time (C tasks, one lookup each at a time), through one Resolver (c-ares on
the loop, and the garbage collector tuned, as the server runs them).
Prints the process CPU per lookup over the timed part (after 200 warm-up
lookups): the floor a cold request's ~2-3 upstream lookups put under its
CPU, whatever SPF evaluation costs on top.

With --floor, the same lookups go straight to c-ares through the thinnest
call this project has (``cares.LoopResolver.query_reply``: c-ares driven
from the loop, its reply read into a ``Reply``), with no cache, no
single-flight and no answer conversion: what a lookup costs below
resolver.py, the part no change to this project's own code can remove.

With --shared, the Resolver has a shared level on a throwaway redis-server
(Debian's, on a unix socket) that holds none of the names: each lookup reads
Redis, misses, asks DNS and writes the answer back, the shared level's cost
at a hit rate of 0 (issue 14), to compare with a run without it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Iterator

import aiodns
import pycares
from benchsetup import redis_server, zone_server

from spfpolicy import eventloop
from spfpolicy.bench.zone import domain_for
from spfpolicy.cares import LoopResolver
from spfpolicy.lifecycle import tune_garbage_collector
from spfpolicy.resolver import DnsTempError, Resolver
from spfpolicy.sharedcache import SharedCache

WARMUP = 200


async def _run(
    nameserver: str, lookups: int, concurrency: int, floor: bool, shared_url: str
) -> None:
    resolver = Resolver([nameserver])
    if shared_url:
        resolver.shared = SharedCache(shared_url)
        await resolver.shared.connect()
    names = [domain_for(1, 500_000 + i).name for i in range(lookups + WARMUP)]
    channel = LoopResolver(
        nameservers=[nameserver], loop=asyncio.get_running_loop(), timeout=2.0, tries=2
    )

    async def ask(name: str) -> None:
        if floor:
            with contextlib.suppress(aiodns.error.DNSError):
                await channel.query_reply(name.encode("ascii"), pycares.QUERY_TYPE_TXT)
        else:
            with contextlib.suppress(DnsTempError):  # the zone's SERVFAIL domains
                await resolver.resolve(name, "TXT")

    async def worker(queue: Iterator[str]) -> None:
        # C workers taking names from one iterator: as the server's requests
        # do, a few tasks each awaiting one lookup at a time (a task and a
        # semaphore wait per lookup would be the harness's cost, not the
        # resolver's, and thousands of waiting tasks would make every
        # garbage collection walk them).
        for name in queue:
            await ask(name)

    async def run(part: list[str]) -> None:
        queue = iter(part)
        await asyncio.gather(*(worker(queue) for _ in range(concurrency)))

    await run(names[:WARMUP])
    tune_garbage_collector()  # as the server does once started
    cpu, wall = time.process_time(), time.perf_counter()
    await run(names[WARMUP:])
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    queries = "" if floor else f", {resolver.stats.upstream_queries - WARMUP} queries"
    what = "c-ares alone (--floor)" if floor else "through Resolver.resolve"
    if shared_url:
        stats = resolver.shared.stats  # type: ignore[union-attr]
        what += f" with a shared level ({stats.misses} misses, {stats.hits} hits)"
    print(
        f"{cpu / lookups * 1e6:.1f} us CPU per lookup {what}, "
        f"{lookups / wall:,.0f} lookups/s{queries}"
    )
    channel.cancel()
    await resolver.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lookups", type=int, default=8000)
    parser.add_argument("--concurrency", type=int, default=50)
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--floor", action="store_true", help="c-ares alone, no Resolver")
    how.add_argument("--shared", action="store_true", help="a shared level holding nothing")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        shared_url = ""
        if args.shared:
            shared_url = stack.enter_context(redis_server())
        nameserver = stack.enter_context(zone_server())
        runner = stack.enter_context(eventloop.runner())
        runner.run(_run(nameserver, args.lookups, args.concurrency, args.floor, shared_url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
