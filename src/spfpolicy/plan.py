"""Compiled evaluation plans: a domain's SPF tree, once every record under it
is cached, turned into a table a new client is looked up in, instead of
running pyspf over the cached records again (RFC 7208 evaluation stays
pyspf's; the plan only replays what pyspf would do).

Strategy. pyspf evaluates a record tree as one walk, in order: each term
either matches the client (and the walk ends, or an include's record ends)
or does not (and the walk goes on). Which terms the walk reaches, the DNS
lookups it makes, the lookup and void counts and the errors it meets are the
same for every client of one address family until a term matches. So the
compiler walks the tree once, as pyspf would for a client that matches
nothing, calling pyspf's own methods (term parsing, record selection, MX
expansion, lookup counting) on a query whose DNS reads the cache, and writes
down a step per term:

- an address test (ip4, ip6, a, mx): the networks, as integer ranges;
- an unconditional step (all, an exists whose name exists, the point where
  a permerror is raised, the default neutral, a term that needs more than
  the client's address: ptr, macros, exp= on a fail).

A step's effect when it matches is worked out from the include stack it
sits in (RFC 7208 section 5.2: an include matches when its record passes):
a final result with its top-level mechanism, a jump past the include that
did not match, or "ask pyspf". A jump is only taken when the lookup and void
counts at the matching step equal those at the include's end on the compiled
walk, so the rest of the walk is the compiled one; otherwise pyspf decides.

A client is then evaluated by a bisect into the merged ranges (the steps
whose networks hold it, in order) and a walk over those and the
unconditional steps. Rules: a plan is built only from cached answers (a
temperror is never cached, so never under a plan), lives no longer than the
first of them to expire, is keyed by the void limit it was compiled with,
and the store of plans is bounded in (estimated) bytes. What a plan holds
apart from its domain (its ``Shape``) is kept once for all domains whose
trees compile alike, and the plan used least recently goes first.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import math
import socket
import sys
import time
from array import array
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NoReturn

import spf

from spfpolicy.evaluator import lookup_name, validated_term
from spfpolicy.resolver import DnsAnswer
from spfpolicy.results import Identity, SpfOutcome, SpfResult

log = logging.getLogger(__name__)

# What the compiler reads answers through: the cache, None when not cached.
Fetch = Callable[[str, str], DnsAnswer | None]

# Bounds: a plan with more range entries than this is not built (a tree of
# overlapping networks); the store keeps plans up to MAX_PLAN_BYTES, counted
# by estimate (a shape's size once, _PLAN_OVERHEAD per plan), within the
# process's memory budget.
MAX_RANGE_ENTRIES = 20_000
MAX_PLAN_BYTES = 4 * 1024 * 1024
# A tree that could not be compiled (part of it not cached) is tried again
# after this long on the resolver's clock, not on every check.
RETRY_AFTER = 1.0
# A plan is compiled at a domain's second evaluation by pyspf, not its
# first: compiling a provider's tree costs two or three evaluations, and
# most domains of the long tail are seen once. Sightings kept at most:
COMPILE_AFTER = 2
MAX_SIGHTINGS = 16_384

_PASS = "pass"
_NON_PASS_FAIL = ("fail", "softfail")


class _NotCached(Exception):
    """The walk needs an answer the cache does not hold: no plan."""


class _Stop(Exception):
    """The compiled walk ends here (an unconditional final step)."""


@dataclass(frozen=True, slots=True)
class Done:
    """A step's final effect: pyspf's result, the top-level mechanism that
    decided it (empty when none), the DNS lookups made, and for a permerror
    its message."""

    result: str
    mechanism: str
    lookups: int
    error: str = ""


# Effects: a Done, an int (jump: go on from that step), or None (ask pyspf).
Effect = Done | int | None


@dataclass(slots=True)
class _Frame:
    """An include being compiled: its qualifier's result and term text, and
    where (and with which counts) the walk goes on after it."""

    result: str
    mechanism: str
    end: int | None = None
    end_state: tuple[int, int] | None = None


@dataclass(slots=True)
class _Step:
    """A step before its effect is resolved."""

    result: str  # the qualifier's result when it matches
    mechanism: str  # its own term text
    frames: tuple[_Frame, ...]
    state: tuple[int, int]  # (lookups, void lookups) after it
    lookups: int  # DNS queries made up to it
    exp: bool  # an exp= applies at top level (fail/softfail need pyspf)
    fixed: Effect | bool = False  # a final effect decided at compile time


class _CompileQuery(spf.query):
    """pyspf's query, for the compiler: DNS from the cache (raising
    _NotCached), void lookups counted and limited as the evaluator's query
    does, and the counters of ``check()`` set up without running it."""

    def __init__(self, fetch: Fetch, void_limit: int, v6: bool) -> None:
        super().__init__("::1" if v6 else "127.0.0.1", "postmaster@invalid", "invalid")
        self._fetch_answer = fetch
        self._void_limit = void_limit
        self.expires = math.inf
        self.dns_lookups = 0
        self.mech: list[Any] = []
        self.perm_error = None
        self.mechanism = None
        self.options: dict[str, Any] = {}
        self.lookups = 0
        self.void_lookups = 0

    def validate_mechanism(self, mech: str) -> Any:
        return validated_term(mech, super().validate_mechanism)

    def dns(
        self, name: Any, qtype: str, cnames: Any = None, ignore_void: bool = False
    ) -> list[Any]:
        # The evaluator's query's dns(), reading the cache only.
        name = lookup_name(name)
        if name is None:
            return []
        self.dns_lookups += 1
        answer = self._fetch_answer(name, qtype)
        if answer is None:
            raise _NotCached(name, qtype)
        self.expires = min(self.expires, answer.expires)
        if not answer.records and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > self._void_limit:
                raise spf.PermError(f"Void lookup limit of {self._void_limit} exceeded")
        return list(answer.records)


@functools.lru_cache(maxsize=2048)
def _span(address: Any, cidr: int, v6: bool) -> tuple[int, int] | None:
    """The first and last address of what pyspf's cidrmatch() compares a
    client with, ``address`` widened to ``cidr``; None where pyspf raises
    or the family is not the client's. Cached: the big providers' ip4
    lists are under thousands of domains' trees."""
    try:
        network = ipaddress.ip_network(address).supernet(new_prefix=cidr)
    except (ValueError, TypeError):
        return None
    if (network.version == 6) != v6:
        return None
    first = int(network.network_address)
    return first, first + network.num_addresses - 1


