"""The shared cache: a second level in Redis, under the resolver's DNS cache
and under the SPF result cache, so that several MX hosts (or a restarted
one) learn each domain, and each check, once. Imported only when
Shared_Cache is set.

Rules:
- the resolver asks here after a first-level miss, inside its single-flight
  lookup, and writes here after a DNS answer; the checks (checks.py) do the
  same for SPF outcomes; nothing else talks to Redis;
- a DNS key is ``<Shared_Cache_Prefix>dns<FORMAT>:<type> <name>``; an SPF
  key is ``<Shared_Cache_Prefix>spf<FORMAT>:<hash>``, the hash a BLAKE2b of
  the check (client IP, sender, HELO, void limit), so that no sender address
  is written to Redis in clear;
- a value is a version byte then our own small binary encoding (no pickle,
  no marshal: whoever can write to Redis must not reach the interpreter),
  validated field by field when read; its Redis TTL is the entry's remaining
  TTL, read back with PTTL;
- reads wanted in one turn of the event loop go to Redis together, one
  script call (one round trip) for all of them; a key already being read is
  not read twice;
- it never costs an answer: each operation has Shared_Cache_Timeout, and an
  error, a timeout, a refused connection, a wrong password, an out-of-memory
  write or an entry that does not decode is a miss, counted, and logged once
  per outage; after a connection failure (or two timeouts without a
  success between them) Redis is left alone for a backoff (0.5 s doubling to 30 s),
  then tried again;
- writes never wait: they are queued, and a task sends them a moment
  later, after the answers that needed them, a batch per script call;
- where Redis refuses scripts (an ACL without @scripting), reads go as GET
  and PTTL, writes as SET, pipelined.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import hashlib
import logging
import select
import ssl
import struct
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import hiredis
import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from spfpolicy.results import NO_MAIL_RECORD, Identity, SpfOutcome, SpfResult

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# Bumped on any incompatible change of the key or value format: old entries
# are then simply not found (and a stray one fails the version byte).
FORMAT = 1
_VERSION = bytes([FORMAT])

# Entries larger than this are not written and read as a miss: a DNS reply
# is at most 64 KiB, and SPF's useful answers are far smaller.
MAX_ENTRY = 65536

# Writes queued and not yet sent; more are dropped (and counted) while Redis
# is slow, so the queue cannot grow without bound.
MAX_PENDING = 10_000
# Entries per write (one script call, or a pipeline of SETs). Writes go one
# batch after another, so their rate is at most WRITE_BATCH per round trip,
# and a round trip is as long as a turn of a busy loop: with 100, a host at
# 1,000 connections (40-50 ms a trip) filled the queue and dropped a quarter
# of its writes.
WRITE_BATCH = 500
READ_BATCH = 200  # keys per read trip
# Read trips out at once; more wanted reads wait to go together when one is
# back. Each holds a connection: a busy process opens no more than this many
# (plus one for writes), instead of making new ones while it is slowest.
MAX_READ_TRIPS = 2
MAX_IDLE = 4  # connections kept open between operations
WRITE_DELAY = 0.005  # seconds a write waits for company (batching)

BACKOFF_FIRST = 0.5  # seconds without Redis after the first failure
BACKOFF_MAX = 30.0
# Timeouts in a row (no success between them) that make an outage. A
# refused connection or a wrong password is one at once. A lone timeout is
# not: a Redis busy for a moment (a fork for a snapshot) costs the reads of
# that moment a miss, not the next half second of reads. A late event loop
# is no timeout at all (see _Deadline). A request can thus pay the deadline
# twice before Redis is left alone; a stopped or paused Redis no more.
TIMEOUTS_FOR_OUTAGE = 2

# Latency buckets of shared-cache operations, seconds: a loopback Redis
# answers in ~0.1 ms, a LAN one in well under 1 ms; the default deadline is 50 ms.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
)  # fmt: skip

_HEAD = struct.Struct("!BdH")  # version, ttl, record count
_U16 = struct.Struct("!H")
_MX = struct.Struct("!HH")  # preference, length of the exchange
_STR_TYPES = frozenset({"A", "AAAA", "PTR", "CNAME"})

Records = tuple[Any, ...]


class Undecodable(ValueError):
    """An entry that is not one of ours (garbage, another version, too large)."""


# -- the encoding -----------------------------------------------------------


def _text(value: str) -> bytes:
    data = value.encode("utf-8", "surrogateescape")
    return _U16.pack(len(data)) + data


def encode(qtype: str, ttl: float, records: Records) -> bytes:
    """An answer's value: version, ttl, count, then the records by type.
    Raises ValueError for records this encoding does not know."""
    parts = [_HEAD.pack(FORMAT, ttl, len(records))]
    for record in records:
        if qtype in _STR_TYPES:
            parts.append(_text(record))
        elif qtype == "MX":
            preference, exchange = record
            data = exchange.encode("utf-8", "surrogateescape")
            parts.append(_MX.pack(preference, len(data)) + data)
        elif qtype == "TXT":
            parts.append(bytes([len(record)]))
            parts.extend(_U16.pack(len(chunk)) + bytes(chunk) for chunk in record)
        else:
            raise ValueError(f"no encoding for {qtype}")
    return b"".join(parts)


def decode(qtype: str, data: bytes) -> tuple[float, Records]:
    """(ttl, records) of a value ``encode`` wrote; raises Undecodable."""
    if len(data) > MAX_ENTRY:
        raise Undecodable("too large")
    try:
        version, ttl, count = _HEAD.unpack_from(data)
        if version != FORMAT:
            raise Undecodable(f"format {version}")
        at = _HEAD.size
        records: list[Any] = []
        for _ in range(count):
            if qtype in _STR_TYPES:
                (size,) = _U16.unpack_from(data, at)
                at += _U16.size
                records.append(_read(data, at, size).decode("utf-8", "surrogateescape"))
                at += size
            elif qtype == "MX":
                preference, size = _MX.unpack_from(data, at)
                at += _MX.size
                exchange = _read(data, at, size).decode("utf-8", "surrogateescape")
                records.append((preference, exchange))
                at += size
            elif qtype == "TXT":
                chunks = []
                strings = data[at]
                at += 1
                for _ in range(strings):
                    (size,) = _U16.unpack_from(data, at)
                    at += _U16.size
                    chunks.append(_read(data, at, size))
                    at += size
                records.append(tuple(chunks))
            else:
                raise Undecodable(f"type {qtype}")
    except (struct.error, IndexError, UnicodeError) as exc:
        raise Undecodable(str(exc)) from None
    if at != len(data) or not ttl >= 0:
        raise Undecodable("trailing bytes or a bad ttl")
    return ttl, tuple(records)


def _read(data: bytes, at: int, size: int) -> bytes:
    chunk = data[at : at + size]
    if len(chunk) != size:
        raise Undecodable("truncated")
    return chunk


# -- SPF outcomes -------------------------------------------------------------

# An outcome is stored as decisions read it (checks._for_decisions): the
# result, pyspf's code, the identity checked, whether the domain's own record
# is the no-mail one, the explanation and the deciding mechanism. A
# temperror is never stored. Everything is checked when read: an entry is
# only as trustworthy as whoever can write to Redis.
_OUTCOME = struct.Struct("!BBHBB")  # version, result, code, identity, flags
_RESULTS = tuple(SpfResult)
_STORED_RESULTS = frozenset(SpfResult) - {SpfResult.TEMPERROR}
_IDENTITIES = tuple(Identity)
_CODES = frozenset({250, 550})  # pyspf's codes of every result but temperror
_NO_MAIL = 1  # flags: the checked domain publishes NO_MAIL_RECORD
MAX_TEXT = 2048  # bytes of an explanation or a mechanism
_CONTROL = frozenset(range(32)) | {127}


def check_key(ip: str, sender: str, helo: str, void_limit: int) -> bytes:
    """The hashed name of a check: 16 bytes of BLAKE2b over its parts, each
    length-prefixed (so no two checks share a name), in hex."""
    parts = []
    for part in (ip, sender, helo, str(void_limit)):
        data = part.encode("utf-8", "surrogateescape")
        parts.append(_U16.pack(len(data) & 0xFFFF))
        parts.append(data)
    # One update of the joined parts: the same digest as one per part.
    digest = hashlib.blake2b(b"".join(parts), digest_size=16, person=b"spfpolicy-check")
    return digest.hexdigest().encode("ascii")


def _clean_text(value: str) -> bytes:
    data = value.encode("utf-8")
    if len(data) > MAX_TEXT or _CONTROL.intersection(data):
        raise ValueError("text not storable")
    return data


def encode_outcome(outcome: SpfOutcome) -> bytes:
    """The value of an outcome; ValueError for one that is not stored (a
    temperror, control characters, texts too long)."""
    if outcome.result not in _STORED_RESULTS or outcome.code not in _CODES:
        raise ValueError(f"{outcome.result} {outcome.code} is not stored")
    explanation = _clean_text(outcome.explanation)
    mechanism = _clean_text(outcome.mechanism)
    head = _OUTCOME.pack(
        FORMAT,
        _RESULTS.index(outcome.result),
        outcome.code,
        _IDENTITIES.index(outcome.identity),
        _NO_MAIL if outcome.record == NO_MAIL_RECORD else 0,
    )
    return b"".join(
        (head, _U16.pack(len(explanation)), explanation, _U16.pack(len(mechanism)), mechanism)
    )


def decode_outcome(data: bytes) -> SpfOutcome:
    """The outcome ``encode_outcome`` wrote; raises Undecodable."""
    try:
        version, result, code, identity, flags = _OUTCOME.unpack_from(data)
        if version != FORMAT:
            raise Undecodable(f"format {version}")
        at = _OUTCOME.size
        (size,) = _U16.unpack_from(data, at)
        explanation = _read(data, at + 2, size)
        at += 2 + size
        (size,) = _U16.unpack_from(data, at)
        mechanism = _read(data, at + 2, size)
        at += 2 + size
        if at != len(data) or result >= len(_RESULTS) or identity >= len(_IDENTITIES):
            raise Undecodable("trailing bytes or a value out of range")
        spf_result = _RESULTS[result]
        if spf_result not in _STORED_RESULTS or code not in _CODES or flags & ~_NO_MAIL:
            raise Undecodable(f"{spf_result} {code} flags {flags}")
        texts = (explanation, mechanism)
        if any(len(t) > MAX_TEXT or _CONTROL.intersection(t) for t in texts):
            raise Undecodable("text too long or with control characters")
        return SpfOutcome(
            spf_result,
            code,
            explanation.decode("utf-8"),
            mechanism=mechanism.decode("utf-8"),
            identity=_IDENTITIES[identity],
            record=NO_MAIL_RECORD if flags & _NO_MAIL else "",
        )
    except (struct.error, UnicodeError) as exc:
        raise Undecodable(str(exc)) from None


# -- the client -------------------------------------------------------------


@dataclass(slots=True)
class SharedStats:
    """Counters for the metrics and the stats line; monotonic. ``hits``,
    ``misses``, ``undecodable`` and ``writes`` are of DNS answers; their
    ``result_`` twins of SPF outcomes."""

    hits: int = 0
    misses: int = 0  # every lookup not answered here (the errors included)
    errors: int = 0  # operations that failed or timed out
    timeouts: int = 0  # of those, timeouts
    undecodable: int = 0  # entries that did not decode (read as misses)
    skipped: int = 0  # lookups not tried: Redis in its backoff
    writes: int = 0  # entries sent
    write_errors: int = 0  # entries refused or lost (OOM, outage)
    writes_dropped: int = 0  # entries not sent: queue full or Redis in backoff
    outages: int = 0
    result_hits: int = 0
    result_misses: int = 0
    result_undecodable: int = 0
    result_writes: int = 0
    read_batches: int = 0  # round trips of reads (many keys each under load)
    read_keys: int = 0  # keys they read
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0

    def timed(self, seconds: float) -> None:
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds


# What a read gives: the value and its remaining time in milliseconds; None
# for a miss, a failure, or an entry of another Redis type (junk).
_Found = tuple[bytes, int] | None
# Where the counts of a read joined by a second caller go: nowhere read.
_JOINED = SharedStats()

# Reads: each key's value and remaining time, by one script call per batch.
# A key of another type gives its error in place (pcall), not the batch's; a
# missing key's GET is Lua false, so the table has no holes.
_READ_SCRIPT = (
    "local r = {} for i, k in ipairs(KEYS) do "
    "r[2 * i - 1] = redis.pcall('GET', k) r[2 * i] = redis.pcall('PTTL', k) end return r"
)
_READ_SHA = hashlib.sha1(_READ_SCRIPT.encode("ascii")).hexdigest()

# Writes: a batch's SETs (each with its PX) by one script call, one reply
# for the batch instead of one per SET (redis-py reads a reply in about 5 us:
# an entry written cost 8-12 us of CPU in a pipeline of SETs, 3-5 this way,
# benchmarks/shared_writes.py).
# Each SET's error is its own (pcall): the reply is the first error's text
# ("" when none) and the positions of the refused entries. A Redis over
# maxmemory with noeviction refuses the whole call (OOM), as it would every
# SET of a pipeline.
_WRITE_SCRIPT = (
    "local r = {''} for i, k in ipairs(KEYS) do "
    "local w = redis.pcall('SET', k, ARGV[2 * i - 1], 'PX', ARGV[2 * i]) "
    "if type(w) == 'table' and w.err then "
    "if r[1] == '' then r[1] = w.err end r[#r + 1] = i end end return r"
)
_WRITE_SHA = hashlib.sha1(_WRITE_SCRIPT.encode("ascii")).hexdigest()

# A key of another Redis type under our prefix (WRONGTYPE): junk, which the
# callers' PTTL check counts as undecodable.
_JUNK = (b"", -3)


GRACE_TURNS = 8  # turns of the loop a reply already in our socket gets

# redis-py's asyncio connection packs commands in Python, a sixth of the
# shared cache's CPU under load (py-spy, zipf); hiredis, the parser it reads replies with,
# packs them in C into the same bytes (tests/test_shared_cache.py holds them
# equal), 0.1 against 0.8 us per key of a read. Where an older hiredis has no
# packer, redis-py's is used.
_PACK = getattr(hiredis, "pack_command", None)


def _packed(conn: Any, *commands: tuple[Any, ...]) -> Any:
    """``commands`` in the Redis protocol, for ``send_packed_command``."""
    if _PACK is None:
        return conn.pack_commands(commands)
    return b"".join([_PACK(command) for command in commands])


def write_results(reply: Any, count: int) -> list[Any]:
    """Per entry of a scripted write of ``count`` entries, None, or the
    error with which Redis refused it; ResponseError for a reply that is
    not the script's."""
    if not (isinstance(reply, list) and reply and isinstance(reply[0], bytes)):
        raise redis.exceptions.ResponseError(f"the write script gave {reply!r:.60}")
    results: list[Any] = [None] * count
    if len(reply) > 1:
        error = redis.exceptions.ResponseError(reply[0].decode("utf-8", "replace"))
        for position in reply[1:]:
            if type(position) is not int or not 0 < position <= count:
                raise redis.exceptions.ResponseError(f"the write script gave {reply!r:.60}")
            results[position - 1] = error
    return results


