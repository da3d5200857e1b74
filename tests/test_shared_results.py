"""SPF outcomes in the shared cache (sharedcache.py, checks.py): their
encoding, table-driven and property-based; then a differential test: two
PolicyServers ("two MX hosts") sharing one real redis-server give, for every
kind of result, the same answers, header bytes included, as each other and
as a server without Redis, the second without a single DNS query.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hardening import BAD_IP, GOOD_IP, HELO, request
from redis_support import shared
from serving import Running, wait_for
from spfpolicy.bench.redisserver import RedisProcess
from spfpolicy.checks import DnsChecks
from spfpolicy.protocol import encode_request
from spfpolicy.results import NO_MAIL_RECORD, Identity, SpfOutcome, SpfResult
from spfpolicy.sharedcache import (
    MAX_TEXT,
    SharedCache,
    Undecodable,
    check_key,
    decode_outcome,
    encode_outcome,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("connect_at_start")]

# -- the encoding -------------------------------------------------------------

OUTCOMES = [
    pytest.param(SpfOutcome(SpfResult.PASS, 250, "sender SPF authorized", "mx"), id="pass"),
    pytest.param(SpfOutcome(SpfResult.FAIL, 550, "Not for bob@x.example", "-all"), id="fail"),
    pytest.param(SpfOutcome(SpfResult.SOFTFAIL, 250, "domain owner discourages", "~all")),
    pytest.param(SpfOutcome(SpfResult.NEUTRAL, 250, "", "default"), id="neutral"),
    pytest.param(SpfOutcome(SpfResult.NONE, 250, "", identity=Identity.HELO), id="none-helo"),
    pytest.param(SpfOutcome(SpfResult.PERMERROR, 550, "SPF Permanent Error: x"), id="permerror"),
    pytest.param(
        SpfOutcome(SpfResult.FAIL, 550, "no mail", "-all", record=NO_MAIL_RECORD), id="no-mail"
    ),
    pytest.param(SpfOutcome(SpfResult.PASS, 250, "Grüße ✓", "a"), id="utf-8"),
]


@pytest.mark.parametrize("outcome", OUTCOMES)
def test_outcome_encoding_round_trips(outcome: SpfOutcome) -> None:
    assert decode_outcome(encode_outcome(outcome)) == outcome


@pytest.mark.parametrize("outcome", OUTCOMES)
def test_a_decoded_outcome_is_what_the_result_cache_keeps(outcome: SpfOutcome) -> None:
    """The shared path returns (and keeps) a decoded outcome as it is, not
    through checks._for_decisions: it must equal what _for_decisions makes
    of the full outcome the first host evaluated, every field included."""
    from spfpolicy.checks import _for_decisions

    full = dataclasses.replace(
        outcome,
        sender="bob@x.example",
        domain="x.example",
        lookups=3,
        ttl=120.0,
        elapsed=0.01,
        record=outcome.record or "v=spf1 mx -all",
    )
    decoded = decode_outcome(encode_outcome(_for_decisions(full)))
    assert decoded == _for_decisions(full) == _for_decisions(decoded)
    # Decoded once per value: the same object for the same bytes.
    from spfpolicy.sharedcache import _outcome_of

    data = encode_outcome(full)
    first, second = _outcome_of((data, 1000)), _outcome_of((bytes(data), 2000))
    assert first is not None and second is not None
    assert first[0] is second[0] and first[0] == decoded
    assert (first[1], second[1]) == (1.0, 2.0)


def test_only_the_no_mail_record_is_kept() -> None:
    outcome = SpfOutcome(SpfResult.FAIL, 550, "", "-all", record="v=spf1 ip4:192.0.2.1 -all")
    assert decode_outcome(encode_outcome(outcome)).record == ""


NOT_STORED = [
    pytest.param(SpfOutcome(SpfResult.TEMPERROR, 451, "DNS timeout"), id="temperror"),
    pytest.param(SpfOutcome(SpfResult.PASS, 999, ""), id="odd-code"),
    pytest.param(SpfOutcome(SpfResult.FAIL, 550, "a\r\nX-Injected: yes"), id="crlf"),
    pytest.param(SpfOutcome(SpfResult.FAIL, 550, "x" * (MAX_TEXT + 1)), id="too-long"),
]


@pytest.mark.parametrize("outcome", NOT_STORED)
def test_some_outcomes_are_not_stored(outcome: SpfOutcome) -> None:
    with pytest.raises(ValueError):
        encode_outcome(outcome)


GOOD = encode_outcome(SpfOutcome(SpfResult.FAIL, 550, "not authorized", "-all"))
GARBAGE = [
    pytest.param(b"", id="empty"),
    pytest.param(b"\x02" + GOOD[1:], id="another-version"),
    pytest.param(GOOD[:-1], id="truncated"),
    pytest.param(GOOD + b"x", id="trailing"),
    pytest.param(GOOD[:1] + b"\x09" + GOOD[2:], id="result-out-of-range"),
    pytest.param(GOOD[:1] + b"\x06" + GOOD[2:], id="temperror"),
    pytest.param(GOOD[:2] + b"\x01\xc3" + GOOD[4:], id="code-451"),
    pytest.param(GOOD[:4] + b"\x07" + GOOD[5:], id="identity-out-of-range"),
    pytest.param(GOOD[:5] + b"\x02" + GOOD[6:], id="unknown-flag"),
    pytest.param(GOOD.replace(b"not authorized", b"not\r\nauthoriz"), id="crlf"),
    pytest.param(GOOD.replace(b"not authorized", b"not \xff\xfeuthoriz"), id="not-utf-8"),
]


@pytest.mark.parametrize("data", GARBAGE)
def test_garbage_outcomes_do_not_decode(data: bytes) -> None:
    with pytest.raises(Undecodable):
        decode_outcome(data)


@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_undecodable(data: bytes) -> None:
    with contextlib.suppress(Undecodable):
        decode_outcome(data)


@given(st.binary(max_size=40))
def test_any_corruption_of_a_good_entry_decodes_or_raises(tail: bytes) -> None:
    with contextlib.suppress(Undecodable):
        outcome = decode_outcome(GOOD[:6] + tail)
        assert outcome.result in set(SpfResult) - {SpfResult.TEMPERROR}


def test_check_keys_are_hashed_and_distinct() -> None:
    key = check_key("192.0.2.1", "alice@example.org", "mx.example", 2)
    assert b"alice" not in key and b"example" not in key and len(key) == 32
    others = {
        check_key("192.0.2.1", "alice@example.org", "mx.example", 3),
        check_key("192.0.2.1", "alice@example.or", "gmx.example", 2),
        check_key("192.0.2.11", "alice@example.org", "mx.example", 2),
        check_key("192.0.2.1", "", "mx.example", 2),
    }
    assert key not in others and len(others) == 4


# -- two MX hosts sharing one real Redis ----------------------------------------

ZONE: dict[str, Any] = {
    "pass.example": [{"TXT": "v=spf1 a:mail.pass.example mx -all"}],
    "mail.pass.example": [{"A": GOOD_IP}],
    "fail.example": [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}],
    "exp.example": [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all exp=why.exp.example"}],
    "why.exp.example": [{"TXT": "%{l} may not send from %{i} for %{d}"}],
    "soft.example": [{"TXT": "v=spf1 ip4:192.0.2.0/24 ~all"}],
    "neutral.example": [{"TXT": "v=spf1 ip4:192.0.2.0/24 ?all"}],
    "none.example": [{"A": "192.0.2.99"}],
    "perm.example": [{"TXT": "v=spf1 ip4:192.0.2.0/24 moo:bar -all"}],
    "nomail.example": [{"TXT": NO_MAIL_RECORD}],
    "helo-fail.example": [{"TXT": "v=spf1 -all"}],
    "helo-pass.example": [{"TXT": f"v=spf1 ip4:{GOOD_IP} -all"}],
}
CASES = [
    ("a@pass.example", GOOD_IP, HELO),
    ("a@pass.example", BAD_IP, HELO),
    ("a@fail.example", BAD_IP, HELO),
    ("Bob.Smith@exp.example", BAD_IP, HELO),
    ("a@soft.example", BAD_IP, HELO),
    ("a@neutral.example", BAD_IP, HELO),
    ("a@none.example", BAD_IP, HELO),
    ("a@perm.example", BAD_IP, HELO),
    ("a@nomail.example", BAD_IP, HELO),
    ("a@nomail.example", BAD_IP, "helo-fail.example"),
    ("", GOOD_IP, "helo-pass.example"),
    ("", BAD_IP, "helo-fail.example"),
    ("a@pass.example", GOOD_IP, "helo-pass.example"),
]
SETTINGS: list[dict[str, Any]] = [
    {},
    {"no_mail": True, "permerror_reject": True, "helo_reject": "SPF_Not_Pass"},
]


async def settled(cache: SharedCache) -> None:
    await wait_for(lambda: not cache._pending and cache._flusher is None)


def _settings(changes: dict[str, Any]) -> dict[str, Any]:
    from spfpolicy.config import HeloReject

    changes = dict(changes)
    if "helo_reject" in changes:
        changes["helo_reject"] = HeloReject(changes["helo_reject"])
    return changes


@pytest.mark.parametrize("changes", SETTINGS, ids=["defaults", "strict"])
async def test_a_shared_outcome_answers_as_a_local_evaluation(
    changes: dict[str, Any],
    redis_server: Callable[..., RedisProcess],
    policy_server: Callable[..., Awaitable[Running]],
) -> None:
    redis = redis_server()
    settings = _settings(changes)
    first = await policy_server(zone=ZONE, shared_cache=redis.url, **settings)
    second = await policy_server(zone=ZONE, shared_cache=redis.url, **settings)
    alone = await policy_server(zone=ZONE, **settings)
    awaited = _count_awaited(second)  # the second host answers from the reads' callbacks
    clients = [await first.connect(), await second.connect(), await alone.connect()]
    answers: list[list[str]] = [[], [], []]
    for sender, ip, helo in CASES:
        for i, client in enumerate(clients):
            answers[i].append(await client.ask(request(sender, ip=ip, helo=helo)))
            if i == 0:
                await settled(shared(first))
    assert answers[0] == answers[2]
    assert answers[1] == answers[2]
    assert len(set(answers[2])) >= 8  # the cases differ: a pass, rejects, headers...
    assert second.dns.queries == 0
    assert awaited[0] == 0
    cache = shared(second)
    assert cache.stats.result_hits >= len(CASES) // 2  # others from its own caches
    assert cache.stats.result_undecodable == 0 and cache.stats.errors == 0
    assert shared(first).stats.result_writes >= len(CASES)
    # No sender is written in clear.
    keys = redis.command("KEYS", "spfpolicy:spf1:*")
    assert len(keys) >= len(CASES)
    assert not any(b"example" in key for key in keys)
    for key in keys:
        assert b"Bob" not in redis.command("GET", key) or b"may not send" in redis.command(
            "GET", key
        )


async def test_the_redis_ttl_is_the_outcomes_remaining_time(
    redis_server: Callable[..., RedisProcess], policy_server: Callable[..., Awaitable[Running]]
) -> None:
    redis = redis_server()
    running = await policy_server(zone=ZONE, shared_cache=redis.url, result_cache_ttl=100.0)
    client = await running.connect()
    await client.ask(request("a@fail.example", ip=BAD_IP))
    await settled(shared(running))
    keys = redis.command("KEYS", "spfpolicy:spf1:*")
    assert keys
    for key in keys:
        assert 0 < int(redis.command("PTTL", key)) <= 100_000  # Result_Cache_TTL < the zone's TTL


async def test_garbage_outcomes_read_as_a_miss(
    redis_server: Callable[..., RedisProcess], policy_server: Callable[..., Awaitable[Running]]
) -> None:
    redis = redis_server()
    first = await policy_server(zone=ZONE, shared_cache=redis.url)
    client = await first.connect()
    expected = await client.ask(request("a@fail.example", ip=BAD_IP))
    await settled(shared(first))
    # An attacker with write access to Redis turns every fail into a pass.
    forged = encode_outcome(SpfOutcome(SpfResult.PASS, 250, "", "+all"))
    for key in redis.command("KEYS", "spfpolicy:spf1:*"):
        redis.command("SET", key, b"\x01\x00" + forged[2:-3] + b"\r\n", "PX", "60000")
    second = await policy_server(zone=ZONE, shared_cache=redis.url)
    client = await second.connect()
    assert await client.ask(request("a@fail.example", ip=BAD_IP)) == expected
    assert shared(second).stats.result_undecodable >= 1
    assert shared(second).stats.result_hits == 0
    assert second.server.errors == 0


async def test_concurrent_misses_of_one_check_share_one_read(
    redis_server: Callable[..., RedisProcess], policy_server: Callable[..., Awaitable[Running]]
) -> None:
    redis = redis_server()
    running = await policy_server(zone=ZONE, shared_cache=redis.url)
    checks: DnsChecks = running.server.checks
    outcomes = await asyncio.gather(
        *(checks.spf(BAD_IP, "a@fail.example", HELO, lookup_time=5.0) for _ in range(20))
    )
    assert len({dataclasses.astuple(o) for o in outcomes}) == 1
    assert outcomes[0].result is SpfResult.FAIL
    assert shared(running).stats.result_misses == 1  # the others joined its read
    # One read of the check's key for the twenty, then one of the TXT record:
    # two keys, each a GET and a PTTL that miss.
    assert shared(running).stats.read_batches == 2
    assert int(redis.command("INFO", "stats")["keyspace_misses"]) == 4


async def test_a_redis_user_without_scripts_reads_by_get_and_pttl(
    tmp_path: Path,
    redis_server: Callable[..., RedisProcess],
    policy_server: Callable[..., Awaitable[Running]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    redis = redis_server()
    redis.command("ACL", "SETUSER", "noscripts", "on", ">secret", "~*", "+@all", "-@scripting")
    password = tmp_path / "redis.pass"
    password.write_text("secret\n")
    options = {
        "shared_cache": f"{redis.url}?username=noscripts",
        "shared_cache_password_file": str(password),
    }
    first = await policy_server(zone=ZONE, **options)
    second = await policy_server(zone=ZONE, **options)
    client = await first.connect()
    expected = await client.ask(request("a@fail.example", ip=BAD_IP))
    await settled(shared(first))
    client = await second.connect()
    assert await client.ask(request("a@fail.example", ip=BAD_IP)) == expected
    assert second.dns.queries == 0
    assert shared(second).stats.result_hits > 0
    assert not shared(second).down and not shared(first).down
    refusals = [r for r in caplog.records if "refuses scripts" in r.getMessage()]
    assert len(refusals) == 2  # once per server


LOOPS = ["asyncio", "uvloop"]


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("grace", [True, False], ids=["grace", "no-grace"])
def test_a_reply_that_came_while_the_loop_was_busy_is_used(
    grace: bool,
    loop: str,
    redis_server: Callable[..., RedisProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The event loop blocked past the deadline after Redis answered: the
    reply waiting in the socket is read, not counted as a timeout. uvloop
    (the server's loop) runs its due timers before it polls its sockets, so
    there the control, without the grace turns, times out; asyncio's loop
    polls first, and reads the reply either way."""
    import time

    from spfpolicy import sharedcache

    if not grace:
        monkeypatch.setattr(sharedcache, "GRACE_TURNS", 0)
    redis = redis_server()
    outcome = SpfOutcome(SpfResult.FAIL, 550, "not authorized", "-all")

    def evalsha_calls() -> int:
        stats = redis.command("INFO", "commandstats").get("cmdstat_evalsha", {})
        return int(stats.get("calls", 0))

    async def scenario() -> tuple[Any, SharedCache]:
        cache = SharedCache(redis.url, timeout=0.05)
        try:
            key = cache._check_key(BAD_IP, "a@fail.example", HELO, 2).decode()
            redis.command("SET", key, encode_outcome(outcome), "PX", "60000")
            # One read first: the connection made and the script loaded.
            assert await cache.get_outcome(BAD_IP, "a@other.example", HELO, 2) is None
            calls = evalsha_calls()
            read = asyncio.ensure_future(cache.get_outcome(BAD_IP, "a@fail.example", HELO, 2))
            # Let the read be sent, then block the loop (blocking calls) until
            # Redis has run it, and past the deadline.
            for _ in range(1000):
                await asyncio.sleep(0)
                if evalsha_calls() > calls:
                    break
            time.sleep(0.1)
            return await read, cache
        finally:
            await cache.close()

    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            found, cache = runner.run(scenario())
    else:
        found, cache = asyncio.run(scenario())
    if grace:
        assert found is not None and found[0] == outcome
        assert cache.stats.timeouts == 0 and cache.stats.result_hits == 1
    elif loop == "uvloop":
        assert found is None and cache.stats.timeouts == 1


