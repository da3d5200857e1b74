"""``spfpolicy check --trace``: the evaluation as a tree, against the
loopback DNS server.

The tree is checked step by step for records that use include, redirect,
a, mx and exists; at the void limit, the 10-lookup limit and the time limit;
for answers from the cache, from upstream and from the prefetcher. A traced
check gives the result an untraced one and pyspf alone give on the same
records, and ``-c FILE`` gives the trace the server's settings.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from oracle import plain_pyspf
from spfpolicy.bench.dnsserver import ZoneServer
from spfpolicy.cli import main
from spfpolicy.evaluator import SpfEvaluator
from spfpolicy.resolver import Resolver
from spfpolicy.results import SpfOutcome
from spfpolicy.trace import Lookup, Record, Term, Trace

TREE = "v=spf1 ip6:2001:db8::/32 include:inc.example a:host.tree.example mx " + (
    "exists:%{i}.ex.tree.example redirect=red.example"
)
ZONE: dict[str, Any] = {
    "tree.example": [{"TXT": TREE}, {"MX": [10, "mx.tree.example"]}],
    "inc.example": [{"TXT": "v=spf1 ip4:198.51.100.0/24 -all"}],
    "host.tree.example": [{"A": "203.0.113.1"}],
    "mx.tree.example": [{"A": "203.0.113.2"}],
    "192.0.2.77.ex.tree.example": [{"A": "127.0.0.2"}],
    "red.example": [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}],
    "void.example": [{"TXT": "v=spf1 a:n1.void.example a:n2.void.example a:n3.void.example -all"}],
    "many.example": [
        {"TXT": "v=spf1 " + " ".join(f"a:h{i}.many.example" for i in range(1, 12)) + " -all"}
    ],
    **{f"h{i}.many.example": [{"A": "203.0.113.9"}] for i in range(1, 12)},
    "slow.example": [{"TXT": "v=spf1 ip4:203.0.113.0/24 include:stuck.example -all"}],
    "stuck.example": ["timeout"],
}


@pytest.fixture
async def dns_server(zone_server: Any) -> ZoneServer:
    server: ZoneServer = await zone_server(ZONE)
    return server


@pytest.fixture
async def resolvers(dns_server: ZoneServer) -> AsyncIterator[Callable[[], Resolver]]:
    made: list[Resolver] = []

    def make() -> Resolver:
        resolver = Resolver([dns_server.nameserver], timeout=1.0, tries=1)
        made.append(resolver)
        return resolver

    yield make
    for resolver in made:
        await resolver.close()


async def traced(
    evaluator: SpfEvaluator, ip: str, sender: str, **kwargs: Any
) -> tuple[SpfOutcome, Trace]:
    trace = Trace()
    outcome = await evaluator.check(ip, sender, "helo.example", trace=trace, **kwargs)
    assert trace.outcome == outcome
    return outcome, trace


def walk(steps: list[Any]) -> Iterator[Any]:
    for step in steps:
        yield step
        if isinstance(step, Record | Term):
            yield from walk(step.steps)


def lookups(trace: Trace) -> list[Lookup]:
    return [step for step in walk(trace.steps) if isinstance(step, Lookup)]


def terms(record: Record) -> list[tuple[str, bool | None]]:
    return [(s.text, s.matched) for s in record.steps if isinstance(s, Term)]


def top(trace: Trace) -> Record:
    records = [step for step in trace.steps if isinstance(step, Record)]
    assert len(records) == 1
    return records[0]


# -- the tree -----------------------------------------------------------------

TRIED = [
    ("ip6:2001:db8::/32", False),
    ("include:inc.example", False),
    ("a:host.tree.example", False),
    ("mx", False),
    ("exists:%{i}.ex.tree.example", False),
]


def matching_at(n: int) -> list[tuple[str, bool]]:
    """The terms tried when the top record's ``n``th term (from 0) matches."""
    return [*TRIED[:n], (TRIED[n][0], True)]


