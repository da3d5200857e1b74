"""The loopback DNS server, queried for real over UDP and TCP (dnspython and aiodns).

Every test starts its own server through the ``zone_server`` fixture; timing
assertions are lower bounds only, so a slow CI machine cannot fail them.
"""

from __future__ import annotations

import asyncio
import os
import re
import struct
import sys
import time
from pathlib import Path
from typing import Any

import aiodns
import dns.asyncquery
import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataset
import dns.rdatatype
import dns.rrset
import pytest
import yaml

from spfpolicy.bench.dnsserver import Fault, Zone, ZoneServer, _parse_query

RFC7208_TESTS = Path(__file__).resolve().parents[2] / "shared" / "conformance" / "rfc7208-tests.yml"

ZONE: dict[str, Any] = {
    "example.com": [
        {"TXT": "v=spf1 -all"},
        {"A": "192.0.2.1"},
        {"A": "192.0.2.2", "ttl": 5},
        {"MX": [10, "mx.example.com"]},
        {"AAAA": "2001:db8::1", "ttl": 5},
    ],
    "multi.example.com": [{"TXT": ["part one", "part two"]}],
    "long.example.com": [{"TXT": "a" * 300}],
    "utf8.example.com": [{"TXT": "v=spf1 exp=caf\u00e9 -all"}, {"TXT": b"\xff raw"}],
    "alias.example.com": [{"CNAME": "alias2.example.com"}],
    "alias2.example.com": [{"CNAME": "Multi.Example.com."}],
    "loop1.example.com": [{"CNAME": "loop2.example.com"}],
    "loop2.example.com": [{"CNAME": "loop1.example.com"}],
    "1.2.0.192.in-addr.arpa": [{"PTR": "host.example.com"}],
    "deep.ent.example.com": [{"A": "192.0.2.9"}],
    "spf99.example.com": [{"SPF": "v=spf1 +all"}],
    "slow.example.com": ["TIMEOUT"],
    "partial.example.com": [{"TXT": "v=spf1 -all"}, "TIMEOUT"],
    "broken.example.com": ["SERVFAIL"],
    "closed.example.com": ["REFUSED"],
    "empty.example.com": [],
    "big.example.com": [{"TXT": "b" * 700}],
    "huge.example.com": [{"TXT": "h" * 1500}],
}


@pytest.fixture
async def server(zone_server: Any) -> ZoneServer:
    return await zone_server(ZONE, negative_ttl=60)


async def ask(
    server: ZoneServer,
    name: str,
    rdtype: str = "TXT",
    *,
    tcp: bool = False,
    edns: bool = False,
    timeout: float = 2.0,
) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, use_edns=0 if edns else False, payload=1232)
    if tcp:
        return await dns.asyncquery.tcp(query, server.host, port=server.port, timeout=timeout)
    return await dns.asyncquery.udp(query, server.host, port=server.port, timeout=timeout)


def texts(rrset: dns.rrset.RRset) -> list[tuple[bytes, ...]]:
    return [rdata.strings for rdata in rrset]


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
async def test_positive_answer_with_ttls_and_flags(server: ZoneServer, tcp: bool) -> None:
    response = await ask(server, "example.com", "A", tcp=tcp)
    assert response.rcode() == dns.rcode.NOERROR
    assert response.flags & dns.flags.AA and response.flags & dns.flags.RA
    assert response.question[0].name == dns.name.from_text("example.com")
    # RFC 2181 5.2: one TTL per RRset, the lowest of its records.
    ((rrset,),) = [response.answer]
    assert (rrset.ttl, sorted(map(str, rrset))) == (5, ["192.0.2.1", "192.0.2.2"])
    aaaa = await ask(server, "example.com", "AAAA", tcp=tcp)
    txt = await ask(server, "example.com", "TXT", tcp=tcp)
    assert (aaaa.answer[0].ttl, txt.answer[0].ttl) == (5, 300)


