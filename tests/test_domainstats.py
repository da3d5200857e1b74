"""The per-domain table (domainstats.py) alone: space-saving counts and their
error bounds, the sliding window on a fake clock, bounded memory, and the
result-change detection with its once-only warning.
"""

from __future__ import annotations

import logging
import random
from collections import Counter

import pytest

from fakeclock import FakeClock
from spfpolicy.domainstats import MIN_SUPPORT, DomainStats, domain_of
from spfpolicy.policy import ActionKind
from spfpolicy.results import SpfResult

PASS, FAIL, PERM = SpfResult.PASS, SpfResult.FAIL, SpfResult.PERMERROR
PREPEND, REJECT = ActionKind.PREPEND, ActionKind.REJECT


def rows(stats: DomainStats, top: int = 1000) -> dict[str, dict[str, object]]:
    return {row["domain"]: row for row in stats.report(top)["top"]}


@pytest.mark.parametrize(
    ("sender", "helo", "domain"),
    [
        pytest.param("a@Example.ORG", "mx.x", "example.org", id="sender"),
        pytest.param("a@b@c.example", "mx.x", "c.example", id="last-at"),
        pytest.param("", "MX.Client.Example", "mx.client.example", id="null-sender-helo"),
        pytest.param("postmaster", "mx.x", "postmaster", id="no-at"),
    ],
)
def test_domain_of(sender: str, helo: str, domain: str) -> None:
    assert domain_of(sender, helo) == domain


def test_exact_under_capacity() -> None:
    clock = FakeClock()
    stats = DomainStats(10, clock=clock)
    sent: Counter[str] = Counter()
    for n in range(200):
        domain = f"d{n % 7}.example"
        result = FAIL if n % 3 == 0 else PASS
        stats.record(domain, result, REJECT if result is FAIL else PREPEND)
        sent[domain] += 1
    got = rows(stats)
    assert {d: r["count"] for d, r in got.items()} == sent
    assert all(r["error"] == 0 and r["min"] == r["count"] == r["max"] for r in got.values())
    d0 = got["d0.example"]
    assert d0["results"] == {"fail": 10, "pass": 19}  # n = 0, 7, 14, ... and n % 3
    assert d0["actions"] == {"550": 10, "prepend": 19}
    report = stats.report(3)
    assert [r["domain"] for r in report["top"]] == ["d0.example", "d1.example", "d2.example"]
    assert report["failing"][0]["failing"] == max(r["failing"] for r in got.values())


def test_not_checked_is_a_result_of_its_own() -> None:
    stats = DomainStats(4, clock=FakeClock())
    stats.record("white.example", None, ActionKind.DUNNO)
    assert rows(stats)["white.example"]["results"] == {"not_checked": 1}
    assert rows(stats)["white.example"]["actions"] == {"dunno": 1}


