"""``spfpolicy bench``: the load generator and its reports.

C emulated smtpd processes each hold one policy connection and send up to
``max_use`` requests on it (full RCPT attribute sets, several recipients per
message) before reconnecting, as Postfix does. Requests come from a seeded
workload (``workloads.py``, ``zone.py``) whose zone the bench serves itself on loopback DNS
with an emulated round trip, so every answer can be checked against the
result the zone implies. Targets run one after another against the same
DNS and workload: spfpolicy (its own process), the bare DUNNO server, an
existing socket, and a stdin/stdout program spawned per connection the way
spawn(8) runs policyd-spf.

Processes: this one generates load; the DNS server and each target run in
their own, so the load generator's CPU is not charged to them and peak RSS
and CPU time are read per target from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import itertools
import json
import os
import re
import resource
import shlex
import shutil
import signal
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from spfpolicy import eventloop
from spfpolicy.address import HostPort
from spfpolicy.bench.workloads import Message, Request, Workload, WorkloadKind, parse_mix
from spfpolicy.bench.zone import DEFAULT_MIX
from spfpolicy.protocol import ProtocolError, ResponseParser

__all__ = ["BenchConfig", "add_arguments", "classify", "run", "run_bench"]

READ_SIZE = 65536
START_TIMEOUT = 30.0  # a server process or the DNS server becoming ready
STOP_TIMEOUT = 15.0
PREFILL = 200_000  # requests generated before the clock starts
RSS_SAMPLE_INTERVAL = 0.1
CONNECT_RETRY_DELAY = 0.1  # after a refused connect (full listen backlog, ...)
JSON_SCHEMA_VERSION = 1

# The policyd-spf.conf the bench gives spfpolicy (and the baseline when its
# command has a {conf} placeholder): Debian's defaults, logging to stderr.
BENCH_CONF = """\
debugLevel = 1
TestOnly = 1
HELO_reject = Fail
Mail_From_reject = Fail
PermError_reject = False
TempError_Defer = False
skip_addresses = 127.0.0.0/8,::ffff:127.0.0.0/104,::1
"""
SPFPOLICY_EXTRA_CONF = "Log_Target = stderr\n"


# ------------------------------------------------------------------ answers

_RECEIVED_SPF = re.compile(r"Received-SPF: (\w+)", re.IGNORECASE)
_AR_SPF = re.compile(r"\bspf=(\w+)", re.IGNORECASE)


def classify(action: str) -> tuple[str, str | None]:
    """An answer -> (kind of action, SPF result word it carries or None).

    Kinds: reject, defer, prepend, dunno, other. A reject's result comes from
    its enhanced status code (5.7.23 fail, 5.7.24 permerror), a defer is a
    temperror, a header carries its own word.
    """
    head = action.split(" ", 1)[0].lower()
    if head == "dunno":
        return "dunno", None
    if head == "prepend":
        match = _RECEIVED_SPF.search(action) or _AR_SPF.search(action)
        return "prepend", match.group(1).lower() if match else None
    if head in ("550", "554", "reject", "5.7.1") or head.startswith("5"):
        if "5.7.24" in action:
            return "reject", "permerror"
        return "reject", "fail"
    if head.startswith("defer") or head.startswith("4"):
        return "defer", "temperror"
    return "other", None


# ------------------------------------------------------------------ results


@dataclass
class TargetResult:
    name: str
    kind: str
    requests: int = 0
    messages: int = 0
    elapsed: float = 0.0
    latencies: array = field(default_factory=lambda: array("d"))
    errors: int = 0  # requests that failed (connection lost, protocol error)
    connect_errors: int = 0  # refused connects, retried like smtpd does
    timeouts: int = 0
    error_examples: list[str] = field(default_factory=list)
    actions: Counter[str] = field(default_factory=Counter)
    results: Counter[str] = field(default_factory=Counter)
    expected: Counter[str] = field(default_factory=Counter)
    contradictions: int = 0
    contradiction_pairs: Counter[str] = field(default_factory=Counter)  # "expected->got"
    unclassified: int = 0
    contradiction_examples: list[dict[str, str]] = field(default_factory=list)
    connections: int = 0
    dns_queries: int | None = None
    peak_rss: int | None = None  # bytes
    cpu_seconds: float | None = None
    processes: int | None = None
    loadgen_cpu_seconds: float = 0.0
    dns_cpu_seconds: float | None = None
    critical_paths: array = field(default_factory=lambda: array("B"))
    # smtpd waiting (the sum of latencies) on messages whose expected result
    # is temperror, and their requests: what a dead domain costs the MTA.
    temperror_wait: float = 0.0
    temperror_requests: int = 0
    cold_rtts: int = 0  # summed over the messages answered (Message.cold_rtts)
    cold_messages: int = 0  # messages whose first request waits for a lookup
    concurrency: int = 0
    dns_delay: float | None = None  # the round trip its lookups wait; None: not known
    notes: list[str] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed if self.elapsed > 0 else 0.0

    def count_message(self, message: Message, cycle: int) -> None:
        """Its first request was answered. ``cycle`` > 0: a later pass over the
        same messages, whose names the first pass left cached."""
        self.critical_paths.append(min(message.critical_path, 255))
        if message.cold_rtts and not cycle:
            self.cold_rtts += message.cold_rtts
            self.cold_messages += 1

    @property
    def dns_bound_rps(self) -> float | None:
        """The requests/s no server can beat: a name new to the stream cannot
        be looked up before its message is sent, so C connections, each
        waiting in turn for its messages' uncached round trips, need at least
        cold_rtts x delay / C seconds for the requests answered."""
        if not self.dns_delay or not self.cold_rtts:
            return None
        return self.concurrency * self.requests / (self.cold_rtts * self.dns_delay)

    def summary(self) -> dict[str, Any]:
        values = sorted(self.latencies)

        def pct(q: float) -> float | None:
            if not values:
                return None
            return values[min(len(values) - 1, max(0, int(q / 100 * len(values) + 0.5) - 1))]

        paths = sorted(self.critical_paths)
        ceiling = self.dns_bound_rps
        return {
            "name": self.name,
            "kind": self.kind,
            "requests": self.requests,
            "messages": self.messages,
            "elapsed_s": round(self.elapsed, 3),
            "requests_per_s": round(self.rps, 1),
            "latency_ms": {
                "p50": _ms(pct(50)),
                "p90": _ms(pct(90)),
                "p99": _ms(pct(99)),
                "max": _ms(values[-1] if values else None),
                "mean": _ms(sum(values) / len(values) if values else None),
            },
            "errors": self.errors,
            "connect_errors": self.connect_errors,
            "timeouts": self.timeouts,
            "error_examples": self.error_examples,
            "actions": dict(self.actions),
            "results": dict(self.results),
            "expected_results": dict(self.expected),
            "contradictions": self.contradictions,
            "contradiction_pairs": dict(self.contradiction_pairs),
            "unclassified": self.unclassified,
            "contradiction_examples": self.contradiction_examples,
            "connections": self.connections,
            "processes": self.processes,
            "dns_queries": self.dns_queries,
            "peak_rss_bytes": self.peak_rss,
            "cpu_s": None if self.cpu_seconds is None else round(self.cpu_seconds, 3),
            "cpu_us_per_request": None
            if self.cpu_seconds is None or not self.requests
            else round(self.cpu_seconds / self.requests * 1e6, 1),
            "loadgen_cpu_s": round(self.loadgen_cpu_seconds, 3),
            "dns_server_cpu_s": None
            if self.dns_cpu_seconds is None
            else round(self.dns_cpu_seconds, 3),
            "critical_path_rtts_p50": paths[len(paths) // 2] if paths else None,
            "temperror_wait_s": round(self.temperror_wait, 3),
            "temperror_requests": self.temperror_requests,
            "cold_messages": self.cold_messages,
            "cold_rtts": self.cold_rtts,
            "dns_bound_requests_per_s": None if ceiling is None else round(ceiling, 1),
            "notes": self.notes,
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


# ------------------------------------------------------------------ /proc


def _proc_status(pid: int, key: str) -> int | None:
    """A ``kB`` line of /proc/PID/status, in bytes (VmHWM, VmRSS)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _proc_cpu(pid: int) -> float | None:
    """utime + stime of a live process, seconds."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ------------------------------------------------------------------ connections


class Connection:
    """One policy client connection: a socket, or a spawned program's pipes."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        process: asyncio.subprocess.Process | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.process = process
        self.parser = ResponseParser()

    async def exchange(self, data: bytes) -> str:
        self.writer.write(data)
        parser = self.parser
        while True:
            action = parser.next_response()
            if action is not None:
                return action
            chunk = await self.reader.read(READ_SIZE)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            parser.feed(chunk)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


