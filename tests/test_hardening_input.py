"""Bad input: whatever bytes a peer sends, the parser yields requests or its own
errors, and the server answers with one clean action line or closes that one
connection; values built to inject header or reply lines never get through.

tests/test_protocol.py already shows chunking does not matter; the properties
here add: any bytes under the default (production) limits, re-framing of what
was parsed, the response parser on any bytes, and the server over a real
socket doing exactly what the parser predicts.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hardening import (
    BAD_IP,
    GOOD_IP,
    HELO,
    InProcessServers,
    check_response_block,
    header,
    request,
)
from spfpolicy.config import HeaderType
from spfpolicy.protocol import (
    PolicyRequest,
    ProtocolError,
    RequestParser,
    RequestTooLarge,
    ResponseParser,
    encode_request,
)

# -- properties of the codec ----------------------------------------------------

FRAGMENTS = st.sampled_from(
    [
        b"request=smtpd_access_policy\n",
        b"sender=a@b\n",
        b"client_address=192.0.2.1\n",
        b"=",
        b"==",
        b"\n",
        b"\r",
        b"\r\n",
        b"\n\n",
        b"\0",
        b"\xff\xfe",
        b"\xc3",  # a cut UTF-8 sequence
        b"\xc2\x85",  # NEL, a C1 control
        b"name",
        b"x" * 300,
    ]
)
ANY_BYTES = st.one_of(
    st.binary(max_size=2000),
    st.lists(st.one_of(FRAGMENTS, st.binary(max_size=20)), max_size=200).map(b"".join),
)
CUTS = st.lists(st.integers(0, 100_000), max_size=30)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def parse_all(pieces: list[bytes], **limits: int) -> tuple[list[PolicyRequest], str | None]:
    """Requests and the error text; only the codec's own error may come out."""
    parser = RequestParser(**limits)
    requests: list[PolicyRequest] = []
    try:
        for piece in pieces:
            parser.feed(piece)
            while (found := parser.next_request()) is not None:
                requests.append(found)
        parser.feed_eof()
        while (found := parser.next_request()) is not None:
            requests.append(found)
    except RequestTooLarge as exc:
        return requests, str(exc)
    return requests, None


def reframe(requests: list[PolicyRequest]) -> bytes:
    """The parsed attributes written back as lines. CRLF, not LF: a value may
    end in "\\r" (from "...\\r\\r\\n"), and one "\\r" is stripped per line."""
    out = bytearray()
    for found in requests:
        for name, value in found.attributes.items():
            out += name.encode() + b"=" + value.encode() + b"\r\n"
        out += b"\n"
    return bytes(out)


@settings(max_examples=400, deadline=None)
@given(data=ANY_BYTES, points=CUTS)
def test_property_any_bytes_any_cuts(data: bytes, points: list[int]) -> None:
    requests, error = parse_all(cut(data, points))
    assert (requests, error) == parse_all([data])
    for found in requests:
        for name, value in found.attributes.items():
            assert name and "=" not in name and "\0" not in name
            assert "\n" not in name + value
            # Decoded with "replace": always encodable, never a lone surrogate.
            (name + value).encode("utf-8")
    for warning in (w for found in requests for w in found.warnings):
        assert warning.isprintable() and warning.isascii() and len(warning) <= 200


@settings(max_examples=300, deadline=None)
@given(data=ANY_BYTES, points=CUTS)
def test_property_reframing_is_consistent(data: bytes, points: list[int]) -> None:
    """Requests with attributes, written back and parsed again, are the same
    attributes in the same order; framing them again gives the same bytes."""
    requests, _ = parse_all([data])
    kept = [r for r in requests if r.attributes]
    again, error = parse_all(cut(reframe(kept), points), max_request_size=10**7)
    assert error is None
    assert [list(r.attributes.items()) for r in again] == [list(r.attributes.items()) for r in kept]
    assert all(not r.warnings for r in again)
    assert reframe(again) == reframe(kept)


@settings(max_examples=300, deadline=None)
@given(data=ANY_BYTES, points=CUTS)
def test_property_response_parser_any_bytes(data: bytes, points: list[int]) -> None:
    """The client side (load generator, tests) never fails but with ProtocolError."""
    parser = ResponseParser()
    actions: list[str] = []
    with contextlib.suppress(ProtocolError):
        for piece in cut(data, points):
            parser.feed(piece)
            while (action := parser.next_response()) is not None:
                actions.append(action)
    assert all("\n" not in action for action in actions)