class _Op:
    """One round trip to Redis, as its deadline sees it: the connection
    (once taken from the pool) and when the command was sent."""

    __slots__ = ("conn", "reused", "sent")

    def __init__(self) -> None:
        self.conn: Any = None
        self.reused = False  # the connection was kept from an earlier operation
        self.sent: float | None = None  # loop time

    def reply_waiting(self) -> bool:
        return self.conn is not None and _reply_waiting(self.conn)


class _Deadline:
    """``asyncio.timeout`` for one round trip, measuring Redis's time, not
    this process's. At the deadline: if Redis's reply is already waiting in
    our socket, the event loop was late, not Redis (uvloop runs its due
    timers before it reads its sockets), and the operation gets a few more
    turns of the loop to read it; if the command went out late (a busy loop
    took long to send it), Redis gets its full time from the sending, once.
    A Redis that has not answered in that time costs the deadline and no
    more."""

    def __init__(self, seconds: float, op: _Op) -> None:
        self.seconds = seconds
        self.op = op
        self.expired = False
        self._task: asyncio.Task[Any] | None = None
        self._handle: asyncio.Handle | None = None
        self._extended = False

    async def __aenter__(self) -> _Deadline:
        self._task = asyncio.current_task()
        self._handle = asyncio.get_running_loop().call_later(self.seconds, self._expire, 0)
        return self

    def _expire(self, turns: int) -> None:
        assert self._task is not None
        loop = asyncio.get_running_loop()
        if turns < GRACE_TURNS and self.op.reply_waiting():
            self._handle = loop.call_soon(self._expire, turns + 1)
            return
        sent = self.op.sent
        if not self._extended and sent is not None and loop.time() < sent + self.seconds:
            self._extended = True
            self._handle = loop.call_at(sent + self.seconds, self._expire, 0)
            return
        self.expired = True
        self._task.cancel()

    async def __aexit__(self, kind: type[BaseException] | None, exc: Any, tb: Any) -> None:
        assert self._task is not None and self._handle is not None
        self._handle.cancel()
        if self.expired and kind is asyncio.CancelledError and self._task.uncancel() == 0:
            raise TimeoutError("Shared_Cache_Timeout") from exc


