"""Equal-preference MX names are tried in the order Debian's pyspf tries them.

pyspf's mx mechanism (``query.dns_mx``) sorts the MX answer's (preference,
exchange) pairs and looks the names up in that order. What that order is
depends on the DNS library under pyspf:

- py3dns, which Debian's python3-spf runs with by default (it depends on
  "python3-dns | python3-dnspython", and policyd-spf is what spfpolicy
  replaces), hands the exchange over as text: equal preferences go in string
  order;
- dnspython hands over a ``dns.name.Name``, and names sort in DNS canonical
  order (RFC 4034 section 6.1: label by label from the right).

spfpolicy hands pyspf text, as py3dns does. RFC 7208 section 5.4 sets no
order, and it matters only in a corner: one name's lookup is void, another's
times out, and the void limit is reached; whichever is tried first decides
between permerror and temperror. Each check below is run three ways over the
same loopback DNS data.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import dns.name
import dns.resolver
import pytest
import spf

from oracle import LAUNCHER, SYSTEM_PYTHON, oracle_missing, plain_pyspf
from spfpolicy.bench.dnsserver import ZoneServer
from spfpolicy.evaluator import SpfEvaluator
from spfpolicy.resolver import Resolver

CLIENT = "192.0.2.1"
QUERY_TIME = 1.0  # seconds until the name that never answers is a temperror

# Two void a: terms use up the default void limit (2): the mx mechanism's
# first void name is the third void lookup, a permerror.
RECORD = "v=spf1 a:n1.{d} a:n2.{d} mx -all"


def zone(domain: str, void: str, silent: str) -> dict[str, Any]:
    """``domain`` with two MX names of preference 10: ``void`` has no
    address, ``silent`` never answers."""
    return {
        domain: [
            {"TXT": RECORD.format(d=domain)},
            {"MX": [10, void]},
            {"MX": [10, silent]},
        ],
        silent: ["timeout"],
    }


# Debian's pyspf (system Python, py3dns), run as policyd-spf runs it.
DEBIAN_PYSPF = """\
import sys, spf
ip, sender, helo, querytime = sys.argv[1:]
print(spf.query(ip, sender, helo, querytime=float(querytime)).check()[0])
"""


async def debian_pyspf(server: ZoneServer, sender: str, script: Path) -> str:
    script.write_text(DEBIAN_PYSPF)
    proc = await asyncio.create_subprocess_exec(
        str(SYSTEM_PYTHON),
        str(LAUNCHER),
        "--dns",
        f"127.0.0.1:{server.port}",
        "--",
        str(script),
        CLIENT,
        sender,
        "helo.example",
        str(QUERY_TIME),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return out.decode().strip()


async def ours(server: ZoneServer, sender: str) -> str:
    resolver = Resolver([server.nameserver], timeout=0.3, tries=1)
    try:
        evaluator = SpfEvaluator(resolver, lookup_time=QUERY_TIME)
        outcome = await evaluator.check(CLIENT, sender, "helo.example")
    finally:
        await resolver.close()
    return str(outcome.result)


_missing = oracle_missing()


@pytest.mark.skipif(_missing is not None, reason=_missing or "")
@pytest.mark.parametrize(
    ("void", "silent", "expected"),
    [
        # String order: a.slow... first (temperror). Canonical order compares
        # "b" with "slow" (the labels after the common suffix): b... first.
        pytest.param(
            "b.mx.example",
            "a.slow.mx.example",
            {"ours": "temperror", "debian": "temperror", "dnspython": "permerror"},
            id="orders-differ",
        ),
        # Both orders try the void name first.
        pytest.param(
            "a.mx.example",
            "b.mx.example",
            {"ours": "permerror", "debian": "permerror", "dnspython": "permerror"},
            id="orders-agree",
        ),
    ],
)
async def test_equal_preference_mx_names_in_debian_pyspf_order(
    zone_server: Any, tmp_path: Path, void: str, silent: str, expected: dict[str, str]
) -> None:
    server = await zone_server(zone("mx.example", void, silent))
    sender = "a@mx.example"
    results = {
        "ours": await ours(server, sender),
        "debian": await debian_pyspf(server, sender, tmp_path / "check.py"),
        "dnspython": (
            await asyncio.to_thread(
                plain_pyspf, server.port, CLIENT, sender, "helo.example", querytime=QUERY_TIME
            )
        )[0],
    }
    assert results == expected
    assert results["ours"] == results["debian"]


def test_pyspf_sorts_dnspython_names_in_canonical_order() -> None:
    # Why the two drivers differ, without DNS: the sort key pyspf gets.
    names = ["b.mx.example", "a.slow.mx.example"]
    as_text = sorted((10, n) for n in names)
    as_names = sorted((10, dns.name.from_text(n)) for n in names)
    assert [n for _, n in as_text] == ["a.slow.mx.example", "b.mx.example"]
    assert [n.to_text(omit_final_dot=True) for _, n in as_names] == names
    assert spf.DNSLookup is spf.DNSLookup_dnspython  # this venv's pyspf
