"""Drop-in compatibility: spfpolicy answers exactly as Debian's policyd-spf 3.0.4.

Each case gives one policyd-spf.conf (and, for a Per_User case, its user
file) and one or more policy connections of full Postfix RCPT requests to both
servers:

- policyd-spf (the oracle, tests/oracle.py): one fresh process per connection,
  as spawn(8) runs it, its py3dns pointed at the loopback DNS server;
- spfpolicy: ``spfpolicy serve -c CONF --listen unix:... --nameserver ...`` as a
  real subprocess, one per distinct configuration, one socket connection per
  connection of the case;

both resolving tests/data/spf_zone.yaml from one ``python -m spfpolicy.bench.dnsserver``.
The actions must be identical, byte for byte (header text included).  Each
request also names the start of the oracle's action it exists for, so a case
cannot silently stop testing its option (e.g. after a zone edit).

Fields that may legitimately differ: none, as it turns out, so nothing is
masked.  "receiver=" in the header and "r=" in the reject URL are the recipient
domain (or <UNKNOWN>), not a host name; the host name (Authserv_Id = HOSTNAME,
pyspf's receiver) is socket.gethostname() on both sides, and they run on the
same host; actions carry no timestamps.

Then the documented deliberate differences, where policyd-spf 3.0.4 is wrong
and spfpolicy must be right: each asserts both sides' actual behaviour.

All servers of all cases run concurrently (a thread pool) in one module-scoped
fixture, which keeps the whole file to well under a minute.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from oracle import (
    DnsServerProcess,
    PolicyServerDied,
    SpfpolicyServer,
    ask_policyd_spf,
    ask_server,
    oracle_missing,
    rcpt_request,
)

_missing = oracle_missing()
pytestmark = [
    pytest.mark.skipif(_missing is not None, reason=_missing or ""),
    # The module fixture runs every case before the first test: allow for it.
    pytest.mark.timeout(300),
]

# policyd-spf's shipped policyd-spf.conf, spelled out, plus a short Lookup_Time
# so the TIMEOUT zone entries cost 2 s instead of 20.
BASE_CONF = {
    "debugLevel": "1",
    "TestOnly": "1",
    "HELO_reject": "Fail",
    "Mail_From_reject": "Fail",
    "PermError_reject": "False",
    "TempError_Defer": "False",
    "skip_addresses": "127.0.0.0/8,::ffff:127.0.0.0/104,::1",
    "Lookup_Time": "2",
}

# Clients (tests/data/spf_zone.yaml): AUTH is in pass.example.org's SPF record and
# is mail.example.org's address; UNAUTH is in no record.
AUTH = "192.0.2.10"
UNAUTH = "198.51.100.7"
AUTH6 = "2001:db8:1::25"
UNAUTH6 = "2001:db8:2::1"

FAIL_REASON = "Message rejected due to: SPF fail - not authorized. Please see "
OPENSPF = "http://www.openspf.net/Why?"


@dataclass(frozen=True)
class Ask:
    """One RCPT request and the start of the action policyd-spf gives it."""

    client: str
    helo: str
    sender: str
    expect: str
    recipient: str = "alice@example.net"
    message: str = "m1"  # requests of one message share the Postfix "instance"
    extra: Mapping[str, str] = field(default_factory=dict)

    def attributes(self, case_id: str) -> dict[str, str]:
        return rcpt_request(
            client_address=self.client,
            helo_name=self.helo,
            sender=self.sender,
            recipient=self.recipient,
            # Unique per case: one spfpolicy server may serve several cases.
            instance=f"{case_id}.{self.message}".lower(),
            **self.extra,
        )


@dataclass(frozen=True)
class Case:
    id: str
    conf: Mapping[str, str]
    connections: tuple[tuple[Ask, ...], ...]
    users: str = ""  # the Per_User file's text; "" = no Per_User

    def users_file(self, root: Path) -> Path:
        return root / f"{self.id}.users"

    def conf_text(self, root: Path) -> str:
        settings = {**BASE_CONF, **self.conf}
        if self.users:
            settings["Per_User"] = f"text,{self.users_file(root)}"
        return "".join(f"{name} = {value}\n" for name, value in settings.items())


def case(case_id: str, *asks: Ask, conf: Mapping[str, str] | None = None, users: str = "") -> Case:
    """A case with one connection carrying ``asks``."""
    return Case(case_id, conf or {}, (asks,), users)


def ask(client: str, helo: str, sender: str, expect: str, **kwargs: object) -> Ask:
    return Ask(client, helo, sender, expect, **kwargs)  # type: ignore[arg-type]


PASS_MFROM = "prepend Received-SPF: Pass (mailfrom) identity=mailfrom; "
PASS_HELO = "prepend Received-SPF: Pass (sender SPF authorized) identity=helo; "

SAME_CASES = [
    # --- policyd-spf defaults: HELO_reject = Fail, Mail_From_reject = Fail -----------
    case(
        "mfrom-pass",
        ask(
            AUTH,
            "mail.example.org",
            "carol@pass.example.org",
            PASS_MFROM + "client-ip=192.0.2.10; helo=mail.example.org; "
            "envelope-from=carol@pass.example.org; receiver=example.net ",
            extra={"client_name": "mail.example.org", "reverse_client_name": "mail.example.org"},
        ),
    ),
    case(
        "mfrom-fail-rejected",
        ask(UNAUTH, "helo-none.example.org", "carol@pass.example.org", "550 5.7.23 " + FAIL_REASON),
    ),
    case(
        "mfrom-softfail-prepended",
        ask(
            UNAUTH,
            "helo-none.example.org",
            "carol@softfail.example.org",
            "prepend Received-SPF: Softfail (mailfrom)",
        ),
    ),
    case(
        "mfrom-neutral-prepended",
        ask(
            UNAUTH,
            "helo-none.example.org",
            "carol@neutral.example.org",
            "prepend Received-SPF: Neutral (mailfrom)",
        ),
    ),
    case(
        "mfrom-none-helo-none",
        ask(
            UNAUTH,
            "helo-none.example.org",
            "carol@none.example.org",
            # Not "(no SPF record)": policyd-spf puts the identity where the reason goes.
            "prepend Received-SPF: None (mailfrom) identity=mailfrom; ",
        ),
    ),
    case(
        "mfrom-none-helo-pass",
        ask(AUTH, "mail.example.org", "carol@none.example.org", PASS_HELO),
    ),
    case(
        "helo-fail-rejected",
        ask(
            UNAUTH,
            "mail.example.org",
            "carol@none.example.org",
            f"550 5.7.23 {FAIL_REASON}{OPENSPF}s=helo;id=mail.example.org;",
        ),
    ),
    case(
        "mfrom-include-pass",
        ask(AUTH, "helo-none.example.org", "carol@include.example.org", PASS_MFROM),
    ),
    case(
        "mfrom-mx-pass",
        ask("192.0.2.25", "helo-none.example.org", "carol@mx.example.org", PASS_MFROM),
    ),
    case(
        "mfrom-cname-pass",
        ask(AUTH, "helo-none.example.org", "carol@alias.example.org", PASS_MFROM),
    ),
    case(
        "mfrom-fail-exp-macros",
        ask(
            UNAUTH,
            "helo-none.example.org",
            "carol@explain.example.org",
            "550 5.7.23 Message rejected due to: 198.51.100.7 is not one of "
            "explain.example.org's designated mail servers. Please see ",
        ),
    ),
    case(
        "mixed-case-sender-and-helo",
        ask(AUTH, "Mail.Example.ORG", "Carol@PASS.Example.org", PASS_MFROM),
    ),
    case(
        "empty-helo-uses-sender-domain",
        ask(AUTH, "", "carol@pass.example.org", PASS_MFROM),
    ),
    case(
        "local-recipient-without-domain",
        ask(AUTH, "mail.example.org", "carol@pass.example.org", PASS_MFROM, recipient="postmaster"),
    ),
    case(
        "permerror-prepended",
        ask(
            AUTH,
            "helo-none.example.org",
            "carol@permerror.example.org",
            "prepend Received-SPF: Permerror (mailfrom)",
        ),
    ),
    case(
        "temperror-prepended",
        ask(
            AUTH,
            "helo-none.example.org",
            "carol@temperror.example.org",
            "prepend Received-SPF: Temperror (mailfrom)",
        ),
    ),
    # --- null sender: judged by HELO (RFC 7208 2.4) ------------------------------
    case("null-sender-helo-pass", ask(AUTH, "mail.example.org", "", PASS_HELO)),
    case(
        "null-sender-helo-fail",
        ask(UNAUTH, "mail.example.org", "", f"550 5.7.23 {FAIL_REASON}{OPENSPF}s=helo;"),
    ),
    case(
        "null-sender-helo-none",
        ask(
            UNAUTH,
            "helo-none.example.org",
            "",
            "prepend Received-SPF: None (no SPF record) identity=helo; ",
        ),
    ),
    # --- PermError_reject / TempError_Defer --------------------------------------
    case(
        "permerror-reject",
        ask(AUTH, "helo-none.example.org", "carol@permerror.example.org", "550 5.7.24 "),
        conf={"PermError_reject": "True"},
    ),
    case(
        "temperror-defer",
        ask(
            AUTH,
            "helo-none.example.org",
            "carol@temperror.example.org",
            "defer_if_permit 4.7.24 Message deferred due to: ",
        ),
        conf={"TempError_Defer": "True"},
    ),
    # --- HELO_reject ---------------------------------------------------------------
    case(
        "helo-spf-not-pass-softfail",
        ask(UNAUTH, "helo-softfail.example.org", "carol@none.example.org", "550 5.7.23 "),
        conf={"HELO_reject": "SPF_Not_Pass"},
    ),
    case(
        "helo-spf-not-pass-neutral",
        ask(UNAUTH, "helo-neutral.example.org", "carol@none.example.org", "550 5.7.23 "),
        conf={"HELO_reject": "SPF_Not_Pass"},
    ),
    case(
        "helo-spf-not-pass-pass",
        ask(AUTH, "mail.example.org", "carol@pass.example.org", PASS_MFROM),
        conf={"HELO_reject": "SPF_Not_Pass"},
    ),
    case(
        "helo-softfail-softfail",
        ask(UNAUTH, "helo-softfail.example.org", "carol@none.example.org", "550 5.7.23 "),
        conf={"HELO_reject": "Softfail"},
    ),
    case(
        "helo-softfail-neutral-prepended",
        ask(
            UNAUTH,
            "helo-neutral.example.org",
            "carol@none.example.org",
            "prepend Received-SPF: Neutral",
        ),
        conf={"HELO_reject": "Softfail"},
    ),
    case(
        "helo-null-with-sender",
        ask(UNAUTH, "mail.example.org", "carol@none.example.org", "prepend Received-SPF: Fail"),
        conf={"HELO_reject": "Null"},
    ),
    case(
        "helo-null-null-sender",
        ask(UNAUTH, "mail.example.org", "", "550 5.7.23 "),
        conf={"HELO_reject": "Null"},
    ),
    case(
        "helo-false",
        ask(UNAUTH, "mail.example.org", "carol@none.example.org", "prepend Received-SPF: Fail"),
        conf={"HELO_reject": "False"},
    ),
    case(
        "helo-no-check",
        ask(
            UNAUTH,
            "mail.example.org",
            "carol@softfail.example.org",
            "prepend Received-SPF: Softfail (mailfrom)",
        ),
        conf={"HELO_reject": "No_Check"},
    ),
    case(
        "helo-no-check-null-sender",
        ask(UNAUTH, "mail.example.org", "", "dunno"),
        conf={"HELO_reject": "No_Check"},
    ),
    # --- Mail_From_reject ----------------------------------------------------------
    case(
        "mfrom-spf-not-pass-neutral",
        ask(UNAUTH, "helo-none.example.org", "carol@neutral.example.org", "550 5.7.23 "),
        conf={"Mail_From_reject": "SPF_Not_Pass"},
    ),
    case(
        "mfrom-spf-not-pass-none-prepended",
        ask(
            UNAUTH,
            "helo-none.example.org",
            "carol@none.example.org",
            "prepend Received-SPF: None",
        ),
        conf={"Mail_From_reject": "SPF_Not_Pass"},
    ),
    case(
        "mfrom-softfail-softfail",
        ask(UNAUTH, "helo-none.example.org", "carol@softfail.example.org", "550 5.7.23 "),
        conf={"Mail_From_reject": "Softfail"},
    ),
    case(
        "mfrom-false-fail-prepended",
        ask(
            UNAUTH,
            "helo-none.example.org",
            "carol@pass.example.org",
            "prepend Received-SPF: Fail (mailfrom)",
        ),
        conf={"Mail_From_reject": "False"},
    ),
    case(
        "mfrom-no-check",
        ask(
            UNAUTH,
            "helo-none.example.org",
            "carol@pass.example.org",
            "prepend Received-SPF: None (no SPF record) identity=helo; ",
        ),
        conf={"Mail_From_reject": "No_Check"},
    ),
    # --- No_Mail: reject only "v=spf1 -all" domains --------------------------------
    case(
        "no-mail-rejects-v-spf1-all",
        ask(UNAUTH, "helo-none.example.org", "carol@nomail.example.org", "550 5.7.23 "),
        conf={"No_Mail": "True"},
    ),
    case(
        "no-mail-prepends-other-fail",
        ask(
            UNAUTH,
            "helo-none.example.org",
            "carol@pass.example.org",
            "prepend Received-SPF: Fail (mailfrom)",
        ),
        conf={"No_Mail": "True"},
    ),
    # --- Reject_Not_Pass_Domains -----------------------------------------------------
    case(
        "reject-not-pass-domain-neutral",
        ask(
            UNAUTH,
            "helo-none.example.org",
            "carol@strict.example.org",
            "550 5.7.23 Message rejected due to: Receiver policy for SPF Neutral. ",
        ),
        conf={"Reject_Not_Pass_Domains": "strict.example.org"},
    ),
    case(
        "reject-not-pass-domain-pass",
        ask(AUTH, "helo-none.example.org", "carol@strict.example.org", "prepend Received-SPF: "),
        conf={"Reject_Not_Pass_Domains": "strict.example.org"},
    ),
    # --- HELO_pass_restriction / Mail_From_pass_restriction ---------------------------
    case(
        "helo-pass-restriction-null-sender",
        ask(AUTH, "mail.example.org", "", "helo_passed"),
        conf={"HELO_pass_restriction": "helo_passed"},
    ),
    case(
        "helo-pass-restriction-mfrom-none",
        ask(AUTH, "mail.example.org", "carol@none.example.org", "helo_passed"),
        conf={"HELO_pass_restriction": "helo_passed"},
    ),
    case(
        "mail-from-pass-restriction",
        ask(AUTH, "helo-none.example.org", "carol@pass.example.org", "mfrom_passed"),
        conf={"Mail_From_pass_restriction": "mfrom_passed"},
    ),
    # --- TestOnly = 0: never reject ---------------------------------------------------
    case(
        "testonly-0-fail-dunno",
        ask(UNAUTH, "helo-none.example.org", "carol@pass.example.org", "dunno"),
        conf={"TestOnly": "0"},
    ),
    case(
        "testonly-0-pass-prepended",
        ask(AUTH, "helo-none.example.org", "carol@pass.example.org", PASS_MFROM),
        conf={"TestOnly": "0"},
    ),
    # --- Prospective: judge another address, never prepend ---------------------------
    case(
        "prospective-pass-dunno",
        ask(UNAUTH, "helo-none.example.org", "carol@pass.example.org", "dunno"),
        conf={"Prospective": AUTH},
    ),
    case(
        "prospective-fail-rejected",
        ask(
            AUTH,
            "helo-none.example.org",
            "carol@pass.example.org",
            f"550 5.7.23 {FAIL_REASON}{OPENSPF}s=mfrom;id=carol@pass.example.org;ip=198.51.100.7;",
        ),
        conf={"Prospective": UNAUTH},
    ),
    # --- skip_addresses / Whitelist / HELO_Whitelist / Domain_Whitelist(_PTR) ---------
    case(
        "skip-addresses-localhost",
        ask(
            "127.0.0.1",
            "localhost",
            "carol@pass.example.org",
            "prepend X-Comment: SPF check N/A for local connections - client-ip=127.0.0.1; ",
        ),
    ),
    case(
        "skip-addresses-ipv6-loopback",
        ask("::1", "localhost", "carol@pass.example.org", "prepend X-Comment: SPF check N/A "),
    ),
    case(
        "skip-addresses-custom",
        ask(
            UNAUTH,
            "helo-none.example.org",
            "carol@pass.example.org",
            "prepend X-Comment: SPF check N/A ",
        ),
        conf={"skip_addresses": "127.0.0.0/8,198.51.100.0/24"},
    ),
    case(
        "whitelist-ip",
        ask(
            UNAUTH,
            "helo-none.example.org",
            "carol@pass.example.org",
            "prepend X-Comment: SPF skipped for whitelisted relay - ",
        ),
        conf={"Whitelist": "203.0.113.0/24,198.51.100.0/24"},
    ),
    case(
        "helo-whitelist",
        ask(
            "203.0.113.7",
            "fwd.example.com",
            "carol@pass.example.org",
            "prepend X-Comment: SPF skipped for whitelisted HELO domain - ",
        ),
        conf={"HELO_Whitelist": "fwd.example.com"},
    ),
    case(
        "helo-whitelist-wrong-address",
        ask("203.0.113.8", "fwd.example.com", "carol@pass.example.org", "550 5.7.23 "),
        conf={"HELO_Whitelist": "fwd.example.com"},
    ),
    case(
        "domain-whitelist",
        ask(
            "203.0.113.5",
            "relay.trusted.example.com",
            "carol@pass.example.org",
            "prepend X-Comment: SPF skipped for whitelisted relay domain - ",
        ),
        conf={"Domain_Whitelist": "trusted.example.com"},
    ),
    case(
        "domain-whitelist-ptr-confirmed",
        ask(
            "203.0.113.5",
            "relay.trusted.example.com",
            "carol@pass.example.org",
            "prepend X-Comment: SPF skipped for PTR whitelisted relay domain - ",
        ),
        conf={"Domain_Whitelist_PTR": "trusted.example.com"},
    ),
    case(
        "domain-whitelist-ptr-no-ptr",
        ask("203.0.113.9", "helo-none.example.org", "carol@pass.example.org", "550 5.7.23 "),
        conf={"Domain_Whitelist_PTR": "trusted.example.com"},
    ),
    # --- SPF_Enhanced_Status_Codes = No -------------------------------------------------
    case(
        "no-enhanced-status-reject",
        ask(UNAUTH, "helo-none.example.org", "carol@pass.example.org", "550 " + FAIL_REASON),
        conf={"SPF_Enhanced_Status_Codes": "No"},
    ),
    case(
        "no-enhanced-status-defer",
        ask(
            AUTH,
            "helo-none.example.org",
            "carol@temperror.example.org",
            "defer_if_permit Message deferred due to: ",
        ),
        conf={"SPF_Enhanced_Status_Codes": "No", "TempError_Defer": "True"},
    ),
    # --- Header_Type / Authserv_Id / Hide_Receiver / Reason_Message --------------------
    case(
        "header-type-spf",
        ask(AUTH, "mail.example.org", "carol@pass.example.org", PASS_MFROM),
        conf={"Header_Type": "SPF"},
    ),
    case(
        "header-type-ar-mfrom",
        ask(
            AUTH,
            "mail.example.org",
            "carol@pass.example.org",
            "prepend Authentication-Results: mx.example.net; spf=pass",
        ),
        conf={"Header_Type": "AR", "Authserv_Id": "mx.example.net"},
    ),
    case(
        "header-type-ar-helo",
        ask(AUTH, "mail.example.org", "", "prepend Authentication-Results: mx.example.net; spf="),
        conf={"Header_Type": "AR", "Authserv_Id": "mx.example.net"},
    ),
    case(
        "header-type-ar-fail-rejected",
        ask(UNAUTH, "helo-none.example.org", "carol@pass.example.org", "550 5.7.23 "),
        conf={"Header_Type": "AR", "Authserv_Id": "mx.example.net"},
    ),
    case(
        "header-type-ar-skip-addresses",
        ask(
            "127.0.0.1",
            "localhost",
            "carol@pass.example.org",
            "prepend Authentication-Results: mx.example.net; none",
        ),
        conf={"Header_Type": "AR", "Authserv_Id": "mx.example.net"},
    ),
    case(
        "header-type-ar-authserv-id-hostname",
        ask(AUTH, "mail.example.org", "carol@pass.example.org", "prepend Authentication-Results: "),
        conf={"Header_Type": "AR", "Authserv_Id": "HOSTNAME"},
    ),
    case(
        "header-type-none-dunno",
        ask(AUTH, "mail.example.org", "carol@pass.example.org", "dunno"),
        conf={"Header_Type": "None"},
    ),
    case(
        "header-type-none-still-rejects",
        ask(UNAUTH, "helo-none.example.org", "carol@pass.example.org", "550 5.7.23 "),
        conf={"Header_Type": "None"},
    ),
    case(
        "hide-receiver-header",
        ask(AUTH, "mail.example.org", "carol@pass.example.org", PASS_MFROM),
        conf={"Hide_Receiver": "Yes"},
    ),
    case(
        "hide-receiver-reject-url",
        ask(UNAUTH, "helo-none.example.org", "carol@pass.example.org", "550 5.7.23 "),
        conf={"Hide_Receiver": "Yes"},
    ),
    case(
        "reason-message",
        ask(
            UNAUTH,
            "helo-none.example.org",
            "carol@pass.example.org",
            "550 5.7.23 SPF rejected: SPF fail - not authorized (see http",
        ),
        conf={"Reason_Message": "SPF {rejectdefer}: {spf} (see {url})"},
    ),
    # --- Void_Limit (RFC 7208 4.6.4) -------------------------------------------------
    case(
        "void-limit-default-permerror",
        ask(
            AUTH,
            "helo-none.example.org",
            "carol@void.example.org",
            "prepend Received-SPF: Permerror (mailfrom)",
        ),
    ),
    case(
        "void-limit-raised-pass",
        ask(AUTH, "helo-none.example.org", "carol@void.example.org", PASS_MFROM),
        conf={"Void_Limit": "5"},
    ),
    # --- Per_User (policyd-spf writes the recipient's line over its copy of the -------
    # global settings, so every key it reads afterwards is the recipient's)
    case(
        "per-user-void-limit",
        # The recipient's Void_Limit (policyd-spf's _spfcheck sets pyspf's from it) ...
        ask(
            AUTH,
            "helo-none.example.org",
            "carol@void.example.org",
            PASS_MFROM + "client-ip=192.0.2.10; helo=helo-none.example.org; "
            "envelope-from=carol@void.example.org; receiver=pu@rcpt.example ",
            recipient="pu@rcpt.example",
        ),
        # ... and the global one for a recipient without a line, in the same
        # message (nothing is remembered for a Per_User recipient) and another.
        ask(
            AUTH,
            "helo-none.example.org",
            "carol@void.example.org",
            "prepend Received-SPF: Permerror (mailfrom) identity=mailfrom; "
            "client-ip=192.0.2.10; helo=helo-none.example.org; "
            "envelope-from=carol@void.example.org; receiver=other@rcpt.example ",
            recipient="other@rcpt.example",
        ),
        ask(
            AUTH,
            "helo-none.example.org",
            "carol@void.example.org",
            "prepend Received-SPF: Permerror (mailfrom)",
            recipient="other@rcpt.example",
            message="m2",
        ),
        ask(
            AUTH,
            "helo-none.example.org",
            "carol@void.example.org",
            PASS_MFROM,
            recipient="pu@rcpt.example",
            message="m3",
        ),
        users="pu@rcpt.example,Void_Limit=5\n",
    ),
    case(
        "per-user-enhanced-status-codes",
        ask(
            UNAUTH,
            "helo-none.example.org",
            "carol@pass.example.org",
            f"550 {FAIL_REASON}",
            recipient="pu@rcpt.example",
        ),
        ask(
            UNAUTH,
            "helo-none.example.org",
            "carol@pass.example.org",
            f"550 5.7.23 {FAIL_REASON}",
            recipient="other@rcpt.example",
            message="m2",
        ),
        users="pu@rcpt.example,SPF_Enhanced_Status_Codes=No\n",
    ),
    # --- equal-preference MX names: tried in string order (py3dns hands pyspf text) ---
    case(
        "mx-equal-preference-string-order",
        ask(
            AUTH,
            "helo-none.example.org",
            "carol@mxorder.example.org",
            "defer_if_permit 4.7.24 Message deferred due to: SPF Temporary Error: DNS Timeout.",
        ),
        conf={"TempError_Defer": "True"},
    ),
    # --- QueueID (logging only: the action is the same) ------------------------------
    case(
        "queueid-false",
        ask(
            UNAUTH,
            "helo-none.example.org",
            "carol@pass.example.org",
            "550 5.7.23 ",
            extra={"queue_id": "4Xyz1234ABC"},
        ),
        conf={"QueueID": "False"},
    ),
    # --- IPv6 clients ----------------------------------------------------------------
    case(
        "ipv6-pass",
        ask(AUTH6, "helo-none.example.org", "carol@pass.example.org", PASS_MFROM),
    ),
    case(
        "ipv6-fail-rejected",
        ask(UNAUTH6, "helo-none.example.org", "carol@pass.example.org", "550 5.7.23 "),
    ),
    # --- several recipients of one message (same instance) ---------------------------
    case(
        "multi-rcpt-pass-one-header",
        ask(AUTH, "mail.example.org", "carol@pass.example.org", PASS_MFROM),
        ask(
            AUTH,
            "mail.example.org",
            "carol@pass.example.org",
            "dunno",
            recipient="bob@example.net",
            extra={"recipient_count": "1"},
        ),
    ),
    case(
        "multi-rcpt-fail-replayed",
        ask(UNAUTH, "helo-none.example.org", "carol@pass.example.org", "550 5.7.23 "),
        ask(
            UNAUTH,
            "helo-none.example.org",
            "carol@pass.example.org",
            "550 5.7.23 ",
            recipient="bob@example.com",
        ),
    ),
    case(
        "multi-rcpt-defer-replayed",
        ask(AUTH, "helo-none.example.org", "carol@temperror.example.org", "defer_if_permit "),
        ask(
            AUTH,
            "helo-none.example.org",
            "carol@temperror.example.org",
            "defer_if_permit ",
            recipient="bob@example.net",
        ),
        conf={"TempError_Defer": "True"},
    ),
    case(
        "multi-rcpt-skip-addresses",
        ask("127.0.0.1", "localhost", "carol@pass.example.org", "prepend X-Comment: "),
        ask(
            "127.0.0.1", "localhost", "carol@pass.example.org", "dunno", recipient="bob@example.net"
        ),
    ),
    case(
        "multi-rcpt-restriction-replayed",
        ask(AUTH, "helo-none.example.org", "carol@pass.example.org", "mfrom_passed"),
        ask(
            AUTH,
            "helo-none.example.org",
            "carol@pass.example.org",
            "mfrom_passed",
            recipient="bob@example.net",
        ),
        conf={"Mail_From_pass_restriction": "mfrom_passed"},
    ),
    case(
        "two-messages-one-connection",
        ask(AUTH, "mail.example.org", "carol@pass.example.org", PASS_MFROM, message="m1"),
        ask(AUTH, "mail.example.org", "dave@include.example.org", PASS_MFROM, message="m2"),
    ),
]

# --- documented deliberate differences --------------------------------------------------
PTR_UNCONFIRMED = case(
    # 203.0.113.6's PTR names forged.trusted.example.com, which has no address:
    # anyone controlling their reverse zone can claim any name.
    "diff-domain-whitelist-ptr-unconfirmed",
    ask("203.0.113.6", "helo-none.example.org", "carol@pass.example.org", ""),
    conf={"Domain_Whitelist_PTR": "trusted.example.com"},
)
PERMERROR_REPLAY = case(
    "diff-permerror-replayed-to-second-recipient",
    ask(AUTH, "helo-none.example.org", "carol@permerror.example.org", ""),
    ask(
        AUTH,
        "helo-none.example.org",
        "carol@permerror.example.org",
        "",
        recipient="bob@example.net",
    ),
    conf={"PermError_reject": "True"},
)
SERVFAIL = case(
    "diff-servfail-is-temperror",
    ask(AUTH, "mail.example.org", "carol@servfail.example.org", ""),
    conf={"TempError_Defer": "True"},
)
A_LABEL = case(
    "diff-xn-a-label-sender-domain",
    ask(AUTH, "mail.example.org", "carol@xn--bcher-kva.example.org", ""),
)
EMPTY_SKIP_ADDRESSES = case(
    "diff-empty-skip-addresses",
    ask("127.0.0.1", "localhost", "carol@pass.example.org", ""),
    conf={"skip_addresses": ""},
)
DIFFERENCES = [PTR_UNCONFIRMED, PERMERROR_REPLAY, SERVFAIL, A_LABEL, EMPTY_SKIP_ADDRESSES]


@dataclass(frozen=True)
class Crashed:
    """The server died instead of answering (its traceback in ``log``)."""

    log: str


Answers = list[str] | Crashed


@dataclass(frozen=True)
class Outcome:
    oracle: list[Answers]  # per connection
    spfpolicy: list[Answers]


def _run_oracle(case: Case, conf: Path, nameserver: str, logs: Path) -> list[Answers]:
    answers: list[Answers] = []
    for number, connection in enumerate(case.connections):
        requests = [a.attributes(case.id) for a in connection]
        try:
            answers.append(
                ask_policyd_spf(
                    conf, nameserver, requests, log_path=logs / f"{case.id}.{number}.log"
                )
            )
        except PolicyServerDied as exc:
            answers.append(Crashed(exc.log))
    return answers


def _run_spfpolicy(
    cases: list[Case], conf: Path, nameserver: str, socket_path: Path, log: Path
) -> dict[str, list[Answers]]:
    results: dict[str, list[Answers]] = {}
    try:
        server = SpfpolicyServer(conf, f"unix:{socket_path}", nameserver, log_path=log)
        with server:
            for case in cases:
                results[case.id] = []
                for connection in case.connections:
                    requests = [a.attributes(case.id) for a in connection]
                    try:
                        results[case.id].append(ask_server(f"unix:{socket_path}", requests))
                    except (PolicyServerDied, OSError) as exc:
                        results[case.id].append(Crashed(f"{exc}\n{server.log()}"))
    except (PolicyServerDied, TimeoutError) as exc:
        for case in cases:
            results.setdefault(case.id, [Crashed(str(exc))])
    return results


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Outcome]]:
    root = tmp_path_factory.mktemp("compat")
    cases = [*SAME_CASES, *DIFFERENCES]
    assert len({c.id for c in cases}) == len(cases), "case ids must be unique"
    # Cases with the same configuration share one spfpolicy server.
    by_conf: dict[str, list[Case]] = {}
    for c in cases:
        if c.users:
            c.users_file(root).write_text(c.users)
        by_conf.setdefault(c.conf_text(root), []).append(c)
    with DnsServerProcess() as dns, ThreadPoolExecutor(max_workers=8) as pool:
        oracle_jobs = {}
        server_jobs = []
        for number, (conf_text, group) in enumerate(by_conf.items()):
            conf = root / f"policyd-spf.{number}.conf"
            conf.write_text(conf_text)
            for c in group:
                oracle_jobs[c.id] = pool.submit(_run_oracle, c, conf, dns.nameserver, root)
            server_jobs.append(
                pool.submit(
                    _run_spfpolicy,
                    group,
                    conf,
                    dns.nameserver,
                    root / f"spfpolicy.{number}.sock",
                    root / f"spfpolicy.{number}.log",
                )
            )
        ours: dict[str, list[Answers]] = {}
        for job in server_jobs:
            ours.update(job.result(timeout=240))
        yield {
            case_id: Outcome(job.result(timeout=240), ours[case_id])
            for case_id, job in oracle_jobs.items()
        }


def _params(cases: list[Case]) -> list[object]:
    return [pytest.param(c, id=c.id) for c in cases]


@pytest.mark.parametrize("case", _params(SAME_CASES))
def test_same_action_as_policyd_spf(case: Case, outcomes: dict[str, Outcome]) -> None:
    outcome = outcomes[case.id]
    # The oracle first: the case must still exercise what it was written for.
    for connection, answers in zip(case.connections, outcome.oracle, strict=True):
        assert not isinstance(answers, Crashed), answers.log
        for request, answer in zip(connection, answers, strict=True):
            assert answer.startswith(request.expect), (request, answer)
    assert outcome.spfpolicy == outcome.oracle


def _only(answers: list[Answers]) -> list[str]:
    (connection,) = answers
    assert not isinstance(connection, Crashed), connection.log
    return connection


def test_difference_domain_whitelist_ptr_requires_forward_confirmation(
    outcomes: dict[str, Outcome],
) -> None:
    # policyd-spf whitelists on any PTR name under the domain (it never looks the
    # name up again); spfpolicy only on a forward-confirmed name, so this client
    # gets its SPF verdict: pass.example.org does not list 203.0.113.6.
    outcome = outcomes[PTR_UNCONFIRMED.id]
    assert _only(outcome.oracle) == [
        "prepend X-Comment: SPF skipped for PTR whitelisted relay domain - "
        "client-ip=203.0.113.6; helo=helo-none.example.org; "
        "envelope-from=carol@pass.example.org; receiver=example.net "
    ]
    assert _only(outcome.spfpolicy) == [
        f"550 5.7.23 {FAIL_REASON}{OPENSPF}s=mfrom;id=carol@pass.example.org;"
        "ip=203.0.113.6;r=example.net"
    ]


def test_difference_permerror_reject_keeps_5_7_24_for_later_recipients(
    outcomes: dict[str, Outcome],
) -> None:
    # policyd-spf replays the cached reject of an instance but recomputes the
    # status code from the replay's (absent) error flag: 5.7.24 becomes 5.7.23.
    # RFC 7372 3.2: 5.7.24 is the code for an SPF permerror.
    outcome = outcomes[PERMERROR_REPLAY.id]
    first, second = _only(outcome.oracle)
    assert first.startswith("550 5.7.24 Message rejected due to: ")
    assert second == first.replace("550 5.7.24 ", "550 5.7.23 ", 1)
    assert _only(outcome.spfpolicy) == [first, first]


def test_difference_servfail_is_temperror(outcomes: dict[str, Outcome]) -> None:
    # py3dns hands policyd-spf a SERVFAIL reply as an empty answer, so the sender
    # domain looks like it has no SPF record (result none) and only the HELO
    # result is reported.  RFC 7208 4.4: a DNS error other than NXDOMAIN is a
    # temperror, which TempError_Defer turns into a deferral.
    outcome = outcomes[SERVFAIL.id]
    assert _only(outcome.oracle) == [
        PASS_HELO + "client-ip=192.0.2.10; helo=mail.example.org; "
        "envelope-from=carol@servfail.example.org; receiver=example.net "
    ]
    assert _only(outcome.spfpolicy) == [
        "defer_if_permit 4.7.24 Message deferred due to: SPF Temporary Error: DNS SERVFAIL. "
        f"Please see {OPENSPF}s=mfrom;id=carol@servfail.example.org;ip=192.0.2.10;r=example.net"
    ]


def test_difference_a_label_sender_domain_is_resolved(outcomes: dict[str, Outcome]) -> None:
    # py3dns decodes answer owner names to Unicode (xn--bcher-kva -> bücher), so
    # pyspf never finds the TXT record it asked for and reports none; an A-label
    # is an ordinary LDH name (RFC 5890 2.3.2.1) and its record applies.
    outcome = outcomes[A_LABEL.id]
    assert _only(outcome.oracle) == [
        PASS_HELO + "client-ip=192.0.2.10; helo=mail.example.org; "
        "envelope-from=carol@xn--bcher-kva.example.org; receiver=example.net "
    ]
    assert _only(outcome.spfpolicy) == [
        PASS_MFROM + "client-ip=192.0.2.10; helo=mail.example.org; "
        "envelope-from=carol@xn--bcher-kva.example.org; receiver=example.net "
    ]


def test_difference_empty_skip_addresses_skips_nothing(outcomes: dict[str, Outcome]) -> None:
    # "skip_addresses =" (empty) makes policyd-spf's _spfbypass() return None,
    # and _spfcheck() dies subscripting it: every request kills the process and
    # Postfix answers 451 4.3.5.  An empty list should skip no address, so even
    # a loopback client gets its SPF verdict.
    outcome = outcomes[EMPTY_SKIP_ADDRESSES.id]
    (crash,) = outcome.oracle
    assert isinstance(crash, Crashed)
    assert re.search(r"TypeError: 'NoneType' object is not subscriptable", crash.log), crash.log
    assert _only(outcome.spfpolicy) == [
        f"550 5.7.23 {FAIL_REASON}{OPENSPF}s=mfrom;id=carol@pass.example.org;"
        "ip=127.0.0.1;r=example.net"
    ]
