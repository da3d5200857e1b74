"""Compiled plans (plan.py) against pyspf, property-based.

Hypothesis generates record trees (nested include and redirect; a/mx with
dual CIDR, mx with more than 10 names; ip4/ip6 at prefix edges; void
lookups and lookup counts of 9-11 placed before and after the matching
term; syntax errors, unknown modifiers, exp=) and clients inside and outside
every network, IPv4-mapped IPv6 ones included. For each client, the plan's
outcome (when the plan answers rather than handing over to pyspf) must equal
the evaluator's ``check_now``: pyspf itself, with its ``dns()`` reading the
same DNS data from a dict (``DictDns``) rather than over sockets, so
thousands of trees run in seconds.

A second domain (``TWIN``) publishes the top domain's record, checked
through the same store: where its tree compiles alike, its plan shares the
top domain's shape (one table and one set of kept outcomes for both), and
its outcomes, its own domain and sender in them, must still be pyspf's.
"""

from __future__ import annotations

import ipaddress
import random
from collections import Counter
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spfpolicy.evaluator import SpfEvaluator
from spfpolicy.plan import SpfPlans
from spfpolicy.resolver import DnsAnswer
from spfpolicy.results import SpfResult

TOP = "d0.test"
TWIN = "d9.test"  # publishes TOP's record
TARGETS = ("n1.test", "n2.test", "n3.test", "n4.test")
HOSTS = ("h1.test", "h2.test", "h3.test", "h4.test")
VOIDS = ("nx1.test", "nx2.test")
MXDOMAINS = (TOP, "m1.test")
EXPLANATION = "DEFAULT explanation"

V4_BASES = ("10.1.0.0", "10.1.2.3", "192.0.2.128", "198.51.100.7", "0.0.0.0", "255.255.255.255")
V6_BASES = ("2001:db8::", "2001:db8:1:2::5", "fd00::1", "::", "::ffff:10.1.2.3")
V4_PREFIXES = (0, 1, 8, 15, 16, 23, 24, 25, 31, 32)
V6_PREFIXES = (0, 1, 32, 48, 63, 64, 96, 127, 128)
BAD_TERMS = (
    "ip4:192.0.2.300",
    "a:foo",
    "ip4:1.2.3.4/33",
    "moo",
    "ip6:zz::",
    "-all:3030",
    "a:1.2.3.4",
    "include",
    "=a",
    "ip4:10.0.0.1//64",
    "exp=",
    "redirect=",
    "ip6:2001:db8::/129",
    "a/33",
    "mx//129",
    "ptr/24",
    "ip4:10.0.0.1,",
)


def _edges() -> list[str]:
    """Clients at every network's edges, inside and outside: for each
    address literal and prefix in use, the first and last address of the
    network and their neighbours."""
    candidates: set[str] = set()
    for bases, prefixes, bits in ((V4_BASES, V4_PREFIXES, 32), (V6_BASES, V6_PREFIXES, 128)):
        for base in bases:
            for prefix in prefixes:
                network = ipaddress.ip_network(base).supernet(new_prefix=prefix)
                first = int(network.network_address)
                last = int(network.broadcast_address)
                for value in (first - 1, first, last, last + 1):
                    if 0 <= value < 2**bits:
                        candidates.add(str(ipaddress.ip_address(value)))
    return sorted(candidates)


CLIENTS = _edges()
ADDRESSES6 = tuple(b for b in V6_BASES if not b.startswith("::ffff:"))


class DictDns:
    """The resolver as evaluations and plans read it (``cached``, ``peek``,
    ``clock``), answering from a dict: a name absent is NXDOMAIN."""

    def __init__(self, zone: dict[tuple[str, str], list[Any]], now: float = 1000.0) -> None:
        self.zone = zone
        self.now = now

    def clock(self) -> float:
        return self.now

    def cached(self, name: str, qtype: str) -> DnsAnswer | None:
        records = self.zone.get((name, qtype), ())
        return DnsAnswer(tuple(records), 300.0, self.now + 300.0)

    peek = cached


