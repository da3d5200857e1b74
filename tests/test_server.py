"""The policy server over real sockets: a PolicyServer in this process on a
unix socket in tmp_path, clients speaking the project's codec, SPF answered
by the loopback zone server.

Expected actions are literal strings (policyd-spf 3.0.4's wording, as
policy.py renders it) for the zone below. Time only appears as generous
upper bounds on deadlines; waiting for a server state is done by polling
with a bound, never by a fixed sleep and a hope.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import grp
import ipaddress
import os
import pwd
import signal
import socket
import stat
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import spfpolicy.server
from hardening import BAD_IP, GOOD_IP, HELO, header, request
from spfpolicy.bench.dnsserver import ZoneServer
from spfpolicy.config import ListenAddress, ListenFamily, Nameserver, PerUserTable, Settings
from spfpolicy.protocol import PolicyRequest, ResponseParser, encode_request
from spfpolicy.server import ListenError, PolicyServer

ZONE: dict[str, Any] = {
    "pass.example": [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}],
    "mail.pass.example": [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}, {"A": "192.0.2.10"}],
    "soft.example": [{"TXT": "v=spf1 ip4:192.0.2.0/24 ~all"}],
    "neutral.example": [{"TXT": "v=spf1 ?all"}],
    "none.example": [{"A": "192.0.2.1"}],
    "perm.example": [{"TXT": "v=spf1 ip4:192.0.2.0/24 bogus:x -all"}],
    "temp.example": ["servfail"],
}

PASS = header("Pass", "a@pass.example", GOOD_IP)
FAIL = (
    "550 5.7.23 Message rejected due to: SPF fail - not authorized. Please see "
    f"http://www.openspf.net/Why?s=mfrom;id=a@pass.example;ip={BAD_IP};r=rcpt.example"
)
SOFTFAIL = header("Softfail", "a@soft.example")
TEMPERROR = header("Temperror", "a@temp.example")
FALLBACK_DEFER = (
    "defer_if_permit 4.7.24 Message deferred due to: SPF check could not be completed "
    "(temporary error). Please see "
    f"http://www.openspf.net/Why?s=mfrom;id=a@pass.example;ip={BAD_IP};r=rcpt.example"
)


# -- plumbing ------------------------------------------------------------------


class Client:
    """One smtpd-like connection: requests out, actions back, in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = ResponseParser()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self) -> str:
        while (action := self.parser.next_response()) is None:
            data = await self.reader.read(65536)
            if not data:
                raise EOFError("server closed the connection before answering")
            self.parser.feed(data)
        return action

    async def ask(self, attributes: dict[str, str]) -> str:
        await self.send(encode_request(attributes))
        return await self.answer()

    async def closed_by_server(self, bound: float = 5.0) -> bool:
        """True once the server closes; False if it sends data instead."""
        try:
            async with asyncio.timeout(bound):
                data = await self.reader.read(65536)
        except ConnectionResetError:
            return True
        return not data

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@dataclasses.dataclass
class Running:
    server: PolicyServer
    dns: ZoneServer
    path: Path  # the unix socket
    connect: Callable[[], Awaitable[Client]]


def unix(path: Path | str) -> ListenAddress:
    return ListenAddress(ListenFamily.UNIX, path=str(path))


def settings_for(dns: ZoneServer, path: Path, **changes: Any) -> Settings:
    changes.setdefault("listen", (unix(path),))
    return dataclasses.replace(
        Settings(),
        nameservers=(Nameserver("127.0.0.1", dns.port),),
        dns_timeout=5.0,
        **changes,
    )


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


async def wait_for(condition: Callable[[], bool], bound: float = 5.0) -> None:
    async with asyncio.timeout(bound):
        while not condition():
            await asyncio.sleep(0.01)


# -- decisions over the socket -------------------------------------------------

WHITELIST = (ipaddress.ip_network("198.51.100.0/24"),)

