"""Tests for pyinetd.convert: inetd.conf and xinetd configuration -> pyinetd configuration."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyinetd.config import load
from pyinetd.config.keys import SERVICE_KEYS as DECLARED_SERVICE_KEYS
from pyinetd.config.parsers import BUILTINS as BUILTIN_NAMES
from pyinetd.convert import (
    Conversion,
    ConvertWarning,
    convert_file,
    convert_inetd_conf,
    convert_xinetd_conf,
    dump,
)

FIXTURES = Path(__file__).parent / "fixtures"
SERVICES = FIXTURES / "services"
XINETD_ROOT = FIXTURES / "xinetd-root"

# The configuration keys of pyinetd: their declarations (keys.py).
TOP_KEYS = {"max_children", "include", "defaults", "services"}
SERVICE_KEYS = set(DECLARED_SERVICE_KEYS)
RLIMIT_KEYS = {"as", "cpu", "nofile", "nproc", "core", "fsize", "data", "stack"}
TLS_KEYS = {"cert", "key", "client_ca", "min_version", "handshake_timeout"}
BUILTINS = set(BUILTIN_NAMES)


# --------------------------------------------------------------------------- helpers


def inetd(tmp_path: Path, text: str, services: Path = SERVICES) -> Conversion:
    path = tmp_path / "inetd.conf"
    path.write_text(text)
    return convert_inetd_conf(path, services)


def xinetd(tmp_path: Path, text: str, services: Path = SERVICES) -> Conversion:
    path = tmp_path / "xinetd.conf"
    path.write_text(text)
    return convert_xinetd_conf(path, services)


def svc(conv: Conversion, name: str) -> dict[str, Any]:
    services: dict[str, dict[str, Any]] = conv.config["services"]
    assert name in services, f"{name} not in {list(services)}"
    return services[name]


def lines_with(conv: Conversion, text: str) -> list[int]:
    """Line numbers of the warnings whose message contains text."""
    return [w.line for w in conv.warnings if text in w.message]


def service_block(body: str, name: str = "svc") -> str:
    return f"service {name}\n{{\n{body}\n}}\n"


def check_keys(config: dict[str, Any]) -> None:
    """Every key is one of pyinetd's configuration keys, every value a plain type."""
    assert set(config) <= TOP_KEYS, set(config) - TOP_KEYS
    sections = list(config.get("services", {}).values())
    if "defaults" in config:
        sections.append(config["defaults"])
    for section in sections:
        assert set(section) <= SERVICE_KEYS, set(section) - SERVICE_KEYS
        assert set(section.get("rlimits", {})) <= RLIMIT_KEYS
        assert set(section.get("tls", {})) <= TLS_KEYS
        if "builtin" in section:
            assert section["builtin"] in BUILTINS
            assert "exec" not in section
        if "protocol" in section:
            assert section["protocol"] in {"tcp", "udp", "unix"}
        if "on_limit" in section:
            assert section["on_limit"] in {"queue", "reject"}
        for value in section.get("env", {}).values():
            assert isinstance(value, str)


def check_round_trip(conv: Conversion) -> None:
    text = dump(conv, "yaml")
    assert yaml.safe_load(text) == conv.config
    toml_text = dump(conv, "toml")
    assert tomllib.loads(toml_text) == conv.config
    for w in conv.warnings:
        comment = f"# warning: {w.file}:{w.line}: "
        assert comment in text
        assert comment in toml_text


# --------------------------------------------------------------------------- inetd.conf


def test_inetd_fields_map_to_service(tmp_path: Path) -> None:
    conv = inetd(tmp_path, "telnet stream tcp nowait root /usr/sbin/in.telnetd in.telnetd -h\n")
    assert conv.config == {
        "services": {
            "telnet": {
                "listen": 23,
                "protocol": "tcp",
                "exec": ["/usr/sbin/in.telnetd", "-h"],
                "wait": False,
                "user": "root",
            }
        }
    }
    assert conv.warnings == ()


def test_inetd_service_names_resolve_through_services_file(tmp_path: Path) -> None:
    conv = inetd(
        tmp_path,
        "ident stream tcp wait identd /usr/sbin/identd identd\n"  # an alias of auth
        "7007 stream tcp nowait nobody /usr/local/bin/mine mine\n"
        "tftp dgram udp wait nobody /usr/sbin/in.tftpd in.tftpd\n",
    )
    assert svc(conv, "ident")["listen"] == 113
    assert svc(conv, "7007")["listen"] == 7007
    assert svc(conv, "tftp")["listen"] == 69
    assert conv.warnings == ()


def test_inetd_services_file_is_parsed_not_resolver(tmp_path: Path) -> None:
    services = tmp_path / "services"
    services.write_text("# local\nmyproto\t4242/tcp\tmine   # comment\nmyproto 4243/udp\n")
    conv = inetd(tmp_path, "mine stream tcp nowait nobody /bin/cat cat\n", services)
    assert svc(conv, "mine")["listen"] == 4242


def test_inetd_missing_services_file_falls_back_to_getservbyname(tmp_path: Path) -> None:
    try:
        port = socket.getservbyname("echo", "tcp")
    except OSError:
        pytest.skip("the resolver knows no 'echo' service")
    conv = inetd(tmp_path, "echo stream tcp nowait root internal\n", services=tmp_path / "missing")
    assert svc(conv, "echo")["listen"] == port


def test_inetd_unknown_service_name_warns(tmp_path: Path) -> None:
    # swat (901/tcp) is no longer in Debian's netbase services file.
    services = tmp_path / "services"
    services.write_text("telnet 23/tcp\n")
    conv = inetd(
        tmp_path, "\nswat stream tcp nowait.400 root /usr/sbin/tcpd /usr/sbin/swat\n", services
    )
    assert conv.config["services"] == {}
    assert lines_with(conv, "unknown service 'swat'/tcp") == [2]


@pytest.mark.parametrize(
    ("proto", "name", "listen", "protocol"),
    [
        ("tcp", "telnet", 23, "tcp"),
        ("tcp46", "telnet", 23, "tcp"),
        ("tcp4", "telnet", "0.0.0.0:23", "tcp"),
        ("tcp6", "telnet", "[::]:23", "tcp"),
        ("udp", "tftp", 69, "udp"),
        ("udp46", "tftp", 69, "udp"),
        ("udp4", "tftp", "0.0.0.0:69", "udp"),
        ("udp6", "tftp", "[::]:69", "udp"),
    ],
)
def test_inetd_protocol_families(
    tmp_path: Path, proto: str, name: str, listen: int | str, protocol: str
) -> None:
    sock = "stream" if protocol == "tcp" else "dgram"
    conv = inetd(tmp_path, f"{name}\t{sock}\t{proto}\twait\troot\t/usr/sbin/x\tx\n")
    assert svc(conv, name)["listen"] == listen
    assert svc(conv, name)["protocol"] == protocol


def test_inetd_host_prefixes(tmp_path: Path) -> None:
    conv = inetd(
        tmp_path,
        "127.0.0.1:echo stream tcp nowait root internal\n"
        "::1:discard stream tcp6 nowait root internal\n"
        "127.0.0.1,192.0.2.1:daytime stream tcp nowait root internal\n"
        "*:time stream tcp6 nowait root internal\n"
        "[::1]:chargen stream tcp nowait root internal\n",
    )
    assert svc(conv, "echo")["listen"] == "127.0.0.1:7"
    assert svc(conv, "discard")["listen"] == "[::1]:9"
    assert svc(conv, "daytime")["listen"] == ["127.0.0.1:13", "192.0.2.1:13"]
    assert svc(conv, "time")["listen"] == "[::]:37"
    assert svc(conv, "chargen")["listen"] == "[::1]:19"
    assert conv.warnings == ()