class _Compiler:
    """Walks a domain's tree as pyspf would for a client matching nothing."""

    def __init__(self, domain: str, fetch: Fetch, void_limit: int, v6: bool) -> None:
        self.domain = domain
        self.v6 = v6
        self.q = _CompileQuery(fetch, void_limit, v6)
        self.steps: list[_Step] = []
        self.ranges: list[tuple[int, int, int]] = []  # (first, last, step)
        self.tests: set[int] = set()  # address tests (some with no range)
        self.frames: list[_Frame] = []
        self.exp = False
        self.top_record = ""

    # -- the walk -------------------------------------------------------------

    def run(self) -> None:
        q = self.q
        try:
            try:
                record = q.dns_spf(self.domain)
            except spf.PermError as exc:
                self._error(exc)
            self.top_record = record or ""
            if self._record(record, self.domain) == "none":
                self._final(Done("none", "", q.dns_lookups))
            # A top-level record ends in a final step; should it not: pyspf.
            self._fallback()
        except _Stop:
            pass
        except (UnicodeError, spf.TempError, spf.AmbiguityWarning, AssertionError):
            # Outside what the plan replays (a non-ASCII record, ...): pyspf.
            self._fallback_quietly()

    def _record(self, record: str | None, domain: str) -> str:
        """check0(): 'none' when ``record`` is no SPF record; otherwise the
        walk through it ('ended' when no client goes past its end, else
        'neutral' after an include's record that matched nobody)."""
        q = self.q
        if not record:
            return "none"
        terms = record.split(" ")
        if terms[0].lower() != "v=spf1":
            return "none"
        if "%" in record:
            # Macros depend on the sender, HELO or client (and %{p} on PTR
            # lookups): pyspf from this record on.
            self._fallback()
        saved, q.d = q.d, domain
        try:
            return self._terms([term for term in terms[1:] if term], domain)
        finally:
            q.d = saved

    def _terms(self, terms: list[str], domain: str) -> str:
        q = self.q
        mechs = []
        redirect = None
        modifiers: list[str] = []
        top = not self.frames
        try:
            for term in terms:
                parts = spf.RE_MODIFIER.split(term)[1:]
                if len(parts) != 2:
                    mechs.append(q.validate_mechanism(term))
                    continue
                mod, arg = parts
                if mod in modifiers:
                    if mod == "redirect":
                        raise spf.PermError("redirect= MUST appear at most once", term)
                    q.note_error(f"{mod}= MUST appear at most once", term)
                modifiers.append(mod)
                if mod == "exp":
                    if not arg:
                        raise spf.PermError("exp has empty domain-spec:", arg)
                    arg = q.expand_domain(arg)
                    if arg:
                        # pyspf fetches it (ignoring any error); the text only
                        # matters for a top-level fail or softfail.
                        with contextlib.suppress(spf.PermError):
                            q.dns(arg, "TXT", ignore_void=True)
                        if top:
                            self.exp = True
                elif mod == "redirect":
                    q.check_lookups()
                    redirect = q.expand_domain(arg)
                    if not redirect:
                        raise spf.PermError("redirect has empty domain:", arg)
                # default= is ignored and op= changes no result in strict
                # mode; an unknown modifier's value has no macro here.
        except spf.PermError as exc:
            self._error(exc)

        for mech, m, arg, cidr, result in mechs:
            if m == "include":
                self._count()
                try:
                    included = q.dns_spf(arg)
                except spf.PermError as exc:
                    self._error(exc)
                frame = _Frame(result, mech)
                self.frames.append(frame)
                outcome = self._record(included, arg)
                self.frames.pop()
                if outcome == "none":
                    self._error(
                        spf.PermError(f"No valid SPF record for included domain: {arg}", mech)
                    )
                frame.end = len(self.steps)
                frame.end_state = self._state()
            elif m == "all":
                self._always(result, mech)
                return "ended"
            elif m == "exists":
                self._count()
                if self._addresses(q.dns_a, arg, "A"):
                    self._always(result, mech)
                    return "ended"
            elif m == "a":
                self._count()
                self._test(result, mech, self._addresses(q.dns_a, arg, q.A), cidr)
            elif m == "mx":
                self._count()
                self._test(result, mech, self._addresses(q.dns_mx, arg), cidr)
            elif m == "ip4" or m == "ip6":
                if (m == "ip6") == self.v6:
                    self._test(result, mech, [arg], cidr)
            elif m == "ptr":
                self._count()
                self._fallback()
            # Other terms were errors, raised while parsing.

        if redirect:
            try:
                target = q.dns_spf(redirect)
                if not target:
                    raise spf.PermError("redirect domain has no SPF record", redirect)
            except spf.PermError as exc:
                self._error(exc)
            if top:
                self.exp = False  # pyspf forgets the exp= before a redirect
            return self._record(target, redirect)
        if top:
            self._final(Done("neutral", "", q.dns_lookups))
        return "neutral"

    # -- steps ------------------------------------------------------------------

    def _state(self) -> tuple[int, int]:
        return (self.q.lookups, self.q.void_lookups)

    def _count(self) -> None:
        try:
            self.q.check_lookups()
        except spf.PermError as exc:
            self._error(exc)

    def _addresses(self, lookup: Callable[..., list[Any]], *args: Any) -> list[Any]:
        try:
            return lookup(*args)
        except spf.PermError as exc:
            self._error(exc)

    def _new_step(self, result: str, mechanism: str) -> _Step:
        step = _Step(
            result,
            mechanism,
            tuple(self.frames),
            self._state(),
            self.q.dns_lookups,
            self.exp,
        )
        self.steps.append(step)
        return step

    def _test(self, result: str, mechanism: str, addresses: list[Any], cidr: int) -> None:
        """pyspf's cidrmatch(addresses, cidr) as ranges of integers."""
        spans = []
        for address in addresses:
            span = _span(address, cidr, self.v6)
            if span is None:
                self._fallback()  # pyspf raises here, or not, by position
            spans.append(span)
        index = len(self.steps)
        self._new_step(result, mechanism)
        self.tests.add(index)
        self.ranges.extend((first, last, index) for first, last in spans)

    def _always(self, result: str, mechanism: str) -> None:
        """A term every client reaching it matches."""
        self._new_step(result, mechanism)
        if not self.frames:
            raise _Stop

    def _final(self, done: Done) -> NoReturn:
        self._new_step("", "").fixed = done
        raise _Stop

    def _error(self, exc: spf.PermError) -> NoReturn:
        self._final(Done("permerror", "", self.q.dns_lookups, str(exc)))

    def _fallback(self) -> NoReturn:
        self._fallback_quietly()
        raise _Stop

    def _fallback_quietly(self) -> None:
        self._new_step("", "").fixed = None

    # -- effects ----------------------------------------------------------------

    def effect(self, step: _Step) -> Effect:
        if step.fixed is not False:
            return step.fixed
        result = step.result
        for frame in reversed(step.frames):
            if result == _PASS:
                result = frame.result
                continue
            # The include did not match: on past it, if the walk from there
            # is the compiled one (same lookup and void counts).
            if frame.end is None or frame.end_state != step.state:
                return None
            return frame.end
        if step.exp and result in _NON_PASS_FAIL:
            return None  # the exp= text, with its macros: pyspf's
        mechanism = step.frames[0].mechanism if step.frames else step.mechanism
        return Done(result, sys.intern(mechanism), step.lookups)


