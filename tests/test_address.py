"""``host[:port]`` (spfpolicy.address.HostPort): one parser and one printer
for the configuration, the command line, the resolver and the bench; and
``ip_or_none``, the client address parser, held to ``ipaddress.ip_address``."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spfpolicy.address import HostPort, ip_or_none
from spfpolicy.config import ListenAddress, ListenFamily, Nameserver


@pytest.mark.parametrize(
    ("text", "default_port", "expected", "printed"),
    [
        pytest.param("127.0.0.1", 53, HostPort("127.0.0.1", 53), "127.0.0.1:53", id="bare-v4"),
        pytest.param("127.0.0.1:5353", 53, HostPort("127.0.0.1", 5353), "127.0.0.1:5353", id="v4"),
        pytest.param("::1", 53, HostPort("::1", 53), "[::1]:53", id="bare-v6"),
        pytest.param("[::1]:5353", None, HostPort("::1", 5353), "[::1]:5353", id="v6-port"),
        pytest.param("[::1]", 53, HostPort("::1", 53), "[::1]:53", id="bracketed-v6"),
        pytest.param(
            " mx.example:25 ", None, HostPort("mx.example", 25), "mx.example:25", id="name"
        ),
    ],
)
def test_parse_and_print(
    text: str, default_port: int | None, expected: HostPort, printed: str
) -> None:
    parsed = HostPort.parse(text, default_port=default_port)
    assert parsed == expected
    assert str(parsed) == printed
    assert HostPort.parse(printed) == parsed  # what it prints, it reads back


@pytest.mark.parametrize(
    ("text", "error"),
    [
        pytest.param("", "missing host", id="empty"),
        pytest.param("127.0.0.1", "missing port", id="no-port-no-default"),
        pytest.param("127.0.0.1:0", "out of range", id="port-0"),
        pytest.param("127.0.0.1:99999", "out of range", id="port-too-big"),
        pytest.param("[::1]x", "junk after", id="junk"),
        pytest.param("[::1:53", "unclosed", id="unclosed"),
        pytest.param("h:p", "bad port", id="not-a-number"),
        pytest.param(":53", "missing host", id="no-host"),
    ],
)
def test_rejects(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        HostPort.parse(text)


def test_the_configurations_addresses_print_through_it() -> None:
    assert str(Nameserver("::1")) == "[::1]:53"
    assert Nameserver.parse("192.0.2.53", default_port=53) == Nameserver("192.0.2.53")
    inet = ListenAddress(ListenFamily.INET, host="::1", port=9000)
    assert str(inet) == "inet:[::1]:9000"


def _ipaddress_or_none(text: str) -> object:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


# Near-misses of a dotted quad, and a few IPv6 shapes.
_OCTET = st.one_of(
    st.integers(0, 255).map(str),
    st.text("0123456789", min_size=0, max_size=4),
    st.sampled_from(["00", "01", "0x1", "-1", "+1", " 1", "1 ", "\u0661", "1\x00", "\n"]),
)


@settings(max_examples=2000, derandomize=True, deadline=None)
@given(st.lists(_OCTET, min_size=1, max_size=6).map(".".join))
def test_ip_or_none_takes_what_ipaddress_takes_for_dotted_quads(text: str) -> None:
    assert ip_or_none(text) == _ipaddress_or_none(text)


@settings(max_examples=500, derandomize=True, deadline=None)
@given(st.text("0123456789abcdef.:%x ", max_size=20))
def test_ip_or_none_takes_what_ipaddress_takes(text: str) -> None:
    assert ip_or_none(text) == _ipaddress_or_none(text)


@pytest.mark.parametrize(
    "text", ["192.0.2.1", "0.0.0.0", "255.255.255.255", "2001:db8::1", "::ffff:192.0.2.1"]
)
def test_ip_or_none_parses_addresses(text: str) -> None:
    assert ip_or_none(text) == ipaddress.ip_address(text)
    assert type(ip_or_none(text)) is type(ipaddress.ip_address(text))
