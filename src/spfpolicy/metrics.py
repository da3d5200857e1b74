"""Counters for the status line, the periodic stats log line and the
optional Prometheus endpoint.

``ServerStats`` is plain integers updated on the request path (no locks, no
third-party objects: a request pays a few dict increments). Everything else
(DNS cache, connections, in-flight work) is read from the live objects when
asked. The Prometheus side is a collector that turns one snapshot into
metric families at scrape time; ``prometheus_client`` is imported only when
``Metrics_Listen`` is set, so it stays an optional extra
(``pip install 'spfpolicy[metrics]'``). The endpoint is served by a small
asyncio handler on the server's own loop: no thread reads counters the loop
is writing, and it closes in the server's shutdown order like any listener.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from spfpolicy.policy import ActionKind

log = logging.getLogger(__name__)

# Request latency buckets, seconds: cache hits answer in well under a
# millisecond; DNS-bound checks take tens to hundreds; the top buckets reach
# Lookup_Time (20 s) and Request_Timeout (60 s).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
)  # fmt: skip

# Most rows /domains answers per table, whatever ?n= asks.
DOMAINS_TOP_LIMIT = 1000

NOT_CHECKED = "not_checked"  # result label of a request answered without an SPF check


def action_label(kind: ActionKind, restriction: str = "") -> str:
    """The action's first word, lower-cased: prepend, dunno, 550, defer_if_permit,
    or a pass restriction's class name.

    The rest (header text, reason, URL) differs per request; as a label it
    would make one time series per message.
    """
    if kind is ActionKind.RESTRICTION:
        return restriction_label(restriction)
    return _LABELS[kind]


# Enum.value is a property lookup: read once per kind, not once per answer.
_LABELS = {kind: kind.value for kind in ActionKind}


def restriction_label(name: str) -> str:
    """A pass restriction's label: the first word of its class name, lower-cased."""
    word = name.partition(" ")[0]
    if not (word and word.isprintable()):  # a leading blank, another kind of space
        word = name.split(None, 1)[0] if name.strip() else "empty"
    return word.lower()


def outcome_labels(kind: ActionKind, result: str | None, restriction: str = "") -> tuple[str, str]:
    """An answer's (action, result) labels in ``ServerStats.by_outcome``."""
    return action_label(kind, restriction), result or NOT_CHECKED


@dataclass
class ServerStats:
    """What the server counts itself; monotonic for the process's life."""

    requests: int = 0
    errors: int = 0  # requests answered by the fallback (deadline or failure)
    refused_connections: int = 0
    reloads: int = 0
    reload_failures: int = 0
    by_outcome: Counter[tuple[str, str]] = field(default_factory=Counter)  # (action, result)
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0

    def record(
        self, kind: ActionKind, result: str | None, seconds: float, restriction: str = ""
    ) -> None:
        """One answer: its kind (and restriction name), SPF result and latency."""
        self.count(outcome_labels(kind, result, restriction), seconds)

    def count(self, outcome: tuple[str, str], seconds: float) -> None:
        """One answer, by its ``outcome_labels`` and latency."""
        self.by_outcome[outcome] += 1
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def answered(self) -> int:
        return sum(self.latency_counts)

    def by_action(self) -> Counter[str]:
        totals: Counter[str] = Counter()
        for (action, _), count in self.by_outcome.items():
            totals[action] += count
        return totals


@dataclass(frozen=True)
class Snapshot:
    """Everything the exporter and the log line show, read at one moment."""

    stats: ServerStats
    dns: dict[str, int]  # Resolver.counters()
    result_cache_hits: int
    result_cache_entries: int
    connections: int
    requests_in_flight: int
    evaluations_in_flight: int
    domain_entries: int = 0  # the per-domain table (domainstats.py): domains tracked
    domain_bytes: int = 0  # its approximate size
    domain_changes: int = 0  # result changes it has seen
    shared: dict[str, Any] | None = None  # SharedCache.counters(), when Shared_Cache is set
    plans: dict[str, int] | None = None  # SpfPlans.counters() (plan.py), since the last reload
    checks_joined: int = 0  # SPF checks that waited for another request's evaluation of them


