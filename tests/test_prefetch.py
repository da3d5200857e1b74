"""Speculative prefetch of SPF record trees: what it asks for, that the
evaluation rides on it, that it stays within what the RFC lets an
evaluation send (counted at the DNS server against pyspf for the same
check), that it guesses only for identities the settings check, that a
budget bounds unused guesses across requests, and that it never changes a
result (the RFC 7208 suite runs with it on, too)."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
from typing import Any

import pytest

from hardening import request
from oracle import plain_pyspf
from spfpolicy.bench.dnsserver import ZoneServer
from spfpolicy.checks import DnsChecks
from spfpolicy.config import HeloReject, Settings
from spfpolicy.deciding import decide
from spfpolicy.evaluator import SpfEvaluator
from spfpolicy.memory import InstanceMemory
from spfpolicy.prefetch import (
    ADDRESS,
    MAX_TERMS,
    SpfPrefetcher,
    client_address,
    reached_terms,
    spf_targets,
    spf_terms,
)
from spfpolicy.protocol import PolicyRequest
from spfpolicy.resolver import Resolver
from spfpolicy.results import SpfResult


def txt(text: str) -> tuple[bytes, ...]:
    return (text.encode(),)


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        pytest.param("v=spf1 -all", (), id="no-targets"),
        pytest.param(
            "v=spf1 include:_spf.Example.NET. ~all", (("_spf.example.net", "TXT"),), id="include"
        ),
        pytest.param("v=spf1 redirect=other.org", (("other.org", "TXT"),), id="redirect"),
        pytest.param(
            "v=spf1 redirect=other.org mx",
            (("example.com", "MX"), ("other.org", "TXT")),
            id="redirect-comes-last",
        ),
        pytest.param("v=spf1 redirect=other.org ?all", (), id="redirect-ignored-with-all"),
        pytest.param(
            "v=spf1 a a/24 a:h.example.org/28 -all",
            (
                ("example.com", ADDRESS),
                ("example.com", ADDRESS),
                ("h.example.org", ADDRESS),
            ),
            id="a-forms",
        ),
        pytest.param(
            "v=spf1 mx mx:m.example.org//64 -all",
            (("example.com", "MX"), ("m.example.org", "MX")),
            id="mx-forms",
        ),
        pytest.param("v=spf1 exists:x.example.org -all", (("x.example.org", "A"),), id="exists"),
        pytest.param("v=spf1 -include:bad.example ?all", (("bad.example", "TXT"),), id="qualifier"),
        pytest.param("v=spf1 include:%{d}.example.org -all", (), id="macro-skipped"),
        pytest.param("v=spf1 ip4:192.0.2.0/24 ptr -all", (), id="no-lookup-terms"),
        pytest.param("spf2.0/pra include:x.example -all", (), id="not-spf1"),
    ],
)
def test_spf_targets(record: str, expected: tuple[tuple[str, str], ...]) -> None:
    assert spf_targets("example.com", (txt(record),)) == expected


def test_spf_targets_needs_exactly_one_record() -> None:
    records = (txt("v=spf1 include:a.example -all"), txt("v=spf1 include:b.example -all"))
    assert spf_targets("example.com", records) == ()
    assert spf_targets("example.com", (txt("google-site-verification=x"),)) == ()


def test_spf_targets_of_unhashable_records() -> None:
    # Parsed records are memoized by value; a list (not from the resolver) still parses.
    record = [b"v=spf1 include:a.example -all"]
    assert spf_targets("example.com", (record,)) == (("a.example", "TXT"),)  # type: ignore[arg-type]
    assert spf_targets("example.com", (tuple(record),)) == (("a.example", "TXT"),)


@pytest.mark.parametrize(
    ("ip", "reached"),
    [
        pytest.param("192.0.2.7", (), id="ip4-match-ends-the-record"),
        pytest.param("::ffff:192.0.2.7", (), id="v4-mapped-matches-ip4"),
        pytest.param("198.51.100.1", ("a.example", "b.example"), id="no-match-until-all"),
        pytest.param("2001:db8::5", ("a.example",), id="ip6-match-after-a"),
        pytest.param("not-an-ip", ("a.example", "b.example"), id="unparsable-client"),
    ],
)
def test_reached_terms_stop_at_a_certain_match(ip: str, reached: tuple[str, ...]) -> None:
    record = "v=spf1 -ip4:192.0.2.0/24 a:a.example ip6:2001:db8::/32 include:b.example ~all mx"
    terms = reached_terms(spf_terms("example.com", (txt(record),)), client_address(ip))
    assert tuple(t.target[0] for t in terms if t.target is not None) == reached


def test_ptr_and_macro_terms_count_but_fetch_nothing() -> None:
    terms = spf_terms("example.com", (txt("v=spf1 ptr exists:%{i}.x.example a -all"),))
    assert [(t.counted, t.target) for t in terms] == [
        (True, None),
        (True, None),
        (True, ("example.com", ADDRESS)),
        (False, None),
    ]


# -- the evaluation rides on it --------------------------------------------------

TREE = {
    "example.com": [{"TXT": "v=spf1 include:p1.example.net include:p2.example.net mx -all"}],
    "p1.example.net": [{"TXT": "v=spf1 include:deep.example.org ~all"}],
    "p2.example.net": [{"TXT": "v=spf1 a:out.example.net ~all"}],
    "deep.example.org": [{"TXT": "v=spf1 ip4:198.51.100.0/24 ~all"}],
    "out.example.net": [{"A": "203.0.113.9"}],
}


async def settled(resolver: Resolver, prefetcher: SpfPrefetcher | None) -> None:
    """Until no walk and no lookup is running (bounded)."""
    async with asyncio.timeout(10):
        for _ in range(3):
            while resolver.in_flight or (prefetcher is not None and prefetcher._walking):
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.02)


async def test_evaluation_rides_on_prefetched_tree(zone_server) -> None:
    zone = dict(TREE)
    zone["example.com"] = [*zone["example.com"], {"MX": [10, "mx.example.com"]}]
    zone["mx.example.com"] = [{"A": "192.0.2.25"}]
    server = await zone_server(zone, delay=0.05)
    resolver = Resolver([server.nameserver], timeout=2.0, tries=1)
    try:
        evaluator = SpfEvaluator(resolver)
        outcome = await evaluator.check("192.0.2.25", "user@example.com", "mx.example.com")
        assert outcome.result == SpfResult.PASS
        assert outcome.mechanism == "mx"
        assert evaluator.prefetcher is not None and evaluator.prefetcher.walks == 1
        # The includes and the MX were asked by the walk before pyspf got to
        # them (the second level races pyspf for the same answer).
        assert resolver.stats.prefetches_used >= 3
        # No name was asked twice.
        assert all(count == 1 for count in server.counts.values()), server.counts
    finally:
        await resolver.close()


async def test_mx_hosts_are_asked_together_once_the_evaluation_has_the_mx(zone_server) -> None:
    hosts = [f"h{i}.example.org" for i in range(4)]
    zone: dict[str, Any] = {
        "example.com": [
            {"TXT": "v=spf1 mx -all"},
            *({"MX": [10, host]} for host in hosts),
        ],
    }
    for i, host in enumerate(hosts):
        zone[host] = [{"A": f"203.0.113.{i + 1}"}]
    server = await zone_server(zone, delay=0.1)
    resolver = Resolver([server.nameserver], timeout=2.0, tries=1)
    try:
        evaluator = SpfEvaluator(resolver)
        outcome = await evaluator.check("203.0.113.4", "user@example.com", "h.example")
        assert (outcome.result, outcome.mechanism) == (SpfResult.PASS, "mx")
        # The host lookups went out together: pyspf waited on the first and
        # found the three others answered or in flight.
        assert resolver.stats.prefetches_used >= 3
        assert all(count == 1 for count in server.counts.values()), server.counts
    finally:
        await resolver.close()


async def test_prefetch_changes_no_result(zone_server) -> None:
    zone = dict(TREE)
    zone["example.com"] = [*zone["example.com"], {"MX": [10, "mx.example.com"]}]
    zone["mx.example.com"] = [{"A": "192.0.2.25"}]
    server = await zone_server(zone)
    for ip in ("192.0.2.25", "198.51.100.3", "203.0.113.9", "192.0.2.99"):
        outcomes = []
        for prefetch in (True, False):
            resolver = Resolver([server.nameserver], timeout=1.0, tries=1)
            try:
                evaluator = SpfEvaluator(resolver, prefetch=prefetch)
                outcomes.append(await evaluator.check(ip, "u@example.com", "h.example.com"))
            finally:
                await resolver.close()
        with_prefetch, without = outcomes
        assert (with_prefetch.result, with_prefetch.mechanism, with_prefetch.lookups) == (
            without.result,
            without.mechanism,
            without.lookups,
        )


async def test_walk_of_a_cached_tree_asks_nothing(zone_server) -> None:
    server = await zone_server(TREE)
    resolver = Resolver([server.nameserver], timeout=2.0, tries=1)
    try:
        evaluator = SpfEvaluator(resolver)
        first = await evaluator.check("192.0.2.200", "user@example.com", "h.example.com")
        prefetcher = evaluator.prefetcher
        assert prefetcher is not None
        await settled(resolver, prefetcher)
        asked = server.queries
        prefetcher.walks = prefetcher.lookups = 0
        # Everything the tree points at is cached now: no walk, no query.
        second = await evaluator.check("192.0.2.200", "user@example.com", "h.example.com")
        assert (second.result, second.mechanism) == (first.result, first.mechanism)
        assert prefetcher.walks == 0 and server.queries == asked
    finally:
        await resolver.close()


# -- within the RFC's limits, counted at the DNS server against pyspf ---------

CLIENT = "192.0.2.25"


def mx_fan(zone: dict[str, Any], prefix: str, count: int) -> list[str]:
    """``count`` mx: terms, each naming an MX of 10 hosts with an address."""
    terms = []
    for i in range(count):
        name = f"{prefix}m{i}.example"
        zone[name] = [{"MX": [10, f"{prefix}h{i}-{j}.example"]} for j in range(10)]
        for j in range(10):
            zone[f"{prefix}h{i}-{j}.example"] = [{"A": f"203.0.113.{j + 1}"}]
        terms.append(f"mx:{name}")
    return terms


def hostile_zone() -> dict[str, Any]:
    zone: dict[str, Any] = {}
    # 1. an ip4 that matches, then 10 mx: of 10 hosts each
    zone["mx10.example"] = [
        {"TXT": "v=spf1 ip4:192.0.2.0/24 " + " ".join(mx_fan(zone, "a", 10)) + " -all"}
    ]
    # 2. the same inside an include: plus 9 mx: (after the ip4, or first)
    nine = " ".join(mx_fan(zone, "b", 9))
    zone["inc.example"] = [{"TXT": f"v=spf1 ip4:192.0.2.0/24 include:mx10.example {nine} -all"}]
    zone["incfirst.example"] = [{"TXT": f"v=spf1 include:mx10.example {nine} -all"}]
    # 4. include of 10 includes of 10 (the leaves exist and match nothing)
    tops = []
    for i in range(10):
        inner = []
        for j in range(10):
            zone[f"l{i}-{j}.deep.example"] = [{"TXT": "v=spf1 -all"}]
            inner.append(f"include:l{i}-{j}.deep.example")
        zone[f"i{i}.deep.example"] = [{"TXT": "v=spf1 " + " ".join(inner) + " -all"}]
        tops.append(f"include:i{i}.deep.example")
    zone["deep.example"] = [{"TXT": "v=spf1 " + " ".join(tops) + " -all"}]
    zone["plain.example"] = [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}]
    return zone


async def pyspf_queries(server: ZoneServer, ip: str, sender: str, helo: str) -> tuple[str, int]:
    server.reset_counts()
    result, _, _ = await asyncio.to_thread(plain_pyspf, server.port, ip, sender, helo)
    return result, server.queries


async def our_queries(server: ZoneServer, ip: str, sender: str, helo: str) -> tuple[str, int, int]:
    """Our result, the queries sent, and how many of them were unused guesses."""
    server.reset_counts()
    resolver = Resolver([server.nameserver], timeout=2.0, tries=1)
    try:
        evaluator = SpfEvaluator(resolver)
        outcome = await evaluator.check(ip, sender, helo)
        await settled(resolver, evaluator.prefetcher)
    finally:
        await resolver.close()
    stats = resolver.stats
    return str(outcome.result), server.queries, stats.prefetches - stats.prefetches_used


# shape -> (pyspf's queries, ours). The RFC lets a complete evaluation send
# 1 + 10 terms + 10 x 10 mx names; the prefetch guesses one query per term,
# at most MAX_TERMS for a check, and never an mx's (or a ptr's) names.
SHAPES = [
    pytest.param("mx10.example", 1, 1, id="ip4-match-then-10-mx"),
    pytest.param("inc.example", 1, 1, id="ip4-match-then-include-and-9-mx"),
    # The include and the 9 MX queries after it are asked before the include's
    # record shows the ip4 match: 9 unused guesses; none of the 190 host
    # lookups is asked.
    pytest.param("incfirst.example", 2, 11, id="include-then-9-mx"),
    # The first level's 10 includes are asked together; i0's record then
    # shows the evaluation ends inside it (its 10th include is the 11th
    # term): i1..i9 were 9 unused guesses, and nothing past them is asked.
    pytest.param("deep.example", 11, 20, id="include-of-10-includes-of-10"),
]


@pytest.mark.parametrize(("domain", "theirs", "ours"), SHAPES)
async def test_prefetch_sends_no_more_than_the_rfc_lets_an_evaluation(
    zone_server, domain: str, theirs: int, ours: int
) -> None:
    server = await zone_server(hostile_zone())
    sender = f"user@{domain}"
    pyspf_result, pyspf_sent = await pyspf_queries(server, CLIENT, sender, "h.example")
    our_result, our_sent, unused = await our_queries(server, CLIENT, sender, "h.example")
    assert our_result == pyspf_result
    assert (pyspf_sent, our_sent) == (theirs, ours)
    assert our_sent - pyspf_sent <= unused <= MAX_TERMS


async def test_an_identity_not_checked_is_not_prefetched(zone_server) -> None:
    """The mx10 tree as the HELO name with HELO_reject = No_Check: only the
    sender's record is asked, as pyspf asks for the MAIL FROM check alone."""
    server = await zone_server(hostile_zone())
    settings = dataclasses.replace(Settings(), helo_reject=HeloReject.NO_CHECK)
    resolver = Resolver([server.nameserver], timeout=2.0, tries=1)
    try:
        evaluator = SpfEvaluator(resolver)
        checks = DnsChecks(evaluator, void_limit=2, result_cache_size=100, result_cache_ttl=60)
        attributes = request("user@plain.example", ip=CLIENT, helo="mx10.example")
        decision = await decide(PolicyRequest(attributes), settings, checks, InstanceMemory(10, 60))
        await settled(resolver, evaluator.prefetcher)
    finally:
        await resolver.close()
    assert decision.action.startswith("prepend Received-SPF: Pass (mailfrom)")
    ours = server.queries
    assert not [name for name, _ in server.counts if "mx10" in name or name.startswith("a")]
    _, theirs = await pyspf_queries(server, CLIENT, "user@plain.example", "mx10.example")
    assert ours == theirs == 1