class Target:
    """Something to send the workload to; subclasses start and stop it."""

    kind = "target"
    checks_answers = True  # compare answers with the zone's expected results
    uses_bench_dns = True  # its lookups wait for the bench's DNS server (the ceiling)

    def __init__(self, name: str) -> None:
        self.name = name

    async def start(self, bench: Bench) -> None:
        pass

    async def connect(self) -> Connection:
        raise NotImplementedError

    async def release(self, connection: Connection) -> None:
        await connection.close()

    def mark(self) -> None:
        """What is measured starts now (after a warm-up): CPU counts from here."""

    async def stop(self, result: TargetResult) -> None:
        pass


class SocketTarget(Target):
    kind = "connect"
    uses_bench_dns = False  # started elsewhere: its resolver is not known

    def __init__(self, name: str, address: str) -> None:
        super().__init__(name)
        self.address = address

    async def connect(self) -> Connection:
        family, _, where = self.address.partition(":")
        if family == "unix":
            reader, writer = await asyncio.open_unix_connection(where, limit=READ_SIZE)
        else:
            inet = HostPort.parse(where)
            reader, writer = await asyncio.open_connection(inet.host, inet.port, limit=READ_SIZE)
        return Connection(reader, writer)


class ServerProcessTarget(SocketTarget):
    """A policy server started for this run in its own process on a unix socket."""

    uses_bench_dns = True

    def __init__(self, name: str, kind: str, argv_for: Any) -> None:
        super().__init__(name, "")
        self.kind = kind
        self._argv_for = argv_for
        self.process: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None
        self._cpu_before = 0.0

    async def start(self, bench: Bench) -> None:
        path = bench.workdir / f"{self.kind}.sock"
        self.address = f"unix:{path}"
        argv = self._argv_for(bench, self.address)
        self._log = open(bench.workdir / f"{self.kind}.log", "wb")  # noqa: SIM115
        self.process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=self._log, stderr=self._log
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.returncode is not None:
                raise BenchError(
                    f"{self.name} exited at start ({self.process.returncode}): "
                    + _tail(bench.workdir / f"{self.kind}.log")
                )
            try:
                connection = await self.connect()
            except OSError:
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.name} did not start listening") from None
                await asyncio.sleep(0.05)
                continue
            await connection.close()
            return

    def mark(self) -> None:
        if self.process is not None:
            self._cpu_before = _proc_cpu(self.process.pid) or 0.0

    async def stop(self, result: TargetResult) -> None:
        process = self.process
        if process is None:
            return
        result.peak_rss = _proc_status(process.pid, "VmHWM")
        cpu = _proc_cpu(process.pid)
        result.cpu_seconds = None if cpu is None else cpu - self._cpu_before
        result.processes = 1
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
            except TimeoutError:
                process.kill()
                await process.wait()
        if self._log is not None:
            self._log.close()


def _spfpolicy_argv(bench: Bench, address: str) -> list[str]:
    argv = [sys.executable, "-m", "spfpolicy", "serve", "-c", str(bench.spfpolicy_conf)]
    return [*argv, "--listen", address, "--nameserver", bench.nameserver]


def _spfpolicy_nohold_argv(bench: Bench, address: str) -> list[str]:
    """spfpolicy with the slow-domain hold-down off, to compare with it on."""
    conf = bench.workdir / "spfpolicy-nohold.conf"
    conf.write_text(bench.spfpolicy_conf.read_text() + "\nSlow_Domain_Threshold = 0\n")
    argv = [sys.executable, "-m", "spfpolicy", "serve", "-c", str(conf)]
    return [*argv, "--listen", address, "--nameserver", bench.nameserver]


def _spfpolicy_shared_argv(bench: Bench, address: str) -> list[str]:
    """spfpolicy with Shared_Cache on the bench's Redis."""
    conf = bench.workdir / "spfpolicy-shared.conf"
    conf.write_text(bench.spfpolicy_conf.read_text() + f"\nShared_Cache = {bench.redis.url}\n")
    argv = [sys.executable, "-m", "spfpolicy", "serve", "-c", str(conf)]
    return [*argv, "--listen", address, "--nameserver", bench.nameserver]


