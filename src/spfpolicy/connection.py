"""One client connection: bytes in, answers out, in order.

Bytes go straight into the sans-IO parser as they arrive. ``_answer_at_once``
is the one place requests are answered: it takes the next request from the
parser, answers it if ``answer_now`` can (every answer it needs cached),
writes the answer, and goes on while the client reads its answers; it stops
at what must be waited for, and says what:

- in ``data_received``, while the connection's task sleeps, it answers the
  cached requests without waking the task (the fast path: no task switch);
- the connection's task runs the same steps and does the waiting between
  them: for more data, for a request's lookups (``answer``), for the client
  to read (flow control), with Idle_Timeout on the first and the last;
- a request that waits only for an SPF outcome the shared cache may hold
  waits for that read without the task (``answer_later``): its callback
  (``_read_back``) answers it and goes on as ``data_received`` does, or,
  on a miss, hands it to the task. The requests read after it wait, and
  anything that wakes the task (end of input, shutdown, Idle_Timeout, the
  server's watch of overdue reads) makes the task take it over, joining
  the read.

Because the parser holds everything read, "stop reading, then answer what
was read" is exact at shutdown: nothing read is lost in a stream buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

from spfpolicy.config import Settings
from spfpolicy.deciding import Known
from spfpolicy.protocol import PolicyRequest, ProtocolError, RequestParser, encode_response

# The server's log lines keep the logger name operators know them by.
log = logging.getLogger("spfpolicy.server")


class Answers(Protocol):
    """What a connection needs from its server (``server.PolicyServer``)."""

    settings: Settings

    @property
    def stopping(self) -> bool: ...

    @property
    def connections(self) -> set[Connection]: ...

    def refuse(self, connection: Connection) -> None: ...

    @property
    def read_limit(self) -> float: ...

    def answer_now(self, request: PolicyRequest) -> str | Known | None: ...

    def answer_later(
        self, request: PolicyRequest, known: Known, done: Callable[[bool], None]
    ) -> bool: ...

    def answer_read(
        self, request: PolicyRequest, known: Known, found: bool, started: float
    ) -> str | Known | None: ...

    async def answer(self, request: PolicyRequest, known: Known | None = None) -> str: ...


class _Wait(enum.Enum):
    """Why ``_answer_at_once`` stopped, when not for a lookup."""

    DATA = enum.auto()  # no complete request read
    CLIENT = enum.auto()  # the client does not read its answers (transport paused writing)
    READ = enum.auto()  # a request waits for a quick read, outside the task (``_read``)


@dataclass(frozen=True, slots=True)
class _Lookup:
    """A request taken from the parser whose answer waits for DNS, with what
    ``answer_now`` found cached."""

    request: PolicyRequest
    known: Known | None


# What stopped ``_answer_at_once``: a wait, a lookup, or a broken protocol
# (logged, and the connection closed, after the requests read before it).
_Stop = _Wait | _Lookup | ProtocolError


class Connection(asyncio.Protocol):
    """One client connection and the task that answers what needs waiting for."""

    def __init__(self, server: Answers) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._parser: RequestParser | None = None
        self._wakeup = asyncio.Event()  # data, EOF or shutdown
        self._writable = asyncio.Event()  # transport flow control
        self._writable.set()
        self._closing = False  # nothing more will be read
        self._lost = False
        self._paused = False
        self._loop: asyncio.AbstractEventLoop  # set by connection_made
        self._last_read = 0.0  # loop time of the last bytes received
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_expired = False
        self._waiting = False  # the task sleeps until data, with nothing to answer
        # A request the fast path took from the parser and leaves to the task.
        self._handed_over: _Lookup | None = None
        # A request waiting for answer_later's callback (no task involved),
        # and since when (perf_counter time; see read_overdue).
        self._reading: _Lookup | None = None
        self._read_since = 0.0
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
        # Kept: on Python 3.11 each get_running_loop() is a getpid system
        # call, and data_received wants the loop's time for every read.
        self._loop = loop = asyncio.get_running_loop()
        # Idle_Timeout: one timer per connection, re-armed only when it fires
        # early (cheaper than a timeout around every wait for data).
        self._last_read = loop.time()
        self._idle_timer = loop.call_later(settings.idle_timeout, self._check_idle)
        self.task = loop.create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or self._closing:
            return
        self._last_read = self._loop.time()
        # A ProtocolError is raised again by next_request(), after the
        # requests before it, where _answer_at_once reports it. (try, not
        # contextlib.suppress: this runs for every read, and the context
        # manager costs 0.27 us where try costs 0.02, timeit.)
        try:  # noqa: SIM105
            parser.feed(data)
        except ProtocolError:
            pass
        if self._reading is None:  # else the next requests wait for the one being read
            if self._waiting:
                self._go_on()  # the fast path: answer without waking the task
            else:
                self._wakeup.set()
        # Backpressure on a client that pipelines faster than we answer.
        if not self._paused and parser.buffered > 2 * self._server.settings.max_request_size:
            self._set_reading(False)

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

    # -- answering ------------------------------------------------------------

    def _answer_at_once(self) -> _Stop:
        """Answer, in order, the requests read whose answers need no lookup,
        while the client reads its answers; return what stopped it."""
        parser, transport, writable = self._parser, self._transport, self._writable
        assert parser is not None and transport is not None
        answer_now = self._server.answer_now
        while writable.is_set():
            try:
                request = parser.next_request()
            except ProtocolError as exc:
                return exc
            if request is None:
                return _Wait.DATA
            action = answer_now(request)
            if not isinstance(action, str):
                lookup = _Lookup(request, action)
                return _Wait.READ if self._read(lookup) else lookup
            transport.write(encode_response(action))
        return _Wait.CLIENT

    def _read(self, lookup: _Lookup) -> bool:
        """Let ``lookup`` wait for a quick read without the task, if the
        server has one for it (``answer_later``): ``_read_back`` goes on."""
        if lookup.known is None or self._closing:
            return False
        done = functools.partial(self._read_back, lookup)
        if not self._server.answer_later(lookup.request, lookup.known, done):
            return False
        self._reading = lookup
        self._read_since = time.perf_counter()
        return True

    def _read_back(self, lookup: _Lookup, found: bool) -> None:
        """``answer_later``'s callback: write the answer and go on answering
        at once, or hand the request to the task. Late (the task took the
        request over): nothing to do."""
        if self._reading is not lookup:
            return
        self._reading = None
        if self._lost:
            return
        assert lookup.known is not None and self._transport is not None
        try:
            answer = self._server.answer_read(lookup.request, lookup.known, found, self._read_since)
        except Exception:  # a bug: the task answers it, the full way
            log.exception("answering after a read failed; the connection's task goes on")
            answer = None
        if not isinstance(answer, str):
            self._handed_over = _Lookup(lookup.request, answer)
            self._waiting = False
            self._wakeup.set()
            return
        self._transport.write(encode_response(answer))
        if self._waiting:  # else the task is awake, and goes on
            self._go_on()

    def _go_on(self) -> None:
        """While the task sleeps with nothing to answer (``_waiting``):
        answer at once what can be, and wake the task for what is left (a
        lookup, a client that does not read, the end of the connection)."""
        try:
            stopped = self._answer_at_once()
        except Exception:
            # A bug must not escape into the transport (which would drop
            # the connection): the task answers what is left.
            log.exception("answering at once failed; the connection's task goes on")
        else:
            if stopped is _Wait.READ:
                return  # a request is being read; its callback goes on
            if stopped is _Wait.DATA and not (self._closing or self._idle_expired):
                if self._paused:
                    self._set_reading(True)
                return  # all answered; the task sleeps on
            if isinstance(stopped, _Lookup):
                self._handed_over = stopped
        self._waiting = False  # the task has work: the fast path waits for it
        self._wakeup.set()

    @property
    def reading(self) -> bool:
        """A request waits for its read (``answer_later``), outside the task."""
        return self._reading is not None

    def read_overdue(self, since: float) -> bool:
        """Whether a request still waits for its read; if it has since
        before ``since`` (a read that never called back, a bug), the task
        takes it over and answers it the full way."""
        if self._reading is None:
            return False
        if self._read_since < since:
            log.error(
                "a request waited %ss for a shared-cache read; answering it the full way",
                self._server.read_limit,
            )
            self._wakeup.set()
        return True

    async def _sleep(self) -> None:
        """Until woken, with nothing for the task to answer: meanwhile the
        callbacks answer at once what they can (``_waiting``)."""
        self._wakeup.clear()
        self._waiting = True
        try:
            await self._wakeup.wait()
        finally:
            self._waiting = False

    async def _serve(self) -> None:
        """Answer what ``data_received`` leaves, waiting where it cannot; close."""
        server = self._server
        transport = self._transport
        assert transport is not None
        try:
            while not self._lost:
                stopped: _Stop
                if self._handed_over is not None:
                    stopped, self._handed_over = self._handed_over, None
                elif self._reading is not None:
                    # Woken while a request waits for its read (end of
                    # input, shutdown, idle, a late read): the task takes
                    # it over, joining the read.
                    stopped, self._reading = self._reading, None
                else:
                    stopped = self._answer_at_once()
                if isinstance(stopped, _Lookup):
                    action = await server.answer(stopped.request, stopped.known)
                    if self._lost:
                        break
                    transport.write(encode_response(action))
                elif stopped is _Wait.CLIENT:
                    try:
                        async with asyncio.timeout(server.settings.idle_timeout):
                            await self._writable.wait()
                    except TimeoutError:
                        log.info("closing connection: the client does not read its answers")
                        break
                elif stopped is _Wait.READ:
                    await self._sleep()
                elif stopped is _Wait.DATA:
                    if self._closing:
                        break
                    if self._paused:
                        self._set_reading(True)
                    if self._idle_expired:
                        idle = server.settings.idle_timeout
                        log.info("closing connection idle for %ss (Idle_Timeout)", idle)
                        break
                    await self._sleep()
                else:
                    log.warning("closing connection: %s", stopped)
                    break
        except Exception:
            log.exception("connection handler failed; closing that connection")
        finally:
            self._reading = None
            if self._idle_timer is not None:
                self._idle_timer.cancel()
            server.connections.discard(self)
            if self._idle_expired or not self._writable.is_set():
                # Answers nobody reads: close() would keep the socket open
                # until they were sent, that is, forever.
                transport.abort()
            else:
                transport.close()
