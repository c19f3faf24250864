"""Configuration: a YAML or TOML file -> frozen dataclasses. No sockets, no processes.

Every error names the file, the key path and the value, and all errors are collected before
anything is reported (``ConfigError.errors``), e.g.::

    inetd.yaml: services.echo.listen: '127.0.0.1:70000': port must be 1-65535
"""

from __future__ import annotations

import difflib
import grp
import ipaddress
import os
import pwd
import resource
import shlex
import shutil
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pyinetd.admission import AccessList, parse_duration, parse_rate, parse_size

PROTOCOLS = ("tcp", "udp", "unix")
BUILTINS = ("echo", "discard", "chargen", "daytime", "time")


class ConfigError(Exception):
    """One or more configuration errors, each a full 'file: key: message' line."""

    def __init__(self, errors: list[str]) -> None:
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
    cwd: str | None = None
    umask: int | None = None
    nice: int | None = None
    rlimits: tuple[tuple[int, int], ...] = ()
    banner: bytes = b""
    source: str = ""  # file the service was defined in

    @property
    def argv(self) -> tuple[str, ...]:
        return self.exec

    @property
    def is_builtin(self) -> bool:
        return not self.exec


@dataclass(frozen=True)
class Config:
    """The whole configuration."""

    path: Path
    services: tuple[Service, ...]
    max_children: int | None = None
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


def _parse_exec(value: Any, base: Path) -> tuple[str, ...]:
    if isinstance(value, str):
        try:
            argv = shlex.split(value)
        except ValueError as exc:
            raise _KeyError(f"{value!r}: {exc}") from None
    elif isinstance(value, list) and all(isinstance(a, str | int | float) for a in value):
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
    try:
        pw = pwd.getpwuid(value) if isinstance(value, int) else pwd.getpwnam(str(value))
    except (KeyError, OverflowError):
        raise _KeyError(f"{value!r}: no such user") from None
    if os.geteuid() != 0 and pw.pw_uid != os.geteuid():
        raise _KeyError(
            f"{value!r}: pyinetd runs as uid {os.geteuid()}, not root, and cannot switch users"
        )
    return (pw.pw_name, pw.pw_uid, pw.pw_gid)


def _parse_group(value: Any, _base: Path) -> int:
    try:
        gid = (
            grp.getgrgid(value).gr_gid
            if isinstance(value, int)
            else grp.getgrnam(str(value)).gr_gid
        )
    except (KeyError, OverflowError):
        raise _KeyError(f"{value!r}: no such group") from None
    if os.geteuid() != 0 and gid not in (os.getegid(), *os.getgroups()):
        raise _KeyError(f"{value!r}: pyinetd is not root and cannot switch to that group")
    return gid


def _parse_env(value: Any, _base: Path) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise _KeyError(f"{value!r}: expected a mapping NAME: value")
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


def _parse_rlimits(value: Any, _base: Path) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, dict):
        raise _KeyError(f"{value!r}: expected a mapping such as {{nofile: 256, as: 512M}}")
    out = []
    for k, v in value.items():
        res = RLIMITS.get(str(k))
        if res is None:
            raise _KeyError(f"{k}: unknown limit (known: {', '.join(RLIMITS)})")
        try:
            n = int(parse_duration(v)) if k == "cpu" and isinstance(v, str) else parse_size(v)
        except ValueError as exc:
            raise _KeyError(f"{k}: {exc}") from None
        hard = resource.getrlimit(res)[1]
        if os.geteuid() != 0 and hard != resource.RLIM_INFINITY and (n < 0 or n > hard):
            raise _KeyError(f"{k}: {v!r}: above the hard limit {hard} pyinetd runs with")
        out.append((res, n))
    return tuple(out)


def _parse_banner_file(value: Any, base: Path) -> bytes:
    if not isinstance(value, str) or not value:
        raise _KeyError(f"{value!r}: expected a file path")
    path = Path(value) if os.path.isabs(value) else base / value
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _KeyError(f"{value}: {exc.strerror}") from None
    if len(data) > 65536:
        raise _KeyError(f"{value}: larger than 64 KiB")
    return data


def _parse_banner_text(value: Any, _base: Path) -> bytes:
    if not isinstance(value, str):
        raise _KeyError(f"{value!r}: expected text")
    return value.encode()


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
    "cwd": _parse_dir,
    "umask": _parse_umask,
    "nice": _parse_nice,
    "rlimits": _parse_rlimits,
    "banner": _parse_banner_file,
    "banner_text": _parse_banner_text,
}
TOP_KEYS = ("defaults", "services", "max_children")