DECISIONS = [
    pytest.param({}, request(ip=GOOD_IP), PASS, id="pass"),
    pytest.param({}, request(), FAIL, id="fail"),
    pytest.param({}, request("a@soft.example"), SOFTFAIL, id="softfail"),
    pytest.param(
        {}, request("a@neutral.example"), header("Neutral", "a@neutral.example"), id="neutral"
    ),
    pytest.param({}, request("a@none.example"), header("None", "a@none.example"), id="none"),
    pytest.param(
        {}, request("a@perm.example"), header("Permerror", "a@perm.example"), id="permerror"
    ),
    pytest.param(
        {"permerror_reject": True},
        request("a@perm.example"),
        "550 5.7.24 Message rejected due to: SPF Permanent Error: Unknown mechanism found: "
        "bogus:x. Please see "
        f"http://www.openspf.net/Why?s=mfrom;id=a@perm.example;ip={BAD_IP};r=rcpt.example",
        id="permerror-reject",
    ),
    pytest.param({}, request("a@temp.example"), TEMPERROR, id="temperror-header"),
    pytest.param(
        {"temperror_defer": True},
        request("a@temp.example"),
        "defer_if_permit 4.7.24 Message deferred due to: SPF Temporary Error: DNS SERVFAIL. "
        "Please see "
        f"http://www.openspf.net/Why?s=mfrom;id=a@temp.example;ip={BAD_IP};r=rcpt.example",
        id="temperror-defer",
    ),
    pytest.param(
        {},
        request("", ip=GOOD_IP, helo="mail.pass.example"),
        "prepend Received-SPF: Pass (sender SPF authorized) identity=helo; "
        f"client-ip={GOOD_IP}; helo=mail.pass.example; envelope-from=<>; receiver=rcpt.example ",
        id="helo-pass-null-sender",
    ),
    pytest.param(
        {},
        request("", helo="mail.pass.example"),
        "550 5.7.23 Message rejected due to: SPF fail - not authorized. Please see "
        f"http://www.openspf.net/Why?s=helo;id=mail.pass.example;ip={BAD_IP};r=rcpt.example",
        id="helo-fail-null-sender",
    ),
    pytest.param(
        {"whitelist": WHITELIST},
        request(),
        "prepend X-Comment: SPF skipped for whitelisted relay - "
        f"client-ip={BAD_IP}; helo={HELO}; envelope-from=a@pass.example; receiver=rcpt.example ",
        id="whitelisted-ip",
    ),
    pytest.param(
        {},
        request(ip="127.0.0.1", helo="localhost"),
        "prepend X-Comment: SPF check N/A for local connections - "
        "client-ip=127.0.0.1; helo=localhost; envelope-from=a@pass.example; "
        "receiver=rcpt.example ",
        id="skip-addresses-localhost",
    ),
    pytest.param({"test_only": 0}, request(), "dunno", id="test-only-0-fail"),
]


@pytest.mark.parametrize(("changes", "attributes", "expected"), DECISIONS)
async def test_decision_over_the_socket(
    policy_server: Any, changes: dict[str, Any], attributes: dict[str, str], expected: str
) -> None:
    running = await policy_server(**changes)
    client = await running.connect()
    assert await client.ask(attributes) == expected
    assert running.server.errors == 0


# -- connections -----------------------------------------------------------------


def mixed_requests(count: int) -> list[tuple[dict[str, str], str]]:
    """Requests whose answers differ from their neighbours', so order shows."""
    kinds = [
        (lambda: request(ip=GOOD_IP), PASS),
        (lambda: request(), FAIL),
        (lambda: request("a@soft.example"), SOFTFAIL),
    ]
    return [(kinds[i % 3][0](), kinds[i % 3][1]) for i in range(count)]


async def test_pipelined_requests_answered_in_order(policy_server: Any) -> None:
    running = await policy_server()
    client = await running.connect()
    pairs = mixed_requests(20)
    await client.send(b"".join(encode_request(attrs) for attrs, _ in pairs))
    answers = [await client.answer() for _ in pairs]
    assert answers == [expected for _, expected in pairs]


async def test_cached_requests_are_answered_at_once_and_in_order(policy_server: Any) -> None:
    running = await policy_server()
    client = await running.connect()
    assert await client.ask(request(ip=GOOD_IP)) == PASS  # now cached
    memo_hits = running.server.memo.hits
    # One write: cached, not cached (the task takes it), cached again behind it.
    batch = [request(ip=GOOD_IP), request("a@soft.example"), request(ip=GOOD_IP), request()]
    await client.send(b"".join(encode_request(attrs) for attrs in batch))
    assert [await client.answer() for _ in batch] == [PASS, SOFTFAIL, PASS, FAIL]
    assert running.server.memo.hits == memo_hits + 1  # kept the second time, used the third
    assert running.server.requests == 5
    # Later recipients of a message answered at once get no second header.
    second = request(ip=GOOD_IP, instance="m1", recipient="b@rcpt.example")
    assert await client.ask(request(ip=GOOD_IP, instance="m1")) == PASS
    assert await client.ask(second) == "dunno"


