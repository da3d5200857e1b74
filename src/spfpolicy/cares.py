"""The aiodns and pycares internals spfpolicy relies on, fenced in one module.

The resolver (``resolver.py``) uses aiodns for its lookups, with three things
neither library offers through its public API:

- c-ares driven from the event loop rather than from aiodns' event thread
  (``LoopResolver``: aiodns' ``_make_channel`` and ``_sock_state_cb``);
- c-ares' own query cache switched off (``without_query_cache``: the
  ``ares_init_options`` call in ``pycares._lib`` is given the option);
- the reply of a negative answer, whose SOA says how long it may be cached
  (``LoopResolver.query_reply``: a query sent with a C callback of ours, through
  pycares' channel lock, callback registry and cffi objects);
- replies read into the little the resolver uses (``Reply``: the answer
  section's records of the types it asks for, the authority section's SOA)
  straight from c-ares' parsed record, instead of pycares' objects for every
  record of every section (``read_reply``, through ``pycares._lib``).

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
import socket
import weakref
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

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
    ("pycares._lib", "ares_dns_record_rr_cnt"),
    ("pycares._lib", "ares_dns_record_rr_get_const"),
    ("pycares._lib", "ares_dns_rr_get_type"),
    ("pycares._lib", "ares_dns_rr_get_ttl"),
    ("pycares._lib", "ares_dns_rr_get_name"),
    ("pycares._lib", "ares_dns_rr_get_addr"),
    ("pycares._lib", "ares_dns_rr_get_addr6"),
    ("pycares._lib", "ares_inet_ntop"),
    ("pycares._lib", "ares_dns_rr_get_u16"),
    ("pycares._lib", "ares_dns_rr_get_u32"),
    ("pycares._lib", "ares_dns_rr_get_str"),
    ("pycares._lib", "ares_dns_rr_get_abin_cnt"),
    ("pycares._lib", "ares_dns_rr_get_abin"),
)


# Attributes a pycares.Channel sets on itself (the lock its _capture_channel
# takes, the channel pointer), read by ``_ask``: not on the class, so checked
# on an instance.
PRIVATE_CHANNEL_ATTRIBUTES: tuple[str, ...] = ("_lock", "_channel")


def missing_private_names() -> list[str]:
    """The names of ``PRIVATE_NAMES`` and ``PRIVATE_CHANNEL_ATTRIBUTES`` the
    installed aiodns/pycares lack."""
    roots = {"aiodns": aiodns, "pycares": pycares}
    missing = []
    for owner, attribute in PRIVATE_NAMES:
        root, *path = owner.split(".")
        obj: Any = roots[root]
        for part in path:
            obj = getattr(obj, part, None)
        if obj is None or not hasattr(obj, attribute):
            missing.append(f"{owner}.{attribute}")
    channel = pycares.Channel()
    try:
        missing.extend(
            f"pycares.Channel()..{attribute}"
            for attribute in PRIVATE_CHANNEL_ATTRIBUTES
            if not hasattr(channel, attribute)
        )
    finally:
        channel.close()
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


class ReplyRecord(NamedTuple):
    """One record of a reply's answer section, of a type the resolver asks for."""

    name: str  # the owner, as c-ares writes it (ASCII; bytes if it is not)
    type: int  # pycares.QUERY_TYPE_*
    ttl: int
    # A, AAAA: the address as text; MX: (preference, exchange); PTR, CNAME:
    # the name; TXT: the record's character-strings joined (RFC 7208 3.3).
    data: Any


class Reply(NamedTuple):
    """What the resolver reads of a reply: the answer section's records of
    the types in ``READ_TYPES`` (the others are skipped, as pycares skips the
    ones it does not know), and min(TTL, MINIMUM) over the authority
    section's SOA records (RFC 2308 section 5), None without one."""

    answer: list[ReplyRecord]
    soa_ttl: int | None


READ_TYPES = frozenset(
    {
        pycares.QUERY_TYPE_A,
        pycares.QUERY_TYPE_AAAA,
        pycares.QUERY_TYPE_MX,
        pycares.QUERY_TYPE_PTR,
        pycares.QUERY_TYPE_TXT,
        pycares.QUERY_TYPE_CNAME,
    }
)


def _text(value: bytes) -> Any:
    """A name's text as pycares gives it: str when ASCII, else the bytes."""
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        return value


