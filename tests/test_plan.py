"""Compiled plans (plan.py): lifetime, bounds, what they are never built
from, the void limit they are keyed by, and that the bench zone's record
kinds go through them. The differential property test against pyspf is
test_plan_differential.py."""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

import pytest

from fakeclock import FakeClock
from spfpolicy.bench.zone import PROVIDER_SOURCES, PROVIDERS, Kind, domain_for
from spfpolicy.checks import DnsChecks
from spfpolicy.evaluator import SpfEvaluator
from spfpolicy.plan import SpfPlans, compile_plan
from spfpolicy.resolver import DnsAnswer
from spfpolicy.results import SpfOutcome, SpfResult


class CacheDns:
    """A DNS cache as plans read it: answers with their expiry on ``clock``;
    a name listed in ``failing`` is not cached (its lookup failed)."""

    def __init__(self, zone: dict[tuple[str, str], list[Any]], clock: FakeClock) -> None:
        self.zone = zone
        self.clock = clock
        self.ttls: dict[tuple[str, str], float] = {}
        self.failing: set[tuple[str, str]] = set()
        self.born = clock.now

    def cached(self, name: str, qtype: str) -> DnsAnswer | None:
        key = (name, qtype)
        if key in self.failing:
            return None
        ttl = self.ttls.get(key, 3600.0)
        expires = self.born + ttl
        if expires <= self.clock.now:
            return None
        return DnsAnswer(tuple(self.zone.get(key, ())), ttl, expires)

    peek = cached


def _txt(text: str) -> list[Any]:
    return [(text.encode(),)]


def _world(zone: dict[tuple[str, str], list[Any]]) -> tuple[CacheDns, SpfEvaluator, SpfPlans]:
    clock = FakeClock()
    dns = CacheDns(zone, clock)
    evaluator = SpfEvaluator(dns, prefetch=False, clock=clock)  # type: ignore[arg-type]
    plans = SpfPlans(dns.peek, clock=clock, compile_after=1)
    return dns, evaluator, plans


def _learn(
    evaluator: SpfEvaluator, plans: SpfPlans, ip: str, sender: str, void_limit: int = 2
) -> SpfOutcome:
    outcome = evaluator.check_now(ip, sender, "helo.test", void_limit=void_limit)
    assert outcome is not None
    plans.learn(ip, sender, "helo.test", void_limit, outcome)
    return outcome


ZONE = {
    ("ex.test", "TXT"): _txt("v=spf1 ip4:192.0.2.0/24 include:prov.test -all"),
    ("prov.test", "TXT"): _txt("v=spf1 ip4:198.51.100.0/24 ~all"),
}


def test_a_plan_answers_a_new_client_as_pyspf_does() -> None:
    _dns, evaluator, plans = _world(ZONE)
    _learn(evaluator, plans, "203.0.113.9", "a@ex.test")
    for ip in ("192.0.2.77", "198.51.100.1", "203.0.113.10", "::ffff:192.0.2.1"):
        planned = plans.outcome(ip, "a@ex.test", "helo.test", 2)
        reference = evaluator.check_now(ip, "a@ex.test", "helo.test", void_limit=2)
        assert planned is not None and reference is not None
        assert (planned.result, planned.mechanism, planned.explanation) == (
            reference.result,
            reference.mechanism,
            reference.explanation,
        )
        assert planned.record == "v=spf1 ip4:192.0.2.0/24 include:prov.test -all"
    assert plans.hits == 4


def test_a_plan_lives_no_longer_than_its_first_answer_to_expire() -> None:
    dns, evaluator, plans = _world(ZONE)
    dns.ttls[("prov.test", "TXT")] = 60.0
    _learn(evaluator, plans, "203.0.113.9", "a@ex.test")
    dns.clock.now += 59.0
    planned = plans.outcome("192.0.2.1", "a@ex.test", "helo.test", 2)
    assert planned is not None
    assert planned.ttl == pytest.approx(1.0)
    dns.clock.now += 1.0  # prov.test's TXT has left the cache
    assert plans.outcome("192.0.2.1", "a@ex.test", "helo.test", 2) is None
    assert len(plans) == 0


