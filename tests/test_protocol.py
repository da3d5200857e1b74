"""Tests for the policy protocol codec: tables fed whole and in small chunks, plus properties.

Every parsing case runs at each chunk size, because the parser must give the
same requests (and the same limit error) however the bytes arrive.
"""

from __future__ import annotations

import dataclasses
import itertools
import unicodedata
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spfpolicy.protocol import (
    INVISIBLE_CATEGORIES,
    MAX_RESPONSE_LINE,
    REQUEST_TYPE,
    PolicyRequest,
    ProtocolError,
    RequestParser,
    RequestTooLarge,
    ResponseParser,
    encode_request,
    encode_response,
)

CHUNK_SIZES = [
    pytest.param(None, id="whole"),
    pytest.param(128, id="chunk128"),
    pytest.param(16, id="chunk16"),
    pytest.param(1, id="bytewise"),
]

# What Postfix 3.x sends in the RCPT state.
POSTFIX_REQUEST = (
    b"request=smtpd_access_policy\n"
    b"protocol_state=RCPT\n"
    b"protocol_name=ESMTP\n"
    b"client_address=192.0.2.1\n"
    b"client_name=mail.example.org\n"
    b"client_port=53412\n"
    b"reverse_client_name=mail.example.org\n"
    b"server_address=198.51.100.25\n"
    b"server_port=25\n"
    b"helo_name=mail.example.org\n"
    b"sender=alice@example.org\n"
    b"recipient=bob@example.net\n"
    b"recipient_count=0\n"
    b"queue_id=\n"
    b"instance=1a2b.5f3e8c1d.4e7a1.0\n"
    b"size=12345\n"
    b"etrn_domain=\n"
    b"stress=\n"
    b"sasl_method=\n"
    b"sasl_username=\n"
    b"sasl_sender=\n"
    b"ccert_subject=\n"
    b"ccert_issuer=\n"
    b"ccert_fingerprint=\n"
    b"ccert_pubkey_fingerprint=\n"
    b"encryption_protocol=TLSv1.3\n"
    b"encryption_cipher=TLS_AES_256_GCM_SHA384\n"
    b"encryption_keysize=256\n"
    b"policy_context=\n"
    b"compatibility_level=3.6\n"
    b"mail_version=3.8.1\n"
    b"\n"
)


def split(data: bytes, size: int | None) -> Iterator[bytes]:
    if size is None:
        yield data
        return
    for start in range(0, len(data), size):
        yield data[start : start + size]


@dataclasses.dataclass
class Outcome:
    requests: list[PolicyRequest]
    error: str | None  # the RequestTooLarge message, if any
    peak_buffered: int


def parse(pieces: Iterator[bytes] | Sequence[bytes], **limits: int) -> Outcome:
    """Feed pieces as a server would (feed, then drain), then EOF."""
    parser = RequestParser(**limits)
    requests: list[PolicyRequest] = []
    peak = 0
    try:
        for piece in pieces:
            parser.feed(piece)
            peak = max(peak, parser.buffered)
            while (request := parser.next_request()) is not None:
                requests.append(request)
        parser.feed_eof()
        while (request := parser.next_request()) is not None:
            requests.append(request)
    except RequestTooLarge as error:
        return Outcome(requests, str(error), peak)
    return Outcome(requests, None, peak)


def req(attributes: dict[str, str], *warnings: str) -> PolicyRequest:
    return PolicyRequest(attributes, warnings)


