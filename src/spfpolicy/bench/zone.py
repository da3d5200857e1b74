"""The load generator's world: a generated zone of realistic SPF records and
the loopback DNS server that serves it (the workloads drawn from it are in
``workloads.py``).

Everything follows from the seed. A sender domain's records come from its
index (``d{index}``-style names carry it), so the DNS server, in its own
process, builds any node lazily from the name alone, and the generator knows
each request's expected SPF result without evaluating anything: it picks the
outcome first, then a domain and client address that give it.

Shared provider records (``_spf.bigmail.example`` and friends: ip4/ip6 lists,
includes nested 2-3 deep) are what real mail mostly points at; each sender
domain adds its own record and, by kind, ``a``, ``mx``, ``exists``,
``redirect=``, void lookups or a deliberate error.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import enum
import hashlib
import ipaddress
import json
import re
import signal
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.MX
import dns.rdtypes.ANY.TXT
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.rrset

from spfpolicy import eventloop
from spfpolicy.bench.dnsserver import Fault, Resolution, Zone, ZoneServer

__all__ = [
    "DEFAULT_MIX",
    "OUTCOMES",
    "BenchZone",
    "BenchZoneServer",
    "Domain",
    "domain_for",
    "stable_digest",
]

OUTCOMES = ("pass", "fail", "softfail", "neutral", "none", "permerror", "temperror")
DEFAULT_MIX = {
    "pass": 70,
    "fail": 5,
    "softfail": 8,
    "neutral": 2,
    "none": 10,
    "permerror": 3,
    "temperror": 2,
}

PROVIDER_TTL = 3600
DOMAIN_TTL = 600
HELO_SUFFIX = "mta.example"
SENDER_TLD = "example"
RECEIVER_DOMAINS = ("example.org", "mail.example.net", "lists.example.org")

# ------------------------------------------------------------------ providers

# Shared provider records, shaped like the big senders' (Google, Microsoft,
# Mailgun, SendGrid, hosting companies): long ip4 lists split into /20s, ip6,
# includes nested up to three deep.


def _ip4_list(base: str, count: int) -> str:
    net = ipaddress.IPv4Network(base)
    return " ".join(f"ip4:{s}" for s in list(net.subnets(new_prefix=20))[:count])


PROVIDERS: dict[str, list[tuple[str, str]]] = {
    "_spf.bigmail.example": [
        (
            "TXT",
            "v=spf1 include:_netblocks.bigmail.example include:_netblocks2.bigmail.example "
            "include:_netblocks3.bigmail.example ~all",
        )
    ],
    "_netblocks.bigmail.example": [("TXT", f"v=spf1 {_ip4_list('172.16.0.0/15', 24)} ~all")],
    "_netblocks2.bigmail.example": [
        ("TXT", "v=spf1 ip6:fd10:1::/32 ip6:fd10:2::/32 ip6:fd10:3::/32 ip6:fd10:4::/32 ~all")
    ],
    "_netblocks3.bigmail.example": [("TXT", f"v=spf1 {_ip4_list('172.18.0.0/16', 16)} ~all")],
    "spf.protection.office.example": [
        (
            "TXT",
            "v=spf1 include:spfa.protection.office.example "
            "include:spfb.protection.office.example -all",
        )
    ],
    "spfa.protection.office.example": [
        (
            "TXT",
            f"v=spf1 {_ip4_list('172.20.0.0/16', 12)} include:spfc.protection.office.example -all",
        )
    ],
    "spfb.protection.office.example": [
        ("TXT", f"v=spf1 {_ip4_list('172.21.0.0/16', 8)} ip6:fd10:20::/32 -all")
    ],
    "spfc.protection.office.example": [("TXT", f"v=spf1 {_ip4_list('172.22.0.0/16', 16)} -all")],
    "mailgun.example": [("TXT", "v=spf1 include:_spf.mailgun.example ~all")],
    "_spf.mailgun.example": [
        ("TXT", "v=spf1 include:_spf1.mailgun.example include:_spf2.mailgun.example ~all")
    ],
    "_spf1.mailgun.example": [("TXT", "v=spf1 ip4:172.24.0.0/16 ~all")],
    "_spf2.mailgun.example": [("TXT", "v=spf1 ip4:172.25.0.0/16 ~all")],
    "sendgrid.example": [("TXT", "v=spf1 ip4:172.26.0.0/16 ip4:172.27.0.0/16 ~all")],
    "_spf.hoster1.example": [
        ("TXT", "v=spf1 ip4:172.30.0.0/16 a:smtp.hoster1.example -all"),
    ],
    "smtp.hoster1.example": [("A", "172.29.1.1")],
    "_spf.hoster2.example": [
        ("TXT", "v=spf1 ip4:172.31.0.0/16 a:smtp.hoster2.example ~all"),
    ],
    "smtp.hoster2.example": [("A", "172.29.2.1")],
}

# Where each provider's mail comes from (a pass for anyone including it).
PROVIDER_SOURCES: dict[str, tuple[str, ...]] = {
    # Exactly the blocks listed above (_ip4_list takes the first N /20s).
    "bigmail": ("172.16.0.0/16", "172.17.0.0/17", "172.18.0.0/16", "fd10:1::/32"),
    "office": ("172.20.0.0/17", "172.20.128.0/18", "172.21.0.0/17", "172.22.0.0/16"),
    "mailgun": ("172.24.0.0/16", "172.25.0.0/16"),
    "sendgrid": ("172.26.0.0/16", "172.27.0.0/16"),
    "hoster1": ("172.30.0.0/16",),
    "hoster2": ("172.31.0.0/16",),
}

FOREIGN4 = ipaddress.IPv4Network("100.64.0.0/10")  # mail from nobody's SPF (CGNAT space)
FOREIGN6 = ipaddress.IPv6Network("fd99::/16")
OWN4 = ipaddress.IPv4Network("10.0.0.0/8")  # each domain's own /28 in here
OWN6 = ipaddress.IPv6Network("fd00::/16")  # each domain's own /64 in here


# ------------------------------------------------------------------ domains


class Kind(enum.StrEnum):
    """How a sender domain publishes SPF; the value is the name prefix."""

    BIGMAIL = "shop"  # include:_spf.bigmail.example (3 nested includes)
    OFFICE = "corp"  # own ip4 + include of a 3-deep provider tree
    MX_A = "firm"  # mx a ip4
    MULTI = "news"  # three providers
    REDIRECT = "site"  # redirect= to a hoster
    EXISTS = "bank"  # exists:%{i}._spf.domain
    IPV6 = "labs"  # ip6 and ip4
    VOID = "club"  # a: of a name that no longer exists, then include
    NO_SPF = "blog"  # TXT records, none of them SPF
    NXDOMAIN = "gone"  # the domain does not exist
    NODATA = "park"  # only an A record
    TOO_MANY = "team"  # more than 10 DNS-querying terms
    VOID_LIMIT = "dead"  # three void lookups (Void_Limit 2)
    SYNTAX = "oops"  # an invalid ip4
    TWO_RECORDS = "twin"  # two v=spf1 records
    INCLUDE_MISSING = "lost"  # include: of a name without SPF
    SERVFAIL = "down"  # the domain's TXT lookup fails
    INCLUDE_SERVFAIL = "flap"  # an included name fails


# (kind, weight per 1000 domains); kinds above NO_SPF publish a working record.
_KIND_WEIGHTS = (
    (Kind.BIGMAIL, 200),
    (Kind.OFFICE, 120),
    (Kind.MX_A, 100),
    (Kind.MULTI, 80),
    (Kind.REDIRECT, 100),
    (Kind.EXISTS, 50),
    (Kind.IPV6, 80),
    (Kind.VOID, 70),
    (Kind.NO_SPF, 50),
    (Kind.NXDOMAIN, 30),
    (Kind.NODATA, 20),
    (Kind.TOO_MANY, 15),
    (Kind.VOID_LIMIT, 10),
    (Kind.SYNTAX, 10),
    (Kind.TWO_RECORDS, 10),
    (Kind.INCLUDE_MISSING, 5),
    (Kind.SERVFAIL, 30),
    (Kind.INCLUDE_SERVFAIL, 20),
)
_KIND_CUMULATIVE = [sum(w for _, w in _KIND_WEIGHTS[: i + 1]) for i in range(len(_KIND_WEIGHTS))]
SPF_KINDS = frozenset(kind for kind, _ in _KIND_WEIGHTS[:8])  # the working records
_KIND_OUTCOME = {
    Kind.NO_SPF: "none",
    Kind.NXDOMAIN: "none",
    Kind.NODATA: "none",
    Kind.TOO_MANY: "permerror",
    Kind.VOID_LIMIT: "permerror",
    Kind.SYNTAX: "permerror",
    Kind.TWO_RECORDS: "permerror",
    Kind.INCLUDE_MISSING: "permerror",
    Kind.SERVFAIL: "temperror",
    Kind.INCLUDE_SERVFAIL: "temperror",
}
_QUALIFIER_OUTCOME = {"-": "fail", "~": "softfail", "?": "neutral"}
# Which providers a kind's record includes (the sources of its pass traffic).
_KIND_PROVIDERS = {
    Kind.BIGMAIL: ("bigmail",),
    Kind.OFFICE: ("office",),
    Kind.MULTI: ("mailgun", "sendgrid", "bigmail"),
    Kind.VOID: ("sendgrid",),
}
# Uncached DNS round trips the domain's own names cost, assuming the shared
# provider records are cached and the lookups a fetched record will certainly
# make are sent together (the critical path of its tree).
_KIND_DEPTH = {
    Kind.MX_A: 3,  # TXT, then MX and A together, then the MX host's A
    Kind.EXISTS: 2,
    Kind.VOID: 2,
    Kind.VOID_LIMIT: 2,
    Kind.INCLUDE_MISSING: 2,
    Kind.INCLUDE_SERVFAIL: 2,
}

_NAME = re.compile(r"^([a-z]+)(\d+)\.example$")
_HELO = re.compile(r"^mail-([0-9a-f-]+)\." + re.escape(HELO_SUFFIX) + "$")


def stable_digest(*parts: object) -> int:
    text = ":".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


@dataclass(frozen=True, slots=True)
class Domain:
    """One sender domain, derived from (seed, index) alone."""

    index: int
    kind: Kind
    qualifier: str  # "-", "~", "?" for working records, "" otherwise

    @property
    def name(self) -> str:
        return f"{self.kind.value}{self.index}.{SENDER_TLD}"

    @property
    def own4(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network((int(OWN4.network_address) + (self.index % 2**20) * 16, 28))

    @property
    def own6(self) -> ipaddress.IPv6Network:
        offset = (self.index % 2**48) << 64
        return ipaddress.IPv6Network((int(OWN6.network_address) + offset, 64))

    @property
    def hoster(self) -> str:
        return "hoster1" if self.qualifier == "-" else "hoster2"

    @property
    def providers(self) -> tuple[str, ...]:
        if self.kind is Kind.REDIRECT:
            return (self.hoster,)
        return _KIND_PROVIDERS.get(self.kind, ())

    @property
    def has_own_range(self) -> bool:
        return self.kind in (Kind.OFFICE, Kind.MX_A, Kind.EXISTS, Kind.IPV6, Kind.VOID)

    def outcome_for_foreign(self) -> str:
        """The result for a client the record does not authorize."""
        if self.kind in SPF_KINDS:
            return _QUALIFIER_OUTCOME[self.qualifier]
        return _KIND_OUTCOME[self.kind]

    @property
    def depth(self) -> int:
        return _KIND_DEPTH.get(self.kind, 1)

    def records(self) -> dict[str, list[tuple[str, str]]]:
        """Every name this domain owns -> its records ("TXT"/"A"/"MX"/..., value).

        Names under the domain that are not listed do not exist; the special
        values "SERVFAIL" make a name fail.
        """
        d, q = self.name, self.qualifier
        own = self.own4
        host = own.network_address
        kind = self.kind
        spf: str | None = None
        extra: dict[str, list[tuple[str, str]]] = {}
        base: list[tuple[str, str]] = [("MX", f"10 mx1.{d}")]
        if kind is Kind.BIGMAIL:
            spf = f"v=spf1 include:_spf.bigmail.example {q}all"
        elif kind is Kind.OFFICE:
            spf = f"v=spf1 ip4:{own} include:spf.protection.office.example {q}all"
        elif kind is Kind.MX_A:
            spf = f"v=spf1 mx a ip4:{own} {q}all"
            base.append(("A", str(host + 2)))
            extra[f"mx1.{d}"] = [("A", str(host + 1))]
        elif kind is Kind.MULTI:
            spf = (
                "v=spf1 include:mailgun.example include:sendgrid.example "
                f"include:_spf.bigmail.example {q}all"
            )
        elif kind is Kind.REDIRECT:
            spf = f"v=spf1 redirect=_spf.{self.hoster}.example"
        elif kind is Kind.EXISTS:
            spf = f"v=spf1 exists:%{{i}}._spf.{d} {q}all"
        elif kind is Kind.IPV6:
            spf = f"v=spf1 ip6:{self.own6} ip4:{own} {q}all"
        elif kind is Kind.VOID:
            spf = f"v=spf1 a:old-mail.{d} include:sendgrid.example ip4:{own} {q}all"
        elif kind is Kind.NO_SPF:
            base.append(("TXT", f"site-verification={self.index:016x}"))
        elif kind is Kind.NXDOMAIN:
            return {}
        elif kind is Kind.NODATA:
            base = [("A", str(host + 2))]
        elif kind is Kind.TOO_MANY:
            spf = (
                "v=spf1 include:_spf.bigmail.example include:spf.protection.office.example "
                "include:mailgun.example a mx -all"
            )
        elif kind is Kind.VOID_LIMIT:
            spf = f"v=spf1 a:nx1.{d} a:nx2.{d} a:nx3.{d} -all"
        elif kind is Kind.SYNTAX:
            spf = "v=spf1 ip4:192.0.2.300 mx -all"
        elif kind is Kind.TWO_RECORDS:
            spf = "v=spf1 mx -all"
            base.append(("TXT", "v=spf1 include:_spf.bigmail.example -all"))
        elif kind is Kind.INCLUDE_MISSING:
            spf = f"v=spf1 include:spf.{d} -all"
            extra[f"spf.{d}"] = [("A", str(host + 3))]
        elif kind is Kind.SERVFAIL:
            base = [("SERVFAIL", "")]
        elif kind is Kind.INCLUDE_SERVFAIL:
            spf = f"v=spf1 include:spf.{d} -all"
            extra[f"spf.{d}"] = [("SERVFAIL", "")]
        if spf is not None:
            base.append(("TXT", spf))
        return {d: base, **extra}

    def exists_name(self, ip: str) -> bool:
        """Whether ``{ip}._spf.{domain}`` exists (the EXISTS kind's allow list)."""
        try:
            return ipaddress.ip_address(ip) in self.own4
        except ValueError:
            return False


@lru_cache(maxsize=65536)
def domain_for(seed: int, index: int) -> Domain:
    digest = stable_digest("domain", seed, index)
    pick = digest % 1000
    kind = _KIND_WEIGHTS[bisect.bisect_right(_KIND_CUMULATIVE, pick)][0]
    qualifier = ""
    if kind in SPF_KINDS:
        roll = (digest >> 16) % 100
        qualifier = "-" if roll < 40 else "~" if roll < 85 else "?"
        if kind is Kind.REDIRECT and qualifier == "?":
            qualifier = "~"  # the hosters publish -all and ~all only
    return Domain(index, kind, qualifier)


def parse_domain(seed: int, name: str) -> Domain | None:
    """The domain a name of the form ``{kind}{index}.example`` stands for."""
    match = _NAME.match(name)
    if match is None:
        return None
    try:
        kind = Kind(match.group(1))
    except ValueError:
        return None
    domain = domain_for(seed, int(match.group(2)))
    return domain if domain.kind is kind else None


# HELO names: "mail-<client address, dashed>.mta.example", a third with SPF.


def helo_name(ip: str) -> str:
    address = ipaddress.ip_address(ip)
    text = address.exploded.replace(":", "-") if address.version == 6 else ip.replace(".", "-")
    return f"mail-{text}.{HELO_SUFFIX}"


def helo_address(name: str) -> str | None:
    match = _HELO.match(name)
    if match is None:
        return None
    parts = match.group(1).split("-")
    try:
        if len(parts) == 4:
            return str(ipaddress.IPv4Address(".".join(parts)))
        if len(parts) == 8:
            return str(ipaddress.IPv6Address(":".join(parts)))
    except ValueError:
        return None
    return None


def helo_has_spf(ip: str) -> bool:
    return stable_digest("helo", ip) % 10 < 3


# ------------------------------------------------------------------ the zone


def _txt(value: str) -> dns.rdata.Rdata:
    raw = value.encode()
    chunks = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
    return dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, chunks)


