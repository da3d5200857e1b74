"""The Grafana dashboard in contrib/: well-formed, and every metric and label
its PromQL queries names exists in a real scrape of a running server.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hardening import GOOD_IP, request
from serving import Running
from spfpolicy.address import HostPort
from spfpolicy.metrics import NOT_CHECKED

DASHBOARD = Path(__file__).resolve().parent.parent / "contrib" / "grafana" / "spfpolicy.json"

# What Prometheus adds to every series, or Grafana to every query.
SCRAPE_LABELS = {"instance", "job"}
PROMQL_WORDS = {
    "sum", "by", "without", "rate", "irate", "increase", "changes", "histogram_quantile",
    "le", "bool", "and", "or", "unless", "on", "ignoring", "group_left", "group_right",
    "label_values",
}  # fmt: skip


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def expressions(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression: panel targets, annotations, template variables."""
    found = [t["expr"] for p in panels(dashboard["panels"]) for t in p.get("targets", [])]
    found += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if variable["type"] == "query":
            found.append(query["query"] if isinstance(query, dict) else query)
    return found


def metric_names(expr: str) -> set[str]:
    # Strip strings ("$instance", "not_checked") and Grafana's $variables first.
    bare = re.sub(r'"[^"]*"|\$\w+', "", expr)
    return set(re.findall(r"\bspfpolicy_\w+", bare))


def label_names(expr: str) -> set[str]:
    bare = re.sub(r'"[^"]*"', '""', expr)
    names = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", bare))
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", bare):
        names.update(n.strip() for n in group.split(",") if n.strip())
    names.update(re.findall(r"\blabel_values\(\s*\w+\s*,\s*(\w+)", bare))  # Grafana's
    return names


def test_dashboard_is_well_formed() -> None:
    dashboard = load()
    assert dashboard["uid"] and dashboard["title"] == "spfpolicy"
    everything = list(panels(dashboard["panels"]))
    ids = [p["id"] for p in everything]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in everything:
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys(), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        refs = [t["refId"] for t in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    cells = [
        (x, y)
        for p in everything
        for x in range(p["gridPos"]["x"], p["gridPos"]["x"] + p["gridPos"]["w"])
        for y in range(p["gridPos"]["y"], p["gridPos"]["y"] + p["gridPos"]["h"])
    ]
    assert len(cells) == len(set(cells)), "panels overlap"
    # What the issue asks the dashboard to show.
    titles = " | ".join(p["title"].lower() for p in everything)
    for subject in ("requests per second", "result", "latency", "hit ratio", "upstream dns"):
        assert subject in titles
    assert "in flight" in titles or "in progress" in titles


def test_every_query_names_a_spfpolicy_metric() -> None:
    # An expression whose metric lost its prefix (or was misspelt into a
    # word PromQL knows) would match nothing here: each names at least one,
    # and every other identifier before a selector or a call is PromQL's own.
    for expr in expressions(load()):
        assert metric_names(expr), expr
        bare = re.sub(r'"[^"]*"|\$\w+|\{[^}]*\}|\[[^]]*\]', "", expr)
        words = set(re.findall(r"\b[a-z_][a-z0-9_]*\b", bare))
        others = {w for w in words if not w.startswith("spfpolicy_")} - PROMQL_WORDS
        others -= label_names(expr)
        assert not others, f"unknown words {others} in {expr}"


async def scrape(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    async with asyncio.timeout(10):
        response = (await reader.read()).decode()
    writer.close()
    head, _, body = response.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200"), head
    return body


async def test_every_queried_metric_and_label_is_exposed(
    policy_server: Callable[..., Awaitable[Running]],
) -> None:
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    running = await policy_server(metrics_listen=HostPort("127.0.0.1", 0))
    await running.server.start_metrics()
    assert running.server.metrics is not None
    client = await running.connect()
    # A pass, a fail and a skipped local client: the labelled series exist
    # only once something was answered.
    for attributes in (request(ip=GOOD_IP), request(), request(ip="127.0.0.1")):
        await client.ask(attributes)

    exposed: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(await scrape(running.server.metrics.port)):
        for sample in family.samples:
            exposed.setdefault(sample.name, set()).update(sample.labels)

    dashboard = load()
    queried = set().union(*(metric_names(e) for e in expressions(dashboard)))
    missing = sorted(queried - exposed.keys())
    assert not missing, f"the dashboard queries metrics the server does not expose: {missing}"
    all_labels = set().union(*exposed.values()) | SCRAPE_LABELS
    for expr in expressions(dashboard):
        unknown = label_names(expr) - all_labels
        assert not unknown, f"labels {unknown} not exposed, in {expr}"
        # Each label matcher's metric carries that label.
        for metric, matchers in re.findall(r"\b(spfpolicy_\w+)\{([^}]*)\}", expr):
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
                assert label in exposed[metric] | SCRAPE_LABELS, f"{metric} has no {label}"
    # The one label value the dashboard spells out is the one the server uses.
    assert f'result!="{NOT_CHECKED}"' in " ".join(expressions(dashboard))
    assert ("spfpolicy_requests_total", NOT_CHECKED) in {
        (s.name, s.labels.get("result"))
        for f in text_string_to_metric_families(await scrape(running.server.metrics.port))
        for s in f.samples
    }