PARSE_CASES = [
    pytest.param(
        POSTFIX_REQUEST,
        [
            req(
                {
                    name.decode(): value.decode()
                    for name, _, value in (
                        line.partition(b"=") for line in POSTFIX_REQUEST.splitlines() if line
                    )
                }
            )
        ],
        id="postfix-request",
    ),
    pytest.param(
        b"request=smtpd_access_policy\nsender=a@example.org\n\n"
        b"request=smtpd_access_policy\nsender=b@example.org\n\n",
        [
            req({"request": REQUEST_TYPE, "sender": "a@example.org"}),
            req({"request": REQUEST_TYPE, "sender": "b@example.org"}),
        ],
        id="two-requests",
    ),
    pytest.param(
        b"request=smtpd_access_policy\r\nsender=a@example.org\r\n\r\n",
        [req({"request": REQUEST_TYPE, "sender": "a@example.org"})],
        id="crlf",
    ),
    pytest.param(
        b"a=b\r\r\n\n",
        [req({"a": "b\r"})],
        id="only-one-cr-stripped",
    ),
    pytest.param(
        b"recipient=a@example.org\nrecipient=b@example.org\n\n",
        [req({"recipient": "b@example.org"})],
        id="repeated-attribute-last-wins",
    ),
    pytest.param(
        b"policy_context=a=b=c\n\n",
        [req({"policy_context": "a=b=c"})],
        id="value-with-equals",
    ),
    pytest.param(
        b"sender=\nqueue_id=\n\n",
        [req({"sender": "", "queue_id": ""})],
        id="empty-values",
    ),
    pytest.param(
        b"\n\r\n\nsender=a@example.org\n\n\n\nsender=b@example.org\n\n\n",
        [req({"sender": "a@example.org"}), req({"sender": "b@example.org"})],
        id="stray-blank-lines",
    ),
    pytest.param(
        b"request=smtpd_access_policy\ngarbage\n=value\nna\0me=x\nsender=s\n\n",
        [
            req(
                {"request": REQUEST_TYPE, "sender": "s"},
                "line 2: no '=' in b'garbage'",
                "line 3: empty name in b'=value'",
                "line 4: NUL in name in b'na\\x00me=x'",
            )
        ],
        id="malformed-lines",
    ),
    pytest.param(
        b"garbage\n\n",
        [req({}, "line 1: no '=' in b'garbage'")],
        id="only-malformed-line",
    ),
    pytest.param(
        b"x" * 500 + b"\n\n",
        [req({}, "line 1: no '=' in b'" + "x" * 177 + "...")],
        id="long-malformed-line-truncated",
    ),
    pytest.param(
        b"sender=caf\xc3\xa9@example.org\nhelo_name=bad\xff\xfe\n\n",
        [req({"sender": "caf\u00e9@example.org", "helo_name": "bad\ufffd\ufffd"})],
        id="utf8-and-invalid-bytes",
    ),
    pytest.param(
        b"sender=a\0b\x1b[31m\x7f\n\n",
        [req({"sender": "a\0b\x1b[31m\x7f"})],
        id="controls-in-value-kept",
    ),
    pytest.param(
        b"sender=a@example.org\n\nsender=partial@example.org\n",
        [req({"sender": "a@example.org"})],
        id="partial-request-at-eof-discarded",
    ),
    pytest.param(b"sender=a@exam", [], id="partial-line-at-eof-discarded"),
    pytest.param(b"", [], id="empty-stream"),
]


@pytest.mark.parametrize("chunk", CHUNK_SIZES)
@pytest.mark.parametrize(("data", "expected"), PARSE_CASES)
def test_parse(data: bytes, expected: list[PolicyRequest], chunk: int | None) -> None:
    outcome = parse(split(data, chunk))
    assert outcome.error is None
    assert outcome.requests == expected


