"""systemd integration for real: the notify protocol read from a datagram
socket the test binds as NOTIFY_SOCKET, listening sockets the test creates
and hands to a real ``python -m spfpolicy serve`` child at fd 3 and up (as
systemd does), and, as root, the switch to an unprivileged user.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from processes import ask, child, connect_when_listening
from spfpolicy import systemd

ZONE: dict[str, Any] = {"pass.example": [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}]}
GOOD_IP, BAD_IP = "192.0.2.10", "198.51.100.1"


def request(ip: str = BAD_IP, sender: str = "a@pass.example") -> dict[str, str]:
    return {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "client_address": ip,
        "helo_name": "mx.client.example",
        "sender": sender,
        "recipient": "user@rcpt.example",
        "instance": f"i.{time.monotonic_ns()}",
    }


# pyspf's wording, as policy.py renders it (see test_server.py).
FAIL_PREFIX = "550 5.7.23 Message rejected due to: SPF fail - not authorized."
PASS_PREFIX = "prepend Received-SPF: Pass (mailfrom)"

# Moves the fds named in SPFTEST_FDS to 3, 4, ... (where sd_listen_fds(3)
# expects them), sets LISTEN_PID to its own pid (exec keeps the pid), and
# execs the server: what systemd does between fork and exec.
LAUNCHER = """
import fcntl, os, sys
fds = [int(fd) for fd in os.environ.pop("SPFTEST_FDS").split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index)
    os.close(fd)
os.environ["LISTEN_FDS"] = str(len(fds))
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-m", "spfpolicy", *sys.argv[1:]])
"""


class NotifySocket:
    """The service manager's end of sd_notify: a bound datagram socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    def drain(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            self.messages.append(fields)

    async def wait_for(
        self, key: str, value: str | None = None, bound: float = 10.0
    ) -> dict[str, str]:
        """The first message (since the last wait) with key (=value)."""
        async with asyncio.timeout(bound):
            while True:
                self.drain()
                for index, message in enumerate(self.messages):
                    if key in message and (value is None or message[key] == value):
                        del self.messages[: index + 1]
                        return message
                await asyncio.sleep(0.01)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify")
    yield sock
    sock.close()


# -- the protocol pieces ---------------------------------------------------------


def test_listen_fds_ignores_variables_meant_for_another_process() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
    assert systemd.listen_fds(env) == []
    assert env == {}  # unset, so that children do not take them for theirs


@pytest.mark.parametrize(
    "env",
    [
        pytest.param({}, id="none"),
        pytest.param({"LISTEN_PID": "x", "LISTEN_FDS": "1"}, id="bad-pid"),
        pytest.param({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}, id="zero"),
    ],
)
def test_listen_fds_without_sockets(env: dict[str, str]) -> None:
    assert systemd.listen_fds(dict(env)) == []