async def test_concurrent_connections(policy_server: Any) -> None:
    running = await policy_server()

    async def converse(n: int) -> list[str]:
        client = await running.connect()
        return [await client.ask(attrs) for attrs, _ in mixed_requests(3 + n % 3)]

    results = await asyncio.gather(*(converse(n) for n in range(50)))
    for n, answers in enumerate(results):
        assert answers == [expected for _, expected in mixed_requests(3 + n % 3)]
    assert running.server.requests == sum(3 + n % 3 for n in range(50))


async def test_idle_connection_is_reused(policy_server: Any) -> None:
    running = await policy_server()
    client = await running.connect()
    assert await client.ask(request()) == FAIL
    await asyncio.sleep(1.0)  # idle, as an smtpd between messages
    assert await client.ask(request(ip=GOOD_IP)) == PASS


async def test_second_recipient_of_a_message_gets_no_second_header(policy_server: Any) -> None:
    running = await policy_server()
    client = await running.connect()
    first = request(ip=GOOD_IP, instance="msg.1")
    second = request(ip=GOOD_IP, instance="msg.1", recipient="other@rcpt.example")
    assert await client.ask(first) == PASS
    assert await client.ask(second) == "dunno"
    # A new message from the same client gets its header again.
    assert await client.ask(request(ip=GOOD_IP, instance="msg.2")) == PASS


@pytest.mark.parametrize("kind", [pytest.param("junk", id="other"), pytest.param("", id="empty")])
async def test_other_request_types_get_dunno(policy_server: Any, kind: str) -> None:
    running = await policy_server()
    client = await running.connect()
    assert await client.ask(request(request=kind)) == "DUNNO"
    assert await client.ask(request()) == FAIL


async def test_malformed_lines_are_ignored(policy_server: Any) -> None:
    running = await policy_server()
    client = await running.connect()
    good = encode_request(request(ip=GOOD_IP))
    await client.send(b"no equals sign here\n=no name\n" + good)
    assert await client.answer() == PASS


async def test_oversized_request_closes_only_that_connection(policy_server: Any) -> None:
    running = await policy_server()
    other = await running.connect()
    assert await other.ask(request()) == FAIL
    big = await running.connect()
    with contextlib.suppress(ConnectionError):
        await big.send(b"sender=" + b"x" * (1 << 20) + b"\n\n")
    assert await big.closed_by_server()
    assert await other.ask(request(ip=GOOD_IP)) == PASS
    fresh = await running.connect()
    assert await fresh.ask(request()) == FAIL


async def test_request_written_byte_by_byte(policy_server: Any) -> None:
    running = await policy_server()
    client = await running.connect()
    data = encode_request(request(ip=GOOD_IP)) + encode_request(request())
    for i in range(len(data)):
        await client.send(data[i : i + 1])
    assert [await client.answer(), await client.answer()] == [PASS, FAIL]


# -- never down ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("defer", "fallback"),
    [pytest.param(False, "dunno", id="dunno"), pytest.param(True, FALLBACK_DEFER, id="defer")],
)
async def test_failing_decision_gets_the_fallback(
    policy_server: Any, monkeypatch: pytest.MonkeyPatch, defer: bool, fallback: str
) -> None:
    real_decide = spfpolicy.server.decide

    async def decide(request: Any, *args: Any, **kwargs: Any) -> Any:
        if request.get("queue_id") == "BOOM":
            raise RuntimeError("a bug in the policy")
        return await real_decide(request, *args, **kwargs)

    monkeypatch.setattr(spfpolicy.server, "decide", decide)
    running = await policy_server(temperror_defer=defer)
    client = await running.connect()
    assert await client.ask(request(queue_id="BOOM")) == fallback
    assert await client.ask(request()) == FAIL
    assert running.server.errors == 1