async def test_a_known_message_costs_one_redis_trip(
    redis_server: Callable[..., RedisProcess], policy_server: Callable[..., Awaitable[Running]]
) -> None:
    """The HELO and MAIL FROM checks of a message the first host saw are read
    in one trip, and the second is kept as the trip comes back: no second
    read when the request goes on to it."""
    redis = redis_server()
    first = await policy_server(zone=ZONE, shared_cache=redis.url)
    second = await policy_server(zone=ZONE, shared_cache=redis.url)
    client = await first.connect()
    expected = await client.ask(request("a@fail.example", ip=BAD_IP))
    await settled(shared(first))
    client = await second.connect()
    assert await client.ask(request("a@fail.example", ip=BAD_IP)) == expected
    stats = shared(second).stats
    assert (stats.read_batches, stats.read_keys, stats.result_hits) == (1, 2, 2)
    assert second.dns.queries == 0


async def test_the_private_names_the_deadline_reads_are_there(
    redis_server: Callable[..., RedisProcess],
) -> None:
    """``sharedcache._reply_waiting`` looks into a redis-py connection
    (``_reader``, ``_writer``) and asyncio's StreamReader (``_buffer``) to
    see whether Redis has answered while the loop was busy. Without them it
    says "no" and the deadline counts a late loop as a slow Redis again:
    this names what changed."""
    from spfpolicy import sharedcache

    redis = redis_server()
    cache = SharedCache(redis.url, timeout=1.0)
    try:
        assert await cache.get_outcome(BAD_IP, "a@other.example", HELO, 2) is None
        assert cache._idle, "no idle connection kept after a read"
        conn = cache._idle[-1]
        missing = [name for name in ("_reader", "_writer") if not hasattr(conn, name)]
        assert not missing, f"redis-py's connection lacks {missing}"
        assert hasattr(conn._reader, "_buffer"), "asyncio's StreamReader lacks _buffer"
        assert not sharedcache._reply_waiting(conn)
        conn._writer.write(b"PING\r\n")  # a reply now waits, unread
        for _ in range(200):
            if sharedcache._reply_waiting(conn):
                break
            await asyncio.sleep(0.005)
        assert sharedcache._reply_waiting(conn)
        assert (await conn.read_response()) in (b"PONG", "PONG")
    finally:
        await cache.close()


