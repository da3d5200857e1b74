"""Header fields and reject texts, spelled exactly as policyd-spf 3.0.4 writes them.

Pure string formatting: Received-SPF (RFC 7208 section 9.1), the
Authentication-Results variant (RFC 8601, formatted the way the ``authres``
library that policyd-spf uses formats it), the X-Comment trace field for
bypassed checks, and the reject/defer text built from Reason_Message and
Reason_URL. Callers pass values already made safe with ``clean()``.
"""

from __future__ import annotations

import enum
import re
import unicodedata

from spfpolicy.protocol import INVISIBLE_CATEGORIES
from spfpolicy.results import SpfResult

__all__ = [
    "Bypass",
    "ar_bypass",
    "ar_spf",
    "clean",
    "reason_text",
    "received_spf",
    "result_word",
    "x_comment",
]

# C0 controls, DEL and C1 controls. A CR, LF or NUL would end or truncate the
# reply line (and a header field must not contain them: RFC 5322 2.2);
# policyd-spf gets them from exp= texts or helo names and passes them on.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")

# RFC 2045 token characters: authres leaves such values unquoted.
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`{|}~-]+")


def clean(text: str) -> str:
    """Replace control characters with '?'; other non-ASCII text is kept (sent
    as UTF-8), except invisible and line-breaking characters (see
    protocol.INVISIBLE_CATEGORIES), which become '?' too."""
    if text.isascii():
        # Printable ASCII (the usual case) has nothing to replace.
        return text if text.isprintable() else _CONTROL.sub("?", text)
    text = _CONTROL.sub("?", text)
    return "".join("?" if unicodedata.category(c) in INVISIBLE_CATEGORIES else c for c in text)


class Bypass(enum.StrEnum):
    """Why the SPF check was skipped; the value is the setting that caused it."""

    SKIP_ADDRESSES = "skip_addresses"
    WHITELIST = "Whitelist"
    DOMAIN_WHITELIST = "Domain_Whitelist"
    HELO_WHITELIST = "HELO_Whitelist"
    DOMAIN_WHITELIST_PTR = "Domain_Whitelist_PTR"

    @property
    def comment(self) -> str:
        return _BYPASS_COMMENTS[self]


_BYPASS_COMMENTS = {
    Bypass.SKIP_ADDRESSES: "SPF check N/A for local connections - ",
    Bypass.WHITELIST: "SPF skipped for whitelisted relay - ",
    Bypass.DOMAIN_WHITELIST: "SPF skipped for whitelisted relay domain - ",
    Bypass.HELO_WHITELIST: "SPF skipped for whitelisted HELO domain - ",
    Bypass.DOMAIN_WHITELIST_PTR: "SPF skipped for PTR whitelisted relay domain - ",
}


def result_word(result: SpfResult) -> str:
    """'Pass', 'Softfail', 'Permerror', ...: policyd-spf capitalizes pyspf's result."""
    return result.value.capitalize()


def _trace(client_ip: str, helo: str, envelope_from: str, receiver: str) -> str:
    return f"client-ip={client_ip}; helo={helo}; envelope-from={envelope_from}; receiver={receiver}"


def received_spf(
    result: SpfResult,
    comment: str,
    identity: str,
    client_ip: str,
    helo: str,
    envelope_from: str,
    receiver: str,
) -> str:
    # policyd-spf ends the field with a space after the receiver.
    return (
        f"Received-SPF: {result_word(result)} ({comment}) identity={identity}; "
        f"{_trace(client_ip, helo, envelope_from, receiver)} "
    )


def _quote(value: str) -> str:
    """authres's quote_if_needed: '@' or a token stays bare, else a quoted-string."""
    if "@" in value or _TOKEN.fullmatch(value):
        return value
    escaped = re.sub(r'(["\\])', r"\\\1", value)
    return f'"{escaped}"'


def ar_spf(
    authserv_id: str,
    result: SpfResult,
    comment: str,
    prop: str,
    value: str,
    client_ip: str,
    helo: str,
    envelope_from: str,
    receiver: str,
) -> str:
    """Authentication-Results with one spf clause; ``prop`` is smtp.helo or smtp.mailfrom."""
    clause = f"spf={result.value}"
    if comment:
        clause += f" ({comment})"
    clause += f" {prop}={_quote(value)} ({_trace(client_ip, helo, envelope_from, receiver)})"
    return f"Authentication-Results: {authserv_id.lower()}; {clause}"


def ar_bypass(
    authserv_id: str, bypass: Bypass, client_ip: str, helo: str, sender: str, receiver: str
) -> str:
    # The comment already ends in a space and policyd-spf adds another.
    trace = _trace(client_ip, helo, sender, receiver)
    return f"Authentication-Results: {authserv_id.lower()}; none ({bypass.comment} {trace})"


def x_comment(bypass: Bypass, client_ip: str, helo: str, sender: str, receiver: str) -> str:
    return f"X-Comment: {bypass.comment}{_trace(client_ip, helo, sender, receiver)} "


def reason_text(
    reason_message: str,
    reason_url: str,
    *,
    deferred: bool,
    explanation: str,
    scope: str,
    identity: str,
    ip: str,
    recipient: str,
) -> str:
    """Reason_Message filled in; ``scope`` is 'helo' or 'mfrom' (the URL's s=)."""
    url = reason_url.format(scope, identity, ip, recipient)
    return reason_message.format(
        rejectdefer="deferred" if deferred else "rejected", spf=explanation, url=url
    )
