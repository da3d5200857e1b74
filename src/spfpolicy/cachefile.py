"""Cache_File: the DNS cache kept across a restart. Written on a clean stop,
read back at start, so a restarted server answers the domains it knew
without asking DNS again.

The format is our own framing (no pickle, no marshal: marshal is not meant
for data someone else may have written), read by a pure ``decode`` that
trusts nothing: a magic line, a version, a CRC-32 over the whole, and per
entry a query type, a name, the wall-clock expiry, the TTL and the records
in the shape the resolver uses for that type. Anything that does not fit
makes the whole file unusable (``CacheFileError``); the caller logs it and
starts cold. Expiry times are wall-clock times in the file, because the
monotonic clock the cache runs on starts over with the machine.

``save`` and ``restore`` do the file's I/O: a temporary file in the same
directory, fsync'ed and renamed over the old one (mode 0600); at start, a
file that is not a regular file of our own user, or that group or others
may write, is refused, as sshd refuses a key file others could have changed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import os
import stat
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["CacheFileError", "Entry", "decode", "encode", "restore", "save"]

log = logging.getLogger(__name__)

MAGIC = b"spfpolicy DNS cache\n"
VERSION = 1
# magic, version, flags (0), wall time written, entry count
_HEADER = struct.Struct(f"<{len(MAGIC)}sHHdI")
_TRAILER = struct.Struct("<I")  # CRC-32 of everything before it
# query type code, wall-clock expiry, TTL, record count; name length first
_ENTRY = struct.Struct("<BddH")
_U16 = struct.Struct("<H")
_U8 = struct.Struct("<B")

# The types the resolver keeps, by their code in the file (append only).
QTYPES = ("A", "AAAA", "MX", "PTR", "TXT")
_CODES = {qtype: code for code, qtype in enumerate(QTYPES)}

# Bounds on what a file may hold. A name is at most 255 octets on the wire
# (RFC 1035 section 2.3.4); as text, escapes and macro expansions included,
# 1024 bytes is ample (longer names are not kept). A TTL is at most 2^31 - 1
# seconds (RFC 2181 section 8). A record's text fits in a DNS message.
MAX_NAME = 1024
MAX_TTL = 2**31 - 1
MAX_TEXT = 65535
# Bytes a file may take per DNS_Cache_Size entry: a cache of SPF TXT records,
# A records and negative answers averages 100-200 bytes an entry; the oldest
# entries are left out beyond it.
BYTES_PER_ENTRY = 1024
_SMALLEST_ENTRY = _U16.size + _ENTRY.size


class CacheFileError(Exception):
    """The file is not a cache file we can use (damaged, foreign, too big)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One cached answer, as the file holds it."""

    name: str
    qtype: str
    records: tuple[Any, ...]
    ttl: float
    expires: float  # wall-clock time (time.time())


def size_limit(max_entries: int) -> int:
    """The largest file written or read for a cache of ``max_entries``."""
    return _HEADER.size + _TRAILER.size + max(1, max_entries) * BYTES_PER_ENTRY


# -- encoding ------------------------------------------------------------------


def _text(value: str) -> bytes:
    data = value.encode("utf-8", "surrogatepass")
    if len(data) > MAX_TEXT:
        raise ValueError("text too long")
    return _U16.pack(len(data)) + data


def _records(qtype: str, records: tuple[Any, ...]) -> bytes:
    """The records in the file's shape; ValueError when they are not of the
    shape the resolver gives ``qtype`` (such an entry is not written)."""
    if len(records) > 0xFFFF:
        raise ValueError("too many records")
    out = []
    for record in records:
        if qtype in ("A", "AAAA", "PTR"):
            if type(record) is not str:
                raise ValueError("not a str")
            out.append(_text(record))
        elif qtype == "MX":
            if type(record) is not tuple or len(record) != 2:
                raise ValueError("not an MX pair")
            preference, exchange = record
            if type(preference) is not int or type(exchange) is not str:
                raise ValueError("not an MX pair")
            out.append(_U16.pack(preference) + _text(exchange))
        else:  # TXT: a tuple of byte strings
            if type(record) is not tuple or len(record) > 0xFF:
                raise ValueError("not a TXT record")
            parts = [_U8.pack(len(record))]
            for part in record:
                if type(part) is not bytes or len(part) > MAX_TEXT:
                    raise ValueError("not a TXT record")
                parts.append(_U16.pack(len(part)) + part)
            out.append(b"".join(parts))
    return b"".join(out)


def encode(entries: Iterable[Entry], *, now: float, limit: int) -> tuple[bytes, int]:
    """The file for ``entries`` (oldest first, as they are read back) and how
    many it holds. Entries the file cannot hold are left out, and past
    ``limit`` bytes so are the oldest ones."""
    framed: list[bytes] = []
    budget = limit - _HEADER.size - _TRAILER.size
    for entry in reversed(list(entries)):  # newest first, so the oldest go
        code = _CODES.get(entry.qtype)
        ttl = entry.ttl
        if code is None or not (0 <= ttl <= MAX_TTL) or not math.isfinite(entry.expires):
            continue
        try:
            name = entry.name.encode("utf-8", "surrogatepass")
            if len(name) > MAX_NAME:
                continue
            body = _records(entry.qtype, entry.records)
        except (ValueError, struct.error):
            continue
        head = _U16.pack(len(name)) + name
        item = head + _ENTRY.pack(code, entry.expires, ttl, len(entry.records)) + body
        if len(item) > budget:
            break
        budget -= len(item)
        framed.append(item)
    framed.reverse()
    data = _HEADER.pack(MAGIC, VERSION, 0, now, len(framed)) + b"".join(framed)
    return data + _TRAILER.pack(zlib.crc32(data)), len(framed)


# -- decoding ------------------------------------------------------------------


class _Reader:
    """Bounds-checked reads from the file's bytes."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int) -> None:
        self.data = data
        self.pos = pos

    def take(self, size: int) -> bytes:
        end = self.pos + size
        if end > len(self.data):
            raise CacheFileError("truncated")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def unpack(self, layout: struct.Struct) -> tuple[Any, ...]:
        return layout.unpack(self.take(layout.size))

    def text(self, limit: int = MAX_TEXT) -> str:
        (size,) = self.unpack(_U16)
        if size > limit:
            raise CacheFileError("name too long")
        try:
            return self.take(size).decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise CacheFileError("bad text") from None


