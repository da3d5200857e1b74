"""Test helpers (not a test module) for the hardening tests: requests, a strict
response reader, in-process and subprocess policy servers, RSS and fd limits.

Used by test_hardening_input.py, test_dns_faults.py, test_overload.py and the
fuzz script (tests/fuzz/fuzz_server.py). Every wait here is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import resource
import socket
import unicodedata
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from spfpolicy.bench.dnsserver import ZoneServer
from spfpolicy.config import ListenAddress, ListenFamily, Nameserver, Settings
from spfpolicy.protocol import MAX_RESPONSE_LINE, ResponseParser, encode_request
from spfpolicy.server import PolicyServer

GOOD_IP = "192.0.2.10"  # authorized by pass.example
BAD_IP = "198.51.100.1"  # not authorized anywhere
HELO = "mx.client.example"  # no such name: the HELO check gives None
RECIPIENT = "user@rcpt.example"
ANSWER_TIMEOUT = 30.0  # one answer, when the test states no tighter bound

_instances = itertools.count(1)


def request(
    sender: str = "a@pass.example",
    ip: str = BAD_IP,
    helo: str = HELO,
    *,
    instance: str | None = None,
    recipient: str = RECIPIENT,
    **extra: str,
) -> dict[str, str]:
    """A request as Postfix sends it at RCPT; a fresh instance (message) unless given."""
    return {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "protocol_name": "ESMTP",
        "client_address": ip,
        "client_name": "unknown",
        "reverse_client_name": "unknown",
        "helo_name": helo,
        "sender": sender,
        "recipient": recipient,
        "recipient_count": "0",
        "queue_id": "",
        "instance": instance or f"inst.{next(_instances)}",
        "size": "0",
        **extra,
    }


def header(result: str, sender: str, ip: str = BAD_IP, helo: str = HELO) -> str:
    """The Received-SPF prepend for a MAIL FROM result (policyd-spf 3.0.4 wording)."""
    return (
        f"prepend Received-SPF: {result} (mailfrom) identity=mailfrom; client-ip={ip}; "
        f"helo={helo}; envelope-from={sender}; receiver=rcpt.example "
    )


# Unicode characters that break no line for Postfix or SMTP but are not
# printable either: line and paragraph separators, format characters (bidi
# overrides, zero-width), surrogates. A MUA or log viewer may break or reorder
# text there.
_INVISIBLE = {"Zl", "Zp", "Cf", "Cs"}


class MalformedResponse(AssertionError):
    """The server wrote something that is not exactly one clean action line."""


class UnprintableResponse(MalformedResponse):
    """One clean action line, but with Unicode separators or format characters."""


def check_response_block(block: bytes, *, invisibles: list[str] | None = None) -> str:
    """The action of one response block (its bytes up to and including "\\n\\n").

    Strict: exactly one line, ``action=`` then UTF-8 with no control character
    (C0, DEL, C1), at most MAX_RESPONSE_LINE bytes; the project's
    ResponseParser reads the same action. Unicode separators and format
    characters raise UnprintableResponse, or are appended to ``invisibles``
    when a list is given.
    """
    if not block.endswith(b"\n\n") or block.count(b"\n") != 2:
        raise MalformedResponse(f"not one line and a blank line: {block[:300]!r}")
    line = block[:-2]
    if not line.startswith(b"action="):
        raise MalformedResponse(f"no action line: {line[:300]!r}")
    if len(line) > MAX_RESPONSE_LINE:
        raise MalformedResponse(f"line of {len(line)} bytes > {MAX_RESPONSE_LINE}")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedResponse(f"not UTF-8: {line[:300]!r}") from exc
    if any(unicodedata.category(c) == "Cc" for c in text):
        raise MalformedResponse(f"control character: {text[:300]!r}")
    action = text.removeprefix("action=")
    if not action.strip():
        raise MalformedResponse("empty action")
    parser = ResponseParser()
    parser.feed(block)
    if parser.next_response() != action or parser.next_response() is not None:
        raise MalformedResponse(f"ResponseParser reads it otherwise: {block[:300]!r}")
    bad = [c for c in text if unicodedata.category(c) in _INVISIBLE]
    if bad:
        if invisibles is None:
            raise UnprintableResponse(f"Unicode separators/format characters {bad!r}: {text!r}")
        invisibles.append(text)
    return action


class RawClient:
    """A connection on a plain non-blocking socket, for the fuzzer.

    Unlike asyncio streams, a failed write (the server closed on a limit while
    we still sent) does not discard answers already received.
    """

    def __init__(self, sock: socket.socket, invisibles: list[str] | None = None) -> None:
        self.sock = sock
        self._buffer = b""
        # Answers with Unicode separators/format characters, recorded, not raised.
        self.invisibles: list[str] = [] if invisibles is None else invisibles

    @classmethod
    async def connect(cls, path: Path | str, invisibles: list[str] | None = None) -> RawClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, str(path))
        except BaseException:
            sock.close()
            raise
        return cls(sock, invisibles)

    async def send(self, data: bytes) -> bool:
        """False if the server closed before taking it all."""
        try:
            await asyncio.get_running_loop().sock_sendall(self.sock, data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    async def _recv(self) -> bytes:
        try:
            return await asyncio.get_running_loop().sock_recv(self.sock, 65536)
        except ConnectionResetError:
            return b""

    async def answer(self, bound: float = ANSWER_TIMEOUT) -> str:
        async with asyncio.timeout(bound):
            while (end := self._buffer.find(b"\n\n")) < 0:
                data = await self._recv()
                if not data:
                    raise EOFError(f"server closed the connection; unanswered: {self._buffer!r}")
                self._buffer += data
        block, self._buffer = self._buffer[: end + 2], self._buffer[end + 2 :]
        return check_response_block(block, invisibles=self.invisibles)

    async def closed_by_server(self, bound: float = 5.0) -> bool:
        async with asyncio.timeout(bound):
            return not await self._recv() and not self._buffer

    def close(self) -> None:
        self.sock.close()


class Client:
    """One smtpd-like connection that checks every response block strictly."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._buffer = b""

    @classmethod
    async def connect(cls, path: Path | str) -> Client:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 20)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, bound: float = ANSWER_TIMEOUT) -> str:
        async with asyncio.timeout(bound):
            while (end := self._buffer.find(b"\n\n")) < 0:
                data = await self.reader.read(65536)
                if not data:
                    raise EOFError(f"server closed the connection; unanswered: {self._buffer!r}")
                self._buffer += data
        block, self._buffer = self._buffer[: end + 2], self._buffer[end + 2 :]
        return check_response_block(block)

    async def ask(self, attributes: Mapping[str, str], bound: float = ANSWER_TIMEOUT) -> str:
        await self.send(encode_request(attributes))
        return await self.answer(bound)

    async def closed_by_server(self, bound: float = 5.0) -> bool:
        """True once the server closes; False if it sends data instead."""
        try:
            async with asyncio.timeout(bound):
                data = await self.reader.read(65536)
        except ConnectionError:
            return True
        return not data and not self._buffer

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@dataclasses.dataclass
class Running:
    """A PolicyServer in this process, its zone server and its socket."""

    server: PolicyServer
    dns: ZoneServer
    path: Path
    connect: Callable[[], Awaitable[Client]]


