"""Loopback DNS server for tests and the load generator: zone data in, real DNS out.

``Zone`` answers questions without I/O, as a recursive resolver in front of the
authoritative data would (CNAME chasing, NXDOMAIN vs NODATA, injected faults);
``ZoneServer`` serves it over UDP and TCP on one loopback port; ``main`` is the CLI.

Speed: the load generator sends thousands of queries a second, mostly unique
names, so the ordinary query (one IN question, no or plain EDNS) is parsed and
its reply written by the small codec below (``_parse_query``, ``_render``),
which compresses names as dnspython's renderer does. Anything unusual takes
the dnspython path, which is also the reference the codec is tested against.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import enum
import ipaddress
import logging
import re
import signal
import struct
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.SOA
import dns.rdtypes.ANY.SPF
import dns.rdtypes.ANY.TXT
import dns.rdtypes.txtbase
import dns.rrset

from spfpolicy.address import HostPort

log = logging.getLogger(__name__)

MAX_CNAME_CHAIN = 10  # what common resolvers follow before giving up
MAX_CHARACTER_STRING = 255  # RFC 1035 3.3: a <character-string> is one length octet
CLASSIC_UDP_LIMIT = 512  # RFC 1035 4.2.1; also the floor for EDNS payloads (RFC 6891 6.2.5)
OUR_EDNS_PAYLOAD = 1232  # DNS flag day 2020: avoids IP fragmentation
PORT_ATTEMPTS = 20  # port 0: UDP picks the port, TCP may find it taken by someone else
TCP_MAX_MESSAGE = 65535  # RFC 1035 4.2.2: two-octet length prefix
SOA_CACHE_SIZE = 1024  # negative answers' SOA records, by owner

_IN = dns.rdataclass.IN
# Built from character-strings rather than zone-file text, so any bytes are servable.
_TXT_LIKE = {dns.rdatatype.TXT: dns.rdtypes.ANY.TXT.TXT, dns.rdatatype.SPF: dns.rdtypes.ANY.SPF.SPF}


class Fault(enum.StrEnum):
    """A broken upstream, as the client sees it; zone data names one as "TIMEOUT" etc."""

    TIMEOUT = "timeout"  # never answer
    SERVFAIL = "servfail"
    REFUSED = "refused"
    NXDOMAIN = "nxdomain"  # the name does not exist, whatever the zone says
    # Broken answers, as from a buggy middlebox or an off-path attacker:
    MALFORMED = "malformed"  # bytes that are no DNS message at all
    WRONG_ID = "wrong_id"  # a correct answer with another query's ID
    TRUNCATED_WIRE = "truncated_wire"  # a correct answer cut short, TC not set
    # TC over UDP (the client must retry over TCP), then no answer over TCP.
    TC_TCP_TIMEOUT = "tc_tcp_timeout"


# Fault.MALFORMED: the query's ID and a response's flags (so the client does
# try to parse it), then section counts of 0xFFFF with junk where the records
# should be.
_GARBAGE = b"\x81\x80" + b"\xff" * 8 + bytes(range(0x80, 0xC0))

# Renders a reply: (rcode, answer, authority, truncated) -> message bytes.
Render = Callable[[int, Sequence[dns.rrset.RRset], Sequence[dns.rrset.RRset], bool], bytes]


@dataclass(frozen=True, slots=True)
class Node:
    """Everything the zone holds for one owner name."""

    rrsets: Mapping[int, dns.rrset.RRset]  # rdtype -> records
    fault: Fault | None = None  # applies to types the name has no records of (RFC 7208 suite)


@dataclass(frozen=True, slots=True)
class Resolution:
    """The outcome of one question: an answer, a negative answer, or a fault."""

    rcode: dns.rcode.Rcode = dns.rcode.NOERROR
    answer: tuple[dns.rrset.RRset, ...] = ()
    negative: bool = False  # NXDOMAIN or NODATA: wants an SOA in the authority section
    final_name: dns.name.Name = dns.name.root  # the last name of the CNAME chain
    fault: Fault | None = None


FaultLookup = Callable[[dns.name.Name], Fault | None]


class Zone:
    """Immutable zone data (name -> records) and the resolver logic over it."""

    def __init__(self, nodes: Mapping[dns.name.Name, Node]) -> None:
        self._nodes = dict(nodes)
        # RFC 8020: a name that only has descendants (an empty non-terminal) exists.
        self._ancestors: set[dns.name.Name] = set()
        origin: dns.name.Name | None = None
        for name in self._nodes:
            self._ancestors.update(_strict_ancestors(name))
            origin = name if origin is None else _common_ancestor(origin, name)
        self.origin: dns.name.Name = origin if origin is not None else dns.name.root

    @property
    def names(self) -> tuple[dns.name.Name, ...]:
        return tuple(self._nodes)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, ttl: int = 300) -> Zone:
        """Build from ``{"example.com": [{"TXT": "v=spf1 -all"}, {"A": "192.0.2.1"}, ...]}``."""
        records: dict[dns.name.Name, list[tuple[int, dns.rdata.Rdata]]] = {}
        faults: dict[dns.name.Name, Fault] = {}
        for text, entries in data.items():
            name = _parse_name(text)
            owned = records.setdefault(name, [])  # an empty list still makes the name exist
            for entry in entries or ():
                try:
                    parsed = _parse_entry(entry, ttl)
                except (ValueError, TypeError, dns.exception.DNSException) as exc:
                    raise ValueError(f"zone entry {text!r}: {entry!r}: {exc}") from exc
                if isinstance(parsed, Fault):
                    faults[name] = parsed
                else:
                    owned.append(parsed)
        return cls(
            {name: _make_node(name, recs, faults.get(name)) for name, recs in records.items()}
        )

    @classmethod
    def from_rfc7208(cls, zonedata: Mapping[str, Any], *, ttl: int = 300) -> Zone:
        """Build from the ``zonedata`` of one scenario of the RFC 7208 test suite.

        Follows the suite's reference driver (pyspf testspf.py): SPF (type 99)
        records are also served as TXT unless the name lists TXT itself, and a
        value "NONE" only says "no record of this type".
        """
        converted: dict[str, list[Any]] = {}
        for name, entries in zonedata.items():
            entries = list(entries or ())
            has_txt = any(isinstance(e, Mapping) and "TXT" in _upper_keys(e) for e in entries)
            kept: list[Any] = []
            copies: list[Any] = []
            for entry in entries:
                if isinstance(entry, Mapping):
                    (rtype, value), *_ = _upper_keys(entry).items()
                    if rtype == "SPF" and not has_txt:
                        copies.append({"TXT": value})
                    if value == "NONE":
                        continue
                kept.append(entry)
            converted[name] = kept + copies
        return cls.from_dict(converted, ttl=ttl)

    def resolve(
        self, qname: dns.name.Name, rdtype: int, fault_for: FaultLookup | None = None
    ) -> Resolution:
        """Answer one question; ``fault_for`` injects faults per name (checked first)."""
        answer: list[dns.rrset.RRset] = []
        name = qname
        seen: set[dns.name.Name] = set()
        for _ in range(MAX_CNAME_CHAIN + 1):
            fault = fault_for(name) if fault_for is not None else None
            if fault is not None:
                return Resolution(fault=fault, final_name=name)
            node = self._nodes.get(name)
            if node is None:
                exists = name in self._ancestors
                rcode = dns.rcode.NOERROR if exists else dns.rcode.NXDOMAIN
                # RFC 6604 2.1: the rcode describes the last name of the chain.
                return Resolution(rcode, tuple(answer), negative=True, final_name=name)
            if rdtype == dns.rdatatype.ANY:
                found = tuple(node.rrsets.values())
            else:
                found = (node.rrsets[rdtype],) if rdtype in node.rrsets else ()
            if found:
                return Resolution(answer=(*answer, *found), final_name=name)
            cnames = node.rrsets.get(dns.rdatatype.CNAME)
            if cnames is None:
                if node.fault is not None:
                    return Resolution(fault=node.fault, final_name=name)
                return Resolution(answer=tuple(answer), negative=True, final_name=name)
            answer.append(cnames)
            seen.add(name)
            name = cnames[0].target
            if name in seen:
                break
        log.debug("CNAME chain from %s loops or is too long", qname)
        return Resolution(answer=tuple(answer), final_name=name)


def _upper_keys(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {str(k).upper(): v for k, v in entry.items() if str(k).lower() != "ttl"}


def _strict_ancestors(name: dns.name.Name) -> Iterable[dns.name.Name]:
    while name != dns.name.root:
        name = name.parent()
        yield name


def _common_ancestor(a: dns.name.Name, b: dns.name.Name) -> dns.name.Name:
    _, _, common = a.fullcompare(b)  # number of common labels, root included
    return dns.name.Name(a.labels[len(a.labels) - common :])


def _parse_name(text: str | bytes) -> dns.name.Name:
    # Names in zone data are absolute whether or not they end with a dot.
    return dns.name.from_text(text, origin=dns.name.root)


def _parse_entry(entry: Any, default_ttl: int) -> Fault | tuple[int, dns.rdata.Rdata]:
    if isinstance(entry, str):
        return Fault(entry.lower())
    if not isinstance(entry, Mapping):
        raise TypeError("expected a mapping like {'TXT': '...'} or a fault name")
    ttl = int(entry.get("ttl", entry.get("TTL", default_ttl)))
    fields = _upper_keys(entry)
    if len(fields) != 1:
        raise ValueError("expected exactly one record type per entry")
    ((type_text, value),) = fields.items()
    rdtype = dns.rdatatype.from_text(type_text)
    return ttl, _make_rdata(rdtype, value)


def _make_rdata(rdtype: dns.rdatatype.RdataType, value: Any) -> dns.rdata.Rdata:
    if rdtype in _TXT_LIKE:
        return _TXT_LIKE[rdtype](_IN, rdtype, _character_strings(value))
    if rdtype == dns.rdatatype.MX and isinstance(value, list | tuple):
        preference, exchange = value
        value = f"{int(preference)} {exchange or '.'}"  # RFC 7505 null MX: empty exchange
    if not isinstance(value, str):
        raise TypeError(f"expected a string value for {rdtype.name}")
    # Relative names in record data are taken as absolute, like the owner names.
    return dns.rdata.from_text(_IN, rdtype, value, origin=dns.name.root, relativize=False)


def _character_strings(value: Any) -> tuple[bytes, ...]:
    parts = value if isinstance(value, list | tuple) else [value]
    strings: list[bytes] = []
    for part in parts:
        if isinstance(part, str):
            raw = part.encode("utf-8")
        elif isinstance(part, bytes):
            raw = part
        else:
            raise TypeError("TXT data must be str, bytes or a list of them")
        # RFC 7208 3.3: long records are split into several character-strings.
        chunks = [
            raw[i : i + MAX_CHARACTER_STRING] for i in range(0, len(raw), MAX_CHARACTER_STRING)
        ]
        strings.extend(chunks or [b""])
    # RFC 1035 3.3.14 wants at least one string; the suite's "SPF: []" becomes one empty one.
    return tuple(strings) or (b"",)


def _make_node(
    name: dns.name.Name, records: list[tuple[int, dns.rdata.Rdata]], fault: Fault | None
) -> Node:
    rrsets: dict[int, dns.rrset.RRset] = {}
    for ttl, rdata in records:
        if rdata.rdtype not in rrsets:
            rrsets[rdata.rdtype] = dns.rrset.RRset(name, _IN, rdata.rdtype)
        # RFC 2181 5.2: one TTL per RRset; clients would use the lowest anyway.
        rrsets[rdata.rdtype].add(rdata, ttl)
    cnames = rrsets.get(dns.rdatatype.CNAME)
    if cnames is not None and (len(cnames) > 1 or len(rrsets) > 1):
        raise ValueError(f"zone entry {name}: a CNAME must be the only record (RFC 1034 3.6.2)")
    return Node(rrsets, fault)


def _name_key(name: dns.name.Name) -> str:
    """The key format of ``ZoneServer.counts`` and ``ZoneServer.faults``."""
    return name.to_text(omit_final_dot=True).lower()


class ZoneServer:
    """Serves a ``Zone`` over UDP and TCP on one loopback port; faults and delay at runtime."""

    def __init__(
        self,
        zone: Zone,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        delay: float = 0.0,
        negative_ttl: int = 300,
        soa_ttl: int | None = None,
        soa_in_negative: bool = True,
        udp_limit: int | None = None,
    ) -> None:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"ZoneServer binds loopback addresses only, not {host!r}")
        self.zone = zone
        self.host = host
        self.port = port
        self.delay = delay
        # Negative answers carry an SOA whose MINIMUM is negative_ttl and whose
        # own TTL is soa_ttl (negative_ttl unless given): RFC 2308 5 takes the
        # smaller of the two. ``zone`` may be replaced while serving.
        self.negative_ttl = negative_ttl
        self.soa_ttl = soa_ttl
        self.soa_in_negative = soa_in_negative
        self.udp_limit = udp_limit
        self.faults: dict[str, str] = {}  # name as in counts -> a Fault value
        self.delays: dict[str, float] = {}  # name as in counts -> seconds, instead of delay
        self.default_fault: str | None = None
        self.queries = 0
        self.tcp_queries = 0
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        # Set to a list to record each question's name as received: its labels.
        self.questions: list[tuple[bytes, ...]] | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._connections: set[asyncio.BaseTransport] = set()
        self._delayed: set[_DelayedReply] = set()
        self._soas: dict[tuple[dns.name.Name, int, int], dns.rrset.RRset] = {}

    @property
    def nameserver(self) -> str:
        """``host:port`` as c-ares (aiodns) and ``--nameserver`` options take it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        attempts = PORT_ATTEMPTS if self.port == 0 else 1
        for attempt in range(attempts):
            udp, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=(self.host, self.port)
            )
            port = udp.get_extra_info("sockname")[1]
            try:
                tcp = await loop.create_server(lambda: _TcpProtocol(self), self.host, port)
            except OSError:
                udp.close()
                if attempt + 1 == attempts:
                    raise
                log.debug("TCP port %d is taken, picking another", port)
                continue
            self._udp, self._tcp, self.port = udp, tcp, port
            log.debug("serving DNS on %s", self.nameserver)
            return

    async def close(self) -> None:
        # Stop accepting, drop connections, then cancel answers still waiting on delay.
        if self._tcp is not None:
            self._tcp.close()
        if self._udp is not None:
            self._udp.close()
        for transport in list(self._connections):
            transport.close()
        for delayed in self._delayed:
            delayed.timer.cancel()
        self._delayed.clear()
        if self._tcp is not None:
            await self._tcp.wait_closed()
        self._tcp = self._udp = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def reset_counts(self) -> None:
        self.queries = 0
        self.tcp_queries = 0
        self.counts.clear()

    def handle(self, wire: bytes, send: Callable[[bytes], None], *, tcp: bool) -> None:
        """Answer one query message through ``send``, now or after ``delay``."""
        query = _parse_query(wire)
        if query is None:
            self._handle_unusual(wire, send, tcp=tcp)
            return
        self._count(query.key, query.rdtype, tcp=tcp)
        if self.questions is not None:
            self.questions.append(query.labels)
        limit = self._size_limit(query.payload, tcp=tcp)

        def render(
            rcode: int,
            answer: Sequence[dns.rrset.RRset],
            authority: Sequence[dns.rrset.RRset],
            truncated: bool,
        ) -> bytes:
            return _render(query, rcode, answer, authority, truncated, limit)

        reply = self._answer(query.ident, query.name, query.rdtype, render, tcp=tcp)
        if reply is not None:
            self._send(send, reply, query.key)

    def _handle_unusual(self, wire: bytes, send: Callable[[bytes], None], *, tcp: bool) -> None:
        # dnspython's parser and renderer: the reference for the fast path above.
        try:
            query = dns.message.from_wire(wire)
        except Exception as exc:  # a test server must survive any garbage
            log.debug("ignoring malformed query: %s", exc)
            return
        if query.flags & dns.flags.QR:
            log.debug("ignoring a response sent to us")
            return
        key, rdtype = None, 0
        if query.question:
            key, rdtype = _name_key(query.question[0].name), query.question[0].rdtype
            if self.questions is not None:
                self.questions.append(query.question[0].name.labels[:-1])
        self._count(key, rdtype, tcp=tcp)
        reply = self._reply(query, tcp=tcp)
        if reply is not None:
            self._send(send, reply, key)

    def _count(self, key: str | None, rdtype: int, *, tcp: bool) -> None:
        """One query received; by (name, type) too when it has a question."""
        self.queries += 1
        self.tcp_queries += tcp
        if key is not None:
            self.counts[(key, _type_text(rdtype))] += 1

    def _send(self, send: Callable[[bytes], None], reply: bytes, key: str | None) -> None:
        delay = self.delay
        if self.delays and key is not None:
            delay = self.delays.get(key, delay)
        if delay > 0:
            # A timer, not a task per answer: thousands wait at a time.
            _DelayedReply(self._delayed, send, reply, delay)
        else:
            send(reply)

    def _reply(self, query: dns.message.Message, *, tcp: bool) -> bytes | None:
        response = dns.message.make_response(query, our_payload=OUR_EDNS_PAYLOAD)
        response.flags |= dns.flags.AA | dns.flags.RA
        if query.edns > 0:
            response.set_rcode(dns.rcode.BADVERS)  # RFC 6891 6.1.3
            return response.to_wire()
        if query.opcode() != dns.opcode.QUERY:
            response.set_rcode(dns.rcode.NOTIMP)
            return response.to_wire()
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        if question.rdclass != _IN:
            response.set_rcode(dns.rcode.REFUSED)
            return response.to_wire()

        def render(
            rcode: int,
            answer: Sequence[dns.rrset.RRset],
            authority: Sequence[dns.rrset.RRset],
            truncated: bool,
        ) -> bytes:
            response.set_rcode(dns.rcode.Rcode(rcode))
            if truncated:
                response.flags |= dns.flags.TC
                return response.to_wire()
            response.answer.extend(answer)
            response.authority.extend(authority)
            return self._to_wire(response, query, tcp=tcp)

        return self._answer(query.id, question.name, question.rdtype, render, tcp=tcp)

    def _answer(
        self, ident: int, qname: dns.name.Name, rdtype: int, render: Render, *, tcp: bool
    ) -> bytes | None:
        """The reply to a well-formed question, faults applied; None: no reply."""
        result = self.zone.resolve(qname, rdtype, self._runtime_fault)
        fault = result.fault
        if fault is None:
            pass
        elif fault is Fault.TIMEOUT or (fault is Fault.TC_TCP_TIMEOUT and tcp):
            return None
        elif fault is Fault.TC_TCP_TIMEOUT:
            return render(dns.rcode.NOERROR, (), (), True)
        elif fault is Fault.MALFORMED:
            return struct.pack("!H", ident) + _GARBAGE
        elif fault in (Fault.SERVFAIL, Fault.REFUSED):
            rcode = dns.rcode.SERVFAIL if fault is Fault.SERVFAIL else dns.rcode.REFUSED
            return render(rcode, (), (), False)
        else:  # NXDOMAIN, or a real answer to be broken on the way out
            result = self.zone.resolve(qname, rdtype)
            if fault is Fault.NXDOMAIN:
                result = Resolution(dns.rcode.NXDOMAIN, negative=True, final_name=qname)
        authority: tuple[dns.rrset.RRset, ...] = ()
        if result.negative and self.soa_in_negative:
            authority = (self._soa(result.final_name),)
        wire = render(result.rcode, result.answer, authority, False)
        if fault is Fault.WRONG_ID:
            (ident,) = struct.unpack_from("!H", wire)
            return struct.pack("!H", ident ^ 0x5A5A) + wire[2:]
        if fault is Fault.TRUNCATED_WIRE:
            return wire[: max(12, len(wire) // 2)]  # the header survives, the rest is cut
        return wire

    def _runtime_fault(self, name: dns.name.Name) -> Fault | None:
        fault = self.faults.get(_name_key(name)) if self.faults else None
        if fault is None:
            fault = self.default_fault
        return Fault(fault.lower()) if fault else None

    def _soa(self, name: dns.name.Name) -> dns.rrset.RRset:
        # RFC 2308 3: resolvers cache a negative answer for min(SOA TTL, MINIMUM). The
        # owner is an ancestor of the name, which is where resolvers look for it.
        owner = _common_ancestor(name, self.zone.origin)
        ttl = self.negative_ttl if self.soa_ttl is None else self.soa_ttl
        key = (owner, self.negative_ttl, ttl)
        rrset = self._soas.get(key)
        if rrset is not None:
            return rrset
        soa = dns.rdtypes.ANY.SOA.SOA(
            _IN,
            dns.rdatatype.SOA,
            dns.name.from_text("ns", origin=owner),
            dns.name.from_text("hostmaster", origin=owner),
            1,
            3600,
            600,
            86400,
            self.negative_ttl,
        )
        rrset = dns.rrset.RRset(owner, _IN, dns.rdatatype.SOA)
        rrset.add(soa, ttl)
        if len(self._soas) >= SOA_CACHE_SIZE:
            self._soas.clear()
        self._soas[key] = rrset
        return rrset

    def _size_limit(self, payload: int, *, tcp: bool) -> int:
        """The largest reply for this query (``payload``: its EDNS size, or -1)."""
        if tcp:
            return TCP_MAX_MESSAGE
        if self.udp_limit is not None:
            # dnspython renders no less than 512 octets; the fast path follows it.
            return min(max(self.udp_limit, CLASSIC_UDP_LIMIT), TCP_MAX_MESSAGE)
        if payload >= 0:
            return min(max(CLASSIC_UDP_LIMIT, payload), TCP_MAX_MESSAGE)
        return CLASSIC_UDP_LIMIT

    def _to_wire(
        self, response: dns.message.Message, query: dns.message.Message, *, tcp: bool
    ) -> bytes:
        limit = self._size_limit(query.payload if query.edns >= 0 else -1, tcp=tcp)
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            # RFC 2181 9: rather than a partial RRset, send none and set TC.
            response.answer.clear()
            response.authority.clear()
            response.additional.clear()
            response.flags |= dns.flags.TC
            return response.to_wire(max_size=limit)


# ------------------------------------------------------------------ fast codec

_QR, _AA, _TC, _RD, _RA = 0x8000, 0x0400, 0x0200, 0x0100, 0x0080
_OPCODE_MASK = 0x7800
_OPT = 41
_PADDING = 12  # EDNS option code (RFC 7830): dnspython pads the reply, so not ours
# Octets dnspython's to_text escapes (and so ``_name_key`` would spell otherwise).
_NEEDS_ESCAPE = re.compile(rb'[^\x21-\x7e]|["().;\\@$]')
# Our OPT RR (RFC 6891 6.1.2): root owner, our payload size, version 0, no flags.
_OPT_RR = b"\x00" + struct.pack("!HHIH", _OPT, OUR_EDNS_PAYLOAD, 0, 0)
_HEADER = struct.Struct("!6H")
_RR_FIXED = struct.Struct("!HHI")
_U16 = struct.Struct("!H")
_SOA_TIMES = struct.Struct("!5I")
# Record types whose names dnspython compresses (RFC 3597 4: the well-known ones).
_NAME_TYPES = frozenset(
    {dns.rdatatype.NS, dns.rdatatype.CNAME, dns.rdatatype.PTR, dns.rdatatype.MX, dns.rdatatype.SOA}
)

Compression = dict[tuple[bytes, ...], int]  # lower-cased labels of a suffix -> its offset


@dataclass(frozen=True, slots=True)
class _Query:
    """A query the fast path answers: one IN question, opcode QUERY, EDNS 0 or none."""

    ident: int
    flags: int
    question: bytes  # the question section as sent, echoed in the reply
    labels: tuple[bytes, ...]  # of the question name, as sent, without the root
    rdtype: int
    payload: int  # the client's EDNS payload size, -1 without EDNS
    key: str  # the name as ``_name_key`` spells it

    @property
    def name(self) -> dns.name.Name:
        return dns.name.Name((*self.labels, b""))


def _parse_query(wire: bytes) -> _Query | None:
    """The ordinary query, or None for anything the dnspython path must judge."""
    if len(wire) < 17:
        return None
    ident, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(wire)
    if flags & (_QR | _OPCODE_MASK) or qdcount != 1 or ancount or nscount or arcount > 1:
        return None
    labels: list[bytes] = []
    pos = 12
    while True:
        length = wire[pos]
        if length == 0:
            break
        if length > 63:  # a compression pointer, or an obsolete label type
            return None
        label = wire[pos + 1 : pos + 1 + length]
        if len(label) != length or _NEEDS_ESCAPE.search(label):
            return None
        labels.append(label)
        pos += 1 + length
        if pos >= len(wire):
            return None
    end = pos + 5
    if not labels or end - 12 - 4 > 255 or len(wire) < end:  # RFC 1035 3.1: 255 octets
        return None
    rdtype, rdclass = struct.unpack_from("!HH", wire, pos + 1)
    if rdclass != _IN:
        return None
    payload = -1
    if arcount:
        if len(wire) < end + 11 or wire[end] != 0:
            return None
        rrtype, payload, ttl, rdlength = struct.unpack_from("!HHIH", wire, end + 1)
        options = end + 11
        if rrtype != _OPT or ttl & 0x00FF0000 or len(wire) != options + rdlength:
            return None  # not OPT, or EDNS version > 0 (BADVERS)
        while options < len(wire):
            if len(wire) < options + 4:
                return None
            code, size = struct.unpack_from("!HH", wire, options)
            if code == _PADDING:
                return None
            options += 4 + size
        if options != len(wire):
            return None
    elif len(wire) != end:
        return None
    key = b".".join(labels).decode("ascii").lower()
    return _Query(ident, flags, wire[12:end], tuple(labels), rdtype, payload, key)


@lru_cache(maxsize=1024)
def _type_text(rdtype: int) -> str:
    return dns.rdatatype.to_text(dns.rdatatype.RdataType.make(rdtype))


def _render(
    query: _Query,
    rcode: int,
    answer: Sequence[dns.rrset.RRset],
    authority: Sequence[dns.rrset.RRset],
    truncated: bool,
    limit: int,
) -> bytes:
    """The reply dnspython would render for ``query`` (RRs in zone order, not shuffled)."""
    out = bytearray(12)
    out += query.question
    compress: Compression = {}
    lowered = tuple(label.lower() for label in query.labels)
    offset = 12
    for i, label in enumerate(query.labels):
        compress[lowered[i:]] = offset
        offset += 1 + len(label)
    answers = authorities = 0
    if not truncated:
        for rrset in answer:
            answers += _put_rrset(out, compress, rrset)
        for rrset in authority:
            authorities += _put_rrset(out, compress, rrset)
        reserve = len(_OPT_RR) if query.payload >= 0 else 0
        if len(out) > limit - reserve:
            # RFC 2181 9: rather than a partial RRset, send none and set TC.
            del out[12 + len(query.question) :]
            answers = authorities = 0
            truncated = True
    flags = _QR | _AA | _RA | (query.flags & _RD) | rcode | (_TC if truncated else 0)
    additional = 0
    if query.payload >= 0:
        out += _OPT_RR
        additional = 1
    _HEADER.pack_into(out, 0, query.ident, flags, 1, answers, authorities, additional)
    return bytes(out)


def _put_rrset(out: bytearray, compress: Compression, rrset: dns.rrset.RRset) -> int:
    owner = _labels(rrset.name)
    fixed = _RR_FIXED.pack(rrset.rdtype, rrset.rdclass, rrset.ttl)
    rdtype = rrset.rdtype
    for rdata in rrset:
        _put_name(out, compress, owner)
        out += fixed
        start = len(out)
        out += b"\0\0"
        if rdtype not in _NAME_TYPES:
            out += rdata.to_wire()
        elif rdtype == dns.rdatatype.MX:
            out += _U16.pack(rdata.preference)
            _put_name(out, compress, _labels(rdata.exchange))
        elif rdtype == dns.rdatatype.SOA:
            _put_name(out, compress, _labels(rdata.mname))
            _put_name(out, compress, _labels(rdata.rname))
            out += _SOA_TIMES.pack(
                rdata.serial, rdata.refresh, rdata.retry, rdata.expire, rdata.minimum
            )
        else:  # NS, CNAME, PTR
            _put_name(out, compress, _labels(rdata.target))
        _U16.pack_into(out, start, len(out) - start - 2)
    return len(rrset)


def _labels(name: dns.name.Name) -> tuple[bytes, ...]:
    if not name.is_absolute():
        raise ValueError(f"relative name {name} in zone data")
    return name.labels[:-1]


def _put_name(out: bytearray, compress: Compression, labels: tuple[bytes, ...]) -> None:
    # dnspython's Name.to_wire: point at the longest suffix already written,
    # remember where each new suffix starts (while offsets fit in 14 bits).
    lowered = tuple(label.lower() for label in labels)
    for i, label in enumerate(labels):
        suffix = lowered[i:]
        pointer = compress.get(suffix)
        if pointer is not None:
            out += _U16.pack(0xC000 | pointer)
            return
        if len(out) <= 0x3FFF:
            compress[suffix] = len(out)
        out.append(len(label))
        out += label
    out.append(0)


class _DelayedReply:
    """A reply sent ``delay`` seconds from now, listed in ``pending`` until then."""

    __slots__ = ("pending", "reply", "send", "timer")

    def __init__(
        self,
        pending: set[_DelayedReply],
        send: Callable[[bytes], None],
        reply: bytes,
        delay: float,
    ) -> None:
        self.pending = pending
        self.send = send
        self.reply = reply
        self.timer = asyncio.get_running_loop().call_later(delay, self._fire)
        pending.add(self)

    def _fire(self) -> None:
        self.pending.discard(self)
        try:
            self.send(self.reply)
        except Exception:  # the transport closed meanwhile: a late answer is dropped
            log.debug("could not send a delayed answer", exc_info=True)


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: ZoneServer) -> None:
        self._server = server
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: asyncio's and uvloop's UDP transports do not all
        # inherit from DatagramTransport.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        transport = self._transport
        if transport is None:
            return

        def send(wire: bytes) -> None:
            if not transport.is_closing():
                transport.sendto(wire, addr)

        try:
            self._server.handle(data, send, tcp=False)
        except Exception:
            log.exception("error answering a UDP query from %s", addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP error: %s", exc)


class _TcpProtocol(asyncio.Protocol):
    """RFC 1035 4.2.2 framing; several queries per connection, any read sizes."""

    def __init__(self, server: ZoneServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._server._connections.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._server._connections.discard(self._transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= 2:
            (length,) = struct.unpack_from("!H", self._buffer)
            if len(self._buffer) < 2 + length:
                break
            wire = bytes(self._buffer[2 : 2 + length])
            del self._buffer[: 2 + length]
            try:
                self._server.handle(wire, self._send, tcp=True)
            except Exception:
                log.exception("error answering a TCP query")

    def _send(self, wire: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(struct.pack("!H", len(wire)) + wire)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m spfpolicy.bench.dnsserver",
        description="Serve a YAML zone file over DNS (UDP and TCP) on a loopback port.",
    )
    parser.add_argument("--zone", required=True, type=Path, help="YAML file: name -> records")
    parser.add_argument(
        "--listen", default="127.0.0.1", help="HOST[:PORT] (default %(default)s, any free port)"
    )
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--ttl", type=int, default=300, help="TTL of records without their own")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    try:
        import yaml  # only the command reads a zone file: PyYAML is the bench extra's
    except ImportError:
        print(
            f"{parser.prog}: --zone needs PyYAML: pip install 'spfpolicy[bench]'", file=sys.stderr
        )
        return 2
    try:
        listen = HostPort.parse(args.listen, default_port=0)
        host, port = listen.host, listen.port
        data = yaml.safe_load(args.zone.read_text(encoding="utf-8")) or {}
        zone = Zone.from_dict(data, ttl=args.ttl)
        server = ZoneServer(zone, host=host, port=port, delay=args.delay)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(server))
    except OSError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve(server: ZoneServer) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        async with server:
            print(server.nameserver, flush=True)
            await stop.wait()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


if __name__ == "__main__":
    sys.exit(main())
