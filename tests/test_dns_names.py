"""Names as they go on the wire: the text pyspf asks for, one octet per
character, whichever path sends it (c-ares, or dnspython for names c-ares
will not send), cached under that text.

SPF macro expansion yields literal text (RFC 7208 section 7.3): the
local-part ``b\\ s`` gives a label of four octets, a backslash among them,
never an escape. The loopback DNS server records each question's labels as
received; the zone also holds the names a reader of escapes would send
instead, with other records, so a wrong name shows in the answer too.
"""

from __future__ import annotations

import dns.name
import pytest

from spfpolicy.bench.dnsserver import Zone
from spfpolicy.evaluator import SpfEvaluator
from spfpolicy.resolver import Resolver
from spfpolicy.results import SpfResult

NAMES = [
    pytest.param("plain.example.com", id="plain"),
    pytest.param("b s.example.com", id="space"),
    pytest.param("b\\ s.example.com", id="backslash-space"),
    pytest.param("b\\032s.example.com", id="backslash-digits-space"),
    pytest.param("x\\100y.example.com", id="backslash-digits-letter"),
    pytest.param("a\\.b.example.com", id="backslash-dot"),
    pytest.param("a\\\\b.example.com", id="two-backslashes"),
]
# What reading the escapes would make of them: one wrong name each.
MISREAD = ["b s.example.com", "xdy.example.com", "a\\.b.example.com", "ab.example.com"]


def _labels(text: str) -> tuple[bytes, ...]:
    return tuple(text.encode().split(b"."))


def _zone_key(text: str) -> str:
    # Zone data is read as master-file text: escape the literal labels.
    return dns.name.Name([*_labels(text), b""]).to_text()


def _zone() -> Zone:
    data = {_zone_key(p.values[0]): [{"TXT": "for " + p.values[0]}] for p in NAMES}
    data[_zone_key("b.example.com")] = [{"TXT": "misread"}]
    data[dns.name.Name([b"a.b", b"example", b"com", b""]).to_text()] = [{"TXT": "misread"}]
    for text in MISREAD:
        data.setdefault(dns.name.from_text(text).to_text(), [{"TXT": "misread"}])
    return Zone.from_dict(data)


@pytest.fixture
async def resolver_for():
    made: list[Resolver] = []

    def make(server) -> Resolver:
        resolver = Resolver([server.nameserver], timeout=0.5, tries=1)
        made.append(resolver)
        return resolver

    yield make
    for resolver in made:
        await resolver.close()


@pytest.mark.parametrize("name", NAMES)
async def test_both_paths_send_the_literal_name(zone_server, resolver_for, name: str) -> None:
    server = await zone_server(_zone())
    expected = ((f"for {name}".encode(),),)

    server.questions = []
    resolver = resolver_for(server)
    assert (await resolver.resolve(name, "TXT")).records == expected
    through_resolve = server.questions
    assert resolver.peek(name, "TXT") is not None  # under the text pyspf gave

    server.questions = []
    answer = await resolver_for(server)._fetch_with_dnspython(name, "TXT")
    assert answer.records == expected
    through_dnspython = server.questions

    assert through_resolve == through_dnspython == [_labels(name)]


async def test_local_part_with_backslash_and_space_in_a_macro(zone_server, resolver_for) -> None:
    # %{l} of b\ s@example.com is the text "b\ s": exists: looks up that.
    server = await zone_server(
        {
            "example.com": [{"TXT": "v=spf1 exists:%{l}.x.example.com -all"}],
            _zone_key("b\\ s.x.example.com"): [{"A": "127.0.0.2"}],
        }
    )
    server.questions = []
    evaluator = SpfEvaluator(resolver_for(server), prefetch=False)
    outcome = await evaluator.check("192.0.2.5", "b\\ s@example.com", "h")
    assert outcome.result is SpfResult.PASS
    assert (b"b\\ s", b"x", b"example", b"com") in server.questions