class Shape:
    """What a plan holds that does not depend on the domain it was built
    for: the table a client is looked up in, the effects, the top record.
    Domains whose trees compile alike (a provider's customers with the same
    record) have equal shapes, and the store keeps one of them for all."""

    __slots__ = (
        "_hash", "effects", "holders", "kept", "next_always", "record", "size", "starts", "v6",
    )  # fmt: skip

    def __init__(
        self,
        v6: bool,
        starts: Sequence[int],
        holders: tuple[tuple[int, ...], ...],
        next_always: Sequence[int],
        effects: tuple[Effect, ...],
        record: str,
        size: int,
    ) -> None:
        self.v6 = v6
        self.starts = starts  # first address of each elementary range
        self.holders = holders  # steps matching it, in order
        self.next_always = next_always  # per step index: next unconditional step
        self.effects = effects
        self.record = record  # the domain's own record (policy's No_Mail reads it)
        self.size = size  # estimated bytes, counted once however many plans share it
        # Outcomes as the result cache keeps them, by step * 2 + (HELO
        # check): the same object for every client a step decides for, of
        # any domain sharing the shape (that form keeps nothing of the domain).
        self.kept: dict[int, SpfOutcome] = {}
        packed = bytes(starts) if isinstance(starts, array) else tuple(starts)
        self._hash = hash((v6, packed, holders, bytes(next_always), effects, record))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Shape):
            return NotImplemented
        return (
            self._hash == other._hash
            and self.v6 == other.v6
            and self.record == other.record
            and self.effects == other.effects
            and self.next_always == other.next_always
            and self.holders == other.holders
            and self.starts == other.starts
        )

    def decide(self, address: int) -> int:
        """The step deciding for a client at ``address`` (its effect a
        Done), or -1 when pyspf must decide."""
        holders = self.holders[bisect_right(self.starts, address) - 1]
        next_always = self.next_always
        effects = self.effects
        position = 0
        for _ in range(len(effects)):
            step = next_always[position]
            for held in holders:
                if held >= position:
                    if held < step:
                        step = held
                    break
            effect = effects[step]
            if type(effect) is not int:
                return -1 if effect is None else step
            position = effect
        return -1


