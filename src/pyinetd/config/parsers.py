"""Value parsers: a key's value as YAML or TOML gave it -> its typed form. No sockets, no processes.

Each parser takes (value, the config file's folder) and returns the parsed value or raises
_KeyError with a message of the form ``'<value>': <what was expected>``; config.py prefixes it with
the file and key path. They may look at the file system (a program exists, a folder does, a user
may write) through trust.py and fsuser.py, never at the runtime. Within ``types_only()``
(a disabled service) what they would look up on this host is taken as written.
"""

from __future__ import annotations

import contextlib
import contextvars
import grp
import ipaddress
import math
import os
import pwd
import re
import resource
import shlex
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyinetd import fsuser, sandbox
from pyinetd.config.access import AccessList
from pyinetd.config.units import parse_duration, parse_rate, parse_size
from pyinetd.sandbox import SandboxSettings
from pyinetd.suggest import unknown_key

PROTOCOLS = ("tcp", "udp", "unix")
# The built-in services' names: their one home (builtins.py maps each to its handler).
BUILTINS = ("echo", "discard", "chargen", "daytime", "time")

# `stderr_rate` default: what `stderr: log` logs of one service per second (lines, bytes); a
# connection writing 300 MB to stderr would otherwise make 3 million log lines.
STDERR_RATE = (100.0, 64 * 1024.0)


# A service with `enabled: false` is checked for its schema and types only: the program, the
# users, groups and folders it names need not exist on this host (Debian's xinetd.d ships
# services `disable = yes` whose servers are not installed; xinetd ignores them).
_TYPES_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("types_only", default=False)


@contextlib.contextmanager
def types_only(on: bool = True) -> Iterator[None]:
    """Within it (when ``on``), parsers check types and forms but look nothing up: a path
    that does not exist, a user or group unknown here, is kept as written."""
    token = _TYPES_ONLY.set(on)
    try:
        yield
    finally:
        _TYPES_ONLY.reset(token)


class _KeyError(ValueError):
    """A bad value for one key; the message says what was expected. Several messages when
    several entries of a list are bad: each is reported, not only the first."""

    def __init__(self, message: str, *more: str) -> None:
        super().__init__(message)
        self.messages = (message, *more)


class _FileStateError(_KeyError):
    """The value is well formed, but the file or folder it names is not usable now (missing,
    not executable): a fact of the file system, which a service's user may have made.
    config.py settles it once the service's user is known (checks.settle_file): the one
    service's failure when that user can change ``path``, else a configuration error.
    ``fallback`` stands for the value then (the service is failed or does without it)."""

    def __init__(self, message: str, path: str, fallback: Any) -> None:
        super().__init__(message)
        self.path, self.fallback = path, fallback


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


@dataclass(frozen=True)
class TLSSettings:
    """A service's ``tls:`` block (tlsconf.py builds the context from it, at run time)."""

    cert: Path
    key: Path
    client_ca: Path | None = None
    min_version: str = "1.2"
    handshake_timeout: float = 10.0
    hello_timeout: float = 3.0


TLS_VERSIONS = ("1.2", "1.3")


_unknown = unknown_key


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
    if not path.parent.is_dir() and not _TYPES_ONLY.get():
        why = f"{value!r}: folder {str(path.parent)!r} does not exist"
        raise _FileStateError(why, str(path), "log")
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
    try:
        return _resolve_program(argv, base)
    except _KeyError:
        if not _TYPES_ONLY.get():
            raise
        prog = argv[0]
        return Argv((os.path.abspath(base / prog) if "/" in prog else prog, *argv[1:]))


