"""Connections before their service starts, and a UDP child's reply.

A connection whose PROXY header (PendingProxy) or TLS ClientHello (PendingHello) is still due
costs the parent an fd, and nothing has proven it is a real client yet; one whose relay does
its TLS handshake (PendingRelay) costs a process as well, until the relay reports it complete.
Each holds a slot in its service's pool (admission.StageSlots) and a deadline, consumes only
what it must, and reports back through the ``Gate`` it was given (connections.Stages). They
know no services and start nothing.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import time
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeAlias, TypeVar, cast

from pyinetd.protocols import proxyproto

__all__ = ["Gate", "PendingHello", "PendingProxy", "PendingRelay", "UDPReply"]

# RFC 8446 5.1: a TLSPlaintext record (a ClientHello's first) carries at most 2**14 bytes
# after its 5-byte header.
TLS_RECORD_MAX = 5 + 2**14

L = TypeVar("L")


# whatever the gate's listener is
_Any: TypeAlias = "PendingProxy[Any] | PendingHello[Any] | PendingRelay[Any]"


class _Timer(Protocol):
    def cancel(self) -> None: ...


class Gate(Protocol):
    """What a pending connection needs from the connection path (connections.Connections)."""

    @property
    def sel(self) -> selectors.BaseSelector: ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> _Timer: ...

    def stage_done(self, pend: _Any, header: proxyproto.ProxyHeader | None) -> None: ...

    def stage_failed(self, pend: _Any, why: str) -> None: ...

    def leave_stage(self, pend: _Any) -> None: ...


class _Pending(Generic[L]):
    """A connection at the door of ``lst``'s service: its peer, its slot key, its deadline."""

    def __init__(
        self,
        gate: Gate,
        lst: L,
        conn: socket.socket,
        peer: tuple[str, int],
        key: str,
        timeout: float,
        late: str,
    ) -> None:
        self.gate, self.lst, self.conn, self.key = gate, lst, conn, key
        self.ip, self.port = peer
        self.local: tuple[str, int] | None = None  # the service's address, if told otherwise
        self.since = time.monotonic()  # its arrival (a handshake's deadline counts from it)
        gate.sel.register(conn, selectors.EVENT_READ, self)
        self._timer = gate.call_later(timeout, lambda: self._fail(late))

    def _me(self) -> _Any:
        return cast(_Any, self)  # (every _Pending is one of the three)

    def detach(self) -> None:
        """Out of the selector, its deadline cancelled (the gate then ends it)."""
        self._timer.cancel()
        with contextlib.suppress(KeyError, ValueError):
            self.gate.sel.unregister(self.conn)

    def _fail(self, why: str) -> None:
        self.detach()
        self.gate.stage_failed(self._me(), why)

    def _done(self, header: proxyproto.ProxyHeader | None) -> None:
        self.detach()
        self.gate.stage_done(self._me(), header)

    def close(self) -> None:
        """Drop this connection and its slot, quietly (at exit, or after its handler raised,
        which the loop has logged)."""
        self.detach()
        self.gate.leave_stage(self._me())
        self.conn.close()


class PendingProxy(_Pending[L]):
    """A connection whose PROXY protocol header has not fully arrived yet.

    Only header bytes are consumed from the socket (peeked first, then read up to the
    header's end), so whatever the client sent after the header reaches the service intact.
    """

    def __init__(
        self,
        gate: Gate,
        lst: L,
        conn: socket.socket,
        peer: tuple[str, int],
        key: str,
        timeout: float,
        accept: str,
    ) -> None:
        self._buf = b""
        self._accept = accept
        super().__init__(gate, lst, conn, peer, key, timeout, "no PROXY header in time")

    def __call__(self, mask: int) -> None:
        try:
            peek = self.conn.recv(proxyproto.MAX_HEADER - len(self._buf), socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(str(exc))
            return
        if not peek:
            self._fail("connection closed before the PROXY header")
            return
        # The parser decides on everything received so far, before anything is consumed:
        # malformed is refused at once. ("\r\n\r\n" then "XYZ" must not make the read length
        # negative: recv would raise ValueError and the readable socket would spin.)
        try:
            header = proxyproto.parse(self._buf + peek, self._accept)
            if header is None:
                if len(self._buf) + len(peek) >= proxyproto.MAX_HEADER:
                    raise proxyproto.ProxyError("PROXY header too long")
                take = len(peek)
            else:
                take = header.length - len(self._buf)
                if take <= 0:  # cannot happen: a shorter prefix would have parsed already
                    raise proxyproto.ProxyError("inconsistent PROXY header")
            self._buf += self.conn.recv(take)
        except (proxyproto.ProxyError, OSError) as exc:
            self._fail(str(exc))
            return
        if header is not None and len(self._buf) == header.length:
            self._done(header)


class PendingHello(_Pending[L]):
    """A TLS connection whose ClientHello has not arrived yet: no relay is forked before it
    has (3,000 connections that never send one would otherwise make 864 relay processes).

    SO_RCVLOWAT keeps the socket unreadable until the whole first record is there, so a
    client sending a byte at a time costs nothing but its fd and its slot; nothing is
    consumed, the relay's handshake reads the record itself.
    """

    def __init__(
        self,
        gate: Gate,
        lst: L,
        conn: socket.socket,
        peer: tuple[str, int],
        key: str,
        timeout: float,
        local: tuple[str, int] | None,
    ) -> None:
        self._lowat = 5  # a record header first
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, self._lowat)
        super().__init__(gate, lst, conn, peer, key, timeout, "no TLS ClientHello in time")
        self.local = local

    def __call__(self, mask: int) -> None:
        try:
            peek = self.conn.recv(TLS_RECORD_MAX, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(str(exc))
            return
        if len(peek) < self._lowat:
            if mask:
                # Readable with fewer bytes than the low-water mark: the client closed (or
                # the socket failed) in the middle of its hello.
                self._fail("connection closed before the TLS ClientHello")
            return  # (mask 0: the first look, at accept, before any readiness)
        # RFC 8446 5.1: ContentType handshake(22), then a 2-byte version, a 2-byte length.
        length = int.from_bytes(peek[3:5], "big")
        if peek[0] != 22 or not 0 < length <= 2**14:
            self._fail("not a TLS ClientHello")
            return
        if len(peek) < 5 + length:
            self._lowat = 5 + length
            self.conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, self._lowat)
            return
        # The relay's handshake reads with ordinary semantics.
        self.conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        self._done(None)