def _rdata(rdtype: int, value: str) -> dns.rdata.Rdata:
    # The types the generator writes, built directly: parsing zone-file text
    # costs several times as much, once per unique name of the workload.
    if rdtype == dns.rdatatype.TXT:
        return _txt(value)
    if rdtype == dns.rdatatype.A:
        return dns.rdtypes.IN.A.A(dns.rdataclass.IN, rdtype, value)
    if rdtype == dns.rdatatype.AAAA:
        return dns.rdtypes.IN.AAAA.AAAA(dns.rdataclass.IN, rdtype, value)
    if rdtype == dns.rdatatype.MX:
        preference, exchange = value.split()
        return dns.rdtypes.ANY.MX.MX(
            dns.rdataclass.IN, rdtype, int(preference), dns.name.from_text(exchange)
        )
    return dns.rdata.from_text(
        dns.rdataclass.IN,
        dns.rdatatype.RdataType.make(rdtype),
        value,
        origin=dns.name.root,
        relativize=False,
    )


def _rrset(name: dns.name.Name, rdtype: int, values: list[str], ttl: int) -> dns.rrset.RRset:
    rrset = dns.rrset.RRset(name, dns.rdataclass.IN, dns.rdatatype.RdataType.make(rdtype))
    for value in values:
        rrset.add(_rdata(rdtype, value), ttl)
    return rrset