def test_inetd_bare_host_line_sets_default_host(tmp_path: Path) -> None:
    conv = inetd(
        tmp_path,
        "127.0.0.1:\n"
        "echo stream tcp nowait root internal\n"
        "192.0.2.7:discard stream tcp nowait root internal\n"
        "daytime stream tcp nowait root internal\n"
        "*:\n"
        "time stream tcp nowait root internal\n",
    )
    assert svc(conv, "echo")["listen"] == "127.0.0.1:7"
    assert svc(conv, "discard")["listen"] == "192.0.2.7:9"
    assert svc(conv, "daytime")["listen"] == "127.0.0.1:13"
    assert svc(conv, "time")["listen"] == 37


def test_inetd_host_name_prefix_warns(tmp_path: Path) -> None:
    conv = inetd(tmp_path, "\nlocalhost:echo stream tcp nowait root internal\n")
    assert svc(conv, "echo")["listen"] == "localhost:7"
    assert lines_with(conv, "is a name") == [2]


def test_inetd_unix_socket_service(tmp_path: Path) -> None:
    conv = inetd(tmp_path, "/run/mine/ctl.sock stream unix nowait root /usr/bin/mine mine\n")
    assert svc(conv, "ctl.sock") == {
        "listen": "/run/mine/ctl.sock",
        "protocol": "unix",
        "exec": ["/usr/bin/mine"],
        "wait": False,
        "user": "root",
    }


def test_inetd_openbsd_max_is_invocations_per_minute(tmp_path: Path) -> None:
    # openbsd-inetd inetd(8): "max" is how many times the service may be invoked in one
    # minute; beyond it inetd stops the service for ten minutes. Not a concurrency cap.
    conv = inetd(tmp_path, "swat stream tcp nowait.400 root /usr/sbin/swat swat\n")
    s = svc(conv, "swat")
    assert (s["rate"], s["rate_pause"]) == ("400/min", 600)
    assert "max_connections" not in s


def test_inetd_netbsd_colon_max_is_per_minute(tmp_path: Path) -> None:
    conv = inetd(tmp_path, "tftp dgram udp wait:40 root /usr/libexec/tftpd tftpd\n")
    assert svc(conv, "tftp")["rate"] == "40/min"


def test_inetd_extra_dot_limit_warns(tmp_path: Path) -> None:
    conv = inetd(tmp_path, "swat stream tcp nowait.400.10 root /usr/sbin/swat swat\n")
    assert svc(conv, "swat")["rate"] == "400/min"
    assert lines_with(conv, "unrecognised extra limit .10") == [1]


def test_inetd_freebsd_slash_limits(tmp_path: Path) -> None:
    # FreeBSD inetd(8): nowait/max-child/max-connections-per-ip-per-minute/max-child-per-ip;
    # over max-child further connections queue until a child exits.
    conv = inetd(
        tmp_path,
        "finger stream tcp nowait/3/10/2 nobody /usr/libexec/fingerd fingerd -k -s\n"
        "ftp stream tcp nowait/0 root /usr/libexec/ftpd ftpd -l\n",
    )
    finger = svc(conv, "finger")
    assert finger["max_connections"] == 3
    assert finger["on_limit"] == "queue"
    assert finger["per_source"] == 2
    assert finger["exec"] == ["/usr/libexec/fingerd", "-k", "-s"]
    assert lines_with(conv, "max-connections-per-ip-per-minute 10") == [1]
    assert "max_connections" not in svc(conv, "ftp")  # 0 means no limit


def test_inetd_non_numeric_limit_warns(tmp_path: Path) -> None:
    conv = inetd(tmp_path, "swat stream tcp nowait.lots root /usr/sbin/swat swat\n")
    assert "rate" not in svc(conv, "swat")
    assert lines_with(conv, "is not a number") == [1]


@pytest.mark.parametrize(
    ("field", "user", "group"),
    [
        ("nobody", "nobody", None),
        ("nobody.tty", "nobody", "tty"),
        ("nobody:tty", "nobody", "tty"),
        ("65534:5", 65534, 5),
    ],
)
def test_inetd_user_and_group(
    tmp_path: Path, field: str, user: str | int, group: str | int | None
) -> None:
    conv = inetd(tmp_path, f"talk dgram udp wait {field} /usr/sbin/in.talkd in.talkd\n")
    s = svc(conv, "talk")
    assert s["user"] == user
    assert s.get("group") == group
    assert conv.warnings == ()


def test_inetd_freebsd_login_class_warns(tmp_path: Path) -> None:
    conv = inetd(tmp_path, "talk dgram udp wait nobody:tty/daemon /usr/sbin/in.talkd x\n")
    assert (svc(conv, "talk")["user"], svc(conv, "talk")["group"]) == ("nobody", "tty")
    assert lines_with(conv, "login class 'daemon'") == [1]


@pytest.mark.parametrize("name", sorted(BUILTINS))
@pytest.mark.parametrize(
    ("sock", "proto", "wait"), [("stream", "tcp", "nowait"), ("dgram", "udp", "wait")]
)
def test_inetd_internal_builtins(
    tmp_path: Path, name: str, sock: str, proto: str, wait: str
) -> None:
    conv = inetd(tmp_path, f"{name}\t{sock}\t{proto}\t{wait}\troot\tinternal\n")
    ports = {"echo": 7, "discard": 9, "daytime": 13, "chargen": 19, "time": 37}
    assert conv.config["services"][name] == {
        "listen": ports[name],
        "protocol": proto,
        "builtin": name,
    }
    assert conv.warnings == ()


def test_inetd_internal_alias_uses_official_name(tmp_path: Path) -> None:
    conv = inetd(tmp_path, "ttytst stream tcp nowait root internal\n")
    assert svc(conv, "ttytst")["builtin"] == "chargen"
    assert svc(conv, "ttytst")["listen"] == 19


def test_inetd_internal_without_builtin_warns(tmp_path: Path) -> None:
    conv = inetd(
        tmp_path,
        "tcpmux stream tcp nowait root internal\n"
        "auth stream tcp nowait root internal\n"
        "echo stream tcp nowait nobody internal\n",
    )
    assert list(conv.config["services"]) == ["echo"]
    assert lines_with(conv, "has no pyinetd builtin") == [1, 2]
    assert lines_with(conv, "user 'nobody' is not applied to a builtin") == [3]


def test_inetd_tcpd_wrapper_is_unwrapped(tmp_path: Path) -> None:
    conv = inetd(
        tmp_path,
        "telnet stream tcp nowait root /usr/sbin/tcpd /usr/sbin/in.telnetd -h\n"
        "finger stream tcp nowait nobody /usr/sbin/tcpd in.fingerd -w\n"
        "ftp stream tcp nowait root /usr/sbin/tcpd\n",
    )
    assert svc(conv, "telnet")["exec"] == ["/usr/sbin/in.telnetd", "-h"]
    # tcpd finds a bare program name in REAL_DAEMON_DIR (/usr/sbin on Debian).
    assert svc(conv, "finger")["exec"] == ["/usr/sbin/in.fingerd", "-w"]
    assert lines_with(conv, "tcp wrappers (/etc/hosts.allow, /etc/hosts.deny) are not applied") == [
        1,
        2,
    ]
    assert "ftp" not in conv.config["services"]
    assert lines_with(conv, "without a program to wrap") == [3]


