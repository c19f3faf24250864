"""Configuration: a YAML or TOML file -> frozen dataclasses. No sockets, no processes.

Every error names the file, the key path and the value, and all errors are collected before
anything is reported (``ConfigError.errors``), e.g.::

    inetd.yaml: services.echo.listen: '127.0.0.1:70000': port must be 1-65535
"""

from __future__ import annotations

import contextlib
import functools
import glob
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyinetd import trust
from pyinetd.config import keys, schema
from pyinetd.config.access import AccessList
from pyinetd.config.checks import (
    STDERR_TO_LOG,
    WITHOUT_BANNER,
    FileFindings,
    Unusable,
    check_reach,
    check_sandbox,
    check_stderr_file,
    check_warm,
    check_workers,
    reaches,
    settle_file,
)
from pyinetd.config.configerror import ConfigError, duplicates, located, one_short_line
from pyinetd.config.document import Marks, read_marked
from pyinetd.config.keys import declared
from pyinetd.config.parsers import (
    BUILTINS,
    PROTOCOLS,
    ListenAddress,
    Parser,
    TLSSettings,
    _BannerFile,
    _FileStateError,
    _KeyError,
    _read_banner,
    parse_listen_item,
    types_only,
)
from pyinetd.config.service_keys import BUILTIN_STREAM_DEFAULTS, UDP_RATE
from pyinetd.config.units import parse_rate
from pyinetd.config.wsconf import WebSocketSettings
from pyinetd.config.wsconf import check_service as check_websocket
from pyinetd.sandbox import SandboxSettings

__all__ = [
    "BUILTINS",
    "PROTOCOLS",
    "SERVICE_PARSERS",
    "TOP_NAMES",
    "Config",
    "ConfigError",
    "ListenAddress",
    "Service",
    "build",
    "load",
    "parse_listen_item",
]


# Limits that count across a service's connections; a service with one is served by the first
# process only when there are workers, so that the count is exact.
COUNTED_LIMITS = ("max_connections", "per_source", "rate")
# max_connections of a redirect service that sets none. Its connections are carried by its
# front (no process each): what bounds them is the front's memory per connection (README,
# Performance) and the fds (two per connection in the front).
REDIRECT_MAX_CONNECTIONS = 1000


