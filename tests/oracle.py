"""Test helpers (not a test module): Debian's real policyd-spf as a compatibility
oracle, and the processes it is compared with.

- ``PolicydSpf`` runs /usr/bin/policyd-spf's code (spf_engine.policyd_spf.main)
  the way Postfix's spawn(8) does: one fresh process per policy connection,
  requests written to its stdin, ``action=...`` replies read from its stdout.
  src/spfpolicy/bench/pyspf_launcher.py points its DNS (py3dns) at our loopback
  server and sends its syslog lines to a file; see that file for why.
- ``DnsServerProcess`` serves a YAML zone with ``python -m spfpolicy.bench.dnsserver``.
- ``SpfpolicyServer`` runs ``spfpolicy serve`` as a real subprocess.
- ``PolicyClient`` talks the policy protocol over a unix or TCP socket.

Replies are compared as raw text, not through ``ResponseParser``: a drop-in must
match policyd-spf byte for byte, trailing blank of "receiver=... " included,
because Postfix copies the text into the header or the SMTP reply.

Every wait is bounded; every process is ended by the context manager that
started it, also when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import dns.resolver
import spf

import spfpolicy
from spfpolicy.protocol import encode_request

DATA = Path(__file__).parent / "data"
ZONE_FILE = DATA / "spf_zone.yaml"
# The package's own launcher, the one `spfpolicy bench --baseline-cmd` uses.
LAUNCHER = Path(spfpolicy.__file__).parent / "bench" / "pyspf_launcher.py"
POLICYD_SPF = "/usr/bin/policyd-spf"
# policyd-spf is a system package: it runs with the system interpreter and its
# dist-packages (spf, DNS, authres, spf_engine), never with the project's venv.
SYSTEM_PYTHON = Path("/usr/bin/python3")
POLICYD_SPF = Path("/usr/bin/policyd-spf")

REPLY_TIMEOUT = 30.0  # one policy reply; DNS timeouts in the cases are 1-2 s
START_TIMEOUT = 20.0  # a server process becoming ready
STOP_TIMEOUT = 10.0  # a server process exiting after SIGTERM / EOF


class PolicyServerDied(Exception):
    """The policy server closed the connection (or exited) before replying."""

    def __init__(self, message: str, log: str = "") -> None:
        super().__init__(f"{message}\n{log}" if log else message)
        self.log = log


def plain_pyspf(
    port: int,
    ip: str,
    sender: str,
    helo: str,
    *,
    querytime: float = 10.0,
    default_explanation: str | None = None,
) -> tuple[str, int, str]:
    """pyspf alone, with this venv's blocking dnspython driver pointed at the
    loopback server on ``port``: (result, code, explanation) for the DNS data as
    it is now. The reference our evaluations are compared with; run it in a
    thread (it blocks)."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = port
    resolver.timeout = resolver.lifetime = min(3.0, querytime)
    saved = dns.resolver.default_resolver
    dns.resolver.default_resolver = resolver
    try:
        query = spf.query(ip, sender, helo, querytime=querytime)
        if default_explanation is not None:
            query.set_default_explanation(default_explanation)
        result, code, explanation = query.check()
    finally:
        dns.resolver.default_resolver = saved
    return str(result), int(code), str(explanation)


def oracle_missing() -> str | None:
    """Why the policyd-spf oracle cannot run here, or None if it can."""
    if not POLICYD_SPF.exists():
        return f"{POLICYD_SPF} not installed (Debian package postfix-policyd-spf-python)"
    if not SYSTEM_PYTHON.exists():
        return f"{SYSTEM_PYTHON} not found"
    probe = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", "import DNS, spf, spf_engine.policyd_spf"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if probe.returncode != 0:
        return "policyd-spf's modules do not import: " + probe.stderr.strip().splitlines()[-1]
    return None


