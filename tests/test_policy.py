"""policy.py: a decision table of exact policyd-spf 3.0.4 answers, the
bypasses, deliberate differences, Per_User, unsafe values, what is asked,
and the pure helpers (rendering, the action kind, the fallback).

Expected action strings are literal: they were produced by running policyd-spf
3.0.4's own main loop on the same configuration lines, requests and SPF
results; where spfpolicy differs on purpose the param id says so. The tables
go through ``deciding.decide`` with two recipients per message, so the
second answer shows what the verdict said to remember.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from policy_support import (
    RELAY_SPF,
    FakeChecks,
    outcome,
    request,
    settings_from,
    two_recipients,
)
from spfpolicy.config import HeaderType, MailFromReject, Settings
from spfpolicy.deciding import decide
from spfpolicy.headers import Bypass, clean
from spfpolicy.memory import InstanceMemory
from spfpolicy.policy import (
    MOCK_ACTION,
    Act,
    ActionKind,
    Context,
    Decision,
    MemoryEntry,
    RequestView,
    Verdict,
    context_for,
    evaluate,
    fallback_decision,
    header_receiver,
    mailfrom_needed,
    ptr_matches,
    read_request,
    render,
    spf_verdict,
    to_decision,
)
from spfpolicy.protocol import PolicyRequest
from spfpolicy.results import Identity, SpfOutcome, SpfResult

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


class TableAnswers:
    """``policy.Answers`` from a table: what ``evaluate`` reads, nothing else."""

    def __init__(self, spf: dict[tuple[str, str], SpfOutcome]) -> None:
        self.spf_table = spf
        self.expected: tuple[tuple[str, str, str], ...] = ()

    def spf(
        self, ip: str, sender: str, helo: str, *, lookup_time: float, void_limit: int
    ) -> SpfOutcome:
        return self.spf_table[(sender or "postmaster@" + helo, helo)]

    def confirmed_ptr_names(self, ip: str, *, lookup_time: float) -> list[str]:
        return []

    def addresses(self, name: str, *, ipv6: bool, lookup_time: float) -> list[str]:
        return []

    def expect(self, planned: tuple[tuple[str, str, str], ...], *, void_limit: int) -> None:
        self.expected = planned


@pytest.mark.parametrize(
    ("lines", "act", "remembered"),
    [
        pytest.param([], Act.PREPEND, Act.PREPEND, id="header"),
        pytest.param(["Mail_From_reject = Softfail"], Act.REJECT, Act.REJECT, id="reject"),
        pytest.param(["Mail_From_pass_restriction = ok"], Act.PREPEND, Act.PREPEND, id="no-pass"),
        pytest.param(["Whitelist = 192.0.2.1"], Act.PREPEND, Act.PREPEND, id="bypass"),
    ],
)
def test_evaluate_returns_what_to_remember(
    tmp_path: Path, lines: list[str], act: Act, remembered: Act
) -> None:
    # The decision itself writes nowhere: the verdict carries what the
    # message's later recipients are to be answered, for the caller to keep.
    settings = settings_from(tmp_path, lines)
    ctx = context_for(settings, read_request(request()), None)
    assert ctx is not None
    answers = TableAnswers(
        {
            ("postmaster@mail.example.com", "mail.example.com"): outcome("neutral"),
            ("a@example.org", "mail.example.com"): outcome("softfail"),
        }
    )
    verdict = evaluate(ctx, answers)
    assert verdict.act is act
    assert verdict.remember is not None and verdict.remember.act is remembered
    assert evaluate(ctx, answers) == verdict  # same answers, same verdict


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


REJECT, DEFER, PREPEND = ActionKind.REJECT, ActionKind.DEFER, ActionKind.PREPEND
DUNNO, RESTRICTION = ActionKind.DUNNO, ActionKind.RESTRICTION


@pytest.mark.parametrize(
    ("changes", "verdict", "kind", "expected"),
    [
        pytest.param({}, Verdict(Act.REJECT, "no"), REJECT, "550 5.7.23 no", id="reject"),
        pytest.param(
            {}, Verdict(Act.REJECT, "no", error=True), REJECT, "550 5.7.24 no", id="error"
        ),
        pytest.param(
            {}, Verdict(Act.DEFER, "later"), DEFER, "defer_if_permit 4.7.24 later", id="defer"
        ),
        pytest.param(
            {"spf_enhanced_status_codes": False},
            Verdict(Act.REJECT, "no", error=True),
            REJECT,
            "550 no",
            id="no-codes",
        ),
        pytest.param(
            {"spf_enhanced_status_codes": False},
            Verdict(Act.DEFER, "later"),
            DEFER,
            "defer_if_permit later",
            id="no-codes-defer",
        ),
        pytest.param({}, Verdict(Act.PREPEND, "X: y"), PREPEND, "prepend X: y", id="prepend"),
        pytest.param(
            {"prospective": "192.0.2.9"}, Verdict(Act.PREPEND, "X"), DUNNO, "dunno", id="pro"
        ),
        pytest.param(
            {"header_type": HeaderType.NONE}, Verdict(Act.PREPEND, "X"), DUNNO, "dunno", id="none"
        ),
        pytest.param(
            {}, Verdict(Act.RESULT_ONLY, "ok_class"), RESTRICTION, "ok_class", id="restriction"
        ),
        pytest.param(
            {"test_only": 0}, Verdict(Act.RESULT_ONLY, "ok"), DUNNO, "dunno", id="test-only"
        ),
        pytest.param(
            {"test_only": 0}, Verdict(Act.REJECT, "no"), DUNNO, "dunno", id="test-only-reject"
        ),
        pytest.param(
            {"test_only": 0}, Verdict(Act.PREPEND, "X"), PREPEND, "prepend X", id="test-hdr"
        ),
        pytest.param(
            {}, Verdict(Act.DUNNO, "Header already pre-pended"), DUNNO, "dunno", id="dunno"
        ),
        pytest.param({}, Verdict(Act.NOTHING), DUNNO, "dunno", id="nothing"),
    ],
)
def test_render(
    changes: dict[str, object], verdict: Verdict, kind: ActionKind, expected: str
) -> None:
    settings = Settings().replace(**changes)
    assert render(settings, verdict) == (kind, expected)
    decision = to_decision(settings, "Q1", verdict)
    assert (decision.kind, decision.action) == (kind, expected)
    assert decision.restriction == (expected if kind is RESTRICTION else "")


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
    assert decision.kind.value == expected.partition(" ")[0]


def test_log_message() -> None:
    decision = Decision(
        ActionKind.REJECT,
        "550 5.7.23 x",
        Identity.MAILFROM,
        SpfResult.FAIL,
        "why",
        queue_id="Q1",
        replayed=True,
    )
    assert decision.log_message() == (
        "Q1: 550 5.7.23 x [mailfrom=fail] [repeated for this message]"
    )
    assert Decision(ActionKind.DUNNO, "dunno", bypass=Bypass.WHITELIST).log_message() == (
        "dunno [bypass=Whitelist]"
    )


async def test_queue_id_setting(tmp_path: Path) -> None:
    checks = FakeChecks(RELAY_SPF)
    for lines, expected in ((["Whitelist = 192.0.2.1"], "Q1"), (["QueueID = False"], "")):
        settings = settings_from(tmp_path, [*lines, "Whitelist = 192.0.2.1"])
        decision = await decide(request(), settings, checks, InstanceMemory())
        assert decision.queue_id == expected


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
