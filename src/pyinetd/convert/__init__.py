"""Convert classic inetd.conf and xinetd configuration into a pyinetd configuration dict.

The output uses only the keys of pyinetd's configuration format. Whatever cannot be carried
over is reported as a ConvertWarning (file, line, message) and never dropped silently.
Pure module: it reads files, it opens no sockets and starts no processes.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import posixpath
import re
import socket
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from pyinetd.config.inputform import number
from pyinetd.config.keys import SERVICE_KEYS
from pyinetd.config.parsers import BUILTINS, _parse_access_times, _parse_buffer, _parse_load
from pyinetd.config.writer import write

__all__ = [
    "Conversion",
    "ConvertWarning",
    "convert_file",
    "convert_inetd_conf",
    "convert_xinetd_conf",
    "dump",
]

DEFAULT_SERVICES = Path("/etc/services")

# The services both inetd and pyinetd implement internally.
_BUILTINS = frozenset(BUILTINS)

# openbsd-inetd, inetutils and NetBSD inetd stop a service for ten minutes once it exceeds
# its per-minute invocation limit (RETRYTIME = 60 * 10 in their inetd.c).
_INETD_RETRY_SECONDS = 600

# tcpd(8) looks up a wrapped program named without a slash in REAL_DAEMON_DIR, which
# Debian's tcp-wrappers build sets to /usr/sbin.
_TCPD_DAEMON_DIR = "/usr/sbin"


@dataclass(frozen=True)
class ConvertWarning:
    """Something in the source file that was not carried over exactly."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


@dataclass(frozen=True)
class Conversion:
    """A pyinetd configuration dict and what could not be carried over."""

    config: dict[str, Any]
    warnings: tuple[ConvertWarning, ...]


# --------------------------------------------------------------------------- /etc/services


@dataclass(frozen=True)
class _Services:
    """Name -> port lookups from a services(5) file, getservbyname if the file is missing."""

    entries: dict[tuple[str, str], tuple[int, str]] = field(default_factory=dict)
    use_resolver: bool = False

    @classmethod
    def load(cls, path: Path) -> _Services:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return cls(use_resolver=True)
        entries: dict[tuple[str, str], tuple[int, str]] = {}
        for raw in text.splitlines():
            fields = raw.split("#", 1)[0].split()
            if len(fields) < 2 or "/" not in fields[1]:
                continue
            port_text, _, proto = fields[1].partition("/")
            if not _is_number(port_text):
                continue
            official = fields[0]
            for name in [official, *fields[2:]]:
                # getservbyname returns the first matching line, so the first one wins.
                entries.setdefault((name, proto), (int(port_text), official))
        return cls(entries=entries)

    def lookup(self, name: str, proto: str) -> tuple[int, str] | None:
        """(port, official name) of a service name or number, or None if unknown."""
        if _is_number(name):
            port = int(name)
            return (port, name) if 0 < port < 65536 else None
        if self.use_resolver:
            try:
                return socket.getservbyname(name, proto), name
            except OSError:
                return None
        return self.entries.get((name, proto))


# --------------------------------------------------------------------------- shared helpers


class _Sink:
    """Collects warnings in the order they are found."""

    def __init__(self) -> None:
        self.items: list[ConvertWarning] = []

    def __call__(self, file: str, line: int, message: str) -> None:
        self.items.append(ConvertWarning(file, line, message))


def _is_number(text: str) -> bool:
    # Not str.isdigit(): it accepts digits such as "²" that int() rejects.
    return re.fullmatch(r"[0-9]+", text) is not None


def _int_or_name(value: str) -> int | str:
    return int(value) if _is_number(value) else value


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _unique_key(wanted: str, used: set[str]) -> str:
    key, n = wanted, 2
    while key in used:
        key = f"{wanted}-{n}"
        n += 1
    used.add(key)
    return key


def _exec_argv(server: str, argv: list[str], file: str, line: int, warn: _Sink) -> list[str] | None:
    """[program, args...] from a server path and an argv that starts with argv[0]."""
    if posixpath.basename(server) == "tcpd":
        if not argv:
            warn(file, line, f"{server} without a program to wrap; entry skipped")
            return None
        wrapped = argv[0]
        if "/" not in wrapped:
            wrapped = posixpath.join(_TCPD_DAEMON_DIR, wrapped)
        warn(
            file,
            line,
            f"tcpd wrapper removed, {wrapped} is run directly: tcp wrappers "
            "(/etc/hosts.allow, /etc/hosts.deny) are not applied, express those rules "
            "as allow/deny",
        )
        return [wrapped, *argv[1:]]
    return [server, *argv[1:]]


def _argv0(server: str, argv: list[str]) -> str | None:
    """argv[0] when it is not the program's own name (`/bin/busybox httpd -i`: the applet),
    for the argv0 key; None when the program's path will do."""
    if posixpath.basename(server) == "tcpd" or not argv:
        return None
    return None if argv[0] in (server, posixpath.basename(server)) else argv[0]


# --------------------------------------------------------------------------- inetd.conf

_INETD_PROTOCOLS: dict[str, tuple[str, str | None]] = {
    "tcp": ("tcp", None),
    "tcp46": ("tcp", None),
    "tcp4": ("tcp", "4"),
    "tcp6": ("tcp", "6"),
    "udp": ("udp", None),
    "udp46": ("udp", None),
    "udp4": ("udp", "4"),
    "udp6": ("udp", "6"),
    "unix": ("unix", None),
}
_SOCKET_FOR = {"tcp": "stream", "udp": "dgram", "unix": "stream"}
_WAIT_RE = re.compile(r"^(wait|nowait)(?:([.:/])(.*))?$")
# update-inetd(8) disables an entry by prefixing it with these characters.
_UPDATE_INETD_OFF = "#<off>#"


@dataclass(frozen=True)
class _InetdEntry:
    name: str
    proto: str
    line: int
    service: dict[str, Any]


