#!/usr/bin/env python3
"""Bounded fuzzer for a running spfpolicy: random and mutated requests over
the unix socket of a real ``spfpolicy serve`` subprocess, DNS from a loopback
zone server (``python -m spfpolicy.bench.dnsserver``, another subprocess).

Every case is a byte string ending in a blank line, so the project's own
RequestParser (with the server's limits) predicts exactly how many answers
come back and whether the server then closes the connection. The fuzzer
checks that prediction, reads every answer strictly (one printable
``action=`` line, see tests/hardening.py), and at the end checks that a valid
request still gets the right answer, that the server logged no traceback, and
that its RSS stayed within the bound.

    python tests/fuzz/fuzz_server.py                 # 100,000 cases
    python tests/fuzz/fuzz_server.py --requests 3000 --json

Bounded in count (--requests) and time (--time-limit); exit status 0 only if
every check passed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from hardening import (  # noqa: E402
    GOOD_IP,
    MB,
    Client,
    MalformedResponse,
    RawClient,
    header,
    request,
    rss_bytes,
)
from oracle import DnsServerProcess, SpfpolicyServer, write_conf  # noqa: E402
from spfpolicy.protocol import RequestParser, RequestTooLarge, encode_request  # noqa: E402

ZONE_YAML = """\
pass.example:
  - TXT: "v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 -all"
mail.pass.example:
  - TXT: "v=spf1 a -all"
  - A: 192.0.2.10
  - AAAA: "2001:db8::10"
soft.example:
  - TXT: "v=spf1 ~all"
macro.example:
  - TXT: "v=spf1 exists:%{l}.%{d} exists:%{i}.%{h}.macro.example -all"
mx.example:
  - TXT: "v=spf1 mx ptr -all"
  - MX: [10, mail.pass.example]
include.example:
  - TXT: "v=spf1 include:pass.example include:nx.example ?all"
xn--mnchen-3ya.example:
  - TXT: "v=spf1 +all"
temp.example:
  - servfail
