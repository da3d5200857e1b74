"""checks.py: DnsChecks against the loopback DNS server (real UDP, real
c-ares), with a fake clock for the result cache where time matters.

The result cache: its key includes the void limit a check ran with, a
temperror is never kept, an entry lives no longer than Result_Cache_TTL nor
the shortest DNS TTL behind it, and ``cached_spf`` works a new check out of
cached DNS answers without waiting. Whitelist lookups: forward-confirmed PTR
names (RFC 7208 5.5), at most 10 of them, and A/AAAA addresses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from fakeclock import FakeClock
from spfpolicy.checks import MAX_PTR_NAMES, DnsChecks
from spfpolicy.evaluator import SpfEvaluator
from spfpolicy.resolver import Resolver
from spfpolicy.results import SpfOutcome, SpfResult

# Three void lookups before the ip4 term (RFC 7208 4.6.4): a permerror with a
# void limit of 2, a pass from 3 on.
VOIDS = "a:n1.void.example a:n2.void.example a:n3.void.example"

ZONE: dict[str, Any] = {
    "void.example": [{"TXT": f"v=spf1 {VOIDS} ip4:192.0.2.0/24 -all"}],
    "pass.example": [{"TXT": "v=spf1 ip4:192.0.2.0/28 include:inc.example -all"}],
    "inc.example": [{"TXT": "v=spf1 ip4:198.51.100.0/24 -all"}],
    "short.example": [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all", "ttl": 20}],
    "broken.example": ["servfail"],
    # Whitelist lookups.
    "7.2.0.192.in-addr.arpa": [
        {"PTR": "good.example."},
        {"PTR": "forged.example."},
        {"PTR": "gone.example."},
    ],
    "good.example": [{"A": "192.0.2.7"}, {"AAAA": "2001:db8::7"}],
    "forged.example": [{"A": "192.0.2.99"}],
    "7.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa": [
        {"PTR": "good.example."}
    ],
    "8.2.0.192.in-addr.arpa": [{"PTR": f"h{n}.many.example."} for n in range(12)],
    **{f"h{n}.many.example": [{"A": "192.0.2.8"}] for n in range(12)},
    "9.2.0.192.in-addr.arpa": ["timeout"],
}

MakeChecks = Callable[..., DnsChecks]


@pytest.fixture
async def make_checks(zone_server: Any) -> AsyncIterator[tuple[Any, MakeChecks]]:
    """The zone server, and ``make(**DnsChecks_kwargs)`` over a fresh resolver."""
    server = await zone_server(ZONE)
    resolvers: list[Resolver] = []

    def make(**kwargs: Any) -> DnsChecks:
        # One clock for the resolver, the evaluator and the result cache: an
        # outcome's TTL is the time left on its answers, by the resolver's clock.
        clock = kwargs.setdefault("clock", time.monotonic)
        resolver = Resolver([server.nameserver], timeout=0.5, tries=1, clock=clock)
        resolvers.append(resolver)
        kwargs.setdefault("void_limit", 2)
        kwargs.setdefault("result_cache_size", 100)
        kwargs.setdefault("result_cache_ttl", 60)
        return DnsChecks(SpfEvaluator(resolver, clock=clock), **kwargs)

    yield server, make
    for resolver in resolvers:
        await resolver.close()


# ------------------------------------------------------------ the result cache


async def test_result_cache_key_includes_the_void_limit(make_checks: Any) -> None:
    server, make = make_checks
    checks = make()
    ip, sender = "192.0.2.1", "a@void.example"
    strict = await checks.spf(ip, sender, "h.example", lookup_time=5, void_limit=2)
    loose = await checks.spf(ip, sender, "h.example", lookup_time=5, void_limit=3)
    assert (strict.result, loose.result) == (SpfResult.PERMERROR, SpfResult.PASS)
    # Each limit has its own entry: asked again, each gets its own answer.
    queries = server.queries
    assert checks.cached_spf(ip, sender, "h.example", void_limit=2) is strict
    assert checks.cached_spf(ip, sender, "h.example", void_limit=3) is loose
    assert await checks.spf(ip, sender, "h.example", lookup_time=5, void_limit=2) is strict
    assert checks.result_hits == 3 and server.queries == queries
    # A check that names no limit runs with the global Void_Limit (2 here).
    assert checks.cached_spf(ip, sender, "h.example") is strict


async def test_temperror_is_not_cached(make_checks: Any) -> None:
    server, make = make_checks
    checks = make()
    first = await checks.spf("192.0.2.1", "a@broken.example", "h", lookup_time=5)
    assert first.result is SpfResult.TEMPERROR
    assert len(checks.results) == 0
    assert checks.cached_lifetime("192.0.2.1", "a@broken.example", "h", first) == 0.0
    asked = server.counts[("broken.example", "TXT")]
    again = await checks.spf("192.0.2.1", "a@broken.example", "h", lookup_time=5)
    assert again.result is SpfResult.TEMPERROR
    assert server.counts[("broken.example", "TXT")] > asked  # asked the DNS again
    assert checks.result_hits == 0


async def test_an_entry_lives_no_longer_than_result_cache_ttl(make_checks: Any) -> None:
    _, make = make_checks
    clock = FakeClock()
    checks = make(result_cache_ttl=60, clock=clock)
    outcome = await checks.spf("192.0.2.1", "a@pass.example", "h", lookup_time=5)
    assert outcome.result is SpfResult.PASS  # the zone's TTL is 300 s
    assert checks.cached_lifetime("192.0.2.1", "a@pass.example", "h", outcome) == 60
    clock.now += 59
    assert checks.cached_lifetime("192.0.2.1", "a@pass.example", "h", outcome) == 1
    clock.now += 1
    assert checks.cached_lifetime("192.0.2.1", "a@pass.example", "h", outcome) == 0.0
    assert len(checks.results) == 0  # the expired entry is gone


async def test_an_entry_lives_no_longer_than_its_dns_ttl(make_checks: Any) -> None:
    _, make = make_checks
    checks = make(result_cache_ttl=60, clock=FakeClock())
    outcome = await checks.spf("192.0.2.1", "a@short.example", "h", lookup_time=5)
    assert outcome.result is SpfResult.PASS
    assert checks.cached_lifetime("192.0.2.1", "a@short.example", "h", outcome) == 20


async def test_result_cache_ttl_zero_keeps_nothing(make_checks: Any) -> None:
    _, make = make_checks
    checks = make(result_cache_ttl=0)
    outcome = await checks.spf("192.0.2.1", "a@pass.example", "h", lookup_time=5)
    assert outcome.result is SpfResult.PASS and len(checks.results) == 0
    assert checks.cached_lifetime("192.0.2.1", "a@pass.example", "h", outcome) == 0.0


async def test_cached_lifetime_is_for_the_cached_outcome_only(make_checks: Any) -> None:
    _, make = make_checks
    checks = make(clock=FakeClock())
    outcome = await checks.spf("192.0.2.1", "a@void.example", "h", lookup_time=5, void_limit=3)
    other = await checks.spf("192.0.2.1", "a@void.example", "h", lookup_time=5, void_limit=2)
    assert checks.cached_lifetime("192.0.2.1", "a@void.example", "h", outcome, void_limit=3) > 0
    # Not the outcome this check's entry holds, or no entry at all: 0.
    assert checks.cached_lifetime("192.0.2.1", "a@void.example", "h", other, void_limit=3) == 0
    assert checks.cached_lifetime("192.0.2.2", "a@void.example", "h", outcome, void_limit=3) == 0


async def test_cached_spf_evaluates_from_cached_dns(make_checks: Any) -> None:
    server, make = make_checks
    checks = make()
    # Nothing cached: nothing to evaluate, and nothing asked.
    assert checks.cached_spf("192.0.2.1", "a@pass.example", "h") is None
    assert server.queries == 0 and checks.evaluated_now == 0
    first = await checks.spf("192.0.2.1", "a@pass.example", "h", lookup_time=5)
    assert first.result is SpfResult.PASS  # ip4 matched: inc.example not looked up
    queries = server.queries
    # Another client of the same domain, decided by the cached TXT record alone.
    second = checks.cached_spf("192.0.2.2", "b@pass.example", "h")
    assert second is not None and second.result is SpfResult.PASS
    assert checks.evaluated_now == 1 and server.queries == queries
    assert checks.cached_spf("192.0.2.2", "b@pass.example", "h") is second  # now kept
    # A client the include would decide: its record is not cached, no answer now.
    assert checks.cached_spf("198.51.100.1", "c@pass.example", "h") is None
    assert checks.evaluated_now == 1
    third = await checks.spf("198.51.100.1", "c@pass.example", "h", lookup_time=5)
    assert third.result is SpfResult.PASS
    # Both records are cached now: a failing client is worked out at once.
    failed = checks.cached_spf("203.0.113.1", "d@pass.example", "h")
    assert failed is not None and failed.result is SpfResult.FAIL


# ------------------------------------------------- one evaluation per check in flight


def _counting(checks: DnsChecks) -> list[tuple[str, str, str]]:
    """The evaluations ``checks`` starts (pyspf's, waiting for DNS), as they start."""
    started: list[tuple[str, str, str]] = []
    check = checks.evaluator.check

    async def counted(ip: str, sender: str, helo: str, **kwargs: Any) -> Any:
        started.append((ip, sender, helo))
        return await check(ip, sender, helo, **kwargs)

    checks.evaluator.check = counted  # type: ignore[method-assign]
    return started


def _facts(outcome: Any) -> tuple[Any, ...]:
    return (outcome.result, outcome.mechanism, outcome.explanation)


@pytest.mark.parametrize(
    ("sender", "void_limit", "expected"),
    [
        pytest.param("a@pass.example", 2, SpfResult.PASS, id="pass"),
        pytest.param("a@void.example", 2, SpfResult.PERMERROR, id="permerror"),
        pytest.param("a@broken.example", 2, SpfResult.TEMPERROR, id="temperror-not-cached"),
    ],
)
async def test_concurrent_identical_checks_share_one_evaluation(
    make_checks: Any, sender: str, void_limit: int, expected: SpfResult
) -> None:
    _, make = make_checks
    checks = make()
    started = _counting(checks)
    ip = "192.0.2.1"
    asked = [
        checks.spf(ip, sender, "h.example", lookup_time=5, void_limit=void_limit) for _ in range(6)
    ]
    outcomes = await asyncio.gather(*asked)
    assert started == [(ip, sender, "h.example")] and checks.joined == 5
    # The same outcome a check evaluated on its own gets (another DnsChecks,
    # another resolver: nothing shared with the concurrent ones).
    alone = await make().spf(ip, sender, "h.example", lookup_time=5, void_limit=void_limit)
    assert alone.result is expected
    assert all(_facts(outcome) == _facts(alone) for outcome in outcomes)
    assert not checks._flights  # nothing left behind


async def test_checks_that_differ_are_not_shared(make_checks: Any) -> None:
    _, make = make_checks
    checks = make()
    started = _counting(checks)
    ip, sender = "192.0.2.1", "a@void.example"
    strict, loose, other_client, other_time = await asyncio.gather(
        checks.spf(ip, sender, "h", lookup_time=5, void_limit=2),
        checks.spf(ip, sender, "h", lookup_time=5, void_limit=3),
        checks.spf("192.0.2.2", sender, "h", lookup_time=5, void_limit=2),
        checks.spf(ip, sender, "h", lookup_time=4, void_limit=2),
    )
    assert len(started) == 4
    assert (strict.result, loose.result) == (SpfResult.PERMERROR, SpfResult.PASS)
    assert other_client.result is SpfResult.PERMERROR and other_time.result is SpfResult.PERMERROR


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("never happened")


@pytest.fixture
async def slow_checks(zone_server: Any) -> AsyncIterator[tuple[DnsChecks, list[Any]]]:
    """DnsChecks over the zone answering 50 ms late (so that evaluations
    overlap), and the evaluations it starts (``_counting``)."""
    server = await zone_server(ZONE, delay=0.05)
    resolver = Resolver([server.nameserver], timeout=2, tries=1)
    checks = DnsChecks(
        SpfEvaluator(resolver), void_limit=2, result_cache_size=100, result_cache_ttl=60
    )
    yield checks, _counting(checks)
    await resolver.close()


PASS_CHECK = ("192.0.2.1", "a@pass.example", "h")


async def _evaluating(checks: DnsChecks, started: list[Any]) -> asyncio.Task[Any]:
    """A check whose evaluation has started (``PASS_CHECK``)."""
    first = asyncio.create_task(checks.spf(*PASS_CHECK, lookup_time=5))
    await _until(lambda: len(started) == 1)
    return first


async def test_a_waiting_check_goes_on_when_the_evaluating_request_goes_away(
    slow_checks: tuple[DnsChecks, list[Any]],
) -> None:
    checks, started = slow_checks
    first = await _evaluating(checks, started)
    second = asyncio.create_task(checks.spf(*PASS_CHECK, lookup_time=5))
    third = asyncio.create_task(checks.spf(*PASS_CHECK, lookup_time=5))
    await asyncio.sleep(0.01)
    assert len(started) == 1  # the two wait for the first one's outcome
    first.cancel()  # its request's deadline, say
    outcomes = await asyncio.gather(second, third)
    assert first.cancelled()
    # One of the two took the evaluation over; the other waited for it.
    assert len(started) == 2
    assert [o.result for o in outcomes] == [SpfResult.PASS, SpfResult.PASS]
    assert not checks._flights


async def test_a_waiting_check_cancelled_leaves_the_evaluation_alone(
    slow_checks: tuple[DnsChecks, list[Any]],
) -> None:
    checks, started = slow_checks
    first = await _evaluating(checks, started)
    second = asyncio.create_task(checks.spf(*PASS_CHECK, lookup_time=5))
    await asyncio.sleep(0.01)
    second.cancel()
    outcome = await first
    assert outcome.result is SpfResult.PASS and second.cancelled()
    assert len(started) == 1


async def test_a_failing_evaluation_lets_its_waiters_evaluate(make_checks: Any) -> None:
    _, make = make_checks
    checks = make()
    check = checks.evaluator.check
    calls = 0

    async def failing_once(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(0.01)
            raise RuntimeError("a bug")
        return await check(*args, **kwargs)

    checks.evaluator.check = failing_once
    args = ("192.0.2.1", "a@pass.example", "h")
    answers = await asyncio.gather(
        checks.spf(*args, lookup_time=5), checks.spf(*args, lookup_time=5), return_exceptions=True
    )
    assert isinstance(answers[0], RuntimeError)
    assert isinstance(answers[1], SpfOutcome) and answers[1].result is SpfResult.PASS
    assert calls == 2


# ------------------------------------------------------------ whitelist lookups


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        # forged.example points elsewhere, gone.example nowhere.
        pytest.param("192.0.2.7", ["good.example"], id="ipv4"),
        pytest.param("2001:db8::7", ["good.example"], id="ipv6"),
        pytest.param("::ffff:192.0.2.7", ["good.example"], id="ipv4-mapped"),
        pytest.param("192.0.2.6", [], id="no-ptr"),
        pytest.param("not-an-ip", [], id="invalid"),
        pytest.param("192.0.2.9", [], id="ptr-timeout"),
    ],
)
async def test_confirmed_ptr_names(make_checks: Any, ip: str, expected: list[str]) -> None:
    _, make = make_checks
    names = await make().confirmed_ptr_names(ip, lookup_time=2)
    assert [name.rstrip(".") for name in names] == expected


