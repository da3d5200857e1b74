"""How long answers live: a negative answer for its SOA's negative TTL
(RFC 2308 section 5), an SPF result no longer than the first of the answers
it used. Real DNS from the loopback server, whose zone is replaced while it
runs; a fake clock moves time, so nothing here sleeps.
"""

from __future__ import annotations

import asyncio

import aiodns
import pytest

from fakeclock import FakeClock
from oracle import plain_pyspf
from spfpolicy.bench.dnsserver import Zone
from spfpolicy.checks import DnsChecks
from spfpolicy.evaluator import SpfEvaluator
from spfpolicy.results import SpfOutcome, SpfResult

RECORD = "v=spf1 ip4:192.0.2.0/24 -all"


# Names: one c-ares sends, one only dnspython will (a space, from %{l} say).
NAMES = [
    pytest.param("new.example.com", id="c-ares"),
    pytest.param("b s.example.com", id="dnspython"),
]


def _zone(name: str, *, published: bool, nodata: bool) -> Zone:
    data: dict[str, list[dict[str, object]]] = {"example.com": [{"A": "192.0.2.1"}]}
    if nodata:
        data[name] = [{"A": "192.0.2.2"}]  # the name exists: NODATA for TXT
    if published:
        data.setdefault(name, []).append({"TXT": RECORD, "ttl": 300})
    return Zone.from_dict(data)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("nodata", [False, True], ids=["nxdomain", "nodata"])
@pytest.mark.parametrize(
    ("soa_ttl", "minimum"),
    [
        pytest.param(None, 2, id="soa-ttl=minimum=2"),
        pytest.param(2, 300, id="soa-ttl-2"),
        pytest.param(300, 2, id="minimum-2"),
    ],
)
async def test_negative_answer_lives_its_soa_negative_ttl(
    zone_server, resolvers, name: str, nodata: bool, soa_ttl: int | None, minimum: int
) -> None:
    server = await zone_server(
        _zone(name, published=False, nodata=nodata), negative_ttl=minimum, soa_ttl=soa_ttl
    )
    clock = FakeClock()
    resolver = resolvers(server, clock=clock)  # DNS_Negative_TTL 300: only a cap
    first = await resolver.resolve(name, "TXT")
    assert first.negative and first.ttl == 2
    server.zone = _zone(name, published=True, nodata=nodata)
    clock.now += 1.99
    assert (await resolver.resolve(name, "TXT")).negative  # still the cached answer
    clock.now += 0.01
    assert (await resolver.resolve(name, "TXT")).records == ((RECORD.encode(),),)
    assert server.queries == 2


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    ("negative_ttl", "min_ttl", "lives"),
    [
        pytest.param(300, 0, 2, id="soa"),
        pytest.param(1, 0, 1, id="capped-by-DNS_Negative_TTL"),
        pytest.param(300, 5, 5, id="raised-to-DNS_Min_TTL"),
    ],
)
async def test_spf_sees_a_record_published_after_a_negative_answer(
    zone_server, resolvers, name: str, negative_ttl: float, min_ttl: float, lives: float
) -> None:
    server = await zone_server(_zone(name, published=False, nodata=False), negative_ttl=2)
    clock = FakeClock()
    resolver = resolvers(server, clock=clock, negative_ttl=negative_ttl, min_ttl=min_ttl)
    evaluator = SpfEvaluator(resolver, prefetch=False, clock=clock)
    sender = f"u@{name}"
    assert (await evaluator.check("192.0.2.5", sender, "h")).result is SpfResult.NONE
    server.zone = _zone(name, published=True, nodata=False)
    clock.now += lives - 0.01
    assert (await evaluator.check("192.0.2.5", sender, "h")).result is SpfResult.NONE
    clock.now += 0.01
    assert (await evaluator.check("192.0.2.5", sender, "h")).result is SpfResult.PASS


@pytest.mark.parametrize("name", NAMES)
async def test_negative_answer_without_soa_keeps_dns_negative_ttl(
    zone_server, resolvers, name: str
) -> None:
    server = await zone_server(_zone(name, published=False, nodata=False), soa_in_negative=False)
    resolver = resolvers(server, negative_ttl=45)
    assert (await resolver.resolve(name, "TXT")).ttl == 45


async def test_negative_answer_at_the_end_of_a_cname_lives_no_longer_than_the_link(
    zone_server, resolvers
) -> None:
    server = await zone_server(
        {
            "example.com": [{"A": "192.0.2.1"}],
            "alias.example.com": [{"CNAME": "gone.example.com", "ttl": 1}],
        },
        negative_ttl=2,
    )
    answer = await resolvers(server).resolve("alias.example.com", "TXT")
    assert answer.negative and answer.ttl == 1
    assert server.queries == 1  # the upstream's NXDOMAIN for the target is believed


async def test_without_the_reply_callback_negative_answers_keep_dns_negative_ttl(
    zone_server, resolvers, monkeypatch
) -> None:
    # Another pycares layout: its own query is used, which drops the reply
    # of a negative answer, so the configured value is all there is.
    monkeypatch.setattr("spfpolicy.cares.KEEPS_NEGATIVE_REPLIES", False)
    server = await zone_server(_zone("new.example.com", published=False, nodata=False))
    resolver = resolvers(server, negative_ttl=45)
    assert (await resolver.resolve("new.example.com", "TXT")).ttl == 45
    assert (await resolver.resolve("example.com", "A")).records == ("192.0.2.1",)


