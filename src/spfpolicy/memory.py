"""What spfpolicy remembers between requests: the per-message memory and the
verdict memo.

``InstanceMemory``: Postfix asks once per recipient; what a message's first
recipient was answered is kept per message (``memory_key``) and ``replay``ed
to the later ones, as policyd-spf does (see policy.py). ``VerdictMemo``:
whole decisions for messages nothing is remembered for, kept while the SPF
outcomes they rest on stay cached. Both are bounded and expire; deciding.py
reads and writes them around the pure decision.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from spfpolicy.cache import TtlLruCache
from spfpolicy.config import DEFAULTS, Settings
from spfpolicy.policy import (
    ALREADY_PREPENDED,
    Act,
    Context,
    Decision,
    MemoryEntry,
    RequestView,
    Verdict,
    to_decision,
)

__all__ = [
    "InstanceMemory",
    "MemoEntry",
    "VerdictMemo",
    "memory_key",
    "message_key",
    "replay",
]


class InstanceMemory:
    """Per-message memory: bounded (LRU) and expiring, with an injectable clock."""

    def __init__(
        self,
        max_entries: int = DEFAULTS.instance_cache_size,
        ttl: float = DEFAULTS.instance_ttl,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl
        self._entries: TtlLruCache[str, MemoryEntry] = TtlLruCache(max_entries, clock=clock)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> MemoryEntry | None:
        return self._entries.get(key)

    def put(self, key: str, entry: MemoryEntry) -> None:
        if entry.act is Act.PREPEND:
            # Later recipients only need to know a header went out (replay()
            # answers DUNNO): the header text itself is not kept.
            entry = _PREPENDED
        self._entries.set(key, entry, self._ttl)


_PREPENDED = MemoryEntry(Act.PREPEND, "")


def memory_key(view: RequestView) -> str:
    """The memory key; empty (no memory) without an instance, as policyd-spf then
    makes up a random one."""
    return message_key(view.instance, view.client_address, view.sender)


def message_key(instance: str, client_address: str, sender: str) -> str:
    """``memory_key`` from the three values, normalized."""
    return "\0".join((instance, client_address, sender)) if instance else ""


def replay(entry: MemoryEntry) -> Verdict:
    """A later recipient of a remembered message."""
    if entry.act is Act.PREPEND:
        return Verdict(Act.DUNNO, ALREADY_PREPENDED, replayed=True)
    # 3.0.4 loses the PermError status here (replays 5.7.23); we keep entry.error.
    return Verdict(entry.act, entry.text, error=entry.error, replayed=True)


@dataclass(frozen=True, slots=True)
class MemoEntry:
    """A verdict for a message nothing was remembered for, and what it rests on."""

    remember: MemoryEntry | None  # for the message's later recipients
    decision: Decision  # rendered, without the queue id
    settings: Settings  # after Per_User changes
    per_user: bool
    client_address: str  # as read_request() gives them, for the memory key
    sender: str
    checks: int  # SPF checks it saves


class VerdictMemo:
    """Verdicts by the request attributes they depend on, for one Settings.

    ``_evaluate`` is a pure function of the settings, the client address,
    HELO name, sender and recipient (and whether each was sent), and the SPF
    outcomes it used. A memo entry lives as long as the first of those
    outcomes stays in the result cache (so never beyond the shortest DNS TTL
    behind it). Its verdict serves only a message with nothing remembered;
    a later recipient gets the replay of what its message was answered, and
    a Per_User recipient of a remembered message is decided afresh. Verdicts
    that used PTR or address lookups, which have no TTL to go by, are not
    kept.

    A verdict is kept the second time its key is seen: most keys of a mail
    stream come once, and an entry costs a kilobyte or two (the header
    text); a seen key costs its hash.
    """

    def __init__(
        self, settings: Settings, max_entries: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.max_entries = max_entries
        # Without Per_User, only the recipient's domain reaches the verdict
        # (the receiver= field), so its recipients share one entry.
        self._by_domain = settings.per_user is None
        self._entries: TtlLruCache[tuple[str | None, ...], MemoEntry] = TtlLruCache(
            max_entries, clock=clock
        )
        self._seen: set[int] = set()  # hashes of keys seen once (forgotten in bulk)
        # The later recipients' answer after a header, for the last Settings
        # asked (see replayed).
        self._prepended: tuple[Settings, Decision] | None = None
        self.hits = 0
        self.checks_saved = 0  # SPF checks answered through the memo

    def __len__(self) -> int:
        return len(self._entries)

    def key(self, attributes: Mapping[str, str]) -> tuple[str | None, ...]:
        """The request attributes a verdict depends on, as sent (None: not sent)."""
        get = attributes.get
        recipient = get("recipient")
        if self._by_domain and recipient:
            # header_receiver() takes what follows the first "@".
            _, at, domain = recipient.partition("@")
            if at:
                recipient = at + domain
        return (get("client_address"), get("helo_name"), get("sender"), recipient)

    def get(self, key: tuple[str | None, ...]) -> MemoEntry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self.hits += 1
            self.checks_saved += entry.checks
        return entry

    def replayed(self, settings: Settings, queue_id: str, remembered: MemoryEntry) -> Decision:
        """``to_decision(settings, queue_id, replay(remembered))``: a later
        recipient of a message something is remembered for. The usual one,
        a message that got the header with no queue id to log, is the same
        Decision every time: kept for the last ``settings`` asked (most
        recipients of a mail stream after the first; 2 us each otherwise)."""
        if remembered is not _PREPENDED or (queue_id and settings.queue_id):
            return to_decision(settings, queue_id, replay(remembered))
        kept = self._prepended
        if kept is None or kept[0] is not settings:
            answer = dataclasses.replace(to_decision(settings, "", replay(remembered)), kept=True)
            kept = self._prepended = (settings, answer)
        return kept[1]

    def admit(self, key: tuple[str | None, ...]) -> bool:
        """Whether a verdict for ``key`` is to be kept now: the second time
        the key is seen, or to renew its entry."""
        if self.max_entries <= 0:
            return False
        if self._entries.remaining_ttl(key) is not None:
            return True
        seen = self._seen
        mark = hash(key)
        if mark not in seen:
            if len(seen) >= self.max_entries:
                seen.clear()
            seen.add(mark)
            return False
        seen.discard(mark)
        return True

    def put(
        self,
        key: tuple[str | None, ...],
        ctx: Context,
        verdict: Verdict,
        decision: Decision,
        *,
        lifetime: float,
        checks: int,
    ) -> None:
        """Keep ``decision`` for ``lifetime`` seconds (<= 0: not at all); it
        rests on ``checks`` SPF checks."""
        entry = MemoEntry(
            verdict.remember,
            dataclasses.replace(decision, queue_id="", kept=True),
            ctx.settings,
            ctx.per_user,
            ctx.view.client_address,
            ctx.view.sender,
            checks,
        )
        self._entries.set(key, entry, lifetime)
