"""Configuration: a YAML or TOML file -> frozen dataclasses. No sockets, no processes.

Every error names the file, the key path and the value, and all errors are collected before
anything is reported (``ConfigError.errors``), e.g.::

    inetd.yaml: services.echo.listen: '127.0.0.1:70000': port must be 1-65535
"""

from __future__ import annotations

import contextlib
import functools
import glob
import grp
import ipaddress
import math
import os
import pwd
import resource
import shlex
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # ssl costs the parent ~5 MiB: loaded only for a service with tls
    from pyinetd.tlsconf import TLSSettings

from pyinetd import fsuser, sandbox, schema, trust
from pyinetd.admission import AccessList, parse_duration, parse_rate, parse_size
from pyinetd.document import read_document
from pyinetd.sandbox import SandboxSettings

PROTOCOLS = ("tcp", "udp", "unix")
BUILTINS = ("echo", "discard", "chargen", "daytime", "time")


MAX_ERROR = 1000  # characters of one error line


class ConfigError(Exception):
    """One or more configuration errors, each a full 'file: key: message' line."""

    def __init__(self, errors: list[str]) -> None:
        # One error, one line: a control character in a name or value must not split it.
        errors = [
            e.encode("unicode_escape").decode("ascii") if not e.isprintable() else e for e in errors
        ]
        # One error, one short line: a value quoted whole could be a megabyte (issue 14.9).
        errors = [e if len(e) <= MAX_ERROR else e[: MAX_ERROR - 3] + "..." for e in errors]
        super().__init__("\n".join(errors))
        self.errors = errors


class _KeyError(ValueError):
    """A bad value for one key; the message says what was expected."""


@dataclass(frozen=True)
class ListenAddress:
    """One place a service listens: an IP endpoint or a unix socket path."""

    host: str  # "" = every address (dual-stack when IPv6 is available); IP literal otherwise
    port: int  # 0 for unix sockets
    path: str = ""  # unix socket path (protocol unix)

    @property
    def is_v6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        if self.path:
            return self.path
        if not self.host:
            return str(self.port)
        return f"[{self.host}]:{self.port}" if self.is_v6 else f"{self.host}:{self.port}"


# Limits that count across a service's connections; a service with one is served by the first
# process only when there are workers, so that the count is exact.
COUNTED_LIMITS = ("max_connections", "per_source", "rate")
# max_connections of a redirect service that sets none: each relay is a forked pyinetd of
# ~7.5 MiB private memory; 100 clients to a target that never reads held 749 MiB (18.10).
REDIRECT_MAX_CONNECTIONS = 64
# `stderr_rate` default: what `stderr: log` logs of one service per second (lines, bytes); a
# connection writing 300 MB to stderr made 3 million log lines (issue 14, item 8).
STDERR_RATE = (100.0, 64 * 1024.0)


@dataclass(frozen=True)
class Service:
    """One configured service, fully validated and resolved."""

    name: str
    listen: tuple[ListenAddress, ...]
    protocol: str = "tcp"
    builtin: str | None = None
    exec: tuple[str, ...] = ()
    wait: bool = False
    enabled: bool = True
    stderr: str = "log"
    # `stderr: log` lines logged per second, bytes logged per second; the rest is dropped
    stderr_rate: tuple[float, float] = STDERR_RATE
    # admission (issue: limits); None = no limit
    max_connections: int | None = None
    on_limit: str = "queue"
    busy_message: str = ""
    per_source: int | None = None
    per_source_prefix: int = 64
    rate: tuple[float, int] | None = None  # (per second, burst)
    rate_pause: float = 10.0
    access: AccessList | None = None
    deny_message: str = ""
    timeout: float | None = None
    # process settings, applied in the child
    user: tuple[str, int, int] | None = None  # (name, uid, gid of the user)
    group: int | None = None
    env: tuple[tuple[str, str], ...] = ()
    env_clear: bool = False
    # None: on for services with `user:` (a dropped service has nothing to gain back), off
    # otherwise (a root service may run setuid tools on purpose); see the `nnp` property.
    no_new_privs: bool | None = None
    cwd: str | None = None
    umask: int | None = None
    nice: int | None = None
    rlimits: tuple[tuple[int, int], ...] = ()
    sandbox: SandboxSettings | None = None  # issue 17; implies no_new_privs
    banner: bytes = b""
    # protocols in front of the service
    tls: TLSSettings | None = None
    proxy_protocol: str | None = None  # v1 | v2 | any
    proxy_from: AccessList | None = None
    proxy_timeout: float = 5.0
    redirect: tuple[str, int] | None = None
    # a unix socket file's mode and owner (None: pyinetd's umask, and pyinetd)
    socket_mode: int | None = None
    socket_user: tuple[str, int, int] | None = None
    socket_group: int | None = None
    source: str = ""  # file the service was defined in

    @property
    def argv(self) -> tuple[str, ...]:
        return self.exec

    @property
    def is_builtin(self) -> bool:
        return not self.exec and self.redirect is None

    @property
    def needs_relay(self) -> bool:
        """TLS or redirect: a relay process stands between the client and the service."""
        return self.tls is not None or self.redirect is not None

    @property
    def nnp(self) -> bool:
        """Whether the child gets PR_SET_NO_NEW_PRIVS (the key, or its default)."""
        if self.sandbox is not None:
            return True  # a sandbox implies it (issue 17); _check_sandbox refuses `false`
        return self.user is not None if self.no_new_privs is None else self.no_new_privs

    @property
    def counts_connections(self) -> bool:
        """A limit counted across this service's connections (served by one process)."""
        return any(getattr(self, key) for key in COUNTED_LIMITS)


@dataclass(frozen=True)
class Config:
    """The whole configuration."""

    path: Path
    services: tuple[Service, ...]
    max_children: int | None = None
    workers: int = 1
    include: tuple[str, ...] = ()
    control_socket: str | None = None
    pid_file: str | None = None
    shutdown: str = "leave"
    drain_timeout: float = 30.0
    reload_kills_removed: bool = False
    metrics: str | None = None
    # Connections before their service starts (PROXY header or TLS ClientHello due): an fd
    # each and nothing proven yet, so bounded (issue 14, items 5 and 6).
    max_pending: int = 256
    max_pending_per_source: int = 16
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def enabled_services(self) -> tuple[Service, ...]:
        return tuple(s for s in self.services if s.enabled)


