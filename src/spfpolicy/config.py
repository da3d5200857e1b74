"""The configuration: one immutable ``Settings`` built by ``load_settings``.

The file format is policyd-spf's (``Key = value`` lines, ``#`` starts a
comment anywhere on a line, blank lines ignored), so a site keeps its
``policyd-spf.conf``. Parsing is strict where policyd-spf 3.0.4 would log and
carry on: an unknown key, a line without exactly one ``=``, or a value
policyd-spf would misread is a ``ConfigError`` naming the file and line.

Keys and enumerated values are case-sensitive, as policyd-spf compares them
with ``==``: ``HELO_reject = fail`` is silently "never reject on fail" there
and an error here. Every key policyd-spf knows is accepted, including those
only its milter reads (``Socket``, ``PidFile``, ``UserID``, ``UMask``,
``InternalHosts``, ``IntHosts``, ``MacroList``) and the deprecated
``defaultSeedOnly``: they are kept in ``Settings`` and otherwise ignored.
``QueueID`` (documented by policyd-spf, but missing from its parser, so it
can never be changed there) and ``Reason_URL`` (spf-engine 3.1.0) are read too.

Where policyd-spf misreads a value, we parse what the admin meant:

* ``Mock``: policyd-spf applies ``bool()`` to the text, so ``Mock = False``
  switches Mock *on*; here ``False``/``No``/``0`` mean off.
* lists: policyd-spf splits on ``,`` without stripping, so
  ``Whitelist = 192.0.2.0/24, 198.51.100.0/24`` silently aborts whitelisting
  at the second entry; here items are stripped and empty items dropped.
  Domain entries are lower-cased (policyd-spf compares them, case-sensitively,
  with lower-cased request values, so an upper-case entry never matched).
* ``skip_addresses =`` (empty) means "skip nothing"; policyd-spf crashes on
  every request with it.
* ``Authserv_Id = HOSTNAME`` is always resolved; policyd-spf resolves it only
  when a configuration file exists.
* IP lists are parsed here, so a bad network is a load error instead of a
  syslog line per request that silently ends whitelist processing.
* the ``Per_User`` file is read here, once, with the same strictness (see
  ``PerUserTable``), instead of on every request.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import os
import socket
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spfpolicy.address import HostPort

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "ConfigError",
    "HeaderType",
    "HeloReject",
    "IPNetwork",
    "KeyDoc",
    "ListenAddress",
    "ListenFamily",
    "LogTarget",
    "MailFromReject",
    "Nameserver",
    "Origin",
    "PerUserTable",
    "Settings",
    "documented_keys",
    "load_settings",
    "parse_key",
    "parse_listen",
    "parse_log_target",
    "parse_nameservers",
]

# Debian's policyd-spf path: a site switching keeps its file where it is.
DEFAULT_CONFIG_PATH = "/etc/postfix-policyd-spf-python/policyd-spf.conf"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Authserv_Id value that stands for "this host's name".
AUTHSERV_HOSTNAME = "HOSTNAME"

# Stats_Interval when the key is unset and debugLevel >= 1.
DEFAULT_STATS_INTERVAL = 300.0

DEFAULT_REASON_MESSAGE = "Message {rejectdefer} due to: {spf}. Please see {url}"
# Positional fields: {0} scope (helo/mfrom), {1} identity, {2} ip, {3} recipient.
DEFAULT_REASON_URL = "http://www.openspf.net/Why?s={0};id={1};ip={2};r={3}"


class ConfigError(Exception):
    """A configuration file could not be used; ``str()`` is ``path:line: message``."""

    def __init__(self, path: str | os.PathLike[str], line: int | None, message: str) -> None:
        self.path = os.fspath(path)
        self.line = line
        self.message = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


class HeloReject(enum.StrEnum):
    """HELO_reject: which HELO results are rejected."""

    SPF_NOT_PASS = "SPF_Not_Pass"  # Fail, Softfail, Neutral
    SOFTFAIL = "Softfail"  # Fail, Softfail
    FAIL = "Fail"
    NULL = "Null"  # Fail, but only for the null sender
    FALSE = "False"  # never reject or defer; header only
    NO_CHECK = "No_Check"  # no HELO check at all


class MailFromReject(enum.StrEnum):
    """Mail_From_reject: which MAIL FROM results are rejected."""

    SPF_NOT_PASS = "SPF_Not_Pass"
    SOFTFAIL = "Softfail"
    FAIL = "Fail"
    FALSE = "False"
    NO_CHECK = "No_Check"


class HeaderType(enum.StrEnum):
    """Header_Type: Received-SPF (RFC 7208 9.1), Authentication-Results (RFC 8601), none."""

    SPF = "SPF"
    AR = "AR"
    NONE = "None"


class ListenFamily(enum.StrEnum):
    UNIX = "unix"
    INET = "inet"


class LogTarget(enum.StrEnum):
    SYSLOG = "syslog"
    STDERR = "stderr"


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """One ``Listen`` entry: ``unix:/path`` or ``inet:host:port``."""

    family: ListenFamily
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.family is ListenFamily.UNIX:
            return f"unix:{self.path}"
        return f"inet:{HostPort(self.host, self.port)}"


@dataclass(frozen=True, slots=True)
class Nameserver(HostPort):
    """One ``Nameservers`` entry: an IP address, port 53 unless given."""

    port: int = 53


@dataclass(frozen=True, slots=True)
class PerUserTable:
    """The ``Per_User = text,/path`` file, read at load time.

    Each line is ``recipient,Key=value|Key=value...``; the first line for a
    recipient wins, as in policyd-spf. ``entries`` maps a lower-cased
    recipient to the Settings field changes for it. Recipients are matched
    case-insensitively (policyd-spf compares the lower-cased recipient with
    the line as written, so an upper-case line never matched).
    """

    path: str
    entries: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()

    def changes_for(self, recipient: str) -> dict[str, Any] | None:
        wanted = recipient.lower()
        for user, changes in self.entries:
            if user == wanted:
                return dict(changes)
        return None


def _default_skip() -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(n) for n in ("127.0.0.0/8", "::ffff:127.0.0.0/104", "::1"))


def _default_listen() -> tuple[ListenAddress, ...]:
    return (ListenAddress(ListenFamily.UNIX, path="/var/spool/postfix/private/policyd-spf"),)


@dataclass(frozen=True)
class Settings:
    """Every configuration key, parsed. Defaults are policyd-spf 3.0.4's."""

    # --- policyd-spf keys (the key name is in each comment) ---
    debug_level: int = 1  # debugLevel
    test_only: int = 1  # TestOnly: 0 = never reject/defer/restrict, only prepend
    default_seed_only: int | None = None  # defaultSeedOnly: deprecated, ignored
    helo_reject: HeloReject = HeloReject.FAIL  # HELO_reject
    mail_from_reject: MailFromReject = MailFromReject.FAIL  # Mail_From_reject
    permerror_reject: bool = False  # PermError_reject
    temperror_defer: bool = False  # TempError_Defer
    no_mail: bool = False  # No_Mail
    helo_pass_restriction: str = ""  # HELO_pass_restriction ("" = none)
    mail_from_pass_restriction: str = ""  # Mail_From_pass_restriction
    reject_not_pass_domains: tuple[str, ...] = ()  # Reject_Not_Pass_Domains
    prospective: str = ""  # Prospective: check as if the client were this IP
    skip_addresses: tuple[IPNetwork, ...] = field(default_factory=_default_skip)
    whitelist: tuple[IPNetwork, ...] = ()  # Whitelist
    helo_whitelist: tuple[str, ...] = ()  # HELO_Whitelist
    domain_whitelist: tuple[str, ...] = ()  # Domain_Whitelist
    domain_whitelist_ptr: tuple[str, ...] = ()  # Domain_Whitelist_PTR
    spf_enhanced_status_codes: bool = True  # SPF_Enhanced_Status_Codes
    header_type: HeaderType = HeaderType.SPF  # Header_Type
    hide_receiver: bool = False  # Hide_Receiver
    authserv_id: str = AUTHSERV_HOSTNAME  # Authserv_Id (load_settings resolves HOSTNAME)
    lookup_time: int = 20  # Lookup_Time, seconds per SPF check
    whitelist_lookup_time: int = 10  # Whitelist_Lookup_Time, seconds per method
    void_limit: int = 2  # Void_Limit (RFC 7208 4.6.4)
    reason_message: str = DEFAULT_REASON_MESSAGE  # Reason_Message
    reason_url: str = DEFAULT_REASON_URL  # Reason_URL (spf-engine 3.1.0)
    mock: bool = False  # Mock
    queue_id: bool = True  # QueueID: put the queue id in log lines
    per_user: PerUserTable | None = None  # Per_User
    # Milter-only keys: accepted so a shared file loads, otherwise unused.
    socket: str = "local:/run/pyspf-milter/pyspf-milter.sock"  # Socket
    pid_file: str = "/run/pyspf-milter/pyspf-milter.pid"  # PidFile
    user_id: str = "pyspf-milter"  # UserID
    umask: int = 7  # UMask (policyd-spf reads it as a decimal int)
    internal_hosts: tuple[str, ...] = ("127.0.0.1",)  # InternalHosts
    int_hosts: bool = False  # IntHosts
    macro_list: tuple[str, ...] = ()  # MacroList

    # --- spfpolicy's own server keys ---
    listen: tuple[ListenAddress, ...] = field(default_factory=_default_listen)
    socket_mode: int = 0o666  # Socket_Mode
    socket_owner: str = ""  # Socket_Owner ("" = leave as created)
    socket_group: str = ""  # Socket_Group
    nameservers: tuple[Nameserver, ...] = ()  # Nameservers (empty = resolv.conf)
    # DNS_Timeout: seconds for the first try of an upstream query (c-ares'
    # default); c-ares doubles it for each retry (4 tries: 2+4+8+16 s at most)
    # and shortens it to what the server's measured response times suggest.
    dns_timeout: float = 2.0
    dns_cache_size: int = 100_000  # DNS_Cache_Size, entries
    dns_min_ttl: int = 0  # DNS_Min_TTL
    dns_max_ttl: int = 86_400  # DNS_Max_TTL
    dns_negative_ttl: int = 300  # DNS_Negative_TTL
    # A name is held down (its lookups fail at once, one probe per hold-down;
    # slownames.py) after Slow_Domain_Threshold timeouts or server failures
    # within Slow_Domain_Window seconds, for Slow_Domain_Hold seconds. A
    # timeout counts when c-ares gives up on a query or a check runs out of
    # Lookup_Time after waiting at least half of it for the name, so three
    # messages that each waited 20 s within a minute hold it down, while a
    # single lost reply or SERVFAIL does not. Two minutes of hold-down cost at
    # most one probe's wait per name, and release a name that answers again
    # before Postfix retries a deferred message (minimal_backoff_time, 300 s);
    # RFC 2308 section 7 allows at most 300 s. Threshold 0 switches it off.
    slow_domain_threshold: int = 3  # Slow_Domain_Threshold, failures (0 = off)
    slow_domain_window: float = 60.0  # Slow_Domain_Window, seconds
    slow_domain_hold: float = 120.0  # Slow_Domain_Hold, seconds (at most 300)
    # Shared_Cache: redis://, rediss:// or unix:// URL of a Redis holding a
    # second level of DNS answers for several MX hosts ("" = off;
    # sharedcache.py). Every operation gets Shared_Cache_Timeout: a Redis on
    # the LAN answers in well under a millisecond, and a Redis that does not
    # must cost an answer no more than a twentieth of a second.
    shared_cache: str = ""  # Shared_Cache
    shared_cache_prefix: str = "spfpolicy:"  # Shared_Cache_Prefix
    shared_cache_timeout: float = 0.05  # Shared_Cache_Timeout, seconds
    shared_cache_password_file: str = ""  # Shared_Cache_Password_File
    shared_cache_ca_file: str = ""  # Shared_Cache_CA_File (rediss:// only)
    result_cache_size: int = 10_000  # Result_Cache_Size
    result_cache_ttl: int = 60  # Result_Cache_TTL (0 disables)
    # Max_Connections: open client connections; one more is closed at once
    # (logged). Postfix holds one per smtpd process (default_process_limit
    # 100), so this is far above what a site needs and below the fd limit
    # the systemd unit sets.
    max_connections: int = 4096
    # Whole-request deadline: below Postfix's smtpd_policy_service_timeout
    # (100 s) and above 2 x Lookup_Time + Whitelist_Lookup_Time (50 s).
    request_timeout: float = 60.0  # Request_Timeout
    # Max_In_Flight: requests evaluated at once; more wait for a slot (within
    # their Request_Timeout), bounding memory under a flood.
    max_in_flight: int = 1000
    # Idle_Timeout: a connection with no request for this long is closed;
    # above Postfix's max_idle (300 s) so Postfix normally closes first.
    idle_timeout: float = 600.0
    # Protocol limits. Postfix's line_length_limit is 2048, and smtpd refuses
    # longer SMTP lines, so real values (sender, recipient, ccert_subject)
    # stay below it; 8192 leaves room for a Postfix with a raised limit while
    # bounding memory. Postfix 3.x sends about 35 attributes: room for new
    # ones (malformed lines count too: each costs a warning). Real requests
    # are under 2 KiB; 64 KiB bounds per-connection memory even with
    # thousands of connections open.
    max_line_length: int = 8192  # Max_Line_Length, bytes
    max_attributes: int = 128  # Max_Attributes per request
    max_request_size: int = 65536  # Max_Request_Size, bytes
    instance_cache_size: int = 10_000  # Instance_Cache_Size
    instance_ttl: int = 1800  # Instance_TTL, seconds
    log_target: tuple[LogTarget, ...] = (LogTarget.SYSLOG,)  # Log_Target
    # User/Group: started as root (without systemd), switch to these after
    # binding the sockets ("" = stay). Not policyd-spf's UserID, which only
    # its milter reads and which defaults to a user most hosts do not have.
    user: str = ""  # User
    group: str = ""  # Group ("" = the user's primary group)
    # Shutdown_Grace: on SIGTERM, seconds for requests already read to be
    # answered (those still evaluating at the end get the fallback answer).
    # Below systemd's TimeoutStopSec (the unit sets 45 s).
    shutdown_grace: float = 30.0
    # Stats_Interval: seconds between one-line stats summaries in the log;
    # 0 = off; unset = DEFAULT_STATS_INTERVAL at debugLevel >= 1, off at 0.
    stats_interval: float | None = None
    # Metrics_Listen: host:port of the Prometheus endpoint (None = off).
    metrics_listen: HostPort | None = None
    domain_stats_size: int = 1000  # Domain_Stats_Size: domains per 10-minute bucket; 0 = off
    # Cache_File: the DNS cache is written here on a clean stop and read back
    # at start (cachefile.py); "" = off.
    cache_file: str = ""

    @property
    def effective_stats_interval(self) -> float:
        """Stats_Interval with its debugLevel-dependent default resolved."""
        if self.stats_interval is not None:
            return self.stats_interval
        return DEFAULT_STATS_INTERVAL if self.debug_level >= 1 else 0.0

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (for CLI overrides and per-user settings)."""
        return dataclasses.replace(self, **changes)

    def for_recipient(self, recipient: str) -> tuple[Settings, bool]:
        """The settings for one recipient, and whether a Per_User line matched."""
        if self.per_user is None:
            return self, False
        changes = self.per_user.changes_for(recipient)
        if changes is None:
            return self, False
        return self.replace(**changes), True


# ----------------------------------------------------------------- value parsers
# Each takes the stripped value text and returns the parsed value or raises
# ValueError with a message that ends up after "path:line: ".


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return text

    return parse


def _enum(kind: type[enum.StrEnum]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            names = ", ".join(member.value for member in kind)
            raise ValueError(f"expected one of {names} (case-sensitive)") from None

    return parse


def _true_false(text: str) -> bool:
    # policyd-spf tests these with == 'True'.
    return _choice("True", "False")(text) == "True"


def _yes_no(text: str) -> bool:
    # policyd-spf tests these against 'No' only; anything else means Yes.
    return _choice("Yes", "No")(text) == "Yes"


def _loose_bool(text: str) -> bool:
    # For keys policyd-spf feeds to bool() (Mock, IntHosts): see module docstring.
    if text in ("True", "true", "Yes", "yes", "1"):
        return True
    if text in ("False", "false", "No", "no", "0", ""):
        return False
    raise ValueError("expected True or False")


def _int(minimum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError("expected an integer") from None
        if minimum is not None and value < minimum:
            raise ValueError(f"must be at least {minimum}")
        return value

    return parse


def _optional_int(text: str) -> int | None:
    return _int()(text) if text else None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise ValueError("must be a positive number of seconds")
    return value


def _hold(text: str) -> float:
    value = _seconds(text)
    # RFC 2308 section 7: a failure is not remembered for more than 5 minutes.
    if value > 300:
        raise ValueError("must be at most 300 seconds (RFC 2308 section 7)")
    return value


def _octal(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise ValueError("expected an octal mode such as 0666") from None
    if not 0 <= value <= 0o7777:
        raise ValueError("mode out of range")
    return value


def _text(text: str) -> str:
    return text


def _file_path(text: str) -> str:
    if text and not text.startswith("/"):
        raise ValueError(f"expected an absolute path or nothing: {text!r}")
    if text.endswith("/"):
        raise ValueError(f"expected a file, not a directory: {text!r}")
    return text


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _domains(text: str) -> tuple[str, ...]:
    return tuple(item.lower() for item in _items(text))


def _strings(text: str) -> tuple[str, ...]:
    return tuple(_items(text))


def _networks(text: str) -> tuple[IPNetwork, ...]:
    networks = []
    for item in _items(text):
        try:
            # strict, like policyd-spf: host bits set is an error, not a guess.
            networks.append(ipaddress.ip_network(item))
        except ValueError as exc:
            raise ValueError(f"bad IP network {item!r}: {exc}") from None
    return tuple(networks)


def _ip(text: str) -> str:
    if text:
        try:
            ipaddress.ip_address(text)
        except ValueError:
            raise ValueError(f"expected an IP address, got {text!r}") from None
    return text


def _reason_message(text: str) -> str:
    try:
        text.format(rejectdefer="rejected", spf="x", url="y")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"bad format string ({exc!r}); use only {{rejectdefer}}, {{spf}} and {{url}}"
        ) from None
    return text


def _reason_url(text: str) -> str:
    try:
        text.format("mfrom", "id", "192.0.2.1", "example.org")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"bad format string ({exc!r}); use only {{0}} to {{3}}") from None
    return text


def _authserv_id(text: str) -> str:
    return text


def _listen(text: str) -> tuple[ListenAddress, ...]:
    addresses = []
    for item in _items(text):
        family, colon, rest = item.partition(":")
        if not colon or not rest:
            raise ValueError(f"bad Listen entry {item!r}: expected unix:/path or inet:host:port")
        if family == "unix":
            if not rest.startswith("/"):
                raise ValueError(f"unix socket path must be absolute: {rest!r}")
            addresses.append(ListenAddress(ListenFamily.UNIX, path=rest))
        elif family == "inet":
            address = HostPort.parse(rest)
            addresses.append(ListenAddress(ListenFamily.INET, host=address.host, port=address.port))
        else:
            raise ValueError(f"bad Listen entry {item!r}: expected unix: or inet:")
    if not addresses:
        raise ValueError("Listen needs at least one address")
    return tuple(addresses)


def _interval(text: str) -> float | None:
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a number of seconds (0 = off)") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be 0 (off) or a positive number of seconds")
    return value


def _metrics_listen(text: str) -> HostPort | None:
    if not text:
        return None
    return HostPort.parse(text.removeprefix("inet:"))


def _nameservers(text: str) -> tuple[Nameserver, ...]:
    servers = []
    for item in _items(text):
        server = Nameserver.parse(item, default_port=53)
        try:
            ipaddress.ip_address(server.host)
        except ValueError:
            raise ValueError(f"nameserver must be an IP address: {server.host!r}") from None
        servers.append(server)
    return tuple(servers)


_SHARED_SCHEMES = ("redis", "rediss", "unix")
_URL_KEYS = frozenset({"Reason_URL", "Shared_Cache"})


def _shared_cache(text: str) -> str:
    if not text:
        return ""
    try:
        url = urllib.parse.urlsplit(text)
        url.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise ValueError(f"not a URL: {exc}") from None
    if url.scheme not in _SHARED_SCHEMES:
        raise ValueError("expected redis://HOST:PORT/DB, rediss://HOST:PORT/DB or unix:///path")
    if url.scheme == "unix" and (url.netloc or not url.path.startswith("/")):
        raise ValueError("expected unix:///absolute/path/redis.sock")
    if url.scheme != "unix" and not url.hostname:
        raise ValueError("expected a host: redis://HOST:PORT/DB")
    return text


def _timeout(text: str) -> float:
    value = _seconds(text)
    if not 0 < value <= 10:
        raise ValueError("must be more than 0 and at most 10 seconds")
    return value


def _log_target(text: str) -> tuple[LogTarget, ...]:
    targets = []
    for item in _items(text):
        try:
            targets.append(LogTarget(item))
        except ValueError:
            raise ValueError(f"bad log target {item!r}: expected syslog and/or stderr") from None
    if not targets:
        raise ValueError("expected syslog, stderr or syslog,stderr")
    return tuple(dict.fromkeys(targets))


class Origin(enum.StrEnum):
    """Where a key comes from (the man page and the example file group by it)."""

    POLICYD_SPF = "policyd-spf"  # policyd-spf 3.0.4, same meaning here
    SPF_ENGINE = "spf-engine 3.1.0"  # policyd-spf's later releases
    MILTER = "policyd-spf milter"  # read by its milter only: accepted, ignored here
    SPFPOLICY = "spfpolicy"  # our own server keys


@dataclass(frozen=True, slots=True)
class _Key:
    field: str
    parse: Callable[[str], Any]
    per_user: bool = False  # may appear in a Per_User line
    # The documentation: spfpolicy.conf(5), conf/spfpolicy.conf and the
    # README's key list are generated from it (spfpolicy.manual), and a test
    # fails for a key with an empty doc. Paragraphs are separated by a blank
    # line; the first sentence is the README's summary.
    doc: str = ""
    origin: Origin = Origin.SPFPOLICY
    unit: str = ""  # of a quantity: seconds, bytes, entries...
    choices: tuple[tuple[str, str], ...] = ()  # (value, meaning) of an enumerated key


# The defaults, written once (above): the modules that take a setting as a
# parameter (protocol, resolver, evaluator, memory) default to these.
DEFAULTS = Settings()

_P = Origin.POLICYD_SPF
_REJECT_CHOICES = (
    ("SPF_Not_Pass", "Fail, Softfail and Neutral"),
    ("Softfail", "Fail and Softfail"),
    ("Fail", "Fail only"),
)
_REJECT_NEVER = (
    ("False", "never; the result only goes into the header"),
    ("No_Check", "no check at all"),
)

# Key name -> Settings field. policyd-spf's keys first, then our own.
_KEYS: Mapping[str, _Key] = {
    "debugLevel": _Key(
        "debug_level",
        _int(),
        per_user=True,
        origin=_P,
        doc="How much to log, from -1 (nothing after start-up) to 5. 0 logs errors only, "
        "1 one line per decision, 2 and more the SPF results and debugging detail; 4 adds "
        "every attribute of every request.\n\nIn a Per_User line it has no effect: "
        "requests are logged at the global level.",
    ),
    "TestOnly": _Key(
        "test_only",
        _int(),
        origin=_P,
        doc="Test mode when 0: headers are still added, but nothing is ever rejected, "
        "deferred or sent to a pass restriction. Any other integer means normal operation.",
    ),
    "defaultSeedOnly": _Key(
        "default_seed_only",
        _optional_int,
        per_user=True,
        origin=_P,
        doc="Old name of TestOnly, deprecated. Accepted and ignored, as by policyd-spf.",
    ),
    "HELO_reject": _Key(
        "helo_reject",
        _enum(HeloReject),
        per_user=True,
        origin=_P,
        doc="Which results of the HELO check are rejected.",
        choices=(
            *_REJECT_CHOICES,
            ("Null", "Fail only, and only when the envelope sender is empty (<>)"),
            *_REJECT_NEVER,
        ),
    ),
    "Mail_From_reject": _Key(
        "mail_from_reject",
        _enum(MailFromReject),
        per_user=True,
        origin=_P,
        doc="Which results of the MAIL FROM check are rejected.",
        choices=(*_REJECT_CHOICES, *_REJECT_NEVER),
    ),
    "PermError_reject": _Key(
        "permerror_reject",
        _true_false,
        per_user=True,
        origin=_P,
        doc="Whether a PermError (a broken SPF record) is rejected, with 5.7.24. False "
        "treats it like no record at all. It does not apply to a scope whose *_reject key "
        "is False.",
    ),
    "TempError_Defer": _Key(
        "temperror_defer",
        _true_false,
        per_user=True,
        origin=_P,
        doc="Whether a TempError (DNS trouble) is deferred with defer_if_permit. False "
        "treats it like no record at all.",
    ),
    "No_Mail": _Key(
        "no_mail",
        _true_false,
        per_user=True,
        origin=_P,
        doc="When True, reject only mail from domains whose record is exactly "
        '"v=spf1 -all" (domains that send no mail). Every other reject becomes a header.',
    ),
    "HELO_pass_restriction": _Key(
        "helo_pass_restriction",
        _text,
        per_user=True,
        origin=_P,
        doc="A Postfix restriction class (or any access(5) action) answered instead of a "
        "header when the HELO check passes. Empty means none.",
    ),
    "Mail_From_pass_restriction": _Key(
        "mail_from_pass_restriction",
        _text,
        per_user=True,
        origin=_P,
        doc="A Postfix restriction class (or any access(5) action) answered instead of a "
        "header when the MAIL FROM check passes. Empty means none.",
    ),
    "Reject_Not_Pass_Domains": _Key(
        "reject_not_pass_domains",
        _domains,
        per_user=True,
        origin=_P,
        doc="Comma-separated domains held to SPF_Not_Pass whatever the *_reject keys "
        "say. A Neutral or Softfail for a HELO name or sender domain in one of them, or "
        "below one, is rejected like a Fail.",
    ),
    "Prospective": _Key(
        "prospective",
        _ip,
        per_user=True,
        origin=_P,
        doc="An IP address to check every client as, instead of its own. It is meant for "
        "an outbound relay that wants to see what its recipients will see. No header is "
        "added in this mode; rejects still happen.",
    ),
    "skip_addresses": _Key(
        "skip_addresses",
        _networks,
        per_user=True,
        origin=_P,
        doc="Comma-separated networks (CIDR, or single addresses) whose clients are never "
        'checked. A header "X-Comment: SPF check N/A for local connections" is added '
        "instead. Empty means every client is checked.",
    ),
    "Whitelist": _Key(
        "whitelist",
        _networks,
        per_user=True,
        origin=_P,
        doc="Comma-separated networks of trusted relays (backup MX, forwarders) whose mail "
        "is not checked. A trace header says so.",
    ),
    "HELO_Whitelist": _Key(
        "helo_whitelist",
        _domains,
        per_user=True,
        origin=_P,
        doc="Comma-separated HELO names whose mail is not checked. The client's address "
        "must be among the name's A records (for IPv4) or AAAA records (for IPv6).",
    ),
    "Domain_Whitelist": _Key(
        "domain_whitelist",
        _domains,
        per_user=True,
        origin=_P,
        doc="Comma-separated domains whose SPF pass exempts a client from further checks. "
        "It suits forwarders that publish SPF records.",
    ),
    "Domain_Whitelist_PTR": _Key(
        "domain_whitelist_ptr",
        _domains,
        per_user=True,
        origin=_P,
        doc="Comma-separated domains: a client whose forward-confirmed reverse DNS name "
        "is one of them, or below one, is not checked further.",
    ),
    "SPF_Enhanced_Status_Codes": _Key(
        "spf_enhanced_status_codes",
        _yes_no,
        per_user=True,
        origin=_P,
        doc="Whether answers carry the RFC 7372 enhanced status codes: 5.7.23 for an SPF "
        "fail, 5.7.24 for a PermError, 4.7.24 for a defer. With No, Postfix picks them.",
    ),
    "Header_Type": _Key(
        "header_type",
        _enum(HeaderType),
        per_user=True,
        origin=_P,
        doc="Which header records the result.",
        choices=(
            ("SPF", "Received-SPF (RFC 7208 section 9.1)"),
            ("AR", "Authentication-Results (RFC 8601); needs Authserv_Id"),
            ("None", "no header; results are still enforced"),
        ),
    ),
    "Hide_Receiver": _Key(
        "hide_receiver",
        _yes_no,
        per_user=True,
        origin=_P,
        doc="With Yes, headers and reject texts show <UNKNOWN> instead of the recipient's "
        "domain. It has no effect when Per_User is set.",
    ),
    "Authserv_Id": _Key(
        "authserv_id",
        _authserv_id,
        origin=_P,
        doc="The authserv-id written in Authentication-Results headers. HOSTNAME stands "
        "for this host's name. It must not be empty when Header_Type is AR.",
    ),
    "Lookup_Time": _Key(
        "lookup_time",
        _int(1),
        per_user=True,
        origin=_P,
        unit="seconds",
        doc="Time allowed for one SPF check. The HELO and the MAIL FROM check get this much each.",
    ),
    "Whitelist_Lookup_Time": _Key(
        "whitelist_lookup_time",
        _int(1),
        per_user=True,
        origin=_P,
        unit="seconds",
        doc="Time allowed for each whitelisting method that needs DNS (Domain_Whitelist, "
        "HELO_Whitelist, Domain_Whitelist_PTR).",
    ),
    "Void_Limit": _Key(
        "void_limit",
        _int(0),
        per_user=True,
        origin=_P,
        unit="lookups",
        doc="DNS lookups in one SPF check that may come back empty before the check is a "
        "PermError (RFC 7208 section 4.6.4).",
    ),
    "Reason_Message": _Key(
        "reason_message",
        _reason_message,
        per_user=True,
        origin=_P,
        doc='The text of rejects and defers. {rejectdefer} becomes "rejected" or '
        '"deferred", {spf} the SPF explanation and {url} the Reason_URL.',
    ),
    "Reason_URL": _Key(
        "reason_url",
        _reason_url,
        origin=Origin.SPF_ENGINE,
        doc="The {url} of Reason_Message. {0} becomes helo or mfrom, {1} the identity "
        "checked, {2} the client's IP address and {3} the recipient. Unlike other values, "
        'it may contain "=".',
    ),
    "Mock": _Key(
        "mock",
        _loose_bool,
        origin=_P,
        doc="When True, every request is answered with a fixed dummy header and nothing "
        "else. A second, Mock-only service in front of the real one works around milters "
        "that cannot see the first header added.",
    ),
    "QueueID": _Key(
        "queue_id",
        _loose_bool,
        origin=_P,
        doc="Whether decision log lines start with the Postfix queue id. policyd-spf "
        "documents the key but never reads it.",
    ),
    "Per_User": _Key(
        "per_user",
        _text,
        origin=_P,
        doc='Per-recipient settings, as "text,/path/to/file". Each line of the file is '
        '"recipient@example.org,Key=value|Key=value"; the first line for a recipient '
        "wins. The file is read whenever the configuration is loaded (at start and on "
        "SIGHUP), and only keys marked as settable per recipient may appear in it.",
    ),
    "Socket": _Key(
        "socket",
        _text,
        origin=Origin.MILTER,
        doc="The milter's socket. Accepted and ignored.",
    ),
    "PidFile": _Key(
        "pid_file",
        _text,
        origin=Origin.MILTER,
        doc="The milter's PID file. Accepted and ignored.",
    ),
    "UserID": _Key(
        "user_id",
        _text,
        origin=Origin.MILTER,
        doc="The user the milter runs as. Accepted and ignored: see User for spfpolicy's own.",
    ),
    "UMask": _Key(
        "umask",
        _int(0),
        origin=Origin.MILTER,
        doc="The milter's umask, a decimal integer. Accepted and ignored.",
    ),
    "InternalHosts": _Key(
        "internal_hosts",
        _strings,
        origin=Origin.MILTER,
        doc="The milter's comma-separated internal hosts. Accepted and ignored.",
    ),
    "IntHosts": _Key(
        "int_hosts",
        _loose_bool,
        origin=Origin.MILTER,
        doc="Whether the milter treats internal hosts specially. Accepted and ignored.",
    ),
    "MacroList": _Key(
        "macro_list",
        _strings,
        origin=Origin.MILTER,
        doc="The milter's comma-separated macro list. Accepted and ignored.",
    ),
    # spfpolicy
    "Listen": _Key(
        "listen",
        _listen,
        doc="Where to accept Postfix's connections: comma-separated unix:/path and "
        "inet:host:port entries ([address]:port for IPv6). Postfix's main.cf then says "
        "check_policy_service unix:private/policyd-spf. When systemd passes sockets, "
        "this key is not used.",
    ),
    "Socket_Mode": _Key(
        "socket_mode",
        _octal,
        doc="Permissions of the unix sockets, in octal, set after binding.",
    ),
    "Socket_Owner": _Key(
        "socket_owner",
        _text,
        doc="Owner of the unix sockets, a name or number. Empty leaves it as created.",
    ),
    "Socket_Group": _Key(
        "socket_group",
        _text,
        doc="Group of the unix sockets, a name or number. Empty leaves it as created.",
    ),
    "Nameservers": _Key(
        "nameservers",
        _nameservers,
        doc="Comma-separated DNS servers, as IP[:PORT] ([address]:port for IPv6). Empty "
        "means the nameserver lines of /etc/resolv.conf, read at start and on each "
        "reload.",
    ),
    "DNS_Timeout": _Key(
        "dns_timeout",
        _seconds,
        unit="seconds",
        doc="Wait for the first try of an upstream DNS query. c-ares tries a query 4 "
        "times, doubling the wait each time, and shortens the waits to what the server's "
        "response times suggest. The SPF check itself still ends at Lookup_Time.",
    ),
    "DNS_Cache_Size": _Key(
        "dns_cache_size",
        _int(0),
        unit="entries",
        doc="Size of the DNS answer cache shared by all requests.",
    ),
    "DNS_Min_TTL": _Key(
        "dns_min_ttl",
        _int(0),
        unit="seconds",
        doc="Shortest time a DNS answer is cached, negative answers included, whatever its TTL.",
    ),
    "DNS_Max_TTL": _Key(
        "dns_max_ttl",
        _int(0),
        unit="seconds",
        doc="Longest time a DNS answer is cached, negative answers included, whatever its "
        "TTL. Must not be below DNS_Min_TTL.",
    ),
    "DNS_Negative_TTL": _Key(
        "dns_negative_ttl",
        _int(0),
        unit="seconds",
        doc="Cap on how long an NXDOMAIN or empty answer is cached. Such answers are kept "
        "for the negative TTL of the SOA in the reply (RFC 2308), and for this long when "
        "the reply has none.",
    ),
    "Slow_Domain_Threshold": _Key(
        "slow_domain_threshold",
        _int(0),
        unit="failures",
        doc="Failures of a name within Slow_Domain_Window that hold it down; 0 is off. "
        "A name whose lookups time out or fail (SERVFAIL, refused) this many times within "
        "Slow_Domain_Window is held down for Slow_Domain_Hold: checks that need it get "
        "TempError at once (what a timeout gives them, so TempError_Defer decides as "
        "before) instead of each making an smtpd wait Lookup_Time. A timeout counts when "
        "the resolver gives up on a query, or when a check runs out of Lookup_Time after "
        "waiting at least half of it for the name. The name held down is the one that "
        "failed: a sender whose record includes a dead provider is held down through that "
        "include only. An answer forgets earlier failures. 0 switches it off.\n\n"
        "The default: three messages that each waited for a name within a minute hold it "
        "down, while one lost reply or SERVFAIL does not.",
    ),
    "Slow_Domain_Window": _Key(
        "slow_domain_window",
        _seconds,
        unit="seconds",
        doc="The time within which Slow_Domain_Threshold failures of a name hold it down.",
    ),
    "Slow_Domain_Hold": _Key(
        "slow_domain_hold",
        _hold,
        unit="seconds",
        doc="How long a name stays held down, at most 300 (RFC 2308 section 7). When it "
        "ends, the next check that needs the name sends one probe lookup and waits for it: "
        "an answer releases the name, a failure holds it down again. The default costs at "
        "most one probe's wait per name every two minutes, and releases a name that "
        "answers again before Postfix first retries a deferred message "
        "(minimal_backoff_time, 300 s).",
    ),
    "Shared_Cache": _Key(
        "shared_cache",
        _shared_cache,
        doc="URL of a Redis that holds a second level of DNS answers and SPF results, shared "
        "by several MX hosts; empty turns it off. "
        "redis://[USER:PASSWORD@]HOST[:PORT][/DB], rediss://... for TLS, or "
        "unix:///path/redis.sock[?db=DB]. A lookup missing in the process's own DNS cache "
        "asks Redis before DNS, and an answer from DNS is written there after the reply, "
        "for its remaining TTL; likewise a check missing in the result cache asks Redis "
        "before evaluating (with Result_Cache_TTL above 0). Redis never costs an answer: "
        "an error, a timeout, a refused connection or write, a wrong password or an entry "
        "that does not decode is a miss, counted and logged once per outage. It needs "
        "redis-py and hiredis (pip install 'spfpolicy[redis]'). Changing it needs a "
        "restart.",
    ),
    "Shared_Cache_Prefix": _Key(
        "shared_cache_prefix",
        _text,
        doc="Prefix of every key spfpolicy writes in the shared cache's Redis. The keys "
        "also carry a format version, so that a release with another format reads older "
        "entries as misses.",
    ),
    "Shared_Cache_Timeout": _Key(
        "shared_cache_timeout",
        _timeout,
        unit="seconds",
        doc="Deadline of each shared-cache operation, at most 10. A lookup Redis does "
        "not answer within it goes to DNS, so a slow or stopped Redis adds at most this "
        "much to each lookup; a reply already received when the deadline comes (the event "
        "loop was busy, not Redis) is still used. Writes are sent after the answer, with "
        "the same deadline. After a refused connection, a wrong password or two timeouts "
        "without a success between them, Redis is left alone for a backoff (0.5 s, "
        "doubling up to 30 s) before it is tried again.",
    ),
    "Shared_Cache_Password_File": _Key(
        "shared_cache_password_file",
        _text,
        doc="File holding the password of the shared cache's Redis (AUTH), read at start; "
        "a password in the Shared_Cache URL wins. Empty means none, or the URL's.",
    ),
    "Shared_Cache_CA_File": _Key(
        "shared_cache_ca_file",
        _file_path,
        doc="CA certificates (PEM) a rediss:// Shared_Cache's certificate must chain to. "
        "For a Redis with a certificate of the site's own CA; empty means the system's "
        "CAs. The certificate must also name the URL's host. A certificate that does "
        "not verify is an outage like any other: answers go on from DNS.",
    ),
    "Result_Cache_Size": _Key(
        "result_cache_size",
        _int(0),
        unit="entries",
        doc="Size of the SPF result cache. It also bounds the memo of whole verdicts "
        "(same client, HELO, sender and recipient domain).",
    ),
    "Result_Cache_TTL": _Key(
        "result_cache_ttl",
        _int(0),
        unit="seconds",
        doc="How long an SPF result is reused. 0 turns the result cache off.",
    ),
    "Max_Connections": _Key(
        "max_connections",
        _int(1),
        unit="connections",
        doc="Most Postfix connections served at once. One more is closed at once, and logged.",
    ),
    "Request_Timeout": _Key(
        "request_timeout",
        _seconds,
        unit="seconds",
        doc="Time allowed for one whole request. A request that takes longer is answered "
        "DUNNO, or deferred when TempError_Defer is True. Keep it below Postfix's "
        "smtpd_policy_service_timeout (100 s).",
    ),
    "Max_In_Flight": _Key(
        "max_in_flight",
        _int(1),
        unit="requests",
        doc="Requests evaluated at the same time. More wait for a slot, within their "
        "Request_Timeout; this bounds memory and upstream DNS load in a flood.",
    ),
    "Idle_Timeout": _Key(
        "idle_timeout",
        _seconds,
        unit="seconds",
        doc="How long a connection may stay without a request before it is closed. It is "
        "longer than Postfix's max_idle (300 s), so Postfix normally closes first.",
    ),
    "Max_Line_Length": _Key(
        "max_line_length",
        _int(256),
        unit="bytes",
        doc="Longest attribute line of a request. A request breaking a protocol limit "
        "closes its connection (logged); Postfix's own requests stay far below.",
    ),
    "Max_Attributes": _Key(
        "max_attributes",
        _int(16),
        unit="attributes",
        doc="Most attributes in one request; Postfix 3 sends about 35.",
    ),
    "Max_Request_Size": _Key(
        "max_request_size",
        _int(1024),
        unit="bytes",
        doc="Largest request; real requests are under 2 KiB.",
    ),
    "Instance_Cache_Size": _Key(
        "instance_cache_size",
        _int(0),
        unit="messages",
        doc="Messages remembered, so that the header is added once per message and a "
        "reject is repeated for every recipient.",
    ),
    "Instance_TTL": _Key(
        "instance_ttl",
        _int(0),
        unit="seconds",
        doc="How long a message is remembered (see Instance_Cache_Size).",
    ),
    "Log_Target": _Key(
        "log_target",
        _log_target,
        doc="Where logs go: syslog, stderr, or syslog,stderr.",
    ),
    "User": _Key(
        "user",
        _text,
        doc="The user to switch to once the sockets are bound, when started as root "
        "without systemd. Empty keeps the starting user. Under systemd, the unit's User= "
        "does this instead.",
    ),
    "Group": _Key(
        "group",
        _text,
        doc="The group to switch to along with User. Empty means the user's primary group.",
    ),
    "Shutdown_Grace": _Key(
        "shutdown_grace",
        _seconds,
        unit="seconds",
        doc="On SIGTERM or SIGINT, time for the requests already read to be answered. A "
        "check still running at the end gets the fallback answer. Keep it below "
        "systemd's TimeoutStopSec (45 s in the shipped unit).",
    ),
    "Stats_Interval": _Key(
        "stats_interval",
        _interval,
        unit="seconds",
        doc="Time between one-line stats summaries in the log. 0 turns them off; unset "
        f"means every {DEFAULT_STATS_INTERVAL:g} seconds at debugLevel 1 or more, and "
        "off at debugLevel 0.",
    ),
    "Metrics_Listen": _Key(
        "metrics_listen",
        _metrics_listen,
        doc="host:port of the Prometheus endpoint, which serves /metrics (and /domains, "
        "see Domain_Stats_Size). Empty turns it off. It needs prometheus-client (pip "
        "install 'spfpolicy[metrics]').",
    ),
    "Domain_Stats_Size": _Key(
        "domain_stats_size",
        _int(0),
        unit="entries",
        doc="Slots of the per-domain statistics (sender domains, or HELO names for bounces, "
        "with their SPF results and actions over the last hour); 0 turns them off. Each of "
        "the hour's six 10-minute buckets keeps the busiest domains in this many slots "
        "(space-saving: a new domain takes the place of the least counted, whose count it "
        "inherits as an error bound). Served as JSON on the metrics listener (/domains) "
        "and read by spfpolicy top; a domain whose usual result changes is logged once as "
        "a warning. No per-domain Prometheus labels.",
    ),
    "Cache_File": _Key(
        "cache_file",
        _file_path,
        doc="File the DNS cache is kept in across restarts; empty turns it off. On a "
        "clean stop, once the last answers are sent, the live entries are written to a "
        "temporary file in the same directory (mode 0600), then renamed over this one. At "
        "start they are read back with the time they had left, expired ones dropped, so "
        "the domains known before the restart are answered without DNS. A file that is "
        "damaged, of another format version, larger than 1 KiB per DNS_Cache_Size entry, "
        "not owned by the server's user, or writable by group or others is ignored with "
        "a warning, and the server starts with an empty cache. The directory must be "
        "writable by the server's user: the shipped systemd unit gives it "
        "/var/lib/spfpolicy (StateDirectory=spfpolicy).",
    ),
}

# The per-user parser of policyd-spf 3.0.4 knows "Authserv-Id" (with a hyphen)
# and stores it where nothing reads it: accepted, no effect.
_PER_USER_IGNORED = frozenset({"Authserv-Id"})


def _parse_value(path: str | os.PathLike[str], lineno: int, name: str, text: str) -> Any:
    key = _KEYS[name]
    try:
        return key.parse(text)
    except ValueError as exc:
        raise ConfigError(path, lineno, f"bad value for {name}: {text!r}: {exc}") from None


def _lines(path: Path) -> list[tuple[int, str]]:
    """Numbered, comment-stripped, non-blank lines."""
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, None, f"not UTF-8 text: {exc}") from None
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read: {exc.strerror or exc}") from None
    out = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        # As in policyd-spf, "#" starts a comment anywhere, even inside a value.
        text = line.split("#", 1)[0].strip()
        if text:
            out.append((lineno, text))
    return out


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    hostname: Callable[[], str] = socket.gethostname,
) -> Settings:
    """Read a policyd-spf.conf-style file into Settings.

    ``None`` means DEFAULT_CONFIG_PATH if it exists, else the defaults (as
    policyd-spf runs on its defaults without a file); an explicitly given
    file that is missing is an error. ``hostname`` resolves
    ``Authserv_Id = HOSTNAME`` (injectable for tests).
    """
    if path is None:
        default = Path(DEFAULT_CONFIG_PATH)
        if not default.exists():
            return _finish(Settings(), {}, default, hostname)
        file = default
    else:
        file = Path(path)
        if not file.is_file():
            what = "no such file" if not file.exists() else "not a regular file"
            raise ConfigError(file, None, what)
    values: dict[str, Any] = {}
    lines: dict[str, int] = {}
    for lineno, text in _lines(file):
        parts = [part.strip() for part in text.split("=")]
        if len(parts) < 2:
            raise ConfigError(file, lineno, f"expected 'Key = value', got {text!r}")
        name = parts[0]
        if name not in _KEYS:
            raise ConfigError(file, lineno, f"unknown key {name!r}")
        if len(parts) > 2 and name not in _URL_KEYS:
            # policyd-spf skips such lines with a log message; only URLs
            # (Reason_URL, spf-engine 3.1.0; Shared_Cache's ?db=) may contain "=".
            raise ConfigError(file, lineno, f"more than one '=' in {text!r}")
        value_text = text.split("=", 1)[1].strip()
        values[_KEYS[name].field] = _parse_value(file, lineno, name, value_text)
        lines[_KEYS[name].field] = lineno  # the last occurrence wins, as in policyd-spf
    return _finish(Settings(), values, file, hostname, lines)


def _finish(
    base: Settings,
    values: dict[str, Any],
    file: Path,
    hostname: Callable[[], str],
    lines: Mapping[str, int] | None = None,
) -> Settings:
    lines = lines or {}
    per_user_spec = values.pop("per_user", "")
    settings = base.replace(**values)
    if settings.authserv_id == AUTHSERV_HOSTNAME:
        settings = settings.replace(authserv_id=hostname())
    if settings.header_type is HeaderType.AR and not settings.authserv_id:
        raise ConfigError(
            file, lines.get("authserv_id"), "Header_Type = AR needs a non-empty Authserv_Id"
        )
    if settings.dns_min_ttl > settings.dns_max_ttl:
        raise ConfigError(file, lines.get("dns_min_ttl"), "DNS_Min_TTL is larger than DNS_Max_TTL")
    if per_user_spec:
        table = _load_per_user(file, lines.get("per_user"), per_user_spec)
        settings = settings.replace(per_user=table)
    return settings


def _load_per_user(file: Path, lineno: int | None, spec: str) -> PerUserTable:
    kind, comma, location = spec.partition(",")
    if not comma or kind.strip() != "text" or not location.strip():
        raise ConfigError(
            file, lineno, f"bad value for Per_User: {spec!r}: expected text,/path/to/file"
        )
    user_file = Path(location.strip())
    if not user_file.is_file():
        # policyd-spf logs this per request and falls back to the global settings.
        raise ConfigError(file, lineno, f"Per_User file {str(user_file)!r} does not exist")
    entries: dict[str, tuple[tuple[str, Any], ...]] = {}
    for user_line, text in _lines(user_file):
        user, comma, rest = text.partition(",")
        user = user.strip().lower()
        if not comma or not user:
            raise ConfigError(user_file, user_line, "expected 'recipient,Key=value|Key=value'")
        changes: dict[str, Any] = {}
        for pair in rest.split("|"):
            parts = [part.strip() for part in pair.split("=")]
            if len(parts) != 2:
                raise ConfigError(user_file, user_line, f"expected Key=value, got {pair!r}")
            name, value_text = parts
            if name in _PER_USER_IGNORED:
                continue
            key = _KEYS.get(name)
            if key is None or not key.per_user:
                raise ConfigError(user_file, user_line, f"key {name!r} cannot be set per user")
            changes[key.field] = _parse_value(user_file, user_line, name, value_text)
        # The first line for a recipient wins, as in policyd-spf.
        entries.setdefault(user, tuple(changes.items()))
    return PerUserTable(str(user_file), tuple(entries.items()))


def parse_listen(text: str) -> tuple[ListenAddress, ...]:
    """``Listen`` syntax, for the command line's --listen (ValueError if bad)."""
    return _listen(text)


