"""Speculative prefetch of an SPF record tree into the shared DNS cache,
within the lookup limits RFC 7208 sets for the evaluation itself.

RFC 7208 evaluation is sequential: pyspf fetches a record, then the record
of its first ``include:``, and so on, one round trip after another. But the
names a fetched record points at (``include:``, ``redirect=``, ``a``,
``mx``, ``exists``) are known as soon as it arrives, so they are asked for
all at once, level by level, while pyspf works through the tree; its own
lookups then find the answers cached or already in flight (single-flight).

A prefetch is a guess, and a hostile record must not turn the guess into an
amplifier (RFC 7208 sections 4.6.4 and 11.1). So, for one check:
- the walk reads each record as the evaluation would, in order, and stops at
  a term that certainly ends it for this client: an ``ip4``/``ip6`` that
  matches the client address, or ``all``; ``redirect=`` only counts when no
  ``all`` is present;
- every term that would make a DNS query (include, a, mx, ptr, exists,
  redirect) is counted the RFC's way: at most 10 over the whole tree, and
  none whose place in the evaluation order is certainly past the tenth
  (``position`` below: the terms before it in its own record and the
  records above it already count that many);
- each counted term sends at most one query here. An ``mx`` term's up to 10
  host lookups are never guessed: they are started when the evaluation has
  the MX answer and is certain to ask for them (``addresses_of``);
- names built from macros (``%{...}``) and ``ptr`` are counted, not fetched.
So one check's prefetch sends at most 10 queries besides the checked
domain's own record, where a complete evaluation may send 1 + 10 + 10 x 10.

Across requests, a budget keeps guessing from becoming the main source of
DNS traffic: a prefetch that no evaluation has read yet spends a credit,
and every lookup an evaluation reads (one it started, or a prefetched one
it used) earns one, up to ``BURST``. Guesses that nobody uses can therefore
never outnumber, by more than the burst, the lookups evaluations need.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
from dataclasses import dataclass
from functools import lru_cache

from spfpolicy.address import ip_or_none
from spfpolicy.resolver import DnsAnswer, Record, Resolver

log = logging.getLogger(__name__)

# RFC 7208 section 4.6.4: at most 10 DNS-querying terms per evaluation, and
# at most 10 address lookups for the names of one mx (more MX names than
# that are a permerror in pyspf's strict mode, the one used here).
MAX_TERMS = 10
MAX_MX_NAMES = 10
# Unused guesses allowed ahead of the lookups evaluations read.
BURST = 200
ADDRESS = "ADDRESS"  # A or AAAA, as the client address family decides

_SPF_PREFIX = re.compile(rb"^v=spf1(?: |$)", re.IGNORECASE)

Target = tuple[str, str]  # (name, qtype or ADDRESS)
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Term:
    """One term of a record, as the walk needs it.

    ``target`` is the lookup it makes (None: it makes none, or its name is
    built from macros); ``counted``, whether it counts against the RFC's 10;
    ``network``, for ip4/ip6, the networks it matches; ``ends``, whether it
    matches every client (``all``).
    """

    target: Target | None = None
    counted: bool = False
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    ends: bool = False


def spf_targets(domain: str, records: tuple[Record, ...]) -> tuple[Target, ...]:
    """The lookups the SPF record among ``records`` may lead to, in order
    (the record as a whole, whatever the client address)."""
    return tuple(t.target for t in spf_terms(domain, records) if t.target is not None)


def spf_terms(domain: str, records: tuple[Record, ...]) -> tuple[Term, ...]:
    """The terms of the SPF record among ``records`` in evaluation order:
    mechanisms as written, then ``redirect=`` unless ``all`` is present."""
    try:
        return _spf_terms(domain, records)
    except TypeError:  # unhashable records: not from the resolver, which gives tuples
        return _spf_terms.__wrapped__(domain, records)


# The shared provider records are parsed again by every walk that reaches them.
@lru_cache(maxsize=1024)
def _spf_terms(domain: str, records: tuple[Record, ...]) -> tuple[Term, ...]:
    found = [r for r in records if r and _SPF_PREFIX.match(b"".join(r))]
    if len(found) != 1:  # none, or several: a permerror with nothing to fetch
        return ()
    text = b"".join(found[0]).decode("ascii", "replace")
    terms: list[Term] = []
    redirect: Term | None = None
    has_all = False
    for word in text.split()[1:]:
        lowered = word.lower()
        if lowered.startswith("redirect="):
            redirect = Term(_target(word[len("redirect=") :], "TXT"), counted=True)
            continue
        term = _mechanism(domain, word)
        if term is not None:
            has_all = has_all or term.ends
            terms.append(term)
    if redirect is not None and not has_all:
        terms.append(redirect)
    return tuple(terms)


def _mechanism(domain: str, word: str) -> Term | None:
    mechanism, _, argument = word.lstrip("+-~?").partition(":")
    mechanism, _, _ = mechanism.partition("/")
    mechanism = mechanism.lower()
    name = argument.split("/", 1)[0]
    if mechanism == "all":
        return Term(ends=True)
    if mechanism in ("ip4", "ip6"):
        try:
            return Term(network=ipaddress.ip_network(argument, strict=False))
        except ValueError:
            return None  # a permerror for pyspf; nothing to fetch either way
    if mechanism == "include":
        return Term(_target(name, "TXT"), counted=True)
    if mechanism == "a":
        return Term(_target(name or domain, ADDRESS), counted=True)
    if mechanism == "mx":
        return Term(_target(name or domain, "MX"), counted=True)
    if mechanism == "exists":
        return Term(_target(name, "A"), counted=True)  # RFC 7208 5.7: always A
    if mechanism == "ptr":
        return Term(counted=True)  # its lookups depend on the reverse zone
    return None  # a modifier (exp=, unknown) or an unknown mechanism


def _target(name: str, qtype: str) -> Target | None:
    if "%" in name:
        return None
    name = name.lower().rstrip(".")
    if not name or not all(0 < len(label) < 64 for label in name.split(".")):
        return None
    return (name, qtype)


def reached_terms(terms: tuple[Term, ...], client: Address | None) -> tuple[Term, ...]:
    """The terms an evaluation for ``client`` may reach: all of them up to
    the first that certainly matches (``all``, or an ip4/ip6 network holding
    the client address), which ends the record."""
    for index, term in enumerate(terms):
        if term.ends:
            return terms[:index]
        network = term.network
        if network is not None and client is not None and client in network:
            return terms[:index]
    return terms


def client_address(ip: str) -> Address | None:
    """The client address as ip4/ip6 terms compare it (v4-mapped as v4)."""
    address = ip_or_none(ip.split("%", 1)[0])
    if address is None:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


class SpfPrefetcher:
    """Walks SPF record trees ahead of the evaluations that need them."""

    def __init__(self, resolver: Resolver, *, max_terms: int = MAX_TERMS, burst: int = BURST):
        self.resolver = resolver
        self.max_terms = max_terms
        self.burst = burst
        self.walks = 0
        self.lookups = 0  # lookups the prefetcher started (queries sent)
        self._credit = float(burst)
        self._useful_seen = 0
        self._walking: set[str] = set()  # one walk per tree at a time

    # -- the budget -----------------------------------------------------------

    def _allowed(self) -> bool:
        """Whether one more guess may be sent now (and, if so, spends it)."""
        useful = self.resolver.stats.useful_lookups
        self._credit = min(self.burst, self._credit + useful - self._useful_seen)
        self._useful_seen = useful
        if self._credit < 1:
            self.resolver.stats.prefetches_refused += 1
            return False
        self._credit -= 1
        return True

    def _ask(self, name: str, qtype: str) -> asyncio.Future[DnsAnswer] | None:
        """The lookup of name/qtype in flight, started if needed and allowed;
        None when it is cached, or not allowed."""
        resolver = self.resolver
        pending = resolver.pending(name, qtype)
        if pending is not None or resolver.peek(name, qtype) is not None:
            return pending
        if not self._allowed():
            return None
        self.lookups += 1
        return resolver.prefetch(name, qtype)

    # -- walks ----------------------------------------------------------------

    def start(self, domain: str, ip: str) -> None:
        """Prefetch ``domain``'s tree for a check of client ``ip``, unless the
        lookups of its first level are cached already."""
        if domain in self._walking:
            return
        client = client_address(ip)
        address_qtype = "AAAA" if client is not None and client.version == 6 else "A"
        peek = self.resolver.peek
        top = peek(domain, "TXT")
        if top is not None and all(
            peek(t.target[0], address_qtype if t.target[1] == ADDRESS else t.target[1]) is not None
            for t in reached_terms(spf_terms(domain, top.records), client)
            if t.target is not None
        ):
            return
        self.walks += 1
        self._walking.add(domain)
        # Its first step on the loop's next turn, as a task's would be: the
        # evaluation that asked asks for the domain's record first.
        walk = _Walk(self, domain, client, address_qtype)
        asyncio.get_running_loop().call_soon(walk.go, [(domain, 0)])

    def addresses_of(self, mx: DnsAnswer, address_qtype: str) -> None:
        """Start the host lookups of an mx the evaluation has the answer of:
        pyspf asks them one by one (all of them, at most 10, else a
        permerror), so they are asked together here."""
        if len(mx.records) > MAX_MX_NAMES:
            return
        for _preference, exchange in mx.records:
            name = _target(str(exchange), address_qtype)
            if name is not None:
                self._ask(*name)


class _Walk:
    """One prefetch walk of a tree, level by level, driven from the lookups'
    done callbacks: a level's uncached TXT records are asked together, and
    the next level is read once they are all in. No task, coroutines or
    ``asyncio.wait`` per walk (a task awaiting ``wait`` over the level's
    lookups cost ~12 us a level, callbacks ~3). The lookups are the
    resolver's: a walk has nothing of its own to cancel, and ends when one of
    them is cancelled (the resolver closing)."""

    __slots__ = (
        "_address_qtype",
        "_answers",
        "_client",
        "_domain",
        "_level",
        "_prefetcher",
        "_seen",
        "_terms_left",
        "_waiting",
    )

    def __init__(
        self, prefetcher: SpfPrefetcher, domain: str, client: Address | None, address_qtype: str
    ) -> None:
        self._prefetcher = prefetcher
        self._domain = domain
        self._client = client
        self._address_qtype = address_qtype
        self._terms_left = prefetcher.max_terms
        self._seen = {domain}
        # (name, how many counted terms certainly come before its record's own)
        self._level: list[tuple[str, int]] = []
        self._answers: list[DnsAnswer | None] = []
        self._waiting = 0

    def go(self, level: list[tuple[str, int]]) -> None:
        """Walk on from ``level``, until a level waits for lookups or the
        tree is done."""
        try:
            while level:
                if self._ask_level(level):
                    return  # _arrived goes on
                level = self._next_level(level, self._answers)
        except Exception:  # a walk is only a speed-up: never an error
            log.debug("prefetch walk of %s failed", self._domain, exc_info=True)
        self._prefetcher._walking.discard(self._domain)

    def _ask_level(self, level: list[tuple[str, int]]) -> bool:
        """The level's TXT answers into ``_answers``: cached ones at once,
        the rest asked together (most of a tree is shared provider records,
        in the cache). Whether some are awaited."""
        prefetcher = self._prefetcher
        peek = prefetcher.resolver.peek
        answers: list[DnsAnswer | None] = [peek(name, "TXT") for name, _ in level]
        self._level, self._answers, self._waiting = level, answers, 0
        for i, answer in enumerate(answers):
            future = None if answer is not None else prefetcher._ask(level[i][0], "TXT")
            if future is not None:
                self._waiting += 1
                future.add_done_callback(functools.partial(self._arrived, i))
        return self._waiting > 0

    def _arrived(self, index: int, future: asyncio.Future[DnsAnswer]) -> None:
        if future.cancelled():  # the resolver is closing: the walk ends
            self._waiting = -1
            self._prefetcher._walking.discard(self._domain)
            return
        if self._waiting <= 0:  # ended already
            return
        failure = future.exception()
        if failure is None:
            self._answers[index] = future.result()
        else:  # a prefetch failure is only a missed speed-up
            log.debug("prefetch of %s/TXT failed: %r", self._level[index][0], failure)
        self._waiting -= 1
        if self._waiting == 0:
            try:
                level = self._next_level(self._level, self._answers)
            except Exception:
                log.debug("prefetch walk of %s failed", self._domain, exc_info=True)
                level = []
            self.go(level)

    def _next_level(
        self, level: list[tuple[str, int]], answers: list[DnsAnswer | None]
    ) -> list[tuple[str, int]]:
        """Start the lookups the level's records lead to (their hosts) and
        name the records of the level below."""
        prefetcher = self._prefetcher
        max_terms = prefetcher.max_terms
        next_level: list[tuple[str, int]] = []
        for (name, position), answer in zip(level, answers, strict=True):
            if answer is None:
                continue
            for term in reached_terms(spf_terms(name, answer.records), self._client):
                if not term.counted:
                    continue
                position += 1
                if position > max_terms or self._terms_left <= 0:
                    break  # the evaluation would have stopped before it
                self._terms_left -= 1
                if term.target is None:
                    continue
                target, qtype = term.target
                if qtype == "TXT":
                    if target not in self._seen:
                        self._seen.add(target)
                        next_level.append((target, position))
                else:
                    prefetcher._ask(target, self._address_qtype if qtype == ADDRESS else qtype)
        return next_level