# ---------------------------------------------------------------- value parsers
# Each takes (value, config folder) and returns the parsed value or raises _KeyError.

Parser = Callable[[Any, Path], Any]


def _parse_bool(value: Any, _base: Path) -> bool:
    if isinstance(value, bool):
        return value
    raise _KeyError(f"{value!r}: expected true or false")


def _parse_protocol(value: Any, _base: Path) -> str:
    if isinstance(value, str) and value.lower() in PROTOCOLS:
        return value.lower()
    raise _KeyError(f"{value!r}: expected one of {', '.join(PROTOCOLS)}")


def _parse_builtin(value: Any, _base: Path) -> str:
    if isinstance(value, str) and value in BUILTINS:
        return value
    raise _KeyError(f"{value!r}: expected one of {', '.join(BUILTINS)}")


def _parse_stderr(value: Any, base: Path) -> str:
    if not isinstance(value, str) or not value:
        raise _KeyError(f"{value!r}: expected log, socket, null or a file path")
    if value in ("log", "socket", "null"):
        return value
    path = (base / value) if not os.path.isabs(value) else Path(value)
    if not path.parent.is_dir():
        raise _KeyError(f"{value!r}: folder {str(path.parent)!r} does not exist")
    return str(path)


_STDERR_RATE_KEYS = ("lines", "bytes")


def _parse_byte_rate(value: Any) -> float:
    """Bytes per second from 65536, '64k' (per second), '64KiB/s', '1M/min'."""
    size, per_second = value, 1.0
    if isinstance(value, str) and "/" in value:
        size, _, unit = value.partition("/")
        try:
            per_second = parse_rate(f"1/{unit.strip()}")[0]  # '1/min': 1/60 per second
        except ValueError:
            per_second = 0.0
    n: float = 0
    if isinstance(size, float):
        n = size if math.isfinite(size) else 0
    elif per_second:
        with contextlib.suppress(ValueError):
            n = parse_size(size)
    if not n > 0 or not per_second:  # (RLIM_INFINITY, "unlimited", is -1)
        raise ValueError(f"{value!r}: expected a byte rate such as 65536, '64k/s' or '1M/min'")
    return n * per_second


def _parse_stderr_rate(value: Any, _base: Path) -> tuple[float, float]:
    if not isinstance(value, dict):
        raise _KeyError(f"{value!r}: expected a mapping such as {{lines: 100/s, bytes: 64k/s}}")
    lines, nbytes = STDERR_RATE
    for k, v in value.items():
        if k not in _STDERR_RATE_KEYS:
            raise _KeyError(f"{k}: {_unknown(str(k), list(_STDERR_RATE_KEYS))}")
        try:
            if k == "lines":
                lines = parse_rate(v)[0]
            else:
                nbytes = _parse_byte_rate(v)
        except ValueError as exc:
            raise _KeyError(f"{k}: {exc}") from None
    return (lines, nbytes)


def _parse_exec(value: Any, base: Path) -> tuple[str, ...]:
    if isinstance(value, str):
        try:
            argv = shlex.split(value)
        except ValueError as exc:
            raise _KeyError(f"{value!r}: {exc}") from None
    elif isinstance(value, list) and all(
        isinstance(a, str | int | float) and not isinstance(a, bool) for a in value
    ):
        argv = [str(a) for a in value]
    else:
        raise _KeyError(f"{value!r}: expected a command line string or a list of arguments")
    if not argv or not argv[0]:
        raise _KeyError("empty command")
    prog = argv[0]
    if "/" in prog:
        path = Path(prog) if os.path.isabs(prog) else base / prog
        if not path.exists():
            raise _KeyError(f"{prog}: no such file")
        if path.is_dir() or not os.access(path, os.X_OK):
            raise _KeyError(f"{prog}: not an executable file")
        resolved = str(path.resolve())
    else:
        import shutil  # lazily: it imports bz2 and lzma, ~1 MiB of the parent

        found = shutil.which(prog)
        if found is None:
            raise _KeyError(f"{prog}: not found in PATH")
        resolved = found
    return (resolved, *argv[1:])