@dataclass(frozen=True)
class Service:
    """One configured service, fully validated and resolved.

    A field whose key declares a default (service_keys.py) takes it from there, `declared(...)`;
    the others hold "not set" (None, empty). test_every_field_default_is_its_keys_declared_one
    keeps it so."""

    name: str
    listen: tuple[ListenAddress, ...]
    protocol: str = declared("protocol")
    builtin: str | None = None
    exec: tuple[str, ...] = ()
    argv0: str | None = None  # argv[0] when it is not exec[0] (busybox applets)
    wait: bool = declared("wait")
    enabled: bool = declared("enabled")
    stderr: str = declared("stderr")
    # `stderr: log` lines logged per second, bytes logged per second; the rest is dropped
    stderr_rate: tuple[float, float] = declared("stderr_rate")
    # admission (issue: limits); None = no limit
    max_connections: int | None = None
    on_limit: str = declared("on_limit")
    busy_message: str = ""
    per_source: int | None = None
    per_source_prefix: int = declared("per_source_prefix")
    rate: tuple[float, int] | None = None  # (per second, burst)
    rate_pause: float = declared("rate_pause")
    access: AccessList | None = None
    deny_message: str = ""
    timeout: float | None = None
    # process settings, applied in the child
    user: tuple[str, int, int] | None = None  # (name, uid, gid of the user)
    group: int | None = None
    env: tuple[tuple[str, str], ...] = ()
    env_clear: bool = declared("env_clear")
    # None: on for services with `user:` (a dropped service has nothing to gain back), off
    # otherwise (a root service may run setuid tools on purpose); see the `nnp` property.
    no_new_privs: bool | None = None
    cwd: str | None = None
    umask: int | None = None
    nice: int | None = None
    rlimits: tuple[tuple[int, int], ...] = ()
    sandbox: SandboxSettings | None = None  # implies no_new_privs
    # a Python script served from a warm interpreter (zygote.py), with these modules imported
    warm: bool = declared("warm")
    preload: tuple[str, ...] = ()
    # exec[0]'s first line (its #!) as the load read it with the user's rights (checks.py),
    # for the zygote: no key fills it, and root reads the file no second time
    exec_first_line: bytes = b""
    warm_max_forks: int = 0  # replace the zygote after this many forks (0: never)
    banner: bytes = b""
    # protocols in front of the service
    tls: TLSSettings | None = None
    proxy_protocol: str | None = None  # v1 | v2 | any
    proxy_from: AccessList | None = None
    proxy_timeout: float = declared("proxy_timeout")
    redirect: tuple[str, int] | None = None
    fronts: int = declared("fronts")  # tls or redirect: the service's front processes
    front_user: tuple[str, int, int] | None = None  # None: a dynamic uid (fronts.pick_uids)
    websocket: WebSocketSettings | None = None  # served over WebSocket by the service's front
    # a unix socket file's mode and owner (None: pyinetd's umask, and pyinetd)
    socket_mode: int | None = None
    socket_user: tuple[str, int, int] | None = None
    socket_group: int | None = None
    # where and when (xinetd's bind = IFACE, access_times, max_load) and socket options
    interface: str | None = None
    access_times: tuple[tuple[int, int], ...] = ()  # (first, last) minute of the day
    max_load: float | None = None
    keepalive: bool = declared("keepalive")
    nodelay: bool = declared("nodelay")
    send_buffer: int | None = None
    receive_buffer: int | None = None
    source: str = ""  # file the service was defined in

    @property
    def argv(self) -> tuple[str, ...]:
        """The program's argv: argv0 when given, else its path as written (absolute, symlinks
        kept: a venv's python finds its pyvenv.cfg from argv[0], a multi-call binary picks its
        applet by it); ``program``, the resolved path, is what is executed."""
        if self.argv0 is not None:
            return (self.argv0, *self.exec[1:])
        given = getattr(self.exec, "given", None)
        return (given[0], *self.exec[1:]) if given else self.exec

    @property
    def program(self) -> str:
        """The path that is executed (exec's first word, resolved)."""
        return self.exec[0]

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
            return True  # a sandbox implies it; checks.check_sandbox refuses `false`
        return self.user is not None if self.no_new_privs is None else self.no_new_privs

    @property
    def counts_connections(self) -> bool:
        """A limit counted across this service's connections (served by one process)."""
        return any(getattr(self, key) for key in COUNTED_LIMITS)


@dataclass(frozen=True)
class Config:
    """The whole configuration; its defaults are the top-level keys' declared ones (keys.py)."""

    path: Path
    services: tuple[Service, ...]
    max_children: int | None = None
    workers: int = declared("workers")
    include: tuple[str, ...] = ()
    control_socket: str | None = None
    pid_file: str | None = None
    shutdown: str = declared("shutdown")
    drain_timeout: float = declared("drain_timeout")
    reload_kills_removed: bool = declared("reload_kills_removed")
    metrics: str | None = None
    agent: tuple[str, ...] = ()  # HAProxy agent-check addresses (agent.py)
    agent_drain_time: float = declared("agent_drain_time")
    # Connections before their service starts (PROXY header or TLS ClientHello due): an fd
    # each and nothing proven yet, so bounded: idle connections must not hold every fd.
    max_pending: int = declared("max_pending")
    max_pending_per_source: int = declared("max_pending_per_source")
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # Where each key is in each file read: errors found after the build (a TLS file, a port
    # in use) are located as the build's own are.
    marks: Mapping[str, Marks] = field(default_factory=dict, compare=False, repr=False)

    def located(self, errors: list[str]) -> list[str]:
        """'file: key: message' lines as 'file:line:column: key: message' where known."""
        return located(errors, self.marks)

    # Services failed at load by a file their user can change (checks.settle_file, issue
    # 24.8): name -> 'key: why'. They stay in `services` (status shows them) and listen nowhere.
    failed: Mapping[str, str] = field(default_factory=dict, compare=False)
    # Services served without a file their user can change (banner, stderr): name -> notes.
    notes: Mapping[str, tuple[str, ...]] = field(default_factory=dict, compare=False)
    # Both as 'FILE:LINE:COLUMN: services.NAME.KEY: why; what now', for --check and the log.
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def enabled_services(self) -> tuple[Service, ...]:
        """The services that listen: enabled, and not failed at load."""
        return tuple(s for s in self.services if s.enabled and s.name not in self.failed)


