"""Listeners (listeners.py): unix sockets bound atomically with their mode and
owner, stale sockets replaced and nothing else, inet beside unix, errors that
name what to change, Max_Connections.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from hardening import GOOD_IP, request
from serving import FAIL, PASS, ZONE, settings_for, unix
from spfpolicy.config import ListenAddress, ListenFamily
from spfpolicy.listeners import ListenError
from spfpolicy.server import PolicyServer


async def test_stale_socket_is_replaced(policy_server: Any, tmp_path: Path) -> None:
    path = tmp_path / "p0.sock"
    crashed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    crashed.bind(str(path))
    crashed.close()  # left behind, as by a crash
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    running = await policy_server()
    assert running.path == path
    client = await running.connect()
    assert await client.ask(request()) == FAIL


async def test_live_socket_is_not_taken_over(policy_server: Any) -> None:
    running = await policy_server()
    second = PolicyServer(running.server.settings)
    with pytest.raises(ListenError, match="another server is listening there"):
        await second.start(running.server.settings.listen)
    client = await running.connect()
    assert await client.ask(request()) == FAIL


async def test_regular_file_at_socket_path_is_kept(zone_server: Any, tmp_path: Path) -> None:
    dns = await zone_server(ZONE)
    path = tmp_path / "p.sock"
    path.write_text("precious\n")
    server = PolicyServer(settings_for(dns, path))
    with pytest.raises(ListenError, match=r"unix:.*p\.sock: it exists and is not a socket"):
        await server.start([unix(path)])
    assert path.read_text() == "precious\n"


async def test_missing_directory_names_the_listen_option(zone_server: Any, tmp_path: Path) -> None:
    dns = await zone_server(ZONE)
    path = tmp_path / "missing" / "p.sock"
    server = PolicyServer(settings_for(dns, path))
    with pytest.raises(ListenError, match="does not exist") as info:
        await server.start([unix(path)])
    assert "--listen" in str(info.value)


@pytest.mark.parametrize(
    ("changes", "mode"),
    [
        pytest.param({}, 0o666, id="default-0666"),
        pytest.param({"socket_mode": 0o660}, 0o660, id="0660"),
        pytest.param({"socket_mode": 0o600}, 0o600, id="0600"),
    ],
)
async def test_socket_mode(policy_server: Any, changes: dict[str, Any], mode: int) -> None:
    running = await policy_server(**changes)
    assert stat.S_IMODE(os.stat(running.path).st_mode) == mode


async def test_socket_owner_and_group(policy_server: Any) -> None:
    # Our own user and group: a chown any user may do.
    user, group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
    running = await policy_server(socket_owner=user, socket_group=group)
    info = os.stat(running.path)
    assert (info.st_uid, info.st_gid) == (os.getuid(), os.getgid())


async def test_unknown_socket_owner_is_a_listen_error(policy_server: Any, tmp_path: Path) -> None:
    with pytest.raises(ListenError, match="no-such-user-spfpolicy"):
        await policy_server(socket_owner="no-such-user-spfpolicy")
    assert not (tmp_path / "p0.sock").exists()


async def test_port_in_use_is_a_listen_error(zone_server: Any, tmp_path: Path) -> None:
    dns = await zone_server(ZONE)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        inet = ListenAddress(ListenFamily.INET, host="127.0.0.1", port=port)
        server = PolicyServer(settings_for(dns, tmp_path / "p.sock"))
        with pytest.raises(ListenError, match=str(port)):
            await server.start([unix(tmp_path / "p.sock"), inet])
    # The unix listener set up before the failure is gone again.
    assert not (tmp_path / "p.sock").exists()


async def test_inet_listener_beside_unix(policy_server: Any, tmp_path: Path, clients: Any) -> None:
    listen = (
        unix(tmp_path / "p0.sock"),
        ListenAddress(ListenFamily.INET, host="127.0.0.1", port=0),
    )
    running = await policy_server(listen=listen)
    (port,) = running.server.inet_ports
    assert port > 0
    over_tcp = await clients(host="127.0.0.1", port=port)
    assert await over_tcp.ask(request(ip=GOOD_IP)) == PASS
    over_unix = await running.connect()
    assert await over_unix.ask(request()) == FAIL


async def test_max_connections(policy_server: Any) -> None:
    running = await policy_server(max_connections=2)
    first, second = await running.connect(), await running.connect()
    # Answers prove both connections are registered before the third one arrives.
    assert await first.ask(request()) == FAIL
    assert await second.ask(request()) == FAIL
    third = await running.connect()
    assert await third.closed_by_server()
    assert await first.ask(request(ip=GOOD_IP)) == PASS
    assert await second.ask(request(ip=GOOD_IP)) == PASS