async def test_confirmed_ptr_names_are_at_most_ten(make_checks: Any) -> None:
    server, make = make_checks
    names = await make().confirmed_ptr_names("192.0.2.8", lookup_time=5)
    assert len(names) == MAX_PTR_NAMES == 10
    forward = sum(n for (name, qtype), n in server.counts.items() if qtype == "A")
    assert forward == MAX_PTR_NAMES  # the names past the tenth are never looked up


@pytest.mark.parametrize(
    ("name", "ipv6", "expected"),
    [
        pytest.param("good.example", False, ["192.0.2.7"], id="a"),
        pytest.param("Good.Example.", False, ["192.0.2.7"], id="case-and-dot"),
        pytest.param("good.example", True, ["2001:db8::7"], id="aaaa"),
        pytest.param("forged.example", True, [], id="no-aaaa"),
        pytest.param("missing.example", False, [], id="nxdomain"),
    ],
)
async def test_addresses(make_checks: Any, name: str, ipv6: bool, expected: list[str]) -> None:
    _, make = make_checks
    assert await make().addresses(name, ipv6=ipv6, lookup_time=5) == expected


def test_outcomes_kept_for_decisions_keep_what_decisions_read() -> None:
    # _for_decisions builds the slim outcome field by field: a field added
    # to SpfOutcome must be sorted there into kept or dropped.
    from spfpolicy.checks import _for_decisions
    from spfpolicy.results import NO_MAIL_RECORD, Identity, SpfOutcome

    kept = {"result", "code", "explanation", "mechanism", "identity", "record"}
    dropped = {"sender", "domain", "lookups", "ttl", "elapsed"}
    assert {f.name for f in dataclasses.fields(SpfOutcome)} == kept | dropped
    full = SpfOutcome(
        SpfResult.FAIL,
        550,
        "not allowed",
        mechanism="-all",
        identity=Identity.HELO,
        sender="postmaster@h.example",
        domain="h.example",
        lookups=3,
        ttl=20.0,
        elapsed=0.01,
        record=NO_MAIL_RECORD,
    )
    slim = _for_decisions(full)
    assert slim == dataclasses.replace(full, sender="", domain="", lookups=0, ttl=None, elapsed=0.0)
    other = _for_decisions(dataclasses.replace(full, record="v=spf1 a -all", sender="x@y"))
    assert other.record == "" and other.sender == ""
    assert _for_decisions(dataclasses.replace(full, lookups=9)) is slim  # one object