def _unknown(key: str, known: list[str]) -> str:
    near = difflib.get_close_matches(key, known, n=1)
    return "unknown key" + (f" (did you mean {near[0]!r}?)" if near else "")


def load_document(path: Path) -> Any:
    """Read a YAML or TOML file into plain Python data; ConfigError on a syntax error."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: {exc.strerror or exc}"]) from None
    try:
        if path.suffix == ".toml":
            return tomllib.loads(data.decode("utf-8"))
        return yaml.safe_load(data)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError([f"{path}: not valid YAML: {where}{exc.problem}"]) from None
    except (yaml.YAMLError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        kind = "TOML" if path.suffix == ".toml" else "YAML"
        detail = " ".join(str(exc).split())
        raise ConfigError([f"{path}: not valid {kind}: {detail}"]) from None


def load(path: str | Path) -> Config:
    """Load and validate a configuration file; ConfigError lists every problem."""
    path = Path(path)
    doc = load_document(path)
    return build(doc, path)


def build(doc: Any, path: Path) -> Config:
    """Validate parsed data from ``path`` into a Config."""
    label = str(path)
    base = path.parent.resolve()
    errors: list[str] = []
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError([f"{label}: expected a mapping with a 'services' key at the top"])
    for key in doc:
        if key not in TOP_KEYS:
            errors.append(f"{label}: {key}: {_unknown(str(key), list(TOP_KEYS))}")

    max_children = None
    if "max_children" in doc:
        try:
            max_children = _parse_count(doc["max_children"], base)
        except _KeyError as exc:
            errors.append(f"{label}: max_children: {exc}")
    defaults_raw = doc.get("defaults") or {}
    if not isinstance(defaults_raw, dict):
        errors.append(f"{label}: defaults: expected a mapping of service keys")
        defaults_raw = {}
    defaults = _check_keys(defaults_raw, f"{label}: defaults", errors, base, allow_listen=False)

    services_raw = doc.get("services")
    if services_raw is None:
        services_raw = {}
        errors.append(f"{label}: services: missing (nothing to serve)")
    elif not isinstance(services_raw, dict):
        errors.append(f"{label}: services: expected a mapping of service name to settings")
        services_raw = {}

    services: list[Service] = []
    for name, body in services_raw.items():
        svc = _build_service(str(name), body, defaults, label, base, errors)
        if svc is not None:
            services.append(svc)
    _check_duplicates(services, label, errors)
    if errors:
        raise ConfigError(errors)
    return Config(path=path, services=tuple(services), max_children=max_children, raw=doc)


def _check_keys(
    raw: Mapping[Any, Any], where: str, errors: list[str], base: Path, *, allow_listen: bool
) -> dict[str, Any]:
    """Parse each known key of ``raw``; report unknown and bad keys to ``errors``."""
    out: dict[str, Any] = {}
    known = list(SERVICE_KEYS)
    for key, value in raw.items():
        key = str(key)
        parser = SERVICE_KEYS.get(key)
        if parser is None:
            errors.append(f"{where}.{key}: {_unknown(key, known)}")
            continue
        if key == "listen" and not allow_listen:
            errors.append(f"{where}.listen: listen addresses are per service, not a default")
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
) -> Service | None:
    where = f"{label}: services.{name}"
    if body is None:
        body = {}
    if not isinstance(body, dict):
        errors.append(f"{where}: expected a mapping of settings")
        return None
    n_before = len(errors)
    values = {**defaults, **_check_keys(body, where, errors, base, allow_listen=True)}
    protocol = values.get("protocol", "tcp")
    listen: list[ListenAddress] = []
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
    if "exec" in body and "builtin" in body:
        errors.append(f"{where}.exec: give either exec or builtin, not both")
    if len(errors) > n_before:
        return None
    values.pop("listen", None)
    if "exec" in body:
        values.pop("builtin", None)
    elif "builtin" in body or "exec" not in values:
        values.pop("exec", None)
        values.setdefault("builtin", "echo")
    if values.get("builtin") is not None:
        values["wait"] = False  # built-ins run inside pyinetd; wait does not apply
    _combine(values, where, errors)
    if len(errors) > n_before:
        return None
    return Service(name=name, listen=tuple(listen), source=label, **values)


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
    text = values.pop("banner_text", None)
    if text is not None:
        if values.get("banner"):
            errors.append(f"{where}.banner_text: give either banner or banner_text, not both")
        values["banner"] = text
    for key in ("busy_message", "deny_message"):
        if values.get(key) and not values[key].endswith("\n"):
            values[key] += "\r\n"


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
