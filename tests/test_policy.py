"""policy.py: a decision table of exact policyd-spf 3.0.4 answers, memory, pure helpers.

Expected action strings are literal: they were produced by running policyd-spf
3.0.4's own main loop on the same configuration lines, requests and SPF
results; where spfpolicy differs on purpose the param id says so.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from spfpolicy.config import HeaderType, MailFromReject, Settings, load_settings
from spfpolicy.headers import Bypass, clean
from spfpolicy.policy import (
    MOCK_ACTION,
    Act,
    Context,
    Decision,
    InstanceMemory,
    Known,
    MemoryEntry,
    RequestView,
    Verdict,
    VerdictMemo,
    decide,
    decide_now,
    fallback_decision,
    header_receiver,
    mailfrom_needed,
    ptr_matches,
    read_request,
    render,
    replay,
    spf_verdict,
)
from spfpolicy.protocol import PolicyRequest
from spfpolicy.results import Identity, SpfOutcome, SpfResult

# pyspf's explanations for each result, as the evaluator returns them.
EXPLANATION = {
    "pass": "sender SPF authorized",
    "fail": "SPF fail - not authorized",
    "softfail": "domain owner discourages use of this host",
    "neutral": "access neither permitted nor denied",
    "none": "",
    "permerror": "SPF Permanent Error: Too many DNS lookups",
    "temperror": "SPF Temporary Error: DNS Timeout",
}


def outcome(spec: str) -> SpfOutcome:
    """'fail' or 'fail-nomail' (the domain publishes exactly "v=spf1 -all")."""
    name, _, nomail = spec.partition("-")
    record = "v=spf1 -all" if nomail else "v=spf1 a mx -all"
    return SpfOutcome(SpfResult(name), 0, EXPLANATION[name], record=record)


class FakeChecks:
    """Canned answers; records every call so tests can see what was asked."""

    def __init__(
        self,
        spf: dict[tuple[str, str], SpfOutcome],
        *,
        domains: dict[str, SpfOutcome] | None = None,
        ptr: list[str] | None = None,
        addresses: dict[tuple[str, bool], list[str]] | None = None,
    ) -> None:
        self.table = spf
        self.domains = domains or {}
        self.ptr = ptr or []
        self.address_table = addresses or {}
        self.calls: list[tuple[str, ...]] = []
        self.void_limits: list[int] = []  # of each spf() call
        self.prefetched: list[tuple[str, str, str]] = []

    async def spf(
        self, ip: str, sender: str, helo: str, *, lookup_time: float, void_limit: int
    ) -> SpfOutcome:
        self.calls.append(("spf", ip, sender, helo, str(lookup_time)))
        self.void_limits.append(void_limit)
        if sender and sender == helo and "@" not in sender:  # Domain_Whitelist
            return self.domains.get(sender, SpfOutcome(SpfResult.NONE, 250, ""))
        return self.table[(sender or "postmaster@" + helo, helo)]

    async def confirmed_ptr_names(self, ip: str, *, lookup_time: float) -> list[str]:
        self.calls.append(("ptr", ip))
        return self.ptr

    async def addresses(self, name: str, *, ipv6: bool, lookup_time: float) -> list[str]:
        self.calls.append(("addresses", name, str(ipv6)))
        return self.address_table.get((name, ipv6), [])

    def cached_spf(self, ip: str, sender: str, helo: str, *, void_limit: int) -> SpfOutcome | None:
        return None  # every check is asked for, and recorded in calls

    def prefetch(self, ip: str, sender: str, helo: str, *, void_limit: int) -> None:
        self.prefetched.append((ip, sender, helo))


def settings_from(tmp_path: Path, lines: list[str]) -> Settings:
    path = tmp_path / "policyd-spf.conf"
    path.write_text("\n".join(lines) + "\n")
    return load_settings(path, hostname=lambda: "mx.example.net")


def request(**changes: str | None) -> PolicyRequest:
    attributes: dict[str, str | None] = {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "client_address": "192.0.2.1",
        "helo_name": "mail.example.com",
        "sender": "a@example.org",
        "recipient": "b@example.net",
        "instance": "i1",
        "queue_id": "Q1",
    }
    attributes.update(changes)
    return PolicyRequest({k: v for k, v in attributes.items() if v is not None})


async def two_recipients(
    settings: Settings, checks: FakeChecks, first: PolicyRequest
) -> tuple[Decision, Decision]:
    """The same message asked about twice (two recipients), as Postfix does."""
    memory = InstanceMemory()
    one = await decide(first, settings, checks, memory)
    attributes = dict(first.attributes)
    if attributes.get("recipient"):
        attributes["recipient"] = "c@example.net"
    two = await decide(PolicyRequest(attributes), settings, checks, memory)
    return one, two


DECISIONS = [
    pytest.param(
        [],
        "pass",
        "pass",
        "a@example.org",
        (
            "prepend Received-SPF: Pass (mailfrom) identity=mailfrom; "
            "client-ip=192.0.2.1; helo=mail.example.com; "
            "envelope-from=a@example.org; receiver=example.net "
        ),
        "dunno",
        id="default-pass-pass",
    ),
    pytest.param(
        [],
        "pass",
        "fail",
        "a@example.org",
        (
            "550 5.7.23 Message rejected due to: SPF fail - not authorized. Please "
            "see http://www.openspf.net/Why?s=mfrom;id=a@example.org;ip=192.0.2.1;"
            "r=example.net"
        ),
        (
            "550 5.7.23 Message rejected due to: SPF fail - not authorized. Please "
            "see http://www.openspf.net/Why?s=mfrom;id=a@example.org;ip=192.0.2.1;"
            "r=example.net"
        ),
        id="default-mfrom-fail",
    ),
    pytest.param(
        [],
        "none",
        "softfail",
        "a@example.org",
        (
            "prepend Received-SPF: Softfail (mailfrom) identity=mailfrom; "
            "client-ip=192.0.2.1; helo=mail.example.com; "
            "envelope-from=a@example.org; receiver=example.net "
        ),
        "dunno",
        id="default-mfrom-softfail",
    ),
    pytest.param(
        [],
        "fail",
        "pass",
        "a@example.org",
        (
            "550 5.7.23 Message rejected due to: SPF fail - not authorized. Please "
            "see http://www.openspf.net/Why?s=helo;id=mail.example.com;"
            "ip=192.0.2.1;r=example.net"
        ),
        (
            "550 5.7.23 Message rejected due to: SPF fail - not authorized. Please "
            "see http://www.openspf.net/Why?s=helo;id=mail.example.com;"
            "ip=192.0.2.1;r=example.net"
        ),
        id="default-helo-fail",
    ),
    pytest.param(
        [],
        "none",
        "permerror",
        "a@example.org",
        (
            "prepend Received-SPF: Permerror (mailfrom) identity=mailfrom; "
            "client-ip=192.0.2.1; helo=mail.example.com; "
            "envelope-from=a@example.org; receiver=example.net "
        ),
        "dunno",
        id="default-permerror-prepends",
    ),
    pytest.param(
        [],
        "none",
        "temperror",
        "a@example.org",
        (
            "prepend Received-SPF: Temperror (mailfrom) identity=mailfrom; "
            "client-ip=192.0.2.1; helo=mail.example.com; "
            "envelope-from=a@example.org; receiver=example.net "
        ),
        "dunno",
        id="default-temperror-prepends",
    ),
    pytest.param(
        [],
        "pass",
        "none",
        "a@example.org",
        (
            "prepend Received-SPF: Pass (sender SPF authorized) identity=helo; "
            "client-ip=192.0.2.1; helo=mail.example.com; "
            "envelope-from=a@example.org; receiver=example.net "
        ),
        "dunno",
        id="mfrom-none-helo-pass-uses-helo-header",
    ),
    pytest.param(
        [],
        "none",
        "none",
        "a@example.org",
        (
            "prepend Received-SPF: None (mailfrom) identity=mailfrom; "
            "client-ip=192.0.2.1; helo=mail.example.com; "
            "envelope-from=a@example.org; receiver=example.net "
        ),
        "dunno",
        id="both-none",
    ),
    pytest.param(
        [],
        "pass",
        "none",
        "",
        (
            "prepend Received-SPF: Pass (sender SPF authorized) identity=helo; "
            "client-ip=192.0.2.1; helo=mail.example.com; envelope-from=<>; "
            "receiver=example.net "
        ),
        "dunno",
        id="null-sender-helo-pass",
    ),
    pytest.param(
        [],
        "fail",
        "none",
        "",
        (
            "550 5.7.23 Message rejected due to: SPF fail - not authorized. Please "
            "see http://www.openspf.net/Why?s=helo;id=mail.example.com;"
            "ip=192.0.2.1;r=example.net"
        ),
        (
            "550 5.7.23 Message rejected due to: SPF fail - not authorized. Please "
            "see http://www.openspf.net/Why?s=helo;id=mail.example.com;"
            "ip=192.0.2.1;r=example.net"
        ),
        id="null-sender-helo-fail",
    ),
    pytest.param(
        [],
        "none",
        "none",
        "",
        (
            "prepend Received-SPF: None (no SPF record) identity=helo; "
            "client-ip=192.0.2.1; helo=mail.example.com; envelope-from=<>; "
            "receiver=example.net "
        ),
        "dunno",
        id="null-sender-helo-none",
    ),
    pytest.param(
        ["HELO_reject = SPF_Not_Pass"],
        "neutral",
        "pass",
        "a@example.org",
        (
            "550 5.7.23 Message rejected due to: access neither permitted nor "
            "denied. Please see http://www.openspf.net/Why?s=helo;"
            "id=mail.example.com;ip=192.0.2.1;r=example.net"
        ),
        (
            "550 5.7.23 Message rejected due to: access neither permitted nor "
            "denied. Please see http://www.openspf.net/Why?s=helo;"
            "id=mail.example.com;ip=192.0.2.1;r=example.net"
        ),
        id="helo-SPF_Not_Pass-neutral",
    ),
    pytest.param(
        ["HELO_reject = SPF_Not_Pass"],
        "softfail",
        "pass",
        "a@example.org",
        (
            "550 5.7.23 Message rejected due to: domain owner discourages use of "
            "this host. Please see http://www.openspf.net/Why?s=helo;"
            "id=mail.example.com;ip=192.0.2.1;r=example.net"
        ),
        (
            "550 5.7.23 Message rejected due to: domain owner discourages use of "
            "this host. Please see http://www.openspf.net/Why?s=helo;"
            "id=mail.example.com;ip=192.0.2.1;r=example.net"
        ),
        id="helo-SPF_Not_Pass-softfail",
    ),
    pytest.param(
        ["HELO_reject = Softfail"],
        "softfail",
        "pass",
        "a@example.org",
        (
            "550 5.7.23 Message rejected due to: domain owner discourages use of "
            "this host. Please see http://www.openspf.net/Why?s=helo;"
            "id=mail.example.com;ip=192.0.2.1;r=example.net"
        ),
        (
            "550 5.7.23 Message rejected due to: domain owner discourages use of "
            "this host. Please see http://www.openspf.net/Why?s=helo;"
            "id=mail.example.com;ip=192.0.2.1;r=example.net"
        ),
        id="helo-Softfail-softfail",
    ),
    pytest.param(
        ["HELO_reject = Softfail"],
        "neutral",
        "pass",
        "a@example.org",
        (
            "prepend Received-SPF: Pass (mailfrom) identity=mailfrom; "
            "client-ip=192.0.2.1; helo=mail.example.com; "
            "envelope-from=a@example.org; receiver=example.net "
        ),
        "dunno",
        id="helo-Softfail-neutral",
    ),
    pytest.param(
        ["HELO_reject = Null"],
        "fail",
        "pass",
        "a@example.org",
        (
            "prepend Received-SPF: Pass (mailfrom) identity=mailfrom; "
            "client-ip=192.0.2.1; helo=mail.example.com; "
            "envelope-from=a@example.org; receiver=example.net "
        ),
        "dunno",
        id="helo-Null-fail-with-sender",
    ),
    pytest.param(
        ["HELO_reject = Null"],
        "fail",
        "none",
        "",
        (
            "550 5.7.23 Message rejected due to: SPF fail - not authorized. Please "
            "see http://www.openspf.net/Why?s=helo;id=mail.example.com;"
            "ip=192.0.2.1;r=example.net"
        ),
        (
            "550 5.7.23 Message rejected due to: SPF fail - not authorized. Please "
            "see http://www.openspf.net/Why?s=helo;id=mail.example.com;"
            "ip=192.0.2.1;r=example.net"
        ),
        id="helo-Null-fail-null-sender",
    ),
    pytest.param(
        ["HELO_reject = Null"],
        "pass",
        "none",
        "a@example.org",
        (
            "prepend Received-SPF: Pass (sender SPF authorized) identity=helo; "
            "client-ip=192.0.2.1; helo=mail.example.com; "
            "envelope-from=a@example.org; receiver=example.net "
        ),
        "dunno",
        id="helo-Null-pass-mfrom-none",
    ),
    pytest.param(
        ["HELO_reject = False"],
        "fail",
        "pass",
        "a@example.org",
        (
            "prepend Received-SPF: Pass (mailfrom) identity=mailfrom; "
            "client-ip=192.0.2.1; helo=mail.example.com; "
            "envelope-from=a@example.org; receiver=example.net "
        ),
        "dunno",
        id="helo-False-fail",
    ),
    pytest.param(
        ["HELO_reject = False", "PermError_reject = True"],
        "permerror",
        "none",
        "a@example.org",
        (
            "prepend Received-SPF: Permerror (SPF Permanent Error: Too many DNS "
            "lookups) identity=helo; client-ip=192.0.2.1; helo=mail.example.com; "
            "envelope-from=a@example.org; receiver=example.net "
        ),
        "dunno",
        id="helo-False-permerror-not-rejected",
    ),
    pytest.param(
        ["HELO_reject = No_Check"],
        "fail",
        "softfail",
        "a@example.org",
        (
            "prepend Received-SPF: Softfail (mailfrom) identity=mailfrom; "
            "client-ip=192.0.2.1; helo=mail.example.com; "
            "envelope-from=a@example.org; receiver=example.net "
        ),
        "dunno",
        id="helo-No_Check",
    ),
    pytest.param(
        ["HELO_reject = No_Check"],
        "fail",
        "none",
        "",
        "dunno",
        "dunno",
        id="helo-No_Check-null-sender",
    ),
    pytest.param(
        ["Mail_From_reject = SPF_Not_Pass"],
        "none",
        "neutral",
        "a@example.org",
        (
            "550 5.7.23 Message rejected due to: access neither permitted nor "
            "denied. Please see http://www.openspf.net/Why?s=mfrom;"
            "id=a@example.org;ip=192.0.2.1;r=example.net"
        ),
        (
            "550 5.7.23 Message rejected due to: access neither permitted nor "
            "denied. Please see http://www.openspf.net/Why?s=mfrom;"
            "id=a@example.org;ip=192.0.2.1;r=example.net"
        ),
        id="mfrom-SPF_Not_Pass-neutral",
    ),
    pytest.param(
        ["Mail_From_reject = Softfail"],
        "none",
        "softfail",
        "a@example.org",
        (
            "550 5.7.23 Message rejected due to: domain owner discourages use of "
            "this host. Please see http://www.openspf.net/Why?s=mfrom;"
            "id=a@example.org;ip=192.0.2.1;r=example.net"
        ),
        (
            "550 5.7.23 Message rejected due to: domain owner discourages use of "
            "this host. Please see http://www.openspf.net/Why?s=mfrom;"
            "id=a@example.org;ip=192.0.2.1;r=example.net"
        ),
        id="mfrom-Softfail-softfail",
    ),
    pytest.param(
        ["Mail_From_reject = False"],
        "none",
        "fail",
        "a@example.org",
        (
            "prepend Received-SPF: Fail (mailfrom) identity=mailfrom; "
            "client-ip=192.0.2.1; helo=mail.example.com; "
            "envelope-from=a@example.org; receiver=example.net "
        ),
        "dunno",
        id="mfrom-False-fail",
    ),
    pytest.param(
        ["Mail_From_reject = No_Check"],
        "pass",
        "fail",
        "a@example.org",
        (
            "prepend Received-SPF: Pass (sender SPF authorized) identity=helo; "
            "client-ip=192.0.2.1; helo=mail.example.com; "
            "envelope-from=a@example.org; receiver=example.net "
        ),
        "dunno",
        id="mfrom-No_Check-helo-pass",
    ),
    pytest.param(
        ["HELO_reject = No_Check", "Mail_From_reject = No_Check"],
        "fail",
        "fail",
        "a@example.org",
        "dunno",
        "dunno",
        id="both-No_Check",
    ),
    pytest.param(
        ["PermError_reject = True"],
        "none",
        "permerror",
        "a@example.org",
        (
            "550 5.7.24 Message rejected due to: SPF Permanent Error: Too many DNS "
            "lookups. Please see http://www.openspf.net/Why?s=mfrom;"
            "id=a@example.org;ip=192.0.2.1;r=example.net"
        ),
        (
            "550 5.7.24 Message rejected due to: SPF Permanent Error: Too many DNS "
            "lookups. Please see http://www.openspf.net/Why?s=mfrom;"
            "id=a@example.org;ip=192.0.2.1;r=example.net"
        ),
        id="permerror-reject-mfrom",
    ),
    pytest.param(
        ["PermError_reject = True"],
        "permerror",
        "pass",
        "a@example.org",
        (
            "550 5.7.24 Message rejected due to: SPF Permanent Error: Too many DNS "
            "lookups. Please see http://www.openspf.net/Why?s=helo;"
            "id=mail.example.com;ip=192.0.2.1;r=example.net"
        ),
        (
            "550 5.7.24 Message rejected due to: SPF Permanent Error: Too many DNS "
            "lookups. Please see http://www.openspf.net/Why?s=helo;"
            "id=mail.example.com;ip=192.0.2.1;r=example.net"
        ),
        id="permerror-reject-helo",
    ),
    pytest.param(
        ["TempError_Defer = True"],
        "none",
        "temperror",
        "a@example.org",
        (
            "defer_if_permit 4.7.24 Message deferred due to: SPF Temporary Error: "
            "DNS Timeout. Please see http://www.openspf.net/Why?s=mfrom;"
            "id=a@example.org;ip=192.0.2.1;r=example.net"
        ),
        (
            "defer_if_permit 4.7.24 Message deferred due to: SPF Temporary Error: "
            "DNS Timeout. Please see http://www.openspf.net/Why?s=mfrom;"
            "id=a@example.org;ip=192.0.2.1;r=example.net"
        ),
        id="temperror-defer-mfrom",
    ),
    pytest.param(
        ["TempError_Defer = True"],
        "temperror",
        "pass",
        "a@example.org",
        (
            "defer_if_permit 4.7.24 Message deferred due to: SPF Temporary Error: "
            "DNS Timeout. Please see http://www.openspf.net/Why?s=helo;"
            "id=mail.example.com;ip=192.0.2.1;r=example.net"
        ),
        (
            "defer_if_permit 4.7.24 Message deferred due to: SPF Temporary Error: "
            "DNS Timeout. Please see http://www.openspf.net/Why?s=helo;"
            "id=mail.example.com;ip=192.0.2.1;r=example.net"
        ),
        id="temperror-defer-helo",
    ),
    pytest.param(
        ["SPF_Enhanced_Status_Codes = No"],
        "none",
        "fail",
        "a@example.org",
        (
            "550 Message rejected due to: SPF fail - not authorized. Please see "
            "http://www.openspf.net/Why?s=mfrom;id=a@example.org;ip=192.0.2.1;"
            "r=example.net"
        ),
        (
            "550 Message rejected due to: SPF fail - not authorized. Please see "
            "http://www.openspf.net/Why?s=mfrom;id=a@example.org;ip=192.0.2.1;"
            "r=example.net"
        ),
        id="no-enhanced-codes-reject",
    ),
    pytest.param(
        ["SPF_Enhanced_Status_Codes = No", "TempError_Defer = True"],
        "none",
        "temperror",
        "a@example.org",
        (
            "defer_if_permit Message deferred due to: SPF Temporary Error: DNS "
            "Timeout. Please see http://www.openspf.net/Why?s=mfrom;"
            "id=a@example.org;ip=192.0.2.1;r=example.net"
        ),
        (
            "defer_if_permit Message deferred due to: SPF Temporary Error: DNS "
            "Timeout. Please see http://www.openspf.net/Why?s=mfrom;"
            "id=a@example.org;ip=192.0.2.1;r=example.net"
        ),
        id="no-enhanced-codes-defer",
    ),
    pytest.param(
        ["No_Mail = True"],
        "none",
        "fail",
        "a@example.org",
        (
            "prepend Received-SPF: Fail (mailfrom) identity=mailfrom; "
            "client-ip=192.0.2.1; helo=mail.example.com; "
            "envelope-from=a@example.org; receiver=example.net "
        ),
        "dunno",
        id="no_mail-not-a-no-mail-domain",
    ),
    pytest.param(
        ["No_Mail = True"],
        "none",
        "fail-nomail",
        "a@example.org",
        (
            "550 5.7.23 Message rejected due to: SPF fail - not authorized. Please "
            "see http://www.openspf.net/Why?s=mfrom;id=a@example.org;ip=192.0.2.1;"
            "r=example.net"
        ),
        (
            "550 5.7.23 Message rejected due to: SPF fail - not authorized. Please "
            "see http://www.openspf.net/Why?s=mfrom;id=a@example.org;ip=192.0.2.1;"
            "r=example.net"
        ),
        id="no_mail-no-mail-domain",
    ),
    pytest.param(
        ["No_Mail = True"],
        "fail",
        "pass",
        "a@example.org",
        (
            "prepend Received-SPF: Pass (mailfrom) identity=mailfrom; "
            "client-ip=192.0.2.1; helo=mail.example.com; "
            "envelope-from=a@example.org; receiver=example.net "
        ),
        "dunno",
        id="no_mail-helo-not-no-mail",
    ),
    pytest.param(
        ["No_Mail = True"],
        "fail-nomail",
        "pass",
        "a@example.org",
        (
            "550 5.7.23 Message rejected due to: SPF fail - not authorized. Please "
            "see http://www.openspf.net/Why?s=helo;id=mail.example.com;"
            "ip=192.0.2.1;r=example.net"
        ),
        (
            "550 5.7.23 Message rejected due to: SPF fail - not authorized. Please "
            "see http://www.openspf.net/Why?s=helo;id=mail.example.com;"
            "ip=192.0.2.1;r=example.net"
        ),
        id="no_mail-helo-no-mail",
    ),
    pytest.param(
        ["Reject_Not_Pass_Domains = example.org"],
        "none",
        "softfail",
        "a@example.org",
        (
            "550 5.7.23 Message rejected due to: Receiver policy for SPF Softfail. "
            "Please see http://www.openspf.net/Why?s=mfrom;id=a@example.org;"
            "ip=192.0.2.1;r=example.net"
        ),
        (
            "550 5.7.23 Message rejected due to: Receiver policy for SPF Softfail. "
            "Please see http://www.openspf.net/Why?s=mfrom;id=a@example.org;"
            "ip=192.0.2.1;r=example.net"
        ),
        id="reject-not-pass-domains-mfrom",
    ),
    pytest.param(
        ["Reject_Not_Pass_Domains = mail.example.com"],
        "neutral",
        "pass",
        "a@example.org",
        (
            "550 5.7.23 Message rejected due to: Receiver policy for SPF Neutral. "
            "Please see http://www.openspf.net/Why?s=helo;id=mail.example.com;"
            "ip=192.0.2.1;r=example.net"
        ),
        (
            "550 5.7.23 Message rejected due to: Receiver policy for SPF Neutral. "
            "Please see http://www.openspf.net/Why?s=helo;id=mail.example.com;"
            "ip=192.0.2.1;r=example.net"
        ),
        id="reject-not-pass-domains-helo",
    ),
    pytest.param(
        ["Reject_Not_Pass_Domains = example.com"],
        "none",
        "softfail",
        "a@example.org",
        (
            "prepend Received-SPF: Softfail (mailfrom) identity=mailfrom; "
            "client-ip=192.0.2.1; helo=mail.example.com; "
            "envelope-from=a@example.org; receiver=example.net "
        ),
        "dunno",
        id="reject-not-pass-domains-other",
    ),
    pytest.param(
        ["HELO_pass_restriction = helo_ok"],
        "pass",
        "none",
        "a@example.org",
        "helo_ok",
        "helo_ok",
        id="helo-pass-restriction",
    ),
    pytest.param(
        ["HELO_pass_restriction = helo_ok"],
        "pass",
        "fail",
        "a@example.org",
        "helo_ok",
        "helo_ok",
        id="helo-pass-restriction-beats-mfrom-fail",
    ),
    pytest.param(
        ["HELO_pass_restriction = helo_ok"],
        "pass",
        "none",
        "",
        "helo_ok",
        "helo_ok",
        id="helo-pass-restriction-null-sender",
    ),
    pytest.param(
        ["Mail_From_pass_restriction = mf_ok"],
        "none",
        "pass",
        "a@example.org",
        "mf_ok",
        "mf_ok",
        id="mfrom-pass-restriction",
    ),
    pytest.param(
        ["HELO_pass_restriction = helo_ok", "Mail_From_pass_restriction = mf_ok"],
        "pass",
        "pass",
        "a@example.org",
        "mf_ok",
        "mf_ok",
        id="both-pass-restrictions",
    ),
    pytest.param(
        ["TestOnly = 0"],
        "none",
        "fail",
        "a@example.org",
        "dunno",
        "dunno",
        id="test-only-no-reject",
    ),
    pytest.param(
        ["TestOnly = 0"],
        "none",
        "softfail",
        "a@example.org",
        (
            "prepend Received-SPF: Softfail (mailfrom) identity=mailfrom; "
            "client-ip=192.0.2.1; helo=mail.example.com; "
            "envelope-from=a@example.org; receiver=example.net "
        ),
        "dunno",
        id="test-only-header",
    ),
    pytest.param(
        ["TestOnly = 0", "Mail_From_pass_restriction = mf_ok"],
        "none",
        "pass",
        "a@example.org",
        "dunno",
        "dunno",
        id="test-only-no-restriction",
    ),
    pytest.param(
        ["Prospective = 198.51.100.7"],
        "none",
        "pass",
        "a@example.org",
        "dunno",
        "dunno",
        id="prospective-no-header",
    ),
    pytest.param(
        ["Prospective = 198.51.100.7"],
        "none",
        "fail",
        "a@example.org",
        (
            "550 5.7.23 Message rejected due to: SPF fail - not authorized. Please "
            "see http://www.openspf.net/Why?s=mfrom;id=a@example.org;"
            "ip=198.51.100.7;r=example.net"
        ),
        (
            "550 5.7.23 Message rejected due to: SPF fail - not authorized. Please "
            "see http://www.openspf.net/Why?s=mfrom;id=a@example.org;"
            "ip=198.51.100.7;r=example.net"
        ),
        id="prospective-still-rejects",
    ),
    pytest.param(
        ["Header_Type = AR", "Authserv_Id = MX.Example.NET"],
        "none",
        "softfail",
        "a@example.org",
        (
            "prepend Authentication-Results: mx.example.net; spf=softfail (domain "
            "owner discourages use of this host) smtp.mailfrom=example.org "
            "(client-ip=192.0.2.1; helo=mail.example.com; "
            "envelope-from=a@example.org; receiver=example.net)"
        ),
        "dunno",
        id="header-ar-mfrom",
    ),
    pytest.param(
        ["Header_Type = AR", "Authserv_Id = mx.example.net"],
        "pass",
        "none",
        "a@example.org",
        (
            "prepend Authentication-Results: mx.example.net; spf=pass (sender SPF "
            "authorized) smtp.helo=mail.example.com (client-ip=192.0.2.1; "
            "helo=mail.example.com; envelope-from=a@example.org; "
            "receiver=example.net)"
        ),
        "dunno",
        id="header-ar-helo",
    ),
    pytest.param(
        ["Header_Type = AR", "Authserv_Id = mx.example.net"],
        "neutral",
        "none",
        "",
        (
            "prepend Authentication-Results: mx.example.net; spf=neutral (access "
            "neither permitted nor denied) smtp.helo=mail.example.com "
            "(client-ip=192.0.2.1; helo=mail.example.com; envelope-from=<>; "
            "receiver=example.net)"
        ),
        "dunno",
        id="header-ar-null-sender",
    ),
    pytest.param(
        ["Header_Type = None"],
        "none",
        "pass",
        "a@example.org",
        "dunno",
        "dunno",
        id="header-none",
    ),
    pytest.param(
        ["Header_Type = None"],
        "none",
        "fail",
        "a@example.org",
        (
            "550 5.7.23 Message rejected due to: SPF fail - not authorized. Please "
            "see http://www.openspf.net/Why?s=mfrom;id=a@example.org;ip=192.0.2.1;"
            "r=example.net"
        ),
        (
            "550 5.7.23 Message rejected due to: SPF fail - not authorized. Please "
            "see http://www.openspf.net/Why?s=mfrom;id=a@example.org;ip=192.0.2.1;"
            "r=example.net"
        ),
        id="header-none-still-rejects",
    ),
    pytest.param(
        ["Hide_Receiver = Yes"],
        "none",
        "pass",
        "a@example.org",
        (
            "prepend Received-SPF: Pass (mailfrom) identity=mailfrom; "
            "client-ip=192.0.2.1; helo=mail.example.com; "
            "envelope-from=a@example.org; receiver=<UNKNOWN> "
        ),
        "dunno",
        id="hide-receiver-header",
    ),
    pytest.param(
        ["Hide_Receiver = Yes"],
        "none",
        "fail",
        "a@example.org",
        (
            "550 5.7.23 Message rejected due to: SPF fail - not authorized. Please "
            "see http://www.openspf.net/Why?s=mfrom;id=a@example.org;ip=192.0.2.1;"
            "r=<UNKNOWN>"
        ),
        (
            "550 5.7.23 Message rejected due to: SPF fail - not authorized. Please "
            "see http://www.openspf.net/Why?s=mfrom;id=a@example.org;ip=192.0.2.1;"
            "r=<UNKNOWN>"
        ),
        id="hide-receiver-reject",
    ),
    pytest.param(
        ["Reason_Message = SPF {rejectdefer}: {spf} <{url}>"],
        "none",
        "fail",
        "a@example.org",
        (
            "550 5.7.23 SPF rejected: SPF fail - not authorized "
            "<http://www.openspf.net/Why?s=mfrom;id=a@example.org;ip=192.0.2.1;"
            "r=example.net>"
        ),
        (
            "550 5.7.23 SPF rejected: SPF fail - not authorized "
            "<http://www.openspf.net/Why?s=mfrom;id=a@example.org;ip=192.0.2.1;"
            "r=example.net>"
        ),
        id="reason-message",
    ),
    pytest.param(
        ["Reason_Message = {rejectdefer} ({spf})", "TempError_Defer = True"],
        "none",
        "temperror",
        "a@example.org",
        "defer_if_permit 4.7.24 deferred (SPF Temporary Error: DNS Timeout)",
        "defer_if_permit 4.7.24 deferred (SPF Temporary Error: DNS Timeout)",
        id="reason-message-defer",
    ),
]


@pytest.mark.parametrize(("conf", "helo", "mfrom", "sender", "first", "second"), DECISIONS)
async def test_decision_table(
    tmp_path: Path, conf: list[str], helo: str, mfrom: str, sender: str, first: str, second: str
) -> None:
    settings = settings_from(tmp_path, conf)
    checks = FakeChecks(
        {
            ("postmaster@mail.example.com", "mail.example.com"): outcome(helo),
            (sender, "mail.example.com"): outcome(mfrom),
        }
    )
    one, two = await two_recipients(settings, checks, request(sender=sender))
    assert (one.action, two.action) == (first, second)


RELAY_SPF = {
    ("postmaster@relay.example.com", "relay.example.com"): outcome("pass"),
    ("a@example.org", "relay.example.com"): outcome("fail"),
    ("", "relay.example.com"): outcome("none"),
    ("postmaster@example.org", "example.org"): outcome("softfail"),
    ("a@example.org", "example.org"): outcome("fail"),
}

BYPASSES = [
    pytest.param(
        ["skip_addresses = 192.0.2.0/24"],
        {},
        (
            "prepend X-Comment: SPF check N/A for local connections - "
            "client-ip=192.0.2.1; helo=relay.example.com; "
            "envelope-from=a@example.org; receiver=example.net "
        ),
        "dunno",
        id="skip-addresses",
    ),
    pytest.param(
        ["skip_addresses = 192.0.2.0/24", "Header_Type = AR", "Authserv_Id = mx.example.net"],
        {},
        (
            "prepend Authentication-Results: mx.example.net; none (SPF check N/A "
            "for local connections -  client-ip=192.0.2.1; helo=relay.example.com; "
            "envelope-from=a@example.org; receiver=example.net)"
        ),
        "dunno",
        id="skip-addresses-ar",
    ),
    pytest.param(
        ["Whitelist = 10.0.0.0/8,192.0.2.1"],
        {},
        (
            "prepend X-Comment: SPF skipped for whitelisted relay - "
            "client-ip=192.0.2.1; helo=relay.example.com; "
            "envelope-from=a@example.org; receiver=example.net "
        ),
        "dunno",
        id="whitelist",
    ),
    pytest.param(
        ["Whitelist = 192.0.2.1", "Header_Type = AR", "Authserv_Id = MX"],
        {},
        (
            "prepend Authentication-Results: mx; none (SPF skipped for whitelisted "
            "relay -  client-ip=192.0.2.1; helo=relay.example.com; "
            "envelope-from=a@example.org; receiver=example.net)"
        ),
        "dunno",
        id="whitelist-ar",
    ),
    pytest.param(
        ["Whitelist = 192.0.2.1", "Header_Type = None"],
        {},
        "dunno",
        "dunno",
        id="whitelist-header-none",
    ),
    pytest.param(
        ["Whitelist = 192.0.2.1"],
        {"sender": ""},
        (
            "prepend X-Comment: SPF skipped for whitelisted relay - "
            "client-ip=192.0.2.1; helo=relay.example.com; envelope-from=; "
            "receiver=example.net "
        ),
        "dunno",
        id="whitelist-null-sender",
    ),
    pytest.param(
        ["Domain_Whitelist = fwd.example,pobox.example"],
        {},
        (
            "prepend X-Comment: SPF skipped for whitelisted relay domain - "
            "client-ip=192.0.2.1; helo=relay.example.com; "
            "envelope-from=a@example.org; receiver=example.net "
        ),
        "dunno",
        id="domain-whitelist",
    ),
    pytest.param(
        ["Domain_Whitelist = fwd.example"],
        {},
        (
            "550 5.7.23 Message rejected due to: SPF fail - not authorized. Please "
            "see http://www.openspf.net/Why?s=mfrom;id=a@example.org;ip=192.0.2.1;"
            "r=example.net"
        ),
        (
            "550 5.7.23 Message rejected due to: SPF fail - not authorized. Please "
            "see http://www.openspf.net/Why?s=mfrom;id=a@example.org;ip=192.0.2.1;"
            "r=example.net"
        ),
        id="domain-whitelist-no-pass",
    ),
    pytest.param(
        ["HELO_Whitelist = relay.example.com"],
        {},
        (
            "prepend X-Comment: SPF skipped for whitelisted HELO domain - "
            "client-ip=192.0.2.1; helo=relay.example.com; "
            "envelope-from=a@example.org; receiver=example.net "
        ),
        "dunno",
        id="helo-whitelist",
    ),
    pytest.param(
        ["HELO_Whitelist = other.example.com"],
        {},
        (
            "550 5.7.23 Message rejected due to: SPF fail - not authorized. Please "
            "see http://www.openspf.net/Why?s=mfrom;id=a@example.org;ip=192.0.2.1;"
            "r=example.net"
        ),
        (
            "550 5.7.23 Message rejected due to: SPF fail - not authorized. Please "
            "see http://www.openspf.net/Why?s=mfrom;id=a@example.org;ip=192.0.2.1;"
            "r=example.net"
        ),
        id="helo-whitelist-other-helo",
    ),
    pytest.param(
        ["Domain_Whitelist_PTR = example.net"],
        {},
        (
            "prepend X-Comment: SPF skipped for PTR whitelisted relay domain - "
            "client-ip=192.0.2.1; helo=relay.example.com; "
            "envelope-from=a@example.org; receiver=example.net "
        ),
        "dunno",
        id="ptr-whitelist",
    ),
    pytest.param(
        ["skip_addresses = 10.0.0.0/8", "Prospective = 10.1.1.1"],
        {},
        "dunno",
        "dunno",
        id="prospective-skip",
    ),
    pytest.param(
        ["Mock = True", "Whitelist = 192.0.2.1"],
        {},
        "dunno mock header field that should be ignored",
        "dunno mock header field that should be ignored",
        id="mock",
    ),
    pytest.param(
        ["HELO_reject = Softfail"],
        {"helo_name": ""},
        (
            "550 5.7.23 Message rejected due to: domain owner discourages use of "
            "this host. Please see http://www.openspf.net/Why?s=helo;"
            "id=example.org;ip=192.0.2.1;r=example.net"
        ),
        (
            "550 5.7.23 Message rejected due to: domain owner discourages use of "
            "this host. Please see http://www.openspf.net/Why?s=helo;"
            "id=example.org;ip=192.0.2.1;r=example.net"
        ),
        id="no-helo-uses-sender-domain",
    ),
    pytest.param(
        [],
        {"helo_name": "", "sender": ""},
        "dunno",
        "dunno",
        id="no-helo-no-sender",
    ),
    pytest.param(
        [],
        {"recipient": "postmaster"},
        (
            "550 5.7.23 Message rejected due to: SPF fail - not authorized. Please "
            "see http://www.openspf.net/Why?s=mfrom;id=a@example.org;ip=192.0.2.1;"
            "r=postmaster"
        ),
        (
            "550 5.7.23 Message rejected due to: SPF fail - not authorized. Please "
            "see http://www.openspf.net/Why?s=mfrom;id=a@example.org;ip=192.0.2.1;"
            "r=postmaster"
        ),
        id="local-recipient",
    ),
    pytest.param(
        [],
        {"recipient": ""},
        (
            "550 5.7.23 Message rejected due to: SPF fail - not authorized. Please "
            "see http://www.openspf.net/Why?s=mfrom;id=a@example.org;ip=192.0.2.1;"
            "r=none"
        ),
        (
            "550 5.7.23 Message rejected due to: SPF fail - not authorized. Please "
            "see http://www.openspf.net/Why?s=mfrom;id=a@example.org;ip=192.0.2.1;"
            "r=none"
        ),
        id="no-recipient",
    ),
    pytest.param(
        [],
        {"client_address": None},
        "dunno",
        "dunno",
        id="no-client-address",
    ),
]


@pytest.mark.parametrize(("conf", "changes", "first", "second"), BYPASSES)
async def test_bypass_and_request_table(
    tmp_path: Path, conf: list[str], changes: dict[str, str | None], first: str, second: str
) -> None:
    settings = settings_from(tmp_path, conf)
    checks = FakeChecks(
        RELAY_SPF,
        domains={"pobox.example": SpfOutcome(SpfResult.PASS, 250, "ok")},
        ptr=["mx1.example.net"],
        addresses={("relay.example.com", False): ["192.0.2.1"]},
    )
    req = request(**{"helo_name": "relay.example.com", "instance": "w1", **changes})
    one, two = await two_recipients(settings, checks, req)
    assert (one.action, two.action) == (first, second)


# ------------------------------------------------------------ deliberate differences


async def test_helo_restriction_alone_applies_when_both_pass(tmp_path: Path) -> None:
    # Difference: policyd-spf 3.0.4 answers "action=None" here.
    settings = settings_from(tmp_path, ["HELO_pass_restriction = helo_ok"])
    checks = FakeChecks(
        {
            ("postmaster@mail.example.com", "mail.example.com"): outcome("pass"),
            ("a@example.org", "mail.example.com"): outcome("pass"),
        }
    )
    one, two = await two_recipients(settings, checks, request())
    assert (one.action, two.action) == ("helo_ok", "helo_ok")


async def test_replayed_permerror_keeps_its_status_code(tmp_path: Path) -> None:
    # Difference: policyd-spf 3.0.4 replays this as 550 5.7.23.
    settings = settings_from(tmp_path, ["PermError_reject = True"])
    checks = FakeChecks(
        {
            ("postmaster@mail.example.com", "mail.example.com"): outcome("none"),
            ("a@example.org", "mail.example.com"): outcome("permerror"),
        }
    )
    one, two = await two_recipients(settings, checks, request())
    assert one.action.startswith("550 5.7.24 Message rejected due to: SPF Permanent Error")
    assert two.action == one.action
    assert two.replayed and not one.replayed


@pytest.mark.parametrize(
    ("names", "domains", "matched"),
    [
        pytest.param(["mx1.example.net"], ("example.net",), True, id="below"),
        pytest.param(["example.net."], ("example.net",), True, id="equal-trailing-dot"),
        pytest.param(["MX1.Example.NET"], ("example.net",), True, id="case"),
        pytest.param(["evilexample.net"], ("example.net",), False, id="label-boundary"),
        pytest.param(["a.example.org", "b.example.net"], ("example.net",), True, id="any-name"),
        pytest.param([], ("example.net",), False, id="none-confirmed"),
    ],
)
def test_ptr_matches(names: list[str], domains: tuple[str, ...], matched: bool) -> None:
    assert ptr_matches(names, domains) is matched


async def test_ptr_whitelist_needs_a_confirmed_name(tmp_path: Path) -> None:
    settings = settings_from(tmp_path, ["Domain_Whitelist_PTR = example.net"])
    checks = FakeChecks(RELAY_SPF, ptr=[])  # the PTR name did not confirm
    decision = await decide(
        request(helo_name="relay.example.com"), settings, checks, InstanceMemory()
    )
    assert decision.action.startswith("550 5.7.23")
    assert ("ptr", "192.0.2.1") in checks.calls


# ------------------------------------------------------------ Per_User


async def test_per_user_recipients_use_their_settings_and_are_not_remembered(
    tmp_path: Path,
) -> None:
    users = tmp_path / "users"
    users.write_text(
        "b@example.net,HELO_reject=False|Mail_From_reject=SPF_Not_Pass|TempError_Defer=True\n"
        "c@example.net,Header_Type=AR\n"
    )
    settings = settings_from(tmp_path, [f"Per_User = text,{users}"])
    checks = FakeChecks(
        {
            ("postmaster@mail.example.com", "mail.example.com"): outcome("pass"),
            ("a@example.org", "mail.example.com"): outcome("softfail"),
        }
    )
    memory = InstanceMemory()
    actions = [
        (await decide(request(recipient=r), settings, checks, memory)).action
        for r in ("d@example.net", "b@example.net", "c@example.net", "e@example.net")
    ]
    # policyd-spf 3.0.4's answers; receiver= is the full recipient with Per_User.
    assert actions == [
        "prepend Received-SPF: Softfail (mailfrom) identity=mailfrom; client-ip=192.0.2.1; "
        "helo=mail.example.com; envelope-from=a@example.org; receiver=d@example.net ",
        "550 5.7.23 Message rejected due to: domain owner discourages use of this host. "
        "Please see http://www.openspf.net/Why?s=mfrom;id=a@example.org;ip=192.0.2.1;"
        "r=b@example.net",
        "dunno",
        "dunno",
    ]
    memory = InstanceMemory()
    actions = [
        (await decide(request(recipient=r), settings, checks, memory)).action
        for r in ("b@example.net", "c@example.net", "e@example.net")
    ]
    assert actions[1] == (
        "prepend Authentication-Results: mx.example.net; spf=softfail (domain owner "
        "discourages use of this host) smtp.mailfrom=example.org (client-ip=192.0.2.1; "
        "helo=mail.example.com; envelope-from=a@example.org; receiver=c@example.net)"
    )
    # Reproduced quirk: nothing was remembered for the Per_User recipients, so
    # the next recipient is checked afresh and gets a header again.
    assert actions[2].startswith("prepend Received-SPF: Softfail")


# ------------------------------------------------------------ unsafe values


async def test_control_characters_never_reach_the_answer(tmp_path: Path) -> None:
    settings = settings_from(tmp_path, [])
    checks = FakeChecks(
        {
            ("postmaster@m?ail.example.com", "m?ail.example.com"): SpfOutcome(
                SpfResult.PASS, 250, "x\ny"
            ),
            ("a@example.org", "m?ail.example.com"): SpfOutcome(
                SpfResult.FAIL, 550, "bad\r\ntext\x00"
            ),
        }
    )
    decision = await decide(
        request(helo_name="M\x01ail.example.com"), settings, checks, InstanceMemory()
    )
    # policyd-spf 3.0.4 writes the raw CR/LF/NUL into the reply.
    assert decision.action == (
        "550 5.7.23 Message rejected due to: bad??text?. Please see "
        "http://www.openspf.net/Why?s=mfrom;id=a@example.org;ip=192.0.2.1;r=example.net"
    )


async def test_non_ascii_is_lower_cased_and_kept(tmp_path: Path) -> None:
    settings = settings_from(tmp_path, [])
    checks = FakeChecks(
        {
            ("postmaster@mäil.example.com", "mäil.example.com"): outcome("pass"),
            ("ä@example.org", "mäil.example.com"): outcome("softfail"),
        }
    )
    req = request(helo_name="MÄil.example.com", sender="Ä@Example.org")
    decision = await decide(req, settings, checks, InstanceMemory())
    assert decision.action == (
        "prepend Received-SPF: Softfail (mailfrom) identity=mailfrom; client-ip=192.0.2.1; "
        "helo=mäil.example.com; envelope-from=ä@example.org; receiver=example.net "
    )


def test_clean() -> None:
    assert clean("a\x00b\rc\nd\te\x7ff\x85gé") == "a?b?c?d?e?f?gé"


async def test_invalid_client_address_is_dunno(tmp_path: Path) -> None:
    checks = FakeChecks({})
    decision = await decide(
        request(client_address="unknown"), settings_from(tmp_path, []), checks, InstanceMemory()
    )
    assert decision.action == "dunno"
    assert checks.calls == []


# ------------------------------------------------------------ what is asked, and when


async def test_helo_reject_skips_the_mail_from_check(tmp_path: Path) -> None:
    checks = FakeChecks({("postmaster@mail.example.com", "mail.example.com"): outcome("fail")})
    decision = await decide(request(), settings_from(tmp_path, []), checks, InstanceMemory())
    assert decision.action.startswith("550 5.7.23")
    assert decision.identity is Identity.HELO and decision.result is SpfResult.FAIL
    assert checks.calls == [("spf", "192.0.2.1", "", "mail.example.com", "20.0")]


async def test_whitelist_lookups_use_whitelist_lookup_time(tmp_path: Path) -> None:
    settings = settings_from(
        tmp_path, ["Domain_Whitelist = fwd.example", "Whitelist_Lookup_Time = 3"]
    )
    checks = FakeChecks(
        {
            ("postmaster@mail.example.com", "mail.example.com"): outcome("none"),
            ("a@example.org", "mail.example.com"): outcome("pass"),
        }
    )
    await decide(request(), settings, checks, InstanceMemory())
    assert checks.calls[0] == ("spf", "192.0.2.1", "fwd.example", "fwd.example", "3.0")


async def test_helo_whitelist_asks_aaaa_for_ipv6_clients(tmp_path: Path) -> None:
    settings = settings_from(tmp_path, ["HELO_Whitelist = relay.example.com"])
    checks = FakeChecks(RELAY_SPF, addresses={("relay.example.com", True): ["2001:db8:0:0::1"]})
    req = request(client_address="2001:DB8::1", helo_name="relay.example.com")
    decision = await decide(req, settings, checks, InstanceMemory())
    assert decision.bypass is Bypass.HELO_WHITELIST
    assert decision.action == (
        "prepend X-Comment: SPF skipped for whitelisted HELO domain - client-ip=2001:db8::1; "
        "helo=relay.example.com; envelope-from=a@example.org; receiver=example.net "
    )


def test_mailfrom_needed() -> None:
    view = read_request(request())
    ctx = Context(Settings(), view, "192.0.2.1", "example.net")
    assert mailfrom_needed(ctx, outcome("pass"))
    assert not mailfrom_needed(ctx, outcome("fail"))
    assert mailfrom_needed(ctx, None)
    no_check = dataclasses.replace(
        ctx, settings=Settings().replace(mail_from_reject=MailFromReject.NO_CHECK)
    )
    assert not mailfrom_needed(no_check, outcome("pass"))


def test_spf_verdict_is_pure() -> None:
    view = read_request(request())
    ctx = Context(Settings(), view, "192.0.2.1", "example.net")
    verdict = spf_verdict(ctx, outcome("pass"), outcome("softfail"))
    assert verdict.act is Act.PREPEND
    assert verdict.remember == MemoryEntry(Act.PREPEND, verdict.text)
    again = spf_verdict(dataclasses.replace(ctx, last_prepended=True), None, outcome("pass"))
    assert (again.act, again.text, again.remember) == (Act.DUNNO, "Header already pre-pended", None)


# ------------------------------------------------------------ pure helpers


@pytest.mark.parametrize(
    ("changes", "recipient", "expected"),
    [
        pytest.param({}, "b@example.net", "example.net", id="domain"),
        pytest.param({}, "postmaster", "postmaster", id="local"),
        pytest.param({}, "none", "none", id="absent"),
        pytest.param({"hide_receiver": True}, "b@example.net", "<UNKNOWN>", id="hidden"),
    ],
)
def test_header_receiver(changes: dict[str, object], recipient: str, expected: str) -> None:
    assert header_receiver(Settings().replace(**changes), recipient) == expected


@pytest.mark.parametrize(
    ("changes", "verdict", "expected"),
    [
        pytest.param({}, Verdict(Act.REJECT, "no"), "550 5.7.23 no", id="reject"),
        pytest.param({}, Verdict(Act.REJECT, "no", error=True), "550 5.7.24 no", id="error"),
        pytest.param({}, Verdict(Act.DEFER, "later"), "defer_if_permit 4.7.24 later", id="defer"),
        pytest.param(
            {"spf_enhanced_status_codes": False},
            Verdict(Act.REJECT, "no", error=True),
            "550 no",
            id="no-codes",
        ),
        pytest.param(
            {"spf_enhanced_status_codes": False},
            Verdict(Act.DEFER, "later"),
            "defer_if_permit later",
            id="no-codes-defer",
        ),
        pytest.param({}, Verdict(Act.PREPEND, "X: y"), "prepend X: y", id="prepend"),
        pytest.param({"prospective": "192.0.2.9"}, Verdict(Act.PREPEND, "X"), "dunno", id="pro"),
        pytest.param(
            {"header_type": HeaderType.NONE}, Verdict(Act.PREPEND, "X"), "dunno", id="none"
        ),
        pytest.param({}, Verdict(Act.RESULT_ONLY, "ok_class"), "ok_class", id="restriction"),
        pytest.param({"test_only": 0}, Verdict(Act.RESULT_ONLY, "ok"), "dunno", id="test-only"),
        pytest.param({"test_only": 0}, Verdict(Act.PREPEND, "X"), "prepend X", id="test-hdr"),
        pytest.param({}, Verdict(Act.NOTHING), "dunno", id="nothing"),
    ],
)
def test_render(changes: dict[str, object], verdict: Verdict, expected: str) -> None:
    assert render(Settings().replace(**changes), verdict) == expected


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        pytest.param({}, "dunno", id="default"),
        pytest.param(
            {"temperror_defer": True},
            "defer_if_permit 4.7.24 Message deferred due to: SPF check could not be completed "
            "(temporary error). Please see http://www.openspf.net/Why?s=mfrom;"
            "id=a@example.org;ip=192.0.2.1;r=example.net",
            id="temperror-defer",
        ),
        pytest.param({"temperror_defer": True, "test_only": 0}, "dunno", id="test-only"),
        pytest.param({"mock": True}, MOCK_ACTION, id="mock"),
    ],
)
def test_fallback_decision(changes: dict[str, object], expected: str) -> None:
    decision = fallback_decision(Settings().replace(**changes), request())
    assert decision.action == expected


def test_log_message() -> None:
    decision = Decision(
        "550 5.7.23 x", Identity.MAILFROM, SpfResult.FAIL, "why", queue_id="Q1", replayed=True
    )
    assert decision.log_message() == (
        "Q1: 550 5.7.23 x [mailfrom=fail] [repeated for this message]"
    )
    assert Decision("dunno", bypass=Bypass.WHITELIST).log_message() == ("dunno [bypass=Whitelist]")


async def test_queue_id_setting(tmp_path: Path) -> None:
    checks = FakeChecks(RELAY_SPF)
    for lines, expected in ((["Whitelist = 192.0.2.1"], "Q1"), (["QueueID = False"], "")):
        settings = settings_from(tmp_path, [*lines, "Whitelist = 192.0.2.1"])
        decision = await decide(request(), settings, checks, InstanceMemory())
        assert decision.queue_id == expected


# ------------------------------------------------------------ memory


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_memory_expires() -> None:
    clock = FakeClock()
    memory = InstanceMemory(max_entries=10, ttl=60, clock=clock)
    entry = MemoryEntry(Act.REJECT, "X")
    memory.put("a", entry)
    clock.now += 59.9
    assert memory.get("a") == entry
    clock.now += 0.1
    assert memory.get("a") is None
    assert len(memory) == 0


def test_memory_keeps_no_header_text() -> None:
    memory = InstanceMemory(clock=FakeClock())
    memory.put("a", MemoryEntry(Act.PREPEND, "Received-SPF: Pass ..."))
    remembered = memory.get("a")
    assert remembered is not None and remembered.act is Act.PREPEND and remembered.text == ""
    assert replay(remembered) == Verdict(Act.DUNNO, "Header already pre-pended", replayed=True)


def test_memory_evicts_least_recently_used() -> None:
    memory = InstanceMemory(max_entries=2, ttl=60, clock=FakeClock())
    for key in "abc":
        if key == "c":
            assert memory.get("a") is not None  # "a" is now the most recent
        memory.put(key, MemoryEntry(Act.PREPEND, key))
    assert memory.get("b") is None
    assert memory.get("a") is not None and memory.get("c") is not None
    assert len(memory) == 2


@pytest.mark.parametrize(("size", "ttl"), [(0, 60), (10, 0)])
def test_memory_can_be_disabled(size: int, ttl: float) -> None:
    memory = InstanceMemory(max_entries=size, ttl=ttl, clock=FakeClock())
    memory.put("a", MemoryEntry(Act.PREPEND, "X"))
    assert memory.get("a") is None


async def test_header_again_after_the_memory_expired(tmp_path: Path) -> None:
    clock = FakeClock()
    memory = InstanceMemory(ttl=10, clock=clock)
    settings = settings_from(tmp_path, ["Whitelist = 192.0.2.1"])
    checks = FakeChecks(RELAY_SPF)
    first = await decide(request(), settings, checks, memory)
    assert first.action.startswith("prepend X-Comment")
    assert (await decide(request(), settings, checks, memory)).action == "dunno"
    clock.now += 10
    assert (await decide(request(), settings, checks, memory)).action == first.action


@pytest.mark.parametrize(
    "other",
    [
        pytest.param({"instance": "i2"}, id="instance"),
        pytest.param({"client_address": "192.0.2.2"}, id="client"),
        pytest.param({"sender": "z@example.org"}, id="sender"),
        pytest.param({"instance": ""}, id="no-instance"),
    ],
)
async def test_memory_is_per_message(tmp_path: Path, other: dict[str, str]) -> None:
    memory = InstanceMemory()
    settings = settings_from(tmp_path, ["Whitelist = 192.0.2.0/24"])
    checks = FakeChecks(RELAY_SPF)
    await decide(request(**other), settings, checks, memory)
    again = await decide(request(), settings, checks, memory)
    assert again.action.startswith("prepend X-Comment")
    if other == {"instance": ""}:
        assert len(memory) == 1  # only the second request had an instance


def test_read_request_normalizes_like_policyd_spf() -> None:
    view = read_request(
        PolicyRequest(
            {
                "client_address": "2001:DB8::1 ",
                "helo_name": "Mail.Example.COM\t",
                "sender": "A@Example.org",
                "queue_id": "AbC12",
                "instance": "1A.2B",
            }
        )
    )
    assert view == RequestView(
        client_address="2001:db8::1",
        helo="mail.example.com",
        sender="a@example.org",
        recipient="none",
        instance="1a.2b",
        queue_id="AbC12",
    )


# ------------------------------------------------------------ decide_now and the verdict memo


class CachingChecks(FakeChecks):
    """FakeChecks whose answers are all "cached": the same outcome objects,
    handed out by cached_spf without a call (as the result cache does)."""

    lifetime = 300.0

    def cached_spf(self, ip: str, sender: str, helo: str, *, void_limit: int) -> SpfOutcome | None:
        if sender and sender == helo and "@" not in sender:
            return self.domains.get(sender)
        return self.table.get((sender or "postmaster@" + helo, helo))

    def cached_lifetime(
        self, ip: str, sender: str, helo: str, outcome: SpfOutcome, *, void_limit: int
    ) -> float:
        cached = self.cached_spf(ip, sender, helo, void_limit=void_limit)
        return self.lifetime if cached is outcome else 0.0


MEMO_SPF = {
    ("postmaster@mail.example.com", "mail.example.com"): outcome("pass"),
    ("a@example.org", "mail.example.com"): outcome("softfail"),
    ("z@example.org", "mail.example.com"): outcome("fail"),
    ("postmaster@example.org", "example.org"): outcome("neutral"),  # no HELO sent
    ("a@example.org", "example.org"): outcome("pass"),
}

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


async def test_memo_lives_as_long_as_the_cached_outcomes(tmp_path: Path) -> None:
    settings = settings_from(tmp_path, [])
    table = dict(MEMO_SPF)
    checks = CachingChecks(table)
    clock = FakeClock()
    memo = VerdictMemo(settings, 100, clock=clock)
    memory = InstanceMemory()
    first = decide_now(request(), settings, Known(checks), memory, memo)
    assert first is not None and first.result is SpfResult.SOFTFAIL
    assert len(memo) == 0  # a key seen once is only marked
    assert decide_now(request(instance="i1b"), settings, Known(checks), memory, memo) == first
    assert len(memo) == 1
    assert decide_now(request(instance="i2"), settings, Known(checks), memory, memo) == first
    assert (memo.hits, memo.checks_saved) == (1, 2)
    # The result cache's outcome expires (and is fetched again, different).
    table[("a@example.org", "mail.example.com")] = outcome("pass")
    clock.now += checks.lifetime
    again = decide_now(request(instance="i3"), settings, Known(checks), memory, memo)
    assert again is not None and again.result is SpfResult.PASS
    assert memo.hits == 1


async def test_uncached_outcomes_are_not_memoized(tmp_path: Path) -> None:
    settings = settings_from(tmp_path, [])
    checks = CachingChecks(MEMO_SPF)
    checks.lifetime = 0.0  # temperror, or Result_Cache_TTL = 0
    memo = VerdictMemo(settings, 100)
    assert decide_now(request(), settings, Known(checks), InstanceMemory(), memo) is not None
    assert len(memo) == 0


async def test_memo_is_bounded_and_per_settings(tmp_path: Path) -> None:
    settings = settings_from(tmp_path, [])
    checks = CachingChecks(MEMO_SPF)
    memo = VerdictMemo(settings, 2)
    for n, domain in enumerate(["a.example"] * 2 + ["b.example"] * 2 + ["c.example"] * 2):
        decide_now(
            request(instance=f"i{n}", recipient=f"x@{domain}"),
            settings,
            Known(checks),
            InstanceMemory(),
            memo,
        )
    assert len(memo) == 2
    assert not memo._seen  # all kept on their second sighting; a.example evicted
    other = settings_from(tmp_path, ["Header_Type = AR"])
    decide_now(request(recipient="x@b.example"), settings, Known(checks), InstanceMemory(), memo)
    assert memo.hits == 1
    decision = decide_now(
        request(recipient="x@b.example"), other, Known(checks), InstanceMemory(), memo
    )
    assert decision is not None
    assert decision.action.startswith("prepend Authentication-Results:")  # not the memo's
    assert memo.hits == 1


class CountingChecks(FakeChecks):
    """FakeChecks that count the cached_spf calls (nothing is cached)."""

    def __init__(self, spf: dict[tuple[str, str], SpfOutcome]) -> None:
        super().__init__(spf)
        self.cached_calls: list[str] = []

    def cached_spf(self, ip: str, sender: str, helo: str, *, void_limit: int) -> SpfOutcome | None:
        self.cached_calls.append(sender)
        return None


async def test_decide_now_leaves_a_missing_answer_to_decide(tmp_path: Path) -> None:
    settings = settings_from(tmp_path, [])
    checks = CountingChecks(MEMO_SPF)  # nothing cached
    memory = InstanceMemory()
    known = Known(checks)
    assert decide_now(request(), settings, known, memory) is None
    assert len(memory) == 0 and checks.calls == []
    decision = await decide(request(), settings, checks, memory, known=known)
    assert decision.action.startswith("prepend Received-SPF: Softfail")
    # Each check asked once, in policyd-spf's order, despite the restarts.
    assert [c[2] for c in checks.calls] == ["", "a@example.org"]
    # cached_spf (which may run pyspf over cached answers) once per check too:
    # the restart in decide() goes straight to the fetch.
    assert checks.cached_calls == ["", "a@example.org"]
    assert len(memory) == 1


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
