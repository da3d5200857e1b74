"""Cache_File: the DNS cache written on a clean stop and read back at start.

The format's pure part (``encode``/``decode``) is tested on its own, with a
table of answers of every kind the resolver keeps and with any bytes at all;
the file's part (atomic 0600 write, refusals, a fake wall clock for expiry)
through ``PolicyServer.save_cache``/``restore_cache``; and the whole through
a real ``spfpolicy serve`` stopped with SIGTERM and started again, which must
answer a domain it knew without asking the loopback DNS server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import shutil
import signal
import stat
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processes import ask, child, connect_when_listening
from spfpolicy import cachefile
from spfpolicy.cachefile import CacheFileError, Entry, decode, encode
from spfpolicy.config import Settings
from spfpolicy.resolver import DnsAnswer
from spfpolicy.server import PolicyServer

LIMIT = cachefile.size_limit(1000)

ENTRIES = [
    Entry("pass.example", "TXT", ((b"v=spf1 ip4:192.0.2.0/24 -all",),), 300, 1300.0),
    Entry("split.example", "TXT", ((b"v=spf1 ", b"-all"), (b"other",)), 60, 1060.5),
    Entry("a.example", "A", ("192.0.2.1", "192.0.2.2"), 300, 1200.0),
    Entry("aaaa.example", "AAAA", ("2001:db8::1",), 300, 1200.0),
    Entry("mx.example", "MX", ((10, "mx1.example"), (20, "mx2.example")), 3600, 4600.0),
    Entry("1.2.0.192.in-addr.arpa", "PTR", ("host.example",), 86400, 87400.0),
    Entry("nx.example", "A", (), 300, 1100.0),  # negative answers too
    Entry("b\\ s.exämple", "TXT", (), 300, 1100.0),  # what a macro can expand to
]


# -- the format --------------------------------------------------------------------


@pytest.mark.parametrize("entry", [pytest.param(e, id=f"{e.qtype}-{e.name}") for e in ENTRIES])
def test_every_kind_of_answer_round_trips(entry: Entry) -> None:
    data, count = encode([entry], now=1000.0, limit=LIMIT)
    assert count == 1
    written, entries = decode(data, limit=LIMIT)
    assert written == 1000.0
    [back] = list(entries)
    assert back == entry
    assert type(back.ttl) is int  # whole seconds come back as the resolver made them


def test_entries_come_back_in_their_order() -> None:
    data, count = encode(ENTRIES, now=1000.0, limit=LIMIT)
    assert count == len(ENTRIES)
    assert list(decode(data, limit=LIMIT)[1]) == ENTRIES


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param(Entry("c.example", "CNAME", ("x.example",), 60, 1.0), id="unknown-type"),
        pytest.param(Entry("a.example", "A", (object(),), 60, 1.0), id="not-a-str"),
        pytest.param(Entry("mx.example", "MX", ((70000, "mx"),), 60, 1.0), id="mx-preference"),
        pytest.param(Entry("t.example", "TXT", (("text",),), 60, 1.0), id="txt-not-bytes"),
        pytest.param(Entry("x" * 2000, "A", (), 60, 1.0), id="long-name"),
        pytest.param(Entry("a.example", "A", (), 2.0**40, 1.0), id="huge-ttl"),
        pytest.param(Entry("a.example", "A", (), 60, float("inf")), id="no-expiry"),
    ],
)
def test_what_the_file_cannot_hold_is_left_out(entry: Entry) -> None:
    data, count = encode([ENTRIES[0], entry], now=0.0, limit=LIMIT)
    assert count == 1
    assert list(decode(data, limit=LIMIT)[1]) == [ENTRIES[0]]


def test_past_the_size_limit_the_oldest_entries_are_left_out() -> None:
    entries = [Entry(f"d{i}.example", "A", ("192.0.2.1",), 60, 100.0) for i in range(100)]
    whole, _ = encode(entries, now=0.0, limit=LIMIT)
    data, count = encode(entries, now=0.0, limit=len(whole) // 2)
    assert 40 < count < 50
    assert len(data) <= len(whole) // 2
    assert list(decode(data, limit=LIMIT)[1]) == entries[-count:]


DATA = encode(ENTRIES, now=1000.0, limit=LIMIT)[0]


def damaged(data: bytes) -> list[Any]:
    header = len(cachefile.MAGIC) + 16
    cases = [
        ("empty", b""),
        ("garbage", os.urandom(len(data))),
        ("foreign", b"\x80\x04\x95" + data[3:]),  # a pickle's opening, say
        ("text", b"# spfpolicy.conf\nCache_File = /var/lib/spfpolicy/cache\n"),
        ("header-only", data[:header]),
        ("truncated", data[:-1]),
        ("half", data[: len(data) // 2]),
        ("extended", data + b"\0"),
        ("bit-flip", data[:-10] + bytes([data[-10] ^ 1]) + data[-9:]),
        (
            "newer-version",
            data[: len(cachefile.MAGIC)] + b"\x02" + data[len(cachefile.MAGIC) + 1 :],
        ),
    ]
    return [pytest.param(bad, id=what) for what, bad in cases]


@pytest.mark.parametrize("bad", damaged(DATA))
def test_damaged_or_foreign_data_is_refused(bad: bytes) -> None:
    with pytest.raises(CacheFileError):
        list(decode(bad, limit=LIMIT)[1])


def test_a_file_over_the_limit_is_refused_before_it_is_read() -> None:
    data, _ = encode(ENTRIES, now=1000.0, limit=LIMIT)
    with pytest.raises(CacheFileError, match="larger than"):
        decode(data, limit=len(data) - 1)


def test_a_valid_checksum_does_not_make_bad_content_acceptable() -> None:
    # A file crafted with a right CRC but an entry that is not an answer.
    data, _ = encode([Entry("a.example", "A", ("192.0.2.1",), 60, 1.0)], now=0.0, limit=LIMIT)
    body = data[: -cachefile._TRAILER.size].replace(b"192.0.2.1", b"not-an-ip")
    crafted = body + cachefile._TRAILER.pack(cachefile.zlib.crc32(body))
    with pytest.raises(CacheFileError, match="address"):
        list(decode(crafted, limit=LIMIT)[1])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_any_bytes_decode_or_raise_the_formats_own_error(data: bytes) -> None:
    with contextlib.suppress(CacheFileError):
        list(decode(data, limit=LIMIT)[1])


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_change_to_a_valid_file_is_caught(draw: st.DataObject) -> None:
    data, _ = encode(ENTRIES, now=1000.0, limit=LIMIT)
    at = draw.draw(st.integers(0, len(data) - 1))
    flip = draw.draw(st.integers(1, 255))
    bad = data[:at] + bytes([data[at] ^ flip]) + data[at + 1 :]
    with pytest.raises(CacheFileError):
        list(decode(bad, limit=LIMIT)[1])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.builds(
            Entry,
            name=st.text(max_size=60),
            qtype=st.just("TXT"),
            records=st.lists(st.lists(st.binary(max_size=300), max_size=3).map(tuple)).map(tuple),
            ttl=st.integers(0, cachefile.MAX_TTL),
            expires=st.floats(allow_nan=False, allow_infinity=False),
        ),
        max_size=20,
    )
)
def test_encode_then_decode_gives_the_entries_back(entries: list[Entry]) -> None:
    data, count = encode(entries, now=0.0, limit=10**7)
    assert count == len(entries)
    assert list(decode(data, limit=10**7)[1]) == entries


# -- the file, through the server ---------------------------------------------------

KNOWN = [
    (("pass.example", "TXT"), DnsAnswer(((b"v=spf1 ip4:192.0.2.0/24 -all",),), 300)),
    (("a.example", "A"), DnsAnswer(("192.0.2.1",), 60)),
    (("mx.example", "MX"), DnsAnswer(((10, "mx.example"),), 3600)),
    (("nx.example", "AAAA"), DnsAnswer((), 30)),
]


def make_server(path: Path | str, **changes: Any) -> PolicyServer:
    return PolicyServer(Settings(cache_file=str(path), **changes))


def filled(path: Path, **changes: Any) -> PolicyServer:
    server = make_server(path, **changes)
    for key, answer in KNOWN:
        server.resolver.cache.set(key, answer, answer.ttl)
    return server


def cached(server: PolicyServer) -> dict[tuple[str, str], tuple[Any, ...]]:
    return {(name, qtype): a.records for name, qtype, a in server.resolver.cache.answers()}


def test_round_trip_keeps_the_time_entries_had_left(tmp_path: Path) -> None:
    path = tmp_path / "cache"
    assert filled(path).save_cache(wall=lambda: 1000.0) == len(KNOWN)
    # 40 s later by the wall clock (the monotonic one has started over).
    server = make_server(path)
    assert server.restore_cache(wall=lambda: 1040.0) == 3
    assert cached(server) == {key: a.records for key, a in KNOWN if a.ttl > 40}
    left = server.resolver.cache.remaining_ttl(("pass.example", "TXT"))
    assert left is not None and 259 < left <= 260
    assert server.resolver.cache.get(("pass.example", "TXT")) == KNOWN[0][1]


def test_expired_entries_are_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "cache"
    filled(path).save_cache(wall=lambda: 1000.0)
    server = make_server(path)
    with caplog.at_level(logging.INFO, logger="spfpolicy.server"):
        assert server.restore_cache(wall=lambda: 1000.0 + 301) == 1
    assert list(cached(server)) == [("mx.example", "MX")]
    assert "1 answers read" in caplog.text and "(3 expired)" in caplog.text


def test_entries_already_expired_in_memory_are_not_written(tmp_path: Path) -> None:
    path = tmp_path / "cache"
    now = [0.0]
    server = make_server(path)
    server.resolver.cache._clock = lambda: now[0]
    server.resolver.clock = lambda: now[0]
    server.resolver.cache.set(("old.example", "A"), DnsAnswer(("192.0.2.1",), 10), 10)
    server.resolver.cache.set(("new.example", "A"), DnsAnswer(("192.0.2.2",), 100), 100)
    now[0] = 50.0
    assert server.save_cache(wall=lambda: 1000.0) == 1


def test_a_wall_clock_set_back_does_not_lengthen_an_entry(tmp_path: Path) -> None:
    path = tmp_path / "cache"
    filled(path).save_cache(wall=lambda: 1000.0)
    server = make_server(path)
    server.restore_cache(wall=lambda: 1000.0 - 86400)
    left = server.resolver.cache.remaining_ttl(("a.example", "A"))
    assert left is not None and left <= 60


def test_a_lowered_dns_max_ttl_applies_to_what_is_read(tmp_path: Path) -> None:
    path = tmp_path / "cache"
    filled(path).save_cache(wall=lambda: 1000.0)
    server = make_server(path, dns_max_ttl=100)
    server.restore_cache(wall=lambda: 1000.0)
    left = server.resolver.cache.remaining_ttl(("mx.example", "MX"))
    assert left is not None and left <= 100


def test_a_smaller_cache_keeps_the_most_recently_used(tmp_path: Path) -> None:
    path = tmp_path / "cache"
    filled(path).save_cache(wall=lambda: 1000.0)
    server = make_server(path, dns_cache_size=2)
    assert server.restore_cache(wall=lambda: 1000.0) == 2
    assert list(cached(server)) == [key for key, _ in KNOWN[-2:]]


def test_the_file_is_mode_0600_and_replaced_by_a_rename(tmp_path: Path) -> None:
    path = tmp_path / "cache"
    filled(path).save_cache()
    before = path.stat()
    assert stat.S_IMODE(before.st_mode) == 0o600
    with path.open("rb") as old:  # a reader of the old file keeps reading it whole
        content = old.read()
        old.seek(0)
        assert filled(path).save_cache() == len(KNOWN)
        assert old.read() == content
    after = path.stat()
    assert after.st_ino != before.st_ino  # a new file, renamed over the old one
    assert stat.S_IMODE(after.st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no temporary left


def test_a_failed_write_keeps_the_old_file_and_is_only_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "cache"
    filled(path).save_cache()
    content = path.read_bytes()

    def full_disk(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cachefile.os, "replace", full_disk)
    server = make_server(path)
    with caplog.at_level(logging.ERROR, logger="spfpolicy.server"):
        assert server.save_cache() == 0
    assert "No space left on device" in caplog.text
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


async def test_stop_writes_the_file_and_survives_a_directory_that_is_gone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "cache"
    server = filled(path)
    await server.stop(grace=0.1)
    assert path.exists()
    server = filled(tmp_path / "gone" / "cache")
    with caplog.at_level(logging.ERROR, logger="spfpolicy.server"):
        await server.stop(grace=0.1)  # does not raise
    assert "DNS cache not written" in caplog.text


async def test_a_failed_start_does_not_replace_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cache"
    filled(path).save_cache()
    content = path.read_bytes()
    server = make_server(path)
    await server.close()  # what start() does when it fails
    assert path.read_bytes() == content


def other_owner(path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the file to another user")
    nobody = pwd.getpwnam("nobody")
    os.chown(path, nobody.pw_uid, nobody.pw_gid)


def symlink(path: Path) -> None:
    target = path.with_name("elsewhere")
    path.rename(target)
    path.symlink_to(target)


def fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path, 0o600)


def directory(path: Path) -> None:
    path.unlink()
    path.mkdir(mode=0o700)


def too_big(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\0" * cachefile.size_limit(len(KNOWN)))


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        pytest.param(lambda p: p.write_bytes(b""), "not a spfpolicy cache file", id="empty"),
        pytest.param(lambda p: p.write_bytes(os.urandom(4096)), "not a spfpolicy", id="garbage"),
        pytest.param(lambda p: p.write_bytes(p.read_bytes()[:-7]), "checksum", id="truncated"),
        pytest.param(
            lambda p: p.write_bytes(p.read_bytes().replace(b"pass.example", b"pass.exampla")),
            "checksum",
            id="damaged",
        ),
        pytest.param(
            lambda p: p.write_bytes(p.read_bytes()[:20] + b"\x07" + p.read_bytes()[21:]),
            "format version 7",
            id="other-version",
        ),
        pytest.param(lambda p: p.chmod(0o602), "writable by group or others", id="world-writable"),
        pytest.param(lambda p: p.chmod(0o620), "writable by group or others", id="group-writable"),
        pytest.param(other_owner, "owned by uid", id="other-owner"),
        pytest.param(symlink, "symbolic link", id="symlink"),
        pytest.param(fifo, "not a regular file", id="fifo"),
        pytest.param(directory, "not a regular file", id="directory"),
        pytest.param(too_big, "larger than", id="too-big"),
    ],
)
async def test_a_file_that_cannot_be_trusted_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, spoil: Any, reason: str
) -> None:
    path = tmp_path / "cache"
    filled(path).save_cache()
    spoil(path)
    server = make_server(path, dns_cache_size=len(KNOWN))
    with caplog.at_level(logging.WARNING, logger="spfpolicy.server"):
        async with asyncio.timeout(5):  # a FIFO must not hang the start
            assert server.restore_cache() == 0
    assert len(server.resolver.cache) == 0
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert f"Cache_File {path} ignored" in warning.getMessage()
    assert reason in warning.getMessage()
    assert "starting with an empty DNS cache" in warning.getMessage()


def test_no_file_yet_is_a_cold_start_without_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = make_server(tmp_path / "cache")
    with caplog.at_level(logging.WARNING):
        assert server.restore_cache() == 0
    assert not caplog.records


def test_without_cache_file_nothing_is_read_or_written(tmp_path: Path) -> None:
    server = PolicyServer(Settings())
    server.resolver.cache.set(("a.example", "A"), DnsAnswer(("192.0.2.1",), 60), 60)
    assert server.save_cache() == 0
    assert server.restore_cache() == 0


# -- a restart of the real process --------------------------------------------------

ZONE: dict[str, Any] = {"pass.example": [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}]}
FAIL_PREFIX = "550 5.7.23 Message rejected due to: SPF fail - not authorized."


def request(instance: str) -> dict[str, str]:
    return {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "client_address": "198.51.100.1",
        "helo_name": "mx.client.example",
        "sender": "a@pass.example",
        "recipient": "user@rcpt.example",
        "instance": instance,
    }


async def ask_once(socket_path: Path, proc: asyncio.subprocess.Process, instance: str) -> str:
    reader, writer = await connect_when_listening(socket_path, proc)
    try:
        return await ask(reader, writer, request(instance))
    finally:
        writer.close()


async def stop(proc: asyncio.subprocess.Process) -> str:
    proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(20):
        assert await proc.wait() == 0
    assert proc.stderr is not None
    return (await proc.stderr.read()).decode()


@pytest.mark.slow
async def test_a_restart_with_cache_file_answers_a_known_domain_without_dns(
    zone_server: Any, tmp_path: Path
) -> None:
    dns = await zone_server(ZONE)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    cache = state / "cache"
    conf = tmp_path / "spf.conf"
    # Result_Cache_TTL 0: the answer must come from the DNS cache the file
    # filled, not from a result cache (which is not kept anyway).
    conf.write_text(f"Log_Target = stderr\nCache_File = {cache}\nResult_Cache_TTL = 0\n")
    sock = tmp_path / "policy.sock"
    argv = ["-c", str(conf), "--nameserver", dns.nameserver, "--listen", f"unix:{sock}"]

    async with child(["serve", *argv]) as first:
        assert (await ask_once(sock, first, "i.1")).startswith(FAIL_PREFIX)
        assert dns.queries >= 1
        log = await stop(first)
    assert "answers written to" in log, log
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600

    dns.reset_counts()
    async with child(["serve", *argv]) as second:
        assert (await ask_once(sock, second, "i.2")).startswith(FAIL_PREFIX)
        assert dns.queries == 0
        log = await stop(second)
    assert "answers read from" in log, log

    # The control: the same start without Cache_File asks DNS.
    conf.write_text("Log_Target = stderr\nResult_Cache_TTL = 0\n")
    async with child(["serve", *argv]) as cold:
        assert (await ask_once(sock, cold, "i.3")).startswith(FAIL_PREFIX)
        assert dns.queries >= 1
        await stop(cold)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start as root")
async def test_started_as_root_the_file_is_the_unprivileged_users(
    zone_server: Any, tmp_path: Path
) -> None:
    # Written at stop and read at start by the User the server switched to:
    # the file is that user's, so the next start accepts it.
    nobody = pwd.getpwnam("nobody")
    dns = await zone_server(ZONE)
    state = Path(tempfile.mkdtemp(prefix="spfpolicy-state-"))  # outside root's 0700 tmp
    try:
        os.chown(state, nobody.pw_uid, nobody.pw_gid)
        cache = state / "cache"
        conf = tmp_path / "spf.conf"
        conf.write_text(
            f"Log_Target = stderr\nUser = nobody\nCache_File = {cache}\nResult_Cache_TTL = 0\n"
        )
        sock = tmp_path / "policy.sock"
        argv = ["-c", str(conf), "--nameserver", dns.nameserver, "--listen", f"unix:{sock}"]
        async with child(["serve", *argv]) as first:
            assert (await ask_once(sock, first, "i.1")).startswith(FAIL_PREFIX)
            await stop(first)
        assert cache.stat().st_uid == nobody.pw_uid
        assert stat.S_IMODE(cache.stat().st_mode) == 0o600
        dns.reset_counts()
        async with child(["serve", *argv]) as second:
            assert (await ask_once(sock, second, "i.2")).startswith(FAIL_PREFIX)
            assert dns.queries == 0
            log = await stop(second)
        assert "answers read from" in log, log
    finally:
        shutil.rmtree(state)
