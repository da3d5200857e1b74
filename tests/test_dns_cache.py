"""The shared DNS cache and the evaluation deadline, against the loopback DNS
server (real UDP/TCP, real c-ares), with an injected clock where time matters.

c-ares' own answer cache is switched off by the resolver (it would hold
entries outside DNS_Cache_Size), so the queries the server counts are exactly
the ones spfpolicy's cache decided to send.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import time
import tracemalloc
import weakref
from typing import Any

import pytest
import spf

from fakeclock import FakeClock
from spfpolicy.cache import TtlLruCache
from spfpolicy.checks import DnsChecks
from spfpolicy.evaluator import SpfEvaluator, _Runners
from spfpolicy.resolver import DnsAnswer, DnsCache, DnsTempError
from spfpolicy.results import SpfResult

# -- the cache mechanism itself (no sockets) ---------------------------------


def test_ttl_lru_cache_expiry_and_eviction() -> None:
    clock = FakeClock()
    cache: TtlLruCache[str, int] = TtlLruCache(2, clock=clock)
    cache.set("a", 1, 10)
    cache.set("b", 2, 10)
    assert cache.get("a") == 1  # a is now most recently used
    cache.set("c", 3, 10)  # evicts b, the least recently used
    assert cache.get("b") is None
    assert (cache.get("a"), cache.get("c")) == (1, 3)
    assert cache.evictions == 1
    clock.now += 10
    assert cache.get("a") is None
    assert cache.expirations == 1
    cache.set("z", 9, 0)  # a zero TTL stores nothing
    assert cache.get("z") is None


def test_ttl_lru_cache_pop_remaining_ttl_and_clear() -> None:
    clock = FakeClock()
    cache: TtlLruCache[str, int] = TtlLruCache(3, clock=clock)
    cache.set("a", 1, 10)
    cache.set("b", 2, 5)
    assert cache.remaining_ttl("a") == 10
    clock.now += 5
    assert cache.remaining_ttl("b") is None  # expired, not yet removed
    assert len(cache) == 2
    assert cache.pop("a") == 1
    assert cache.pop("a") is None
    cache.set("b", 3, 10)  # replacing an entry keeps one entry
    assert (len(cache), cache.get("b")) == (1, 3)
    cache.set("b", 4, 0)  # a zero TTL removes the old value too
    assert cache.get("b") is None
    cache.set("c", 5, 10)
    cache.clear()
    assert (len(cache), cache.get("c")) == (0, None)


def test_ttl_lru_cache_zero_entries_stores_nothing() -> None:
    cache: TtlLruCache[str, int] = TtlLruCache(0)
    cache.set("a", 1, 10)
    assert (len(cache), cache.get("a")) == (0, None)


def test_ttl_lru_cache_full_cache_evicts_oldest_in_batches() -> None:
    # A full cache of 1024 evicts 1024 >> 8 = 4 at a time, least recently
    # used first; a hit saves an entry from the next batch.
    cache: TtlLruCache[int, int] = TtlLruCache(1024, clock=FakeClock())
    for i in range(1024):
        cache.set(i, i, 60)
    assert cache.get(0) == 0
    cache.set(1024, 1024, 60)
    assert len(cache) == 1021
    assert cache.evictions == 4
    assert [cache.get(i) for i in range(6)] == [0, None, None, None, None, 5]
    for i in range(1025, 1028):  # room for three more before the next batch
        cache.set(i, i, 60)
    assert (len(cache), cache.evictions) == (1024, 4)


def test_ttl_lru_cache_order_survives_churn() -> None:
    # Long enough for the dict to be repacked several times: recency order,
    # bound, and values stay right throughout.
    cache: TtlLruCache[str, int] = TtlLruCache(100, clock=FakeClock())
    for i in range(2000):
        cache.set(f"k{i}", i, 60)
        assert cache.get(f"k{i - 50}") in (None, i - 50)
        assert len(cache) <= 100
    live = [i for i in range(2000) if cache.get(f"k{i}") is not None]
    assert len(live) == 100
    assert cache.evictions == 1900
    assert all(cache.get(f"k{i}") == i for i in live)


@pytest.mark.parametrize(
    ("qtype", "records", "ttl"),
    [
        pytest.param("A", ("192.0.2.1", "192.0.2.2"), 300, id="a"),
        pytest.param("AAAA", ("2001:db8::1",), 86400, id="aaaa"),
        pytest.param("MX", ((10, "mx1.example.com"), (20, "mx2.example.com")), 60, id="mx"),
        pytest.param("PTR", ("mail.example.com",), 3600, id="ptr"),
        pytest.param("TXT", ((b"v=spf1 -all",), (b"site-verification=x",)), 120, id="txt"),
        pytest.param("TXT", ((b"v=spf1 ip4:192.0.2.0/24", b" -all"),), 120, id="txt-chunks"),
        pytest.param("TXT", ((b"\xff\x00 binary",),), 120, id="txt-binary"),
        pytest.param("TXT", (), 300.0, id="negative"),
        pytest.param("A", ("192.0.2.1",), 0.5, id="float-ttl"),
        pytest.param("PTR", ("caf\u00e9.example", "bad\udcffname"), 30, id="non-ascii"),
    ],
)
def test_dns_cache_gives_back_what_it_stored(qtype: str, records: tuple, ttl: float) -> None:
    clock = FakeClock()
    cache = DnsCache(10, clock=clock)
    answer = DnsAnswer(records, ttl)
    cache.set(("name with space.example", qtype), answer, 10)
    found = cache.get(("name with space.example", qtype))
    assert found == answer
    assert type(found.ttl) is type(ttl)
    assert [type(r) for r in found.records] == [type(r) for r in records]
    assert found.negative is answer.negative
    assert cache.remaining_ttl(("name with space.example", qtype)) == 10
    assert cache.get(("name with space.example", "TXT" if qtype != "TXT" else "A")) is None
    clock.now += 10
    assert cache.get(("name with space.example", qtype)) is None
    assert cache.expirations == 1


def test_dns_cache_entry_size() -> None:
    # The memory target (issue 6): 100,000 cached answers within 80 MB of
    # process. An entry holding a ~60-byte SPF record costs ~210 B of Python
    # objects (key, packed value, dict slot); as tuples, a float and a
    # DnsAnswer in an OrderedDict it was ~450 B.
    count = 20_000
    cache = DnsCache(count, clock=FakeClock())
    names = [f"d{i:06d}.example.com" for i in range(count)]
    record = b"v=spf1 ip4:192.0.2.0/24 include:_spf.example.net ~all "
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i, name in enumerate(names):
            cache.set((name, "TXT"), DnsAnswer(((record + str(i).encode(),),), 3600), 3600)
        per_entry = (tracemalloc.get_traced_memory()[0] - before) / count
    finally:
        tracemalloc.stop()
    assert len(cache) == count
    assert per_entry < 300


def test_dns_cache_keeps_records_marshal_cannot_write() -> None:
    cache = DnsCache(10, clock=FakeClock())
    answer = DnsAnswer((object(),), 60)
    cache.set(("example.com", "CNAME"), answer, 60)
    assert cache.get(("example.com", "CNAME")) is answer
    assert cache.pop(("example.com", "CNAME")) is answer


def test_dns_cache_keys_do_not_collide() -> None:
    # The slot is "TYPE NAME": a name may hold spaces (macro expansions can
    # produce them), a query type never does.
    cache = DnsCache(10, clock=FakeClock())
    keys = [("a", "A"), ("a", "TXT"), ("A a", "TXT"), ("TXT a", "A"), ("a b", "A")]
    for i, key in enumerate(keys):
        cache.set(key, DnsAnswer((f"192.0.2.{i}",), 60), 60)
    assert len(cache) == len(keys)
    assert [cache.get(key) for key in keys] == [
        DnsAnswer((f"192.0.2.{i}",), 60) for i in range(len(keys))
    ]


# -- against the loopback DNS server ------------------------------------------


async def test_positive_answer_cached_for_its_ttl(zone_server, resolvers) -> None:
    server = await zone_server({"example.com": [{"TXT": "v=spf1 -all", "ttl": 120}]})
    clock = FakeClock()
    resolver = resolvers(server, clock=clock)
    answer = await resolver.resolve("example.com", "TXT")
    assert answer.records == ((b"v=spf1 -all",),)
    assert answer.ttl == 120
    assert resolver.cache.remaining_ttl(("example.com", "TXT")) == 120
    await resolver.resolve("example.com", "TXT")
    assert server.queries == 1
    assert (resolver.stats.hits, resolver.stats.misses) == (1, 1)


async def test_entry_expires_after_ttl(zone_server, resolvers) -> None:
    server = await zone_server({"example.com": [{"TXT": "v=spf1 -all", "ttl": 0}]})
    clock = FakeClock()
    resolver = resolvers(server, clock=clock, min_ttl=30)
    await resolver.resolve("example.com", "TXT")
    clock.now += 29
    await resolver.resolve("example.com", "TXT")
    assert server.queries == 1
    clock.now += 2  # past the 30 s lifetime
    await resolver.resolve("example.com", "TXT")
    assert server.queries == 2
    assert resolver.stats.upstream_queries == 2


async def test_ttl_clamped_to_max(zone_server, resolvers) -> None:
    server = await zone_server({"example.com": [{"A": "192.0.2.1", "ttl": 86400}]})
    resolver = resolvers(server, max_ttl=600)
    answer = await resolver.resolve("example.com", "A")
    assert answer.ttl == 600


async def test_cname_chain_followed_with_shortest_ttl(zone_server, resolvers) -> None:
    server = await zone_server(
        {
            "alias.example.com": [{"CNAME": "mid.example.com", "ttl": 50}],
            "mid.example.com": [{"CNAME": "real.example.com", "ttl": 300}],
            "real.example.com": [{"A": "192.0.2.7", "ttl": 900}],
        }
    )
    answer = await resolvers(server).resolve("alias.example.com", "A")
    assert answer.records == ("192.0.2.7",)
    assert answer.ttl == 50


@pytest.mark.parametrize(
    "name",
    [pytest.param("missing.example.com", id="nxdomain"), pytest.param("example.com", id="nodata")],
)
async def test_negative_answers_cached(zone_server, resolvers, name: str) -> None:
    server = await zone_server(
        {"example.com": [{"A": "192.0.2.1", "ttl": 0}]}, soa_in_negative=False
    )
    clock = FakeClock()
    resolver = resolvers(server, clock=clock, negative_ttl=45)
    first = await resolver.resolve(name, "TXT")
    assert first.negative and first.records == ()
    await resolver.resolve(name, "TXT")
    assert server.queries == 1
    clock.now += 46
    await resolver.resolve(name, "TXT")
    assert server.queries == 2


async def test_cares_query_cache_is_off(zone_server, resolvers) -> None:
    # A negative answer with an SOA (minimum 300 s) and a 1 s record: c-ares
    # would answer both from its own cache; only spfpolicy's may.
    server = await zone_server({"example.com": [{"A": "192.0.2.1", "ttl": 1}]})
    clock = FakeClock()
    resolver = resolvers(server, clock=clock, negative_ttl=5)
    for _ in range(3):
        await resolver.resolve("missing.example.com", "TXT")
        await resolver.resolve("example.com", "A")
        clock.now += 10
    assert server.counts[("missing.example.com", "TXT")] == 3
    assert server.counts[("example.com", "A")] == 3


async def test_lru_bound_evicts_least_recently_used(zone_server, resolvers) -> None:
    zone = {f"d{i}.example.com": [{"TXT": f"v=spf1 -all {i}", "ttl": 0}] for i in range(5)}
    server = await zone_server(zone)
    resolver = resolvers(server, cache_size=3, min_ttl=300)
    for i in range(5):
        await resolver.resolve(f"d{i}.example.com", "TXT")
    assert len(resolver.cache) == 3
    assert resolver.cache.evictions == 2
    # d3 and d4 are still cached; d0 was evicted and must be asked again.
    await resolver.resolve("d4.example.com", "TXT")
    assert server.queries == 5
    await resolver.resolve("d0.example.com", "TXT")
    assert server.queries == 6


async def test_single_flight_for_concurrent_evaluations(zone_server, resolvers) -> None:
    server = await zone_server(
        {"cold.example.com": [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}]}, delay=0.2
    )
    resolver = resolvers(server, timeout=2.0)
    evaluator = SpfEvaluator(resolver)
    outcomes = await asyncio.gather(
        *(
            evaluator.check("192.0.2.9", "user@cold.example.com", "mx.example.org")
            for _ in range(100)
        )
    )
    assert {o.result for o in outcomes} == {SpfResult.PASS}
    assert server.counts[("cold.example.com", "TXT")] == 1
    assert resolver.stats.upstream_queries == 1
    # 99 evaluations joined the first one's query (the prefetch walk too,
    # which the counters do not count as a read).
    assert resolver.stats.shared_waits == 99
    assert evaluator.prefetcher is not None and evaluator.prefetcher.walks == 1
    assert resolver.in_flight == 0


@pytest.mark.parametrize("fault", ["servfail", "refused", "timeout"])
async def test_temporary_errors_are_not_cached(zone_server, resolvers, fault: str) -> None:
    server = await zone_server({"flaky.example.com": [{"TXT": "v=spf1 -all", "ttl": 0}]})
    server.faults["flaky.example.com"] = fault
    resolver = resolvers(server, timeout=0.3, min_ttl=300)
    with pytest.raises(DnsTempError):
        await resolver.resolve("flaky.example.com", "TXT")
    assert resolver.stats.upstream_failures == 1
    assert len(resolver.cache) == 0
    del server.faults["flaky.example.com"]
    answer = await resolver.resolve("flaky.example.com", "TXT")
    assert answer.records == ((b"v=spf1 -all",),)


async def test_servfail_is_temperror(zone_server, resolvers) -> None:
    server = await zone_server({"example.com": [{"TXT": "v=spf1 -all"}]})
    server.faults["example.com"] = "servfail"
    outcome = await SpfEvaluator(resolvers(server)).check("192.0.2.1", "a@example.com", "h.test")
    assert outcome.result == SpfResult.TEMPERROR
    assert outcome.explanation == "SPF Temporary Error: DNS SERVFAIL"


async def test_truncated_udp_answer_retried_over_tcp(zone_server, resolvers) -> None:
    # 700 bytes: over the 512-byte limit of a UDP answer without EDNS
    # (RFC 1035 section 4.2.1); the server is told to truncate at 512.
    record = "v=spf1 " + " ".join(f"ip4:198.51.100.{i}" for i in range(1, 40)) + " -all"
    assert len(record) > 512
    server = await zone_server({"big.example.com": [{"TXT": record}]}, udp_limit=512)
    resolver = resolvers(server)
    evaluator = SpfEvaluator(resolver)
    outcome = await evaluator.check("198.51.100.39", "x@big.example.com", "h.example.com")
    assert outcome.result == SpfResult.PASS
    assert server.tcp_queries >= 1


async def test_a_label_names_resolve(zone_server, resolvers) -> None:
    server = await zone_server({"xn--bcher-kva.example": [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}]})
    outcome = await SpfEvaluator(resolvers(server)).check(
        "192.0.2.3", "info@xn--bcher-kva.example", "mx.example.org"
    )
    assert outcome.result == SpfResult.PASS


async def test_deadline_gives_temperror_promptly(zone_server, resolvers) -> None:
    # A server that never answers, and c-ares retrying for far longer than
    # the evaluation may take: the deadline must cut it short.
    server = await zone_server({"slow.example.com": [{"TXT": "v=spf1 -all"}]})
    server.default_fault = "timeout"
    resolver = resolvers(server, timeout=30.0, tries=3)
    evaluator = SpfEvaluator(resolver, lookup_time=1.0)
    started = time.monotonic()
    outcome = await evaluator.check("192.0.2.1", "a@slow.example.com", "h.example.com")
    elapsed = time.monotonic() - started
    assert outcome.result == SpfResult.TEMPERROR
    assert outcome.explanation == "SPF Temporary Error: DNS Timeout"
    assert elapsed < 1.0 + 0.5
    assert evaluator.in_flight == 0


async def test_deadline_mid_evaluation_after_partial_answers(zone_server, resolvers) -> None:
    server = await zone_server(
        {
            "example.com": [{"TXT": "v=spf1 include:slow.example.net -all"}],
            "slow.example.net": [{"TXT": "v=spf1 -all"}],
        }
    )
    server.faults["slow.example.net"] = "timeout"
    evaluator = SpfEvaluator(resolvers(server, timeout=30.0), lookup_time=0.8)
    outcome = await evaluator.check("192.0.2.1", "a@example.com", "h.example.com")
    assert outcome.result == SpfResult.TEMPERROR
    assert outcome.lookups == 2


async def test_cancelled_evaluation_leaves_nothing_suspended(zone_server, resolvers) -> None:
    server = await zone_server({"hang.example.com": [{"TXT": "v=spf1 -all"}]})
    server.default_fault = "timeout"
    evaluator = SpfEvaluator(resolvers(server, timeout=30.0), lookup_time=30.0)
    task = asyncio.ensure_future(evaluator.check("192.0.2.1", "a@hang.example.com", "h"))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert evaluator.in_flight == 0


async def test_evaluations_reuse_their_greenlets(zone_server, resolvers) -> None:
    # Each evaluation waits for lookups in a runner greenlet; a finished
    # runner serves the next evaluation, and keeps none of it alive.
    server = await zone_server(_NOW_ZONE)
    evaluator = SpfEvaluator(resolvers(server))
    made = []
    make_query = evaluator._query

    def watched(*args: Any, **kwargs: Any) -> Any:
        query = make_query(*args, **kwargs)
        made.append(weakref.ref(query))
        return query

    evaluator._query = watched  # type: ignore[method-assign]
    for ip, sender, helo in _NOW_CHECKS:
        waited = await evaluator.check(ip, sender, helo)
        await asyncio.sleep(0.05)  # the lookups' answers reach the cache
        reference = SpfEvaluator(evaluator.resolver).check_now(ip, sender, helo)
        assert reference is not None  # the check cached every answer it used
        assert dataclasses.replace(waited, elapsed=0.0, ttl=None) == dataclasses.replace(
            reference, elapsed=0.0, ttl=None
        )
        assert len(evaluator._runners) == 1  # the same runner each time
    gc.collect()
    assert made and all(ref() is None for ref in made)


async def test_a_runner_cut_short_serves_the_next_evaluation(zone_server, resolvers) -> None:
    server = await zone_server(
        {
            "hang.example.com": [{"TXT": "v=spf1 include:hang.example.net -all"}],
            "hang.example.net": [{"TXT": "v=spf1 -all"}],
            "ok.example.com": [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}],
        }
    )
    server.faults["hang.example.net"] = "timeout"
    evaluator = SpfEvaluator(resolvers(server, timeout=30.0), lookup_time=30.0)
    task = asyncio.ensure_future(evaluator.check("192.0.2.1", "a@hang.example.com", "h"))
    await asyncio.sleep(0.2)  # suspended in the include's lookup
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(evaluator._runners) == 1  # finished by _abandon, and kept
    outcome = await evaluator.check("192.0.2.1", "a@ok.example.com", "h")
    assert outcome.result == SpfResult.PASS and outcome.mechanism == "ip4:192.0.2.0/24"
    assert len(evaluator._runners) == 1


async def test_pyspf_failing_in_a_runner_is_a_temperror_and_the_runner_goes_on(
    zone_server, resolvers, monkeypatch, caplog
) -> None:
    server = await zone_server(_NOW_ZONE)
    evaluator = SpfEvaluator(resolvers(server))
    check1 = spf.query.check1

    def failing(self: Any, record: Any, domain: str, recursion: int) -> Any:
        if domain == "_spf.example.net":
            raise RuntimeError("a pyspf bug")
        return check1(self, record, domain, recursion)

    monkeypatch.setattr(spf.query, "check1", failing)
    outcome = await evaluator.check("192.0.2.5", "a@example.com", "h")
    assert outcome.result == SpfResult.TEMPERROR
    assert outcome.explanation == "SPF Temporary Error: internal error"
    assert "a pyspf bug" in caplog.text  # logged with its traceback
    monkeypatch.setattr(spf.query, "check1", check1)
    assert len(evaluator._runners) == 1
    outcome = await evaluator.check("192.0.2.5", "a@example.com", "h")
    assert outcome.result == SpfResult.PASS


async def test_idle_runners_are_bounded(zone_server, resolvers) -> None:
    server = await zone_server({f"d{i}.example": [{"TXT": "v=spf1 a -all"}] for i in range(80)})
    evaluator = SpfEvaluator(resolvers(server))
    outcomes = await asyncio.gather(
        *(evaluator.check("192.0.2.1", f"a@d{i}.example", "h") for i in range(80))
    )
    assert {o.result for o in outcomes} == {SpfResult.FAIL}
    assert len(evaluator._runners) == _Runners.MAX_IDLE < 80


async def test_void_limit_is_configurable(zone_server, resolvers) -> None:
    server = await zone_server(
        {"example.com": [{"TXT": "v=spf1 a:n1.example.com a:n2.example.com a:n3.example.com ?all"}]}
    )
    resolver = resolvers(server)
    default = await SpfEvaluator(resolver).check("192.0.2.1", "a@example.com", "h")
    assert default.result == SpfResult.PERMERROR
    assert "Void lookup limit of 2 exceeded" in default.explanation
    relaxed = await SpfEvaluator(resolver, void_limit=3).check("192.0.2.1", "a@example.com", "h")
    assert relaxed.result == SpfResult.NEUTRAL


async def test_outcome_reports_mechanism_and_min_ttl(zone_server, resolvers) -> None:
    server = await zone_server(
        {
            "example.com": [{"TXT": "v=spf1 include:_spf.example.net -all", "ttl": 3600}],
            "_spf.example.net": [{"TXT": "v=spf1 ip4:192.0.2.0/24 ~all", "ttl": 120}],
        }
    )
    clock = FakeClock()  # the ttl is the time left: none passes here
    evaluator = SpfEvaluator(resolvers(server, clock=clock), clock=clock)
    outcome = await evaluator.check("192.0.2.5", "u@example.com", "h")
    assert outcome.result == SpfResult.PASS
    assert outcome.mechanism == "include:_spf.example.net"
    assert outcome.ttl == 120
    assert outcome.lookups == 2
    assert outcome.record == "v=spf1 include:_spf.example.net -all"


async def test_result_cache_keeps_what_decisions_read(zone_server, resolvers) -> None:
    server = await zone_server(
        {
            "example.com": [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}],
            "nomail.example": [{"TXT": "v=spf1 -all"}],
        }
    )
    checks = DnsChecks(
        SpfEvaluator(resolvers(server)), void_limit=2, result_cache_size=10, result_cache_ttl=60
    )
    first = await checks.spf("192.0.2.5", "u@example.com", "h", lookup_time=5)
    assert first.result == SpfResult.PASS and first.mechanism == "ip4:192.0.2.0/24"
    assert (first.record, first.sender, first.domain) == ("", "", "")  # not kept
    assert await checks.spf("192.0.2.5", "u@example.com", "h", lookup_time=5) is first
    nomail = await checks.spf("192.0.2.5", "u@nomail.example", "h", lookup_time=5)
    assert nomail.result == SpfResult.FAIL and nomail.record == "v=spf1 -all"


async def test_result_cache_shares_equal_outcomes(zone_server, resolvers) -> None:
    server = await zone_server({"example.com": [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}]})
    checks = DnsChecks(
        SpfEvaluator(resolvers(server)), void_limit=2, result_cache_size=10, result_cache_ttl=60
    )
    one = await checks.spf("192.0.2.5", "u@example.com", "h1", lookup_time=5)
    other = await checks.spf("192.0.2.6", "v@example.com", "h2", lookup_time=5)
    assert one is other  # one object for two cache entries
    assert (one.lookups, one.ttl) == (0, None)  # per-evaluation figures are not kept
    failed = await checks.spf("198.51.100.1", "u@example.com", "h1", lookup_time=5)
    assert failed.result == SpfResult.FAIL and failed is not one


def test_result_cache_keys_of_different_checks_differ() -> None:
    key = DnsChecks._key
    assert key("192.0.2.1", "u@example.com", "H.example", 2) == key(
        "192.0.2.1", "u@example.com", "h.example", 2
    )
    # A Per_User Void_Limit makes another check.
    assert key("192.0.2.1", "u@example.com", "h", 2) != key("192.0.2.1", "u@example.com", "h", 5)
    # NUL, the string key's separator, cannot make two checks share a key.
    assert key("a\0b", "c", "d", 2) != key("a", "b\0c", "d", 2)
    assert key("a", "b", "c", 2) != key("a", "b", "c\x002", 2)


# -- how c-ares is driven ----------------------------------------------------


async def test_cares_runs_on_the_event_loop(zone_server, resolvers) -> None:
    server = await zone_server({"example.com": [{"A": "192.0.2.1"}]})
    resolver = resolvers(server)
    assert (await resolver.resolve("example.com", "A")).records == ("192.0.2.1",)
    # No c-ares event thread: the loop watches its sockets (see cares.LoopResolver).
    assert resolver._channel is not None and resolver._channel._event_thread is False


async def test_renew_keeps_given_nameservers(zone_server, resolvers) -> None:
    server = await zone_server({"example.com": [{"A": "192.0.2.1"}]})
    resolver = resolvers(server)
    await resolver.resolve("example.com", "A")
    channel = resolver._channel
    resolver.renew()
    assert resolver._channel is channel


async def test_renew_lets_queries_already_sent_finish(zone_server, resolvers) -> None:
    server = await zone_server({"slow.example": [{"A": "192.0.2.7"}]}, delay=0.3)
    resolver = resolvers(server, timeout=2.0)
    pending = asyncio.ensure_future(resolver.resolve("slow.example", "A"))
    await asyncio.sleep(0.05)  # the query is out, on the first channel
    old = resolver._channel
    assert old is not None
    # As if Nameservers were empty: renew() then drops the channel so the next
    # lookup reads /etc/resolv.conf again (no lookup is made here, so none
    # leaves the machine).
    resolver.nameservers = []
    resolver.renew()
    assert resolver._channel is None
    assert (await pending).records == ("192.0.2.7",)  # answered on the old channel
    await resolver.close()  # closes the retired channel too, without waiting
    assert old._closed


# -- evaluating from cached answers alone (check_now) --------------------------

_NOW_ZONE = {
    "example.com": [{"TXT": "v=spf1 include:_spf.example.net a mx -all"}, {"A": "192.0.2.80"}],
    "_spf.example.net": [{"TXT": "v=spf1 ip4:192.0.2.0/28 ip6:2001:db8::/64 ~all"}],
    "redir.example": [{"TXT": "v=spf1 redirect=example.com"}],
    "exp.example": [{"TXT": "v=spf1 -all exp=why.exp.example"}],
    "why.exp.example": [{"TXT": "%{i} is not one of %{d}'s senders"}],
    "void.example": [{"TXT": "v=spf1 a:n1.void.example a:n2.void.example a:n3.void.example ?all"}],
    "none.example": [{"TXT": "just text"}],
    "helo.example": [{"TXT": "v=spf1 ip4:192.0.2.80 -all"}],
}
_NOW_CHECKS = [
    ("192.0.2.5", "a@example.com", "h"),  # pass through the include
    ("192.0.2.80", "a@example.com", "h"),  # pass by a
    ("198.51.100.7", "a@example.com", "h"),  # fail after every term
    ("2001:db8::9", "a@redir.example", "h"),  # redirect, then the include's ip6
    ("198.51.100.7", "a@exp.example", "h"),  # fail with an exp= text
    ("198.51.100.7", "a@void.example", "h"),  # permerror: void lookups
    ("198.51.100.7", "a@none.example", "h"),  # none
    ("192.0.2.80", "", "helo.example"),  # the HELO identity
]


@pytest.mark.parametrize(("ip", "sender", "helo"), _NOW_CHECKS)
async def test_check_now_gives_what_check_gives(zone_server, resolvers, ip, sender, helo) -> None:
    server = await zone_server(_NOW_ZONE)
    clock = FakeClock()  # both at one time: the same time left (ttl) too
    evaluator = SpfEvaluator(resolvers(server, clock=clock), clock=clock)
    waited = await evaluator.check(ip, sender, helo)
    await asyncio.sleep(0.05)  # the lookups' answers reach the cache
    queries = server.queries
    now = evaluator.check_now(ip, sender, helo)
    assert now is not None
    assert dataclasses.replace(now, elapsed=0.0) == dataclasses.replace(waited, elapsed=0.0)
    assert server.queries == queries  # from the cache alone


async def test_check_now_stops_at_the_first_lookup_not_cached(zone_server, resolvers) -> None:
    server = await zone_server(_NOW_ZONE)
    resolver = resolvers(server)
    evaluator = SpfEvaluator(resolver)
    assert evaluator.check_now("192.0.2.5", "a@example.com", "h") is None
    await resolver.resolve("example.com", "TXT")  # the top record only
    assert evaluator.check_now("192.0.2.5", "a@example.com", "h") is None
    assert server.queries == 1 and evaluator.in_flight == 0


async def test_check_now_gives_nothing_when_a_swallowed_lookup_was_missing(
    zone_server, resolvers
) -> None:
    # pyspf fetches the exp= text inside a bare "except:", so the missing
    # answer's TempError never reaches check_now: the fail it returns has
    # the default explanation, not the domain's. That verdict must be
    # dropped, and check() must then give the domain's own text.
    server = await zone_server(_NOW_ZONE)
    resolver = resolvers(server)
    evaluator = SpfEvaluator(resolver)
    await resolver.resolve("exp.example", "TXT")  # the record, not its exp= text
    assert evaluator.check_now("198.51.100.7", "a@exp.example", "h") is None
    waited = await evaluator.check("198.51.100.7", "a@exp.example", "h")
    assert waited.result is SpfResult.FAIL
    assert waited.explanation == "198.51.100.7 is not one of exp.example's senders"
    now = evaluator.check_now("198.51.100.7", "a@exp.example", "h")
    assert now is not None and now.explanation == waited.explanation


async def test_result_cache_fills_from_cached_dns_without_waiting(zone_server, resolvers) -> None:
    server = await zone_server(_NOW_ZONE)
    checks = DnsChecks(
        SpfEvaluator(resolvers(server)), void_limit=2, result_cache_size=10, result_cache_ttl=60
    )
    # Not even the domain's record is cached: nothing is started.
    assert checks.cached_spf("192.0.2.5", "a@example.com", "h") is None
    assert checks.evaluated_now == 0 and server.queries == 0
    first = await checks.spf("192.0.2.5", "a@example.com", "h", lookup_time=5)
    await asyncio.sleep(0.05)
    other = checks.cached_spf("192.0.2.6", "b@example.com", "h")  # a new check, cached DNS
    assert other is first and checks.evaluated_now == 1
    assert checks.cached_spf("192.0.2.6", "b@example.com", "h") is other
    assert checks.result_hits == 1


async def test_cname_chain_the_upstream_leaves_unresolved_is_followed(
    zone_server, resolvers
) -> None:
    # The zone server follows at most 10 links in one reply: the resolver
    # asks again from where that reply's chain ends (a second query, sent
    # from the first reply's callback on the task-free path).
    links = 14
    zone: dict[str, list[dict[str, object]]] = {
        f"c{i}.example.com": [{"CNAME": f"c{i + 1}.example.com", "ttl": 300 - i}]
        for i in range(links)
    }
    zone[f"c{links}.example.com"] = [{"A": "192.0.2.9", "ttl": 900}]
    server = await zone_server(zone)
    answer = await resolvers(server).resolve("c0.example.com", "A")
    assert answer.records == ("192.0.2.9",)
    assert answer.ttl == 300 - (links - 1)
    assert server.queries == 2
