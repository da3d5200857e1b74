"""Per-domain statistics end to end: a real PolicyServer answering over a unix
socket with loopback DNS, its table read as JSON from ``/domains`` on the
metrics listener, the Prometheus side without domain labels, the result
change warning from the server's own path, and ``spfpolicy top`` against it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from fakeclock import FakeClock
from hardening import BAD_IP, GOOD_IP, request
from serving import ZONE, Client, settings_for
from spfpolicy import cli
from spfpolicy.address import HostPort
from spfpolicy.domainstats import MIN_SUPPORT, DomainStats
from spfpolicy.server import PolicyServer

pytest.importorskip("prometheus_client")


@pytest.fixture
async def server(zone_server: Any, tmp_path: Path) -> AsyncIterator[PolicyServer]:
    dns = await zone_server(ZONE)
    settings = settings_for(
        dns, tmp_path / "d.sock", metrics_listen=HostPort("127.0.0.1", 0), domain_stats_size=50
    )
    server = PolicyServer(settings)
    await server.start(settings.listen)
    await server.start_metrics()
    yield server
    await server.stop(grace=1.0)


async def http_get(port: int, path: str) -> tuple[str, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    async with asyncio.timeout(10):
        response = (await reader.read()).decode()
    writer.close()
    head, _, body = response.partition("\r\n\r\n")
    return head, body


async def send_traffic(client: Client) -> None:
    for _ in range(3):
        assert (await client.ask(request(ip=GOOD_IP))).startswith("prepend")
    assert (await client.ask(request(ip=BAD_IP))).startswith("550")
    assert (await client.ask(request("a@perm.example"))).startswith("prepend")
    assert (await client.ask(request("", helo="MAIL.pass.example", ip=GOOD_IP))).startswith(
        "prepend"
    )


async def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    # The command blocks on its HTTP request: a thread, so this loop serves it.
    code = await asyncio.to_thread(cli.main, argv)
    out, err = capsys.readouterr()
    return code, out, err


async def test_domains_json_over_http(
    server: PolicyServer, clients: Callable[..., Awaitable[Client]], tmp_path: Path
) -> None:
    assert server.metrics is not None
    client = await clients(tmp_path / "d.sock")
    await send_traffic(client)

    head, body = await http_get(server.metrics.port, "/domains?n=5")
    assert head.startswith("HTTP/1.1 200 OK")
    assert "Content-Type: application/json" in head
    doc = json.loads(body)
    assert doc["identity"].startswith("sender domain")
    assert doc["recorded"] == 6
    top = {row["domain"]: row for row in doc["top"]}
    assert list(top) == ["pass.example", "mail.pass.example", "perm.example"]
    assert top["pass.example"] == {
        "domain": "pass.example",
        "count": 4,
        "error": 0,
        "min": 4,
        "max": 4,
        "failing": 1,
        "results": {"pass": 3, "fail": 1},
        "actions": {"prepend": 3, "550": 1},
    }
    assert top["perm.example"]["results"] == {"permerror": 1}
    assert top["mail.pass.example"]["results"] == {"pass": 1}  # the HELO name, null sender
    assert [row["domain"] for row in doc["failing"]] == ["pass.example", "perm.example"]
    assert doc["entries"] == 3 and doc["max_entries"] == 300
    assert doc["approx_bytes"] > 0

    # Prometheus: the table's size, and no domain anywhere in the exposition.
    head, metrics_text = await http_get(server.metrics.port, "/metrics")
    assert "spfpolicy_domain_stats_entries 3.0" in metrics_text
    assert "spfpolicy_domain_stats_bytes " in metrics_text
    assert "spfpolicy_domain_result_changes_total 0.0" in metrics_text
    assert "example" not in metrics_text


async def test_result_change_is_logged_once_by_the_server(
    server: PolicyServer,
    clients: Callable[..., Awaitable[Client]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock(now=0.0)
    server.domains = DomainStats(50, clock=clock)
    client = await clients(tmp_path / "d.sock")
    for _ in range(MIN_SUPPORT + 1):
        await client.ask(request(ip=GOOD_IP))  # pass
    clock.now += 700  # the next 10-minute bucket: the sender now fails
    with caplog.at_level(logging.WARNING, logger="spfpolicy.domainstats"):
        for _ in range(MIN_SUPPORT + 3):
            await client.ask(request(ip=BAD_IP))
    warnings = [r.getMessage() for r in caplog.records if r.name == "spfpolicy.domainstats"]
    assert len(warnings) == 1
    assert "pass.example" in warnings[0] and "pass before" in warnings[0]
    assert server.metrics is not None
    _, body = await http_get(server.metrics.port, "/domains")
    changes = json.loads(body)["changes"]
    assert [(c["domain"], c["before"], c["after"]) for c in changes] == [
        ("pass.example", "pass", "fail")
    ]


async def test_top_reads_the_running_server(
    server: PolicyServer,
    clients: Callable[..., Awaitable[Client]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert server.metrics is not None
    port = server.metrics.port
    client = await clients(tmp_path / "d.sock")
    await send_traffic(client)

    code, out, err = await run_cli(["top", "--connect", f"127.0.0.1:{port}", "-n", "2"], capsys)
    assert (code, err) == (0, "")
    volume, failing, changes = out.split("\n\n")[1:]
    assert volume.splitlines()[1].split() == ["domain", "count", "±", "pass", "fail", "permerror"]
    assert volume.splitlines()[2].split() == ["pass.example", "4", "0", "3", "1", "0"]
    assert len(volume.splitlines()) == 4  # title, header, -n 2 rows
    assert failing.splitlines()[2].split()[:3] == ["pass.example", "1", "4"]
    assert "(none)" in changes

    # Metrics_Listen read from -c FILE; --json prints the document.
    conf = tmp_path / "spf.conf"
    conf.write_text(f"Metrics_Listen = 127.0.0.1:{port}\n")
    code, out, _ = await run_cli(["top", "-c", str(conf), "--json"], capsys)
    assert code == 0
    assert json.loads(out)["top"][0]["domain"] == "pass.example"


async def test_top_without_a_server(
    unused_tcp_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = await run_cli(["top", "--connect", f"127.0.0.1:{unused_tcp_port}"], capsys)
    assert code == 1
    assert err.startswith(f"spfpolicy top: cannot read http://127.0.0.1:{unused_tcp_port}/domains")
    conf = tmp_path / "spf.conf"
    conf.write_text("debugLevel = 1\n")
    code, _, err = await run_cli(["top", "-c", str(conf)], capsys)
    assert code == 1
    assert "metrics are off (no Metrics_Listen" in err


async def test_domain_stats_off(
    zone_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dns = await zone_server(ZONE)
    settings = settings_for(
        dns, tmp_path / "o.sock", metrics_listen=HostPort("127.0.0.1", 0), domain_stats_size=0
    )
    server = PolicyServer(settings)
    try:
        await server.start(settings.listen)
        await server.start_metrics()
        assert server.domains is None and server.metrics is not None
        head, body = await http_get(server.metrics.port, "/domains")
        assert head.startswith("HTTP/1.1 404")
        assert "Domain_Stats_Size = 0" in json.loads(body)["error"]
        port = server.metrics.port
        code, _, err = await run_cli(["top", "--connect", f"127.0.0.1:{port}"], capsys)
        assert code == 1
        assert "per-domain statistics are off (Domain_Stats_Size = 0)" in err
    finally:
        await server.stop(grace=1.0)
