"""SPF policy decisions: a request, SPF outcomes and Settings in, a Postfix action out.

``decide()`` is the only coroutine: it asks ``Checks`` for DNS-backed facts
(SPF outcomes, forward-confirmed PTR names, A/AAAA addresses) in the order
policyd-spf 3.0.4 does, and hands them to pure functions (``read_request``,
``address_bypass``, ``spf_verdict``, ``render``...) that the tests call
directly. The decision itself is synchronous and starts over once a missing
answer has been fetched, so ``decide_now()`` answers a request whose facts are
all cached without a coroutine (the server's fast path). The action text is
byte-for-byte what policyd-spf 3.0.4 writes for the same inputs, except for
the differences listed below.

Per-message memory: Postfix asks once per recipient, and policyd-spf keeps, per
``instance`` (one per message), what it answered first. A later recipient of
the same message gets DUNNO if the first answer was a header (one header per
message), and the first answer again if it was a reject, defer or pass
restriction. A recipient with its own Per_User settings is always checked
afresh and never remembered, as in policyd-spf.

Differences from policyd-spf 3.0.4
----------------------------------
* Memory is bounded and expiring (``InstanceMemory``: LRU, TTL) instead of a
  dict that grows for the life of the process, and its key includes the client
  address and sender besides ``instance``, since one spfpolicy serves every
  smtpd process (policyd-spf runs one process per connection).
* A remembered reject keeps its status code: 3.0.4 replays a PermError reject
  (550 5.7.24) to later recipients as 550 5.7.23.
* Domain_Whitelist_PTR matches forward-confirmed PTR names only (3.0.4 takes
  the first PTR name unconfirmed, so anyone controlling their reverse zone can
  claim a whitelisted domain), all of them, at label boundaries as its man page
  says (3.0.4 uses a plain suffix test: "evilexample.com" matched "example.com").
* With HELO_pass_restriction set and Mail_From_pass_restriction not set, a
  message passing both checks gets the HELO restriction; 3.0.4 answers
  "action=None", which Postfix treats as a configuration error.
* No_Mail compares the checked domain's SPF record with "v=spf1 -all"; 3.0.4
  compares the first TXT record of the domain, which is not always the SPF one.
* A request whose client address (or Prospective) is not an IP address gets
  DUNNO; 3.0.4 crashes or gives up differently per option. A missing sender
  attribute is taken as the null sender (Postfix always sends it).
* Control characters in values copied into the answer (HELO name, sender,
  explanation) become '?', so they cannot end or truncate the reply line.
* ``decide()`` never lets a failed check crash the process; the server answers
  ``fallback_decision()`` instead of dropping the connection.
* Configuration differences (Mock = False, lists with spaces, empty
  skip_addresses, Per_User file read at load...) are listed in config.py.

Quirks of 3.0.4 that are reproduced on purpose: the receiver= field holds the
recipient's domain (the full recipient with Per_User, "<UNKNOWN>" with
Hide_Receiver, "none" without a recipient), not a host name; with
HELO_reject = Null and a non-null sender, a HELO result still goes into the
header when MAIL FROM gives None; a HELO pass restriction wins over a MAIL FROM
reject; Prospective suppresses the header but not rejects.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, cast

from spfpolicy.cache import TtlLruCache
from spfpolicy.config import HeaderType, HeloReject, MailFromReject, Settings
from spfpolicy.headers import (
    Bypass,
    ar_bypass,
    ar_spf,
    clean,
    reason_text,
    received_spf,
    result_word,
    x_comment,
)
from spfpolicy.protocol import PolicyRequest
from spfpolicy.results import NO_MAIL_RECORD, Identity, SpfOutcome, SpfResult

__all__ = [
    "MOCK_ACTION",
    "Act",
    "Checks",
    "Context",
    "Decision",
    "Facts",
    "InstanceMemory",
    "Known",
    "MemoryEntry",
    "RequestView",
    "Verdict",
    "VerdictMemo",
    "address_bypass",
    "bypass_verdict",
    "decide",
    "decide_now",
    "fallback_decision",
    "header_receiver",
    "mailfrom_needed",
    "planned_checks",
    "ptr_matches",
    "read_request",
    "render",
    "replay",
    "spf_verdict",
]

MOCK_ACTION = "dunno mock header field that should be ignored"
ALREADY_PREPENDED = "Header already pre-pended"
# Attributes policyd-spf does not lower-case.
_KEEP_CASE = frozenset({"protocol_state", "protocol_name", "queue_id"})


class Checks(Protocol):
    """The DNS-backed facts ``decide`` needs; the server implements it.

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


