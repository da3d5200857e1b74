"""Logging set-up: syslog (facility mail, ident ``spfpolicy``) and/or stderr
for journald, with policyd-spf's debugLevel meaning.

debugLevel 0 logs errors only; 1 adds one line per decision; 2 and 3 add
DNS and whitelist detail; 4 and above also log every request attribute line
(the ``spfpolicy.requests`` logger). The periodic stats line (the
``spfpolicy.stats`` logger) is logged whenever Stats_Interval asks for it,
debugLevel 0 included: its default already depends on debugLevel.
"""

from __future__ import annotations

import asyncio
import atexit
import io
import logging
import logging.handlers
import os
import sys
from collections.abc import Iterable
from typing import Any, TextIO

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
    global _fast
    flush()
    _fast = None
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
    if debug_level >= 1:
        _fast = _FastInfo(list(root.handlers))


def info(logger: logging.Logger, message: str) -> None:
    """``logger.info(message)`` for the line logged per decision.

    With the handlers ``configure()`` set up, the line is written as they
    would write it, without the logging module's per-record work (a
    LogRecord, the caller's frame, locks, a formatter): about a third of the
    CPU of a cached request otherwise. Anything else (tests' handlers, no
    configuration) goes through ``logger.info``.
    """
    if not logger.isEnabledFor(logging.INFO):
        return
    fast = _fast
    if fast is None or not fast.write(logger.name, message):
        logger.info("%s", message)


class _FastInfo:
    """Writes INFO lines straight to configure()'s stderr stream and syslog socket.

    stderr lines are collected and written with one write(2) per event-loop
    round instead of one per line (stderr's text layer is line-buffered and
    its byte layer unbuffered). A filter on the stream handler writes them
    out before any record of its own, so lines keep their order.
    """

    MAX_PENDING = 256  # lines; written at once beyond that

    def __init__(self, handlers: list[logging.Handler]) -> None:
        self._root = logging.getLogger("spfpolicy")
        self._handlers = handlers
        self._stream: TextIO | None = None
        self._syslog: logging.handlers.SysLogHandler | None = None
        self._prefixes: dict[str, tuple[str, bytes]] = {}
        for handler in handlers:
            if isinstance(handler, logging.handlers.SysLogHandler):
                self._syslog = handler
            elif isinstance(handler, logging.StreamHandler):
                self._stream = handler.stream
                handler.addFilter(self._before_record)
        self._nul = b"\0" if self._syslog is not None and self._syslog.append_nul else b""
        self._journal = any(isinstance(h.formatter, _JournalFormatter) for h in handlers)
        self._raw: Any = None  # the stream's byte layer, when it has one
        if isinstance(self._stream, io.TextIOWrapper):
            self._raw = self._stream.buffer
        self._pending: list[bytes] = []
        self._flush_due = False

    def write(self, name: str, message: str) -> bool:
        """False when the line must go through the logging module instead."""
        if self._root.handlers != self._handlers:
            return False  # reconfigured behind configure()'s back
        prefixes = self._prefixes.get(name)
        if prefixes is None:
            prefixes = self._prefixes[name] = self._prefixes_for(name)
        text_prefix, syslog_prefix = prefixes
        if self._syslog is not None:
            sock = getattr(self._syslog, "socket", None)  # not in the type stubs
            try:
                sock.send(syslog_prefix + message.encode("utf-8") + self._nul)  # type: ignore[union-attr]
            except (OSError, UnicodeError, AttributeError):
                return False  # the handler reconnects, or reports the problem
        stream = self._stream
        if stream is None:
            return True
        line = f"{text_prefix}{message}\n"
        try:
            if self._raw is None:
                stream.write(line)
                stream.flush()
                return True
            self._pending.append(line.encode(stream.encoding, stream.errors or "strict"))
        except (OSError, ValueError):
            return True  # as StreamHandler.handleError (stderr closed): the line is lost
        if len(self._pending) >= self.MAX_PENDING:
            self.flush()
        elif not self._flush_due:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
            else:
                self._flush_due = True
                loop.call_soon(self.flush)
        return True

    def flush(self) -> None:
        """Write out the lines collected so far."""
        self._flush_due = False
        if not self._pending:
            return
        data = memoryview(b"".join(self._pending))
        self._pending.clear()
        try:
            assert self._stream is not None
            self._stream.flush()  # whatever the text layer holds goes first
            while data:
                written = self._raw.write(data)
                if written is None:  # a non-blocking stderr that is full
                    break
                data = data[written:]
            if hasattr(self._raw, "flush"):
                self._raw.flush()
        except (OSError, ValueError):
            pass  # stderr closed: the lines are lost, as StreamHandler would lose them

    def _before_record(self, record: logging.LogRecord) -> bool:
        self.flush()
        return True

    def _prefixes_for(self, name: str) -> tuple[str, bytes]:
        text = f"INFO {name}: "
        if self._journal:
            text = "<6>" + text
        syslog = b""
        if self._syslog is not None:
            handler = self._syslog
            priority = handler.encodePriority(handler.facility, handler.mapPriority("INFO"))
            syslog = f"<{priority}>{handler.ident}".encode()
        return text, syslog


def flush() -> None:
    """Write out decision lines not yet written (at exit, and on reconfiguring)."""
    if _fast is not None:
        _fast.flush()


atexit.register(flush)

_fast: _FastInfo | None = None


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
