"""SPF evaluation (RFC 7208) by pyspf, with its DNS served by the shared
asynchronous resolver, many evaluations at once in one thread.

Strategy: pyspf is synchronous code that calls ``query.dns()`` whenever it
needs records. Each evaluation runs pyspf inside a greenlet of its own (one
kept from an earlier evaluation, see ``_Runners``). When a lookup hits the
shared cache, pyspf simply continues; on a miss the greenlet switches back
to the asyncio task that drives it, which awaits the resolver and switches
the answer (or a TempError) back in. So pyspf runs exactly once, top to
bottom, as it would with blocking DNS, and hundreds of evaluations can wait
on DNS concurrently without a thread each.

Why not re-run pyspf after each cache miss, raising an exception to abort it?
pyspf swallows exceptions in places with a bare ``except:`` (the ``exp=``
fetch, for one), so an abort could be eaten and the evaluation carry on with
a wrong result. Suspending instead of aborting has no such trap.

Errors are delivered into pyspf the way its own DNS drivers deliver them:
timeouts and server failures as ``spf.TempError``, NXDOMAIN/NODATA as an empty
list, so pyspf's result is the one it would give for the same DNS data.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import math
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import greenlet
import spf

from spfpolicy.address import ip_or_none
from spfpolicy.config import DEFAULTS
from spfpolicy.prefetch import SpfPrefetcher
from spfpolicy.resolver import CnameChainTooLong, DnsAnswer, DnsTempError, Resolver
from spfpolicy.results import Identity, SpfOutcome, SpfResult

if TYPE_CHECKING:
    from spfpolicy.trace import Trace

log = logging.getLogger(__name__)

# RFC 7208 section 4.6.4: at most two void lookups (pyspf's default too).
DEFAULT_VOID_LIMIT = DEFAULTS.void_limit
# RFC 7208 section 4.6.4 lets evaluation time out after "at least 20 seconds".
DEFAULT_LOOKUP_TIME = float(DEFAULTS.lookup_time)

# What pyspf says when its DNS driver times out (py3dns and dnspython both
# surface it as "DNS Timeout"); policyd-spf copies it into defer texts.
_TIMEOUT_TEXT = "DNS Timeout"


@dataclass(frozen=True, slots=True)
class _NeedDns:
    """What a suspended pyspf greenlet asks its driver for."""

    name: str
    qtype: str


# An ip4:/ip6: term as written: an optional qualifier, the name, an address
# made of address characters, an optional prefix length; nothing else (no
# trailing comma, which pyspf notes as an error).
_IP_TERM = re.compile(r"[-+?~]?ip[46]:[0-9A-Fa-f.:]+(/[0-9]+)?\Z", re.IGNORECASE)
MAX_IP_TERMS = 1024
_IP_TERMS: dict[str, Any] = {}


def validated_term(mech: str, validate: Callable[[str], Any]) -> Any:
    """``validate(mech)``, a strict pyspf query's validate_mechanism,
    remembered for ip4:/ip6: terms: their parse depends on the term's text
    alone (no macros, no domain, no lax-mode note), and the big providers'
    records are long lists of them, parsed again in every evaluation (and
    every plan compiled) otherwise. Errors are not remembered: they are
    raised again."""
    parsed = _IP_TERMS.get(mech)
    if parsed is None:
        parsed = validate(mech)
        if parsed[1] in ("ip4", "ip6") and _IP_TERM.match(mech):
            if len(_IP_TERMS) >= MAX_IP_TERMS:
                _IP_TERMS.clear()
            _IP_TERMS[mech] = parsed
    return parsed


@functools.lru_cache(maxsize=1024)
def _network(ip: Any, prefix: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """What pyspf's cidrmatch() matches against: ``ip`` widened to ``prefix``."""
    return ipaddress.ip_network(ip).supernet(new_prefix=prefix)


def lookup_name(name: Any) -> str | None:
    """The name pyspf asks for, as a lookup sends it (lower case, no final
    dot), with pyspf's own DNS drivers' contract: an empty name is a
    permerror; a malformed one (an empty or over-long label) is None, no
    records (RFC 7208 section 4.3)."""
    if not name:
        raise spf.PermError("Invalid query: empty domain name")
    name = str(name)
    if name.endswith("."):
        name = name[:-1]
    if not all(0 < len(label) < 64 for label in name.split(".")):
        return None
    return name.lower()