def _txt(text: str) -> tuple[bytes, ...]:
    return (text.encode(),)


QUALIFIERS = ("", "", "+", "-", "~", "?")
OTHER_TERMS = (
    "include:{target}",
    "-include:{target}",
    "~include:{any_target}",
    "exists:{host_or_void}",
    "exists:%{{i}}.h1.test",
    "ptr",
    "?ptr:h1.test",
    "{q}all",
    "{q}all",
    "redirect={any_target}",
    "exp=e1.test",
    "exp=e2.test",
    "foo=bar",
    "moo.sub-domains_9=yes",
    "op=pass",
)

# The trees are drawn from one seeded random.Random per example rather than
# term by term through Hypothesis: its per-draw bookkeeping made 3,000
# examples take minutes; the seed is what Hypothesis draws (derandomized).


def _cidr(rng: random.Random) -> str:
    four = rng.choice((None, None, 0, 16, 24, 31, 32))
    six = rng.choice((None, None, 0, 48, 64, 127, 128))
    return ("" if four is None else f"/{four}") + ("" if six is None else f"//{six}")


def _term(rng: random.Random) -> str:
    roll = rng.randrange(60)
    q = rng.choice(QUALIFIERS)
    if roll == 0:
        return rng.choice(BAD_TERMS)
    kind = roll % 6
    if kind in (0, 1):
        prefix = rng.choice((*V4_PREFIXES, None))
        return f"{q}ip4:{rng.choice(V4_BASES)}" + ("" if prefix is None else f"/{prefix}")
    if kind == 2:
        prefix = rng.choice((*V6_PREFIXES, None))
        return f"{q}ip6:{rng.choice(V6_BASES)}" + ("" if prefix is None else f"/{prefix}")
    if kind == 3:
        name = rng.choice((None, *HOSTS, *HOSTS, *VOIDS, TOP))
        return f"{q}a" + ("" if name is None else f":{name}") + _cidr(rng)
    if kind == 4:
        name = rng.choice((None, None, "m1.test", *VOIDS))
        return f"{q}mx" + ("" if name is None else f":{name}") + _cidr(rng)
    return rng.choice(OTHER_TERMS).format(
        q=q,
        target=rng.choice(TARGETS),
        any_target=rng.choice((*TARGETS, *VOIDS)),
        host_or_void=rng.choice(HOSTS + VOIDS),
    )


def _record(rng: random.Random, most: int) -> str | None:
    roll = rng.randrange(20)
    if roll == 0:
        return None
    if roll == 1:
        return "google-site-verification=xyz"
    body = [_term(rng) for _ in range(rng.randrange(most + 1))]
    if rng.randrange(3) == 0:
        # A term that ends the record for some clients, then lookups the
        # others make: the counts differ by path from here on.
        prefix = rng.choice(V4_PREFIXES[2:])
        body[:0] = [f"{rng.choice('-~?')}ip4:{rng.choice(V4_BASES)}/{prefix}"]
        body[1:1] = [f"a:{rng.choice((*HOSTS, *VOIDS))}" for _ in range(rng.randrange(1, 4))]
    # Lookup counts of 9, 10 and 11 (a:h1.test always resolves), before or
    # after the term that matches.
    padding = rng.choice((0, 0, 0, 0, 7, 8, 9, 10))
    if padding:
        at = rng.randrange(len(body) + 1)
        body[at:at] = ["a:h1.test"] * padding
    return " ".join(["v=spf1", *body])