# A built node: its records by type, as text; made into an RRset when asked for.
_Records = dict[int, list[str]]


def _by_type(records: list[tuple[str, str]]) -> _Records:
    by_type: _Records = {}
    for rtype, value in records:
        by_type.setdefault(_RDTYPES[rtype], []).append(value)
    return by_type


_RDTYPES = {
    text: dns.rdatatype.from_text(text) for text in ("A", "AAAA", "MX", "TXT", "CNAME", "NS")
}


class BenchZone(Zone):
    """The generated zone: provider records plus any sender domain, built on demand."""

    node_cache_size = 50_000

    def __init__(self, seed: int, *, drop: bool = False) -> None:
        super().__init__({})
        self.seed = seed
        # drop: the temperror kinds' failing names drop queries (a dead
        # nameserver) instead of answering SERVFAIL.
        self.failure = Fault.TIMEOUT if drop else Fault.SERVFAIL
        self.origin = dns.name.from_text("example.")
        self._providers: dict[dns.name.Name, dict[int, dns.rrset.RRset]] = {}
        for text, records in PROVIDERS.items():
            name = dns.name.from_text(text)
            self._providers[name] = {
                rdtype: _rrset(name, rdtype, values, PROVIDER_TTL)
                for rdtype, values in _by_type(records).items()
            }
        self._provider_ancestors = {
            ancestor for name in self._providers for ancestor in _ancestors(name)
        }
        self._built: OrderedDict[dns.name.Name, _Records | Fault | None] = OrderedDict()

    def resolve(
        self, qname: dns.name.Name, rdtype: int, fault_for: Callable[..., Any] | None = None
    ) -> Resolution:
        provider = self._providers.get(qname)
        if provider is not None:
            found = provider.get(rdtype)
            if found is None:
                return Resolution(negative=True, final_name=qname)
            return Resolution(answer=(found,), final_name=qname)
        node = self._node(qname)
        if isinstance(node, Fault):
            return Resolution(fault=node, final_name=qname)
        if node is None:
            exists = qname in self._provider_ancestors
            rcode = dns.rcode.NOERROR if exists else dns.rcode.NXDOMAIN
            return Resolution(rcode, negative=True, final_name=qname)
        values = node.get(rdtype)
        if values is None:
            return Resolution(negative=True, final_name=qname)
        return Resolution(answer=(_rrset(qname, rdtype, values, DOMAIN_TTL),), final_name=qname)

    def _node(self, qname: dns.name.Name) -> _Records | Fault | None:
        built = self._built
        if qname in built:
            built.move_to_end(qname)
            return built[qname]
        node = self._build(qname)
        built[qname] = node
        if len(built) > self.node_cache_size:
            built.popitem(last=False)
        return node

    def _build(self, qname: dns.name.Name) -> _Records | Fault | None:
        text = qname.to_text(omit_final_dot=True).lower()
        address = helo_address(text)
        if address is not None:
            records: _Records = {_RDTYPES["AAAA" if ":" in address else "A"]: [address]}
            if helo_has_spf(address):
                records[_RDTYPES["TXT"]] = ["v=spf1 a -all"]
            return records
        labels = text.split(".")
        # Sender domains are two labels; their own names add more in front.
        if len(labels) < 2:
            return None
        domain = parse_domain(self.seed, ".".join(labels[-2:]))
        if domain is None:
            return None
        if domain.kind is Kind.EXISTS and text.endswith(f"._spf.{domain.name}"):
            ip = text[: -len(f"._spf.{domain.name}")]
            if domain.exists_name(ip):
                return {_RDTYPES["A"]: ["127.0.0.2"]}
            return None
        found = domain.records().get(text)
        if found is None:
            return None
        if found and found[0][0] == "SERVFAIL":
            return self.failure
        return _by_type(found)


