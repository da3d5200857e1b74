"""The record of one SPF evaluation as a tree, for ``spfpolicy check --trace``:
each DNS lookup (name, type, answer, TTL, cache or upstream, time taken),
each term pyspf tried with its outcome, the lookup and void counts as they
grow, and the error where a limit was hit.

The evaluator's traced query (``evaluator._TracedQuery``) reports into a
``Trace`` while pyspf runs, so the tree is the evaluation itself, not a
second reading of the records. This module knows neither pyspf nor DNS
I/O: it keeps what it is told and renders it as indented text or as JSON
(the shape is under ``to_json``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from spfpolicy.results import SpfOutcome

# RFC 7208 section 4.6.4: the 10 DNS-querying terms an evaluation may use.
LOOKUP_LIMIT = 10


@dataclass(slots=True)
class Lookup:
    """One DNS lookup pyspf asked for.

    ``source`` is "cache" (answered from the resolver's cache) or
    "upstream" (pyspf waited for a query to a nameserver), None when the
    name was malformed and nothing was asked (RFC 7208 section 4.3);
    ``prefetched`` says the prefetcher had asked for it before pyspf did.
    ``ttl`` is the answer's lifetime as fetched (clamped by the resolver);
    ``void_lookups`` the evaluation's void count after this lookup."""

    name: str
    qtype: str
    records: list[str] = field(default_factory=list)
    ttl: float | None = None
    source: str | None = None
    prefetched: bool = False
    elapsed: float = 0.0
    void: bool = False
    void_lookups: int = 0
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "dns",
            "name": self.name,
            "type": self.qtype,
            "records": self.records,
            "ttl": self.ttl,
            "source": self.source,
            "prefetched": self.prefetched,
            "elapsed": round(self.elapsed, 6),
            "void": self.void,
            "void_lookups": self.void_lookups,
            "error": self.error,
        }


@dataclass(slots=True)
class Term:
    """One term of a record as pyspf evaluated it (or the ``redirect=`` it
    followed). ``result`` is what the term gives when it matches (its
    qualifier; for a redirect, the redirected record's result);
    ``lookups`` pyspf's count of DNS-querying terms once this one was
    counted (None for a term that counts none)."""

    text: str
    mechanism: str
    target: str | None
    result: str | None
    steps: list[Step] = field(default_factory=list)
    matched: bool | None = None
    lookups: int | None = None
    error: str | None = None
    fetched: bool = field(default=False, repr=False)  # its record asked for

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "term",
            "term": self.text,
            "mechanism": self.mechanism,
            "target": self.target,
            "result": self.result,
            "matched": self.matched,
            "lookups": self.lookups,
            "error": self.error,
            "steps": [step.to_json() for step in self.steps],
        }


@dataclass(slots=True)
class Record:
    """One SPF record evaluated: the checked domain's ("top"), an
    ``include``'s or a ``redirect``'s; ``text`` None when there is none."""

    domain: str
    text: str | None
    via: str
    steps: list[Step] = field(default_factory=list)
    result: str | None = None
    error: str | None = None
    lookups: int | None = None  # the count once its redirect= was counted
    current: Term | None = field(default=None, repr=False)  # the term being tried

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "record",
            "domain": self.domain,
            "via": self.via,
            "text": self.text,
            "result": self.result,
            "error": self.error,
            "lookups": self.lookups,
            "steps": [step.to_json() for step in self.steps],
        }


Step = Lookup | Term | Record