def test_inetd_argv0_kept_as_argv0_when_it_is_not_the_program_name(tmp_path: Path) -> None:
    # Issue 16: `/bin/busybox httpd -i` became exec: [/bin/busybox, -i]: the applet was gone.
    conv = inetd(
        tmp_path,
        "telnet stream tcp nowait root /usr/sbin/in.telnetd in.telnetd\n"
        "tftp dgram udp wait root /usr/sbin/in.tftpd /usr/sbin/in.tftpd -s /srv/tftp\n"
        "rsync stream tcp nowait root /usr/bin/rsync rsyncd --daemon\n"
        "finger stream tcp nowait root /usr/sbin/in.fingerd\n"
        "8080 stream tcp nowait root /bin/busybox httpd -i -h /srv/www\n",
    )
    assert svc(conv, "telnet")["exec"] == ["/usr/sbin/in.telnetd"]
    assert svc(conv, "tftp")["exec"] == ["/usr/sbin/in.tftpd", "-s", "/srv/tftp"]
    assert svc(conv, "rsync")["exec"] == ["/usr/bin/rsync", "--daemon"]
    assert svc(conv, "rsync")["argv0"] == "rsyncd"
    assert svc(conv, "finger")["exec"] == ["/usr/sbin/in.fingerd"]
    assert svc(conv, "8080")["exec"] == ["/bin/busybox", "-i", "-h", "/srv/www"]
    assert svc(conv, "8080")["argv0"] == "httpd"
    assert [s.get("argv0") for s in conv.config["services"].values()] == [
        None,
        None,
        "rsyncd",
        None,
        "httpd",
    ]
    assert lines_with(conv, "argv[0]") == []


def test_inetd_comments_blank_lines_and_update_inetd_off_entries(tmp_path: Path) -> None:
    conv = inetd(
        tmp_path,
        "# comment\n"
        "\n"
        "   \t\n"
        "#echo\t\tstream\ttcp\tnowait\troot\tinternal\n"
        "#:STANDARD: These are standard services.\n"
        "#<off># telnet\t\tstream\ttcp\tnowait\troot\t/usr/sbin/tcpd\t/usr/sbin/in.telnetd\n"
        "#<off># not an entry\n",
    )
    assert list(conv.config["services"]) == ["telnet"]
    assert svc(conv, "telnet")["enabled"] is False
    assert lines_with(conv, "expected 'service socket_type") == [7]


def test_inetd_unsupported_lines_warn_with_line_numbers(tmp_path: Path) -> None:
    conv = inetd(
        tmp_path,
        "# header\n"
        "rstatd/1-5 dgram rpc/udp wait root /usr/sbin/tcpd /usr/sbin/rpc.rstatd\n"  # 2
        "echo stream sctp nowait root internal\n"  # 3
        "echo raw tcp nowait root internal\n"  # 4
        "echo stream udp nowait root internal\n"  # 5
        "echo stream tcp\n"  # 6
        "nosuch stream tcp nowait root /bin/true true\n"  # 7
        "echo stream tcp sometimes root internal\n"  # 8
        "tcpmux/+date stream tcp nowait guest /bin/date date\n"  # 9
        "echo stream tcp nowait root internal\n",  # 10: the only good one
    )
    assert list(conv.config["services"]) == ["echo"]
    assert [w.line for w in conv.warnings] == [2, 3, 4, 5, 6, 7, 8, 9]
    assert all(w.file == str(tmp_path / "inetd.conf") for w in conv.warnings)
    assert "RPC" in conv.warnings[0].message
    assert "TCPMUX" in conv.warnings[7].message


def test_inetd_socket_buffer_options_become_buffer_keys(tmp_path: Path) -> None:
    conv = inetd(
        tmp_path,
        "echo stream tcp,rcvbuf=64k,sndbuf=1m nowait root internal\n"
        "discard stream tcp,rcvbuf=lots,other=1 nowait root internal\n",
    )
    echo = svc(conv, "echo")
    assert (echo["protocol"], echo["receive_buffer"], echo["send_buffer"]) == ("tcp", "64k", "1m")
    assert "receive_buffer" not in svc(conv, "discard")
    assert lines_with(conv, "socket option") == [2, 2]


def test_inetd_same_service_on_two_protocols_named_apart(tmp_path: Path) -> None:
    conv = inetd(
        tmp_path,
        "echo stream tcp nowait root internal\n"
        "echo dgram udp wait root internal\n"
        "127.0.0.1:time stream tcp nowait root internal\n"
        "192.0.2.1:time stream tcp nowait root internal\n"
        "time stream tcp nowait root internal\n"
        "time stream tcp nowait root internal\n",
    )
    assert list(conv.config["services"]) == [
        "echo-tcp",
        "echo-udp",
        "time-tcp",
        "time-tcp-2",
        "time-tcp-3",
        "time-tcp-4",
    ]
    assert lines_with(conv, "same service and address as line 5") == [6]


def test_inetd_fixture_with_package_lines() -> None:
    conv = convert_inetd_conf(FIXTURES / "inetd.conf", SERVICES)
    services = conv.config["services"]
    assert list(services) == [
        "echo-tcp",
        "echo-udp",
        "discard",
        "chargen",
        "telnet",
        "ftp",
        "talk",
        "ntalk",
        "uucp",
        "finger",
        "ident",
        "tftp",
        "swat",
        "cvspserver",
        "amanda",
        "rsync",
    ]
    assert services["discard"]["enabled"] is False
    assert services["ftp"]["enabled"] is False
    assert services["chargen"]["listen"] == "127.0.0.1:19"
    assert services["telnet"]["user"] == "telnetd"
    assert (services["talk"]["user"], services["talk"]["group"]) == ("nobody", "tty")
    assert services["tftp"]["listen"] == "0.0.0.0:69"
    assert services["cvspserver"]["exec"] == ["/usr/sbin/cvs-pserver"]
    assert services["cvspserver"]["rate"] == "400/min"
    assert services["amanda"]["exec"] == [
        "/usr/lib/amanda/amandad",
        "-auth=bsdtcp",
        "amdump",
        "amindexd",
        "amidxtaped",
    ]
    assert lines_with(conv, "tcpd wrapper") == [17, 19, 28, 32, 49, 51]
    assert lines_with(conv, "RPC service rstatd/1-5") == [43]
    assert services["rsync"]["argv0"] == "rsyncd"
    assert len(conv.warnings) == 7


# --------------------------------------------------------------------------- xinetd


def test_xinetd_service_block(tmp_path: Path) -> None:
    conv = xinetd(
        tmp_path,
        "# comment\n"
        "service telnet\n"
        "{\n"
        "\tsocket_type\t= stream\n"
        "\twait\t\t= no\n"
        "\tuser\t\t= root\n"
        "\tserver\t\t= /usr/sbin/in.telnetd\n"
        "\tserver_args\t= -h -L /bin/login\n"
        "}\n",
    )
    assert conv.config == {
        "services": {
            "telnet": {
                "listen": "0.0.0.0:23",  # xinetd listens on IPv4 only without flags/bind
                "protocol": "tcp",
                "exec": ["/usr/sbin/in.telnetd", "-h", "-L", "/bin/login"],
                "wait": False,
                "user": "root",
            }
        }
    }
    assert conv.warnings == ()


def test_xinetd_brace_on_service_line(tmp_path: Path) -> None:
    conv = xinetd(
        tmp_path,
        "service echo {\n  type = INTERNAL\n  socket_type = stream\n  wait = no\n}\n"
        "defaults {\n  instances = 5\n}\n",
    )
    assert svc(conv, "echo")["builtin"] == "echo"
    assert conv.config["defaults"] == {"max_connections": 5, "on_limit": "reject"}