# The parser of each key a service (or `defaults:`) may carry, and of each top-level key
# (besides `defaults` and `services`): declared in keys.py, whose SERVICE_KEYS and TOP_KEYS
# hold the whole declarations. TOP_NAMES: every name allowed at the top of a file.
SERVICE_PARSERS: dict[str, Parser] = {name: key.parse for name, key in keys.SERVICE_KEYS.items()}
TOP_PARSERS: dict[str, Parser] = {name: key.parse for name, key in keys.TOP_KEYS.items()}
TOP_NAMES = ("defaults", "services", *TOP_PARSERS)
_unknown = schema.unknown_key


def load_document(path: Path) -> tuple[Any, Marks]:
    """Read a YAML or TOML file into plain Python data and its keys' positions, bounded
    (document.py) and, as root, only when it is root's (trust.py); ConfigError otherwise."""
    try:
        return read_marked(path)
    except ValueError as exc:  # DocumentError, UntrustedError: one line naming the file
        raise ConfigError([str(exc)]) from None


def load(path: str | Path) -> Config:
    """Load and validate a configuration file; ConfigError lists every problem."""
    path = Path(path)
    doc, marks = load_document(path)
    return build(doc, path, marks)


def build(doc: Any, path: Path, marks: Marks | None = None) -> Config:
    """Validate parsed data from ``path`` (and the files it includes) into a Config.

    The parsers alone decide whether a configuration is valid (they refuse everything the
    schema refuses); only when they find an error does the JSON Schema run as well, for its
    messages. A good configuration never imports jsonschema: it costs the parent ~10 MiB.
    """
    try:
        return _build(doc, path, {str(path): marks or Marks()}, with_schema=False)
    except ConfigError:
        return _build(doc, path, {str(path): marks or Marks()}, with_schema=True)


def _build(doc: Any, path: Path, marks: dict[str, Marks], with_schema: bool) -> Config:
    label = str(path)
    base = path.parent.resolve()
    errors = duplicates(label, marks[label])
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError([f"{label}: expected a mapping with a 'services' key at the top"])
    # The schema first: types, choices and unknown keys; the parsers then check meaning.
    flags = schema.Findings(with_schema)
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
            errors.append(f"{label}: {key}: {_unknown(key, list(TOP_NAMES))}")
            continue
        try:
            top[key] = parser(value, base)
        except _KeyError as exc:
            errors += [f"{label}: {key}: {m}" for m in exc.messages]

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
        sources += _read_includes(pattern, base, label, errors, flags, marks)

    services: list[Service] = []
    files = FileFindings()
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
        with types_only(not _enabled(body, defaults, folder)):
            svc = _service(name, body, defaults, where, folder, errors, flags, files)
        if svc is not None:
            services.append(svc)
    _check_duplicates(services, label, errors)
    _check_redirect_loops(services, errors)
    _check_front_users(services, errors)
    errors += check_workers(top.get("workers", 1), top.get("max_children"), label)
    errors += flags.rest()
    errors = [e for e in errors if e not in files.claimed - files.kept]
    if errors:
        errors = list(dict.fromkeys(errors))  # a bad default reported once, not per service
        raise ConfigError(errors, located(errors, marks))
    return Config(
        path=path,
        services=tuple(services),
        raw=doc,
        marks=marks,
        failed=files.failed,
        notes={name: tuple(notes) for name, notes in files.notes.items()},
        warnings=tuple(one_short_line(located(files.warnings, marks))),
        **top,
    )