def parse_listen_item(item: Any, protocol: str, base: Path) -> ListenAddress:
    """Parse one listen entry: HOST:PORT, [V6]:PORT, PORT, or a unix socket path."""
    if protocol == "unix":
        if not isinstance(item, str) or not item:
            raise _KeyError(f"{item!r}: expected a socket file path")
        path = item if os.path.isabs(item) or item.startswith("@") else str(base / item)
        if not path.startswith("@") and not Path(path).parent.is_dir():
            raise _KeyError(f"{item!r}: folder {str(Path(path).parent)!r} does not exist")
        if len(os.fsencode(path)) > 107:
            raise _KeyError(f"{item!r}: unix socket path longer than 107 bytes")
        return ListenAddress(host="", port=0, path=path)
    if isinstance(item, bool) or not isinstance(item, int | str):
        raise _KeyError(f"{item!r}: expected HOST:PORT, [IPV6]:PORT or PORT")
    text = str(item).strip()
    host, port_text = "", text
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1 :].startswith(":"):
            raise _KeyError(f"{text!r}: expected [IPV6]:PORT")
        host, port_text = text[1:end], text[end + 2 :]
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise _KeyError(f"{text!r}: {host!r} is not an IPv6 address") from None
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
        if ":" in host:
            raise _KeyError(f"{text!r}: write IPv6 addresses in brackets, e.g. [::1]:7007")
        if host in ("*", ""):
            host = ""
        elif host == "localhost":
            host = "127.0.0.1"
        else:
            try:
                host = str(ipaddress.IPv4Address(host))
            except ValueError:
                raise _KeyError(f"{text!r}: {host!r} is not an IP address") from None
    if not port_text.isdigit():
        raise _KeyError(f"{text!r}: port must be a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise _KeyError(f"{text!r}: port must be 1-65535")
    return ListenAddress(host=host, port=port)


def _parse_count(value: Any, _base: Path) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise _KeyError(f"{value!r}: expected a whole number >= 1")


MAX_WORKERS = 64


def _parse_workers(value: Any, _base: Path) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_WORKERS:
        return value
    raise _KeyError(f"{value!r}: expected a whole number from 1 to {MAX_WORKERS}")


def _check_workers(workers: int, max_children: int | None, label: str) -> list[str]:
    """max_children counts every service's children: with several worker processes each
    would count only its own, so a limit of N would let workers x N through. Refused, not
    multiplied. (A service with its own counted limit stays with the first process.)"""
    if workers <= 1 or max_children is None:
        return []
    why = f"not with workers: {workers} (each worker process counts only its own children)"
    return [f"{label}: max_children: {why}"]


def _parse_choice(*choices: str) -> Parser:
    def parse(value: Any, _base: Path) -> str:
        if value in choices:
            return str(value)
        raise _KeyError(f"{value!r}: expected one of {', '.join(choices)}")

    return parse


def _parse_text(value: Any, _base: Path) -> str:
    if isinstance(value, str):
        return value
    raise _KeyError(f"{value!r}: expected text")


def _parse_prefix(value: Any, _base: Path) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 128:
        return value
    raise _KeyError(f"{value!r}: expected an IPv6 prefix length 0-128")


def _wrap(fn: Callable[[Any], Any]) -> Parser:
    def parse(value: Any, _base: Path) -> Any:
        try:
            return fn(value)
        except (ValueError, TypeError) as exc:
            raise _KeyError(str(exc)) from None

    return parse


def _parse_addr_list(value: Any, _base: Path) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    for item in items:
        try:
            AccessList.parse([item], [])
        except (ValueError, TypeError) as exc:
            raise _KeyError(str(exc)) from None
    return tuple(str(i) for i in items)


def _parse_user(value: Any, _base: Path) -> tuple[str, int, int]:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _KeyError(f"{value!r}: expected a user name or number")
    try:
        pw = pwd.getpwuid(value) if isinstance(value, int) else pwd.getpwnam(str(value))
    except (KeyError, OverflowError, ValueError):
        raise _KeyError(f"{value!r}: no such user") from None
    if os.geteuid() != 0 and pw.pw_uid != os.geteuid():
        raise _KeyError(
            f"{value!r}: pyinetd runs as uid {os.geteuid()}, not root, and cannot switch users"
        )
    return (pw.pw_name, pw.pw_uid, pw.pw_gid)


def _parse_group(value: Any, _base: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _KeyError(f"{value!r}: expected a group name or number")
    try:
        gid = (
            grp.getgrgid(value).gr_gid
            if isinstance(value, int)
            else grp.getgrnam(str(value)).gr_gid
        )
    except (KeyError, OverflowError, ValueError):
        raise _KeyError(f"{value!r}: no such group") from None
    if os.geteuid() != 0 and gid not in (os.getegid(), *os.getgroups()):
        raise _KeyError(f"{value!r}: pyinetd is not root and cannot switch to that group")
    return gid


MAX_ENV = 1000  # variables a service's `env` may set


def _parse_env(value: Any, _base: Path) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise _KeyError(f"{value!r}: expected a mapping NAME: value")
    if len(value) > MAX_ENV:
        # execve() refuses more than ~2 MiB of arguments and environment anyway (E2BIG).
        raise _KeyError(f"{len(value)} variables: at most {MAX_ENV}")
    out = []
    for k, v in value.items():
        if not isinstance(k, str) or not k or "=" in k or "\0" in k:
            raise _KeyError(f"{k!r}: not a valid environment variable name")
        if isinstance(v, bool) or not isinstance(v, str | int | float):
            raise _KeyError(f"{k}: {v!r}: expected text")
        out.append((k, str(v)))
    return tuple(out)


def _parse_dir(value: Any, base: Path) -> str:
    if not isinstance(value, str) or not value:
        raise _KeyError(f"{value!r}: expected a folder path")
    path = Path(value) if os.path.isabs(value) else base / value
    if not path.is_dir():
        raise _KeyError(f"{value}: no such folder")
    return str(path)


def _parse_umask(value: Any, _base: Path) -> int:
    # Text is octal ("022"); a YAML number is taken as read (YAML 1.1 reads 022 as octal).
    if isinstance(value, str) and value and set(value) <= set("01234567"):
        value = int(value, 8)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o777:
        return value
    raise _KeyError(f"{value!r}: expected an octal mask such as '022'")


def _parse_socket_mode(value: Any, _base: Path) -> int:
    # Text is octal ("0660"); a YAML number is taken as read, as for umask.
    if isinstance(value, str) and value and set(value) <= set("01234567"):
        value = int(value, 8)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o777:
        return value
    raise _KeyError(f"{value!r}: expected an octal file mode such as '0660'")


def _parse_nice(value: Any, _base: Path) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and -20 <= value <= 19:
        if value < 0 and os.geteuid() != 0:
            raise _KeyError(f"{value!r}: a negative nice value needs root")
        return value
    raise _KeyError(f"{value!r}: expected a number from -20 to 19")


RLIMITS = {
    "as": resource.RLIMIT_AS,
    "core": resource.RLIMIT_CORE,
    "cpu": resource.RLIMIT_CPU,
    "data": resource.RLIMIT_DATA,
    "fsize": resource.RLIMIT_FSIZE,
    "nofile": resource.RLIMIT_NOFILE,
    "nproc": resource.RLIMIT_NPROC,
    "rss": resource.RLIMIT_RSS,
    "stack": resource.RLIMIT_STACK,
    "memlock": resource.RLIMIT_MEMLOCK,
}


def _cpu_seconds(value: Any) -> int:
    """RLIMIT_CPU counts whole seconds: '500ms' must not become 0, a kill at the first tick."""
    if isinstance(value, str) and value.strip().lower() in ("unlimited", "infinity"):
        return resource.RLIM_INFINITY
    seconds = parse_duration(value)
    if seconds < 1 or not seconds.is_integer() or seconds > 2**62:
        raise ValueError(f"{value!r}: expected whole seconds >= 1 such as 10, '30s' or '5m'")
    return int(seconds)


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open", "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20  # the kernel's default


def _parse_rlimits(value: Any, _base: Path) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, dict):
        raise _KeyError(f"{value!r}: expected a mapping such as {{nofile: 256, as: 512M}}")
    out = []
    for k, v in value.items():
        res = RLIMITS.get(str(k))
        if res is None:
            raise _KeyError(f"{k}: unknown limit (known: {', '.join(RLIMITS)})")
        try:
            n = _cpu_seconds(v) if k == "cpu" else parse_size(v)
        except ValueError as exc:
            raise _KeyError(f"{k}: {exc}") from None
        if k == "nofile":
            # The child sets soft = hard = n: above fs.nr_open even root gets EPERM, and every
            # spawn fails (issue 18.15: `nofile: 1T` passed --check); below 3 it cannot exec.
            top = _nr_open()
            if not 3 <= n <= top:
                raise _KeyError(f"{k}: {v!r}: expected 3 to {top} (fs.nr_open)")
        hard = resource.getrlimit(res)[1]
        if os.geteuid() != 0 and hard != resource.RLIM_INFINITY and (n < 0 or n > hard):
            raise _KeyError(f"{k}: {v!r}: above the hard limit {hard} pyinetd runs with")
        out.append((res, n))
    return tuple(out)


@dataclass(frozen=True)
class _BannerFile:
    """A `banner:` path, read by _combine once the service's user is known."""

    value: str
    path: Path


def _parse_banner_file(value: Any, base: Path) -> _BannerFile:
    if not isinstance(value, str) or not value:
        raise _KeyError(f"{value!r}: expected a file path")
    return _BannerFile(value, Path(value) if os.path.isabs(value) else base / value)


def _read_banner(
    banner: _BannerFile, user: tuple[str, int, int] | None, group: int | None
) -> bytes:
    """Read a banner file with the service user's rights: that user may have linked it to
    /etc/shadow, which root would read and send to every client (issue 18.8)."""
    value = banner.value
    try:
        # Non-blocking and a regular file only: a FIFO or /dev/zero must not hang --check.
        fd = fsuser.open_as(user, group, str(banner.path), os.O_RDONLY)
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
            data = os.read(fd, 65537) if regular else b""
        finally:
            os.close(fd)
    except (OSError, ValueError) as exc:
        raise _KeyError(f"{value}: {getattr(exc, 'strerror', None) or exc}") from None
    if not regular:
        raise _KeyError(f"{value}: not a regular file")
    if len(data) > 65536:
        raise _KeyError(f"{value}: larger than 64 KiB")
    return data


def _parse_banner_text(value: Any, _base: Path) -> bytes:
    if not isinstance(value, str):
        raise _KeyError(f"{value!r}: expected text")
    return value.encode()


_TLS_KEYS = ("cert", "key", "client_ca", "min_version", "handshake_timeout")


def _parse_tls(value: Any, base: Path) -> TLSSettings:
    from pyinetd.tlsconf import VERSIONS, TLSSettings

    if not isinstance(value, dict):
        raise _KeyError(f"{value!r}: expected a mapping with cert and key")
    for k in value:
        if k not in _TLS_KEYS:
            raise _KeyError(f"{k}: {_unknown(str(k), list(_TLS_KEYS))}")
    for k in ("cert", "key"):
        if not isinstance(value.get(k), str):
            raise _KeyError(f"{k}: missing (a PEM file path)")

    def path(k: str) -> Path:
        v = str(value[k])
        return Path(v) if os.path.isabs(v) else base / v

    min_version = value.get("min_version", "1.2")
    if min_version not in VERSIONS:
        raise _KeyError(f"min_version: {min_version!r}: expected '1.2' or '1.3'")
    try:
        # The files are read once, by the runtime, when it prepares a (re)load: tlsconf.py.
        return TLSSettings(
            cert=path("cert"),
            key=path("key"),
            client_ca=path("client_ca") if value.get("client_ca") else None,
            min_version=str(min_version),
            handshake_timeout=parse_duration(value.get("handshake_timeout", 10)),
        )
    except ValueError as exc:
        raise _KeyError(str(exc)) from None


def _parse_redirect(value: Any, base: Path) -> tuple[str, int]:
    if not isinstance(value, str) or ":" not in value:
        raise _KeyError(f"{value!r}: expected HOST:PORT")
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise _KeyError(f"{value!r}: expected HOST:PORT with a port 1-65535")
    return (host, int(port))


def _parse_sandbox(value: Any, base: Path) -> SandboxSettings:
    try:
        return sandbox.parse(value, base)
    except sandbox.SandboxError as exc:
        raise _KeyError(str(exc)) from None


def _parse_proxy_from(value: Any, base: Path) -> AccessList:
    items = _parse_addr_list(value, base)
    return AccessList.parse(items, [])


# Keys a service (or `defaults:`) may carry, with their parser. `listen` is parsed separately
# because it depends on `protocol`.
SERVICE_KEYS: dict[str, Parser] = {
    "listen": lambda v, b: v,
    "protocol": _parse_protocol,
    "builtin": _parse_builtin,
    "exec": _parse_exec,
    "wait": _parse_bool,
    "enabled": _parse_bool,
    "stderr": _parse_stderr,
    "stderr_rate": _parse_stderr_rate,
    "max_connections": _parse_count,
    "on_limit": _parse_choice("queue", "reject"),
    "busy_message": _parse_text,
    "per_source": _parse_count,
    "per_source_prefix": _parse_prefix,
    "rate": _wrap(parse_rate),
    "burst": _parse_count,
    "rate_pause": _wrap(parse_duration),
    "allow": _parse_addr_list,
    "deny": _parse_addr_list,
    "deny_message": _parse_text,
    "timeout": _wrap(parse_duration),
    "user": _parse_user,
    "group": _parse_group,
    "env": _parse_env,
    "env_clear": _parse_bool,
    "no_new_privs": _parse_bool,
    "cwd": _parse_dir,
    "umask": _parse_umask,
    "nice": _parse_nice,
    "rlimits": _parse_rlimits,
    "sandbox": _parse_sandbox,
    "banner": _parse_banner_file,
    "banner_text": _parse_banner_text,
    "tls": _parse_tls,
    "proxy_protocol": _parse_choice("v1", "v2", "any"),
    "proxy_from": _parse_proxy_from,
    "proxy_timeout": _wrap(parse_duration),
    "redirect": _parse_redirect,
    "socket_mode": _parse_socket_mode,
    "socket_user": _parse_user,
    "socket_group": _parse_group,
}


_unknown = schema.unknown_key


class _SchemaErrors:
    """The schema's findings by (file, key path), each handed out once, where build() reaches
    that key, so they come out in file order among config.py's own (semantic) errors."""

    def __init__(self, enabled: bool) -> None:
        self._found: dict[tuple[str, schema.KeyPath], list[str]] = {}
        self._enabled = enabled

    def add(self, label: str, doc: Any) -> None:
        """Validate one file's document against the schema."""
        if not self._enabled:
            return
        for key, message in schema.check(doc):
            line = f"{label}: {'.'.join(key)}: {message}" if key else f"{label}: {message}"
            self._found.setdefault((label, key), []).append(line)

    @property
    def enabled(self) -> bool:
        return self._enabled

    def take(self, label: str, *key: str) -> list[str]:
        """The error lines for exactly this key path (none if it is fine), removed."""
        return self._found.pop((label, key), [])

    def rest(self) -> list[str]:
        """What no check reached (a safety net: every finding is reported)."""
        lines = [line for lines in self._found.values() for line in lines]
        self._found.clear()
        return lines


def load_document(path: Path) -> Any:
    """Read a YAML or TOML file into plain Python data, bounded (document.py) and, as root,
    only when it is root's (trust.py); ConfigError otherwise."""
    try:
        return read_document(path)
    except ValueError as exc:  # DocumentError, UntrustedError: one line naming the file
        raise ConfigError([str(exc)]) from None


def load(path: str | Path) -> Config:
    """Load and validate a configuration file; ConfigError lists every problem."""
    path = Path(path)
    doc = load_document(path)
    return build(doc, path)


def _parse_path(value: Any, base: Path) -> str:
    if not isinstance(value, str) or not value:
        raise _KeyError(f"{value!r}: expected a file path")
    path = Path(value) if os.path.isabs(value) else base / value
    if not path.parent.is_dir():
        raise _KeyError(f"{value!r}: folder {str(path.parent)!r} does not exist")
    return str(path)


def _parse_endpoint(value: Any, base: Path) -> str:
    addr = parse_listen_item(value, "tcp", base)
    return str(addr)


def _parse_includes(value: Any, _base: Path) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(i, str) and i for i in items):
        raise _KeyError(f"{value!r}: expected a glob pattern or a list of them")
    return tuple(items)


