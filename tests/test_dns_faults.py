"""DNS faults through the whole server: a PolicyServer in this process on a unix
socket, its DNS from the loopback zone server breaking in every way we know.

For each fault the request must be answered within Lookup_Time plus a small
margin, with the RFC 7208 result (temperror for DNS trouble, RFC 7208 2.6.6 /
4.4; permerror for broken records and exceeded limits, 4.6.4 / 4.5) and the
action TempError_Defer / PermError_reject select; the connection must go on
serving; and once the server has settled no task is left behind.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import pytest

from hardening import (
    GOOD_IP,
    HELO,
    InProcessServers,
    Running,
    header,
    request,
    wait_for,
)
from spfpolicy.bench.dnsserver import Fault, Zone, ZoneServer
from spfpolicy.config import Nameserver

LOOKUP_TIME = 1  # seconds, the smallest Lookup_Time the configuration accepts
MARGIN = 1.5  # scheduling slack on a loaded 2-core CI machine
DNS_TIMEOUT = 0.5  # one upstream attempt (c-ares tries twice)

SPF_OK = "v=spf1 ip4:192.0.2.0/24 -all"

# 60 kB of one SPF record: a long (but legal) record only TCP can carry.
HUGE_RECORD = (
    "v=spf1 "
    + " ".join(f"ip4:10.{i // 256}.{i % 256}.0/24" for i in range(2500))
    + " ip4:192.0.2.0/24 -all"
)

CHAIN = 12  # include links, past RFC 7208 4.6.4's 10 DNS-querying terms

ZONE: dict[str, Any] = {
    # One name per fault: c-ares caches negative answers itself, so names are
    # never shared between cases.
    **{f"{fault.value.replace('_', '-')}.example": [{"TXT": SPF_OK}] for fault in Fault},
    "big-udp.example": [
        {"TXT": SPF_OK},
        *({"TXT": f"filler {i:04d} " + "x" * 80} for i in range(40)),
    ],
    "many-txt.example": [{"TXT": f"not spf {i:04d} " + "y" * 200} for i in range(250)]
    + [{"TXT": SPF_OK}],
    "huge-record.example": [{"TXT": HUGE_RECORD}],
    "two-records.example": [{"TXT": SPF_OK}, {"TXT": "v=spf1 -all"}],
    "loop1.example": [{"TXT": "v=spf1 include:loop2.example -all"}],
    "loop2.example": [{"TXT": "v=spf1 include:loop1.example -all"}],
    "self-loop.example": [{"TXT": "v=spf1 include:self-loop.example -all"}],
    **{
        f"chain{i}.example": [{"TXT": f"v=spf1 include:chain{i + 1}.example -all"}]
        for i in range(CHAIN)
    },
    f"chain{CHAIN}.example": [{"TXT": SPF_OK}],
    "void.example": [
        {"TXT": "v=spf1 a:void1.example a:void2.example a:void3.example ip4:192.0.2.0/24 -all"}
    ],
    "two-voids.example": [{"TXT": "v=spf1 a:void1.example a:void2.example ip4:192.0.2.0/24 -all"}],
    "redirect-loop.example": [{"TXT": "v=spf1 redirect=redirect-loop.example"}],
    "cname-loop.example": [{"CNAME": "cname-loop2.example"}],
    "cname-loop2.example": [{"CNAME": "cname-loop.example"}],
}


class Expect:
    """What the answer must be, for each combination of the two settings."""

    TEMPERROR = "temperror"
    PERMERROR = "permerror"
    PASS = "pass"
    NONE = "none"


def expected_ok(kind: str, sender: str, ip: str, action: str, *, strict: bool) -> bool:
    """Whether ``action`` is right for result ``kind`` (strict: both options True)."""
    if kind == Expect.PASS:
        return action == header("Pass", sender, ip)
    if kind == Expect.NONE:
        return action == header("None", sender, ip)
    if kind == Expect.TEMPERROR:
        if not strict:
            return action == header("Temperror", sender, ip)
        return (
            action.startswith(
                "defer_if_permit 4.7.24 Message deferred due to: SPF Temporary Error: DNS "
            )
            and f"s=mfrom;id={sender};ip={ip};" in action
        )
    if kind == Expect.PERMERROR:
        if not strict:
            return action == header("Permerror", sender, ip)
        return (
            action.startswith("550 5.7.24 Message rejected due to: SPF Permanent Error: ")
            and f"s=mfrom;id={sender};ip={ip};" in action
        )
    raise AssertionError(kind)


# (sender domain, client IP, runtime fault for that domain, expected result)
CASES = [
    pytest.param("timeout.example", GOOD_IP, "timeout", Expect.TEMPERROR, id="timeout"),
    pytest.param("servfail.example", GOOD_IP, "servfail", Expect.TEMPERROR, id="servfail"),
    pytest.param("refused.example", GOOD_IP, "refused", Expect.TEMPERROR, id="refused"),
    pytest.param("malformed.example", GOOD_IP, "malformed", Expect.TEMPERROR, id="malformed"),
    pytest.param("wrong-id.example", GOOD_IP, "wrong_id", Expect.TEMPERROR, id="wrong-id"),
    pytest.param(
        "truncated-wire.example", GOOD_IP, "truncated_wire", Expect.TEMPERROR, id="truncated-wire"
    ),
    pytest.param(
        "tc-tcp-timeout.example", GOOD_IP, "tc_tcp_timeout", Expect.TEMPERROR, id="tc-then-no-tcp"
    ),
    pytest.param("nxdomain.example", GOOD_IP, "nxdomain", Expect.NONE, id="nxdomain"),
    pytest.param("big-udp.example", GOOD_IP, None, Expect.PASS, id="truncated-udp-tcp-retry"),
    pytest.param("many-txt.example", GOOD_IP, None, Expect.PASS, id="251-txt-records"),
    pytest.param("huge-record.example", GOOD_IP, None, Expect.PASS, id="60kB-record"),
    pytest.param("two-records.example", GOOD_IP, None, Expect.PERMERROR, id="two-spf-records"),
    pytest.param("loop1.example", GOOD_IP, None, Expect.PERMERROR, id="include-loop"),
    pytest.param("self-loop.example", GOOD_IP, None, Expect.PERMERROR, id="include-self"),
    pytest.param("redirect-loop.example", GOOD_IP, None, Expect.PERMERROR, id="redirect-loop"),
    pytest.param("chain0.example", GOOD_IP, None, Expect.PERMERROR, id="include-chain-12"),
    pytest.param("chain3.example", GOOD_IP, None, Expect.PASS, id="include-chain-9"),
    pytest.param("void.example", GOOD_IP, None, Expect.PERMERROR, id="3-voids-past-limit-2"),
    pytest.param("two-voids.example", GOOD_IP, None, Expect.PASS, id="2-voids-within-limit"),
    pytest.param("cname-loop.example", GOOD_IP, None, Expect.NONE, id="cname-loop"),
]

STRICTNESS = [pytest.param(False, id="lenient"), pytest.param(True, id="defer-and-reject")]


@pytest.fixture
async def servers(zone_server: Any, tmp_path: Path) -> AsyncIterator[InProcessServers]:
    made = InProcessServers(zone_server, tmp_path)
    yield made
    await made.close()


async def start(servers: InProcessServers, *, strict: bool, **changes: Any) -> Running:
    changes.setdefault("dns_kwargs", {"udp_limit": 512})
    return await servers.start(
        ZONE,
        lookup_time=LOOKUP_TIME,
        dns_timeout=DNS_TIMEOUT,
        temperror_defer=strict,
        permerror_reject=strict,
        **changes,
    )


async def answer_in_time(running: Running, attributes: dict[str, str]) -> tuple[str, float]:
    client = await running.connect()
    started = time.monotonic()
    action = await client.ask(attributes, bound=LOOKUP_TIME + MARGIN + 5.0)
    elapsed = time.monotonic() - started
    # The connection goes on: a request that needs no DNS fault is answered too.
    follow_up = await client.ask(request(f"b@{'pass.example'}", ip=GOOD_IP), bound=5.0)
    assert follow_up == header("None", "b@pass.example", GOOD_IP)  # not in this zone
    return action, elapsed


@pytest.mark.parametrize("strict", STRICTNESS)
@pytest.mark.parametrize(("domain", "ip", "fault", "kind"), CASES)
async def test_dns_fault_answered_in_time(
    servers: InProcessServers, strict: bool, domain: str, ip: str, fault: str | None, kind: str
) -> None:
    running = await start(servers, strict=strict)
    if fault is not None:
        running.dns.faults[domain] = fault
    sender = f"user@{domain}"
    action, elapsed = await answer_in_time(running, request(sender, ip=ip))
    assert expected_ok(kind, sender, ip, action, strict=strict), action
    assert elapsed < LOOKUP_TIME + MARGIN, f"answered after {elapsed:.2f} s"
    assert running.server.errors == 0  # a result, not the request deadline's fallback
    if domain in ("big-udp.example", "many-txt.example", "huge-record.example"):
        assert running.dns.tcp_queries > 0  # the answer only fits over TCP


@pytest.mark.parametrize("strict", STRICTNESS)
async def test_nameserver_down(servers: InProcessServers, strict: bool) -> None:
    # A UDP and TCP port nobody listens on: bound, noted, closed.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    running = await start(servers, strict=strict, nameservers=(Nameserver("127.0.0.1", port),))
    client = await running.connect()
    sender = "user@pass.example"
    for _ in range(3):  # the channel keeps failing fast, request after request
        started = time.monotonic()
        action = await client.ask(request(sender), bound=2 * LOOKUP_TIME + MARGIN + 5.0)
        elapsed = time.monotonic() - started
        if strict:
            # The HELO check fails first and defers at once.
            assert action.startswith(
                "defer_if_permit 4.7.24 Message deferred due to: SPF Temporary Error: DNS "
            ), action
            assert f"s=helo;id={HELO};" in action
            assert elapsed < LOOKUP_TIME + MARGIN
        else:
            assert action == header("Temperror", sender), action
            assert elapsed < 2 * LOOKUP_TIME + MARGIN  # HELO, then MAIL FROM
    assert running.server.errors == 0


# Garbage on c-ares' shared UDP socket fails every lookup in flight on it (see
# test_garbage_answer_fails_only_its_own_lookup); the all-at-once test runs
# these two after the others, not among them.
GARBAGE_FAULTS = ("malformed", "truncated_wire")


async def test_all_faults_at_once_leave_no_task_behind(servers: InProcessServers) -> None:
    """Every case concurrently, three connections of three requests each; the
    garbage faults afterwards; tasks counted before and after."""
    running = await start(servers, strict=True)
    for param in CASES:
        domain, _, fault, _ = param.values
        if fault is not None:
            running.dns.faults[domain] = fault
    await asyncio.sleep(0)
    before = len(asyncio.all_tasks())

    async def converse(domain: str, ip: str, kind: str) -> None:
        client = await running.connect()
        for n in range(3):
            sender = f"user{n}@{domain}"
            started = time.monotonic()
            action = await client.ask(request(sender, ip=ip), bound=LOOKUP_TIME + MARGIN + 5.0)
            elapsed = time.monotonic() - started
            assert expected_ok(kind, sender, ip, action, strict=True), (domain, action)
            assert elapsed < LOOKUP_TIME + MARGIN + 1.0, (domain, elapsed)
        await client.close()

    async with asyncio.timeout(30):
        await asyncio.gather(
            *(
                converse(p.values[0], p.values[1], p.values[3])
                for p in CASES
                for _ in range(3)
                if p.values[2] not in GARBAGE_FAULTS
            )
        )
        for p in CASES:
            if p.values[2] in GARBAGE_FAULTS:
                await converse(p.values[0], p.values[1], p.values[3])
    assert running.server.errors == 0
    # Settle: connection tasks end as clients close; lookups still waiting on
    # upstream timeouts (shielded from the requests that gave up) end with
    # c-ares' own timeout.
    await wait_for(lambda: running.server.resolver.in_flight == 0, bound=10.0)
    await wait_for(lambda: len(asyncio.all_tasks()) <= before, bound=10.0)
    assert len(asyncio.all_tasks()) == before
    assert running.server.evaluator.in_flight == 0


@pytest.mark.parametrize("fault", GARBAGE_FAULTS)
async def test_garbage_answer_fails_only_its_own_lookup(
    servers: InProcessServers, fault: str
) -> None:
    running = await start(servers, strict=True)
    domains = [f"ok{i}.example" for i in range(10)]
    zone = {d: [{"TXT": SPF_OK}] for d in domains} | {"bad.example": [{"TXT": SPF_OK}]}
    running.dns.zone = Zone.from_dict(zone)
    for domain in domains:
        running.dns.delays[domain] = 0.3  # in flight when the garbage arrives
    running.dns.faults["bad.example"] = fault

    async def ask(domain: str) -> str:
        client = await running.connect()
        return await client.ask(request(f"user@{domain}", ip=GOOD_IP), bound=10.0)

    async with asyncio.timeout(20):
        good = [asyncio.create_task(ask(domain)) for domain in domains]
        await wait_for(lambda: running.dns.counts[("ok9.example", "TXT")] > 0)
        bad = await ask("bad.example")
        answers = await asyncio.gather(*good)
    assert expected_ok(Expect.TEMPERROR, "user@bad.example", GOOD_IP, bad, strict=True), bad
    wrong = [
        (domain, action)
        for domain, action in zip(domains, answers, strict=True)
        if action != header("Pass", f"user@{domain}", GOOD_IP)
    ]
    assert wrong == []


# -- the new fault kinds on the wire ------------------------------------------


async def udp_exchange(server: ZoneServer, name: str, bound: float = 0.5) -> bytes | None:
    """One query over UDP; the raw reply, or None if none came within ``bound``."""
    loop = asyncio.get_running_loop()
    query = dns.message.make_query(name, "TXT")
    query.id = 0x1234
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", server.port))
        await loop.sock_sendall(sock, query.to_wire())
        try:
            async with asyncio.timeout(bound):
                return await loop.sock_recv(sock, 65535)
        except TimeoutError:
            return None


async def test_fault_kinds_on_the_wire(zone_server: Any) -> None:
    server = await zone_server({"a.example": [{"TXT": SPF_OK}]})
    good = await udp_exchange(server, "a.example")
    assert good is not None
    assert dns.message.from_wire(good).answer

    server.default_fault = "malformed"
    garbage = await udp_exchange(server, "a.example")
    assert garbage is not None and garbage[:2] == b"\x12\x34"  # our ID: it will be parsed
    with pytest.raises(dns.exception.DNSException):
        dns.message.from_wire(garbage)

    server.default_fault = "wrong_id"
    other = await udp_exchange(server, "a.example")
    assert other is not None and other[:2] != b"\x12\x34"
    assert other[2:] == good[2:]

    server.default_fault = "truncated_wire"
    cut = await udp_exchange(server, "a.example")
    assert cut is not None and 12 <= len(cut) < len(good)
    assert not dns.message.from_wire(good).flags & dns.flags.TC
    with pytest.raises(dns.exception.DNSException):
        dns.message.from_wire(cut)

    server.default_fault = "nxdomain"
    nx = await udp_exchange(server, "a.example")
    assert nx is not None and dns.message.from_wire(nx).rcode() == dns.rcode.NXDOMAIN

    server.default_fault = "tc_tcp_timeout"
    tc = await udp_exchange(server, "a.example")
    assert tc is not None and dns.message.from_wire(tc).flags & dns.flags.TC
    loop = asyncio.get_running_loop()
    with socket.socket() as sock:
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", server.port))
        wire = dns.message.make_query("a.example", "TXT").to_wire()
        await loop.sock_sendall(sock, len(wire).to_bytes(2, "big") + wire)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await loop.sock_recv(sock, 65535)