LIMIT_CASES = [
    pytest.param(
        b"sender=" + b"x" * 100 + b"\n\n",
        {"max_line_length": 50},
        [],
        "line 1 longer than 50 bytes",
        id="line-too-long",
    ),
    pytest.param(
        b"sender=" + b"x" * 10_000,
        {"max_line_length": 50},
        [],
        "line 1 longer than 50 bytes",
        id="line-too-long-without-newline",
    ),
    pytest.param(
        b"sender=" + b"x" * 43 + b"\r\n\n",
        {"max_line_length": 50},
        [],
        "line 1 longer than 50 bytes",
        id="cr-counts-toward-line",
    ),
    pytest.param(
        b"sender=" + b"x" * 43 + b"\n\n",
        {"max_line_length": 50},
        [req({"sender": "x" * 43})],
        None,
        id="line-at-limit",
    ),
    pytest.param(
        b"a=b\n\n" + b"x=y\n" * 5 + b"\n",
        {"max_attributes": 4},
        [req({"a": "b"})],
        "more than 4 lines in request",
        id="too-many-attributes",
    ),
    pytest.param(
        b"a=b\n\n" + b"junk\n" * 5 + b"\n",
        {"max_attributes": 4},
        [req({"a": "b"})],
        "more than 4 lines in request",
        id="malformed-lines-count-too",
    ),
    pytest.param(
        b"x=y\n" * 4 + b"\n",
        {"max_attributes": 4},
        [req({"x": "y"})],
        None,
        id="attributes-at-limit",
    ),
    pytest.param(
        b"a=b\n\n" + b"x=yyyyyyy\n" * 10 + b"\n",
        {"max_request_size": 64},
        [req({"a": "b"})],
        "request larger than 64 bytes",
        id="request-too-large",
    ),
    pytest.param(
        b"x=yyyyyyy\n" * 6 + b"\r\n",  # 60 + 2 bytes, blank line included
        {"max_request_size": 62},
        [req({"x": "yyyyyyy"})],
        None,
        id="request-at-limit",
    ),
    pytest.param(
        b"x=yyyyyyy\n" * 6 + b"\r\n",
        {"max_request_size": 61},
        [],
        "request larger than 61 bytes",
        id="terminating-blank-line-counts",
    ),
    pytest.param(
        b"\n" * 1000 + b"a=b\n\n",
        {"max_request_size": 8},
        [req({"a": "b"})],
        None,
        id="stray-blank-lines-not-counted",
    ),
    pytest.param(
        (b"x=" + b"y" * 1000 + b"\n") * 100,  # 100 kB in fewer than 128 lines
        {},
        [],
        f"request larger than {RequestParser.max_request_size} bytes",
        id="endless-request-default-limit",
    ),
    pytest.param(
        b"x" * 100_000,
        {},
        [],
        f"line 1 longer than {RequestParser.max_line_length} bytes",
        id="endless-line-default-limit",
    ),
    pytest.param(
        b"x=y\n" + b"z" * 100,
        {"max_line_length": 50, "max_request_size": 30},
        [],
        "request larger than 30 bytes",
        id="size-trips-before-line",
    ),
    pytest.param(
        b"x" * 100,
        {"max_line_length": 50, "max_request_size": 50},
        [],
        "line 1 longer than 50 bytes",
        id="line-and-size-trip-together",
    ),
]


@pytest.mark.parametrize("chunk", CHUNK_SIZES)
@pytest.mark.parametrize(("data", "limits", "before", "error"), LIMIT_CASES)
def test_limits(
    data: bytes,
    limits: dict[str, int],
    before: list[PolicyRequest],
    error: str | None,
    chunk: int | None,
) -> None:
    outcome = parse(split(data, chunk), **limits)
    assert outcome.requests == before
    assert outcome.error == error
    if chunk is not None:
        # Whatever the peer sends, at most one request plus one chunk is held.
        limit = limits.get("max_request_size", RequestParser.max_request_size)
        assert outcome.peak_buffered <= limit + chunk


def test_feed_raises_when_no_request_waits() -> None:
    parser = RequestParser(max_line_length=10)
    with pytest.raises(RequestTooLarge, match="line 1 longer than 10 bytes"):
        parser.feed(b"x" * 11)
    assert parser.buffered == 0
    # Sticky: the connection is unusable from now on.
    with pytest.raises(RequestTooLarge):
        parser.next_request()
    with pytest.raises(RequestTooLarge):
        parser.feed(b"a=b\n\n")


def test_requests_before_the_error_come_first() -> None:
    parser = RequestParser(max_line_length=10)
    parser.feed(b"a=b\n\n" + b"x" * 11)  # no raise: a request is waiting
    assert parser.next_request() == req({"a": "b"})
    with pytest.raises(RequestTooLarge):
        parser.next_request()


def test_next_request_needs_data() -> None:
    parser = RequestParser()
    assert parser.next_request() is None
    parser.feed(b"sender=a@example.org\n")
    assert parser.next_request() is None
    assert parser.buffered == len(b"sender=a@example.org\n")
    parser.feed(b"\n")
    assert parser.buffered == len(b"sender=a@example.org\n\n")
    assert parser.next_request() == req({"sender": "a@example.org"})
    assert parser.buffered == 0
    assert parser.next_request() is None


def test_eof_discards_partial_request_and_refuses_more_data() -> None:
    parser = RequestParser()
    parser.feed(b"a=b\n\nsender=x\n")
    parser.feed_eof()
    assert parser.buffered == len(b"a=b\n\n")
    assert parser.next_request() == req({"a": "b"})
    assert parser.next_request() is None
    with pytest.raises(RuntimeError):
        parser.feed(b"\n")


