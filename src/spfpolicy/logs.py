"""Logging set-up: syslog (facility mail, ident ``spfpolicy``) and/or stderr
for journald, with policyd-spf's debugLevel meaning.

debugLevel 0 logs errors only; 1 adds one line per decision; 2 and 3 add
DNS and whitelist detail; 4 and above also log every request attribute line
(the ``spfpolicy.requests`` logger). The periodic stats line (the
``spfpolicy.stats`` logger) is logged whenever Stats_Interval asks for it,
debugLevel 0 included: its default already depends on debugLevel.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from collections.abc import Iterable

SYSLOG_SOCKET = "/dev/log"
REQUEST_LOGGER = "spfpolicy.requests"
STATS_LOGGER = "spfpolicy.stats"


def level_for(debug_level: int) -> int:
    if debug_level <= 0:
        return logging.WARNING
    if debug_level == 1:
        return logging.INFO
    return logging.DEBUG


def configure(debug_level: int, targets: Iterable[str]) -> None:
    """(Re)configure the ``spfpolicy`` logger tree; safe to call on reload."""
    root = logging.getLogger("spfpolicy")
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level_for(debug_level))
    root.propagate = False
    wanted = {str(t) for t in targets}
    if "syslog" in wanted:
        syslog = _syslog_handler()
        if syslog is None:
            wanted.add("stderr")
        else:
            root.addHandler(syslog)
    if "stderr" in wanted:
        stream = logging.StreamHandler(sys.stderr)
        # journald adds its own timestamps; the level name helps grepping.
        stream.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        if _stderr_is_journal():
            # stderr is the journal (systemd sets JOURNAL_STREAM): a "<N>"
            # prefix gives each line its syslog priority (sd-daemon(3)).
            stream.setFormatter(_JournalFormatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(stream)
    logging.getLogger(REQUEST_LOGGER).setLevel(
        logging.DEBUG if debug_level >= 4 else logging.WARNING
    )
    logging.getLogger(STATS_LOGGER).setLevel(logging.INFO)


def _stderr_is_journal() -> bool:
    """systemd.exec(5): JOURNAL_STREAM is "DEVICE:INODE" of the journal stream."""
    try:
        device, inode = (int(part) for part in os.environ["JOURNAL_STREAM"].split(":"))
        info = os.fstat(sys.stderr.fileno())
    except (KeyError, ValueError, OSError, AttributeError):
        return False
    return (info.st_dev, info.st_ino) == (device, inode)


class _JournalFormatter(logging.Formatter):
    PRIORITIES = {"CRITICAL": 2, "ERROR": 3, "WARNING": 4, "INFO": 6, "DEBUG": 7}

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self.PRIORITIES.get(record.levelname, 6)}>{super().format(record)}"


def _syslog_handler() -> logging.Handler | None:
    if not os.path.exists(SYSLOG_SOCKET):
        return None
    try:
        handler = logging.handlers.SysLogHandler(
            address=SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_MAIL
        )
    except OSError:
        return None
    handler.ident = f"spfpolicy[{os.getpid()}]: "
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler
