"""The memory of names whose lookups keep failing: after ``threshold``
timeouts or SERVFAILs of one name within ``window`` seconds the name is held
down for ``hold`` seconds, and lookups of it fail at once instead of making
another smtpd wait Lookup_Time for the same silence.

RFC 2308 section 7 lets a resolver remember a server failure (7.1) or a dead
server (7.2) for at most five minutes: ``hold`` is capped at MAX_HOLD.

Rules:
- the name held down is the one whose lookups failed, not the sender domain
  that led to it: a record that answers but includes a dead provider fails
  through that include only;
- an answer (records, NXDOMAIN or NODATA) forgets the name's failures and
  ends its hold-down: a server that answered is not dead;
- when a hold-down ends, the next lookup of the name is its probe: it goes
  upstream and its check waits for it as for any lookup, while other lookups
  of the name still fail at once; an answer ends the hold-down, a failure
  begins another one. So one lookup per hold-down and name reaches the
  network, and a name that answers again is released within one hold-down;
- both tables are bounded (MAX_FAILING names with failures below the
  threshold, MAX_HELD names held), oldest dropped first, so a flood of random
  failing names keeps memory flat and cannot push held names out.

Pure bookkeeping with an injectable clock; resolver.py asks it and tells it.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

# RFC 2308 section 7.1/7.2: a failure is not remembered for more than 5 minutes.
MAX_HOLD = 300.0
MAX_FAILING = 10_000  # names with recent failures, below the threshold
MAX_HELD = 10_000  # names held down (or whose hold-down ended unprobed)


@dataclass(slots=True)
class Hold:
    """One name's hold-down: until when, why (the last failure's reason)."""

    until: float
    reason: str
    probing: bool = False  # the probe lookup is upstream


@dataclass(slots=True)
class SlowNameStats:
    holds: int = 0  # hold-downs begun
    held_lookups: int = 0  # lookups failed at once by a hold-down
    probes: int = 0  # lookups sent when a hold-down ended
    recoveries: int = 0  # hold-downs ended by an answer


class SlowNames:
    """Failures per name, and the names held down; ``threshold`` 0 is off."""

    def __init__(
        self,
        threshold: int,
        window: float,
        hold: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_failing: int = MAX_FAILING,
        max_held: int = MAX_HELD,
    ) -> None:
        self.clock = clock
        self.max_failing = max_failing
        self.max_held = max_held
        self.stats = SlowNameStats()
        # name -> times of its recent failures, oldest first (at most threshold).
        self._failing: OrderedDict[str, tuple[float, ...]] = OrderedDict()
        self._held: OrderedDict[str, Hold] = OrderedDict()
        self.threshold = 0
        self.window = window
        self.hold = hold
        self.configure(threshold, window, hold)

    def configure(self, threshold: int, window: float, hold: float) -> None:
        """New settings (a reload); switched off, everything is forgotten."""
        self.threshold, self.window, self.hold = threshold, window, min(hold, MAX_HOLD)
        if not threshold:
            self._failing.clear()
            self._held.clear()

    @property
    def any_held(self) -> bool:
        return bool(self._held)

    def __len__(self) -> int:
        """Names remembered (failing or held): what memory the table holds."""
        return len(self._failing) + len(self._held)

    def held_now(self) -> int:
        now = self.clock()
        return sum(1 for hold in self._held.values() if hold.until > now or hold.probing)

    # -- asked by the resolver --------------------------------------------------

    def check(self, name: str) -> Hold | None:
        """The hold-down that fails a lookup of ``name`` now, or None: the
        lookup may go upstream (``probe`` says whether as a probe)."""
        hold = self._held.get(name)
        if hold is None or not (hold.probing or self.clock() < hold.until):
            return None
        self.stats.held_lookups += 1
        return hold

    def probe(self, name: str) -> bool:
        """After ``check`` let a lookup through: whether it is the probe of a
        hold-down that has ended (it must then be sent afresh, not share a
        query sent before the hold-down that may still be unanswered)."""
        hold = self._held.get(name)
        if hold is None or hold.probing:
            return False
        hold.probing = True
        self.stats.probes += 1
        return True

    def held(self, name: str) -> bool:
        """Whether a lookup of ``name`` would fail at once (counts nothing)."""
        hold = self._held.get(name)
        return hold is not None and (hold.probing or self.clock() < hold.until)

    # -- told by the resolver ---------------------------------------------------

    def answered(self, name: str) -> None:
        """A lookup of ``name`` got an answer."""
        if self._failing:
            self._failing.pop(name, None)
        if self._held and self._held.pop(name, None) is not None:
            self.stats.recoveries += 1
            log.info("DNS %s answers again: its hold-down is over", name)

    def abandoned(self, name: str) -> None:
        """A probe ended without an outcome (shutdown): the next lookup probes."""
        hold = self._held.get(name)
        if hold is not None:
            hold.probing = False

    def failed(self, name: str, reason: str) -> None:
        """A lookup of ``name`` timed out or failed (SERVFAIL and the like)."""
        if not self.threshold:
            return
        now = self.clock()
        hold = self._held.get(name)
        if hold is not None:
            if hold.probing or now >= hold.until:
                self._begin(name, reason, now, again=True)
            return  # a lookup sent before the hold-down began
        times = [t for t in self._failing.pop(name, ()) if t > now - self.window]
        times.append(now)
        if len(times) >= self.threshold:
            self._begin(name, reason, now, failures=len(times))
            return
        self._failing[name] = tuple(times)
        while len(self._failing) > self.max_failing:
            self._failing.popitem(last=False)

    def _begin(
        self, name: str, reason: str, now: float, *, again: bool = False, failures: int = 0
    ) -> None:
        self._held.pop(name, None)
        self._held[name] = Hold(now + self.hold, reason)
        self.stats.holds += 1
        if again:
            log.warning(
                "DNS %s still fails (%s): held down for another %gs", name, reason, self.hold
            )
        else:
            log.warning(
                "DNS %s failed %d times within %gs (%s): held down for %gs, "
                "checks that need it get TempError at once",
                name,
                failures,
                self.window,
                reason,
                self.hold,
            )
        held = self._held
        # Hold-downs long over and never probed (nobody asked again) go first.
        while held:
            first = next(iter(held.values()))
            if len(held) <= self.max_held and (first.probing or first.until + self.hold > now):
                break
            held.popitem(last=False)
