"""Test helpers (not a test module): a private, throw-away Postfix instance on loopback.

``PostfixInstance`` writes its own main.cf and master.cf into a scratch directory
and runs ``postfix -c DIR start`` as root; the system /etc/postfix and the
default instance are never read or touched.  smtpd listens on 127.0.0.1:<free
port>, trusts XCLIENT from 127.0.0.0/8 (so a test can claim any client address
and HELO name), asks the policy server at ``QUEUE_DIR/private/policyd-spf``
for every recipient, and delivers example.net mail to maildirs the test reads.

Postfix must not leave loopback: it never needs DNS here (no peer name lookup,
a fixed myhostname, no smtp client use, no DNS-based restrictions).

The scratch directory lives under /var/tmp, not pytest's tmp_path: Postfix's
daemons run as user "postfix" and virtual(8) as "nobody", and pytest's tmp_path
parents are mode 0700 root.
"""

from __future__ import annotations

import contextlib
import email
import email.message
import email.policy
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

POSTFIX = "/usr/sbin/postfix"
SWAKS = "/usr/bin/swaks"
COMMAND_TIMEOUT = 60.0  # postfix start/stop, one swaks session
READY_TIMEOUT = 20.0  # smtpd accepting connections after start
DELIVERY_TIMEOUT = 20.0  # a queued message reaching its maildir
STOP_TIMEOUT = 10.0

DOMAIN = "example.net"
MAILBOXES = ("alice", "bob")
VIRTUAL_USER = "nobody"  # virtual(8) refuses root; maildirs belong to this user
POLICY_SERVICE = "private/policyd-spf"  # relative to queue_directory, as Debian documents


def postfix_missing() -> str | None:
    """Why a private Postfix cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "a private Postfix instance needs root"
    for path, package in ((POSTFIX, "postfix"), (SWAKS, "swaks")):
        if not Path(path).exists():
            return f"{path} not installed (Debian package {package})"
    try:
        pwd.getpwnam("postfix")
        pwd.getpwnam(VIRTUAL_USER)
    except KeyError as exc:
        return f"missing system user: {exc}"
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A directory under /var/tmp that unprivileged daemons may enter; removed after."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
{listen} inet   n       -       n       -       -       smtpd
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixInstance:
    """A private Postfix: ``with PostfixInstance(root) as mta: ...``."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.port = port if port is not None else free_port()
        self.config_dir = root / "etc"
        self.queue_dir = root / "spool"
        self.data_dir = root / "data"
        self.mail_dir = root / "mail"
        self.maillog_path = root / "maillog"
        self._started = False

    @property
    def policy_socket(self) -> Path:
        return self.queue_dir / POLICY_SERVICE

    @property
    def main_cf(self) -> str:
        mailboxes = ", ".join(f"{box}@{DOMAIN}={box}/" for box in MAILBOXES)
        nobody = pwd.getpwnam(VIRTUAL_USER)
        return f"""\
compatibility_level = 3.6
queue_directory = {self.queue_dir}
data_directory = {self.data_dir}
maillog_file = {self.maillog_path}
# Fixed names: Postfix would otherwise look its host name up in DNS.
myhostname = mx.{DOMAIN}
mydomain = {DOMAIN}
myorigin = $myhostname
mydestination =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_authorized_xclient_hosts = 127.0.0.0/8
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
smtpd_tls_security_level = none
biff = no
virtual_mailbox_domains = {DOMAIN}
virtual_mailbox_base = {self.mail_dir}
virtual_mailbox_maps = inline:{{ {mailboxes} }}
virtual_uid_maps = static:{nobody.pw_uid}
virtual_gid_maps = static:{nobody.pw_gid}
# The policy check must not come after any permit: every recipient is asked.
smtpd_recipient_restrictions =
    reject_unauth_destination,
    check_policy_service unix:{POLICY_SERVICE}
"""

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        self.config_dir.mkdir(parents=True)
        self.queue_dir.mkdir()
        self.data_dir.mkdir()
        self.mail_dir.mkdir()
        postfix_user = pwd.getpwnam("postfix")
        nobody = pwd.getpwnam(VIRTUAL_USER)
        os.chown(self.data_dir, postfix_user.pw_uid, postfix_user.pw_gid)
        os.chown(self.mail_dir, nobody.pw_uid, nobody.pw_gid)
        (self.config_dir / "main.cf").write_text(self.main_cf)
        (self.config_dir / "master.cf").write_text(
            MASTER_CF.format(listen=f"127.0.0.1:{self.port}")
        )
        self._started = True
        # "start" also creates the queue directories with their owners and modes.
        self.postfix("start")
        self._wait_listening()

    def postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [POSTFIX, "-c", str(self.config_dir), *args],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"postfix {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}\n{self.maillog()}"
            )
        return result

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"smtpd not listening on 127.0.0.1:{self.port}\n{self.maillog()}"
                    ) from None
                time.sleep(0.05)

    def _master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        """Stop master and its children; bounded, and safe to call more than once."""
        if not self._started:
            return
        self._started = False
        pid = self._master_pid()
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.postfix("stop")
        if pid is None:
            return
        deadline = time.monotonic() + STOP_TIMEOUT
        while _running(pid):
            if time.monotonic() > deadline:
                # Master ignored "postfix stop": end its process group the hard way.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                break
            time.sleep(0.05)

    def maillog(self) -> str:
        try:
            return self.maillog_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def delivered(self, mailbox: str) -> list[email.message.EmailMessage]:
        """Messages in ``mailbox``'s maildir (new/), oldest first."""
        new = self.mail_dir / mailbox / "new"
        if not new.is_dir():
            return []
        messages = []
        for path in sorted(new.iterdir(), key=lambda p: p.stat().st_mtime_ns):
            message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            messages.append(message)
        return messages

    def wait_for_message(
        self, mailbox: str, header: str, value: str, timeout: float = DELIVERY_TIMEOUT
    ) -> list[email.message.EmailMessage]:
        """The messages in ``mailbox`` whose ``header`` is ``value``, once there is one."""
        deadline = time.monotonic() + timeout
        while True:
            found = [m for m in self.delivered(mailbox) if m.get(header) == value]
            if found:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no message with {header}: {value} for {mailbox} in {timeout} s\n"
                    f"{self.maillog()}"
                )
            time.sleep(0.1)


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (init may reap it late)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("State:"):
            return "Z" not in line.split(":", 1)[1].split()[0]
    return True