MAX_CHECK_KEYS = 4096  # hashed check keys kept (SharedCache._check_key)

# Decoded SPF values by their bytes: a value read again (by a second caller
# of the same trip, or for another check with the same outcome) is not
# decoded again, and equal values are one (frozen) outcome. Cleared when
# full; an undecodable value is not kept.
MAX_DECODED = 4096
_DECODED: dict[bytes, SpfOutcome] = {}


def _outcome_of(found: tuple[bytes, int]) -> tuple[SpfOutcome, float] | None:
    """(outcome, remaining seconds) of a read SPF entry; None if it does not decode."""
    data, remaining_ms = found
    if remaining_ms <= 0:  # -1: no expiry, which no entry of ours lacks; -2: expired
        log.debug("shared cache: an SPF entry does not decode: PTTL %s", remaining_ms)
        return None
    outcome = _DECODED.get(data)
    if outcome is None:
        try:
            outcome = decode_outcome(data)
        except Undecodable as exc:
            log.debug("shared cache: an SPF entry does not decode: %s", exc)
            return None
        if len(_DECODED) >= MAX_DECODED:
            _DECODED.clear()
        _DECODED[data] = outcome
    return outcome, remaining_ms / 1000


def _deliver(found: _Found, *, arrived: Callable[[SpfOutcome, float], None]) -> None:
    outcome = None if found is None else _outcome_of(found)
    if outcome is not None:
        arrived(*outcome)