@dataclass(frozen=True, slots=True)
class Plan:
    """One domain's compiled tree for one address family and void limit."""

    domain: str
    void_limit: int
    shape: Shape
    expires: float  # when the first answer under it leaves the cache


def compile_plan(domain: str, fetch: Fetch, *, void_limit: int, v6: bool) -> Plan | None:
    """The plan for checks of ``domain`` from one address family, or None
    when an answer the walk needs is not cached or the tree is too big."""
    compiler = _Compiler(domain, fetch, void_limit, v6)
    try:
        compiler.run()
    except _NotCached:
        return None
    effects = tuple(compiler.effect(step) for step in compiler.steps)
    tested = compiler.tests
    next_always = [0] * (len(effects) + 1)
    upcoming = len(effects) - 1  # the walk always ends in an unconditional step
    for index in range(len(effects) - 1, -1, -1):
        if index not in tested:
            upcoming = index
        next_always[index] = upcoming
    next_always[len(effects)] = upcoming
    built = _ranges(compiler.ranges)
    if built is None:
        return None
    starts, holders = built
    if starts[-1] >= 1 << (128 if v6 else 32):  # past the last address
        starts, holders = starts[:-1], holders[:-1]
    # Compact: IPv4 starts as 4-byte integers; the small parts (a step's
    # holder tuple, a final effect) one object for all plans that have them.
    packed: Sequence[int] = starts if v6 else array("I", starts)
    holders = tuple(_shared(held) for held in holders)
    effects = tuple(_shared(effect) for effect in effects)
    # Step numbers as 2-byte integers, 4 where there are more steps: a
    # tuple would hold an 8-byte pointer each.
    next_steps = array("H" if len(next_always) < 1 << 16 else "I", next_always)
    record = sys.intern(compiler.top_record)
    size = (
        _SHAPE_OVERHEAD
        + sys.getsizeof(packed)
        + sum(sys.getsizeof(start) for start in starts if v6)
        + sys.getsizeof(holders)
        + sys.getsizeof(next_steps)
        + sys.getsizeof(effects)
        + sys.getsizeof(record)
        + _DONE * len({id(effect) for effect in effects if type(effect) is Done})
    )
    shape = Shape(v6, packed, holders, next_steps, effects, record, size)
    return Plan(domain, void_limit, shape, compiler.q.expires)


