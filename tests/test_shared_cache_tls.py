"""rediss://: the shared cache over TLS, against Debian's redis-server with a
TLS port on loopback and a throwaway CA made by the openssl CLI in tmp_path.
A server that trusts the CA shares answers; one that trusts another CA is in
an outage (every answer still given), not crashed.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hardening import GOOD_IP, header, request
from redis_support import shared
from serving import Running, wait_for
from spfpolicy.bench.redisserver import RedisProcess, RedisUnavailable
from spfpolicy.config import Settings
from spfpolicy.lifecycle import StartupError
from spfpolicy.server import PolicyServer

pytestmark = pytest.mark.slow

ZONE: dict[str, Any] = {
    "pass.example": [{"TXT": "v=spf1 a:mail.pass.example -all"}],
    "mail.pass.example": [{"A": GOOD_IP}],
}
for _i in range(20):
    ZONE[f"d{_i}.example"] = [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}]

_SERVER_EXTENSIONS = (
    "basicConstraints=critical,CA:FALSE\n"
    "keyUsage=critical,digitalSignature,keyEncipherment\n"
    "extendedKeyUsage=serverAuth\n"
    "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
    "subjectKeyIdentifier=hash\n"
    "authorityKeyIdentifier=keyid\n"
)


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", key, "-out", cert, "-days", "1", "-subj", f"/CN={name}")  # fmt: skip
    return cert, key


@pytest.fixture
def certificates(tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate it signed for localhost, and another CA."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl CLI")
    ca, ca_key = _ca(tmp_path, "test-ca")
    other_ca, _ = _ca(tmp_path, "other-ca")
    key, csr, cert = tmp_path / "redis.key", tmp_path / "redis.csr", tmp_path / "redis.pem"
    extensions = tmp_path / "server.ext"
    extensions.write_text(_SERVER_EXTENSIONS)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", key, "-out", csr, "-subj", "/CN=localhost")  # fmt: skip
    _openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
             "-out", cert, "-days", "1", "-extfile", extensions)  # fmt: skip
    return {"ca": ca, "other_ca": other_ca, "cert": cert, "key": key}


@pytest.fixture
def tls_redis(tmp_path: Path, certificates: dict[str, Path]) -> Iterator[RedisProcess]:
    server = RedisProcess(
        tmp_path / "redis",
        tls=(certificates["cert"], certificates["key"], certificates["ca"]),
    )
    try:
        server.start()
    except RedisUnavailable as exc:
        pytest.skip(f"redis-server with a TLS port did not start: {exc}")
    yield server
    server.stop()


async def test_rediss_shares_answers(
    tls_redis: RedisProcess,
    certificates: dict[str, Path],
    policy_server: Callable[..., Awaitable[Running]],
) -> None:
    options = {"shared_cache": tls_redis.tls_url, "shared_cache_ca_file": str(certificates["ca"])}
    first = await policy_server(zone=ZONE, **options)
    second = await policy_server(zone=ZONE, **options)
    expected = header("Pass", "a@pass.example", GOOD_IP)
    # A server connects at start (serve does it once privileges are
    # dropped): the TLS handshake is behind it when requests come.
    assert await shared(first).connect() and await shared(second).connect()
    client = await first.connect()
    assert await client.ask(request("a@pass.example", ip=GOOD_IP)) == expected
    cache = shared(first)
    await wait_for(lambda: not cache._pending and cache._flusher is None)
    assert cache.stats.writes > 0 and cache.stats.result_writes > 0
    assert not cache.down

    client = await second.connect()
    assert await client.ask(request("a@pass.example", ip=GOOD_IP)) == expected
    assert second.dns.queries == 0
    assert shared(second).stats.result_hits > 0
    assert not shared(second).down
    # Written through TLS: the entries are in this Redis.
    assert int(tls_redis.command("DBSIZE")) > 0


async def test_a_certificate_of_another_ca_is_an_outage(
    tls_redis: RedisProcess,
    certificates: dict[str, Path],
    policy_server: Callable[..., Awaitable[Running]],
) -> None:
    running = await policy_server(
        zone=ZONE,
        shared_cache=tls_redis.tls_url,
        shared_cache_ca_file=str(certificates["other_ca"]),
    )
    client = await running.connect()
    for i in range(20):
        sender = f"a@d{i}.example"
        assert await client.ask(request(sender, ip=GOOD_IP)) == header("Pass", sender, GOOD_IP)
    cache = shared(running)
    assert running.server.errors == 0
    assert cache.down and cache.stats.outages == 1
    assert cache.stats.hits == 0 and cache.stats.result_hits == 0
    assert int(tls_redis.command("DBSIZE")) == 0


def test_a_ca_file_that_is_not_one_stops_the_start(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    settings = dataclasses.replace(
        Settings(), shared_cache="rediss://localhost:6380/0", shared_cache_ca_file=str(bad)
    )
    with pytest.raises(StartupError, match=r"ca\.pem.*no CA certificate"):
        PolicyServer(settings)
    missing = dataclasses.replace(settings, shared_cache_ca_file=str(tmp_path / "none.pem"))
    with pytest.raises(StartupError, match=r"none\.pem"):
        PolicyServer(missing)