def test_no_plan_from_a_tree_with_a_temperror() -> None:
    dns, evaluator, plans = _world(ZONE)
    dns.failing.add(("prov.test", "TXT"))  # SERVFAIL: never cached
    # A client the top record passes does not need prov.test ...
    _learn(evaluator, plans, "192.0.2.1", "a@ex.test")
    # ... but the tree holds a failed lookup: no plan, pyspf decides.
    assert len(plans) == 0
    assert plans.outcome("192.0.2.2", "a@ex.test", "helo.test", 2) is None
    assert compile_plan("ex.test", dns.peek, void_limit=2, v6=False) is None
    # And a temperror outcome never builds one.
    temperror = SpfOutcome(SpfResult.TEMPERROR, 451, "SPF Temporary Error: DNS Timeout")
    dns.failing.clear()
    assert plans.learn("192.0.2.1", "a@ex.test", "helo.test", 2, temperror) is None


def test_a_plan_is_compiled_at_the_second_evaluation() -> None:
    dns, evaluator, _ = _world(ZONE)
    plans = SpfPlans(dns.peek, clock=dns.clock)
    _learn(evaluator, plans, "203.0.113.9", "a@ex.test")
    assert len(plans) == 0  # the long tail's one-off domains cost no compilation
    _learn(evaluator, plans, "203.0.113.10", "a@ex.test")
    assert len(plans) == 1


def test_plans_are_keyed_by_void_limit() -> None:
    zone = {
        ("ex.test", "TXT"): _txt("v=spf1 a:gone1.ex.test a:gone2.ex.test ip4:192.0.2.0/24 -all"),
    }
    _dns, evaluator, plans = _world(zone)
    for limit in (1, 2):
        _learn(evaluator, plans, "203.0.113.9", "a@ex.test", void_limit=limit)
    one = plans.outcome("192.0.2.1", "a@ex.test", "helo.test", 1)
    two = plans.outcome("192.0.2.1", "a@ex.test", "helo.test", 2)
    assert one is not None and two is not None
    assert one.result is SpfResult.PERMERROR
    assert one.explanation == "SPF Permanent Error: Void lookup limit of 1 exceeded"
    assert two.result is SpfResult.PASS
    # A limit no plan was built for is pyspf's.
    assert plans.outcome("192.0.2.1", "a@ex.test", "helo.test", 0) is None


def test_the_store_is_bounded_in_bytes() -> None:
    zone = {(f"d{i}.test", "TXT"): _txt(f"v=spf1 ip4:10.{i}.0.0/16 -all") for i in range(50)}
    _dns, evaluator, plans = _world(zone)
    _learn(evaluator, plans, "192.0.2.1", "a@d0.test")
    one = plans.bytes
    plans.max_bytes = one * 10
    for i in range(50):
        _learn(evaluator, plans, "192.0.2.1", f"a@d{i}.test")
    assert 8 <= len(plans) <= 10  # sizes differ by the record text
    assert plans.bytes <= plans.max_bytes
    # The oldest went first (none was used since it was built).
    assert plans.outcome("10.49.0.1", "a@d49.test", "helo.test", 2) is not None
    assert plans.outcome("10.0.0.1", "a@d0.test", "helo.test", 2) is None


def test_the_plan_used_least_recently_goes_first() -> None:
    # A busy domain's plan stays while the long tail comes and goes.
    zone = {(f"d{i}.test", "TXT"): _txt(f"v=spf1 ip4:10.{i}.0.0/16 -all") for i in range(50)}
    _dns, evaluator, plans = _world(zone)
    _learn(evaluator, plans, "192.0.2.1", "a@d0.test")
    plans.max_bytes = plans.bytes * 10
    for i in range(1, 50):
        _learn(evaluator, plans, "192.0.2.1", f"a@d{i}.test")
        assert plans.outcome("10.0.0.1", "a@d0.test", "helo.test", 2) is not None
    assert plans.bytes <= plans.max_bytes
    assert plans.outcome("10.1.0.1", "a@d1.test", "helo.test", 2) is None
    assert plans.outcome("10.49.0.1", "a@d49.test", "helo.test", 2) is not None


def _slim(outcome: SpfOutcome) -> SpfOutcome:
    # As kept() wants it: nothing of the sender, the domain, lookups, TTL, time.
    return dataclasses.replace(outcome, sender="", domain="", lookups=0, ttl=None, elapsed=0.0)