async def test_a_prefetch_read_needs_no_task(redis_server: Callable[..., RedisProcess]) -> None:
    """``want_outcome`` (the prefetch's read) joins the turn's trip with
    hooks only: a found outcome goes to ``arrived``, a miss, an entry that
    does not decode, and Redis being away go to ``missed``; each counted as
    get_outcome counts them, a joined read not at all; in Redis's backoff
    there is no read (False)."""
    redis = redis_server()
    outcome = SpfOutcome(SpfResult.FAIL, 550, "not authorized", "-all")
    cache = SharedCache(redis.url, timeout=1.0)
    got: list[Any] = []
    try:
        key = cache._check_key(BAD_IP, "a@fail.example", HELO, 2).decode()
        # Hashed once, the same name every time (what other hosts write).
        assert key == "spfpolicy:spf1:" + check_key(BAD_IP, "a@fail.example", HELO, 2).decode()
        assert cache._check_key(BAD_IP, "a@fail.example", HELO, 2).decode() == key
        redis.command("SET", key, encode_outcome(outcome), "PX", "60000")
        junk = cache._check_key(BAD_IP, "a@junk.example", HELO, 2).decode()
        redis.command("SET", junk, "junk", "PX", "60000")
        for sender in ("a@fail.example", "a@other.example", "a@junk.example", "a@fail.example"):
            cache.want_outcome(
                BAD_IP,
                sender,
                HELO,
                2,
                arrived=lambda found, remaining, sender=sender: got.append(
                    (sender, found, 0 < remaining <= 60)
                ),
                missed=lambda sender=sender: got.append((sender, None, None)),
            )
        # A waiting reader of a key a prefetch reads joins its trip.
        found = await cache.get_outcome(BAD_IP, "a@fail.example", HELO, 2)
        assert found is not None and found[0] == outcome
        assert sorted(got, key=str) == sorted(
            [
                ("a@fail.example", outcome, True),
                ("a@fail.example", outcome, True),
                ("a@other.example", None, None),
                ("a@junk.example", None, None),
            ],
            key=str,
        )
        stats = cache.stats
        assert (stats.read_batches, stats.read_keys) == (1, 3)
        assert (stats.result_hits, stats.result_misses, stats.result_undecodable) == (1, 2, 1)
    finally:
        await cache.close()

    # Redis not there: a refused connection, then the backoff (at once).
    away = SharedCache("redis://127.0.0.1:1", timeout=1.0)
    missed: list[str] = []
    try:
        for sender in ("a@one.example", "a@two.example"):
            assert away.want_outcome(
                BAD_IP,
                sender,
                HELO,
                2,
                arrived=lambda *_: pytest.fail("nothing is there"),
                missed=lambda sender=sender: missed.append(sender),
            )
        await wait_for(lambda: len(missed) == 2)
        # In the backoff nothing is read: False, and neither hook is called.
        assert not away.want_outcome(
            BAD_IP,
            "a@three.example",
            HELO,
            2,
            arrived=lambda *_: pytest.fail("nothing is there"),
            missed=lambda: pytest.fail("the caller goes on as for a miss"),
        )
        assert missed == ["a@one.example", "a@two.example"]
        assert away.down and away.stats.skipped == 1 and away.stats.result_misses == 3
    finally:
        await away.close()


