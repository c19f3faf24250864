"""`websocket:`: the key's declaration (placed in service_keys.SERVICE_KEY_LIST), a service's
WebSocket settings as the load parses them, and the bounds on the environment an upgrade request
gives its program, which the parent checks on the front's `H` message.

Pure module: the parent and the load check import it, never wsproto (only the front does,
through websocket.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from pyinetd.config.inputform import _duration_out
from pyinetd.config.keyspec import BOOLEAN, BUFFER_PATTERN, DURATION, Key
from pyinetd.config.parsers import _wrap
from pyinetd.config.units import parse_duration, parse_size
from pyinetd.suggest import unknown_key

__all__ = [
    "CGI_NAMES",
    "MODES",
    "WEBSOCKET_KEY",
    "WebSocketSettings",
    "check_environment",
    "check_service",
    "parse_websocket",
    "refusal",
]

MODES = ("lines", "binary", "frames")
WS_KEYS = (
    "path",
    "mode",
    "origins",
    "same_origin",
    "max_message",
    "max_line",
    "ping_interval",
    "ping_timeout",
    "subprotocols",
)
# Sizes people write ('1M', '64k'); a message or line larger than 1 GiB is a mistake.
MAX_SIZE = 1 << 30


@dataclass(frozen=True)
class WebSocketSettings:
    """A service's ``websocket:`` block; the defaults are the issue's (and the schema's)."""

    path: str | None = None  # None: any path
    mode: str = "lines"
    # None: not given (every origin, with a load warning: cross-site WebSocket hijacking);
    # "any": every origin, on purpose; else the allowed origins, normalised (_origin).
    origins: tuple[str, ...] | Literal["any"] | None = None
    same_origin: bool = False
    max_message: int = 1 << 20
    max_line: int = 64 << 10
    ping_interval: float = 30.0
    ping_timeout: float = 10.0
    subprotocols: tuple[str, ...] = ()

    def allows_origin(self, origin: str | None, host: str | None) -> bool:
        """Whether a request with this Origin header (None: none sent) and Host header may
        upgrade. A request without Origin comes from no browser (every browser sends one on a
        WebSocket request, RFC 6455 4.1 and 10.2), so it cannot be a page's cross-site request;
        it passes."""
        if origin is None or self.origins is None or self.origins == "any":
            return True
        try:
            normal = _origin(origin)
        except ValueError:
            return False
        if normal in self.origins:
            return True
        if self.same_origin and host is not None and normal != "null":
            return normal.partition("://")[2] == _strip_default_port(
                normal.partition("://")[0], host.strip().lower()
            )
        return False


# RFC 7230 3.2.6 token: a subprotocol name (RFC 6455 4.1) and an HTTP header name.
TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_SCHEME = r"[a-z][a-z0-9+.\-]*"
_HOST = r"(?:[a-z0-9\-._~%!$&'()*+,;=]+|\[[0-9a-f:.]+\])"
_ORIGIN = re.compile(rf"({_SCHEME})://({_HOST})(?::(\d{{1,5}}))?")
_PATH = re.compile(r"/[!-~]*")
_DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


def _strip_default_port(scheme: str, hostport: str) -> str:
    port = _DEFAULT_PORTS.get(scheme)
    return hostport[: -len(port) - 1] if port and hostport.endswith(f":{port}") else hostport


def _origin(text: str) -> str:
    """An origin as browsers serialise it (RFC 6454 6.2): scheme://host[:port], lower case,
    a default port left out; 'null' as it is. ValueError otherwise."""
    lowered = text.strip().lower()
    if lowered == "null":
        return "null"
    m = _ORIGIN.fullmatch(lowered)
    if m is None or (m.group(3) is not None and not 0 < int(m.group(3)) < 65536):
        raise ValueError(f"{text!r}: expected an origin such as 'https://app.example.com'")
    scheme, host, port = m.groups()
    return f"{scheme}://{_strip_default_port(scheme, f'{host}:{port}' if port else host)}"


def _size(key: str, value: Any) -> int:
    try:
        n = parse_size(value) if not isinstance(value, str) or value.strip() else -1
    except ValueError:
        n = -1
    if not 1 <= n <= MAX_SIZE:
        raise ValueError(f"{key}: {value!r}: expected a size from 1 to 1G such as 65536 or '1M'")
    return n


def _duration(key: str, value: Any) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None


def _words(key: str, value: Any, what: str) -> list[str]:
    items = value if isinstance(value, list) else None
    if not items or not all(isinstance(i, str) and i for i in items):
        raise ValueError(f"{key}: {value!r}: expected a list of {what}")
    return items


def parse_websocket(value: Any, _base: Any = None) -> WebSocketSettings:
    """A ``websocket:`` mapping -> WebSocketSettings; ValueError with one line naming the
    sub-key otherwise (config.py prefixes the file, line and service)."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ValueError(f"{value!r}: expected a mapping such as {{path: /chat, mode: lines}}")
    for k in value:
        if k not in WS_KEYS:
            raise ValueError(f"{k}: {unknown_key(str(k), list(WS_KEYS))}")
    out: dict[str, Any] = {}
    if "path" in value:
        path = value["path"]
        if not isinstance(path, str) or not _PATH.fullmatch(path) or "?" in path or "#" in path:
            raise ValueError(
                f"path: {path!r}: expected a URL path such as /chat (printable ASCII, no ? or #)"
            )
        if len(path) > 1024:
            raise ValueError(f"path: {path[:40]!r}...: longer than 1024 characters")
        out["path"] = path
    if "mode" in value:
        if value["mode"] not in MODES:
            raise ValueError(f"mode: {value['mode']!r}: expected one of {', '.join(MODES)}")
        out["mode"] = value["mode"]
    if "origins" in value:
        origins = value["origins"]
        if isinstance(origins, str) and origins.strip().lower() == "any":
            out["origins"] = "any"
        else:
            if isinstance(origins, str):
                origins = [origins]
            items = _words("origins", origins, "origins such as https://app.example.com, or any")
            try:
                out["origins"] = tuple(dict.fromkeys(_origin(o) for o in items))
            except ValueError as exc:
                raise ValueError(f"origins: {exc}") from None
    if "same_origin" in value:
        if not isinstance(value["same_origin"], bool):
            raise ValueError(f"same_origin: {value['same_origin']!r}: expected true or false")
        out["same_origin"] = value["same_origin"]
    for key in ("max_message", "max_line"):
        if key in value:
            out[key] = _size(key, value[key])
    for key in ("ping_interval", "ping_timeout"):
        if key in value:
            out[key] = _duration(key, value[key])
    if out.get("ping_timeout", 10.0) <= 0:
        raise ValueError(
            f"ping_timeout: {value.get('ping_timeout')!r}: expected a duration > 0 such as 10, "
            "'10s' or '500ms'"
        )
    if "subprotocols" in value:
        items = _words("subprotocols", value["subprotocols"], "subprotocol names")
        bad = [s for s in items if not TOKEN.fullmatch(s) or len(s) > 128]
        if bad:
            raise ValueError(
                f"subprotocols: {bad[0]!r}: expected a subprotocol name (a token) such as chat.v1"
            )
        out["subprotocols"] = tuple(dict.fromkeys(items))
    return WebSocketSettings(**out)


def check_service(
    body: Mapping[str, Any], values: dict[str, Any], protocol: str, where: str
) -> tuple[list[str], list[str]]:
    """(errors, warnings) of a service's `websocket:` (config.py's ``values``, ``body`` what its
    own mapping says): it needs a program of its own per connection on TCP, not a built-in, a
    redirect or wait mode; one from `defaults:` is dropped from a service it does not fit.
    Without `origins`, any web page may open a connection with its visitor's cookies
    (cross-site WebSocket hijacking): loaded, with a warning."""
    ws = values.get("websocket")
    if ws is None:
        return [], []
    builtin = "builtin" in body or ("exec" not in values and "redirect" not in body)
    for what, bad in (
        ("redirect", "redirect" in body),
        ("a built-in", builtin),
        ("wait", bool(values.get("wait"))),
        ("udp", protocol != "tcp"),
    ):
        if bad and "websocket" not in body:
            values.pop("websocket")  # from defaults:, meant for the programs among them
            return [], []
        if bad and what == "udp":
            return [f"{where}.websocket: only for protocol tcp"], []
        if bad:
            return [
                f"{where}.websocket: not with {what} (each connection starts its own program)"
            ], []
    if ws.origins is None and values.get("enabled", True):
        return [], [
            f"{where}.websocket: no origins: any web page may open a connection with its "
            "visitor's cookies and credentials (cross-site WebSocket hijacking); list the "
            "origins allowed, or say origins: any"
        ]
    return [], []


# The HTTP answer to each admission refusal (admission.Refusal's values), as the front gives it
# in place of the upgrade: who may not connect 403 with deny_message; the service
# or the machine full 503, this client over its share 429, with busy_message. Others (a bad
# PROXY header, a full pending pool) are closed without an answer.
REFUSAL_STATUS = {
    "deny": 403,
    "access_times": 403,
    "limit": 503,
    "max_children": 503,
    "max_load": 503,
    "per_source": 429,
    "rate": 429,
}
_DEFAULT_BODIES = {403: "forbidden\n", 503: "busy, try again later\n", 429: "too many requests\n"}


def refusal(reason: str, deny_message: str, busy_message: str) -> dict[str, Any] | None:
    """``C``'s ``refuse`` for an admission refusal of a WebSocket service: {status, reason,
    body}, or None where the refusal gets no HTTP answer."""
    status = REFUSAL_STATUS.get(reason)
    if status is None:
        return None
    body = deny_message if status == 403 else busy_message
    return {"status": status, "reason": reason, "body": (body or _DEFAULT_BODIES[status])[:4096]}


# ---------------------------------------------------------------- the program's environment

# websocketd's CGI variables (RFC 3875 names), so that its scripts run unchanged, and the
# subprotocol chosen (none: unset). REMOTE_ADDR and REMOTE_PORT are also pyinetd's own
# per-connection variables (environ.CONNECTION_KEYS): the parent's values (the PROXY header's
# source where there is one) are the ones the program sees.
CGI_NAMES = frozenset(
    {
        "GATEWAY_INTERFACE",
        "SERVER_SOFTWARE",
        "REMOTE_ADDR",
        "REMOTE_HOST",
        "REMOTE_PORT",
        "SERVER_NAME",
        "SERVER_PORT",
        "SERVER_PROTOCOL",
        "REQUEST_METHOD",
        "REQUEST_URI",
        "PATH_INFO",
        "QUERY_STRING",
        "SCRIPT_NAME",
        "HTTPS",
        "WEBSOCKET_SUBPROTOCOL",
    }
)
# Request headers that never become HTTP_* variables: the handshake's key (a secret of the
# handshake, not the program's), the hop-by-hop headers (RFC 7230 6.1: they describe this
# connection, not the request) and Proxy, whose HTTP_PROXY many HTTP libraries take as their
# proxy setting ("httpoxy", CVE-2016-5385: a client would route the program's own outbound
# requests through a proxy of its choice).
SKIPPED_HEADERS = frozenset(
    {
        "sec-websocket-key",
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy",
    }
)
# The bounds of frontchan's `H` record (8192 bytes, 64 variables, values of 4096 characters):
# the whole environment (SSL_* under TLS included) fits in one record with its framing.
MAX_ENV_NAMES = 64
MAX_ENV_VALUE = 4096  # characters of one value
MAX_ENV_JSON = 7 * 1024  # the whole environment, as the channel's JSON carries it
ENV_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
_PRINTABLE = re.compile(r"[ -~]*")


def header_variable(name: str) -> str | None:
    """The HTTP_* name of a request header (RFC 3875 4.1.18), or None where it never reaches
    the program: a skipped header, or a name with '_', which would share its variable with
    the '-' spelling (a client's X_Forwarded_For would pass as a proxy's X-Forwarded-For)."""
    lowered = name.lower()
    if lowered in SKIPPED_HEADERS or "_" in name or not TOKEN.fullmatch(name):
        return None
    var = "HTTP_" + name.upper().replace("-", "_")
    return var if ENV_NAME.fullmatch(var) else None


def value_problem(value: str) -> str | None:
    """Why a value may not reach the environment (control or non-ASCII characters: a NUL cuts
    it, a newline forges lines in what the program logs; or too long), else None."""
    if len(value) > MAX_ENV_VALUE:
        return f"longer than {MAX_ENV_VALUE} characters"
    if not _PRINTABLE.fullmatch(value):
        return "a control or non-ASCII character"
    return None


def env_size(env: Mapping[str, str]) -> int:
    """The environment's size as the channel carries it (JSON, ASCII only)."""
    return len(json.dumps(env, ensure_ascii=True, separators=(",", ":")))