def _read_includes(
    pattern: str,
    base: Path,
    label: str,
    errors: list[str],
    flags: schema.Findings,
    marks: dict[str, Marks],
) -> list[tuple[str, Any, str, Path]]:
    """Services from the files matching one `include:` pattern, in sorted order."""
    full = pattern if os.path.isabs(pattern) else str(base / pattern)
    out: list[tuple[str, Any, str, Path]] = []
    names = sorted(glob.glob(full))
    if len(names) > MAX_INCLUDES:
        errors.append(f"{label}: include: {pattern!r}: more than {MAX_INCLUDES} files")
        return out
    # As root, a folder the pattern matches in must be root's alone, sticky or not: whoever
    # may add a file there adds a service run as root (a 1777 conf.d).
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
            doc, marks[str(inc)] = load_document(inc)
        except ConfigError as exc:
            errors.extend(exc.errors)
            continue
        where = str(inc)
        errors += duplicates(where, marks[where])
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
    known = list(SERVICE_PARSERS)
    for key, value in raw.items():
        key = str(key)
        if key == "listen" and not allow_listen:
            flagged(key)  # the schema only knows "unknown key"; this says why
            errors.append(f"{where}.listen: listen addresses are per service, not a default")
            continue
        if key == "listen":
            out[key] = value  # parsed by _service, which knows the protocol
            continue
        if found := flagged(key):
            errors += found
            continue
        parser = SERVICE_PARSERS.get(key)
        if parser is None:
            # In the schema, not yet implemented here (or the two drifted apart).
            errors.append(f"{where}.{key}: {_unknown(key, known)}")
            continue
        try:
            out[key] = parser(value, base)
        except _FileStateError as exc:
            # Whose failure this is depends on the service's user: _settle_unusable decides.
            errors.append(f"{where}.{key}: {exc.messages[0]}")
            out[key] = Unusable(where, key, exc.messages[0], exc.path, exc.fallback)
        except _KeyError as exc:
            errors += [f"{where}.{key}: {m}" for m in exc.messages]
    return out


def _enabled(body: Any, defaults: dict[str, Any], base: Path) -> bool:
    """Whether a service is enabled. One with `enabled: false` is checked for its schema and
    types only: its program, users, files, TLS files and ports are not looked at (it starts
    nothing and binds nothing), so a converted xinetd.d whose disabled services name servers
    that are not installed loads, as xinetd does."""
    enabled = defaults.get("enabled", True)
    if isinstance(body, dict) and "enabled" in body:
        with contextlib.suppress(ValueError):  # a bad value is reported where it is parsed
            enabled = SERVICE_PARSERS["enabled"](body["enabled"], base)
    return bool(enabled)