def convert_inetd_conf(path: Path, services_file: Path = DEFAULT_SERVICES) -> Conversion:
    """Convert an inetd.conf (openbsd-inetd, inetutils, FreeBSD or NetBSD syntax)."""
    text = read_text(path)
    services = _Services.load(services_file)
    warn = _Sink()
    file = str(path)
    default_hosts: list[str] | None = None  # None: every address ("*:")
    entries: list[_InetdEntry] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        body = raw.strip()
        disabled = body.startswith(_UPDATE_INETD_OFF)
        if disabled:
            body = body[len(_UPDATE_INETD_OFF) :].strip()
        if not body or body.startswith("#"):
            continue
        fields = body.split()
        if len(fields) == 1 and fields[0].endswith(":") and not disabled:
            # openbsd-inetd: "host:" alone sets the host for the lines that follow.
            hosts = fields[0][:-1]
            default_hosts = None if hosts in ("", "*") else _split_hosts(hosts)
            continue
        entry = _convert_inetd_line(fields, default_hosts, services, file, lineno, warn)
        if entry is None:
            continue
        if disabled:
            entry.service["enabled"] = False
        entries.append(_InetdEntry(entry.name, entry.proto, entry.line, _ordered(entry.service)))

    counts: dict[str, int] = {}
    for e in entries:
        counts[e.name] = counts.get(e.name, 0) + 1
    used: set[str] = set()
    seen: dict[tuple[str, str], int] = {}
    out: dict[str, Any] = {}
    for e in entries:
        where = (repr(e.service.get("listen")), e.service["protocol"])
        if where in seen:
            warn(file, e.line, f"same service and address as line {seen[where]}")
        seen.setdefault(where, e.line)
        wanted = e.name if counts[e.name] == 1 else f"{e.name}-{e.proto}"
        out[_unique_key(wanted, used)] = e.service
    return Conversion({"services": out}, tuple(warn.items))


def _split_hosts(hosts: str) -> list[str]:
    return [h[1:-1] if h.startswith("[") and h.endswith("]") else h for h in hosts.split(",")]


def _convert_inetd_line(
    fields: list[str],
    default_hosts: list[str] | None,
    services: _Services,
    file: str,
    line: int,
    warn: _Sink,
) -> _InetdEntry | None:
    if len(fields) < 6:
        warn(
            file,
            line,
            "expected 'service socket_type protocol wait user server [args]'; line skipped",
        )
        return None
    svc_field, sock_type, proto_field, wait_field, user_field, server = fields[:6]
    args = fields[6:]

    proto_name, *proto_opts = proto_field.split(",")
    if proto_name.startswith("rpc/"):
        warn(file, line, f"RPC service {svc_field} ({proto_field}) is not supported; skipped")
        return None
    if proto_name not in _INETD_PROTOCOLS:
        warn(file, line, f"protocol {proto_field!r} is not supported; entry skipped")
        return None
    protocol, family = _INETD_PROTOCOLS[proto_name]
    buffers: dict[str, str] = {}
    for opt in proto_opts:
        # FreeBSD/NetBSD inetd: tcp,rcvbuf=SIZE,sndbuf=SIZE (SO_RCVBUF, SO_SNDBUF).
        name, _, size = opt.partition("=")
        key = {"rcvbuf": "receive_buffer", "sndbuf": "send_buffer"}.get(name)
        try:
            if key is None:
                raise ValueError(opt)
            _parse_buffer(size, Path())
            buffers[key] = size
        except ValueError:
            warn(file, line, f"socket option {opt!r} not carried over")
    if sock_type != _SOCKET_FOR[protocol]:
        warn(
            file,
            line,
            f"socket type {sock_type!r} with protocol {proto_name!r} is not supported; "
            "entry skipped",
        )
        return None

    svc: dict[str, Any] = {}
    if protocol == "unix":
        name = posixpath.basename(svc_field.rstrip("/")) or svc_field
        svc["listen"] = svc_field
        official = name
    else:
        hosts = default_hosts
        if ":" in svc_field:
            host_part, _, svc_field = svc_field.rpartition(":")
            hosts = None if host_part == "*" else _split_hosts(host_part)
        if svc_field.startswith("tcpmux/"):
            warn(file, line, f"TCPMUX service {svc_field} is not supported; skipped")
            return None
        found = services.lookup(svc_field, protocol)
        if found is None:
            warn(
                file,
                line,
                f"unknown service {svc_field!r}/{protocol} (not in the services file); "
                "entry skipped",
            )
            return None
        port, official = found
        name = svc_field
        svc["listen"] = _inetd_listen(hosts, family, port, file, line, warn)
    svc["protocol"] = protocol
    svc.update(buffers)

    if server == "internal":
        if official not in _BUILTINS:
            warn(file, line, f"internal service {official!r} has no pyinetd builtin; skipped")
            return None
        svc["builtin"] = official
    else:
        argv = _exec_argv(server, args, file, line, warn)
        if argv is None:
            return None
        svc["exec"] = argv
        if argv0 := _argv0(server, args):
            svc["argv0"] = argv0

    m = _WAIT_RE.match(wait_field)
    if m is None:
        warn(file, line, f"wait field {wait_field!r} is not wait/nowait; entry skipped")
        return None
    if "builtin" not in svc:
        svc["wait"] = m[1] == "wait"
        user, group, login_class = _inetd_user(user_field)
        svc["user"] = _int_or_name(user)
        if group:
            svc["group"] = _int_or_name(group)
        if login_class:
            warn(file, line, f"login class {login_class!r} not carried over")
    elif user_field.split(".")[0].split(":")[0] != "root":
        warn(file, line, f"user {user_field!r} is not applied to a builtin service")
    if m[2]:
        _inetd_limits(m[2], m[3], svc, file, line, warn)
    return _InetdEntry(name, proto_name, line, svc)


def _inetd_listen(
    hosts: list[str] | None, family: str | None, port: int, file: str, line: int, warn: _Sink
) -> int | str | list[str]:
    if not hosts or hosts == ["*"]:
        if family == "6":
            return f"[::]:{port}"
        if family == "4":
            return f"0.0.0.0:{port}"
        return port
    listen: list[str] = []
    for host in hosts:
        if host == "*":
            listen.append(f"[::]:{port}" if family == "6" else f"0.0.0.0:{port}")
            continue
        if not _is_ip(host):
            warn(
                file,
                line,
                f"listen host {host!r} is a name: inetd listens on every address it "
                "resolves to; check that this is what pyinetd does or use addresses",
            )
        listen.append(_host_port(host, port))
    return listen[0] if len(listen) == 1 else listen


def _inetd_user(field_: str) -> tuple[str, str, str]:
    # FreeBSD: user[:group][/login-class]; openbsd-inetd: user[.group] or user[:group].
    user, _, login_class = field_.partition("/")
    for sep in (":", "."):
        if sep in user:
            user, _, group = user.partition(sep)
            return user, group, login_class
    return user, "", login_class


