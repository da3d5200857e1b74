"""Plumbing for the tests that talk to a PolicyServer in this process over a
real unix socket: clients speaking the project's codec, the zone the
loopback DNS server answers from, and the actions expected for it.

Expected actions are literal strings (policyd-spf 3.0.4's wording, as
policy.py renders it). The ``clients`` and ``policy_server`` fixtures are in
conftest.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

# One client for all in-process server tests: hardening's, which checks
# every response block strictly.
from hardening import BAD_IP, GOOD_IP, header, request
from hardening import Client as Client
from hardening import Running as Running
from hardening import wait_for as wait_for
from spfpolicy.bench.dnsserver import ZoneServer
from spfpolicy.config import ListenAddress, ListenFamily, Nameserver, Settings

ZONE: dict[str, Any] = {
    "pass.example": [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}],
    "mail.pass.example": [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}, {"A": "192.0.2.10"}],
    "soft.example": [{"TXT": "v=spf1 ip4:192.0.2.0/24 ~all"}],
    "neutral.example": [{"TXT": "v=spf1 ?all"}],
    "none.example": [{"A": "192.0.2.1"}],
    "perm.example": [{"TXT": "v=spf1 ip4:192.0.2.0/24 bogus:x -all"}],
    "temp.example": ["servfail"],
}

PASS = header("Pass", "a@pass.example", GOOD_IP)
FAIL = (
    "550 5.7.23 Message rejected due to: SPF fail - not authorized. Please see "
    f"http://www.openspf.net/Why?s=mfrom;id=a@pass.example;ip={BAD_IP};r=rcpt.example"
)
SOFTFAIL = header("Softfail", "a@soft.example")
TEMPERROR = header("Temperror", "a@temp.example")
FALLBACK_DEFER = (
    "defer_if_permit 4.7.24 Message deferred due to: SPF check could not be completed "
    "(temporary error). Please see "
    f"http://www.openspf.net/Why?s=mfrom;id=a@pass.example;ip={BAD_IP};r=rcpt.example"
)


def unix(path: Path | str) -> ListenAddress:
    return ListenAddress(ListenFamily.UNIX, path=str(path))


def settings_for(dns: ZoneServer, path: Path, **changes: Any) -> Settings:
    changes.setdefault("listen", (unix(path),))
    return dataclasses.replace(
        Settings(),
        nameservers=(Nameserver("127.0.0.1", dns.port),),
        dns_timeout=5.0,
        **changes,
    )


def mixed_requests(count: int) -> list[tuple[dict[str, str], str]]:
    """Requests whose answers differ from their neighbours', so order shows."""
    kinds = [
        (lambda: request(ip=GOOD_IP), PASS),
        (lambda: request(), FAIL),
        (lambda: request("a@soft.example"), SOFTFAIL),
    ]
    return [(kinds[i % 3][0](), kinds[i % 3][1]) for i in range(count)]