def test_xinetd_operators_and_defaults_inheritance(tmp_path: Path) -> None:
    base = "socket_type = stream\nwait = no\nuser = nobody\nserver = /bin/cat\nport = {}\n"
    conv = xinetd(
        tmp_path,
        "defaults\n{\n only_from = 10.0.0.0\n only_from = 172.16.0.0/12\n no_access = 10.9.9.9\n}\n"
        + service_block(base.format(7001), "inherits")
        + service_block(base.format(7002) + "only_from += 192.168.0.0", "adds")
        + service_block(base.format(7003) + "only_from = 127.0.0.1", "replaces")
        + service_block(base.format(7004) + "only_from -= 10.0.0.0", "removes")
        + service_block(
            base.format(7005) + "only_from -= 10.0.0.0\nonly_from -= 172.16.0.0/12", "nobody"
        )
        + service_block(base.format(7006) + "no_access =", "clears_deny"),
    )
    assert conv.config["defaults"] == {
        "allow": ["10.0.0.0/8", "172.16.0.0/12"],
        "deny": ["10.9.9.9"],
    }
    assert "allow" not in svc(conv, "inherits") and "deny" not in svc(conv, "inherits")
    assert svc(conv, "adds")["allow"] == ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]
    assert svc(conv, "replaces")["allow"] == ["127.0.0.1"]
    assert svc(conv, "removes")["allow"] == ["172.16.0.0/12"]
    # only_from with nothing left allows nobody (xinetd.conf(5)).
    assert "allow" not in svc(conv, "nobody")
    assert svc(conv, "nobody")["enabled"] is False
    assert svc(conv, "clears_deny")["deny"] == []
    assert any("only_from allows no address" in w.message for w in conv.warnings)


@pytest.mark.parametrize(
    ("value", "allow"),
    [
        ("127.0.0.1", ["127.0.0.1"]),
        ("128.138.12.0", ["128.138.12.0/24"]),  # rightmost zero octets are wildcards
        ("10.0.0.0", ["10.0.0.0/8"]),
        ("10.1.0.3", ["10.1.0.3"]),
        ("0.0.0.0", ["0.0.0.0/0"]),
        ("192.168.1.0/24", ["192.168.1.0/24"]),
        ("192.168.1.7/24", ["192.168.1.0/24"]),
        ("128.138.{193,194}", ["128.138.193.0/24", "128.138.194.0/24"]),
        ("10.0.0.{1,2}", ["10.0.0.1", "10.0.0.2"]),
        ("::1", ["::1"]),
        ("2001:db8::/32", ["2001:db8::/32"]),
        ("::", ["::/0"]),
        ("localhost", ["127.0.0.1", "::1"]),
        ("127.0.0.1 ::1 127.0.0.1", ["127.0.0.1", "::1"]),
    ],
)
def test_xinetd_address_forms(tmp_path: Path, value: str, allow: list[str]) -> None:
    conv = xinetd(
        tmp_path,
        service_block(
            f"socket_type = stream\nwait = no\nuser = root\nserver = /bin/cat\nport = 7000\n"
            f"only_from = {value}",
        ),
    )
    assert svc(conv, "svc")["allow"] == allow
    assert conv.warnings == ()


def test_xinetd_host_names_in_access_lists_warn(tmp_path: Path) -> None:
    conv = xinetd(
        tmp_path,
        service_block(
            "socket_type = stream\nwait = no\nuser = root\nserver = /bin/cat\nport = 7000\n"
            "only_from = .example.com 127.0.0.1\n"
            "no_access = badhost.example.org",
        ),
    )
    assert svc(conv, "svc")["allow"] == ["127.0.0.1"]
    assert svc(conv, "svc")["deny"] == []
    assert lines_with(conv, "'.example.com' (host, domain or network name)") == [8]
    assert lines_with(conv, "those hosts are NOT denied") == [9]


def test_xinetd_only_from_with_only_names_disables(tmp_path: Path) -> None:
    conv = xinetd(
        tmp_path,
        service_block(
            "socket_type = stream\nwait = no\nuser = root\nserver = /bin/cat\nport = 7000\n"
            "only_from = trusted.example.com"
        ),
    )
    assert svc(conv, "svc")["enabled"] is False
    assert "allow" not in svc(conv, "svc")


def test_xinetd_attribute_mapping(tmp_path: Path) -> None:
    conv = xinetd(
        tmp_path,
        "service finger\n"  # 1
        "{\n"
        "\tsocket_type = stream\n"
        "\tprotocol = tcp\n"
        "\twait = no\n"  # 5
        "\tuser = nobody\n"
        "\tgroup = nogroup\n"
        "\tserver = /usr/sbin/in.fingerd\n"
        "\tserver_args = -w\n"
        "\tinstances = 10\n"  # 10
        "\tper_source = 3\n"
        "\tcps = 25 30\n"
        "\tenv = LANG=C TZ=UTC\n"
        "\tenv += EXTRA=1\n"
        "\tpassenv = PATH\n"  # 15
        "\tbanner = /etc/issue.net\n"
        "\trlimit_as = 8M\n"
        "\trlimit_cpu = 20\n"
        "\trlimit_data = 512K\n"
        "\trlimit_stack = 8388608\n"  # 20
        "\trlimit_rss = 100M\n"
        "\tnice = -5\n"
        "\tumask = 0027\n"
        "\tlog_type = FILE /var/log/finger.log\n"
        "\tlog_on_success = PID HOST\n"  # 25
        "\tlog_on_failure += USERID\n"
        "\taccess_times = 2:00-9:00 12:00-24:00\n"
        "\tmdns = no\n"
        "\tflags = REUSE NODELAY\n"
        "\tinterface = 127.0.0.1\n"  # 30
        "}\n",
    )
    assert svc(conv, "finger") == {
        "listen": "127.0.0.1:79",
        "protocol": "tcp",
        "exec": ["/usr/sbin/in.fingerd", "-w"],
        "wait": False,
        "user": "nobody",
        "group": "nogroup",
        "max_connections": 10,
        "on_limit": "reject",
        "per_source": 3,
        "rate": "25/s",
        "rate_pause": 30,
        "env": {"LANG": "C", "TZ": "UTC", "EXTRA": "1"},
        "umask": "027",
        "nice": -5,
        "rlimits": {"as": "8M", "cpu": 20, "data": 524288, "stack": "8M"},
        "banner": "/etc/issue.net",
        "access_times": "2:00-9:00 12:00-24:00",
        "nodelay": True,
    }
    warned = sorted(w.line for w in conv.warnings)
    # passenv, rlimit_rss, log_type, log_on_success, log_on_failure
    assert warned == [15, 21, 24, 25, 26]
    assert all(w.file == str(tmp_path / "xinetd.conf") for w in conv.warnings)


def test_xinetd_unlimited_values_are_omitted(tmp_path: Path) -> None:
    conv = xinetd(
        tmp_path,
        service_block(
            "socket_type = stream\nwait = no\nuser = root\nserver = /bin/cat\nport = 7000\n"
            "instances = UNLIMITED\nper_source = UNLIMITED\nrlimit_as = UNLIMITED\ncps = 0 0"
        ),
    )
    s = svc(conv, "svc")
    for key in ("max_connections", "per_source", "rlimits", "rate"):
        assert key not in s
    assert lines_with(conv, "rlimit_as = UNLIMITED left out") == [10]
    assert len(conv.warnings) == 1


def test_xinetd_unlimited_cannot_lift_defaults_limit(tmp_path: Path) -> None:
    conv = xinetd(
        tmp_path,
        "defaults\n{\ninstances = 10\n}\n"
        + service_block(
            "socket_type = stream\nwait = no\nuser = root\nserver = /bin/cat\nport = 7000\n"
            "instances = UNLIMITED"
        ),
    )
    assert conv.config["defaults"]["max_connections"] == 10
    assert len(lines_with(conv, "cannot lift the defaults limit")) == 1


@pytest.mark.parametrize(
    ("extra", "listen"),
    [
        ("", "0.0.0.0:7000"),
        ("flags = IPv4", "0.0.0.0:7000"),
        ("flags = IPv6", 7000),  # an AF_INET6 socket, dual stack while v6only = no
        ("flags = IPv6\nv6only = yes", "[::]:7000"),
        ("bind = 192.0.2.1", "192.0.2.1:7000"),
        ("bind = ::1", "[::1]:7000"),
        ("interface = 127.0.0.1", "127.0.0.1:7000"),
    ],
)
def test_xinetd_listen_address(tmp_path: Path, extra: str, listen: int | str) -> None:
    conv = xinetd(
        tmp_path,
        service_block(
            f"socket_type = stream\nwait = no\nuser = root\nserver = /bin/cat\nport = 7000\n{extra}"
        ),
    )
    assert svc(conv, "svc")["listen"] == listen
    assert conv.warnings == ()