def _address(text: str, version: int) -> str:
    try:
        if ipaddress.ip_address(text).version == version:
            return text
    except ValueError:
        pass
    raise CacheFileError(f"bad IPv{version} address")


def _read_records(reader: _Reader, qtype: str, count: int) -> tuple[Any, ...]:
    records: list[Any] = []
    for _ in range(count):
        if qtype == "A":
            records.append(_address(reader.text(), 4))
        elif qtype == "AAAA":
            records.append(_address(reader.text(), 6))
        elif qtype == "PTR":
            records.append(reader.text(MAX_NAME))
        elif qtype == "MX":
            (preference,) = reader.unpack(_U16)
            records.append((preference, reader.text(MAX_NAME)))
        else:
            (parts,) = reader.unpack(_U8)
            records.append(tuple(reader.take(reader.unpack(_U16)[0]) for _ in range(parts)))
    return tuple(records)


def decode(data: bytes, *, limit: int) -> tuple[float, Iterator[Entry]]:
    """When the file was written, and its entries, oldest first, expired or
    not; raises CacheFileError for a file that is not one of ours (checked
    before any entry is read: its size, header and checksum) or, as the
    entries are read, for one that does not hold what it says."""
    if len(data) > limit:
        raise CacheFileError(f"larger than {limit} bytes")
    if len(data) < _HEADER.size + _TRAILER.size or not data.startswith(MAGIC):
        raise CacheFileError("not a spfpolicy cache file")
    _, version, flags, written, count = _HEADER.unpack_from(data)
    if version != VERSION or flags != 0:
        raise CacheFileError(f"format version {version}, not {VERSION}")
    body = len(data) - _TRAILER.size
    if _TRAILER.unpack_from(data, body)[0] != zlib.crc32(data[:body]):
        raise CacheFileError("checksum mismatch (damaged or truncated)")
    if not math.isfinite(written) or count * _SMALLEST_ENTRY > body - _HEADER.size:
        raise CacheFileError("bad header")
    return written, _entries(_Reader(data[:body], _HEADER.size), count)


