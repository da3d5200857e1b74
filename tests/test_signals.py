"""Signals sent to a real ``python -m spfpolicy serve`` process under load.

Twenty client connections each send a request, wait for its answer, and
repeat (bounded in count and time), as smtpd processes do. Then:

- SIGHUP with a changed file: the new setting shows in answers on the same
  connections, and no request goes unanswered; a broken file is refused with
  its path and line in the log and the old configuration keeps answering.
- SIGTERM/SIGINT: the server stops reading, answers every request it had
  read, closes, and exits 0. A client whose request the server never read
  sees the connection close instead (Postfix's policy client retries that
  once on a new connection); so the count that must match is the server's
  own "stopped after N requests" against the answers the clients received.
- A check still running when Shutdown_Grace ends gets the fallback answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from spfpolicy.protocol import ResponseParser, encode_request

pytestmark = pytest.mark.slow

BAD_IP = "198.51.100.1"
ZONE: dict[str, Any] = {
    "pass.example": [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}],
    "slow.example": ["timeout"],
}
FAIL_PREFIX = "550 5.7.23 Message rejected due to: SPF fail"
CLIENTS = 20
_serial = itertools.count()


def request(sender: str = "a@pass.example") -> dict[str, str]:
    return {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "client_address": BAD_IP,
        "helo_name": "mx.client.example",
        "sender": sender,
        "recipient": "user@rcpt.example",
        "instance": f"i.{next(_serial)}",
    }


@dataclass
class Tally:
    answers: list[str] = field(default_factory=list)
    unanswered: int = 0  # sent, then the server closed without reading it
    failures: list[str] = field(default_factory=list)  # anything else
    connections: int = 0


async def client_loop(
    path: Path,
    tally: Tally,
    stop: asyncio.Event,
    make: Callable[[], dict[str, str]],
    *,
    max_requests: int = 500,
) -> None:
    """One smtpd-like connection: request, answer, repeat until told or closed."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    tally.connections += 1
    parser = ResponseParser()
    try:
        for _ in range(max_requests):
            if stop.is_set():
                return
            try:
                writer.write(encode_request(make()))
                await writer.drain()
            except ConnectionError:
                return  # closed before we sent: nothing was asked
            try:
                async with asyncio.timeout(15):
                    while (action := parser.next_response()) is None:
                        data = await reader.read(65536)
                        if not data:
                            raise EOFError
                        parser.feed(data)
            except (EOFError, ConnectionResetError):
                tally.unanswered += 1
                return
            except TimeoutError:
                tally.failures.append("no answer within 15 s")
                return
            tally.answers.append(action)
    except Exception as exc:  # counted, not raised: one report at the end
        tally.failures.append(repr(exc))
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@dataclass
class ServerProcess:
    proc: asyncio.subprocess.Process
    path: Path
    conf: Path
    log: list[str]

    def log_text(self) -> str:
        return "\n".join(self.log)

    async def wait_log(self, pattern: str, bound: float = 10.0) -> re.Match[str]:
        async with asyncio.timeout(bound):
            while True:
                for line in self.log:
                    if found := re.search(pattern, line):
                        return found
                assert self.proc.returncode is None, self.log_text()
                await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def serve(tmp_path: Path, dns: Any, conf_text: str) -> AsyncIterator[ServerProcess]:
    conf = tmp_path / "spf.conf"
    conf.write_text(conf_text)
    path = tmp_path / "policy.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "spfpolicy", "serve", "-c", str(conf)],
        *["--listen", f"unix:{path}", "--nameserver", dns.nameserver],
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    log: list[str] = []

    async def collect() -> None:
        assert proc.stderr is not None
        async for line in proc.stderr:
            log.append(line.decode(errors="replace").rstrip("\n"))

    collector = asyncio.create_task(collect())
    server = ServerProcess(proc, path, conf, log)
    try:
        async with asyncio.timeout(10):
            while not path.exists():
                assert proc.returncode is None, server.log_text()
                await asyncio.sleep(0.01)
        yield server
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        async with asyncio.timeout(5):
            await collector


async def until(condition: Callable[[], bool], bound: float) -> None:
    async with asyncio.timeout(bound):
        while not condition():
            await asyncio.sleep(0.01)


