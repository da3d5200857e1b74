"""The policy server: one request in, one action out; reload and stop.

A request's way: listeners.py accepts a connection; connection.py reads its
bytes, parses requests and writes answers in order, asking ``answer_now``
(every answer cached: decided in the socket callback), ``answer_later``
(an SPF outcome to read from the shared cache: decided in the read's
callback) or else ``answer`` (awaited in the connection's task); all go to
policy.py for the decision.
Every smtpd connection is served concurrently in one process. A request that
fails in any way is still answered (DUNNO, or the TempError action when
TempError_Defer is set), and the connection and the server live on.

``PolicyServer.reload()`` applies new settings to requests read from then
on; ``stop()`` stops accepting and reading, answers every request already
read (within Shutdown_Grace; the fallback answers what is still evaluating
at its end), writes the DNS cache to Cache_File, closes the connections, the
metrics endpoint and the resolver. ``restore_cache()`` reads it back.
The process around it (start-up order, privileges, signals, systemd) is in
lifecycle.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from spfpolicy import cachefile, logs
from spfpolicy.address import HostPort
from spfpolicy.checks import DnsChecks
from spfpolicy.config import ListenAddress, Settings
from spfpolicy.connection import Connection
from spfpolicy.deciding import Known, decide, decide_now
from spfpolicy.domainstats import DomainStats, domain_of
from spfpolicy.evaluator import SpfEvaluator
from spfpolicy.listeners import ListenError, Listeners, StartupError
from spfpolicy.memory import InstanceMemory, VerdictMemo
from spfpolicy.metrics import (
    MetricsEndpoint,
    MetricsUnavailable,
    ServerStats,
    Snapshot,
    outcome_labels,
)
from spfpolicy.policy import ActionKind, Decision, fallback_decision
from spfpolicy.protocol import REQUEST_TYPE, PolicyRequest
from spfpolicy.resolver import Resolver
from spfpolicy.systemd import InheritedSocket

__all__ = ["RESTART_ONLY", "ListenError", "PolicyServer", "StartupError"]

log = logging.getLogger(__name__)
request_log = logging.getLogger(logs.REQUEST_LOGGER)

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
    "shared_cache": "Shared_Cache",
    "shared_cache_prefix": "Shared_Cache_Prefix",
    "shared_cache_timeout": "Shared_Cache_Timeout",
    "shared_cache_password_file": "Shared_Cache_Password_File",
    "shared_cache_ca_file": "Shared_Cache_CA_File",
}


# A memo hit's rendering (its counters' labels, its domain, its log line)
# is kept for this many decisions the memo keeps; forgotten all at once.
MAX_RENDERED = 256

_Rendered = tuple[tuple[str, str], str, str]


def _render(decision: Decision, client: str, helo: str, sender: str) -> _Rendered:
    """What ``_answered`` counts and logs of ``decision``, answered to a
    request from ``client`` with this HELO name and sender: its
    (action, result) labels, the domain it is counted under, its log line."""
    result = None if decision.result is None else str(decision.result)
    return (
        outcome_labels(decision.kind, result, decision.restriction),
        domain_of(sender, helo),
        f"{decision.log_message()} client={client or '-'} helo={helo!r} sender={sender!r}",
    )


class PolicyServer:
    """Serves Postfix's policy protocol on unix and inet sockets."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.resolver = Resolver.from_settings(settings)
        if settings.shared_cache:
            self.resolver.shared = _shared_cache(settings)
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
        self.domains = _domain_stats(settings.domain_stats_size)
        self.connections: set[Connection] = set()
        self.listeners = Listeners(lambda: Connection(self))
        self.metrics: MetricsEndpoint | None = None
        self._deadlines: set[asyncio.Timeout] = set()  # of requests being answered
        self._stop_deadline: float | None = None  # loop time answers are due by
        self._slots = asyncio.Semaphore(settings.max_in_flight)
        self._result_hits_before = 0  # of result caches replaced by reloads
        self._read_watch: asyncio.TimerHandle | None = None  # see _watch_reads
        # What _answered renders of a Decision the verdict memo keeps (and
        # gives to every request its entry answers), for the client, HELO
        # name and sender it was rendered for: by id(decision).
        self._rendered: dict[int, tuple[Decision, tuple[str, str, str], *_Rendered]] = {}

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
        # Those of answer_later are counted by their connections.
        return len(self._deadlines) + sum(c.reading for c in self.connections)

    @property
    def read_limit(self) -> float:
        """Seconds a connection lets a request wait for ``answer_later``'s
        callback before its task takes the request over (a safety net: the
        shared cache's reads end within their own deadlines)."""
        settings = self.settings
        return min(settings.request_timeout, 1.0 + 4 * settings.shared_cache_timeout)

    def snapshot(self) -> Snapshot:
        return Snapshot(
            stats=self.stats,
            dns=self.resolver.counters(),
            shared=self.resolver.shared_counters(),
            # SPF checks answered from the result cache, directly or through the memo.
            result_cache_hits=self._result_hits_before
            + self.checks.result_hits
            + self.memo.checks_saved,
            result_cache_entries=len(self.checks.results),
            connections=len(self.connections),
            requests_in_flight=self.requests_in_flight,
            evaluations_in_flight=self.evaluator.in_flight,
            domain_entries=0 if self.domains is None else self.domains.entries(),
            domain_bytes=0 if self.domains is None else self.domains.memory(),
            domain_changes=0 if self.domains is None else self.domains.changes_seen,
            plans=None if self.checks.plans is None else self.checks.plans.counters(),
            checks_joined=self.checks.joined,
        )

    def domain_report(self, top: int) -> dict[str, Any] | None:
        """``/domains``: the per-domain table's report; None when it is off."""
        return None if self.domains is None else self.domains.report(top)

    def _make_checks(self, settings: Settings) -> DnsChecks:
        checks = DnsChecks(
            self.evaluator,
            void_limit=settings.void_limit,
            result_cache_size=settings.result_cache_size,
            result_cache_ttl=settings.result_cache_ttl,
        )
        checks.shared = self.resolver.shared  # SPF outcomes share the Redis level
        return checks

    # -- start ----------------------------------------------------------------

    async def start(
        self, listen: Sequence[ListenAddress], inherited: Sequence[InheritedSocket] = ()
    ) -> None:
        """Listen on ``inherited`` sockets (systemd's) if any, else on ``listen``."""
        try:
            await self.listeners.open(listen, inherited, self.settings)
        except BaseException:
            await self.close()
            raise

    async def start_metrics(self) -> None:
        """The Prometheus endpoint, when Metrics_Listen is set (before dropping privileges)."""
        if self.settings.metrics_listen is None:
            return
        listen = self.settings.metrics_listen
        try:
            self.metrics = MetricsEndpoint(self.snapshot, self.domain_report)
            await self.metrics.start(listen.host, listen.port)
        except MetricsUnavailable as exc:
            self.metrics = None
            raise StartupError(str(exc)) from None
        except OSError as exc:
            self.metrics = None
            message = f"cannot serve metrics on {listen} (Metrics_Listen): {exc}"
            raise StartupError(message) from None
        bound = HostPort(listen.host, self.metrics.port)
        log.info("metrics on http://%s/metrics", bound)

    @property
    def inet_ports(self) -> list[int]:
        return self.listeners.inet_ports

    # -- requests -----------------------------------------------------------

    def refuse(self, connection: Connection) -> None:
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
        return self._decided_now(request, Known(self.checks), time.perf_counter())

    def _decided_now(
        self, request: PolicyRequest, known: Known, started: float
    ) -> str | Known | None:
        try:
            decision = decide_now(request, self.settings, known, self.memory, self.memo)
        except Exception:
            return None  # answer() runs it again and logs the failure
        if decision is None:
            return known
        self.stats.requests += 1
        return self._answered(request, decision, started)

    def answer_later(
        self, request: PolicyRequest, known: Known, done: Callable[[bool], None]
    ) -> bool:
        """For a request ``answer_now`` left with ``known``: when what it
        stopped at is an SPF outcome the shared cache may hold, read it and
        return True; ``done`` then gets whether the read found it, in a
        callback of its own soon after Redis's reply (no task waits for
        the read), for ``answer_read`` to go on. False, and ``done`` is
        never called: await ``answer``."""
        if self.checks.shared is None or known.checks is not self.checks or self.stopping:
            return False
        loop = asyncio.get_running_loop()

        def settled(found: bool) -> None:
            # Not from inside the read's hook: the shared cache finishes
            # settling the trip before a request is answered again.
            loop.call_soon(done, found)

        if not known.read_expected(settled):
            return False
        if self._read_watch is None:
            self._read_watch = loop.call_later(self.read_limit, self._watch_reads)
        return True

    def answer_read(
        self, request: PolicyRequest, known: Known, found: bool, started: float
    ) -> str | Known | None:
        """What ``answer_now`` returns for a request once its read (see
        ``answer_later``, ``started`` at perf_counter time) is over."""
        if not found or self.stopping or known.checks is not self.checks:
            return known
        known.forget_missing()
        return self._decided_now(request, known, started)

    def _watch_reads(self) -> None:
        """The safety net under answer_later: a request whose read has not
        called back within read_limit goes to its connection's task."""
        self._read_watch = None
        since = time.perf_counter() - self.read_limit
        reading = [c for c in self.connections if c.read_overdue(since)]
        if reading:
            self._read_watch = asyncio.get_running_loop().call_later(
                self.read_limit, self._watch_reads
            )

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
        get = request.attributes.get
        asked = (get("client_address", ""), get("helo_name", ""), get("sender", ""))
        if decision.kept:
            rendered = self._rendered.get(id(decision))
            if rendered is None or rendered[0] is not decision or rendered[1] != asked:
                if len(self._rendered) >= MAX_RENDERED:
                    self._rendered.clear()
                rendered = self._rendered[id(decision)] = (
                    decision,
                    asked,
                    *_render(decision, *asked),
                )
            _, _, outcome, domain, line = rendered
        else:
            outcome, domain, line = _render(decision, *asked)
        self.stats.count(outcome, time.perf_counter() - started)
        if self.domains is not None:
            self.domains.record(domain, decision.result, decision.kind)
        logs.info(log, line)
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
        resolver.apply(new)
        resolver.renew()  # a changed /etc/resolv.conf, when Nameservers is empty
        self.evaluator.void_limit, self.evaluator.lookup_time = new.void_limit, new.lookup_time
        checks = self._make_checks(new)
        if new.result_cache_size == old.result_cache_size:
            # Results are keyed by everything they depend on (Void_Limit too).
            checks.results = self.checks.results
        checks.joined = self.checks.joined  # a counter for the process's life
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
        if new.domain_stats_size != old.domain_stats_size:
            self.domains = _domain_stats(new.domain_stats_size)  # counting starts over
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
        self.listeners.stop_accepting()
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
        # Only a stop writes the file: a start that failed has nothing to keep
        # and must not replace what the last run left.
        self.save_cache()
        await self.close()

    async def close(self) -> None:
        if self._read_watch is not None:
            self._read_watch.cancel()
            self._read_watch = None
        self.listeners.close()
        if self.metrics is not None:
            await self.metrics.close()
            self.metrics = None
        await self.resolver.close()

    # -- Cache_File ---------------------------------------------------------

    def restore_cache(self, wall: Callable[[], float] = time.time) -> int:
        """Fill the DNS cache from Cache_File (at start, as the user the
        server runs as); the number of answers read. Whatever is wrong with
        the file, the server starts, with an empty cache and a warning."""
        path = self.settings.cache_file
        if not path:
            return 0
        try:
            stored, expired = cachefile.restore(
                path,
                lambda entry, left: self.resolver.keep(
                    entry.name, entry.qtype, entry.records, entry.ttl, left
                ),
                max_entries=self.resolver.cache.max_entries,
                now=wall(),
            )
        except (cachefile.CacheFileError, OSError) as exc:
            log.warning("Cache_File %s ignored (%s): starting with an empty DNS cache", path, exc)
            return 0
        except Exception:  # a start never fails on the file
            log.exception("Cache_File %s ignored: starting with an empty DNS cache", path)
            return 0
        log.info("DNS cache: %d answers read from %s (%d expired)", stored, path, expired)
        return stored

    def save_cache(self, wall: Callable[[], float] = time.time) -> int:
        """Write the DNS cache's live answers to Cache_File; the number
        written. A failure is logged: it never fails the stop."""
        path = self.settings.cache_file
        if not path:
            return 0
        resolver = self.resolver
        now, since = wall(), resolver.clock()
        try:
            # The cache's expiries are on the monotonic clock, which starts
            # over with the machine: the file holds wall-clock times.
            entries = [
                cachefile.Entry(name, qtype, a.records, a.ttl, now + a.expires - since)
                for name, qtype, a in resolver.cache.answers()
                if a.expires > since
            ]
            count = cachefile.save(path, entries, max_entries=resolver.cache.max_entries, now=now)
        except Exception as exc:  # OSError mostly; a stop goes on whatever it is
            log.error("DNS cache not written to Cache_File %s: %s", path, exc)
            return 0
        log.info("DNS cache: %d answers written to %s", count, path)
        return count


def _shared_cache(settings: Settings) -> Any:
    """The Redis level (sharedcache.py, imported only here: it needs redis-py).
    Redis itself is not contacted yet: one that is down does not stop the start."""
    try:
        from spfpolicy.sharedcache import SharedCache
    except ImportError:
        raise StartupError(
            "Shared_Cache needs redis-py and hiredis: pip install 'spfpolicy[redis]'"
        ) from None
    try:
        shared = SharedCache.from_settings(settings)
    except OSError as exc:
        raise StartupError(
            f"cannot read {exc.filename or settings.shared_cache_password_file} "
            f"(Shared_Cache_Password_File or Shared_Cache_CA_File): {exc.strerror or exc}"
        ) from None
    except ValueError as exc:  # a URL redis-py does not take
        raise StartupError(f"bad Shared_Cache {settings.shared_cache!r}: {exc}") from None
    log.info("shared cache: %s", shared.describe())
    return shared


def _domain_stats(size: int) -> DomainStats | None:
    return DomainStats(size) if size > 0 else None