def world(rng: random.Random) -> tuple[dict[tuple[str, str], list[Any]], list[str]]:
    zone: dict[tuple[str, str], list[Any]] = {}
    for name in (TOP, *TARGETS):
        record = _record(rng, 9 if name == TOP else 6)
        if record is not None:
            zone[(name, "TXT")] = [_txt(record)]
            if rng.randrange(40) == 0:  # two SPF records: permerror
                zone[(name, "TXT")].append(_txt("v=spf1 -all"))
    if (TOP, "TXT") in zone:
        zone[(TWIN, "TXT")] = list(zone[(TOP, "TXT")])
    for name in (*HOSTS, TOP):
        four = rng.sample(V4_BASES, rng.randrange(1 if name == "h1.test" else 0, 4))
        six = rng.sample(ADDRESSES6, rng.randrange(3))
        if four:
            zone[(name, "A")] = four
        if six:
            zone[(name, "AAAA")] = six
    for name in MXDOMAINS:
        count = rng.choice((0, 1, 2, 3, 10, 11, 12))
        hosts = [rng.choice((*HOSTS, *HOSTS, *VOIDS, "")) for _ in range(count)]
        if hosts:
            zone[(name, "MX")] = [(10 + i, host) for i, host in enumerate(hosts)]
    exp = rng.choice(("Not allowed: %{i} for %{s}", "plain text", None))
    if exp is not None:
        zone[("e1.test", "TXT")] = [_txt(exp)]
    clients = rng.sample(CLIENTS, rng.randrange(1, 7))
    mapped = [f"::ffff:{c}" for c in clients if ":" not in c][:2]
    return zone, clients + mapped


TALLY: Counter[str] = Counter()


@settings(
    max_examples=3000,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    rng=st.randoms(use_true_random=True),
    void_limit=st.sampled_from((2, 2, 0, 1, 3)),
    helo_check=st.booleans(),
)
def test_plan_equals_pyspf(rng: random.Random, void_limit: int, helo_check: bool) -> None:
    zone, clients = world(rng)
    dns = DictDns(zone)
    evaluator = SpfEvaluator(
        dns,  # type: ignore[arg-type]
        prefetch=False,
        clock=dns.clock,
        default_explanation=EXPLANATION,
    )
    plans = SpfPlans(dns.peek, clock=dns.clock, default_explanation=EXPLANATION)
    for domain in (TOP, TWIN):
        sender, helo = ("", domain) if helo_check else (f"someone@{domain}", "mail.example")
        first = evaluator.check_now(clients[0], sender, helo, void_limit=void_limit)
        assert first is not None
        plans.learn(clients[0], sender, helo, void_limit, first)
        for client in clients:
            reference = evaluator.check_now(client, sender, helo, void_limit=void_limit)
            assert reference is not None
            plans.learn(client, sender, helo, void_limit, reference)
            planned = plans.outcome(client, sender, helo, void_limit)
            if planned is None:
                TALLY["pyspf"] += 1
                continue
            TALLY["plan"] += 1
            TALLY[f"plan:{planned.result}"] += 1
            assert reference.result is not SpfResult.TEMPERROR
            got = (planned.result, planned.code, planned.explanation, planned.mechanism)
            want = (reference.result, reference.code, reference.explanation, reference.mechanism)
            assert got == want, (domain, client, zone)
            assert planned.identity == reference.identity
            assert planned.sender == reference.sender
            assert planned.domain == reference.domain
            assert planned.record == reference.record
            assert planned.ttl is not None and reference.ttl is not None
            assert planned.ttl <= reference.ttl
    counters = plans.counters()
    if counters["plan_shapes"] < counters["plans"]:
        TALLY["shared"] += 1


def test_the_plan_answered_most_checks() -> None:
    """Run after the property (file order): the plan path was not a no-op.
    (Alone, it checks nothing.)"""
    if TALLY["plan"] + TALLY["pyspf"] == 0:
        return
    assert TALLY["plan"] > TALLY["pyspf"] / 4, dict(TALLY)
    for result in ("pass", "fail", "softfail", "neutral", "none", "permerror"):
        assert TALLY[f"plan:{result}"] > 0, dict(TALLY)
    assert TALLY["shared"] > 0, dict(TALLY)  # the twin's plan shared a shape
