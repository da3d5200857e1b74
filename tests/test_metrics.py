"""Metrics: the label rules, the Prometheus endpoint scraped for real over
loopback from a server in this process, and the periodic stats line from a
real server process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from spfpolicy import metrics
from spfpolicy.address import HostPort
from spfpolicy.config import ListenAddress, ListenFamily, Nameserver, Settings
from spfpolicy.metrics import LATENCY_BUCKETS, ServerStats, action_label, restriction_label
from spfpolicy.policy import ActionKind
from spfpolicy.protocol import ResponseParser, encode_request
from spfpolicy.server import PolicyServer, StartupError

ZONE: dict[str, Any] = {"pass.example": [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}]}
GOOD_IP, BAD_IP = "192.0.2.10", "198.51.100.1"


def request(ip: str, n: int) -> dict[str, str]:
    return {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "client_address": ip,
        "helo_name": "mx.client.example",
        "sender": "a@pass.example",
        "recipient": "user@rcpt.example",
        "instance": f"m.{n}",
    }


@pytest.mark.parametrize(
    ("kind", "label"),
    [
        pytest.param(ActionKind.PREPEND, "prepend", id="prepend"),
        pytest.param(ActionKind.DUNNO, "dunno", id="dunno"),
        pytest.param(ActionKind.REJECT, "550", id="550"),
        pytest.param(ActionKind.DEFER, "defer_if_permit", id="defer"),
    ],
)
def test_action_label_is_the_first_word_of_the_kind(kind: ActionKind, label: str) -> None:
    assert action_label(kind) == label
    assert action_label(kind, "ignored_restriction") == label


@pytest.mark.parametrize(
    ("restriction", "label"),
    [
        pytest.param("mfpass_class", "mfpass_class", id="class"),
        pytest.param("DUNNO", "dunno", id="DUNNO"),
        pytest.param("REJECT text", "reject", id="reject"),
        pytest.param("", "empty", id="empty"),
        pytest.param("  ", "empty", id="blank"),
        pytest.param(" dunno x", "dunno", id="leading-space"),
        pytest.param("Reject\ttext", "reject", id="tab"),
    ],
)
def test_restriction_label_is_its_first_word(restriction: str, label: str) -> None:
    # A pass restriction's answer is its class name alone: the label is the
    # first word of that text, lower-cased, as for every action before kinds.
    assert restriction_label(restriction) == label
    assert action_label(ActionKind.RESTRICTION, restriction) == label


def test_latency_buckets() -> None:
    stats = ServerStats()
    stats.record(ActionKind.DUNNO, None, 0.0001)
    stats.record(ActionKind.DUNNO, None, LATENCY_BUCKETS[0])  # on the bound: le= counts it
    stats.record(ActionKind.REJECT, "fail", 0.3)
    stats.record(ActionKind.PREPEND, "pass", 1000.0)  # past the last bucket: +Inf
    assert stats.latency_counts[0] == 2
    assert stats.latency_counts[LATENCY_BUCKETS.index(0.5)] == 1
    assert stats.latency_counts[-1] == 1
    assert stats.answered() == 4
    assert stats.by_outcome[("dunno", metrics.NOT_CHECKED)] == 2
    assert stats.by_action() == {"dunno": 2, "550": 1, "prepend": 1}
    stats.record(ActionKind.RESTRICTION, "pass", 0.001, "mfpass")
    assert stats.by_outcome[("mfpass", "pass")] == 1


@pytest.fixture
async def metrics_server(zone_server: Any, tmp_path: Path) -> AsyncIterator[PolicyServer]:
    dns = await zone_server(ZONE)
    settings = dataclasses.replace(
        Settings(),
        listen=(ListenAddress(ListenFamily.UNIX, path=str(tmp_path / "m.sock")),),
        nameservers=(Nameserver("127.0.0.1", dns.port),),
        metrics_listen=HostPort("127.0.0.1", 0),
    )
    server = PolicyServer(settings)
    await server.start(settings.listen)
    await server.start_metrics()
    yield server
    await server.stop(grace=1.0)


async def http_get(port: int, path: str = "/metrics", accept: str = "") -> tuple[str, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if accept:
        head += f"Accept: {accept}\r\n"
    writer.write((head + "\r\n").encode())
    async with asyncio.timeout(10):
        response = (await reader.read()).decode()
    writer.close()
    status, _, body = response.partition("\r\n\r\n")
    return status, body


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


async def test_prometheus_endpoint(metrics_server: PolicyServer, tmp_path: Path) -> None:
    pytest.importorskip("prometheus_client")
    assert metrics_server.metrics is not None
    port = metrics_server.metrics.port
    reader, writer = await asyncio.open_unix_connection(str(tmp_path / "m.sock"))
    for n, ip in enumerate([BAD_IP, GOOD_IP, GOOD_IP]):
        writer.write(encode_request(request(ip, n)))
        parser = ResponseParser()
        async with asyncio.timeout(10):
            while parser.next_response() is None:
                parser.feed(await reader.read(65536))

    status, body = await http_get(port)
    assert status.startswith("HTTP/1.1 200 OK")
    assert "Content-Type: text/plain; version=0.0.4" in status
    got = samples(body)

    def value(name: str, **labels: str) -> float:
        return got[(name, frozenset(labels.items()))]

    assert value("spfpolicy_requests_total", action="550", result="fail") == 1
    assert value("spfpolicy_requests_total", action="prepend", result="pass") == 2
    assert value("spfpolicy_request_duration_seconds_count") == 3
    assert value("spfpolicy_request_duration_seconds_bucket", le="+Inf") == 3
    assert value("spfpolicy_request_duration_seconds_sum") > 0
    assert value("spfpolicy_result_cache_hits_total") >= 1  # the repeated GOOD_IP check
    assert value("spfpolicy_result_cache_entries") >= 2
    assert value("spfpolicy_checks_joined_total") == 0  # one request at a time
    assert value("spfpolicy_dns_cache_misses_total") >= 1
    assert value("spfpolicy_dns_cache_entries") >= 1
    assert value("spfpolicy_dns_upstream_queries_total") >= 1
    assert value("spfpolicy_dns_upstream_failures_total") == 0
    assert value("spfpolicy_dns_cache_evictions_total") == 0
    assert value("spfpolicy_connections") == 1
    assert value("spfpolicy_evaluations_in_flight") == 0
    assert value("spfpolicy_requests_in_flight") == 0
    assert value("spfpolicy_request_errors_total") == 0
    assert value("spfpolicy_plans") >= 0  # compiled plans (plan.py)
    assert value("spfpolicy_plan_shapes") <= value("spfpolicy_plans")
    assert value("spfpolicy_plan_hits_total") >= 0
    assert value("spfpolicy_plan_builds_total") >= 0
    writer.close()

    # OpenMetrics when asked for it; 404 elsewhere.
    status, body = await http_get(port, accept="application/openmetrics-text; version=1.0.0")
    assert "application/openmetrics-text" in status
    assert body.rstrip().endswith("# EOF")
    status, _ = await http_get(port, "/other")
    assert status.startswith("HTTP/1.1 404")


async def test_metrics_without_prometheus_client_is_a_startup_error(
    zone_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails
    server = PolicyServer(dataclasses.replace(Settings(), metrics_listen=HostPort("127.0.0.1", 0)))
    try:
        with pytest.raises(StartupError, match=r"pip install 'spfpolicy\[metrics\]'"):
            await server.start_metrics()
    finally:
        await server.close()


@pytest.mark.slow
async def test_periodic_stats_line(zone_server: Any, tmp_path: Path) -> None:
    dns = await zone_server(ZONE)
    conf = tmp_path / "spf.conf"
    # debugLevel 0: only errors, but an explicit Stats_Interval still logs.
    conf.write_text("Log_Target = stderr\ndebugLevel = 0\nStats_Interval = 0.2\n")
    path = tmp_path / "s.sock"
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "spfpolicy", "serve", "-c", str(conf)],
        *["--listen", f"unix:{path}", "--nameserver", dns.nameserver],
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(10):
            while not path.exists():
                await asyncio.sleep(0.02)
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(encode_request(request(BAD_IP, 1)))
            parser = ResponseParser()
            while parser.next_response() is None:
                parser.feed(await reader.read(65536))
            while True:
                line = (await proc.stderr.readline()).decode()
                assert line, "no stats line"
                if "stats: requests=1 " in line:
                    break
            writer.close()
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert line.startswith("INFO spfpolicy.stats: stats: requests=1 errors=0 actions[550=1]")
    assert "dns_cache[entries=" in line
    assert "result_cache[entries=2 hits=0 joined=0]" in line  # HELO and MAIL FROM checks
    assert " plans[entries=0 shapes=0 " in line  # each domain evaluated once: no plan yet