# -- the server does what the parser predicts ------------------------------------

ZONE: dict[str, Any] = {
    "pass.example": [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}],
    "mail.pass.example": [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}, {"A": "192.0.2.10"}],
    "temp.example": ["servfail"],
}


@pytest.fixture
async def servers(zone_server: Any, tmp_path: Path) -> AsyncIterator[InProcessServers]:
    made = InProcessServers(zone_server, tmp_path)
    yield made
    await made.close()


def random_stream(rng: random.Random) -> bytes:
    """Protocol-shaped noise: real requests, broken lines, garbage, limit breakers."""
    parts: list[bytes] = []
    for _ in range(rng.randint(1, 6)):
        kind = rng.random()
        if kind < 0.35:
            attrs = request(f"{rng.choice(['a', '', 'x@y'])}@{rng.choice(['pass.example', 'e'])}")
            attrs["client_address"] = rng.choice([GOOD_IP, BAD_IP, "::1", "bogus", ""])
            parts.append(encode_request(attrs))
        elif kind < 0.55:
            parts.append(bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300))))
        elif kind < 0.70:
            parts.append(rng.choice([b"=\n", b"\0=\0\n", b"a\0b=c\n", b"\r\n", b"\n", b"x\n"]))
        elif kind < 0.80:
            parts.append(b"sender=" + b"\0" * rng.randint(0, 50) + b"\xff@pass.example\n\n")
        elif kind < 0.88:
            parts.append(b"helo_name=" + b"h" * rng.choice([8000, 8185, 8186, 9000]) + b"\n")
        elif kind < 0.95:
            parts.append(b"".join(b"a%d=b\n" % i for i in range(rng.choice([100, 127, 128, 129]))))
        else:
            parts.append(b"x=" + b"y" * rng.choice([70_000, 200_000]))
    return b"".join(parts) + b"\n\n"


async def test_server_answers_exactly_what_the_parser_predicts(servers: InProcessServers) -> None:
    running = await servers.start(ZONE, lookup_time=2)
    settings_ = running.server.settings
    limits = {
        "max_line_length": settings_.max_line_length,
        "max_attributes": settings_.max_attributes,
        "max_request_size": settings_.max_request_size,
    }
    rng = random.Random(20240605)
    errors_seen = 0
    for n in range(150):
        data = random_stream(rng)
        predicted, error = parse_all([data], **limits)
        errors_seen += error is not None
        client = await running.connect()
        writing = asyncio.create_task(client.send(data))
        try:
            for _ in predicted:
                await client.answer(bound=10.0)
            if error is not None:
                assert await client.closed_by_server(), f"stream {n}: not closed after {error}"
            else:
                expected = header("Pass", "a@pass.example", GOOD_IP)
                assert await client.ask(request(ip=GOOD_IP)) == expected
        finally:
            with contextlib.suppress(ConnectionError):
                await writing
            await client.close()
    assert errors_seen > 10  # the limits were really exercised
    assert running.server.errors == 0
    # And the server is still well.
    client = await running.connect()
    assert await client.ask(request(ip=GOOD_IP)) == header("Pass", "a@pass.example", GOOD_IP)


# -- header and reply injection -----------------------------------------------------

# Raw value bytes. "\r" inside a line survives framing (only a final "\r" is
# CRLF); "\n" cannot be sent inside a value, it ends the line.
EVIL = [
    pytest.param(b"a\rX-Injected: 1", id="CR"),
    pytest.param(b"a\r\rX-Injected: 1\r", id="CR-CR-trailing"),
    pytest.param(b"a\0X-Injected: 1", id="NUL"),
    pytest.param(b"a\x1b[2J\x07\x08\x7f", id="controls"),
    pytest.param(b"a\xc2\x85X-Injected: 1", id="C1-NEL"),
    pytest.param(b"a\xff\xfe\xc3", id="invalid-utf8"),
    pytest.param("Ⅻ-ünïcödé-例え".encode(), id="unicode"),
    pytest.param(b"a" + b"\t" * 20 + b" " * 20, id="whitespace"),
    pytest.param(b'a;"\\ (comment) <x> action=REJECT', id="header-syntax"),
    pytest.param(b"\r" * 10 + b"a\r", id="CR-run"),
    pytest.param(b"x" * 8000, id="8000-bytes"),
    pytest.param("é".encode() * 4000, id="8000-bytes-2-byte-chars"),
]

