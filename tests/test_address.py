"""``host[:port]`` (spfpolicy.address.HostPort): one parser and one printer
for the configuration, the command line, the resolver and the bench."""

from __future__ import annotations

import pytest

from spfpolicy.address import HostPort
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
