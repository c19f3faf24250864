"""Every configuration key, declared once: name, parser, description, JSON Schema, input form.

The rest follows from this table: config.py's validation (the parsers), ``schema.json`` (generated
from it: ``python -m pyinetd.schema > src/pyinetd/schema.json``; tests/test_schema.py checks the
shipped file is current), the pyinetd.yaml(5) man page (scripts/gen_manpage.py), ``--print-config``
(each key's ``out``) and the order in which ``pyinetd convert`` writes a service's keys (the order
of the table). Pure module: no sockets, no processes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pyinetd.parsers import (
    BUILTINS,
    Out,
    Parser,
    _access_out,
    _argv_out,
    _banner_out,
    _dict_out,
    _group_out,
    _listen_out,
    _name_out,
    _number_out,
    _octal_out,
    _parse_addr_list,
    _parse_argv0,
    _parse_banner_file,
    _parse_banner_text,
    _parse_bool,
    _parse_builtin,
    _parse_choice,
    _parse_count,
    _parse_dir,
    _parse_endpoint,
    _parse_env,
    _parse_exec,
    _parse_group,
    _parse_includes,
    _parse_nice,
    _parse_path,
    _parse_prefix,
    _parse_protocol,
    _parse_proxy_from,
    _parse_redirect,
    _parse_rlimits,
    _parse_socket_mode,
    _parse_stderr,
    _parse_stderr_rate,
    _parse_text,
    _parse_tls,
    _parse_umask,
    _parse_user,
    _parse_workers,
    _rate_out,
    _rlimits_out,
    _stderr_rate_out,
    _wrap,
)
from pyinetd.units import (
    DURATION_UNITS,
    RATE_UNITS,
    parse_duration,
    parse_rate,
)

__all__ = ["KEYS", "SERVICE_KEYS", "TOP_KEYS", "Key"]


@dataclass(frozen=True)
class Key:
    """One configuration key."""

    name: str
    parse: Parser  # (value, config folder) -> stored value, or _KeyError
    doc: str  # one paragraph: the man page and the schema's description
    schema: Mapping[str, Any]  # its JSON Schema, what editors check as one types
    top: bool = False  # a top-level key; otherwise a service key (also allowed in defaults:)
    # The Service field it fills: its own name, another (allow -> access), or None when it is
    # folded into another key's field by config._combine (burst, deny, banner_text).
    field: str | None = ""
    out: Out | None = None  # stored value -> input form, when they differ

    @property
    def target(self) -> str | None:
        return self.name if self.field == "" else self.field


# ---------------------------------------------------------------- patterns, from units.py


def _ci(word: str) -> str:
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in word)


def _alternatives(words: Any) -> str:
    """A case-insensitive alternation, longest words first (a regex takes the first match)."""
    return "|".join(_ci(w) for w in sorted(set(words), key=lambda w: (-len(w), w)))


_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
DURATION_PATTERN = rf"^\s*{_NUMBER}\s*(?:{_alternatives(k for k in DURATION_UNITS if k)})?\s*$"
RATE_PATTERN = rf"^\s*(?=[0.]*[1-9]){_NUMBER}\s*(?:/\s*(?:{_alternatives(RATE_UNITS)}))?\s*$"
_UNLIMITED = _alternatives(["unlimited", "infinity"])
BYTE_RATE_PATTERN = rf"^\s*{_NUMBER}\s*[kmgtpKMGTP]?(?:[iI]?[bB])?\s*(?:/\s*[a-zA-Z]+)?\s*$"
SIZE_PATTERN = rf"^\s*(?:{_NUMBER}\s*[kmgtpKMGTP]?(?:[iI]?[bB])?|(?:{_UNLIMITED}))\s*$"


# Schema fragments several keys share.
_SIZE: dict[str, Any] = {
    "type": ["integer", "string"],
    "minimum": 0,
    "maximum": 9223372036854775807,
    "pattern": SIZE_PATTERN,
    "errorMessage": "expected a whole size such as 100, '64k', '512M', '1G' or 'unlimited'",
}
_DURATION: dict[str, Any] = {
    "type": ["number", "string"],
    "minimum": 0,
    "pattern": DURATION_PATTERN,
    "examples": [30, "30s", "500ms", "5m"],
    "errorMessage": "expected a duration >= 0 such as 30, '30s', '500ms' or '5m'",
}
_ADDRESSES: dict[str, Any] = {
    "type": ["string", "array"],
    "minLength": 1,
    "items": {"type": "string", "minLength": 1, "errorMessage": "not an address or network"},
    "examples": [["127.0.0.0/8", "::1"]],
    "errorMessage": "not an address or network",
}
_FILE_PATH: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "errorMessage": "expected a file path",
}
_COUNT: dict[str, Any] = {
    "type": "integer",
    "minimum": 1,
    "errorMessage": "expected a whole number >= 1",
}
_BOOLEAN: dict[str, Any] = {"type": "boolean", "errorMessage": "expected true or false"}
_TEXT: dict[str, Any] = {"type": "string", "errorMessage": "expected text"}


def _parse_listen_raw(value: Any, _base: Any) -> Any:
    return value  # parsed by config._build_service, which knows the protocol


# ---------------------------------------------------------------- the keys

# Service keys first, in the order `pyinetd convert` writes them; then the top-level keys.
KEYS: tuple[Key, ...] = (
    Key(
        "listen",
        _parse_listen_raw,
        (
            "Where the service listens: HOST:PORT, [IPV6]:PORT, PORT (every address), *:PORT, or "
            "a list of those; for protocol unix a socket file path (relative to the configuration"
            " file's folder, or @name for the abstract namespace)."
        ),
        {
            "type": ["integer", "string", "array"],
            "minimum": 1,
            "maximum": 65535,
            "minLength": 1,
            "minItems": 1,
            "items": {
                "type": ["integer", "string"],
                "minimum": 1,
                "maximum": 65535,
                "minLength": 1,
                "errorMessage": "expected HOST:PORT, [IPV6]:PORT or PORT (port 1-65535)",
            },
            "examples": ["127.0.0.1:7007", 7007, "[::1]:7007", ["127.0.0.1:7007", "[::1]:7007"]],
            "errorMessage": (
                "expected HOST:PORT, [IPV6]:PORT, PORT (port 1-65535) or a list of them"
            ),
        },
        out=_listen_out,
    ),
    Key(
        "protocol",
        _parse_protocol,
        "tcp (default), udp, or unix (a stream socket file).",
        {
            "anyOf": [
                {"enum": ["tcp", "udp", "unix"]},
                {"type": "string", "pattern": "^(?:[uU][nN][iI][xX]|[tT][cC][pP]|[uU][dD][pP])$"},
            ],
            "default": "tcp",
            "errorMessage": "expected one of tcp, udp, unix",
        },
    ),
    Key(
        "builtin",
        _parse_builtin,
        (
            "A service pyinetd answers itself: echo (RFC 862), discard (RFC 863), chargen (RFC "
            "864), daytime (RFC 867) or time (RFC 868). The default when exec is not given is "
            "echo."
        ),
        {
            "enum": list(BUILTINS),
            "errorMessage": f"expected one of {', '.join(BUILTINS)}",
        },
    ),
    Key(
        "exec",
        _parse_exec,
        (
            "The program to start for each connection, with its arguments: a list, or one string "
            "split like a shell does. A relative program path is relative to the configuration "
            "file's folder; a bare name is looked up in PATH."
        ),
        {
            "type": ["string", "array"],
            "minLength": 1,
            "minItems": 1,
            "items": {
                "type": ["string", "number"],
                "errorMessage": "expected a command line string or a list of arguments",
            },
            "examples": [["services/upper.py"], "/usr/sbin/in.tftpd -s /srv/tftp"],
            "errorMessage": "expected a command line string or a list of arguments",
        },
        out=_argv_out,
    ),
    Key(
        "argv0",
        _parse_argv0,
        (
            "The program's argv[0] when it is not the program's path, as inetd.conf's sixth "
            "field gives it: busybox runs the applet argv[0] names (exec: [/bin/busybox, -i], "
            "argv0: httpd). Only with exec."
        ),
        {"type": "string", "minLength": 1, "examples": ["httpd"], "errorMessage": "expected text"},
    ),
    Key(
        "redirect",
        _parse_redirect,
        "Relay each connection to HOST:PORT instead of starting a program (xinetd's redirect).",
        {
            "type": "string",
            "minLength": 1,
            "examples": ["10.0.0.5:22"],
            "errorMessage": "expected HOST:PORT",
        },
    ),
    Key(
        "wait",
        _parse_bool,
        (
            "false (default): one process per connection. true: the program gets the listening "
            "socket itself and handles connections until it exits (inetd's wait)."
        ),
        {**_BOOLEAN, "default": False},
    ),
    Key(
        "enabled",
        _parse_bool,
        "false keeps the service in the file but does not listen.",
        {**_BOOLEAN, "default": True},
    ),
    Key(
        "user",
        _parse_user,
        "Run the program as this user (name or uid); needs pyinetd to run as root.",
        {
            "type": ["string", "integer"],
            "minLength": 1,
            "minimum": 0,
            "examples": ["nobody"],
            "errorMessage": "expected a user name or number",
        },
        out=_name_out,
    ),
    Key(
        "group",
        _parse_group,
        "Run the program with this group (name or gid); default: the user's group.",
        {
            "type": ["string", "integer"],
            "minLength": 1,
            "minimum": 0,
            "examples": ["nogroup"],
            "errorMessage": "expected a group name or number",
        },
        out=_group_out,
    ),
    Key(
        "max_connections",
        _parse_count,
        "At most this many connections of this service at once (see on_limit).",
        _COUNT,
    ),
    Key(
        "on_limit",
        _parse_choice("queue", "reject"),
        (
            "At max_connections: queue (default; stop accepting until one ends) or reject "
            "(accept, send busy_message, close)."
        ),
        {
            "enum": ["queue", "reject"],
            "errorMessage": "expected one of queue, reject",
            "default": "queue",
        },
    ),
    Key(
        "per_source",
        _parse_count,
        "At most this many connections at once from one client address.",
        _COUNT,
    ),
    Key(
        "rate",
        _wrap(parse_rate),
        (
            "At most this many new connections per second (a number), or per unit: '50/s', "
            "'600/min', '100/h'. Beyond it the service pauses for rate_pause seconds."
        ),
        {
            "type": ["number", "string"],
            "exclusiveMinimum": 0,
            "pattern": RATE_PATTERN,
            "examples": ["50/s", "600/min", "100/h"],
            "errorMessage": "expected a positive rate such as '50/s', '600/min' or '100/h'",
        },
        out=_rate_out,
    ),
    Key(
        "rate_pause",
        _wrap(parse_duration),
        "How long a service that exceeded its rate stops accepting (default 10 seconds).",
        {**_DURATION, "default": 10},
        out=_number_out,
    ),
    Key(
        "allow",
        _parse_addr_list,
        (
            "Only these client addresses or networks may connect (also all/any). The most "
            "specific entry of allow and deny decides."
        ),
        _ADDRESSES,
        field="access",
        out=_access_out,
    ),
    Key(
        "deny",
        _parse_addr_list,
        "These client addresses or networks may not connect.",
        _ADDRESSES,
        field=None,
    ),
    Key(
        "env",
        _parse_env,
        "Environment variables to set for the program (NAME: value).",
        {
            "type": "object",
            "propertyNames": {
                "type": "string",
                "minLength": 1,
                "pattern": "^[^=\\u0000]*$",
                "errorMessage": "not a valid environment variable name",
            },
            "additionalProperties": {"type": ["string", "number"], "errorMessage": "expected text"},
            "examples": [{"LANG": "C.UTF-8"}],
            "errorMessage": "expected a mapping NAME: value",
        },
        out=_dict_out,
    ),
    Key(
        "umask",
        _parse_umask,
        "The program's umask, octal: '022' (quote it, YAML reads 022 as a number).",
        {
            "type": ["string", "integer"],
            "pattern": "^0*[0-7]{1,3}$",
            "minimum": 0,
            "maximum": 511,
            "examples": ["022", "077"],
            "errorMessage": "expected an octal mask such as '022'",
        },
        out=_octal_out(3),
    ),
    Key(
        "nice",
        _parse_nice,
        "The program's nice value, -20 (highest priority, root only) to 19.",
        {
            "type": "integer",
            "minimum": -20,
            "maximum": 19,
            "errorMessage": "expected a number from -20 to 19",
        },
    ),
    Key(
        "rlimits",
        _parse_rlimits,
        (
            "Resource limits for the program (setrlimit(2)); sizes take k/M/G/T suffixes (powers "
            "of 1024) or 'unlimited'."
        ),
        {
            "type": "object",
            "properties": {
                "as": {
                    **_SIZE,
                    "description": "RLIMIT_AS: address space (virtual memory) in bytes.",
                },
                "core": {
                    **_SIZE,
                    "description": "RLIMIT_CORE: largest core file in bytes (0: none).",
                },
                "cpu": {
                    "description": "RLIMIT_CPU: CPU time in seconds (or '10s', '5m').",
                    "type": ["integer", "string"],
                    "minimum": 0,
                    "maximum": 9223372036854775807,
                    "pattern": DURATION_PATTERN,
                    "errorMessage": "expected CPU seconds such as 10, '10s' or '5m'",
                },
                "data": {**_SIZE, "description": "RLIMIT_DATA: data segment (heap) in bytes."},
                "fsize": {
                    **_SIZE,
                    "description": "RLIMIT_FSIZE: largest file the program may write, in bytes.",
                },
                "nofile": {**_SIZE, "description": "RLIMIT_NOFILE: open file descriptors."},
                "nproc": {**_SIZE, "description": "RLIMIT_NPROC: processes of the program's user."},
                "rss": {
                    **_SIZE,
                    "description": "RLIMIT_RSS: resident memory in bytes (advisory on Linux).",
                },
                "stack": {**_SIZE, "description": "RLIMIT_STACK: stack size in bytes."},
                "memlock": {**_SIZE, "description": "RLIMIT_MEMLOCK: locked memory in bytes."},
            },
            "additionalProperties": False,
            "examples": [{"as": "512M", "cpu": 10, "nofile": 256}],
            "errorMessage": "expected a mapping such as {nofile: 256, as: 512M}",
        },
        out=_rlimits_out,
    ),
    Key(
        "banner",
        _parse_banner_file,
        (
            "A file whose contents are sent to each client before the program starts (at most 64 "
            "KiB; relative to the configuration file's folder)."
        ),
        _FILE_PATH,
        out=_banner_out,
    ),
    Key(
        "stderr",
        _parse_stderr,
        (
            "Where the program's stderr goes: log (pyinetd's log, default), socket (the "
            "connection, like stdout), null, or a file path (appended to)."
        ),
        {
            "anyOf": [{"enum": ["log", "socket", "null"]}, {"type": "string", "minLength": 1}],
            "default": "log",
            "errorMessage": "expected log, socket, null or a file path",
        },
    ),
    Key(
        "stderr_rate",
        _parse_stderr_rate,
        (
            "How much of the program's stderr `stderr: log` logs: lines per second (like rate: "
            "100, '100/s', '6000/min') and bytes per second (65536, '64k/s', '1M/min'), each with"
            " a burst of one second's worth. What is over is read and dropped, and one line a "
            "second says how many were dropped. Default {lines: 100/s, bytes: 64k/s}."
        ),
        {
            "type": "object",
            "properties": {
                "lines": {
                    "description": "Lines logged per second at most (default 100/s).",
                    "type": ["number", "string"],
                    "exclusiveMinimum": 0,
                    "pattern": RATE_PATTERN,
                    "examples": ["100/s", "6000/min"],
                    "errorMessage": "expected a positive rate such as '50/s', '600/min' or '100/h'",
                },
                "bytes": {
                    "description": (
                        "Bytes logged per second at most (default 64k/s); sizes take k/M/G "
                        "suffixes (powers of 1024)."
                    ),
                    "type": ["number", "string"],
                    "exclusiveMinimum": 0,
                    "pattern": BYTE_RATE_PATTERN,
                    "examples": ["64k/s", "1M/min", 65536],
                    "errorMessage": "expected a byte rate such as 65536, '64k/s' or '1M/min'",
                },
            },
            "additionalProperties": False,
            "examples": [{"lines": "100/s", "bytes": "64k/s"}],
            "errorMessage": "expected a mapping such as {lines: 100/s, bytes: 64k/s}",
        },
        out=_stderr_rate_out,
    ),
    Key(
        "busy_message",
        _parse_text,
        "Sent to a connection rejected by on_limit: reject (a line end is added if missing).",
        _TEXT,
    ),
    Key(
        "per_source_prefix",
        _parse_prefix,
        (
            "IPv6 clients are counted per network of this prefix length for per_source (default "
            "64: one host usually owns a whole /64)."
        ),
        {
            "type": "integer",
            "minimum": 0,
            "maximum": 128,
            "default": 64,
            "errorMessage": "expected an IPv6 prefix length 0-128",
        },
    ),
    Key(
        "burst",
        _parse_count,
        "How many connections rate lets through at once (default: the rate per second).",
        _COUNT,
        field=None,
    ),
    Key(
        "deny_message",
        _parse_text,
        "Sent to a denied client before closing (a line end is added if missing).",
        _TEXT,
    ),
    Key(
        "timeout",
        _wrap(parse_duration),
        "Stop the service's process after this long (seconds, or '30s', '5m').",
        _DURATION,
        out=_number_out,
    ),
    Key(
        "env_clear",
        _parse_bool,
        (
            "true: start the program with only the variables of env (and those pyinetd sets), not"
            " pyinetd's own environment."
        ),
        {**_BOOLEAN, "default": False},
    ),
    Key(
        "no_new_privs",
        _parse_bool,
        (
            "true: the program (and all it execs) cannot gain privileges through setuid binaries "
            "or file capabilities (prctl PR_SET_NO_NEW_PRIVS). Default: true for services with "
            "user, false otherwise."
        ),
        _BOOLEAN,
    ),
    Key(
        "cwd",
        _parse_dir,
        "The program's working directory (relative to the configuration file's folder).",
        {"type": "string", "minLength": 1, "errorMessage": "expected a folder path"},
    ),
    Key(
        "banner_text",
        _parse_banner_text,
        "Text sent to each client before the program starts (instead of banner).",
        _TEXT,
        field=None,
    ),
    Key(
        "tls",
        _parse_tls,
        "Terminate TLS on the connection before it reaches the service.",
        {
            "type": "object",
            "properties": {
                "cert": {**_FILE_PATH, "description": "Certificate chain file (PEM)."},
                "key": {**_FILE_PATH, "description": "Private key file (PEM)."},
                "client_ca": {
                    **_FILE_PATH,
                    "description": "Require client certificates signed by these CAs (PEM file).",
                },
                "min_version": {
                    "description": "Lowest TLS version accepted: '1.2' (default) or '1.3'.",
                    "type": ["string", "number"],
                    "enum": ["1.2", "1.3", 1.2, 1.3],
                    "errorMessage": "expected '1.2' or '1.3'",
                },
                "handshake_timeout": {
                    **_DURATION,
                    "description": (
                        "Close a connection whose TLS handshake takes longer (default 10 seconds)."
                    ),
                    "default": 10,
                },
            },
            "required": ["cert", "key"],
            "additionalProperties": False,
            "examples": [{"cert": "tls/server.pem", "key": "tls/server.key"}],
            "errorMessage": "expected a mapping with cert and key",
        },
    ),
    Key(
        "proxy_protocol",
        _parse_choice("v1", "v2", "any"),
        (
            "Read a PROXY protocol header (HAProxy) first and use the client address it gives: v1"
            " (text), v2 (binary) or any."
        ),
        {"enum": ["v1", "v2", "any"], "errorMessage": "expected one of v1, v2, any"},
    ),
    Key(
        "proxy_from",
        _parse_proxy_from,
        "Accept PROXY protocol headers only from these addresses or networks (the proxies).",
        _ADDRESSES,
    ),
    Key(
        "proxy_timeout",
        _wrap(parse_duration),
        "Close a connection that has not sent its PROXY header within this time (default 5).",
        {**_DURATION, "default": 5},
    ),
    Key(
        "socket_mode",
        _parse_socket_mode,
        (
            "Protocol unix: the socket file's mode, octal: '0660' (default: from pyinetd's "
            "umask). A client needs write permission to connect."
        ),
        {
            "type": ["string", "integer"],
            "pattern": "^0*[0-7]{1,3}$",
            "minimum": 0,
            "maximum": 511,
            "examples": ["0660", "0666"],
            "errorMessage": "expected an octal file mode such as '0660'",
        },
        out=_octal_out(4),
    ),
    Key(
        "socket_user",
        _parse_user,
        "Protocol unix: the socket file's owner (name or uid; default: pyinetd's user).",
        {
            "type": ["string", "integer"],
            "minLength": 1,
            "minimum": 0,
            "examples": ["www-data"],
            "errorMessage": "expected a user name or number",
        },
        out=_name_out,
    ),
    Key(
        "socket_group",
        _parse_group,
        "Protocol unix: the socket file's group (name or gid; default: pyinetd's group).",
        {
            "type": ["string", "integer"],
            "minLength": 1,
            "minimum": 0,
            "examples": ["www-data"],
            "errorMessage": "expected a group name or number",
        },
        out=_group_out,
    ),
    Key(
        "include",
        _parse_includes,
        (
            "More files with a services: mapping, by glob pattern (relative to this file's "
            "folder), merged in sorted order."
        ),
        {
            "type": ["string", "array"],
            "minLength": 1,
            "items": {
                "type": "string",
                "minLength": 1,
                "errorMessage": "expected a glob pattern or a list of them",
            },
            "examples": ["conf.d/*.yaml"],
            "errorMessage": "expected a glob pattern or a list of them",
        },
        top=True,
    ),
    Key(
        "max_children",
        _parse_count,
        "At most this many service processes at once, over all services.",
        _COUNT,
        top=True,
    ),
    Key(
        "workers",
        _parse_workers,
        (
            "Accept loops in separate processes sharing the listening sockets (SO_REUSEPORT), to "
            "use more than one core. The first process alone serves wait-mode and unix-socket "
            "services and services with max_connections, per_source or rate (counted in one "
            "place), and the control socket. Not with max_children, which each worker would count"
            " on its own."
        ),
        {
            "type": "integer",
            "minimum": 1,
            "maximum": 64,
            "default": 1,
            "errorMessage": "expected a whole number from 1 to 64",
        },
        top=True,
    ),
    Key(
        "control_socket",
        _parse_path,
        "The unix socket `pyinetd status|reload|stop` talks to (relative to this file's folder).",
        _FILE_PATH,
        top=True,
    ),
    Key(
        "pid_file",
        _parse_path,
        "Write pyinetd's pid to this file while it runs.",
        _FILE_PATH,
        top=True,
    ),
    Key(
        "shutdown",
        _parse_choice("leave", "drain"),
        (
            "On SIGTERM: leave (default) running service processes alone, or drain: wait for them"
            " up to drain_timeout, then stop them."
        ),
        {
            "enum": ["leave", "drain"],
            "errorMessage": "expected one of leave, drain",
            "default": "leave",
        },
        top=True,
    ),
    Key(
        "drain_timeout",
        _wrap(parse_duration),
        "How long shutdown: drain waits (default 30 seconds).",
        {**_DURATION, "default": 30},
        top=True,
    ),
    Key(
        "reload_kills_removed",
        _parse_bool,
        "On reload, stop the processes of services that were removed (default: let them finish).",
        {**_BOOLEAN, "default": False},
        top=True,
    ),
    Key(
        "metrics",
        _parse_endpoint,
        "Serve Prometheus metrics over HTTP on HOST:PORT (or PORT).",
        {
            "type": ["string", "integer"],
            "minLength": 1,
            "minimum": 1,
            "maximum": 65535,
            "examples": ["127.0.0.1:9107"],
            "errorMessage": "expected HOST:PORT, [IPV6]:PORT or PORT (port 1-65535)",
        },
        top=True,
    ),
    Key(
        "max_pending",
        _parse_count,
        (
            "At most this many connections at once, over all services, waiting for a PROXY "
            "protocol header or a TLS ClientHello (an fd each, no process yet); more are refused "
            "at once."
        ),
        {**_COUNT, "default": 256},
        top=True,
    ),
    Key(
        "max_pending_per_source",
        _parse_count,
        (
            "At most this many of those from one source address (IPv6: from one /64); a peer in "
            "proxy_from counts only toward max_pending. Each process counts its own (workers)."
        ),
        {**_COUNT, "default": 16},
        top=True,
    ),
)

SERVICE_KEYS: dict[str, Key] = {k.name: k for k in KEYS if not k.top}
TOP_KEYS: dict[str, Key] = {k.name: k for k in KEYS if k.top}
