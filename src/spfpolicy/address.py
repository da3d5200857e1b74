"""Addresses given as text. ``host[:port]``: the one type for those of the
configuration (``Listen = inet:...``, ``Nameservers``), the command line
(``--nameserver``, ``--listen``), the resolver and the bench. ``ip_or_none``:
a request's client address, parsed for every request that is checked.

Forms: ``192.0.2.1``, ``192.0.2.1:5353``, ``mail.example``, ``::1`` (a bare
IPv6 address, when a default port exists), ``[::1]:5353``. Printed, an IPv6
host is bracketed and the port always given, which c-ares, dnspython and
Postfix's ``inet:`` syntax all read.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Self

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def ip_or_none(text: str) -> IPAddress | None:
    """``ipaddress.ip_address(text)``, or None where that raises ValueError.

    Text without ":" goes through glibc's inet_pton, which takes exactly
    what ipaddress takes for IPv4 (four decimal octets without leading
    zeros; tests/test_address.py holds them to it): 0.4 us where
    ipaddress's own parser takes 2.2, and a request parses its client
    address more than once (the policy, the prefetch).
    """
    if ":" not in text:
        try:
            return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, text))
        except (OSError, ValueError):  # ValueError: a NUL, or not ASCII
            return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int = 0

    @classmethod
    def parse(cls, text: str, *, default_port: int | None = None) -> Self:
        """``host:port``, ``[v6]:port``; ``host`` or a bare IPv6 address when
        ``default_port`` is given. ValueError names what is wrong."""
        text = text.strip()
        if text.startswith("["):
            host, bracket, rest = text[1:].partition("]")
            if not bracket:
                raise ValueError(f"unclosed '[' in {text!r}")
            if rest and not rest.startswith(":"):
                raise ValueError(f"junk after ']' in {text!r}")
            port_text = rest[1:] if rest else None
        elif text.count(":") == 1:
            host, _, port_text = text.partition(":")
        else:
            host, port_text = text, None
        if not host:
            raise ValueError(f"missing host in {text!r}")
        if port_text is None:
            if default_port is None:
                raise ValueError(f"missing port in {text!r}")
            return cls(host, default_port)
        if not port_text.isdigit():
            raise ValueError(f"bad port in {text!r}")
        port = int(port_text)
        if not 0 < port < 65536:
            raise ValueError(f"port out of range in {text!r}")
        return cls(host, port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"
