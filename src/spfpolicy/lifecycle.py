"""The process around the policy server: start-up order, privileges,
signals, systemd notifications and the periodic stats line.

Start: bind (or take systemd's sockets), start the metrics endpoint, drop
privileges, read Cache_File (as the user that will write it), install signal
handlers, start the background tasks, READY=1.
SIGHUP: RELOADING=1, load and apply the file (or keep the old one), READY=1.
Stop (SIGTERM/SIGINT): STOPPING=1, then ``PolicyServer.stop()`` (stop
accepting, answer what was read within Shutdown_Grace, write Cache_File,
close), stop the background tasks and restore the signal handlers.
"""

from __future__ import annotations

import asyncio
import gc
import grp
import logging
import os
import pwd
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import replace
from typing import Any

from spfpolicy import eventloop, logs
from spfpolicy.config import ConfigError, ListenAddress, LogTarget, Nameserver, Settings
from spfpolicy.metrics import status_line, summary_line
from spfpolicy.server import PolicyServer, StartupError
from spfpolicy.systemd import Notifier, listen_fds, watchdog_interval

__all__ = ["drop_privileges", "run_server"]

log = logging.getLogger("spfpolicy.server")
stats_log = logging.getLogger(logs.STATS_LOGGER)

# How often STATUS= is refreshed for `systemctl status` (when under systemd).
STATUS_INTERVAL = 10.0
# Allocations between young-generation collections (Python's default: 700).
GC_THRESHOLD = 10_000


def drop_privileges(user: str, group: str) -> None:
    """As root, become ``user``/``group`` (the sockets are bound by now)."""
    if not user and not group:
        return
    try:
        entry = pwd.getpwnam(user) if user else None
        gid = grp.getgrnam(group).gr_gid if group else (entry.pw_gid if entry else os.getgid())
    except KeyError as exc:
        raise StartupError(f"cannot switch to User {user!r} / Group {group!r}: {exc}") from None
    uid = entry.pw_uid if entry else os.getuid()
    if os.geteuid() != 0:
        if (uid, gid) != (os.geteuid(), os.getegid()):
            log.warning(
                "not started as root: User/Group (%s/%s) ignored, running as uid %d gid %d",
                user or "-",
                group or "-",
                os.geteuid(),
                os.getegid(),
            )
        return
    # Supplementary groups first (root's would otherwise stay), then the
    # group while we still may, then the user: the order matters.
    if entry is not None:
        os.initgroups(entry.pw_name, gid)
    else:
        os.setgroups([gid])
    os.setgid(gid)
    if entry is not None:
        os.setuid(uid)
    log.info("running as uid %d gid %d", os.getuid(), os.getgid())


def run_server(
    settings: Settings,
    *,
    listen: Sequence[ListenAddress] | None = None,
    nameservers: Sequence[Nameserver] | None = None,
    log_target: Sequence[LogTarget] | None = None,
    load: Callable[[], Settings] | None = None,
) -> int:
    """Run until SIGTERM/SIGINT; the exit status for the command line.

    ``load`` reads the configuration again on SIGHUP (the command-line
    overrides ``listen``, ``nameservers`` and ``log_target`` apply to it too).
    """
    overrides: dict[str, Any] = {}
    if listen:
        overrides["listen"] = tuple(listen)
    if nameservers:
        overrides["nameservers"] = tuple(nameservers)
    if log_target:
        overrides["log_target"] = tuple(log_target)
    settings = replace(settings, **overrides)
    reload = (lambda: replace(load(), **overrides)) if load is not None else None
    logs.configure(settings.debug_level, settings.log_target)
    with eventloop.runner() as runner:
        try:
            return runner.run(_serve(settings, reload))
        except StartupError as exc:
            log.error("%s", exc)
            print(f"spfpolicy: {exc}", file=sys.stderr)
            return 1


