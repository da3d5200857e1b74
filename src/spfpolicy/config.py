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
    "ListenAddress",
    "ListenFamily",
    "LogTarget",
    "MailFromReject",
    "Nameserver",
    "PerUserTable",
    "Settings",
    "load_settings",
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


@dataclass(frozen=True, slots=True)
class _Key:
    field: str
    parse: Callable[[str], Any]
    per_user: bool = False  # may appear in a Per_User line


# The defaults, written once (above): the modules that take a setting as a
# parameter (protocol, resolver, evaluator, memory) default to these.
DEFAULTS = Settings()


# Key name -> Settings field. policyd-spf's keys first, then our own.
_KEYS: Mapping[str, _Key] = {
    "debugLevel": _Key("debug_level", _int(), per_user=True),
    "TestOnly": _Key("test_only", _int()),
    "defaultSeedOnly": _Key("default_seed_only", _optional_int, per_user=True),
    "HELO_reject": _Key("helo_reject", _enum(HeloReject), per_user=True),
    "Mail_From_reject": _Key("mail_from_reject", _enum(MailFromReject), per_user=True),
    "PermError_reject": _Key("permerror_reject", _true_false, per_user=True),
    "TempError_Defer": _Key("temperror_defer", _true_false, per_user=True),
    "No_Mail": _Key("no_mail", _true_false, per_user=True),
    "HELO_pass_restriction": _Key("helo_pass_restriction", _text, per_user=True),
    "Mail_From_pass_restriction": _Key("mail_from_pass_restriction", _text, per_user=True),
    "Reject_Not_Pass_Domains": _Key("reject_not_pass_domains", _domains, per_user=True),
    "Prospective": _Key("prospective", _ip, per_user=True),
    "skip_addresses": _Key("skip_addresses", _networks, per_user=True),
    "Whitelist": _Key("whitelist", _networks, per_user=True),
    "HELO_Whitelist": _Key("helo_whitelist", _domains, per_user=True),
    "Domain_Whitelist": _Key("domain_whitelist", _domains, per_user=True),
    "Domain_Whitelist_PTR": _Key("domain_whitelist_ptr", _domains, per_user=True),
    "SPF_Enhanced_Status_Codes": _Key("spf_enhanced_status_codes", _yes_no, per_user=True),
    "Header_Type": _Key("header_type", _enum(HeaderType), per_user=True),
    "Hide_Receiver": _Key("hide_receiver", _yes_no, per_user=True),
    "Authserv_Id": _Key("authserv_id", _authserv_id),
    "Lookup_Time": _Key("lookup_time", _int(1), per_user=True),
    "Whitelist_Lookup_Time": _Key("whitelist_lookup_time", _int(1), per_user=True),
    "Void_Limit": _Key("void_limit", _int(0), per_user=True),
    "Reason_Message": _Key("reason_message", _reason_message, per_user=True),
    "Reason_URL": _Key("reason_url", _reason_url),
    "Mock": _Key("mock", _loose_bool),
    "QueueID": _Key("queue_id", _loose_bool),
    "Per_User": _Key("per_user", _text),  # resolved by _load_per_user
    "Socket": _Key("socket", _text),
    "PidFile": _Key("pid_file", _text),
    "UserID": _Key("user_id", _text),
    "UMask": _Key("umask", _int(0)),
    "InternalHosts": _Key("internal_hosts", _strings),
    "IntHosts": _Key("int_hosts", _loose_bool),
    "MacroList": _Key("macro_list", _strings),
    # spfpolicy
    "Listen": _Key("listen", _listen),
    "Socket_Mode": _Key("socket_mode", _octal),
    "Socket_Owner": _Key("socket_owner", _text),
    "Socket_Group": _Key("socket_group", _text),
    "Nameservers": _Key("nameservers", _nameservers),
    "DNS_Timeout": _Key("dns_timeout", _seconds),
    "DNS_Cache_Size": _Key("dns_cache_size", _int(0)),
    "DNS_Min_TTL": _Key("dns_min_ttl", _int(0)),
    "DNS_Max_TTL": _Key("dns_max_ttl", _int(0)),
    "DNS_Negative_TTL": _Key("dns_negative_ttl", _int(0)),
    "Result_Cache_Size": _Key("result_cache_size", _int(0)),
    "Result_Cache_TTL": _Key("result_cache_ttl", _int(0)),
    "Max_Connections": _Key("max_connections", _int(1)),
    "Request_Timeout": _Key("request_timeout", _seconds),
    "Max_In_Flight": _Key("max_in_flight", _int(1)),
    "Idle_Timeout": _Key("idle_timeout", _seconds),
    "Max_Line_Length": _Key("max_line_length", _int(256)),
    "Max_Attributes": _Key("max_attributes", _int(16)),
    "Max_Request_Size": _Key("max_request_size", _int(1024)),
    "Instance_Cache_Size": _Key("instance_cache_size", _int(0)),
    "Instance_TTL": _Key("instance_ttl", _int(0)),
    "Log_Target": _Key("log_target", _log_target),
    "User": _Key("user", _text),
    "Group": _Key("group", _text),
    "Shutdown_Grace": _Key("shutdown_grace", _seconds),
    "Stats_Interval": _Key("stats_interval", _interval),
    "Metrics_Listen": _Key("metrics_listen", _metrics_listen),
    "Domain_Stats_Size": _Key("domain_stats_size", _int(0)),
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
        if len(parts) > 2 and name != "Reason_URL":
            # policyd-spf skips such lines with a log message; only Reason_URL
            # (spf-engine 3.1.0) may contain "=".
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
