"""deciding.py: a request's way to its decision — the fast path
(``decide_now``) and the memo answer exactly as ``decide`` does, a missing
answer restarts the decision without asking twice or remembering early, the
prefetch plan, and the void limit as part of a check's key."""

from __future__ import annotations

import gc
import math
import types
from pathlib import Path
from typing import Any

import pytest

from policy_support import (
    MEMO_SPF,
    CachingChecks,
    FakeChecks,
    outcome,
    request,
    settings_from,
    two_recipients,
)
from spfpolicy import deciding
from spfpolicy.deciding import Known, decide, decide_now
from spfpolicy.memory import InstanceMemory, VerdictMemo
from spfpolicy.policy import MemoryEntry
from spfpolicy.protocol import PolicyRequest
from spfpolicy.results import SpfOutcome

# Messages (attribute changes) and their recipients, in the order asked.
MEMO_MESSAGES: list[tuple[dict[str, str | None], list[str | None]]] = [
    ({}, ["b@example.net", "c@example.net", "d@other.example"]),
    ({"instance": "i2"}, ["b@example.net"]),
    ({"instance": "i3", "sender": "z@example.org"}, ["b@example.net", "e@example.net"]),
    ({"instance": "i4", "sender": "z@example.org"}, ["c@example.net"]),
    ({"instance": "i5", "sender": ""}, ["b@example.net", "c@example.net"]),
    ({"instance": "i6", "helo_name": None}, ["b@example.net", "b@example.net"]),
    ({"instance": ""}, ["b@example.net", "c@example.net"]),
    ({"instance": "i7", "recipient": None}, [None]),
    ({"instance": "i8", "client_address": "bogus"}, ["b@example.net"]),
    ({"instance": "i9", "queue_id": "Q9"}, ["B@Example.NET ", "b@other.example"]),
    ({"instance": "i10"}, ["local-user", "b@example.net"]),
]


def memo_requests() -> list[PolicyRequest]:
    out = []
    for changes, recipients in MEMO_MESSAGES * 3:  # kept on the second pass, used on the third
        for recipient in recipients:
            out.append(request(**{**changes, "recipient": recipient}))
    return out


@pytest.mark.parametrize(
    "lines",
    [
        pytest.param([], id="default"),
        pytest.param(["HELO_reject = Fail", "Mail_From_reject = Softfail"], id="rejects"),
        pytest.param(["Hide_Receiver = Yes", "Header_Type = AR"], id="ar-hidden"),
        pytest.param(["Mail_From_pass_restriction = mfpass"], id="restriction"),
        pytest.param(["No_Mail = True", "HELO_reject = No_Check"], id="no-helo"),
        pytest.param(["TestOnly = 0", "Whitelist = 192.0.2.0/30"], id="whitelist"),
        pytest.param(["Domain_Whitelist = wl.example"], id="domain-whitelist"),
        pytest.param(["Per_User = users"], id="per-user"),
    ],
)
async def test_memo_and_fast_path_answer_as_decide_does(tmp_path: Path, lines: list[str]) -> None:
    (tmp_path / "users").write_text("c@example.net,Mail_From_reject=False|Header_Type=AR\n")
    lines = [
        f"Per_User = text,{tmp_path / 'users'}" if x == "Per_User = users" else x for x in lines
    ]
    settings = settings_from(tmp_path, lines)
    domains = {"wl.example": outcome("fail")}
    plain = FakeChecks(MEMO_SPF, domains=domains)
    cached = CachingChecks(MEMO_SPF, domains=domains)
    plain_memory, fast_memory = InstanceMemory(), InstanceMemory()
    memo = VerdictMemo(settings, 100)
    for req in memo_requests():
        expected = await decide(req, settings, plain, plain_memory)
        fast = decide_now(req, settings, Known(cached), fast_memory, memo)
        assert fast == expected, req.attributes
    assert cached.calls == []  # every answer came from the "cache"
    assert memo.hits > 0

    def remembered(memory: InstanceMemory) -> list[tuple[str, MemoryEntry]]:
        return [(key, entry) for key, (entry, _) in memory._entries._data.items()]

    assert remembered(plain_memory) == remembered(fast_memory)


class CountingChecks(FakeChecks):
    """FakeChecks that count the cached_spf calls (nothing is cached)."""

    def __init__(self, spf: dict[tuple[str, str], SpfOutcome]) -> None:
        super().__init__(spf)
        self.cached_calls: list[str] = []

    def cached_spf(self, ip: str, sender: str, helo: str, *, void_limit: int) -> SpfOutcome | None:
        self.cached_calls.append(sender)
        return None