def check_environment(env: object) -> list[str]:
    """What is wrong with the environment a front sent for a WebSocket connection (empty:
    nothing): names the CGI set, HTTP_* (never HTTP_PROXY) and SSL_* only, values printable
    ASCII within bounds, all of it within MAX_ENV_JSON. The parent distrusts a front whose
    list is not empty."""
    if not isinstance(env, dict):
        return ["not a mapping"]
    problems: list[str] = []
    if len(env) > MAX_ENV_NAMES:
        problems.append(f"{len(env)} variables: at most {MAX_ENV_NAMES}")
    for name, value in env.items():
        if not isinstance(name, str) or not ENV_NAME.fullmatch(name):
            problems.append(f"{str(name)[:64]!r}: not a variable name")
            continue
        if name not in CGI_NAMES and not (
            (name.startswith("HTTP_") and name != "HTTP_PROXY") or name.startswith("SSL_")
        ):
            problems.append(f"{name}: not a WebSocket request's variable")
        if not isinstance(value, str):
            problems.append(f"{name}: not text")
        elif (why := value_problem(value)) is not None:
            problems.append(f"{name}: {why}")
    if not problems and env_size(env) > MAX_ENV_JSON:
        problems.append(f"larger than {MAX_ENV_JSON} bytes")
    return problems


