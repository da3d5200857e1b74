"""spfpolicy bench: small, fast runs of every workload and target, the answer
checks, the JSON report, and the spawn(8) baseline mode. No timing assertions:
speed is measured by running the bench, not by the test suite.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from spfpolicy import cli
from spfpolicy.bench.loadgen import (
    BenchConfig,
    BenchError,
    TargetResult,
    baseline_argv,
    classify,
    format_report,
    launcher_path,
    run_sync,
    write_plot,
)
from spfpolicy.bench.workloads import Message, Workload, WorkloadKind, parse_mix
from spfpolicy.bench.zone import helo_address, helo_has_spf, helo_name, parse_domain
from spfpolicy.protocol import RequestParser

SMALL = {"requests": 300, "concurrency": 10, "dns_delay": 0.001, "progress": False}
POLICYD_SPF = Path("/usr/bin/policyd-spf")


def _run(**changes: object) -> dict:
    return run_sync(BenchConfig(**{**SMALL, **changes}))  # type: ignore[arg-type]


def _only(data: dict) -> dict:
    (target,) = data["targets"]
    return target


# ------------------------------------------------------------------ pure parts


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        pytest.param("dunno", ("dunno", None), id="dunno"),
        pytest.param("DUNNO", ("dunno", None), id="DUNNO"),
        pytest.param(
            "prepend Received-SPF: Pass (mailfrom) identity=mailfrom; client-ip=10.0.0.1 ",
            ("prepend", "pass"),
            id="received-spf",
        ),
        pytest.param(
            "prepend Authentication-Results: mx.example; spf=softfail smtp.mailfrom=a@b.example",
            ("prepend", "softfail"),
            id="authentication-results",
        ),
        pytest.param("550 5.7.23 Message rejected due to: SPF fail", ("reject", "fail"), id="fail"),
        pytest.param("550 5.7.24 Message rejected", ("reject", "permerror"), id="permerror"),
        pytest.param("defer_if_permit 4.7.24 later", ("defer", "temperror"), id="defer"),
        pytest.param("OK", ("other", None), id="other"),
    ],
)
def test_classify(action: str, expected: tuple[str, str | None]) -> None:
    assert classify(action) == expected


def test_parse_mix() -> None:
    mix = parse_mix("pass=1, fail=3")
    assert mix["pass"] == 1 and mix["fail"] == 3 and mix["none"] == 0
    for bad in ("pass", "bogus=1", "pass=-1", "pass=0", "pass=x"):
        with pytest.raises(ValueError):
            parse_mix(bad)


def test_helo_names_round_trip() -> None:
    for ip in ("100.64.0.7", "fd99::1:1"):
        assert helo_address(helo_name(ip)) == ip


@pytest.mark.parametrize("kind", list(WorkloadKind))
def test_workload_is_deterministic_and_parses(kind: WorkloadKind) -> None:
    def first(seed: int) -> list[bytes]:
        messages = itertools.islice(Workload(kind=kind, seed=seed).messages(), 200)
        return [r.data for m in messages for r in m.requests]

    data = first(7)
    assert data == first(7)
    assert data != first(8)
    parser = RequestParser()
    parser.feed(b"".join(data))
    requests = []
    while (request := parser.next_request()) is not None:
        requests.append(request)
    assert len(requests) == len(data)
    for request in requests:
        assert request.request == "smtpd_access_policy"
        assert request.protocol_state == "RCPT"
        assert request.client_address and request.helo_name and request.instance
        assert not request.warnings


def test_multi_recipient_messages_share_the_instance() -> None:
    messages = list(itertools.islice(Workload(seed=3).messages(), 300))
    multi = [m for m in messages if len(m.requests) > 1]
    assert multi
    for message in multi[:20]:
        instances = {_attr(r.data, "instance") for r in message.requests}
        assert len(instances) == 1
        assert [r.first for r in message.requests] == [True] + [False] * (len(message.requests) - 1)


def _attr(data: bytes, name: str) -> str:
    for line in data.decode().splitlines():
        key, _, value = line.partition("=")
        if key == name:
            return value
    raise KeyError(name)


def _names(message: Message, seed: int) -> tuple[str, int, str, int]:
    """(HELO name, its depth, sender domain or "", its depth), read from the request."""
    data = message.requests[0].data
    helo = _attr(data, "helo_name")
    helo_depth = 2 if helo_has_spf(_attr(data, "client_address")) else 1
    domain = _attr(data, "sender").rpartition("@")[2]
    if not domain:
        return helo, helo_depth, "", 0
    parsed = parse_domain(seed, domain)
    assert parsed is not None
    return helo, helo_depth, domain, parsed.depth


def test_zipf_cold_rtts_count_only_names_new_to_the_stream() -> None:
    seed = 4
    messages = list(itertools.islice(Workload(seed=seed).messages(), 3000))
    seen_helos: set[str] = set()
    seen_domains: set[str] = set()
    warm = null = 0
    for index, message in enumerate(messages):
        helo, helo_depth, domain, domain_depth = _names(message, seed)
        assert message.critical_path == helo_depth + domain_depth  # unchanged meaning
        if index == 0:
            assert message.cold_rtts == max(helo_depth, domain_depth) > 0
        if not domain:
            null += 1
            assert message.cold_rtts == (0 if helo in seen_helos else helo_depth)
        elif helo in seen_helos and domain in seen_domains:
            warm += 1
            assert message.cold_rtts == 0
        else:
            helo_part = 0 if helo in seen_helos else helo_depth
            domain_part = 0 if domain in seen_domains else domain_depth
            assert message.cold_rtts == max(helo_part, domain_part) > 0
        seen_helos.add(helo)
        if domain:
            seen_domains.add(domain)
    assert warm > 100 and null > 10


def test_hot_cold_rtts_only_at_each_tuples_first_sighting() -> None:
    seed = 6
    messages = itertools.islice(Workload(kind=WorkloadKind.HOT, seed=seed).messages(), 500)
    tuples: set[tuple[str, str, str]] = set()
    clients: set[str] = set()
    cold = 0
    for message in messages:
        data = message.requests[0].data
        client = _attr(data, "client_address")
        key = (client, _attr(data, "helo_name"), _attr(data, "sender"))
        if key in tuples:
            assert message.cold_rtts == 0
        elif client not in clients:  # a new HELO name: at least its TXT lookup
            assert message.cold_rtts >= _names(message, seed)[1]
        cold += message.cold_rtts > 0
        tuples.add(key)
        clients.add(client)
    assert 0 < cold <= len(tuples) <= 10


def test_only_the_first_pass_over_messages_is_cold() -> None:
    message = next(Workload(seed=2).messages())
    result = TargetResult("spfpolicy", "spfpolicy")
    result.count_message(message, 0)
    result.count_message(message, 1)
    assert result.cold_rtts == message.cold_rtts > 0
    assert result.cold_messages == 1
    assert list(result.critical_paths) == [message.critical_path] * 2


@pytest.mark.parametrize(
    ("cold_rtts", "dns_delay", "ceiling"),
    [
        pytest.param(50, 0.02, 100_000.0, id="50-rtts-of-20ms"),
        pytest.param(1000, 0.02, 5_000.0, id="one-rtt-per-request"),
        pytest.param(0, 0.02, None, id="all-cached"),
        pytest.param(50, 0.0, None, id="no-dns-delay"),
        pytest.param(50, None, None, id="dns-not-the-benchs"),
    ],
)
def test_dns_bound_ceiling(cold_rtts: int, dns_delay: float | None, ceiling: float | None) -> None:
    result = TargetResult(
        "spfpolicy",
        "spfpolicy",
        requests=1000,
        concurrency=100,
        cold_rtts=cold_rtts,
        dns_delay=dns_delay,
    )
    assert result.summary()["dns_bound_requests_per_s"] == ceiling


def _report_for(result: TargetResult, **config_changes: object) -> str:
    config = {
        "workload": "zipf",
        "seed": 1,
        "mix": {"pass": 70.0},
        "concurrency": result.concurrency,
        "max_use": 100,
        "requests": 1000,
        "duration_s": 10.0,
        "dns_delay_s": 0.02,
        "cpus": 2,
        **config_changes,
    }
    return format_report({"config": config, "targets": [result.summary()], "ratios": []})


def test_report_prints_the_ceiling_when_known() -> None:
    result = TargetResult(
        "spfpolicy",
        "spfpolicy",
        requests=26_752,
        messages=19_000,
        concurrency=100,
        cold_rtts=14_110,
        cold_messages=14_021,
        dns_delay=0.02,
    )
    assert (
        "DNS-bound ceiling 9,480 req/s (14,021 of 19,000 messages wait for uncached lookups)"
        in _report_for(result)
    )
    result.dns_delay = None
    assert "DNS-bound" not in _report_for(result)
    assert "warm-up" not in _report_for(result)
    assert "CPUs, after 5,000 warm-up requests\n" in _report_for(result, warmup_requests=5000)


def test_baseline_argv_wraps_python_programs(tmp_path: Path) -> None:
    script = tmp_path / "policy"
    script.write_text("#!/usr/bin/env python3\n")
    argv = baseline_argv(f"{script} conf", "127.0.0.1:5300", None)
    assert argv == [
        "python3",
        str(launcher_path()),
        "--dns",
        "127.0.0.1:5300",
        "--",
        str(script),
        "conf",
    ]
    assert baseline_argv("prog --ns {dns} {conf}", "127.0.0.1:53", tmp_path / "c") == [
        "prog",
        "--ns",
        "127.0.0.1:53",
        str(tmp_path / "c"),
    ]
    with pytest.raises(BenchError, match="not a Python program"):
        baseline_argv("/bin/cat", "127.0.0.1:53", None)


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(BenchError, match="pip install"):
        write_plot({"raw": [], "config": {}}, "x.png")


# ------------------------------------------------------------------ runs


@pytest.mark.parametrize("workload", list(WorkloadKind))
def test_spfpolicy_answers_agree_with_the_zone(workload: WorkloadKind) -> None:
    target = _only(_run(workload=workload, seed=5))
    assert target["name"] == "spfpolicy"
    assert target["requests"] >= 300
    assert target["errors"] == 0 and target["timeouts"] == 0
    assert target["contradictions"] == 0, target["contradiction_examples"]
    assert target["unclassified"] == 0, target["contradiction_examples"]
    assert target["results"] == target["expected_results"]
    assert target["dns_queries"] > 0
    assert target["peak_rss_bytes"] > 0
    assert target["connections"] >= 10
    assert 0 < target["cold_messages"] <= target["messages"]
    assert target["cold_rtts"] >= target["cold_messages"]
    if workload is WorkloadKind.HOT:
        assert target["cold_messages"] <= 10  # one per tuple at most
    assert target["dns_bound_requests_per_s"] > 0


def test_same_seed_same_results() -> None:
    one = _only(_run(seed=11, requests=200))
    two = _only(_run(seed=11, requests=200))
    for key in ("requests", "messages", "results", "expected_results", "actions"):
        assert one[key] == two[key]


def test_bare_and_spfpolicy_in_one_run_with_ratios() -> None:
    data = _run(workload=WorkloadKind.HOT, targets=["spfpolicy", "bare"])
    _, bare = data["targets"]
    assert bare["name"] == "bare"
    assert bare["actions"] == {"dunno": bare["requests"]}
    assert bare["contradictions"] == 0 and bare["dns_queries"] == 0
    assert bare["dns_bound_requests_per_s"] is None  # no lookups, no DNS bound
    (ratios,) = data["ratios"]
    assert ratios["target"] == "spfpolicy" and ratios["versus"] == "bare"
    assert ratios["requests_per_s"] > 0


def test_dropped_temperror_domains_with_and_without_hold_down(tmp_path: Path) -> None:
    conf = tmp_path / "spfpolicy.conf"
    conf.write_text(
        "debugLevel = 0\nLog_Target = stderr\nLookup_Time = 1\n"
        "Slow_Domain_Threshold = 2\nSlow_Domain_Hold = 60\n"
    )
    data = _run(
        seed=2,
        mix={"pass": 70, "temperror": 30},
        domains=60,  # few temperror domains: each comes back within the window
        drop_temperror=True,
        server_config=str(conf),
        targets=["spfpolicy", "spfpolicy-nohold"],
    )
    assert data["config"]["drop_temperror"] is True
    held, waited = data["targets"]
    assert waited["name"] == "spfpolicy-nohold"
    for target in (held, waited):
        assert target["contradictions"] == 0, target["contradiction_examples"]
        assert target["errors"] == 0 and target["timeouts"] == 0
        assert target["temperror_requests"] > 0
    # The same messages; without the hold-down each first request of a
    # temperror message waits out Lookup_Time (1 s).
    assert held["temperror_requests"] == waited["temperror_requests"]
    assert held["temperror_wait_s"] < waited["temperror_wait_s"]
    report = format_report(data)
    assert report.count("smtpd waiting on temperror messages") == 2
    assert "(their queries dropped)" in report


def _warm_up_requests(target: dict) -> int:
    (note,) = [n for n in target["notes"] if n.startswith("warm-up: ")]
    return int(note.split()[1])


def test_warmup_is_answered_first_and_not_counted() -> None:
    cold = _only(_run(seed=4, requests=300))
    data = _run(seed=4, requests=300, warmup=300)
    assert data["config"]["warmup_requests"] == 300
    warm = _only(data)
    assert 300 <= _warm_up_requests(warm) < 300 + 5  # whole messages
    assert 300 <= warm["requests"] < 300 + 5
    assert warm["contradictions"] == 0 and warm["errors"] == 0
    # The measured messages come after the warm-up's in the stream, which
    # made many of their names known: fewer of them wait for lookups.
    assert warm["cold_messages"] / warm["messages"] < cold["cold_messages"] / cold["messages"]


def test_warmup_of_a_baseline_is_not_counted(tmp_path: Path) -> None:
    program = tmp_path / "fake_policy.py"
    program.write_text(FAKE_POLICY)
    log = tmp_path / "served.log"
    command = f"{sys.executable} {program} {log} {{dns}}"
    data = _run(targets=[], baseline_cmd=command, baseline_name="fake", warmup=100)
    (fake,) = data["targets"]
    served = [int(line.split()[1]) for line in log.read_text().splitlines()]
    assert sum(served) == _warm_up_requests(fake) + fake["requests"]
    assert fake["processes"] == fake["connections"] < len(served)


def test_cli_refuses_a_warmup_that_would_repeat_the_stream(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["bench", "-n", "1000", "--warmup", "199500"]) == 2
    assert "--warmup" in capsys.readouterr().err


def test_connect_to_a_running_server(tmp_path: Path) -> None:
    socket_path = tmp_path / "bare.sock"
    server = subprocess.Popen(
        [sys.executable, "-m", "spfpolicy.bench.bare", "--listen", f"unix:{socket_path}"]
    )
    try:
        deadline = time.monotonic() + 20
        while not socket_path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        target = _only(_run(targets=[], connect=f"unix:{socket_path}"))
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert target["kind"] == "connect"
    assert target["requests"] >= 300 and target["errors"] == 0
    assert target["actions"] == {"dunno": target["requests"]}
    assert target["dns_bound_requests_per_s"] is None  # its resolver is not the bench's


def test_connect_refuses_non_loopback() -> None:
    with pytest.raises(BenchError, match="loopback"):
        _run(targets=[], connect="inet:192.0.2.1:10027")


FAKE_POLICY = textwrap.dedent(
    """\
    import os, sys
    log, served = sys.argv[1], 0
    for line in sys.stdin:
        if line.strip() == "":
            served += 1
            sys.stdout.write("action=DUNNO\\n\\n")
            sys.stdout.flush()
    with open(log, "a") as out:
        out.write(f"{os.getpid()} {served}\\n")
    """
)


@pytest.mark.parametrize("templated", [True, False], ids=["dns-placeholder", "launcher"])
def test_baseline_spawns_one_process_per_connection(tmp_path: Path, templated: bool) -> None:
    program = tmp_path / "fake_policy.py"
    program.write_text(FAKE_POLICY)
    log = tmp_path / "served.log"
    dns = " {dns}" if templated else ""
    command = f"{sys.executable} {program} {log}{dns}"
    data = _run(targets=["spfpolicy"], baseline_cmd=command, baseline_name="fake", max_use=7)
    _, fake = data["targets"]
    assert fake["kind"] == "baseline" and fake["name"] == "fake"
    assert fake["errors"] == 0 and fake["timeouts"] == 0
    served = [int(line.split()[1]) for line in log.read_text().splitlines()]
    assert len(served) == fake["processes"] == fake["connections"]
    assert sum(served) == fake["requests"]
    # A message's recipients stay on one connection: up to 4 over max_use.
    assert max(served) <= 7 + 4
    assert fake["peak_rss_bytes"] > 0
    assert fake["unclassified"] > 0  # DUNNO to a first recipient carries no result
    assert data["ratios"][0]["versus"] == "fake"


def test_cli_json_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.json"
    argv = ["bench", "-n", "200", "-c", "5", "--dns-delay", "0.001", "--seed", "2"]
    assert cli.main([*argv, "--no-progress", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "spfpolicy" in printed and "req/s" in printed
    data = json.loads(out.read_text())
    assert data["schema"] == 1
    assert set(data["config"]) >= {"workload", "seed", "mix", "concurrency", "max_use"}
    (target,) = data["targets"]
    assert set(target) >= {
        "name",
        "requests",
        "requests_per_s",
        "latency_ms",
        "errors",
        "timeouts",
        "actions",
        "results",
        "contradictions",
        "dns_queries",
        "peak_rss_bytes",
        "cold_messages",
        "cold_rtts",
        "dns_bound_requests_per_s",
    }
    assert set(target["latency_ms"]) == {"p50", "p90", "p99", "max", "mean"}
    assert target["contradictions"] == 0


def test_cli_rejects_unbounded_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "-n", "0", "-d", "0"]) == 2
    assert "limit" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not POLICYD_SPF.exists(), reason="postfix-policyd-spf-python not installed")
def test_baseline_real_policyd_spf() -> None:
    # py3dns (policyd-spf's DNS) reports SERVFAIL as "none", not temperror:
    # leave temperror out so every answer can be checked.
    mix = parse_mix("pass=60,fail=10,softfail=10,neutral=5,none=10,permerror=5")
    data = _run(
        targets=[],
        baseline_cmd=f"{POLICYD_SPF} {{conf}}",
        mix=mix,
        requests=200,
        concurrency=4,
    )
    target = _only(data)
    assert target["name"] == "baseline"
    assert target["errors"] == 0 and target["timeouts"] == 0
    assert target["contradictions"] == 0, target["contradiction_examples"]
    assert target["results"] == target["expected_results"]
    assert target["processes"] >= 4
    assert target["peak_rss_bytes"] > 0


def test_shared_cache_second_mx_host_over_the_first_ones_domains() -> None:
    pytest.importorskip("redis")
    if not Path("/usr/bin/redis-server").exists():
        pytest.skip("no redis-server (apt-get install redis-server)")
    data = _run(workload=WorkloadKind.UNIQUE, shared_cache=True, requests=300, concurrency=5)
    first, second = data["targets"]
    assert (first["name"], second["name"]) == ("first-mx", "second-mx")
    assert second["requests"] == first["requests"]
    for target in (first, second):
        assert target["errors"] == 0 and target["contradictions"] == 0
    shared = data["shared_cache"]
    assert shared["redis"]["second-mx"]["keyspace_hits"] > 0
    assert shared["keys"] > 0 and shared["bytes_per_key"] > 0
    assert shared["dns_queries_per_request_second_over_first"] < 0.5
    assert "second MX host / first" in format_report(data)
    # A second host that made no DNS query at all (a mix without
    # temperrors) is reported, not a division by zero.
    shared["dns_queries_per_request_second_over_first"] = 0.0
    assert " = 0.00x (target <= 0.1)" in format_report(data)


def test_shared_cache_on_and_off_in_one_run() -> None:
    pytest.importorskip("redis")
    if not Path("/usr/bin/redis-server").exists():
        pytest.skip("no redis-server (apt-get install redis-server)")
    data = _run(workload=WorkloadKind.ZIPF, shared_cache=True, requests=300)
    off, on = data["targets"]
    assert (off["name"], on["name"]) == ("spfpolicy", "shared-on")
    assert on["errors"] == 0 and on["contradictions"] == 0
    assert data["shared_cache"]["redis"]["shared-on"]["keyspace_hits"] == 0
    assert data["shared_cache"]["requests_per_s_on_over_off"] > 0
    assert "shared level on (hit rate 0) / off" in format_report(data)