def rcpt_request(
    *,
    client_address: str,
    helo_name: str,
    sender: str,
    recipient: str = "alice@example.net",
    instance: str,
    client_name: str | None = None,
    reverse_client_name: str | None = None,
    queue_id: str = "",
    recipient_count: str = "0",
    size: str = "0",
    **extra: str,
) -> dict[str, str]:
    """The attributes Postfix 3.7 smtpd sends for RCPT TO, in its order (as captured).

    Defaults are those of an unauthenticated, unencrypted ESMTP client whose
    address has no PTR record; ``extra`` overrides or adds attributes.
    """
    attrs = {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "protocol_name": "ESMTP",
        "client_address": client_address,
        "client_name": client_name if client_name is not None else "unknown",
        "client_port": "40123",
        "reverse_client_name": (
            reverse_client_name if reverse_client_name is not None else "unknown"
        ),
        "server_address": "127.0.0.1",
        "server_port": "25",
        "helo_name": helo_name,
        "sender": sender,
        "recipient": recipient,
        "recipient_count": recipient_count,
        "queue_id": queue_id,
        "instance": instance,
        "size": size,
        "etrn_domain": "",
        "stress": "",
        "sasl_method": "",
        "sasl_username": "",
        "sasl_sender": "",
        "ccert_subject": "",
        "ccert_issuer": "",
        "ccert_fingerprint": "",
        "ccert_pubkey_fingerprint": "",
        "encryption_protocol": "",
        "encryption_cipher": "",
        "encryption_keysize": "0",
        "policy_context": "",
    }
    attrs.update(extra)
    return attrs


class _ReplyReader:
    """Collects bytes until one reply ("action=...\\n" plus a blank line) is complete."""

    def __init__(self) -> None:
        self._buffer = b""

    def read(self, recv: Callable[[float], bytes | None], timeout: float, died: str) -> str:
        """``recv(seconds)`` returns bytes, b"" at EOF, or None if nothing came in time."""
        deadline = time.monotonic() + timeout
        while b"\n\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            chunk = recv(remaining) if remaining > 0 else None
            if chunk is None:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"no policy reply within {timeout} s")
                continue
            if not chunk:
                raise PolicyServerDied(died)
            self._buffer += chunk
        reply, _, self._buffer = self._buffer.partition(b"\n\n")
        text = reply.decode("utf-8", "replace")
        # A reply is one "action=..." line; strip the name so callers see the action.
        return text.removeprefix("action=")


class PolicydSpf:
    """One policyd-spf process serving one connection, as spawn(8) starts it.

    ``ask()`` returns the action text (after ``action=``), exactly as written.
    """

    def __init__(
        self,
        conf: Path,
        nameserver: str,
        *,
        log_path: Path | None = None,
        hostname: str | None = None,
    ) -> None:
        self.conf = conf
        self.nameserver = nameserver
        self.log_path = log_path
        self.hostname = hostname
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._reader = _ReplyReader()

    def __enter__(self) -> Self:
        argv = [str(SYSTEM_PYTHON), str(LAUNCHER), "--dns", self.nameserver]
        if self.log_path is not None:
            argv += ["--syslog", str(self.log_path)]
        if self.hostname:
            argv += ["--hostname", self.hostname]
        argv += ["--", POLICYD_SPF, str(self.conf)]
        # spawn(8) passes a minimal environment (export_environment); so do we,
        # which also keeps the venv's PYTHONPATH & co. away from the system Python.
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
        # stderr goes to a file: a pipe nobody reads could fill and block the process.
        stderr_path = self.log_path.with_suffix(".stderr") if self.log_path else None
        self._stderr = open(stderr_path, "w+b") if stderr_path else None
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr if self._stderr else subprocess.DEVNULL,
            env=env,
        )
        return self

    def ask(self, attrs: Mapping[str, str], timeout: float = REPLY_TIMEOUT) -> str:
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        fd = proc.stdout.fileno()
        try:
            proc.stdin.write(encode_request(attrs))
            proc.stdin.flush()
        except BrokenPipeError:
            raise PolicyServerDied("policyd-spf exited", self.stderr_text()) from None

        def recv(remaining: float) -> bytes | None:
            readable, _, _ = select.select([fd], [], [], remaining)
            return os.read(fd, 65536) if readable else None

        try:
            reply = self._reader.read(recv, timeout, "policyd-spf closed its stdout")
        except PolicyServerDied:
            proc.wait(STOP_TIMEOUT)
            raise PolicyServerDied(
                f"policyd-spf exited with {proc.returncode} before replying", self.stderr_text()
            ) from None
        return reply

    def stderr_text(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.flush()
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        proc = self._proc
        if proc is not None:
            # EOF on stdin is how spawn(8) ends a policy process.
            with contextlib.suppress(OSError):
                proc.stdin.close()  # type: ignore[union-attr]
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)
            proc.stdout.close()  # type: ignore[union-attr]
        if self._stderr is not None:
            self._stderr.close()


def ask_policyd_spf(
    conf: Path,
    nameserver: str,
    requests: Sequence[Mapping[str, str]],
    *,
    log_path: Path | None = None,
) -> list[str]:
    """All requests over one policyd-spf connection (one process); their actions."""
    with PolicydSpf(conf, nameserver, log_path=log_path) as server:
        return [server.ask(attrs) for attrs in requests]


