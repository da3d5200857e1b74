"""Run Debian's policyd-spf 3.0.4 with its DNS pointed at a loopback test server.

Run with the *system* interpreter, as /usr/bin/policyd-spf is:

    /usr/bin/python3 policyd_spf_launcher.py HOST:PORT CONF [LOGFILE]

Then it behaves exactly like `policyd-spf CONF` under Postfix's spawn(8): policy
requests on stdin, `action=...` answers on stdout, one process per connection.
Only three things are changed, all before policyd-spf runs:

- DNS.  Debian's spf.py prefers dnspython when it is importable and falls back to
  py3dns (`DNS`); python3-spf depends on "python3-dns | python3-dnspython", so a stock
  install runs py3dns.  dnspython is hidden here so the oracle is that stack whatever
  else the machine has.  spf.py calls DNS.DiscoverNameServers() at import (it only
  reads /etc/resolv.conf), so the server and port are set *after* `import spf`.
- syslog.  policyd-spf logs every decision with syslog.syslog(); the log lines go to
  LOGFILE (or nowhere) so the oracle needs no syslogd and leaves the host log clean.
- The receiver host name.  policyd-spf uses socket.gethostname() (Authserv_Id =
  HOSTNAME, pyspf's %{r} macro); if POLICYD_SPF_HOSTNAME is set it replaces it.

This file is not a test module; tests/oracle.py starts it.
"""

import os
import socket
import sys
import syslog


def _redirect_syslog(log_path: str | None) -> None:
    def _syslog(*args: object) -> None:
        # syslog.syslog(message) or syslog.syslog(priority, message)
        if log_path is not None:
            with open(log_path, "a", encoding="utf-8", errors="replace") as log:
                log.write(f"{args[-1]}\n")

    syslog.openlog = lambda *args, **kwargs: None
    syslog.syslog = _syslog  # type: ignore[assignment]


def main() -> int:
    if len(sys.argv) not in (3, 4):
        sys.stderr.write(__doc__ or "")
        return 2
    nameserver, conf = sys.argv[1], sys.argv[2]
    log_path = sys.argv[3] if len(sys.argv) == 4 else None
    host, _, port = nameserver.rpartition(":")

    _redirect_syslog(log_path)
    hostname = os.environ.get("POLICYD_SPF_HOSTNAME")
    if hostname:
        socket.gethostname = lambda: hostname

    sys.modules["dns"] = None  # type: ignore[assignment]  # makes `import dns` fail
    import DNS
    import spf

    if spf.DNSLookup is not spf.DNSLookup_pydns:
        sys.stderr.write("policyd_spf_launcher: spf.py did not select py3dns\n")
        return 3
    DNS.defaults["server"] = [host]
    DNS.defaults["port"] = int(port)

    from spf_engine import policyd_spf

    sys.argv = ["policyd-spf", conf]
    policyd_spf.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