async def test_negative_ttl_read_with_cares_event_thread(
    zone_server, resolvers, monkeypatch
) -> None:
    # aiodns' default, should its hook for a loop-driven channel go away:
    # replies then arrive on c-ares' own thread.
    monkeypatch.setattr(
        "spfpolicy.cares.LoopResolver._make_channel", aiodns.DNSResolver._make_channel
    )
    server = await zone_server(
        _zone("new.example.com", published=False, nodata=False), negative_ttl=2
    )
    resolver = resolvers(server)
    assert (await resolver.resolve("new.example.com", "TXT")).ttl == 2
    assert resolver._resolver()._event_thread
    assert (await resolver.resolve("example.com", "A")).records == ("192.0.2.1",)


# -- a result lives no longer than the first of its answers -------------------

SHORT = {"example.com": [{"TXT": RECORD, "ttl": 2}]}
CHANGED = {"example.com": [{"TXT": "v=spf1 -all", "ttl": 2}]}


async def test_result_expires_with_the_first_answer_it_used(zone_server, resolvers) -> None:
    # A record with TTL 2 fetched at t=0; a new client evaluated from the
    # cache at t=1.65; the record changed at t=2. The result for that client
    # must follow at t=2, not at t=3.65.
    server = await zone_server(SHORT)
    clock = FakeClock()
    resolver = resolvers(server, clock=clock)
    evaluator = SpfEvaluator(resolver, prefetch=False, clock=clock)
    checks = DnsChecks(
        evaluator, void_limit=2, result_cache_size=100, result_cache_ttl=3600, clock=clock
    )
    sender = "u@example.com"
    first = await checks.spf("192.0.2.5", sender, "h", lookup_time=5)
    assert first.result is SpfResult.PASS

    clock.now += 1.65
    full = evaluator.check_now("192.0.2.6", sender, "h")
    assert full is not None and full.ttl == pytest.approx(0.35)
    kept = checks.cached_spf("192.0.2.6", sender, "h")
    assert kept is not None and kept.result is SpfResult.PASS
    assert checks.cached_lifetime("192.0.2.6", sender, "h", kept) == pytest.approx(0.35)

    clock.now += 0.35  # t=2: the record changes as it expires
    server.zone = Zone.from_dict(CHANGED)
    assert checks.cached_spf("192.0.2.6", sender, "h") is None  # nothing left to answer from
    again = await checks.spf("192.0.2.6", sender, "h", lookup_time=5)
    assert again.result is SpfResult.FAIL
    assert server.queries == 2


async def test_outcome_with_no_time_left_is_not_kept(zone_server, resolvers) -> None:
    # The checked domain's record (TTL 2) comes from the cache at t=1.9; the
    # include's lookup is answered at t=2.1, after that record expired. The
    # result has no time left: it is given, not kept.
    server = await zone_server(
        {
            "example.com": [{"TXT": "v=spf1 include:inc.example.net -all", "ttl": 2}],
            "inc.example.net": [{"TXT": RECORD, "ttl": 300}],
        }
    )
    server.delays["inc.example.net"] = 0.05  # holds the reply while the clock moves
    clock = FakeClock()
    resolver = resolvers(server, clock=clock)
    evaluator = SpfEvaluator(resolver, prefetch=False, clock=clock)
    checks = DnsChecks(
        evaluator, void_limit=2, result_cache_size=100, result_cache_ttl=3600, clock=clock
    )
    outcomes: list[SpfOutcome] = []
    check = evaluator.check

    async def keep_full(*args, **kwargs) -> SpfOutcome:
        outcome = await check(*args, **kwargs)
        outcomes.append(outcome)
        return outcome

    evaluator.check = keep_full  # type: ignore[method-assign]
    await resolver.resolve("example.com", "TXT")
    clock.now += 1.9
    task = asyncio.create_task(checks.spf("192.0.2.5", "u@example.com", "h", lookup_time=5))
    while not server.counts[("inc.example.net", "TXT")]:
        await asyncio.sleep(0.01)
    clock.now += 0.2
    given = await task
    assert given.result is SpfResult.PASS
    assert outcomes[0].ttl == 0
    assert checks.cached_lifetime("192.0.2.5", "u@example.com", "h", given) == 0
    assert len(checks.results) == 0


@pytest.mark.parametrize(
    "step",
    [
        pytest.param(0.0, id="t=0-fetched"),
        pytest.param(1.65, id="t=1.65-from-cache"),
        pytest.param(2.0, id="t=2-changed"),
        pytest.param(3.0, id="t=3"),
    ],
)
async def test_outcomes_match_pyspf_over_the_data_of_the_moment(
    zone_server, resolvers, step: float
) -> None:
    # The same scenario, stopped at each step: spfpolicy's answer (result
    # cache, DNS cache and all) against pyspf's over the DNS data then.
    server = await zone_server(SHORT)
    clock = FakeClock()
    evaluator = SpfEvaluator(resolvers(server, clock=clock), prefetch=False, clock=clock)
    checks = DnsChecks(
        evaluator, void_limit=2, result_cache_size=100, result_cache_ttl=3600, clock=clock
    )
    start = clock.now
    sender = "u@example.com"
    plan = [(0.0, "192.0.2.5"), (1.65, "192.0.2.6"), (2.0, "192.0.2.6"), (3.0, "192.0.2.5")]
    for at, ip in plan:
        if at > step:
            break
        clock.now = start + at
        if at >= 2.0:
            server.zone = Zone.from_dict(CHANGED)
        ours = checks.cached_spf(ip, sender, "h") or await checks.spf(
            ip, sender, "h", lookup_time=5
        )
    theirs, _, _ = await asyncio.to_thread(plain_pyspf, server.port, ip, sender, "h")
    assert ours.result.value == theirs
