"""Built-in services (RFC 862 echo, 863 discard, 864 chargen, 867 daytime, 868 time).

They run inside the parent's event loop, non-blocking, with bounded buffers and bounded
work per event: no process per connection, and a client that stops reading only stops its
own session. TCP sessions count as running instances of their service like children do.
"""

from __future__ import annotations

import random
import selectors
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CHUNK = 65536
# RFC 868: seconds between 1900-01-01 and the Unix epoch.
RFC868_OFFSET = 2208988800

_PRINTABLE = bytes(range(32, 127))  # RFC 864: the 95 printable ASCII characters
_CHARGEN_LINE = 72


def _chargen_block() -> bytes:
    """One full cycle of RFC 864 lines: line i starts at character i, 72 characters + CRLF."""
    ring = _PRINTABLE * 2
    return b"".join(ring[i : i + _CHARGEN_LINE] + b"\r\n" for i in range(len(_PRINTABLE)))


CHARGEN_BLOCK = _chargen_block()


def daytime_bytes(now: float | None = None) -> bytes:
    """RFC 867 leaves the format open; this is ctime(3)'s, as openbsd-inetd and xinetd send."""
    return time.strftime("%a %b %d %H:%M:%S %Y", time.localtime(now)).encode() + b"\r\n"


def time_bytes(now: float | None = None) -> bytes:
    """RFC 868: seconds since 1900-01-01 00:00 UTC as a 32-bit big-endian number."""
    t = time.time() if now is None else now
    return struct.pack("!I", (int(t) + RFC868_OFFSET) & 0xFFFFFFFF)


def _udp_chargen(_data: bytes) -> bytes:
    # RFC 864, UDP: a datagram of a random number (0-512) of characters.
    n = random.randint(0, 512)
    return (CHARGEN_BLOCK * (n // len(CHARGEN_BLOCK) + 1))[:n]


@dataclass(frozen=True)
class Builtin:
    """What one built-in does: its TCP behaviour and its answer to a datagram."""

    echoes: bool = False  # TCP: send back what is read
    generates: bool = False  # TCP: send CHARGEN_BLOCK's lines until the client goes
    greeting: Callable[[], bytes] | None = None  # TCP: send this once, then close
    udp: Callable[[bytes], bytes | None] = lambda _data: None  # reply to a datagram


# The registry: a built-in is one entry (Twisted's inetd does the same). Its names are those
# the configuration accepts (parsers.BUILTINS; tests/test_protocols.py checks they agree).
REGISTRY: dict[str, Builtin] = {
    "echo": Builtin(echoes=True, udp=lambda data: data),
    "discard": Builtin(),
    "chargen": Builtin(generates=True, udp=_udp_chargen),
    "daytime": Builtin(greeting=daytime_bytes, udp=lambda _data: daytime_bytes()),
    "time": Builtin(greeting=time_bytes, udp=lambda _data: time_bytes()),
}


def udp_reply(kind: str, data: bytes) -> bytes | None:
    """The reply a UDP built-in sends to one datagram, or None for no reply."""
    builtin = REGISTRY.get(kind)
    return None if builtin is None else builtin.udp(data)


def udp_source_is_unsafe(port: int) -> bool:
    """Never answer datagrams from privileged ports (CERT CA-1996-01: echo<->chargen loops)."""
    return port < 1024


class Session:
    """One TCP connection to a built-in, driven by the parent's selector."""

    def __init__(
        self,
        kind: str,
        sock: socket.socket,
        selector: selectors.BaseSelector,
        on_close: Callable[[Session], None],
        carried: dict[str, Any] | None = None,
    ) -> None:
        """``carried``: where the session of the image before this one was (``carry``, for
        `pyinetd upgrade`): its greeting was sent then."""
        self.kind = kind
        self._does = REGISTRY[kind]
        self.sock = sock
        self.started = time.monotonic()
        self._sel = selector
        self._on_close = on_close
        self._out = bytearray()
        self._offset = 0  # chargen: position in CHARGEN_BLOCK
        self._eof = False
        self._closed = False
        self._events = 0
        # What the session carried, for its end line (as xinetd's and systemd's accounting).
        self.bytes_in = 0
        self.bytes_out = 0
        if carried is not None:
            self.started = carried["started"]
            self._out = bytearray.fromhex(carried["out"])
            self._offset, self._eof = carried["offset"], carried["eof"]
            self.bytes_in, self.bytes_out = carried["bytes"]
            self._update()
            return
        if self._does.greeting is not None:
            self._out += self._does.greeting()
            self._eof = True
        if self._eof:
            self._flush()  # usually fits the socket buffer at once: no registration at all
            if self._closed:
                return
        self._update()

    @property
    def closed(self) -> bool:
        return self._closed

    def carry(self) -> dict[str, Any]:
        """Where the session is, for the next image (`pyinetd upgrade`); its socket apart."""
        return {
            "kind": self.kind,
            "started": self.started,
            "out": bytes(self._out).hex(),
            "offset": self._offset,
            "eof": self._eof,
            "bytes": [self.bytes_in, self.bytes_out],
        }

    def _want(self) -> int:
        events = 0
        if not self._eof and len(self._out) < CHUNK:
            events |= selectors.EVENT_READ
        if self._out or self._does.generates:
            events |= selectors.EVENT_WRITE
        return events

    def _update(self) -> None:
        want = self._want()
        if want == self._events:
            return
        if not self._events:
            self._sel.register(self.sock, want, self)
        elif want:
            self._sel.modify(self.sock, want, self)
        else:
            self._sel.unregister(self.sock)
        self._events = want

    def __call__(self, mask: int) -> None:
        """Handle readiness reported by the selector."""
        try:
            if mask & selectors.EVENT_READ:
                self._read()
            if not self._closed and mask & selectors.EVENT_WRITE:
                self._write()
        except OSError:
            self.close()
            return
        if not self._closed:
            if self._eof and not self._out and not self._does.generates:
                self.close()
            else:
                self._update()

    def _read(self) -> None:
        try:
            data = self.sock.recv(CHUNK)
        except BlockingIOError:
            return
        self.bytes_in += len(data)
        if not data:
            self._eof = True
            if self._does.generates:
                self.close()  # RFC 864: "until the calling user terminates the connection"
            return
        if self._does.echoes:
            self._out += data

    def _write(self) -> None:
        if self._does.generates and len(self._out) < CHUNK:
            # Keep one chunk ready; the line pattern continues across writes.
            block = CHARGEN_BLOCK
            need = CHUNK - len(self._out)
            start = self._offset
            piece = (block[start:] + block * (need // len(block) + 1))[:need]
            self._offset = (start + need) % len(block)
            self._out += piece
        self._flush()

    def _flush(self) -> None:
        try:
            sent = self.sock.send(self._out)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        self.bytes_out += sent
        del self._out[:sent]
        if self._eof and not self._out and not self._does.generates:
            self.close()

    def close(self) -> None:
        """Close the connection and tell the server this instance ended."""
        if self._closed:
            return
        self._closed = True
        if self._events:
            self._sel.unregister(self.sock)
            self._events = 0
        self.sock.close()
        self._on_close(self)
