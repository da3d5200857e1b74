"""What the tests with a real Redis share besides conftest's
``redis_server`` and ``connect_at_start`` fixtures."""

from __future__ import annotations

from serving import Running
from spfpolicy.sharedcache import SharedCache


def shared(running: Running) -> SharedCache:
    """The running server's shared cache, the one its checks use too."""
    cache = running.server.resolver.shared
    assert cache is not None and running.server.checks.shared is cache
    return cache