def _inetd_limits(
    sep: str, rest: str, svc: dict[str, Any], file: str, line: int, warn: _Sink
) -> None:
    parts = rest.split(sep)
    if not all(_is_number(p) for p in parts):
        warn(file, line, f"limit {sep}{rest!r} is not a number; not carried over")
        return
    numbers = [int(p) for p in parts]
    if sep in ".:":
        # openbsd-inetd/inetutils "wait.max" and NetBSD "wait:max": max is how many times the
        # service may be started per minute; beyond it the service stops for ten minutes
        # (inetd(8)). It is a rate, not a limit on concurrent servers.
        svc["rate"] = f"{numbers[0]}/min"
        svc["rate_pause"] = _INETD_RETRY_SECONDS
        if len(numbers) > 1:
            warn(file, line, f"unrecognised extra limit {sep}{sep.join(parts[1:])}; ignored")
        return
    # FreeBSD "nowait/max-child/max-connections-per-ip-per-minute/max-child-per-ip":
    # max-child caps concurrent children, further connections queue (0 = no limit).
    if numbers[0]:
        svc["max_connections"] = numbers[0]
        svc["on_limit"] = "queue"
    if len(numbers) > 1 and numbers[1]:
        warn(
            file,
            line,
            f"max-connections-per-ip-per-minute {numbers[1]} not carried over "
            "(pyinetd has no per-source rate)",
        )
    if len(numbers) > 2 and numbers[2]:
        svc["per_source"] = numbers[2]
    if len(numbers) > 3:
        warn(file, line, f"unrecognised extra limit /{'/'.join(parts[3:])}; ignored")


# --------------------------------------------------------------------------- xinetd

# Attribute -> number of values, from xinetd/parse.c: N > 0 exactly N values, -1 any number,
# -2 any number and the += / -= operators allowed (attribute may repeat).
_X_SERVICE_ATTRS: dict[str, int] = {
    "socket_type": 1,
    "protocol": 1,
    "wait": 1,
    "user": 1,
    "group": 1,
    "server": 1,
    "server_args": -1,
    "instances": 1,
    "log_on_success": -2,
    "log_on_failure": -2,
    "log_type": -1,
    "only_from": -2,
    "no_access": -2,
    "access_times": -1,
    "type": -1,
    "rpc_version": 1,
    "rpc_number": 1,
    "id": 1,
    "env": -2,
    "port": 1,
    "passenv": -2,
    "flags": -1,
    "nice": 1,
    "redirect": 2,
    "banner": 1,
    "bind": 1,
    "per_source": 1,
    "groups": 1,
    "banner_success": 1,
    "banner_fail": 1,
    "cps": 2,
    "disable": 1,
    "max_load": 1,
    "rlimit_as": 1,
    "rlimit_cpu": 1,
    "rlimit_data": 1,
    "rlimit_rss": 1,
    "rlimit_stack": 1,
    "v6only": 1,
    "deny_time": 1,
    "umask": 1,
    "mdns": 1,
    "libwrap": 1,
    "rcvbuf": 1,
    "sndbuf": 1,
}
_X_DEFAULT_ATTRS: dict[str, int] = {
    "log_type": -2,
    "log_on_success": -2,
    "log_on_failure": -2,
    "disabled": -2,
    "no_access": -2,
    "only_from": -2,
    "instances": 1,
    "passenv": -2,
    "banner": 1,
    "bind": 1,
    "per_source": 1,
    "groups": 1,
    "banner_success": 1,
    "banner_fail": 1,
    "cps": 2,
    "enabled": -2,
    "max_load": 1,
    "v6only": 1,
    "umask": 1,
    "mdns": 1,
}
_X_RLIMITS = {
    "rlimit_as": "as",
    "rlimit_cpu": "cpu",
    "rlimit_data": "data",
    "rlimit_stack": "stack",
}
_X_NOT_CARRIED: dict[str, str] = {
    "log_type": "pyinetd does its own logging",
    "log_on_success": "pyinetd does its own logging",
    "log_on_failure": "pyinetd does its own logging",
    "passenv": "pyinetd cannot pass selected variables; use env (and env_clear)",
    "banner_success": "only banner is supported",
    "banner_fail": "only banner is supported",
    "groups": "supplementary groups are not configurable",
    "deny_time": "pyinetd has no SENSOR",
    "libwrap": "pyinetd does not use libwrap",
    "rpc_version": "RPC services are not supported",
    "rpc_number": "RPC services are not supported",
    "rlimit_rss": "pyinetd has no rss limit (Linux ignores RLIMIT_RSS)",
}
_X_FLAGS_OK = frozenset(
    {"REUSE", "IPv4", "IPv6", "NAMEINARGS", "NOLIBWRAP", "KEEPALIVE", "NODELAY"}
)
_X_FLAGS_KNOWN = _X_FLAGS_OK | {
    "INTERCEPT",
    "NORETRY",
    "IDONLY",
    "SENSOR",
    "LABELED",
}
_X_TYPES = frozenset({"RPC", "INTERNAL", "UNLISTED", "SPECIAL", "TCPMUX", "TCPMUXPLUS"})
# xinetd/parsesup.c: the attribute name ends at white space, so "name= value" is an error.
_X_ATTR_RE = re.compile(r"^\s*([^\s=]+)\s+(=|\+=|-=)(.*)$")
_X_XINETD_LINE_RE = re.compile(
    r"^\s*(?:service\s+\S+\s*\{?|defaults\s*\{?|includedir\s+\S+|include\s+\S+)\s*$"
)
_X_MEMORY_RE = re.compile(r"^(\d+)([kKmM]?)$")


@dataclass(frozen=True)
class _XAttr:
    name: str
    op: str
    values: tuple[str, ...]
    file: str
    line: int


@dataclass(frozen=True)
class _XBlock:
    kind: str  # "service" or "defaults"
    name: str
    file: str
    line: int
    attrs: tuple[_XAttr, ...]


@dataclass(frozen=True)
class _XEntry:
    """One service or defaults entry after the xinetd attribute rules (parse.c) are applied."""

    block: _XBlock
    single: dict[str, _XAttr]
    multi: dict[str, list[_XAttr]]

    def values(self, name: str) -> tuple[str, ...] | None:
        attr = self.single.get(name)
        return None if attr is None else attr.values

    def value(self, name: str) -> str | None:
        values = self.values(name)
        return values[0] if values else None

    def where(self, name: str) -> tuple[str, int]:
        attr = self.single.get(name)
        if attr is None:
            return self.block.file, self.block.line
        return attr.file, attr.line