def summary_line(snap: Snapshot) -> str:
    """The periodic one-line stats summary."""
    stats = snap.stats
    answered = stats.answered()
    actions = " ".join(f"{k}={v}" for k, v in sorted(stats.by_action().items())) or "-"
    dns = snap.dns
    lookups = dns["hits"] + dns["misses"]
    hit_rate = f"{100 * dns['hits'] / lookups:.0f}%" if lookups else "-"
    mean = f"{1000 * stats.latency_sum / answered:.1f}ms" if answered else "-"
    return (
        f"stats: requests={stats.requests} errors={stats.errors} actions[{actions}] "
        f"mean_latency={mean} connections={snap.connections} "
        f"in_flight={snap.requests_in_flight} "
        f"dns_cache[entries={dns['entries']} hits={dns['hits']} misses={dns['misses']} "
        f"hit_rate={hit_rate} evictions={dns['evictions']}] "
        f"upstream[queries={dns['upstream_queries']} failures={dns['upstream_failures']}] "
        f"slow_names[held={dns['slow_names_held']} holds={dns['slow_holds']} "
        f"held_lookups={dns['slow_held_lookups']}] "
        f"result_cache[entries={snap.result_cache_entries} hits={snap.result_cache_hits} "
        f"joined={snap.checks_joined}]" + _plans_summary(snap.plans) + _shared_summary(snap.shared)
    )


def _plans_summary(plans: dict[str, int] | None) -> str:
    """The compiled plans' part of the stats line (empty when they are off)."""
    if plans is None:
        return ""
    return (
        f" plans[entries={plans['plans']} shapes={plans['plan_shapes']} "
        f"bytes={plans['plan_bytes']} "
        f"hits={plans['plan_hits']} fallbacks={plans['plan_fallbacks']} "
        f"builds={plans['plan_builds']} unbuilt={plans['plan_unbuilt']}]"
    )


def _shared_summary(shared: dict[str, Any] | None) -> str:
    """The shared cache's part of the stats line (empty without one)."""
    if shared is None:
        return ""
    operations = sum(shared["latency_counts"])
    mean = f"{1000 * shared['latency_sum'] / operations:.2f}ms" if operations else "-"
    trips = shared["read_batches"]
    per_trip = f"{shared['read_keys'] / trips:.1f}" if trips else "-"
    return (
        f" shared_cache[{'DOWN' if shared['down'] else 'up'} hits={shared['hits']} "
        f"misses={shared['misses']} result_hits={shared['result_hits']} "
        f"result_misses={shared['result_misses']} errors={shared['errors']} "
        f"timeouts={shared['timeouts']} undecodable={shared['undecodable']} "
        f"writes={shared['writes']} write_errors={shared['write_errors']} "
        f"outages={shared['outages']} keys_per_read={per_trip} mean_latency={mean}]"
    )


def status_line(snap: Snapshot) -> str:
    """The short systemd STATUS= text (``systemctl status`` shows it)."""
    return (
        f"{snap.stats.requests} requests, {snap.connections} connections, "
        f"{snap.dns['entries']} DNS cache entries"
    )


