"""Every configuration key, declared once: name, parser, description, JSON Schema, input form.

The service keys are declared in service_keys.py, the top-level keys here. The rest follows from
these tables: config.py's validation (the parsers), ``schema.json`` (generated
from it: ``python -m pyinetd.config.schema > src/pyinetd/schema.json``; tests/test_schema.py
checks the
shipped file is current), the pyinetd.yaml(5) man page (scripts/gen_manpage.py), the defaults of
config's Service and Config fields (each key's schema "default", parsed: ``declared``),
``--print-config`` (each key's ``out``, written by writer.py) and the order in which ``pyinetd
convert`` writes a service's keys (the order of the table). Pure module: no sockets, no processes.
"""

from __future__ import annotations

from typing import Any

from pyinetd.config.inputform import _duration_out
from pyinetd.config.keyspec import BOOLEAN, COUNT, DURATION, FILE_PATH, Key
from pyinetd.config.parsers import (
    _parse_bool,
    _parse_choice,
    _parse_count,
    _parse_endpoint,
    _parse_endpoints,
    _parse_includes,
    _parse_path,
    _parse_workers,
    _wrap,
)
from pyinetd.config.service_keys import SERVICE_KEY_LIST
from pyinetd.config.units import (
    parse_duration,
)

__all__ = ["KEYS", "SERVICE_KEYS", "TOP_KEYS", "Key", "declared"]

# The top-level keys (besides `defaults:` and `services:`).
TOP_KEY_LIST: tuple[Key, ...] = (
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
        COUNT,
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
        FILE_PATH,
        top=True,
    ),
    Key(
        "pid_file",
        _parse_path,
        "Write pyinetd's pid to this file while it runs.",
        FILE_PATH,
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
        {**DURATION, "default": 30},
        top=True,
        out=_duration_out,
    ),
    Key(
        "reload_kills_removed",
        _parse_bool,
        "On reload, stop the processes of services that were removed (default: let them finish).",
        {**BOOLEAN, "default": False},
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
        "agent",
        _parse_endpoints,
        (
            "Answer HAProxy's agent-check on these TCP addresses (HOST:PORT, [IPV6]:PORT, PORT, "
            "or a list of them): HAProxy connects, sends a service's name and a newline "
            '(agent-send "NAME\\n") and reads one line: up ready maxconn:N (N: the '
            "service's max_connections), drain (pyinetd drain, or a stop with shutdown: drain), "
            "maint (enabled: false) or down#why (failed at load, not listening, its zygote "
            "failed). Read at start."
        ),
        {
            "type": ["string", "integer", "array"],
            "minLength": 1,
            "minimum": 1,
            "maximum": 65535,
            "items": {
                "type": ["string", "integer"],
                "minLength": 1,
                "minimum": 1,
                "maximum": 65535,
                "errorMessage": "expected HOST:PORT, [IPV6]:PORT or PORT (port 1-65535)",
            },
            "examples": ["127.0.0.1:9700"],
            "errorMessage": "expected HOST:PORT, [IPV6]:PORT or PORT (port 1-65535), or a list",
        },
        top=True,
    ),
    Key(
        "agent_drain_time",
        _wrap(parse_duration),
        (
            "With agent: and shutdown: drain, how long a stop (SIGTERM, pyinetd stop) answers "
            "drain to the agent and still accepts before it closes the listening sockets, so "
            "that the balancer moves away before a connection is refused (default 3 seconds: "
            "HAProxy's default agent-inter of 2 seconds and a margin; set it above your "
            "agent-inter). Without agent: or with shutdown: leave the listeners close at once."
        ),
        {**DURATION, "default": 3},
        top=True,
        out=_duration_out,
    ),
    Key(
        "max_pending",
        _parse_count,
        (
            "At most this many connections at once per service waiting for a PROXY protocol "
            "header or a TLS ClientHello (an fd each, no process yet), or for their relay to "
            "complete the TLS handshake (a relay each); a new one then evicts the service's "
            "oldest connection still waiting for its first bytes, else its oldest handshake "
            "(its relay killed)."
        ),
        {**COUNT, "default": 256},
        top=True,
    ),
    Key(
        "max_pending_per_source",
        _parse_count,
        (
            "At most this many of those per service from one source address (IPv6: from one "
            "/64); more are refused. A peer in proxy_from counts only toward max_pending. Each "
            "process counts its own (workers)."
        ),
        {**COUNT, "default": 16},
        top=True,
    ),
)

# Service keys first, in the order `pyinetd convert` writes them; then the top-level keys.
KEYS: tuple[Key, ...] = (*SERVICE_KEY_LIST, *TOP_KEY_LIST)
SERVICE_KEYS: dict[str, Key] = {k.name: k for k in SERVICE_KEY_LIST}
TOP_KEYS: dict[str, Key] = {k.name: k for k in TOP_KEY_LIST}


def declared(name: str) -> Any:
    """A key's declared default as its parser stores it: the default of the Service or Config
    field the key fills (config.py), so that the declaration is the one place it is written."""
    return (SERVICE_KEYS.get(name) or TOP_KEYS[name]).stored_default()
