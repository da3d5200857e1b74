"""logs.py: the per-decision line written straight to the configured targets
is byte for byte what the logging module writes there, and anything
unusual goes through the logging module."""

from __future__ import annotations

import asyncio
import io
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from spfpolicy import logs

LINE = "Q1: prepend Received-SPF: Pass (mailfrom) [mailfrom=pass] client=192.0.2.1 helo='h'"


@pytest.fixture
def syslog_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for /dev/log."""
    path = tmp_path / "log"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setattr(logs, "SYSLOG_SOCKET", str(path))
    yield sock
    sock.close()


@pytest.fixture
def stderr() -> Iterator[io.StringIO]:
    """What configure() finds as sys.stderr (see configure_with)."""
    yield io.StringIO()
    logs.configure(0, [])  # drop handlers holding the stream


def configure_with(
    stderr: io.StringIO, monkeypatch: pytest.MonkeyPatch, level: int, targets: list[str]
) -> None:
    # In the test's body: pytest's output capture sets sys.stderr again
    # after fixtures have run.
    monkeypatch.setattr("sys.stderr", stderr)
    logs.configure(level, targets)


@pytest.mark.parametrize("journal", [False, True])
def test_stderr_line_is_what_logging_writes(
    stderr: io.StringIO, monkeypatch: pytest.MonkeyPatch, journal: bool
) -> None:
    monkeypatch.setattr(logs, "_stderr_is_journal", lambda: journal)
    configure_with(stderr, monkeypatch, 1, ["stderr"])
    logger = logging.getLogger("spfpolicy.server")
    logger.info("%s", LINE)
    logs.info(logger, LINE)
    first, second = stderr.getvalue().splitlines()
    assert first == second
    assert first.startswith("<6>INFO spfpolicy.server: " if journal else "INFO spfpolicy.server: ")


def test_syslog_datagram_is_what_logging_sends(
    syslog_socket: socket.socket, stderr: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure_with(stderr, monkeypatch, 1, ["syslog", "stderr"])
    logger = logging.getLogger("spfpolicy.server")
    logger.info("%s", LINE + " é")
    logs.info(logger, LINE + " é")
    assert syslog_socket.recv(4096) == syslog_socket.recv(4096)
    lines = stderr.getvalue().splitlines()
    assert len(lines) == 2 and lines[0] == lines[1]


def test_nothing_below_the_debug_level(
    stderr: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure_with(stderr, monkeypatch, 0, ["stderr"])  # errors only
    logs.info(logging.getLogger("spfpolicy.server"), LINE)
    assert stderr.getvalue() == ""


def test_other_handlers_get_a_log_record(
    stderr: io.StringIO, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    configure_with(stderr, monkeypatch, 1, ["stderr"])
    root = logging.getLogger("spfpolicy")
    root.addHandler(caplog.handler)  # configured behind configure()'s back
    try:
        logs.info(logging.getLogger("spfpolicy.server"), LINE)
    finally:
        root.removeHandler(caplog.handler)
    assert [r.getMessage() for r in caplog.records] == [LINE]
    assert stderr.getvalue().endswith(LINE + "\n")


def test_unconfigured_logging_gets_a_log_record(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(logs, "_fast", None)  # a process that never called configure()
    monkeypatch.setattr(logging.getLogger("spfpolicy"), "propagate", True)
    with caplog.at_level(logging.INFO, logger="spfpolicy.server"):
        logs.info(logging.getLogger("spfpolicy.server"), LINE)
    assert {r.getMessage() for r in caplog.records} == {LINE}


async def test_lines_to_a_file_keep_their_order_and_are_flushed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "stderr"
    with open(path, "w", buffering=1, errors="backslashreplace") as stream:
        monkeypatch.setattr("sys.stderr", stream)
        logs.configure(1, ["stderr"])
        logger = logging.getLogger("spfpolicy.server")
        try:
            logs.info(logger, "one")
            logs.info(logger, "two \udcff")
            logger.warning("three")  # the handler's own write flushes the two before it
            logs.info(logger, "four")
            await asyncio.sleep(0)  # the event loop's round ends: flushed
            assert path.read_text().splitlines() == [
                "INFO spfpolicy.server: one",
                "INFO spfpolicy.server: two \\udcff",
                "WARNING spfpolicy.server: three",
                "INFO spfpolicy.server: four",
            ]
        finally:
            logs.configure(0, [])