async def test_the_checked_identities_are_prefetched_together(zone_server) -> None:
    """Default settings: HELO and MAIL FROM are both checked, and the sender's
    tree is asked while the HELO check waits for its answers."""
    zone = {
        "helo.example": [{"TXT": "v=spf1 include:slow.example -all"}],
        "slow.example": [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}],
        "sender.example": [{"TXT": "v=spf1 include:other.example -all"}],
        "other.example": [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}],
    }
    server = await zone_server(zone, delay=0.05)
    resolver = Resolver([server.nameserver], timeout=2.0, tries=1)
    try:
        evaluator = SpfEvaluator(resolver)
        checks = DnsChecks(evaluator, void_limit=2, result_cache_size=100, result_cache_ttl=60)
        attributes = request("u@sender.example", ip=CLIENT, helo="helo.example")
        await decide(PolicyRequest(attributes), Settings(), checks, InstanceMemory(10, 60))
    finally:
        await resolver.close()
    # The MAIL FROM evaluation found its two lookups fetched by the prefetch.
    assert resolver.stats.prefetches_used >= 2
    assert all(count == 1 for count in server.counts.values()), server.counts


# -- the budget across requests -----------------------------------------------


async def test_unused_guesses_are_bounded_across_requests(zone_server) -> None:
    """A flood of records whose evaluation ends at their first term, with nine
    includes after it that the walk cannot know are never reached."""
    zone: dict[str, Any] = {"hit.example": [{"A": CLIENT}]}
    flood = 60
    for n in range(flood):
        includes = " ".join(f"include:w{k}.f{n}.example" for k in range(9))
        zone[f"f{n}.example"] = [{"TXT": f"v=spf1 a:hit.example {includes} -all"}]
    server = await zone_server(zone)
    burst = 20
    resolver = Resolver([server.nameserver], timeout=2.0, tries=1)
    try:
        evaluator = SpfEvaluator(resolver)
        assert evaluator.prefetcher is not None
        evaluator.prefetcher.burst = burst
        evaluator.prefetcher._credit = burst
        for n in range(flood):
            outcome = await evaluator.check(CLIENT, f"u@f{n}.example", "h.example")
            assert outcome.result == SpfResult.PASS
        await settled(resolver, evaluator.prefetcher)
    finally:
        await resolver.close()
    stats = resolver.stats
    unused = stats.prefetches - stats.prefetches_used
    # Without a budget: 9 unused includes a message, 540 in all.
    assert unused <= stats.useful_lookups + burst
    assert stats.prefetches_refused > 0
    # Guessing did not become the main source of queries.
    assert server.queries <= 2 * stats.useful_lookups + burst