class PolicyClient:
    """A policy connection to a server socket ("unix:PATH" or "inet:HOST:PORT")."""

    def __init__(self, address: str, timeout: float = REPLY_TIMEOUT) -> None:
        self.address = address
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._reader = _ReplyReader()

    def __enter__(self) -> Self:
        self._sock = connect(self.address, self.timeout)
        return self

    def ask(self, attrs: Mapping[str, str]) -> str:
        sock = self._sock
        assert sock is not None
        sock.sendall(encode_request(attrs))

        def recv(remaining: float) -> bytes | None:
            sock.settimeout(remaining)
            try:
                return sock.recv(65536)
            except TimeoutError:
                return None

        return self._reader.read(recv, self.timeout, f"{self.address} closed the connection")

    def __exit__(self, *exc_info: object) -> None:
        if self._sock is not None:
            self._sock.close()


def connect(address: str, timeout: float) -> socket.socket:
    kind, _, where = address.partition(":")
    if kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: str | tuple[str, int] = where
    elif kind == "inet":
        host, _, port = where.rpartition(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        target = (host, int(port))
    else:
        raise ValueError(f"not unix:PATH or inet:HOST:PORT: {address!r}")
    sock.settimeout(timeout)
    try:
        sock.connect(target)
    except OSError:
        sock.close()
        raise
    return sock


def ask_server(address: str, requests: Sequence[Mapping[str, str]]) -> list[str]:
    """All requests over one connection to a policy server socket; their actions."""
    with PolicyClient(address) as client:
        return [client.ask(attrs) for attrs in requests]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)


class DnsServerProcess:
    """``python -m spfpolicy.bench.dnsserver`` serving a YAML zone on a loopback port."""

    def __init__(self, zone_file: Path = ZONE_FILE) -> None:
        self.zone_file = zone_file
        self.nameserver = ""
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "spfpolicy.bench.dnsserver", "--zone", str(self.zone_file)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            self.nameserver = self._first_line(self._proc)
        except BaseException:
            _stop(self._proc)
            raise
        return self

    @staticmethod
    def _first_line(proc: subprocess.Popen[bytes]) -> str:
        assert proc.stdout is not None and proc.stderr is not None
        fd = proc.stdout.fileno()
        buffer = b""
        deadline = time.monotonic() + START_TIMEOUT
        while b"\n" not in buffer:
            remaining = deadline - time.monotonic()
            readable, _, _ = select.select([fd], [], [], max(remaining, 0))
            chunk = os.read(fd, 4096) if readable else b""
            if not chunk:
                proc.kill()
                err = proc.stderr.read().decode("utf-8", "replace")
                raise RuntimeError(f"DNS server did not start: {err}")
            buffer += chunk
        return buffer.split(b"\n", 1)[0].decode().strip()

    def __exit__(self, *exc_info: object) -> None:
        if self._proc is not None:
            _stop(self._proc)
            for stream in (self._proc.stdout, self._proc.stderr):
                if stream is not None:
                    stream.close()


class SpfpolicyServer:
    """``spfpolicy serve`` as a real subprocess; ready once its socket accepts."""

    def __init__(
        self,
        conf: Path,
        listen: str,
        nameserver: str,
        *,
        log_path: Path,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.conf = conf
        self.listen = listen
        self.nameserver = nameserver
        self.log_path = log_path
        self.extra_args = extra_args
        self._proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        probe = subprocess.run(
            [sys.executable, "-m", "spfpolicy", "serve", "--help"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        return probe.returncode == 0

    def __enter__(self) -> Self:
        argv = [
            sys.executable,
            "-m",
            "spfpolicy",
            "serve",
            "-c",
            str(self.conf),
            "--listen",
            self.listen,
            "--nameserver",
            self.nameserver,
            *self.extra_args,
        ]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            _stop(self._proc)
            raise
        return self

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                raise PolicyServerDied(
                    f"spfpolicy serve exited with {self._proc.returncode}", self.log()
                )
            with contextlib.suppress(OSError), connect(self.listen, 1.0):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"spfpolicy serve not ready in {START_TIMEOUT} s\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def __exit__(self, *exc_info: object) -> None:
        if self._proc is not None:
            _stop(self._proc)


def write_conf(path: Path, settings: Mapping[str, str]) -> Path:
    """A policyd-spf.conf with ``settings`` in order, "Name = value" per line."""
    path.write_text("".join(f"{name} = {value}\n" for name, value in settings.items()))
    return path