class _Answers(Protocol):
    """What a query reads the resolver through: its cache and its clock."""

    clock: Callable[[], float]

    def cached(self, name: str, qtype: str) -> DnsAnswer | None: ...


class _AsyncQuery(spf.query):
    """pyspf's query with its one DNS entry point routed to the resolver.

    Only ``dns()`` is replaced; every SPF rule stays pyspf's. The replacement
    keeps pyspf's contract: names are validated and lower-cased, CNAME chains
    followed (by the resolver), empty answers counted against the void limit.
    """

    def __init__(
        self,
        ip: str,
        sender: str,
        helo: str,
        *,
        resolver: Resolver,
        void_limit: int,
        receiver: str | None,
        deadline: float,
        clock: Callable[[], float],
        prefetcher: SpfPrefetcher | None = None,
    ) -> None:
        super().__init__(ip, sender, helo, receiver=receiver)
        self._resolver: _Answers = resolver
        self._prefetcher = prefetcher
        self._void_limit = void_limit
        self._deadline = deadline
        self._clock = clock
        self.dns_lookups = 0
        # When the first of the answers used leaves the DNS cache (the
        # resolver's clock): the result is no longer true for sure after it.
        self.expires: float | None = None
        self.top_record: str | None = None
        # check_now's evaluations run without a greenlet (``cached_only``):
        # an answer not cached is then a TempError, and ``missed`` says so.
        self.cached_only = False
        self.missed = False

    def set_ip(self, i: str) -> None:
        """pyspf's ``set_ip`` (called by its ``__init__``), with a dotted quad
        parsed by ``ip_or_none``'s inet_pton: 0.4 against 3.4 us, and its text
        kept as ``c`` and ``i`` rather than printed again (inet_pton takes
        only canonical dotted quads, which print as they are written).
        Anything else, IPv6 and pyspf's "list" modes included, is pyspf's."""
        if ":" not in i:
            address = ip_or_none(i)
            if address is not None:
                self.iplist = False
                self.ipaddr = address
                self.c = self.i = i
                self.A = "A"
                self.v = "in-addr"
                self.cidrmax = 32
                return
        super().set_ip(i)

    def cidrmatch(self, ipaddrs: Any, n: int) -> bool:
        """pyspf's match of the client address against ``ipaddrs``/``n``, with
        the networks parsed once per process rather than once per evaluation
        (parsing a provider's long ip4 lists was a tenth of the CPU of an
        evaluation from cached records). Collecting an IP list is pyspf's."""
        if not isinstance(self.iplist, bool):
            return bool(super().cidrmatch(ipaddrs, n))
        address = self.ipaddr
        try:
            for ip in ipaddrs:
                if address in _network(ip, n):
                    return True
        except ValueError as exc:
            raise spf.PermError(str(exc)) from None
        return False

    def validate_mechanism(self, mech: str) -> Any:
        return validated_term(mech, super().validate_mechanism)

    def dns_spf(self, domain: str) -> Any:
        # The first record fetched is the checked domain's own: policy's
        # No_Mail compares it with "v=spf1 -all".
        record = super().dns_spf(domain)
        if self.top_record is None:
            self.top_record = record or ""
        return record

    def dns(
        self,
        name: Any,
        qtype: str,
        cnames: Any = None,
        ignore_void: bool = False,
    ) -> list[Any]:
        name = lookup_name(name)
        if name is None:
            return []
        self.dns_lookups += 1
        answer = self._resolver.cached(name, qtype)
        if answer is None:
            answer = self._fetch(name, qtype)
        expires = answer.expires
        if expires == math.inf:  # an answer from outside the resolver's cache
            expires = self._resolver.clock() + answer.ttl
        if self.expires is None or expires < self.expires:
            self.expires = expires
        if not answer.records and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > self._void_limit:
                raise spf.PermError(f"Void lookup limit of {self._void_limit} exceeded")
        elif qtype == "MX" and self._prefetcher is not None:
            # pyspf now asks each host's addresses in turn: ask them together.
            self._prefetcher.addresses_of(answer, self.A)
        return list(answer.records)

    def _fetch(self, name: str, qtype: str) -> DnsAnswer:
        """An answer not in the cache: the driving task awaits it for us."""
        if self._clock() >= self._deadline:
            raise spf.TempError(_TIMEOUT_TEXT)
        if self.cached_only:
            # What SpfEvaluator._abandon throws into a suspended evaluation,
            # raised at the same point: pyspf goes on as it would there.
            self.missed = True
            raise spf.TempError(_TIMEOUT_TEXT)
        answer: DnsAnswer = greenlet.getcurrent().parent.switch(_NeedDns(name, qtype))
        return answer