# Estimated bytes (checked with tracemalloc, see docs/performance.md). A
# shape: its object and its kept-outcome dict when empty; each distinct
# final effect (a Done and its mechanism's text); each outcome it keeps (a
# dict entry; the outcome itself is one object for all plans). A plan: its
# object, its key in the store (a tuple and a dict slot) and its domain name.
_SHAPE_OVERHEAD = 300
_DONE = 130
_KEPT_ENTRY = 60
_PLAN_OVERHEAD = 280
# Parts shared between plans (holder tuples, final effects): bounded, and
# forgotten all at once when full (plans keep the objects they hold).
MAX_SHARED_PARTS = 4096
_SHARED_PARTS: dict[Any, Any] = {}


def _shared(value: Any) -> Any:
    if value is None or type(value) is int:
        return value
    found = _SHARED_PARTS.get(value)
    if found is None:
        if len(_SHARED_PARTS) >= MAX_SHARED_PARTS:
            _SHARED_PARTS.clear()
        _SHARED_PARTS[value] = found = value
    return found


def _ranges(
    ranges: list[tuple[int, int, int]],
) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]] | None:
    """Elementary ranges from 0: their first addresses, and for each the
    steps whose networks hold it, in step order. None when too many."""
    changes: dict[int, list[tuple[int, int]]] = {}
    for first, last, step in ranges:
        changes.setdefault(first, []).append((step, 1))
        changes.setdefault(last + 1, []).append((step, -1))
    active: dict[int, int] = {}
    starts = [0]
    holders: list[tuple[int, ...]] = [()]
    entries = 0
    for point in sorted(changes):
        for step, delta in changes[point]:
            count = active.get(step, 0) + delta
            if count:
                active[step] = count
            else:
                del active[step]
        held = tuple(sorted(active))
        if held == holders[-1]:
            continue
        if starts[-1] == point:
            holders[-1] = held
        else:
            starts.append(point)
            holders.append(held)
        entries += len(held)
        if entries > MAX_RANGE_ENTRIES:
            return None
    return tuple(starts), tuple(holders)


def _client(ip: str) -> tuple[int, bool] | None:
    """The client address as pyspf compares it: (integer, is IPv6), an
    IPv4-mapped IPv6 address as IPv4 (pyspf's set_ip); None if unparseable."""
    if "%" in ip:
        ip = ip.split("%", 1)[0]  # as the evaluator drops a zone index
    if ":" not in ip:
        # glibc's inet_pton takes exactly what ipaddress takes for IPv4
        # (four decimal octets, no leading zeros), ten times faster.
        try:
            return int.from_bytes(socket.inet_pton(socket.AF_INET, ip), "big"), False
        except (OSError, ValueError):
            return None
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if address.version == 6:
        mapped = address.ipv4_mapped
        if mapped is None:
            return int(address), True
        address = mapped
    return int(address), False