def _ancestors(name: dns.name.Name) -> Iterator[dns.name.Name]:
    while name != dns.name.root:
        name = name.parent()
        yield name


class BenchZoneServer(ZoneServer):
    """ZoneServer that remembers the reply bytes of each distinct question.

    Answering is pure, so a repeated query (same bytes but the ID) gets the
    stored reply with its ID patched in: the DNS server must not be what
    limits a baseline that sends thousands of queries a second.
    """

    reply_cache_size = 200_000

    def __init__(self, zone: Zone, **kwargs: Any) -> None:
        super().__init__(zone, **kwargs)
        self._replies: dict[tuple[bool, bytes], bytes] = {}

    def handle(self, wire: bytes, send: Callable[[bytes], None], *, tcp: bool) -> None:
        key = (tcp, wire[2:])
        cached = self._replies.get(key)
        if cached is None:
            if len(self._replies) >= self.reply_cache_size:
                self._replies.clear()

            def remember(reply: bytes) -> None:
                self._replies[key] = reply[2:]
                send(reply)

            super().handle(wire, remember, tcp=tcp)
            return
        self.queries += 1
        self.tcp_queries += tcp
        self._send(send, wire[:2] + cached, None)


# ------------------------------------------------------------------ DNS process


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m spfpolicy.bench.zone",
        description="Serve the load generator's zone over loopback DNS (UDP and TCP). "
        "Prints HOST:PORT, then serves until SIGTERM/SIGINT.",
    )
    parser.add_argument("--seed", type=int, default=1, help="the zone's seed (as bench --seed)")
    parser.add_argument("--delay", type=float, default=0.02, help="seconds before each answer")
    parser.add_argument(
        "--drop",
        action="store_true",
        help="the temperror domains' failing names drop queries instead of answering SERVFAIL",
    )
    parser.add_argument("--listen", default="127.0.0.1", help="loopback address")
    parser.add_argument("--port", type=int, default=0, help="port (default: any free one)")
    parser.add_argument(
        "--control",
        action="store_true",
        help="for spfpolicy bench: answer 'stats' and 'reset' lines on stdin with a JSON "
        "line of query counts; exit at EOF",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with eventloop.runner() as runner:
        try:
            return runner.run(_serve(args))
        except (OSError, ValueError) as exc:
            print(f"python -m spfpolicy.bench.zone: {exc}", file=sys.stderr)
            return 1


async def _serve(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    server = BenchZoneServer(
        BenchZone(args.seed, drop=args.drop), host=args.listen, port=args.port, delay=args.delay
    )
    async with server:
        print(server.nameserver, flush=True)
        if args.control:
            reader = asyncio.StreamReader()
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
            while line := await reader.readline():
                command = line.decode().strip()
                if command == "reset":
                    server.reset_counts()
                if command in ("stats", "reset"):
                    stats = {"queries": server.queries, "tcp_queries": server.tcp_queries}
                    print(json.dumps(stats), flush=True)
            return 0
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
