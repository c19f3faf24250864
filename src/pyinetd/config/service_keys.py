"""The keys of a service (also allowed in `defaults:`), declared once each: name, parser,
description, JSON Schema and input form (see keyspec.Key). Their order is the order in which
`pyinetd convert` writes them: what a reader looks for first (where, what runs, as whom) on top.
Pure module.
"""

from __future__ import annotations

from pyinetd.config.inputform import (
    _access_out,
    _access_times_out,
    _argv_out,
    _banner_out,
    _duration_out,
    _group_out,
    _listen_out,
    _name_out,
    _number_out,
    _octal_out,
    _rate_out,
    _stderr_rate_out,
    _tls_out,
)
from pyinetd.config.keyspec import (
    ADDRESSES,
    BOOLEAN,
    BUFFER_PATTERN,
    BYTE_RATE_PATTERN,
    COUNT,
    DURATION,
    FILE_PATH,
    RATE_PATTERN,
    TEXT,
    Key,
    parse_listen_raw,
)
from pyinetd.config.parsers import (
    BUILTINS,
    _parse_access_times,
    _parse_addr_list,
    _parse_argv0,
    _parse_banner_file,
    _parse_banner_text,
    _parse_bool,
    _parse_buffer,
    _parse_builtin,
    _parse_choice,
    _parse_count,
    _parse_count_or_zero,
    _parse_dir,
    _parse_exec,
    _parse_group,
    _parse_interface,
    _parse_load,
    _parse_prefix,
    _parse_preload,
    _parse_protocol,
    _parse_proxy_from,
    _parse_redirect,
    _parse_socket_mode,
    _parse_stderr,
    _parse_stderr_rate,
    _parse_text,
    _parse_tls,
    _parse_user,
    _parse_workers,
    _wrap,
)
from pyinetd.config.process_keys import PROCESS_KEY_LIST
from pyinetd.config.units import (
    parse_duration,
    parse_rate,
)
from pyinetd.config.wsconf import WEBSOCKET_KEY

__all__ = ["BUILTIN_STREAM_DEFAULTS", "SERVICE_KEY_LIST", "UDP_RATE"]

# The rate of a UDP service (built-in or nowait) that sets none: a loop through a reflector
# pyinetd cannot recognise (another host's or instance's echo on an unprivileged port) ends at
# the first datagram over it, and chargen's 10-19 x amplification is bounded by it (without
# it, 16,700 datagrams/s until one side was killed; `rate: 100/s` ended it after 101:
# test_a_loop_through_a_foreign_echo_decays_by_the_default_udp_rate). The order of xinetd's
# default `cps = 50 10`, which also covers UDP.
UDP_RATE = "100/s"

# The limits a TCP built-in (echo, discard, chargen, daytime, time) gets when neither it nor
# `defaults:` sets them (per_source only when max_connections is not set either). Built-in
# sessions run in the parent with an fd each: without a bound, one client's idle echo
# connections held every fd of the parent, `status` and every other service failed
# (test_one_clients_idle_echo_sessions_leave_status_and_other_services_working). per_source 10
# is xinetd's usual `defaults` (Red Hat's and Debian's xinetd.conf); 300 seconds is longer than
# any echo/chargen test needs.
BUILTIN_STREAM_DEFAULTS: dict[str, int | float] = {"per_source": 10, "timeout": 300.0}

_BUFFER = {
    "type": ["integer", "string"],
    "minimum": 1,
    "maximum": 2**31 - 1,
    "pattern": BUFFER_PATTERN,
    "examples": [65536, "256k"],
    "errorMessage": "expected a size in bytes such as 65536 or '256k'",
}

