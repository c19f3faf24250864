"""A WebSocket connection between a client and a program, sans-IO: the front's loop feeds it
what it read (``receive_client``, ``receive_program``, the ends and the program's exit) and
the time (``tick``), and writes what it hands out (``to_client``, ``to_program``).

The upgrade request is read and checked here (RFC 6455 4.2.1; bounded in size and header
count; the front enforces its deadline through ``tick``), its answer written here (101, or a
refusal in HTTP), and the frames after it are wsproto's (RFC 6455 5: masking, fragmentation,
control frames, UTF-8 of text, close codes), driven without its HTTP layer. wsproto was chosen
over websockets' ServerProtocol on what the issue measured: Autobahn 1-7 and 10 all OK with 0
NON-STRICT (websockets' failed 7.1.5, 9 NON-STRICT), ~5 KB per connection.

Imported by the front only: the parent and the load check use wsconf.py.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import re
import struct
from dataclasses import dataclass, field, replace

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsproto.frame_protocol import CloseReason

from pyinetd import __version__
from pyinetd.config.wsconf import (
    MAX_ENV_JSON,
    MAX_ENV_NAMES,
    WebSocketSettings,
    env_size,
    header_variable,
    value_problem,
)

__all__ = ["Phase", "Session", "Upgrade"]

# Bounds on the upgrade request: its head (request line and headers) and header lines. A
# browser's is ~0.5-2 KiB with 10-20 headers; h11 bounds a head at 16 KiB too.
MAX_HEAD = 16 * 1024
MAX_HEADERS = 64
# What the session holds for the program or the client before the front stops reading the
# other side (backpressure), and the largest binary message one read of stdout makes.
HIGH_WATER = 256 * 1024
READ_SIZE = 64 * 1024
# After the program's exit, how long its stdout may still bring data before the Close; after
# a Close sent, how long the client's Close is awaited (RFC 6455 7.1.1: then the TCP close).
EXIT_FLUSH = 2.0
CLOSE_WAIT = 5.0
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 1.3
_REQUEST_LINE = re.compile(rb"([A-Z]{1,16}) ([!-~]+) HTTP/(\d)\.(\d)")
_HEADER = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\r\n]*?)[ \t]*")
_RECORD = re.compile(rb"(text|binary) (0|[1-9][0-9]{0,9})\n")
_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    414: "URI Too Long",
    426: "Upgrade Required",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class Phase(enum.Enum):
    REQUEST = "request"  # reading the upgrade request
    UPGRADE = "upgrade"  # a good request (``upgrade``): waiting for accept() or refuse()
    OPEN = "open"
    CLOSING = "closing"  # a Close sent, waiting for the client's, or the client's being sent
    CLOSED = "closed"  # over: the front sends what to_client() still has, then closes


@dataclass(frozen=True)
class Upgrade:
    """The facts of a good upgrade request."""

    target: str  # the request target as sent (REQUEST_URI)
    path: str
    query: str
    host: str
    headers: tuple[tuple[str, str], ...]  # (name as sent, value), in order
    key: bytes
    subprotocol: str | None  # chosen: the first of ours the client offered
    version: str = "HTTP/1.1"


@dataclass
class _Http:
    """An HTTP answer to a request that is not upgraded."""

    status: int
    body: str
    headers: list[tuple[str, str]] = field(default_factory=list)


def _answer(status: int, body: str, headers: list[tuple[str, str]] | None = None) -> bytes:
    payload = body.encode("utf-8", "replace")
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(payload)}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in headers or ()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


def _tokens(value: str) -> list[str]:
    return [t.strip().lower() for t in value.split(",") if t.strip()]


def parse_request(head: bytes, settings: WebSocketSettings) -> Upgrade | _Http:
    """An upgrade request's head (without its blank line) -> its facts, or the HTTP answer
    it gets instead: 400 malformed, 405 not GET, 426 not a WebSocket request (with Upgrade:
    websocket) or another version than 13 (RFC 6455 4.4), 414 a target too long for the
    environment, 404 another path, 403 an Origin not allowed."""
    lines = head.split(b"\r\n")
    m = _REQUEST_LINE.fullmatch(lines[0])
    if m is None:
        return _Http(400, "malformed request line\n")
    method, target_b, major, minor = m.groups()
    if len(lines) - 1 > MAX_HEADERS:
        return _Http(431, f"more than {MAX_HEADERS} header lines\n")
    headers: list[tuple[str, str]] = []
    fields: dict[str, list[str]] = {}
    for line in lines[1:]:
        h = _HEADER.fullmatch(line)
        if h is None:  # obs-fold, a bare CR, a name with a space: RFC 7230 3.2.4
            return _Http(400, "malformed header line\n")
        name, value = h.group(1).decode("ascii"), h.group(2).decode("latin-1")
        headers.append((name, value))
        fields.setdefault(name.lower(), []).append(value)
    if method != b"GET":
        return _Http(405, "only GET upgrades to a WebSocket\n", [("Allow", "GET")])
    if (int(major), int(minor)) < (1, 1):
        return _Http(400, "HTTP/1.1 or later is needed to upgrade\n")
    upgrade = [t for v in fields.get("upgrade", ()) for t in _tokens(v)]
    connection = [t for v in fields.get("connection", ()) for t in _tokens(v)]
    if "websocket" not in upgrade or "upgrade" not in connection:
        return _Http(
            426,
            "this service speaks WebSocket only\n",
            [("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")],
        )
    if fields.get("sec-websocket-version") != ["13"]:
        return _Http(426, "WebSocket version 13 only\n", [("Sec-WebSocket-Version", "13")])
    keys, hosts = fields.get("sec-websocket-key", []), fields.get("host", [])
    try:
        key = keys[0].encode("ascii")
        good_key = len(keys) == 1 and len(base64.b64decode(key, validate=True)) == 16
    except (IndexError, UnicodeEncodeError, binascii.Error):
        good_key = False
    if not good_key or len(hosts) != 1 or not hosts[0]:
        return _Http(400, "a WebSocket request needs one Host and one Sec-WebSocket-Key\n")
    target = target_b.decode("ascii")
    if len(target) > 4096:
        return _Http(414, "request target too long\n")
    path, _, query = target.partition("?")
    if settings.path is not None and path != settings.path:
        return _Http(404, "no WebSocket service at this path\n")
    origins = fields.get("origin")
    if origins is not None and (
        len(origins) != 1 or not settings.allows_origin(origins[0], hosts[0])
    ):
        return _Http(403, "origin not allowed\n")
    offered = [t for v in fields.get("sec-websocket-protocol", ()) for t in _tokens(v)]
    chosen = next((p for p in settings.subprotocols if p.lower() in offered), None)
    return Upgrade(
        target=target,
        path=path,
        query=query,
        host=hosts[0],
        headers=tuple(headers),
        key=key,
        subprotocol=chosen,
        version=f"HTTP/{major.decode()}.{minor.decode()}",
    )


def environment(
    req: Upgrade,
    *,
    peer: tuple[str, int],
    local: tuple[str, int] | None,
    tls: bool,
    path: str | None,
    dropped: list[str],
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """websocketd's CGI variables for ``req`` (RFC 3875 names), then HTTP_* for its headers
    (several of one name joined by ', '). A header whose value has a control or non-ASCII
    character or is too long, or that would take the environment past its bounds, is left
    out: its name goes to ``dropped``, for the log. ``extra`` (the TLS front's SSL_*) comes
    first and counts toward the bounds."""
    host = req.host
    name, port = host, ""
    if host.startswith("["):
        end = host.find("]")
        name, port = host[: end + 1], host[end + 2 :] if host[end + 1 : end + 2] == ":" else ""
    elif ":" in host:
        name, _, port = host.rpartition(":")
    if not port.isdigit():
        port = str(local[1]) if local else ("443" if tls else "80")
    env = {
        **(extra or {}),
        "GATEWAY_INTERFACE": "websocketd-CGI/0.1",
        "SERVER_SOFTWARE": f"pyinetd/{__version__}",
        "REMOTE_ADDR": peer[0],
        "REMOTE_HOST": peer[0],  # no reverse lookup: it would stall the front's loop
        "REMOTE_PORT": str(peer[1]),
        "SERVER_NAME": name,
        "SERVER_PORT": port,
        "SERVER_PROTOCOL": req.version,
        "REQUEST_METHOD": "GET",
        "REQUEST_URI": req.target,
        "SCRIPT_NAME": path or "",
        "PATH_INFO": "" if path else req.path,
        "QUERY_STRING": req.query,
    }
    if tls:
        env["HTTPS"] = "on"
    if req.subprotocol:
        env["WEBSOCKET_SUBPROTOCOL"] = req.subprotocol
    for k in [k for k, v in env.items() if value_problem(v)]:
        dropped.append(k)  # a Host with a control character: SERVER_NAME
        del env[k]
    joined: dict[str, list[str]] = {}
    for hname, value in req.headers:
        var = header_variable(hname)
        if var is not None:
            joined.setdefault(var, []).append(value)
    size = env_size(env)
    for var, values in joined.items():
        value = ", ".join(values)
        cost = len(var) + len(value) * 2 + 6  # JSON quotes, colon, comma, escapes at worst
        if value_problem(value) or len(env) >= MAX_ENV_NAMES or size + cost > MAX_ENV_JSON:
            dropped.append(var)
            continue
        env[var] = value
        size += cost
    return env


class BadRecord(ValueError):
    """frames: the program wrote something that is not a record (or one over max_message)."""


class StdoutReader:
    """The program's stdout -> the messages it makes, by mode (the issue's rules):
    lines: each line (\\n or \\r\\n trimmed) one message, text where it is UTF-8 and binary
    where not, a line over max_line in pieces of max_line (cut on a character's end where
    one is near), a last line without its newline sent at the end; binary: each read one
    message (at most READ_SIZE); frames: each record 'text N' / 'binary N' (a line) and its N
    bytes one message, N at most max_message, text records UTF-8 (else BadRecord). What it
    holds is bounded: max_line plus one read, or one record."""

    def __init__(self, settings: WebSocketSettings) -> None:
        self.mode, self.max_line, self.max_record = (
            settings.mode,
            settings.max_line,
            settings.max_message,
        )
        self._buf = bytearray()
        self._record: tuple[bool, int] | None = None  # frames: (text, length) being read

    def feed(self, data: bytes) -> list[str | bytes]:
        if self.mode == "binary":
            return [data[i : i + READ_SIZE] for i in range(0, len(data), READ_SIZE)]
        self._buf += data
        return self._lines(final=False) if self.mode == "lines" else self._records()

    def end(self) -> list[str | bytes]:
        if self.mode == "lines":
            return self._lines(final=True)
        if self._buf or self._record is not None:
            raise BadRecord("stdout ended inside a record")
        return []

    def _lines(self, final: bool) -> list[str | bytes]:
        buf, limit = self._buf, self.max_line
        out: list[str | bytes] = []
        while buf:
            nl = buf.find(b"\n", 0, limit + 1)
            if nl >= 0:
                line = bytes(buf[:nl])
                del buf[: nl + 1]
                out.append(_line_message(line[:-1] if line.endswith(b"\r") else line))
            elif len(buf) > limit or final:
                n = min(limit, len(buf))
                # UTF-8 continuation bytes are 10xxxxxx: back up to a character's start.
                cut = n
                while cut > 0 and n - cut < 3 and cut < len(buf) and buf[cut] & 0xC0 == 0x80:
                    cut -= 1
                n = cut or n
                piece = bytes(buf[:n])
                del buf[:n]
                out.append(_line_message(piece[:-1] if final and piece.endswith(b"\r") else piece))
            else:
                break
        return out

    def _records(self) -> list[str | bytes]:
        buf = self._buf
        out: list[str | bytes] = []
        while True:
            if self._record is None:
                nl = buf.find(b"\n", 0, 20)
                if nl < 0:
                    if len(buf) >= 20:
                        raise BadRecord("a record header longer than 19 bytes")
                    return out
                m = _RECORD.fullmatch(bytes(buf[: nl + 1]))
                if m is None:
                    raise BadRecord(f"not a record header: {bytes(buf[:nl])[:40]!r}")
                size = int(m.group(2))
                if size > self.max_record:
                    raise BadRecord(f"a {size}-byte record over max_message")
                del buf[: nl + 1]
                self._record = (m.group(1) == b"text", size)
            text, size = self._record
            if len(buf) < size:
                return out
            payload = bytes(buf[:size])
            del buf[:size]
            self._record = None
            if not text:
                out.append(payload)
                continue
            try:
                out.append(payload.decode("utf-8"))
            except UnicodeDecodeError:
                raise BadRecord("a text record that is not UTF-8") from None


def _line_message(line: bytes) -> str | bytes:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        return line  # not UTF-8: a binary message, not a broken text


class Session:
    """One client's WebSocket connection to one program (see the module's docstring)."""

    def __init__(
        self,
        settings: WebSocketSettings,
        *,
        peer: tuple[str, int],
        local: tuple[str, int] | None = None,
        tls: bool = False,
        now: float,
        deadline: float,
        refuse: tuple[int, str] | None = None,
    ) -> None:
        self.settings = settings
        self.peer, self.local, self.tls = peer, local, tls
        self.phase = Phase.REQUEST
        self.upgrade: Upgrade | None = None
        self.refused: int | None = None  # the HTTP status answered instead of 101
        self.close_code: int | None = None  # the Close code sent (or, for a 1006, seen)
        self.close_reason = ""
        self.end_stdin = False  # the front closes stdin once to_program() is drained
        self.end_program = False  # the connection is over: the program should end
        self._refuse = refuse  # the parent's answer for this request (deny, limits)
        self._deadline: float | None = deadline  # of the request, then of the Close awaited
        self._head = bytearray()
        self._early = bytearray()  # frames the client sent before our 101
        self._client = bytearray()
        self._program = bytearray()
        self._log: list[str] = []
        self._ws: Connection | None = None
        self._msg = bytearray()  # lines, frames: the client's message being received
        self._msg_size = 0
        self._msg_text = False
        self._stdout = StdoutReader(settings)
        self._stdout_done = False
        self._exit: tuple[int | None, int | None] | None = None
        self._exit_at: float | None = None
        self._now = now
        self._ping_at: float | None = None
        self._pong_due: float | None = None
        self._ping_payload = b""
        self._pings = 0

    # ---------------------------------------------------------------- what the front reads

    def to_client(self) -> bytes:
        out, self._client = bytes(self._client), bytearray()
        return out

    def to_program(self) -> bytes:
        out, self._program = bytes(self._program), bytearray()
        return out

    def take_log(self) -> list[str]:
        out, self._log = self._log, []
        return out

    @property
    def wants_client_input(self) -> bool:
        """Whether the front should read the client now (else the other side is behind)."""
        if self.phase is Phase.UPGRADE:
            return len(self._early) < READ_SIZE
        return self.phase is not Phase.CLOSED and len(self._program) < HIGH_WATER

    @property
    def wants_program_output(self) -> bool:
        return len(self._client) < HIGH_WATER

    def next_deadline(self) -> float | None:
        """When ``tick`` has something to do (None: nothing is timed)."""
        times = [t for t in (self._deadline, self._ping_at, self._pong_due) if t is not None]
        if self._exit_at is not None:
            times.append(self._exit_at + EXIT_FLUSH)
        return min(times, default=None)

    def environment(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The program's WebSocket variables (see ``environment``), after ``extra`` (the
        TLS front's SSL_*), within wsconf's bounds; in phase UPGRADE."""
        assert self.upgrade is not None
        dropped: list[str] = []
        env = environment(
            self.upgrade,
            peer=self.peer,
            local=self.local,
            tls=self.tls,
            path=self.settings.path,
            dropped=dropped,
            extra=extra,
        )
        if dropped:
            self._log.append(f"request headers not passed to the program: {', '.join(dropped)}")
        return env

    # ---------------------------------------------------------------- the handshake

    def accept(self) -> None:
        """The program started: answer 101 and relay (phase UPGRADE)."""
        if self.phase is not Phase.UPGRADE:
            return
        assert self.upgrade is not None
        digest = hashlib.sha1(self.upgrade.key + GUID).digest()
        lines = [
            "HTTP/1.1 101 Switching Protocols",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Accept: {base64.b64encode(digest).decode('ascii')}",
        ]
        if self.upgrade.subprotocol:
            lines.append(f"Sec-WebSocket-Protocol: {self.upgrade.subprotocol}")
        self._client += ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
        self.phase = Phase.OPEN
        self._deadline = None
        # The headers served the environment (H): an idle connection keeps none of them.
        self.upgrade = replace(self.upgrade, headers=(), key=b"")
        self._ws = Connection(ConnectionType.SERVER)
        if self.settings.ping_interval > 0:
            self._ping_at = self._now + self.settings.ping_interval
        early, self._early = bytes(self._early), bytearray()
        if early:
            self._feed(early)

    def refuse(self, status: int, body: str) -> None:
        """Answer ``status`` with ``body`` instead of upgrading (before 101), and end."""
        if self.phase in (Phase.REQUEST, Phase.UPGRADE):
            self._client += _answer(status, body)
            self.refused = status
            self._closed()

    def receive_client(self, data: bytes) -> None:
        if self.phase is Phase.REQUEST:
            self._head += data
            self._read_head()
        elif self.phase is Phase.UPGRADE:
            self._early += data
        elif self.phase in (Phase.OPEN, Phase.CLOSING) and self._ws is not None:
            for i in range(0, len(data), READ_SIZE):
                if not self._feed(data[i : i + READ_SIZE]):
                    return  # bytes after the closing handshake: dropped (wsproto refuses them)

    def _read_head(self) -> None:
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_HEAD:
                self._refuse_with(_Http(431, "request head too large\n"))
            return
        head, rest = bytes(self._head[:end]), bytes(self._head[end + 4 :])
        self._head = bytearray()
        if end > MAX_HEAD:
            self._refuse_with(_Http(431, "request head too large\n"))
            return
        if self._refuse is not None:
            self.refuse(*self._refuse)
            return
        found = parse_request(head, self.settings)
        if isinstance(found, _Http):
            self._refuse_with(found)
            return
        self.upgrade = found
        self.phase = Phase.UPGRADE
        self._deadline = None  # the program's start is the parent's to time (its K)
        self._early += rest

    def _refuse_with(self, answer: _Http) -> None:
        if self._refuse is not None:  # the parent's refusal stands whatever was sent
            self.refuse(*self._refuse)
            return
        self._client += _answer(answer.status, answer.body, answer.headers)
        self.refused = answer.status
        self._log.append(f"refused: {answer.status} {answer.body.strip()}")
        self._closed()

    # ---------------------------------------------------------------- the client's frames

    def _feed(self, data: bytes) -> bool:
        """Frames from the client; False once the connection is closed."""
        ws = self._ws
        assert ws is not None
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, TextMessage | BytesMessage):
                self._message(event)
            elif isinstance(event, Ping):
                if ws.state is ConnectionState.OPEN:
                    self._client += ws.send(event.response())
            elif isinstance(event, Pong):
                if self._pong_due is not None and event.payload == self._ping_payload:
                    self._pong_due = None
            elif isinstance(event, CloseConnection):
                self._client_close(event)
            if self.phase is Phase.CLOSED:
                return False
        return True

    def _client_close(self, event: CloseConnection) -> None:
        ws = self._ws
        assert ws is not None
        if ws.state is ConnectionState.REMOTE_CLOSING:
            # RFC 6455 5.5.1: answer at once with the code received; the program's stdin
            # ends, and the parent's timeout ladder applies to a program that goes on.
            self._client += ws.send(event.response())
            self.close_code, self.close_reason = event.code, event.reason or ""
            self._end_program()
            self._closed()
        elif ws.state is ConnectionState.CLOSED:
            self._closed()  # the answer to our Close
        else:
            # wsproto found the client's frames invalid (ParseFailed): fail the connection
            # with its code (1002 protocol error, 1007 invalid UTF-8), RFC 6455 7.1.7.
            self._close(int(event.code), (event.reason or "")[:100])
            self._closed()

    def _message(self, event: TextMessage | BytesMessage) -> None:
        if self.phase is not Phase.OPEN:
            return  # after our Close: the rest of a message is read and dropped
        text = isinstance(event, TextMessage)
        mode = self.settings.mode
        if mode == "lines" and not text:
            self._close(CloseReason.UNSUPPORTED_DATA, "lines mode takes text messages only")
            return
        chunk = event.data.encode("utf-8") if isinstance(event.data, str) else bytes(event.data)
        self._msg_size += len(chunk)
        if self._msg_size > self.settings.max_message:
            # Closed before more of it is kept: memory stays at one read (a 10 MiB message
            # to a 1M service is never held).
            self._msg = bytearray()
            self._close(CloseReason.MESSAGE_TOO_BIG, f"message over {self.settings.max_message}")
            return
        if mode == "binary":
            self._program += chunk
        else:
            self._msg += chunk
            self._msg_text = text
        if not event.message_finished:
            return
        if mode == "lines":
            self._program += self._msg + b"\n"
        elif mode == "frames":
            kind = b"text" if self._msg_text else b"binary"
            self._program += b"%s %d\n" % (kind, len(self._msg)) + self._msg
        self._msg, self._msg_size = bytearray(), 0

    # ---------------------------------------------------------------- the program's side

    def receive_program(self, data: bytes) -> None:
        if self.phase is not Phase.OPEN or not data:
            return  # before the 101 nothing is sent; after a Close, output is dropped
        try:
            messages = self._stdout.feed(data)
        except BadRecord as exc:
            self._bad_record(str(exc))
            return
        for message in messages:
            self._send(message)

    def _bad_record(self, why: str) -> None:
        self._log.append(f"program output: {why}; closing with 1011")
        self._close(CloseReason.INTERNAL_ERROR, "malformed record from the program")

    def _send(self, data: str | bytes) -> None:
        ws = self._ws
        if ws is None or ws.state is not ConnectionState.OPEN:
            return
        if isinstance(data, str):
            self._client += ws.send(TextMessage(data=data))
        else:
            self._client += ws.send(BytesMessage(data=data))

    def program_eof(self) -> None:
        """The program's stdout ended: what it wrote last is sent (lines: a last line without
        its newline too; frames: a record cut short is malformed)."""
        if self._stdout_done:
            return
        self._stdout_done = True
        if self.phase is Phase.OPEN:
            self._flush_stdout()
        self._maybe_exit_close()

    def _flush_stdout(self) -> None:
        try:
            messages = self._stdout.end()
        except BadRecord as exc:
            self._bad_record(str(exc))
            return
        for message in messages:
            self._send(message)

    def program_exit(self, code: int | None, signal: int | None) -> None:
        """The program ended (the parent's `X`): exit 0 -> Close 1000; another status or a
        signal -> 1011 with it as the reason, once its stdout is read to its end."""
        if self._exit is not None:
            return
        self._exit, self._exit_at = (code, signal), self._now
        if self.phase in (Phase.REQUEST, Phase.UPGRADE):
            self.refuse(500, "the program ended before the connection was upgraded\n")
            return
        self._maybe_exit_close()

    def _maybe_exit_close(self, late: bool = False) -> None:
        """Close after the program's exit once its stdout has ended, or EXIT_FLUSH after the
        exit (``late``: a process it left behind holds stdout open)."""
        if self._exit is None or self.phase is not Phase.OPEN:
            return
        if not self._stdout_done:
            if not late:
                return  # its last output may still be in the pipe
            self._flush_stdout()
            if self.phase is not Phase.OPEN:
                return
        code, signal = self._exit
        if code == 0:
            self._close(CloseReason.NORMAL_CLOSURE, "")
        else:
            why = f"program killed by signal {signal}" if signal else f"program exit {code}"
            self._close(CloseReason.INTERNAL_ERROR, why)

    def client_eof(self) -> None:
        """The client's stream ended (FIN or reset) without a Close: 1006, the program's stdin
        ends and the program should end."""
        if self.phase in (Phase.OPEN, Phase.CLOSING) and self.close_code is None:
            self.close_code = CloseReason.ABNORMAL_CLOSURE
        self._end_program()
        self._closed()

    # ---------------------------------------------------------------- time and the end

    def tick(self, now: float) -> None:
        self._now = now
        if self._deadline is not None and now >= self._deadline:
            if self.phase in (Phase.REQUEST, Phase.UPGRADE):
                self._log.append("upgrade request not complete before its deadline")
                self._client = bytearray()
            self._end_program()
            self._closed()
            return
        if self._pong_due is not None and now >= self._pong_due:
            # A client gone without a FIN (a cable pulled, a laptop asleep): no Close can
            # reach it; the connection and its program end.
            self._log.append(f"no pong within {self.settings.ping_timeout:g} s; closing")
            self.close_code = CloseReason.ABNORMAL_CLOSURE
            self._client = bytearray()
            self._end_program()
            self._closed()
            return
        if (
            self._ping_at is not None
            and now >= self._ping_at
            and self._pong_due is None  # one ping awaits its pong at a time
            and self.phase is Phase.OPEN
        ):
            ws = self._ws
            assert ws is not None
            self._pings += 1
            self._ping_payload = struct.pack("!Q", self._pings)
            self._client += ws.send(Ping(payload=self._ping_payload))
            self._pong_due = now + self.settings.ping_timeout
            self._ping_at = now + self.settings.ping_interval
        if self._exit_at is not None and now >= self._exit_at + EXIT_FLUSH:
            self._exit_at = None
            self._maybe_exit_close(late=True)

    def _close(self, code: int, reason: str) -> None:
        """Send a Close (RFC 6455 7.1.2) and end the program's part; await the client's Close
        for CLOSE_WAIT (a failed connection's caller closes at once instead, 7.1.7)."""
        ws = self._ws
        if ws is None or self.phase is not Phase.OPEN:
            return
        if ws.state is ConnectionState.OPEN:
            self._client += ws.send(CloseConnection(code=code, reason=reason))
        self.close_code, self.close_reason = code, reason
        self._end_program()
        self._ping_at = self._pong_due = self._exit_at = None
        self.phase = Phase.CLOSING
        self._deadline = self._now + CLOSE_WAIT

    def _end_program(self) -> None:
        """The program's stdin ends once what it was sent is written, and the program should
        end (the parent's timeout ladder: SIGTERM, SIGKILL)."""
        self.end_stdin = True
        self.end_program = True

    def _closed(self) -> None:
        self.phase = Phase.CLOSED
        self._deadline = self._ping_at = self._pong_due = self._exit_at = None
        self._head, self._early, self._msg = bytearray(), bytearray(), bytearray()
        self._stdout = StdoutReader(self.settings)