class _XinetdReader:
    """Reads xinetd.conf and what it includes into a flat list of entries."""

    def __init__(self, root: Path | None, warn: _Sink) -> None:
        self.root = root
        self.warn = warn
        self.blocks: list[_XBlock] = []
        self.stack: list[Path] = []
        # Every file read, once: with the current chain alone, 8 files that each include their
        # own folder would take 60 s and make 767k warnings.
        self.visited: set[Path] = set()
        self.files: list[str] = []  # in the order xinetd reads them

    def resolve(self, name: str, including: Path) -> Path:
        path = Path(name)
        if path.is_absolute():
            return self.root / path.relative_to("/") if self.root is not None else path
        return including.parent / path

    def read(self, path: Path, text: str) -> None:
        self.files.append(str(path))
        self.stack.append(path.resolve())
        self.visited.add(path.resolve())
        try:
            self._parse(path, text.splitlines())
        finally:
            self.stack.pop()

    def include_file(self, path: Path, file: str, line: int) -> None:
        if path.resolve() in self.stack:
            self.warn(file, line, f"include loop: {path} is already being read; skipped")
            return
        if path.resolve() in self.visited:
            self.warn(file, line, f"{path} was already included; skipped")
            return
        try:
            text = read_text(path)
        except OSError as e:
            self.warn(file, line, f"cannot read included file {path}: {e.strerror}")
            return
        self.read(path, text)

    def include_dir(self, path: Path, file: str, line: int) -> None:
        try:
            names = os.listdir(path)
        except OSError as e:
            self.warn(file, line, f"cannot read included directory {path}: {e.strerror}")
            return
        # xinetd/includedir.c: C-locale (strcmp) order; names containing '.' or ending in
        # '~' are skipped (editor, dpkg and rpm leftovers), as are non-regular files.
        for name in sorted(names, key=os.fsencode):
            entry = path / name
            self.files.append(str(entry))
            if "." in name or name.endswith("~"):
                if name not in (".", ".."):
                    self.warn(
                        str(entry), 0, "skipped: xinetd ignores names with '.' or ending in '~'"
                    )
                continue
            if not entry.is_file():
                self.warn(str(entry), 0, "skipped: not a regular file")
                continue
            self.include_file(entry, file, line)

    def _skip_entry(self, lines: list[str], start: int, file: str, line: int, why: str) -> int:
        """Index after the next lone '}', as xinetd's skip_entry() does after a bad entry."""
        end = start
        while end < len(lines) and lines[end].strip() != "}":
            end += 1
        if end >= len(lines):
            self.warn(file, line, f"{why}; xinetd skips the rest of the file")
            return end
        if end == start:
            self.warn(file, line, f"{why}; skipped")
        else:
            self.warn(file, line, f"{why}; xinetd skips lines {start + 1}-{end + 1} (to the '}}')")
        return end + 1

    def _parse(self, path: Path, lines: list[str]) -> None:
        file = str(path)
        have_defaults = False
        i = 0
        while i < len(lines):
            lineno = i + 1
            text = lines[i].strip()
            i += 1
            if not text or text.startswith("#"):
                continue
            tokens = text.split()
            keyword = tokens[0]
            if keyword in ("include", "includedir"):
                if len(tokens) != 2:
                    self.warn(file, lineno, f"{keyword} needs exactly one path; line skipped")
                elif keyword == "include":
                    self.include_file(self.resolve(tokens[1], path), file, lineno)
                else:
                    self.include_dir(self.resolve(tokens[1], path), file, lineno)
                continue
            if keyword not in ("service", "defaults") or (keyword == "service" and len(tokens) < 2):
                why = "service name missing" if keyword == "service" else f"unexpected {text!r}"
                i = self._skip_entry(lines, i, file, lineno, why)
                continue
            name = tokens[1] if keyword == "service" else ""
            rest = tokens[2:] if keyword == "service" else tokens[1:]
            if rest and rest != ["{"]:
                self.warn(file, lineno, f"ignored text after {keyword}: {' '.join(rest)!r}")
            if rest != ["{"]:
                j = i
                while j < len(lines) and (not lines[j].strip() or lines[j].strip().startswith("#")):
                    j += 1
                if j >= len(lines) or lines[j].strip() != "{":
                    why = f"{keyword} {name}: missing '{{'"
                    i = self._skip_entry(lines, j, file, lineno, why)
                    continue
                i = j + 1
            attrs: list[_XAttr] = []
            closed = bad = False
            while i < len(lines):
                attr_line = i + 1
                raw = lines[i]
                i += 1
                text = raw.strip()
                if not text or text.startswith("#"):
                    continue
                if text == "}":
                    closed = True
                    break
                m = _X_ATTR_RE.match(raw)
                if m is None:
                    self.warn(
                        file,
                        attr_line,
                        f"cannot parse {text!r} (xinetd wants 'attribute = value...', "
                        "with a space before the operator); xinetd drops the whole entry",
                    )
                    bad = True
                    continue
                attrs.append(_XAttr(m[1], m[2], tuple(m[3].split()), file, attr_line))
            if not closed:
                self.warn(file, lineno, f"{keyword} {name}: missing '}}'; entry skipped")
                continue
            if bad:
                continue
            if keyword == "defaults":
                if have_defaults:
                    self.warn(file, lineno, "only one defaults entry per file; this one is ignored")
                    continue
                have_defaults = True
            self.blocks.append(_XBlock(keyword, name, file, lineno, tuple(attrs)))


MAX_FILE_SIZE = 1 << 20  # as the configuration loader (document.py)