class _TracedQuery(_AsyncQuery):
    """``_AsyncQuery`` reporting into a Trace as pyspf goes (``check --trace``).

    It only watches: every hook calls pyspf's (or ``_AsyncQuery``'s) own
    method and reports what it did, so the traced evaluation is the one the
    server makes. The hooks are the methods pyspf calls at each step:
    ``check1`` per record (the top one, an include's, a redirect's),
    ``dns_spf`` when it fetches a record, ``check_lookups`` per DNS-querying
    term, ``cidrmatch``/``validated_ptrs`` where a term compares the client,
    ``dns`` per lookup. pyspf has no hook per term: its terms come from
    ``validate_mechanism`` as tuples that its loop unpacks one at a time, so
    they are handed out as ``_TracedTerm``s, which report when unpacked.
    """

    def __init__(self, *args: Any, trace: Trace, resolver: Resolver, **kwargs: Any) -> None:
        super().__init__(*args, resolver=resolver, **kwargs)
        self._trace = trace
        self._resolver = _WatchedCache(resolver, trace)

    def check1(self, spf_record: Any, domain: str, recursion: int) -> Any:
        self._trace.begin_record(domain, spf_record)
        try:
            verdict = super().check1(spf_record, domain, recursion)
        except Exception as exc:
            self._trace.end_record(None, exc)
            raise
        self._trace.end_record(verdict[0])
        return verdict

    def dns_spf(self, domain: str) -> Any:
        self._trace.fetching_record(domain)
        return super().dns_spf(domain)

    def validate_mechanism(self, mech: str) -> Any:
        return _TracedTerm(super().validate_mechanism(mech), self._trace)

    def check_lookups(self) -> None:
        try:
            super().check_lookups()
        finally:
            self._trace.counted(self.lookups)

    def cidrmatch(self, ipaddrs: Any, n: int) -> bool:
        matched = super().cidrmatch(ipaddrs, n)
        self._trace.matched(matched)
        return matched

    def validated_ptrs(self) -> Any:
        names = super().validated_ptrs()
        target = self._trace.target()
        if target is not None:
            self._trace.matched(bool(spf.domainmatch(names, target)))
        return names

    def dns(
        self,
        name: Any,
        qtype: str,
        cnames: Any = None,
        ignore_void: bool = False,
    ) -> list[Any]:
        trace = self._trace
        lookup = trace.begin_lookup(str(name), qtype)
        started = trace.clock()
        try:
            records = super().dns(name, qtype, cnames, ignore_void)
        except Exception as exc:
            lookup.elapsed = trace.clock() - started
            trace.failed_lookup(lookup, exc, self.void_lookups)
            raise
        lookup.elapsed = trace.clock() - started
        trace.end_lookup(lookup, records, self.void_lookups)
        return records

    def _fetch(self, name: str, qtype: str) -> DnsAnswer:
        answer = super()._fetch(name, qtype)
        self._trace.answered(answer.records, answer.ttl)
        return answer


class _WatchedCache:
    """The resolver as a traced query reads it: each read reported, with
    whether the answer was cached and whether the prefetcher asked first."""

    def __init__(self, resolver: Resolver, trace: Trace) -> None:
        self._resolver = resolver
        self._trace = trace
        self.clock = resolver.clock

    def cached(self, name: str, qtype: str) -> DnsAnswer | None:
        prefetched = self._resolver.guessed(name, qtype)  # before the read spends it
        answer = self._resolver.cached(name, qtype)
        self._trace.asked(name, qtype, cached=answer is not None, prefetched=prefetched)
        if answer is not None:
            self._trace.answered(answer.records, answer.ttl)
        return answer