async def test_sighup_reloads_under_load(zone_server: Any, tmp_path: Path) -> None:
    dns = await zone_server(ZONE)
    async with serve(tmp_path, dns, "Log_Target = stderr\ndebugLevel = 0\n") as server:
        tally = Tally()
        stop = asyncio.Event()
        clients = [
            asyncio.create_task(client_loop(server.path, tally, stop, request, max_requests=2000))
            for _ in range(CLIENTS)
        ]
        try:
            await until(lambda: len(tally.answers) >= 100, bound=10)
            assert all(a.startswith(FAIL_PREFIX) for a in tally.answers)
            queries = dns.queries

            # TestOnly = 0: a fail is no longer rejected.
            server.conf.write_text("Log_Target = stderr\ndebugLevel = 0\nTestOnly = 0\n")
            server.proc.send_signal(signal.SIGHUP)
            await until(lambda: tally.answers[-1] == "dunno", bound=10)
            mark = len(tally.answers)
            await until(lambda: len(tally.answers) >= mark + 100, bound=10)
            assert set(tally.answers[mark:]) == {"dunno"}
            # The caches survived the reload: no new upstream query.
            assert dns.queries == queries

            # A broken file: refused, naming file and line; the old one stays.
            server.conf.write_text("Log_Target = stderr\n\nHELO_reject = Sometimes\n")
            server.proc.send_signal(signal.SIGHUP)
            found = await server.wait_log("configuration not reloaded")
            assert f"{server.conf}:3: bad value for HELO_reject" in found.string
            mark = len(tally.answers)
            await until(lambda: len(tally.answers) >= mark + 100, bound=10)
            assert set(tally.answers[mark:]) == {"dunno"}
        finally:
            stop.set()
            async with asyncio.timeout(20):
                await asyncio.gather(*clients)
        server.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await server.proc.wait() == 0
    assert tally.failures == []
    assert tally.unanswered == 0  # no connection was dropped by the reloads
    assert tally.connections == CLIENTS
    assert set(tally.answers) <= {"dunno"} | {a for a in tally.answers if a.startswith(FAIL_PREFIX)}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_stop_signal_under_load_answers_every_request_read(
    zone_server: Any, tmp_path: Path, signum: signal.Signals
) -> None:
    # Each request names its own domain and DNS answers after 50 ms, so
    # checks are in flight when the signal arrives.
    dns = await zone_server(ZONE, delay=0.05)

    def fresh() -> dict[str, str]:
        return request(f"a@r{next(_serial)}.unknown.example")

    # debugLevel 1 for the "stopped after N requests" line.
    conf = "Log_Target = stderr\ndebugLevel = 1\nShutdown_Grace = 10\n"
    async with serve(tmp_path, dns, conf) as server:
        tally = Tally()
        stop = asyncio.Event()
        clients = [
            asyncio.create_task(client_loop(server.path, tally, stop, fresh))
            for _ in range(CLIENTS)
        ]
        try:
            await until(lambda: len(tally.answers) >= 60, bound=10)
            started = time.monotonic()
            at_signal = len(tally.answers)
            server.proc.send_signal(signum)
            async with asyncio.timeout(10):
                status = await server.proc.wait()
            elapsed = time.monotonic() - started
            # Every client ends by itself once the server is gone.
            async with asyncio.timeout(10):
                await asyncio.gather(*clients)
        finally:
            stop.set()
            for task in clients:
                task.cancel()
        found = await server.wait_log(r"stopped after (\d+) requests")
    print(
        f"{signum.name}: {len(tally.answers)} answered, server read {found.group(1)}, "
        f"{tally.unanswered} sent but unread (closed), exit {status} after {elapsed:.2f}s"
    )
    assert status == 0, server.log_text()
    assert elapsed < 5
    assert tally.failures == []
    assert tally.connections == CLIENTS
    # The server answered every request it read: the counts agree exactly.
    assert len(tally.answers) == int(found.group(1)), server.log_text()
    assert all(a.startswith("prepend Received-SPF: None") for a in tally.answers)
    # Requests in flight at the signal were still answered.
    assert len(tally.answers) > at_signal
    assert tally.unanswered <= CLIENTS


async def test_check_still_running_at_the_end_of_the_grace_gets_the_fallback(
    zone_server: Any, tmp_path: Path
) -> None:
    dns = await zone_server(ZONE)
    conf = "Log_Target = stderr\nShutdown_Grace = 1\nTempError_Defer = True\n"
    async with serve(tmp_path, dns, conf) as server:
        reader, writer = await asyncio.open_unix_connection(str(server.path))
        writer.write(encode_request(request("a@slow.example")))  # DNS never answers
        await writer.drain()
        await until(lambda: dns.queries > 0, bound=10)
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        parser = ResponseParser()
        async with asyncio.timeout(10):
            while (action := parser.next_response()) is None:
                data = await reader.read(65536)
                assert data, "closed without the fallback answer"
                parser.feed(data)
            status = await server.proc.wait()
        elapsed = time.monotonic() - started
        writer.close()
    assert action.startswith("defer_if_permit 4.7.24 Message deferred due to: SPF check could")
    assert status == 0
    assert elapsed < 3
    assert "Shutdown_Grace ending" in server.log_text()