def _counted(
    found: _Found,
    *,
    stats: SharedStats,
    arrived: Callable[[SpfOutcome, float], None],
    missed: Callable[[], None],
) -> None:
    """want_outcome's hook: the read counted, then ``arrived`` or ``missed``."""
    outcome = None if found is None else _outcome_of(found)
    if outcome is None:
        if found is not None:
            stats.result_undecodable += 1
        stats.result_misses += 1
        missed()
    else:
        stats.result_hits += 1
        arrived(*outcome)


async def _disconnect(conn: Any) -> None:
    with contextlib.suppress(redis.exceptions.RedisError, OSError):
        await conn.disconnect(nowait=True)


def _reply_waiting(conn: Any) -> bool:
    """Whether bytes from Redis wait for us: read by the transport but not
    parsed yet, or still in the kernel's socket buffer. False when unsure.
    The one place that reads private names (redis-py's ``_reader`` and
    ``_writer``, asyncio's ``StreamReader._buffer``); tests/test_shared_results.py
    names any of them an upgrade removes."""
    try:
        reader, writer = conn._reader, conn._writer
        if reader is None or writer is None:
            return False
        if len(reader._buffer):
            return True
        sock = writer.transport.get_extra_info("socket")
        return sock is not None and bool(select.select([sock], [], [], 0)[0])
    except (AttributeError, OSError, ValueError, TypeError):
        return False