def test_xinetd_defaults_bind_applies_to_services(tmp_path: Path) -> None:
    conv = xinetd(
        tmp_path,
        "defaults\n{\n bind = 127.0.0.1\n}\n"
        + service_block("type = INTERNAL\nsocket_type = stream\nwait = no", "echo")
        + service_block("type = INTERNAL\nsocket_type = stream\nwait = no\nbind = ::1", "time"),
    )
    assert "defaults" not in conv.config
    assert svc(conv, "echo")["listen"] == "127.0.0.1:7"
    assert svc(conv, "time")["listen"] == "[::1]:37"


def test_xinetd_redirect(tmp_path: Path) -> None:
    conv = xinetd(
        tmp_path,
        service_block(
            "type = UNLISTED\nsocket_type = stream\nprotocol = tcp\nwait = no\nport = 8080\n"
            "user = nobody\nredirect = 10.0.0.5 80\nserver = /bin/true",
            "webproxy",
        )
        + service_block(
            "type = UNLISTED\nsocket_type = stream\nwait = no\nport = 8081\n"
            "redirect = 2001:db8::5 telnet",
            "v6proxy",
        ),
    )
    assert svc(conv, "webproxy") == {
        "listen": "0.0.0.0:8080",
        "protocol": "tcp",
        "redirect": "10.0.0.5:80",
    }
    assert lines_with(conv, "server ignored, redirect takes priority") == [10]
    # xinetd waives server for a redirect, not user: it disables v6proxy.
    assert svc(conv, "v6proxy")["redirect"] == "[2001:db8::5]:23"
    assert svc(conv, "v6proxy")["enabled"] is False
    assert lines_with(conv, "v6proxy: missing user") == [12]


def test_xinetd_internal_services_by_name_and_id(tmp_path: Path) -> None:
    body = "type = INTERNAL\nid = {}\nsocket_type = {}\nprotocol = {}\nuser = root\nwait = {}"
    conv = xinetd(
        tmp_path,
        service_block(body.format("echo-stream", "stream", "tcp", "no"), "echo")
        + service_block(body.format("echo-dgram", "dgram", "udp", "yes"), "echo")
        + service_block(body.format("daytime-stream", "stream", "tcp", "no"), "daytime")
        + service_block("type = INTERNAL\nsocket_type = stream\nwait = no", "tcpmux"),
    )
    assert list(conv.config["services"]) == ["echo-stream", "echo-dgram", "daytime"]
    assert svc(conv, "echo-dgram") == {"listen": "0.0.0.0:7", "protocol": "udp", "builtin": "echo"}
    assert len(lines_with(conv, "internal service 'tcpmux' has no pyinetd builtin")) == 1


def test_xinetd_duplicate_ids_are_renamed_with_warning(tmp_path: Path) -> None:
    body = "type = INTERNAL\nid = echo-dgram\nsocket_type = dgram\nwait = yes\ndisable = yes"
    conv = xinetd(tmp_path, service_block(body, "echo") + service_block(body, "echo"))
    assert list(conv.config["services"]) == ["echo-dgram", "echo-dgram-2"]
    assert lines_with(conv, "already defined at") == [9]


def test_xinetd_disable_and_defaults_disabled_enabled(tmp_path: Path) -> None:
    body = "type = INTERNAL\nsocket_type = stream\nwait = no"
    conv = xinetd(
        tmp_path,
        "defaults\n{\n disabled = time\n disabled = daytime-stream\n}\n"
        + service_block(body + "\ndisable = yes", "echo")
        + service_block(body + "\ndisable = no", "discard")
        + service_block(body, "time")
        + service_block(body + "\nid = daytime-stream", "daytime"),
    )
    assert svc(conv, "echo")["enabled"] is False
    assert "enabled" not in svc(conv, "discard")
    assert svc(conv, "time")["enabled"] is False
    assert svc(conv, "daytime")["enabled"] is False
    conv = xinetd(
        tmp_path,
        "defaults\n{\n enabled = echo\n}\n"
        + service_block(body, "echo")
        + service_block(body, "time"),
    )
    assert "enabled" not in svc(conv, "echo")
    assert svc(conv, "time")["enabled"] is False


def test_xinetd_nameinargs_with_tcpd(tmp_path: Path) -> None:
    conv = xinetd(
        tmp_path,
        service_block(
            "flags = NAMEINARGS\nsocket_type = stream\nwait = no\nuser = root\n"
            "server = /usr/sbin/tcpd\nserver_args = /usr/sbin/in.telnetd -h",
            "telnet",
        )
        + service_block(
            "flags = NAMEINARGS\nsocket_type = stream\nwait = no\nuser = root\n"
            "server = /usr/bin/rsync\nserver_args = rsyncd --daemon",
            "rsync",
        ),
    )
    assert svc(conv, "telnet")["exec"] == ["/usr/sbin/in.telnetd", "-h"]
    assert svc(conv, "rsync")["exec"] == ["/usr/bin/rsync", "--daemon"]
    assert lines_with(conv, "tcp wrappers") == [8]
    assert svc(conv, "rsync")["argv0"] == "rsyncd"


def test_xinetd_tcpd_without_nameinargs(tmp_path: Path) -> None:
    conv = xinetd(
        tmp_path,
        service_block(
            "socket_type = stream\nwait = no\nuser = root\n"
            "server = /usr/sbin/tcpd\nserver_args = /usr/sbin/in.ftpd -l",
            "ftp",
        ),
    )
    assert svc(conv, "ftp")["exec"] == ["/usr/sbin/in.ftpd", "-l"]
    assert lines_with(conv, "tcpd without the NAMEINARGS flag") == [7]
    assert lines_with(conv, "tcp wrappers") == [7]


def test_xinetd_port_from_services_file_or_attribute(tmp_path: Path) -> None:
    base = "socket_type = stream\nwait = no\nuser = root\nserver = /bin/cat\n"
    conv = xinetd(
        tmp_path,
        service_block(base, "telnet")
        + service_block(base + "port = 2323", "telnet")
        + service_block(base, "mystery")
        + service_block(base + "type = UNLISTED", "unlisted")
        + service_block(base + "type = UNLISTED\nport = 9999", "local")
        + service_block(base + "port = 99999", "toobig"),
    )
    services = conv.config["services"]
    assert services["telnet"]["listen"] == "0.0.0.0:23"
    # xinetd refuses a port other than the services file's for a listed service.
    assert services["telnet-2"]["listen"] == "0.0.0.0:2323"
    assert services["telnet-2"]["enabled"] is False
    assert services["local"]["listen"] == "0.0.0.0:9999"
    assert "mystery" not in services and "unlisted" not in services
    assert "toobig" not in services
    messages = " | ".join(w.message for w in conv.warnings)
    assert "'mystery'/tcp is not in the services file" in messages
    assert "UNLISTED needs a port" in messages
    assert "bad port '99999'" in messages
    assert "differs from 23" in messages


def test_xinetd_unsupported_types_and_flags(tmp_path: Path) -> None:
    base = "socket_type = stream\nwait = no\nuser = root\nserver = /bin/cat\n"
    conv = xinetd(
        tmp_path,
        service_block(base + "type = RPC\nrpc_version = 2-4", "rstatd")
        + service_block(base + "type = TCPMUX UNLISTED", "myorg_server")
        + service_block(base + "flags = SENSOR", "telnet")
        + service_block(base + "flags = IPv4 IPv6", "ftp")
        + service_block("socket_type = raw\nwait = no\nuser = root\nserver = /bin/cat", "finger"),
    )
    assert list(conv.config["services"]) == ["ftp"]
    assert svc(conv, "ftp")["enabled"] is False
    messages = [w.message for w in conv.warnings]
    assert any("type RPC is not supported" in m for m in messages)
    assert any("type TCPMUX is not supported" in m for m in messages)
    assert any("SENSOR" in m for m in messages)
    assert any("both IPv4 and IPv6" in m for m in messages)
    assert any("socket_type raw is not supported" in m for m in messages)