def tune_garbage_collector() -> None:
    """Fewer collections of a heap that hardly holds cycles.

    A request allocates a few dozen container objects and leaves no cycles
    behind, and the DNS cache holds bytes and strings, which the collector
    does not track; at the default threshold (700) it still ran a young
    collection every dozen requests, and walked what start-up left behind
    (modules, settings) in each old one. Start-up's objects are frozen out
    of it, and young collections run every 10,000 allocations: measured in
    the unique bench, 50,000 saved a few per cent more CPU but let the peak
    RSS grow by 3.4 MB (garbage waiting longer), 10,000 by 0.5 MB.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])


async def _serve(settings: Settings, load: Callable[[], Settings] | None) -> int:
    notifier = Notifier.from_environment()
    server = PolicyServer(settings)
    try:
        await server.start(settings.listen, listen_fds())
        await server.start_metrics()
        drop_privileges(settings.user, settings.group)
        server.restore_cache()
        if server.resolver.shared is not None:
            server.resolver.shared.connect_soon()  # as the user that will reconnect
    except BaseException:
        await server.close()
        notifier.close()
        raise
    tune_garbage_collector()
    try:
        return await _Lifecycle(server, notifier, load).run()
    finally:
        notifier.close()


class _Lifecycle:
    """Signals, background tasks and systemd notifications around one server."""

    def __init__(
        self, server: PolicyServer, notifier: Notifier, load: Callable[[], Settings] | None
    ) -> None:
        self.server = server
        self.notifier = notifier
        self.load = load
        self.stop_requested = asyncio.Event()
        self.reloaded = asyncio.Event()  # wakes the stats task to re-read its interval
        self.tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        server = self.server
        handlers: dict[signal.Signals, Callable[[], None]] = {
            signal.SIGTERM: self.stop_requested.set,
            signal.SIGINT: self.stop_requested.set,
            signal.SIGHUP: self.reload,
        }
        for signum, handler in handlers.items():
            loop.add_signal_handler(signum, handler)
        try:
            self._spawn(self._stats_loop())
            interval = watchdog_interval()
            if self.notifier.enabled:
                self._spawn(self._status_loop(interval))
            self.notifier.ready(status_line(server.snapshot()))
            log.info("spfpolicy ready (event loop %s)", type(loop).__module__.split(".")[0])
            await self.stop_requested.wait()
            log.info("stopping: finishing requests already read")
            self.notifier.stopping(f"stopping after {server.requests} requests")
            # Signals stay handled while draining: a second SIGTERM must not
            # kill the process halfway through (systemd sends SIGKILL later).
            await server.stop()
        finally:
            for task in self.tasks:
                task.cancel()
            if self.tasks:
                await asyncio.wait(self.tasks)
            for signum in handlers:
                loop.remove_signal_handler(signum)
        log.info("stopped after %d requests", server.requests)
        return 0

    def _spawn(self, coro: Coroutine[None, None, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def reload(self) -> None:
        """SIGHUP: a valid file applies to new requests; a bad one changes nothing."""
        if self.stop_requested.is_set():
            return
        if self.load is None:
            log.warning("SIGHUP: no configuration loader; nothing reloaded")
            return
        server = self.server
        self.notifier.reloading()
        try:
            new = self.load()
        except ConfigError as exc:
            server.stats.reload_failures += 1
            log.error("configuration not reloaded, the previous one stays: %s", exc)
        except Exception:
            server.stats.reload_failures += 1
            log.exception("configuration not reloaded, the previous one stays")
        else:
            ignored = server.reload(new)
            logs.configure(new.debug_level, new.log_target)
            server.stats.reloads += 1
            if ignored:
                log.warning(
                    "configuration reloaded, but %s changed: restart spfpolicy to apply",
                    ", ".join(ignored),
                )
            else:
                log.info("configuration reloaded")
            self.reloaded.set()
        self.notifier.ready(status_line(server.snapshot()))

    async def _stats_loop(self) -> None:
        while True:
            interval = self.server.settings.effective_stats_interval
            self.reloaded.clear()
            try:
                async with asyncio.timeout(interval if interval > 0 else None):
                    await self.reloaded.wait()
                continue  # reloaded: read the interval again
            except TimeoutError:
                stats_log.info("%s", summary_line(self.server.snapshot()))

    async def _status_loop(self, watchdog: float | None) -> None:
        """STATUS= for `systemctl status`, and WATCHDOG=1 at half of WATCHDOG_USEC."""
        period = min(STATUS_INTERVAL, watchdog) if watchdog else STATUS_INTERVAL
        if watchdog:
            log.info("pinging the systemd watchdog every %.1fs", watchdog)
        while True:
            if watchdog:
                self.notifier.watchdog()
            self.notifier.status(status_line(self.server.snapshot()))
            await asyncio.sleep(period)
