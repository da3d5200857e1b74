"""The shipped systemd units: `systemd-analyze security` rates the service
2.0 or lower ("OK"), the units say what Postfix and the server need, and
the server really runs with MemoryDenyWriteExecute's restriction (checked
with the kernel's own PR_SET_MDWE, which is what that option enforces with
seccomp, so no systemd as PID 1 is needed).
"""

from __future__ import annotations

import asyncio
import configparser
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from spfpolicy.protocol import ResponseParser, encode_request

UNITS = Path(__file__).resolve().parent.parent / "systemd"
SERVICE = UNITS / "spfpolicy.service"
SOCKET = UNITS / "spfpolicy.socket"
MAX_EXPOSURE = 2.0

PR_SET_MDWE = 65  # linux/prctl.h, Linux 6.3
PR_MDWE_REFUSE_EXEC_GAIN = 1


def unit(path: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


def test_systemd_analyze_security_rates_the_service_ok() -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(SERVICE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert found, result.stdout + result.stderr
    print(found.group(0))
    assert float(found.group(1)) <= MAX_EXPOSURE, result.stdout
    assert found.group(2) == "OK"


def test_socket_unit_is_where_postfix_looks() -> None:
    socket_unit = unit(SOCKET)["Socket"]
    assert socket_unit["ListenStream"] == "/var/spool/postfix/private/policyd-spf"
    # smtpd runs as postfix: owner postfix, not world-writable.
    assert socket_unit["SocketUser"] == "postfix"
    assert socket_unit["SocketMode"] == "0660"


def test_service_unit_essentials() -> None:
    service = unit(SERVICE)["Service"]
    assert service["Type"] == "notify"
    assert service["Restart"] == "on-failure"
    assert service["DynamicUser"] == "yes"
    assert service["MemoryDenyWriteExecute"] == "yes"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert int(service["LimitNOFILE"]) > 4096  # Max_Connections
    # The grace the server takes (Shutdown_Grace default) fits in systemd's.
    from spfpolicy.config import Settings

    assert Settings().shutdown_grace < int(service["TimeoutStopSec"].rstrip("s"))
    assert "AF_UNIX" in service["RestrictAddressFamilies"]


def test_service_has_a_private_state_directory_for_cache_file() -> None:
    service = unit(SERVICE)["Service"]
    # /var/lib/spfpolicy, writable by the dynamic user alone (ProtectSystem=strict
    # keeps the rest read-only): where the README puts Cache_File.
    assert service["StateDirectory"] == "spfpolicy"
    assert service["StateDirectoryMode"] == "0700"
    assert service["ProtectSystem"] == "strict"
    from spfpolicy.config import _KEYS

    assert "/var/lib/spfpolicy (StateDirectory=spfpolicy)" in _KEYS["Cache_File"].doc


# Sets PR_SET_MDWE (kept across execve) and execs the server.
MDWE_LAUNCHER = f"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    sys.exit(77)
os.execv(sys.executable, [sys.executable, "-m", "spfpolicy", *sys.argv[1:]])
"""


def mdwe_available() -> bool:
    """Whether this kernel has PR_SET_MDWE (tried in a throwaway child)."""
    code = (
        "import ctypes, sys; libc = ctypes.CDLL(None, use_errno=True); "
        f"sys.exit(libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0)"
    )
    return subprocess.run([sys.executable, "-c", code], check=False, timeout=30).returncode == 0


@pytest.mark.slow
async def test_server_runs_without_writable_executable_memory(
    zone_server: Any, tmp_path: Path
) -> None:
    if not mdwe_available():
        pytest.skip("kernel without PR_SET_MDWE (Linux < 6.3)")
    # The guard works: W+X memory is refused under it.
    probe = (
        "import ctypes, mmap, sys; libc = ctypes.CDLL(None, use_errno=True); "
        f"libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0); "
        "prot = mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC\n"
        "try:\n    mmap.mmap(-1, 4096, prot=prot)\nexcept OSError:\n    sys.exit(0)\n"
        "sys.exit(1)"
    )
    assert subprocess.run([sys.executable, "-c", probe], check=False, timeout=30).returncode == 0

    dns = await zone_server({"pass.example": [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}]})
    conf = tmp_path / "spf.conf"
    # Metrics on too: prometheus-client runs under the guard as well.
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        metrics_port = free.getsockname()[1]
    conf.write_text(f"Log_Target = stderr\nMetrics_Listen = 127.0.0.1:{metrics_port}\n")
    path = tmp_path / "mdwe.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-c", MDWE_LAUNCHER, "serve", "-c", str(conf)],
        *["--listen", f"unix:{path}", "--nameserver", dns.nameserver],
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(10):
            while not path.exists():
                assert proc.returncode is None
                await asyncio.sleep(0.02)
        reader, writer = await asyncio.open_unix_connection(str(path))
        answers = []
        for ip in ("198.51.100.1", "192.0.2.10"):
            writer.write(
                encode_request(
                    {
                        "request": "smtpd_access_policy",
                        "protocol_state": "RCPT",
                        "client_address": ip,
                        "helo_name": "mx.client.example",
                        "sender": "a@pass.example",
                        "recipient": "user@rcpt.example",
                        "instance": f"mdwe.{ip}",
                    }
                )
            )
            parser = ResponseParser()
            async with asyncio.timeout(10):
                while (action := parser.next_response()) is None:
                    data = await reader.read(65536)
                    assert data, "closed without answering"
                    parser.feed(data)
            answers.append(action)
        writer.close()
        metrics_reader, metrics_writer = await asyncio.open_connection("127.0.0.1", metrics_port)
        metrics_writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
        async with asyncio.timeout(10):
            scrape = (await metrics_reader.read()).decode()
        metrics_writer.close()
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            status = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.stderr is not None
    err = (await proc.stderr.read()).decode()
    assert status == 0, err
    assert answers[0].startswith("550 5.7.23 Message rejected due to: SPF fail")
    assert answers[1].startswith("prepend Received-SPF: Pass")
    assert scrape.startswith("HTTP/1.1 200 OK")
    assert 'spfpolicy_requests_total{action="550",result="fail"} 1.0' in scrape
