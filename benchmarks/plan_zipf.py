"""The zipf workload's SPF checks through DnsChecks in-process, with compiled
plans and without: the CPU ``cached_spf`` spends and the plans' counters.

    python benchmarks/plan_zipf.py on|off [MESSAGES]

Serves the bench zone on loopback in this process and takes each message's
first request of ``spfpolicy bench -w zipf`` (seed 1): its HELO check, then
its MAIL FROM check, each through ``cached_spf`` (timed: process CPU) and,
when that has no answer at once, ``spf()`` (not timed: it waits on DNS).
Run "on" and "off" alternately and compare.
"""

from __future__ import annotations

import asyncio
import sys
import time

from spfpolicy.bench.workloads import Workload, WorkloadKind
from spfpolicy.bench.zone import BenchZone, BenchZoneServer
from spfpolicy.checks import DnsChecks
from spfpolicy.evaluator import SpfEvaluator
from spfpolicy.resolver import Resolver


def checks_of(count: int) -> list[tuple[str, str, str]]:
    out = []
    for message in Workload(kind=WorkloadKind.ZIPF, seed=1).messages():
        text = message.requests[0].data.decode()
        attrs = dict(line.split("=", 1) for line in text.split("\n") if "=" in line)
        out.append((attrs["client_address"], attrs.get("sender", ""), attrs.get("helo_name", "")))
        if len(out) >= count:
            break
    return out


async def main(plans: bool, count: int) -> None:
    work = checks_of(count)
    async with BenchZoneServer(BenchZone(1)) as server:
        resolver = Resolver([server.nameserver], timeout=1.0, tries=2)
        checks = DnsChecks(
            SpfEvaluator(resolver), void_limit=2, result_cache_size=50_000, result_cache_ttl=3600
        )
        if not plans:
            checks.plans = None
        cpu = 0.0
        at_once = 0
        for ip, sender, helo in work:
            for checked in ("", sender):
                began = time.process_time()
                outcome = checks.cached_spf(ip, checked, helo)
                cpu += time.process_time() - began
                if outcome is None:
                    await checks.spf(ip, checked, helo, lookup_time=5.0)
                else:
                    at_once += 1
        await resolver.close()
    counters = checks.plans.counters() if checks.plans is not None else {}
    print(
        f"{'plans' if plans else 'pyspf'}: cached_spf CPU {cpu:.2f} s over {2 * len(work)} "
        f"checks, {at_once} answered at once {counters}"
    )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] == "on", int(sys.argv[2]) if len(sys.argv) > 2 else 20_000))