@dataclass(frozen=True)
class SmtpSession:
    """What swaks saw: its exit status and the SMTP transcript."""

    returncode: int
    transcript: str

    def replies_to(self, command: str) -> list[str]:
        """Server reply lines that answer ``command`` (e.g. "RCPT TO"), in order."""
        replies: list[str] = []
        lines = self.transcript.splitlines()
        for index, line in enumerate(lines):
            if line.lstrip(" ~*").startswith(("-> " + command, "-> " + command.lower())):
                for reply in lines[index + 1 :]:
                    stripped = reply.strip()
                    if stripped.startswith(("<-", "<**")):
                        replies.append(stripped.split(" ", 1)[1].strip())
                        break
        return replies

    @property
    def queue_id(self) -> str | None:
        for line in self.transcript.splitlines():
            if "queued as " in line:
                return line.rsplit("queued as ", 1)[1].strip()
        return None


def swaks(
    port: int,
    *,
    client_address: str,
    helo: str,
    sender: str,
    recipients: Sequence[str],
    client_name: str = "[UNAVAILABLE]",
    headers: Sequence[str] = (),
    timeout: float = COMMAND_TIMEOUT,
) -> SmtpSession:
    """One SMTP session through swaks, claiming ``client_address``/``helo`` via XCLIENT.

    swaks sends EHLO again after XCLIENT (which resets the session), and that
    name is what Postfix passes as helo_name; so the XCLIENT HELO and --helo
    are the same name.  ``sender`` "<>" is the null reverse-path.
    """
    argv = [
        SWAKS,
        "--server",
        f"127.0.0.1:{port}",
        "--xclient",
        f"ADDR={client_address} NAME={client_name} HELO={helo}",
        "--helo",
        helo,
        "--from",
        sender,
        "--to",
        ",".join(recipients),
        "--timeout",
        str(int(timeout)),
    ]
    for header in headers:
        argv += ["--add-header", header]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 10, check=False)
    return SmtpSession(result.returncode, result.stdout + result.stderr)
