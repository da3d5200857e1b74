"""Logging set-up: syslog (facility mail, ident ``spfpolicy``) and/or stderr
for journald, with policyd-spf's debugLevel meaning.

debugLevel 0 logs errors only; 1 adds one line per decision; 2 and 3 add
DNS and whitelist detail; 4 and above also log every request attribute line
(the ``spfpolicy.requests`` logger).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from collections.abc import Iterable

SYSLOG_SOCKET = "/dev/log"
REQUEST_LOGGER = "spfpolicy.requests"


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
        root.addHandler(stream)
    logging.getLogger(REQUEST_LOGGER).setLevel(
        logging.DEBUG if debug_level >= 4 else logging.WARNING
    )


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