@pytest.mark.parametrize(
    "limits",
    [
        pytest.param({"max_line_length": 0}, id="line"),
        pytest.param({"max_attributes": 0}, id="attributes"),
        pytest.param({"max_request_size": -1}, id="size"),
    ],
)
def test_limits_must_be_positive(limits: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        RequestParser(**limits)


def test_request_too_large_is_a_protocol_error() -> None:
    assert issubclass(RequestTooLarge, ProtocolError)


def test_policy_request_accessors() -> None:
    [request] = parse([POSTFIX_REQUEST]).requests
    assert request.request == REQUEST_TYPE
    assert request.protocol_state == "RCPT"
    assert request.helo_name == "mail.example.org"
    assert request.sender == "alice@example.org"
    assert request.recipient == "bob@example.net"
    assert request.client_address == "192.0.2.1"
    assert request.client_name == "mail.example.org"
    assert request.reverse_client_name == "mail.example.org"
    assert request.instance == "1a2b.5f3e8c1d.4e7a1.0"
    assert request.queue_id == ""
    assert request.recipient_count == "0"
    assert request.get("mail_version") == "3.8.1"
    assert request.get("missing") == ""
    assert request.get("missing", "default") == "default"


def test_policy_request_is_immutable_and_hashable() -> None:
    source = {"sender": "a@example.org"}
    request = PolicyRequest(source, ["w"])  # type: ignore[arg-type]
    source["sender"] = "changed"
    assert request.sender == "a@example.org"
    assert request.warnings == ("w",)
    with pytest.raises(TypeError):
        request.attributes["sender"] = "x"  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.warnings = ()  # type: ignore[misc]
    assert hash(request) == hash(PolicyRequest({"sender": "a@example.org"}, ("w",)))
    assert request == PolicyRequest({"sender": "a@example.org"}, ("w",))


RESPONSE_CASES = [
    pytest.param("DUNNO", b"action=DUNNO\n\n", id="plain"),
    pytest.param(
        "PREPEND Received-SPF: pass (mailfrom) identity=mailfrom",
        b"action=PREPEND Received-SPF: pass (mailfrom) identity=mailfrom\n\n",
        id="prepend",
    ),
    pytest.param("550 a\r\nb", b"action=550 a  b\n\n", id="crlf"),
    pytest.param("550 a\nb\n", b"action=550 a b \n\n", id="lf"),
    pytest.param("550 a\0b", b"action=550 a b\n\n", id="nul"),
    pytest.param("550 a\tb\x1b[0m\x7f", b"action=550 a b [0m \n\n", id="c0-and-del"),
    pytest.param("550 a\x85b\x9fc", b"action=550 a b c\n\n", id="c1"),
    pytest.param(
        "550 caf\u00e9 \u2603", "action=550 caf\u00e9 \u2603\n\n".encode(), id="non-ascii"
    ),
    pytest.param("550 \udcff x", b"action=550   x\n\n", id="lone-surrogate"),
    pytest.param("550 a\u2028b\u202ec", b"action=550 a b c\n\n", id="unicode-invisibles"),
    pytest.param(
        "550 " + "x" * 5000,
        b"action=550 " + b"x" * (MAX_RESPONSE_LINE - 11) + b"\n\n",
        id="long-ascii",
    ),
    pytest.param(
        # 7 + 2 * 1020 = 2047: the 1021st "é" would end past 2048 bytes.
        "\u00e9" * 2000,
        b"action=" + "\u00e9".encode() * 1020 + b"\n\n",
        id="long-cut-on-char-boundary",
    ),
]


@pytest.mark.parametrize(("action", "expected"), RESPONSE_CASES)
def test_encode_response(action: str, expected: bytes) -> None:
    assert encode_response(action) == expected
    assert len(expected) - 2 <= MAX_RESPONSE_LINE


@pytest.mark.parametrize("action", ["", "   ", "\r\n", "\0"])
def test_encode_response_refuses_empty_action(action: str) -> None:
    with pytest.raises(ValueError, match="empty action"):
        encode_response(action)


def test_encode_request() -> None:
    assert encode_request({"request": REQUEST_TYPE, "sender": "a=b"}) == (
        b"request=smtpd_access_policy\nsender=a=b\n\n"
    )
    pairs = [("recipient", "a@example.org"), ("recipient", "b@example.org")]
    data = encode_request(pairs)
    assert data == b"recipient=a@example.org\nrecipient=b@example.org\n\n"
    assert parse([data]).requests == [req({"recipient": "b@example.org"})]


@pytest.mark.parametrize(
    "attributes",
    [
        pytest.param({}, id="empty"),
        pytest.param({"": "x"}, id="empty-name"),
        pytest.param({"a=b": "x"}, id="equals-in-name"),
        pytest.param({"a\nb": "x"}, id="lf-in-name"),
        pytest.param({"a\0b": "x"}, id="nul-in-name"),
        pytest.param({"a": "x\ny"}, id="lf-in-value"),
        pytest.param({"a": "x\r"}, id="cr-in-value"),
        pytest.param({"a": "\udcff"}, id="surrogate"),
    ],
)
def test_encode_request_refuses_what_cannot_be_framed(attributes: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        encode_request(attributes)


@pytest.mark.parametrize("chunk", CHUNK_SIZES)
def test_response_parser(chunk: int | None) -> None:
    data = (
        encode_response("DUNNO")
        + b"action=550 5.7.23 a=b\r\n\r\n"
        + b"\n"  # stray blank line
        + b"foo=bar\naction=OK\n\n"
        + b"action=partial"
    )
    parser = ResponseParser()
    actions = []
    for piece in split(data, chunk):
        parser.feed(piece)
        while (action := parser.next_response()) is not None:
            actions.append(action)
    parser.feed_eof()
    assert parser.next_response() is None
    assert actions == ["DUNNO", "550 5.7.23 a=b", "OK"]


def test_response_parser_errors() -> None:
    parser = ResponseParser()
    parser.feed(b"foo=bar\n\n")
    with pytest.raises(ProtocolError, match="without action"):
        parser.next_response()
    small = ResponseParser(max_line_length=20)
    with pytest.raises(RequestTooLarge):
        small.feed(b"action=" + b"x" * 20)
    assert small.buffered == 0


# Properties. Bytes drawn from protocol-shaped fragments, so that requests,
# malformed lines and every limit come up, not only random noise.
FRAGMENTS = st.sampled_from(
    [b"a=b", b"sender=x@y", b"=", b"\n", b"\r", b"\r\n", b"\n\n", b"x", b"\0", b"\xff", b"y" * 17]
)
STREAMS = st.one_of(st.binary(max_size=300), st.lists(FRAGMENTS, max_size=80).map(b"".join))
LIMITS = st.fixed_dictionaries(
    {},
    optional={
        "max_line_length": st.integers(1, 40),
        "max_attributes": st.integers(1, 8),
        "max_request_size": st.integers(1, 120),
    },
)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[start:end] for start, end in itertools.pairwise(bounds)]


@settings(max_examples=300, deadline=None)
@given(data=STREAMS, points=st.lists(st.integers(0, 10_000), max_size=20), limits=LIMITS)
def test_property_chunking_does_not_matter(
    data: bytes, points: list[int], limits: dict[str, int]
) -> None:
    whole = parse([data], **limits)
    pieces = cut(data, points)
    assert b"".join(pieces) == data
    chunked = parse(pieces, **limits)
    assert chunked.requests == whole.requests
    assert chunked.error == whole.error
    bytewise = parse(split(data, 1), **limits)
    assert bytewise.requests == whole.requests
    assert bytewise.error == whole.error
    assert bytewise.peak_buffered <= limits.get("max_request_size", RequestParser.max_request_size)


NAMES = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="="), min_size=1
)
VALUES = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\r\n"))


