"""The aiodns and pycares internals spfpolicy relies on, fenced in one module.

The resolver (``resolver.py``) uses aiodns for its lookups, with three things
neither library offers through its public API:

- c-ares driven from the event loop rather than from aiodns' event thread
  (``LoopResolver``: aiodns' ``_make_channel`` and ``_sock_state_cb``);
- c-ares' own query cache switched off (``without_query_cache``: the
  ``ares_init_options`` call in ``pycares._lib`` is given the option);
- the reply of a negative answer, whose SOA says how long it may be cached
  (``LoopResolver.query_reply``: a query sent with a C callback of ours, through
  pycares' channel lock, callback registry and cffi objects).

Every private name used is listed in ``PRIVATE_NAMES``; ``missing_private_names()``
says which of them an installed version lacks, and tests/test_cares.py fails
with that list when an upgrade removes one. Where one is missing at run time,
each piece falls back to the libraries' public behaviour (aiodns' thread,
c-ares' query cache, negative answers kept for DNS_Negative_TTL).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import aiodns
import aiodns.error
import pycares

log = logging.getLogger(__name__)

# c-ares statuses that mean "this name has no such data": a negative answer.
NEGATIVE = {aiodns.error.ARES_ENOTFOUND, aiodns.error.ARES_ENODATA}

# (object, attribute) pairs this module reads that are not public API.
PRIVATE_NAMES: tuple[tuple[str, str], ...] = (
    ("aiodns.DNSResolver", "_make_channel"),
    ("aiodns.DNSResolver", "_sock_state_cb"),
    ("pycares", "_lib"),
    ("pycares._lib", "ares_init_options"),
    ("pycares._lib", "ares_query_dnsrec"),
    ("pycares", "_ffi"),
    ("pycares", "_handle_to_channel"),
    ("pycares", "parse_dnsrec"),
    ("pycares.Channel", "_capture_channel"),
    ("pycares.Channel", "_register_callback_handle"),
)


def missing_private_names() -> list[str]:
    """The names of ``PRIVATE_NAMES`` the installed aiodns/pycares lack."""
    roots = {"aiodns": aiodns, "pycares": pycares}
    missing = []
    for owner, attribute in PRIVATE_NAMES:
        root, *path = owner.split(".")
        obj: Any = roots[root]
        for part in path:
            obj = getattr(obj, part, None)
        if obj is None or not hasattr(obj, attribute):
            missing.append(f"{owner}.{attribute}")
    return missing


# c-ares (1.31 and later) keeps a query cache of its own, on by default, with
# no bound on entries: under a flood of new domains it grows with the rate
# times the TTLs, outside DNS_Cache_Size. This cache is the one that counts,
# so c-ares' is switched off with its documented option (qcache_max_ttl = 0,
# ARES_OPT_QUERY_CACHE). pycares 5 does not expose that option, so for the
# moment a channel is created, its call to ares_init_options is given it.
_ARES_OPT_QUERY_CACHE = 1 << 21


class _InitOptionsWithoutQueryCache:
    """pycares' C library, with ares_init_options disabling the query cache."""

    def __init__(self, lib: Any) -> None:
        self._lib = lib

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lib, name)

    def ares_init_options(self, channel: Any, options: Any, optmask: int) -> int:
        options.qcache_max_ttl = 0
        result: int = self._lib.ares_init_options(channel, options, optmask | _ARES_OPT_QUERY_CACHE)
        return result


@contextlib.contextmanager
def without_query_cache() -> Iterator[None]:
    lib = getattr(pycares, "_lib", None)
    if lib is None or not hasattr(lib, "ares_init_options"):
        yield  # another pycares layout: keep its default
        return
    pycares._lib = _InitOptionsWithoutQueryCache(lib)
    try:
        yield
    finally:
        pycares._lib = lib


