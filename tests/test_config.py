"""config.py: defaults, every key, strict errors with file and line."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest

from spfpolicy import config
from spfpolicy.address import HostPort
from spfpolicy.config import (
    ConfigError,
    HeaderType,
    HeloReject,
    ListenAddress,
    ListenFamily,
    LogTarget,
    MailFromReject,
    Nameserver,
    Settings,
    load_settings,
)

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "conf" / "spfpolicy.conf"
DEBIAN = Path("/etc/postfix-policyd-spf-python/policyd-spf.conf")


def host() -> str:
    return "mx.example.net"


def write(tmp_path: Path, text: str, name: str = "policyd-spf.conf") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_text(tmp_path: Path, text: str) -> Settings:
    return load_settings(write(tmp_path, text), hostname=host)


def test_defaults_are_policyd_spf_3_0_4() -> None:
    # policydspfsupp.defaultConfigData of 3.0.4, key by key.
    s = Settings()
    assert s.debug_level == 1
    assert s.helo_reject is HeloReject.FAIL
    assert s.mail_from_reject is MailFromReject.FAIL
    assert s.permerror_reject is False
    assert s.temperror_defer is False
    assert s.skip_addresses == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::ffff:127.0.0.0/104"),
        ipaddress.ip_network("::1/128"),
    )
    assert s.test_only == 1
    assert s.spf_enhanced_status_codes is True
    assert s.header_type is HeaderType.SPF
    assert s.hide_receiver is False
    assert s.authserv_id == "HOSTNAME"
    assert s.lookup_time == 20
    assert s.whitelist_lookup_time == 10
    assert s.void_limit == 2
    assert s.reason_message == "Message {rejectdefer} due to: {spf}. Please see {url}"
    assert s.reason_url == "http://www.openspf.net/Why?s={0};id={1};ip={2};r={3}"
    assert s.no_mail is False
    assert s.mock is False
    assert s.queue_id is True
    assert s.socket == "local:/run/pyspf-milter/pyspf-milter.sock"
    assert s.pid_file == "/run/pyspf-milter/pyspf-milter.pid"
    assert s.user_id == "pyspf-milter"
    assert s.umask == 7
    assert s.internal_hosts == ("127.0.0.1",)
    assert s.int_hosts is False
    assert s.macro_list == ()
    # Keys without a default in policyd-spf: unset.
    assert s.helo_pass_restriction == s.mail_from_pass_restriction == s.prospective == ""
    assert s.whitelist == s.helo_whitelist == s.domain_whitelist == ()
    assert s.domain_whitelist_ptr == s.reject_not_pass_domains == ()
    assert s.per_user is None
    assert s.default_seed_only is None


def test_server_defaults() -> None:
    s = Settings()
    assert s.listen == (
        ListenAddress(ListenFamily.UNIX, path="/var/spool/postfix/private/policyd-spf"),
    )
    assert s.socket_mode == 0o666
    assert s.socket_owner == s.socket_group == ""
    assert s.nameservers == ()
    assert (s.dns_timeout, s.dns_cache_size) == (2.0, 100_000)
    assert (s.dns_min_ttl, s.dns_max_ttl, s.dns_negative_ttl) == (0, 86_400, 300)
    assert (s.result_cache_size, s.result_cache_ttl) == (10_000, 60)
    assert s.max_connections == 4096
    assert (s.max_in_flight, s.idle_timeout) == (1000, 600.0)
    assert s.idle_timeout > 300  # Postfix max_idle
    assert (s.max_line_length, s.max_attributes, s.max_request_size) == (8192, 128, 65536)
    assert s.request_timeout == 60.0
    assert s.request_timeout < 100  # Postfix smtpd_policy_service_timeout
    assert s.request_timeout > 2 * s.lookup_time + s.whitelist_lookup_time
    assert (s.instance_cache_size, s.instance_ttl) == (10_000, 1800)
    assert s.log_target == (LogTarget.SYSLOG,)
    assert s.user == s.group == ""
    assert s.shutdown_grace == 30.0
    assert s.stats_interval is None
    assert s.effective_stats_interval == 300.0  # debugLevel 1
    assert s.replace(debug_level=0).effective_stats_interval == 0.0
    assert s.replace(debug_level=0, stats_interval=60.0).effective_stats_interval == 60.0
    assert s.replace(stats_interval=0.0).effective_stats_interval == 0.0
    assert s.metrics_listen is None


def test_empty_file_gives_defaults_with_hostname(tmp_path: Path) -> None:
    assert load_text(tmp_path, "# nothing\n\n") == Settings(authserv_id="mx.example.net")


def test_none_without_default_file_gives_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", "/nonexistent/policyd-spf.conf")
    assert load_settings(None, hostname=host) == Settings(authserv_id="mx.example.net")


def test_none_reads_default_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "HELO_reject = False\n")
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", str(path))
    assert load_settings(None, hostname=host).helo_reject is HeloReject.FALSE


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path}/missing.conf: no such file")):
        load_settings(tmp_path / "missing.conf")


def test_debian_file_loads() -> None:
    if not DEBIAN.exists():
        pytest.skip("Debian's policyd-spf.conf is not installed")
    s = load_settings(DEBIAN, hostname=host)
    assert s == Settings(authserv_id="mx.example.net")


def test_example_file_loads_and_its_commented_values_are_the_defaults(tmp_path: Path) -> None:
    assert load_settings(EXAMPLE, hostname=host) == Settings(authserv_id="mx.example.net")
    # Uncomment every "#Key = value" line: the documented defaults must be real.
    lines = EXAMPLE.read_text().splitlines()
    keyed = re.compile(r"^#([A-Za-z_]+) =( .*)?$")
    uncommented = [line[1:] if keyed.match(line) else line for line in lines]
    count = sum(1 for line in lines if keyed.match(line))
    assert count == len(config._KEYS)  # every key is documented
    s = load_text(tmp_path, "\n".join(uncommented) + "\n")
    assert s == Settings(authserv_id="mx.example.net")


EVERY_KEY = [
    pytest.param("debugLevel", "3", "debug_level", 3, id="debugLevel"),
    pytest.param("TestOnly", "0", "test_only", 0, id="TestOnly"),
    pytest.param("defaultSeedOnly", "0", "default_seed_only", 0, id="defaultSeedOnly"),
    pytest.param("HELO_reject", "SPF_Not_Pass", "helo_reject", HeloReject.SPF_NOT_PASS, id="HELO"),
    pytest.param("HELO_reject", "Null", "helo_reject", HeloReject.NULL, id="HELO-Null"),
    pytest.param("HELO_reject", "No_Check", "helo_reject", HeloReject.NO_CHECK, id="HELO-No"),
    pytest.param(
        "Mail_From_reject", "Softfail", "mail_from_reject", MailFromReject.SOFTFAIL, id="MF"
    ),
    pytest.param("Mail_From_reject", "False", "mail_from_reject", MailFromReject.FALSE, id="MF-F"),
    pytest.param("PermError_reject", "True", "permerror_reject", True, id="PermError_reject"),
    pytest.param("TempError_Defer", "True", "temperror_defer", True, id="TempError_Defer"),
    pytest.param("No_Mail", "True", "no_mail", True, id="No_Mail"),
    pytest.param("HELO_pass_restriction", "hp", "helo_pass_restriction", "hp", id="HELO_pass"),
    pytest.param(
        "Mail_From_pass_restriction", "mp", "mail_from_pass_restriction", "mp", id="MF_pass"
    ),
    pytest.param(
        "Reject_Not_Pass_Domains",
        "AOL.com, hotmail.com,",
        "reject_not_pass_domains",
        ("aol.com", "hotmail.com"),
        id="Reject_Not_Pass_Domains",
    ),
    pytest.param("Prospective", "192.0.2.4", "prospective", "192.0.2.4", id="Prospective"),
    pytest.param("skip_addresses", "", "skip_addresses", (), id="skip_addresses-empty"),
    pytest.param(
        "skip_addresses",
        "10.0.0.0/8, 2001:db8::/32",
        "skip_addresses",
        (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")),
        id="skip_addresses",
    ),
    pytest.param(
        "Whitelist",
        "192.168.0.0/31,192.168.1.12",
        "whitelist",
        (ipaddress.ip_network("192.168.0.0/31"), ipaddress.ip_network("192.168.1.12/32")),
        id="Whitelist",
    ),
    pytest.param("HELO_Whitelist", "Relay.example.com", "helo_whitelist", ("relay.example.com",)),
    pytest.param("Domain_Whitelist", "pobox.com,b.org", "domain_whitelist", ("pobox.com", "b.org")),
    pytest.param("Domain_Whitelist_PTR", "yahoo.com", "domain_whitelist_ptr", ("yahoo.com",)),
    pytest.param("SPF_Enhanced_Status_Codes", "No", "spf_enhanced_status_codes", False, id="ESC"),
    pytest.param("Header_Type", "AR", "header_type", HeaderType.AR, id="Header_Type-AR"),
    pytest.param("Header_Type", "None", "header_type", HeaderType.NONE, id="Header_Type-None"),
    pytest.param("Hide_Receiver", "Yes", "hide_receiver", True, id="Hide_Receiver"),
    pytest.param("Authserv_Id", "mx.example.com", "authserv_id", "mx.example.com", id="Authserv"),
    pytest.param("Authserv_Id", "HOSTNAME", "authserv_id", "mx.example.net", id="Authserv-HOST"),
    pytest.param("Lookup_Time", "30", "lookup_time", 30, id="Lookup_Time"),
    pytest.param("Whitelist_Lookup_Time", "5", "whitelist_lookup_time", 5, id="WL_Lookup_Time"),
    pytest.param("Void_Limit", "3", "void_limit", 3, id="Void_Limit"),
    pytest.param("Reason_Message", "No {spf}", "reason_message", "No {spf}", id="Reason_Message"),
    pytest.param(
        "Reason_URL",
        "https://x.example/spf?s={0}&id={1}&ip={2}&r={3}",
        "reason_url",
        "https://x.example/spf?s={0}&id={1}&ip={2}&r={3}",
        id="Reason_URL-with-equals",
    ),
    pytest.param("Mock", "True", "mock", True, id="Mock-True"),
    pytest.param("Mock", "False", "mock", False, id="Mock-False-means-off"),
    pytest.param("QueueID", "False", "queue_id", False, id="QueueID"),
    pytest.param("Socket", "inet:8890@localhost", "socket", "inet:8890@localhost", id="Socket"),
    pytest.param("PidFile", "/run/x.pid", "pid_file", "/run/x.pid", id="PidFile"),
    pytest.param("UserID", "nobody", "user_id", "nobody", id="UserID"),
    pytest.param("UMask", "2", "umask", 2, id="UMask"),
    pytest.param("InternalHosts", "127.0.0.1,::1", "internal_hosts", ("127.0.0.1", "::1")),
    pytest.param("IntHosts", "True", "int_hosts", True, id="IntHosts"),
    pytest.param("MacroList", "daemon_name|ORIG", "macro_list", ("daemon_name|ORIG",)),
    pytest.param(
        "Listen",
        "unix:/run/spf.sock, inet:127.0.0.1:9000, inet:[::1]:9001",
        "listen",
        (
            ListenAddress(ListenFamily.UNIX, path="/run/spf.sock"),
            ListenAddress(ListenFamily.INET, host="127.0.0.1", port=9000),
            ListenAddress(ListenFamily.INET, host="::1", port=9001),
        ),
        id="Listen",
    ),
    pytest.param("Socket_Mode", "0660", "socket_mode", 0o660, id="Socket_Mode"),
    pytest.param("Socket_Owner", "postfix", "socket_owner", "postfix", id="Socket_Owner"),
    pytest.param("Socket_Group", "postfix", "socket_group", "postfix", id="Socket_Group"),
    pytest.param(
        "Nameservers",
        "127.0.0.1, 192.0.2.53:5353, [::1]:53, ::1",
        "nameservers",
        (
            Nameserver("127.0.0.1"),
            Nameserver("192.0.2.53", 5353),
            Nameserver("::1"),
            Nameserver("::1"),
        ),
        id="Nameservers",
    ),
    pytest.param("DNS_Timeout", "2.5", "dns_timeout", 2.5, id="DNS_Timeout"),
    pytest.param("DNS_Cache_Size", "10", "dns_cache_size", 10, id="DNS_Cache_Size"),
    pytest.param("DNS_Min_TTL", "5", "dns_min_ttl", 5, id="DNS_Min_TTL"),
    pytest.param("DNS_Max_TTL", "600", "dns_max_ttl", 600, id="DNS_Max_TTL"),
    pytest.param("DNS_Negative_TTL", "60", "dns_negative_ttl", 60, id="DNS_Negative_TTL"),
    pytest.param(
        "Slow_Domain_Threshold", "0", "slow_domain_threshold", 0, id="Slow_Domain_Threshold"
    ),
    pytest.param("Slow_Domain_Window", "30", "slow_domain_window", 30.0, id="Slow_Domain_Window"),
    pytest.param("Slow_Domain_Hold", "300", "slow_domain_hold", 300.0, id="Slow_Domain_Hold"),
    pytest.param("Result_Cache_Size", "0", "result_cache_size", 0, id="Result_Cache_Size"),
    pytest.param("Result_Cache_TTL", "0", "result_cache_ttl", 0, id="Result_Cache_TTL"),
    pytest.param("Max_Connections", "50", "max_connections", 50, id="Max_Connections"),
    pytest.param("Request_Timeout", "45", "request_timeout", 45.0, id="Request_Timeout"),
    pytest.param("Max_In_Flight", "200", "max_in_flight", 200, id="Max_In_Flight"),
    pytest.param("Idle_Timeout", "900", "idle_timeout", 900.0, id="Idle_Timeout"),
    pytest.param("Max_Line_Length", "4096", "max_line_length", 4096, id="Max_Line_Length"),
    pytest.param("Max_Attributes", "64", "max_attributes", 64, id="Max_Attributes"),
    pytest.param("Max_Request_Size", "32768", "max_request_size", 32768, id="Max_Request_Size"),
    pytest.param("Instance_Cache_Size", "5", "instance_cache_size", 5, id="Instance_Cache_Size"),
    pytest.param("Instance_TTL", "60", "instance_ttl", 60, id="Instance_TTL"),
    pytest.param(
        "Log_Target",
        "syslog,stderr",
        "log_target",
        (LogTarget.SYSLOG, LogTarget.STDERR),
        id="Log_Target",
    ),
    pytest.param("User", "nobody", "user", "nobody", id="User"),
    pytest.param("Group", "nogroup", "group", "nogroup", id="Group"),
    pytest.param("Shutdown_Grace", "5.5", "shutdown_grace", 5.5, id="Shutdown_Grace"),
    pytest.param("Stats_Interval", "60", "stats_interval", 60.0, id="Stats_Interval"),
    pytest.param("Stats_Interval", "0", "stats_interval", 0.0, id="Stats_Interval-off"),
    pytest.param("Stats_Interval", "", "stats_interval", None, id="Stats_Interval-unset"),
    pytest.param(
        "Metrics_Listen",
        "127.0.0.1:9469",
        "metrics_listen",
        HostPort("127.0.0.1", 9469),
        id="Metrics",
    ),
    pytest.param(
        "Metrics_Listen",
        "inet:[::1]:9469",
        "metrics_listen",
        HostPort("::1", 9469),
        id="Metrics-v6",
    ),
    pytest.param("Metrics_Listen", "", "metrics_listen", None, id="Metrics-off"),
    pytest.param("Domain_Stats_Size", "0", "domain_stats_size", 0, id="Domain_Stats_Size"),
    pytest.param(
        "Cache_File",
        "/var/lib/spfpolicy/cache",
        "cache_file",
        "/var/lib/spfpolicy/cache",
        id="Cache",
    ),
    pytest.param("Cache_File", "", "cache_file", "", id="Cache_File-off"),
    pytest.param(
        "Shared_Cache",
        "redis://cache.example:6380/2",
        "shared_cache",
        "redis://cache.example:6380/2",
        id="Shared_Cache",
    ),
    pytest.param(
        "Shared_Cache",
        "rediss://spf:secret@10.0.0.5/0",
        "shared_cache",
        "rediss://spf:secret@10.0.0.5/0",
        id="Shared_Cache-tls",
    ),
    pytest.param(
        "Shared_Cache",
        "unix:///run/redis/redis.sock?db=1",
        "shared_cache",
        "unix:///run/redis/redis.sock?db=1",
        id="Shared_Cache-unix",
    ),
    pytest.param("Shared_Cache", "", "shared_cache", "", id="Shared_Cache-off"),
    pytest.param(
        "Shared_Cache_Prefix", "mx:", "shared_cache_prefix", "mx:", id="Shared_Cache_Prefix"
    ),
    pytest.param(
        "Shared_Cache_Timeout", "0.1", "shared_cache_timeout", 0.1, id="Shared_Cache_Timeout"
    ),
    pytest.param(
        "Shared_Cache_Password_File",
        "/etc/spfpolicy/redis.pass",
        "shared_cache_password_file",
        "/etc/spfpolicy/redis.pass",
        id="Shared_Cache_Password_File",
    ),
    pytest.param(
        "Shared_Cache_CA_File",
        "/etc/spfpolicy/redis-ca.pem",
        "shared_cache_ca_file",
        "/etc/spfpolicy/redis-ca.pem",
        id="Shared_Cache_CA_File",
    ),
]


@pytest.mark.parametrize(("key", "text", "field", "value"), EVERY_KEY)
def test_every_key(tmp_path: Path, key: str, text: str, field: str, value: object) -> None:
    s = load_text(tmp_path, f"# comment\n{key} = {text}  # trailing comment\n")
    assert getattr(s, field) == value


def test_every_key_is_in_the_table() -> None:
    tested = {p.values[0] for p in EVERY_KEY}
    assert tested | {"Per_User"} == set(config._KEYS)


def test_last_occurrence_wins(tmp_path: Path) -> None:
    s = load_text(tmp_path, "HELO_reject = False\nHELO_reject = Softfail\n")
    assert s.helo_reject is HeloReject.SOFTFAIL


BAD = [
    pytest.param("Foo = 1", "unknown key 'Foo'", id="unknown-key"),
    pytest.param("helo_reject = Fail", "unknown key 'helo_reject'", id="key-case"),
    pytest.param("HELO_reject", "expected 'Key = value'", id="no-equals"),
    pytest.param("HELO_reject = Fail = x", "more than one '='", id="two-equals"),
    pytest.param("HELO_reject = fail", "bad value for HELO_reject: 'fail'", id="value-case"),
    pytest.param("HELO_reject = Pass", "expected one of SPF_Not_Pass", id="HELO-bad"),
    pytest.param("Mail_From_reject = Null", "bad value for Mail_From_reject", id="MF-Null"),
    pytest.param("Header_Type = SPF,AR", "bad value for Header_Type", id="Header_Type-both"),
    pytest.param("Header_Type = ar", "bad value for Header_Type", id="Header_Type-case"),
    pytest.param("PermError_reject = true", "expected one of True, False", id="bool-case"),
    pytest.param("TempError_Defer = Yes", "bad value for TempError_Defer", id="TempError"),
    pytest.param("No_Mail = 1", "bad value for No_Mail", id="No_Mail"),
    pytest.param("Hide_Receiver = no", "expected one of Yes, No", id="Hide_Receiver"),
    pytest.param("SPF_Enhanced_Status_Codes = False", "bad value", id="ESC"),
    pytest.param("Mock = maybe", "bad value for Mock", id="Mock"),
    pytest.param("debugLevel = high", "expected an integer", id="int"),
    pytest.param("TestOnly =", "expected an integer", id="int-empty"),
    pytest.param("Lookup_Time = 0", "must be at least 1", id="Lookup_Time-0"),
    pytest.param("Whitelist = 192.0.2.1/24", "host bits set", id="cidr-host-bits"),
    pytest.param("skip_addresses = 10.0.0.0/33", "bad IP network '10.0.0.0/33'", id="cidr"),
    pytest.param("Whitelist = example.com", "bad IP network", id="cidr-name"),
    pytest.param("Prospective = mail.example.com", "expected an IP address", id="Prospective"),
    pytest.param("Reason_Message = {foo}", "bad format string", id="Reason_Message-field"),
    pytest.param("Reason_Message = {}", "bad format string", id="Reason_Message-positional"),
    pytest.param("Reason_URL = http://x/{4}", "bad format string", id="Reason_URL"),
    pytest.param("Per_User = mysql,/etc/x", "expected text,/path/to/file", id="Per_User-type"),
    pytest.param("Per_User = text,/nonexistent/users", "does not exist", id="Per_User-missing"),
    pytest.param("Listen = tcp:1.2.3.4:5", "expected unix: or inet:", id="Listen-family"),
    pytest.param("Listen = inet:127.0.0.1", "missing port", id="Listen-port"),
    pytest.param("Listen = unix:relative.sock", "must be absolute", id="Listen-relative"),
    pytest.param("Listen = inet:127.0.0.1:70000", "port out of range", id="Listen-range"),
    pytest.param("Socket_Mode = 0999", "expected an octal mode", id="Socket_Mode"),
    pytest.param("Nameservers = dns.example", "must be an IP address", id="Nameservers"),
    pytest.param("DNS_Timeout = 0", "positive number", id="DNS_Timeout"),
    pytest.param("Request_Timeout = soon", "expected a number", id="Request_Timeout"),
    pytest.param("Max_Connections = 0", "must be at least 1", id="Max_Connections"),
    pytest.param("Log_Target = file", "bad log target 'file'", id="Log_Target"),
    pytest.param("Shutdown_Grace = 0", "positive number", id="Shutdown_Grace"),
    pytest.param("Stats_Interval = -1", "must be 0 (off)", id="Stats_Interval"),
    pytest.param("Metrics_Listen = 9469", "missing port", id="Metrics_Listen-port"),
    pytest.param("Cache_File = cache", "expected an absolute path", id="Cache_File-relative"),
    pytest.param("Cache_File = /var/lib/spfpolicy/", "not a directory", id="Cache_File-dir"),
    pytest.param("Shared_Cache = memcached://x", "expected redis://", id="Shared_Cache-scheme"),
    pytest.param("Shared_Cache = redis://:6379/0", "expected a host", id="Shared_Cache-host"),
    pytest.param("Shared_Cache = redis://h:99999/0", "not a URL", id="Shared_Cache-port"),
    pytest.param("Shared_Cache = unix://run/r.sock", "absolute", id="Shared_Cache-unix"),
    pytest.param("Shared_Cache_Timeout = 0", "positive number", id="Shared_Cache_Timeout"),
    pytest.param("Shared_Cache_Timeout = 11", "at most 10", id="Shared_Cache_Timeout-max"),
    pytest.param("DNS_Min_TTL = 100\nDNS_Max_TTL = 10", "larger than DNS_Max_TTL", id="ttl"),
    pytest.param("Authserv_Id =\nHeader_Type = AR", "needs a non-empty Authserv_Id", id="AR-id"),
]


@pytest.mark.parametrize(("line", "message"), BAD)
def test_bad_lines_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path, "# header\n\n" + line + "\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, hostname=host)
    error = caught.value
    assert error.path == str(path)
    assert error.line == 3
    assert str(error).startswith(f"{path}:3: ")
    assert message in str(error)


def test_unknown_key_message(tmp_path: Path) -> None:
    path = write(tmp_path, "debugLevel = 1\n" * 11 + "Foo = bar\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(caught.value) == f"{path}:12: unknown key 'Foo'"


def test_hash_in_value_starts_a_comment(tmp_path: Path) -> None:
    s = load_text(tmp_path, "Reason_Message = Rejected #{spf}\n")
    assert s.reason_message == "Rejected"


def test_per_user(tmp_path: Path) -> None:
    users = write(
        tmp_path,
        "# users\n"
        "postmaster@example.com,Mail_From_reject=No_Check|PermError_reject=False"
        "|HELO_reject=SPF_Not_Pass|skip_addresses=10.0.0.0/8|Authserv-Id=ignored\n"
        "Strict@Example.com, PermError_reject=True|TempError_Defer=True\n"
        "postmaster@example.com,HELO_reject=False\n",
        "users",
    )
    s = load_text(tmp_path, f"Per_User = text,{users}\nHELO_reject = Softfail\n")
    assert s.per_user is not None
    pm, matched = s.for_recipient("postmaster@example.com")
    assert matched
    assert pm.mail_from_reject is MailFromReject.NO_CHECK
    assert pm.helo_reject is HeloReject.SPF_NOT_PASS  # the first line wins
    assert pm.skip_addresses == (ipaddress.ip_network("10.0.0.0/8"),)
    strict, matched = s.for_recipient("strict@example.com")
    assert matched
    assert strict.permerror_reject and strict.temperror_defer
    assert strict.helo_reject is HeloReject.SOFTFAIL  # global value kept
    other, matched = s.for_recipient("someone@example.com")
    assert not matched
    assert other is s


@pytest.mark.parametrize(
    ("line", "message"),
    [
        pytest.param("a@example.com,TestOnly=0", "'TestOnly' cannot be set per user", id="key"),
        pytest.param("a@example.com,Foo=1", "'Foo' cannot be set per user", id="unknown"),
        pytest.param("a@example.com", "expected 'recipient,Key=value", id="no-comma"),
        pytest.param("a@example.com,HELO_reject", "expected Key=value", id="no-equals"),
        pytest.param("a@example.com,HELO_reject=fail", "bad value for HELO_reject", id="value"),
        pytest.param("a@example.com,Whitelist=10.0.0.1/8", "host bits", id="cidr"),
    ],
)
def test_per_user_errors_name_the_user_file(tmp_path: Path, line: str, message: str) -> None:
    users = write(tmp_path, "\n" + line + "\n", "users")
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, f"Per_User = text,{users}\n")
    assert caught.value.path == str(users)
    assert caught.value.line == 2
    assert message in str(caught.value)


def test_settings_are_frozen_and_replace_works() -> None:
    s = Settings()
    with pytest.raises(AttributeError):
        s.debug_level = 2  # type: ignore[misc]
    assert s.replace(debug_level=2).debug_level == 2
    assert s.debug_level == 1


def test_cli_parsers() -> None:
    assert config.parse_listen("inet:[::1]:10023") == (
        ListenAddress(ListenFamily.INET, host="::1", port=10023),
    )
    assert config.parse_nameservers("192.0.2.53:5353") == (Nameserver("192.0.2.53", 5353),)
    with pytest.raises(ValueError, match="expected unix: or inet:"):
        config.parse_listen("udp:1.2.3.4:5")
