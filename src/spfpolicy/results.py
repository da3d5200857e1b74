"""SPF results as values: what an evaluation returns to its callers.

The result keywords are RFC 7208 section 2.6; the SMTP-facing decisions built
from them live in ``policy.py``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class SpfResult(enum.StrEnum):
    """RFC 7208 section 2.6 results, spelled as in Received-SPF headers."""

    PASS = "pass"
    FAIL = "fail"
    SOFTFAIL = "softfail"
    NEUTRAL = "neutral"
    NONE = "none"
    PERMERROR = "permerror"
    TEMPERROR = "temperror"


class Identity(enum.StrEnum):
    """Which identity was checked (RFC 7208 section 2.3 / 2.4)."""

    HELO = "helo"
    MAILFROM = "mailfrom"


# A domain that says it sends no mail at all (No_Mail looks for it).
NO_MAIL_RECORD = "v=spf1 -all"


@dataclass(frozen=True, slots=True)
class SpfOutcome:
    """The answer to one SPF check.

    ``explanation`` is pyspf's third return value (the exp= text or the
    default explanation for fail/softfail/permerror, the error text for
    permerror/temperror); ``mechanism`` is the term that decided the result
    (``"-all"``, ``"include:example.org"``, ``"default"`` when nothing
    matched), empty when no record was evaluated. ``lookups`` counts the DNS
    lookups the evaluation made (from cache or not); ``ttl`` is the time left,
    when the evaluation ended, until the first of the DNS answers it used
    leaves the DNS cache (``None`` when it used none; 0 when one already
    has), so a cached copy of this outcome never outlives its data. ``record`` is the
    SPF record text published by the checked domain itself (not by includes),
    empty when it has none; policy.py needs it for No_Mail ("v=spf1 -all").
    """

    result: SpfResult
    code: int
    explanation: str
    mechanism: str = ""
    identity: Identity = Identity.MAILFROM
    sender: str = ""
    domain: str = ""
    lookups: int = 0
    ttl: float | None = None
    elapsed: float = 0.0
    record: str = ""
