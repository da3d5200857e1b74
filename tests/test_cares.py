"""The aiodns/pycares internals spfpolicy relies on (src/spfpolicy/cares.py)
are all there in the installed versions. When an upgrade removes one, this
fails naming it: see cares.py for what each is used for and what spfpolicy
falls back to without it."""

from __future__ import annotations

import aiodns
import pycares

from spfpolicy import cares


def test_every_private_name_is_there() -> None:
    missing = cares.missing_private_names()
    assert not missing, (
        f"aiodns {aiodns.__version__} / pycares {pycares.__version__} lack "
        f"{', '.join(missing)}: update src/spfpolicy/cares.py"
    )


def test_the_pieces_that_need_them_are_on() -> None:
    # Each piece turns itself off quietly when its names are missing; here
    # they must all be on, or the measured behaviour is not what runs.
    assert cares.KEEPS_NEGATIVE_REPLIES, "negative answers would keep DNS_Negative_TTL"
    assert callable(getattr(aiodns.DNSResolver, "_sock_state_cb", None))


def test_missing_names_are_reported(monkeypatch) -> None:
    monkeypatch.setattr(
        cares, "PRIVATE_NAMES", (*cares.PRIVATE_NAMES, ("pycares.Channel", "_no_such_name"))
    )
    assert cares.missing_private_names() == ["pycares.Channel._no_such_name"]


# -- replies read without pycares' objects (cares.read_reply) -------------------

_REPLY_ZONE = {
    "example.com": [
        {"A": "192.0.2.1", "ttl": 300},
        {"A": "192.0.2.2", "ttl": 200},
        {"AAAA": "2001:db8::1", "ttl": 86400},
        {"AAAA": "::ffff:192.0.2.9"},
        {"MX": [10, "mx1.example.com"], "ttl": 60},
        {"MX": [20, "mx2.example.com"], "ttl": 60},
        {"MX": [0, ""]},
        {"TXT": ["v=spf1 ip4:192.0.2.0/24", " -all"], "ttl": 120},
        {"TXT": "site-verification=x"},
        {"TXT": [b"\xff\x00 binary", b""]},
    ],
    "1.2.0.192.in-addr.arpa": [{"PTR": "mail.example.com"}, {"PTR": "other.example.com"}],
    "alias.example.com": [{"CNAME": "link.example.com", "ttl": 30}],
    "link.example.com": [{"CNAME": "example.com", "ttl": 40}],
    "dangling.example.com": [{"CNAME": "gone.example.com", "ttl": 5}],
    "nodata.example.com": [{"A": "192.0.2.3"}],
}

_REPLY_QUERIES = [
    (name, qtype)
    for name in ("example.com", "alias.example.com", "dangling.example.com")
    for qtype in ("A", "AAAA", "MX", "TXT", "PTR")
] + [
    ("1.2.0.192.in-addr.arpa", "PTR"),
    ("nodata.example.com", "TXT"),
    ("nxdomain.example.com", "TXT"),
    ("nxdomain.example.com", "A"),
]


async def test_read_reply_reads_what_pycares_reads(zone_server, resolvers, monkeypatch) -> None:
    # Differential: every reply the resolver gets is also read by pycares'
    # own parse (what spfpolicy used before), brought to the same shape.
    assert cares._read_reply is not None, "pycares' parse would be used"
    server = await zone_server(_REPLY_ZONE, negative_ttl=77, soa_ttl=66)
    compared: list[cares.Reply] = []
    ours = cares.read_reply

    def both(dnsrec):
        reply = ours(dnsrec)
        theirs, failed = pycares.parse_dnsrec(dnsrec)
        assert failed is None
        assert reply == cares.from_result(theirs)
        compared.append(reply)
        return reply

    monkeypatch.setattr(cares, "read_reply", both)
    resolver = resolvers(server)
    answers = {query: await resolver.resolve(*query) for query in _REPLY_QUERIES}
    assert len(compared) >= len(_REPLY_QUERIES)
    # And what the resolver made of them:
    assert answers["example.com", "A"].records == ("192.0.2.1", "192.0.2.2")
    assert answers["example.com", "A"].ttl == 200
    assert answers["example.com", "AAAA"].records == ("2001:db8::1", "::ffff:192.0.2.9")
    assert sorted(answers["example.com", "MX"].records) == [
        (0, ""),
        (10, "mx1.example.com"),
        (20, "mx2.example.com"),
    ]
    assert sorted(answers["example.com", "TXT"].records) == sorted(
        [(b"v=spf1 ip4:192.0.2.0/24 -all",), (b"site-verification=x",), (b"\xff\x00 binary",)]
    )
    assert answers["alias.example.com", "A"].records == ("192.0.2.1", "192.0.2.2")
    assert answers["alias.example.com", "A"].ttl == 30
    assert answers["1.2.0.192.in-addr.arpa", "PTR"].records == (
        "mail.example.com",
        "other.example.com",
    )
    for negative in (
        ("nodata.example.com", "TXT"),
        ("nxdomain.example.com", "TXT"),
        ("dangling.example.com", "A"),
    ):
        assert answers[negative].negative
    assert answers["nxdomain.example.com", "TXT"].ttl == 66  # min(SOA TTL, MINIMUM)
    assert answers["dangling.example.com", "A"].ttl == 5  # no longer than the link


async def test_replies_without_our_reader_give_the_same_answers(
    zone_server, resolvers, monkeypatch
) -> None:
    # Another pycares layout: its parse, brought to a Reply, is what is read.
    server = await zone_server(_REPLY_ZONE, negative_ttl=77, soa_ttl=66)
    expected = {q: await resolvers(server).resolve(*q) for q in _REPLY_QUERIES}
    monkeypatch.setattr(cares, "_read_reply", None)
    resolver = resolvers(server)
    for query in _REPLY_QUERIES:
        assert await resolver.resolve(*query) == expected[query], query


async def test_queries_sent_through_pycares_helpers_where_its_lock_is_not_found(
    zone_server, resolvers, monkeypatch
) -> None:
    # Another pycares layout, without the channel attributes _ask reads:
    # its _capture_channel and _register_callback_handle are used instead.
    server = await zone_server(_REPLY_ZONE, negative_ttl=77, soa_ttl=66)
    expected = {q: await resolvers(server).resolve(*q) for q in _REPLY_QUERIES}

    class WithoutLock:
        def __init__(self, channel: pycares.Channel) -> None:
            self._real = channel

        def __getattr__(self, name: str):
            if name == "_lock":
                raise AttributeError(name)
            return getattr(self._real, name)

    sent = []
    ask = cares._ask

    def ask_without_lock(channel, *args) -> None:
        sent.append(args[0])
        ask(WithoutLock(channel), *args)

    monkeypatch.setattr(cares, "_ask", ask_without_lock)
    resolver = resolvers(server)
    for query in _REPLY_QUERIES:
        assert await resolver.resolve(*query) == expected[query], query
    assert len(sent) >= len(_REPLY_QUERIES)
