"""Command line: ``spfpolicy check`` (one SPF evaluation, for administrators),
``spfpolicy serve`` (the policy server) and ``spfpolicy top`` (a running
server's per-domain table, read from its metrics endpoint).

The parser is built by ``_parser()`` and ``main(argv)`` takes argv, so tests
drive the command line without a subprocess.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from spfpolicy import __version__
from spfpolicy.address import HostPort

if TYPE_CHECKING:
    from spfpolicy.config import Nameserver, Settings


def _nameservers(value: str) -> tuple[Nameserver, ...]:
    from spfpolicy.config import parse_nameservers

    try:
        return parse_nameservers(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {value!r}") from None


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {value!r}")
    return seconds


def _host_port(value: str) -> HostPort:
    try:
        return HostPort.parse(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"not a positive number: {value!r}")
    return int(value)


def _parser(*, with_bench: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spfpolicy", description="Asynchronous SPF policy server for Postfix."
    )
    parser.add_argument("--version", action="version", version=f"spfpolicy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser(
        "check",
        help="evaluate SPF once and print the result",
        description="Evaluate SPF for one client. The first output line is the bare result "
        "keyword (pass, fail, softfail, neutral, none, permerror, temperror).",
    )
    check.add_argument("--ip", required=True, type=_ip, help="SMTP client IP address")
    check.add_argument(
        "--sender",
        required=True,
        help="MAIL FROM address; empty checks postmaster@HELO (RFC 7208 section 2.3)",
    )
    check.add_argument("--helo", required=True, help="HELO/EHLO name")
    _add_common(check)
    check.add_argument(
        "--timeout",
        type=_seconds,
        metavar="SECONDS",
        help="evaluation time limit (default: Lookup_Time from the configuration, 20)",
    )
    check.add_argument(
        "--trace",
        action="store_true",
        help="also show the evaluation as a tree: each DNS lookup (name, type, answer, TTL, "
        "cache or upstream, time), each term tried and its outcome, the lookup and void "
        "counts, and where a limit was hit",
    )
    check.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object instead: result, code, explanation, mechanism, identity, "
        "sender, domain, dns_lookups, upstream_queries, time, settings; with --trace also "
        "lookups, void_lookups, error and steps, a list of objects whose kind is dns, record "
        "or term (the README's check --trace section has their fields)",
    )

    serve = commands.add_parser("serve", help="run the policy server")
    _add_common(serve)
    serve.add_argument(
        "--listen",
        action="append",
        metavar="ADDR",
        help="unix:PATH or inet:HOST:PORT (repeatable; overrides Listen)",
    )
    serve.add_argument(
        "--log-target",
        metavar="TARGET",
        help="syslog, stderr or syslog,stderr (overrides Log_Target; the systemd unit "
        "uses stderr, for the journal)",
    )

    top = commands.add_parser(
        "top",
        help="show a running server's busiest, failing and changed sender domains",
        description="Read /domains from a running server's metrics endpoint (Metrics_Listen) "
        "and print the top domains by volume, the top failing domains and the domains whose "
        "SPF result changed in the last hour.",
    )
    top.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="the server's configuration, for Metrics_Listen (default "
        "/etc/postfix-policyd-spf-python/policyd-spf.conf if present)",
    )
    top.add_argument(
        "--connect",
        type=_host_port,
        metavar="HOST:PORT",
        help="the metrics endpoint (default: Metrics_Listen from the configuration)",
    )
    top.add_argument("-n", type=_positive, default=10, metavar="N", help="rows per table (10)")
    top.add_argument("--json", action="store_true", help="print the JSON document as read")

    bench = commands.add_parser(
        "bench",
        help="load generator: loopback DNS, servers, workloads, reports",
        description="Send Postfix-like policy traffic to spfpolicy, the bare DUNNO server, a "
        "running server or a spawn(8)-style program, against a generated SPF zone on "
        "loopback DNS, and report throughput, latency, correctness, DNS queries and memory.",
    )
    if with_bench:
        # Only `spfpolicy bench` imports the bench package (and its extras).
        from spfpolicy.bench.loadgen import add_arguments as add_bench_arguments

        add_bench_arguments(bench)
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    from spfpolicy.config import DEFAULT_CONFIG_PATH

    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help=f"policyd-spf.conf style configuration (default {DEFAULT_CONFIG_PATH} if present)",
    )
    parser.add_argument(
        "--nameserver",
        action="append",
        type=_nameservers,
        metavar="HOST[:PORT]",
        help="DNS server to ask (repeatable; default: /etc/resolv.conf)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    command = next((word for word in words if not word.startswith("-")), None)
    parser = _parser(with_bench=command == "bench")
    args = parser.parse_args(words)
    if args.command == "bench":
        from spfpolicy.bench.loadgen import run_bench

        return run_bench(args)
    from spfpolicy.config import ConfigError, load_settings

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"spfpolicy: {exc}", file=sys.stderr)
        return 2
    if args.command == "top":
        from spfpolicy.top import run_top

        return run_top(args.connect or settings.metrics_listen, args.n, as_json=args.json)
    if args.command == "check":
        from spfpolicy import eventloop

        with eventloop.runner() as runner:
            return runner.run(_check(args, settings))
    from spfpolicy.config import parse_listen, parse_log_target
    from spfpolicy.lifecycle import run_server

    try:
        listen = [a for spec in args.listen or () for a in parse_listen(spec)]
        nameservers = [n for servers in args.nameserver or () for n in servers]
        log_target = parse_log_target(args.log_target) if args.log_target else None
    except ValueError as exc:
        parser.error(str(exc))
    return run_server(
        settings,
        listen=listen,
        nameservers=nameservers,
        log_target=log_target,
        load=lambda: load_settings(args.config),
    )


async def _check(args: argparse.Namespace, settings: Settings) -> int:
    from spfpolicy.evaluator import SpfEvaluator
    from spfpolicy.resolver import Resolver
    from spfpolicy.trace import Trace, outcome_json

    lookup_time = args.timeout or float(settings.lookup_time)
    nameservers = [n for servers in args.nameserver or () for n in servers]
    nameservers = nameservers or list(settings.nameservers)
    # The server's resolver (Resolver.from_settings, as PolicyServer builds
    # it), so that a trace shows what the server does with the same records.
    resolver = Resolver.from_settings(
        settings, nameservers=nameservers, timeout=min(settings.dns_timeout, lookup_time)
    )
    evaluator = SpfEvaluator(resolver, void_limit=settings.void_limit, lookup_time=lookup_time)
    trace = Trace() if args.trace else None
    started = time.perf_counter()
    try:
        outcome = await evaluator.check(args.ip, args.sender, args.helo, trace=trace)
    finally:
        await resolver.close()
    elapsed = time.perf_counter() - started
    upstream = resolver.stats.upstream_queries
    if args.json:
        import json

        report = {
            **outcome_json(outcome),
            "ip": args.ip,
            "helo": args.helo,
            "dns_lookups": outcome.lookups,
            "upstream_queries": upstream,
            "time": round(elapsed, 6),
            "settings": {
                "void_limit": settings.void_limit,
                "lookup_time": lookup_time,
                "dns_timeout": resolver.timeout,
                "nameservers": [str(n) for n in resolver.nameservers],
            },
        }
        if trace is not None:
            traced = trace.to_json()
            for key in ("lookups", "void_lookups", "error", "steps"):
                report[key] = traced[key]
        print(json.dumps(report, indent=2))
        return 0
    print(outcome.result.value)
    print(f"explanation: {outcome.explanation}")
    print(f"mechanism: {outcome.mechanism or '(none)'}")
    print(f"identity: {outcome.identity.value} ({outcome.sender})")
    print(f"dns lookups: {outcome.lookups} (upstream queries: {upstream})")
    print(f"time: {elapsed:.3f} s")
    if trace is not None:
        servers = ", ".join(str(n) for n in resolver.nameservers) or "/etc/resolv.conf"
        print(
            f"trace: Void_Limit {settings.void_limit}, Lookup_Time {lookup_time:g} s, "
            f"DNS_Timeout {resolver.timeout:g} s, nameservers {servers}"
        )
        for line in trace.lines():
            print(f"  {line}")
    return 0
