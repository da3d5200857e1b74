"""``spfpolicy top``: a running server's per-domain table, read over HTTP from
its metrics endpoint (``GET /domains``, see domainstats.py) and printed as
three tables: busiest domains, failing domains, recent result changes.

Blocking and small on purpose: one request, one answer, then exit. Exit
status 0 when the table was shown, 1 when the server cannot be read (not
running, metrics off, per-domain statistics off).
"""

from __future__ import annotations

import http.client
import json
import sys
from typing import IO, Any

from spfpolicy.address import HostPort

__all__ = ["format_report", "read_domains", "run_top"]

TIMEOUT = 10.0
# A wildcard Metrics_Listen is reached on the loopback address of its family.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


class TopError(Exception):
    """The table could not be read; ``str()`` says why, for the administrator."""


def read_domains(where: HostPort, top: int) -> dict[str, Any]:
    """The JSON document of ``GET /domains?n=top`` at ``where``."""
    host = _WILDCARDS.get(where.host, where.host)
    target = HostPort(host, where.port)
    connection = http.client.HTTPConnection(host, where.port, timeout=TIMEOUT)
    try:
        connection.request("GET", f"/domains?n={top}")
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise TopError(f"cannot read http://{target}/domains: {exc}") from None
    finally:
        connection.close()
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if response.status != 200 or not isinstance(document, dict):
        if isinstance(document, dict) and "error" in document:
            raise TopError(f"http://{target}/domains: {document['error']}")
        raise TopError(
            f"http://{target}/domains answered {response.status} {response.reason}: "
            "not an spfpolicy metrics endpoint with per-domain statistics"
        )
    return document


def run_top(where: HostPort | None, top: int, *, as_json: bool = False) -> int:
    if where is None:
        print(
            "spfpolicy top: metrics are off (no Metrics_Listen in the configuration); "
            "give -c FILE or --connect HOST:PORT",
            file=sys.stderr,
        )
        return 1
    try:
        document = read_domains(where, top)
    except TopError as exc:
        print(f"spfpolicy top: {exc}", file=sys.stderr)
        return 1
    if as_json:
        json.dump(document, sys.stdout, indent=2)
        print()
    else:
        format_report(document, sys.stdout)
    return 0


def format_report(doc: dict[str, Any], out: IO[str]) -> None:
    """The three tables, as text."""
    minutes = doc["window_seconds"] / 60
    out.write(
        f"{doc['recorded']} answers counted; window {minutes:.0f} min "
        f"({doc['buckets']} buckets of {doc['bucket_seconds'] / 60:.0f} min); "
        f"{doc['entries']} domain entries of at most {doc['max_entries']} "
        f"(~{doc['approx_bytes'] // 1024} KiB)\n"
        f"domain: {doc['identity']}\n"
    )
    rows = doc["top"]
    results = _columns([row["results"] for row in rows + doc["failing"]])
    out.write("\nTop domains by volume (count: upper bound; ±: its possible overcount)\n")
    _table(
        out,
        ["domain", "count", "±", *results],
        [
            [r["domain"], r["count"], r["error"], *(r["results"].get(c, 0) for c in results)]
            for r in rows
        ],
    )
    failing = doc["failing"]
    out.write("\nTop failing domains (fail, softfail, permerror)\n")
    _table(
        out,
        ["domain", "failing", "count", *results, "rejected"],
        [
            [
                r["domain"],
                r["failing"],
                r["count"],
                *(r["results"].get(c, 0) for c in results),
                r["actions"].get("550", 0),
            ]
            for r in failing
        ],
    )
    out.write(f"\nResult changes in the last {minutes:.0f} min\n")
    _table(
        out,
        ["domain", "before", "after", "ago", "hits before", "hits now"],
        [
            [
                c["domain"],
                c["before"],
                c["after"],
                _ago(c["seconds_ago"]),
                c["before_hits"],
                c["after_hits"],
            ]
            for c in doc["changes"]
        ],
    )


def _columns(tallies: list[dict[str, int]]) -> list[str]:
    """The result names any row has, in the report's order."""
    seen: dict[str, None] = {}
    for counts in tallies:
        seen.update(dict.fromkeys(counts))
    order = ["pass", "fail", "softfail", "neutral", "none", "permerror", "temperror"]
    return [r for r in order if r in seen] + [r for r in seen if r not in order]


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.0f}m"


def _table(out: IO[str], header: list[str], rows: list[list[Any]]) -> None:
    if not rows:
        out.write("  (none)\n")
        return
    cells = [header, *[[str(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        first = row[0].ljust(widths[0])
        rest = (v.rjust(w) for v, w in zip(row[1:], widths[1:], strict=True))
        out.write("  " + "  ".join([first, *rest]).rstrip() + "\n")