def _shared_targets(config: BenchConfig) -> list[Target]:
    """--shared-cache: with the unique workload, two "MX hosts" sharing one
    Redis, the second over the messages (domains) the first saw; with zipf
    or hot, spfpolicy without the shared level, then with it on an empty
    Redis (its own entries are all in its first level: every Redis lookup
    misses, the cost of the shared level at a hit rate of 0)."""
    if config.connect or config.baseline_cmd:
        raise BenchError("--shared-cache runs its own two targets: no --connect or --baseline-cmd")
    if config.workload is WorkloadKind.UNIQUE:
        return [
            ServerProcessTarget("first-mx", "spfpolicy-first", _spfpolicy_shared_argv),
            ServerProcessTarget("second-mx", "spfpolicy-second", _spfpolicy_shared_argv),
        ]
    return [
        ServerProcessTarget("spfpolicy", "spfpolicy", _spfpolicy_argv),
        ServerProcessTarget("shared-on", "spfpolicy-shared", _spfpolicy_shared_argv),
    ]


def _bare_argv(bench: Bench, address: str) -> list[str]:
    return [sys.executable, "-m", "spfpolicy.bench.bare", "--listen", address]


class SpawnTarget(Target):
    """A stdin/stdout policy program, one fresh process per connection (spawn(8))."""

    kind = "baseline"

    def __init__(self, name: str, command: str) -> None:
        super().__init__(name)
        self.command = command
        self.argv: list[str] = []
        self._live: dict[int, asyncio.subprocess.Process] = {}
        self._sampler: asyncio.Task[None] | None = None
        self._stderr: IO[bytes] | None = None
        self.peak_rss = 0
        self.processes = 0
        self._children_cpu_before = 0.0

    async def start(self, bench: Bench) -> None:
        self.argv = baseline_argv(self.command, bench.nameserver, bench.baseline_conf)
        self._stderr = open(bench.workdir / "baseline.stderr", "wb")  # noqa: SIM115
        self._stderr_path = bench.workdir / "baseline.stderr"
        self.mark()
        self._sampler = asyncio.create_task(self._sample_rss())

    def mark(self) -> None:
        # The warm-up's processes have all exited (and been waited for) by now.
        self._children_cpu_before = _children_cpu()
        self.processes = len(self._live)

    async def connect(self) -> Connection:
        process = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=self._stderr,
            limit=READ_SIZE,
        )
        assert process.stdin is not None and process.stdout is not None
        self.processes += 1
        self._live[process.pid] = process
        return Connection(process.stdout, process.stdin, process)

    async def release(self, connection: Connection) -> None:
        process = connection.process
        assert process is not None
        # Postfix closes the connection; the program sees EOF on stdin and exits.
        await connection.close()
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
        except TimeoutError:
            process.kill()
            await process.wait()
        self._live.pop(process.pid, None)

    async def _sample_rss(self) -> None:
        # Peak of the summed RSS of the processes alive at the same moment.
        while True:
            total = 0
            for pid in list(self._live):
                total += _proc_status(pid, "VmRSS") or 0
            self.peak_rss = max(self.peak_rss, total)
            await asyncio.sleep(RSS_SAMPLE_INTERVAL)

    async def stop(self, result: TargetResult) -> None:
        for process in list(self._live.values()):
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        self._live.clear()
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        if self._stderr is not None:
            self._stderr.close()
            tail = _tail(self._stderr_path, 600)
            if tail:
                result.notes.append(f"stderr of the baseline processes ends with: {tail}")
        result.peak_rss = self.peak_rss
        result.processes = self.processes
        result.cpu_seconds = _children_cpu() - self._children_cpu_before


def launcher_path() -> Path:
    return Path(__file__).with_name("pyspf_launcher.py")


def baseline_argv(command: str, nameserver: str, conf: Path | None) -> list[str]:
    """The argv that runs ``--baseline-cmd`` against the bench's DNS.

    ``{dns}`` in the command becomes HOST:PORT of the bench's DNS server and
    ``{conf}`` the bench's policyd-spf.conf; such a command is run as is. A
    command without ``{dns}`` that runs a Python program (a script with a
    python shebang, like /usr/bin/policyd-spf, or ``python3 SCRIPT``) is
    wrapped with ``pyspf_launcher.py`` under the program's own interpreter, so
    pyspf resolves through the bench's DNS.
    """
    text = command.replace("{conf}", shlex.quote(str(conf)) if conf else "{conf}")
    if "{dns}" in text:
        return shlex.split(text.replace("{dns}", nameserver))
    argv = shlex.split(text)
    if not argv:
        raise BenchError("--baseline-cmd is empty")
    program = shutil.which(argv[0]) or argv[0]
    launcher = [str(launcher_path()), "--dns", nameserver, "--"]
    if Path(program).name.startswith("python"):
        return [program, *launcher, *argv[1:]]
    interpreter = _python_shebang(program)
    if interpreter is None:
        raise BenchError(
            f"cannot point {argv[0]} at the bench's DNS: it is not a Python program. "
            "Put {dns} (HOST:PORT of the bench's DNS server) in --baseline-cmd where the "
            "program takes its nameserver."
        )
    return [*interpreter, *launcher, program, *argv[1:]]


def _python_shebang(program: str) -> list[str] | None:
    try:
        with open(program, "rb") as script:
            first = script.readline(256)
    except OSError:
        return None
    if not first.startswith(b"#!") or b"python" not in first:
        return None
    words = first[2:].decode("utf-8", "replace").split()
    if words and Path(words[0]).name == "env":
        words = words[1:]
    return words or None


def _tail(path: Path, limit: int = 400) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return text[-limit:].strip()


class BenchError(Exception):
    """The bench cannot run as asked; the message says why."""


# ------------------------------------------------------------------ DNS process