def read_text(path: Path) -> str:
    """A regular file's text, at most MAX_FILE_SIZE bytes; OSError otherwise.

    Opened non-blocking and checked with fstat: `include /dev/zero` would end in MemoryError
    and a FIFO would hang the conversion."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        data = b""
        while chunk := os.read(fd, 1 << 16):
            data += chunk
            if len(data) > MAX_FILE_SIZE:
                raise OSError(errno.EFBIG, f"larger than {MAX_FILE_SIZE >> 10} KiB", str(path))
    finally:
        os.close(fd)
    return data.decode("utf-8", errors="replace")


def convert_xinetd_conf(
    path: Path, services_file: Path = DEFAULT_SERVICES, *, root: Path | None = None
) -> Conversion:
    """Convert xinetd.conf (following include/includedir) or a single xinetd.d file.

    root: directory that absolute include/includedir paths are taken relative to, for a tree
    unpacked somewhere other than / (as dpkg-deb -x does). Relative include paths are taken
    relative to the including file.
    """
    text = read_text(path)
    warn = _Sink()
    reader = _XinetdReader(root, warn)
    reader.read(path, text)
    converter = _XinetdConverter(_Services.load(services_file), warn)
    config = converter.convert(reader.blocks)
    # Report in reading order (file by file, line by line), whichever pass found them.
    order = {file: i for i, file in reversed(list(enumerate(reader.files)))}
    warnings = sorted(warn.items, key=lambda w: (order.get(w.file, len(order)), w.line))
    return Conversion(config, tuple(warnings))


class _Skip(Exception):
    """A service that cannot be carried over; its warning has been given."""


@dataclass
class _Verdict:
    """Whether a converted service stays enabled, and why not (xinetd would disable it)."""

    enabled: bool = True
    reasons: list[tuple[str, int, str]] = field(default_factory=list)

    def disable(self, file: str, line: int, why: str) -> None:
        self.enabled = False
        self.reasons.append((file, line, why))


class _XinetdAttributes:
    """xinetd's attribute rules and the conversion of single attributes (ports, addresses,
    limits, environment, rlimits, access lists); _XinetdConverter puts them together."""

    def __init__(self, services: _Services, warn: _Sink) -> None:
        self.services = services
        self.warn = warn
        self.defaults = _XEntry(_XBlock("defaults", "", "", 0, ()), {}, {})
        self.disabled_ids: set[str] = set()
        self.enabled_ids: set[str] | None = None
        self.default_allow: list[str] = []
        self.default_allow_nobody = False
        self.default_deny: list[str] = []

    # ---- attribute rules

    def entry(self, block: _XBlock) -> _XEntry:
        """Apply xinetd's rules: unknown attributes, repeats, operators, value counts."""
        table = _X_DEFAULT_ATTRS if block.kind == "defaults" else _X_SERVICE_ATTRS
        other = _X_SERVICE_ATTRS if block.kind == "defaults" else _X_DEFAULT_ATTRS
        single: dict[str, _XAttr] = {}
        multi: dict[str, list[_XAttr]] = {}
        for attr in block.attrs:
            name = "bind" if attr.name == "interface" else attr.name  # a synonym (parse.c)
            if name not in table:
                if name in other:
                    self.warn(
                        attr.file,
                        attr.line,
                        f"{attr.name} is not allowed in a {block.kind} entry; xinetd ignores it",
                    )
                else:
                    self.warn(
                        attr.file, attr.line, f"unknown attribute {attr.name}; xinetd ignores it"
                    )
                continue
            count = table[name]
            if count == -2:
                op = "+=" if block.kind == "defaults" and attr.op == "=" else attr.op
                multi.setdefault(name, []).append(
                    _XAttr(name, op, attr.values, attr.file, attr.line)
                )
                continue
            if name in single:
                self.warn(
                    attr.file,
                    attr.line,
                    f"{attr.name} already set on line {single[name].line}; xinetd keeps the first",
                )
                continue
            if attr.op != "=":
                self.warn(
                    attr.file,
                    attr.line,
                    f"operator {attr.op} cannot be used with {attr.name}; xinetd ignores it",
                )
                continue
            if count > 0 and len(attr.values) != count:
                self.warn(
                    attr.file,
                    attr.line,
                    f"{attr.name} expects {count} value(s), got {len(attr.values)}; ignored",
                )
                continue
            single[name] = _XAttr(name, attr.op, attr.values, attr.file, attr.line)
        return _XEntry(block, single, multi)

    def port(
        self,
        e: _XEntry,
        sid: str,
        name: str,
        protocol: str,
        unlisted: bool,
        disable: Callable[[str, int, str], None],
    ) -> int | None:
        port_text = e.value("port")
        listed = self.services.lookup(name, protocol) if not _is_number(name) else None
        if port_text is not None:
            if not _is_number(port_text) or not 0 < int(port_text) < 65536:
                file, line = e.where("port")
                self.warn(file, line, f"service {sid}: bad port {port_text!r}; skipped")
                return None
            port = int(port_text)
            if listed is not None and not unlisted and listed[0] != port:
                file, line = e.where("port")
                disable(file, line, f"port {port} differs from {listed[0]} in the services file")
            return port
        if unlisted:
            self.warn(e.block.file, e.block.line, f"service {sid}: UNLISTED needs a port; skipped")
            return None
        if listed is None:
            self.warn(
                e.block.file,
                e.block.line,
                f"service {sid}: no port and {name!r}/{protocol} is not in the services file; "
                "skipped",
            )
            return None
        return listed[0]

    def listen(self, e: _XEntry, sid: str, port: int, flags: set[str]) -> int | str:
        source = e if "bind" in e.single else self.defaults
        bind = source.value("bind")
        v6only_src = e if "v6only" in e.single else self.defaults
        v6only = v6only_src.value("v6only") == "yes"
        if bind is not None and not _is_interface(bind):
            if not _is_ip(bind):
                file, line = source.where("bind")
                self.warn(
                    file,
                    line,
                    f"service {sid}: bind {bind!r} is a name; xinetd binds to one address it "
                    "resolves to, use an address",
                )
            return _host_port(bind, port)
        if "IPv6" in flags:
            # An AF_INET6 socket, dual-stack unless v6only = yes.
            return f"[::]:{port}" if v6only else port
        # Without IPv6 flag or bind address xinetd listens on IPv4 only (confparse.c).
        return f"0.0.0.0:{port}"

    def interface(self, e: _XEntry) -> str | None:
        """`bind = lo` (an interface, not an address): the interface key (SO_BINDTODEVICE)."""
        bind = (e if "bind" in e.single else self.defaults).value("bind")
        return bind if bind is not None and _is_interface(bind) else None

    def redirect(self, e: _XEntry, sid: str, values: tuple[str, ...]) -> str | None:
        host, port_text = values
        found = self.services.lookup(port_text, "tcp")
        if found is None:
            file, line = e.where("redirect")
            self.warn(file, line, f"service {sid}: bad redirect port {port_text!r}; skipped")
            return None
        return _host_port(host, found[0])

    def limits(self, e: _XEntry, out: dict[str, Any], sid: str = "") -> None:
        label = f"service {sid}: " if sid else ""
        # xinetd refuses connections over `instances` (access.c AC_SERVICE_LIMIT).
        for attr, key, extra in (
            ("instances", "max_connections", {"on_limit": "reject"}),
            ("per_source", "per_source", {}),
        ):
            value = e.value(attr)
            if value is None:
                continue
            file, line = e.where(attr)
            if value == "UNLIMITED":
                if sid and self.defaults.value(attr) not in (None, "UNLIMITED"):
                    self.warn(
                        file,
                        line,
                        f"{label}{attr} = UNLIMITED cannot lift the defaults limit in "
                        f"pyinetd; the defaults {key} applies",
                    )
            elif _is_number(value) and int(value) > 0:
                out[key] = int(value)
                out.update(extra)
            else:
                self.warn(file, line, f"{label}bad {attr} value {value!r}; ignored")
        cps = e.values("cps")
        if cps is not None:
            file, line = e.where("cps")
            rate, pause = cps
            if not (_is_number(rate) and _is_number(pause)):
                self.warn(file, line, f"{label}bad cps value {' '.join(cps)!r}; ignored")
            elif int(rate) > 0:
                # cps = N S: above N connections per second the service stops for S seconds.
                out["rate"] = f"{int(rate)}/s"
                out["rate_pause"] = int(pause)

    def simple(self, e: _XEntry, name: str, out: dict[str, Any], sid: str = "") -> None:
        value = e.value(name)
        if value is None:
            return
        file, line = e.where(name)
        label = f"service {sid}: " if sid else ""
        if name == "umask":
            try:
                mask = int(value, 8)
            except ValueError:
                mask = -1
            if not 0 <= mask <= 0o777:
                self.warn(file, line, f"{label}bad umask {value!r}; ignored")
                return
            out["umask"] = f"{mask:03o}"
        elif name == "nice":
            try:
                out["nice"] = int(value)
            except ValueError:
                self.warn(file, line, f"{label}bad nice value {value!r}; ignored")
        else:
            out[name] = value

    def environment(self, e: _XEntry, sid: str, out: dict[str, Any]) -> None:
        env: dict[str, str] = {}
        for a in e.multi.get("env", []):
            if a.op == "-=":
                self.warn(a.file, a.line, f"service {sid}: env does not support -=; ignored")
                continue
            if a.op == "=":
                env.clear()
            for item in a.values:
                key, sep, value = item.partition("=")
                if not sep or not key:
                    self.warn(a.file, a.line, f"service {sid}: env {item!r} has no '='; ignored")
                    continue
                env[key] = value
        if env:
            out["env"] = env

    def rlimits(self, e: _XEntry, sid: str, out: dict[str, Any]) -> None:
        limits: dict[str, int | str] = {}
        for attr, key in _X_RLIMITS.items():
            value = e.value(attr)
            if value is None:
                continue
            file, line = e.where(attr)
            if value == "UNLIMITED":
                self.warn(
                    file,
                    line,
                    f"service {sid}: {attr} = UNLIMITED left out (the service inherits "
                    "pyinetd's limit)",
                )
                continue
            if attr == "rlimit_cpu":
                if _is_number(value):
                    limits[key] = int(value)
                else:
                    self.warn(file, line, f"service {sid}: bad {attr} {value!r}; ignored")
                continue
            m = _X_MEMORY_RE.match(value)
            if m is None:
                self.warn(file, line, f"service {sid}: bad {attr} {value!r}; ignored")
                continue
            # xinetd's K and M are binary (parsers.c get_limit: 1024, 1024 * 1024).
            size = int(m[1]) * {"": 1, "k": 1024, "m": 1024 * 1024}[m[2].lower()]
            limits[key] = (
                f"{size // (1024 * 1024)}M" if size and size % (1024 * 1024) == 0 else size
            )
        if limits:
            out["rlimits"] = limits

    # ---- access control

    def addresses(
        self, ops: list[_XAttr] | None, start: list[str], *, allow: bool
    ) -> tuple[list[str], bool]:
        """Apply =, +=, -= to an address list; (CIDR list, specified-but-empty)."""
        result = list(start)
        if ops is None:
            return result, False
        attr = "only_from" if allow else "no_access"
        for a in ops:
            converted: list[str] = []
            for token in a.values:
                cidrs = _xinetd_address(token)
                if cidrs is None:
                    consequence = (
                        "those hosts are not allowed"
                        if allow
                        else "those hosts are NOT denied, add their addresses to deny"
                    )
                    self.warn(
                        a.file,
                        a.line,
                        f"{attr} {token!r} (host, domain or network name) not carried "
                        f"over: {consequence}",
                    )
                    continue
                converted.extend(cidrs)
            if a.op == "=":
                result = []
            if a.op == "-=":
                result = [c for c in result if c not in converted]
            else:
                result.extend(c for c in converted if c not in result)
        return result, not result

    def access(self, e: _XEntry, sid: str, out: dict[str, Any]) -> bool:
        """Fill allow/deny where the service changes them; True if nobody is allowed."""
        allow, nobody = self.default_allow, self.default_allow_nobody
        if "only_from" in e.multi:
            allow, nobody = self.addresses(e.multi["only_from"], self.default_allow, allow=True)
            if allow:
                out["allow"] = allow
        deny = self.default_deny
        if "no_access" in e.multi:
            deny, _ = self.addresses(e.multi["no_access"], self.default_deny, allow=False)
            out["deny"] = deny
        if allow and deny and ("only_from" in e.multi or "no_access" in e.multi):
            a = (e.multi.get("no_access") or e.multi["only_from"])[0]
            self.warn(a.file, a.line, f"service {sid}: {_BOTH_LISTS}")
        return nobody