def test_xinetd_syntax_errors_warn_with_line_numbers(tmp_path: Path) -> None:
    conv = xinetd(
        tmp_path,
        "service telnet\n"  # 1
        "\tsocket_type = stream\n"  # 2: no '{'
        "}\n"  # 3
        "service echo\n"  # 4
        "{\n"
        "\ttype= INTERNAL\n"  # 6: xinetd needs a space before the operator
        "\tsocket_type = stream\n"
        "\twait = no\n"
        "}\n"
        "service time\n"  # 10
        "{\n"
        "\ttype = INTERNAL\n"
        "\ttype = UNLISTED\n"  # 13: set twice, first kept
        "\tsocket_type += stream\n"  # 14: += on a single-valued attribute
        "\tsocket_type = stream\n"
        "\tcps = 10\n"  # 16: two values expected
        "\tfrobnicate = yes\n"  # 17: unknown
        "\twait = no\n"
        "}\n"
        "stray line\n"  # 20
        "service daytime\n"  # 21
        "{\n"
        "\ttype = INTERNAL\n",
    )
    assert list(conv.config["services"]) == ["time"]
    assert svc(conv, "time")["builtin"] == "time"
    assert [w.line for w in conv.warnings] == [1, 6, 13, 14, 16, 17, 20]
    assert "missing '{'; xinetd skips lines 2-3" in conv.warnings[0].message
    assert "xinetd drops the whole entry" in conv.warnings[1].message
    # Like xinetd's skip_entry(), a stray line swallows everything up to a lone '}'.
    assert "unexpected 'stray line'; xinetd skips the rest" in conv.warnings[-1].message


def test_xinetd_missing_closing_brace(tmp_path: Path) -> None:
    conv = xinetd(tmp_path, "service echo\n{\n type = INTERNAL\n socket_type = stream\n")
    assert conv.config["services"] == {}
    assert lines_with(conv, "service echo: missing '}'") == [1]


def test_xinetd_stray_closing_brace_swallows_next_entry(tmp_path: Path) -> None:
    body = "type = INTERNAL\nsocket_type = stream\nwait = no"
    conv = xinetd(tmp_path, "}\n" + service_block(body, "echo") + service_block(body, "time"))
    assert list(conv.config["services"]) == ["time"]
    assert lines_with(conv, "xinetd skips lines 2-7") == [1]


def test_xinetd_wrong_section_attributes_warn(tmp_path: Path) -> None:
    conv = xinetd(
        tmp_path,
        "defaults\n{\n server = /bin/cat\n}\n"
        + service_block(
            "type = INTERNAL\nsocket_type = stream\nwait = no\ndisabled = echo", "echo"
        ),
    )
    assert lines_with(conv, "server is not allowed in a defaults entry") == [3]
    assert lines_with(conv, "disabled is not allowed in a service entry") == [10]


def test_xinetd_missing_required_attributes_disable(tmp_path: Path) -> None:
    conv = xinetd(
        tmp_path,
        service_block("socket_type = stream\nserver = /bin/cat\nport = 7000", "nouser"),
    )
    s = svc(conv, "nouser")
    assert s["enabled"] is False
    assert "user" not in s
    assert len(lines_with(conv, "missing user")) == 1
    assert len(lines_with(conv, "missing wait")) == 1


def test_xinetd_env_and_passenv(tmp_path: Path) -> None:
    conv = xinetd(
        tmp_path,
        service_block(
            "socket_type = stream\nwait = no\nuser = root\nserver = /bin/cat\nport = 7000\n"
            "env = A=1 B=2\nenv = C=3\nenv += D=x=y\nenv -= C=3\nenv += NOEQUALS\npassenv = PATH"
        ),
    )
    assert svc(conv, "svc")["env"] == {"C": "3", "D": "x=y"}
    assert [m for m in (w.message for w in conv.warnings) if "env" in m] == [
        "service svc: env does not support -=; ignored",
        "service svc: env 'NOEQUALS' has no '='; ignored",
        "service svc: passenv not carried over: pyinetd cannot pass selected variables; "
        "use env (and env_clear)",
    ]


def test_xinetd_include_and_includedir(tmp_path: Path) -> None:
    conf = tmp_path / "etc"
    d = conf / "xinetd.d"
    d.mkdir(parents=True)
    internal = "type = INTERNAL\nsocket_type = stream\nwait = no"
    (d / "b").write_text(service_block(internal, "time"))
    (d / "a").write_text(service_block(internal, "echo"))
    (d / "c.dpkg-old").write_text(service_block(internal, "discard"))
    (d / "d~").write_text(service_block(internal, "discard"))
    (d / "e").mkdir()
    (conf / "extra.conf").write_text(service_block(internal, "daytime"))
    (conf / "loop.conf").write_text("include loop.conf\n")
    main = conf / "xinetd.conf"
    main.write_text(
        "defaults\n{\n}\n"
        "include extra.conf\n"  # relative to the including file
        "include /etc/loop.conf\n"  # absolute: under root
        "includedir /etc/xinetd.d\n"
        "include /etc/missing.conf\n"
    )
    conv = convert_xinetd_conf(main, SERVICES, root=tmp_path)
    # includedir: C-locale order; '.' and '~' names and non-files skipped, as xinetd does.
    assert list(conv.config["services"]) == ["daytime", "echo", "time"]
    messages = [str(w) for w in conv.warnings]
    assert any(m.startswith(f"{conf / 'loop.conf'}:1: include loop") for m in messages)
    assert any(str(d / "c.dpkg-old") in m and "ignores names" in m for m in messages)
    assert any(str(d / "d~") in m and "ignores names" in m for m in messages)
    assert any(str(d / "e") in m and "not a regular file" in m for m in messages)
    assert any(m.startswith(f"{main}:7: cannot read included file") for m in messages)


def test_xinetd_second_defaults_in_one_file_ignored(tmp_path: Path) -> None:
    conv = xinetd(tmp_path, "defaults\n{\n instances = 5\n}\ndefaults\n{\n instances = 9\n}\n")
    assert conv.config["defaults"]["max_connections"] == 5
    assert lines_with(conv, "only one defaults entry") == [5]


def test_xinetd_fixture_tree() -> None:
    conv = convert_xinetd_conf(XINETD_ROOT / "etc/xinetd.conf", SERVICES, root=XINETD_ROOT)
    config = conv.config
    assert config["defaults"] == {
        "max_connections": 50,
        "on_limit": "reject",
        "per_source": 10,
        "rate": "50/s",
        "rate_pause": 10,
        "umask": "002",
    }
    services = config["services"]
    assert list(services) == [
        "amanda",
        "cvspserver",
        "echo",
        "rsync",
        "swat",
        "talk",
        "telnet",
        "tftp",
        "ftp",
    ]
    assert all(services[n]["enabled"] is False for n in services if n != "ftp")
    assert services["ftp"]["nice"] == 10
    assert services["rsync"]["listen"] == 873
    assert services["swat"]["listen"] == "0.0.0.0:901"
    assert services["swat"]["allow"] == ["127.0.0.1"]
    assert services["cvspserver"]["env"] == {"HOME": "/var/cvs"}
    assert services["tftp"]["rate"] == "100/s"
    assert services["tftp"]["per_source"] == 11
    assert services["amanda"]["group"] == "disk"
    assert services["echo"]["builtin"] == "echo"
    files = [Path(w.file).name for w in conv.warnings]
    # Reported in the order xinetd reads: xinetd.conf first, then xinetd.d by name.
    assert files == [
        "xinetd.conf",
        "xinetd.conf",
        "xinetd.conf",
        "xinetd.conf",
        "amanda",
        "cvs",
        "rsync",
        "rsync~",
        "swat",
        "telnet",
        "telnet.rpmsave",
    ]


