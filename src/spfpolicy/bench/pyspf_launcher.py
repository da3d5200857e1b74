"""Run a pyspf-based policy program (Debian's policyd-spf) with its DNS pointed
at a loopback server. Standard library only: it runs under whatever Python the
program needs (the system's /usr/bin/python3 for policyd-spf), not the venv.

    python3 pyspf_launcher.py --dns HOST:PORT [--syslog FILE] [--hostname NAME] \\
        -- PROGRAM [ARGS...]

PROGRAM is a Python script; it runs as ``__main__`` with ``sys.argv`` set to
PROGRAM ARGS, so it behaves exactly as when spawn(8) starts it, except for:

- DNS. pyspf (spf.py) prefers dnspython and falls back to py3dns (``DNS``);
  Debian's python3-spf depends on "python3-dns | python3-dnspython", so a stock
  install runs py3dns. When py3dns is importable dnspython is hidden, so the
  program runs the stock stack; its server and port are set after ``import spf``
  (spf.py reads /etc/resolv.conf at import). Otherwise dnspython's default
  resolver is pointed at HOST:PORT.
- syslog. ``syslog.syslog`` lines go to FILE, or nowhere: a load test must not
  flood the host's log (and costs the program nothing for it).
- The host name. ``socket.gethostname()`` returns NAME when given (policyd-spf
  puts it into Authentication-Results and pyspf's %{r}).

``spfpolicy bench --baseline-cmd`` wraps Python programs with this file.
"""

import argparse
import os
import runpy
import socket
import sys
import syslog


def _redirect_syslog(path):
    def _syslog(*args):
        # syslog.syslog(message) or syslog.syslog(priority, message)
        if path is not None:
            with open(path, "a", encoding="utf-8", errors="replace") as log:
                log.write(f"{args[-1]}\n")

    syslog.openlog = lambda *args, **kwargs: None
    syslog.syslog = _syslog


def _point_dns(host, port):
    try:
        import DNS  # py3dns, Debian's default for python3-spf
    except ImportError:
        DNS = None
    if DNS is not None:
        sys.modules["dns"] = None  # makes `import dns` fail: spf.py picks py3dns
        import spf

        if spf.DNSLookup is not spf.DNSLookup_pydns:
            raise SystemExit("pyspf_launcher: spf.py did not select py3dns")
        DNS.defaults["server"] = [host]
        DNS.defaults["port"] = port
        return
    import dns.resolver

    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [host]
    resolver.port = port
    dns.resolver.default_resolver = resolver


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="pyspf_launcher.py",
        description="Run a pyspf-based policy program against a loopback DNS server.",
    )
    parser.add_argument("--dns", required=True, metavar="HOST:PORT")
    parser.add_argument("--syslog", metavar="FILE", help="append syslog lines here")
    parser.add_argument("--hostname", help="what socket.gethostname() returns")
    parser.add_argument("program", help="the Python program to run")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    host, sep, port = args.dns.rpartition(":")
    if not sep or not port.isdigit():
        parser.error(f"--dns wants HOST:PORT, not {args.dns!r}")
    _redirect_syslog(args.syslog)
    hostname = args.hostname or os.environ.get("POLICYD_SPF_HOSTNAME")
    if hostname:
        socket.gethostname = lambda: hostname
    _point_dns(host.strip("[]"), int(port))
    sys.argv = [args.program, *args.args]
    # As when the program runs itself: its own directory heads sys.path.
    sys.path.insert(0, os.path.dirname(os.path.abspath(args.program)))
    runpy.run_path(args.program, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
