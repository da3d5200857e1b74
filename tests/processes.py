"""Plumbing for the tests that run ``python -m spfpolicy`` as a real child
process: start it (killed at the end whatever happens) and ask it over its
unix socket with the project's codec."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from spfpolicy.protocol import ResponseParser, encode_request


@contextlib.asynccontextmanager
async def child(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    pass_fds: tuple[int, ...] = (),
    launcher: str | None = None,
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``python -m spfpolicy ARGV``, or ``python -c LAUNCHER ARGV`` (a script
    that prepares the process, then execs spfpolicy). The child sees none of
    this process's LISTEN_*/NOTIFY_* variables, only those in ``env``; its
    stderr is a pipe, its stdout discarded."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    full_env.update(env or {})
    if launcher is not None:
        command = [sys.executable, "-c", launcher, *argv]
    else:
        command = [sys.executable, "-m", "spfpolicy", *argv]
    proc = await asyncio.create_subprocess_exec(
        *command,
        env=full_env,
        pass_fds=pass_fds,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def ask(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, attrs: dict[str, str]
) -> str:
    """One request on an open connection, and the action it gets."""
    writer.write(encode_request(attrs))
    await writer.drain()
    parser = ResponseParser()
    async with asyncio.timeout(10):
        while (action := parser.next_response()) is None:
            data = await reader.read(65536)
            if not data:
                raise EOFError("closed before answering")
            parser.feed(data)
    return action


async def connect_when_listening(
    path: Path | str, proc: asyncio.subprocess.Process, bound: float = 10.0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to ``proc``'s unix socket once it accepts one (a socket
    left by an earlier run, or one made before privileges are dropped,
    refuses connections until then); fails if ``proc`` ends first."""
    async with asyncio.timeout(bound):
        while True:
            assert proc.returncode is None, "the server ended before it listened"
            with contextlib.suppress(OSError):
                return await asyncio.open_unix_connection(str(path))
            await asyncio.sleep(0.02)
