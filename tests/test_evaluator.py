"""evaluator.py's replacements of pyspf internals answer exactly as pyspf does."""

from __future__ import annotations

import time
from typing import Any

import pytest
import spf

from spfpolicy.dns import Resolver
from spfpolicy.evaluator import _AsyncQuery


def queries(ip: str) -> tuple[_AsyncQuery, spf.query]:
    ours = _AsyncQuery(
        ip,
        "a@example.com",
        "mail.example.com",
        resolver=Resolver([]),
        void_limit=2,
        receiver=None,
        deadline=time.monotonic() + 10,
        clock=time.monotonic,
    )
    return ours, spf.query(ip, "a@example.com", "mail.example.com")


def outcome(query: spf.query, addresses: list[Any], prefix: int) -> object:
    try:
        return query.cidrmatch(addresses, prefix)
    except spf.PermError as exc:
        return ("PermError", str(exc))


@pytest.mark.parametrize(
    ("ip", "addresses", "prefix"),
    [
        ("192.0.2.3", ["192.0.2.3"], 32),
        ("192.0.2.3", ["192.0.2.2"], 32),
        ("192.0.2.3", ["192.0.2.2"], 31),
        ("192.0.2.3", ["198.51.100.1", "192.0.2.200"], 24),
        ("192.0.2.3", ["192.0.2.0/24"], 24),  # a network where an address belongs
        ("192.0.2.3", ["192.0.2.0/24"], 16),
        ("192.0.2.3", ["192.0.2.1"], 33),  # a prefix longer than the address
        ("192.0.2.3", ["not-an-ip"], 24),
        ("192.0.2.3", ["2001:db8::1"], 64),  # the other family never matches
        ("2001:db8::1", ["2001:db8::"], 127),
        ("2001:db8::1", ["2001:db8::"], 128),
        ("2001:db8::1", ["2001:DB8:0:0:0:0:0:1"], 128),
        ("::ffff:192.0.2.3", ["192.0.2.0"], 24),  # a mapped client is checked as IPv4
        ("192.0.2.3", [], 24),
    ],
)
def test_cidrmatch_is_pyspfs(ip: str, addresses: list[Any], prefix: int) -> None:
    ours, theirs = queries(ip)
    assert outcome(ours, addresses, prefix) == outcome(theirs, addresses, prefix)
    assert outcome(ours, addresses, prefix) == outcome(ours, addresses, prefix)  # cached too