class SharedCache:
    """DNS answers and SPF outcomes in Redis; every failure is a miss."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "spfpolicy:",
        timeout: float = 0.05,
        password: str | None = None,
        ca_file: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.prefix = prefix.encode("utf-8")
        self.timeout = timeout
        self.clock = clock
        self.stats = SharedStats()
        options: dict[str, Any] = {}
        if password is not None and not urllib.parse.urlsplit(url).password:
            options["password"] = password
        if ca_file and urllib.parse.urlsplit(url).scheme == "rediss":
            options["ssl_ca_certs"] = ca_file
        self.client = redis.asyncio.Redis.from_url(
            url,
            **options,
            # Our own deadline bounds every operation; redis-py must not
            # retry inside it.
            socket_connect_timeout=max(timeout, 1.0),
            socket_timeout=None,
            retry=Retry(NoBackoff(), 0),
            max_connections=64,
        )
        self._down_since: float | None = None  # the outage's start, if in one
        self._retry_at = 0.0
        self._backoff = 0.0
        self._timeouts_in_row = 0
        self._write_refused = False  # an OOM (or other) write error logged
        self._pending: list[tuple[bytes, bytes, int, bool]] = []
        self._flusher: asyncio.Task[None] | None = None
        # Reads wanted in this turn of the loop, and every read in flight.
        self._wanted: list[bytes] = []
        self._check_keys: dict[tuple[str, str, str, int], bytes] = {}
        self._reading: dict[bytes, asyncio.Future[_Found]] = {}
        # Called with a key's value as its trip comes back (get_outcome's arrived).
        self._arrivals: dict[bytes, list[Callable[[_Found], None]]] = {}
        self._readers: set[asyncio.Future[Any]] = set()  # reads, connects, releases
        self._scripts = True  # reads by script, until Redis refuses one
        self._trips = 0  # read trips out
        self._idle: list[Any] = []  # connected connections, ready for an operation
        self._connections: set[Any] = set()  # every connection of ours (for close)
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Any) -> SharedCache:
        """The cache Shared_Cache* describe; OSError (naming the file) if the
        password file or the CA file cannot be read, or the CA file holds no
        certificate."""
        if settings.shared_cache_ca_file:
            try:
                ssl.create_default_context(cafile=settings.shared_cache_ca_file)
            except ssl.SSLError as exc:
                reason = f"no CA certificate ({exc.reason})"
                raise OSError(0, reason, settings.shared_cache_ca_file) from None
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, settings.shared_cache_ca_file) from None
        password = None
        if settings.shared_cache_password_file:
            text = Path(settings.shared_cache_password_file).read_text(encoding="utf-8")
            password = text.strip("\r\n")
        return cls(
            settings.shared_cache,
            prefix=settings.shared_cache_prefix,
            timeout=settings.shared_cache_timeout,
            password=password,
            ca_file=settings.shared_cache_ca_file,
        )

    def describe(self) -> str:
        """The URL without its password, for the log."""
        url = urllib.parse.urlsplit(self.url)
        if url.password is None:
            return self.url
        host = url.netloc.rpartition("@")[2]
        user = f"{url.username}:***@" if url.username else ":***@"
        return urllib.parse.urlunsplit(url._replace(netloc=user + host))

    @property
    def down(self) -> bool:
        """Whether Redis is in an outage (the last connection failed)."""
        return self._down_since is not None

    def counters(self) -> dict[str, Any]:
        stats = self.stats
        counters: dict[str, Any] = {
            name: getattr(stats, name)
            for name in stats.__slots__
            if name not in ("latency_counts", "latency_sum")
        }
        counters["down"] = int(self.down)
        counters["latency_counts"] = list(stats.latency_counts)
        counters["latency_sum"] = stats.latency_sum
        return counters

    def _key(self, name: str, qtype: str) -> bytes:
        return self.prefix + f"dns{FORMAT}:{qtype} {name}".encode("utf-8", "surrogateescape")

    def _check_key(self, ip: str, sender: str, helo: str, void_limit: int) -> bytes:
        # A check's key is wanted two or three times (the prefetch's read,
        # the check's, a write): hashed once. Cleared when full.
        parts = (ip, sender, helo, void_limit)
        key = self._check_keys.get(parts)
        if key is None:
            key = self.prefix + b"spf%d:" % FORMAT + check_key(ip, sender, helo, void_limit)
            if len(self._check_keys) >= MAX_CHECK_KEYS:
                self._check_keys.clear()
            self._check_keys[parts] = key
        return key

    # -- reads --------------------------------------------------------------

    async def get(self, name: str, qtype: str) -> tuple[float, Records, float] | None:
        """(ttl, records, remaining seconds) of a stored answer, or None."""
        stats = self.stats
        found, counted = await self._read(self._key(name, qtype))
        if not counted:
            stats = _JOINED  # a joined read: the starter counts it
        if found is None:
            stats.misses += 1
            return None
        try:
            data, remaining_ms = found
            if remaining_ms <= 0:
                # -1: no expiry, which no entry of ours lacks; -2: just expired.
                raise Undecodable(f"PTTL {remaining_ms}")
            ttl, records = decode(qtype, data)
        except Undecodable as exc:
            stats.undecodable += 1
            stats.misses += 1
            log.debug("shared cache: entry %s %s does not decode: %s", qtype, name, exc)
            return None
        stats.hits += 1
        return ttl, records, remaining_ms / 1000

    async def get_outcome(
        self,
        ip: str,
        sender: str,
        helo: str,
        void_limit: int,
        *,
        arrived: Callable[[SpfOutcome, float], None] | None = None,
    ) -> tuple[SpfOutcome, float] | None:
        """(outcome, remaining seconds) of a stored SPF check, or None.
        ``arrived`` gets a found outcome as soon as its trip comes back,
        before any waiting task runs again: a request whose next check was
        read in the same trip then finds it already kept."""
        stats = self.stats
        key = self._check_key(ip, sender, helo, void_limit)
        hook = None if arrived is None else functools.partial(_deliver, arrived=arrived)
        found, counted = await self._read(key, hook)
        if not counted:
            stats = _JOINED  # a joined read: the starter counts it
        if found is None:
            stats.result_misses += 1
            return None
        outcome = _outcome_of(found)
        if outcome is None:
            stats.result_undecodable += 1
            stats.result_misses += 1
            return None
        stats.result_hits += 1
        return outcome

    def want_outcome(
        self,
        ip: str,
        sender: str,
        helo: str,
        void_limit: int,
        *,
        arrived: Callable[[SpfOutcome, float], None],
        missed: Callable[[], None],
    ) -> bool:
        """Read a stored SPF check with this turn's other reads, without a
        task waiting for it: ``arrived`` gets a found outcome, ``missed`` is
        called for a miss, a failure or an undecodable entry, both as the
        trip comes back, before any waiting task runs again. Counted as
        get_outcome counts; a read joined while another caller's is in
        flight counts nothing. False, with neither called, while Redis is
        in its backoff (nothing is read: the caller goes on as for a miss)."""
        key = self._check_key(ip, sender, helo, void_limit)
        future, started = self._want(key)
        if future is None:  # in the backoff: counted as skipped
            self.stats.result_misses += 1
            return False
        stats = self.stats if started else _JOINED
        hook = functools.partial(_counted, stats=stats, arrived=arrived, missed=missed)
        self._arrivals.setdefault(key, []).append(hook)
        return True

    def _want(self, key: bytes) -> tuple[asyncio.Future[_Found] | None, bool]:
        """The read of ``key`` in flight, and whether this call started it
        (none was); None while Redis is in its backoff (counted as skipped,
        nothing read)."""
        future = self._reading.get(key)
        if future is not None:
            return future, False
        if self._down_since is not None and self.clock() < self._retry_at:
            self.stats.skipped += 1
            return None, True
        future = asyncio.get_running_loop().create_future()
        self._reading[key] = future
        if not self._wanted and self._trips < MAX_READ_TRIPS:
            asyncio.get_running_loop().call_soon(self._send_reads)
        self._wanted.append(key)
        return future, True

    async def _read(
        self, key: bytes, hook: Callable[[_Found], None] | None = None
    ) -> tuple[_Found, bool]:
        """The value and PTTL of ``key`` (None for a miss or a failure),
        read with the others wanted in this turn of the loop, in one round
        trip; and whether this caller started the read (and counts it): a
        caller that joins a read of the same key counts nothing."""
        future, started = self._want(key)
        if future is None:
            return None, True
        if hook is not None:
            self._arrivals.setdefault(key, []).append(hook)
        # shield: one waiter giving up must not cancel the read for the others.
        return await asyncio.shield(future), started

    def _send_reads(self) -> None:
        """Send the wanted reads, unless MAX_READ_TRIPS are out already:
        then they go together when one comes back (a busy process sends
        fewer, larger trips, and needs no more connections)."""
        while self._wanted and self._trips < MAX_READ_TRIPS:
            batch, self._wanted = self._wanted[:READ_BATCH], self._wanted[READ_BATCH:]
            self._trips += 1
            trip = asyncio.ensure_future(self._read_batch(batch))
            self._readers.add(trip)
            trip.add_done_callback(functools.partial(self._trip_done, batch))

    def _trip_done(self, batch: list[bytes], task: asyncio.Future[bool]) -> None:
        self._readers.discard(task)
        self._trips -= 1
        if task.cancelled():
            # Cancelled before it ran (close): its reads still end, as misses
            # (a read settled already is not there to settle again).
            self._settle(batch, [None] * len(batch))
        if not self._wanted:
            return
        if self._closed or task.cancelled() or not task.result():
            # Redis did not answer this trip (or we close): the reads that
            # waited for it do not go; each has waited a deadline at most.
            wanted, self._wanted = self._wanted, []
            self.stats.skipped += len(wanted)
            self._settle(wanted, [None] * len(wanted))
            return
        self._send_reads()

    async def _read_batch(self, keys: list[bytes]) -> bool:
        """Read ``keys`` in one trip and settle their reads; whether Redis answered."""
        stats = self.stats
        stats.read_batches += 1
        stats.read_keys += len(keys)
        found: list[_Found] = [None] * len(keys)
        started = time.perf_counter()
        op = _Op()
        try:
            async with _Deadline(self.timeout, op):
                replies = await self._again_if_stale(op, lambda: self._get_with_pttl(keys, op))
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            stats.timed(time.perf_counter() - started)
            self._failed(exc)
            return False
        else:
            stats.timed(time.perf_counter() - started)
            failure = None
            for i in range(len(keys)):
                data, remaining_ms = replies[2 * i], replies[2 * i + 1]
                if isinstance(data, redis.exceptions.ResponseError):
                    if "WRONGTYPE" in str(data):
                        found[i] = _JUNK
                    else:  # NOAUTH, NOPERM, ...
                        failure = data
                elif isinstance(data, bytes) and isinstance(remaining_ms, int):
                    found[i] = (data, remaining_ms)
            if failure is None:
                self._recovered()
            else:
                self._failed(failure)
            return failure is None
        finally:
            self._settle(keys, found)

    def _settle(self, keys: list[bytes], found: list[_Found]) -> None:
        """Give the reads of ``keys`` their values: first every arrival
        hook (synchronously, before any waiting task runs again), then the
        waiters. The reads are over before the first hook runs: a hook
        that wants one of these keys again starts a new read, rather than
        joining one whose hooks have been called."""
        arrivals, reading = self._arrivals, self._reading
        futures = [reading.pop(key, None) for key in keys]
        hooks = [arrivals.pop(key, ()) for key in keys]
        for value, hooked in zip(found, hooks, strict=True):
            for hook in hooked:
                try:
                    hook(value)
                except Exception:  # a hook's bug must not leave the waiters waiting
                    log.exception("shared cache: a read's hook failed")
        for future, value in zip(futures, found, strict=True):
            if future is not None and not future.done():
                future.set_result(value)

    async def _get_with_pttl(self, keys: list[bytes], op: _Op) -> list[Any]:
        """[value, PTTL, value, PTTL, ...] of ``keys``, in one round trip:
        one script call (one command to pack and one reply to parse, however
        many keys), or, where Redis refuses scripts, GET and PTTL pipelined."""
        if self._scripts:
            replies = await self._script(
                op, _READ_SCRIPT, _READ_SHA, keys, [], instead="reads go as GET and PTTL"
            )
            if replies is not None:
                if isinstance(replies, list) and len(replies) == 2 * len(keys):
                    return replies
                raise redis.exceptions.ResponseError(f"the read script gave {replies!r:.60}")
        commands = [(command, key) for key in keys for command in ("GET", "PTTL")]
        return await self._pipelined(commands, op)

    async def _script(
        self,
        op: _Op,
        script: str,
        sha: str,
        keys: list[bytes],
        args: list[Any],
        *,
        instead: str,
    ) -> Any:
        """The reply of ``script`` over ``keys`` and ``args``: EVALSHA, or
        EVAL where Redis has not loaded it yet. None, and scripts off from
        now on, where Redis refuses scripts (``instead`` says what goes
        instead); any other error reply is raised."""
        conn = await self._connection(op)
        command = (len(keys), *keys, *args)
        try:
            try:
                op.sent = asyncio.get_running_loop().time()
                await conn.send_packed_command(_packed(conn, ("EVALSHA", sha, *command)))
                reply = await conn.read_response()
            except redis.exceptions.NoScriptError:  # a new Redis: EVAL caches it
                await conn.send_packed_command(_packed(conn, ("EVAL", script, *command)))
                reply = await conn.read_response()
        except redis.exceptions.ResponseError as exc:
            self._give_back(conn)  # an error reply: the connection is in step
            refused = isinstance(exc, redis.exceptions.NoPermissionError)
            if not refused and "unknown command" not in str(exc):
                raise
            self._scripts = False
            log.warning("shared cache: Redis refuses scripts (%s); %s", exc, instead)
            return None
        except BaseException:
            self._give_back(conn, broken=True)
            raise
        self._give_back(conn)
        return reply

    async def _pipelined(self, commands: list[tuple[Any, ...]], op: _Op) -> list[Any]:
        """The replies to ``commands``, sent together; an error reply in its
        place (as ``raise_on_error=False`` would)."""
        conn = await self._connection(op)
        try:
            op.sent = asyncio.get_running_loop().time()
            await conn.send_packed_command(_packed(conn, *commands))
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await conn.read_response())
                except redis.exceptions.ResponseError as exc:
                    replies.append(exc)
        except BaseException:
            self._give_back(conn, broken=True)
            raise
        self._give_back(conn)
        return replies

    def connect_soon(self) -> None:
        """Open the first connection in the background (at start, once
        privileges are dropped), so that the first reads need not make it;
        a Redis that is not there starts an outage, logged, and no more."""
        for _ in range(MAX_READ_TRIPS + 1):  # the read trips and a write batch
            self._background(asyncio.ensure_future(self.connect()))

    async def connect(self) -> bool:
        """Make a connection and keep it for the next operation; whether it worked."""
        conn = self.client.connection_pool.make_connection()
        try:
            await conn.connect()
        except (redis.exceptions.RedisError, OSError) as exc:
            self._failed(exc)
            return False
        self._give_back(conn)
        self._recovered()
        return True

    async def _connection(self, op: _Op) -> Any:
        """A connected connection of our own, also put in ``op`` (for the
        deadline's look at its socket). Idle ones are kept in a plain list,
        not in redis-py's pool, whose lock a busy process would wait on for
        whole turns of its loop. Making one (TCP, TLS, AUTH) may take longer
        than an operation's deadline: then it goes on without the operation
        that asked for it, and is kept for the next ones."""
        if self._idle:
            conn = self._idle.pop()
            if conn.is_connected:
                op.conn, op.reused = conn, True
                return conn
        else:
            conn = self.client.connection_pool.make_connection()
        self._connections.add(conn)
        task = asyncio.ensure_future(conn.connect())
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            self._background(task)
            task.add_done_callback(lambda done: self._connected_late(conn, done))
            raise
        except BaseException:
            self._connections.discard(conn)
            raise
        op.conn = conn
        return conn

    async def _again_if_stale(self, op: _Op, run: Callable[[], Awaitable[_T]]) -> _T:
        """``run()``; if the connection it was given, kept from an earlier
        operation, turns out closed by Redis (restarted since), once more
        on a new connection, within the same deadline. The other kept
        connections are as old: they are closed too."""
        try:
            return await run()
        except (redis.exceptions.ConnectionError, ConnectionError):
            if not op.reused:
                raise
        idle, self._idle = self._idle, []
        for conn in idle:
            self._connections.discard(conn)
            self._background(asyncio.ensure_future(_disconnect(conn)))
        op.conn, op.reused, op.sent = None, False, None
        return await run()

    def _connected_late(self, conn: Any, task: asyncio.Future[None]) -> None:
        if task.cancelled() or task.exception() is not None:
            self._connections.discard(conn)  # the next operation fails on its own
        else:
            self._give_back(conn)

    def _give_back(self, conn: Any, *, broken: bool = False) -> None:
        """Keep ``conn`` for the next operation; or, cut off mid-reply (a
        deadline) or broken, close it, in the background."""
        if not (broken or self._closed) and len(self._idle) < MAX_IDLE:
            self._connections.add(conn)
            self._idle.append(conn)
            return
        self._connections.discard(conn)
        self._background(asyncio.ensure_future(self._replace(conn, broken=broken)))

    def _background(self, task: asyncio.Future[Any]) -> None:
        """Keep ``task`` until it is done; close() ends it if it is not."""
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)

    async def _replace(self, conn: Any, *, broken: bool) -> None:
        """Close ``conn``; if it was cut off, open it again for the pool of
        idle ones, so that the next operations need not make one while the
        process is busy (what cut it off most often)."""
        await _disconnect(conn)
        if not broken or self._closed:
            return
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            await conn.connect()
            if self._closed or len(self._idle) >= MAX_IDLE:
                await _disconnect(conn)
            else:
                self._connections.add(conn)
                self._idle.append(conn)

    # -- writes -------------------------------------------------------------

    def put(self, name: str, qtype: str, ttl: float, records: Records, remaining: float) -> None:
        """Queue an answer for Redis, kept there for ``remaining`` seconds."""
        try:
            value = encode(qtype, ttl, records)
        except (ValueError, TypeError, struct.error, UnicodeError):
            return  # a record our encoding does not know: first level only
        self._queue(self._key(name, qtype), value, remaining, False)

    def put_outcome(
        self,
        ip: str,
        sender: str,
        helo: str,
        void_limit: int,
        outcome: SpfOutcome,
        remaining: float,
    ) -> None:
        """Queue an SPF outcome for Redis, kept there for ``remaining`` seconds."""
        try:
            value = encode_outcome(outcome)
        except (ValueError, UnicodeError):
            return  # not storable (a temperror, odd texts): first level only
        self._queue(self._check_key(ip, sender, helo, void_limit), value, remaining, True)

    def _queue(self, key: bytes, value: bytes, remaining: float, outcome: bool) -> None:
        milliseconds = int(remaining * 1000)
        if milliseconds <= 0 or self._closed or len(value) > MAX_ENTRY:
            return
        if len(self._pending) >= MAX_PENDING or (
            self._down_since is not None and self.clock() < self._retry_at
        ):
            self.stats.writes_dropped += 1
            return
        self._pending.append((key, value, milliseconds, outcome))
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        try:
            await asyncio.sleep(WRITE_DELAY)
            while self._pending:
                batch = self._pending[:WRITE_BATCH]
                del self._pending[:WRITE_BATCH]
                await self._write(batch)
        finally:
            self._flusher = None

    async def _write(self, batch: list[tuple[bytes, bytes, int, bool]]) -> None:
        stats = self.stats
        if self._down_since is not None and self.clock() < self._retry_at:
            stats.writes_dropped += len(batch)
            return
        started = time.perf_counter()
        op = _Op()
        try:
            async with _Deadline(self.timeout, op):
                results = await self._again_if_stale(op, lambda: self._set_all(batch, op))
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            stats.timed(time.perf_counter() - started)
            stats.write_errors += len(batch)
            self._failed(exc)
            return
        stats.timed(time.perf_counter() - started)
        self._recovered()
        refused = []
        for entry, result in zip(batch, results, strict=True):
            if isinstance(result, Exception):
                refused.append(result)
            elif entry[3]:
                stats.result_writes += 1
            else:
                stats.writes += 1
        stats.write_errors += len(refused)
        if refused:
            stats.errors += 1
            if not self._write_refused:
                self._write_refused = True
                log.warning(
                    "shared cache: Redis refuses writes (%s); answers go on without it",
                    refused[0],
                )
        elif self._write_refused:
            self._write_refused = False
            log.info("shared cache: Redis takes writes again")

    async def _set_all(self, batch: list[tuple[bytes, bytes, int, bool]], op: _Op) -> list[Any]:
        """Write ``batch`` in one round trip: per entry, None, or the error
        with which Redis refused it. One script call, or, where Redis
        refuses scripts, SETs pipelined."""
        if self._scripts:
            keys = [key for key, _, _, _ in batch]
            values = [part for _, value, ms, _ in batch for part in (value, ms)]
            try:
                reply = await self._script(
                    op, _WRITE_SCRIPT, _WRITE_SHA, keys, values, instead="writes go as SETs"
                )
            except redis.exceptions.ResponseError as exc:
                return [exc] * len(batch)  # OOM, say: every write refused
            if reply is not None:
                return write_results(reply, len(batch))
        commands = [("SET", key, value, "PX", ms) for key, value, ms, _ in batch]
        return await self._pipelined(commands, op)

    # -- outages ------------------------------------------------------------

    def _failed(self, exc: BaseException) -> None:
        stats = self.stats
        stats.errors += 1
        if isinstance(exc, TimeoutError):
            stats.timeouts += 1
            self._timeouts_in_row += 1
            if self._down_since is None and self._timeouts_in_row < TIMEOUTS_FOR_OUTAGE:
                return
        now = self.clock()
        if self._down_since is None:
            self._down_since = now
            self._backoff = BACKOFF_FIRST
            stats.outages += 1
            reason = (
                "no answer within Shared_Cache_Timeout"
                if isinstance(exc, TimeoutError)
                else f"{type(exc).__name__}: {exc}"
            )
            log.warning(
                "shared cache: Redis unavailable (%s); lookups go to DNS until it is back", reason
            )
        elif now >= self._retry_at:  # a retry failed (not one begun before the backoff)
            self._backoff = min(self._backoff * 2, BACKOFF_MAX)
        else:
            return
        self._retry_at = now + self._backoff

    def _recovered(self) -> None:
        self._timeouts_in_row = 0
        if self._down_since is not None:
            log.warning("shared cache: Redis is back after %.1f s", self.clock() - self._down_since)
            self._down_since = None
            self._backoff = 0.0

    async def close(self) -> None:
        """Send what is queued (within the deadline), then disconnect."""
        self._closed = True
        for reader in list(self._readers):
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        flusher = self._flusher
        if flusher is not None:
            try:
                async with asyncio.timeout(self.timeout + WRITE_DELAY):
                    await asyncio.shield(flusher)
            except TimeoutError:
                flusher.cancel()
                await asyncio.gather(flusher, return_exceptions=True)
        self._idle.clear()
        connections, self._connections = self._connections, set()
        await asyncio.gather(*(_disconnect(conn) for conn in connections))
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            await self.client.aclose()
