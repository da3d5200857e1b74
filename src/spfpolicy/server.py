"""The policy server: listeners, connections, the start/stop order and the
signals. The only module that knows the lifecycle.

Every smtpd connection is served concurrently in one process; requests on a
connection are answered in order. A request that fails in any way is still
answered (DUNNO, or the TempError action when TempError_Defer is set), and
the connection and the server live on. Shutdown: stop accepting, let requests
already read finish within a bounded grace, close connections, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import logging
import os
import pwd
import signal
import socket
import stat
import sys
import time
from collections.abc import Sequence
from dataclasses import replace

from spfpolicy import logs
from spfpolicy.checks import DnsChecks
from spfpolicy.config import ListenAddress, ListenFamily, Nameserver, Settings
from spfpolicy.dns import Resolver
from spfpolicy.evaluator import SpfEvaluator
from spfpolicy.policy import InstanceMemory, decide, fallback_decision
from spfpolicy.protocol import (
    REQUEST_TYPE,
    PolicyRequest,
    ProtocolError,
    RequestParser,
    encode_response,
)

log = logging.getLogger(__name__)
request_log = logging.getLogger(logs.REQUEST_LOGGER)

READ_SIZE = 65536
# Requests already read get this long to finish when the server stops.
SHUTDOWN_GRACE = 10.0


class ListenError(Exception):
    """A listener could not be set up; the message says what to do."""


class PolicyServer:
    """Serves Postfix's policy protocol on unix and inet sockets."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.resolver = Resolver(
            [_nameserver_text(n) for n in settings.nameservers],
            timeout=settings.dns_timeout,
            cache_size=settings.dns_cache_size,
            min_ttl=settings.dns_min_ttl,
            max_ttl=settings.dns_max_ttl,
            negative_ttl=settings.dns_negative_ttl,
        )
        self.evaluator = SpfEvaluator(
            self.resolver,
            void_limit=settings.void_limit,
            lookup_time=settings.lookup_time,
            # policyd-spf leaves pyspf's receiver (the %{r} macro) at its
            # default, "unknown"; so do we, for the same exp= texts.
        )
        self.checks = DnsChecks(
            self.evaluator,
            void_limit=settings.void_limit,
            result_cache_size=settings.result_cache_size,
            result_cache_ttl=settings.result_cache_ttl,
        )
        self.memory = InstanceMemory(settings.instance_cache_size, settings.instance_ttl)
        self._servers: list[asyncio.Server] = []
        self._unix_paths: list[str] = []
        self._connections: set[asyncio.Task[None]] = set()
        self._busy: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._slots = asyncio.Semaphore(settings.max_in_flight)
        self.requests = 0
        self.errors = 0
        self.refused_connections = 0

    # -- listeners ----------------------------------------------------------

    async def start(self, listen: Sequence[ListenAddress]) -> None:
        try:
            for address in listen:
                if address.family is ListenFamily.UNIX:
                    await self._listen_unix(address.path)
                else:
                    server = await asyncio.start_server(
                        self._connection, address.host, address.port, reuse_address=True
                    )
                    self._servers.append(server)
                log.info("listening on %s", address)
        except BaseException:
            await self.close()
            raise

    @property
    def inet_ports(self) -> list[int]:
        ports = []
        for server in self._servers:
            for sock in server.sockets:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    ports.append(sock.getsockname()[1])
        return ports

    async def _listen_unix(self, path: str) -> None:
        directory = os.path.dirname(path) or "."
        if not os.path.isdir(directory):
            raise ListenError(
                f"cannot listen on unix:{path}: directory {directory} does not exist "
                "(is Postfix installed?); choose another socket with "
                "--listen unix:/path/to/socket or --listen inet:127.0.0.1:PORT"
            )
        _remove_stale_socket(path)
        server = await asyncio.start_unix_server(self._connection, path)
        self._servers.append(server)
        self._unix_paths.append(path)
        settings = self.settings
        os.chmod(path, settings.socket_mode)
        if settings.socket_owner or settings.socket_group:
            uid = pwd.getpwnam(settings.socket_owner).pw_uid if settings.socket_owner else -1
            gid = grp.getgrnam(settings.socket_group).gr_gid if settings.socket_group else -1
            os.chown(path, uid, gid)

    # -- connections ----------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        settings = self.settings
        if len(self._connections) >= settings.max_connections:
            self.refused_connections += 1
            # One line per 100 refusals: a flood must not flood the log too.
            if self.refused_connections % 100 == 1:
                log.warning(
                    "connection refused: %d connections open (Max_Connections); %d refused so far",
                    len(self._connections),
                    self.refused_connections,
                )
            writer.close()
            return
        self._connections.add(task)
        parser = RequestParser(
            max_line_length=settings.max_line_length,
            max_attributes=settings.max_attributes,
            max_request_size=settings.max_request_size,
        )
        try:
            while not self._stopping.is_set():
                try:
                    async with asyncio.timeout(settings.idle_timeout):
                        data = await reader.read(READ_SIZE)
                except TimeoutError:
                    log.info(
                        "closing connection idle for %ss (Idle_Timeout)", settings.idle_timeout
                    )
                    break
                if not data:
                    break
                parser.feed(data)
                while (request := parser.next_request()) is not None:
                    action = await self._answer(request)
                    writer.write(encode_response(action))
                await writer.drain()
        except ProtocolError as exc:
            log.warning("closing connection: %s", exc)
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("connection handler failed; closing that connection")
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, request: PolicyRequest) -> str:
        """One request in, one action out, whatever happens on the way."""
        task = asyncio.current_task()
        assert task is not None
        self._busy.add(task)
        self.requests += 1
        try:
            for warning in request.warnings:
                log.warning("malformed request line ignored: %s", warning)
            if request_log.isEnabledFor(logging.DEBUG):
                for name, value in request.attributes.items():
                    request_log.debug("%s=%r", name, value)
            if request.request != REQUEST_TYPE:
                log.warning("unsupported request type %r: answering DUNNO", request.request)
                return "DUNNO"
            try:
                async with asyncio.timeout(self.settings.request_timeout), self._slots:
                    decision = await decide(request, self.settings, self.checks, self.memory)
            except TimeoutError:
                self.errors += 1
                log.error(
                    "request deadline (%ss) reached for queue id %s: answering as TempError",
                    self.settings.request_timeout,
                    request.queue_id or "-",
                )
                decision = fallback_decision(self.settings, request)
            except Exception:
                self.errors += 1
                log.exception(
                    "policy evaluation failed for queue id %s, client %s, sender %r",
                    request.queue_id or "-",
                    request.client_address,
                    request.sender,
                )
                decision = fallback_decision(self.settings, request)
            log.info(
                "%s client=%s helo=%r sender=%r",
                decision.log_message(),
                request.client_address or "-",
                request.helo_name,
                request.sender,
            )
            return decision.action
        finally:
            self._busy.discard(task)

    # -- lifecycle ----------------------------------------------------------

    async def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Stop accepting, let requests in progress finish, close the rest."""
        self._stopping.set()
        for server in self._servers:
            server.close()
        deadline = time.monotonic() + grace
        while self._busy and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=grace)
        await self.close()

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for path in self._unix_paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._servers.clear()
        self._unix_paths.clear()
        await self.resolver.close()


def _nameserver_text(server: Nameserver) -> str:
    host = f"[{server.host}]" if ":" in server.host else server.host
    return f"{host}:{server.port}"


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


def _event_loop_factory() -> type[asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.Loop


def run_server(
    settings: Settings,
    *,
    listen: Sequence[ListenAddress] | None = None,
    nameservers: Sequence[Nameserver] | None = None,
) -> int:
    """Run until SIGTERM/SIGINT; the exit status for the command line."""
    if listen:
        settings = replace(settings, listen=tuple(listen))
    if nameservers:
        settings = replace(settings, nameservers=tuple(nameservers))
    logs.configure(settings.debug_level, settings.log_target)
    loop_factory = _event_loop_factory()
    runner = asyncio.Runner(loop_factory=loop_factory) if loop_factory else asyncio.Runner()
    with runner:
        try:
            return runner.run(_serve(settings))
        except ListenError as exc:
            log.error("%s", exc)
            print(f"spfpolicy: {exc}", file=sys.stderr)
            return 1


async def _serve(settings: Settings) -> int:
    server = PolicyServer(settings)
    await server.start(settings.listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info("spfpolicy ready (event loop %s)", type(loop).__module__.split(".")[0])
    try:
        await stop.wait()
        log.info("stopping: finishing requests in progress")
        await server.stop()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    log.info("stopped after %d requests", server.requests)
    return 0