def parse_log_target(text: str) -> tuple[LogTarget, ...]:
    """``Log_Target`` syntax, for the command line's --log-target."""
    return _log_target(text)


def parse_nameservers(text: str) -> tuple[Nameserver, ...]:
    """``Nameservers`` syntax, for the command line's --nameserver."""
    return _nameservers(text)


@dataclass(frozen=True, slots=True)
class KeyDoc:
    """One key as the documentation shows it (see spfpolicy.manual)."""

    name: str
    field: str
    default: str  # the default, written as in the file ("" = empty)
    doc: str
    origin: Origin
    unit: str
    per_user: bool
    choices: tuple[tuple[str, str], ...]


def documented_keys() -> list[KeyDoc]:
    """Every key of the table, in its order, with its default as file text."""
    return [
        KeyDoc(
            name=name,
            field=key.field,
            default=_show(key, getattr(DEFAULTS, key.field)),
            doc=key.doc,
            origin=key.origin,
            unit=key.unit,
            per_user=key.per_user,
            choices=key.choices,
        )
        for name, key in _KEYS.items()
    ]


def parse_key(name: str, text: str) -> Any:
    """One key's value parsed from file text (ValueError if bad)."""
    return _KEYS[name].parse(text)


def _show(key: _Key, value: Any) -> str:
    """A value written as the file would give it: ``parse(_show(v)) == v``."""
    if value is None:
        return ""
    if isinstance(value, bool):
        if key.parse is _yes_no:
            return "Yes" if value else "No"
        return "True" if value else "False"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, tuple):
        return ",".join(_show(key, item) for item in value)
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        # A single address is written bare, as a site writes it.
        address = value.network_address
        mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.0, not ::ffff:7f00:0
        text = f"::ffff:{mapped}" if mapped is not None else str(address)
        single = value.prefixlen == value.max_prefixlen
        return text if single else f"{text}/{value.prefixlen}"
    if key.parse is _octal:
        return f"0{value:o}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
