"""Per-domain statistics: the busiest sender domains over a sliding window,
their SPF results and actions, and the domains whose result just changed.

Strategy. The window (an hour by default) is a ring of time buckets (six of
ten minutes); each bucket is a space-saving summary (Metwally, Agrawal and El
Abbadi, "Efficient computation of frequent and top-k elements in data
streams", 2005) of at most ``slots`` domains. A domain not in a full bucket
takes the place of the one with the smallest count and inherits that count
as its error: a tracked count overestimates the truth by at most its error,
and a domain with more than N/slots hits in a bucket of N is never missed.
The minimum is found with a lazy heap instead of the paper's "stream
summary" list: an increment is just ``count += 1`` (the hot path), and the
heap holds each domain once under a count that may have gone stale (a lower
bound); an eviction pops until the key popped is still its domain's count,
pushing stale ones back with their count. That domain holds the true minimum,
and the pushes back are paid for by the increments before them. Reading merges the buckets
still in the window; a domain missing from a full bucket may have had up to
that bucket's minimum there, which the merged upper bound adds. Memory is at
most ``slots`` x ``buckets`` entries, whatever the traffic; ``memory()``
counts it.

Per tracked domain and bucket: hits per SPF result and per action kind,
exact since the domain entered the bucket. A change of result: when a
domain enters a bucket, its dominant result over the older buckets (at
least ``MIN_SUPPORT`` hits, a majority) is its baseline; once the bucket
holds ``MIN_SUPPORT`` hits with another majority result, that is a change,
logged once (and at most ``max_warnings`` per bucket span) and kept in a
short list of recent changes.

No I/O but the warning; the clock is injectable. The server records from
the one place that counts answers (``PolicyServer._answered``).
"""

from __future__ import annotations

import heapq
import logging
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from spfpolicy.metrics import NOT_CHECKED
from spfpolicy.policy import ActionKind
from spfpolicy.results import SpfResult

__all__ = ["Change", "DomainStats", "domain_of"]

log = logging.getLogger(__name__)

RESULTS: tuple[str, ...] = (*(r.value for r in SpfResult), NOT_CHECKED)
ACTIONS: tuple[str, ...] = tuple(k.value for k in ActionKind)
_RESULT_INDEX: dict[SpfResult | None, int] = {r: i for i, r in enumerate(SpfResult)}
_RESULT_INDEX[None] = len(SpfResult)
_ACTION_INDEX: dict[ActionKind, int] = {k: len(RESULTS) + i for i, k in enumerate(ActionKind)}
# Results that say the domain's record does not cover its mail, or is broken.
FAILING = frozenset({"fail", "softfail", "permerror"})
_FAILING_INDEX = tuple(RESULTS.index(r) for r in sorted(FAILING))

_TUPLE_SIZE = sys.getsizeof((0, 0, ""))
_INT_SIZE = sys.getsizeof(2**40)  # a heap item's admission order

MIN_SUPPORT = 3  # hits before a result counts as a domain's baseline or its new result
IDENTITY = "sender domain (MAIL FROM), or the HELO name when the sender is empty"


def domain_of(sender: str, helo: str) -> str:
    """The domain a request is counted under: the sender's, else the HELO name."""
    if sender:
        return sender.rpartition("@")[2].lower()
    return helo.lower()


class _Entry:
    """One domain in one bucket: count (with ``error`` of it possibly
    inherited), then hits per result and per action kind in ``tallies``."""

    __slots__ = ("baseline", "count", "error", "reported", "tallies")

    def __init__(self, count: int, error: int, baseline: int) -> None:
        self.count = count
        self.error = error
        self.tallies = [0] * (len(RESULTS) + len(ACTIONS))
        self.baseline = baseline  # result index dominant in older buckets, or -1
        self.reported = False  # this bucket's change already reported


class _Summary:
    """A space-saving summary of one time bucket."""

    __slots__ = ("entries", "heap", "slots", "start")

    def __init__(self, slots: int, start: float) -> None:
        self.slots = slots
        self.start = start
        self.entries: dict[str, _Entry] = {}
        # (count when pushed, order admitted, domain): one item per entry.
        self.heap: list[tuple[int, int, str]] = []

    def full(self) -> bool:
        return len(self.entries) >= self.slots

    def floor(self) -> int:
        """The most a domain not tracked here may have had in this bucket."""
        if not self.full():
            return 0
        return min(entry.count for entry in self.entries.values())

    def evict(self) -> int:
        """Drop a domain with the smallest count; that count."""
        heap = self.heap
        while True:
            count, order, domain = heap[0]
            now = self.entries[domain].count
            if now == count:
                heapq.heappop(heap)
                del self.entries[domain]
                return count
            heapq.heapreplace(heap, (now, order, domain))


