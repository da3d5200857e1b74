"""CPU per check of a fully cached SPF tree evaluated for a new client, per
bench-zone record kind: through a compiled plan (plan.py) and through pyspf
(what DnsChecks.cached_spf ran before plans), side by side.

    python benchmarks/plan_cpu.py [--checks N] [--domains D] [--seed S]

Serves the bench zone (src/spfpolicy/bench/zone.py) on loopback, in this
process; a real Resolver caches its answers. For each kind, D domains of
that kind are warmed: checked by pyspf for clients inside each source and
outside all, so every record under the domain is cached and its plan built.
Then N new clients (each seen once: no result-cache hit) per kind, a mix of
allowed and foreign ones, are checked through ``DnsChecks.cached_spf``
twice over: with plans, and with plans off (pyspf's ``check_now``). Each
figure is the median over batches of 25 checks of process CPU time per
check, in microseconds; the plan column also says how many of the checks
the plan answered (the others went on to pyspf).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import itertools
import os
import statistics
import time
from collections.abc import Callable

from spfpolicy.bench.zone import PROVIDER_SOURCES, BenchZone, BenchZoneServer, Kind, domain_for
from spfpolicy.cache import TtlLruCache
from spfpolicy.checks import DnsChecks
from spfpolicy.evaluator import SpfEvaluator
from spfpolicy.resolver import Resolver

# Kind.EXISTS is left out: its exists:%{i}... term asks DNS about each new
# client, so its tree is never fully cached for one (the plan hands it to
# pyspf at that term).
KINDS = (
    Kind.BIGMAIL,
    Kind.OFFICE,
    Kind.MX_A,
    Kind.MULTI,
    Kind.REDIRECT,
    Kind.IPV6,
    Kind.VOID,
)
BATCH = 25


def _domains(seed: int, kind: Kind, count: int) -> list[str]:
    found = []
    for index in itertools.count():
        domain = domain_for(seed, index)
        if domain.kind is kind:
            found.append(domain)
            if len(found) == count:
                return found  # type: ignore[return-value]
    raise AssertionError("unreachable")


def _clients(domain: object, serial: int) -> list[str]:
    """Allowed and foreign clients of ``domain``, new for each ``serial``."""
    d = domain  # a zone.Domain
    out = [str(ipaddress.IPv4Address(0x64400000 + serial))]  # foreign (CGNAT)
    own = d.own4  # type: ignore[attr-defined]
    out.append(str(own.network_address + 1 + serial % 14))
    for provider in d.providers:  # type: ignore[attr-defined]
        for source in PROVIDER_SOURCES[provider]:
            net = ipaddress.ip_network(source)
            out.append(str(net.network_address + 1 + serial % (net.num_addresses - 2)))
    if d.kind is Kind.IPV6:  # type: ignore[attr-defined]
        out.append(str(d.own6.network_address + 1 + serial))  # type: ignore[attr-defined]
        out.append(str(ipaddress.IPv6Address("fd99::1") + serial))
    return out


def _median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6 if samples else float("nan")


def _measure(check: Callable[[str, str], object], work: list[tuple[str, str]]) -> list[float]:
    per_check = []
    for start in range(0, len(work), BATCH):
        batch = work[start : start + BATCH]
        began = time.process_time()
        for ip, sender in batch:
            check(ip, sender)
        per_check.append((time.process_time() - began) / len(batch))
    return per_check


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checks", type=int, default=2000, help="new clients per kind")
    parser.add_argument("--domains", type=int, default=20, help="domains per kind")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    async with BenchZoneServer(BenchZone(args.seed)) as server:
        resolver = Resolver([server.nameserver], timeout=1.0, tries=2)
        evaluator = SpfEvaluator(resolver, default_explanation=None)
        checks = DnsChecks(
            evaluator, void_limit=2, result_cache_size=1_000_000, result_cache_ttl=3600
        )
        plans = checks.plans
        assert plans is not None
        plans.compile_after = 1  # built at the first evaluation: a tree warmed once
        rows = []
        serial = itertools.count(1)
        for kind in KINDS:
            domains = _domains(args.seed, kind, args.domains)
            for domain in domains:  # warm: every branch walked, plans built
                sender = f"someone@{domain.name}"
                for ip in _clients(domain, 0):
                    await checks.spf(ip, sender, "helo.example", lookup_time=5.0)
                # Each family's plan, built now that the whole tree is cached.
                for ip in _clients(domain, 10_000):
                    plans._failed.clear()
                    await checks.spf(ip, sender, "helo.example", lookup_time=5.0)
            work = []
            while len(work) < args.checks:
                n = next(serial)
                for domain in domains:
                    work.extend((ip, f"someone@{domain.name}") for ip in _clients(domain, n))
            work = work[: args.checks]
            half = len(work) // 2

            def planned(ip: str, sender: str) -> object:
                outcome = checks.cached_spf(ip, sender, "helo.example")
                assert outcome is not None, "not cached"
                return outcome

            # Every check a new client: the result cache keeps nothing (the
            # own /28s have few addresses; a repeat would be a cache hit).
            checks.results = TtlLruCache(0)
            hits = plans.hits
            with_plans = _measure(planned, work[:half])
            answered = plans.hits - hits
            checks.plans = None
            without = _measure(planned, work[half:])
            checks.plans = plans
            rows.append((kind, _median_us(with_plans), answered, half, _median_us(without)))
        await resolver.close()

    print(f"load average {os.getloadavg()[0]:.2f}; {args.checks} new clients per kind")
    print(f"{'kind':<10} {'plan µs':>8} {'by plan':>9} {'pyspf µs':>9}")
    for kind, plan_us, answered, total, pyspf_us in rows:
        label = f"{kind.name.lower()}"
        print(f"{label:<10} {plan_us:8.1f} {answered:>4}/{total:<4} {pyspf_us:9.1f}")
    print(
        f"median over kinds: plan {statistics.median(r[1] for r in rows):.1f} µs, "
        f"pyspf {statistics.median(r[4] for r in rows):.1f} µs"
    )


if __name__ == "__main__":
    asyncio.run(main())