# -- a request read from Redis is answered from the read's callback -------------


def _count_awaited(running: Running) -> list[int]:
    """Counts the requests the server's connection tasks answer (the full
    way), as opposed to those answered from a callback."""
    server = running.server
    awaited = [0]
    answer = server.answer

    async def counted(*args: Any, **kwargs: Any) -> str:
        awaited[0] += 1
        return await answer(*args, **kwargs)

    server.answer = counted  # type: ignore[method-assign]
    return awaited


async def test_a_request_read_from_redis_needs_no_task(
    redis_server: Callable[..., RedisProcess], policy_server: Callable[..., Awaitable[Running]]
) -> None:
    """The second host answers every case the first saw from the read's
    callback: no connection task awaits an answer, and the answers are the
    first host's. Requests sent together wait for the one being read and
    are answered in order."""
    redis = redis_server()
    first = await policy_server(zone=ZONE, shared_cache=redis.url)
    second = await policy_server(zone=ZONE, shared_cache=redis.url)
    client = await first.connect()
    expected = [await client.ask(request(s, ip=ip, helo=helo)) for s, ip, helo in CASES]
    await settled(shared(first))
    awaited = _count_awaited(second)
    client = await second.connect()
    got = [await client.ask(request(s, ip=ip, helo=helo)) for s, ip, helo in CASES[:6]]
    # The rest in one write: each waits for the one before it.
    await client.send(
        b"".join(encode_request(request(s, ip=ip, helo=helo)) for s, ip, helo in CASES[6:])
    )
    got += [await client.answer() for _ in CASES[6:]]
    assert got == expected
    assert awaited[0] == 0
    assert second.dns.queries == 0
    assert second.server.requests == len(CASES) and second.server.errors == 0
    assert second.server.requests_in_flight == 0


