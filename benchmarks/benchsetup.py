"""What the in-process benchmark scripts share: the bench's DNS zone server
in a subprocess, a throwaway redis-server, a PolicyServer set up the way
`spfpolicy bench` runs it, and requests answered the way a connection
answers them.

Imported by the scripts beside it (``python benchmarks/NAME.py`` puts this
directory first on ``sys.path``).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

from spfpolicy import logs
from spfpolicy.bench.loadgen import BENCH_CONF
from spfpolicy.bench.redisserver import RedisProcess
from spfpolicy.bench.workloads import Workload, WorkloadKind
from spfpolicy.config import load_settings
from spfpolicy.deciding import Known
from spfpolicy.protocol import PolicyRequest, RequestParser, encode_response
from spfpolicy.server import PolicyServer


def workload_messages(kind: WorkloadKind, count: int) -> list[list[bytes]]:
    """The first ``count`` requests (at least) of the workload with seed 1,
    by message: each message's requests as the load generator sends them."""
    messages: list[list[bytes]] = []
    total = 0
    for message in Workload(kind=kind, seed=1).messages():
        messages.append([request.data for request in message.requests])
        total += len(messages[-1])
        if total >= count:
            break
    return messages


@contextlib.contextmanager
def zone_server(seed: int = 1, delay: float = 0.0) -> Iterator[str]:
    """The bench's zone (``python -m spfpolicy.bench.zone``) answering on
    loopback while the block runs: its nameserver address."""
    zone = subprocess.Popen(
        [sys.executable, "-m", "spfpolicy.bench.zone", "--seed", str(seed), "--delay", str(delay)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert zone.stdout is not None
        yield zone.stdout.readline().strip()
    finally:
        zone.terminate()
        zone.wait()


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """Debian's redis-server on a unix socket in a temporary directory, no
    persistence, while the block runs: its URL."""
    with tempfile.TemporaryDirectory() as tmp, RedisProcess(Path(tmp)) as redis:
        yield redis.url


@contextlib.asynccontextmanager
async def bench_server(
    nameserver: str, workdir: Path, extra: str = ""
) -> AsyncIterator[PolicyServer]:
    """A PolicyServer with the bench's configuration (Debian's default
    policyd-spf.conf, debugLevel 1) and the ``extra`` lines, logging to a
    file in ``workdir`` as the bench's server logs to its stderr; closed,
    and stderr given back (logging too), after."""
    conf = workdir / "spfpolicy.conf"
    conf.write_text(f"{BENCH_CONF}Nameservers = {nameserver}\n{extra}")
    settings = load_settings(conf)
    stderr = sys.stderr
    sys.stderr = open(workdir / "log", "w", buffering=1)  # noqa: SIM115
    try:
        logs.configure(settings.debug_level, ["stderr"])
        server = PolicyServer(settings)
        try:
            yield server
        finally:
            await server.close()
    finally:
        sys.stderr.close()
        sys.stderr = stderr
        logs.configure(settings.debug_level, ["stderr"])  # not the closed file


async def answer_all(
    server: PolicyServer, messages: Sequence[Sequence[PolicyRequest | bytes]]
) -> None:
    """Answer ``messages``, 100 at a time, a message's recipients one after
    another, as a connection does (no sockets): ``answer_now`` first; for
    a request left waiting for an SPF outcome the shared cache may hold,
    its read (``answer_later``) and ``answer_read``; then ``answer``.
    A request given as its bytes is parsed here (one RequestParser per
    message, as a connection keeps one) and its answer encoded, so that
    the caller's timing holds the connection's parsing too."""
    slots = asyncio.Semaphore(100)
    loop = asyncio.get_running_loop()

    async def one(message: Sequence[PolicyRequest | bytes]) -> None:
        parser = RequestParser()
        async with slots:
            for item in message:
                if isinstance(item, PolicyRequest):
                    request = item
                else:
                    parser.feed(item)
                    parsed = parser.next_request()
                    assert parsed is not None
                    request = parsed
                now = server.answer_now(request)
                if isinstance(now, Known):
                    read: asyncio.Future[bool] = loop.create_future()
                    if server.answer_later(request, now, read.set_result):
                        started = time.perf_counter()
                        now = server.answer_read(request, now, await read, started)
                if not isinstance(now, str):
                    now = await server.answer(request, now or None)
                if not isinstance(item, PolicyRequest):
                    encode_response(now)

    await asyncio.gather(*(one(m) for m in messages))