@settings(max_examples=300, deadline=None)
@given(attributes=st.dictionaries(NAMES, VALUES, min_size=1, max_size=20))
def test_property_request_round_trip(attributes: dict[str, str]) -> None:
    data = encode_request(attributes)
    assert parse(split(data, 7)).requests == [PolicyRequest(attributes)]


def is_control(char: str) -> bool:
    """What encode_response blanks: C0/C1 controls and DEL, and beyond ASCII
    the invisible and line-breaking categories."""
    if ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0:
        return True
    return unicodedata.category(char) in INVISIBLE_CATEGORIES


@settings(max_examples=300, deadline=None)
@given(action=st.text())
def test_property_response_is_one_clean_line(action: str) -> None:
    try:
        data = encode_response(action)
    except ValueError:
        # Refused only when nothing but controls and whitespace was given.
        assert not "".join(" " if is_control(c) else c for c in action).strip()
        return
    assert data.startswith(b"action=")
    assert data.endswith(b"\n\n")
    line = data[:-2]
    assert len(line) <= MAX_RESPONSE_LINE
    assert not any(byte < 0x20 or byte == 0x7F for byte in line)
    text = line.decode("utf-8")  # never cut inside a character
    assert not any(is_control(c) for c in text)
    parser = ResponseParser()
    parser.feed(data)
    assert parser.next_response() == text.removeprefix("action=")
    assert parser.next_response() is None