async def test_a_miss_in_redis_goes_to_dns_after_one_read(
    redis_server: Callable[..., RedisProcess], policy_server: Callable[..., Awaitable[Running]]
) -> None:
    """A check Redis does not hold is read once (by the callback's read),
    then evaluated from DNS by the connection's task, which does not read
    Redis again."""
    redis = redis_server()
    running = await policy_server(zone=ZONE, shared_cache=redis.url)
    alone = await policy_server(zone=ZONE)
    awaited = _count_awaited(running)
    client = await running.connect()
    asked = request("a@fail.example", ip=BAD_IP)
    assert await client.ask(asked) == await (await alone.connect()).ask(asked)
    assert awaited[0] == 1
    stats = shared(running).stats
    # The MAIL FROM and HELO checks, each read once and missed (the other
    # keys read are DNS answers).
    assert (stats.result_misses, stats.result_hits) == (2, 0)
    assert stats.read_keys == stats.result_misses + stats.misses
    assert not running.server.checks._shared_missed  # each went to DNS once


async def test_a_new_client_of_a_domain_known_here_is_not_read_from_redis(
    redis_server: Callable[..., RedisProcess], policy_server: Callable[..., Awaitable[Running]]
) -> None:
    """Once a domain's record is cached here, a check of it for a new client
    (a new key) is evaluated from the cached records, with no Redis read and
    no DNS query, and answers as a server without the shared level does."""
    redis = redis_server()
    running = await policy_server(zone=ZONE, shared_cache=redis.url)
    alone = await policy_server(zone=ZONE)
    client, control = await running.connect(), await alone.connect()
    for sender, ip in (("a@pass.example", GOOD_IP), ("a@fail.example", BAD_IP)):
        asked = request(sender, ip=ip)
        assert await client.ask(asked) == await control.ask(asked)
    stats = shared(running).stats
    read, queries = (stats.read_keys, stats.result_misses), running.dns.queries
    assert read[1] >= 3  # the first checks of each domain were read
    for sender, ip in (("a@pass.example", BAD_IP), ("a@fail.example", "192.0.2.7")):
        for helo in (HELO, "new-helo.example"):
            asked = request(sender, ip=ip, helo=helo)
            assert await client.ask(asked) == await control.ask(asked)
    # Only the first check of the HELO name not known here was read (the
    # check, then its TXT); its second, for another client, found the TXT.
    assert stats.result_misses == read[1] + 1
    assert stats.read_keys == read[0] + 2
    assert running.dns.queries == queries + 1  # new-helo.example's TXT