def _resolve_program(argv: list[str], base: Path) -> Argv:
    """argv with its program found: a path that exists and is executable, or in PATH."""
    prog = argv[0]
    if "/" in prog:
        path = Path(prog) if os.path.isabs(prog) else base / prog
        unresolved = Argv((os.path.abspath(path), *argv[1:]))
        if not path.exists():
            raise _FileStateError(f"{prog}: no such file", str(path), unresolved)
        if path.is_dir() or not os.access(path, os.X_OK):
            raise _FileStateError(f"{prog}: not an executable file", str(path), unresolved)
        resolved = str(path.resolve())
        given = os.path.abspath(path)  # absolute, symlinks kept: as written, for --print-config
    else:
        import shutil  # lazily: it imports bz2 and lzma, ~1 MiB of the parent

        found = shutil.which(prog)
        if found is None:
            raise _KeyError(f"{prog}: not found in PATH")
        resolved = given = found
    return Argv((resolved, *argv[1:]), (given, *argv[1:]))


class Argv(tuple[str, ...]):
    """A program's argv with its program path resolved (what runs: what trust.py checked, so a
    symlink swapped later changes nothing), and ``given``: as written, made absolute but with
    its symlinks kept, which --print-config shows (/bin/cat, not /usr/bin/cat)."""

    given: tuple[str, ...]

    def __new__(cls, argv: Iterable[str] = (), given: Iterable[str] | None = None) -> Argv:
        self = super().__new__(cls, argv)
        self.given = tuple(self) if given is None else tuple(given)
        return self


def _parse_argv0(value: Any, _base: Path) -> str:
    if isinstance(value, str) and value and "\0" not in value:
        return value
    raise _KeyError(f"{value!r}: expected text (the program's argv[0])")


# IFNAMSIZ is 16 with its NUL: longer names are refused by SO_BINDTODEVICE (EINVAL).
_IFNAMSIZ = 16


def _parse_interface(value: Any, _base: Path) -> str:
    # A name only: whether it exists is the kernel's answer at bind (ENODEV), as an interface
    # may come up after pyinetd (ppp, wg); config.py opens no sockets to ask.
    if (
        isinstance(value, str)
        and 0 < len(value.encode()) < _IFNAMSIZ
        and value not in (".", "..")
        and not any(c in value for c in "/: \t\n\0")
    ):
        return value
    raise _KeyError(f"{value!r}: expected a network interface name such as lo or eth0")


_TIME_RANGE = re.compile(r"(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})")


def _parse_access_times(value: Any, _base: Path) -> tuple[tuple[int, int], ...]:
    """xinetd's access_times: 'HH:MM-HH:MM ...' -> (first, last) minutes of the day, both
    included (xinetd: 08:00-12:00 admits 12:00 and refuses 12:01); a range may pass midnight."""
    items = value.split() if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise _KeyError(f"{value!r}: expected time ranges such as '08:00-12:00 13:00-17:00'")
    out, bad = [], []
    for item in items:
        m = _TIME_RANGE.fullmatch(item) if isinstance(item, str) else None
        h1, m1, h2, m2 = (int(g) for g in m.groups()) if m else (99, 0, 0, 0)
        if h1 > 24 or h2 > 24 or m1 > 59 or m2 > 59 or (24 in (h1, h2) and (m1 or m2)):
            bad.append(f"{item!r}: expected HH:MM-HH:MM, 00:00 to 24:00")
            continue
        out.append((h1 * 60 + m1, h2 * 60 + m2))
    if bad:
        raise _KeyError(*bad)
    return tuple(out)


def _parse_load(value: Any, _base: Path) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 1e6:
        return float(value)
    raise _KeyError(f"{value!r}: expected a load average such as 4 or 2.5")


def _parse_buffer(value: Any, _base: Path) -> int:
    # SO_SNDBUF / SO_RCVBUF take a C int; the kernel doubles it and caps it at wmem_max /
    # rmem_max (socket(7)), so a larger value is no error, only capped.
    try:
        n = parse_size(value)
    except ValueError:
        n = -1
    if not 0 < n < 2**31:
        raise _KeyError(f"{value!r}: expected a size in bytes such as 65536 or '256k'")
    return n