@dataclass(frozen=True, slots=True)
class Change:
    """A domain whose dominant result moved from ``before`` to ``after``."""

    domain: str
    before: str
    after: str
    at: float  # clock time it was seen
    before_hits: int
    after_hits: int


class DomainStats:
    """The heavy-hitters table; ``record`` on every answer, ``report`` to read."""

    def __init__(
        self,
        slots: int,
        *,
        window: float = 3600.0,
        buckets: int = 6,
        clock: Callable[[], float] = time.monotonic,
        max_changes: int = 100,
        max_warnings: int = 20,
    ) -> None:
        if slots < 1 or buckets < 2 or window <= 0:
            raise ValueError("slots >= 1, buckets >= 2 and window > 0")
        self.slots = slots
        self.window = window
        self.span = window / buckets
        self.clock = clock
        self.max_warnings = max_warnings
        self._ring: deque[_Summary] = deque(maxlen=buckets)
        now = clock()
        self._current = _Summary(slots, now)
        self._ring.append(self._current)
        self._ends = now + self.span
        self.changes: deque[Change] = deque(maxlen=max_changes)
        self.changes_seen = 0
        self.warnings_suppressed = 0
        self._warnings_left = max_warnings
        self.recorded = 0
        self._admitted = 0

    # -- the hot path ------------------------------------------------------

    def record(self, domain: str, result: SpfResult | None, kind: ActionKind) -> None:
        """One answer for ``domain``."""
        now = self.clock()
        if now >= self._ends:
            self._rotate(now)
        self.recorded += 1
        summary = self._current
        entry = summary.entries.get(domain)
        if entry is None:
            entry = self._admit(summary, domain)
        else:
            entry.count += 1
        tallies = entry.tallies
        index = _RESULT_INDEX[result]
        tallies[index] += 1
        tallies[_ACTION_INDEX[kind]] += 1
        if index != entry.baseline and entry.baseline >= 0 and not entry.reported:
            self._check_change(domain, entry, now)

    def _admit(self, summary: _Summary, domain: str) -> _Entry:
        baseline = self._baseline(domain)
        if summary.full():
            # Space-saving: the new domain replaces one with the smallest
            # count and inherits that count as its possible overestimate.
            smallest = summary.evict()
            entry = _Entry(smallest + 1, smallest, baseline)
        else:
            entry = _Entry(1, 0, baseline)
        summary.entries[domain] = entry
        self._admitted += 1
        heapq.heappush(summary.heap, (entry.count, self._admitted, domain))
        return entry

    # -- buckets -----------------------------------------------------------

    def _rotate(self, now: float) -> None:
        # An idle stretch leaves empty buckets: the ring stays contiguous in time.
        skipped = int((now - self._ends) // self.span)
        start = self._ends
        for _ in range(min(skipped, self._ring.maxlen or 0)):
            self._ring.append(_Summary(self.slots, start))
            start += self.span
        start = self._ends + skipped * self.span
        self._current = _Summary(self.slots, start)
        self._ring.append(self._current)
        self._ends = start + self.span
        self._warnings_left = self.max_warnings

    def _live(self) -> list[_Summary]:
        """The buckets of the window, oldest first (the ring drops older ones)."""
        now = self.clock()
        if now >= self._ends:
            self._rotate(now)
        return list(self._ring)

    def _baseline(self, domain: str) -> int:
        """The result index a majority of the domain's older hits had, or -1."""
        totals = [0] * len(RESULTS)
        for summary in self._ring:
            if summary is self._current:
                continue
            entry = summary.entries.get(domain)
            if entry is not None:
                for i in range(len(RESULTS)):
                    totals[i] += entry.tallies[i]
        return _majority(totals)

    # -- changes -----------------------------------------------------------

    def _check_change(self, domain: str, entry: _Entry, now: float) -> None:
        now_index = _majority(entry.tallies[: len(RESULTS)])
        if now_index < 0 or now_index == entry.baseline:
            return
        entry.reported = True
        before, after = RESULTS[entry.baseline], RESULTS[now_index]
        previous = next((c for c in reversed(self.changes) if c.domain == domain), None)
        if previous is not None and (previous.before, previous.after) == (before, after):
            return  # the same change, seen again in a later bucket: logged already
        older = sum(
            e.tallies[entry.baseline]
            for s in self._ring
            if s is not self._current and (e := s.entries.get(domain)) is not None
        )
        change = Change(domain, before, after, now, older, entry.tallies[now_index])
        self.changes.append(change)
        self.changes_seen += 1
        if self._warnings_left > 0:
            self._warnings_left -= 1
            log.warning(
                "SPF result of %s changed: %s before (%d hits in the last %.0f min), "
                "%s now (%d hits)",
                domain,
                before,
                older,
                self.window / 60,
                after,
                change.after_hits,
            )
        else:
            self.warnings_suppressed += 1

    # -- reading -----------------------------------------------------------

    def entries(self) -> int:
        return sum(len(s.entries) for s in self._ring)

    def memory(self) -> int:
        """Approximate bytes held by the table (keys shared with requests included)."""
        total = sys.getsizeof(self._ring)
        for summary in self._ring:
            total += sys.getsizeof(summary) + sys.getsizeof(summary.entries)
            total += sys.getsizeof(summary.heap)
            total += len(summary.heap) * (_TUPLE_SIZE + _INT_SIZE)
            for domain, entry in summary.entries.items():
                total += sys.getsizeof(domain) + sys.getsizeof(entry)
                total += sys.getsizeof(entry.tallies)
        return total

    def report(self, top: int = 20) -> dict[str, Any]:
        """The JSON document of ``/domains``: top domains by volume, top
        failing domains, recent changes, and the table's size."""
        live = self._live()
        merged: dict[str, list[int]] = {}  # domain -> [count, error, *tallies]
        for summary in live:
            for domain, entry in summary.entries.items():
                row = merged.get(domain)
                if row is None:
                    merged[domain] = [entry.count, entry.error, *entry.tallies]
                else:
                    row[0] += entry.count
                    row[1] += entry.error
                    for i, n in enumerate(entry.tallies):
                        row[2 + i] += n
        floors = [(s, floor) for s in live if (floor := s.floor())]

        def describe(domain: str, row: list[int]) -> dict[str, Any]:
            missed = sum(floor for s, floor in floors if domain not in s.entries)
            tallies = row[2:]
            return {
                "domain": domain,
                "count": row[0],
                "error": row[1],
                # The true count in the window lies in [min, max].
                "min": row[0] - row[1],
                "max": row[0] + missed,
                "failing": sum(tallies[i] for i in _FAILING_INDEX),
                "results": {r: n for r, n in zip(RESULTS, tallies, strict=False) if n},
                "actions": {
                    a: n for a, n in zip(ACTIONS, tallies[len(RESULTS) :], strict=True) if n
                },
            }

        by_volume = sorted(merged.items(), key=lambda item: (-item[1][0], item[0]))[:top]
        failing = [(d, row) for d, row in merged.items() if any(row[2 + i] for i in _FAILING_INDEX)]
        failing.sort(key=lambda item: (-sum(item[1][2 + i] for i in _FAILING_INDEX), item[0]))
        now = self.clock()
        return {
            "identity": IDENTITY,
            "window_seconds": self.window,
            "bucket_seconds": self.span,
            "buckets": len(live),
            "slots_per_bucket": self.slots,
            "entries": self.entries(),
            "max_entries": self.slots * (self._ring.maxlen or 0),
            "approx_bytes": self.memory(),
            "recorded": self.recorded,
            "top": [describe(d, row) for d, row in by_volume],
            "failing": [describe(d, row) for d, row in failing[:top]],
            "changes": [
                {
                    "domain": c.domain,
                    "before": c.before,
                    "after": c.after,
                    "seconds_ago": round(now - c.at, 1),
                    "before_hits": c.before_hits,
                    "after_hits": c.after_hits,
                }
                for c in reversed(self.changes)
                if now - c.at <= self.window
            ][:top],
            "changes_seen": self.changes_seen,
            "warnings_suppressed": self.warnings_suppressed,
        }


def _majority(counts: list[int]) -> int:
    """The index holding a strict majority of at least MIN_SUPPORT hits, or -1."""
    total = sum(counts)
    best = max(range(len(counts)), key=counts.__getitem__)
    if counts[best] >= MIN_SUPPORT and 2 * counts[best] > total:
        return best
    return -1