def test_domains_whose_trees_compile_alike_share_one_shape() -> None:
    # A provider's customers with the same record: one table, counted once,
    # and each domain's outcome still its own (pyspf's, domain and sender).
    zone = {(f"c{i}.test", "TXT"): _txt("v=spf1 include:prov.test -all") for i in range(20)}
    zone[("prov.test", "TXT")] = _txt("v=spf1 ip4:198.51.100.0/24 ip4:203.0.113.0/25 ~all")
    zone[("odd.test", "TXT")] = _txt("v=spf1 include:prov.test ~all")  # another shape
    dns, evaluator, plans = _world(zone)
    _learn(evaluator, plans, "192.0.2.1", "a@c0.test")
    one_plan = plans.bytes
    _learn(evaluator, plans, "192.0.2.1", "a@c1.test")
    per_plan = plans.bytes - one_plan
    assert 0 < per_plan < one_plan / 2
    for i in range(2, 20):
        _learn(evaluator, plans, "192.0.2.1", f"a@c{i}.test")
    _learn(evaluator, plans, "192.0.2.1", "a@odd.test")
    assert plans.counters()["plans"] == 21
    assert plans.counters()["plan_shapes"] == 2
    shape = one_plan - per_plan  # odd.test's is as large: its record is as long
    assert plans.bytes == 2 * shape + 21 * per_plan  # not 21 * (shape + per_plan)
    for i in (0, 7, 19):
        sender = f"someone@c{i}.test"
        for ip in ("198.51.100.9", "203.0.113.200", "192.0.2.77", "::ffff:203.0.113.1"):
            planned = plans.outcome(ip, sender, "helo.test", 2)
            reference = evaluator.check_now(ip, sender, "helo.test", void_limit=2)
            assert planned is not None and reference is not None
            assert (planned.result, planned.mechanism, planned.explanation) == (
                reference.result,
                reference.mechanism,
                reference.explanation,
            )
            assert (planned.domain, planned.sender) == (reference.domain, reference.sender)
    # An outcome kept for the result cache is kept on the shape, once for
    # every domain sharing it, and counted.
    before = plans.bytes
    slim = []
    for i in (0, 1, 2):
        for ip in ("198.51.100.9", "198.51.100.10", "192.0.2.77"):
            kept = plans.kept(ip, f"a@c{i}.test", "helo.test", 2, _slim)
            assert kept is not None
            slim.append(kept[0])
    assert slim[0] is slim[1] is slim[3] is slim[7] and slim[2] is slim[8]  # pass, fail
    grown = plans.bytes - before
    assert grown > 0
    plans.kept("198.51.100.11", "a@c3.test", "helo.test", 2, _slim)
    assert plans.bytes - before == grown  # nothing new to keep
    # A shape goes with the last plan that used it; the bytes with it.
    dns.clock.now += 3601
    for i in range(20):
        assert plans.outcome("198.51.100.9", f"a@c{i}.test", "helo.test", 2) is None
    assert plans.counters()["plan_shapes"] == 1
    assert plans.outcome("198.51.100.9", "a@odd.test", "helo.test", 2) is None
    assert plans.counters()["plans"] == plans.counters()["plan_shapes"] == plans.bytes == 0


@pytest.mark.parametrize(
    "record",
    [
        pytest.param("v=spf1 ptr -all", id="ptr"),
        pytest.param("v=spf1 exists:%{i}.ok.test -all", id="macro"),
        pytest.param("v=spf1 ip4:192.0.2.0/24 -all exp=why.test", id="exp-on-fail"),
    ],
)
def test_what_needs_more_than_the_address_is_left_to_pyspf(record: str) -> None:
    zone = {("ex.test", "TXT"): _txt(record), ("why.test", "TXT"): _txt("no %{i}")}
    _dns, evaluator, plans = _world(zone)
    _learn(evaluator, plans, "203.0.113.9", "a@ex.test")
    assert plans.outcome("203.0.113.10", "a@ex.test", "helo.test", 2) is None
    assert plans.fallbacks == 1


def test_an_exp_does_not_stop_a_pass() -> None:
    zone = {("ex.test", "TXT"): _txt("v=spf1 ip4:192.0.2.0/24 -all exp=why.test")}
    _dns, evaluator, plans = _world(zone)
    _learn(evaluator, plans, "203.0.113.9", "a@ex.test")
    planned = plans.outcome("192.0.2.5", "a@ex.test", "helo.test", 2)
    assert planned is not None and planned.result is SpfResult.PASS


# -- the bench zone's kinds ---------------------------------------------------


def _bench_dns() -> dict[tuple[str, str], list[Any]]:
    zone: dict[tuple[str, str], list[Any]] = {}

    def add(name: str, records: list[tuple[str, str]]) -> None:
        for rtype, value in records:
            if rtype == "TXT":
                zone.setdefault((name, "TXT"), []).append((value.encode(),))
            elif rtype == "MX":
                preference, exchange = value.split()
                zone.setdefault((name, "MX"), []).append((int(preference), exchange))
            elif rtype in ("A", "AAAA"):
                zone.setdefault((name, rtype), []).append(value)

    for name, records in PROVIDERS.items():
        add(name, records)
    for index in range(400):
        for name, records in domain_for(1, index).records().items():
            add(name, records)
    return zone


