"""Connections over real sockets (connection.py): answers in order whether
given at once from the socket callback or after a lookup in the connection's
task, pipelining, flow control, requests cut anywhere, protocol errors.
Waiting for a server state is done by polling with a bound, never by a fixed
sleep and a hope.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

import spfpolicy.server
from hardening import GOOD_IP, request
from serving import FAIL, PASS, SOFTFAIL, mixed_requests, wait_for
from spfpolicy.protocol import encode_request


async def test_pipelined_requests_answered_in_order(policy_server: Any) -> None:
    running = await policy_server()
    client = await running.connect()
    pairs = mixed_requests(20)
    await client.send(b"".join(encode_request(attrs) for attrs, _ in pairs))
    answers = [await client.answer() for _ in pairs]
    assert answers == [expected for _, expected in pairs]


async def test_cached_requests_are_answered_at_once_and_in_order(policy_server: Any) -> None:
    running = await policy_server()
    client = await running.connect()
    assert await client.ask(request(ip=GOOD_IP)) == PASS  # now cached
    memo_hits = running.server.memo.hits
    # One write: cached, not cached (the task takes it), cached again behind it.
    batch = [request(ip=GOOD_IP), request("a@soft.example"), request(ip=GOOD_IP), request()]
    await client.send(b"".join(encode_request(attrs) for attrs in batch))
    assert [await client.answer() for _ in batch] == [PASS, SOFTFAIL, PASS, FAIL]
    assert running.server.memo.hits == memo_hits + 1  # kept the second time, used the third
    assert running.server.requests == 5
    # Later recipients of a message answered at once get no second header.
    second = request(ip=GOOD_IP, instance="m1", recipient="b@rcpt.example")
    assert await client.ask(request(ip=GOOD_IP, instance="m1")) == PASS
    assert await client.ask(second) == "dunno"


async def test_concurrent_connections(policy_server: Any) -> None:
    running = await policy_server()

    async def converse(n: int) -> list[str]:
        client = await running.connect()
        return [await client.ask(attrs) for attrs, _ in mixed_requests(3 + n % 3)]

    results = await asyncio.gather(*(converse(n) for n in range(50)))
    for n, answers in enumerate(results):
        assert answers == [expected for _, expected in mixed_requests(3 + n % 3)]
    assert running.server.requests == sum(3 + n % 3 for n in range(50))


async def test_idle_connection_is_reused(policy_server: Any) -> None:
    running = await policy_server()
    client = await running.connect()
    assert await client.ask(request()) == FAIL
    await asyncio.sleep(1.0)  # idle, as an smtpd between messages
    assert await client.ask(request(ip=GOOD_IP)) == PASS


async def test_malformed_lines_are_ignored(policy_server: Any) -> None:
    running = await policy_server()
    client = await running.connect()
    good = encode_request(request(ip=GOOD_IP))
    await client.send(b"no equals sign here\n=no name\n" + good)
    assert await client.answer() == PASS


async def test_oversized_request_closes_only_that_connection(policy_server: Any) -> None:
    running = await policy_server()
    other = await running.connect()
    assert await other.ask(request()) == FAIL
    big = await running.connect()
    with contextlib.suppress(ConnectionError):
        await big.send(b"sender=" + b"x" * (1 << 20) + b"\n\n")
    assert await big.closed_by_server()
    assert await other.ask(request(ip=GOOD_IP)) == PASS
    fresh = await running.connect()
    assert await fresh.ask(request()) == FAIL


async def test_request_written_byte_by_byte(policy_server: Any) -> None:
    running = await policy_server()
    client = await running.connect()
    data = encode_request(request(ip=GOOD_IP)) + encode_request(request())
    for i in range(len(data)):
        await client.send(data[i : i + 1])
    assert [await client.answer(), await client.answer()] == [PASS, FAIL]


@pytest.mark.parametrize(
    "kinds",
    [
        # The socket callback answers both and meets the error; the task closes.
        pytest.param("cached cached", id="cached"),
        # The task answers the second (a lookup), then the third, then closes.
        pytest.param("cached lookup cached", id="lookup"),
    ],
)
async def test_requests_before_a_protocol_error_are_answered_then_closed(
    policy_server: Any, kinds: str
) -> None:
    running = await policy_server()
    client = await running.connect()
    assert await client.ask(request(ip=GOOD_IP)) == PASS  # cached from now on
    pairs = [
        (request(ip=GOOD_IP, instance=f"m{n}"), PASS)
        if kind == "cached"
        else (request("a@soft.example", instance=f"m{n}"), SOFTFAIL)
        for n, kind in enumerate(kinds.split())
    ]
    too_long = b"sender=" + b"x" * running.server.settings.max_line_length + b"\n\n"
    await client.send(b"".join(encode_request(attrs) for attrs, _ in pairs) + too_long)
    assert [await client.answer() for _ in pairs] == [expected for _, expected in pairs]
    assert await client.closed_by_server()
    assert running.server.errors == 0


async def test_client_that_never_reads_its_answers(policy_server: Any) -> None:
    running = await policy_server(idle_timeout=1.0)
    client = await running.connect()
    assert await client.ask(request(ip=GOOD_IP)) == PASS  # cached from now on
    # ~300 B per answer: 20,000 answers are 6 MB if nothing held the server back.
    batch = b"".join(encode_request(request(ip=GOOD_IP)) for _ in range(1000))
    (connection,) = running.server.connections
    peak = 0

    async def flood() -> None:
        for _ in range(20):
            await client.send(batch)

    sender = asyncio.create_task(flood())
    try:
        async with asyncio.timeout(15):
            while running.server.connections:
                assert connection._transport is not None
                peak = max(peak, connection._transport.get_write_buffer_size())
                await asyncio.sleep(0.01)
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sender
    # Answers stop at the transport's high-water mark, reading stops with them,
    # and Idle_Timeout closes the connection, answers unsent and all.
    assert 0 < peak < 1_000_000
    await wait_for(lambda: connection._lost)  # the socket is closed, not left draining
    with contextlib.suppress(ConnectionError):
        await client.close()


async def test_failing_fast_path_leaves_the_request_to_the_task(
    policy_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def decide_now(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug on the fast path")

    running = await policy_server()
    client = await running.connect()
    assert await client.ask(request(ip=GOOD_IP)) == PASS
    monkeypatch.setattr(spfpolicy.server, "decide_now", decide_now)
    assert await client.ask(request(ip=GOOD_IP)) == PASS  # cached, answered by the task
    assert running.server.errors == 0
