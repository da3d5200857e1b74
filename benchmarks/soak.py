#!/usr/bin/env python3
"""Bounded soak: the load generator's mixed workload (``spfpolicy bench``,
zipf over the default outcome mix) against one ``spfpolicy serve`` process
for a fixed time, sampling the server's RSS throughout.

    python benchmarks/soak.py                    # 10 minutes
    python benchmarks/soak.py --duration 60 --json soak.json

Processes, all on loopback: the bench's zone server (``python -m
spfpolicy.bench.zone``), the policy server, and the bench itself, which checks
every answer against the result the zone implies. Reports requests, errors
(errors + timeouts + answers contradicting the zone; must be 0), the server's
RSS at start, middle and end, and its exit status on SIGTERM. Exit status 0
only if there were no errors and RSS at the end is within --rss-limit-mb.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
MB = 1024 * 1024

# Debian's policyd-spf defaults (as the bench uses), errors-only logging so a
# ten-minute run does not write gigabytes of decision lines.
CONF = """\
debugLevel = 0
TestOnly = 1
HELO_reject = Fail
Mail_From_reject = Fail
PermError_reject = False
TempError_Defer = False
skip_addresses = 127.0.0.0/8,::ffff:127.0.0.0/104,::1
Log_Target = stderr
"""


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)
    return proc.returncode


def first_line(proc: subprocess.Popen[bytes]) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT)
    if not ready:
        raise RuntimeError("the zone server printed no address")
    return proc.stdout.readline().decode().strip()


def wait_listening(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"spfpolicy serve exited with {proc.returncode}")
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(path))
                return
            except OSError:
                time.sleep(0.05)
    raise RuntimeError("spfpolicy serve did not start listening")


class RssSampler(threading.Thread):
    """(seconds since start, RSS MB) every ``interval`` until stopped."""

    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._done = threading.Event()
        self._t0 = time.monotonic()

    def run(self) -> None:
        while not self._done.is_set():
            try:
                self.samples.append(
                    (round(time.monotonic() - self._t0, 1), round(rss_mb(self.pid), 1))
                )
            except (OSError, RuntimeError):
                return
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join(5.0)


def soak(args: argparse.Namespace) -> dict[str, Any]:
    python = sys.executable
    with tempfile.TemporaryDirectory(prefix="spfpolicy-soak-") as tmp:
        work = Path(tmp)
        conf = work / "spfpolicy.conf"
        conf.write_text(CONF.replace("debugLevel = 0", f"debugLevel = {args.debug_level}"))
        sock = work / "soak.sock"
        bench_json = work / "bench.json"
        zone_argv = [python, "-m", "spfpolicy.bench.zone", "--seed", str(args.seed)]
        zone_argv += ["--delay", str(args.dns_delay)]
        zone = subprocess.Popen(
            zone_argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        server_log = open(work / "server.log", "wb")  # noqa: SIM115
        server = None
        try:
            nameserver = first_line(zone)
            server_argv = [python, "-m", "spfpolicy", "serve", "-c", str(conf)]
            server_argv += ["--listen", f"unix:{sock}", "--nameserver", nameserver]
            server = subprocess.Popen(
                server_argv,
                stdout=server_log,
                stderr=subprocess.STDOUT,
            )
            wait_listening(sock, server)
            sampler = RssSampler(server.pid, args.sample_interval)
            sampler.start()
            bench_argv = [python, "-m", "spfpolicy", "bench", "--connect", f"unix:{sock}"]
            bench_argv += ["--dns", nameserver, "--seed", str(args.seed), "--workload", "zipf"]
            bench_argv += ["--concurrency", str(args.concurrency), "--requests", "0"]
            bench_argv += ["--duration", str(args.duration), "--json", str(bench_json)]
            bench = subprocess.run(
                [*bench_argv, "--no-progress"],
                capture_output=True,
                text=True,
                timeout=args.duration + 300,
                check=False,
            )
            sampler.stop()
            rss_end = rss_mb(server.pid)
            status = stop(server)
        finally:
            if server is not None:
                stop(server)
            stop(zone)
            server_log.close()
        log = (work / "server.log").read_text(errors="replace")
        if args.server_log is not None:
            args.server_log.write_text(log)
        if bench.returncode not in (0, 1) or not bench_json.exists():
            raise RuntimeError(f"bench failed ({bench.returncode}): {bench.stderr[-2000:]}")
        data = json.loads(bench_json.read_text())
    (target,) = [t for t in data["targets"] if t["name"] == f"unix:{sock}"]
    samples = sampler.samples or [(0.0, rss_end)]
    errors = target["errors"] + target["timeouts"] + target["contradictions"]
    return {
        "duration_s": args.duration,
        "concurrency": args.concurrency,
        "requests": target["requests"],
        "requests_per_s": target["requests_per_s"],
        "latency_ms": target["latency_ms"],
        "errors": errors,
        "error_detail": {
            "errors": target["errors"],
            "timeouts": target["timeouts"],
            "contradictions": target["contradictions"],
            "examples": target["error_examples"][:3] + target["contradiction_examples"][:3],
        },
        "rss_mb": {
            "start": samples[0][1],
            "middle": samples[len(samples) // 2][1],
            "end": round(rss_end, 1),
            "peak": max(mb for _, mb in samples),
        },
        "rss_curve": samples[:: max(1, len(samples) // 20)],
        "server_exit_status": status,
        "server_tracebacks": log.count("Traceback"),
        "rss_limit_mb": args.rss_limit_mb,
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--concurrency", type=int, default=50, help="smtpd connections")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dns-delay", type=float, default=0.005, help="emulated DNS RTT")
    parser.add_argument("--sample-interval", type=float, default=2.0, help="RSS sample period")
    parser.add_argument("--rss-limit-mb", type=float, default=300.0)
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--server-log", type=Path, help="copy the server's log here")
    parser.add_argument(
        "--debug-level", type=int, default=0, help="the server's debugLevel (default 0: errors)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.duration <= 0 or args.duration > 24 * 3600:
        print("soak: --duration must be in (0, 86400]", file=sys.stderr)
        return 2
    report = soak(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text)
    ok = (
        report["errors"] == 0
        and report["server_exit_status"] == 0
        and report["server_tracebacks"] == 0
        and report["rss_mb"]["end"] <= args.rss_limit_mb
    )
    print("soak: OK" if ok else "soak: FAILED", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