# --------------------------------------------------------------------------- both


def test_convert_file_detects_the_format(tmp_path: Path) -> None:
    assert "echo-tcp" in convert_file(FIXTURES / "inetd.conf", SERVICES).config["services"]
    tree = convert_file(XINETD_ROOT / "etc/xinetd.conf", SERVICES, root=XINETD_ROOT)
    assert "defaults" in tree.config
    single = convert_file(XINETD_ROOT / "etc/xinetd.d/tftp", SERVICES)
    assert list(single.config["services"]) == ["tftp"]
    brace = tmp_path / "inline"
    brace.write_text("service echo {\n type = INTERNAL\n socket_type = stream\n wait = no\n}\n")
    assert list(convert_file(brace, SERVICES).config["services"]) == ["echo"]


def all_fixture_conversions() -> list[Conversion]:
    return [
        convert_inetd_conf(FIXTURES / "inetd.conf", SERVICES),
        convert_xinetd_conf(XINETD_ROOT / "etc/xinetd.conf", SERVICES, root=XINETD_ROOT),
    ]


def test_fixtures_round_trip_through_yaml_and_toml() -> None:
    for conv in all_fixture_conversions():
        check_round_trip(conv)


def test_emitted_keys_are_pyinetd_keys() -> None:
    for conv in all_fixture_conversions():
        check_keys(conv.config)


def test_dump_format_and_comments() -> None:
    conv = Conversion(
        {"services": {"echo": {"listen": 7, "protocol": "tcp", "builtin": "echo"}}},
        (ConvertWarning("/etc/inetd.conf", 3, "two\nlines"),),
    )
    text = dump(conv, "yaml")
    assert text.startswith("# warning: /etc/inetd.conf:3: two lines\nservices:\n  echo:\n")
    assert dump(conv, "toml").startswith("# warning: /etc/inetd.conf:3: two lines\n")
    assert str(conv.warnings[0]) == "/etc/inetd.conf:3: two\nlines"
    assert json.loads(dump(conv, "json")) == conv.config  # warnings: the CLI prints them
    with pytest.raises(ValueError, match="unknown format"):
        dump(conv, "xml")


def test_unreadable_top_level_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        convert_file(tmp_path / "nope")


# --------------------------------------------------------------------------- properties

inetd_field = st.text(
    alphabet=st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789./:,*[]-_#<>=+"),
    min_size=1,
    max_size=12,
)
inetd_line = st.one_of(
    st.lists(inetd_field, min_size=1, max_size=9).map("\t".join),
    st.tuples(
        st.sampled_from(["echo", "telnet", "tftp", "127.0.0.1:echo", "nosuch", "/run/x.sock"]),
        st.sampled_from(["stream", "dgram", "raw"]),
        st.sampled_from(["tcp", "udp", "tcp6", "udp4", "unix", "rpc/tcp", "sctp", "tcp,rcvbuf=1"]),
        st.sampled_from(["wait", "nowait", "nowait.10", "nowait/2/3/4", "wait:5", "maybe"]),
        st.sampled_from(["root", "nobody.tty", "a:b/c", "0"]),
        st.sampled_from(["internal", "/usr/sbin/tcpd", "/bin/cat"]),
        st.lists(st.sampled_from(["cat", "/bin/cat", "-x", "in.x"]), max_size=3),
    ).map(lambda t: "\t".join([*t[:6], *t[6]])),
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(line=inetd_line)
def test_inetd_no_line_is_dropped_silently(tmp_path: Path, line: str) -> None:
    conv = inetd(tmp_path, "# header\n" + line + "\n")
    fields = line.split()
    if fields[0].startswith("#") or (len(fields) == 1 and line.endswith(":")):
        return  # a comment, or openbsd-inetd's "host:" line
    # An entry line becomes a service or is reported against its own line number.
    assert conv.config["services"] or 2 in {w.line for w in conv.warnings}
    check_keys(conv.config)
    check_round_trip(conv)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    body=st.lists(
        st.tuples(
            st.sampled_from(
                sorted({"type", "socket_type", "wait", "only_from", "cps", "env", "x"})
            ),
            st.sampled_from(["=", "+=", "-="]),
            st.lists(
                st.sampled_from(
                    ["INTERNAL", "stream", "dgram", "yes", "no", "10", "A=b", "1.2.0.0"]
                ),
                max_size=3,
            ),
        ),
        max_size=8,
    ),
    name=st.sampled_from(["echo", "time", "telnet", "mystery"]),
)
def test_xinetd_any_entry_converts_or_warns(
    tmp_path: Path, body: list[tuple[str, str, list[str]]], name: str
) -> None:
    text = "\n".join(f"{a} {op} {' '.join(v)}" for a, op, v in body)
    conv = xinetd(tmp_path, service_block(text, name))
    assert conv.config["services"] or conv.warnings
    check_keys(conv.config)
    check_round_trip(conv)


# --------------------------------------------------------------------------- real packages


def update_inetd(conf: Path, *args: str) -> None:
    # UPDATE_INETD_FAKE_IT: do not signal or restart a running inetd (DebianNet.pm).
    env = dict(
        os.environ,
        UPDATE_INETD_FAKE_IT="1",
        UPDATE_INETD_NOXINETD="1",
        DEBIAN_FRONTEND="noninteractive",
    )
    subprocess.run(
        ["update-inetd", "--file", str(conf), *args],
        env=env,
        check=True,
        capture_output=True,
        timeout=30,
    )


def test_real_openbsd_inetd_conf(tmp_path: Path) -> None:
    """Debian's openbsd-inetd /etc/inetd.conf, with entries added as packages add them."""
    # The file as openbsd-inetd 0.20221205-2~deb12u1's postinst writes it: a copy the test
    # owns, not the machine's /etc/inetd.conf, which any installed package may have added to.
    conf = tmp_path / "inetd.conf"
    shutil.copyfile(FIXTURES / "openbsd-inetd" / "inetd.conf", conf)
    services = SERVICES
    conv = convert_inetd_conf(conf, services)
    # As shipped: every entry commented out.
    assert conv.config == {"services": {}}
    assert conv.warnings == ()
    if shutil.which("update-inetd") is None:
        pytest.skip("update-inetd not installed")
    update_inetd(
        conf,
        "--group",
        "BSD",
        "--add",
        "talk\t\tdgram\tudp\twait\tnobody.tty\t/usr/sbin/in.talkd\tin.talkd",
    )
    update_inetd(
        conf,
        "--group",
        "STANDARD",
        "--add",
        "telnet\t\tstream\ttcp\tnowait\troot\t/usr/sbin/tcpd\t/usr/sbin/in.telnetd",
    )
    update_inetd(
        conf,
        "--group",
        "BOOT",
        "--add",
        "tftp\t\tdgram\tudp4\twait\troot\t/usr/sbin/in.tftpd /usr/sbin/in.tftpd -s /srv/tftp",
    )
    update_inetd(conf, "--disable", "telnet")
    conv = convert_inetd_conf(conf, services)
    new = {k: v for k, v in conv.config["services"].items() if k in {"talk", "telnet", "tftp"}}
    assert new["talk"]["user"] == "nobody" and new["talk"]["group"] == "tty"
    assert new["telnet"]["enabled"] is False
    assert new["telnet"]["exec"] == ["/usr/sbin/in.telnetd"]
    assert new["tftp"]["listen"] == "0.0.0.0:69"
    telnet_line = next(
        n for n, line in enumerate(conf.read_text().splitlines(), 1) if "in.telnetd" in line
    )
    assert telnet_line in lines_with(conv, "tcpd wrapper")
    check_keys(conv.config)
    check_round_trip(conv)