def _service(
    name: str,
    body: Any,
    defaults: dict[str, Any],
    label: str,
    base: Path,
    errors: list[str],
    flags: schema.Findings,
    found: FileFindings,
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
    _settle_unusable(values, where, errors, found)
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
        # these would be accepted and do nothing. rate does apply.
        for key in ("max_connections", "per_source"):
            if key in body:
                errors.append(
                    f"{where}.{key}: not for a UDP built-in (each datagram is answered at "
                    "once, nothing stays running to count); use rate"
                )
            values.pop(key, None)  # from `defaults:`, which cover other services too
    for key, protocols in (("interface", ("tcp", "udp")), ("keepalive", ("tcp",))):
        if protocol not in protocols:
            if key in body:
                errors.append(f"{where}.{key}: only for protocol {' or '.join(protocols)}")
            values.pop(key, None)  # from `defaults:`, which cover other services too
    if protocol != "tcp":
        if "nodelay" in body:
            errors.append(f"{where}.nodelay: only for protocol tcp")
        values.pop("nodelay", None)
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
    ws_errors, ws_warnings = check_websocket(body, values, protocol, where)
    errors += ws_errors
    found.warnings += ws_warnings
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
    if "argv0" in values and not values.get("exec"):
        values.pop("argv0")  # from defaults: meant for the services that start a program
        if "argv0" in body:
            errors.append(f"{where}.argv0: only with exec (the argv[0] of the program it starts)")
    if values.get("builtin") is not None:
        values["wait"] = False  # built-ins run inside pyinetd; wait does not apply
        if protocol == "tcp":
            # Each session holds a parent's fd: bounded per client unless said otherwise. A
            # service that sets max_connections has chosen its bound: no per_source is added
            # (a redirect to a local echo brings every connection from one address).
            for key, default in BUILTIN_STREAM_DEFAULTS.items():
                chosen = key == "per_source" and values.get("max_connections") is not None
                if values.get(key) is None and not chosen:
                    values[key] = default
    if "redirect" in body and values.get("max_connections") is None:
        # Each connection costs its front a socket pair and two bounded buffers.
        values["max_connections"] = REDIRECT_MAX_CONNECTIONS
    if ("tls" in values or "redirect" in body) and "nodelay" not in values:
        # A front writes what it has as one record: Nagle's wait for the client's delayed
        # ACK only holds the reply back (43 ms for the first after the handshake).
        values["nodelay"] = True
    if protocol == "udp" and not values.get("wait") and values.get("rate") is None:
        # Set before _combine, so that `burst:` alone shapes this default (service_keys).
        values["rate"] = parse_rate(UDP_RATE)
    _combine(values, where, errors, found)
    if len(errors) == n_before and not values.get("enabled", True):
        # The checks below look at this host's files and users: not for a disabled service.
        return Service(name=name, listen=tuple(listen), source=label, **values)
    user = values.get("user")
    if values.get("exec") and (user is None or user[1] == 0):
        try:
            # As root, a program others may replace would run as root, and so would the
            # script an interpreter or env runs.
            env = dict(values.get("env", ()))
            search = env.get("PATH") or os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")
            cwd = values.get("cwd") or os.getcwd()
            trust.check_command(values["exec"], search, cwd, values.get("argv0"))
        except OSError as exc:
            errors.append(f"{where}.exec: {values['exec'][0]}: {exc.strerror or exc}")
        except ValueError as exc:
            errors.append(f"{where}.exec: {exc} (the service runs as root)")
    stderr_errors: list[str] = []
    check_stderr_file(values, where, stderr_errors)
    for line in stderr_errors:
        if settle_file(values, where, line, values["stderr"], errors, found, without=STDERR_TO_LOG):
            values["stderr"] = "log"
    failed = name in found.failed
    argv: tuple[str, ...] = values.get("exec") or ()
    program = getattr(argv, "given", argv)[0] if argv else ""
    box_errors: list[str] = []
    check_sandbox(values, where, box_errors, explicit="sandbox" in body)
    for line in box_errors:
        # What exec needs under sandbox.read follows from the program (its #! line), which
        # the service's user may have rewritten; of a failed service, it does not matter.
        if not program or not line.startswith(f"{where}.sandbox.read: "):
            errors.append(line)
        elif not failed:
            settle_file(values, where, line, program, errors, found)
    if not failed:
        warm_errors: list[str] = []
        check_warm(values, where, warm_errors)
        for line in warm_errors:
            # Reading the program's #! line, or what it says: the user's when its file is.
            if program and line.startswith(f"{where}.warm: true: {argv[0]}: "):
                settle_file(values, where, line, program, errors, found)
            else:
                errors.append(line)
    if name not in found.failed:
        check_reach(values, where, errors, found)
    if len(errors) > n_before:
        return None
    return Service(name=name, listen=tuple(listen), source=label, **values)


def _settle_unusable(
    values: dict[str, Any], where: str, errors: list[str], found: FileFindings
) -> None:
    """Each key whose file is not usable now (its error already among ``errors``, in key
    order): the service's failure alone when its user can change that file, so its error is
    taken back; the folder of `stderr: FILE` gone, the log stands in. A bad default is the
    configuration's unless every service it reaches claims it (FileFindings.claimed)."""
    for key, value in list(values.items()):
        if not isinstance(value, Unusable):
            continue
        values[key] = value.fallback
        without = STDERR_TO_LOG if key == "stderr" else None
        line = f"{where}.{key}: {value.message}"
        own = settle_file(values, where, line, value.path, [], found, without=without)
        given = f"{value.where}.{key}: {value.message}"
        if value.where != where:
            (found.claimed if own else found.kept).add(given)
        elif own:
            errors.remove(given)


def _combine(values: dict[str, Any], where: str, errors: list[str], found: FileFindings) -> None:
    """Fold keys that configure one thing together (rate+burst, allow+deny, banner)."""
    burst = values.pop("burst", None)
    if values.get("rate") is not None and burst is not None:
        values["rate"] = (values["rate"][0], burst)
    elif burst is not None:
        errors.append(f"{where}.burst: only meaningful with rate")
    allow, deny = values.pop("allow", ()), values.pop("deny", ())
    if allow or deny:
        values["access"] = AccessList.parse(allow, deny)
    if isinstance(values.get("banner"), _BannerFile) and not values.get("enabled", True):
        # Not read for a service that never sends it (its user may not even exist here).
        values["banner"] = b""
    elif isinstance(values.get("banner"), _BannerFile):
        try:
            values["banner"] = _read_banner(
                values["banner"], values.get("user"), values.get("group")
            )
        except _KeyError as exc:
            # A banner its user may change: served without it, not refused.
            line, path = f"{where}.banner: {exc}", str(values["banner"].path)
            values["banner"] = b""
            settle_file(values, where, line, path, errors, found, without=WITHOUT_BANNER)
    text = values.pop("banner_text", None)
    if text is not None:
        if values.get("banner"):
            errors.append(f"{where}.banner_text: give either banner or banner_text, not both")
        values["banner"] = text
    for key in ("busy_message", "deny_message"):
        if values.get(key) and not values[key].endswith("\n"):
            values[key] += "\r\n"


def _check_front_users(services: list[Service], errors: list[str]) -> None:
    """A service whose `user:` is a front's uid (`front_user:`) could signal and trace that
    front, which holds its service's key and every client's connection: refused."""
    fronts = {s.front_user[1]: s.name for s in services if s.front_user and s.needs_relay}
    for svc in services:
        if svc.user is not None and svc.user[1] in fronts:
            errors.append(
                f"{svc.source}: services.{svc.name}.user: {svc.user[0]!r} is the front_user of "
                f"service {fronts[svc.user[1]]}: a program must not run as a front's uid"
            )


def _check_redirect_loops(services: list[Service], errors: list[str]) -> None:
    """A redirect that reaches its own service, directly or through other redirects, is a
    loop: each relay connects to the next without end (a client built a chain of 30 relay
    processes that outlived it)."""
    redirects = {s.name: s for s in services if s.enabled and s.redirect is not None}
    nexts: dict[str, list[str]] = {}
    for svc in redirects.values():
        assert svc.redirect is not None
        host, port = svc.redirect
        nexts[svc.name] = [
            other.name
            for other in redirects.values()
            if any(reaches(addr, host, port) for addr in other.listen)
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