# Top-level keys (besides `defaults` and `services`), with their parser.
TOP_PARSERS: dict[str, Parser] = {
    "include": _parse_includes,
    "max_children": _parse_count,
    "workers": _parse_workers,
    "control_socket": _parse_path,
    "pid_file": _parse_path,
    "shutdown": _parse_choice("leave", "drain"),
    "drain_timeout": _wrap(parse_duration),
    "reload_kills_removed": _parse_bool,
    "metrics": _parse_endpoint,
    "max_pending": _parse_count,
    "max_pending_per_source": _parse_count,
}
TOP_KEYS = ("defaults", "services", *TOP_PARSERS)


def build(doc: Any, path: Path) -> Config:
    """Validate parsed data from ``path`` (and the files it includes) into a Config.

    The parsers alone decide whether a configuration is valid (they refuse everything the
    schema refuses); only when they find an error does the JSON Schema run as well, for its
    messages. A good configuration never imports jsonschema: it costs the parent ~10 MiB.
    """
    try:
        return _build(doc, path, with_schema=False)
    except ConfigError:
        return _build(doc, path, with_schema=True)


def _build(doc: Any, path: Path, with_schema: bool) -> Config:
    label = str(path)
    base = path.parent.resolve()
    errors: list[str] = []
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError([f"{label}: expected a mapping with a 'services' key at the top"])
    # The schema first: types, choices and unknown keys; the parsers then check meaning.
    flags = _SchemaErrors(with_schema)
    flags.add(label, doc)
    top: dict[str, Any] = {}
    for key, value in doc.items():
        key = str(key)
        if key in ("defaults", "services"):
            continue
        if found := flags.take(label, key):
            errors += found
            continue
        parser = TOP_PARSERS.get(key)
        if parser is None:
            errors.append(f"{label}: {key}: {_unknown(key, list(TOP_KEYS))}")
            continue
        try:
            top[key] = parser(value, base)
        except _KeyError as exc:
            errors.append(f"{label}: {key}: {exc}")

    defaults_raw = doc.get("defaults") or {}
    if not isinstance(defaults_raw, dict):
        errors += flags.take(label, "defaults") or [
            f"{label}: defaults: expected a mapping of service keys"
        ]
        defaults_raw = {}
    defaults = _check_keys(
        defaults_raw,
        f"{label}: defaults",
        errors,
        base,
        allow_listen=False,
        flagged=functools.partial(flags.take, label, "defaults"),
    )

    # (name, body, file label, folder) of every service, from this file and its includes.
    sources: list[tuple[str, Any, str, Path]] = []
    services_raw = doc.get("services")
    if services_raw is None and not top.get("include"):
        errors.append(f"{label}: services: missing (nothing to serve)")
    elif services_raw is not None and not isinstance(services_raw, dict):
        errors += flags.take(label, "services") or [
            f"{label}: services: expected a mapping of service name to settings"
        ]
    elif services_raw:
        sources += [(str(n), b, label, base) for n, b in services_raw.items()]
    for pattern in top.get("include", ()):
        sources += _read_includes(pattern, base, label, errors, flags)

    services: list[Service] = []
    defined: dict[str, str] = {}
    for name, body, where, folder in sources:
        if name in defined:
            errors.append(
                f"{where}: services.{name}: already defined in {defined[name]}"
                if where != defined[name]
                else f"{where}: services.{name}: defined twice"
            )
            continue
        defined[name] = where
        svc = _build_service(name, body, defaults, where, folder, errors, flags)
        if svc is not None:
            services.append(svc)
    _check_duplicates(services, label, errors)
    _check_redirect_loops(services, errors)
    errors += _check_workers(top.get("workers", 1), top.get("max_children"), label)
    errors += flags.rest()
    if errors:
        raise ConfigError(errors)
    return Config(path=path, services=tuple(services), raw=doc, **top)


