"""The shared cache (sharedcache.py): its encoding, table-driven and
property-based; then two PolicyServers ("two MX hosts") sharing one real
redis-server on a unix socket in tmp_path, and that Redis failing under load
(stopped, restarted, paused, a wrong password, out of memory, garbage):
every request answered, none by the fallback, within normal latency plus the
timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hardening import GOOD_IP, header, request
from redis_support import shared
from serving import Running, wait_for
from spfpolicy import sharedcache
from spfpolicy.bench.redisserver import RedisProcess
from spfpolicy.metrics import summary_line
from spfpolicy.sharedcache import MAX_ENTRY, SharedCache, Undecodable, decode, encode

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("connect_at_start")]

# A zone of many senders, so that each request of a load misses both levels.
DOMAINS = 400
ZONE: dict[str, Any] = {
    f"d{i}.example": [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}] for i in range(DOMAINS)
}
ZONE["pass.example"] = [{"TXT": "v=spf1 a:mail.pass.example mx -all"}]
ZONE["mail.pass.example"] = [{"A": "192.0.2.10"}, {"AAAA": "2001:db8::10"}]
TIMEOUT = 0.05  # Shared_Cache_Timeout in these tests (the default)


def sender(i: int) -> str:
    return f"a@d{i}.example"


# -- the encoding -------------------------------------------------------------

ANSWERS = [
    pytest.param("A", 300.0, ("192.0.2.1", "192.0.2.2"), id="A"),
    pytest.param("AAAA", 60.0, ("2001:db8::1",), id="AAAA"),
    pytest.param("MX", 3600.0, ((10, "mx1.example"), (20, "mx2.example")), id="MX"),
    pytest.param("PTR", 5.5, ("host.example",), id="PTR"),
    pytest.param("TXT", 300.0, ((b"v=spf1 -all",), (b"a", b"b" * 300)), id="TXT"),
    pytest.param("TXT", 30.0, (), id="negative"),
    pytest.param("A", 0.0, ("\udcff.example",), id="surrogate"),
]


@pytest.mark.parametrize(("qtype", "ttl", "records"), ANSWERS)
def test_encoding_round_trips(qtype: str, ttl: float, records: tuple[Any, ...]) -> None:
    assert decode(qtype, encode(qtype, ttl, records)) == (ttl, records)


GARBAGE = [
    pytest.param(b"", id="empty"),
    pytest.param(b"garbage that is no entry", id="text"),
    pytest.param(b"\x02" + encode("A", 1.0, ("192.0.2.1",))[1:], id="another-version"),
    pytest.param(encode("A", 1.0, ("192.0.2.1",))[:-1], id="truncated"),
    pytest.param(encode("A", 1.0, ("192.0.2.1",)) + b"x", id="trailing"),
    pytest.param(encode("A", 1.0, ("1" * 60_000, "2" * 6000)), id="too-large"),
]


@pytest.mark.parametrize("data", GARBAGE)
def test_garbage_does_not_decode(data: bytes) -> None:
    with pytest.raises(Undecodable):
        decode("A", data)


@given(st.sampled_from(["A", "AAAA", "MX", "PTR", "TXT"]), st.binary(max_size=200))
def test_any_bytes_decode_or_raise_undecodable(qtype: str, data: bytes) -> None:
    with contextlib.suppress(Undecodable):
        decode(qtype, data)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        pytest.param([b""], [None, None, None], id="all-written"),
        pytest.param([b"ERR no", 2], [None, "ERR no", None], id="one-refused"),
        pytest.param([b"OOM", 1, 2, 3], ["OOM", "OOM", "OOM"], id="all-refused"),
    ],
)
def test_write_results_read_the_scripts_reply(reply: list[Any], expected: list[Any]) -> None:
    results = sharedcache.write_results(reply, 3)
    assert [None if r is None else str(r) for r in results] == expected


@pytest.mark.parametrize(
    "reply",
    [b"OK", [], [""], [b"", 0], [b"", 4], [b"", "1"], [b"", True], None],
    ids=["bytes", "empty", "text", "position-0", "past-the-end", "text-position", "bool", "none"],
)
def test_write_results_refuse_a_reply_not_the_scripts(reply: Any) -> None:
    with pytest.raises(sharedcache.redis.exceptions.ResponseError):
        sharedcache.write_results(reply, 3)


_ARGUMENT = st.one_of(
    st.binary(max_size=64),
    st.binary(min_size=6000, max_size=9000),  # past redis-py's buffer cutoff
    st.text(max_size=32),
    st.integers(-(2**63), 2**63 - 1),
)


@given(
    st.lists(
        st.tuples(st.sampled_from(["EVALSHA", "SET", "GET", b"PTTL"]), st.lists(_ARGUMENT)),
        min_size=1,
        max_size=4,
    )
)
def test_commands_are_packed_as_redis_py_packs_them(
    commands: list[tuple[Any, list[Any]]],
) -> None:
    conn = sharedcache.redis.asyncio.Connection()
    packed = [(name, *arguments) for name, arguments in commands]
    assert sharedcache._packed(conn, *packed) == b"".join(conn.pack_commands(packed))


def test_hiredis_packs_the_commands() -> None:
    # Where it no longer can, redis-py's packer is used: slower, not wrong.
    assert sharedcache._PACK is not None


# -- a real Redis ---------------------------------------------------------------


async def settled(cache: SharedCache) -> None:
    """Wait until the queued writes are sent."""
    await wait_for(lambda: not cache._pending and cache._flusher is None)


async def test_second_mx_host_answers_without_dns(
    redis_server: Callable[..., RedisProcess], policy_server: Callable[..., Awaitable[Running]]
) -> None:
    redis = redis_server()
    first = await policy_server(zone=ZONE, shared_cache=redis.url, result_cache_ttl=0)
    second = await policy_server(zone=ZONE, shared_cache=redis.url, result_cache_ttl=0)
    expected = header("Pass", "a@pass.example", GOOD_IP)
    client = await first.connect()
    assert await client.ask(request("a@pass.example", ip=GOOD_IP)) == expected
    assert first.dns.queries > 0
    await settled(shared(first))
    assert shared(first).stats.writes >= 3  # TXT, A of mail.pass.example, MX...

    client = await second.connect()
    assert await client.ask(request("a@pass.example", ip=GOOD_IP)) == expected
    assert second.dns.queries == 0
    assert shared(second).stats.hits >= 3
    assert second.server.errors == 0
    # The Redis TTL is the remaining TTL: at most the zone's 300 s.
    key = shared(first)._key("pass.example", "TXT").decode()
    assert 0 < int(redis.command("PTTL", key)) <= 300_000
    line = summary_line(second.server.snapshot())
    assert f"shared_cache[up hits={shared(second).stats.hits} " in line


async def test_garbage_under_the_prefix_reads_as_a_miss(
    redis_server: Callable[..., RedisProcess], policy_server: Callable[..., Awaitable[Running]]
) -> None:
    redis = redis_server()
    running = await policy_server(zone=ZONE, shared_cache=redis.url, result_cache_ttl=0)
    cache = shared(running)
    junk = {
        0: b"garbage",
        1: b"\x07" + encode("TXT", 300.0, ((b"v=spf1 +all",),))[1:],  # another version
        2: encode("TXT", 300.0, ((b"v=spf1 +all",),))[:-3],  # truncated
        3: b"\x01" * (MAX_ENTRY + 1),  # too large
    }
    for i, value in junk.items():
        redis.command("SET", cache._key(f"d{i}.example", "TXT"), value, "PX", "60000")
    redis.command("HSET", cache._key("d4.example", "TXT"), "f", "v")  # WRONGTYPE
    good = encode("TXT", 300.0, ((b"v=spf1 +all",),))
    redis.command("SET", cache._key("d5.example", "TXT"), good)  # no TTL: not ours
    client = await running.connect()
    for i in range(6):
        assert await client.ask(request(sender(i), ip=GOOD_IP)) == header(
            "Pass", sender(i), GOOD_IP
        )
    assert cache.stats.undecodable == 6
    assert cache.stats.hits == 0
    assert running.dns.queries >= 6
    assert running.server.errors == 0
    assert not cache.down


async def _load(
    running: Running, first: int, count: int, *, concurrency: int = 8, gap: float = 0.0
) -> list[float]:
    """Ask for ``count`` senders from ``first`` on, each a miss in the first
    level; assert each answer; the latencies."""
    latencies: list[float] = []
    queue = list(range(first, first + count))
    gc.collect()  # not in the middle of the measured requests

    async def smtpd() -> None:
        client = await running.connect()
        while queue:
            i = queue.pop(0)
            started = time.perf_counter()
            answer = await client.ask(request(sender(i), ip=GOOD_IP))
            latencies.append(time.perf_counter() - started)
            assert answer == header("Pass", sender(i), GOOD_IP)
            if gap:
                await asyncio.sleep(gap)

    async with asyncio.timeout(60):
        await asyncio.gather(*(smtpd() for _ in range(concurrency)))
    return latencies


def _check_bound(baseline: list[float], latencies: list[float]) -> None:
    """Within normal latency plus the timeout: a request in flight when Redis
    fails pays the deadline once, or at worst twice (two reads in a row, the
    second the one that starts the outage); then none does. The worst case
    has 0.5 s of room: in a full run, the 8 requests in flight at once all
    took 0.37 s once (a pause of the whole test process, a collection of
    its heap or the machine), which says nothing of Redis. Anything waiting
    on redis-py's connect timeout (1 s) or a retry still fails it, and the
    median says most requests pay nothing."""
    allowed = max(baseline) + 2 * TIMEOUT + 0.5
    assert max(latencies) <= allowed, (max(latencies), allowed)
    assert statistics.median(latencies) <= statistics.median(baseline) + TIMEOUT / 2


FAULTS = ["stopped", "paused", "maxmemory"]


@pytest.mark.parametrize("fault", FAULTS)
async def test_redis_failing_under_load_costs_no_answer(
    fault: str,
    redis_server: Callable[..., RedisProcess],
    policy_server: Callable[..., Awaitable[Running]],
) -> None:
    redis = redis_server()
    running = await policy_server(zone=ZONE, shared_cache=redis.url, result_cache_ttl=0)
    cache = shared(running)
    baseline = await _load(running, 0, 60)
    await settled(cache)
    assert cache.stats.writes > 0
    errors = cache.stats.errors  # timeouts of a busy machine may come before the fault
    if fault == "stopped":
        redis.stop()
    elif fault == "paused":
        redis.pause()
    else:
        redis.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
        redis.command("CONFIG", "SET", "maxmemory", "1")
    try:
        latencies = await _load(running, 100, 120, gap=0.01)
        await settled(cache)
    finally:
        if fault == "paused":
            redis.resume()
    assert running.server.errors == 0
    assert cache.stats.errors > errors
    _check_bound(baseline, latencies)
    if fault == "maxmemory":
        assert cache.stats.write_errors > 0
        assert not cache.down  # reads go on: only writes are refused
        redis.command("CONFIG", "SET", "maxmemory", "0")
    elif fault == "stopped":
        assert cache.down
        redis.start()  # the same socket path: Redis returns
    # Redis is back: the server reconnects (after its backoff) and writes
    # and reads again.
    writes = cache.stats.writes
    async with asyncio.timeout(40):
        i = 250
        while cache.down or cache.stats.writes == writes:
            await _load(running, i, 1)
            await settled(cache)
            i += 1
            await asyncio.sleep(0.1)
    resolver = running.server.resolver
    resolver.cache.clear()  # as a second host would: only Redis knows d{i-1} now
    queries, hits = running.dns.queries, cache.stats.hits
    await _load(running, i - 1, 1)
    assert cache.stats.hits > hits
    assert running.dns.queries - queries < 2  # the HELO name, not cached in Redis
    assert running.server.errors == 0


async def test_a_restarted_redis_costs_no_outage(
    redis_server: Callable[..., RedisProcess], policy_server: Callable[..., Awaitable[Running]]
) -> None:
    """Redis restarted between two operations (an upgrade, a reboot of its
    host): the connections kept from before are closed by then. The next
    read and write find that out and go on a new connection, within their
    deadline: no error, no outage, nothing skipped."""
    redis = redis_server()
    running = await policy_server(zone=ZONE, shared_cache=redis.url)
    cache = shared(running)
    client = await running.connect()
    await client.ask(request(sender(0), ip=GOOD_IP))
    await settled(cache)
    assert len(cache._idle) >= 2  # kept for the next operations
    redis.stop()
    redis.start()  # the same socket path, an empty Redis
    before = cache.stats.read_batches
    await client.ask(request(sender(1), ip=GOOD_IP))
    await settled(cache)
    stats = cache.stats
    assert stats.read_batches > before
    assert (stats.errors, stats.outages, stats.skipped, stats.writes_dropped) == (0, 0, 0, 0)
    assert not cache.down
    assert redis.command("KEYS", "spfpolicy:*")  # written after the restart
    assert running.server.errors == 0


async def test_a_burst_of_writes_goes_in_few_batches(
    redis_server: Callable[..., RedisProcess],
) -> None:
    """Writes go one batch after another: a burst larger than one (a busy
    host's backlog) is sent in batches of WRITE_BATCH, nothing dropped."""
    redis = redis_server()
    cache = SharedCache(redis.url, timeout=1.0)
    count = 4 * sharedcache.WRITE_BATCH
    try:
        for i in range(count):
            cache.put(f"d{i}.example", "TXT", 300.0, ((b"v=spf1 -all",),), 300.0)
        await settled(cache)
        stats = cache.stats
        assert (stats.writes, stats.writes_dropped, stats.write_errors) == (count, 0, 0)
        assert sum(stats.latency_counts) == 4  # trips
        assert int(redis.command("DBSIZE")) == count
    finally:
        await cache.close()


@pytest.mark.parametrize("scripts", [True, False], ids=["script", "pipelined-sets"])
async def test_writes_by_script_and_by_sets_count_and_keep_alike(
    scripts: bool, redis_server: Callable[..., RedisProcess], caplog: pytest.LogCaptureFixture
) -> None:
    """One batch of writes, one of them refused by Redis (an expiry of 0),
    by the script and by pipelined SETs (a Redis that refuses scripts): the
    same keys kept with the same values and expiries, the same counts, and
    the refusal logged."""
    redis = redis_server()
    cache = SharedCache(redis.url, timeout=1.0)
    cache._scripts = scripts
    batch = [
        (b"spfpolicy:t:a", b"first", 300_000, False),
        (b"spfpolicy:t:b", b"refused", 0, True),
        (b"spfpolicy:t:c", b"third", 60_000, True),
    ]
    try:
        await cache._write(batch)
        stats = cache.stats
        assert (stats.writes, stats.result_writes, stats.write_errors) == (1, 1, 1)
        assert (stats.errors, stats.outages) == (1, 0)
        assert not cache.down
        assert redis.command("GET", "spfpolicy:t:a") == b"first"
        assert redis.command("GET", "spfpolicy:t:c") == b"third"
        assert int(redis.command("EXISTS", "spfpolicy:t:b")) == 0
        assert 299_000 < int(redis.command("PTTL", "spfpolicy:t:a")) <= 300_000
        assert 59_000 < int(redis.command("PTTL", "spfpolicy:t:c")) <= 60_000
        refusals = [r.getMessage() for r in caplog.records if "refuses writes" in r.getMessage()]
        assert len(refusals) == 1 and "expire" in refusals[0]
        assert cache._scripts is scripts
    finally:
        await cache.close()


async def test_wrong_password_costs_no_answer(
    tmp_path: Path,
    redis_server: Callable[..., RedisProcess],
    policy_server: Callable[..., Awaitable[Running]],
) -> None:
    redis = redis_server(password="right")
    wrong = tmp_path / "redis.pass"
    wrong.write_text("wrong\n")
    right = tmp_path / "right.pass"
    right.write_text("right\n")
    good = await policy_server(
        zone=ZONE, shared_cache=redis.url, shared_cache_password_file=str(right)
    )
    baseline = await _load(good, 0, 60)
    running = await policy_server(
        zone=ZONE, shared_cache=redis.url, shared_cache_password_file=str(wrong)
    )
    latencies = await _load(running, 100, 120, gap=0.01)
    cache = shared(running)
    assert running.server.errors == 0
    assert cache.down and cache.stats.errors > 0 and cache.stats.hits == 0
    _check_bound(baseline, latencies)
    assert shared(good).stats.writes > 0
    # No password at all: Redis answers NOAUTH, an outage too (not junk).
    anonymous = await policy_server(zone=ZONE, shared_cache=redis.url)
    await _load(anonymous, 250, 20)
    assert anonymous.server.errors == 0
    assert shared(anonymous).down and shared(anonymous).stats.undecodable == 0


async def test_redis_down_at_start_does_not_stop_the_start(
    tmp_path: Path, policy_server: Callable[..., Awaitable[Running]]
) -> None:
    url = f"unix://{tmp_path}/nothing-here.sock"
    running = await policy_server(zone=ZONE, shared_cache=url)
    latencies = await _load(running, 0, 40)
    cache = shared(running)
    assert running.server.errors == 0
    assert cache.down and cache.stats.outages == 1
    assert max(latencies) < 2.0
    assert "shared_cache[DOWN " in summary_line(running.server.snapshot())


async def test_concurrent_misses_share_one_lookup(
    redis_server: Callable[..., RedisProcess], policy_server: Callable[..., Awaitable[Running]]
) -> None:
    redis = redis_server()
    running = await policy_server(zone=ZONE, shared_cache=redis.url)
    resolver = running.server.resolver
    answers = await asyncio.gather(*(resolver.resolve("d1.example", "TXT") for _ in range(20)))
    assert len({a.records for a in answers}) == 1
    cache = shared(running)
    assert cache.stats.misses == 1  # one Redis lookup for the twenty
    assert running.dns.queries == 1


async def test_metrics_show_the_shared_cache(
    redis_server: Callable[..., RedisProcess], policy_server: Callable[..., Awaitable[Running]]
) -> None:
    pytest.importorskip("prometheus_client")
    from spfpolicy.metrics import MetricsEndpoint

    redis = redis_server()
    running = await policy_server(zone=ZONE, shared_cache=redis.url)
    await _load(running, 0, 5)
    text, _ = MetricsEndpoint(running.server.snapshot).render()
    body = text.decode()
    for name in (
        "spfpolicy_shared_cache_hits_total",
        "spfpolicy_shared_cache_misses_total 6.0",  # five senders, one HELO name
        "spfpolicy_shared_cache_errors_total 0.0",
        "spfpolicy_shared_cache_down 0.0",
        "spfpolicy_shared_cache_duration_seconds_bucket",
    ):
        assert name in body


def test_redis_is_imported_only_when_shared_cache_is_set() -> None:
    code = (
        "import sys, spfpolicy.server, spfpolicy.lifecycle\n"
        "from spfpolicy.config import Settings\n"
        "spfpolicy.server.PolicyServer(Settings())\n"
        "assert 'redis' not in sys.modules, 'redis'\n"
        "assert 'spfpolicy.sharedcache' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