def _entries(reader: _Reader, count: int) -> Iterator[Entry]:
    for _ in range(count):
        name = reader.text(MAX_NAME)
        code, expires, ttl, records = reader.unpack(_ENTRY)
        if code >= len(QTYPES):
            raise CacheFileError(f"unknown query type {code}")
        if not (0 <= ttl <= MAX_TTL) or not math.isfinite(expires):
            raise CacheFileError("bad TTL")
        qtype = QTYPES[code]
        if ttl.is_integer():
            ttl = int(ttl)  # as the resolver made it (TTLs are whole seconds)
        yield Entry(name, qtype, _read_records(reader, qtype, records), ttl, expires)
    if reader.pos != len(reader.data):
        raise CacheFileError("trailing bytes")


# -- the file ------------------------------------------------------------------


def save(path: str, entries: Iterable[Entry], *, max_entries: int, now: float) -> int:
    """Write ``entries`` to ``path`` atomically, mode 0600; how many were
    written. Raises OSError."""
    data, count = encode(entries, now=now, limit=size_limit(max_entries))
    directory, base = os.path.split(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as file:  # mkstemp: mode 0600
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    # The rename itself survives a crash once the directory is synced.
    directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)
    return count


def read(path: str, *, max_entries: int) -> bytes | None:
    """The file's bytes, or None when there is none; raises CacheFileError
    for a file we must not trust and OSError when it cannot be read."""
    try:
        # O_NOFOLLOW: not a link someone put there; O_NONBLOCK: a FIFO does
        # not hang the start (it is refused below).
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if os.path.islink(path):
            raise CacheFileError("a symbolic link") from None
        raise exc
    try:
        info = os.fstat(fd)  # of what was opened, not of what the name is now
        if not stat.S_ISREG(info.st_mode):
            raise CacheFileError("not a regular file")
        if info.st_uid != os.geteuid():
            raise CacheFileError(f"owned by uid {info.st_uid}, not by uid {os.geteuid()}")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise CacheFileError(f"writable by group or others (mode {info.st_mode & 0o777:04o})")
        limit = size_limit(max_entries)
        if info.st_size > limit:
            raise CacheFileError(f"larger than {limit} bytes")
        with os.fdopen(os.dup(fd), "rb") as file:
            return file.read(limit + 1)  # it may have grown since
    finally:
        os.close(fd)


def restore(
    path: str,
    store: Callable[[Entry, float], None],
    *,
    max_entries: int,
    now: float,
) -> tuple[int, int]:
    """Read ``path`` and ``store(entry, seconds_left)`` its live entries,
    oldest first and at most ``max_entries`` (the newest); (stored, expired).
    Nothing is stored from a file that turns out damaged: CacheFileError."""
    data = read(path, max_entries=max_entries)
    if data is None:
        return 0, 0
    _, entries = decode(data, limit=size_limit(max_entries))
    live: list[tuple[Entry, float]] = []
    expired = 0
    for entry in entries:  # all read before any is stored
        left = min(entry.expires - now, entry.ttl)
        if left > 0:
            live.append((entry, left))
        else:
            expired += 1
    kept = live[-max_entries:] if max_entries else []
    for entry, left in kept:
        store(entry, left)
    return len(kept), expired