def _read_includes(
    pattern: str, base: Path, label: str, errors: list[str], flags: _SchemaErrors
) -> list[tuple[str, Any, str, Path]]:
    """Services from the files matching one `include:` pattern, in sorted order."""
    full = pattern if os.path.isabs(pattern) else str(base / pattern)
    out: list[tuple[str, Any, str, Path]] = []
    names = sorted(glob.glob(full))
    if len(names) > MAX_INCLUDES:
        errors.append(f"{label}: include: {pattern!r}: more than {MAX_INCLUDES} files")
        return out
    # As root, a folder the pattern matches in must be root's alone, sticky or not: whoever
    # may add a file there adds a service run as root (issue 18.4, a 1777 conf.d).
    folders = {_glob_root(full)} if glob.has_magic(full) else set()
    folders.update(str(Path(n).parent) for n in names if glob.has_magic(full))
    for folder in sorted(folders):
        try:
            trust.check_folder(folder)
        except FileNotFoundError:
            continue  # nothing matched there
        except OSError as exc:
            errors.append(f"{label}: include: {folder}: {exc.strerror or exc}")
            return out
        except ValueError as exc:
            errors.append(f"{label}: include: {exc}")
            return out
    for name in names:
        inc = Path(name)
        if inc.is_dir():
            continue
        try:
            doc = load_document(inc)
        except ConfigError as exc:
            errors.extend(exc.errors)
            continue
        where = str(inc)
        if doc is None:
            continue
        if not isinstance(doc, dict) or set(doc) - {"services"}:
            extra = sorted(set(doc) - {"services"}) if isinstance(doc, dict) else []
            errors.append(
                f"{where}: {extra[0]}: only 'services' may be given in an included file"
                if extra
                else f"{where}: expected a mapping with a 'services' key"
            )
            continue
        body = doc.get("services") or {}
        if not isinstance(body, dict):
            errors.append(f"{where}: services: expected a mapping of service name to settings")
            continue
        flags.add(where, {"services": body})
        out += [(str(n), b, where, inc.parent.resolve()) for n, b in body.items()]
    return out