class _TracedTerm(tuple[Any, ...]):
    """A term as pyspf parsed it, ``(text, mechanism, target, cidr,
    result)``, reporting to the trace when pyspf's loop unpacks it: the
    moment pyspf starts trying it. (Unpacking anything but an exact tuple
    iterates it, so this ``__iter__`` runs then.)"""

    trace: Trace

    def __new__(cls, parsed: tuple[Any, ...], trace: Trace) -> _TracedTerm:
        term = super().__new__(cls, parsed)
        term.trace = trace
        return term

    def __iter__(self) -> Iterator[Any]:
        items = tuple(tuple.__iter__(self))
        self.trace.begin_term(str(items[0]), str(items[1]), items[2], items[4])
        return iter(items)


def _failed(ip: str, sender: str, helo: str) -> tuple[str, int, str]:
    # A pyspf bug must not take the request down with it; a temperror lets
    # the mail be retried rather than rejected.
    log.exception("SPF evaluation failed for ip=%s sender=%r helo=%r", ip, sender, helo)
    return "temperror", 451, "SPF Temporary Error: internal error"


def _release(query: _AsyncQuery) -> None:
    if query.perm_error is not None:
        # pyspf keeps the PermError, whose traceback holds pyspf's frames and
        # so the query: a cycle only the garbage collector (a full pass over
        # the heap) would free.
        query.perm_error.__traceback__ = None


class _Finished:
    """What a runner hands back when pyspf's check is over: its verdict, or
    the exception it raised."""

    __slots__ = ("error", "verdict")

    def __init__(self, verdict: Any, error: Exception | None) -> None:
        self.verdict = verdict
        self.error = error


def _run_checks(box: list[_AsyncQuery]) -> None:
    """A runner's life: evaluate each query switched in, then hand back a
    ``_Finished`` and wait for the next. Lookups suspend it on the way
    (``_AsyncQuery._fetch``); a GreenletExit (the runner dropped) ends it.

    Queries come in a one-item list, emptied here: the first call's
    arguments stay referenced for the runner's life, and an idle runner
    must keep no evaluation alive."""
    while True:
        query = box.pop()
        try:
            finished = _Finished(query.check(), None)
        except Exception as exc:
            finished = _Finished(None, exc)
        del query
        box = greenlet.getcurrent().parent.switch(finished)


class _Runners:
    """The greenlets evaluations run in, kept for the next evaluation.

    A new greenlet per evaluation costs 8-10 us (timeit: 9.8 us to run a
    function in a new one, 2.1 us in a kept one, 1.4 us without any), and on
    Python 3.11 its frame stack is mapped and unmapped each time. A runner
    is kept only when its evaluation finished (``_Finished``), so a kept one
    always waits at the top of ``_run_checks``; at most ``MAX_IDLE`` wait,
    each holding its stacks (10.3 KB of VmRSS each, measured over 1,000).
    """

    MAX_IDLE = 32

    def __init__(self) -> None:
        self._idle: list[greenlet.greenlet] = []

    def __len__(self) -> int:
        return len(self._idle)

    def take(self) -> greenlet.greenlet:
        """A runner whose lookups switch back to the calling greenlet."""
        current = greenlet.getcurrent()
        while self._idle:
            runner = self._idle.pop()
            if runner.parent is current and not runner.dead:
                return runner
        return greenlet.greenlet(_run_checks, parent=current)

    def give_back(self, runner: greenlet.greenlet) -> None:
        if len(self._idle) < self.MAX_IDLE and not runner.dead:
            self._idle.append(runner)