class _Collector:
    """prometheus_client collector: metric families from one snapshot."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        snap = self._snapshot()
        stats = snap.stats

        requests = CounterMetricFamily(
            "spfpolicy_requests",
            "Policy requests answered, by action (first word) and SPF result",
            labels=["action", "result"],
        )
        for (action, result), count in sorted(stats.by_outcome.items()):
            requests.add_metric([action, result], count)
        yield requests

        buckets = []
        cumulative = 0
        for bound, count in zip(LATENCY_BUCKETS, stats.latency_counts, strict=False):
            cumulative += count
            buckets.append((repr(bound), cumulative))
        buckets.append(("+Inf", cumulative + stats.latency_counts[-1]))
        yield HistogramMetricFamily(
            "spfpolicy_request_duration_seconds",
            "Time from reading a request to having its answer",
            buckets=buckets,
            sum_value=stats.latency_sum,
        )

        def counter(name: str, text: str, value: float) -> Any:
            return CounterMetricFamily(name, text, value=value)

        def gauge(name: str, text: str, value: float) -> Any:
            return GaugeMetricFamily(name, text, value=value)

        dns = snap.dns
        yield counter("spfpolicy_request_errors", "Requests answered by the fallback", stats.errors)
        yield counter(
            "spfpolicy_refused_connections",
            "Connections over Max_Connections",
            stats.refused_connections,
        )
        yield counter("spfpolicy_config_reloads", "Configurations applied by SIGHUP", stats.reloads)
        yield counter(
            "spfpolicy_config_reload_failures", "SIGHUP reloads refused", stats.reload_failures
        )
        yield counter("spfpolicy_dns_cache_hits", "DNS lookups answered by the cache", dns["hits"])
        yield counter("spfpolicy_dns_cache_misses", "DNS lookups not in the cache", dns["misses"])
        yield counter(
            "spfpolicy_dns_cache_evictions", "DNS cache entries evicted for room", dns["evictions"]
        )
        yield gauge("spfpolicy_dns_cache_entries", "DNS answers cached", dns["entries"])
        yield counter(
            "spfpolicy_dns_upstream_queries",
            "Queries sent to the DNS servers",
            dns["upstream_queries"],
        )
        yield counter(
            "spfpolicy_dns_upstream_failures",
            "Upstream queries that timed out or failed (SERVFAIL, refused...)",
            dns["upstream_failures"],
        )
        yield gauge(
            "spfpolicy_dns_queries_in_flight", "Upstream DNS queries waited on", dns["in_flight"]
        )
        yield counter(
            "spfpolicy_dns_prefetches",
            "Lookups started by prefetch before an evaluation asked for them",
            dns["prefetches"],
        )
        yield counter(
            "spfpolicy_dns_prefetches_used",
            "Prefetched lookups an evaluation then read",
            dns["prefetches_used"],
        )
        yield counter(
            "spfpolicy_dns_prefetches_refused",
            "Prefetches not sent: unused guesses were at their budget",
            dns["prefetches_refused"],
        )
        yield counter(
            "spfpolicy_dns_slow_holds",
            "Hold-downs begun: a name failed Slow_Domain_Threshold times within the window",
            dns["slow_holds"],
        )
        yield counter(
            "spfpolicy_dns_slow_held_lookups",
            "Lookups failed at once because their name was held down",
            dns["slow_held_lookups"],
        )
        yield counter(
            "spfpolicy_dns_slow_probes",
            "Lookups sent to probe a name whose hold-down ended",
            dns["slow_probes"],
        )
        yield counter(
            "spfpolicy_dns_slow_recoveries",
            "Hold-downs ended by an answer",
            dns["slow_recoveries"],
        )
        yield gauge("spfpolicy_dns_slow_names_held", "Names held down now", dns["slow_names_held"])
        yield counter(
            "spfpolicy_result_cache_hits",
            "SPF checks answered by the result cache",
            snap.result_cache_hits,
        )
        yield gauge(
            "spfpolicy_result_cache_entries", "SPF results cached", snap.result_cache_entries
        )
        yield counter(
            "spfpolicy_checks_joined",
            "SPF checks that waited for the same check's evaluation for another request",
            snap.checks_joined,
        )
        plans = snap.plans
        if plans is not None:
            yield gauge("spfpolicy_plans", "Compiled SPF plans held", plans["plans"])
            yield gauge(
                "spfpolicy_plan_shapes",
                "Distinct compiled SPF tables the plans share",
                plans["plan_shapes"],
            )
            yield gauge(
                "spfpolicy_plan_bytes", "Compiled SPF plans, bytes (estimated)", plans["plan_bytes"]
            )
            yield counter(
                "spfpolicy_plan_hits", "SPF checks answered by a compiled plan", plans["plan_hits"]
            )
            yield counter(
                "spfpolicy_plan_fallbacks",
                "SPF checks a compiled plan left to pyspf",
                plans["plan_fallbacks"],
            )
            yield counter("spfpolicy_plan_builds", "SPF plans compiled", plans["plan_builds"])
        yield gauge("spfpolicy_connections", "Open client connections", snap.connections)
        yield gauge(
            "spfpolicy_requests_in_flight",
            "Requests read and not yet answered",
            snap.requests_in_flight,
        )
        yield gauge(
            "spfpolicy_evaluations_in_flight", "SPF evaluations running", snap.evaluations_in_flight
        )
        if snap.shared is not None:
            yield from _shared_families(snap.shared, counter, gauge, HistogramMetricFamily)
        # The per-domain table's size and events; its domains are only in
        # /domains, never labels here.
        yield gauge(
            "spfpolicy_domain_stats_entries",
            "Sender domains held by the per-domain table",
            snap.domain_entries,
        )
        yield gauge(
            "spfpolicy_domain_stats_bytes",
            "Approximate memory of the per-domain table",
            snap.domain_bytes,
        )
        yield counter(
            "spfpolicy_domain_result_changes",
            "Domains whose dominant SPF result changed",
            snap.domain_changes,
        )


def _shared_families(
    shared: dict[str, Any],
    counter: Callable[[str, str, float], Any],
    gauge: Callable[[str, str, float], Any],
    histogram: Any,
) -> Iterator[Any]:
    """The shared cache's metric families (no per-key labels)."""
    from spfpolicy.sharedcache import LATENCY_BUCKETS as SHARED_BUCKETS

    texts = {
        "hits": "DNS lookups answered by the shared cache (Redis)",
        "misses": "DNS lookups the shared cache did not answer (errors included)",
        "errors": "Shared-cache operations that failed or timed out",
        "timeouts": "Shared-cache operations past Shared_Cache_Timeout",
        "undecodable": "Shared-cache entries that did not decode (read as misses)",
        "skipped": "Shared-cache lookups not tried: Redis in its backoff",
        "writes": "DNS answers written to the shared cache",
        "write_errors": "DNS answers Redis refused or lost",
        "writes_dropped": "DNS answers not written: queue full or Redis in its backoff",
        "outages": "Shared-cache outages begun",
        "result_hits": "SPF checks answered by the shared cache (Redis)",
        "result_misses": "SPF checks the shared cache did not answer (errors included)",
        "result_undecodable": "Shared-cache SPF entries that did not decode (read as misses)",
        "result_writes": "SPF outcomes written to the shared cache",
        "read_batches": "Round trips of shared-cache reads (each for one or more keys)",
        "read_keys": "Keys read from the shared cache (read_keys / read_batches: keys per trip)",
    }
    for name, text in texts.items():
        yield counter(f"spfpolicy_shared_cache_{name}", text, shared[name])
    yield gauge("spfpolicy_shared_cache_down", "1 while Redis is in an outage", shared["down"])
    buckets = []
    cumulative = 0
    for bound, count in zip(SHARED_BUCKETS, shared["latency_counts"], strict=False):
        cumulative += count
        buckets.append((repr(bound), cumulative))
    buckets.append(("+Inf", cumulative + shared["latency_counts"][-1]))
    yield histogram(
        "spfpolicy_shared_cache_duration_seconds",
        "Time of shared-cache operations (reads and write batches)",
        buckets=buckets,
        sum_value=shared["latency_sum"],
    )