SERVICE_KEY_LIST: tuple[Key, ...] = (
    Key(
        "listen",
        parse_listen_raw,
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
        {**BOOLEAN, "default": False},
    ),
    Key(
        "enabled",
        _parse_bool,
        "false keeps the service in the file but does not listen; its values are checked "
        "for their types only (its program, users, folders, files and TLS files need not "
        "exist, its port may be another service's).",
        {**BOOLEAN, "default": True},
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
        COUNT,
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
        (
            "At most this many connections at once from one client address (TCP built-ins: "
            f"{BUILTIN_STREAM_DEFAULTS['per_source']} unless set, or max_connections is)."
        ),
        COUNT,
    ),
    Key(
        "rate",
        _wrap(parse_rate),
        (
            "At most this many new connections per second (a number), or per unit: '50/s', "
            "'600/min', '100/h'. Beyond it the service pauses for rate_pause seconds. A UDP "
            f"service (built-in or nowait; a datagram counts as a connection) has {UDP_RATE} "
            "unless it sets one: a datagram loop through another host's or program's reflector "
            "then ends."
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
        {**DURATION, "default": 10},
        out=_duration_out,
    ),
    Key(
        "allow",
        _parse_addr_list,
        (
            "Only these client addresses or networks may connect (also all/any). The most "
            "specific entry of allow and deny decides."
        ),
        ADDRESSES,
        field="access",
        out=_access_out,
    ),
    Key(
        "deny",
        _parse_addr_list,
        "These client addresses or networks may not connect.",
        ADDRESSES,
        field=None,
    ),
    *PROCESS_KEY_LIST,
    Key(
        "warm",
        _parse_bool,
        (
            "true: serve this Python script (a #! python script, or exec: [python3, script.py, "
            "...]) from a warm interpreter that has imported what the script imports: each "
            "connection's process is forked from it instead of starting a new interpreter. Not "
            "for other programs."
        ),
        {**BOOLEAN, "default": False},
    ),
    Key(
        "preload",
        _parse_preload,
        (
            "With warm: modules to import in the warm interpreter besides the script's own "
            "top-level imports; one that fails to import makes the service run cold."
        ),
        {
            "type": "array",
            "items": {
                "type": "string",
                "pattern": r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$",
                "errorMessage": "expected a module name",
            },
            "errorMessage": "expected a list of module names",
        },
    ),
    Key(
        "warm_max_forks",
        _parse_count_or_zero,
        (
            "With warm: replace the zygote after it has forked this many connections' "
            "processes, which share its address space layout, stack canary and hash seed (one "
            "leaked address or a canary guessed across connections holds for every later one "
            "until then); its successor starts while it serves on, and takes over once ready, "
            "with no gap in service. 0 (default): never."
        ),
        {
            "type": "integer",
            "minimum": 0,
            "errorMessage": "expected a whole number >= 0",
            "default": 0,
        },
    ),
    Key(
        "banner",
        _parse_banner_file,
        (
            "A file whose contents are sent to each client before the program starts (at most 64 "
            "KiB; relative to the configuration file's folder)."
        ),
        FILE_PATH,
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
            "default": {"lines": "100/s", "bytes": "64k/s"},
            "examples": [{"lines": "100/s", "bytes": "64k/s"}],
            "errorMessage": "expected a mapping such as {lines: 100/s, bytes: 64k/s}",
        },
        out=_stderr_rate_out,
    ),
    Key(
        "busy_message",
        _parse_text,
        "Sent to a connection rejected by on_limit: reject (a line end is added if missing).",
        TEXT,
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
        COUNT,
        field=None,
    ),
    Key(
        "deny_message",
        _parse_text,
        "Sent to a denied client before closing (a line end is added if missing).",
        TEXT,
    ),
    Key(
        "timeout",
        _wrap(parse_duration),
        (
            "Stop the service's process after this long (seconds, or '30s', '5m'); 0: never. "
            f"TCP built-ins: a session ends after {BUILTIN_STREAM_DEFAULTS['timeout']:g} "
            "seconds unless set."
        ),
        DURATION,
        out=_duration_out,
    ),
    Key(
        "env_clear",
        _parse_bool,
        (
            "true: start the program with only the variables of env (and those pyinetd sets), not"
            " pyinetd's own environment."
        ),
        {**BOOLEAN, "default": False},
    ),
    Key(
        "no_new_privs",
        _parse_bool,
        (
            "true: the program (and all it execs) cannot gain privileges through setuid binaries "
            "or file capabilities (prctl PR_SET_NO_NEW_PRIVS). Default: true for services with "
            "user, false otherwise."
        ),
        BOOLEAN,
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
        TEXT,
        field=None,
    ),
    Key(
        "tls",
        _parse_tls,
        "Terminate TLS on the connection before it reaches the service.",
        {
            "type": "object",
            "properties": {
                "cert": {**FILE_PATH, "description": "Certificate chain file (PEM)."},
                "key": {**FILE_PATH, "description": "Private key file (PEM)."},
                "client_ca": {
                    **FILE_PATH,
                    "description": "Require client certificates signed by these CAs (PEM file).",
                },
                "min_version": {
                    "description": "Lowest TLS version accepted: '1.2' (default) or '1.3'.",
                    "type": ["string", "number"],
                    "enum": ["1.2", "1.3", 1.2, 1.3],
                    "errorMessage": "expected '1.2' or '1.3'",
                },
                "handshake_timeout": {
                    **DURATION,
                    "description": (
                        "Close a connection whose TLS handshake, counted from its arrival, takes "
                        "longer (default 10 seconds)."
                    ),
                    "default": 10,
                },
                "hello_timeout": {
                    **DURATION,
                    "description": (
                        "Close a connection that has not sent its whole TLS ClientHello within "
                        "this time (default 3 seconds: one packet, with a retransmission)."
                    ),
                    "default": 3,
                },
            },
            "required": ["cert", "key"],
            "additionalProperties": False,
            "examples": [{"cert": "tls/server.pem", "key": "tls/server.key"}],
            "errorMessage": "expected a mapping with cert and key",
        },
        out=_tls_out,
    ),
    WEBSOCKET_KEY,
    Key(
        "fronts",
        _parse_workers,  # (the same bound: 1 to 64 processes)
        (
            "tls or redirect: the front processes that carry the service's connections (the "
            "handshakes, the relay, redirect's outbound connections), started with the service; "
            "new connections are spread over them in turn."
        ),
        {
            **COUNT,
            "default": 1,
            "maximum": 64,
            "examples": [2],
            "errorMessage": "expected a whole number from 1 to 64",
        },
    ),
    Key(
        "front_user",
        _parse_user,
        (
            "tls or redirect: the user the service's fronts run as. It must be none of the "
            "programs' users (they could then signal or trace their front). Default: a uid "
            "no one uses, picked from 61184-65519 as systemd's DynamicUser."
        ),
        {
            "type": ["string", "integer"],
            "minLength": 1,
            "minimum": 1,
            "examples": ["pyinetd-front"],
            "errorMessage": "expected a user name or number",
        },
        out=_name_out,
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
        ADDRESSES,
    ),
    Key(
        "proxy_timeout",
        _wrap(parse_duration),
        (
            "Close a connection that has not sent its PROXY header within this time (default 3: "
            "one packet, with a retransmission)."
        ),
        {**DURATION, "default": 3},
        out=_duration_out,
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
        "interface",
        _parse_interface,
        (
            "Accept only what arrives on this network interface (SO_BINDTODEVICE), whatever the "
            "listen address; xinetd's bind = lo. tcp and udp."
        ),
        {
            "type": "string",
            "minLength": 1,
            "maxLength": 15,
            "examples": ["lo", "eth0"],
            "errorMessage": "expected a network interface name such as lo or eth0",
        },
    ),
    Key(
        "access_times",
        _parse_access_times,
        (
            "Serve only in these times of day (local time), as xinetd's access_times: "
            "'08:00-12:00 13:00-17:00' (both ends included); outside them a connection is "
            "refused."
        ),
        {
            "type": ["string", "array"],
            "minLength": 1,
            "items": {"type": "string", "errorMessage": "expected HH:MM-HH:MM"},
            "examples": ["08:00-12:00 13:00-17:00"],
            "errorMessage": "expected time ranges such as '08:00-12:00 13:00-17:00'",
        },
        out=_access_times_out,
    ),
    Key(
        "max_load",
        _parse_load,
        "Refuse connections while the 1-minute load average is above this (xinetd's max_load).",
        {
            "type": "number",
            "exclusiveMinimum": 0,
            "examples": [4],
            "errorMessage": "expected a load average such as 4 or 2.5",
        },
        out=_number_out,
    ),
    Key(
        "keepalive",
        _parse_bool,
        "TCP keepalive probes on each connection (SO_KEEPALIVE; xinetd's flags = KEEPALIVE).",
        {**BOOLEAN, "default": False},
    ),
    Key(
        "nodelay",
        _parse_bool,
        (
            "Send small writes at once (TCP_NODELAY, no Nagle delay; xinetd's flags = NODELAY). "
            "Default: true for a tls or redirect service (its front's client socket and "
            "redirect's outbound one), false otherwise."
        ),
        {**BOOLEAN, "default": False},
    ),
    Key(
        "send_buffer",
        _parse_buffer,
        "The socket's send buffer size in bytes (SO_SNDBUF; xinetd's sndbuf, inetd's sndbuf=).",
        _BUFFER,
    ),
    Key(
        "receive_buffer",
        _parse_buffer,
        "The socket's receive buffer in bytes (SO_RCVBUF; xinetd's rcvbuf, inetd's rcvbuf=).",
        _BUFFER,
    ),
)
