"""Speculative prefetch of an SPF record tree into the shared DNS cache.

RFC 7208 evaluation is sequential: pyspf fetches a record, then the record
of its first ``include:``, and so on, one round trip after another. But the
names a fetched record points at (``include:``, ``redirect=``, ``a``,
``mx``, ``exists``) are known as soon as it arrives, so they are asked for
all at once, level by level, while pyspf works through the tree; its own
lookups then find the answers cached or already in flight (single-flight).

Rules: prefetches go through the resolver like any lookup but are never
counted against an evaluation's lookup limits (pyspf counts its own terms);
a tree gets at most ``MAX_PREFETCH`` lookups, so a hostile record with a
hundred includes cannot fan out past what the RFC would let an evaluation
ask anyway; names built from macros (``%{...}``) are skipped, since they
depend on the sender and are not "certainly next".
"""

from __future__ import annotations

import asyncio
import logging
import re
from functools import lru_cache

from spfpolicy.dns import DnsAnswer, Record, Resolver

log = logging.getLogger(__name__)

# RFC 7208 section 4.6.4: 10 DNS-querying terms, each MX with up to 10
# names; twice the term limit covers a full tree plus its address lookups.
MAX_PREFETCH = 20
MAX_TARGETS_PER_RECORD = 10  # the RFC's term limit
ADDRESS = "ADDRESS"  # A or AAAA, as the client address family decides

_SPF_PREFIX = re.compile(rb"^v=spf1(?: |$)", re.IGNORECASE)

Target = tuple[str, str]  # (name, qtype or ADDRESS)


def spf_targets(domain: str, records: tuple[Record, ...]) -> tuple[Target, ...]:
    """The lookups the SPF record among ``records`` may lead to, in order."""
    try:
        return _spf_targets(domain, records)
    except TypeError:  # unhashable records: not from the resolver, which gives tuples
        return _spf_targets.__wrapped__(domain, records)


# The shared provider records are parsed again by every walk that reaches them.
@lru_cache(maxsize=1024)
def _spf_targets(domain: str, records: tuple[Record, ...]) -> tuple[Target, ...]:
    found = [r for r in records if r and _SPF_PREFIX.match(b"".join(r))]
    if len(found) != 1:  # none, or several: a permerror with nothing to fetch
        return ()
    text = b"".join(found[0]).decode("ascii", "replace")
    targets: list[Target] = []
    for term in text.split()[1:]:
        target = _term_target(domain, term)
        if target is not None:
            targets.append(target)
            if len(targets) >= MAX_TARGETS_PER_RECORD:
                break
    return tuple(targets)


def _term_target(domain: str, term: str) -> Target | None:
    lowered = term.lower()
    if lowered.startswith("redirect="):
        return _target(term[len("redirect=") :], "TXT")
    mechanism, _, argument = term.lstrip("+-~?").partition(":")
    mechanism = mechanism.split("/", 1)[0].lower()
    argument = argument.split("/", 1)[0]
    if mechanism == "include" and argument:
        return _target(argument, "TXT")
    if mechanism == "a":
        return _target(argument or domain, ADDRESS)
    if mechanism == "mx":
        return _target(argument or domain, "MX")
    if mechanism == "exists" and argument:
        return _target(argument, "A")  # RFC 7208 section 5.7: always A
    return None


def _target(name: str, qtype: str) -> Target | None:
    if "%" in name:
        return None
    name = name.lower().rstrip(".")
    if not name or not all(0 < len(label) < 64 for label in name.split(".")):
        return None
    return (name, qtype)


class SpfPrefetcher:
    """Walks SPF record trees ahead of the evaluations that need them."""

    def __init__(self, resolver: Resolver, *, max_lookups: int = MAX_PREFETCH) -> None:
        self.resolver = resolver
        self.max_lookups = max_lookups
        self.walks = 0
        self.lookups = 0
        self._walking: set[str] = set()  # one walk per tree at a time

    def start(self, domain: str, address_qtype: str) -> None:
        """Prefetch ``domain``'s tree unless its first level is cached."""
        if domain in self._walking:
            return
        cache = self.resolver.cache
        top = cache.get((domain, "TXT"))
        if top is not None and all(
            cache.get((name, address_qtype if qtype == ADDRESS else qtype)) is not None
            for name, qtype in spf_targets(domain, top.records)
        ):
            return
        self.walks += 1
        self._walking.add(domain)
        self.resolver.background(self._walk(domain, address_qtype))

    async def _walk(self, domain: str, address_qtype: str) -> None:
        try:
            await self._walk_levels(domain, address_qtype)
        finally:
            self._walking.discard(domain)

    async def _walk_levels(self, domain: str, address_qtype: str) -> None:
        budget = self.max_lookups
        level = [domain]
        seen = {domain}
        while level and budget > 0:
            budget -= len(level)
            answers = await self._records(level)
            next_level: list[str] = []
            for name, answer in zip(level, answers, strict=True):
                if answer is None:
                    continue
                for target, qtype in spf_targets(name, answer.records):
                    if budget <= len(next_level):
                        break
                    if qtype == "TXT":
                        if target not in seen:
                            seen.add(target)
                            next_level.append(target)
                        continue
                    budget -= 1
                    if qtype == "MX":
                        self.resolver.background(self._mx(target, address_qtype))
                    else:
                        self._prefetch(target, address_qtype if qtype == ADDRESS else qtype)
            level = next_level

    async def _records(self, names: list[str]) -> list[DnsAnswer | None]:
        """The TXT answers of one level: cached ones at once, the rest fetched
        together (most of a tree is shared provider records, in the cache)."""
        self.lookups += len(names)
        answers = [self.resolver.cached(name, "TXT") for name in names]
        missing = [i for i, answer in enumerate(answers) if answer is None]
        if len(missing) == 1:
            answers[missing[0]] = await self._fetch(names[missing[0]], "TXT")
        elif missing:
            fetched = await asyncio.gather(*(self._fetch(names[i], "TXT") for i in missing))
            for i, answer in zip(missing, fetched, strict=True):
                answers[i] = answer
        return answers

    async def _mx(self, name: str, address_qtype: str) -> None:
        self.lookups += 1
        answer = await self._fetch(name, "MX")
        if answer is None:
            return
        # RFC 7208 section 4.6.4: at most 10 MX names are looked up.
        for _preference, exchange in sorted(answer.records)[:MAX_TARGETS_PER_RECORD]:
            self._prefetch(str(exchange).lower(), address_qtype)

    def _prefetch(self, name: str, qtype: str) -> None:
        self.lookups += 1
        self.resolver.prefetch(name, qtype)

    async def _fetch(self, name: str, qtype: str) -> DnsAnswer | None:
        try:
            return await self.resolver.resolve(name, qtype)
        except Exception as exc:  # a prefetch failure is only a missed speed-up
            log.debug("prefetch of %s/%s failed: %s", name, qtype, exc)
            return None