class SpfEvaluator:
    """Evaluates SPF for (ip, sender, helo) against the shared resolver."""

    def __init__(
        self,
        resolver: Resolver,
        *,
        void_limit: int = DEFAULT_VOID_LIMIT,
        lookup_time: float = DEFAULT_LOOKUP_TIME,
        receiver: str | None = None,
        default_explanation: str | None = None,
        prefetch: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.resolver = resolver
        self.prefetcher = SpfPrefetcher(resolver) if prefetch else None
        self.default_explanation = default_explanation
        self.void_limit = void_limit
        self.lookup_time = lookup_time
        self.receiver = receiver
        self._clock = clock
        self.in_flight = 0
        self._runners = _Runners()

    async def check(
        self,
        ip: str,
        sender: str,
        helo: str,
        *,
        lookup_time: float | None = None,
        void_limit: int | None = None,
        trace: Trace | None = None,
    ) -> SpfOutcome:
        """SPF for the MAIL FROM identity ``sender``, or for HELO when
        ``sender`` is empty (checked as postmaster@helo, RFC 7208 section
        2.3). Never raises for DNS trouble: that is a temperror outcome.
        With ``trace``, the evaluation reports each step into it."""
        started = self._clock()
        budget = self.lookup_time if lookup_time is None else lookup_time
        query = self._query(ip, sender, helo, started + budget, void_limit, started, trace)
        if isinstance(query, SpfOutcome):
            if trace is not None:
                trace.outcome = query
            return query
        self._prefetch(str(query.d), ip)
        self.in_flight += 1
        try:
            verdict = await self._drive(query, started + budget, budget)
        except Exception:
            verdict = _failed(ip, sender, helo)
        finally:
            self.in_flight -= 1
            _release(query)
        outcome = self._outcome(query, verdict, sender, started)
        if trace is not None:
            trace.outcome = outcome
        return outcome

    def check_now(
        self, ip: str, sender: str, helo: str, *, void_limit: int | None = None
    ) -> SpfOutcome | None:
        """``check()`` for an evaluation whose DNS answers are all cached: its
        outcome at once, without a task. None as soon as pyspf asks for an
        answer that is not cached; that partial evaluation is dropped, and
        ``check()`` then starts afresh and waits for the lookups.

        pyspf runs here on the caller's stack, not in a greenlet: nothing
        waits, so nothing needs suspending, and a greenlet costs about 9 us
        (its creation, two switches, and on Python 3.11 a frame stack of its
        own, mapped and unmapped). A missing answer raises pyspf's TempError
        where a greenlet would have been suspended and then abandoned with
        that same TempError (``_abandon``), so pyspf goes on exactly as it
        did; its verdict is dropped."""
        started = self._clock()
        query = self._query(ip, sender, helo, started + self.lookup_time, void_limit, started)
        if isinstance(query, SpfOutcome):
            return query
        query.cached_only = True
        try:
            verdict = query.check()
        except Exception:
            verdict = _failed(ip, sender, helo)
        finally:
            _release(query)
        if query.missed:
            return None
        return self._outcome(query, verdict, sender, started)

    def _query(
        self,
        ip: str,
        sender: str,
        helo: str,
        deadline: float,
        void_limit: int | None,
        started: float,
        trace: Trace | None = None,
    ) -> _AsyncQuery | SpfOutcome:
        """pyspf's query for one check, or the permerror its arguments give."""
        # RFC 4007 zone index ("fe80::1%eth0") names an interface, not part
        # of the address SPF compares; pyspf's parser rejects it.
        ip = ip.split("%", 1)[0]
        make: Callable[..., _AsyncQuery] = _AsyncQuery
        if trace is not None:
            make = functools.partial(_TracedQuery, trace=trace)
        try:
            query = make(
                ip,
                sender,
                helo,
                resolver=self.resolver,
                prefetcher=self.prefetcher,
                void_limit=self.void_limit if void_limit is None else void_limit,
                receiver=self.receiver,
                deadline=deadline,
                clock=self._clock,
            )
            if self.default_explanation is not None:
                query.set_default_explanation(self.default_explanation)
        except (spf.PermError, ValueError) as exc:  # e.g. an unparseable client address
            return SpfOutcome(
                SpfResult.PERMERROR,
                550,
                f"SPF Permanent Error: {exc}",
                identity=Identity.MAILFROM if sender else Identity.HELO,
                sender=sender or f"postmaster@{helo}",
                elapsed=self._clock() - started,
            )
        return query

    def _outcome(
        self, query: _AsyncQuery, verdict: tuple[str, int, str], sender: str, started: float
    ) -> SpfOutcome:
        result, code, explanation = verdict
        # The time left until the first answer used expires, not its TTL:
        # a record fetched 1.65 s into a 2 s TTL leaves a result 0.35 s.
        ttl = None
        if query.expires is not None:
            ttl = max(0.0, query.expires - self.resolver.clock())
        # Interned: the same few texts (default explanations, "-all",
        # provider includes) would otherwise be kept once per cached outcome.
        return SpfOutcome(
            SpfResult(result),
            code,
            sys.intern(explanation),
            mechanism=sys.intern(query.mechanism or ""),
            identity=Identity.MAILFROM if sender else Identity.HELO,
            sender=query.s,
            domain=query.o,
            lookups=query.dns_lookups,
            record=query.top_record or "",
            ttl=ttl,
            elapsed=self._clock() - started,
        )

    def prefetch(self, ip: str, sender: str, helo: str) -> None:
        """Start fetching what the check of ``sender`` (HELO when empty) from
        ``ip`` will need, before it runs: the policy asks for the checks its
        settings will make, so that the MAIL FROM check's lookups need not
        wait for the HELO check's."""
        self._prefetch(sender.rpartition("@")[2] if sender else helo, ip)

    def _prefetch(self, domain: str, ip: str) -> None:
        if self.prefetcher is None:
            return
        domain = domain.lower().rstrip(".")
        if "." in domain and all(0 < len(label) < 64 for label in domain.split(".")):
            self.prefetcher.start(domain, ip)

    async def _drive(
        self, query: _AsyncQuery, deadline: float, budget: float
    ) -> tuple[str, int, str]:
        """Run ``query.check()`` in a runner greenlet, serving its DNS requests."""
        runner = self._runners.take()
        step: Any = runner.switch([query])
        try:
            if not isinstance(step, _Finished):
                # One timer for the whole evaluation, not one per lookup.
                remaining = deadline - self._clock()
                asked = self._clock()  # when the lookup waited on was asked for
                try:
                    if remaining <= 0:
                        raise TimeoutError
                    async with asyncio.timeout(remaining):
                        while not isinstance(step, _Finished):
                            asked = self._clock()
                            step = await self._serve(runner, step)
                except TimeoutError:
                    # The name waited for most of the time is a timeout to
                    # the slow-name memory; one that answered slowly, leaving
                    # too little time for the next, is not.
                    if isinstance(step, _NeedDns) and (self._clock() - asked >= budget / 2):
                        self.resolver.gave_up(step.name)
                    # Out of time: this lookup and any further one time out.
                    while not isinstance(step, _Finished):
                        step = runner.throw(spf.TempError(_TIMEOUT_TEXT))
        finally:
            # Cancelled mid-lookup (request deadline, shutdown): let pyspf
            # finish at once by failing every further lookup, so no runner
            # is left suspended mid-evaluation.
            if not isinstance(step, _Finished):
                step = self._abandon(runner)
            if step is not None:
                self._runners.give_back(runner)
        error, step.error = step.error, None  # the runner keeps no traceback
        if error is not None:
            raise error  # pyspf's own exception, as check() reports it
        verdict: tuple[str, int, str] = step.verdict
        return verdict

    async def _serve(self, runner: greenlet.greenlet, need: _NeedDns) -> Any:
        try:
            answer: DnsAnswer = await self.resolver.resolve(need.name, need.qtype)
        except TimeoutError:
            return runner.throw(spf.TempError(_TIMEOUT_TEXT))
        except DnsTempError as exc:
            return runner.throw(spf.TempError(f"DNS {exc}"))
        except CnameChainTooLong:
            return runner.throw(spf.PermError("Length of CNAME chain exceeds 10"))
        return runner.switch(answer)

    @staticmethod
    def _abandon(runner: greenlet.greenlet) -> _Finished | None:
        """Fail every further lookup of the evaluation ``runner`` is in until
        it finishes: its ``_Finished``, or None when it never did."""
        for _ in range(10_000):
            if runner.dead:
                return None
            with contextlib.suppress(Exception):
                step = runner.throw(spf.TempError(_TIMEOUT_TEXT))
                if isinstance(step, _Finished):
                    return step
        log.error("pyspf did not finish after repeated TempErrors; dropping it")
        return None