MAX_INCLUDES = 1000  # files matched by one include pattern


def _glob_root(pattern: str) -> str:
    """The folder of ``pattern`` above its first wildcard."""
    parts = Path(pattern).parts
    n = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    return str(Path(*parts[:n])) if n else "."


def _check_keys(
    raw: Mapping[Any, Any],
    where: str,
    errors: list[str],
    base: Path,
    *,
    allow_listen: bool,
    flagged: Callable[[str], list[str]],
) -> dict[str, Any]:
    """Parse each known key of ``raw``; report unknown and bad keys to ``errors``.

    ``flagged(key)`` gives the schema's errors for a key; they stand instead of the parser's.
    """
    out: dict[str, Any] = {}
    known = list(SERVICE_KEYS)
    for key, value in raw.items():
        key = str(key)
        if key == "listen" and not allow_listen:
            flagged(key)  # the schema only knows "unknown key"; this says why
            errors.append(f"{where}.listen: listen addresses are per service, not a default")
            continue
        if key == "listen":
            out[key] = value  # parsed by _build_service, which knows the protocol
            continue
        if found := flagged(key):
            errors += found
            continue
        parser = SERVICE_KEYS.get(key)
        if parser is None:
            # In the schema, not yet implemented here (or the two drifted apart).
            errors.append(f"{where}.{key}: {_unknown(key, known)}")
            continue
        try:
            out[key] = parser(value, base)
        except _KeyError as exc:
            errors.append(f"{where}.{key}: {exc}")
    return out


