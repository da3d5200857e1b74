"""Shared fixtures: real DNS answers from the project's loopback server, and
a PolicyServer on a real unix socket.

``zone_server`` starts as many ``ZoneServer`` instances as a test asks for and
closes them all at teardown, so no test leaks a socket; ``policy_server`` and
``clients`` likewise stop every server and close every client they made.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from serving import ZONE, Client, Running, settings_for
from spfpolicy.bench.dnsserver import Zone, ZoneServer
from spfpolicy.bench.redisserver import RedisProcess, RedisUnavailable
from spfpolicy.resolver import Resolver
from spfpolicy.server import PolicyServer

MakeZoneServer = Callable[..., Awaitable[ZoneServer]]


@pytest.fixture
async def zone_server() -> AsyncIterator[MakeZoneServer]:
    """``await zone_server(zone_or_dict, **ZoneServer_kwargs)`` -> a started server."""
    servers: list[ZoneServer] = []

    async def make(zone: Zone | Mapping[str, Any], **kwargs: Any) -> ZoneServer:
        if not isinstance(zone, Zone):
            zone = Zone.from_dict(zone)
        server = ZoneServer(zone, **kwargs)
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.close()


# -- a PolicyServer on a unix socket (tests/serving.py has the plumbing) --------


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., Awaitable[Client]]]:
    """``await clients(path)`` or ``await clients(host=, port=)``; all closed at teardown."""
    made: list[Client] = []

    async def connect(path: Path | str | None = None, *, host: str = "", port: int = 0) -> Client:
        if path is not None:
            reader, writer = await asyncio.open_unix_connection(str(path))
        else:
            reader, writer = await asyncio.open_connection(host, port)
        client = Client(reader, writer)
        made.append(client)
        return client

    yield connect
    for client in made:
        await client.close()


@pytest.fixture
async def policy_server(
    tmp_path: Path, zone_server: Any, clients: Callable[..., Awaitable[Client]]
) -> AsyncIterator[Callable[..., Awaitable[Running]]]:
    """``await policy_server(**settings_changes)`` -> a started server on tmp_path/pN.sock."""
    started: list[PolicyServer] = []

    async def start(*, zone: dict[str, Any] = ZONE, delay: float = 0.0, **changes: Any) -> Running:
        dns = await zone_server(zone, delay=delay)
        path = tmp_path / f"p{len(started)}.sock"
        settings = settings_for(dns, path, **changes)
        server = PolicyServer(settings)
        started.append(server)
        await server.start(settings.listen)
        return Running(server, dns, path, lambda: clients(path))

    yield start
    for server in started:
        await server.stop(grace=1.0)


@pytest.fixture
async def resolvers() -> AsyncIterator[Callable[..., Resolver]]:
    """``resolvers(zone_server_instance, **Resolver_kwargs)`` -> a resolver asking
    it (0.5 s timeout, one try unless given); all closed at teardown."""
    made: list[Resolver] = []

    def make(server: ZoneServer, **kwargs: Any) -> Resolver:
        kwargs.setdefault("timeout", 0.5)
        kwargs.setdefault("tries", 1)
        resolver = Resolver([server.nameserver], **kwargs)
        made.append(resolver)
        return resolver

    yield make
    for resolver in made:
        await resolver.close()


# -- a real Redis (Debian's redis-server, started in tmp_path) -------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Callable[..., RedisProcess]]:
    """``redis_server(password=...)`` -> a started redis-server; all stopped
    at teardown; the test is skipped where redis-server cannot start."""
    started: list[RedisProcess] = []

    def make(password: str = "") -> RedisProcess:
        server = RedisProcess(tmp_path / f"redis{len(started)}", password=password)
        started.append(server)
        try:
            server.start()
        except RedisUnavailable as exc:
            pytest.skip(str(exc))
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def connect_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """As ``serve`` does once privileges are dropped: a server's first
    connection to Redis is made before the first request, not by it
    (``pytestmark = pytest.mark.usefixtures("connect_at_start")``)."""
    start = PolicyServer.start

    async def start_and_connect(self: PolicyServer, *args: Any, **kwargs: Any) -> None:
        await start(self, *args, **kwargs)
        if self.resolver.shared is not None:
            await self.resolver.shared.connect()

    monkeypatch.setattr(PolicyServer, "start", start_and_connect)