class SpfPlans:
    """Plans by (checked domain, void limit, family), bounded in bytes, and
    the SPF outcomes they give.

    ``outcome()`` answers a check from a valid plan, or returns None (no
    plan, or the plan says pyspf must decide). ``learn()`` builds the plan
    for a check pyspf has just evaluated without a temperror.

    Equal shapes are kept once and counted once: thousands of domains that
    include one provider in the same record cost one table, plus a small
    plan each. When the bytes run out, the plan used least recently goes
    (a hit moves its plan to the end of the store's order): a busy
    domain's plan is not rebuilt while the long tail comes and goes.
    """

    def __init__(
        self,
        fetch: Fetch,
        *,
        clock: Callable[[], float],
        default_explanation: str | None = None,
        max_bytes: int = MAX_PLAN_BYTES,
        compile_after: int = COMPILE_AFTER,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._clock = clock  # the resolver's: answers' expiry times are on it
        self._timer = timer  # for SpfOutcome.elapsed, as the evaluator's
        self.max_bytes = max_bytes
        self._plans: dict[tuple[str, int, bool], Plan] = {}  # least recently used first
        # Each shape in use, once, with how many plans share it.
        self._shapes: dict[Shape, tuple[Shape, int]] = {}
        # Keyed by the hash of (domain, void limit, family): an int costs a
        # tenth of the tuple and its strings; a collision only moves a
        # compilation one evaluation earlier or later.
        self._failed: dict[int, float] = {}
        self.compile_after = compile_after
        self._seen: set[int] = set()  # evaluated once, no plan yet
        self.bytes = 0
        self.hits = 0  # checks answered by a plan
        self.fallbacks = 0  # checks a plan left to pyspf
        self.builds = 0
        self.unbuilt = 0  # compilations that found part of a tree uncached
        explanations = dict(spf.EXPLANATIONS)
        if default_explanation is not None:
            for result in ("softfail", "fail", "permerror"):
                explanations[result] = default_explanation
        self._explanations = {k: sys.intern(v) for k, v in explanations.items()}

    def __len__(self) -> int:
        return len(self._plans)

    @staticmethod
    def _domain(sender: str, helo: str) -> str:
        # pyspf's split_email(): the domain part, the whole sender when it
        # has no "@", the HELO name for a HELO check.
        if not sender:
            return helo
        _local, at, domain = sender.partition("@")
        return domain if at else sender

    def _decide(self, ip: str, sender: str, helo: str, void_limit: int) -> tuple[Plan, int] | None:
        """The valid plan for this check and the step deciding it."""
        client = _client(ip)
        if client is None:
            return None
        address, v6 = client
        key = (self._domain(sender, helo), void_limit, v6)
        plans = self._plans
        plan = plans.pop(key, None)
        if plan is None:
            return None
        plans[key] = plan  # now the most recently used
        if plan.expires <= self._clock():
            self._drop(key)
            return None
        step = plan.shape.decide(address)
        if step < 0:
            self.fallbacks += 1
            return None
        self.hits += 1
        return plan, step

    def outcome(self, ip: str, sender: str, helo: str, void_limit: int) -> SpfOutcome | None:
        """The outcome pyspf would give, from a valid plan; None when there
        is none or it leaves this client to pyspf."""
        started = self._timer()
        decided = self._decide(ip, sender, helo, void_limit)
        if decided is None:
            return None
        plan, step = decided
        return self._full(plan, step, sender, helo, started)

    def kept(
        self,
        ip: str,
        sender: str,
        helo: str,
        void_limit: int,
        shape: Callable[[SpfOutcome], SpfOutcome],
    ) -> tuple[SpfOutcome, float] | None:
        """``outcome()`` as ``shape`` reduces it (it must keep nothing of the
        sender, the domain, the lookups, the TTL or the time taken: checks'
        result-cache form), made once per step, with its time to live."""
        decided = self._decide(ip, sender, helo, void_limit)
        if decided is None:
            return None
        plan, step = decided
        memo = step * 2 + (not sender)
        kept = plan.shape.kept
        shaped = kept.get(memo)
        if shaped is None:
            shaped = shape(self._full(plan, step, sender, helo, 0.0))
            kept[memo] = shaped
            plan.shape.size += _KEPT_ENTRY
            self.bytes += _KEPT_ENTRY
            self._evict()
        return shaped, plan.expires - self._clock()

    def _full(self, plan: Plan, step: int, sender: str, helo: str, started: float) -> SpfOutcome:
        effect = plan.shape.effects[step]
        assert type(effect) is Done
        result = effect.result
        if effect.error:
            explanation = sys.intern("SPF Permanent Error: " + effect.error)
        else:
            explanation = self._explanations[result]
        return SpfOutcome(
            SpfResult(result),
            550 if result == "fail" or result == "permerror" else 250,
            explanation,
            mechanism=effect.mechanism,
            identity=Identity.MAILFROM if sender else Identity.HELO,
            sender=sender or (f"postmaster@{helo}" if helo else ""),
            domain=plan.domain,
            lookups=effect.lookups,
            record=plan.shape.record,
            ttl=plan.expires - self._clock(),
            elapsed=self._timer() - started if started else 0.0,
        )

    def learn(
        self, ip: str, sender: str, helo: str, void_limit: int, outcome: SpfOutcome
    ) -> Plan | None:
        """Build the plan for this check's domain and family, after pyspf
        evaluated it from cached answers (never after a temperror): at the
        domain's compile_after-th evaluation, counting this one. The plan
        built now, or None."""
        if outcome.result is SpfResult.TEMPERROR:
            return None
        return self._build(ip, sender, helo, void_limit, sighting=True)

    def build_due(self, ip: str, sender: str, helo: str, void_limit: int) -> bool:
        """Before pyspf evaluates a check from cached answers: if that
        evaluation would build the domain's plan (``learn``), build it now
        instead, so that the plan answers this check too and pyspf runs once
        less; whether it built one (a valid plan already there, which left
        this check to pyspf, is not asked again). The plan is compiled from
        the cached answers alone, as pyspf's evaluation would read them: a
        failed lookup is not cached, so no plan is built over one."""
        return self._build(ip, sender, helo, void_limit, sighting=False) is not None

    def _build(
        self, ip: str, sender: str, helo: str, void_limit: int, *, sighting: bool
    ) -> Plan | None:
        """The plan for this check's domain and family, if one was due and
        is built now (None when a valid one is there already);
        ``sighting``: this check counts as one of the domain's evaluations
        (it was one)."""
        client = _client(ip)
        domain = self._domain(sender, helo)
        if client is None or not domain:
            return None
        key = (domain, void_limit, client[1])
        now = self._clock()
        plan = self._plans.get(key)
        if plan is not None and plan.expires > now:
            return None
        token = hash(key)
        if self._failed.get(token, -math.inf) > now:
            return None
        if self.compile_after > 1 and token not in self._seen:
            if sighting:
                if len(self._seen) >= MAX_SIGHTINGS:
                    self._seen.clear()
                self._seen.add(token)
            return None
        self._seen.discard(token)
        plan = compile_plan(domain, self._fetch, void_limit=void_limit, v6=client[1])
        if plan is None or plan.expires <= now or plan.shape.size > self.max_bytes:
            self.unbuilt += 1
            if len(self._failed) >= 4096:
                self._failed.clear()
            self._failed[token] = now + RETRY_AFTER
            return None
        self._failed.pop(token, None)
        self.builds += 1
        return self._store(key, plan)

    def _store(self, key: tuple[str, int, bool], plan: Plan) -> Plan:
        """Keep ``plan`` (on a shape equal to its own, if one is kept);
        the plans used least recently go while the bytes are over."""
        self._drop(key)
        shapes = self._shapes
        shape = plan.shape
        held = shapes.get(shape)
        if held is None:
            shapes[shape] = (shape, 1)
            self.bytes += shape.size
        else:
            shape, users = held
            shapes[shape] = (shape, users + 1)
            plan = replace(plan, shape=shape)
        self._plans[key] = plan
        self.bytes += _PLAN_OVERHEAD
        self._evict()
        return plan

    def _evict(self) -> None:
        plans = self._plans
        while self.bytes > self.max_bytes and plans:
            self._drop(next(iter(plans)))  # the least recently used

    def _drop(self, key: tuple[str, int, bool]) -> None:
        plan = self._plans.pop(key, None)
        if plan is None:
            return
        self.bytes -= _PLAN_OVERHEAD
        shape, users = self._shapes[plan.shape]
        if users > 1:
            self._shapes[shape] = (shape, users - 1)
        else:
            del self._shapes[shape]
            self.bytes -= shape.size

    def counters(self) -> dict[str, int]:
        return {
            "plans": len(self._plans),
            "plan_bytes": self.bytes,
            "plan_hits": self.hits,
            "plan_fallbacks": self.fallbacks,
            "plan_builds": self.builds,
            "plan_unbuilt": self.unbuilt,
            "plan_shapes": len(self._shapes),
        }