class MetricsUnavailable(Exception):
    """Metrics_Listen is set but prometheus-client is not installed."""


class MetricsEndpoint:
    """``GET /metrics`` (and ``GET /domains?n=N``, the per-domain table as
    JSON) over HTTP/1.0-style one-shot connections, on the event loop."""

    # A scrape request is a few hundred bytes; anything bigger is not Prometheus.
    max_request_head = 8192
    read_timeout = 10.0

    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        domains: Callable[[int], dict[str, Any] | None] = lambda top: None,
    ) -> None:
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            raise MetricsUnavailable(
                "Metrics_Listen needs prometheus-client: pip install 'spfpolicy[metrics]'"
            ) from None
        from prometheus_client import CollectorRegistry

        # A registry of our own: no process-wide default collectors, and
        # several servers in one process (tests) do not collide.
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(snapshot))
        self._domains = domains
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port, reuse_address=True)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def render(self, accept: str = "") -> tuple[bytes, str]:
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    def render_domains(self, path: str) -> tuple[str, bytes, str]:
        """``/domains[?n=N]``: status, JSON body, content type."""
        query = urllib.parse.parse_qs(path.partition("?")[2])
        text = query.get("n", ["20"])[-1]
        top = int(text) if text.isdigit() else 20
        report = self._domains(max(1, min(top, DOMAINS_TOP_LIMIT)))
        if report is None:
            report = {"error": "per-domain statistics are off (Domain_Stats_Size = 0)"}
            status = "404 Not Found"
        else:
            status = "200 OK"
        return status, json.dumps(report).encode() + b"\n", "application/json"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            async with asyncio.timeout(self.read_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > self.max_request_head:
                raise ValueError("request head too large")
            lines = head.decode("latin-1").split("\r\n")
            method, path, *_ = [*lines[0].split(" "), "", ""]
            accept = ""
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "accept":
                    accept = value.strip()
            if method not in ("GET", "HEAD"):
                status, body, content_type = "405 Method Not Allowed", b"", "text/plain"
            elif path.split("?", 1)[0] == "/domains":
                status, body, content_type = self.render_domains(path)
            elif path.split("?", 1)[0] not in ("/metrics", "/"):
                status, body, content_type = "404 Not Found", b"not found\n", "text/plain"
            else:
                status = "200 OK"
                body, content_type = self.render(accept)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + (body if method == "GET" else b"")
            )
            await writer.drain()
        except (TimeoutError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # not a scrape we can answer: just close
        except ConnectionError:
            pass
        except Exception:
            log.exception("metrics request failed")
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=1.0)