class _XinetdConverter(_XinetdAttributes):
    """A whole xinetd configuration -> a pyinetd one: defaults, then each service."""

    # ---- whole configuration

    def convert(self, blocks: list[_XBlock]) -> dict[str, Any]:
        defaults_out: dict[str, Any] = {}
        for block in blocks:
            if block.kind == "defaults":
                entry = self.entry(block)
                if self.defaults.block.file:
                    # A second defaults entry (another file) adds to the first, as in xinetd.
                    merged = dict(entry.single)
                    merged.update(self.defaults.single)
                    multi = {k: list(v) for k, v in self.defaults.multi.items()}
                    for k, v in entry.multi.items():
                        multi.setdefault(k, []).extend(v)
                    entry = _XEntry(self.defaults.block, merged, multi)
                self.defaults = entry
        if self.defaults.block.file:
            defaults_out = self.convert_defaults(self.defaults)

        entries = [self.entry(b) for b in blocks if b.kind == "service"]
        name_counts: dict[str, int] = {}
        for e in entries:
            name_counts[e.block.name] = name_counts.get(e.block.name, 0) + 1
        used: set[str] = set()
        first_use: dict[str, tuple[str, int]] = {}
        services: dict[str, Any] = {}
        for e in entries:
            sid = e.value("id") or e.block.name
            converted = self.convert_service(e, sid)
            if converted is None:
                continue
            wanted = e.block.name if name_counts[e.block.name] == 1 else sid
            key = _unique_key(wanted, used)
            if key != wanted:
                file, line = first_use[wanted]
                self.warn(
                    e.block.file,
                    e.block.line,
                    f"service {wanted!r} already defined at {file}:{line} (xinetd accepts "
                    f"duplicates only while all but one are disabled); named {key!r}",
                )
            first_use.setdefault(wanted, (e.block.file, e.block.line))
            services[key] = converted
        config: dict[str, Any] = {}
        if defaults_out:
            config["defaults"] = defaults_out
        config["services"] = services
        return config

    def convert_defaults(self, d: _XEntry) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, attrs in d.multi.items():
            if name == "disabled":
                self.disabled_ids.update(v for a in attrs for v in a.values)
            elif name == "enabled":
                self.enabled_ids = {v for a in attrs for v in a.values}
            elif name in _X_NOT_CARRIED:
                for a in attrs:
                    self.warn(a.file, a.line, f"{name} not carried over: {_X_NOT_CARRIED[name]}")
        allow, allow_nobody = self.addresses(d.multi.get("only_from"), [], allow=True)
        deny, _ = self.addresses(d.multi.get("no_access"), [], allow=False)
        self.default_allow, self.default_allow_nobody, self.default_deny = (
            allow,
            allow_nobody,
            deny,
        )
        if allow:
            out["allow"] = allow
        if allow_nobody:
            file, line = d.multi["only_from"][-1].file, d.multi["only_from"][-1].line
            self.warn(
                file,
                line,
                "only_from in defaults allows no address: services that do not set their "
                "own only_from are converted with enabled: false",
            )
        if deny:
            out["deny"] = deny
        if allow and deny:
            file, line = d.multi["no_access"][0].file, d.multi["no_access"][0].line
            self.warn(file, line, _BOTH_LISTS)
        self.limits(d, out)
        for name in ("umask", "banner"):
            self.simple(d, name, out)
        for name in sorted(d.single):
            if name in _X_NOT_CARRIED:
                file, line = d.where(name)
                self.warn(file, line, f"{name} not carried over: {_X_NOT_CARRIED[name]}")
        return out

    # ---- one service, step by step

    def convert_service(self, e: _XEntry, sid: str) -> dict[str, Any] | None:
        v = _Verdict()
        try:
            types, flags = self.kinds(e, sid, v)
            protocol = self.transport(e, sid, v)
            port = self.port(e, sid, e.block.name, protocol, "UNLISTED" in types, v.disable)
            if port is None:
                return None
            svc: dict[str, Any] = {"listen": self.listen(e, sid, port, flags)}
            if interface := self.interface(e):
                svc["interface"] = interface
            svc["protocol"] = protocol
            self.program(e, sid, svc, types, flags)
        except _Skip:
            return None
        self.identity(e, sid, svc, v)
        self.switches(e, v, sid)
        self.settings(e, sid, svc, v)
        self.socket_options(e, sid, svc, flags)
        for file, line, why in v.reasons:
            self.warn(file, line, f"service {sid}: {why}; xinetd disables it: enabled: false")
        if not v.enabled:
            svc["enabled"] = False
        return _ordered(svc)

    def skip(self, e: _XEntry, sid: str, why: str, attr: str | None = None) -> NoReturn:
        file, line = e.where(attr) if attr else (e.block.file, e.block.line)
        self.warn(file, line, f"service {sid}: {why}; skipped")
        raise _Skip

    def kinds(self, e: _XEntry, sid: str, v: _Verdict) -> tuple[set[str], set[str]]:
        """The service's type and flags, refusing those pyinetd has no counterpart for."""
        types = set(e.values("type") or ())
        for t in sorted(types - _X_TYPES):
            self.skip(e, sid, f"unknown type {t}", "type")
        for t in ("RPC", "TCPMUX", "TCPMUXPLUS", "SPECIAL"):
            if t in types:
                self.skip(e, sid, f"type {t} is not supported", "type")
        flags = set(e.values("flags") or ())
        if "SENSOR" in flags:
            self.skip(e, sid, "the SENSOR flag is not supported", "flags")
        for f in sorted(flags - _X_FLAGS_OK):
            file, line = e.where("flags")
            if f in _X_FLAGS_KNOWN:
                self.warn(file, line, f"service {sid}: flag {f} not carried over")
            else:
                self.warn(file, line, f"service {sid}: unknown flag {f}; xinetd disables it")
                v.enabled = False
        if {"IPv4", "IPv6"} <= flags:
            file, line = e.where("flags")
            v.disable(file, line, "both IPv4 and IPv6 flags")
        return types, flags

    def transport(self, e: _XEntry, sid: str, v: _Verdict) -> str:
        """tcp or udp, from socket_type and protocol."""
        socket_type = e.value("socket_type")
        protocol = e.value("protocol")
        if socket_type is not None and socket_type not in ("stream", "dgram"):
            self.skip(e, sid, f"socket_type {socket_type} is not supported", "socket_type")
        if protocol is not None and protocol not in ("tcp", "udp"):
            self.skip(e, sid, f"protocol {protocol} is not supported", "protocol")
        if socket_type is None and protocol is None:
            self.skip(e, sid, "neither socket_type nor protocol given")
        if protocol is None:
            protocol = "tcp" if socket_type == "stream" else "udp"
        elif socket_type is None:
            v.disable(e.block.file, e.block.line, "missing socket_type, which xinetd requires")
        if socket_type is not None and _SOCKET_FOR[protocol] != socket_type:
            self.skip(
                e, sid, f"socket_type {socket_type} with protocol {protocol} is not supported"
            )
        return protocol

    def program(
        self, e: _XEntry, sid: str, svc: dict[str, Any], types: set[str], flags: set[str]
    ) -> None:
        """What answers: redirect, a built-in (INTERNAL) or a program (server, server_args)."""
        redirect = e.values("redirect")
        if redirect is not None:
            if svc["protocol"] != "tcp":
                self.skip(e, sid, "redirect works for tcp only", "redirect")
            target = self.redirect(e, sid, redirect)
            if target is None:
                raise _Skip
            svc["redirect"] = target
            for attr in ("server", "server_args"):
                if attr in e.single:
                    file, line = e.where(attr)
                    self.warn(file, line, f"service {sid}: {attr} ignored, redirect takes priority")
            return
        name = e.block.name
        if "INTERNAL" in types:
            if name not in _BUILTINS:
                self.skip(e, sid, f"internal service {name!r} has no pyinetd builtin", "type")
            svc["builtin"] = name
            return
        server = e.value("server")
        if server is None:
            self.skip(e, sid, "no server, redirect or type = INTERNAL")
        args = list(e.values("server_args") or ())
        file, line = e.where("server_args" if "server_args" in e.single else "server")
        if "NAMEINARGS" in flags:
            # server_args starts with argv[0] (used to put tcpd in front, as inetd does).
            argv = _exec_argv(server, args, file, line, self.warn)
            if argv0 := _argv0(server, args):
                svc["argv0"] = argv0
        elif posixpath.basename(server) == "tcpd":
            # Without NAMEINARGS tcpd gets argv[0] "tcpd" and cannot find its program.
            self.warn(file, line, f"service {sid}: tcpd without the NAMEINARGS flag")
            argv = _exec_argv(server, args, file, line, self.warn)
        else:
            argv = _exec_argv(server, [posixpath.basename(server), *args], file, line, self.warn)
        if argv is None:
            raise _Skip
        svc["exec"] = argv

    def identity(self, e: _XEntry, sid: str, svc: dict[str, Any], v: _Verdict) -> None:
        """wait, user and group."""
        b = e.block
        wait = e.value("wait")
        if wait is None:
            v.disable(b.file, b.line, "missing wait, which xinetd requires")
        elif wait not in ("yes", "no"):
            file, line = e.where("wait")
            v.disable(file, line, f"bad wait value {wait!r}")
        if "exec" in svc:
            svc["wait"] = wait == "yes" if wait in ("yes", "no") else svc["protocol"] == "udp"
        user = e.value("user")
        if "builtin" in svc:
            for attr in ("user", "group", "server_args"):
                if attr in e.single and not (attr == "user" and user == "root"):
                    file, line = e.where(attr)
                    self.warn(file, line, f"service {sid}: {attr} does not apply here; ignored")
        elif user is None:
            # confparse.c: every non-INTERNAL service needs user (redirect waives only server).
            v.disable(b.file, b.line, "missing user, which xinetd requires")
        elif "exec" in svc:
            svc["user"] = _int_or_name(user)
            group = e.value("group")
            if group is not None:
                svc["group"] = _int_or_name(group)

    def switches(self, e: _XEntry, v: _Verdict, sid: str) -> None:
        """disable = yes, and the defaults' disabled / enabled lists."""
        disable_value = e.value("disable")
        if disable_value == "yes":
            v.enabled = False
        elif disable_value not in (None, "no"):
            file, line = e.where("disable")
            v.disable(file, line, f"bad disable value {disable_value!r}")
        if sid in self.disabled_ids:
            v.enabled = False
        if self.enabled_ids is not None and sid not in self.enabled_ids:
            v.enabled = False

    def socket_options(self, e: _XEntry, sid: str, svc: dict[str, Any], flags: set[str]) -> None:
        """access_times, max_load, flags KEEPALIVE and NODELAY, rcvbuf and sndbuf."""
        for attr, key, parse in (
            ("access_times", "access_times", lambda v: _parse_access_times(v, Path())),
            ("max_load", "max_load", lambda v: _parse_load(float(v), Path())),
            ("rcvbuf", "receive_buffer", lambda v: _parse_buffer(v, Path())),
            ("sndbuf", "send_buffer", lambda v: _parse_buffer(v, Path())),
        ):
            text = " ".join(e.values(attr) or ())
            if not text:
                continue
            try:
                parse(text)
                svc[key] = number(float(text)) if key == "max_load" else text
            except (ValueError, TypeError):
                file, line = e.where(attr)
                self.warn(file, line, f"service {sid}: bad {attr} {text!r}; ignored")
        for flag in ("KEEPALIVE", "NODELAY"):
            if flag in flags and svc["protocol"] == "tcp":
                svc[flag.lower()] = True
            elif flag in flags:
                file, line = e.where("flags")
                self.warn(file, line, f"service {sid}: flag {flag} is for tcp; ignored")

    def settings(self, e: _XEntry, sid: str, svc: dict[str, Any], v: _Verdict) -> None:
        """Limits, access lists, the process settings; a warning for what has no key."""
        self.limits(e, svc, sid)
        if self.access(e, sid, svc):
            v.disable(e.block.file, e.block.line, "only_from allows no address")
        self.environment(e, sid, svc)
        for attr in ("umask", "nice"):
            self.simple(e, attr, svc, sid)
        self.rlimits(e, sid, svc)
        self.simple(e, "banner", svc, sid)
        for attr in sorted(set(e.single) | set(e.multi)):
            if attr in _X_NOT_CARRIED:
                for a in e.multi.get(attr) or [e.single[attr]]:
                    self.warn(
                        a.file,
                        a.line,
                        f"service {sid}: {attr} not carried over: {_X_NOT_CARRIED[attr]}",
                    )


