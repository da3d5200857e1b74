"""CPU per request of the cached path, without sockets: parse, decide, log, encode.

    python benchmarks/hotpath.py [--requests N] [--profile]

Starts the bench's DNS zone server in a subprocess, warms a PolicyServer
(Debian's default policyd-spf.conf as the bench uses it, debugLevel 1,
logging to a file) with the `hot` workload's requests, then times feeding
those requests' bytes through RequestParser, PolicyServer.answer_now and
encode_response, the work the server does per cached request besides the
socket calls. Prints microseconds per request (best of 5 rounds); with
--profile, a cProfile listing of one round.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import itertools
import pstats
import sys
import tempfile
import time
from pathlib import Path

from benchsetup import bench_server, zone_server

from spfpolicy.bench.workloads import Workload, WorkloadKind
from spfpolicy.protocol import RequestParser, encode_response
from spfpolicy.server import PolicyServer


def hot_requests(count: int) -> list[bytes]:
    workload = Workload(kind=WorkloadKind.HOT, seed=1, domains=20_000, hot_tuples=10)
    out: list[bytes] = []
    for message in workload.messages():
        out.extend(request.data for request in message.requests)
        if len(out) >= count:
            return out[:count]
    raise AssertionError("unreachable")


def one_round(server: PolicyServer, data: list[bytes]) -> float:
    parser = RequestParser()
    feed, next_request, answer_now = parser.feed, parser.next_request, server.answer_now
    started = time.perf_counter()
    for chunk in data:
        feed(chunk)
        request = next_request()
        assert request is not None
        action = answer_now(request)
        assert isinstance(action, str), "not cached: warm-up missed a request"
        encode_response(action)
    return time.perf_counter() - started


async def measure(args: argparse.Namespace, nameserver: str, workdir: Path) -> None:
    async with bench_server(nameserver, workdir) as server:
        await _measure(args, server)


async def _measure(args: argparse.Namespace, server: PolicyServer) -> None:
    data = hot_requests(args.requests)
    # Warm-up: every distinct request through the full path, twice (the
    # second pass remembers each message's instance like a real run).
    for chunk in itertools.chain(data, data):
        parser = RequestParser()
        parser.feed(chunk)
        request = parser.next_request()
        assert request is not None
        await server.answer(request)
    # Later passes: a new instance per request, as the bench does per cycle.
    rounds = [
        [chunk.replace(b"\ninstance=", b"\ninstance=r%d." % n) for chunk in data] for n in range(6)
    ]
    one_round(server, rounds[0])
    best = min(one_round(server, r) for r in rounds[1:])
    print(f"{best / len(data) * 1e6:.1f} us per request ({len(data)} requests, best of 5)")
    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        one_round(server, [c.replace(b"\ninstance=", b"\ninstance=p.") for c in data])
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, zone_server() as nameserver:
        asyncio.run(measure(args, nameserver, Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
