"""The event loop every entry point runs on, chosen in this one place:
uvloop where it is installed (a dependency on Linux: its loop is what the
benchmarks measure), asyncio's own loop otherwise."""

from __future__ import annotations

import asyncio


def runner() -> asyncio.Runner:
    """An ``asyncio.Runner`` on the chosen loop; use it as a context manager."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)