PLANNED_KINDS = sorted(
    {Kind.BIGMAIL, Kind.OFFICE, Kind.MX_A, Kind.MULTI, Kind.REDIRECT, Kind.IPV6, Kind.VOID}
)


def _bench_clients(domain: Any) -> list[str]:
    """A foreign client, one of the domain's own, an IPv6 one, one per
    provider network: between them, every branch of the domain's tree."""
    clients = ["100.64.1.1", str(domain.own4.network_address + 1), "fd99::1"]
    clients += [
        str(ipaddress.ip_network(s).network_address + 5)
        for p in domain.providers
        for s in PROVIDER_SOURCES[p]
    ]
    return clients


@pytest.mark.parametrize("kind", PLANNED_KINDS, ids=str)
def test_the_bench_kinds_go_through_plans(kind: Kind) -> None:
    _dns, evaluator, plans = _world(_bench_dns())
    domain = next(d for d in map(lambda i: domain_for(1, i), range(400)) if d.kind is kind)
    sender = f"someone@{domain.name}"
    clients = _bench_clients(domain)
    for ip in clients:  # every branch of the tree walked once: all cached
        _learn(evaluator, plans, ip, sender)
    for ip in clients:
        new = str(ipaddress.ip_address(ip) + 1)
        planned = plans.outcome(new, sender, "helo.test", 2)
        reference = evaluator.check_now(new, sender, "helo.test", void_limit=2)
        assert planned is not None, (kind, new)
        assert reference is not None
        assert (planned.result, planned.mechanism, planned.explanation) == (
            reference.result,
            reference.mechanism,
            reference.explanation,
        )


@pytest.mark.parametrize(
    "ip",
    ["01.2.3.4", "1.2.3.4\x00", "1.2.3", "", "fe80::1%eth0", "::ffff:192.0.2.9", "1.2.3.4 ", "x"],
)
def test_odd_client_addresses_get_pyspfs_answer_or_none(ip: str) -> None:
    zone = {("ex.test", "TXT"): _txt("v=spf1 ip4:192.0.2.0/24 ip6:fe80::/64 -all")}
    _dns, evaluator, plans = _world(zone)
    _learn(evaluator, plans, "203.0.113.9", "a@ex.test")
    _learn(evaluator, plans, "2001:db8::9", "a@ex.test")
    planned = plans.outcome(ip, "a@ex.test", "helo.test", 2)
    if planned is not None:
        reference = evaluator.check_now(ip, "a@ex.test", "helo.test", void_limit=2)
        assert reference is not None
        assert (planned.result, planned.mechanism) == (reference.result, reference.mechanism)


