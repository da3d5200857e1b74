"""The load generator's workloads: streams of policy requests drawn from the
generated zone (``zone.py``), each with the SPF result it must get.

zipf is skewed over many domains and clients (the realistic one), unique
gives every message a new domain and client (a cold cache), hot repeats a
few tuples (the cached path).
"""

from __future__ import annotations

import bisect
import enum
import ipaddress
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from spfpolicy.bench.zone import (
    DEFAULT_MIX,
    FOREIGN4,
    FOREIGN6,
    OUTCOMES,
    PROVIDER_SOURCES,
    RECEIVER_DOMAINS,
    SPF_KINDS,
    Domain,
    Kind,
    domain_for,
    helo_has_spf,
    helo_name,
    stable_digest,
)
from spfpolicy.protocol import encode_request

__all__ = ["Message", "Request", "Workload", "WorkloadKind", "parse_mix"]

# ------------------------------------------------------------------ workloads


class WorkloadKind(enum.StrEnum):
    ZIPF = "zipf"  # skewed over many domains and clients: the realistic one
    UNIQUE = "unique"  # every message a new domain and client: cold cache
    HOT = "hot"  # a few tuples over and over: the cached path


def parse_mix(text: str) -> dict[str, float]:
    """``pass=70,fail=5,...``: relative weights; outcomes not named get 0."""
    mix: dict[str, float] = {}
    for item in text.split(","):
        name, sep, value = item.strip().partition("=")
        name = name.strip().lower()
        if not sep or name not in OUTCOMES:
            raise ValueError(
                f"bad mix item {item!r}: expected OUTCOME=WEIGHT, OUTCOME one of "
                + ", ".join(OUTCOMES)
            )
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"bad weight in {item!r}") from None
        if weight < 0:
            raise ValueError(f"negative weight in {item!r}")
        mix[name] = weight
    if not any(mix.values()):
        raise ValueError("the mix needs at least one positive weight")
    return {name: mix.get(name, 0.0) for name in OUTCOMES}


@dataclass(frozen=True, slots=True)
class Request:
    """One encoded policy request and what a correct server answers."""

    data: bytes
    expected: str  # the SPF result word the answer must carry (pass, fail, ...)
    first: bool  # the message's first recipient (later ones get DUNNO or the reject again)


@dataclass(frozen=True, slots=True)
class Message:
    requests: tuple[Request, ...]
    critical_path: int  # uncached DNS round trips on the request's path (see Workload)
    cold_rtts: int  # round trips its first request waits, given the messages before it


@dataclass(slots=True)
class _Sender:
    """A (client, HELO, sender) tuple and its expected result."""

    ip: str
    helo: str
    sender: str
    expected: str
    helo_depth: int  # the HELO check's uncached round trips
    domain: str = ""  # the MAIL FROM domain; "" for the null sender
    domain_depth: int = 0  # its tree's uncached round trips
    static: tuple[bytes, ...] = ()

    @property
    def critical_path(self) -> int:
        return self.helo_depth + self.domain_depth


class _ZipfPool:
    def __init__(self, size: int, exponent: float) -> None:
        total = 0.0
        self.cumulative: list[float] = []
        for rank in range(1, size + 1):
            total += rank**-exponent
            self.cumulative.append(total)
        self.total = total

    def rank(self, u: float) -> int:
        return min(bisect.bisect_right(self.cumulative, u * self.total), len(self.cumulative) - 1)