# ---------------------------------------------------------------- the key


def _websocket_out(name: str, value: WebSocketSettings) -> dict[str, Any]:
    """The websocket: mapping, what is at its default left out; sizes and durations as
    numbers (bytes, seconds), origins as a list or any."""
    out: dict[str, Any] = {}
    for f in fields(value):
        v = getattr(value, f.name)
        if v == f.default:
            continue
        if isinstance(v, tuple):
            out[f.name] = list(v)
        elif isinstance(v, float):
            out.update(_duration_out(f.name, v))
        else:
            out[f.name] = v
    return {name: out}


# A size from 1 byte to 1 GiB: a WebSocket message or line.
_SIZE = {
    "type": ["integer", "string"],
    "minimum": 1,
    "maximum": MAX_SIZE,
    "pattern": BUFFER_PATTERN,
    "errorMessage": "expected a size from 1 to 1G such as 65536 or '1M'",
}
_NAMES = {
    "type": "array",
    "minItems": 1,
    "items": {"type": "string", "minLength": 1},
}

WEBSOCKET_KEY = Key(
    "websocket",
    _wrap(parse_websocket),
    (
        "Serve the program over WebSocket (RFC 6455): the service's front reads the HTTP "
        "upgrade request with no process, answers refusals in HTTP, and carries messages "
        "between the client and the program's stdin and stdout. With tls: it is wss://. "
        "Only with exec (not wait, redirect or a built-in). Python programs get "
        "PYTHONUNBUFFERED=1 (stdout buffering would hold their messages back)."
    ),
    {
        "type": ["object", "null"],
        "properties": {
            "path": {
                "description": "The URL path served (default: any); another path gets 404.",
                "type": "string",
                "pattern": "^/[!-~]*$",
                "examples": ["/chat"],
                "errorMessage": "expected a URL path such as /chat",
            },
            "mode": {
                "description": (
                    "lines (default): each text message is a line on stdin, each stdout "
                    "line a text message; binary: stdin and stdout are byte streams, each "
                    "read of stdout (at most 64 KiB) one binary message; frames: each "
                    "message a record 'text N' or 'binary N' (a line) and N bytes, both ways."
                ),
                "enum": list(MODES),
                "default": "lines",
                "errorMessage": f"expected one of {', '.join(MODES)}",
            },
            "origins": {
                "description": (
                    "The page origins a browser may connect from (Origin header, as "
                    "https://app.example.com), or any; others get 403. Without it every "
                    "origin may (a load warning: cross-site WebSocket hijacking)."
                ),
                "anyOf": [
                    {"type": "string", "pattern": "^\\s*[aA][nN][yY]\\s*$"},
                    {**_NAMES, "items": {"type": "string", "minLength": 1}},
                ],
                "examples": [["https://app.example.com"], "any"],
                "errorMessage": (
                    "expected a list of origins such as https://app.example.com, or any"
                ),
            },
            "same_origin": {
                **BOOLEAN,
                "description": ("Also allow an Origin whose host and port are the request's Host."),
                "default": False,
            },
            "max_message": {
                **_SIZE,
                "description": (
                    "The largest message from the client (default 1M); a larger one closes "
                    "with 1009."
                ),
                "default": "1M",
            },
            "max_line": {
                **_SIZE,
                "description": (
                    "lines: the longest stdout line sent as one message (default 64k); a "
                    "longer one is sent in pieces of this size."
                ),
                "default": "64k",
            },
            "ping_interval": {
                **DURATION,
                "description": "Send a ping this often (default 30 seconds); 0: never.",
                "default": 30,
            },
            "ping_timeout": {
                **DURATION,
                "exclusiveMinimum": 0,
                "errorMessage": "expected a duration > 0 such as 10, '10s' or '500ms'",
                "description": (
                    "Close the connection and end the program when a ping is not answered "
                    "within this time (default 10 seconds)."
                ),
                "default": 10,
            },
            "subprotocols": {
                **_NAMES,
                "description": (
                    "Subprotocols offered, in order of preference; the one chosen is in "
                    "WEBSOCKET_SUBPROTOCOL."
                ),
                "items": {
                    "type": "string",
                    "pattern": "^[!#$%&'*+.^_`|~0-9A-Za-z-]+$",
                    "errorMessage": "expected a subprotocol name (a token) such as chat.v1",
                },
                "examples": [["chat.v1"]],
                "errorMessage": "expected a list of subprotocol names",
            },
        },
        "additionalProperties": False,
        "examples": [{"path": "/chat", "origins": ["https://app.example.com"]}],
        "errorMessage": "expected a mapping such as {path: /chat, mode: lines}",
    },
    out=_websocket_out,
)