"""

# Limits of the server under test (the defaults), for the prediction.
LIMITS = {"max_line_length": 8192, "max_attributes": 128, "max_request_size": 65536}

IPS = [
    GOOD_IP,
    "198.51.100.1",
    "",
    "bogus",
    "999.1.1.1",
    "1.2.3",
    " 192.0.2.10",
    "192.0.2.10 ",
    "0x7f.0.0.1",
    "1.2.3.4/24",
    "::",
    "::1",
    "::ffff:192.0.2.10",
    "::ffff:c000:20a",
    "2001:db8::10",
    "2001:DB8:0:0:0:0:0:10",
    "2001:db8::1%eth0",
    "[2001:db8::1]",
    "IPv6:2001:db8::1",
    "fe80::1%lo",
    "2001:db8::1::2",
    "1:2:3:4:5:6:7:8:9",
    "127.0.0.1",
    "0.0.0.0",
    "255.255.255.255",
]
SENDERS: list[str | bytes] = [
    "",
    "@",
    "@@",
    "a@",
    "@pass.example",
    "a@@pass.example",
    "a@b@pass.example",
    "<a@pass.example>",
    "a@pass.example.",
    "a@.pass.example",
    "a@pass..example",
    "a@[192.0.2.1]",
    '"a b"@pass.example',
    '"a@b"@pass.example',
    "a b@macro.example",
    "%{l}%{d}%{i}@macro.example",
    "a@MÜNCHEN.example",
    "ü@münchen.example",
    "用户@例え.jp",
    "a@xn--mnchen-3ya.example",
    "a@xn--.example",
    "a@" + "x" * 64 + ".example",
    "a@" + ".".join(["a" * 63] * 5),
    "a" * 500 + "@pass.example",
    "a\0@pass.example",
    "a@pass.example\0",
    b"\xff\xfe@pass.example",
    b"a@\xc3\x28.example",
    b"a@\xe2\x80\xa8.example",
    "postmaster",
    "MAILER-DAEMON",
    "a@-bad-.example",
    "a@temp.example",
    "a@soft.example",
    "a@include.example",
    "a@mx.example",
]
HELOS: list[str | bytes] = [
    "",
    "mail.pass.example",
    "localhost",
    "[192.0.2.10]",
    "[IPv6:2001:db8::1]",
    "192.0.2.10",
    "a..b",
    ".",
    "-",
    "x" * 255,
    "x" * 8000,
    "münchen.example",
    b"\xff.example",
    "a b c",
    "%{h}.macro.example",
    "mx.example",
]
NAMES = [
    "request",
    "protocol_state",
    "client_address",
    "client_name",
    "reverse_client_name",
    "helo_name",
    "sender",
    "recipient",
    "instance",
    "queue_id",
    "sasl_username",
    "ccert_subject",
    "x",
]
JUNK_LINES = [b"=", b"==", b"\0=\0", b"a\0b=c", b"noequals", b"\r", b" = ", b"\xff=\xfe"]


def _raw(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _frame(pairs: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(name + b"=" + value + b"\n" for name, value in pairs) + b"\n"


def mutated_request(rng: random.Random) -> bytes:
    attrs = request(
        str(rng.choice(["a@pass.example", "a@mail.pass.example", "a@soft.example"])),
        ip=rng.choice([GOOD_IP, "198.51.100.1", "2001:db8::10"]),
        helo=rng.choice(["mail.pass.example", "mx.client.example"]),
    )
    pairs = [(name.encode(), value.encode()) for name, value in attrs.items()]
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        index = rng.randrange(len(pairs))
        if choice < 0.2:
            pairs[index] = (b"client_address", _raw(rng.choice(IPS)))
        elif choice < 0.45:
            pairs[index] = (b"sender", _raw(rng.choice(SENDERS)))
        elif choice < 0.6:
            pairs[index] = (b"helo_name", _raw(rng.choice(HELOS)))
        elif choice < 0.7:
            del pairs[index]  # a missing attribute
            if not pairs:
                pairs.append((b"x", b"y"))
        elif choice < 0.75:
            pairs.insert(index, pairs[index])  # a repeated one
        elif choice < 0.85:
            junk = rng.choice(JUNK_LINES)
            pairs.insert(index, (junk, b"") if b"=" not in junk else tuple(junk.split(b"=", 1)))  # type: ignore[arg-type]
        else:
            name = rng.choice(NAMES).encode()
            value = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40)))
            pairs.insert(index, (name, value.replace(b"\n", b"")))
    data = bytearray(_frame(pairs))
    if rng.random() < 0.2:  # bit flips anywhere (may add or remove line ends)
        for _ in range(rng.randint(1, 5)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data) + b"\n\n"


def garbage(rng: random.Random) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 3000))) + b"\n\n"


def nul_flood(rng: random.Random) -> bytes:
    return b"sender=" + b"\0" * rng.randint(1, 4000) + b"\nrequest=smtpd_access_policy\n\n"


def megabyte_line(rng: random.Random) -> bytes:
    return b"helo_name=" + bytes([rng.choice(b"x\0\xff")]) * (1 << 20) + b"\n\n"


def many_attributes(rng: random.Random) -> bytes:
    count = rng.choice([127, 128, 129, 1000, 5000])
    return b"".join(b"attr%d=value\n" % i for i in range(count)) + b"\n"


def near_limit_line(rng: random.Random) -> bytes:
    length = rng.choice([8190, 8191, 8192, 8193])
    base = encode_request(request())
    return b"ccert_subject=" + b"s" * (length - len(b"ccert_subject=")) + b"\n" + base


def pipelined_valid(rng: random.Random) -> bytes:
    return b"".join(encode_request(request(ip=GOOD_IP)) for _ in range(rng.randint(2, 10))) + b"\n"


# (weight, generator): mostly mutated requests; the expensive ones rarely.
GENERATORS: list[tuple[float, Callable[[random.Random], bytes]]] = [
    (0.70, mutated_request),
    (0.12, garbage),
    (0.05, nul_flood),
    (0.05, pipelined_valid),
    (0.04, near_limit_line),
    (0.035, many_attributes),
    (0.005, megabyte_line),
]


def predict(data: bytes) -> tuple[int, bool]:
    """(answers, closes): what the server must do with these bytes."""
    parser = RequestParser(**LIMITS)
    count = 0
    try:
        parser.feed(data)
        while parser.next_request() is not None:
            count += 1
    except RequestTooLarge:
        return count, True
    return count, False


@dataclass
class Report:
    requests: int = 0  # cases sent
    answers: int = 0  # action lines read
    closes: int = 0  # connections the server closed on a limit, as predicted
    bytes_sent: int = 0
    seconds: float = 0.0
    rss_before_mb: float = 0.0
    rss_after_mb: float = 0.0
    rss_peak_mb: float = 0.0
    rss_limit_mb: float = 0.0
    final_answer_ok: bool = False
    failures: list[str] = field(default_factory=list)
    # Known-bug classes, reported apart from the hard failures above:
    tracebacks: int = 0  # exceptions the server logged (answered with its fallback)
    traceback_kinds: dict[str, int] = field(default_factory=dict)  # last line -> count
    traceback_example: str = ""
    invisible_answers: int = 0  # answers with Unicode separators/format characters
    invisible_examples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Nothing crashed, hung, broke the protocol or grew past the bound."""
        return not self.failures and self.final_answer_ok and self.rss_after_mb <= self.rss_limit_mb

    @property
    def clean(self) -> bool:
        """And no request raised inside the server, no answer had invisibles."""
        return self.ok and self.tracebacks == 0 and self.invisible_answers == 0


