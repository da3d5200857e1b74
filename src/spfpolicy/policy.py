"""SPF policy decisions: a request, SPF outcomes and Settings in, a verdict and
the Postfix action out.

Pure: nothing here waits, logs or remembers. ``evaluate()`` reads the
DNS-backed facts (SPF outcomes, forward-confirmed PTR names, A/AAAA
addresses) from an ``Answers`` object in the order policyd-spf 3.0.4 asks for
them, and hands them to pure functions (``address_bypass``, ``spf_verdict``...)
that the tests call directly. The ``Verdict`` says what to answer and what the
message's later recipients are to be answered (``remember``); ``decision()``
renders it into a ``Decision``: the kind of action (``ActionKind``, what the
metrics count) and its text, byte-for-byte what policyd-spf 3.0.4 writes for
the same inputs, except for the differences listed below. Getting the answers
and storing what is to be remembered is deciding.py's part; the memories are
in memory.py.


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
* A failed check never crashes the process; the server answers
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
from dataclasses import dataclass, field
from typing import Protocol

from spfpolicy.address import ip_or_none
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
    "ALREADY_PREPENDED",
    "MOCK_ACTION",
    "MOCK_DECISION",
    "Act",
    "ActionKind",
    "Answers",
    "Context",
    "Decision",
    "Facts",
    "MemoryEntry",
    "RequestView",
    "Verdict",
    "address_bypass",
    "bypass_verdict",
    "context_for",
    "evaluate",
    "fallback_decision",
    "header_receiver",
    "mailfrom_needed",
    "normal",
    "planned_checks",
    "ptr_matches",
    "read_request",
    "render",
    "spf_verdict",
    "to_decision",
]

MOCK_ACTION = "dunno mock header field that should be ignored"
ALREADY_PREPENDED = "Header already pre-pended"
# Attributes policyd-spf does not lower-case.
_KEEP_CASE = frozenset({"protocol_state", "protocol_name", "queue_id"})


class Answers(Protocol):
    """The DNS-backed facts ``evaluate`` reads, as one request has them.

    ``deciding.Known`` implements it over ``deciding.Checks``: a fact it does
    not have yet stops the evaluation (it raises), which runs again once the
    fact is fetched. None of these fail for DNS trouble: ``spf`` gives a
    temperror outcome, the others an empty list (policyd-spf treats a
    whitelist lookup that times out as "not whitelisted").
    """

    def spf(
        self, ip: str, sender: str, helo: str, *, lookup_time: float, void_limit: int
    ) -> SpfOutcome:
        """pyspf's check2(i=ip, s=sender, h=helo) (see ``deciding.Checks.spf``)."""
        ...

    def confirmed_ptr_names(self, ip: str, *, lookup_time: float) -> list[str]:
        """PTR names of ``ip`` whose A/AAAA records include ``ip`` (RFC 7208 5.5)."""
        ...

    def addresses(self, name: str, *, ipv6: bool, lookup_time: float) -> list[str]:
        """The A (or, with ipv6, AAAA) addresses of ``name``, as text."""
        ...

    def expect(self, planned: tuple[tuple[str, str, str], ...], *, void_limit: int) -> None:
        """The SPF checks (ip, sender, helo) the evaluation is about to make."""
        ...


class Act(enum.StrEnum):
    """policyd-spf's internal action words."""

    PREPEND = "prepend"
    REJECT = "reject"
    DEFER = "defer"
    RESULT_ONLY = "result_only"  # answer with a pass restriction's name
    DUNNO = "dunno"
    NOTHING = "none"  # nothing to check; DUNNO as well


class ActionKind(enum.Enum):
    """What an answer tells Postfix, whatever its text; the metrics count these.

    The value is the first word of the action text, the Prometheus label; a
    pass restriction is labelled by its class name (``metrics.action_label``).
    policyd-spf 3.0.4 also has a "warn" branch, which nothing reaches.
    """

    PREPEND = "prepend"  # prepend <header>
    DUNNO = "dunno"  # also TestOnly = 0, Prospective, Header_Type = None, Mock
    REJECT = "550"  # 550 [5.7.23|5.7.24] <reason>
    DEFER = "defer_if_permit"  # defer_if_permit [4.7.24] <reason>
    RESTRICTION = "restriction"  # a HELO/Mail_From pass restriction's class name


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
    """The answer to one request: its kind, and ``action``, the text after "action="."""

    kind: ActionKind
    action: str
    identity: Identity | None = None
    result: SpfResult | None = None
    reason: str = ""
    bypass: Bypass | None = None
    replayed: bool = False
    queue_id: str = ""  # empty when QueueID = False
    # Kept by the verdict memo and given again to every request its entry
    # answers (server.PolicyServer keeps what it renders of such a one).
    kept: bool = field(default=False, compare=False, repr=False)

    @property
    def restriction(self) -> str:
        """The pass restriction's class name answered, or ""."""
        return self.action if self.kind is ActionKind.RESTRICTION else ""

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