class PendingRelay(_Pending[L]):
    """A TLS connection whose ClientHello is in and whose relay, pid ``pid``, does the
    handshake: the relay was forked for it, and has taken the service's user and sandbox
    before parsing a TLS byte, but the connection keeps the slot its hello held in its
    service's pool until the relay reports the handshake complete (were the slot freed at
    the hello, 300 canned ClientHellos that then stall would make 300 relays).

    ``conn`` is the parent's end of a socketpair whose other end only that relay holds; the
    report is one byte, ``REPORT``. At most one byte is ever read: the report ends the stage
    as done; EOF (the relay ended) or anything else ends it quietly; a second report, or one
    after the relay's end, is never read. The deadline is the parent's: when it passes with no
    report, the gate kills the relay (stage_failed).
    """

    REPORT = b"\x01"

    def __init__(
        self,
        gate: Gate,
        lst: L,
        conn: socket.socket,
        peer: tuple[str, int],
        key: str,
        timeout: float,
        pid: int,
        local: tuple[str, int] | None,
    ) -> None:
        self.pid = pid
        self._over = False  # the stage has ended: nothing more is read or told
        super().__init__(gate, lst, conn, peer, key, timeout, "TLS handshake not complete in time")
        self.local = local

    def __call__(self, mask: int) -> None:
        self.settle()

    def settle(self) -> bool:
        """Read the relay's report if anything has come: True when the stage has ended
        (reported: stage_done; the relay ended or said something else: left quietly), False
        while the handshake goes on."""
        if self._over:
            return True
        try:
            got = self.conn.recv(1)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            got = b""
        self._over = True
        if got == self.REPORT:
            self._done(None)
        else:
            self.close()
        return True

    def _fail(self, why: str) -> None:
        # The report may be in, its wake-up not handled yet: only a relay that has not
        # reported is failed (and killed).
        if not self.settle():
            self._over = True
            super()._fail(why)

    def close(self) -> None:
        self._over = True
        super().close()


class UDPReply:
    """Collects a per-datagram UDP child's stdout and sends it to the client as one datagram.

    Output beyond the largest UDP payload (65507 bytes) goes out in datagrams of that size.
    """

    MAX = 65507

    def __init__(
        self,
        sock: socket.socket,
        listener: socket.socket,
        peer: object,
        sel: selectors.BaseSelector,
        buffered: bytes = b"",
    ) -> None:
        """``buffered``: what the child wrote before, read by the image before this one."""
        self.sock = sock
        self._listener = listener
        self._peer = peer
        self._sel = sel
        self._buf = bytearray(buffered)
        self.closed = False
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, self)

    def __call__(self, mask: int) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self._buf += data
        while len(self._buf) >= self.MAX or (not data and self._buf):
            self._send(bytes(self._buf[: self.MAX]))
            del self._buf[: self.MAX]
        if not data:
            self.close()

    def carry(self) -> tuple[int, int, object, bytes]:
        """For `pyinetd upgrade`: its socket's fd, its listener's, the peer, what it holds."""
        return self.sock.fileno(), self._listener.fileno(), self._peer, bytes(self._buf)

    def finish(self) -> None:
        """The child is gone (plus a grace): send what it wrote and close, even if a process
        it left behind still holds the other end."""
        if self.closed:
            return
        self(0)  # whatever is waiting now
        if not self.closed:
            if self._buf:
                self._send(bytes(self._buf[: self.MAX]))
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(self.sock)
        self.sock.close()

    def _send(self, payload: bytes) -> None:
        with contextlib.suppress(OSError):
            self._listener.sendto(payload, self._peer)  # type: ignore[call-overload]