async def _run_case(
    path: Path, client: RawClient | None, data: bytes, invisibles: list[str]
) -> tuple[RawClient | None, int]:
    """Send one case; returns the connection to go on with (None if closed) and answers."""
    expected, closes = predict(data)
    if client is None:
        client = await RawClient.connect(path, invisibles)
    writing = asyncio.ensure_future(client.send(data))
    try:
        for _ in range(expected):
            await client.answer(bound=30.0)
        if closes:
            if not await client.closed_by_server(bound=30.0):
                raise AssertionError("not closed after a limit was broken")
            client.close()
            return None, expected
    finally:
        await writing
    return client, expected


async def fuzz(
    path: Path,
    pid: int,
    *,
    requests: int,
    seed: int,
    connections: int,
    time_limit: float,
    report: Report,
) -> None:
    rng = random.Random(seed)
    weights = [w for w, _ in GENERATORS]
    makers = [g for _, g in GENERATORS]
    deadline = time.monotonic() + time_limit
    sent = 0
    invisibles: list[str] = []

    async def worker(index: int) -> None:
        nonlocal sent
        client: RawClient | None = None
        while sent < requests and time.monotonic() < deadline and len(report.failures) < 20:
            sent += 1
            data = rng.choices(makers, weights)[0](rng)
            report.bytes_sent += len(data)
            try:
                client, answered = await _run_case(path, client, data, invisibles)
                report.answers += answered
                report.closes += client is None
            except (AssertionError, MalformedResponse, EOFError, TimeoutError, OSError) as exc:
                report.failures.append(f"case {sent}: {type(exc).__name__}: {exc!s:.300}"[:400])
                if client is not None:
                    client.close()
                client = None
            report.requests += 1
            if report.requests % 5000 == 0:
                report.rss_peak_mb = max(report.rss_peak_mb, rss_bytes(pid) / MB)
        if client is not None:
            client.close()

    await asyncio.gather(*(worker(i) for i in range(connections)))
    report.invisible_answers = len(invisibles)
    report.invisible_examples = invisibles[:3]


async def warm_up_and_check(path: Path) -> bool:
    """Valid requests, answered correctly (also the first RSS baseline's load)."""
    client = await Client.connect(path)
    try:
        for _ in range(50):
            answer = await client.ask(request(ip=GOOD_IP), bound=30.0)
            if answer != header("Pass", "a@pass.example", GOOD_IP):
                return False
        return True
    finally:
        await client.close()