async def test_a_check_whose_domain_is_being_fetched_here_is_not_read_from_redis(
    redis_server: Callable[..., RedisProcess], zone_server: Any
) -> None:
    """While the checked domain's TXT lookup is in flight here, its check
    waits for that lookup rather than reading Redis; a domain neither
    cached nor in flight is read."""
    from spfpolicy.evaluator import SpfEvaluator
    from spfpolicy.resolver import Resolver

    server = await zone_server(ZONE, delay=0.2)
    resolver = Resolver([server.nameserver], timeout=2, tries=1)
    cache = SharedCache(redis_server().url)
    try:
        checks = DnsChecks(
            SpfEvaluator(resolver), void_limit=2, result_cache_size=100, result_cache_ttl=60
        )
        checks.shared = cache
        lookup = resolver.prefetch("fail.example", "TXT")
        assert lookup is not None and not lookup.done()
        settled: list[bool] = []
        assert not checks.read_shared(BAD_IP, "a@fail.example", HELO, settled=settled.append)
        assert checks.read_shared(BAD_IP, "a@soft.example", HELO, settled=settled.append)
        await wait_for(lambda: settled == [False])  # read, and missed
        assert cache.stats.result_misses == 1
        await lookup
    finally:
        await cache.close()
        await resolver.close()


