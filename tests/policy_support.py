"""Fakes and helpers shared by the decision tests (test_policy, test_memory,
test_deciding): canned SPF outcomes, ``Checks`` fakes, settings and requests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from spfpolicy.config import Settings, load_settings
from spfpolicy.deciding import decide
from spfpolicy.memory import InstanceMemory
from spfpolicy.policy import Decision
from spfpolicy.protocol import PolicyRequest
from spfpolicy.results import SpfOutcome, SpfResult

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

    def read_shared(
        self, ip: str, sender: str, helo: str, *, void_limit: int, settled: Callable[[bool], None]
    ) -> bool:
        return False  # no shared cache


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


RELAY_SPF = {
    ("postmaster@relay.example.com", "relay.example.com"): outcome("pass"),
    ("a@example.org", "relay.example.com"): outcome("fail"),
    ("", "relay.example.com"): outcome("none"),
    ("postmaster@example.org", "example.org"): outcome("softfail"),
    ("a@example.org", "example.org"): outcome("fail"),
}

MEMO_SPF = {
    ("postmaster@mail.example.com", "mail.example.com"): outcome("pass"),
    ("a@example.org", "mail.example.com"): outcome("softfail"),
    ("z@example.org", "mail.example.com"): outcome("fail"),
    ("postmaster@example.org", "example.org"): outcome("neutral"),  # no HELO sent
    ("a@example.org", "example.org"): outcome("pass"),
}


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