@pytest.mark.parametrize(
    ("name", "rdtype", "expected"),
    [
        pytest.param("example.com", "MX", "10 mx.example.com.", id="mx"),
        pytest.param("example.com", "AAAA", "2001:db8::1", id="aaaa"),
        pytest.param("1.2.0.192.in-addr.arpa", "PTR", "host.example.com.", id="ptr"),
        pytest.param("spf99.example.com", "SPF", '"v=spf1 +all"', id="spf-type-99"),
        pytest.param("EXAMPLE.Com.", "TXT", '"v=spf1 -all"', id="case-insensitive"),
    ],
)
async def test_record_types(server: ZoneServer, name: str, rdtype: str, expected: str) -> None:
    response = await ask(server, name, rdtype)
    assert [str(rdata) for rdata in response.answer[0]] == [expected]


async def test_txt_character_strings(server: ZoneServer) -> None:
    multi = await ask(server, "multi.example.com")
    assert texts(multi.answer[0]) == [(b"part one", b"part two")]
    long = await ask(server, "long.example.com")
    assert texts(long.answer[0]) == [(b"a" * 255, b"a" * 45)]
    utf8 = await ask(server, "utf8.example.com")
    assert sorted(texts(utf8.answer[0])) == [(b"v=spf1 exp=caf\xc3\xa9 -all",), (b"\xff raw",)]


async def test_cname_chain(server: ZoneServer) -> None:
    response = await ask(server, "ALIAS.example.com")
    # Owner names come back in the question's case: compression points into it.
    assert [(str(r.name).lower(), r.rdtype) for r in response.answer] == [
        ("alias.example.com.", dns.rdatatype.CNAME),
        ("alias2.example.com.", dns.rdatatype.CNAME),
        ("multi.example.com.", dns.rdatatype.TXT),
    ]
    cname_only = await ask(server, "alias.example.com", "CNAME")
    assert [str(rdata) for rdata in cname_only.answer[0]] == ["alias2.example.com."]


async def test_cname_loop_ends(server: ZoneServer) -> None:
    response = await ask(server, "loop1.example.com")
    assert response.rcode() == dns.rcode.NOERROR
    assert {r.rdtype for r in response.answer} == {dns.rdatatype.CNAME}


async def test_nxdomain_carries_soa(server: ZoneServer) -> None:
    response = await ask(server, "nope.example.com")
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert response.answer == []
    (soa,) = response.authority
    assert soa.rdtype == dns.rdatatype.SOA and soa.ttl == 60 and soa[0].minimum == 60
    assert dns.name.from_text("nope.example.com").is_subdomain(soa.name)


async def test_negative_answer_without_soa(zone_server: Any) -> None:
    server = await zone_server(ZONE, soa_in_negative=False)
    response = await ask(server, "nope.example.com")
    assert response.rcode() == dns.rcode.NXDOMAIN and response.authority == []


@pytest.mark.parametrize(
    ("name", "rdtype"),
    [
        pytest.param("multi.example.com", "A", id="other-type"),
        pytest.param("empty.example.com", "TXT", id="empty-record-list"),
        pytest.param("ent.example.com", "A", id="empty-non-terminal"),
        pytest.param("example.com", "TYPE65400", id="unknown-type"),
        pytest.param("alias.example.com", "A", id="via-cname"),
    ],
)
async def test_nodata(server: ZoneServer, name: str, rdtype: str) -> None:
    response = await ask(server, name, rdtype)
    assert response.rcode() == dns.rcode.NOERROR
    assert [r for r in response.answer if r.rdtype != dns.rdatatype.CNAME] == []
    assert [r.rdtype for r in response.authority] == [dns.rdatatype.SOA]


async def test_timeout_fault_never_answers(server: ZoneServer) -> None:
    with pytest.raises(dns.exception.Timeout):
        await ask(server, "slow.example.com", timeout=0.2)
    assert server.counts[("slow.example.com", "TXT")] == 1
    # As in the RFC 7208 suite: types the name has records of are still answered.
    answered = await ask(server, "partial.example.com")
    assert texts(answered.answer[0]) == [(b"v=spf1 -all",)]
    with pytest.raises(dns.exception.Timeout):
        await ask(server, "partial.example.com", "SPF", timeout=0.2)