class LoopResolver(aiodns.DNSResolver):
    """aiodns' resolver with c-ares driven from the event loop, not a thread.

    aiodns 4 runs c-ares with its own event thread whenever it can; every
    answer then reaches the loop through ``call_soon_threadsafe`` (a write to
    the loop's self-pipe, a wake-up, the GIL handed over and back). Driven
    from the loop instead, c-ares' sockets are watched with ``add_reader``
    and its timeouts with a loop timer: aiodns' own path for platforms
    without the thread (``sock_state_cb``). Cold requests cost 8-15 % less
    CPU for it (unique workload: 497-506 against 544-598 us per request).
    The thread also re-read /etc/resolv.conf when it changed; here a reload
    does that (``resolver.Resolver.renew``). Should aiodns drop the hook used here,
    its default (the thread) is used.
    """

    def _make_channel(self, **kwargs: Any) -> tuple[bool, pycares.Channel]:
        if not callable(getattr(self, "_sock_state_cb", None)):
            return super()._make_channel(**kwargs)
        # A weak reference, as aiodns does: the channel holds the callback,
        # which must not keep the resolver alive.
        resolver = weakref.ref(self)

        def sock_state(fd: int, readable: bool, writable: bool) -> None:
            this = resolver()
            if this is not None:
                this._sock_state_cb(fd, readable, writable)

        return False, pycares.Channel(sock_state_cb=sock_state, timeout=self._timeout, **kwargs)

    def ask(self, name: bytes, qtype: int, deliver: Callable[[Any, int], None]) -> None:
        """One query of ``name``: ``deliver(reply, status)`` is called on the
        loop's thread when it ends (at once, for a query c-ares refuses),
        with the reply also for a negative answer where c-ares has one. The
        resolver's upstream path: no future, no task between c-ares and it."""
        if self._event_thread:
            deliver = functools.partial(self.loop.call_soon_threadsafe, deliver)  # type: ignore[arg-type,assignment]
        try:
            if KEEPS_NEGATIVE_REPLIES:
                _ask(self._channel, name, qtype, deliver)
            else:
                self._channel.query(name.decode("ascii"), qtype, callback=deliver)
        except pycares.AresError as exc:
            # c-ares may have called back already with the same status;
            # ``deliver`` must take a second call (a settled lookup ignores it).
            deliver(None, exc.args[0] if exc.args else pycares.errno.ARES_EFORMERR)

    def query_reply(
        self, name: bytes, qtype: int
    ) -> asyncio.Future[tuple[pycares.DNSResult | None, bool]]:
        """One query of ``name`` (ASCII, as the resolver encodes it): (the reply,
        whether the answer is negative), or aiodns' DNSError for any other
        status, as ``query_dns`` raises it. Unlike ``query_dns``, a negative
        answer comes with its reply, where the SOA says how long it may be
        kept."""
        future: asyncio.Future[tuple[pycares.DNSResult | None, bool]] = self.loop.create_future()
        deliver: Any  # (reply, status) -> None, from c-ares' thread or the loop
        if self._event_thread:
            deliver = functools.partial(self.loop.call_soon_threadsafe, _deliver, future)  # type: ignore[arg-type]
        else:
            deliver = functools.partial(_deliver, future)
        try:
            if KEEPS_NEGATIVE_REPLIES:
                _ask(self._channel, name, qtype, deliver)
            else:
                self._channel.query(name.decode("ascii"), qtype, callback=deliver)
        except pycares.AresError as exc:
            # c-ares may have called back already with the same status.
            code = exc.args[0] if exc.args else pycares.errno.ARES_EFORMERR
            _deliver(future, None, code)
        return future


def _deliver(
    future: asyncio.Future[tuple[pycares.DNSResult | None, bool]],
    reply: pycares.DNSResult | None,
    status: int | None,
) -> None:
    if future.done():  # cancelled, or the error was delivered twice
        return
    if status is None or status == pycares.errno.ARES_SUCCESS:
        future.set_result((reply, False))
    elif status in NEGATIVE:
        future.set_result((reply, True))
    else:
        future.set_exception(aiodns.error.DNSError(status, pycares.errno.strerror(status)))


# pycares' query callback parses the reply only when c-ares reports success;
# for NXDOMAIN and NODATA it passes the status alone, although c-ares hands
# over the reply (ares_query_dnsrec does). ``_ask`` is pycares' Channel.query
# with a callback of ours that keeps that reply. It uses pycares internals
# (the channel lock and handle registry, the cffi objects): where they are
# missing, pycares' own query is used and negative answers keep
# ``negative_ttl``. One C callback serves every query, made once here.
def _on_reply(arg: Any, status: int, timeouts: int, dnsrec: Any) -> None:
    if arg not in pycares._handle_to_channel:  # the channel went away
        return
    try:
        deliver = pycares._ffi.from_handle(arg)
        reply = None
        if status == pycares.errno.ARES_SUCCESS or (
            status in NEGATIVE and dnsrec != pycares._ffi.NULL
        ):
            try:
                reply, failed = pycares.parse_dnsrec(dnsrec)
            except Exception:  # raised here, it would be lost and the query never end
                log.debug("could not read a reply", exc_info=True)
                reply, failed = None, pycares.errno.ARES_EBADRESP
            if failed is not None:
                status = failed
        deliver(reply, status)
    finally:
        pycares._handle_to_channel.pop(arg, None)


def _make_reply_callback() -> Any:
    try:
        return pycares._ffi.callback("ares_callback_dnsrec", _on_reply)
    except Exception:  # another pycares layout, or no cffi callbacks here
        log.debug("no c-ares reply callback of our own", exc_info=True)
        return None


_REPLY_CALLBACK = _make_reply_callback()
KEEPS_NEGATIVE_REPLIES = _REPLY_CALLBACK is not None and all(
    hasattr(pycares.Channel, method) for method in ("_capture_channel", "_register_callback_handle")
)


def _ask(
    channel: pycares.Channel,
    name: bytes,
    qtype: int,
    deliver: Callable[..., object],
) -> None:
    """pycares' Channel.query (the lock that keeps a closing channel alive,
    the handle registry) with ``_on_reply`` as the callback; ``name`` is
    already encoded by the resolver."""
    with channel._capture_channel() as handle:
        userdata = channel._register_callback_handle(deliver)
        try:
            status = pycares._lib.ares_query_dnsrec(
                handle,
                name,
                pycares.QUERY_CLASS_IN,
                qtype,
                _REPLY_CALLBACK,
                userdata,
                pycares._ffi.NULL,
            )
        except BaseException:
            pycares._handle_to_channel.pop(userdata, None)
            raise
    if status != pycares.errno.ARES_SUCCESS:
        pycares._handle_to_channel.pop(userdata, None)
        raise pycares.AresError(status, pycares.errno.strerror(status))