@pytest.mark.parametrize(
    ("ip", "result", "tried"),
    [
        pytest.param("198.51.100.7", "pass", matching_at(1), id="include"),
        pytest.param("203.0.113.1", "pass", matching_at(2), id="a"),
        pytest.param("203.0.113.2", "pass", matching_at(3), id="mx"),
        pytest.param("192.0.2.77", "pass", matching_at(4), id="exists"),
        pytest.param("192.0.2.10", "pass", [*TRIED, ("redirect=red.example", True)], id="redir"),
        pytest.param("10.0.0.1", "fail", [*TRIED, ("redirect=red.example", True)], id="fail"),
    ],
)
async def test_terms_in_order_with_their_outcome(
    resolvers: Callable[[], Resolver], ip: str, result: str, tried: list[tuple[str, bool]]
) -> None:
    outcome, trace = await traced(SpfEvaluator(resolvers()), ip, "a@tree.example")
    assert outcome.result == result
    first = trace.steps[0]
    assert isinstance(first, Lookup)
    assert (first.name, first.qtype, first.records) == ("tree.example", "TXT", [TREE])
    record = top(trace)
    assert (record.domain, record.via, record.text, record.result) == (
        "tree.example",
        "top",
        TREE,
        result,
    )
    assert terms(record) == tried
    assert trace.error is None
    assert all(step.error is None for step in walk(trace.steps))


async def test_include_and_redirect_nest_their_records(resolvers: Callable[[], Resolver]) -> None:
    evaluator = SpfEvaluator(resolvers(), prefetch=False)
    outcome, trace = await traced(evaluator, "10.0.0.1", "a@tree.example")
    assert outcome.result == "fail"
    assert outcome.mechanism == "-all"
    record = top(trace)
    # redirect= is counted as pyspf reads the record, before any term.
    assert record.lookups == 1
    by_text = {step.text: step for step in record.steps if isinstance(step, Term)}

    include = by_text["include:inc.example"]
    assert include.lookups == 2
    fetched, inner = include.steps
    assert isinstance(fetched, Lookup) and isinstance(inner, Record)
    assert (fetched.name, fetched.qtype) == ("inc.example", "TXT")
    assert (inner.domain, inner.via, inner.result) == ("inc.example", "include", "fail")
    assert terms(inner) == [("ip4:198.51.100.0/24", False), ("-all", True)]

    a = by_text["a:host.tree.example"]
    assert a.lookups == 3
    assert [(s.name, s.qtype, s.records) for s in a.steps] == [
        ("host.tree.example", "A", ["203.0.113.1"])
    ]
    mx = by_text["mx"]
    assert [(s.name, s.qtype, s.records) for s in mx.steps] == [
        ("tree.example", "MX", ["10 mx.tree.example"]),
        ("mx.tree.example", "A", ["203.0.113.2"]),
    ]
    exists = by_text["exists:%{i}.ex.tree.example"]
    assert exists.target == "10.0.0.1.ex.tree.example"  # the macro expanded
    (void,) = exists.steps
    assert isinstance(void, Lookup)
    assert (void.name, void.records, void.void, void.void_lookups) == (
        "10.0.0.1.ex.tree.example",
        [],
        True,
        1,
    )

    redirect = by_text["redirect=red.example"]
    assert (redirect.mechanism, redirect.result, redirect.matched) == ("redirect", "fail", True)
    fetched, inner = redirect.steps
    assert isinstance(fetched, Lookup) and isinstance(inner, Record)
    assert (inner.domain, inner.via, inner.result) == ("red.example", "redirect", "fail")
    assert terms(inner) == [("ip4:192.0.2.0/24", False), ("-all", True)]
    assert (trace.lookups, trace.void_lookups) == (5, 1)

    for lookup in lookups(trace):
        assert lookup.source == "upstream"
        assert lookup.ttl == 300
        assert lookup.elapsed > 0


# -- limits -------------------------------------------------------------------


async def test_void_limit_is_shown_where_it_is_hit(resolvers: Callable[[], Resolver]) -> None:
    outcome, trace = await traced(SpfEvaluator(resolvers()), "192.0.2.1", "a@void.example")
    assert outcome.result == "permerror"
    assert outcome.explanation == "SPF Permanent Error: Void lookup limit of 2 exceeded"
    record = top(trace)
    assert terms(record) == [
        ("a:n1.void.example", False),
        ("a:n2.void.example", False),
        ("a:n3.void.example", None),  # cut short by the limit
    ]
    counts = [(s.name, s.void, s.void_lookups, s.error) for s in lookups(trace)]
    assert counts == [
        ("void.example", False, 0, None),
        ("n1.void.example", True, 1, None),
        ("n2.void.example", True, 2, None),
        ("n3.void.example", True, 3, "Void lookup limit of 2 exceeded"),
    ]
    assert record.error is None and record.result is None  # the error sits where it was raised
    assert trace.void_lookups == 3