def parse_listen_item(item: Any, protocol: str, base: Path) -> ListenAddress:
    """Parse one listen entry: HOST:PORT, [V6]:PORT, PORT, or a unix socket path."""
    if protocol == "unix":
        if not isinstance(item, str) or not item:
            raise _KeyError(f"{item!r}: expected a socket file path")
        path = item if os.path.isabs(item) or item.startswith("@") else str(base / item)
        folder = Path(path).parent
        if not path.startswith("@") and not folder.is_dir() and not _TYPES_ONLY.get():
            raise _KeyError(f"{item!r}: folder {str(folder)!r} does not exist")
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


def _parse_count_or_zero(value: Any, _base: Path) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise _KeyError(f"{value!r}: expected a whole number >= 0")


MAX_WORKERS = 64


def _parse_workers(value: Any, _base: Path) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_WORKERS:
        return value
    raise _KeyError(f"{value!r}: expected a whole number from 1 to {MAX_WORKERS}")


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
    bad = []
    for item in items:
        try:
            AccessList.parse([item], [])
        except (ValueError, TypeError) as exc:
            bad.append(str(exc))
    if bad:
        raise _KeyError(*bad)
    return tuple(str(i) for i in items)


def _parse_user(value: Any, _base: Path) -> tuple[str, int, int]:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _KeyError(f"{value!r}: expected a user name or number")
    try:
        pw = pwd.getpwuid(value) if isinstance(value, int) else pwd.getpwnam(str(value))
    except (KeyError, OverflowError, ValueError):
        if _TYPES_ONLY.get():
            return (str(value), -1, -1)  # not resolved: the service never starts
        raise _KeyError(f"{value!r}: no such user") from None
    if os.geteuid() != 0 and pw.pw_uid != os.geteuid() and not _TYPES_ONLY.get():
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
        if _TYPES_ONLY.get():
            return -1  # not resolved: the service never starts
        raise _KeyError(f"{value!r}: no such group") from None
    if os.geteuid() != 0 and gid not in (os.getegid(), *os.getgroups()) and not _TYPES_ONLY.get():
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
    if not path.is_dir() and not _TYPES_ONLY.get():
        raise _FileStateError(f"{value}: no such folder", str(path), str(path))
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
            # spawn fails, so `nofile: 1T` must fail --check; below 3 it cannot exec.
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
    /etc/shadow, which root would read and send to every client."""
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


_TLS_KEYS = ("cert", "key", "client_ca", "min_version", "handshake_timeout", "hello_timeout")


def _parse_tls(value: Any, base: Path) -> TLSSettings:
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
    if min_version not in TLS_VERSIONS:
        raise _KeyError(f"min_version: {min_version!r}: expected '1.2' or '1.3'")
    try:
        # The files are read once, by the runtime, when it prepares a (re)load: tlsconf.py.
        return TLSSettings(
            cert=path("cert"),
            key=path("key"),
            client_ca=path("client_ca") if value.get("client_ca") else None,
            min_version=str(min_version),
            handshake_timeout=parse_duration(value.get("handshake_timeout", 10)),
            hello_timeout=parse_duration(value.get("hello_timeout", 3)),
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


_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", re.ASCII)


def _parse_preload(value: Any, _base: Path) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _KeyError(f"{value!r}: expected a list of module names")
    for name in value:
        if not _MODULE_NAME.fullmatch(name):
            raise _KeyError(f"{name!r}: not a module name")
    return tuple(value)


def _parse_proxy_from(value: Any, base: Path) -> AccessList:
    items = _parse_addr_list(value, base)
    return AccessList.parse(items, [])


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


def _parse_endpoints(value: Any, base: Path) -> tuple[str, ...]:
    """A TCP address or a list of them, as a service's listen: (HOST:PORT, [V6]:PORT, PORT)."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise _KeyError("empty list: expected HOST:PORT, [IPV6]:PORT or PORT, or a list")
    return tuple(_parse_endpoint(item, base) for item in items)


def _parse_includes(value: Any, _base: Path) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(i, str) and i for i in items):
        raise _KeyError(f"{value!r}: expected a glob pattern or a list of them")
    return tuple(items)


# How a key's stored value is written back in the file, {key: input form} (--print-config);
# inputform.py holds them.
Out = Callable[[str, Any], dict[str, Any]]