@pytest.mark.parametrize(
    ("name", "rcode"),
    [
        pytest.param("broken.example.com", dns.rcode.SERVFAIL, id="servfail"),
        pytest.param("closed.example.com", dns.rcode.REFUSED, id="refused"),
    ],
)
async def test_zone_faults(server: ZoneServer, name: str, rcode: dns.rcode.Rcode) -> None:
    assert (await ask(server, name)).rcode() == rcode


async def test_runtime_faults(server: ZoneServer) -> None:
    server.faults["example.com"] = "servfail"
    assert (await ask(server, "example.com")).rcode() == dns.rcode.SERVFAIL
    server.faults["example.com"] = "refused"
    assert (await ask(server, "example.com", tcp=True)).rcode() == dns.rcode.REFUSED
    # A fault on a CNAME target breaks the whole chain, as an upstream failure would.
    server.faults["multi.example.com"] = "servfail"
    assert (await ask(server, "alias.example.com")).rcode() == dns.rcode.SERVFAIL
    server.faults.clear()
    server.default_fault = "timeout"
    with pytest.raises(dns.exception.Timeout):
        await ask(server, "example.com", timeout=0.2)
    server.default_fault = None
    assert (await ask(server, "example.com")).rcode() == dns.rcode.NOERROR


async def test_truncation_then_tcp(server: ZoneServer) -> None:
    # Without EDNS the UDP limit is 512 octets (RFC 1035 4.2.1).
    truncated = await ask(server, "big.example.com")
    assert truncated.flags & dns.flags.TC and truncated.answer == []
    full = await ask(server, "big.example.com", tcp=True)
    assert not full.flags & dns.flags.TC
    assert b"".join(full.answer[0][0].strings) == b"b" * 700
    # With EDNS the client's payload size (1232) is the limit.
    assert not (await ask(server, "big.example.com", edns=True)).flags & dns.flags.TC
    huge = await ask(server, "huge.example.com", edns=True)
    assert huge.flags & dns.flags.TC and huge.answer == [] and huge.edns == 0
    assert len((await ask(server, "huge.example.com", tcp=True)).answer[0][0].strings) == 6


async def test_udp_limit_override(zone_server: Any) -> None:
    server = await zone_server(ZONE, udp_limit=4096)
    assert not (await ask(server, "huge.example.com")).flags & dns.flags.TC


async def test_edns_echo(server: ZoneServer) -> None:
    assert (await ask(server, "example.com", edns=True)).edns == 0
    assert (await ask(server, "example.com")).edns == -1


async def test_tcp_pipelined_queries_in_tiny_reads(server: ZoneServer) -> None:
    names = ["example.com", "multi.example.com", "nope.example.com"]
    queries = [dns.message.make_query(name, "TXT") for name in names]
    payload = b"".join(struct.pack("!H", len(w)) + w for w in (q.to_wire() for q in queries))
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        for i in range(len(payload)):  # one byte per write: the server must reassemble
            writer.write(payload[i : i + 1])
            await writer.drain()
        replies = {}
        for _ in queries:
            (length,) = struct.unpack("!H", await reader.readexactly(2))
            reply = dns.message.from_wire(await reader.readexactly(length))
            replies[reply.id] = reply
    finally:
        writer.close()
        await writer.wait_closed()
    rcodes = [replies[q.id].rcode() for q in queries]
    assert rcodes == [dns.rcode.NOERROR, dns.rcode.NOERROR, dns.rcode.NXDOMAIN]
    assert server.tcp_queries == 3


async def test_malformed_queries_are_ignored(server: ZoneServer) -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, remote_addr=(server.host, server.port)
    )
    transport.sendto(b"\x00")
    transport.sendto(b"garbage that is not a DNS message at all")
    transport.close()
    _, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(b"\x00\x05hello")
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    assert (await ask(server, "example.com")).rcode() == dns.rcode.NOERROR
    assert server.queries == 1