def _build_service(
    name: str,
    body: Any,
    defaults: dict[str, Any],
    label: str,
    base: Path,
    errors: list[str],
    flags: _SchemaErrors,
) -> Service | None:
    where = f"{label}: services.{name}"
    if body is None:
        body = {}
    if not isinstance(body, dict):
        errors += flags.take(label, "services", name) or [
            f"{where}: expected a mapping of settings"
        ]
        return None
    n_before = len(errors)
    flagged = functools.partial(flags.take, label, "services", name)
    values = {
        **defaults,
        **_check_keys(body, where, errors, base, allow_listen=True, flagged=flagged),
    }
    protocol = values.get("protocol", "tcp")
    listen: list[ListenAddress] = []
    # The listen parser knows the protocol (a unix service listens on a path), so its message
    # is the more precise one; the schema's stands only if the parser found nothing.
    schema_found = flagged("listen")
    n_listen = len(errors)
    raw_listen = body.get("listen")
    if raw_listen is None:
        errors.append(f"{where}.listen: missing (e.g. listen: 127.0.0.1:7007)")
    else:
        items = raw_listen if isinstance(raw_listen, list) else [raw_listen]
        if not items:
            errors.append(f"{where}.listen: empty list")
        for item in items:
            try:
                listen.append(parse_listen_item(item, protocol, base))
            except _KeyError as exc:
                errors.append(f"{where}.listen: {exc}")
    if len(errors) == n_listen:
        errors += schema_found
    # exec together with builtin is the schema's finding (reported with the exec key above);
    # without the schema, an error here sends build() to the pass that has it.
    if not flags.enabled and "exec" in body and "builtin" in body:
        errors.append(f"{where}.exec: give either exec or builtin, not both")
    if "redirect" in body and ("exec" in body or "builtin" in body):
        errors.append(f"{where}.redirect: give one of exec, builtin or redirect")
    if protocol != "tcp":
        for key in ("tls", "proxy_protocol", "redirect"):
            if key in body:
                errors.append(f"{where}.{key}: only for protocol tcp")
    if protocol == "udp" and ("builtin" in body or "exec" not in values):
        # A UDP built-in answers each datagram at once: nothing stays running to count, so
        # these would be accepted and do nothing (issue 18, item 5). rate does apply.
        for key in ("max_connections", "per_source"):
            if key in body:
                errors.append(
                    f"{where}.{key}: not for a UDP built-in (each datagram is answered at "
                    "once, nothing stays running to count); use rate"
                )
            values.pop(key, None)  # from `defaults:`, which cover other services too
    if "tls" in values and "exec" not in values and "redirect" not in body:
        errors.append(f"{where}.tls: needs exec or redirect (built-ins run inside pyinetd)")
    no_file = protocol != "unix" or any(a.path.startswith("@") for a in listen)
    for key in ("socket_mode", "socket_user", "socket_group"):
        if key in body and no_file:
            errors.append(
                f"{where}.{key}: only for a unix socket file (an abstract @name has no file "
                "and any local user can connect to it)"
            )
        elif no_file:
            values.pop(key, None)  # from defaults: meant for the unix services among them
    if values.get("wait") and ("tls" in values or "redirect" in body or "proxy_protocol" in values):
        errors.append(f"{where}.wait: not with tls, redirect or proxy_protocol")
    if len(errors) > n_before:
        return None
    values.pop("listen", None)
    if "exec" in body:
        values.pop("builtin", None)
    elif "redirect" in body:
        values.pop("builtin", None)
        values.pop("exec", None)
    elif "builtin" in body or "exec" not in values:
        values.pop("exec", None)
        values.setdefault("builtin", "echo")
    if values.get("builtin") is not None:
        values["wait"] = False  # built-ins run inside pyinetd; wait does not apply
    if "redirect" in body and values.get("max_connections") is None:
        # Each relay is a forked pyinetd (~7.5 MiB private): bounded unless said otherwise.
        values["max_connections"] = REDIRECT_MAX_CONNECTIONS
    _combine(values, where, errors)
    user = values.get("user")
    if values.get("exec") and (user is None or user[1] == 0):
        try:
            # As root, a program others may replace would run as root (issue 18.4).
            trust.check_program(values["exec"][0])
        except OSError as exc:
            errors.append(f"{where}.exec: {values['exec'][0]}: {exc.strerror or exc}")
        except ValueError as exc:
            errors.append(f"{where}.exec: {exc} (the service runs as root)")
    _check_stderr_file(values, where, errors)
    _check_sandbox(values, where, errors, explicit="sandbox" in body)
    if len(errors) > n_before:
        return None
    return Service(name=name, listen=tuple(listen), source=label, **values)


def _check_stderr_file(values: dict[str, Any], where: str, errors: list[str]) -> None:
    """`stderr: FILE` is opened with the service user's rights (issue 14.3): say at load, not
    at each connection, when that user may not write it (or create it in its folder)."""
    path, user = values.get("stderr"), values.get("user")
    if path in (None, "log", "socket", "null") or user is None or user[1] == 0:
        return
    if os.geteuid() != 0:
        return  # the service runs as pyinetd's own user: it opens what pyinetd may
    with fsuser.user_rights(user, values.get("group")):
        if os.path.lexists(path):
            ok = os.access(path, os.W_OK, effective_ids=True)
        else:
            ok = os.access(os.path.dirname(path), os.W_OK | os.X_OK, effective_ids=True)
    if not ok:
        errors.append(
            f"{where}.stderr: {path!r}: user {user[0]!r} may not write it "
            "(the file is opened with the service user's rights)"
        )


def _check_sandbox(values: dict[str, Any], where: str, errors: list[str], explicit: bool) -> None:
    """What execve reads (the program, its shebang interpreter, the loader) must be under
    sandbox.read: said at load and by --check, not by a service failing at each connection."""
    box = values.get("sandbox")
    if box is None:
        return
    if not explicit and values.get("builtin") is not None:
        values.pop("sandbox")  # from defaults: meant for the programs among them
        return
    if values.get("no_new_privs") is False:
        errors.append(f"{where}.no_new_privs: false: a sandbox implies no_new_privs")
    if values.get("redirect") is not None and box.network == "none":
        errors.append(f"{where}.sandbox.network: none: a redirect must connect to its target")
    if not values.get("exec"):
        if values.get("builtin") is not None:
            errors.append(f"{where}.sandbox: needs exec (built-ins run inside pyinetd)")
        return
    env = dict(values.get("env", ()))
    search = env.get("PATH") or os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    for path in sandbox.unreadable_exec_paths(box, values["exec"][0], search):
        errors.append(
            f"{where}.sandbox.read: {path!r} is not under read, and exec needs it "
            f"to start {values['exec'][0]!r}"
        )


def _combine(values: dict[str, Any], where: str, errors: list[str]) -> None:
    """Fold keys that configure one thing together (rate+burst, allow+deny, banner)."""
    burst = values.pop("burst", None)
    if values.get("rate") is not None and burst is not None:
        values["rate"] = (values["rate"][0], burst)
    elif burst is not None:
        errors.append(f"{where}.burst: only meaningful with rate")
    allow, deny = values.pop("allow", ()), values.pop("deny", ())
    if allow or deny:
        values["access"] = AccessList.parse(allow, deny)
    if isinstance(values.get("banner"), _BannerFile):
        try:
            values["banner"] = _read_banner(
                values["banner"], values.get("user"), values.get("group")
            )
        except _KeyError as exc:
            errors.append(f"{where}.banner: {exc}")
    text = values.pop("banner_text", None)
    if text is not None:
        if values.get("banner"):
            errors.append(f"{where}.banner_text: give either banner or banner_text, not both")
        values["banner"] = text
    for key in ("busy_message", "deny_message"):
        if values.get(key) and not values[key].endswith("\n"):
            values[key] += "\r\n"


