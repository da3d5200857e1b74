"""CPU per entry written to the shared cache: encode, queue, send, reply.

    python benchmarks/shared_writes.py [--entries N] [--rounds R] [--no-scripts]

Starts a throwaway redis-server (Debian's, on a unix socket in a temporary
directory, as `spfpolicy bench --shared-cache` does), then, R times, queues
N DNS answers through ``SharedCache.put`` and waits until they are written,
as the resolver does after each upstream answer. Prints the process CPU per
entry of each round (the first pays for the connection and the script's
first load). N stays under MAX_PENDING, so no write is dropped. With
--no-scripts the writes go as pipelined SETs, the way they go to a Redis
that refuses scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from benchsetup import redis_server

from spfpolicy import sharedcache
from spfpolicy.sharedcache import SharedCache

RECORD = ((b"v=spf1 include:_spf.bigmail.example ~all",),)


async def _run(url: str, entries: int, rounds: int, scripts: bool) -> None:
    cache = SharedCache(url, timeout=1.0)
    cache._scripts = scripts
    try:
        for round_ in range(rounds):
            cpu = time.process_time()
            for i in range(entries):
                cache.put(f"d{round_}-{i}.example", "TXT", 300.0, RECORD, 300.0)
            while cache._pending or cache._flusher is not None:
                await asyncio.sleep(0.001)
            cpu = time.process_time() - cpu
            print(f"round {round_ + 1}: {cpu / entries * 1e6:.2f} us CPU per written entry")
        stats = cache.stats
        print(
            f"{stats.writes} written, {stats.writes_dropped} dropped, {stats.write_errors} refused"
        )
    finally:
        await cache.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=8000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--no-scripts", action="store_true", help="pipelined SETs")
    args = parser.parse_args()
    entries = min(args.entries, sharedcache.MAX_PENDING)
    with redis_server() as url:
        asyncio.run(_run(url, entries, args.rounds, not args.no_scripts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