async def test_delay(zone_server: Any) -> None:
    server = await zone_server(ZONE, delay=0.3)
    started = time.monotonic()
    # Concurrent queries: each waits its own delay, none blocks the others.
    answers = await asyncio.gather(
        ask(server, "example.com"), ask(server, "multi.example.com", tcp=True)
    )
    assert time.monotonic() - started >= 0.3 * 0.9
    assert all(a.rcode() == dns.rcode.NOERROR for a in answers)
    server.delay = 0.0
    assert (await ask(server, "example.com")).rcode() == dns.rcode.NOERROR


async def test_close_cancels_delayed_answers(zone_server: Any) -> None:
    server = await zone_server(ZONE, delay=30)
    query = asyncio.ensure_future(ask(server, "example.com", timeout=5))
    while server.queries == 0:
        await asyncio.sleep(0.01)
    await server.close()
    query.cancel()
    await asyncio.gather(query, return_exceptions=True)


async def test_counts(server: ZoneServer) -> None:
    await ask(server, "Example.COM.")
    await ask(server, "example.com", tcp=True)
    await ask(server, "example.com", "A")
    await ask(server, "example.com", "TYPE65400")
    assert server.queries == 4 and server.tcp_queries == 1
    assert server.counts[("example.com", "TXT")] == 2
    assert server.counts[("example.com", "A")] == 1
    assert server.counts[("example.com", "TYPE65400")] == 1
    server.reset_counts()
    assert (server.queries, server.tcp_queries, server.counts) == (0, 0, {})


async def test_zone_swap(server: ZoneServer) -> None:
    server.zone = Zone.from_dict({"example.com": [{"TXT": "v=spf1 +all"}]}, ttl=7)
    response = await ask(server, "example.com")
    assert texts(response.answer[0]) == [(b"v=spf1 +all",)] and response.answer[0].ttl == 7
    assert (await ask(server, "multi.example.com")).rcode() == dns.rcode.NXDOMAIN


async def test_ipv6_loopback(zone_server: Any) -> None:
    try:
        server = await zone_server(ZONE, host="::1")
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    assert server.nameserver == f"[::1]:{server.port}"
    assert (await ask(server, "example.com", tcp=True)).answer


def test_refuses_non_loopback() -> None:
    for host in ("0.0.0.0", "192.0.2.1", "localhost", "::"):
        with pytest.raises(ValueError, match="loopback"):
            ZoneServer(Zone.from_dict({}), host=host)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param({"x.example": [{"TXT": "a", "A": "192.0.2.1"}]}, id="two-types"),
        pytest.param({"x.example": [{"A": "not an address"}]}, id="bad-address"),
        pytest.param({"x.example": ["EXPLODE"]}, id="unknown-fault"),
        pytest.param({"x.example": [{"TXT": 42}]}, id="bad-txt"),
        pytest.param({"x.example": [{"CNAME": "y.example"}, {"A": "192.0.2.1"}]}, id="cname-and"),
    ],
)
def test_bad_zone_data(data: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"x\.example"):
        Zone.from_dict(data)


def _rfc7208_scenarios() -> list[dict[str, Any]]:
    if not RFC7208_TESTS.exists():
        pytest.skip(f"RFC 7208 test suite not found at {RFC7208_TESTS}")
    with RFC7208_TESTS.open(encoding="utf-8") as f:
        return list(yaml.safe_load_all(f))


def test_rfc7208_zonedata_loads() -> None:
    scenarios = _rfc7208_scenarios()
    assert len(scenarios) > 10
    for scenario in scenarios:
        zone = Zone.from_rfc7208(scenario["zonedata"])
        assert len(zone.names) == len({n.lower().rstrip(".") for n in scenario["zonedata"]})