async def test_ten_lookup_limit_is_shown_where_it_is_hit(
    resolvers: Callable[[], Resolver],
) -> None:
    outcome, trace = await traced(SpfEvaluator(resolvers()), "192.0.2.1", "a@many.example")
    assert outcome.result == "permerror"
    assert outcome.explanation == "SPF Permanent Error: Too many DNS lookups"
    tried = [s for s in top(trace).steps if isinstance(s, Term)]
    assert [t.lookups for t in tried] == list(range(1, 12))  # the count as it grows
    assert all(t.matched is False for t in tried[:10])
    last = tried[-1]
    assert (last.text, last.matched, last.error) == (
        "a:h11.many.example",
        None,
        "Too many DNS lookups",
    )
    assert last.steps == []  # the limit is hit before its lookup
    assert trace.lookups == 11


async def test_time_limit_gives_temperror_at_the_lookup(resolvers: Callable[[], Resolver]) -> None:
    evaluator = SpfEvaluator(resolvers(), lookup_time=0.5, prefetch=False)
    outcome, trace = await traced(evaluator, "192.0.2.1", "a@slow.example")
    assert outcome.result == "temperror"
    assert outcome.explanation == "SPF Temporary Error: DNS Timeout"
    include = [s for s in top(trace).steps if isinstance(s, Term)][-1]
    assert include.text == "include:stuck.example"
    (stuck,) = include.steps
    assert isinstance(stuck, Lookup)
    assert (stuck.name, stuck.qtype, stuck.source, stuck.error) == (
        "stuck.example",
        "TXT",
        "upstream",
        "DNS Timeout",
    )
    assert 0.3 < stuck.elapsed < 1.5


# -- cache, upstream, prefetch ------------------------------------------------


async def test_second_check_reads_the_cache(resolvers: Callable[[], Resolver]) -> None:
    evaluator = SpfEvaluator(resolvers(), prefetch=False)
    first, upstream = await traced(evaluator, "10.0.0.1", "a@tree.example")
    second, cached = await traced(evaluator, "10.0.0.1", "a@tree.example")
    assert decided(first) == decided(second)
    assert {s.source for s in lookups(upstream)} == {"upstream"}
    assert {s.source for s in lookups(cached)} == {"cache"}
    assert not any(s.prefetched for s in lookups(upstream) + lookups(cached))
    # The same lookups, answers and TTLs, in the same order.
    assert [(s.name, s.qtype, s.records, s.ttl) for s in lookups(upstream)] == [
        (s.name, s.qtype, s.records, s.ttl) for s in lookups(cached)
    ]
    assert all(s.elapsed < 0.05 for s in lookups(cached))


def decided(outcome: SpfOutcome) -> tuple[Any, ...]:
    """An outcome without the time it took and the time its answers have left."""
    return (
        outcome.result,
        outcome.code,
        outcome.explanation,
        outcome.mechanism,
        outcome.record,
        outcome.lookups,
    )


async def test_prefetched_answers_are_marked(resolvers: Callable[[], Resolver]) -> None:
    # The prefetcher reads tree.example's record as it arrives and asks for
    # what its terms point at; pyspf then finds those asked for already.
    outcome, trace = await traced(SpfEvaluator(resolvers()), "10.0.0.1", "a@tree.example")
    assert outcome.result == "fail"
    marked = {(s.name, s.qtype) for s in lookups(trace) if s.prefetched}
    assert ("tree.example", "TXT") not in marked  # pyspf asked for it first
    # pyspf asks for the redirect last, long after the prefetcher did.
    assert ("red.example", "TXT") in marked
    assert marked <= {(s.name, s.qtype) for s in lookups(trace)}


# -- the same evaluation ------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "sender"),
    [
        ("198.51.100.7", "a@tree.example"),
        ("203.0.113.2", "a@tree.example"),
        ("192.0.2.77", "a@tree.example"),
        ("10.0.0.1", "a@tree.example"),
        ("192.0.2.1", "a@void.example"),
        ("192.0.2.1", "a@many.example"),
        ("203.0.113.5", "a@slow.example"),
        ("192.0.2.1", "a@nothing.example"),
    ],
)
async def test_traced_result_is_the_untraced_and_pyspfs(
    dns_server: ZoneServer, resolvers: Callable[[], Resolver], ip: str, sender: str
) -> None:
    untraced = await SpfEvaluator(resolvers()).check(ip, sender, "helo.example")
    outcome, _trace = await traced(SpfEvaluator(resolvers()), ip, sender)
    alone = await asyncio.to_thread(plain_pyspf, dns_server.port, ip, sender, "helo.example")
    assert (outcome.result, outcome.code, outcome.explanation) == alone
    assert (untraced.result, untraced.code, untraced.explanation) == alone
    assert decided(outcome) == decided(untraced)


# -- the command line ---------------------------------------------------------