def test_notifier_sends_datagrams(notify_socket: NotifySocket) -> None:
    env = {"NOTIFY_SOCKET": str(notify_socket.path)}
    notifier = systemd.Notifier.from_environment(env)
    assert env == {}
    try:
        assert notifier.enabled
        notifier.ready("3 requests")
        notifier.reloading()
        notifier.stopping()
        notifier.watchdog()
        assert notifier.notify(status="two\nlines")
    finally:
        notifier.close()
    notify_socket.drain()
    ready, reloading, stopping, watchdog, status = notify_socket.messages
    assert ready == {"READY": "1", "STATUS": "3 requests", "MAINPID": str(os.getpid())}
    assert reloading["RELOADING"] == "1"
    # CLOCK_MONOTONIC in microseconds, taken just now.
    assert abs(int(reloading["MONOTONIC_USEC"]) - time.monotonic_ns() // 1000) < 5_000_000
    assert stopping == {"STOPPING": "1"}
    assert watchdog == {"WATCHDOG": "1"}
    assert status == {"STATUS": "two lines"}


def test_notifier_abstract_socket() -> None:
    name = f"spfpolicy-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        notifier = systemd.Notifier.from_environment({"NOTIFY_SOCKET": "@" + name})
        notifier.watchdog()
        notifier.close()
        sock.settimeout(5)
        assert sock.recv(100) == b"WATCHDOG=1"


def test_notifier_without_systemd_is_a_no_op(tmp_path: Path) -> None:
    for env in ({}, {"NOTIFY_SOCKET": "relative"}):
        notifier = systemd.Notifier.from_environment(env)
        assert not notifier.enabled
        assert not notifier.notify(ready=1)
    # A socket that went away: a failed send, not an exception.
    gone = systemd.Notifier.from_environment({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert not gone.notify(ready=1)
    gone.close()


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        pytest.param({}, None, id="unset"),
        pytest.param({"WATCHDOG_USEC": "30000000"}, 15.0, id="half"),
        pytest.param({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None, id="other-pid"),
        pytest.param({"WATCHDOG_USEC": "0"}, None, id="zero"),
        pytest.param({"WATCHDOG_USEC": "soon"}, None, id="junk"),
    ],
)
def test_watchdog_interval(env: dict[str, str], interval: float | None) -> None:
    assert systemd.watchdog_interval(env) == interval


# -- a real child, socket-activated --------------------------------------------------


def listening_unix(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(64)
    return sock


@pytest.mark.slow
async def test_socket_activation_and_notify(
    zone_server: Any, tmp_path: Path, notify_socket: NotifySocket
) -> None:
    dns = await zone_server(ZONE)
    conf = tmp_path / "spf.conf"
    conf.write_text(f"Log_Target = stderr\nListen = unix:{tmp_path}/not-used.sock\n")
    path = tmp_path / "activated.sock"
    unix_sock = listening_unix(path)
    inet_sock = socket.create_server(("127.0.0.1", 0))
    port = inet_sock.getsockname()[1]
    env = {
        "NOTIFY_SOCKET": str(notify_socket.path),
        "LISTEN_FDNAMES": "policy:policy-inet",
        "WATCHDOG_USEC": "200000",  # a ping every 0.1 s
        "SPFTEST_FDS": f"{unix_sock.fileno()},{inet_sock.fileno()}",  # for LAUNCHER
    }
    argv = ["serve", "-c", str(conf), "--nameserver", dns.nameserver]
    fds = (unix_sock.fileno(), inet_sock.fileno())
    async with child(argv, env=env, pass_fds=fds, launcher=LAUNCHER) as proc:
        # The child has its own copies now; ours are not needed to keep them open.
        unix_sock.close()
        inet_sock.close()
        ready = await notify_socket.wait_for("READY", "1")
        assert ready["MAINPID"] == str(proc.pid)
        assert "requests" in ready["STATUS"]
        await notify_socket.wait_for("WATCHDOG", "1", bound=2.0)
        await notify_socket.wait_for("WATCHDOG", "1", bound=2.0)

        reader, writer = await asyncio.open_unix_connection(str(path))
        assert (await ask(reader, writer, request())).startswith(FAIL_PREFIX)
        inet_reader, inet_writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await ask(inet_reader, inet_writer, request(GOOD_IP))).startswith(PASS_PREFIX)
        inet_writer.close()
        assert not (tmp_path / "not-used.sock").exists()

        proc.send_signal(signal.SIGHUP)
        reloading = await notify_socket.wait_for("RELOADING", "1")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        await notify_socket.wait_for("READY", "1")
        # The connection lives through the reload.
        assert (await ask(reader, writer, request())).startswith(FAIL_PREFIX)

        proc.send_signal(signal.SIGTERM)
        await notify_socket.wait_for("STOPPING", "1")
        async with asyncio.timeout(10):
            status = await proc.wait()
        assert proc.stderr is not None
        err = (await proc.stderr.read()).decode()
        writer.close()
    assert status == 0, err
    assert "passed by systemd" in err
    assert "name policy-inet" in err
    # systemd owns the socket file: the server leaves it where it is.
    assert path.exists()


@pytest.mark.slow
async def test_without_systemd_it_creates_its_own_socket(zone_server: Any, tmp_path: Path) -> None:
    dns = await zone_server(ZONE)
    conf = tmp_path / "spf.conf"
    conf.write_text("Log_Target = stderr\n")
    path = tmp_path / "own.sock"
    # LISTEN_* for another pid (ours): not for the child, which must ignore them.
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"}
    argv = ["serve", "-c", str(conf), "--nameserver", dns.nameserver, "--listen", f"unix:{path}"]
    async with child(argv, env=env) as proc:
        async with asyncio.timeout(10):
            while not path.exists():
                assert proc.returncode is None
                await asyncio.sleep(0.02)
        reader, writer = await asyncio.open_unix_connection(str(path))
        assert (await ask(reader, writer, request())).startswith(FAIL_PREFIX)
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await proc.wait() == 0
        writer.close()
    assert not path.exists()


# -- privileges -------------------------------------------------------------------


def proc_ids(pid: int) -> tuple[list[int], list[int], list[int]]:
    """Uid, Gid and Groups lines of /proc/PID/status."""
    fields: dict[str, list[int]] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            fields[key] = [int(v) for v in value.split()]
    return fields["Uid"], fields["Gid"], fields["Groups"]


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start as root")
async def test_root_drops_to_the_configured_user(zone_server: Any, tmp_path: Path) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody")
    dns = await zone_server(ZONE)
    conf = tmp_path / "spf.conf"
    conf.write_text("Log_Target = stderr\nUser = nobody\n")
    path = tmp_path / "root.sock"
    argv = ["serve", "-c", str(conf), "--nameserver", dns.nameserver, "--listen", f"unix:{path}"]
    async with child(argv, env={}) as proc:
        reader, writer = await connect_when_listening(path, proc)
        # It answers once it is ready, after the switch.
        assert (await ask(reader, writer, request())).startswith(FAIL_PREFIX)
        uid, gid, groups = proc_ids(proc.pid)
        assert uid == [nobody.pw_uid] * 4
        assert gid == [nobody.pw_gid] * 4
        assert 0 not in groups
        # The socket was made (and chmod'ed) as root before the switch.
        assert os.stat(path).st_uid == 0
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            status = await proc.wait()
        writer.close()
    assert status == 0


@pytest.mark.slow
async def test_unknown_user_stops_the_start(tmp_path: Path) -> None:
    conf = tmp_path / "spf.conf"
    conf.write_text("Log_Target = stderr\nUser = no-such-user-spfpolicy\n")
    path = tmp_path / "x.sock"
    argv = ["serve", "-c", str(conf), "--nameserver", "127.0.0.1:53", "--listen", f"unix:{path}"]
    async with child(argv, env={}) as proc:
        async with asyncio.timeout(10):
            assert proc.stderr is not None
            err = (await proc.stderr.read()).decode()
            assert await proc.wait() == 1
    assert "no-such-user-spfpolicy" in err
    assert not path.exists()
