"""Shared fixtures: real DNS answers from the project's loopback server.

``zone_server`` starts as many ``ZoneServer`` instances as a test asks for and
closes them all at teardown, so no test leaks a socket.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import pytest

from spfpolicy.bench.dnsserver import Zone, ZoneServer

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