class Trace:
    """Collects one evaluation's tree; the evaluator's traced query calls the
    methods below as pyspf goes, in the order pyspf does things."""

    def __init__(self, *, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.steps: list[Step] = []
        self.outcome: SpfOutcome | None = None
        self.lookups = 0  # pyspf's count of DNS-querying terms
        self.void_lookups = 0
        self.error: str | None = None  # an error raised outside any record
        self._records: list[Record] = []  # open records, innermost last
        self._lookup: Lookup | None = None  # the lookup pyspf waits for
        self._failure: BaseException | None = None  # already placed in the tree

    # -- where a new step goes ------------------------------------------------

    def _steps(self) -> list[Step]:
        if not self._records:
            return self.steps
        record = self._records[-1]
        return record.current.steps if record.current is not None else record.steps

    def _term(self) -> Term | None:
        return self._records[-1].current if self._records else None

    # -- DNS --------------------------------------------------------------------

    def begin_lookup(self, name: str, qtype: str) -> Lookup:
        lookup = Lookup(name, qtype)
        self._steps().append(lookup)
        self._lookup = lookup
        return lookup

    def asked(self, name: str, qtype: str, *, cached: bool, prefetched: bool) -> None:
        """The resolver was asked (the name as sent); cached or not."""
        lookup = self._lookup
        if lookup is not None:
            lookup.name = name
            lookup.source = "cache" if cached else "upstream"
            lookup.prefetched = prefetched

    def answered(self, records: Any, ttl: float) -> None:
        lookup = self._lookup
        if lookup is not None:
            lookup.records = [record_text(record) for record in records]
            lookup.ttl = ttl

    def end_lookup(self, lookup: Lookup, records: list[Any], void_lookups: int) -> None:
        self._counted_void(lookup, void_lookups)
        term = self._term()
        if term is not None and term.mechanism == "exists":
            term.matched = bool(records)

    def failed_lookup(self, lookup: Lookup, error: BaseException, void_lookups: int) -> None:
        self._counted_void(lookup, void_lookups)
        self.failed(error, lookup)

    def _counted_void(self, lookup: Lookup, void_lookups: int) -> None:
        # Void when it raised the count (exp= lookups are not counted).
        lookup.void = void_lookups > self.void_lookups
        lookup.void_lookups = self.void_lookups = void_lookups
        self._lookup = None

    # -- records and terms ----------------------------------------------------

    def fetching_record(self, domain: str) -> None:
        """pyspf asks for ``domain``'s SPF record: the top record's, the
        current include's, or else the record's ``redirect=``."""
        if not self._records:
            return
        record = self._records[-1]
        term = record.current
        if term is not None and term.mechanism == "include" and not term.fetched:
            term.fetched = True
            return
        self._close_term(record)
        redirect = Term(f"redirect={domain}", "redirect", domain, None, fetched=True)
        record.current = redirect
        record.steps.append(redirect)

    def begin_record(self, domain: str, text: str | None) -> None:
        term = self._term()
        record = Record(domain, text, term.mechanism if term is not None else "top")
        self._steps().append(record)
        self._records.append(record)

    def end_record(self, result: str | None, error: BaseException | None = None) -> None:
        record = self._records.pop()
        if error is not None:
            self.failed(error, record)
            record.current = None  # a term cut short stays unfinished
        else:
            record.result = result
            self._close_term(record)
        term = self._term()
        if term is None or result is None:
            return
        if term.mechanism == "include":
            term.matched = result == "pass"
        elif term.mechanism == "redirect":
            term.result = result
            term.matched = True

    def begin_term(self, text: str, mechanism: str, target: Any, result: Any) -> None:
        record = self._records[-1]
        self._close_term(record)
        term = Term(
            text,
            mechanism,
            target if mechanism not in ("all", "ip4", "ip6") and target else None,
            result if isinstance(result, str) else None,
        )
        if mechanism == "all":
            term.matched = True
        record.current = term
        record.steps.append(term)

    @staticmethod
    def _close_term(record: Record) -> None:
        term = record.current
        if term is not None and term.matched is None and term.error is None:
            # Nothing matched it: an ip4/ip6 term of the other address
            # family gets here without pyspf comparing anything.
            term.matched = False
        record.current = None

    def target(self) -> str | None:
        term = self._term()
        return term.target if term is not None else None

    def counted(self, lookups: int) -> None:
        """pyspf counted the current term (or a record's redirect=) against
        the 10-lookup limit."""
        self.lookups = lookups
        term = self._term()
        if term is not None:
            term.lookups = lookups
        elif self._records:  # pyspf counts a redirect= as it reads the record
            self._records[-1].lookups = lookups

    def matched(self, matched: bool) -> None:
        term = self._term()
        if term is not None:
            term.matched = matched

    def failed(self, error: BaseException, where: Lookup | Term | Record | None = None) -> None:
        """``error`` was raised: noted on the innermost open step, once."""
        if error is self._failure:
            return
        self._failure = error
        text = str(error) or type(error).__name__
        if where is None:
            where = self._term() or (self._records[-1] if self._records else None)
        if isinstance(where, Record) and where.current is not None:
            where = where.current
        if where is None:
            self.error = text
        else:
            where.error = text

    # -- output ---------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The tree as JSON. The top level::

            {"result", "code", "explanation", "mechanism", "identity", "sender",
             "domain", "dns_lookups", "lookups", "void_lookups", "elapsed",
             "error", "steps"}

        ``steps`` lists, in the order they happened, objects whose ``kind`` is
        "dns" (name, type, records, ttl, source "cache"/"upstream"/null,
        prefetched, elapsed, void, void_lookups, error), "record" (domain,
        via "top"/"include"/"redirect", text, result, error, steps) or
        "term" (term, mechanism, target, result, matched, lookups, error,
        steps); a record's ``lookups`` is the count once its redirect= was
        counted (pyspf counts it as it reads the record), else null.
        ``dns_lookups`` counts every lookup pyspf asked for; ``lookups`` is
        its count of DNS-querying terms (limit 10)."""
        outcome = self.outcome
        data: dict[str, Any] = {}
        if outcome is not None:
            data = {
                **outcome_json(outcome),
                "dns_lookups": outcome.lookups,
                "elapsed": round(outcome.elapsed, 6),
            }
        data["lookups"] = self.lookups
        data["void_lookups"] = self.void_lookups
        data["error"] = self.error
        data["steps"] = [step.to_json() for step in self.steps]
        return data

    def lines(self) -> list[str]:
        """The tree as indented text, one step a line."""
        out: list[str] = []
        for step in self.steps:
            _render(step, 0, out)
        if self.error is not None:
            out.append(f"!! {self.error}")
        out.append(f"lookups: {self.lookups}/{LOOKUP_LIMIT}, void lookups: {self.void_lookups}")
        return out


def outcome_json(outcome: SpfOutcome) -> dict[str, Any]:
    """What ``check --json`` reports of an outcome, with or without a trace."""
    return {
        "result": outcome.result.value,
        "code": outcome.code,
        "explanation": outcome.explanation,
        "mechanism": outcome.mechanism,
        "identity": outcome.identity.value,
        "sender": outcome.sender,
        "domain": outcome.domain,
    }


def _render(step: Step, depth: int, out: list[str]) -> None:
    pad = "  " * depth
    if isinstance(step, Lookup):
        out.append(pad + _lookup_line(step))
    elif isinstance(step, Record):
        text = f'"{step.text}"' if step.text is not None else "no SPF record"
        counted = ""
        if step.lookups is not None:
            counted = f"  [redirect= counted: lookups {step.lookups}/{LOOKUP_LIMIT}]"
        out.append(f"{pad}record {step.domain} ({step.via}): {text}{counted}")
        for inner in step.steps:
            _render(inner, depth + 1, out)
        if step.error is not None:
            out.append(f"{pad}  !! {step.error}")
        elif step.result is not None:
            out.append(f"{pad}  = {step.result}")
    else:
        if step.matched is None:
            outcome = "cut short"
        elif step.mechanism == "redirect":
            outcome = f"followed ({step.result})" if step.result else "followed"
        elif step.matched:
            outcome = f"match ({step.result})" if step.result else "match"
        else:
            outcome = "no match"
        counted = f"  [lookups {step.lookups}/{LOOKUP_LIMIT}]" if step.lookups is not None else ""
        out.append(f"{pad}{step.text}: {outcome}{counted}")
        for inner in step.steps:
            _render(inner, depth + 1, out)
        if step.error is not None:
            out.append(f"{pad}  !! {step.error}")


def _lookup_line(lookup: Lookup) -> str:
    head = f"{lookup.qtype} {lookup.name}"
    if lookup.source is None and lookup.error is None:
        return f"{head}: malformed name, not asked (no records)"
    if lookup.error is not None and not lookup.records and lookup.ttl is None:
        answer = "no answer"
    elif lookup.records:
        answer = " | ".join(lookup.records)
    else:
        answer = "no records"
    parts = [answer]
    if lookup.ttl is not None:
        parts.append(f"ttl {lookup.ttl:g} s")
    if lookup.source is not None:
        parts.append(lookup.source + (" (prefetched)" if lookup.prefetched else ""))
    parts.append(f"{lookup.elapsed * 1000:.1f} ms")
    if lookup.void:
        parts.append(f"void {lookup.void_lookups}")
    line = f"{head}: {', '.join(parts)}"
    if lookup.error is not None:
        line += f"  !! {lookup.error}"
    return line


def record_text(record: Any) -> str:
    """One DNS record as text: an address or name as is, an MX as
    "preference exchange", a TXT record's strings joined (RFC 7208 3.3)."""
    if isinstance(record, str):
        return record
    if isinstance(record, tuple) and record and all(isinstance(s, bytes) for s in record):
        return b"".join(record).decode("utf-8", "replace")
    if isinstance(record, tuple) and len(record) == 2:
        return f"{record[0]} {record[1]}"
    return str(record)
