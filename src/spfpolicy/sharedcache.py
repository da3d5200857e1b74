"""The shared cache: a second level of DNS answers in Redis, under the
resolver's in-process cache, so that several MX hosts (or a restarted one)
learn each domain once. Imported only when Shared_Cache is set.

Rules:
- the resolver asks here after a first-level miss, inside its single-flight
  lookup, and writes here after a DNS answer; nothing else talks to Redis;
- a key is ``<Shared_Cache_Prefix>dns<FORMAT>:<type> <name>``, its value a
  version byte then the answer in our own small binary encoding (no pickle,
  no marshal: whoever can write to Redis must not reach the interpreter); its
  Redis TTL is the answer's remaining TTL, read back with PTTL;
- it never costs an answer: each operation has Shared_Cache_Timeout, and an
  error, a timeout, a refused connection, a wrong password, an out-of-memory
  write or an entry that does not decode is a miss, counted, and logged once
  per outage; after a connection failure (or timeouts without a success
  for 0.25 s) Redis is left alone for a backoff (0.5 s doubling to 30 s),
  then tried again;
- writes never wait: they are queued, and a task sends them pipelined a
  moment later, after the answers that needed them.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import struct
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

log = logging.getLogger(__name__)

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
WRITE_BATCH = 100  # commands per pipeline
WRITE_DELAY = 0.005  # seconds a write waits for company (batching)
WRITE_TIMEOUT = 0.5  # seconds for a batch of writes

BACKOFF_FIRST = 0.5  # seconds without Redis after the first failure
BACKOFF_MAX = 30.0
# Timeouts in a row (no success between them) that make an outage, when
# they span at least TIMEOUT_SPAN (or 5 Shared_Cache_Timeouts, if longer).
# A refused connection or a wrong password is one at once; but timeouts with
# successes between them are most often this process's own event loop being
# busy (the replies waited in the socket while other work ran), not Redis:
# they cost their lookups a miss, not the next half second of lookups. A
# stopped or paused Redis has no success at all.
TIMEOUTS_FOR_OUTAGE = 3
TIMEOUT_SPAN = 0.25

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


# -- the client -------------------------------------------------------------


@dataclass(slots=True)
class SharedStats:
    """Counters for the metrics and the stats line; monotonic."""

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
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0

    def timed(self, seconds: float) -> None:
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds


class SharedCache:
    """DNS answers in Redis, for the resolver; every failure is a miss."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "spfpolicy:",
        timeout: float = 0.05,
        password: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.prefix = prefix.encode("utf-8")
        self.timeout = timeout
        # Writes wait for nobody: a busy event loop must not lose them at a
        # lookup's deadline, but a Redis that does not answer must not keep
        # them (and their connection) long either.
        self.write_timeout = max(WRITE_TIMEOUT, timeout)
        self.clock = clock
        self.stats = SharedStats()
        options: dict[str, Any] = {}
        if password is not None and not urllib.parse.urlsplit(url).password:
            options["password"] = password
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
        self._first_timeout = 0.0  # when the timeouts in a row began
        self._write_refused = False  # an OOM (or other) write error logged
        self._pending: list[tuple[bytes, bytes, int]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Any) -> SharedCache:
        """The cache Shared_Cache* describe; OSError if the password file is unreadable."""
        password = None
        if settings.shared_cache_password_file:
            text = Path(settings.shared_cache_password_file).read_text(encoding="utf-8")
            password = text.strip("\r\n")
        return cls(
            settings.shared_cache,
            prefix=settings.shared_cache_prefix,
            timeout=settings.shared_cache_timeout,
            password=password,
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
        return {
            "hits": stats.hits,
            "misses": stats.misses,
            "errors": stats.errors,
            "timeouts": stats.timeouts,
            "undecodable": stats.undecodable,
            "skipped": stats.skipped,
            "writes": stats.writes,
            "write_errors": stats.write_errors,
            "writes_dropped": stats.writes_dropped,
            "outages": stats.outages,
            "down": int(self.down),
            "latency_counts": list(stats.latency_counts),
            "latency_sum": stats.latency_sum,
        }

    def _key(self, name: str, qtype: str) -> bytes:
        return self.prefix + f"dns{FORMAT}:{qtype} {name}".encode("utf-8", "surrogateescape")

    # -- reads --------------------------------------------------------------

    async def get(self, name: str, qtype: str) -> tuple[float, Records, float] | None:
        """(ttl, records, remaining seconds) of a stored answer, or None."""
        stats = self.stats
        if self._down_since is not None and self.clock() < self._retry_at:
            stats.skipped += 1
            stats.misses += 1
            return None
        key = self._key(name, qtype)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                pipe = self.client.pipeline(transaction=False)
                pipe.get(key)
                pipe.pttl(key)
                data, remaining_ms = await pipe.execute()
        except redis.exceptions.ResponseError as exc:
            stats.timed(time.perf_counter() - started)
            stats.misses += 1
            if "WRONGTYPE" not in str(exc):  # NOAUTH, NOPERM, ...
                self._failed(exc)
                return None
            # A key of another Redis type under our prefix: junk.
            stats.undecodable += 1
            self._recovered()
            return None
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            stats.timed(time.perf_counter() - started)
            stats.misses += 1
            self._failed(exc)
            return None
        stats.timed(time.perf_counter() - started)
        self._recovered()
        if data is None:
            stats.misses += 1
            return None
        try:
            if remaining_ms is None or remaining_ms <= 0:
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

    # -- writes -------------------------------------------------------------

    def put(self, name: str, qtype: str, ttl: float, records: Records, remaining: float) -> None:
        """Queue an answer for Redis, kept there for ``remaining`` seconds."""
        stats = self.stats
        milliseconds = int(remaining * 1000)
        if milliseconds <= 0 or self._closed:
            return
        if len(self._pending) >= MAX_PENDING or (
            self._down_since is not None and self.clock() < self._retry_at
        ):
            stats.writes_dropped += 1
            return
        try:
            value = encode(qtype, ttl, records)
        except (ValueError, TypeError, struct.error, UnicodeError):
            return  # a record our encoding does not know: first level only
        if len(value) > MAX_ENTRY:
            return
        self._pending.append((self._key(name, qtype), value, milliseconds))
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

    async def _write(self, batch: list[tuple[bytes, bytes, int]]) -> None:
        stats = self.stats
        if self._down_since is not None and self.clock() < self._retry_at:
            stats.writes_dropped += len(batch)
            return
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.write_timeout):
                pipe = self.client.pipeline(transaction=False)
                for key, value, milliseconds in batch:
                    pipe.set(key, value, px=milliseconds)
                results = await pipe.execute(raise_on_error=False)
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            stats.timed(time.perf_counter() - started)
            stats.write_errors += len(batch)
            self._failed(exc)
            return
        stats.timed(time.perf_counter() - started)
        self._recovered()
        refused = [r for r in results if isinstance(r, Exception)]
        stats.writes += len(batch) - len(refused)
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

    # -- outages ------------------------------------------------------------

    def _failed(self, exc: BaseException) -> None:
        stats = self.stats
        stats.errors += 1
        if isinstance(exc, TimeoutError):
            stats.timeouts += 1
            now = self.clock()
            self._timeouts_in_row += 1
            if self._timeouts_in_row == 1:
                self._first_timeout = now
            if self._down_since is None and (
                self._timeouts_in_row < TIMEOUTS_FOR_OUTAGE
                or now - self._first_timeout < max(TIMEOUT_SPAN, 5 * self.timeout)
            ):
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
        flusher = self._flusher
        if flusher is not None:
            try:
                async with asyncio.timeout(self.timeout + WRITE_DELAY):
                    await asyncio.shield(flusher)
            except TimeoutError:
                flusher.cancel()
                await asyncio.gather(flusher, return_exceptions=True)
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            await self.client.aclose()
