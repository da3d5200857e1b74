"""Postfix policy delegation protocol (SMTPD_POLICY_README): bytes in, requests out.

Sans-IO, after h11: ``RequestParser.feed()`` takes whatever the socket gave and
``next_request()`` hands back complete requests; ``encode_response()`` turns an
action into the bytes to write. Every buffer is bounded, and the limit a peer
trips is the same however its bytes were chunked.
"""

from __future__ import annotations

import unicodedata
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import repeat
from types import MappingProxyType

from spfpolicy.config import DEFAULTS

__all__ = [
    "MAX_RESPONSE_LINE",
    "REQUEST_TYPE",
    "PolicyRequest",
    "ProtocolError",
    "RequestParser",
    "RequestTooLarge",
    "ResponseParser",
    "encode_request",
    "encode_response",
]

# The only request type Postfix sends ("request=smtpd_access_policy").
REQUEST_TYPE = "smtpd_access_policy"

# Postfix bounds the lines it reads by line_length_limit (2048 by default);
# keeping "action=..." within it means no Postfix setting splits or refuses the
# reply. Text that long already becomes a multi-line SMTP reply.
MAX_RESPONSE_LINE = 2048

# Warnings end up in logs: show at most this much of an offending line.
_WARNING_LENGTH = 200

# C0 controls, DEL and C1 controls: any of them could end the reply line early
# (LF, CR), truncate it in C code (NUL) or mangle a terminal reading the log.
_CONTROLS = dict.fromkeys([*range(0x20), *range(0x7F, 0xA0)], " ")
# Beyond ASCII: line/paragraph separators (U+2028/9), format characters (bidi
# overrides, zero-width joiners, BOM) and lone surrogates. None ends a line
# for Postfix, but a mail reader or log viewer may break or reorder the text
# there, so they never leave the server either.
INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


class ProtocolError(Exception):
    """The peer broke the policy protocol; the connection cannot go on."""


class RequestTooLarge(ProtocolError):
    """A line, the attribute count or the request size exceeded its limit."""


@dataclass(frozen=True, slots=True)
class PolicyRequest:
    """One policy request: its attributes and what was wrong with its lines.

    ``attributes`` is a read-only copy; when a name repeats the last value wins,
    as in policyd-spf. ``warnings`` describe malformed lines, already made safe
    to log (printable ASCII, bounded length).
    """

    attributes: Mapping[str, str]
    warnings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Copy so a caller's later edits to its dict cannot change a request.
        object.__setattr__(self, "attributes", MappingProxyType(dict(self.attributes)))
        object.__setattr__(self, "warnings", tuple(self.warnings))

    @classmethod
    def of_dict(cls, attributes: dict[str, str]) -> PolicyRequest:
        """A request owning ``attributes``, a dict nobody else holds (no copy)."""
        request = object.__new__(cls)
        object.__setattr__(request, "attributes", MappingProxyType(attributes))
        object.__setattr__(request, "warnings", ())
        return request

    def __hash__(self) -> int:
        # The generated hash would hash the mapping proxy, which is unhashable.
        return hash((frozenset(self.attributes.items()), self.warnings))

    def get(self, name: str, default: str = "") -> str:
        return self.attributes.get(name, default)

    @property
    def request(self) -> str:
        return self.get("request")

    @property
    def protocol_state(self) -> str:
        return self.get("protocol_state")

    @property
    def helo_name(self) -> str:
        return self.get("helo_name")

    @property
    def sender(self) -> str:
        return self.get("sender")

    @property
    def recipient(self) -> str:
        return self.get("recipient")

    @property
    def client_address(self) -> str:
        return self.get("client_address")

    @property
    def client_name(self) -> str:
        return self.get("client_name")

    @property
    def reverse_client_name(self) -> str:
        return self.get("reverse_client_name")

    @property
    def instance(self) -> str:
        return self.get("instance")

    @property
    def queue_id(self) -> str:
        return self.get("queue_id")

    @property
    def recipient_count(self) -> str:
        return self.get("recipient_count")