MOCK_DECISION = Decision(ActionKind.DUNNO, MOCK_ACTION)


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
        return normal(request.get(name), keep_case=name in _KEEP_CASE)

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
        object.__setattr__(self, "address", ip_or_none(self.ip))  # parsed once per request

    @property
    def helo(self) -> str:
        """The HELO name checked: the sender's domain or "unknown" when none was sent."""
        if self.view.helo:
            return self.view.helo
        _, at, domain = self.view.sender.partition("@")
        return domain if at else "unknown"


def normal(text: str, *, keep_case: bool = False) -> str:
    """An attribute's value as policyd-spf reads it: right-stripped,
    lower-cased (but for ``_KEEP_CASE``), cleaned of control characters."""
    text = text.rstrip()
    return clean(text if keep_case else text.lower())


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


# ------------------------------------------------------------------ bypasses


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
    return client is not None and any(ip_or_none(a) == client for a in addresses)


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
    return _mailfrom_after(ctx, None if helo is None else _helo_stage(ctx, helo))


def _mailfrom_after(ctx: Context, stage: _HeloStage | None) -> bool:
    """``mailfrom_needed``, given the HELO outcome's stage (None: no HELO check)."""
    if not ctx.view.sender or ctx.settings.mail_from_reject is MailFromReject.NO_CHECK:
        return False
    return stage is None or stage.final is None


def spf_verdict(ctx: Context, helo: SpfOutcome | None, mfrom: SpfOutcome | None) -> Verdict:
    """HELO and MAIL FROM outcomes -> verdict, following policyd-spf 3.0.4's order.

    ``helo`` is None when HELO_reject = No_Check; ``mfrom`` is None when there
    is no sender, Mail_From_reject = No_Check, or the HELO result decided alone.
    """
    stage = _helo_stage(ctx, helo) if helo is not None else None
    return _spf_verdict(ctx, stage, helo, mfrom)


def _spf_verdict(
    ctx: Context, stage: _HeloStage | None, helo: SpfOutcome | None, mfrom: SpfOutcome | None
) -> Verdict:
    """``spf_verdict``, given the HELO outcome's stage (worked out once per evaluation)."""
    s = ctx.settings
    sender = ctx.view.sender
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

_DUNNO = (ActionKind.DUNNO, "dunno")


def render(settings: Settings, verdict: Verdict) -> tuple[ActionKind, str]:
    """The action's kind and text, as policyd-spf's main loop writes it."""
    act = verdict.act
    if settings.test_only == 0 and act is not Act.PREPEND:
        return _DUNNO
    codes = settings.spf_enhanced_status_codes
    if act is Act.REJECT:
        code = ("550 5.7.24" if verdict.error else "550 5.7.23") if codes else "550"
        return ActionKind.REJECT, f"{code} {verdict.text}"
    if act is Act.DEFER:
        code = "defer_if_permit 4.7.24" if codes else "defer_if_permit"
        return ActionKind.DEFER, f"{code} {verdict.text}"
    if act is Act.PREPEND:
        if settings.prospective or settings.header_type is HeaderType.NONE:
            return _DUNNO
        return ActionKind.PREPEND, f"prepend {verdict.text}"
    if act is Act.RESULT_ONLY:
        return ActionKind.RESTRICTION, verdict.text
    return _DUNNO


def to_decision(settings: Settings, queue_id: str, verdict: Verdict) -> Decision:
    """The rendered verdict, with what the log line tells."""
    kind, action = render(settings, verdict)
    facts = verdict.facts
    return Decision(
        kind,
        action,
        identity=facts.identity if facts else None,
        result=facts.result if facts else None,
        reason=facts.reason if facts else verdict.note,
        bypass=verdict.bypass,
        replayed=verdict.replayed,
        queue_id=queue_id if settings.queue_id else "",
    )


def evaluate(ctx: Context, checks: Answers) -> Verdict:
    """The verdict for a request nothing is remembered for (or a Per_User
    recipient): bypasses first, then the HELO and MAIL FROM checks."""
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
    stage: _HeloStage | None = None
    if s.helo_reject is not HeloReject.NO_CHECK:
        helo = checks.spf(ctx.ip, "", ctx.helo, lookup_time=lookup_time, void_limit=void_limit)
        stage = _helo_stage(ctx, helo)
    mfrom: SpfOutcome | None = None
    if _mailfrom_after(ctx, stage):
        mfrom = checks.spf(
            ctx.ip, ctx.view.sender, ctx.helo, lookup_time=lookup_time, void_limit=void_limit
        )
    return _spf_verdict(ctx, stage, helo, mfrom)


def fallback_decision(settings: Settings, request: PolicyRequest) -> Decision:
    """The answer when ``decide`` failed or ran out of time.

    DUNNO, or with TempError_Defer the defer a TempError would have given
    (never in TestOnly = 0 mode, and the Mock answer with Mock = True).
    """
    if settings.mock:
        return MOCK_DECISION
    view = read_request(request)
    effective, _ = settings.for_recipient(view.recipient)
    queue_id = view.queue_id if settings.queue_id else ""
    if not effective.temperror_defer or effective.test_only == 0:
        return Decision(ActionKind.DUNNO, "dunno", reason="fallback", queue_id=queue_id)
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
    return to_decision(effective, view.queue_id, verdict)