def _local_targets(host: str) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address] | None:
    """The addresses a connection to ``host`` arrives at, for literals and localhost; None
    for other names (not resolved at load: config.py opens no sockets)."""
    if host == "localhost":
        return {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.is_unspecified:  # connect() to 0.0.0.0 or :: reaches the loopback address (Linux)
        return {ipaddress.ip_address("::1" if ip.version == 6 else "127.0.0.1")}
    return {ip}


def _reaches(addr: ListenAddress, host: str, port: int) -> bool:
    """True when a connection to host:port can arrive at a socket listening on ``addr``."""
    targets = _local_targets(host)
    if addr.path or addr.port != port or targets is None:
        return False
    if not addr.host or ipaddress.ip_address(addr.host).is_unspecified:
        # Every address of the host: loopback certainly (other addresses of this machine
        # are not known at load).
        return any(t.is_loopback for t in targets)
    return ipaddress.ip_address(addr.host) in targets


def _check_redirect_loops(services: list[Service], errors: list[str]) -> None:
    """A redirect that reaches its own service, directly or through other redirects, is a
    loop: each relay connects to the next without end (a client built a chain of 30 relay
    processes that outlived it, issue 18.10)."""
    redirects = {s.name: s for s in services if s.enabled and s.redirect is not None}
    nexts: dict[str, list[str]] = {}
    for svc in redirects.values():
        assert svc.redirect is not None
        host, port = svc.redirect
        nexts[svc.name] = [
            other.name
            for other in redirects.values()
            if any(_reaches(addr, host, port) for addr in other.listen)
        ]
    for svc in redirects.values():
        assert svc.redirect is not None
        seen, todo = {svc.name}, list(nexts[svc.name])
        while todo:
            name = todo.pop()
            if name == svc.name:
                host, port = svc.redirect
                via = "" if svc.name in nexts[svc.name] else " through other redirects"
                errors.append(
                    f"{svc.source}: services.{svc.name}.redirect: '{host}:{port}' reaches "
                    f"the service's own listen address{via}: a relay loop"
                )
                break
            if name not in seen:
                seen.add(name)
                todo += nexts[name]


def _check_duplicates(services: list[Service], label: str, errors: list[str]) -> None:
    seen: dict[tuple[str, int, str], tuple[str, ListenAddress]] = {}
    for svc in services:
        if not svc.enabled:
            continue
        kind = "stream" if svc.protocol in ("tcp", "unix") else "dgram"
        for addr in svc.listen:
            for (k, port, host), (other, other_addr) in seen.items():
                if addr.path:
                    clash = other_addr.path == addr.path
                else:
                    clash = (
                        k == kind
                        and port == addr.port
                        and not other_addr.path
                        and (host == addr.host or not host or not addr.host)
                    )
                if clash:
                    errors.append(
                        f"{label}: services.{svc.name}.listen: {str(addr)!r}: "
                        f"already used by service {other!r} ({other_addr})"
                    )
                    break
            seen[(kind, addr.port, addr.host or addr.path)] = (svc.name, addr)


# ---------------------------------------------------------------- back to the input vocabulary


def _number(value: float) -> int | float:
    """30.0 -> 30 (as people write it); other floats exactly as they are."""
    return int(value) if float(value).is_integer() and abs(value) < 2**53 else value


def _banner_out(_name: str, value: bytes) -> dict[str, Any]:
    try:
        return {"banner_text": value.decode("utf-8")}
    except UnicodeDecodeError:
        # banner_text is encoded as UTF-8 on the way in; other bytes have no text form.
        raise ValueError("banner: the file is not UTF-8 text and cannot be shown inline") from None


def _rate_out(_name: str, value: tuple[float, int]) -> dict[str, Any]:
    per_second, burst = value
    out: dict[str, Any] = {"rate": _number(per_second)}
    if burst != max(1, int(per_second)):  # parse_rate's default burst
        out["burst"] = burst
    return out


def _access_out(_name: str, value: AccessList) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if value.allow:
        out["allow"] = [str(n) for n in value.allow]
    if value.deny:
        out["deny"] = [str(n) for n in value.deny]
    return out


_RLIMIT_NAMES = {number: name for name, number in RLIMITS.items()}

# Service fields whose input form differs from the stored one; the others are written as they are.
_SERVICE_OUT: dict[str, Callable[[str, Any], dict[str, Any]]] = {
    "listen": lambda k, v: {k: str(v[0]) if len(v) == 1 else [str(a) for a in v]},
    "exec": lambda k, v: {k: list(v)},
    "rate": _rate_out,
    "rate_pause": lambda k, v: {k: _number(v)},
    "timeout": lambda k, v: {k: _number(v)},
    "access": _access_out,
    "user": lambda k, v: {k: v[0]},
    "env": lambda k, v: {k: dict(v)},
    "umask": lambda k, v: {k: f"{v:03o}"},
    "rlimits": lambda k, v: {
        k: {_RLIMIT_NAMES[res]: "unlimited" if n == resource.RLIM_INFINITY else n for res, n in v}
    },
    "banner": _banner_out,
    "stderr_rate": lambda k, v: {k: {"lines": _number(v[0]), "bytes": _number(v[1])}},
    "socket_mode": lambda k, v: {k: f"{v:04o}"},
    "socket_user": lambda k, v: {k: v[0]},
    "sandbox": lambda k, v: {k: v.to_dict()},
}


def _plain(name: str, value: Any) -> Any:
    """A stored value that is its own input form (text, number, true/false, a list of them)."""
    if isinstance(value, str | int | float | bool):
        return _number(value) if isinstance(value, float) else value
    if isinstance(value, tuple) and all(isinstance(v, str | int | float | bool) for v in value):
        return list(value)
    raise TypeError(f"to_dict: no input form for {name}={value!r}; add it to _SERVICE_OUT")


def _service_to_dict(svc: Service) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(Service):
        if f.name in ("name", "source"):
            continue
        value = getattr(svc, f.name)
        if value == f.default:
            continue
        convert = _SERVICE_OUT.get(f.name)
        out.update(convert(f.name, value) if convert else {f.name: _plain(f.name, value)})
    return out


def to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved configuration in the input vocabulary: defaults applied to each service,
    paths absolute, includes merged, keys at their default left out. It loads to an equal Config
    (apart from ``path`` and each service's ``source``)."""
    out: dict[str, Any] = {}
    for f in fields(Config):
        if f.name in ("path", "services", "raw", "include"):  # includes are merged below
            continue
        value = getattr(cfg, f.name)
        if value != f.default:
            out[f.name] = _plain(f.name, value)
    out["services"] = {svc.name: _service_to_dict(svc) for svc in cfg.services}
    return out
