"""The command line, in process: ``spfpolicy.cli.main(argv)`` with capsys.

``main`` runs its own event loop (asyncio.run), so a test that needs DNS
owns the loopback zone server on the test's loop and runs ``main`` in a
worker thread with ``asyncio.to_thread``. Every run passes ``-c`` with a
file of the test's own, so a policyd-spf.conf installed on the host never
changes the outcome.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from spfpolicy import __version__
from spfpolicy.cli import main

ZONE: dict[str, Any] = {
    "pass.example": [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}],
    "mail.pass.example": [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}],
    "soft.example": [{"TXT": "v=spf1 ip4:192.0.2.0/24 ~all"}],
    "neutral.example": [{"TXT": "v=spf1 ?all"}],
    "none.example": [{"A": "192.0.2.1"}],
    "perm.example": [{"TXT": "v=spf1 ip4:192.0.2.0/24 bogus:x -all"}],
    "temp.example": ["servfail"],
}

GOOD_IP = "192.0.2.10"
BAD_IP = "198.51.100.1"


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    path = tmp_path / "empty.conf"
    path.write_text("# defaults only\n")
    return path


async def run_check(conf: Path, nameserver: str, *args: str) -> int:
    argv = ["check", "-c", str(conf), "--nameserver", nameserver, *args]
    return await asyncio.to_thread(main, argv)


@pytest.mark.parametrize(
    ("ip", "sender", "helo", "result", "mechanism", "identity"),
    [
        pytest.param(
            GOOD_IP,
            "a@pass.example",
            "h.example",
            "pass",
            "ip4:192.0.2.0/24",
            "mailfrom (a@pass.example)",
            id="pass",
        ),
        pytest.param(
            BAD_IP,
            "a@pass.example",
            "h.example",
            "fail",
            "-all",
            "mailfrom (a@pass.example)",
            id="fail",
        ),
        pytest.param(
            BAD_IP,
            "a@soft.example",
            "h.example",
            "softfail",
            "~all",
            "mailfrom (a@soft.example)",
            id="softfail",
        ),
        pytest.param(
            BAD_IP,
            "a@neutral.example",
            "h.example",
            "neutral",
            "?all",
            "mailfrom (a@neutral.example)",
            id="neutral",
        ),
        pytest.param(
            BAD_IP,
            "a@none.example",
            "h.example",
            "none",
            "(none)",
            "mailfrom (a@none.example)",
            id="none",
        ),
        pytest.param(
            BAD_IP,
            "a@perm.example",
            "h.example",
            "permerror",
            "(none)",
            "mailfrom (a@perm.example)",
            id="permerror",
        ),
        pytest.param(
            BAD_IP,
            "a@temp.example",
            "h.example",
            "temperror",
            "(none)",
            "mailfrom (a@temp.example)",
            id="temperror",
        ),
        # RFC 7208 section 2.3: the null sender checks postmaster@HELO.
        pytest.param(
            GOOD_IP,
            "",
            "mail.pass.example",
            "pass",
            "ip4:192.0.2.0/24",
            "helo (postmaster@mail.pass.example)",
            id="null-sender-helo-pass",
        ),
        pytest.param(
            BAD_IP,
            "",
            "mail.pass.example",
            "fail",
            "-all",
            "helo (postmaster@mail.pass.example)",
            id="null-sender-helo-fail",
        ),
    ],
)
async def test_check_prints_the_result(
    zone_server: Any,
    capsys: pytest.CaptureFixture[str],
    conf: Path,
    ip: str,
    sender: str,
    helo: str,
    result: str,
    mechanism: str,
    identity: str,
) -> None:
    dns = await zone_server(ZONE)
    status = await run_check(conf, dns.nameserver, "--ip", ip, "--sender", sender, "--helo", helo)
    assert status == 0  # whatever the result
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == result  # the bare keyword, for scripts
    assert lines[1].startswith("explanation: ")
    assert lines[2] == f"mechanism: {mechanism}"
    assert lines[3] == f"identity: {identity}"
    assert lines[4] == "dns lookups: 1 (upstream queries: 1)"
    assert lines[5].startswith("time: ") and lines[5].endswith(" s")
    assert len(lines) == 6
    assert err == ""


async def test_check_timeout_against_silent_dns(
    zone_server: Any, capsys: pytest.CaptureFixture[str], conf: Path
) -> None:
    dns = await zone_server(ZONE)
    dns.default_fault = "timeout"
    started = time.monotonic()
    status = await run_check(
        conf,
        dns.nameserver,
        "--ip",
        BAD_IP,
        "--sender",
        "a@pass.example",
        "--helo",
        "h",
        "--timeout",
        "1",
    )
    assert time.monotonic() - started < 3.0
    assert status == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "temperror"
    # The evaluation deadline or c-ares' own timeout (capped by --timeout
    # too), whichever comes first: both read as pyspf's "DNS Timeout".
    assert out.splitlines()[1] == "explanation: SPF Temporary Error: DNS Timeout"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(
            ["check", "--ip", "999.0.0.1", "--sender", "a@b.example", "--helo", "h"],
            "not an IP address: '999.0.0.1'",
            id="bad-ip",
        ),
        pytest.param(
            ["check", "--ip", GOOD_IP, "--sender", "a@b.example"],
            "the following arguments are required: --helo",
            id="missing-helo",
        ),
        pytest.param(
            ["check", "--ip", GOOD_IP, "--helo", "h"],
            "the following arguments are required: --sender",
            id="missing-sender",
        ),
        pytest.param(
            ["check", "--ip", GOOD_IP, "--sender", "", "--helo", "h", "--nameserver", "1.2.3.4:0"],
            "argument --nameserver: port out of range in '1.2.3.4:0'",
            id="bad-nameserver-port",
        ),
        pytest.param(
            ["check", "--ip", GOOD_IP, "--sender", "", "--helo", "h", "--nameserver", "[::1"],
            "argument --nameserver: unclosed '[' in '[::1'",
            id="bad-nameserver-bracket",
        ),
        pytest.param(
            ["check", "--ip", GOOD_IP, "--sender", "", "--helo", "h", "--timeout", "0"],
            "not a positive number of seconds: '0'",
            id="zero-timeout",
        ),
        pytest.param(
            ["check", "--ip", GOOD_IP, "--sender", "", "--helo", "h", "--timeout", "soon"],
            "not a positive number of seconds: 'soon'",
            id="bad-timeout",
        ),
        pytest.param(
            ["check", "--ip", GOOD_IP, "--sender", "", "--helo", "h", "--timeout", "nan"],
            "not a positive number of seconds: 'nan'",
            id="nan-timeout",
        ),
        pytest.param(["serve", "--listen", "tcp:1"], "bad Listen entry 'tcp:1'", id="bad-listen"),
        pytest.param(
            ["serve", "--listen", "unix:relative.sock"],
            "unix socket path must be absolute",
            id="relative-listen",
        ),
        pytest.param(
            ["serve", "--listen", "unix:/tmp/x.sock", "--nameserver", "127.0.0.1:99999"],
            "argument --nameserver: port out of range",
            id="serve-bad-nameserver",
        ),
        pytest.param([], "required: COMMAND", id="no-command"),
    ],
)
def test_bad_arguments_exit_2(
    capsys: pytest.CaptureFixture[str], conf: Path, argv: list[str], message: str
) -> None:
    if argv:
        argv = [argv[0], "-c", str(conf), *argv[1:]]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert message in err
    assert err.startswith("usage: spfpolicy")


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        pytest.param("debugLevel = 1\nNo_Such_Key = 3\n", ":2:", "unknown key", id="unknown-key"),
        pytest.param("Lookup_Time = 0\n", ":1:", "bad value for Lookup_Time", id="bad-value"),
        pytest.param("\n\nTestOnly\n", ":3:", "expected 'Key = value'", id="no-equals"),
    ],
)
@pytest.mark.parametrize("command", ["check", "serve"])
def test_bad_config_exits_2_naming_file_and_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    text: str,
    where: str,
    message: str,
) -> None:
    bad = tmp_path / "bad.conf"
    bad.write_text(text)
    argv = [command, "-c", str(bad)]
    if command == "check":
        argv += ["--ip", GOOD_IP, "--sender", "a@pass.example", "--helo", "h"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"spfpolicy: {bad}{where} ")
    assert message in err


def test_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.conf"
    argv = ["check", "-c", str(missing), "--ip", GOOD_IP, "--sender", "", "--helo", "h"]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"spfpolicy: {missing}: no such file\n"


def test_version_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"spfpolicy {__version__}\n"


def test_version_as_a_module() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "spfpolicy", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, f"spfpolicy {__version__}\n", "")


def test_serve_never_imports_the_bench() -> None:
    """`spfpolicy serve` and `check` need neither the bench package nor its
    extras (PyYAML, matplotlib): `pip install .` alone serves Postfix."""
    probe = (
        "import sys\n"
        "from spfpolicy.cli import main\n"
        "import spfpolicy.lifecycle, spfpolicy.server\n"
        "for command in ('serve', 'check'):\n"
        "    try:\n"
        "        main([command, '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "loaded = [m for m in sys.modules if m.split('.')[:2] == ['spfpolicy', 'bench']\n"
        "          or m in ('yaml', 'matplotlib')]\n"
        "print(loaded)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_bench_command_still_parses_its_arguments() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