@dataclass
class Workload:
    """A deterministic stream of messages; ``messages()`` yields them.

    ``critical_path`` of a message: DNS round trips that cannot be avoided on a
    cold cache (shared provider records counted as cached): the HELO check
    (TXT, then A when the HELO name has SPF) followed by the MAIL FROM
    domain's tree depth. Meaningful for the unique workload.

    ``cold_rtts``: the round trips the message's first request must wait when
    everything earlier in the stream is cached and the server fetches the
    HELO and MAIL FROM trees together on arrival: the larger of the HELO
    depth (if that HELO name is new) and the domain's depth (if that domain is
    new). Later recipients are answered from the message's memory. Summed
    over a run it bounds the requests/s any server can reach (loadgen.py). The
    names seen are kept in two sets: zipf and hot draw at most the bench's
    prefill, unique one new name of each per message.
    """

    kind: WorkloadKind = WorkloadKind.ZIPF
    seed: int = 1
    mix: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    domains: int = 20_000  # zipf pool of sender domains
    clients: int = 5_000  # zipf pool of foreign client addresses
    zipf_exponent: float = 1.0
    hot_tuples: int = 10
    null_sender_share: float = 0.03
    server_address: str = "192.0.2.25"

    def __post_init__(self) -> None:
        import random

        self._rng = random.Random(self.seed)
        mix = {k: v for k, v in self.mix.items() if v > 0}
        self._outcomes = list(mix)
        weights = [mix[k] for k in self._outcomes]
        self._outcome_cumulative = [sum(weights[: i + 1]) for i in range(len(weights))]
        self._pools: dict[str, list[int]] = {o: [] for o in OUTCOMES}
        self._zipf: dict[str, _ZipfPool] = {}
        self._fresh: dict[str, deque[int]] = {o: deque() for o in OUTCOMES}
        self._next_fresh = self.domains
        self._next_foreign = 0
        self._hot: list[_Sender] = []
        self._message = 0
        self._seen_helos: set[str] = set()
        self._seen_domains: set[str] = set()
        if self.kind is not WorkloadKind.UNIQUE:
            for index in range(self.domains):
                for outcome in _outcomes_of(domain_for(self.seed, index)):
                    self._pools[outcome].append(index)
            for outcome in self._outcomes:
                if not self._pools[outcome]:
                    raise ValueError(
                        f"no domain among {self.domains} gives {outcome}; raise --domains"
                    )
                self._zipf[outcome] = _ZipfPool(len(self._pools[outcome]), self.zipf_exponent)
            self._client_zipf = _ZipfPool(self.clients, self.zipf_exponent)
        if self.kind is WorkloadKind.HOT:
            self._hot = [self._sender() for _ in range(self.hot_tuples)]

    # -- drawing ------------------------------------------------------------

    def _outcome(self) -> str:
        u = self._rng.random() * self._outcome_cumulative[-1]
        return self._outcomes[bisect.bisect_right(self._outcome_cumulative, u)]

    def _domain(self, outcome: str) -> Domain:
        if self.kind is WorkloadKind.UNIQUE:
            # Fresh domains, each used once: a working record serves either a
            # pass or its own failing outcome, chosen by its digest.
            queue = self._fresh[outcome]
            while not queue:
                index = self._next_fresh
                self._next_fresh += 1
                outcomes = _outcomes_of(domain_for(self.seed, index))
                pick = outcomes[stable_digest("use", self.seed, index) % len(outcomes)]
                self._fresh[pick].append(index)
            return domain_for(self.seed, queue.popleft())
        pool = self._pools[outcome]
        return domain_for(self.seed, pool[self._zipf[outcome].rank(self._rng.random())])

    def _foreign_ip(self) -> str:
        six = self._rng.random() < 0.1
        if self.kind is WorkloadKind.UNIQUE:
            self._next_foreign += 1
            number = self._next_foreign
        else:
            number = self._client_zipf.rank(self._rng.random()) + 1
        if six:
            return str(FOREIGN6.network_address + number * 0x10001)
        return str(FOREIGN4.network_address + number)

    def _allowed_ip(self, domain: Domain) -> str:
        rng = self._rng
        if domain.has_own_range and (not domain.providers or rng.random() < 0.5):
            if domain.kind is Kind.IPV6 and rng.random() < 0.7:
                return str(domain.own6.network_address + rng.randrange(1, 256))
            if domain.kind is Kind.MX_A:
                return str(domain.own4.network_address + rng.choice((1, 2, 5, 9)))
            return str(domain.own4.network_address + rng.randrange(1, 15))
        provider = rng.choice(domain.providers)
        sources = PROVIDER_SOURCES[provider]
        net = ipaddress.ip_network(rng.choice(sources))
        if self.kind is WorkloadKind.UNIQUE:
            offset = rng.randrange(1, min(net.num_addresses, 2**24) - 1)
        else:
            # A provider sends from a few hundred addresses per block.
            offset = rng.randrange(1, 512) * (1 if net.version == 4 else 0x10001)
        return str(net.network_address + offset)

    def _sender(self) -> _Sender:
        outcome = self._outcome()
        domain = self._domain(outcome)
        ip = self._allowed_ip(domain) if outcome == "pass" else self._foreign_ip()
        helo = helo_name(ip)
        helo_result = "pass" if helo_has_spf(ip) else "none"
        helo_depth = 2 if helo_result == "pass" else 1
        rng = self._rng
        if rng.random() < self.null_sender_share:
            return _Sender(ip, helo, "", helo_result, helo_depth)
        local = rng.choice(("info", "noreply", "news", "billing", "support", "orders"))
        if rng.random() < 0.2:
            local = f"bounce-{rng.randrange(10**6)}"
        sender = f"{local}@{domain.name}"
        # MAIL FROM none with a HELO result: policyd-spf puts the HELO result in
        # the header (and a reject or defer never comes from "none").
        expected = helo_result if outcome == "none" and helo_result != "none" else outcome
        return _Sender(ip, helo, sender, expected, helo_depth, domain.name, domain.depth)

    # -- encoding -----------------------------------------------------------

    def _static(self, s: _Sender) -> tuple[bytes, ...]:
        if s.static:
            return s.static
        client_port = 1024 + stable_digest("port", s.ip) % 60000
        head = encode_request(
            [
                ("request", "smtpd_access_policy"),
                ("protocol_state", "RCPT"),
                ("protocol_name", "ESMTP"),
                ("helo_name", s.helo),
            ]
        )[:-1]
        middle = encode_request([("sender", s.sender)])[:-1]
        tail = encode_request(
            [
                ("client_address", s.ip),
                ("client_name", s.helo),
                ("reverse_client_name", s.helo),
            ]
        )[:-1]
        rest = encode_request(
            [
                ("sasl_method", ""),
                ("sasl_username", ""),
                ("sasl_sender", ""),
                ("size", str(2000 + stable_digest("size", s.sender) % 200_000)),
                ("ccert_subject", ""),
                ("ccert_issuer", ""),
                ("ccert_fingerprint", ""),
                ("ccert_pubkey_fingerprint", ""),
                ("encryption_protocol", "TLSv1.3"),
                ("encryption_cipher", "TLS_AES_256_GCM_SHA384"),
                ("encryption_keysize", "256"),
                ("etrn_domain", ""),
                ("stress", ""),
                ("server_address", self.server_address),
                ("server_port", "25"),
                ("policy_context", ""),
                ("compatibility_level", "3.6"),
                ("mail_version", "3.7.11"),
                ("client_port", str(client_port)),
            ]
        )
        s.static = (head, middle, tail, rest)
        return s.static

    def _message_for(self, s: _Sender) -> Message:
        self._message += 1
        number = self._message
        roll = self._rng.random()
        count = 1 if roll < 0.7 else 2 if roll < 0.9 else self._rng.randrange(3, 6)
        head, middle, tail, rest = self._static(s)
        instance = f"{number % 0xFFFFF:x}.{number:08x}.{stable_digest('i', number) % 999999:06d}.0"
        queue_id = f"4X{number:010X}"
        receiver = RECEIVER_DOMAINS[number % len(RECEIVER_DOMAINS)]
        requests = []
        for k in range(count):
            # smtpd opens the queue file after the first accepted recipient
            # (smtpd_delay_open_until_valid_rcpt), so the first has no queue id.
            data = b"".join(
                (
                    head,
                    encode_request([("queue_id", queue_id if k else "")])[:-1],
                    middle,
                    encode_request(
                        [("recipient", f"user{k}@{receiver}"), ("recipient_count", "0")]
                    )[:-1],
                    tail,
                    encode_request([("instance", instance)])[:-1],
                    rest,
                )
            )
            requests.append(Request(data, s.expected, first=k == 0))
        return Message(tuple(requests), s.critical_path, self._cold_rtts(s))

    def _cold_rtts(self, s: _Sender) -> int:
        """The round trips ``s`` waits for after the messages before it (see above)."""
        helo = 0 if s.helo in self._seen_helos else s.helo_depth
        self._seen_helos.add(s.helo)
        domain = 0
        if s.domain and s.domain not in self._seen_domains:
            domain = s.domain_depth
            self._seen_domains.add(s.domain)
        return max(helo, domain)

    def messages(self) -> Iterator[Message]:
        while True:
            if self.kind is WorkloadKind.HOT:
                sender = self._hot[self._rng.randrange(len(self._hot))]
            else:
                sender = self._sender()
            yield self._message_for(sender)


def _outcomes_of(domain: Domain) -> tuple[str, ...]:
    if domain.kind in SPF_KINDS:
        return ("pass", domain.outcome_for_foreign())
    return (domain.outcome_for_foreign(),)
