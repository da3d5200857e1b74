"""The resolver: asynchronous DNS lookups through aiodns (c-ares; the private
parts of aiodns and pycares it needs are fenced in ``cares.py``, and names
c-ares will not send go through dnspython) behind one process-wide cache
shared by every SPF evaluation. Nothing else knows the cache's key format:
``peek`` says whether an answer is cached.

Rules the cache keeps:
- positive answers live for the smallest TTL of the records used (CNAME links
  included), clamped to [min_ttl, max_ttl];
- negative answers (NXDOMAIN, NODATA) are cached too, for min(SOA TTL, SOA
  MINIMUM) of the SOA in the reply's authority section (RFC 2308 section 5),
  capped by ``negative_ttl``; without an SOA, for ``negative_ttl``. pycares'
  own query callback drops the reply of a negative answer, so queries are sent
  with a callback of ours that keeps it (``cares.LoopResolver.query_reply``);
- timeouts, SERVFAIL and other server failures are temporary errors
  (RFC 7208 section 2.6.6) and are never cached;
- the number of entries is bounded, least recently used evicted first;
- concurrent lookups of one (name, type) share one upstream query;
- a name whose lookups keep timing out or failing is held down for a while
  (``slownames.py``): its lookups fail at once, but for one probe;
- with Shared_Cache set, a miss asks the shared level (``sharedcache.py``,
  Redis) before DNS, inside the single-flight lookup, and an answer from DNS
  is handed to it for the remaining TTL (written after, never awaited).

Answers are returned in the shapes pyspf's own DNS drivers produce, so the
evaluator can hand them to pyspf unchanged: A/AAAA address strings, MX
``(preference, exchange)`` pairs, PTR names, TXT/SPF tuples of byte strings.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import marshal
import math
import struct
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiodns
import aiodns.error
import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import pycares

from spfpolicy.address import HostPort
from spfpolicy.cache import TtlLruCache
from spfpolicy.cares import NEGATIVE, LoopResolver, Reply, without_query_cache
from spfpolicy.config import DEFAULTS, Settings
from spfpolicy.slownames import SlowNames

if TYPE_CHECKING:  # imported only when Shared_Cache is set (it needs redis)
    from spfpolicy.sharedcache import SharedCache

log = logging.getLogger(__name__)

QTYPES: dict[str, int] = {
    "A": pycares.QUERY_TYPE_A,
    "AAAA": pycares.QUERY_TYPE_AAAA,
    "MX": pycares.QUERY_TYPE_MX,
    "PTR": pycares.QUERY_TYPE_PTR,
    "TXT": pycares.QUERY_TYPE_TXT,
    "CNAME": pycares.QUERY_TYPE_CNAME,
}
_CNAME = pycares.QUERY_TYPE_CNAME
# RFC 7208 section 3.1: the SPF RR type (99) is obsolete and not queried;
# pyspf only asks for it in its "harsh" mode, which spfpolicy does not use.

# Prefetched lookups remembered until an evaluation reads them (for the
# prefetch budget: a guess forgotten unread stays counted as spent).
MAX_GUESSES = 10_000

# pyspf follows at most 10 CNAME links (spf.MAX_CNAME) before a permerror.
MAX_CNAME_CHAIN = 10

# Names c-ares refuses to put on the wire (it rejects labels with spaces and
# other bytes that are legal in DNS, as SPF macros can produce, RFC 7208
# section 7.3): those lookups go through dnspython instead, as do names with
# a backslash, which c-ares would read as an escape (see _wire_name).
_UNASKABLE = {aiodns.error.ARES_EBADNAME, aiodns.error.ARES_EBADSTR}


class DnsTempError(Exception):
    """The lookup could not be completed now (timeout, SERVFAIL, ...).

    ``str()`` is the short reason pyspf-style texts use ("Timeout",
    "SERVFAIL"); ``detail`` names the query.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.detail = detail


