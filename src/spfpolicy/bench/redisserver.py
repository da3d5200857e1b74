"""A throwaway redis-server for the tests and ``spfpolicy bench --shared-cache``:
Debian's binary on a unix socket in a directory of ours, nothing saved to
disk, stopped (and paused, resumed, restarted) by its process id only.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

START_TIMEOUT = 10.0  # seconds for the socket to appear


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisUnavailable(Exception):
    """No redis-server binary, or it did not start."""


class RedisProcess:
    """``redis-server --port 0 --unixsocket DIR/redis.sock``, no persistence."""

    def __init__(
        self,
        directory: Path,
        *,
        password: str = "",
        binary: str = "",
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.password = password
        # (certificate, key, CA) for a TLS port on loopback besides the socket.
        self.tls = tls
        self.tls_port = 0
        self.binary = binary or shutil.which("redis-server") or "/usr/bin/redis-server"
        self.socket = self.directory / "redis.sock"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def tls_url(self) -> str:
        """rediss:// on the TLS port (the certificate names localhost)."""
        return f"rediss://localhost:{self.tls_port}/0"

    def start(self) -> None:
        if not os.access(self.binary, os.X_OK):
            raise RedisUnavailable(f"{self.binary} not found (apt-get install redis-server)")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)
        argv = [
            self.binary,
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            "--logfile", str(self.directory / "redis.log"),
            "--databases", "4",
        ]  # fmt: skip
        if self.password:
            argv += ["--requirepass", self.password]
        if self.tls is not None:
            cert, key, ca = self.tls
            if not self.tls_port:  # kept across restarts: the URL stays the same
                self.tls_port = _free_port()
            argv += [
                "--bind", "127.0.0.1",
                "--tls-port", str(self.tls_port),
                "--tls-cert-file", str(cert),
                "--tls-key-file", str(key),
                "--tls-ca-cert-file", str(ca),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        # The socket's file appears at bind(), before listen(): a connection
        # in between is refused. Ready is when one is accepted.
        while not self._accepts():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RedisUnavailable(f"redis-server did not start (see {self.directory})")
            time.sleep(0.01)

    def _accepts(self) -> bool:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.socket))
        except OSError:
            return False
        finally:
            probe.close()
        return True

    def command(self, *words: str | bytes) -> Any:
        """One command, through a blocking redis-py client (tests and bench only)."""
        import redis

        client = redis.Redis(unix_socket_path=str(self.socket), password=self.password or None)
        try:
            return client.execute_command(*words)
        finally:
            client.close()

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGCONT)  # a paused server cannot exit
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def __enter__(self) -> RedisProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