def test_client_address_forms() -> None:
    assert client_address("192.0.2.1") == ipaddress.ip_address("192.0.2.1")
    assert client_address("::ffff:192.0.2.1") == ipaddress.ip_address("192.0.2.1")
    assert client_address("fe80::1%eth0") == ipaddress.ip_address("fe80::1")
    assert client_address("") is None


async def test_a_walk_ends_with_the_resolver(zone_server) -> None:
    # A walk is driven by its lookups' callbacks: closing the resolver
    # cancels them, and the walk ends without asking anything more (no
    # channel made again after close).
    server = await zone_server(TREE, delay=0.3)
    resolver = Resolver([server.nameserver], timeout=2.0, tries=1)
    prefetcher = SpfPrefetcher(resolver)
    prefetcher.start("example.com", "192.0.2.200")
    async with asyncio.timeout(5):
        while not resolver.in_flight:  # the walk's first lookup is out
            await asyncio.sleep(0.01)
    assert prefetcher._walking == {"example.com"}
    await resolver.close()
    for _ in range(5):
        await asyncio.sleep(0)
    assert not prefetcher._walking
    assert resolver._channel is None and not resolver.in_flight
    assert resolver.prefetch("p1.example.net", "TXT") is None


async def test_a_walk_goes_on_level_by_level_from_callbacks(zone_server) -> None:
    # The whole tree is asked by the walk alone, each name once.
    server = await zone_server(TREE, delay=0.02)
    resolver = Resolver([server.nameserver], timeout=2.0, tries=1)
    try:
        prefetcher = SpfPrefetcher(resolver)
        prefetcher.start("example.com", "192.0.2.200")
        await settled(resolver, prefetcher)
        for name, qtype in [
            ("example.com", "TXT"),
            ("p1.example.net", "TXT"),
            ("p2.example.net", "TXT"),
            ("deep.example.org", "TXT"),
            ("out.example.net", "A"),
            ("example.com", "MX"),
        ]:
            assert resolver.peek(name, qtype) is not None, (name, qtype)
        assert all(count == 1 for count in server.counts.values()), server.counts
        assert not prefetcher._walking
    finally:
        await resolver.close()