@pytest.fixture(scope="module")
def debian_xinetd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The files of Debian's xinetd package, unpacked with dpkg-deb (not installed)."""
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb not available")
    work = tmp_path_factory.mktemp("xinetd-deb")
    debs = [os.environ.get("PYINETD_XINETD_DEB", "")]
    debs += sorted(glob.glob("/var/cache/apt/archives/xinetd_*.deb"))
    deb = next((d for d in debs if d and Path(d).is_file()), None)
    if deb is None and shutil.which("apt-get") is not None:
        try:
            subprocess.run(
                ["apt-get", "download", "xinetd"],
                cwd=work,
                check=True,
                capture_output=True,
                timeout=120,
            )
        except (OSError, subprocess.SubprocessError):
            pytest.skip("cannot download the xinetd package (offline?)")
        deb = next((str(p) for p in work.glob("xinetd_*.deb")), None)
    if deb is None:
        pytest.skip("no xinetd .deb available")
    root = work / "root"
    try:
        subprocess.run(
            ["dpkg-deb", "-x", deb, str(root)], check=True, capture_output=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        pytest.skip("dpkg-deb -x failed")
    if not (root / "etc/xinetd.conf").is_file():
        pytest.skip("the package has no etc/xinetd.conf")
    yield root


def test_real_debian_xinetd_package(debian_xinetd: Path) -> None:
    root = debian_xinetd
    services = Path("/etc/services") if Path("/etc/services").is_file() else SERVICES
    conv = convert_file(root / "etc/xinetd.conf", services, root=root)
    check_keys(conv.config)
    check_round_trip(conv)
    found = conv.config["services"]
    # Debian ships every service disabled, the builtins as INTERNAL entries named by id.
    assert found, "no service converted"
    assert all(s["enabled"] is False for s in found.values())
    for name in ("echo-stream", "echo-dgram", "time-stream", "chargen-dgram"):
        assert found[name]["builtin"] == name.split("-")[0]
    assert found["echo-stream"]["listen"] == "0.0.0.0:7"
    assert found["echo-dgram"]["protocol"] == "udp"
    # servers/services are xinetd-only internals: reported, not converted.
    for internal in ("servers", "services"):
        if (root / "etc/xinetd.d" / internal).exists():
            assert any(f"internal service '{internal}'" in w.message for w in conv.warnings)
    for w in conv.warnings:
        assert Path(w.file).is_relative_to(root)
        assert w.line > 0 or "xinetd ignores names" in w.message


def test_cli_convert_writes_yaml_that_pyinetd_accepts(tmp_path: Path) -> None:
    """`pyinetd convert FILE` end to end: YAML on stdout, warnings on stderr, loadable."""
    import subprocess
    import sys

    conf = tmp_path / "inetd.conf"
    conf.write_text(
        "# a comment\n"
        "echo stream tcp nowait root internal\n"
        "daytime dgram udp wait root internal\n"
        "finger stream tcp nowait nobody /usr/sbin/tcpd /usr/sbin/in.fingerd\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "pyinetd", "convert", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert "warning:" in out.stderr and f"{conf}:4" in out.stderr  # the tcpd line
    doc = yaml.safe_load(out.stdout)
    assert doc["services"]["echo"]["builtin"] == "echo"
    assert doc["services"]["daytime"]["protocol"] == "udp"


# --------------------------------------------------------------------------- issue 18.13


def test_file_name_with_a_newline_adds_no_include(tmp_path: Path) -> None:
    # A file name in an includedir ends up in a warning comment: with a raw newline it became
    # a real top-level `include:` of the output, which pyinetd would then follow.
    d = tmp_path / "xinetd.d"
    d.mkdir()
    (d / "x.\ninclude: evil.yaml\n#").write_text("")
    (d / "e\x1b]0;owned\x07").write_text("service\n")
    conv = xinetd(
        tmp_path, f"includedir {d}\n" + service_block("type = INTERNAL\nwait = no", "echo")
    )
    for fmt in ("yaml", "toml"):
        out = dump(conv, fmt)
        assert "include" not in (yaml.safe_load(out) if fmt == "yaml" else tomllib.loads(out))
        comments = [ln for ln in out.splitlines() if ln.startswith("# warning:")]
        assert len(comments) == len(conv.warnings) >= 2
        assert any(r"/x.\ninclude: evil.yaml\n#:0: skipped" in c for c in comments)
        assert "\x1b" not in out and any(r"e\x1b]0;owned\x07" in c for c in comments)


def test_files_that_include_their_own_folder_are_read_once(tmp_path: Path) -> None:
    # 8 files, each including the folder they are in: 60 s and 767k warnings when only the
    # current include chain was checked.
    d = tmp_path / "xinetd.d"
    d.mkdir()
    for i in range(8):
        (d / f"s{i}").write_text(f"includedir {d}\n" + service_block("type = INTERNAL", f"s{i}"))
    conv = xinetd(tmp_path, f"includedir {d}\n")
    # Each file read once; each of its 8 folder entries then a one-line "loop"/"already" note.
    notes = [w for w in conv.warnings if "include loop" in w.message or "already" in w.message]
    assert len(notes) == 8 * 8


@pytest.mark.parametrize("target", ["/dev/zero", "fifo"])
def test_include_of_something_not_a_file_is_skipped(tmp_path: Path, target: str) -> None:
    # `include /dev/zero` ended in MemoryError, a FIFO hung the conversion.
    if target == "fifo":
        os.mkfifo(tmp_path / "fifo")
        target = str(tmp_path / "fifo")
    conv = xinetd(tmp_path, f"include {target}\n")
    assert [w.message for w in conv.warnings] == [
        f"cannot read included file {target}: not a regular file"
    ]
    with pytest.raises(OSError, match="not a regular file"):
        convert_file(Path(target))


def test_xinetd_bind_to_an_interface_access_times_load_and_socket_options(tmp_path: Path) -> None:
    # Issue 16: `bind = lo` became listen: lo:7, which --check then refused; access_times,
    # max_load, KEEPALIVE, NODELAY, rcvbuf and sndbuf were dropped with a warning.
    conv = xinetd(
        tmp_path,
        service_block(
            "type = INTERNAL\nsocket_type = stream\nwait = no\nbind = lo\n"
            "access_times = 08:00-12:00 13:00-17:00\nmax_load = 2.5\nflags = KEEPALIVE NODELAY\n"
            "rcvbuf = 65536\nsndbuf = 128k",
            "echo",
        )
        + service_block(
            "type = INTERNAL\nsocket_type = dgram\nprotocol = udp\nwait = yes\n"
            "access_times = 25:00-26:00\nflags = NODELAY",
            "time",
        ),
    )
    echo = svc(conv, "echo")
    assert (echo["listen"], echo["interface"]) == ("0.0.0.0:7", "lo")
    assert (echo["access_times"], echo["max_load"]) == ("08:00-12:00 13:00-17:00", 2.5)
    assert (echo["keepalive"], echo["nodelay"]) == (True, True)
    assert (echo["receive_buffer"], echo["send_buffer"]) == ("65536", "128k")
    time = svc(conv, "time")
    assert not {"access_times", "nodelay"} & set(time)
    assert [w.message.split(": ", 1)[1] for w in conv.warnings] == [
        "bad access_times '25:00-26:00'; ignored",
        "flag NODELAY is for tcp; ignored",
    ]
    # What convert writes passes --check.
    out = tmp_path / "converted.yaml"
    out.write_text(dump(conv, "yaml"))
    cfg = load(out)
    assert [s.interface for s in cfg.services] == ["lo", None]
    assert cfg.services[0].access_times == ((480, 720), (780, 1020))