FIELDS = ["helo_name", "sender", "client_name"]


def raw_request(attributes: dict[str, str], field: str, value: bytes) -> bytes:
    """A request with one attribute's value replaced by raw bytes."""
    lines = []
    for name, text in attributes.items():
        raw = value if name == field else text.encode()
        lines.append(name.encode() + b"=" + raw + b"\n")
    return b"".join(lines) + b"\n"


def variants(field: str, value: bytes) -> list[bytes]:
    """The evil value alone and inside a sender/HELO that makes SPF run."""
    if field == "sender":
        return [value + b"@pass.example", b"a@" + value + b".pass.example", value]
    if field == "helo_name":
        return [value, value + b".pass.example"]
    return [value]


SCENARIOS = [
    # (settings changes, client IP, sender: the decision each one exercises)
    pytest.param({}, GOOD_IP, "a@pass.example", id="pass-header"),
    pytest.param({}, BAD_IP, "a@pass.example", id="fail-reject"),
    pytest.param({"header_type": HeaderType.AR}, GOOD_IP, "a@pass.example", id="ar-header"),
    pytest.param({"temperror_defer": True}, GOOD_IP, "a@temp.example", id="temperror-defer"),
    pytest.param({}, BAD_IP, "", id="null-sender-helo-check"),
    pytest.param({"hide_receiver": True}, GOOD_IP, "a@pass.example", id="hide-receiver"),
]


@pytest.mark.parametrize(("changes", "ip", "sender"), SCENARIOS)
async def test_no_injection_through_values(
    servers: InProcessServers, changes: dict[str, Any], ip: str, sender: str
) -> None:
    running = await servers.start(ZONE, lookup_time=2, **changes)
    client = await running.connect()
    sent = 0
    for field in FIELDS:
        for param in EVIL:
            (value,) = param.values
            for raw in variants(field, value):
                base = request(sender, ip=ip, helo="mail.pass.example")
                data = raw_request(base, field, raw)
                await client.send(data)
                # check_response_block: one line, "action=", printable UTF-8,
                # at most 2048 bytes, and ResponseParser agrees.
                await client.answer(bound=10.0)
                sent += 1
    assert sent == len(EVIL) * 6
    assert running.server.errors == 0
    # In step to the end: the next answer is the one a fresh connection gets.
    fresh = await running.connect()
    assert await client.ask(request(ip=GOOD_IP)) == await fresh.ask(request(ip=GOOD_IP))


async def test_injection_text_is_kept_on_the_one_line(servers: InProcessServers) -> None:
    """A CR in the sender does not end the header: the rest stays on its line."""
    running = await servers.start(ZONE)
    client = await running.connect()
    base = request("a@pass.example", ip=GOOD_IP)
    await client.send(raw_request(base, "sender", b"a\rX-Injected: 1@pass.example"))
    action = await client.answer()
    assert action.startswith("prepend Received-SPF: ")
    assert "x-injected: 1@pass.example" in action.lower()  # inline, as text
    assert f"helo={HELO};" in action


# Unicode line and paragraph separators and bidi/format characters: no line
# break for Postfix or SMTP, but not printable either (a MUA or a log viewer
# may break the line or reorder text there).
UNICODE_INVISIBLES = [
    pytest.param("a\u2028X-Injected:\u2029 1".encode(), id="line-paragraph-separators"),
    pytest.param("a\u202eevil\u202c\u200b\ufeff".encode(), id="bidi-override-zero-width"),
]


@pytest.mark.parametrize("value", UNICODE_INVISIBLES)
async def test_no_unicode_invisibles_in_answers(servers: InProcessServers, value: bytes) -> None:
    running = await servers.start(ZONE, lookup_time=2)
    client = await running.connect()
    base = request("a@pass.example", ip=GOOD_IP)
    for field in ("sender", "helo_name"):
        await client.send(raw_request(base, field, value + b"@pass.example"))
        await client.answer(bound=10.0)  # check_response_block: printable


