"""evaluator.py's replacements of pyspf internals answer exactly as pyspf does."""

from __future__ import annotations

import time
from typing import Any

import pytest
import spf
from hypothesis import given, settings
from hypothesis import strategies as st

from spfpolicy.evaluator import _AsyncQuery
from spfpolicy.resolver import Resolver


def our_query(ip: str) -> _AsyncQuery:
    return _AsyncQuery(
        ip,
        "a@example.com",
        "mail.example.com",
        resolver=Resolver([]),
        void_limit=2,
        receiver=None,
        deadline=time.monotonic() + 10,
        clock=time.monotonic,
    )


def queries(ip: str) -> tuple[_AsyncQuery, spf.query]:
    return our_query(ip), spf.query(ip, "a@example.com", "mail.example.com")


_ADDRESS_FIELDS = ("iplist", "ipaddr", "c", "i", "A", "v", "cidrmax")


def client_fields(make: Any, ip: str) -> object:
    """What pyspf keeps of the client address, or the PermError it raises."""
    try:
        query = make(ip)
    except spf.PermError as exc:
        return ("PermError", str(exc))
    fields = [getattr(query, name, "(unset)") for name in _ADDRESS_FIELDS]
    return [(type(value), value) for value in fields]


def pyspf_query(ip: str) -> spf.query:
    return spf.query(ip, "a@example.com", "mail.example.com")


# Dotted quads and their near misses, IPv6 and IPv4-mapped shapes, and
# pyspf's "list" modes.
_OCTET = st.one_of(
    st.integers(0, 255).map(str),
    st.text("0123456789", max_size=4),
    st.sampled_from(["00", "01", "0x1", "-1", "+1", " 1", "1 ", "\u0661", "1\x00", "\n"]),
)
_CLIENT = st.one_of(
    st.lists(_OCTET, min_size=1, max_size=6).map(".".join),
    st.text("0123456789abcdef.:", max_size=24),
    st.builds("::ffff:{}".format, st.lists(_OCTET, min_size=4, max_size=4).map(".".join)),
    st.sampled_from(["list", "LIST", "list6", "2001:db8::1", "::1", "::"]),
)


@settings(max_examples=2500, derandomize=True, deadline=None)
@given(_CLIENT)
def test_set_ip_is_pyspfs(ip: str) -> None:
    expected = client_fields(pyspf_query, ip)
    assert client_fields(our_query, ip) == expected


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


def parsed(query: spf.query, term: str) -> object:
    try:
        return query.validate_mechanism(term)
    except spf.PermError as exc:
        return ("PermError", str(exc), getattr(query, "perm_error", None))


@pytest.mark.parametrize("ip", ["192.0.2.3", "2001:db8::1"])
@pytest.mark.parametrize(
    "term",
    [
        "ip4:192.0.2.0/24",
        "-ip4:192.0.2.1",
        "~IP4:192.0.2.0/33",  # an invalid prefix: raised every time
        "ip4:1.2.03.4/24",
        "ip4:192.0.2.0/24,",  # lax mode notes the comma
        "ip6:2001:db8::/32",
        "?ip6:2001:db8::/129",
        "ip6:2001:db8::/32//64",
        "192.0.2.1",  # a bare address: noted, taken as ip4
        "ip:192.0.2.1",  # a common mistake
        "a/24//64",
        "mx:%{d}/27",
        "all",
    ],
)
def test_validate_mechanism_is_pyspfs(ip: str, term: str) -> None:
    ours, theirs = queries(ip)
    expected = parsed(theirs, term)
    assert parsed(ours, term) == expected
    again, _ = queries(ip)  # a later evaluation, after the term was remembered
    assert parsed(again, term) == expected
    noted = getattr(again, "perm_error", None), getattr(theirs, "perm_error", None)
    assert str(noted[0]) == str(noted[1])  # a lax-mode note, or none