def test_error_bounds_over_capacity() -> None:
    # Zipf-like traffic over many more domains than slots: every reported
    # count brackets the truth, and the heavy hitters are all found.
    rng = random.Random(7)
    clock = FakeClock()
    stats = DomainStats(50, clock=clock)
    names = [f"d{i}.example" for i in range(2000)]
    weights = [1 / (i + 1) for i in range(len(names))]
    truth: Counter[str] = Counter(rng.choices(names, weights, k=20_000))
    stream = list(truth.elements())
    rng.shuffle(stream)
    for domain in stream:
        stats.record(domain, PASS, PREPEND)
    report = stats.report(50)
    assert report["entries"] == 50
    for row in report["top"]:
        true = truth[row["domain"]]
        assert row["min"] <= true <= row["max"] == row["count"]
        assert row["error"] <= len(stream) // 50  # the space-saving bound, N/k
    found = {row["domain"] for row in report["top"]}
    heavy = {d for d, n in truth.items() if n > len(stream) // 50}
    assert heavy and heavy <= found


def test_window_expires_old_buckets() -> None:
    clock = FakeClock()
    stats = DomainStats(10, window=600, buckets=6, clock=clock)  # 100 s buckets
    stats.record("old.example", PASS, PREPEND)
    clock.now += 350
    stats.record("new.example", PASS, PREPEND)
    assert set(rows(stats)) == {"old.example", "new.example"}
    clock.now += 300  # old.example's bucket is now more than 600 s back
    assert set(rows(stats)) == {"new.example"}
    clock.now += 10_000  # a long idle stretch: everything ages out
    assert rows(stats) == {}
    assert stats.report()["entries"] == 0
    stats.record("again.example", PASS, PREPEND)
    assert set(rows(stats)) == {"again.example"}


def test_counts_merge_across_buckets() -> None:
    clock = FakeClock()
    stats = DomainStats(2, window=600, buckets=6, clock=clock)
    for _ in range(5):
        stats.record("a.example", PASS, PREPEND)
    clock.now += 100
    stats.record("b.example", PASS, PREPEND)
    stats.record("c.example", PASS, PREPEND)  # bucket 2 full: a.example may hide below
    stats.record("a.example", PASS, PREPEND)  # replaces one, inherits count 1
    got = rows(stats)
    assert got["a.example"]["count"] == 7
    assert got["a.example"]["min"] == 6 == got["a.example"]["count"] - got["a.example"]["error"]
    # b.example and c.example: one was evicted; the other's bucket-1 absence is exact.
    assert len(got) == 2


def test_memory_is_bounded_under_a_flood_of_unique_domains() -> None:
    clock = FakeClock()
    stats = DomainStats(100, window=600, buckets=6, clock=clock)
    sizes = []
    for n in range(60_000):
        stats.record(f"u{n}.flood.example", PASS, PREPEND)
        if n % 1000 == 0:
            clock.now += 20  # walk through the window several times
        if n % 10_000 == 9_999:
            sizes.append(stats.memory())
    report = stats.report()
    assert report["entries"] <= report["max_entries"] == 600
    assert report["approx_bytes"] == stats.memory() > 0
    # Past the first full window the bytes stop growing (within noise).
    assert max(sizes[3:]) <= 1.2 * sizes[2]
    assert report["recorded"] == 60_000


def test_result_change_is_detected_and_warned_once(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    stats = DomainStats(10, window=3600, buckets=6, clock=clock)
    for _ in range(20):
        stats.record("broken.example", PASS, PREPEND)
        stats.record("steady.example", PASS, PREPEND)
    clock.now += 700  # the next bucket: the domain publishes a broken record
    with caplog.at_level(logging.WARNING, logger="spfpolicy.domainstats"):
        for _ in range(MIN_SUPPORT - 1):
            stats.record("broken.example", PERM, PREPEND)
        assert stats.report()["changes"] == []  # not enough hits yet
        for _ in range(10):
            stats.record("broken.example", PERM, PREPEND)
            stats.record("steady.example", PASS, PREPEND)
        clock.now += 700  # and still in the bucket after: the same change, not logged again
        for _ in range(10):
            stats.record("broken.example", PERM, PREPEND)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "broken.example" in warnings[0] and "pass before" in warnings[0]
    assert "permerror now" in warnings[0]
    changes = stats.report()["changes"]
    assert [(c["domain"], c["before"], c["after"]) for c in changes] == [
        ("broken.example", "pass", "permerror")
    ]
    assert changes[0]["before_hits"] == 20 and changes[0]["seconds_ago"] == 700.0


def test_a_mixed_domain_is_not_a_change() -> None:
    clock = FakeClock()
    stats = DomainStats(10, clock=clock)
    for n in range(20):
        stats.record("mixed.example", PASS if n % 2 else FAIL, PREPEND)
    clock.now += 700
    for n in range(20):
        stats.record("mixed.example", FAIL if n % 2 else PASS, PREPEND)
    assert stats.report()["changes"] == []


def test_warnings_are_rate_bounded(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    stats = DomainStats(100, clock=clock, max_warnings=3)
    domains = [f"d{i}.example" for i in range(10)]
    for domain in domains:
        for _ in range(MIN_SUPPORT):
            stats.record(domain, PASS, PREPEND)
    clock.now += 700
    with caplog.at_level(logging.WARNING, logger="spfpolicy.domainstats"):
        for domain in domains:
            for _ in range(MIN_SUPPORT):
                stats.record(domain, FAIL, REJECT)
    assert len(caplog.records) == 3
    report = stats.report()
    assert report["changes_seen"] == 10 and report["warnings_suppressed"] == 7
    assert len(report["changes"]) == 10


def test_bad_sizes() -> None:
    with pytest.raises(ValueError):
        DomainStats(0)
    with pytest.raises(ValueError):
        DomainStats(10, buckets=1)