@pytest.mark.parametrize(
    "domain",
    [
        pytest.param(b"a\xff\xfe", id="invalid-utf8"),
        pytest.param(b"\xff.pass.example", id="invalid-utf8-label"),
    ],
)
@pytest.mark.parametrize("field", ["helo_name", "sender"])
async def test_domain_idna_cannot_encode_gives_none(
    servers: InProcessServers, caplog: pytest.LogCaptureFixture, domain: bytes, field: str
) -> None:
    running = await servers.start(ZONE, lookup_time=2, temperror_defer=True)
    client = await running.connect()
    if field == "sender":
        data = raw_request(request(ip=BAD_IP), "sender", b"user@" + domain)
    else:
        data = raw_request(request("", ip=BAD_IP), "helo_name", domain)
    await client.send(data)
    action = await client.answer(bound=10.0)
    assert "internal error" not in action
    assert not action.startswith("defer"), action
    assert [r.getMessage() for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")] == []


def test_check_response_block_refuses_bad_blocks() -> None:
    """The strict reader used above does catch what it is there to catch."""
    for bad in [
        b"action=DUNNO\nX-Injected: 1\n\n",
        b"action=DUNNO\r\n\n",
        b"action=a\0b\n\n",
        b"action=a\xc2\x85b\n\n",
        b"action=\xff\n\n",
        b"action=" + b"x" * 2042 + b"\n\n",
        b"action= \n\n",
        b"DUNNO\n\n",
        b"action=DUNNO\n",
    ]:
        with pytest.raises(AssertionError):
            check_response_block(bad)
    assert check_response_block(b"action=DUNNO\n\n") == "DUNNO"


@pytest.mark.parametrize("ip", ["fe80::1%lo", "2001:db8::1%eth0"])
async def test_scoped_ipv6_client_address_is_no_error(
    servers: InProcessServers, caplog: pytest.LogCaptureFixture, ip: str
) -> None:
    running = await servers.start(ZONE, lookup_time=2)
    client = await running.connect()
    await client.ask(request(ip=ip), bound=10.0)
    assert running.server.errors == 0
    assert [r.getMessage() for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")] == []


async def test_overlong_macro_name_is_no_internal_error(
    servers: InProcessServers, caplog: pytest.LogCaptureFixture
) -> None:
    zone = ZONE | {"macro.example": [{"TXT": "v=spf1 exists:%{l}.%{d} -all"}]}
    running = await servers.start(zone, lookup_time=2)
    client = await running.connect()
    local = ".".join(["l" * 60] * 5)  # 304 characters, every label legal
    action = await client.ask(request(f"{local}@macro.example", ip=BAD_IP), bound=10.0)
    assert "internal error" not in action
    assert "Temperror" not in action
    assert [r.getMessage() for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")] == []


# -- the fuzz script, briefly ----------------------------------------------------------

FUZZ_SCRIPT = Path(__file__).parent / "fuzz" / "fuzz_server.py"
FUZZ_REQUESTS = 3000


@pytest.fixture(scope="module")
def fuzz_report() -> dict[str, Any]:
    """One short run of tests/fuzz/fuzz_server.py (a real server subprocess)."""
    done = subprocess.run(
        [sys.executable, str(FUZZ_SCRIPT), "--requests", str(FUZZ_REQUESTS), "--json"],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.stdout.strip(), done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


@pytest.mark.slow
def test_fuzz_short_run(fuzz_report: dict[str, Any]) -> None:
    """No crash, no hang, every answer one clean line as predicted, RSS bounded."""
    report = fuzz_report
    assert report["failures"] == []
    assert report["requests"] == FUZZ_REQUESTS
    assert report["answers"] > FUZZ_REQUESTS // 2
    assert report["closes"] > 0  # limits were broken, and only those connections closed
    assert report["final_answer_ok"]
    assert report["rss_after_mb"] <= report["rss_limit_mb"]
    assert report["ok"]


@pytest.mark.slow
def test_fuzz_short_run_clean(fuzz_report: dict[str, Any]) -> None:
    assert fuzz_report["traceback_kinds"] == {}
    assert fuzz_report["invisible_examples"] == []