class Act(enum.StrEnum):
    """policyd-spf's internal action words."""

    PREPEND = "prepend"
    REJECT = "reject"
    DEFER = "defer"
    RESULT_ONLY = "result_only"  # answer with a pass restriction's name
    DUNNO = "dunno"
    NOTHING = "none"  # nothing to check; DUNNO as well


@dataclass(frozen=True, slots=True)
class MemoryEntry:
    """What a message's earlier recipient was answered, to replay to the next."""

    act: Act
    text: str  # the header, the reject/defer text or the restriction name
    error: bool = False  # a PermError/TempError reject (5.7.24)


@dataclass(frozen=True, slots=True)
class Facts:
    """Which SPF result a verdict rests on, for the log line."""

    identity: Identity
    result: SpfResult
    reason: str


@dataclass(frozen=True, slots=True)
class Verdict:
    """A decision before rendering: the action word, its text, what to remember."""

    act: Act
    text: str = ""
    error: bool = False
    remember: MemoryEntry | None = None
    facts: Facts | None = None
    bypass: Bypass | None = None
    replayed: bool = False
    note: str = ""  # why nothing was checked, for the log


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one request: ``action`` is the text after "action="."""

    action: str
    identity: Identity | None = None
    result: SpfResult | None = None
    reason: str = ""
    bypass: Bypass | None = None
    replayed: bool = False
    queue_id: str = ""  # empty when QueueID = False

    def log_message(self) -> str:
        """One log line: queue id, action, and what led to it."""
        parts = [f"{self.queue_id}:"] if self.queue_id else []
        parts.append(self.action)
        if self.identity is not None and self.result is not None:
            parts.append(f"[{self.identity}={self.result}]")
        if self.bypass is not None:
            parts.append(f"[bypass={self.bypass}]")
        if self.replayed:
            parts.append("[repeated for this message]")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class RequestView:
    """The request attributes policyd-spf reads, normalized as it does.

    Values are right-stripped and lower-cased (except queue_id), then cleaned of
    control characters. ``*_sent`` tell whether Postfix sent the attribute at all
    (the trace header shows "<UNKNOWN>" for a missing one).
    """

    client_address: str
    helo: str
    sender: str
    recipient: str  # "none" when absent, as in policyd-spf
    instance: str
    queue_id: str
    helo_sent: bool = True
    sender_sent: bool = True
    client_sent: bool = True


def read_request(request: PolicyRequest) -> RequestView:
    def value(name: str) -> str:
        return _normal(request.get(name), keep_case=name in _KEEP_CASE)

    attributes = request.attributes
    return RequestView(
        client_address=value("client_address"),
        helo=value("helo_name"),
        sender=value("sender"),
        recipient=value("recipient") or "none",
        instance=value("instance"),
        queue_id=value("queue_id"),
        helo_sent="helo_name" in attributes,
        sender_sent="sender" in attributes,
        client_sent="client_address" in attributes,
    )


def header_receiver(settings: Settings, recipient: str) -> str:
    """The receiver= value (and the URL's r=): policyd-spf uses the recipient, not a host."""
    if settings.per_user is not None:
        return recipient
    if settings.hide_receiver:
        return "<UNKNOWN>"
    if recipient != "none" and "@" in recipient:
        return recipient.split("@")[1]
    return recipient  # a local recipient without "@" stays as it is


@dataclass(frozen=True, slots=True)
class Context:
    """Everything the pure decision functions need about one request."""

    settings: Settings  # after Per_User changes
    view: RequestView
    ip: str  # Prospective or the client address
    receiver: str
    per_user: bool = False
    last_prepended: bool = False  # an earlier recipient already got the header
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", _ip(self.ip))  # parsed once per request

    @property
    def helo(self) -> str:
        """The HELO name checked: the sender's domain or "unknown" when none was sent."""
        if self.view.helo:
            return self.view.helo
        _, at, domain = self.view.sender.partition("@")
        return domain if at else "unknown"


# ------------------------------------------------------------------ memory


class InstanceMemory:
    """Per-message memory: bounded (LRU) and expiring, with an injectable clock."""

    def __init__(
        self,
        max_entries: int = 10_000,
        ttl: float = 1800.0,
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
    return _memory_key(view.instance, view.client_address, view.sender)


def _memory_key(instance: str, client_address: str, sender: str) -> str:
    return "\0".join((instance, client_address, sender)) if instance else ""


def replay(entry: MemoryEntry) -> Verdict:
    """A later recipient of a remembered message."""
    if entry.act is Act.PREPEND:
        return Verdict(Act.DUNNO, ALREADY_PREPENDED, replayed=True)
    # 3.0.4 loses the PermError status here (replays 5.7.23); we keep entry.error.
    return Verdict(entry.act, entry.text, error=entry.error, replayed=True)


# ------------------------------------------------------------------ bypasses


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def bypass_verdict(ctx: Context, bypass: Bypass) -> Verdict:
    """The trace header for a skipped check, once per message."""
    if ctx.last_prepended:
        return Verdict(Act.DUNNO, ALREADY_PREPENDED, bypass=bypass)
    view = ctx.view
    client = view.client_address if view.client_sent else "<UNKNOWN>"
    helo = view.helo if view.helo_sent else "<UNKNOWN>"
    sender = view.sender if view.sender_sent else "<UNKNOWN>"
    if ctx.settings.header_type is HeaderType.AR:
        header = ar_bypass(ctx.settings.authserv_id, bypass, client, helo, sender, ctx.receiver)
    else:
        header = x_comment(bypass, client, helo, sender, ctx.receiver)
    remember = None if ctx.per_user else MemoryEntry(Act.PREPEND, header)
    return Verdict(Act.PREPEND, header, remember=remember, bypass=bypass)


def address_bypass(ctx: Context) -> Verdict | None:
    """skip_addresses, then Whitelist: no DNS needed."""
    address = ctx.address
    if address is None:
        return None
    for networks, bypass in (
        (ctx.settings.skip_addresses, Bypass.SKIP_ADDRESSES),
        (ctx.settings.whitelist, Bypass.WHITELIST),
    ):
        if any(address in network for network in networks):
            return bypass_verdict(ctx, bypass)
    return None


def helo_whitelisted(ctx: Context, addresses: list[str]) -> bool:
    """HELO_Whitelist: the client address is among the HELO name's A/AAAA records."""
    client = ctx.address
    return client is not None and any(_ip(a) == client for a in addresses)


def ptr_matches(names: list[str], domains: tuple[str, ...]) -> bool:
    """RFC 7208 5.5 style: a name equal to, or below, a listed domain."""
    for name in names:
        name = name.lower().rstrip(".")
        for domain in domains:
            if name == domain or name.endswith("." + domain):
                return True
    return False


# ------------------------------------------------------------------ SPF results


def _listed(domains: tuple[str, ...], domain: str) -> bool:
    """Reject_Not_Pass_Domains as 3.0.4 tests it (pyspf's domainmatch, arguments
    swapped): a listed domain equal to, or *below*, the checked domain."""
    domain = domain.lower()
    return any(d == domain or d.endswith("." + domain) for d in domains)


_REJECTED = {
    "SPF_Not_Pass": frozenset({SpfResult.FAIL, SpfResult.SOFTFAIL, SpfResult.NEUTRAL}),
    "Softfail": frozenset({SpfResult.FAIL, SpfResult.SOFTFAIL}),
    "Fail": frozenset({SpfResult.FAIL}),
    "Null": frozenset({SpfResult.FAIL}),
    "False": frozenset(),
}


def _policy_act(
    settings: Settings, policy: HeloReject | MailFromReject, local: bool, result: SpfResult
) -> Act:
    name = "SPF_Not_Pass" if local else policy.value
    if result in _REJECTED[name]:
        return Act.REJECT
    if name == "False":
        return Act.PREPEND  # False never rejects or defers, not even on errors
    if result is SpfResult.TEMPERROR and settings.temperror_defer:
        return Act.DEFER
    if result is SpfResult.PERMERROR and settings.permerror_reject:
        return Act.REJECT
    return Act.PREPEND


def _is_error(result: SpfResult) -> bool:
    return result in (SpfResult.PERMERROR, SpfResult.TEMPERROR)


def _explanation(outcome: SpfOutcome, local: bool) -> str:
    if outcome.result is SpfResult.NONE:
        return "no SPF record"
    if local:
        return f"Receiver policy for SPF {result_word(outcome.result)}"
    return clean(outcome.explanation)


def _header(
    ctx: Context, identity: Identity, result: SpfResult, explanation: str, envelope_from: str
) -> str:
    s = ctx.settings
    if s.header_type is HeaderType.AR:
        if identity is Identity.HELO:
            prop, value = "smtp.helo", ctx.helo
        else:
            local, at, domain = ctx.view.sender.partition("@")
            prop, value = "smtp.mailfrom", domain if at else local
        return ar_spf(
            s.authserv_id,
            result,
            explanation,
            prop,
            value,
            ctx.ip,
            ctx.helo,
            envelope_from,
            ctx.receiver,
        )
    # A MAIL FROM Received-SPF comment is the word "mailfrom" in 3.0.4.
    comment = explanation if identity is Identity.HELO else "mailfrom"
    return received_spf(
        result, comment, identity.value, ctx.ip, ctx.helo, envelope_from, ctx.receiver
    )


def _reason(ctx: Context, act: Act, explanation: str, identity: Identity) -> str:
    helo = identity is Identity.HELO
    return reason_text(
        ctx.settings.reason_message,
        ctx.settings.reason_url,
        deferred=act is Act.DEFER,
        explanation=explanation,
        scope="helo" if helo else "mfrom",
        identity=ctx.helo if helo else ctx.view.sender,
        ip=ctx.ip,
        recipient=ctx.receiver,
    )


@dataclass(frozen=True, slots=True)
class _HeloStage:
    act: Act
    facts: Facts
    header: str
    remember: MemoryEntry | None
    final: Verdict | None  # set when the HELO result decides alone


def _helo_stage(ctx: Context, outcome: SpfOutcome) -> _HeloStage:
    s = ctx.settings
    result = outcome.result
    sender = ctx.view.sender
    local = False
    if s.helo_reject is HeloReject.NULL and sender:
        act = Act.DUNNO  # Null: HELO results only matter for the null sender
    else:
        local = _listed(s.reject_not_pass_domains, ctx.view.helo)
        act = _policy_act(s, s.helo_reject, local, result)
    explanation = _explanation(outcome, local)
    header = _header(ctx, Identity.HELO, result, explanation, sender or "<>")
    facts = Facts(Identity.HELO, result, explanation)
    if act not in (Act.REJECT, Act.DEFER):
        if s.helo_pass_restriction and result is SpfResult.PASS:
            entry = MemoryEntry(Act.RESULT_ONLY, s.helo_pass_restriction)
        else:
            entry = MemoryEntry(act, header)
        return _HeloStage(act, facts, header, entry, None)
    if act is Act.REJECT and s.no_mail and outcome.record != NO_MAIL_RECORD:
        if ctx.last_prepended:
            done = Verdict(Act.DUNNO, ALREADY_PREPENDED, facts=facts)
            return _HeloStage(act, facts, header, None, done)
        act = Act.PREPEND  # not a no-mail domain: header only, decided by MAIL FROM
        return _HeloStage(act, facts, header, None, None)
    text = _reason(ctx, act, explanation, Identity.HELO)
    error = _is_error(result)
    entry = MemoryEntry(act, text, error)
    final = Verdict(act, text, error, remember=entry, facts=facts)
    return _HeloStage(act, facts, header, entry, final)


def planned_checks(ctx: Context) -> tuple[tuple[str, str, str], ...]:
    """The SPF checks (ip, sender, helo) ``_evaluate`` may make once no
    bypass applies: HELO unless HELO_reject = No_Check, MAIL FROM when there
    is a sender and Mail_From_reject is not No_Check (the HELO result may
    still make it unneeded). Only these are prefetched."""
    planned = []
    if ctx.settings.helo_reject is not HeloReject.NO_CHECK:
        planned.append((ctx.ip, "", ctx.helo))
    if mailfrom_needed(ctx, None):
        planned.append((ctx.ip, ctx.view.sender, ctx.helo))
    return tuple(planned)


def mailfrom_needed(ctx: Context, helo: SpfOutcome | None) -> bool:
    """Whether ``spf_verdict`` will look at a MAIL FROM outcome."""
    if not ctx.view.sender or ctx.settings.mail_from_reject is MailFromReject.NO_CHECK:
        return False
    return helo is None or _helo_stage(ctx, helo).final is None


def spf_verdict(ctx: Context, helo: SpfOutcome | None, mfrom: SpfOutcome | None) -> Verdict:
    """HELO and MAIL FROM outcomes -> verdict, following policyd-spf 3.0.4's order.

    ``helo`` is None when HELO_reject = No_Check; ``mfrom`` is None when there
    is no sender, Mail_From_reject = No_Check, or the HELO result decided alone.
    """
    s = ctx.settings
    sender = ctx.view.sender
    stage = _helo_stage(ctx, helo) if helo is not None else None
    if stage is not None and stage.final is not None:
        return _own(ctx, stage.final)
    remember = stage.remember if stage is not None else None
    helo_facts = stage.facts if stage is not None else None
    helo_pass = helo is not None and helo.result is SpfResult.PASS

    if stage is None and (not sender or mfrom is None):
        return Verdict(Act.NOTHING, note="no check enabled for this request")
    if stage is not None and not sender:
        if s.helo_pass_restriction and helo_pass:
            name = s.helo_pass_restriction
            entry = MemoryEntry(Act.RESULT_ONLY, name)
            return _own(ctx, Verdict(Act.RESULT_ONLY, name, remember=entry, facts=helo_facts))
        # 3.0.4 does not look for an earlier header on this path.
        entry = MemoryEntry(stage.act, stage.header)
        return _own(ctx, Verdict(stage.act, stage.header, remember=entry, facts=helo_facts))
    if stage is not None and mfrom is None:  # Mail_From_reject = No_Check
        return _prepend_once(ctx, stage.header, remember, helo_facts)
    assert mfrom is not None

    result = mfrom.result
    _, at, domain = sender.partition("@")
    local = _listed(s.reject_not_pass_domains, domain if at else "")
    act = _policy_act(s, s.mail_from_reject, local, result)
    explanation = _explanation(mfrom, local)
    facts: Facts | None = Facts(Identity.MAILFROM, result, explanation)
    header = stage.header if stage is not None else ""
    if result is not SpfResult.NONE or helo is None or helo.result is SpfResult.NONE:
        header = _header(ctx, Identity.MAILFROM, result, explanation, sender)
        if act not in (Act.REJECT, Act.DEFER):
            remember = MemoryEntry(act, header)
    else:
        facts = helo_facts  # MAIL FROM gave None: the HELO result goes into the header

    mfrom_pass = result is SpfResult.PASS
    if (s.mail_from_pass_restriction and mfrom_pass) or (s.helo_pass_restriction and helo_pass):
        if mfrom_pass:
            # 3.0.4 answers "None" here when only HELO_pass_restriction is set.
            name = s.mail_from_pass_restriction or s.helo_pass_restriction
            remember = MemoryEntry(Act.RESULT_ONLY, name)
        else:
            name = s.helo_pass_restriction
        return _own(ctx, Verdict(Act.RESULT_ONLY, name, remember=remember, facts=facts))

    if act is Act.REJECT and s.no_mail and mfrom.record != NO_MAIL_RECORD:
        act = Act.PREPEND  # not a no-mail domain: header only
    if act in (Act.REJECT, Act.DEFER):
        text = _reason(ctx, act, explanation, Identity.MAILFROM)
        error = _is_error(result)
        entry = MemoryEntry(act, text, error)
        return _own(ctx, Verdict(act, text, error, remember=entry, facts=facts))
    return _prepend_once(ctx, header, remember, facts)


def _prepend_once(
    ctx: Context, header: str, remember: MemoryEntry | None, facts: Facts | None
) -> Verdict:
    if ctx.last_prepended:
        return Verdict(Act.DUNNO, ALREADY_PREPENDED, facts=facts)
    return _own(ctx, Verdict(Act.PREPEND, header, remember=remember, facts=facts))


def _own(ctx: Context, verdict: Verdict) -> Verdict:
    """Per_User recipients are never remembered."""
    if ctx.per_user and verdict.remember is not None:
        return dataclasses.replace(verdict, remember=None)
    return verdict


# ------------------------------------------------------------------ rendering


def render(settings: Settings, verdict: Verdict) -> str:
    """The action text, as policyd-spf's main loop writes it."""
    act = verdict.act
    if settings.test_only == 0 and act is not Act.PREPEND:
        return "dunno"
    codes = settings.spf_enhanced_status_codes
    if act is Act.REJECT:
        code = ("550 5.7.24" if verdict.error else "550 5.7.23") if codes else "550"
        return f"{code} {verdict.text}"
    if act is Act.DEFER:
        code = "defer_if_permit 4.7.24" if codes else "defer_if_permit"
        return f"{code} {verdict.text}"
    if act is Act.PREPEND:
        if settings.prospective or settings.header_type is HeaderType.NONE:
            return "dunno"
        return f"prepend {verdict.text}"
    if act is Act.RESULT_ONLY:
        return verdict.text
    return "dunno"


def _decision(settings: Settings, queue_id: str, verdict: Verdict) -> Decision:
    facts = verdict.facts
    return Decision(
        action=render(settings, verdict),
        identity=facts.identity if facts else None,
        result=facts.result if facts else None,
        reason=facts.reason if facts else verdict.note,
        bypass=verdict.bypass,
        replayed=verdict.replayed,
        queue_id=queue_id if settings.queue_id else "",
    )


def context_for(
    settings: Settings, view: RequestView, remembered: MemoryEntry | None
) -> Context | None:
    """Per_User settings and the address to check; None when there is nothing to check."""
    effective, per_user = settings.for_recipient(view.recipient)
    ctx = Context(
        settings=effective,
        view=view,
        ip=effective.prospective or view.client_address,
        receiver=header_receiver(settings, view.recipient),
        per_user=per_user,
        last_prepended=remembered is not None and remembered.act is Act.PREPEND,
    )
    return None if ctx.address is None else ctx


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
    )

    def __init__(self, checks: Checks) -> None:
        self.checks = checks
        self.answers: dict[tuple[object, ...], object] = {}
        # SPF checks the settings will make, not yet prefetched (see expect).
        self.expected: tuple[tuple[str, str, str], ...] = ()
        self._prefetched = False
        self._void_limit = 0  # of the expected checks
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
                lambda: self.checks.spf(
                    ip, sender, helo, lookup_time=lookup_time, void_limit=void_limit
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

    def confirmed_ptr_names(self, ip: str, *, lookup_time: float) -> list[str]:
        key = ("ptr", ip)
        if key in self.answers:
            return self.answers[key]  # type: ignore[return-value]
        raise _Missing(key, lambda: self.checks.confirmed_ptr_names(ip, lookup_time=lookup_time))

    def addresses(self, name: str, *, ipv6: bool, lookup_time: float) -> list[str]:
        key = ("addresses", name, ipv6)
        if key in self.answers:
            return self.answers[key]  # type: ignore[return-value]
        raise _Missing(key, lambda: self.checks.addresses(name, ipv6=ipv6, lookup_time=lookup_time))


@dataclass(frozen=True, slots=True)
class _Memo:
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
        self._entries: TtlLruCache[tuple[str | None, ...], _Memo] = TtlLruCache(
            max_entries, clock=clock
        )
        self._seen: set[int] = set()  # hashes of keys seen once (forgotten in bulk)
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

    def get(self, key: tuple[str | None, ...]) -> _Memo | None:
        entry = self._entries.get(key)
        if entry is not None:
            self.hits += 1
            self.checks_saved += entry.checks
        return entry

    def put(
        self,
        key: tuple[str | None, ...],
        ctx: Context,
        verdict: Verdict,
        decision: Decision,
        known: Known,
    ) -> None:
        if self.max_entries <= 0:
            return
        seen = self._seen
        if self._entries.remaining_ttl(key) is None:  # not kept (any more)
            mark = hash(key)
            if mark not in seen:
                if len(seen) >= self.max_entries:
                    seen.clear()
                seen.add(mark)
                return
            seen.discard(mark)
        lifetimes = [math.inf]  # a verdict without checks (a bypass) lasts
        for answer_key, answer in known.answers.items():
            if answer_key[0] != "spf":
                return
            _, ip, sender, helo, void_limit = cast(_SpfKey, answer_key)
            outcome = cast(SpfOutcome, answer)
            lifetimes.append(
                known.checks.cached_lifetime(ip, sender, helo, outcome, void_limit=void_limit)
            )
        memo = _Memo(
            verdict.remember,
            dataclasses.replace(decision, queue_id=""),
            ctx.settings,
            ctx.per_user,
            ctx.view.client_address,
            ctx.view.sender,
            len(lifetimes) - 1,
        )
        self._entries.set(key, memo, min(lifetimes))  # a lifetime <= 0 keeps nothing


def _normal(text: str, *, keep_case: bool = False) -> str:
    """An attribute's value as policyd-spf reads it: right-stripped,
    lower-cased (but for ``_KEEP_CASE``), cleaned of control characters."""
    text = text.rstrip()
    return clean(text if keep_case else text.lower())


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
    except _Missing:
        return None


def _decide(
    request: PolicyRequest,
    settings: Settings,
    known: Known,
    memory: InstanceMemory,
    memo: VerdictMemo | None,
) -> Decision:
    if settings.mock:
        return Decision(MOCK_ACTION)
    if memo is not None and memo.settings is settings:
        attributes = request.attributes
        memo_key = memo.key(attributes)
        entry = memo.get(memo_key)
        if entry is not None:
            decision = _decide_from_memo(entry, attributes, memory)
            if decision is not None:
                return decision
    else:
        memo = None
    view = known.view(request)
    key = memory_key(view)
    remembered = memory.get(key) if key else None
    ctx = known.context(settings, view, remembered)
    if ctx is None:
        verdict = Verdict(Act.NOTHING, note="no valid client address")
        return _decision(settings, view.queue_id, verdict)
    if remembered is not None and not ctx.per_user:
        return _decision(ctx.settings, view.queue_id, replay(remembered))
    verdict = _evaluate(ctx, known)
    # Only now, with every answer in: a restart must not find itself remembered.
    if verdict.remember is not None and key:
        memory.put(key, verdict.remember)
    decision = _decision(ctx.settings, view.queue_id, verdict)
    if memo is not None and remembered is None:
        memo.put(memo_key, ctx, verdict, decision, known)
    return decision


def _decide_from_memo(
    entry: _Memo, attributes: Mapping[str, str], memory: InstanceMemory
) -> Decision | None:
    """What ``_decide`` would answer, given a still valid memo entry; None
    when the message's memory asks for the full way (a Per_User recipient
    of a remembered message)."""
    instance = _normal(attributes.get("instance", ""))
    key = _memory_key(instance, entry.client_address, entry.sender)
    remembered = memory.get(key) if key else None
    queue_id = _normal(attributes.get("queue_id", ""), keep_case=True)
    if remembered is not None:
        if entry.per_user:
            return None
        return _decision(entry.settings, queue_id, replay(remembered))
    remember = entry.remember
    if remember is not None and key:
        memory.put(key, remember)
    d = entry.decision
    if not entry.settings.queue_id:
        return d
    return Decision(d.action, d.identity, d.result, d.reason, d.bypass, d.replayed, queue_id)


def _evaluate(ctx: Context, checks: Known) -> Verdict:
    s = ctx.settings
    verdict = address_bypass(ctx)
    if verdict is not None:
        return verdict
    wl_time = float(s.whitelist_lookup_time)
    # policyd-spf 3.0.4 sets pyspf's void limit from the Per_User line before
    # any check, Domain_Whitelist's included.
    void_limit = s.void_limit
    for domain in s.domain_whitelist:
        outcome = checks.spf(ctx.ip, domain, domain, lookup_time=wl_time, void_limit=void_limit)
        if outcome.result is SpfResult.PASS:
            return bypass_verdict(ctx, Bypass.DOMAIN_WHITELIST)
    if ctx.view.helo and ctx.view.helo in s.helo_whitelist:
        ipv6 = isinstance(ctx.address, ipaddress.IPv6Address)
        found = checks.addresses(ctx.view.helo, ipv6=ipv6, lookup_time=wl_time)
        if helo_whitelisted(ctx, found):
            return bypass_verdict(ctx, Bypass.HELO_WHITELIST)
    if s.domain_whitelist_ptr:
        names = checks.confirmed_ptr_names(ctx.ip, lookup_time=wl_time)
        if ptr_matches(names, s.domain_whitelist_ptr):
            return bypass_verdict(ctx, Bypass.DOMAIN_WHITELIST_PTR)
    if not ctx.view.sender and not ctx.view.helo:
        return Verdict(Act.NOTHING, note="no sender and no HELO name")
    checks.expect(planned_checks(ctx), void_limit=void_limit)
    lookup_time = float(s.lookup_time)
    helo: SpfOutcome | None = None
    if s.helo_reject is not HeloReject.NO_CHECK:
        helo = checks.spf(ctx.ip, "", ctx.helo, lookup_time=lookup_time, void_limit=void_limit)
    mfrom: SpfOutcome | None = None
    if mailfrom_needed(ctx, helo):
        mfrom = checks.spf(
            ctx.ip, ctx.view.sender, ctx.helo, lookup_time=lookup_time, void_limit=void_limit
        )
    return spf_verdict(ctx, helo, mfrom)


def fallback_decision(settings: Settings, request: PolicyRequest) -> Decision:
    """The answer when ``decide`` failed or ran out of time.

    DUNNO, or with TempError_Defer the defer a TempError would have given
    (never in TestOnly = 0 mode, and the Mock answer with Mock = True).
    """
    if settings.mock:
        return Decision(MOCK_ACTION)
    view = read_request(request)
    effective, _ = settings.for_recipient(view.recipient)
    queue_id = view.queue_id if settings.queue_id else ""
    if not effective.temperror_defer or effective.test_only == 0:
        return Decision("dunno", reason="fallback", queue_id=queue_id)
    sender = view.sender
    mailfrom = bool(sender) and effective.mail_from_reject is not MailFromReject.NO_CHECK
    text = reason_text(
        effective.reason_message,
        effective.reason_url,
        deferred=True,
        explanation="SPF check could not be completed (temporary error)",
        scope="mfrom" if mailfrom else "helo",
        identity=sender if mailfrom else (view.helo or "unknown"),
        ip=effective.prospective or view.client_address,
        recipient=header_receiver(settings, view.recipient),
    )
    verdict = Verdict(Act.DEFER, text, error=True, note="fallback")
    return _decision(effective, view.queue_id, verdict)