_REASONS = {
    aiodns.error.ARES_ETIMEOUT: "Timeout",
    aiodns.error.ARES_ESERVFAIL: "SERVFAIL",
    aiodns.error.ARES_EREFUSED: "REFUSED",
    aiodns.error.ARES_ECONNREFUSED: "connection refused",
}


class CnameChainTooLong(Exception):
    """More than MAX_CNAME_CHAIN CNAME links: pyspf makes this a permerror."""


Record = Any  # str | tuple[int, str] | tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    """The records of one (name, type), possibly empty, and how long they live.

    ``ttl`` is the lifetime the answer was fetched with (clamped);
    ``expires`` the time on the resolver's clock when it leaves the cache:
    set on every answer the resolver hands out, so what has been used of it
    counts. An answer made elsewhere has none (infinity). It is bookkeeping,
    not part of the answer: equal records and TTL make equal answers.
    """

    records: tuple[Record, ...]
    ttl: float
    expires: float = field(default=math.inf, compare=False)

    @property
    def negative(self) -> bool:
        return not self.records


# A cache entry's expiry time: the first 8 bytes of its packed value.
_EXPIRY = struct.Struct("d")


class DnsCache(TtlLruCache[tuple[str, str], DnsAnswer]):
    """The resolver's cache of answers by (name, type), held compactly.

    At the default bound of 100,000 answers, bytes per entry decide the
    process size. Held as a (name, type) tuple, a (DnsAnswer, expiry) tuple,
    a float and the records' tuples, an entry took 450-560 B of Python
    objects; here it is one str key (type, space, name) and one bytes value,
    the expiry time followed by the marshalled (ttl, records): 210-270 B,
    dict slot included. marshal gives back exactly the types it was given
    (int, float, str, bytes, tuple), so a hit rebuilds the very answer the
    resolver stored, for ~1 µs; an answer marshal cannot write (none the
    resolver makes) is kept as it is.
    """

    __slots__ = ()

    def _slot(self, key: tuple[str, str]) -> str:
        name, qtype = key
        return f"{qtype} {name}"  # a type has no space: one key, one slot

    def _pack(self, value: DnsAnswer, expires: float) -> Any:
        try:
            return _EXPIRY.pack(expires) + marshal.dumps((value.ttl, value.records))
        except ValueError:  # a record marshal does not know
            return (value, expires)

    def _unpack(self, item: Any) -> tuple[DnsAnswer, float]:
        if type(item) is not bytes:
            return item
        ttl, records = marshal.loads(item[_EXPIRY.size :])
        expires = _EXPIRY.unpack_from(item)[0]
        return DnsAnswer(records, ttl, expires), expires

    def answers(self) -> Iterator[tuple[str, str, DnsAnswer]]:
        """Every entry as (name, type, answer with its expiry), least
        recently used first, expired or not (for Cache_File)."""
        for slot, item in list(self._data.items()):
            qtype, name = str(slot).split(" ", 1)
            yield name, qtype, self._unpack(item)[0]


@dataclass(slots=True)
class DnsStats:
    """Counters for the metrics exporter and the periodic log line."""

    hits: int = 0
    misses: int = 0
    upstream_queries: int = 0
    upstream_failures: int = 0
    shared_waits: int = 0
    prefetches: int = 0  # lookups started by prefetch (guesses)
    prefetches_used: int = 0  # of those, read by an evaluation
    prefetches_refused: int = 0  # not started: the prefetch budget was spent

    @property
    def useful_lookups(self) -> int:
        """Lookups an evaluation read: those it started and the prefetched
        ones it used (the prefetch budget's income)."""
        return self.misses - self.prefetches + self.prefetches_used


class Resolver:
    """Cached, single-flight DNS lookups for the whole process."""

    def __init__(
        self,
        nameservers: Sequence[HostPort | str] | None = None,
        *,
        timeout: float = DEFAULTS.dns_timeout,
        # c-ares adapts each try's timeout to the server's measured response
        # times; a server that is briefly slower than usual (a load spike)
        # then misses a try, so allow enough tries that only a server that
        # stays silent for most of Lookup_Time gives a temperror.
        tries: int = 4,
        cache_size: int = DEFAULTS.dns_cache_size,
        min_ttl: float = DEFAULTS.dns_min_ttl,
        max_ttl: float = DEFAULTS.dns_max_ttl,
        negative_ttl: float = DEFAULTS.dns_negative_ttl,
        slow_threshold: int = DEFAULTS.slow_domain_threshold,
        slow_window: float = DEFAULTS.slow_domain_window,
        slow_hold: float = DEFAULTS.slow_domain_hold,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # Text is read as ``host[:port]`` (port 53 unless given).
        self.nameservers = [
            n if isinstance(n, HostPort) else HostPort.parse(n, default_port=53)
            for n in nameservers or ()
        ]
        self.timeout = timeout
        self.tries = tries
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.negative_ttl = negative_ttl
        self.clock = clock  # the time answers' ``expires`` are given in
        self.cache = DnsCache(cache_size, clock=clock)
        self.stats = DnsStats()
        self.slow = SlowNames(slow_threshold, slow_window, slow_hold, clock=clock)
        self._inflight: dict[tuple[str, str], asyncio.Future[DnsAnswer]] = {}
        # Prefetched keys no evaluation has read yet (oldest dropped first).
        self._guesses: dict[tuple[str, str], None] = {}
        self._channel: LoopResolver | None = None
        self._fallback: dns.asyncresolver.Resolver | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.shared: SharedCache | None = None  # the second level, if any
        self._closed = False

    # -- the cache side -----------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        nameservers: Sequence[HostPort | str] | None = None,
        timeout: float | None = None,
    ) -> Resolver:
        """The resolver the settings describe: the server's, and the one
        ``spfpolicy check`` builds so that it evaluates as the server does
        (``nameservers`` and ``timeout`` override the settings' own)."""
        resolver = cls(
            settings.nameservers if nameservers is None else nameservers,
            timeout=settings.dns_timeout if timeout is None else timeout,
            cache_size=settings.dns_cache_size,
        )
        resolver.apply(settings)
        return resolver

    def apply(self, settings: Settings) -> None:
        """The settings a reload may change: TTL clamps and the slow-name
        memory (servers, timeout and cache size need a restart)."""
        self.min_ttl, self.max_ttl = settings.dns_min_ttl, settings.dns_max_ttl
        self.negative_ttl = settings.dns_negative_ttl
        self.slow.configure(
            settings.slow_domain_threshold, settings.slow_domain_window, settings.slow_domain_hold
        )

    def counters(self) -> dict[str, int]:
        """Cache and upstream counters, for metrics and the stats log line."""
        stats = self.stats
        slow = self.slow.stats
        return {
            "hits": stats.hits,
            "misses": stats.misses,
            "upstream_queries": stats.upstream_queries,
            "upstream_failures": stats.upstream_failures,
            "shared_waits": stats.shared_waits,
            "prefetches": stats.prefetches,
            "prefetches_used": stats.prefetches_used,
            "prefetches_refused": stats.prefetches_refused,
            "in_flight": len(self._inflight),
            "evictions": self.cache.evictions,
            "entries": len(self.cache),
            "slow_holds": slow.holds,
            "slow_held_lookups": slow.held_lookups,
            "slow_probes": slow.probes,
            "slow_recoveries": slow.recoveries,
            "slow_names_held": self.slow.held_now(),
        }

    def shared_counters(self) -> dict[str, Any] | None:
        """The shared level's counters (``SharedCache.counters``); None without one."""
        return None if self.shared is None else self.shared.counters()

    def cached(self, name: str, qtype: str) -> DnsAnswer | None:
        """The cached answer, without touching the network (counts a hit)."""
        answer = self.cache.get((name, qtype))
        if answer is not None:
            self.stats.hits += 1
            if self._guesses:
                self._used((name, qtype))
        return answer

    def keep(
        self, name: str, qtype: str, records: tuple[Record, ...], ttl: float, left: float
    ) -> None:
        """Cache an answer fetched before (read from Cache_File) for the
        ``left`` seconds it had, no longer than DNS_Max_TTL allows now."""
        self.cache.set((name, qtype), DnsAnswer(records, ttl), min(left, self.max_ttl))

    def peek(self, name: str, qtype: str) -> DnsAnswer | None:
        """The cached answer, for the prefetcher: counted as no read."""
        return self.cache.get((name, qtype))

    def pending(self, name: str, qtype: str) -> asyncio.Future[DnsAnswer] | None:
        """The lookup of name/qtype in flight, if any."""
        return self._inflight.get((name, qtype))

    def guessed(self, name: str, qtype: str) -> bool:
        """Whether name/qtype was prefetched and no evaluation read it yet."""
        return (name, qtype) in self._guesses

    def _used(self, key: tuple[str, str]) -> None:
        guesses = self._guesses
        if key in guesses:
            del guesses[key]
            self.stats.prefetches_used += 1

    def _clamp(self, ttl: float) -> float:
        return min(max(ttl, self.min_ttl), self.max_ttl)

    async def resolve(self, name: str, qtype: str) -> DnsAnswer:
        """The records of ``name``/``qtype``; raises DnsTempError or
        CnameChainTooLong. ``name`` is lower case without a trailing dot."""
        key = (name, qtype)
        if self._guesses:
            self._used(key)
        answer = self.cache.get(key)
        if answer is not None:
            self.stats.hits += 1
            return answer
        future = self._inflight.get(key)
        if self.slow.any_held:
            hold = self.slow.check(name)
            if hold is not None:
                raise DnsTempError(hold.reason, f"{qtype} {name}: held down")
            if self.slow.probe(name):
                future = None  # a fresh query, not one sent before the hold-down
        if future is None:
            future = self._start(key)
        else:
            self.stats.shared_waits += 1
        # shield: one waiter giving up must not cancel the others' lookup.
        return await asyncio.shield(future)

    def prefetch(self, name: str, qtype: str) -> asyncio.Future[DnsAnswer] | None:
        """Start a lookup into the cache that no evaluation asked for yet (a
        guess): its future, or None when it is cached or in flight already."""
        key = (name, qtype)
        if self._closed or key in self._inflight or self.cache.get(key) is not None:
            return None  # closed: a prefetch walk going on from a lookup's callback
        if self.slow.any_held and self.slow.held(name):
            return None  # a guess must not probe a name held down
        self.stats.prefetches += 1
        guesses = self._guesses
        if len(guesses) >= MAX_GUESSES:
            del guesses[next(iter(guesses))]
        guesses[key] = None
        return self._start(key)

    def background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run lookups nobody waits for (prefetches); ended by ``close()``."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _start(self, key: tuple[str, str]) -> asyncio.Future[DnsAnswer]:
        self.stats.misses += 1
        # A task per upstream lookup. Sending the query at once and settling
        # a plain future from c-ares' callback (no task) was tried: at 1,000
        # connections it made 12 % more upstream queries, c-ares timeouts,
        # temperror answers and 20 % less throughput (docs/performance.md).
        future = asyncio.ensure_future(self._fetch_dated(*key))
        self._inflight[key] = future
        future.add_done_callback(functools.partial(self._settle, key))
        return future

    def gave_up(self, name: str) -> None:
        """An evaluation ran out of Lookup_Time waiting for ``name``: to the
        smtpd that asked, a timeout like c-ares' own."""
        self.slow.failed(name, "Timeout")

    def _settle(self, key: tuple[str, str], future: asyncio.Future[DnsAnswer]) -> None:
        if self._inflight.get(key) is future:  # not replaced by a probe
            del self._inflight[key]
        if future.cancelled():
            self.slow.abandoned(key[0])
            return
        error = future.exception()
        if isinstance(error, DnsTempError):
            self.slow.failed(key[0], str(error))
        if error is None:
            self.slow.answered(key[0])
            answer = future.result()
            # Kept until the answer's own expiry, the one its users count on.
            self.cache.set(key, answer, answer.expires - self.clock())

    async def _fetch_dated(self, name: str, qtype: str) -> DnsAnswer:
        """``_fetch``, with the answer's expiry: it was fetched just now;
        or the shared level's answer, with what is left of its TTL."""
        shared = self.shared
        if shared is not None:
            found = await shared.get(name, qtype)
            if found is not None:
                ttl, records, remaining = found
                return DnsAnswer(records, ttl, self.clock() + min(remaining, ttl))
        answer = await self._fetch(name, qtype)
        if shared is not None:
            shared.put(name, qtype, answer.ttl, answer.records, answer.ttl)
        return DnsAnswer(answer.records, answer.ttl, self.clock() + answer.ttl)

    # -- the network side ---------------------------------------------------

    def _resolver(self) -> LoopResolver:
        if self._channel is None:
            options: dict[str, Any] = {"timeout": self.timeout, "tries": self.tries}
            with without_query_cache():
                self._channel = LoopResolver(
                    nameservers=[str(n) for n in self.nameservers] or None,
                    loop=asyncio.get_running_loop(),
                    **options,
                )
        return self._channel

    async def _fetch(self, name: str, qtype: str) -> DnsAnswer:
        """Ask upstream, following CNAME links the upstream left unresolved."""
        ttl = self.max_ttl
        target = name
        for _ in range(MAX_CNAME_CHAIN + 1):
            try:
                reply, negative = await self._query(target, qtype)
            except _UseDnspython:
                return await self._fetch_with_dnspython(target, qtype)
            read = self._read_reply(name, qtype, target, reply, negative, ttl)
            if isinstance(read, DnsAnswer):
                return read
            # The chain ends at a name the upstream did not resolve: ask it.
            target, ttl = read
        raise CnameChainTooLong(name)

    def _read_reply(
        self,
        name: str,
        qtype: str,
        target: str,
        reply: Reply | None,
        negative: bool,
        ttl: float,
    ) -> DnsAnswer | tuple[str, float]:
        """The answer a reply to ``target``/``qtype`` gives (``name`` is where
        the chain began); or, when it ends in a CNAME chain at a name the
        upstream did not resolve, that name and the TTL so far."""
        if reply is None:
            return self._negative(ttl, None)
        wanted = QTYPES[qtype]
        records: list[Record] = []
        links: dict[str, str] = {}
        for rr in reply.answer:
            if rr.type == wanted:
                records.append(_convert(qtype, rr.data))
                ttl = min(ttl, rr.ttl)
            elif rr.type == _CNAME:
                links[rr.name.lower().rstrip(".")] = rr.data.lower().rstrip(".")
                ttl = min(ttl, rr.ttl)
        if records:
            return DnsAnswer(tuple(records), self._clamp(ttl))
        if negative:  # the upstream followed the chain to its end
            return self._negative(ttl, reply)
        # No data of the wanted type: walk the CNAME chain the answer gave.
        seen = {target}
        while target in links:
            target = links[target]
            if target in seen:  # a loop: no data at the end of it
                return self._negative(ttl, reply)
            seen.add(target)
        if target == name or not links:
            return self._negative(ttl, reply)
        return target, ttl

    async def _query(self, name: str, qtype: str) -> tuple[Reply | None, bool]:
        """One upstream query: (its reply, whether the answer is negative);
        the reply is None for a negative answer whose reply c-ares did not
        hand over. Raises DnsTempError, or _UseDnspython."""
        try:
            wire = _wire_name(name)
        except UnicodeError:
            # A name IDNA cannot encode (U+FFFD from a non-UTF-8 sender, say)
            # is malformed: no records (RFC 7208 section 4.3).
            return None, True
        if b"\\" in wire:
            # c-ares reads a backslash as an escape (\. or \065, say): it
            # would send another name, or refuse it.
            raise _UseDnspython
        self.stats.upstream_queries += 1
        try:
            return await self._resolver().query_reply(wire, QTYPES[qtype])
        except aiodns.error.DNSError as exc:
            code = exc.args[0] if exc.args else None
            text = exc.args[1] if len(exc.args) > 1 else str(exc)
            return self._failed_query(name, qtype, code, text)

    def _failed_query(
        self, name: str, qtype: str, code: int | None, text: str | None = None
    ) -> tuple[None, bool]:
        """What a c-ares status other than success means: a negative answer
        (None, True); else raises _UseDnspython or DnsTempError."""
        if code in NEGATIVE:
            return None, True
        if code in _UNASKABLE:
            raise _UseDnspython from None
        if code == aiodns.error.ARES_EBADRESP:
            # c-ares shares one UDP socket between lookups, and one
            # garbage datagram fails every lookup in flight on it, not
            # just the one it answered. Asking again on a socket of its
            # own isolates the culprit: only its own lookup fails.
            raise _UseDnspython from None
        self.stats.upstream_failures += 1
        if text is None:
            text = str(pycares.errno.strerror(code)) if code is not None else "unknown error"
        log.debug("DNS %s %s failed: %s (c-ares status %s)", qtype, name, text, code)
        raise DnsTempError(_REASONS.get(code, text), f"{qtype} {name}: {text}") from None

    def _negative(self, ttl: float, reply: Reply | None) -> DnsAnswer:
        """No records, kept for the reply's negative TTL (RFC 2308 section 5:
        min(SOA TTL, SOA MINIMUM) of the SOA in the authority section), no
        longer than ``ttl`` (the CNAME links that led here) nor ``negative_ttl``."""
        if reply is not None and reply.soa_ttl is not None:
            ttl = min(ttl, reply.soa_ttl)
        return DnsAnswer((), self._clamp(min(ttl, self.negative_ttl)))

    async def _fetch_with_dnspython(self, name: str, qtype: str) -> DnsAnswer:
        """The same lookup through dnspython, for names c-ares will not send."""
        if self._fallback is None:
            resolver = dns.asyncresolver.Resolver(configure=not self.nameservers)
            if self.nameservers:
                resolver.nameservers = [
                    dns.nameserver.Do53Nameserver(n.host, n.port) for n in self.nameservers
                ]
            resolver.timeout = self.timeout
            resolver.lifetime = self.timeout * max(1, self.tries)
            resolver.cache = None
            self._fallback = resolver
        self.stats.upstream_queries += 1
        try:
            qname = dns.name.Name([*_wire_name(name).split(b"."), b""])
        except (dns.exception.DNSException, UnicodeError):
            # Longer than 255 octets (a long macro expansion, say), or not
            # encodable: such a name cannot exist, so it has no records.
            return DnsAnswer((), self._clamp(self.negative_ttl))
        try:
            answer = await self._fallback.resolve(qname, qtype, search=False)
        except dns.resolver.NXDOMAIN as exc:
            return self._negative_message(exc.responses().get(qname))
        except dns.resolver.NoAnswer as exc:
            return self._negative_message(exc.kwargs.get("response"))
        except dns.resolver.YXDOMAIN:
            return DnsAnswer((), self._clamp(self.negative_ttl))
        except dns.exception.Timeout:
            self.stats.upstream_failures += 1
            raise DnsTempError("Timeout", f"{qtype} {name}") from None
        except dns.resolver.NoNameservers as exc:
            self.stats.upstream_failures += 1
            raise DnsTempError("SERVFAIL", f"{qtype} {name}: {exc}") from None
        except dns.exception.DNSException:
            return DnsAnswer((), self._clamp(self.negative_ttl))
        records: list[Record] = []
        for rdata in answer:
            if qtype in ("A", "AAAA"):
                records.append(rdata.address)
            elif qtype == "MX":
                records.append((rdata.preference, rdata.exchange.to_text(omit_final_dot=True)))
            elif qtype == "PTR":
                records.append(rdata.target.to_text(omit_final_dot=True))
            elif qtype == "TXT":
                records.append((b"".join(rdata.strings),))
        return DnsAnswer(tuple(records), self._clamp(answer.rrset.ttl if answer.rrset else 0))

    def _negative_message(self, response: dns.message.Message | None) -> DnsAnswer:
        """``_negative`` for a reply dnspython read: the same rule, the CNAME
        links of its answer section included."""
        ttl = self.max_ttl
        if response is not None:
            for rrset in response.answer:
                ttl = min(ttl, rrset.ttl)
            for rrset in response.authority:
                if rrset.rdtype == dns.rdatatype.SOA:
                    ttl = min(ttl, rrset.ttl, *(soa.minimum for soa in rrset))
        return DnsAnswer((), self._clamp(min(ttl, self.negative_ttl)))

    def renew(self) -> None:
        """Lookups from now on read the system's resolver configuration
        (/etc/resolv.conf) afresh, unless nameservers were given; queries
        already sent finish on the old channel, closed when they are done.
        c-ares' event thread would notice a change by itself; the loop-driven
        channel (``LoopResolver``) is renewed on reload instead."""
        old = self._channel
        if old is None or self.nameservers:
            return
        self._channel = None
        self.background(_retire(old))

    async def close(self) -> None:
        self._closed = True
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        for future in list(self._inflight.values()):
            future.cancel()
        if self._channel is not None:
            self._channel.cancel()
            await self._channel.close()
            self._channel = None
        if self.shared is not None:
            await self.shared.close()  # after the lookups that might still write to it


def _wire_name(name: str) -> bytes:
    """The name as both paths send it: its text, one octet per character.

    SPF macro expansion yields literal text (RFC 7208 section 7.3), so a
    backslash in it, from a local-part such as ``b\\ s``, is the octet 0x5C
    and never an escape, and a dot always separates labels. Non-ASCII text is
    IDNA-encoded, as pycares does itself (without the ``idna`` package) and
    RFC 7208 section 4.3 asks for A-labels; raises UnicodeError when it
    cannot be."""
    if name.isascii():
        return name.encode("ascii")
    return name.encode("idna")


class _UseDnspython(Exception):
    """c-ares cannot do this lookup (a name it will not send, or a malformed
    reply on its shared socket): dnspython asks instead."""


# The longest a query can stay with c-ares: 4 tries from a 2 s first try,
# each doubling (DNS_Timeout 2, the default tries), with room to spare.
RETIRED_CHANNEL_GRACE = 60.0


async def _retire(channel: aiodns.DNSResolver) -> None:
    """Close a replaced channel once the queries sent on it are over."""
    try:
        await asyncio.sleep(RETIRED_CHANNEL_GRACE)
    finally:
        channel.cancel()
        await channel.close()


def _convert(qtype: str, data: Any) -> Record:
    """A record as ``cares.Reply`` holds it, in the shape pyspf's drivers give."""
    if qtype == "TXT":
        # The record's character-strings joined, which is what RFC 7208
        # section 3.3 asks for; pyspf expects a sequence of byte strings.
        return (data,)
    if qtype == "MX":
        return (data[0], data[1].rstrip("."))
    if qtype in ("PTR", "CNAME"):
        return data.rstrip(".")
    return data  # A, AAAA: the address's text
