"""The bare reference server: parse each policy request and answer DUNNO.

No SPF, no DNS, no decisions: the same codec (``RequestParser``,
``encode_response``) on uvloop with a plain ``asyncio.Protocol``. It is the
ceiling the ``hot`` workload is measured against (``spfpolicy bench --target
bare``): whatever spfpolicy spends per cached request shows as the gap.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from typing import cast

from spfpolicy import eventloop
from spfpolicy.address import HostPort
from spfpolicy.protocol import ProtocolError, RequestParser, encode_response

__all__ = ["BareProtocol", "main", "serve"]


class BareProtocol(asyncio.Protocol):
    """One connection: every complete request gets ``action=DUNNO``."""

    def __init__(self) -> None:
        self._parser = RequestParser()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        assert transport is not None
        try:
            self._parser.feed(data)
            replies = []
            while (request := self._parser.next_request()) is not None:
                del request
                replies.append(encode_response("DUNNO"))
        except ProtocolError:
            transport.close()
            return
        if replies:
            transport.write(b"".join(replies))


async def serve(listen: str, ready: asyncio.Event | None = None) -> None:
    """Serve ``unix:PATH`` or ``inet:HOST:PORT`` until cancelled or signalled."""
    loop = asyncio.get_running_loop()
    family, _, where = listen.partition(":")
    if family == "unix":
        with contextlib.suppress(FileNotFoundError):
            os.unlink(where)
        server = await loop.create_unix_server(BareProtocol, where)
    elif family == "inet":
        inet = HostPort.parse(where)
        server = await loop.create_server(BareProtocol, inet.host, inet.port)
    else:
        raise ValueError(f"expected unix:PATH or inet:HOST:PORT, not {listen!r}")
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with server:
            if ready is not None:
                ready.set()
            await stop.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        if family == "unix":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(where)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m spfpolicy.bench.bare",
        description="Reference policy server: parses requests, answers DUNNO, nothing else.",
    )
    parser.add_argument("--listen", required=True, help="unix:PATH or inet:HOST:PORT")
    args = parser.parse_args(argv)
    with eventloop.runner() as runner:
        try:
            runner.run(serve(args.listen))
        except (OSError, ValueError) as exc:
            print(f"{parser.prog}: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
