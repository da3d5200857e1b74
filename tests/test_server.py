"""The policy server over real sockets: a PolicyServer in this process on a
unix socket in tmp_path, clients speaking the project's codec, SPF answered
by the loopback zone server (plumbing in serving.py). Connections and
listeners have their own files (test_connection.py, test_listeners.py).

Time only appears as generous upper bounds on deadlines; waiting for a
server state is done by polling with a bound, never by a fixed sleep and a
hope.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import spfpolicy.server
from hardening import BAD_IP, GOOD_IP, HELO, header, request
from serving import FAIL, FALLBACK_DEFER, PASS, SOFTFAIL, TEMPERROR, ZONE, wait_for
from spfpolicy.config import PerUserTable
from spfpolicy.protocol import PolicyRequest, encode_request

# -- decisions over the socket -------------------------------------------------

WHITELIST = (ipaddress.ip_network("198.51.100.0/24"),)

DECISIONS = [
    pytest.param({}, request(ip=GOOD_IP), PASS, id="pass"),
    pytest.param({}, request(), FAIL, id="fail"),
    pytest.param({}, request("a@soft.example"), SOFTFAIL, id="softfail"),
    pytest.param(
        {}, request("a@neutral.example"), header("Neutral", "a@neutral.example"), id="neutral"
    ),
    pytest.param({}, request("a@none.example"), header("None", "a@none.example"), id="none"),
    pytest.param(
        {}, request("a@perm.example"), header("Permerror", "a@perm.example"), id="permerror"
    ),
    pytest.param(
        {"permerror_reject": True},
        request("a@perm.example"),
        "550 5.7.24 Message rejected due to: SPF Permanent Error: Unknown mechanism found: "
        "bogus:x. Please see "
        f"http://www.openspf.net/Why?s=mfrom;id=a@perm.example;ip={BAD_IP};r=rcpt.example",
        id="permerror-reject",
    ),
    pytest.param({}, request("a@temp.example"), TEMPERROR, id="temperror-header"),
    pytest.param(
        {"temperror_defer": True},
        request("a@temp.example"),
        "defer_if_permit 4.7.24 Message deferred due to: SPF Temporary Error: DNS SERVFAIL. "
        "Please see "
        f"http://www.openspf.net/Why?s=mfrom;id=a@temp.example;ip={BAD_IP};r=rcpt.example",
        id="temperror-defer",
    ),
    pytest.param(
        {},
        request("", ip=GOOD_IP, helo="mail.pass.example"),
        "prepend Received-SPF: Pass (sender SPF authorized) identity=helo; "
        f"client-ip={GOOD_IP}; helo=mail.pass.example; envelope-from=<>; receiver=rcpt.example ",
        id="helo-pass-null-sender",
    ),
    pytest.param(
        {},
        request("", helo="mail.pass.example"),
        "550 5.7.23 Message rejected due to: SPF fail - not authorized. Please see "
        f"http://www.openspf.net/Why?s=helo;id=mail.pass.example;ip={BAD_IP};r=rcpt.example",
        id="helo-fail-null-sender",
    ),
    pytest.param(
        {"whitelist": WHITELIST},
        request(),
        "prepend X-Comment: SPF skipped for whitelisted relay - "
        f"client-ip={BAD_IP}; helo={HELO}; envelope-from=a@pass.example; receiver=rcpt.example ",
        id="whitelisted-ip",
    ),
    pytest.param(
        {},
        request(ip="127.0.0.1", helo="localhost"),
        "prepend X-Comment: SPF check N/A for local connections - "
        "client-ip=127.0.0.1; helo=localhost; envelope-from=a@pass.example; "
        "receiver=rcpt.example ",
        id="skip-addresses-localhost",
    ),
    pytest.param({"test_only": 0}, request(), "dunno", id="test-only-0-fail"),
]


@pytest.mark.parametrize(("changes", "attributes", "expected"), DECISIONS)
async def test_decision_over_the_socket(
    policy_server: Any, changes: dict[str, Any], attributes: dict[str, str], expected: str
) -> None:
    running = await policy_server(**changes)
    client = await running.connect()
    assert await client.ask(attributes) == expected
    assert running.server.errors == 0


async def test_second_recipient_of_a_message_gets_no_second_header(policy_server: Any) -> None:
    running = await policy_server()
    client = await running.connect()
    first = request(ip=GOOD_IP, instance="msg.1")
    second = request(ip=GOOD_IP, instance="msg.1", recipient="other@rcpt.example")
    assert await client.ask(first) == PASS
    assert await client.ask(second) == "dunno"
    # A new message from the same client gets its header again.
    assert await client.ask(request(ip=GOOD_IP, instance="msg.2")) == PASS


async def test_answers_the_memo_keeps_are_logged_for_each_request(
    policy_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # The memo's kept answers are given to many requests (the header's
    # replay to every later recipient, from any client); the server keeps
    # their log lines, which must still name each request's own client.
    running = await policy_server()
    client = await running.connect()
    caplog.set_level(logging.INFO, logger="spfpolicy")
    other = "192.0.2.11"
    lines: dict[tuple[int, str], list[str]] = {}
    for round_ in range(3):  # the memo keeps a verdict on the second, answers the third
        for ip in (GOOD_IP, other):
            instance = f"m{round_}.{ip}"
            caplog.clear()
            assert await client.ask(request(ip=ip, instance=instance)) == header(
                "Pass", "a@pass.example", ip
            )
            second = request(ip=ip, instance=instance, recipient="b@rcpt.example")
            assert await client.ask(second) == "dunno"
            logged = [r.getMessage() for r in caplog.records if " client=" in r.getMessage()]
            assert len(logged) == 2
            assert all(f"client={ip} helo={HELO!r} sender='a@pass.example'" in x for x in logged)
            lines[(round_, ip)] = logged
    for ip in (GOOD_IP, other):
        assert lines[(0, ip)] == lines[(1, ip)] == lines[(2, ip)]
    assert running.server.memo.hits >= 2
    assert running.server._rendered  # the kept answers' lines were kept


@pytest.mark.parametrize("kind", [pytest.param("junk", id="other"), pytest.param("", id="empty")])
async def test_other_request_types_get_dunno(policy_server: Any, kind: str) -> None:
    running = await policy_server()
    client = await running.connect()
    assert await client.ask(request(request=kind)) == "DUNNO"
    assert await client.ask(request()) == FAIL


# -- never down ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("defer", "fallback"),
    [pytest.param(False, "dunno", id="dunno"), pytest.param(True, FALLBACK_DEFER, id="defer")],
)
async def test_failing_decision_gets_the_fallback(
    policy_server: Any, monkeypatch: pytest.MonkeyPatch, defer: bool, fallback: str
) -> None:
    real_decide = spfpolicy.server.decide

    async def decide(request: Any, *args: Any, **kwargs: Any) -> Any:
        if request.get("queue_id") == "BOOM":
            raise RuntimeError("a bug in the policy")
        return await real_decide(request, *args, **kwargs)

    monkeypatch.setattr(spfpolicy.server, "decide", decide)
    running = await policy_server(temperror_defer=defer)
    client = await running.connect()
    assert await client.ask(request(queue_id="BOOM")) == fallback
    assert await client.ask(request()) == FAIL
    assert running.server.errors == 1


@pytest.mark.parametrize(
    ("defer", "fallback"),
    [pytest.param(False, "dunno", id="dunno"), pytest.param(True, FALLBACK_DEFER, id="defer")],
)
async def test_request_deadline(policy_server: Any, defer: bool, fallback: str) -> None:
    running = await policy_server(request_timeout=1.0, lookup_time=30, temperror_defer=defer)
    running.dns.default_fault = "timeout"
    client = await running.connect()
    started = time.monotonic()
    assert await client.ask(request()) == fallback
    assert time.monotonic() - started < 1.0 + 1.0
    assert running.server.errors == 1
    # The connection lives on. Other names: the timed-out lookups (the HELO
    # name's, and the sender domain's, prefetched at once) are still in flight.
    running.dns.default_fault = None
    later = request("a@soft.example", ip=GOOD_IP, helo="mail.pass.example")
    assert await client.ask(later) == header("Pass", "a@soft.example", GOOD_IP, "mail.pass.example")


@pytest.mark.parametrize(
    ("defer", "expected", "bound"),
    [
        # HELO and MAIL FROM each use up Lookup_Time.
        pytest.param(False, TEMPERROR, 2 * 1.0 + 2.0, id="header"),
        # The HELO temperror defers at once.
        pytest.param(
            True,
            "defer_if_permit 4.7.24 Message deferred due to: SPF Temporary Error: DNS Timeout. "
            "Please see "
            f"http://www.openspf.net/Why?s=helo;id={HELO};ip={BAD_IP};r=rcpt.example",
            1.0 + 2.0,
            id="defer",
        ),
    ],
)
async def test_lookup_time(policy_server: Any, defer: bool, expected: str, bound: float) -> None:
    running = await policy_server(lookup_time=1, temperror_defer=defer)
    running.dns.default_fault = "timeout"
    client = await running.connect()
    started = time.monotonic()
    assert await client.ask(request("a@temp.example")) == expected
    assert time.monotonic() - started < bound
    assert running.server.errors == 0  # a temperror, not a deadline


# -- result cache -----------------------------------------------------------------


async def test_result_cache_answers_a_repeated_check(policy_server: Any) -> None:
    running = await policy_server()
    client = await running.connect()
    assert await client.ask(request(ip=GOOD_IP)) == PASS
    hits, queries = running.server.snapshot().result_cache_hits, running.dns.queries
    assert await client.ask(request(ip=GOOD_IP)) == PASS  # another message, same check
    assert running.server.snapshot().result_cache_hits == hits + 2  # HELO and MAIL FROM
    assert await client.ask(request(ip=GOOD_IP)) == PASS  # a third: through the verdict memo
    assert running.server.snapshot().result_cache_hits == hits + 4
    assert running.server.memo.hits == 1
    assert running.dns.queries == queries


async def test_a_client_on_two_connections_at_once_gets_one_evaluation(
    policy_server: Any,
) -> None:
    # A sender's two messages on two connections, before either check has
    # an answer: the second request waits for the first one's evaluations.
    running = await policy_server(delay=0.05)
    first, second = await running.connect(), await running.connect()
    answers = await asyncio.gather(first.ask(request(ip=GOOD_IP)), second.ask(request(ip=GOOD_IP)))
    assert answers == [PASS, PASS]
    # The HELO check, asked by both before either had its answer. (The MAIL
    # FROM check may be worked out at once from the prefetched records by
    # the first request, and then found in the result cache by the second.)
    assert running.server.snapshot().checks_joined >= 1


async def test_known_domain_new_client_is_answered_without_a_task(policy_server: Any) -> None:
    running = await policy_server()
    client = await running.connect()
    assert await client.ask(request(ip=GOOD_IP)) == PASS
    queries, tasks = running.dns.queries, running.server.checks.evaluated_now
    # Another client of the same domain and HELO name: a new check, every
    # DNS answer it needs cached, so it is worked out in the socket callback.
    other = "192.0.2.11"
    now = running.server.answer_now(PolicyRequest(request(ip=other)))
    assert now == header("Pass", "a@pass.example", other)
    assert running.server.checks.evaluated_now == tasks + 2  # HELO and MAIL FROM
    assert running.dns.queries == queries


async def test_temperror_is_not_cached(policy_server: Any) -> None:
    running = await policy_server()
    client = await running.connect()
    assert await client.ask(request("a@temp.example")) == TEMPERROR
    hits, queries = running.server.checks.result_hits, running.dns.queries
    assert await client.ask(request("a@temp.example")) == TEMPERROR
    assert running.server.checks.result_hits == hits + 1  # the HELO None only
    assert running.dns.queries > queries


async def test_per_user_void_limit(policy_server: Any, tmp_path: Path) -> None:
    # Three void lookups before the ip4 term: permerror with the global
    # Void_Limit (2), pass with the recipient's own (5), as in policyd-spf.
    zone = {
        **ZONE,
        "void.example": [
            {
                "TXT": "v=spf1 a:nx1.void.example a:nx2.void.example a:nx3.void.example "
                "ip4:192.0.2.0/24 -all"
            }
        ],
    }
    per_user = PerUserTable(str(tmp_path / "users"), (("pu@rcpt.example", (("void_limit", 5),)),))
    running = await policy_server(zone=zone, per_user=per_user)
    client = await running.connect()

    def expected(result: str, recipient: str) -> str:
        return (
            f"prepend Received-SPF: {result} (mailfrom) identity=mailfrom; "
            f"client-ip={GOOD_IP}; helo={HELO}; envelope-from=a@void.example; "
            f"receiver={recipient} "
        )

    for recipient, result in [
        ("other@rcpt.example", "Permerror"),
        ("pu@rcpt.example", "Pass"),  # every DNS answer cached: the check tells them apart
        ("other@rcpt.example", "Permerror"),
        ("pu@rcpt.example", "Pass"),
    ]:
        answer = await client.ask(request("a@void.example", GOOD_IP, recipient=recipient))
        assert answer == expected(result, recipient)
    # The repeated checks came from the result cache, one entry per void limit.
    assert running.server.checks.result_hits >= 4


# -- shutdown ---------------------------------------------------------------------


async def test_stop_lets_a_request_in_flight_finish(policy_server: Any) -> None:
    running = await policy_server(delay=0.5)
    client = await running.connect()
    await client.send(encode_request(request()))
    await wait_for(lambda: running.server.requests == 1)
    stopping = asyncio.create_task(running.server.stop(grace=10.0))
    assert await client.answer() == FAIL
    assert await client.closed_by_server()
    await stopping
    assert not running.path.exists()


# -- the daemon as a process -------------------------------------------------------


async def _read_all(stream: asyncio.StreamReader | None) -> str:
    assert stream is not None
    return (await stream.read()).decode(errors="replace")


@pytest.mark.slow
async def test_serve_process_answers_and_exits_on_sigterm(
    zone_server: Any, tmp_path: Path, clients: Any
) -> None:
    dns = await zone_server(ZONE)
    conf = tmp_path / "spf.conf"
    conf.write_text("Log_Target = stderr\n")
    path = tmp_path / "s.sock"
    argv = ["-m", "spfpolicy", "serve", "-c", str(conf), "--listen", f"unix:{path}"]
    argv += ["--nameserver", dns.nameserver]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stderr = asyncio.create_task(_read_all(proc.stderr))
    stdout = asyncio.create_task(_read_all(proc.stdout))
    try:
        await wait_for(lambda: path.exists() or proc.returncode is not None, bound=10.0)
        assert proc.returncode is None, await stderr
        client = await clients(path)
        assert await client.ask(request()) == FAIL
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10.0):
            status = await proc.wait()
        assert await client.closed_by_server()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert status == 0, await stderr
    assert not path.exists()
    await stdout


@pytest.mark.slow
async def test_serve_process_with_missing_socket_directory(tmp_path: Path) -> None:
    conf = tmp_path / "spf.conf"
    conf.write_text("Listen = unix:/nonexistent-dir/x\nLog_Target = stderr\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *["-m", "spfpolicy", "serve", "-c", str(conf), "--nameserver", "127.0.0.1:53"],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(10.0):
        _, err = await proc.communicate()
    assert proc.returncode != 0
    message = err.decode()
    assert "/nonexistent-dir" in message
    assert "--listen" in message
