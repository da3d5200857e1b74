"""The policy server: listeners, connections, requests, reload and stop.

Every smtpd connection is served concurrently in one process; requests on a
connection are answered in order. A request that fails in any way is still
answered (DUNNO, or the TempError action when TempError_Defer is set), and
the connection and the server live on.

``PolicyServer.reload()`` applies new settings to requests read from then
on; ``stop()`` stops accepting and reading, answers every request already
read (within Shutdown_Grace; the fallback answers what is still evaluating
at its end), closes the connections, the metrics endpoint and the resolver.
The process around it (start-up order, privileges, signals, systemd) is in
lifecycle.py.
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
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import cast

from spfpolicy import logs
from spfpolicy.checks import DnsChecks
from spfpolicy.config import (
    ListenAddress,
    ListenFamily,
    Settings,
)
from spfpolicy.deciding import Known, decide, decide_now
from spfpolicy.evaluator import SpfEvaluator
from spfpolicy.memory import InstanceMemory, VerdictMemo
from spfpolicy.metrics import (
    MetricsEndpoint,
    MetricsUnavailable,
    ServerStats,
    Snapshot,
)
from spfpolicy.policy import ActionKind, Decision, fallback_decision
from spfpolicy.protocol import (
    REQUEST_TYPE,
    PolicyRequest,
    ProtocolError,
    RequestParser,
    encode_response,
)
from spfpolicy.resolver import Resolver
from spfpolicy.systemd import InheritedSocket

log = logging.getLogger(__name__)
request_log = logging.getLogger(logs.REQUEST_LOGGER)

# Requests already read get this long to finish when stop() is not told.
SHUTDOWN_GRACE = 30.0
# Listen backlog: a Postfix restart reconnects every smtpd (default_process_limit
# 100, often raised) at once.
BACKLOG = 1024

# Keys a SIGHUP cannot change in a running process: the sockets are bound
# and privileges dropped, and the DNS channel (servers, timeout) and cache
# size belong to the cache a reload keeps. Changing one is logged; the
# running value stays until a restart.
RESTART_ONLY = {
    "listen": "Listen",
    "socket_mode": "Socket_Mode",
    "socket_owner": "Socket_Owner",
    "socket_group": "Socket_Group",
    "user": "User",
    "group": "Group",
    "metrics_listen": "Metrics_Listen",
    "nameservers": "Nameservers",
    "dns_timeout": "DNS_Timeout",
    "dns_cache_size": "DNS_Cache_Size",
}


class StartupError(Exception):
    """The server cannot start; the message says what to do."""


class ListenError(StartupError):
    """A listener could not be set up; the message says what to do."""


class _Connection(asyncio.Protocol):
    """One client connection.

    Bytes go straight into the sans-IO parser as they arrive; one task takes
    complete requests from it and answers them in order. Because the parser
    holds everything read, "stop reading, then answer what was read" is
    exact at shutdown: nothing read is lost in a stream buffer.

    Fast path: while the task is idle, ``data_received`` answers at once
    the requests whose answers are all cached (``PolicyServer.answer_now``);
    the first one that needs a lookup goes to the task, and with it the
    order of everything after it.
    """

    def __init__(self, server: PolicyServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._parser: RequestParser | None = None
        self._wakeup = asyncio.Event()  # data, EOF or shutdown
        self._writable = asyncio.Event()  # transport flow control
        self._writable.set()
        self._closing = False  # nothing more will be read
        self._lost = False
        self._paused = False
        self._last_read = 0.0  # loop time of the last bytes received
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_expired = False
        self._waiting = False  # the task waits for data, with nothing to answer
        # A request the fast path hands to the task, with what it found cached.
        self._pending: tuple[PolicyRequest, Known | None] | None = None
        self.task: asyncio.Task[None] | None = None

    # -- transport callbacks --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = transport = cast(asyncio.Transport, transport)
        server = self._server
        settings = server.settings
        if server.stopping or len(server.connections) >= settings.max_connections:
            server.refuse(self)
            transport.close()
            return
        self._parser = RequestParser(
            max_line_length=settings.max_line_length,
            max_attributes=settings.max_attributes,
            max_request_size=settings.max_request_size,
        )
        server.connections.add(self)
        loop = asyncio.get_running_loop()
        # Idle_Timeout: one timer per connection, re-armed only when it fires
        # early (cheaper than a timeout around every wait for data).
        self._last_read = loop.time()
        self._idle_timer = loop.call_later(settings.idle_timeout, self._check_idle)
        self.task = loop.create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or self._closing:
            return
        self._last_read = asyncio.get_running_loop().time()
        # A ProtocolError is raised again by next_request(), after the
        # requests before it: the serving task logs it and closes.
        with contextlib.suppress(ProtocolError):
            parser.feed(data)
        if self._waiting and self._writable.is_set():
            try:
                if self._answer_at_once(parser):
                    return  # all answered; the task sleeps on
            except Exception:
                # A bug must not escape into the transport (which would drop
                # the connection): the task answers what is left.
                log.exception("answering at once failed; the connection's task goes on")
        # Backpressure on a client that pipelines faster than we answer.
        if not self._paused and parser.buffered > 2 * self._server.settings.max_request_size:
            self._set_reading(False)
        self._wakeup.set()

    def _answer_at_once(self, parser: RequestParser) -> bool:
        """Answer the requests that need no lookup; False when the task has
        work left (a request that does, a protocol error, a client that does
        not read its answers)."""
        answer_now = self._server.answer_now
        transport = self._transport
        assert transport is not None
        while True:
            try:
                request = parser.next_request()
            except ProtocolError:
                return False  # raised again in the task, which logs it and closes
            if request is None:
                return True
            action = answer_now(request)
            if not isinstance(action, str):
                self._pending = (request, action)
                return False
            transport.write(encode_response(action))
            if not self._writable.is_set():
                return False  # the task waits until the client reads (or gives up)

    def eof_received(self) -> bool:
        self._closing = True
        self._wakeup.set()
        return True  # keep our side open to answer what was already sent

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = self._closing = True
        self._writable.set()
        self._wakeup.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def _check_idle(self) -> None:
        loop = asyncio.get_running_loop()
        idle = self._server.settings.idle_timeout
        quiet_until = self._last_read + idle
        if loop.time() < quiet_until:
            self._idle_timer = loop.call_at(quiet_until, self._check_idle)
            return
        self._idle_timer = None
        self._idle_expired = True
        self._wakeup.set()

    # -- the server's side -------------------------------------------------

    def shutdown(self) -> None:
        """Read nothing more; what was read is still answered, then close."""
        self._closing = True
        if self._transport is not None and not self._lost:
            self._set_reading(False)
        self._wakeup.set()

    def _set_reading(self, on: bool) -> None:
        assert self._transport is not None
        with contextlib.suppress(RuntimeError):  # transport already closing
            if on:
                self._transport.resume_reading()
            else:
                self._transport.pause_reading()
        self._paused = not on

    async def _serve(self) -> None:
        server = self._server
        parser = self._parser
        transport = self._transport
        assert parser is not None and transport is not None
        try:
            while not self._lost:
                now: str | Known | None
                if self._pending is not None:
                    (request, now), self._pending = self._pending, None
                else:
                    try:
                        next_request = parser.next_request()
                    except ProtocolError as exc:
                        log.warning("closing connection: %s", exc)
                        break
                    if next_request is None:
                        if self._closing:
                            break
                        if self._paused:
                            self._set_reading(True)
                        if self._idle_expired:
                            idle = server.settings.idle_timeout
                            log.info("closing connection idle for %ss (Idle_Timeout)", idle)
                            break
                        self._wakeup.clear()
                        self._waiting = True
                        try:
                            await self._wakeup.wait()
                        finally:
                            self._waiting = False
                        continue
                    request = next_request
                    now = server.answer_now(request)
                action = now if isinstance(now, str) else await server.answer(request, now)
                if self._lost:
                    break
                transport.write(encode_response(action))
                if not self._writable.is_set():
                    try:
                        async with asyncio.timeout(server.settings.idle_timeout):
                            await self._writable.wait()
                    except TimeoutError:
                        log.info("closing connection: the client does not read its answers")
                        break
        except Exception:
            log.exception("connection handler failed; closing that connection")
        finally:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
            server.connections.discard(self)
            if self._idle_expired or not self._writable.is_set():
                # Answers nobody reads: close() would keep the socket open
                # until they were sent, that is, forever.
                transport.abort()
            else:
                transport.close()


class PolicyServer:
    """Serves Postfix's policy protocol on unix and inet sockets."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.resolver = Resolver(
            settings.nameservers,
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
        self.checks = self._make_checks(settings)
        self.memory = InstanceMemory(settings.instance_cache_size, settings.instance_ttl)
        self.memo = VerdictMemo(settings, settings.result_cache_size)
        self.stats = ServerStats()
        self.connections: set[_Connection] = set()
        self.metrics: MetricsEndpoint | None = None
        self._servers: list[asyncio.Server] = []
        self._unix_paths: list[str] = []
        self._deadlines: set[asyncio.Timeout] = set()  # of requests being answered
        self._stop_deadline: float | None = None  # loop time answers are due by
        self._slots = asyncio.Semaphore(settings.max_in_flight)
        self._result_hits_before = 0  # of result caches replaced by reloads

    # Counters the tests and the old API read directly.
    @property
    def requests(self) -> int:
        return self.stats.requests

    @property
    def errors(self) -> int:
        return self.stats.errors

    @property
    def refused_connections(self) -> int:
        return self.stats.refused_connections

    @property
    def stopping(self) -> bool:
        return self._stop_deadline is not None

    @property
    def requests_in_flight(self) -> int:
        return len(self._deadlines)

    def snapshot(self) -> Snapshot:
        return Snapshot(
            stats=self.stats,
            dns=self.resolver.counters(),
            # SPF checks answered from the result cache, directly or through the memo.
            result_cache_hits=self._result_hits_before
            + self.checks.result_hits
            + self.memo.checks_saved,
            result_cache_entries=len(self.checks.results),
            connections=len(self.connections),
            requests_in_flight=self.requests_in_flight,
            evaluations_in_flight=self.evaluator.in_flight,
        )

    def _make_checks(self, settings: Settings) -> DnsChecks:
        return DnsChecks(
            self.evaluator,
            void_limit=settings.void_limit,
            result_cache_size=settings.result_cache_size,
            result_cache_ttl=settings.result_cache_ttl,
        )

    # -- listeners ----------------------------------------------------------

    async def start(
        self, listen: Sequence[ListenAddress], inherited: Sequence[InheritedSocket] = ()
    ) -> None:
        """Listen on ``inherited`` sockets (systemd's) if any, else on ``listen``."""
        loop = asyncio.get_running_loop()
        try:
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
            else:
                for address in listen:
                    try:
                        if address.family is ListenFamily.UNIX:
                            await self._listen_unix(address.path)
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
        except BaseException:
            await self.close()
            raise

    def _protocol(self) -> _Connection:
        return _Connection(self)

    async def start_metrics(self) -> None:
        """The Prometheus endpoint, when Metrics_Listen is set (before dropping privileges)."""
        if self.settings.metrics_listen is None:
            return
        host, port = self.settings.metrics_listen.host, self.settings.metrics_listen.port
        try:
            self.metrics = MetricsEndpoint(self.snapshot)
            await self.metrics.start(host, port)
        except MetricsUnavailable as exc:
            self.metrics = None
            raise StartupError(str(exc)) from None
        except OSError as exc:
            self.metrics = None
            message = f"cannot serve metrics on {host}:{port} (Metrics_Listen): {exc}"
            raise StartupError(message) from None
        log.info("metrics on http://%s:%d/metrics", _host_text(host), self.metrics.port)

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
                settings = self.settings
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

    # -- requests -----------------------------------------------------------

    def refuse(self, connection: _Connection) -> None:
        if self.stopping:
            return  # a connection in the accept queue at shutdown: not a refusal
        self.stats.refused_connections += 1
        # One line per 100 refusals: a flood must not flood the log too.
        if self.stats.refused_connections % 100 == 1:
            log.warning(
                "connection refused: %d connections open (Max_Connections); %d refused so far",
                len(self.connections),
                self.stats.refused_connections,
            )

    def answer_now(self, request: PolicyRequest) -> str | Known | None:
        """The action for a request whose answer needs no lookup; else what
        was found cached (or None), for ``answer()`` to go on with in a task.
        Unusual requests (warnings, another request type, debug logging of
        attributes, shutdown) and any failure go the full way, which logs them."""
        if (
            request.warnings
            or self._stop_deadline is not None
            or request.request != REQUEST_TYPE
            or request_log.isEnabledFor(logging.DEBUG)
        ):
            return None
        started = time.perf_counter()
        known = Known(self.checks)
        try:
            decision = decide_now(request, self.settings, known, self.memory, self.memo)
        except Exception:
            return None  # answer() runs it again and logs the failure
        if decision is None:
            return known
        self.stats.requests += 1
        return self._answered(request, decision, started)

    async def answer(self, request: PolicyRequest, known: Known | None = None) -> str:
        """One request in, one action out, whatever happens on the way;
        ``known`` is what ``answer_now()`` found cached."""
        settings = self.settings  # a reload during this request does not affect it
        started = time.perf_counter()
        self.stats.requests += 1
        for warning in request.warnings:
            log.warning("malformed request line ignored: %s", warning)
        if request_log.isEnabledFor(logging.DEBUG):
            for name, value in request.attributes.items():
                request_log.debug("%s=%r", name, value)
        if request.request != REQUEST_TYPE:
            log.warning("unsupported request type %r: answering DUNNO", request.request)
            self.stats.record(ActionKind.DUNNO, None, time.perf_counter() - started)
            return "DUNNO"
        loop = asyncio.get_running_loop()
        when = loop.time() + settings.request_timeout
        if self._stop_deadline is not None:
            when = min(when, self._stop_deadline)
        deadline = asyncio.timeout_at(when)
        self._deadlines.add(deadline)
        try:
            async with deadline, self._slots:
                decision = await decide(
                    request, settings, self.checks, self.memory, known=known, memo=self.memo
                )
        except TimeoutError:
            self.stats.errors += 1
            if self.stopping:
                log.error(
                    "Shutdown_Grace ending for queue id %s: answering as TempError",
                    request.queue_id or "-",
                )
            else:
                log.error(
                    "request deadline (%ss) reached for queue id %s: answering as TempError",
                    settings.request_timeout,
                    request.queue_id or "-",
                )
            decision = fallback_decision(settings, request)
        except Exception:
            self.stats.errors += 1
            log.exception(
                "policy evaluation failed for queue id %s, client %s, sender %r",
                request.queue_id or "-",
                request.client_address,
                request.sender,
            )
            decision = fallback_decision(settings, request)
        finally:
            self._deadlines.discard(deadline)
        return self._answered(request, decision, started)

    def _answered(self, request: PolicyRequest, decision: Decision, started: float) -> str:
        """Count and log a decision; its action."""
        result = None if decision.result is None else str(decision.result)
        self.stats.record(
            decision.kind, result, time.perf_counter() - started, decision.restriction
        )
        logs.info(
            log,
            f"{decision.log_message()} client={request.client_address or '-'} "
            f"helo={request.helo_name!r} sender={request.sender!r}",
        )
        return decision.action

    # -- reload -------------------------------------------------------------

    def reload(self, new: Settings) -> list[str]:
        """Apply new settings to requests read from now on; the DNS cache stays.

        Returns the restart-only keys that changed (they keep their running
        values). Requests already being evaluated finish with the old settings.
        """
        old = self.settings
        ignored = [
            key for name, key in RESTART_ONLY.items() if getattr(old, name) != getattr(new, name)
        ]
        new = replace(new, **{name: getattr(old, name) for name in RESTART_ONLY})
        resolver = self.resolver
        resolver.min_ttl, resolver.max_ttl = new.dns_min_ttl, new.dns_max_ttl
        resolver.negative_ttl = new.dns_negative_ttl
        resolver.renew()  # a changed /etc/resolv.conf, when Nameservers is empty
        self.evaluator.void_limit, self.evaluator.lookup_time = new.void_limit, new.lookup_time
        checks = self._make_checks(new)
        if new.result_cache_size == old.result_cache_size:
            # Results are keyed by everything they depend on (Void_Limit too).
            checks.results = self.checks.results
        self._result_hits_before += self.checks.result_hits
        self.checks = checks
        if (new.instance_cache_size, new.instance_ttl) != (
            old.instance_cache_size,
            old.instance_ttl,
        ):
            self.memory = InstanceMemory(new.instance_cache_size, new.instance_ttl)
        if new.max_in_flight != old.max_in_flight:
            self._slots = asyncio.Semaphore(new.max_in_flight)
        self._result_hits_before += self.memo.checks_saved
        self.memo = VerdictMemo(new, new.result_cache_size)  # verdicts follow the settings
        self.settings = new
        return ignored

    # -- lifecycle ----------------------------------------------------------

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting and reading; answer what was read; close."""
        grace = self.settings.shutdown_grace if grace is None else grace
        loop = asyncio.get_running_loop()
        # Checks still running near the end of the grace get the fallback
        # answer, leaving a moment to write it.
        self._stop_deadline = loop.time() + grace - min(1.0, grace / 4)
        for server in self._servers:
            server.close()
        for deadline in list(self._deadlines):
            when = deadline.when()
            if when is None or when > self._stop_deadline:
                deadline.reschedule(self._stop_deadline)
        for connection in list(self.connections):
            connection.shutdown()
        tasks = [c.task for c in self.connections if c.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            if pending:
                log.warning("closing %d connections still busy after the grace", len(pending))
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=1.0)
        await self.close()

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for path in self._unix_paths:
            # After dropping privileges the socket directory may not be ours.
            with contextlib.suppress(FileNotFoundError, PermissionError):
                os.unlink(path)
        self._servers.clear()
        self._unix_paths.clear()
        if self.metrics is not None:
            await self.metrics.close()
            self.metrics = None
        await self.resolver.close()


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


def _host_text(host: str) -> str:
    return f"[{host}]" if ":" in host else host