def settings_for(nameserver_port: int, path: Path, **changes: Any) -> Settings:
    changes.setdefault("listen", (ListenAddress(ListenFamily.UNIX, path=str(path)),))
    changes.setdefault("dns_timeout", 5.0)
    changes.setdefault("nameservers", (Nameserver("127.0.0.1", nameserver_port),))
    return dataclasses.replace(Settings(), **changes)


class InProcessServers:
    """Starts PolicyServers (with their zone servers) and stops them all."""

    def __init__(self, zone_server: Any, tmp_path: Path) -> None:
        self._zone_server = zone_server
        self._tmp_path = tmp_path
        self._servers: list[PolicyServer] = []
        self._clients: list[Client] = []

    async def start(
        self,
        zone: Mapping[str, Any],
        *,
        dns_kwargs: Mapping[str, Any] | None = None,
        **changes: Any,
    ) -> Running:
        dns = await self._zone_server(zone, **(dns_kwargs or {}))
        path = self._tmp_path / f"h{len(self._servers)}.sock"
        settings = settings_for(dns.port, path, **changes)
        server = PolicyServer(settings)
        self._servers.append(server)
        await server.start(settings.listen)

        async def connect() -> Client:
            client = await Client.connect(path)
            self._clients.append(client)
            return client

        return Running(server, dns, path, connect)

    async def close(self) -> None:
        for client in self._clients:
            await client.close()
        for server in self._servers:
            await server.stop(grace=1.0)


async def wait_for(condition: Callable[[], bool], bound: float = 5.0) -> None:
    async with asyncio.timeout(bound):
        while not condition():
            await asyncio.sleep(0.01)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def raise_fd_limit(wanted: int) -> bool:
    """Raise this process's soft RLIMIT_NOFILE (children inherit it); False if impossible."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            return False
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            return False
    return True


MB = 1024 * 1024