class DnsProcess:
    """``python -m spfpolicy.bench.zone`` with its stdin control channel."""

    def __init__(self, seed: int, delay: float, *, drop: bool = False) -> None:
        self.seed = seed
        self.delay = delay
        self.drop = drop
        self.process: asyncio.subprocess.Process | None = None
        self.nameserver = ""

    async def start(self) -> None:
        argv = [sys.executable, "-m", "spfpolicy.bench.zone", "--control"]
        argv += ["--seed", str(self.seed), "--delay", str(self.delay)]
        if self.drop:
            argv.append("--drop")
        self.process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        self.nameserver = (await self._line()).strip()
        if not self.nameserver:
            raise BenchError("the bench's DNS server did not start")

    async def _line(self) -> str:
        assert self.process is not None and self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), START_TIMEOUT)
        return line.decode()

    async def command(self, word: str) -> int:
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(word.encode() + b"\n")
        return int(json.loads(await self._line())["queries"])

    def cpu(self) -> float | None:
        return _proc_cpu(self.process.pid) if self.process is not None else None

    async def stop(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        assert process.stdin is not None
        process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
        except TimeoutError:
            process.kill()
            await process.wait()


# ------------------------------------------------------------------ the run


@dataclass
class BenchConfig:
    workload: WorkloadKind = WorkloadKind.ZIPF
    seed: int = 1
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    concurrency: int = 100
    max_use: int = 100
    requests: int = 50_000
    duration: float = 60.0
    warmup: int = 0  # requests sent first to each target, not counted
    dns_delay: float = 0.02
    timeout: float = 30.0
    targets: list[str] = field(default_factory=lambda: ["spfpolicy"])
    connect: str | None = None
    dns: str | None = None
    baseline_cmd: str | None = None
    baseline_name: str = "baseline"
    server_config: str | None = None
    domains: int = 20_000
    hot_tuples: int = 10
    progress: bool | None = None  # None: when stderr is a terminal
    json_path: str | None = None
    plot_path: str | None = None
    drop_temperror: bool = False  # the temperror domains drop queries (dead nameservers)
    shared_cache: bool = False  # one Redis, two spfpolicy targets (see _shared_targets)


class MessageSource:
    """The workload's messages for one target, pre-generated before the clock.

    zipf and hot cycle through the pre-generated messages; each pass appends
    its number to ``instance`` so no message repeats. unique generates more
    as needed (every one a new domain).
    """

    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        self.workload = Workload(
            kind=config.workload,
            seed=config.seed,
            mix=config.mix,
            domains=config.domains,
            hot_tuples=config.hot_tuples,
        )
        self._stream = self.workload.messages()
        budget = config.warmup + config.requests if config.requests > 0 else PREFILL
        self.messages: list[Message] = []
        count = 0
        while count < min(budget, PREFILL):
            message = next(self._stream)
            self.messages.append(message)
            count += len(message.requests)

    def iterate(self) -> Iterator[tuple[Message, int]]:
        if self.config.workload is WorkloadKind.UNIQUE:
            for message in itertools.chain(self.messages, self._stream):
                yield message, 0
            return
        for cycle in itertools.count():
            for message in self.messages:
                yield message, cycle


def _request_bytes(request: Request, cycle: int) -> bytes:
    if not cycle:
        return request.data
    # Another pass over the same messages: a distinct instance per pass.
    marker = b"\ninstance="
    start = request.data.index(marker) + len(marker)
    end = request.data.index(b"\n", start)
    return request.data[:end] + b".%d" % cycle + request.data[end:]


class Bench:
    def __init__(self, config: BenchConfig, workdir: Path) -> None:
        self.config = config
        self.workdir = workdir
        self.nameserver = ""
        self.dns: DnsProcess | None = None
        conf = BENCH_CONF
        self.baseline_conf = workdir / "policyd-spf.conf"
        self.baseline_conf.write_text(conf)
        if config.server_config:
            self.spfpolicy_conf = Path(config.server_config)
        else:
            self.spfpolicy_conf = workdir / "spfpolicy.conf"
            self.spfpolicy_conf.write_text(conf + SPFPOLICY_EXTRA_CONF)
        self.source = MessageSource(config)
        self.redis: Any = None  # redisserver.RedisProcess, with --shared-cache

    async def run_target(self, target: Target, requests: int | None = None) -> TargetResult:
        """Run the workload against ``target``: config.requests of them, or ``requests``."""
        config = self.config
        requests = config.requests if requests is None else requests
        result = TargetResult(target.name, target.kind, concurrency=config.concurrency)
        if self.dns is not None and target.uses_bench_dns:
            # Only the bench's own DNS server has a known round trip.
            result.dns_delay = config.dns_delay
        await target.start(self)
        messages = self.source.iterate()
        try:
            if config.warmup:
                await self._warm_up(target, messages, result)
                target.mark()
            if self.dns is not None:
                await self.dns.command("reset")
            dns_cpu_before = self.dns.cpu() if self.dns is not None else None
            cpu_before = _self_cpu()
            progress = _Progress(
                target.name,
                config.requests or None,
                config.duration,
                result,
                config.progress,
            )
            try:
                progress.start()
                await self._drive(target, messages, result, requests, config.duration)
            finally:
                progress.stop()
                result.loadgen_cpu_seconds = _self_cpu() - cpu_before
                if self.dns is not None:
                    result.dns_queries = await self.dns.command("stats")
                    after = self.dns.cpu()
                    if after is not None and dns_cpu_before is not None:
                        result.dns_cpu_seconds = after - dns_cpu_before
        finally:
            await target.stop(result)
        return result

    async def _warm_up(
        self, target: Target, messages: Iterator[tuple[Message, int]], result: TargetResult
    ) -> None:
        """The first ``--warmup`` requests of the stream, answered but not
        counted: the measured ones then meet the caches a server that has run
        for a while would have. Bounded by --duration too."""
        config = self.config
        warm = TargetResult(target.name, target.kind)
        await self._drive(target, messages, warm, config.warmup, config.duration)
        note = f"warm-up: {warm.requests} requests in {warm.elapsed:.1f} s, not counted"
        trouble = warm.errors + warm.timeouts + warm.contradictions
        if trouble:
            note += f" ({trouble} errors, timeouts or contradictions among them)"
        result.notes.append(note)

    async def _drive(
        self,
        target: Target,
        messages: Iterator[tuple[Message, int]],
        result: TargetResult,
        requests: int,
        duration: float,
    ) -> None:
        """C emulated smtpd processes send messages from ``messages`` until
        ``requests`` (0: no bound) or ``duration`` seconds (0: none)."""
        config = self.config
        budget = requests if requests > 0 else None
        issued = 0
        started = time.perf_counter()
        deadline = started + duration if duration > 0 else None
        timeout = config.timeout

        def next_message() -> tuple[Message, int] | None:
            nonlocal issued
            if budget is not None and issued >= budget:
                return None
            if deadline is not None and time.perf_counter() >= deadline:
                return None
            message, cycle = next(messages)
            issued += len(message.requests)
            return message, cycle

        latencies = result.latencies
        clock = time.perf_counter
        check_answers = target.checks_answers

        async def smtpd() -> None:
            while True:
                item = next_message()
                if item is None:
                    return
                connection = None
                while connection is None:
                    try:
                        connection = await target.connect()
                    except OSError as exc:
                        # Like smtpd: the message waits and the connect is retried.
                        result.connect_errors += 1
                        if len(result.error_examples) < 5:
                            result.error_examples.append(f"connect: {exc}")
                        if deadline is not None and time.perf_counter() >= deadline:
                            return
                        await asyncio.sleep(CONNECT_RETRY_DELAY)
                result.connections += 1
                used = 0
                try:
                    while item is not None:
                        message, cycle = item
                        result.messages += 1
                        first_kind = ""
                        for request in message.requests:
                            data = _request_bytes(request, cycle)
                            sent = clock()
                            try:
                                async with asyncio.timeout(timeout):
                                    action = await connection.exchange(data)
                            except TimeoutError:
                                result.timeouts += 1
                                raise _Broken from None
                            except (OSError, ProtocolError) as exc:
                                _error(result, f"{type(exc).__name__}: {exc}")
                                raise _Broken from None
                            took = clock() - sent
                            latencies.append(took)
                            result.requests += 1
                            if message.requests[0].expected == "temperror":
                                result.temperror_wait += took
                                result.temperror_requests += 1
                            if check_answers:
                                first_kind = _check(result, request, action, first_kind)
                            else:
                                result.actions[classify(action)[0]] += 1
                            if request.first:
                                result.count_message(message, cycle)
                        used += len(message.requests)
                        item = next_message() if used < config.max_use else None
                except _Broken:
                    pass
                finally:
                    await target.release(connection)

        try:
            await asyncio.gather(*(smtpd() for _ in range(config.concurrency)))
        finally:
            result.elapsed = time.perf_counter() - started


class _Broken(Exception):
    """The connection cannot go on (timeout, error): reconnect."""


def _error(result: TargetResult, text: str) -> None:
    result.errors += 1
    if len(result.error_examples) < 5:
        result.error_examples.append(text)


def _check(result: TargetResult, request: Request, action: str, first_kind: str) -> str:
    """Count the answer and compare it with the zone's result; the first answer's kind."""
    kind, word = classify(action)
    result.actions[kind] += 1
    if request.first:
        result.expected[request.expected] += 1
        if word is None:
            result.results["(none)"] += 1
            result.unclassified += 1
            _contradiction(result, request, action, counted=False)
        else:
            result.results[word] += 1
            if word != request.expected:
                result.contradictions += 1
                result.contradiction_pairs[f"{request.expected}->{word}"] += 1
                _contradiction(result, request, action, counted=True)
        return kind
    # Later recipients of a message: the first answer's reject again, or DUNNO
    # after a header (policyd-spf prepends once per message).
    consistent = kind == first_kind if first_kind in ("reject", "defer") else kind == "dunno"
    if not consistent:
        result.contradictions += 1
        result.contradiction_pairs[f"{first_kind}->{kind} (later recipient)"] += 1
        _contradiction(result, request, action, counted=True)
    return first_kind


def _contradiction(result: TargetResult, request: Request, action: str, *, counted: bool) -> None:
    if len(result.contradiction_examples) >= 5:
        return
    text = request.data.decode("utf-8", "replace")
    fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    result.contradiction_examples.append(
        {
            "expected": request.expected,
            "first_recipient": str(request.first),
            "client_address": fields.get("client_address", ""),
            "helo_name": fields.get("helo_name", ""),
            "sender": fields.get("sender", ""),
            "action": action[:300],
            "counted_as": "contradiction" if counted else "unclassified",
        }
    )


class _Progress:
    """A one-line progress bar on stderr, only when it is a terminal."""

    def __init__(
        self,
        name: str,
        budget: int | None,
        duration: float,
        result: TargetResult,
        enabled: bool | None,
    ) -> None:
        self.name = name
        self.budget = budget
        self.duration = duration
        self.result = result
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._task: asyncio.Task[None] | None = None
        self._started = 0.0

    def start(self) -> None:
        if self.enabled:
            self._started = time.perf_counter()
            self._task = asyncio.create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()

    async def _run(self) -> None:
        width = 30
        while True:
            await asyncio.sleep(0.5)
            elapsed = time.perf_counter() - self._started
            done = self.result.requests
            fractions = [elapsed / self.duration] if self.duration > 0 else []
            if self.budget:
                fractions.append(done / self.budget)
            fraction = min(1.0, max(fractions, default=0.0))
            bar = "#" * int(fraction * width)
            rate = done / elapsed if elapsed > 0 else 0.0
            sys.stderr.write(
                f"\r{self.name:<12} [{bar:<{width}}] {done} requests, {rate:,.0f}/s, "
                f"{self.result.errors + self.result.timeouts} errors, {elapsed:.0f}s\033[K"
            )
            sys.stderr.flush()


def _targets(config: BenchConfig) -> list[Target]:
    if config.shared_cache:
        return _shared_targets(config)
    targets: list[Target] = []
    if config.connect:
        _check_loopback(config.connect)
        targets.append(SocketTarget(config.connect, config.connect))
    for name in config.targets:
        if name == "spfpolicy":
            targets.append(ServerProcessTarget("spfpolicy", "spfpolicy", _spfpolicy_argv))
        elif name == "spfpolicy-nohold":
            targets.append(
                ServerProcessTarget("spfpolicy-nohold", "spfpolicy-nohold", _spfpolicy_nohold_argv)
            )
        elif name == "bare":
            bare = ServerProcessTarget("bare", "bare", _bare_argv)
            bare.checks_answers = False  # DUNNO by design
            bare.uses_bench_dns = False  # and no lookups
            targets.append(bare)
        else:
            raise BenchError(
                f"unknown target {name!r}: expected spfpolicy, spfpolicy-nohold or bare"
            )
    if config.baseline_cmd:
        targets.append(SpawnTarget(config.baseline_name, config.baseline_cmd))
    if not targets:
        raise BenchError("nothing to run: give --target, --connect or --baseline-cmd")
    return targets


def _check_loopback(address: str) -> None:
    family, _, where = address.partition(":")
    if family == "unix" and where:
        return
    if family == "inet":
        try:
            host = HostPort.parse(where).host
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if loopback:
            return
        raise BenchError(f"--connect {address}: the bench only talks to loopback addresses")
    raise BenchError(f"--connect {address}: expected unix:PATH or inet:HOST:PORT")


async def run(config: BenchConfig) -> dict[str, Any]:
    """Run every target; the report as a JSON-able dict."""
    targets = _targets(config)
    with tempfile.TemporaryDirectory(prefix="spfpolicy-bench-") as tmp:
        bench = Bench(config, Path(tmp))
        dns = None
        if config.dns:
            bench.nameserver = config.dns
        else:
            dns = DnsProcess(config.seed, config.dns_delay, drop=config.drop_temperror)
            await dns.start()
            bench.dns = dns
            bench.nameserver = dns.nameserver
        results: list[TargetResult] = []
        shared: dict[str, Any] | None = None
        try:
            if config.shared_cache:
                shared = await _run_shared(bench, targets, results)
            else:
                for target in targets:
                    results.append(await bench.run_target(target))
        finally:
            if dns is not None:
                await dns.stop()
            if bench.redis is not None:
                await asyncio.to_thread(bench.redis.stop)
    data = report(config, bench, results)
    if shared is not None:
        data["shared_cache"] = _shared_report(config, data["targets"], shared)
    return data


async def _run_shared(
    bench: Bench, targets: list[Target], results: list[TargetResult]
) -> dict[str, Any]:
    """--shared-cache: start one Redis, run both targets against it (the
    second bounded by the requests the first answered, so it meets only the
    domains the first saw); Redis's own hit and miss counts per target."""
    from spfpolicy.bench.redisserver import RedisProcess, RedisUnavailable

    bench.redis = RedisProcess(bench.workdir / "redis")
    try:
        await asyncio.to_thread(bench.redis.start)
    except RedisUnavailable as exc:
        raise BenchError(str(exc)) from None
    keyspace: dict[str, Any] = {}
    empty = await asyncio.to_thread(bench.redis.command, "INFO", "memory")
    for target in targets:
        before = await asyncio.to_thread(bench.redis.command, "INFO", "stats")
        requests = results[0].requests if results and results[0].requests else None
        results.append(await bench.run_target(target, requests))
        after = await asyncio.to_thread(bench.redis.command, "INFO", "stats")
        keyspace[target.name] = {
            key: int(after[key]) - int(before[key]) for key in ("keyspace_hits", "keyspace_misses")
        }
    memory = await asyncio.to_thread(bench.redis.command, "INFO", "memory")
    keys = await asyncio.to_thread(bench.redis.command, "DBSIZE")
    return {
        "redis": keyspace,
        "keys": int(keys),
        # What the entries take: Redis's used_memory above that of the empty server.
        "used_memory": int(memory["used_memory"]) - int(empty["used_memory"]),
    }


def _shared_report(
    config: BenchConfig, targets: list[dict[str, Any]], shared: dict[str, Any]
) -> dict[str, Any]:
    """The issue's targets: on unique, the second MX host's p50 and DNS
    queries per request at most 1/10 of the first's; on zipf, throughput
    with the shared level at hit rate 0 at least 85 % of without."""
    first, second = targets[0], targets[1]

    def per_request(t: dict[str, Any]) -> float | None:
        queries, requests = t["dns_queries"], t["requests"]
        return None if queries is None or not requests else queries / requests

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or not b else round(a / b, 4)

    out = dict(shared)
    if config.workload is WorkloadKind.UNIQUE:
        out["p50_second_over_first"] = ratio(
            second["latency_ms"]["p50"], first["latency_ms"]["p50"]
        )
        out["dns_queries_per_request"] = {
            first["name"]: per_request(first),
            second["name"]: per_request(second),
        }
        out["dns_queries_per_request_second_over_first"] = ratio(
            per_request(second), per_request(first)
        )
    else:
        out["requests_per_s_on_over_off"] = ratio(second["requests_per_s"], first["requests_per_s"])
    if out["keys"]:
        out["bytes_per_key"] = round(out["used_memory"] / out["keys"])
    return out


def report(config: BenchConfig, bench: Bench, results: list[TargetResult]) -> dict[str, Any]:
    summaries = [r.summary() for r in results]
    ratios = []
    if len(results) > 1:
        first = summaries[0]
        for other in summaries[1:]:
            ratios.append(_ratios(first, other))
    workload = bench.source.workload
    return {
        "schema": JSON_SCHEMA_VERSION,
        "config": {
            "workload": config.workload.value,
            "seed": config.seed,
            "mix": {k: v for k, v in config.mix.items() if v},
            "concurrency": config.concurrency,
            "max_use": config.max_use,
            "requests": config.requests,
            "duration_s": config.duration,
            "warmup_requests": config.warmup,
            "dns_delay_s": config.dns_delay,
            "drop_temperror": config.drop_temperror,
            "timeout_s": config.timeout,
            "domains": workload.domains,
            "hot_tuples": workload.hot_tuples,
            "nameserver": bench.nameserver,
            "baseline_cmd": config.baseline_cmd,
            "cpus": os.cpu_count(),
        },
        "targets": summaries,
        "ratios": ratios,
        "raw": results,  # dropped from JSON; kept for the plot
    }


def _ratios(first: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    def ratio(a: float | None, b: float | None) -> float | None:
        if a is None or b is None or not b:
            return None
        return round(a / b, 3)

    return {
        "target": first["name"],
        "versus": other["name"],
        "requests_per_s": ratio(first["requests_per_s"], other["requests_per_s"]),
        "p50": ratio(first["latency_ms"]["p50"], other["latency_ms"]["p50"]),
        "p99": ratio(first["latency_ms"]["p99"], other["latency_ms"]["p99"]),
        "peak_rss": ratio(first["peak_rss_bytes"], other["peak_rss_bytes"]),
    }


# ------------------------------------------------------------------ output


def format_report(data: dict[str, Any]) -> str:
    c = data["config"]
    mix = ", ".join(f"{k} {v:g}" for k, v in c["mix"].items())
    lines = [
        f"workload {c['workload']} (seed {c['seed']}; {mix}), {c['concurrency']} connections, "
        f"max_use {c['max_use']}, DNS delay {c['dns_delay_s'] * 1000:g} ms, "
        f"bounds {c['requests'] or 'no'} requests / {c['duration_s']:g} s, {c['cpus']} CPUs"
        + (
            f", after {c['warmup_requests']:,} warm-up requests" if c.get("warmup_requests") else ""
        ),
        "",
        f"{'target':<14}{'requests':>9}{'req/s':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
        f"{'max ms':>10}{'err':>6}{'t/o':>5}{'contra':>7}{'DNS q':>9}{'RSS MB':>9}"
        f"{'CPU s':>7}{'CPU us/req':>11}",
    ]
    for t in data["targets"]:
        lat = t["latency_ms"]
        rss = t["peak_rss_bytes"]
        lines.append(
            f"{t['name'][:13]:<14}{t['requests']:>9}{t['requests_per_s']:>9,.0f}"
            f"{_num(lat['p50'], 1):>9}{_num(lat['p90'], 1):>9}{_num(lat['p99'], 1):>9}"
            f"{_num(lat['max'], 0):>10}{t['errors']:>6}{t['timeouts']:>5}{t['contradictions']:>7}"
            f"{_num(t['dns_queries'], 0):>9}{_num(rss / 2**20 if rss else None, 1):>9}"
            f"{_num(t['cpu_s'], 1):>7}{_num(t['cpu_us_per_request'], 0):>11}"
        )
    lines.append("")
    for t in data["targets"]:
        actions = ", ".join(f"{k} {v}" for k, v in sorted(t["actions"].items()))
        results = ", ".join(f"{k} {v}" for k, v in sorted(t["results"].items()))
        lines.append(f"{t['name']}: actions: {actions}")
        lines.append(f"{' ' * len(t['name'])}  results (first recipients): {results}")
        extra = [f"{t['connections']} connections"]
        if t["connect_errors"]:
            extra.append(f"{t['connect_errors']} refused connects (retried)")
        if t["processes"] is not None and t["kind"] == "baseline":
            extra.append(f"{t['processes']} processes")
        if t["contradiction_pairs"]:
            pairs = ", ".join(f"{k} {v}" for k, v in sorted(t["contradiction_pairs"].items()))
            extra.append(f"contradictions (expected->answered): {pairs}")
        if t["unclassified"]:
            extra.append(f"{t['unclassified']} answers without an SPF result")
        extra.append(f"load generator CPU {t['loadgen_cpu_s']:.1f} s")
        if t["dns_server_cpu_s"] is not None:
            extra.append(f"DNS server CPU {t['dns_server_cpu_s']:.1f} s")
        if t["temperror_requests"]:
            extra.append(
                f"smtpd waiting on temperror messages {t['temperror_wait_s']:,.1f} s "
                f"over {t['temperror_requests']:,} requests"
                + (" (their queries dropped)" if c.get("drop_temperror") else "")
            )
        if t["critical_path_rtts_p50"] is not None and c["workload"] == "unique":
            extra.append(f"critical path p50 {t['critical_path_rtts_p50']} RTTs")
        if t["dns_bound_requests_per_s"] is not None:
            extra.append(
                f"DNS-bound ceiling {t['dns_bound_requests_per_s']:,.0f} req/s "
                f"({t['cold_messages']:,} of {t['messages']:,} messages wait for "
                "uncached lookups)"
            )
        lines.append(f"{' ' * len(t['name'])}  " + ", ".join(extra))
        for example in t["contradiction_examples"][:3]:
            lines.append(f"{' ' * len(t['name'])}  contradiction: {example}")
        for example in t["error_examples"][:3]:
            lines.append(f"{' ' * len(t['name'])}  error: {example}")
        for note in t["notes"]:
            lines.append(f"{' ' * len(t['name'])}  note: {note}")
    for r in data["ratios"]:
        parts = [f"req/s {_x(r['requests_per_s'])}"]
        if r["p50"]:
            parts.append(f"p50 {_x(r['p50'])}")
        if r["p99"]:
            parts.append(f"p99 {_x(r['p99'])}")
        if r["peak_rss"]:
            parts.append(f"peak RSS {_x(r['peak_rss'])}")
        lines.append(f"{r['target']} / {r['versus']}: " + ", ".join(parts))
    shared = data.get("shared_cache")
    if shared:
        redis = ", ".join(
            f"{name} {v['keyspace_hits']:,} hits / {v['keyspace_misses']:,} misses"
            for name, v in shared["redis"].items()
        )
        lines.append(
            f"shared cache (Redis): {redis}; {shared['keys']:,} keys, "
            f"{shared['used_memory'] / 2**20:.1f} MB"
            + (f", {shared['bytes_per_key']} B per key" if shared.get("bytes_per_key") else "")
        )
        if "p50_second_over_first" in shared:
            per = shared["dns_queries_per_request"]
            lines.append(
                f"second MX host / first: p50 {_x(shared['p50_second_over_first'])} "
                f"(target <= 0.1), DNS queries per request "
                + " vs ".join(f"{name} {_num(v, 3)}" for name, v in per.items())
                + f" = {_x(shared['dns_queries_per_request_second_over_first'])} (target <= 0.1)"
            )
        if "requests_per_s_on_over_off" in shared:
            lines.append(
                f"shared level on (hit rate 0) / off: req/s "
                f"{_x(shared['requests_per_s_on_over_off'])} (target >= 0.85)"
            )
    return "\n".join(lines)


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _x(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1 or value <= 0:  # 0: the second host made no DNS query at all
        return f"{value:.2f}x"
    return f"{value:.3f}x (1/{1 / value:.1f})"


def _plotting() -> Any:
    """matplotlib.pyplot on the Agg backend; BenchError when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchError(
            "--plot needs matplotlib: pip install 'spfpolicy[bench]' (or pip install matplotlib)"
        ) from None
    return plt


def write_plot(data: dict[str, Any], path: str) -> None:
    """Latency distribution per target (CDF on a log axis)."""
    plt = _plotting()
    fig, ax = plt.subplots(figsize=(8, 5))
    for result in data["raw"]:
        values = sorted(result.latencies)
        if not values:
            continue
        n = len(values)
        step = max(1, n // 2000)
        xs = [values[i] * 1000 for i in range(0, n, step)] + [values[-1] * 1000]
        ys = [i / n for i in range(0, n, step)] + [1.0]
        ax.plot(xs, ys, label=f"{result.name} ({result.rps:,.0f} req/s)")
    c = data["config"]
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(
        f"spfpolicy bench: {c['workload']}, C={c['concurrency']}, "
        f"DNS delay {c['dns_delay_s'] * 1000:g} ms"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------ command line


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def _mix(text: str) -> dict[str, float]:
    try:
        return parse_mix(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``spfpolicy bench`` options (cli.py builds the subparser)."""
    default_mix = ",".join(f"{k}={v:g}" for k, v in DEFAULT_MIX.items())
    parser.add_argument(
        "-w",
        "--workload",
        choices=[k.value for k in WorkloadKind],
        default="zipf",
        help="zipf: skewed over many domains and clients; unique: every message a new "
        "domain (cold cache); hot: a few tuples (default %(default)s)",
    )
    parser.add_argument(
        "-c",
        "--concurrency",
        type=_positive_int,
        default=100,
        metavar="C",
        help="emulated smtpd processes, one connection each (default 100)",
    )
    parser.add_argument(
        "--max-use",
        type=_positive_int,
        default=100,
        help="requests per connection before reconnecting (default 100)",
    )
    parser.add_argument(
        "-n",
        "--requests",
        type=int,
        default=50_000,
        help="stop after this many requests per target, 0 = no limit (default %(default)s)",
    )
    parser.add_argument(
        "-d",
        "--duration",
        type=float,
        default=60.0,
        help="stop starting messages after this many seconds per target, "
        "0 = no limit (default %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=0,
        metavar="N",
        help="send each target the stream's first N requests before measuring, "
        "uncounted: the steady state of a server that has run a while (default 0)",
    )
    parser.add_argument("--seed", type=int, default=1, help="workload and zone seed")
    parser.add_argument(
        "--mix",
        type=_mix,
        default=dict(DEFAULT_MIX),
        help=f"outcome weights (default {default_mix})",
    )
    parser.add_argument(
        "--domains",
        type=_positive_int,
        default=20_000,
        help="sender domains in the zipf and hot pools (default %(default)s)",
    )
    parser.add_argument(
        "--hot-tuples",
        type=_positive_int,
        default=10,
        help="distinct (client, HELO, sender) tuples of the hot workload",
    )
    parser.add_argument(
        "--dns-delay",
        type=float,
        default=0.02,
        metavar="SECONDS",
        help="emulated DNS round trip (default 0.02)",
    )
    parser.add_argument(
        "--drop-temperror",
        action="store_true",
        help="the temperror share of the mix (--mix temperror=N) drops queries, as a dead "
        "nameserver does, instead of answering SERVFAIL; the report gives the seconds "
        "of smtpd waiting spent on those messages",
    )
    parser.add_argument(
        "--dns",
        metavar="HOST:PORT",
        help="use a running 'python -m spfpolicy.bench.zone' (same --seed) instead of starting one",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="per request; a timed-out connection is dropped (default 30)",
    )
    parser.add_argument(
        "-t",
        "--target",
        action="append",
        choices=["spfpolicy", "spfpolicy-nohold", "bare"],
        help="servers the bench starts itself, in order (repeatable; "
        "default spfpolicy unless --connect is given); spfpolicy-nohold is "
        "spfpolicy with Slow_Domain_Threshold = 0 (no hold-down of slow domains)",
    )
    parser.add_argument(
        "--connect",
        metavar="ADDR",
        help="an already running server: unix:PATH or inet:HOST:PORT "
        "(loopback only); point its DNS at --dns",
    )
    parser.add_argument(
        "--server-config",
        metavar="FILE",
        help="policyd-spf.conf for the spfpolicy target (default: Debian's "
        "defaults, log to stderr)",
    )
    parser.add_argument(
        "--baseline-cmd",
        metavar="CMD",
        help="a stdin/stdout policy program run like spawn(8), one process per "
        "connection, e.g. '/usr/bin/policyd-spf {conf}'; {dns} and {conf} are "
        "replaced by the bench's DNS address and policyd-spf.conf",
    )
    parser.add_argument(
        "--baseline-name",
        default="policyd-spf",
        help="its name in the report (default %(default)s)",
    )
    parser.add_argument("--json", metavar="FILE", help="write the report as JSON")
    parser.add_argument(
        "--plot", metavar="FILE.png", help="latency distribution plot (needs matplotlib)"
    )
    parser.add_argument(
        "--shared-cache",
        action="store_true",
        help="start one redis-server (Debian's, on a unix socket) for two spfpolicy "
        "targets: with --workload unique, two MX hosts sharing it, the second over the "
        "domains the first saw (its p50 and DNS queries per request against the first's); "
        "with zipf or hot, spfpolicy without the shared level, then with it at a Redis hit "
        "rate of 0 (its throughput cost). Needs redis-py (pip install 'spfpolicy[redis]')",
    )
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="progress bar even when stderr is not a terminal",
    )
    progress.add_argument("--no-progress", dest="progress", action="store_false")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    targets = args.target
    if targets is None:
        targets = [] if args.connect else ["spfpolicy"]
    return BenchConfig(
        workload=WorkloadKind(args.workload),
        seed=args.seed,
        mix=args.mix,
        concurrency=args.concurrency,
        max_use=args.max_use,
        requests=max(0, args.requests),
        duration=max(0.0, args.duration),
        warmup=max(0, args.warmup),
        dns_delay=max(0.0, args.dns_delay),
        timeout=args.timeout,
        targets=list(targets),
        connect=args.connect,
        dns=args.dns,
        baseline_cmd=args.baseline_cmd,
        baseline_name=args.baseline_name,
        server_config=args.server_config,
        domains=args.domains,
        hot_tuples=args.hot_tuples,
        progress=args.progress,
        json_path=args.json,
        plot_path=args.plot,
        drop_temperror=args.drop_temperror,
        shared_cache=args.shared_cache,
    )


def run_bench(args: argparse.Namespace) -> int:
    """``spfpolicy bench``: run, print, write --json/--plot; exit status."""
    config = config_from_args(args)
    if config.requests == 0 and config.duration == 0:
        print("spfpolicy bench: give --requests or --duration a limit", file=sys.stderr)
        return 2
    if config.workload is not WorkloadKind.UNIQUE and config.warmup + config.requests > PREFILL:
        # Beyond the pre-generated messages the stream repeats them, all cached.
        print(
            f"spfpolicy bench: --warmup plus --requests above {PREFILL:,} would repeat "
            "the workload's messages",
            file=sys.stderr,
        )
        return 2
    try:
        if config.plot_path:
            _plotting()  # fail before the run, not after it
        data = run_sync(config)
    except BenchError as exc:
        print(f"spfpolicy bench: {exc}", file=sys.stderr)
        return 1
    print(format_report(data), flush=True)
    if config.json_path:
        write_json(data, config.json_path)
    if config.plot_path:
        write_plot(data, config.plot_path)
    return 0


def write_json(data: dict[str, Any], path: str) -> None:
    clean = {k: v for k, v in data.items() if k != "raw"}
    Path(path).write_text(json.dumps(clean, indent=2) + "\n", encoding="utf-8")


def run_sync(config: BenchConfig) -> dict[str, Any]:
    with eventloop.runner() as runner:
        return runner.run(run(config))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spfpolicy bench", description=__doc__)
    add_arguments(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
