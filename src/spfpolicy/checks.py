"""The DNS-backed checks the policy asks for: SPF evaluations (with a short
result cache in front of pyspf) and forward-confirmed PTR names.

The result cache answers a repeated check (same client IP, sender, HELO and
void limit) without re-running pyspf. An entry never outlives the first of the
DNS answers its evaluation used to expire (an answer taken from the cache has
only what is left of its TTL), nor ``Result_Cache_TTL``; an outcome with no
time left, and a temperror, are not cached, so a DNS hiccup is not remembered.

With Shared_Cache set, a miss there asks the shared level (Redis, through
``sharedcache.py``) before evaluating, unless the checked domain's record is
cached here already (a new client of a known domain: evaluated here); a
fresh outcome goes there too, after the answer, for what is left of its time.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from spfpolicy.cache import TtlLruCache
from spfpolicy.evaluator import SpfEvaluator
from spfpolicy.plan import SpfPlans
from spfpolicy.resolver import CnameChainTooLong, DnsTempError, Resolver
from spfpolicy.results import NO_MAIL_RECORD, SpfOutcome, SpfResult

if TYPE_CHECKING:  # imported only when Shared_Cache is set (it needs redis)
    from spfpolicy.sharedcache import SharedCache

log = logging.getLogger(__name__)

# RFC 7208 section 4.6.4 bounds a ptr mechanism to 10 PTR names; the same
# bound keeps a hostile reverse zone from making Domain_Whitelist_PTR fan out.
MAX_PTR_NAMES = 10

# One string per check where its parts allow (see DnsChecks._key).
_ResultKey = str | tuple[str, str, str, int]

# Cached outcomes are shared: one object per distinct slimmed outcome (a
# result, its explanation and mechanism), not one per cached check. Cleared
# when full, as explanations may carry the sender (exp= macros).
MAX_SHARED_OUTCOMES = 4096
# Bound of DnsChecks._shared_missed: checks in flight, not a cache.
MAX_SHARED_MISSED = 4096
_SHARED: dict[SpfOutcome, SpfOutcome] = {}


def _checked_domain(sender: str, helo: str) -> str:
    """The domain whose record a check evaluates first."""
    return (sender.rpartition("@")[2] if sender else helo).rstrip(".").lower()


class DnsChecks:
    """Implements ``deciding.Checks`` with the shared resolver and evaluator.

    ``void_limit`` is the global Void_Limit, for a check that names none;
    the policy always names the one in effect (a Per_User line may set it).
    """

    def __init__(
        self,
        evaluator: SpfEvaluator,
        *,
        void_limit: int,
        result_cache_size: int,
        result_cache_ttl: float,
        clock: Callable[[], float] = time.monotonic,
        plans: bool = True,
    ) -> None:
        self.evaluator = evaluator
        self.resolver: Resolver = evaluator.resolver
        self.void_limit = void_limit
        self.result_cache_ttl = result_cache_ttl
        self.results: TtlLruCache[_ResultKey, SpfOutcome] = TtlLruCache(
            result_cache_size, clock=clock
        )
        self.result_hits = 0
        self.evaluated_now = 0  # checks evaluated without waiting (cached DNS)
        self.joined = 0  # checks that waited for the same check's evaluation
        self.shared: SharedCache | None = None  # the second level, if any
        # Checks whose read (read_shared) found no outcome in the shared
        # level: their evaluation, next, goes straight to DNS. Taken out by
        # it; one left behind (a request that went away) costs at most one
        # Redis read skipped later. Cleared when full.
        self._shared_missed: set[str] = set()
        # Checks being evaluated (or read from the shared level), by result
        # key and lookup time: a request asking for one of them meanwhile
        # waits for that outcome instead of evaluating it again. A client
        # that opens several connections at once (bulk senders do) asks for
        # the same HELO check on each before the first has its answer. (The
        # bench's workloads send a client's messages one at a time, so they
        # rarely make such repeats.)
        self._flights: dict[tuple[_ResultKey, float], asyncio.Future[SpfOutcome]] = {}
        # Compiled plans of fully cached trees (plan.py): a new client of a
        # known domain without running pyspf.
        self.plans: SpfPlans | None = None
        if plans:
            self.plans = SpfPlans(
                self.resolver.peek,
                clock=self.resolver.clock,
                default_explanation=evaluator.default_explanation,
            )

    def _limit(self, void_limit: int | None) -> int:
        return self.void_limit if void_limit is None else void_limit

    @staticmethod
    def _key(ip: str, sender: str, helo: str, void_limit: int) -> _ResultKey:
        # The void limit the check is evaluated with is part of its key: one
        # recipient's Per_User Void_Limit must not answer another's check.
        # One string costs a third of a tuple of its parts. Request values
        # come cleaned (no NUL), so NUL separates them unambiguously; anything
        # else gets the tuple, which never equals a string.
        key = f"{ip}\0{sender}\0{helo.lower()}\0{void_limit}"
        if key.count("\0") == 3:
            return key
        return (ip, sender, helo.lower(), void_limit)

    def cached_spf(
        self, ip: str, sender: str, helo: str, *, void_limit: int | None = None
    ) -> SpfOutcome | None:
        """From the result cache, or evaluated at once when the DNS answers
        the evaluation needs are all cached (a known domain, a new client)."""
        void_limit = self._limit(void_limit)
        key = self._key(ip, sender, helo, void_limit)
        cached = self._hit(key)
        if cached is not None:
            return cached
        planned = self._planned(ip, sender, helo, void_limit)
        if planned is None:
            # Not even the checked domain's TXT is cached: pyspf would stop
            # at its first lookup, so do not start it.
            if self.resolver.peek(_checked_domain(sender, helo), "TXT") is None:
                return None
            if self._built_now(ip, sender, helo, void_limit):
                planned = self._planned(ip, sender, helo, void_limit)
        if planned is not None:
            self.evaluated_now += 1
            return self._store(key, *planned)
        full = self.evaluator.check_now(ip, sender, helo, void_limit=void_limit)
        if full is None:
            return None
        self.evaluated_now += 1
        self._learn(ip, sender, helo, void_limit, full)
        return self._keep(key, full)

    def _planned(
        self, ip: str, sender: str, helo: str, void_limit: int
    ) -> tuple[SpfOutcome, float] | None:
        """The outcome as the result cache keeps it and its time to live,
        from a compiled plan (plan.py), if one has the answer."""
        if self.plans is None:
            return None
        try:
            return self.plans.kept(ip, sender, helo, void_limit, _for_decisions)
        except Exception:  # a bug in plan.py: pyspf answers, from now on
            log.exception("SPF plan for %r/%r failed; plans are off until a reload", sender, helo)
            self.plans = None
            return None

    def _learn(self, ip: str, sender: str, helo: str, void_limit: int, full: SpfOutcome) -> None:
        # A plan for the next client of this domain.
        if self.plans is not None:
            self._building(self.plans.learn, ip, sender, helo, void_limit, full)

    def _built_now(self, ip: str, sender: str, helo: str, void_limit: int) -> bool:
        # The plan pyspf's evaluation of this check would build, built first.
        plans = self.plans
        if plans is None:
            return False
        return bool(self._building(plans.build_due, ip, sender, helo, void_limit))

    def _building(
        self, build: Callable[..., Any], ip: str, sender: str, helo: str, *rest: Any
    ) -> Any:
        # A cache failure (here, a compiler failure) never fails an answer.
        try:
            return build(ip, sender, helo, *rest)
        except Exception:
            log.exception(
                "building an SPF plan for %r/%r failed; plans are off until a reload",
                sender,
                helo,
            )
            self.plans = None
            return None

    def cached_lifetime(
        self,
        ip: str,
        sender: str,
        helo: str,
        outcome: SpfOutcome,
        *,
        void_limit: int | None = None,
    ) -> float:
        key = self._key(ip, sender, helo, self._limit(void_limit))
        if self.results.get(key) is not outcome:
            return 0.0
        return self.results.remaining_ttl(key) or 0.0

    async def spf(
        self,
        ip: str,
        sender: str,
        helo: str,
        *,
        lookup_time: float,
        void_limit: int | None = None,
    ) -> SpfOutcome:
        void_limit = self._limit(void_limit)
        key = self._key(ip, sender, helo, void_limit)
        cached = self._hit(key)
        if cached is not None:
            return cached
        planned = self._planned(ip, sender, helo, void_limit)
        if planned is not None:
            return self._store(key, *planned)
        flight_key = (key, lookup_time)
        flights = self._flights
        while (flight := flights.get(flight_key)) is not None:
            self.joined += 1
            try:
                return await asyncio.shield(flight)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not flight.cancelled() or task is None or task.cancelling():
                    raise  # this request's own cancellation
                # The request evaluating it went away first: evaluate here.
        flight = asyncio.get_running_loop().create_future()
        flights[flight_key] = flight
        try:
            outcome = await self._evaluated(key, ip, sender, helo, lookup_time, void_limit)
        except BaseException:
            flight.cancel()  # its waiters evaluate it themselves
            raise
        finally:
            if flights.get(flight_key) is flight:
                del flights[flight_key]
        flight.set_result(outcome)
        return outcome

    async def _evaluated(
        self, key: _ResultKey, ip: str, sender: str, helo: str, lookup_time: float, void_limit: int
    ) -> SpfOutcome:
        """A check missing from the result cache and the plans: the shared
        level's outcome, or pyspf's evaluation (kept)."""
        if self.shared is not None and isinstance(key, str) and self.result_cache_ttl > 0:
            if key in self._shared_missed:
                self._shared_missed.discard(key)  # just read, not there
            elif not self._known_here(sender, helo):
                cached = await self._from_shared(key)
                if cached is not None:
                    return cached
                self._shared_missed.discard(key)  # read_shared's, if this read joined it
        full = await self.evaluator.check(
            ip, sender, helo, lookup_time=lookup_time, void_limit=void_limit
        )
        self._learn(ip, sender, helo, void_limit, full)
        return self._keep(key, full)

    async def _from_shared(self, key: str) -> SpfOutcome | None:
        """The shared level's outcome for ``key``, kept in the result cache
        for what is left of its time (and no longer than Result_Cache_TTL)
        as soon as Redis's reply is in, so that a check read in the same
        trip (the request's next) finds it there. Concurrent reads of one
        key are one Redis read (sharedcache.py)."""
        assert self.shared is not None
        ip, sender, helo, void_limit = key.split("\0")
        found = await self.shared.get_outcome(
            ip,
            sender,
            helo,
            int(void_limit),
            arrived=functools.partial(self._keep_shared, key),
        )
        # A decoded outcome is already as decisions read it (sharedcache's
        # decode_outcome fills no other field), and one object per value.
        return None if found is None else found[0]

    def _known_here(self, sender: str, helo: str) -> bool:
        """Whether the checked domain's record is cached here, or on its
        way: then its check is evaluated here (from cached answers, or a
        plan, or with the few lookups left, each through the shared
        level), not read from the shared level. A new client of a known
        domain is a check Redis rarely holds (its key is the client's
        address), and reading it would cost a round trip and its CPU for
        what the cached records answer in microseconds."""
        domain = _checked_domain(sender, helo)
        resolver = self.resolver
        return (
            resolver.peek(domain, "TXT") is not None or resolver.pending(domain, "TXT") is not None
        )

    def _keep_shared(self, key: str, outcome: SpfOutcome, remaining: float) -> None:
        ttl = min(remaining, self.result_cache_ttl)
        if ttl > 0:
            self.results.set(key, outcome, ttl)

    def prefetch(self, ip: str, sender: str, helo: str, *, void_limit: int | None = None) -> None:
        key = self._key(ip, sender, helo, self._limit(void_limit))
        if self.results.get(key) is not None:
            return
        # The outcome itself may be in Redis: read it with the request's
        # other checks (one round trip, no task waiting for it), and fetch
        # DNS only if it is not there.
        fetch = functools.partial(self.evaluator.prefetch, ip, sender, helo)
        if not self._read_shared(key, missed=fetch):
            fetch()

    def read_shared(
        self,
        ip: str,
        sender: str,
        helo: str,
        *,
        void_limit: int | None = None,
        settled: Callable[[bool], None],
    ) -> bool:
        key = self._key(ip, sender, helo, self._limit(void_limit))
        if self.results.get(key) is not None:
            return False
        return self._read_shared(key, settled=settled)

    def _read_shared(
        self,
        key: _ResultKey,
        *,
        settled: Callable[[bool], None] | None = None,
        missed: Callable[[], None] | None = None,
    ) -> bool:
        """Read ``key``'s outcome from the shared level with this turn's
        other reads; a found one goes to the result cache. Once the read is
        over, ``settled`` gets whether it found the outcome, and ``missed``
        is called if it did not. False when there is no such read (no
        shared level, or Redis in its backoff): nothing is called."""
        if self.shared is None or not isinstance(key, str) or self.result_cache_ttl <= 0:
            return False
        # The key's parts (its HELO lowercased) name the Redis entry.
        ip, sender, helo, limit = key.split("\0")
        if self._known_here(sender, helo):
            return False
        return self.shared.want_outcome(
            ip,
            sender,
            helo,
            int(limit),
            arrived=functools.partial(self._arrived_shared, key, settled),
            missed=functools.partial(self._missed_shared, key, settled, missed),
        )

    def _arrived_shared(
        self,
        key: str,
        settled: Callable[[bool], None] | None,
        outcome: SpfOutcome,
        remaining: float,
    ) -> None:
        self._keep_shared(key, outcome, remaining)
        if settled is not None:
            settled(True)

    def _missed_shared(
        self,
        key: str,
        settled: Callable[[bool], None] | None,
        missed: Callable[[], None] | None,
    ) -> None:
        if missed is not None:
            missed()
        if settled is not None:
            # The check waiting for this outcome (spf, next) need not read
            # Redis again. (A prefetched check may never be asked for.)
            if len(self._shared_missed) >= MAX_SHARED_MISSED:
                self._shared_missed.clear()
            self._shared_missed.add(key)
            settled(False)

    def _hit(self, key: _ResultKey) -> SpfOutcome | None:
        """The result cache's outcome for ``key``, counted as a hit."""
        cached = self.results.get(key)
        if cached is not None:
            self.result_hits += 1
        return cached

    def _keep(self, key: _ResultKey, full: SpfOutcome) -> SpfOutcome:
        """The outcome as decisions read it, kept in the result cache unless it
        is a temperror or has no time left (a ttl <= 0 stores nothing)."""
        outcome = _for_decisions(full)
        if outcome.result is not SpfResult.TEMPERROR:
            self._store(key, outcome, self.result_cache_ttl if full.ttl is None else full.ttl)
        return outcome

    def _store(self, key: _ResultKey, outcome: SpfOutcome, ttl: float) -> SpfOutcome:
        """Keeps ``outcome`` for at most ``ttl`` (and Result_Cache_TTL), here
        and, after the answer, in the shared level."""
        if self.result_cache_ttl > 0:
            ttl = min(ttl, self.result_cache_ttl)
            self.results.set(key, outcome, ttl)
            if self.shared is not None and isinstance(key, str) and ttl > 0:
                ip, sender, helo, void_limit = key.split("\0")
                self.shared.put_outcome(ip, sender, helo, int(void_limit), outcome, ttl)
        return outcome

    async def confirmed_ptr_names(self, ip: str, *, lookup_time: float) -> list[str]:
        """PTR names of ``ip`` whose A/AAAA records include ``ip``.

        A name that cannot be confirmed in time, or whose lookup fails, is
        left out: only a forward-confirmed name may whitelist a client.
        """
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return []
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        qtype = "A" if address.version == 4 else "AAAA"
        try:
            async with asyncio.timeout(lookup_time):
                ptr = await self.resolver.resolve(address.reverse_pointer, "PTR")
                names = [str(n).lower() for n in ptr.records[:MAX_PTR_NAMES]]
                answers = await asyncio.gather(
                    *(self.resolver.resolve(name, qtype) for name in names),
                    return_exceptions=True,
                )
        except (TimeoutError, DnsTempError, CnameChainTooLong) as exc:
            log.debug("PTR confirmation for %s failed: %s", ip, exc)
            return []
        confirmed = []
        for name, answer in zip(names, answers, strict=True):
            if isinstance(answer, BaseException):
                continue
            if any(_same_ip(address, record) for record in answer.records):
                confirmed.append(name)
        return confirmed

    async def addresses(self, name: str, *, ipv6: bool, lookup_time: float) -> list[str]:
        """A (or AAAA) records of ``name``; empty when missing or not in time."""
        try:
            async with asyncio.timeout(lookup_time):
                answer = await self.resolver.resolve(
                    name.lower().rstrip("."), "AAAA" if ipv6 else "A"
                )
        except (TimeoutError, DnsTempError, CnameChainTooLong) as exc:
            log.debug("address lookup of %s failed: %s", name, exc)
            return []
        return [str(record) for record in answer.records]


def _for_decisions(outcome: SpfOutcome) -> SpfOutcome:
    """What decisions read of an outcome, as the result cache keeps it: the
    fields only ``spfpolicy check`` prints (and the TTL, already applied to
    the cache entry) are dropped, and the record is kept only when it is the
    no-mail one, which is all No_Mail compares it with. Equal slim outcomes
    are one object."""
    # Built field by field: with dataclasses.replace this function took 3.3
    # us, now 1.8 (timeit, one outcome; the rest is the _SHARED lookup);
    # tests/test_checks.py fails when SpfOutcome gains a field not sorted
    # here into kept or dropped.
    slim = SpfOutcome(
        outcome.result,
        outcome.code,
        outcome.explanation,
        outcome.mechanism,
        outcome.identity,
        record=outcome.record if outcome.record == NO_MAIL_RECORD else "",
    )
    shared = _SHARED.get(slim)
    if shared is not None:
        return shared
    if len(_SHARED) >= MAX_SHARED_OUTCOMES:
        _SHARED.clear()
    _SHARED[slim] = slim
    return slim


def _same_ip(address: ipaddress.IPv4Address | ipaddress.IPv6Address, record: str) -> bool:
    try:
        return ipaddress.ip_address(record) == address
    except ValueError:
        return False