@pytest.mark.parametrize("method", ["kept", "learn", "build_due"])
def test_a_failing_plan_turns_plans_off_and_pyspf_answers(
    method: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A bug in plan.py must cost neither an answer nor a traceback per check.
    _dns, evaluator, _plans = _world(ZONE)
    checks = DnsChecks(evaluator, void_limit=2, result_cache_size=100, result_cache_ttl=0)
    assert checks.plans is not None

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in plan.py")

    monkeypatch.setattr(checks.plans, method, broken)
    answers = [checks.cached_spf(ip, "a@ex.test", "helo.test") for ip in ("192.0.2.1", "192.0.2.2")]
    reference = evaluator.check_now("192.0.2.1", "a@ex.test", "helo.test", void_limit=2)
    assert reference is not None
    assert [a.result if a else None for a in answers] == [reference.result] * 2
    assert checks.plans is None
    assert sum("plans are off" in r.getMessage() for r in caplog.records) == 1


def _counting(evaluator: SpfEvaluator) -> list[str]:
    """pyspf's evaluations from cached answers, by client, from now on."""
    evaluated: list[str] = []
    check_now = evaluator.check_now

    def counted(ip: str, *args: Any, **kwargs: Any) -> SpfOutcome | None:
        evaluated.append(ip)
        return check_now(ip, *args, **kwargs)

    evaluator.check_now = counted  # type: ignore[method-assign]
    return evaluated


def test_the_check_that_builds_a_plan_is_answered_by_it() -> None:
    # Compiled at a domain's second evaluation (COMPILE_AFTER): before
    # pyspf would run it, so that pyspf runs once per domain, not twice.
    _dns, evaluator, _plans = _world(ZONE)
    checks = DnsChecks(evaluator, void_limit=2, result_cache_size=100, result_cache_ttl=0)
    assert checks.plans is not None and checks.plans.compile_after == 2
    evaluated = _counting(evaluator)
    first = checks.cached_spf("192.0.2.1", "a@ex.test", "helo.test")
    assert evaluated == ["192.0.2.1"] and len(checks.plans) == 0
    second = checks.cached_spf("198.51.100.7", "a@ex.test", "helo.test")
    assert evaluated == ["192.0.2.1"]  # the plan answered it
    assert checks.plans.counters()["plan_builds"] == 1
    assert checks.plans.hits == 1
    reference = evaluator.check_now("198.51.100.7", "a@ex.test", "helo.test", void_limit=2)
    assert first is not None and second is not None and reference is not None
    assert (second.result, second.mechanism, second.explanation) == (
        reference.result,
        reference.mechanism,
        reference.explanation,
    )


def test_a_domain_not_evaluated_before_is_not_built_early() -> None:
    # build_due() neither builds nor counts a sighting: pyspf's evaluation
    # after it is the domain's first.
    _dns, evaluator, plans = _world(ZONE)
    plans.compile_after = 2
    assert not plans.build_due("192.0.2.1", "a@ex.test", "helo.test", 2)
    assert not plans.build_due("192.0.2.1", "a@ex.test", "helo.test", 2)
    _learn(evaluator, plans, "192.0.2.1", "a@ex.test")
    assert len(plans) == 0
    assert plans.build_due("192.0.2.2", "a@ex.test", "helo.test", 2)
    assert len(plans) == 1


@pytest.mark.parametrize("kind", PLANNED_KINDS, ids=str)
def test_checks_with_plans_answer_as_checks_without(kind: Kind) -> None:
    # Differential, through DnsChecks as decisions use it: the same checks
    # in the same order, with plans (pyspf, then the build before the second
    # evaluation, then the plan) and without (pyspf every time). The
    # outcomes, as the result cache keeps them, are the same objects.
    _dns, evaluator, _plans = _world(_bench_dns())
    planned = DnsChecks(evaluator, void_limit=2, result_cache_size=100, result_cache_ttl=0)
    plain = DnsChecks(
        evaluator, void_limit=2, result_cache_size=100, result_cache_ttl=0, plans=False
    )
    domains = [d for d in map(lambda i: domain_for(1, i), range(400)) if d.kind is kind][:3]
    for domain in domains:  # every branch of the tree walked once: all cached
        sender = f"someone@{domain.name}"
        for ip in _bench_clients(domain):
            evaluator.check_now(ip, sender, "helo.test", void_limit=2)
    for offset in range(1, 4):
        for domain in domains:
            sender = f"someone@{domain.name}"
            for ip in _bench_clients(domain):
                new = str(ipaddress.ip_address(ip) + offset)
                for helo_check in (False, True):
                    who, helo = ("", domain.name) if helo_check else (sender, "helo.test")
                    got = planned.cached_spf(new, who, helo)
                    want = plain.cached_spf(new, who, helo)
                    assert got is want, (kind, new, helo_check, got, want)
    assert planned.plans is not None and planned.plans.hits > 0


def test_a_plan_that_leaves_a_client_to_pyspf_is_asked_once() -> None:
    # A domain's plan is there but hands this client to pyspf (a ptr term):
    # nothing to build, so the check goes to pyspf after one decision.
    zone = {("ex.test", "TXT"): _txt("v=spf1 ip4:192.0.2.0/24 ptr -all")}
    _dns, evaluator, _plans = _world(zone)
    checks = DnsChecks(evaluator, void_limit=2, result_cache_size=100, result_cache_ttl=0)
    assert checks.plans is not None
    evaluated = _counting(evaluator)
    for ip in ("192.0.2.1", "192.0.2.2"):  # pyspf, then the build: the plan answers
        assert checks.cached_spf(ip, "a@ex.test", "helo.test") is not None
    assert evaluated == ["192.0.2.1"] and checks.plans.counters()["plan_builds"] == 1
    for ip in ("203.0.113.1", "203.0.113.2"):
        assert checks.cached_spf(ip, "a@ex.test", "helo.test") is not None
    assert evaluated == ["192.0.2.1", "203.0.113.1", "203.0.113.2"]
    assert checks.plans.fallbacks == 2  # once per check
    assert checks.plans.counters()["plan_builds"] == 1