@pytest.mark.parametrize("end", ["client-eof", "server-stop"])
async def test_a_request_waiting_for_its_read_is_answered_at_the_end(
    end: str,
    redis_server: Callable[..., RedisProcess],
    policy_server: Callable[..., Awaitable[Running]],
) -> None:
    """A request whose read is out when the client ends its input or the
    server stops is taken over by the connection's task (which joins the
    read) and answered, not dropped."""
    redis = redis_server()
    running = await policy_server(zone=ZONE, shared_cache=redis.url, shared_cache_timeout=0.5)
    alone = await policy_server(zone=ZONE)
    asked = request("a@fail.example", ip=BAD_IP)
    expected = await (await alone.connect()).ask(asked)
    client = await running.connect()
    redis.pause()  # the read waits for its deadline
    try:
        await client.send(encode_request(asked))
        await wait_for(lambda: running.server.requests_in_flight == 1)
        if end == "client-eof":
            client.writer.write_eof()
            assert await client.answer() == expected
        else:
            stop = asyncio.ensure_future(running.server.stop(grace=5.0))
            assert await client.answer() == expected
            await stop
    finally:
        redis.resume()
    assert running.server.errors == 0


async def test_a_read_that_never_calls_back_is_answered_the_full_way(
    redis_server: Callable[..., RedisProcess],
    policy_server: Callable[..., Awaitable[Running]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The safety net under the callback: a read that never ends (a bug,
    simulated) leaves the request to its connection's task after the
    server's read_limit."""
    redis = redis_server()
    running = await policy_server(zone=ZONE, shared_cache=redis.url)
    alone = await policy_server(zone=ZONE)
    asked = request("a@fail.example", ip=BAD_IP)
    expected = await (await alone.connect()).ask(asked)
    checks = running.server.checks
    checks.read_shared = lambda *args, **kwargs: True  # type: ignore[method-assign]
    client = await running.connect()
    started = asyncio.get_running_loop().time()
    assert await client.ask(asked) == expected
    waited = asyncio.get_running_loop().time() - started
    assert running.server.read_limit <= waited < 2 * running.server.read_limit + 1.0
    assert "answering it the full way" in caplog.text
    assert running.server.errors == 0 and running.server.requests_in_flight == 0


def _want_absent(cache: SharedCache, *, missed: Callable[[], None]) -> bool:
    """``want_outcome`` of a check that Redis does not hold."""
    return cache.want_outcome(
        BAD_IP,
        "a@x.example",
        HELO,
        2,
        arrived=lambda *_: pytest.fail("nothing is there"),
        missed=missed,
    )


async def test_a_hook_that_wants_its_key_again_starts_a_new_read(
    redis_server: Callable[..., RedisProcess],
) -> None:
    """A read's hooks run once it is over: one that wants the same key
    again (the next request of a connection answered from the callback)
    gets a read of its own, whose hooks are called too."""
    redis = redis_server()
    cache = SharedCache(redis.url, timeout=1.0)
    calls: list[str] = []
    try:

        def again() -> None:
            calls.append("first")
            assert _want_absent(cache, missed=lambda: calls.append("second"))

        assert cache.want_outcome(
            BAD_IP, "a@x.example", HELO, 2, arrived=lambda *_: None, missed=again
        )
        await wait_for(lambda: len(calls) == 2)
        assert calls == ["first", "second"] and cache.stats.read_batches == 2
    finally:
        await cache.close()


async def test_reads_of_a_trip_cancelled_before_it_ran_end_as_misses(
    redis_server: Callable[..., RedisProcess],
) -> None:
    redis = redis_server()
    cache = SharedCache(redis.url, timeout=1.0)
    missed: list[str] = []
    assert _want_absent(cache, missed=lambda: missed.append("a@x.example"))
    await asyncio.sleep(0)  # the trip is made, not yet run
    await cache.close()
    assert missed == ["a@x.example"]


async def test_a_connection_cut_off_by_a_deadline_is_not_used_out_of_step(
    redis_server: Callable[..., RedisProcess],
) -> None:
    """A read whose deadline passes while its reply is still to come leaves
    that reply on its connection. The connection is not given to the next
    read as it is (which would take the late reply for its own): it is
    opened again, and the reads after Redis is back get their own values."""
    redis = redis_server()
    cache = SharedCache(redis.url, timeout=0.2)
    late = SpfOutcome(SpfResult.FAIL, 550, "late", "-all")
    mine = SpfOutcome(SpfResult.PASS, 250, "mine", "mx")
    try:
        assert await cache.connect()
        late_key = cache._check_key(BAD_IP, "a@late.example", HELO, 2)
        mine_key = cache._check_key(BAD_IP, "a@mine.example", HELO, 2)
        redis.command("SET", late_key, encode_outcome(late), "PX", "60000")
        redis.command("SET", mine_key, encode_outcome(mine), "PX", "60000")
        redis.pause()
        try:
            assert await cache.get_outcome(BAD_IP, "a@late.example", HELO, 2) is None
        finally:
            redis.resume()
        assert cache.stats.timeouts == 1
        for _ in range(3):  # every kept connection, in turn
            found = await cache.get_outcome(BAD_IP, "a@mine.example", HELO, 2)
            assert found is not None and found[0] == mine
        assert cache.stats.timeouts == 1 and not cache.down
    finally:
        await cache.close()