def from_result(result: pycares.DNSResult) -> Reply:
    """The ``Reply`` of a reply pycares read itself (its own query's callback)."""
    answer = []
    for rr in result.answer:
        if rr.type not in READ_TYPES:
            continue
        data: Any = rr.data
        if isinstance(data, (pycares.ARecordData, pycares.AAAARecordData)):
            value: Any = data.addr
        elif isinstance(data, pycares.MXRecordData):
            value = (data.priority, data.exchange)
        elif isinstance(data, pycares.PTRRecordData):
            value = data.dname
        elif isinstance(data, pycares.CNAMERecordData):
            value = data.cname
        else:
            value = bytes(data.data)
        answer.append(ReplyRecord(rr.name, rr.type, rr.ttl, value))
    soa_ttl = None
    for rr in result.authority:
        if isinstance(rr.data, pycares.SOARecordData):
            ttl = min(rr.ttl, rr.data.minimum)
            soa_ttl = ttl if soa_ttl is None else min(soa_ttl, ttl)
    return Reply(answer, soa_ttl)


def _make_reader() -> Callable[[Any], Reply] | None:
    """``read_reply(dnsrec)``: the ``Reply`` of c-ares' parsed record, read
    with c-ares' accessors. pycares' ``parse_dnsrec`` builds a dataclass per
    record and per record's data, for the additional section too, and looks
    each C function up on its cffi library per call: a third of a lookup's
    CPU went there. None where pycares' layout differs (its parse is used)."""
    lib = getattr(pycares, "_lib", None)
    ffi = getattr(pycares, "_ffi", None)
    try:
        rr_count = lib.ares_dns_record_rr_cnt  # type: ignore[union-attr]
        rr_get = lib.ares_dns_record_rr_get_const  # type: ignore[union-attr]
        get_type = lib.ares_dns_rr_get_type  # type: ignore[union-attr]
        get_ttl = lib.ares_dns_rr_get_ttl  # type: ignore[union-attr]
        get_name = lib.ares_dns_rr_get_name  # type: ignore[union-attr]
        get_addr = lib.ares_dns_rr_get_addr  # type: ignore[union-attr]
        get_addr6 = lib.ares_dns_rr_get_addr6  # type: ignore[union-attr]
        inet_ntop = lib.ares_inet_ntop  # type: ignore[union-attr]
        get_u16 = lib.ares_dns_rr_get_u16  # type: ignore[union-attr]
        get_u32 = lib.ares_dns_rr_get_u32  # type: ignore[union-attr]
        get_str = lib.ares_dns_rr_get_str  # type: ignore[union-attr]
        abin_count = lib.ares_dns_rr_get_abin_cnt  # type: ignore[union-attr]
        get_abin = lib.ares_dns_rr_get_abin  # type: ignore[union-attr]
        answer_section = lib.ARES_SECTION_ANSWER  # type: ignore[union-attr]
        authority_section = lib.ARES_SECTION_AUTHORITY  # type: ignore[union-attr]
        keys = (
            lib.ARES_RR_A_ADDR,  # type: ignore[union-attr]
            lib.ARES_RR_AAAA_ADDR,  # type: ignore[union-attr]
            lib.ARES_RR_MX_PREFERENCE,  # type: ignore[union-attr]
            lib.ARES_RR_MX_EXCHANGE,  # type: ignore[union-attr]
            lib.ARES_RR_PTR_DNAME,  # type: ignore[union-attr]
            lib.ARES_RR_CNAME_CNAME,  # type: ignore[union-attr]
            lib.ARES_RR_TXT_DATA,  # type: ignore[union-attr]
            lib.ARES_RR_SOA_MINIMUM,  # type: ignore[union-attr]
            lib.INET6_ADDRSTRLEN,  # type: ignore[union-attr]
        )
        null, string, buffer, new = ffi.NULL, ffi.string, ffi.buffer, ffi.new  # type: ignore[union-attr]
    except AttributeError:
        return None
    a_addr, aaaa_addr, mx_pref, mx_exchange, ptr_dname, cname_cname, txt_data, soa_min, addrlen = (
        keys
    )
    qa, qaaaa, qmx, qptr, qtxt, qcname = (
        pycares.QUERY_TYPE_A,
        pycares.QUERY_TYPE_AAAA,
        pycares.QUERY_TYPE_MX,
        pycares.QUERY_TYPE_PTR,
        pycares.QUERY_TYPE_TXT,
        pycares.QUERY_TYPE_CNAME,
    )
    qsoa = pycares.QUERY_TYPE_SOA

    def name_of(pointer: Any) -> Any:
        return "" if pointer == null else _text(string(pointer))

    def read_reply(dnsrec: Any) -> Reply:
        answer = []
        for i in range(rr_count(dnsrec, answer_section)):
            rr = rr_get(dnsrec, answer_section, i)
            if rr == null:
                continue
            rtype = get_type(rr)
            data: Any
            if rtype == qtxt:
                chunks = []
                length = new("size_t *")
                for j in range(abin_count(rr, txt_data)):
                    chunk = get_abin(rr, txt_data, j, length)
                    if chunk != null:
                        chunks.append(buffer(chunk, length[0])[:])
                data = b"".join(chunks)
            elif rtype in (qa, qaaaa):
                text = new("char[]", addrlen)
                if rtype == qa:
                    inet_ntop(socket.AF_INET, get_addr(rr, a_addr), text, addrlen)
                else:
                    inet_ntop(socket.AF_INET6, get_addr6(rr, aaaa_addr), text, addrlen)
                data = _text(string(text))
            elif rtype == qcname:
                data = name_of(get_str(rr, cname_cname))
            elif rtype == qmx:
                data = (get_u16(rr, mx_pref), name_of(get_str(rr, mx_exchange)))
            elif rtype == qptr:
                data = name_of(get_str(rr, ptr_dname))
            else:
                continue
            answer.append(ReplyRecord(_text(string(get_name(rr))), rtype, get_ttl(rr), data))
        soa_ttl = None
        for i in range(rr_count(dnsrec, authority_section)):
            rr = rr_get(dnsrec, authority_section, i)
            if rr != null and get_type(rr) == qsoa:
                ttl = min(get_ttl(rr), get_u32(rr, soa_min))
                soa_ttl = ttl if soa_ttl is None else min(soa_ttl, ttl)
        return Reply(answer, soa_ttl)

    return read_reply