async def test_rfc7208_record_lookup_semantics(zone_server: Any) -> None:
    (scenario,) = [s for s in _rfc7208_scenarios() if s["description"] == "Record lookup"]
    server = await zone_server(Zone.from_rfc7208(scenario["zonedata"]))
    # SPF records are served as TXT too, unless the name lists TXT ("TXT: NONE").
    both = await ask(server, "both.example.net")
    assert texts(both.answer[0]) == [(b"v=spf1 -all",)]
    spfonly = await ask(server, "spfonly.example.net")
    assert spfonly.rcode() == dns.rcode.NOERROR and spfonly.answer == []
    assert (await ask(server, "spfonly.example.net", "SPF")).answer
    # TIMEOUT hits only the types without records.
    assert (await ask(server, "spftimeout.example.net")).answer
    for name, rdtype in [("spftimeout.example.net", "SPF"), ("txttimeout.example.net", "TXT")]:
        with pytest.raises(dns.exception.Timeout):
            await ask(server, name, rdtype, timeout=0.2)


async def test_rfc7208_empty_spf_record(zone_server: Any) -> None:
    (scenario,) = [s for s in _rfc7208_scenarios() if "null.example.com" in s["zonedata"]]
    server = await zone_server(Zone.from_rfc7208(scenario["zonedata"]))
    response = await ask(server, "null.example.com")
    assert sorted(texts(response.answer[0])) == [(b"",), (b"v=spf1 ip4:", b"192.0.2.5 -all")]


async def test_aiodns(server: ZoneServer) -> None:
    # c-ares takes "host:port" server strings; it caches answers itself (TTL-bound).
    resolver = aiodns.DNSResolver(nameservers=[server.nameserver], timeout=1, tries=1)
    try:
        result = await resolver.query_dns("multi.example.com", "TXT")
        assert [r.data.data for r in result.answer] == [b"part onepart two"]
        assert server.tcp_queries == 0
        # The truncated UDP answer (1500 > the 1232 c-ares advertises) is retried over TCP.
        huge = await resolver.query_dns("huge.example.com", "TXT")
        assert huge.answer[0].data.data == b"h" * 1500
        assert server.counts[("huge.example.com", "TXT")] == 2 and server.tcp_queries == 1
        # c-ares caches answers itself (up to their TTL; pycares cannot turn that off).
        await resolver.query_dns("multi.example.com", "TXT")
        assert server.counts[("multi.example.com", "TXT")] == 1
        with pytest.raises(aiodns.error.DNSError):
            await resolver.query_dns("nope.example.com", "TXT")
    finally:
        await resolver.close()


async def test_cli(tmp_path: Path) -> None:
    zone_file = tmp_path / "zone.yaml"
    zone_file.write_text(yaml.safe_dump({"cli.example": [{"TXT": "from the cli"}]}))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "spfpolicy.bench.dnsserver",
        "--zone",
        str(zone_file),
        "--ttl",
        "42",
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), timeout=10)
        host, _, port = line.decode().strip().rpartition(":")
        query = dns.message.make_query("cli.example", "TXT")
        response = await dns.asyncquery.udp(query, host, port=int(port), timeout=2)
        assert texts(response.answer[0]) == [(b"from the cli",)] and response.answer[0].ttl == 42
    finally:
        process.terminate()
        assert await asyncio.wait_for(process.wait(), timeout=10) == 0


# The fast path (hand-written codec) against the dnspython path it stands in for:
# byte for byte, once dnspython's shuffling of the records in an RRset is off.

_TYPES = ("TXT", "A", "AAAA", "MX", "PTR", "CNAME", "SPF", "NS", "SOA", "ANY", "TYPE65400")


def _both_replies(server: ZoneServer, wire: bytes, *, tcp: bool) -> tuple[list[bytes], list[bytes]]:
    fast: list[bytes] = []
    reference: list[bytes] = []
    server.handle(wire, fast.append, tcp=tcp)
    server._handle_unusual(wire, reference.append, tcp=tcp)
    return fast, reference


_EDNS = ((False, 0), (0, 1232), (0, 512), (0, 4096), (0, 100))


def _queries(
    names: list[str], types: tuple[str, ...] = _TYPES, edns_variants: tuple[Any, ...] = _EDNS
) -> list[tuple[str, bytes]]:
    queries = []
    for name in names:
        for rdtype in types:
            for edns, payload in edns_variants:
                query = dns.message.make_query(name, rdtype, use_edns=edns, payload=payload)
                query.id = 4242
                queries.append((f"{name}/{rdtype}/edns={edns},{payload}", query.to_wire()))
    return queries