async def test_decide_now_leaves_a_missing_answer_to_decide(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_from(tmp_path, [])
    checks = CountingChecks(MEMO_SPF)  # nothing cached
    memory = InstanceMemory()
    known = Known(checks)
    attempts = 0
    attempt = deciding._decide

    def counted(*args: Any) -> Any:
        nonlocal attempts
        attempts += 1
        return attempt(*args)

    monkeypatch.setattr(deciding, "_decide", counted)
    assert decide_now(request(), settings, known, memory) is None
    assert len(memory) == 0 and checks.calls == []
    decision = await decide(request(), settings, checks, memory, known=known)
    # decide_now's attempt stopped at the HELO check: decide fetches it
    # before its first attempt, which stops at MAIL FROM; the next decides.
    assert attempts == 3
    assert decision.action.startswith("prepend Received-SPF: Softfail")
    # Each check asked once, in policyd-spf's order, despite the restarts.
    assert [c[2] for c in checks.calls] == ["", "a@example.org"]
    # cached_spf (which may run pyspf over cached answers) once per check too:
    # the restart in decide() goes straight to the fetch.
    assert checks.cached_calls == ["", "a@example.org"]
    assert len(memory) == 1


@pytest.mark.parametrize("then_decide", [False, True], ids=["stopped", "decided"])
async def test_a_request_that_waits_leaves_no_reference_cycle(
    tmp_path: Path, then_decide: bool
) -> None:
    """What decide_now keeps of the answer it stopped at holds neither the
    attempt's frames nor its Known: a waiting request kept them alive (at
    1,000 connections, thousands of frames), and they made a cycle for the
    collector when no decide() followed."""
    settings = settings_from(tmp_path, [])
    checks = CountingChecks(MEMO_SPF)  # nothing cached
    memory = InstanceMemory()
    gc.collect()
    gc.disable()
    try:
        known = Known(checks)
        assert decide_now(request(), settings, known, memory) is None
        if then_decide:
            await decide(request(), settings, checks, memory, known=known)
        del known
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        found = [
            type(o).__name__
            for o in gc.garbage
            if isinstance(o, (Known, deciding._Missing))
            or (isinstance(o, types.FrameType) and o.f_code.co_filename.endswith("deciding.py"))
        ]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert found == []


# -- prefetch: only the identities the settings check ----------------------------

HELO_CHECK = ("192.0.2.1", "", "mail.example.com")
MAILFROM_CHECK = ("192.0.2.1", "a@example.org", "mail.example.com")


@pytest.mark.parametrize(
    ("lines", "attributes", "prefetched", "checked"),
    [
        # The HELO check is fetched first; the MAIL FROM check's lookups are
        # started with it, not after it.
        pytest.param([], {}, [MAILFROM_CHECK], [HELO_CHECK, MAILFROM_CHECK], id="both-checked"),
        pytest.param(["HELO_reject = No_Check"], {}, [], [MAILFROM_CHECK], id="helo-no-check"),
        pytest.param(["Mail_From_reject = No_Check"], {}, [], [HELO_CHECK], id="mailfrom-no-check"),
        pytest.param([], {"sender": ""}, [], [HELO_CHECK], id="null-sender"),
        pytest.param(["Whitelist = 192.0.2.1"], {}, [], [], id="whitelisted-client"),
        pytest.param([], {"client_address": "127.0.0.1"}, [], [], id="skipped-address"),
        pytest.param(
            ["HELO_reject = No_Check", "Mail_From_reject = No_Check"],
            {},
            [],
            [],
            id="nothing-checked",
        ),
    ],
)
async def test_prefetch_asks_only_for_checks_the_settings_make(
    tmp_path: Path,
    lines: list[str],
    attributes: dict[str, str],
    prefetched: list[tuple[str, str, str]],
    checked: list[tuple[str, ...]],
) -> None:
    table = {
        ("postmaster@mail.example.com", "mail.example.com"): outcome("pass"),
        ("a@example.org", "mail.example.com"): outcome("pass"),
        ("", "mail.example.com"): outcome("pass"),
    }
    checks = FakeChecks(table)
    await decide(request(**attributes), settings_from(tmp_path, lines), checks, InstanceMemory())
    assert checks.prefetched == prefetched
    assert [call[1:4] for call in checks.calls if call[0] == "spf"] == checked


async def test_later_recipient_of_a_message_prefetches_nothing(tmp_path: Path) -> None:
    table = {
        ("postmaster@mail.example.com", "mail.example.com"): outcome("pass"),
        ("a@example.org", "mail.example.com"): outcome("pass"),
    }
    checks = FakeChecks(table)
    await two_recipients(settings_from(tmp_path, []), checks, request())
    assert checks.prefetched == [MAILFROM_CHECK]  # the first recipient's only


# ------------------------------------------------------------ Per_User Void_Limit


class VoidLimitChecks(FakeChecks):
    """void.example.org's record makes three void lookups before its ip4 term
    matches (RFC 7208 4.6.4): permerror below a void limit of 3, pass from 3
    on. With ``cached``, every outcome is "cached" (see CachingChecks), each
    limit's its own object, as in the result cache."""

    VOID = {False: outcome("permerror"), True: outcome("pass")}

    def __init__(self, *, cached: bool) -> None:
        super().__init__(MEMO_SPF, domains={"wl.example": outcome("fail")})
        self.cached = cached

    def _outcome(self, sender: str, helo: str, void_limit: int) -> SpfOutcome:
        if sender.endswith("@void.example.org"):
            return self.VOID[void_limit >= 3]
        if sender == helo:  # Domain_Whitelist
            return self.domains[sender]
        return self.table[(sender or "postmaster@" + helo, helo)]

    async def spf(
        self, ip: str, sender: str, helo: str, *, lookup_time: float, void_limit: int
    ) -> SpfOutcome:
        self.calls.append(("spf", ip, sender, helo, str(lookup_time)))
        self.void_limits.append(void_limit)
        return self._outcome(sender, helo, void_limit)

    def cached_spf(self, ip: str, sender: str, helo: str, *, void_limit: int) -> SpfOutcome | None:
        return self._outcome(sender, helo, void_limit) if self.cached else None

    def cached_lifetime(
        self, ip: str, sender: str, helo: str, outcome: SpfOutcome, *, void_limit: int
    ) -> float:
        return 300.0 if self.cached_spf(ip, sender, helo, void_limit=void_limit) is outcome else 0.0


async def test_per_user_void_limit_is_the_one_checked(tmp_path: Path) -> None:
    # policyd-spf 3.0.4 sets pyspf's void limit from the Per_User line
    # (_spfcheck); the recipient without one gets the global Void_Limit.
    users = tmp_path / "users"
    users.write_text("pu@rcpt.example,Void_Limit=5\n")
    settings = settings_from(
        tmp_path, [f"Per_User = text,{users}", "Domain_Whitelist = wl.example"]
    )
    checks = VoidLimitChecks(cached=False)
    memory = InstanceMemory()

    def ask(recipient: str, instance: str) -> PolicyRequest:
        return request(sender="carol@void.example.org", recipient=recipient, instance=instance)

    per_user = await decide(ask("pu@rcpt.example", "i1"), settings, checks, memory)
    other = await decide(ask("other@rcpt.example", "i2"), settings, checks, memory)
    assert per_user.action.startswith("prepend Received-SPF: Pass (mailfrom)")
    assert per_user.action.endswith("receiver=pu@rcpt.example ")
    assert other.action.startswith("prepend Received-SPF: Permerror (mailfrom)")
    # Domain_Whitelist, HELO and MAIL FROM checks, each with the limit in effect.
    assert checks.void_limits == [5, 5, 5, 2, 2, 2]

    # The fast path and the verdict memo keep the two apart as well, in
    # either order and on repeated sightings (a memo entry is kept the second
    # time its key is seen).
    checks = VoidLimitChecks(cached=True)
    memo = VerdictMemo(settings, 100)
    for n, recipient in enumerate(["other@rcpt.example", "pu@rcpt.example"] * 3):
        fast = decide_now(ask(recipient, f"j{n}"), settings, Known(checks), memory, memo)
        assert fast is not None
        assert fast.action == (per_user if recipient.startswith("pu@") else other).action
    assert memo.hits == 2


async def test_spf_lifetime_is_what_the_memo_may_keep(tmp_path: Path) -> None:
    settings = settings_from(tmp_path, [])
    known = Known(CachingChecks(MEMO_SPF))
    assert known.spf_lifetime() == (math.inf, 0)  # nothing checked: a bypass lasts
    assert decide_now(request(), settings, known, InstanceMemory()) is not None
    assert known.spf_lifetime() == (CachingChecks.lifetime, 2)  # HELO and MAIL FROM
    # A PTR or address answer has no TTL to go by: such a verdict is not kept.
    ptr = Known(CachingChecks(MEMO_SPF))
    whitelist_ptr = settings_from(tmp_path, ["Domain_Whitelist_PTR = example.com"])
    assert decide_now(request(), whitelist_ptr, ptr, InstanceMemory()) is None
    await decide(request(), whitelist_ptr, ptr.checks, InstanceMemory(), known=ptr)
    assert ptr.spf_lifetime() is None