_BOTH_LISTS = (
    "both only_from and no_access: xinetd lets the more specific match decide; check that "
    "pyinetd's allow/deny order gives the same result"
)


def _xinetd_address(token: str) -> list[str] | None:
    """An only_from/no_access value as CIDR strings, None for names (xinetd/addr.c)."""
    if token == "localhost":
        return ["127.0.0.1", "::1"]
    if "{" in token:
        # Factorized: 128.138.{193,194} is 128.138.193.0/24 and 128.138.194.0/24.
        m = re.fullmatch(r"((?:\d{1,3}\.){0,3})\{(\d{1,3}(?:,\d{1,3})*)\}", token)
        if m is None:
            return None
        prefix = [int(p) for p in m[1].split(".") if p]
        out = []
        for value in m[2].split(","):
            octets = [*prefix, int(value)]
            if any(o > 255 for o in octets):
                return None
            bits = 8 * len(octets)
            octets += [0] * (4 - len(octets))
            out.append(_net(f"{'.'.join(map(str, octets))}/{bits}"))
        return out
    if "/" in token:
        try:
            return [_net(token)]
        except ValueError:
            return None
    try:
        addr = ipaddress.ip_address(token)
    except ValueError:
        return None
    if addr.version == 6:
        return ["::/0"] if int(addr) == 0 else [str(addr)]
    if int(addr) == 0:
        return ["0.0.0.0/0"]  # 0.0.0.0 matches every IPv4 address
    # Rightmost zero octets are wildcards: 128.138.12.0 is 128.138.12.0/24.
    zeros = 0
    for octet in reversed(addr.packed):
        if octet:
            break
        zeros += 1
    return [_net(f"{addr}/{32 - 8 * zeros}")]