async def test_client_that_never_reads_its_answers(policy_server: Any) -> None:
    running = await policy_server(idle_timeout=1.0)
    client = await running.connect()
    assert await client.ask(request(ip=GOOD_IP)) == PASS  # cached from now on
    # ~300 B per answer: 20,000 answers are 6 MB if nothing held the server back.
    batch = b"".join(encode_request(request(ip=GOOD_IP)) for _ in range(1000))
    (connection,) = running.server.connections
    peak = 0

    async def flood() -> None:
        for _ in range(20):
            await client.send(batch)

    sender = asyncio.create_task(flood())
    try:
        async with asyncio.timeout(15):
            while running.server.connections:
                assert connection._transport is not None
                peak = max(peak, connection._transport.get_write_buffer_size())
                await asyncio.sleep(0.01)
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sender
    # Answers stop at the transport's high-water mark, reading stops with them,
    # and Idle_Timeout closes the connection, answers unsent and all.
    assert 0 < peak < 1_000_000
    await wait_for(lambda: connection._lost)  # the socket is closed, not left draining
    with contextlib.suppress(ConnectionError):
        await client.close()


async def test_failing_fast_path_leaves_the_request_to_the_task(
    policy_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def decide_now(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug on the fast path")

    running = await policy_server()
    client = await running.connect()
    assert await client.ask(request(ip=GOOD_IP)) == PASS
    monkeypatch.setattr(spfpolicy.server, "decide_now", decide_now)
    assert await client.ask(request(ip=GOOD_IP)) == PASS  # cached, answered by the task
    assert running.server.errors == 0


@pytest.mark.parametrize(
    ("defer", "fallback"),
    [pytest.param(False, "dunno", id="dunno"), pytest.param(True, FALLBACK_DEFER, id="defer")],
)
async def test_request_deadline(policy_server: Any, defer: bool, fallback: str) -> None:
    running = await policy_server(request_timeout=1.0, lookup_time=30, temperror_defer=defer)
    running.dns.default_fault = "timeout"
    client = await running.connect()
    started = time.monotonic()
    assert await client.ask(request()) == fallback
    assert time.monotonic() - started < 1.0 + 1.0
    assert running.server.errors == 1
    # The connection lives on. Other names: the timed-out lookups (the HELO
    # name's, and the sender domain's, prefetched at once) are still in flight.
    running.dns.default_fault = None
    later = request("a@soft.example", ip=GOOD_IP, helo="mail.pass.example")
    assert await client.ask(later) == header("Pass", "a@soft.example", GOOD_IP, "mail.pass.example")


@pytest.mark.parametrize(
    ("defer", "expected", "bound"),
    [
        # HELO and MAIL FROM each use up Lookup_Time.
        pytest.param(False, TEMPERROR, 2 * 1.0 + 2.0, id="header"),
        # The HELO temperror defers at once.
        pytest.param(
            True,
            "defer_if_permit 4.7.24 Message deferred due to: SPF Temporary Error: DNS Timeout. "
            "Please see "
            f"http://www.openspf.net/Why?s=helo;id={HELO};ip={BAD_IP};r=rcpt.example",
            1.0 + 2.0,
            id="defer",
        ),
    ],
)
async def test_lookup_time(policy_server: Any, defer: bool, expected: str, bound: float) -> None:
    running = await policy_server(lookup_time=1, temperror_defer=defer)
    running.dns.default_fault = "timeout"
    client = await running.connect()
    started = time.monotonic()
    assert await client.ask(request("a@temp.example")) == expected
    assert time.monotonic() - started < bound
    assert running.server.errors == 0  # a temperror, not a deadline


# -- result cache -----------------------------------------------------------------


async def test_result_cache_answers_a_repeated_check(policy_server: Any) -> None:
    running = await policy_server()
    client = await running.connect()
    assert await client.ask(request(ip=GOOD_IP)) == PASS
    hits, queries = running.server.snapshot().result_cache_hits, running.dns.queries
    assert await client.ask(request(ip=GOOD_IP)) == PASS  # another message, same check
    assert running.server.snapshot().result_cache_hits == hits + 2  # HELO and MAIL FROM
    assert await client.ask(request(ip=GOOD_IP)) == PASS  # a third: through the verdict memo
    assert running.server.snapshot().result_cache_hits == hits + 4
    assert running.server.memo.hits == 1
    assert running.dns.queries == queries


async def test_known_domain_new_client_is_answered_without_a_task(policy_server: Any) -> None:
    running = await policy_server()
    client = await running.connect()
    assert await client.ask(request(ip=GOOD_IP)) == PASS
    queries, tasks = running.dns.queries, running.server.checks.evaluated_now
    # Another client of the same domain and HELO name: a new check, every
    # DNS answer it needs cached, so it is worked out in the socket callback.
    other = "192.0.2.11"
    now = running.server.answer_now(PolicyRequest(request(ip=other)))
    assert now == header("Pass", "a@pass.example", other)
    assert running.server.checks.evaluated_now == tasks + 2  # HELO and MAIL FROM
    assert running.dns.queries == queries


async def test_temperror_is_not_cached(policy_server: Any) -> None:
    running = await policy_server()
    client = await running.connect()
    assert await client.ask(request("a@temp.example")) == TEMPERROR
    hits, queries = running.server.checks.result_hits, running.dns.queries
    assert await client.ask(request("a@temp.example")) == TEMPERROR
    assert running.server.checks.result_hits == hits + 1  # the HELO None only
    assert running.dns.queries > queries


async def test_per_user_void_limit(policy_server: Any, tmp_path: Path) -> None:
    # Three void lookups before the ip4 term: permerror with the global
    # Void_Limit (2), pass with the recipient's own (5), as in policyd-spf.
    zone = {
        **ZONE,
        "void.example": [
            {
                "TXT": "v=spf1 a:nx1.void.example a:nx2.void.example a:nx3.void.example "
                "ip4:192.0.2.0/24 -all"
            }
        ],
    }
    per_user = PerUserTable(str(tmp_path / "users"), (("pu@rcpt.example", (("void_limit", 5),)),))
    running = await policy_server(zone=zone, per_user=per_user)
    client = await running.connect()

    def expected(result: str, recipient: str) -> str:
        return (
            f"prepend Received-SPF: {result} (mailfrom) identity=mailfrom; "
            f"client-ip={GOOD_IP}; helo={HELO}; envelope-from=a@void.example; "
            f"receiver={recipient} "
        )

    for recipient, result in [
        ("other@rcpt.example", "Permerror"),
        ("pu@rcpt.example", "Pass"),  # every DNS answer cached: the check tells them apart
        ("other@rcpt.example", "Permerror"),
        ("pu@rcpt.example", "Pass"),
    ]:
        answer = await client.ask(request("a@void.example", GOOD_IP, recipient=recipient))
        assert answer == expected(result, recipient)
    # The repeated checks came from the result cache, one entry per void limit.
    assert running.server.checks.result_hits >= 4


# -- listeners ---------------------------------------------------------------------


async def test_stale_socket_is_replaced(policy_server: Any, tmp_path: Path) -> None:
    path = tmp_path / "p0.sock"
    crashed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    crashed.bind(str(path))
    crashed.close()  # left behind, as by a crash
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    running = await policy_server()
    assert running.path == path
    client = await running.connect()
    assert await client.ask(request()) == FAIL


async def test_live_socket_is_not_taken_over(policy_server: Any) -> None:
    running = await policy_server()
    second = PolicyServer(running.server.settings)
    with pytest.raises(ListenError, match="another server is listening there"):
        await second.start(running.server.settings.listen)
    client = await running.connect()
    assert await client.ask(request()) == FAIL


async def test_regular_file_at_socket_path_is_kept(zone_server: Any, tmp_path: Path) -> None:
    dns = await zone_server(ZONE)
    path = tmp_path / "p.sock"
    path.write_text("precious\n")
    server = PolicyServer(settings_for(dns, path))
    with pytest.raises(ListenError, match=r"unix:.*p\.sock: it exists and is not a socket"):
        await server.start([unix(path)])
    assert path.read_text() == "precious\n"


async def test_missing_directory_names_the_listen_option(zone_server: Any, tmp_path: Path) -> None:
    dns = await zone_server(ZONE)
    path = tmp_path / "missing" / "p.sock"
    server = PolicyServer(settings_for(dns, path))
    with pytest.raises(ListenError, match="does not exist") as info:
        await server.start([unix(path)])
    assert "--listen" in str(info.value)


@pytest.mark.parametrize(
    ("changes", "mode"),
    [
        pytest.param({}, 0o666, id="default-0666"),
        pytest.param({"socket_mode": 0o660}, 0o660, id="0660"),
        pytest.param({"socket_mode": 0o600}, 0o600, id="0600"),
    ],
)
async def test_socket_mode(policy_server: Any, changes: dict[str, Any], mode: int) -> None:
    running = await policy_server(**changes)
    assert stat.S_IMODE(os.stat(running.path).st_mode) == mode


async def test_socket_owner_and_group(policy_server: Any) -> None:
    # Our own user and group: a chown any user may do.
    user, group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
    running = await policy_server(socket_owner=user, socket_group=group)
    info = os.stat(running.path)
    assert (info.st_uid, info.st_gid) == (os.getuid(), os.getgid())


async def test_unknown_socket_owner_is_a_listen_error(policy_server: Any, tmp_path: Path) -> None:
    with pytest.raises(ListenError, match="no-such-user-spfpolicy"):
        await policy_server(socket_owner="no-such-user-spfpolicy")
    assert not (tmp_path / "p0.sock").exists()


async def test_port_in_use_is_a_listen_error(zone_server: Any, tmp_path: Path) -> None:
    dns = await zone_server(ZONE)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        inet = ListenAddress(ListenFamily.INET, host="127.0.0.1", port=port)
        server = PolicyServer(settings_for(dns, tmp_path / "p.sock"))
        with pytest.raises(ListenError, match=str(port)):
            await server.start([unix(tmp_path / "p.sock"), inet])
    # The unix listener set up before the failure is gone again.
    assert not (tmp_path / "p.sock").exists()


async def test_inet_listener_beside_unix(policy_server: Any, tmp_path: Path, clients: Any) -> None:
    listen = (
        unix(tmp_path / "p0.sock"),
        ListenAddress(ListenFamily.INET, host="127.0.0.1", port=0),
    )
    running = await policy_server(listen=listen)
    (port,) = running.server.inet_ports
    assert port > 0
    over_tcp = await clients(host="127.0.0.1", port=port)
    assert await over_tcp.ask(request(ip=GOOD_IP)) == PASS
    over_unix = await running.connect()
    assert await over_unix.ask(request()) == FAIL


async def test_max_connections(policy_server: Any) -> None:
    running = await policy_server(max_connections=2)
    first, second = await running.connect(), await running.connect()
    # Answers prove both connections are registered before the third one arrives.
    assert await first.ask(request()) == FAIL
    assert await second.ask(request()) == FAIL
    third = await running.connect()
    assert await third.closed_by_server()
    assert await first.ask(request(ip=GOOD_IP)) == PASS
    assert await second.ask(request(ip=GOOD_IP)) == PASS


# -- shutdown ---------------------------------------------------------------------


async def test_stop_lets_a_request_in_flight_finish(policy_server: Any) -> None:
    running = await policy_server(delay=0.5)
    client = await running.connect()
    await client.send(encode_request(request()))
    await wait_for(lambda: running.server.requests == 1)
    stopping = asyncio.create_task(running.server.stop(grace=10.0))
    assert await client.answer() == FAIL
    assert await client.closed_by_server()
    await stopping
    assert not running.path.exists()


# -- the daemon as a process -------------------------------------------------------


async def _read_all(stream: asyncio.StreamReader | None) -> str:
    assert stream is not None
    return (await stream.read()).decode(errors="replace")


@pytest.mark.slow
async def test_serve_process_answers_and_exits_on_sigterm(
    zone_server: Any, tmp_path: Path, clients: Any
) -> None:
    dns = await zone_server(ZONE)
    conf = tmp_path / "spf.conf"
    conf.write_text("Log_Target = stderr\n")
    path = tmp_path / "s.sock"
    argv = ["-m", "spfpolicy", "serve", "-c", str(conf), "--listen", f"unix:{path}"]
    argv += ["--nameserver", dns.nameserver]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stderr = asyncio.create_task(_read_all(proc.stderr))
    stdout = asyncio.create_task(_read_all(proc.stdout))
    try:
        await wait_for(lambda: path.exists() or proc.returncode is not None, bound=10.0)
        assert proc.returncode is None, await stderr
        client = await clients(path)
        assert await client.ask(request()) == FAIL
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10.0):
            status = await proc.wait()
        assert await client.closed_by_server()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert status == 0, await stderr
    assert not path.exists()
    await stdout


@pytest.mark.slow
async def test_serve_process_with_missing_socket_directory(tmp_path: Path) -> None:
    conf = tmp_path / "spf.conf"
    conf.write_text("Listen = unix:/nonexistent-dir/x\nLog_Target = stderr\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *["-m", "spfpolicy", "serve", "-c", str(conf), "--nameserver", "127.0.0.1:53"],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(10.0):
        _, err = await proc.communicate()
    assert proc.returncode != 0
    message = err.decode()
    assert "/nonexistent-dir" in message
    assert "--listen" in message