def _assert_same(server: ZoneServer, names: list[str], **variants: Any) -> int:
    answered = 0
    for what, wire in _queries(names, **variants):
        if re.fullmatch(r"[\w.-]+", what.partition("/")[0]):
            assert _parse_query(wire) is not None, what
        for tcp in (False, True):
            fast, reference = _both_replies(server, wire, tcp=tcp)
            assert fast == reference, f"{what} tcp={tcp}"
            answered += len(fast)
    return answered


@pytest.fixture
def unshuffled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dns.rdataset.random, "shuffle", lambda items: None)


@pytest.mark.usefixtures("unshuffled")
@pytest.mark.parametrize("fault", [None, *Fault], ids=lambda f: f"fault={f}")
def test_fast_path_matches_dnspython(fault: Fault | None) -> None:
    names = [*ZONE, "EXAMPLE.com", "nope.example.com", "ent.example.com", "x.deep.ent.example.com"]
    settings: list[dict[str, Any]] = [{}]
    if fault is None:
        settings += [{"udp_limit": 700}, {"udp_limit": 100}, {"soa_in_negative": False}]
    for kwargs in settings:
        server = ZoneServer(Zone.from_dict(ZONE), negative_ttl=60, **kwargs)  # type: ignore[arg-type]
        server.default_fault = fault
        assert _assert_same(server, names) > 0 or fault in (Fault.TIMEOUT,)


@pytest.mark.usefixtures("unshuffled")
def test_fast_path_matches_dnspython_on_rfc7208_zones() -> None:
    for scenario in _rfc7208_scenarios():
        server = ZoneServer(Zone.from_rfc7208(scenario["zonedata"]))
        names = [str(name).rstrip(".") for name in scenario["zonedata"]]
        _assert_same(
            server,
            [*names, "nonexistent.example.com"],
            types=("TXT", "SPF", "A", "AAAA", "MX", "PTR"),
            edns_variants=_EDNS[:2],
        )


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(
            b"\x12\x34\x81\x00" + b"\x00\x01" + b"\x00" * 6 + b"\x00\x00\x10\x00\x01", id="qr"
        ),
        pytest.param(
            b"\x12\x34\x01\x00\x00\x01" + b"\x00" * 6 + b"\xc0\x0c\x00\x10\x00\x01", id="pointer"
        ),
        pytest.param(
            b"\x12\x34\x01\x00\x00\x01" + b"\x00" * 6 + b"\x01a\x00\x00\x10\x00\x03", id="chaos"
        ),
        pytest.param(
            b"\x12\x34\x01\x00\x00\x01" + b"\x00" * 6 + b"\x01a\x00\x00\x10\x00\x01x", id="junk"
        ),
        pytest.param(
            b"\x12\x34\x01\x00\x00\x01" + b"\x00" * 6 + b"\x03a.b\x00\x00\x10\x00\x01", id="dot"
        ),
        pytest.param(
            b"\x12\x34\x01\x00\x00\x01" + b"\x00" * 6 + b"\x00\x00\x10\x00\x01", id="root"
        ),
        pytest.param(b"\x12\x34\x01\x00\x00\x01" + b"\x00" * 6 + b"\x05a", id="short"),
    ],
)
def test_unusual_queries_take_the_dnspython_path(wire: bytes) -> None:
    assert _parse_query(wire) is None


@pytest.mark.usefixtures("unshuffled")
def test_edns_variants_match_dnspython() -> None:
    server = ZoneServer(Zone.from_dict(ZONE))
    for options in (
        [],
        [dns.edns.GenericOption(10, b"12345678")],
        [dns.edns.GenericOption(12, b"")],
    ):
        for version in (0, 1):
            query = dns.message.make_query(
                "example.com", "MX", use_edns=version, options=options, payload=1400
            )
            fast, reference = _both_replies(server, query.to_wire(), tcp=False)
            assert fast == reference and len(fast) == 1
