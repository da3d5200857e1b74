"""The server's listening sockets: unix and inet sockets bound from Listen, or
the ones systemd passed; closed again (unix paths removed) at the end.

A unix socket is bound under a temporary name, given its mode and owner, and
renamed into place listening, so its path never shows a socket that refuses
or has the wrong mode; a socket left by a crash is replaced, anything else at
the path is kept. Each accepted connection gets a protocol from the factory
given to ``Listeners`` (connection.py's ``Connection``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import logging
import os
import pwd
import socket
import stat
from collections.abc import Callable, Sequence

from spfpolicy.config import ListenAddress, ListenFamily, Settings
from spfpolicy.systemd import InheritedSocket

# The server's log lines keep the logger name operators know them by.
log = logging.getLogger("spfpolicy.server")

# Listen backlog: a Postfix restart reconnects every smtpd (default_process_limit
# 100, often raised) at once.
BACKLOG = 1024


class StartupError(Exception):
    """The server cannot start; the message says what to do."""


class ListenError(StartupError):
    """A listener could not be set up; the message says what to do."""


class Listeners:
    """The sockets one server accepts connections on."""

    def __init__(self, protocol: Callable[[], asyncio.Protocol]) -> None:
        self._protocol = protocol
        self._servers: list[asyncio.Server] = []
        self._unix_paths: list[str] = []

    async def open(
        self,
        listen: Sequence[ListenAddress],
        inherited: Sequence[InheritedSocket],
        settings: Settings,
    ) -> None:
        """Listen on ``inherited`` sockets (systemd's) if any, else on ``listen``.

        On failure, what was opened is left for ``close()``."""
        loop = asyncio.get_running_loop()
        if inherited:
            for item in inherited:
                if item.sock.family == socket.AF_UNIX:
                    server = await loop.create_unix_server(self._protocol, sock=item.sock)
                else:
                    server = await loop.create_server(self._protocol, sock=item.sock)
                self._servers.append(server)
                log.info("listening on %s, passed by systemd", item.describe())
            if listen:
                log.info(
                    "socket activation: not listening on %s (Listen)",
                    ", ".join(str(a) for a in listen),
                )
            return
        for address in listen:
            try:
                if address.family is ListenFamily.UNIX:
                    await self._listen_unix(address.path, settings)
                else:
                    server = await loop.create_server(
                        self._protocol,
                        address.host,
                        address.port,
                        reuse_address=True,
                        backlog=BACKLOG,
                    )
                    self._servers.append(server)
            except OSError as exc:  # in use, no permission, no such address
                raise ListenError(f"cannot listen on {address}: {exc}") from None
            log.info("listening on %s", address)

    @property
    def inet_ports(self) -> list[int]:
        ports = []
        for server in self._servers:
            for sock in server.sockets:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    ports.append(sock.getsockname()[1])
        return ports

    def stop_accepting(self) -> None:
        for server in self._servers:
            server.close()

    def close(self) -> None:
        """Stop accepting and remove the unix sockets' paths."""
        self.stop_accepting()
        for path in self._unix_paths:
            # After dropping privileges the socket directory may not be ours.
            with contextlib.suppress(FileNotFoundError, PermissionError):
                os.unlink(path)
        self._servers.clear()
        self._unix_paths.clear()

    async def _listen_unix(self, path: str, settings: Settings) -> None:
        directory = os.path.dirname(path) or "."
        if not os.path.isdir(directory):
            raise ListenError(
                f"cannot listen on unix:{path}: directory {directory} does not exist "
                "(is Postfix installed?); choose another socket with "
                "--listen unix:/path/to/socket or --listen inet:127.0.0.1:PORT"
            )
        _remove_stale_socket(path)
        # Bind, chmod/chown and listen under a temporary name, then rename:
        # the socket appears at its path only once it accepts connections
        # with its final mode and owner (Postfix, or a test waiting for the
        # path, never meets a socket that refuses or has the wrong mode).
        temporary = f"{path}~{os.getpid()}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            sock.bind(temporary)
            try:
                os.chmod(temporary, settings.socket_mode)
                if settings.socket_owner or settings.socket_group:
                    owner, group = settings.socket_owner, settings.socket_group
                    try:
                        uid = pwd.getpwnam(owner).pw_uid if owner else -1
                        gid = grp.getgrnam(group).gr_gid if group else -1
                    except KeyError as exc:
                        raise ListenError(
                            f"cannot listen on unix:{path}: no such user or group {exc} "
                            "(Socket_Owner / Socket_Group)"
                        ) from None
                    os.chown(temporary, uid, gid)
                sock.listen(BACKLOG)
                os.rename(temporary, path)
            except BaseException:
                os.unlink(temporary)
                raise
        except BaseException:
            sock.close()
            raise
        server = await asyncio.get_running_loop().create_unix_server(
            self._protocol, sock=sock, backlog=BACKLOG
        )
        self._servers.append(server)
        self._unix_paths.append(path)


def _remove_stale_socket(path: str) -> None:
    """Replace a socket left by a crash; never delete anything else."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ListenError(f"cannot listen on unix:{path}: it exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ListenError(f"cannot listen on unix:{path}: {exc}") from None
        os.unlink(path)  # nobody listens: a stale socket
        return
    finally:
        probe.close()
    raise ListenError(f"cannot listen on unix:{path}: another server is listening there")