_read_reply = _make_reader()


def read_reply(dnsrec: Any) -> Reply:
    """The ``Reply`` of c-ares' parsed reply (``ares_dns_record_t *``);
    raises ValueError for a NULL one."""
    if dnsrec == pycares._ffi.NULL:
        raise ValueError("no reply")
    if _read_reply is not None:
        return _read_reply(dnsrec)
    result, failed = pycares.parse_dnsrec(dnsrec)
    if failed is not None or result is None:
        raise ValueError("unreadable reply")
    return from_result(result)


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

    def query_reply(self, name: bytes, qtype: int) -> asyncio.Future[tuple[Reply | None, bool]]:
        """One query of ``name`` (ASCII, as the resolver encodes it): (the reply,
        whether the answer is negative), or aiodns' DNSError for any other
        status, as ``query_dns`` raises it. Unlike ``query_dns``, a negative
        answer comes with its reply, where the SOA says how long it may be
        kept."""
        future: asyncio.Future[tuple[Reply | None, bool]] = self.loop.create_future()
        deliver: Any  # (reply, status) -> None, from c-ares' thread or the loop
        if self._event_thread:
            deliver = functools.partial(self.loop.call_soon_threadsafe, _deliver, future)  # type: ignore[arg-type]
        else:
            deliver = functools.partial(_deliver, future)
        try:
            if KEEPS_NEGATIVE_REPLIES:
                _ask(self._channel, name, qtype, deliver)
            else:
                self._channel.query(
                    name.decode("ascii"), qtype, callback=functools.partial(_converted, deliver)
                )
        except pycares.AresError as exc:
            # c-ares may have called back already with the same status.
            code = exc.args[0] if exc.args else pycares.errno.ARES_EFORMERR
            _deliver(future, None, code)
        return future


def _converted(
    deliver: Callable[[Reply | None, int | None], None],
    result: pycares.DNSResult | None,
    status: int | None,
) -> None:
    """pycares' own query callback, passed on with its reply as a ``Reply``."""
    deliver(None if result is None else from_result(result), status)


def _deliver(
    future: asyncio.Future[tuple[Reply | None, bool]],
    reply: Reply | None,
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
                reply = read_reply(dnsrec)
            except Exception:  # raised here, it would be lost and the query never end
                log.debug("could not read a reply", exc_info=True)
                status = pycares.errno.ARES_EBADRESP
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
    already encoded by the resolver. The lock is taken and the handle
    registered here rather than through ``_capture_channel`` (a generator
    context manager) and ``_register_callback_handle``: 0.5 against 3.2 us a
    query."""
    try:
        lock = channel._lock
    except AttributeError:  # another pycares layout
        _ask_captured(channel, name, qtype, deliver)
        return
    ffi = pycares._ffi
    handles = pycares._handle_to_channel
    with lock:
        pointer = channel._channel
        if pointer is None:  # as _capture_channel says it
            raise RuntimeError("Channel is destroyed, no new queries allowed")
        userdata = ffi.new_handle(deliver)
        handles[userdata] = channel
        try:
            status = pycares._lib.ares_query_dnsrec(
                pointer[0], name, pycares.QUERY_CLASS_IN, qtype, _REPLY_CALLBACK, userdata, ffi.NULL
            )
        except BaseException:
            handles.pop(userdata, None)
            raise
    if status != pycares.errno.ARES_SUCCESS:
        handles.pop(userdata, None)
        raise pycares.AresError(status, pycares.errno.strerror(status))


def _ask_captured(
    channel: pycares.Channel,
    name: bytes,
    qtype: int,
    deliver: Callable[..., object],
) -> None:
    """``_ask`` through pycares' own helpers."""
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