def run(args: argparse.Namespace) -> Report:
    report = Report(rss_limit_mb=args.rss_limit_mb)
    with tempfile.TemporaryDirectory(prefix="spfpolicy-fuzz-") as tmp:
        work = Path(tmp)
        zone = work / "zone.yaml"
        zone.write_text(ZONE_YAML)
        conf = write_conf(
            work / "spfpolicy.conf",
            {"debugLevel": "0", "Log_Target": "stderr", "Lookup_Time": "5", "DNS_Timeout": "2"},
        )
        path = work / "fuzz.sock"
        log_path = work / "server.log"
        with (
            DnsServerProcess(zone) as dns,
            SpfpolicyServer(conf, f"unix:{path}", dns.nameserver, log_path=log_path) as server,
        ):
            if not asyncio.run(warm_up_and_check(path)):
                report.failures.append("warm-up: a valid request was answered wrongly")
            report.rss_before_mb = rss_bytes(server.pid) / MB
            started = time.monotonic()
            asyncio.run(
                fuzz(
                    path,
                    server.pid,
                    requests=args.requests,
                    seed=args.seed,
                    connections=args.connections,
                    time_limit=args.time_limit,
                    report=report,
                )
            )
            report.seconds = round(time.monotonic() - started, 1)
            report.final_answer_ok = asyncio.run(warm_up_and_check(path))
            report.rss_after_mb = rss_bytes(server.pid) / MB
            report.rss_peak_mb = max(report.rss_peak_mb, report.rss_after_mb)
            log = server.log()
        summarize_tracebacks(log, report)
        if args.save_log is not None:
            args.save_log.write_text(log)
    if report.requests < args.requests:
        report.failures.append(f"only {report.requests} of {args.requests} cases in time")
    for name in ("rss_before_mb", "rss_after_mb", "rss_peak_mb"):
        setattr(report, name, round(getattr(report, name), 1))
    return report


def summarize_tracebacks(log: str, report: Report) -> None:
    """Count the server's logged exceptions by their final line (type and message)."""
    kinds: dict[str, int] = {}
    chunks = log.split("Traceback (most recent call last):")[1:]
    for chunk in chunks:
        lines = [line for line in chunk.splitlines() if line and not line.startswith(" ")]
        last = lines[0] if lines else "?"
        kind = last.split(":", 1)[0] + ": " + last.split(":", 1)[-1].strip()[:80]
        kinds[kind] = kinds.get(kind, 0) + 1
    report.tracebacks = len(chunks)
    report.traceback_kinds = dict(sorted(kinds.items(), key=lambda kv: -kv[1]))
    if chunks:
        report.traceback_example = chunks[0][:3000]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000, help="cases to send")
    parser.add_argument("--seed", type=int, default=7208)
    parser.add_argument("--connections", type=int, default=16, help="concurrent clients")
    parser.add_argument("--time-limit", type=float, default=1800.0, help="seconds at most")
    parser.add_argument(
        "--rss-limit-mb", type=float, default=150.0, help="server RSS allowed at the end"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--save-log", type=Path, help="copy the server's log here")
    parser.add_argument(
        "--allow-known-bugs",
        action="store_true",
        help="exit 0 despite server tracebacks or Unicode invisibles in answers (else 3)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    report = run(args)
    if args.json:
        print(json.dumps(asdict(report) | {"ok": report.ok, "clean": report.clean}))
    else:
        for key, value in asdict(report).items():
            if key not in ("failures", "traceback_example"):
                print(f"{key}: {value}")
        for failure in report.failures:
            print(f"FAILURE: {failure}")
        if report.traceback_example:
            print(f"first server traceback:{report.traceback_example}")
        print(
            "CLEAN" if report.clean else "OK (known-bug classes above)" if report.ok else "FAILED"
        )
    if not report.ok:
        return 1
    return 0 if report.clean or args.allow_known_bugs else 3


if __name__ == "__main__":
    sys.exit(main())
