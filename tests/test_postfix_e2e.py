"""End to end: a real, private Postfix asks spfpolicy about every recipient.

swaks talks SMTP to Postfix's smtpd on loopback and claims the client address
and HELO name with XCLIENT; smtpd asks ``spfpolicy serve`` on
QUEUE_DIR/private/policyd-spf (check_policy_service unix:private/policyd-spf,
as Debian documents for policyd-spf); spfpolicy asks the loopback DNS server
serving tests/data/spf_zone.yaml; accepted mail lands in maildirs.

Needs root and the Debian packages postfix and swaks; skipped otherwise.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from oracle import DnsServerProcess, SpfpolicyServer, write_conf
from postfix_env import PostfixInstance, SmtpSession, postfix_missing, scratch_dir, swaks

_missing = postfix_missing()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_missing is not None, reason=_missing or ""),
]

# policyd-spf's shipped defaults, spelled out.
CONF = {
    "debugLevel": "1",
    "TestOnly": "1",
    "HELO_reject": "Fail",
    "Mail_From_reject": "Fail",
    "PermError_reject": "False",
    "TempError_Defer": "False",
    "skip_addresses": "127.0.0.0/8,::ffff:127.0.0.0/104,::1",
}

AUTHORIZED = "192.0.2.10"  # in pass.example.org's SPF record and mail.example.org's A
UNAUTHORIZED = "198.51.100.7"  # in neither


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with scratch_dir("spfpolicy-e2e-") as path:
        yield path


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DnsServerProcess]:
    with DnsServerProcess() as server:
        yield server


@pytest.fixture(scope="module")
def mta(scratch: Path) -> Iterator[PostfixInstance]:
    with PostfixInstance(scratch / "postfix") as instance:
        yield instance


@pytest.fixture(scope="module")
def policy_server(
    mta: PostfixInstance, dns_server: DnsServerProcess, scratch: Path
) -> Iterator[SpfpolicyServer]:
    conf = write_conf(scratch / "policyd-spf.conf", CONF)
    with SpfpolicyServer(
        conf,
        f"unix:{mta.policy_socket}",
        dns_server.nameserver,
        log_path=scratch / "spfpolicy.log",
    ) as server:
        yield server


def _received_spf(message: EmailMessage) -> list[str]:
    # The email parser unfolds; collapse runs of blanks so folding cannot matter.
    return [" ".join(str(value).split()) for value in message.get_all("Received-SPF") or []]


def _send(
    mta: PostfixInstance, *, client_address: str, helo: str, sender: str, recipients: list[str]
) -> tuple[str, SmtpSession]:
    """One message through swaks, tagged with a fresh X-Test-Id to find it again."""
    test_id = uuid.uuid4().hex
    session = swaks(
        mta.port,
        client_address=client_address,
        helo=helo,
        sender=sender,
        recipients=recipients,
        headers=[f"X-Test-Id: {test_id}"],
    )
    return test_id, session


def _delivered(mta: PostfixInstance, mailbox: str, test_id: str) -> list[EmailMessage]:
    return mta.wait_for_message(mailbox, "X-Test-Id", test_id)


def test_spf_pass_is_delivered_with_one_received_spf(
    mta: PostfixInstance, policy_server: SpfpolicyServer
) -> None:
    test_id, session = _send(
        mta,
        client_address=AUTHORIZED,
        helo="mail.example.org",
        sender="carol@pass.example.org",
        recipients=["alice@example.net"],
    )
    assert session.returncode == 0, session.transcript
    (message,) = _delivered(mta, "alice", test_id)
    assert _received_spf(message) == [
        "Pass (mailfrom) identity=mailfrom; client-ip=192.0.2.10; helo=mail.example.org; "
        "envelope-from=carol@pass.example.org; receiver=example.net"
    ]


def test_spf_fail_is_rejected_with_5_7_23(
    mta: PostfixInstance, policy_server: SpfpolicyServer
) -> None:
    _, session = _send(
        mta,
        client_address=UNAUTHORIZED,
        helo="helo-none.example.org",
        sender="carol@pass.example.org",
        recipients=["alice@example.net"],
    )
    assert session.returncode == 24, session.transcript  # swaks: no RCPT accepted
    (reply,) = session.replies_to("RCPT TO")
    assert reply == (
        "550 5.7.23 <alice@example.net>: Recipient address rejected: Message rejected due to: "
        "SPF fail - not authorized. Please see http://www.openspf.net/Why?s=mfrom;"
        "id=carol@pass.example.org;ip=198.51.100.7;r=example.net"
    )


def test_two_recipients_get_one_received_spf_header(
    mta: PostfixInstance, policy_server: SpfpolicyServer
) -> None:
    # Postfix asks once per recipient with the same instance; the header is
    # prepended once per message, and each mailbox gets its copy of it.
    test_id, session = _send(
        mta,
        client_address=AUTHORIZED,
        helo="mail.example.org",
        sender="dave@pass.example.org",
        recipients=["alice@example.net", "bob@example.net"],
    )
    assert session.returncode == 0, session.transcript
    assert session.replies_to("RCPT TO") == ["250 2.1.5 Ok", "250 2.1.5 Ok"]
    for mailbox in ("alice", "bob"):
        (message,) = _delivered(mta, mailbox, test_id)
        assert _received_spf(message) == [
            "Pass (mailfrom) identity=mailfrom; client-ip=192.0.2.10; helo=mail.example.org; "
            "envelope-from=dave@pass.example.org; receiver=example.net"
        ], mailbox


def test_null_sender_is_judged_by_helo_pass(
    mta: PostfixInstance, policy_server: SpfpolicyServer
) -> None:
    test_id, session = _send(
        mta,
        client_address=AUTHORIZED,
        helo="mail.example.org",
        sender="<>",
        recipients=["bob@example.net"],
    )
    assert session.returncode == 0, session.transcript
    (message,) = _delivered(mta, "bob", test_id)
    assert message.get("Return-Path") == "<>"
    assert _received_spf(message) == [
        "Pass (sender SPF authorized) identity=helo; client-ip=192.0.2.10; "
        "helo=mail.example.org; envelope-from=<>; receiver=example.net"
    ]


def test_null_sender_is_rejected_on_helo_fail(
    mta: PostfixInstance, policy_server: SpfpolicyServer
) -> None:
    _, session = _send(
        mta,
        client_address=UNAUTHORIZED,
        helo="mail.example.org",
        sender="<>",
        recipients=["bob@example.net"],
    )
    assert session.returncode == 24, session.transcript
    (reply,) = session.replies_to("RCPT TO")
    assert reply == (
        "550 5.7.23 <bob@example.net>: Recipient address rejected: Message rejected due to: "
        "SPF fail - not authorized. Please see http://www.openspf.net/Why?s=helo;"
        "id=mail.example.org;ip=198.51.100.7;r=example.net"
    )