class RequestParser:
    """Incremental parser: ``feed()`` bytes, then call ``next_request()`` until ``None``.

    Complete lines are parsed as they arrive, so only one partial line and one
    partial request are ever buffered besides requests not yet collected.
    A limit error is sticky; requests completed before it are returned first.
    """

    # Max_Line_Length, Max_Attributes, Max_Request_Size (the reasons for
    # the defaults are with them, in config.Settings).
    max_line_length = DEFAULTS.max_line_length
    max_attributes = DEFAULTS.max_attributes
    max_request_size = DEFAULTS.max_request_size

    def __init__(
        self,
        *,
        max_line_length: int = max_line_length,
        max_attributes: int = max_attributes,
        max_request_size: int = max_request_size,
    ) -> None:
        # At least 1, so a blank line between requests ("\n" or "\r\n") can
        # never trip a limit: it belongs to no request.
        for name, value in (
            ("max_line_length", max_line_length),
            ("max_attributes", max_attributes),
            ("max_request_size", max_request_size),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, not {value}")
        self.max_line_length = max_line_length
        self.max_attributes = max_attributes
        self.max_request_size = max_request_size
        self._partial = bytearray()  # the line whose "\n" has not arrived yet
        self._attributes: dict[str, str] = {}
        self._warnings: list[str] = []
        self._lines = 0  # non-blank lines of the request being read
        self._size = 0  # bytes of those lines, newlines included
        self._ready: deque[tuple[PolicyRequest, int]] = deque()  # with their sizes
        self._ready_bytes = 0
        self._error: RequestTooLarge | None = None
        self._eof = False

    @property
    def buffered(self) -> int:
        """Bytes received that no returned request has accounted for yet."""
        return self._ready_bytes + self._size + len(self._partial)

    def feed(self, data: bytes) -> None:
        """Take bytes from the peer; raises RequestTooLarge if they break a limit."""
        if self._eof:
            raise RuntimeError("feed() after feed_eof()")
        if self._error is None:
            self._receive(data)
        # Data after an error is dropped. Raise here unless complete requests
        # still wait: next_request() returns those first, then raises.
        if self._error is not None and not self._ready:
            raise self._error

    def feed_eof(self) -> None:
        """The peer closed its side; a partial request is discarded."""
        self._eof = True
        self._reset_request()

    def next_request(self) -> PolicyRequest | None:
        """The next complete request, or ``None`` if more data is needed."""
        if self._ready:
            request, size = self._ready.popleft()
            self._ready_bytes -= size
            return request
        if self._error is not None:
            raise self._error
        return None

    def _receive(self, data: bytes) -> None:
        pos = self._take_whole_requests(data) if not self._partial and not self._lines else 0
        while pos < len(data):
            newline = data.find(b"\n", pos)
            end = len(data) if newline < 0 else newline
            # Check before buffering, so an oversized line is never stored.
            length = len(self._partial) + end - pos
            error = self._limit_error(length, complete=newline >= 0)
            if error is not None:
                self._error = error
                self._reset_request()
                return
            self._partial += data[pos:end]
            if newline < 0:
                return
            line = bytes(self._partial)
            self._partial.clear()
            pos = newline + 1
            self._take_line(line)
            if self._error is not None:
                return

    def _take_whole_requests(self, data: bytes) -> int:
        """Fast path: complete, well-formed requests at the start of ``data``,
        parsed a block at a time; returns where the line-by-line path resumes.

        Only blocks that break no limit and hold no malformed line are taken
        here, so the result is exactly what the line-by-line path would give
        (UTF-8 decoding per block equals decoding per value: "=" and "\n"
        are ASCII, which always ends a byte sequence).
        """
        pos = 0
        while True:
            end = data.find(b"\n\n", pos)
            if end < 0 or data.startswith(b"\n", pos):
                return pos
            block = data[pos:end]
            if len(block) + 2 > self.max_request_size or b"\r" in block or b"\0" in block:
                return pos
            if len(block) > self.max_line_length and (
                max(map(len, block.split(b"\n"))) > self.max_line_length
            ):
                return pos
            lines = block.decode("utf-8", "replace").split("\n")
            if len(lines) > self.max_attributes:
                return pos
            try:
                # A line without "=" makes a 1-item pair: ValueError.
                attributes = dict(map(str.split, lines, repeat("="), repeat(1)))
            except ValueError:
                return pos
            if "" in attributes:  # an empty name
                return pos
            size = len(block) + 2
            self._ready.append((PolicyRequest.of_dict(attributes), size))
            self._ready_bytes += size
            pos = end + 2

    def _limit_error(self, length: int, *, complete: bool) -> RequestTooLarge | None:
        """The limit the current line breaks, as a byte-at-a-time reader would see it.

        Deciding by byte position (not by how much arrived at once) keeps the
        error the same however the data was chunked.
        """
        line_trip = self.max_line_length + 1  # line byte at which each limit trips
        size_trip = self.max_request_size - self._size + 1
        line_hit = length >= line_trip
        size_hit = length + int(complete) >= size_trip  # "\n" counts too
        if line_hit and (not size_hit or line_trip <= size_trip):
            return RequestTooLarge(
                f"line {self._lines + 1} longer than {self.max_line_length} bytes"
            )
        if size_hit:
            return RequestTooLarge(f"request larger than {self.max_request_size} bytes")
        return None

    def _take_line(self, raw: bytes) -> None:
        line = raw.removesuffix(b"\r")  # tolerate CRLF
        if not line:
            if self._lines:  # a stray blank line must not make an empty request
                self._size += len(raw) + 1
                self._finish_request()
            return
        self._lines += 1
        self._size += len(raw) + 1
        if self._lines > self.max_attributes:
            self._error = RequestTooLarge(f"more than {self.max_attributes} lines in request")
            self._reset_request()
            return
        # Split at the first "=": values may contain "=" themselves.
        name, equals, value = line.partition(b"=")
        if not equals:
            self._warn("no '='", line)
        elif not name:
            self._warn("empty name", line)
        elif b"\0" in name:
            self._warn("NUL in name", line)
        else:
            # U+FFFD for bad bytes: surrogateescape would carry lone surrogates
            # into code that encodes strictly (logging, the reply).
            self._attributes[name.decode("utf-8", "replace")] = value.decode("utf-8", "replace")

    def _warn(self, problem: str, line: bytes) -> None:
        # bytes repr is printable ASCII with escapes, hence safe to log; at
        # most _WARNING_LENGTH characters, "..." marking a cut.
        text = f"line {self._lines}: {problem} in {line[:_WARNING_LENGTH]!r}"
        if len(text) > _WARNING_LENGTH or len(line) > _WARNING_LENGTH:
            text = text[: _WARNING_LENGTH - 3] + "..."
        self._warnings.append(text)

    def _finish_request(self) -> None:
        request = PolicyRequest(self._attributes, tuple(self._warnings))
        self._ready.append((request, self._size))
        self._ready_bytes += self._size
        self._reset_request()

    def _reset_request(self) -> None:
        self._partial.clear()
        self._attributes = {}
        self._warnings = []
        self._lines = 0
        self._size = 0


class ResponseParser:
    """Client side: ``feed()`` the server's bytes, ``next_response()`` gives each action.

    A response has the request's syntax (``name=value`` lines, then a blank
    line), so it reuses RequestParser; attributes other than ``action`` are ignored.
    """

    max_line_length = RequestParser.max_line_length
    max_attributes = RequestParser.max_attributes
    max_response_size = RequestParser.max_request_size

    def __init__(
        self,
        *,
        max_line_length: int = max_line_length,
        max_attributes: int = max_attributes,
        max_response_size: int = max_response_size,
    ) -> None:
        self._blocks = RequestParser(
            max_line_length=max_line_length,
            max_attributes=max_attributes,
            max_request_size=max_response_size,
        )

    @property
    def buffered(self) -> int:
        return self._blocks.buffered

    def feed(self, data: bytes) -> None:
        self._blocks.feed(data)

    def feed_eof(self) -> None:
        self._blocks.feed_eof()

    def next_response(self) -> str | None:
        """The next action (the text after ``action=``), or ``None`` if more data is needed."""
        block = self._blocks.next_request()
        if block is None:
            return None
        if "action" not in block.attributes:
            raise ProtocolError(f"response without action: {sorted(block.attributes)!r}")
        return block.attributes["action"]


def encode_response(action: str) -> bytes:
    """``action=<action>`` plus the blank line that ends the reply.

    Control characters become spaces, so the text can never end the line or
    the reply early; non-ASCII is sent as UTF-8 (Postfix passes 8-bit text on
    with SMTPUTF8, and policyd-spf writes UTF-8 too). An empty action is
    always a bug of ours, hence ValueError.
    """
    text = action
    if not (text.isascii() and text.isprintable()):  # else nothing to replace
        text = text.translate(_CONTROLS)
        if not text.isascii():
            text = "".join(
                " " if unicodedata.category(c) in INVISIBLE_CATEGORIES else c for c in text
            )
    if not text.strip():
        raise ValueError(f"empty action: {action!r}")
    # "replace": a lone surrogate must not turn into an exception at write time.
    encoded = text.encode("utf-8", "replace")
    room = MAX_RESPONSE_LINE - len(b"action=")
    if len(encoded) > room:
        # Cut on a character boundary: "ignore" drops a partial last character.
        encoded = encoded[:room].decode("utf-8", "ignore").encode("utf-8")
    return b"action=" + encoded + b"\n\n"


def encode_request(attributes: Mapping[str, str] | Iterable[tuple[str, str]]) -> bytes:
    """A request as Postfix would send it, for the load generator and the tests.

    Raises ValueError for what the framing cannot carry: "\\n" or "\\r"
    anywhere (a trailing "\\r" is stripped as CRLF), "=" or NUL in a name,
    an empty name, or no attributes at all (a lone blank line is skipped).
    """
    pairs = attributes.items() if isinstance(attributes, Mapping) else attributes
    lines = []
    for name, value in pairs:
        if not name or any(c in name for c in "\n\r=\0"):
            raise ValueError(f"attribute name cannot be framed: {name!r}")
        if "\n" in value or "\r" in value:
            raise ValueError(f"value of {name} cannot be framed: {value!r}")
        lines.append(f"{name}={value}\n")
    if not lines:
        raise ValueError("a request needs at least one attribute")
    return "".join(lines).encode("utf-8") + b"\n"
