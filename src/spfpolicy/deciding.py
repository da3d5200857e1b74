"""One request's way to its Decision: the memories read, the pure decision run
on the answers at hand, what it says to remember stored.

The decision is synchronous. ``Known`` holds the checks' answers one request
has seen (fetched, or found cached) and raises ``_Missing`` for any other;
``decide()`` then awaits that answer (after starting the prefetch of the
request's other SPF checks, once) and starts over. So ``decide_now()``
answers a request whose facts are all cached without a coroutine (the
server's fast path), and nothing is remembered before the last start, the
one with every answer in: a restart never finds itself remembered.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol, cast

from spfpolicy.config import Settings
from spfpolicy.memory import InstanceMemory, MemoEntry, VerdictMemo, memory_key, message_key, replay
from spfpolicy.policy import (
    MOCK_DECISION,
    Act,
    Context,
    Decision,
    MemoryEntry,
    RequestView,
    Verdict,
    context_for,
    evaluate,
    normal,
    read_request,
    to_decision,
)
from spfpolicy.protocol import PolicyRequest
from spfpolicy.results import SpfOutcome

__all__ = ["Checks", "Known", "decide", "decide_now"]


class Checks(Protocol):
    """The DNS-backed facts ``decide`` needs; checks.DnsChecks implements it.

    None of these raise for DNS trouble: ``spf`` returns a temperror outcome,
    the others return an empty list (policyd-spf treats a whitelist lookup
    that times out as "not whitelisted").
    """

    async def spf(
        self, ip: str, sender: str, helo: str, *, lookup_time: float, void_limit: int
    ) -> SpfOutcome:
        """pyspf's check2(i=ip, s=sender, h=helo) within lookup_time seconds,
        with at most ``void_limit`` void lookups (RFC 7208 4.6.4).

        ``sender`` "" checks the HELO identity (postmaster@helo); a sender
        without "@" means postmaster@sender, as in pyspf.
        """
        ...

    async def confirmed_ptr_names(self, ip: str, *, lookup_time: float) -> list[str]:
        """PTR names of ``ip`` whose A/AAAA records include ``ip`` (RFC 7208 5.5)."""
        ...

    async def addresses(self, name: str, *, ipv6: bool, lookup_time: float) -> list[str]:
        """The A (or, with ipv6, AAAA) addresses of ``name``, as text."""
        ...

    def cached_spf(self, ip: str, sender: str, helo: str, *, void_limit: int) -> SpfOutcome | None:
        """The outcome ``spf`` would return, if it can be had without waiting
        (cached, or worked out from cached DNS answers); never waits."""
        ...

    def cached_lifetime(
        self, ip: str, sender: str, helo: str, outcome: SpfOutcome, *, void_limit: int
    ) -> float:
        """Seconds ``outcome`` stays the cached answer of this check (0: it is not)."""
        ...

    def prefetch(self, ip: str, sender: str, helo: str, *, void_limit: int) -> None:
        """Start fetching what ``spf`` will need for this check; never waits."""
        ...

    def read_shared(
        self, ip: str, sender: str, helo: str, *, void_limit: int, settled: Callable[[bool], None]
    ) -> bool:
        """Start reading this check's outcome from the shared cache, if
        there is one: True, and once the read is over ``settled`` gets
        whether it found the outcome (``cached_spf`` then has it; else
        ``spf`` goes to DNS without reading it again). False when there is
        no such read; ``settled`` is never called then. Never waits."""
        ...


class _Missing(Exception):
    """A check whose answer is not known yet: ``decide`` awaits ``fetch()`` and starts over."""

    def __init__(self, key: tuple[object, ...], fetch: Callable[[], Awaitable[object]]) -> None:
        self.key = key
        self.fetch = fetch


# Known.answers' mark of a check found not cached; replaced by its fetched answer.
_NOT_CACHED = object()
# Known.answers' key of an SPF check: "spf", ip, sender, helo, void limit.
_SpfKey = tuple[str, str, str, str, int]


class Known:
    """The checks' answers as one request has seen them: what it has fetched
    or found cached (each counted once); any other answer raises ``_Missing``.

    Deciding is synchronous and starts over after each fetch (at most one
    restart per check, and a request makes a handful), so a request whose
    answers are all cached is decided without a coroutine or a task.
    """

    __slots__ = (
        "_context",
        "_prefetched",
        "_view",
        "_void_limit",
        "answers",
        "checks",
        "expected",
        "stopped",
    )

    def __init__(self, checks: Checks) -> None:
        self.checks = checks
        self.answers: dict[tuple[object, ...], object] = {}
        # SPF checks the settings will make, not yet prefetched (see expect).
        self.expected: tuple[tuple[str, str, str], ...] = ()
        self._prefetched = False
        self._void_limit = 0  # of the expected checks
        # The answer decide_now() stopped at, if it did: its key in answers
        # and how to fetch it (decide() starts with that fetch).
        self.stopped: _Missing | None = None
        self._view: RequestView | None = None
        # (settings, remembered, context) of the last attempt: a restart with
        # the same settings and memory needs no new context.
        self._context: tuple[Settings, MemoryEntry | None, Context | None] | None = None

    def view(self, request: PolicyRequest) -> RequestView:
        if self._view is None:
            self._view = read_request(request)
        return self._view

    def context(
        self, settings: Settings, view: RequestView, remembered: MemoryEntry | None
    ) -> Context | None:
        last = self._context
        if last is not None and last[0] is settings and last[1] is remembered:
            return last[2]
        ctx = context_for(settings, view, remembered)
        self._context = (settings, remembered, ctx)
        return ctx

    def spf(
        self, ip: str, sender: str, helo: str, *, lookup_time: float, void_limit: int
    ) -> SpfOutcome:
        # The void limit is part of the check: a Per_User line may change it.
        key = ("spf", ip, sender, helo, void_limit)
        answers = self.answers
        outcome = answers.get(key)
        if outcome is None:
            outcome = self.checks.cached_spf(ip, sender, helo, void_limit=void_limit)
            if outcome is not None:
                answers[key] = outcome
        if outcome is None or outcome is _NOT_CACHED:
            # A restart (the task going on from answer_now) goes straight to
            # the fetch: cached_spf may have run pyspf up to a missing answer.
            answers[key] = _NOT_CACHED
            raise _Missing(
                key,
                functools.partial(
                    self.checks.spf,
                    ip,
                    sender,
                    helo,
                    lookup_time=lookup_time,
                    void_limit=void_limit,
                ),
            )
        return outcome  # type: ignore[return-value]

    def expect(self, planned: tuple[tuple[str, str, str], ...], *, void_limit: int) -> None:
        """The SPF checks (ip, sender, helo) this request will make, with
        ``void_limit``; they are prefetched together when the first answer
        has to be waited for."""
        if not self._prefetched:
            self.expected = planned
            self._void_limit = void_limit

    def prefetch_expected(self) -> None:
        """Start fetching for the expected checks not answered yet (once)."""
        if not self.expected:
            return
        planned, self.expected, self._prefetched = self.expected, (), True
        void_limit = self._void_limit
        for ip, sender, helo in planned:
            if ("spf", ip, sender, helo, void_limit) not in self.answers:
                self.checks.prefetch(ip, sender, helo, void_limit=void_limit)

    def read_expected(self, done: Callable[[bool], None]) -> bool:
        """``prefetch_expected`` for a request whose attempt stopped at an
        SPF outcome a quick read may find (the shared cache): True when
        that read started, and ``done`` will get whether it found the
        outcome (a new attempt may then decide); False when there is no
        such read (``done`` is never called): the request waits as usual."""
        stopped = self.stopped
        if stopped is None or stopped.key[0] != "spf":
            return False
        self.prefetch_expected()  # the request's other checks
        _, ip, sender, helo, void_limit = cast(_SpfKey, stopped.key)
        return self.checks.read_shared(ip, sender, helo, void_limit=void_limit, settled=done)

    def forget_missing(self) -> None:
        """Before a new attempt after ``read_expected``: checks found not
        cached are asked for again (the read may have brought them)."""
        answers = self.answers
        for key in [key for key, answer in answers.items() if answer is _NOT_CACHED]:
            del answers[key]
        self.stopped = None

    def confirmed_ptr_names(self, ip: str, *, lookup_time: float) -> list[str]:
        key = ("ptr", ip)
        if key in self.answers:
            return self.answers[key]  # type: ignore[return-value]
        raise _Missing(
            key, functools.partial(self.checks.confirmed_ptr_names, ip, lookup_time=lookup_time)
        )

    def addresses(self, name: str, *, ipv6: bool, lookup_time: float) -> list[str]:
        key = ("addresses", name, ipv6)
        if key in self.answers:
            return self.answers[key]  # type: ignore[return-value]
        raise _Missing(
            key,
            functools.partial(self.checks.addresses, name, ipv6=ipv6, lookup_time=lookup_time),
        )

    def spf_lifetime(self) -> tuple[float, int] | None:
        """How long a verdict resting on these answers holds: the shortest
        cached lifetime of its SPF outcomes (math.inf without any), and how
        many they are; None when it used a PTR or address lookup, which has
        no TTL to go by."""
        lifetimes = [math.inf]
        for key, answer in self.answers.items():
            if key[0] != "spf":
                return None
            _, ip, sender, helo, void_limit = cast(_SpfKey, key)
            outcome = cast(SpfOutcome, answer)
            lifetimes.append(
                self.checks.cached_lifetime(ip, sender, helo, outcome, void_limit=void_limit)
            )
        return min(lifetimes), len(lifetimes) - 1


async def decide(
    request: PolicyRequest,
    settings: Settings,
    checks: Checks,
    memory: InstanceMemory,
    *,
    known: Known | None = None,
    memo: VerdictMemo | None = None,
) -> Decision:
    """Answer one policy request; ``known`` carries on from ``decide_now()``.

    The header's receiver= field is not this host's name: policyd-spf 3.0.4
    puts the recipient's domain there, and so do we (see ``header_receiver``).
    """
    if known is None or known.checks is not checks:
        known = Known(checks)
    stopped, known.stopped = known.stopped, None
    if stopped is not None and known.answers.get(stopped.key, _NOT_CACHED) is _NOT_CACHED:
        # decide_now() stopped at this answer: an attempt now would stop
        # there again, so fetch it first.
        known.prefetch_expected()
        known.answers[stopped.key] = await stopped.fetch()
    while True:
        try:
            return _decide(request, settings, known, memory, memo)
        except _Missing as missing:
            known.prefetch_expected()
            known.answers[missing.key] = await missing.fetch()


def decide_now(
    request: PolicyRequest,
    settings: Settings,
    known: Known,
    memory: InstanceMemory,
    memo: VerdictMemo | None = None,
) -> Decision | None:
    """``decide()`` without waiting: the decision when every answer it needs is
    cached, else None (nothing was remembered; ``decide(known=known)`` goes on)."""
    try:
        return _decide(request, settings, known, memory, memo)
    except _Missing as missing:
        # Kept without its traceback, which holds the attempt's frames: they
        # would stay alive while the request waits (at 1,000 connections,
        # thousands of them) and, through them, this Known, a cycle left to
        # the collector when no decide() follows.
        known.stopped = missing.with_traceback(None)
        return None


def _decide(
    request: PolicyRequest,
    settings: Settings,
    known: Known,
    memory: InstanceMemory,
    memo: VerdictMemo | None,
) -> Decision:
    """One attempt; raises ``_Missing`` before it remembers anything."""
    if settings.mock:
        return MOCK_DECISION
    if memo is not None and memo.settings is settings:
        attributes = request.attributes
        memo_key = memo.key(attributes)
        entry = memo.get(memo_key)
        if entry is not None:
            answer = _decide_from_memo(entry, attributes, memory, memo)
            if answer is not None:
                return answer
    else:
        memo = None
    view = known.view(request)
    key = memory_key(view)
    remembered = memory.get(key) if key else None
    ctx = known.context(settings, view, remembered)
    if ctx is None:
        verdict = Verdict(Act.NOTHING, note="no valid client address")
        return to_decision(settings, view.queue_id, verdict)
    if remembered is not None and not ctx.per_user:
        if memo is not None:  # its kept replies, as for a memo hit
            return memo.replayed(ctx.settings, view.queue_id, remembered)
        return to_decision(ctx.settings, view.queue_id, replay(remembered))
    verdict = evaluate(ctx, known)
    # Only now, with every answer in: a restart must not find itself remembered.
    if verdict.remember is not None and key:
        memory.put(key, verdict.remember)
    answer = to_decision(ctx.settings, view.queue_id, verdict)
    if memo is not None and remembered is None and memo.admit(memo_key):
        kept = known.spf_lifetime()
        if kept is not None:
            lifetime, checks = kept
            memo.put(memo_key, ctx, verdict, answer, lifetime=lifetime, checks=checks)
    return answer


def _decide_from_memo(
    entry: MemoEntry, attributes: Mapping[str, str], memory: InstanceMemory, memo: VerdictMemo
) -> Decision | None:
    """What ``_decide`` would answer, given a still valid memo entry; None
    when the message's memory asks for the full way (a Per_User recipient
    of a remembered message)."""
    instance = normal(attributes.get("instance", ""))
    key = message_key(instance, entry.client_address, entry.sender)
    remembered = memory.get(key) if key else None
    # Read only when QueueID puts it in the log line.
    queue_id = attributes.get("queue_id", "")
    if queue_id and entry.settings.queue_id:
        queue_id = normal(queue_id, keep_case=True)
    if remembered is not None:
        if entry.per_user:
            return None
        return memo.replayed(entry.settings, queue_id, remembered)
    remember = entry.remember
    if remember is not None and key:
        memory.put(key, remember)
    d = entry.decision  # kept without a queue id
    if not (queue_id and entry.settings.queue_id):
        return d
    return Decision(
        d.kind, d.action, d.identity, d.result, d.reason, d.bypass, d.replayed, queue_id
    )