def _is_interface(name: str) -> bool:
    """A bind value that names a network interface (lo, eth0), not an address or a host."""
    return name != "localhost" and re.fullmatch(r"[A-Za-z][\w-]{0,14}", name) is not None


def _net(text: str) -> str:
    net = ipaddress.ip_network(text, strict=False)
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return str(net)


# A service's keys in the order of their declaration (keys.py), which puts the ones a reader
# looks for first (listen, what runs, as whom) at the top.
_ORDER = tuple(SERVICE_KEYS)


def _ordered(svc: dict[str, Any]) -> dict[str, Any]:
    return {k: svc[k] for k in _ORDER if k in svc}


# --------------------------------------------------------------------------- entry points


def _is_xinetd_text(text: str) -> bool:
    """True if the text has xinetd entries (service NAME, defaults, include, includedir)."""
    return any(_X_XINETD_LINE_RE.match(line) for line in text.splitlines())


def convert_file(
    path: Path, services_file: Path = DEFAULT_SERVICES, *, root: Path | None = None
) -> Conversion:
    """Convert an inetd.conf or an xinetd configuration, whichever the file is."""
    text = read_text(path)
    if _is_xinetd_text(text):
        return convert_xinetd_conf(path, services_file, root=root)
    return convert_inetd_conf(path, services_file)


def escape(text: str) -> str:
    """Text with every character that is not printable escaped (\\n, \\x1b, \\u2028...)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _comment_lines(warnings: Iterable[ConvertWarning]) -> str:
    # Everything in a comment escaped, the file name too: a file named "x\ninclude: /tmp/evil"
    # in an includedir would write a real top-level `include:` into the output.
    return "".join(
        f"# warning: {escape(w.file)}:{w.line}: {escape(' '.join(w.message.split()))}\n"
        for w in warnings
    )


def dump(conv: Conversion, fmt: str) -> str:
    """The configuration as YAML, TOML or JSON text; the warnings as leading comments (not JSON:
    the caller reports them, the CLI on stderr)."""
    return write(conv.config, fmt, _comment_lines(conv.warnings))
