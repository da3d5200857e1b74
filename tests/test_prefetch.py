"""Speculative prefetch of SPF record trees: what it asks for, that the
evaluation rides on it, that it is bounded, and that it never changes a
result (the RFC 7208 suite runs with it on, too)."""

from __future__ import annotations

import asyncio

import pytest

from spfpolicy.dns import Resolver
from spfpolicy.evaluator import SpfEvaluator
from spfpolicy.prefetch import ADDRESS, MAX_PREFETCH, spf_targets
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


def test_spf_targets_bounded_per_record() -> None:
    record = "v=spf1 " + " ".join(f"include:p{i}.example" for i in range(50)) + " -all"
    assert len(spf_targets("example.com", (txt(record),))) == 10


TREE = {
    "example.com": [{"TXT": "v=spf1 include:p1.example.net include:p2.example.net mx -all"}],
    "p1.example.net": [{"TXT": "v=spf1 include:deep.example.org ~all"}],
    "p2.example.net": [{"TXT": "v=spf1 a:out.example.net ~all"}],
    "deep.example.org": [{"TXT": "v=spf1 ip4:198.51.100.0/24 ~all"}],
    "out.example.net": [{"A": "203.0.113.9"}],
}


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
        # Every lookup pyspf made found its answer cached or already asked
        # for by the prefetcher, except the very first one.
        stats = resolver.stats
        assert stats.hits + stats.shared_waits >= outcome.lookups - 1
        # No name was asked twice.
        assert all(count == 1 for count in server.counts.values()), server.counts
    finally:
        await resolver.close()


async def test_hostile_fan_out_is_bounded(zone_server) -> None:
    record = "v=spf1 " + " ".join(f"include:p{i}.example" for i in range(40)) + " -all"
    zone = {"hostile.example": [{"TXT": record}]}
    for i in range(40):
        zone[f"p{i}.example"] = [
            {"TXT": "v=spf1 " + " ".join(f"a:h{i}-{j}.example" for j in range(10)) + " -all"}
        ]
    server = await zone_server(zone)
    resolver = Resolver([server.nameserver], timeout=1.0, tries=1)
    try:
        evaluator = SpfEvaluator(resolver)
        outcome = await evaluator.check("192.0.2.1", "x@hostile.example", "h.example")
        assert outcome.result == SpfResult.PERMERROR  # more than 10 DNS-querying terms
        await resolver.close()  # ends any walk still running
        assert evaluator.prefetcher is not None
        assert evaluator.prefetcher.lookups <= MAX_PREFETCH
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


def test_spf_targets_of_unhashable_records() -> None:
    # Parsed records are memoized by value; a list (not from the resolver) still parses.
    record = [b"v=spf1 include:a.example -all"]
    assert spf_targets("example.com", (record,)) == (("a.example", "TXT"),)  # type: ignore[arg-type]
    assert spf_targets("example.com", (tuple(record),)) == (("a.example", "TXT"),)


async def test_walk_of_a_cached_tree_asks_nothing(zone_server) -> None:
    server = await zone_server(TREE)
    resolver = Resolver([server.nameserver], timeout=2.0, tries=1)
    try:
        evaluator = SpfEvaluator(resolver)
        first = await evaluator.check("198.51.100.3", "user@example.com", "h.example.com")
        assert evaluator.prefetcher is not None
        prefetcher = evaluator.prefetcher
        for _ in range(3):  # the walk fetches what the evaluation did not need
            while prefetcher._walking or resolver.in_flight:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
        asked = server.queries
        prefetcher.walks = prefetcher.lookups = 0
        # Everything the tree points at is cached now: no walk, no query.
        second = await evaluator.check("198.51.100.3", "user@example.com", "h.example.com")
        assert (second.result, second.mechanism) == (first.result, first.mechanism)
        assert prefetcher.walks == 0 and server.queries == asked
    finally:
        await resolver.close()
