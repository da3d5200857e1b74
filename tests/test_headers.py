"""headers.py: the header fields and reject texts, byte for byte. The
Authentication-Results field is compared with the ``authres`` library that
Debian's policyd-spf formats it with, run under the system Python."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from spfpolicy.headers import (
    Bypass,
    ar_bypass,
    ar_spf,
    clean,
    reason_text,
    received_spf,
    x_comment,
)
from spfpolicy.results import SpfResult

SYSTEM_PYTHON = Path("/usr/bin/python3")
DEFAULT_REASON = "Message {rejectdefer} due to: {spf}. Please see {url}"
DEFAULT_URL = "http://www.openspf.net/Why?s={0};id={1};ip={2};r={3}"


@pytest.mark.parametrize(
    ("text", "cleaned"),
    [
        pytest.param("mail.example.com", "mail.example.com", id="printable-ascii"),
        pytest.param("a\r\nInjected: x", "a??Injected: x", id="crlf"),
        pytest.param("nul\x00del\x7fc1\x85", "nul?del?c1?", id="nul-del-c1"),
        pytest.param("bücher.example", "bücher.example", id="non-ascii-kept"),
        pytest.param("a\u2028b\u202ec\u200bd", "a?b?c?d", id="invisible-and-separators"),
    ],
)
def test_clean(text: str, cleaned: str) -> None:
    assert clean(text) == cleaned


def test_received_spf_ends_with_a_space_as_policyd_spf_writes_it() -> None:
    field = received_spf(
        SpfResult.SOFTFAIL,
        "mailfrom",
        "mailfrom",
        "192.0.2.1",
        "mx.example",
        "a@example.org",
        "rcpt.example",
    )
    assert field == (
        "Received-SPF: Softfail (mailfrom) identity=mailfrom; client-ip=192.0.2.1; "
        "helo=mx.example; envelope-from=a@example.org; receiver=rcpt.example "
    )


@pytest.mark.parametrize("bypass", list(Bypass))
def test_x_comment(bypass: Bypass) -> None:
    field = x_comment(bypass, "192.0.2.1", "h.example", "a@example.org", "rcpt.example")
    assert field.startswith(f"X-Comment: {bypass.comment}client-ip=192.0.2.1; ")
    assert field.endswith("receiver=rcpt.example ")


@pytest.mark.parametrize(("deferred", "word"), [(False, "rejected"), (True, "deferred")])
def test_reason_text(deferred: bool, word: str) -> None:
    text = reason_text(
        DEFAULT_REASON,
        DEFAULT_URL,
        deferred=deferred,
        explanation="SPF fail - not authorized",
        scope="mfrom",
        identity="a@example.org",
        ip="192.0.2.1",
        recipient="rcpt.example",
    )
    assert text == (
        f"Message {word} due to: SPF fail - not authorized. Please see "
        "http://www.openspf.net/Why?s=mfrom;id=a@example.org;ip=192.0.2.1;r=rcpt.example"
    )


# (result, comment, prop, value): values that authres leaves bare, and ones
# it must quote (a space, a quote, a backslash).
AR_CASES = [
    ("pass", "sender SPF authorized", "smtp.mailfrom", "example.org"),
    ("fail", "SPF fail - not authorized", "smtp.mailfrom", "a@example.org"),
    ("softfail", "", "smtp.helo", "mx.example"),
    ("none", "", "smtp.helo", "bad helo name"),
    ("neutral", "x", "smtp.helo", 'quo"te\\slash'),
]

_AUTHRES_PROBE = """
import json, sys
import authres
out = []
for result, comment, prop, value in json.loads(sys.stdin.read()):
    key = prop.replace(".", "_")
    header = authres.AuthenticationResultsHeader(
        authserv_id="MX.Example",
        results=[authres.SPFAuthenticationResult(
            result=result, result_comment=comment or None,
            **{key: value, key + "_comment": "client-ip=192.0.2.1; helo=h; "
               "envelope-from=a@example.org; receiver=rcpt.example"})])
    out.append(str(header))
print(json.dumps(out))
"""


def _authres_available() -> bool:
    if not SYSTEM_PYTHON.exists():
        return False
    probe = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", "import authres"], capture_output=True, timeout=30, check=False
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _authres_available(), reason="Debian's python3-authres not installed")
def test_ar_spf_is_what_authres_writes() -> None:
    out = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", _AUTHRES_PROBE],
        input=json.dumps(AR_CASES),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    theirs = json.loads(out.stdout)
    ours = [
        ar_spf(
            "MX.Example",
            SpfResult(result),
            comment,
            prop,
            value,
            "192.0.2.1",
            "h",
            "a@example.org",
            "rcpt.example",
        )
        for result, comment, prop, value in AR_CASES
    ]
    assert ours == theirs


def test_ar_bypass() -> None:
    field = ar_bypass("MX", Bypass.WHITELIST, "192.0.2.1", "h", "a@example.org", "r.example")
    assert field == (
        "Authentication-Results: mx; none (SPF skipped for whitelisted relay -  "
        "client-ip=192.0.2.1; helo=h; envelope-from=a@example.org; receiver=r.example)"
    )
