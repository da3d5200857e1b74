"""systemd integration without libsystemd: socket activation (sd_listen_fds(3))
and the notify protocol (sd_notify(3)), both tiny and documented as stable
interfaces (https://systemd.io/PORTABILITY_AND_STABILITY/).

Why not the ``systemd`` Python package: it is a C extension that needs
libsystemd's headers to build (no wheels on PyPI), it would pull a compiler
into a plain ``pip install``, and all it would give us here is ~40 lines:
read three environment variables, and send datagrams to a unix socket.
Both halves do nothing at all when systemd did not start the process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

# sd_listen_fds(3): passed descriptors start at 3 (after stdin/out/err).
LISTEN_FDS_START = 3


@dataclass(frozen=True, slots=True)
class InheritedSocket:
    """A listening socket handed over by the service manager."""

    sock: socket.socket
    name: str  # from LISTEN_FDNAMES ("unknown" when not given, as systemd does)

    def describe(self) -> str:
        address = self.sock.getsockname()
        if self.sock.family == socket.AF_UNIX:
            where = f"unix:{address}" if address else "unix:(unnamed)"
        else:
            host, port = address[0], address[1]
            where = f"inet:[{host}]:{port}" if ":" in host else f"inet:{host}:{port}"
        return f"{where} (fd {self.sock.fileno()}, name {self.name})"


def listen_fds(
    environ: MutableMapping[str, str] | None = None, *, unset: bool = True
) -> list[InheritedSocket]:
    """The listening sockets systemd passed us, or [] when it passed none.

    LISTEN_PID must name this process: the variables are otherwise meant for
    another process (an ancestor that forgot to unset them). With ``unset``,
    the variables are removed so that children do not take them for theirs.
    """
    env = os.environ if environ is None else environ
    try:
        pid = int(env.get("LISTEN_PID", ""))
        count = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    if unset:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(key, None)
    if pid != os.getpid() or count <= 0:
        return []
    inherited = []
    for index in range(count):
        fd = LISTEN_FDS_START + index
        os.set_inheritable(fd, False)  # sd_listen_fds() sets FD_CLOEXEC too
        sock = socket.socket(fileno=fd)  # family and type read from the fd
        name = names[index] if index < len(names) and names[index] else "unknown"
        inherited.append(InheritedSocket(sock, name))
    return inherited


class Notifier:
    """Sends sd_notify(3) state changes to $NOTIFY_SOCKET; a no-op without it."""

    def __init__(self, address: str | bytes | None) -> None:
        self._address = address
        self._sock: socket.socket | None = None
        if address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @classmethod
    def from_environment(
        cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = True
    ) -> Notifier:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        if unset:
            env.pop("NOTIFY_SOCKET", None)
        if not path or path[0] not in "/@":
            return cls(None)
        # "@name" is a socket in the abstract namespace: a leading NUL byte.
        address: str | bytes = b"\0" + path[1:].encode() if path[0] == "@" else path
        return cls(address)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines (keyword names upper-cased); False if it failed."""
        if self._sock is None:
            return False
        # A value cannot hold a newline: it would start another assignment.
        text = "\n".join(
            f"{key.upper()}={str(value).replace(chr(10), ' ')}" for key, value in fields.items()
        )
        try:
            self._sock.sendto(text.encode(), self._address)  # type: ignore[arg-type]
        except OSError as exc:
            # systemd gone or its queue full: the service itself must go on.
            log.debug("sd_notify failed: %s", exc)
            return False
        return True

    def ready(self, status: str = "") -> None:
        fields: dict[str, str | int] = {"READY": 1}
        if status:
            fields["STATUS"] = status
        fields["MAINPID"] = os.getpid()
        self.notify(**fields)

    def reloading(self) -> None:
        # systemd >= 253 (Type=notify-reload) wants the CLOCK_MONOTONIC time
        # in microseconds with RELOADING=1, to match it with the READY=1 after.
        self.notify(reloading=1, monotonic_usec=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self, status: str = "") -> None:
        self.notify(**({"STOPPING": 1, "STATUS": status} if status else {"STOPPING": 1}))

    def status(self, text: str) -> None:
        self.notify(status=text)

    def watchdog(self) -> None:
        self.notify(watchdog=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None.

    sd_watchdog_enabled(3): WATCHDOG_PID, when set, must be this process.
    """
    env = os.environ if environ is None else environ
    with contextlib.suppress(ValueError):
        usec = int(env.get("WATCHDOG_USEC", ""))
        pid_text = env.get("WATCHDOG_PID", "")
        if pid_text and int(pid_text) != os.getpid():
            return None
        if usec > 0:
            return usec / 2 / 1_000_000
    return None