def write_conf(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spfpolicy.conf"
    path.write_text(text)
    return path


async def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert await asyncio.to_thread(main, argv) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return out


async def test_json_trace_uses_the_config_files_settings(
    dns_server: ZoneServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = write_conf(
        tmp_path, f"Void_Limit = 1\nLookup_Time = 7\nNameservers = {dns_server.nameserver}\n"
    )
    argv = ["check", "-c", str(conf), "--ip", "192.0.2.1", "--sender", "a@void.example"]
    out = await run([*argv, "--helo", "h.example", "--trace", "--json"], capsys)
    report = json.loads(out)
    assert report["settings"] == {
        "void_limit": 1,
        "lookup_time": 7.0,
        "dns_timeout": 2.0,
        "nameservers": [dns_server.nameserver],
    }
    assert report["result"] == "permerror"
    assert report["explanation"] == "SPF Permanent Error: Void lookup limit of 1 exceeded"
    assert (report["lookups"], report["void_lookups"]) == (2, 2)
    first, record = report["steps"]
    assert first["kind"] == "dns" and first["name"] == "void.example"
    assert record["kind"] == "record" and record["via"] == "top"
    n1, n2 = record["steps"]
    assert (n1["term"], n1["matched"], n1["lookups"]) == ("a:n1.void.example", False, 1)
    assert (n2["term"], n2["matched"], n2["lookups"]) == ("a:n2.void.example", None, 2)
    (lookup,) = n2["steps"]
    assert lookup["source"] in ("cache", "upstream")
    assert lookup == {
        "kind": "dns",
        "name": "n2.void.example",
        "type": "A",
        "records": [],
        "ttl": 300,
        # Whether the prefetcher's answer came before pyspf asked is a race.
        "source": lookup["source"],
        "prefetched": lookup["prefetched"],
        "elapsed": lookup["elapsed"],
        "void": True,
        "void_lookups": 2,
        "error": "Void lookup limit of 1 exceeded",
    }


async def test_config_files_lookup_time_ends_a_stuck_check(
    dns_server: ZoneServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = write_conf(tmp_path, f"Lookup_Time = 1\nNameservers = {dns_server.nameserver}\n")
    argv = ["check", "-c", str(conf), "--ip", "192.0.2.1", "--sender", "a@slow.example"]
    report = json.loads(await run([*argv, "--helo", "h.example", "--trace", "--json"], capsys))
    assert report["result"] == "temperror"
    assert report["settings"]["lookup_time"] == 1.0
    assert report["time"] < 2.5
    include = report["steps"][1]["steps"][-1]
    assert include["term"] == "include:stuck.example"
    assert include["steps"][0]["error"] == "DNS Timeout"


async def test_text_trace_follows_the_plain_output(
    dns_server: ZoneServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = write_conf(tmp_path, "# defaults\n")
    argv = ["check", "-c", str(conf), "--nameserver", dns_server.nameserver]
    plain = await run(
        [*argv, "--ip", "10.0.0.1", "--sender", "a@tree.example", "--helo", "h"], capsys
    )
    out = await run(
        [*argv, "--ip", "10.0.0.1", "--sender", "a@tree.example", "--helo", "h", "--trace"], capsys
    )
    lines = out.splitlines()
    # The plain output first, unchanged but for the time taken.
    assert lines[:5] == plain.splitlines()[:5]
    assert lines[5].startswith("time: ")
    assert lines[6] == (
        f"trace: Void_Limit 2, Lookup_Time 20 s, DNS_Timeout 2 s, "
        f"nameservers {dns_server.nameserver}"
    )
    tree = "\n".join(lines[7:])
    assert '  record tree.example (top): "v=spf1 ' in tree
    assert "\n    include:inc.example: no match  [lookups 2/10]\n" in tree
    assert "\n      record inc.example (include): " in tree
    assert "\n    redirect=red.example: followed (fail)\n" in tree
    assert "A 10.0.0.1.ex.tree.example: no records, ttl 300 s, upstream" in tree
    assert lines[-1] == "  lookups: 5/10, void lookups: 1"


async def test_json_without_trace_has_no_steps(
    dns_server: ZoneServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = write_conf(tmp_path, "# defaults\n")
    argv = ["check", "-c", str(conf), "--nameserver", dns_server.nameserver, "--json"]
    report = json.loads(
        await run(
            [*argv, "--ip", "198.51.100.7", "--sender", "a@tree.example", "--helo", "h"], capsys
        )
    )
    assert report["result"] == "pass"
    assert report["mechanism"] == "include:inc.example"
    assert "steps" not in report
