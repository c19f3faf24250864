"""One connection inside a front process (front.py): its TLS session, its relay, its end.

The client side is a non-blocking socket, with TLS through ``ssl.SSLObject`` over two
``MemoryBIO``s (a protocol of our own, so that each direction can end on its own: TLS 1.3 lets
either side go on sending after the other's close_notify, RFC 8446 6.1). The service side is a
program's two pipes (``S`` hands them over) or, for a redirect, a socket connected out. At most
``bufsize`` plaintext bytes wait per direction, plus at most ``bufsize`` of ciphertext towards
the client: a side whose peer's buffer is full is not read (backpressure), so one slow reader
costs its own buffers and nobody else's time. Half-close passes through as relay.py's does:
client EOF or close_notify closes the program's stdin (EOF), the program's stdout EOF sends
close_notify and shutdown(SHUT_WR), and the program's reply after the client's EOF still goes
out; unread client data is read and discarded for ``linger`` seconds before the close, so that
no RST destroys the reply (RFC 1122 4.2.2.13).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import ssl
import time
from typing import Any, Protocol

from pyinetd.protocols import frontchan, tlsconf

__all__ = ["TLS_RECORD", "Conn", "Hub"]

# RFC 8446 5.1: a TLS record carries at most 2**14 plaintext bytes; one write is one record.
TLS_RECORD = 16384
_RECV = 65536  # bytes read from a socket or pipe at once

# Direction states: OPEN -> EOF (EOF read, buffer draining) -> DONE (EOF passed on), or DEAD
# (client -> service only: the service can take no more input; its buffer is dropped).
_OPEN, _EOF, _DONE, _DEAD = 0, 1, 2, 3
# Phases of a connection.
HANDSHAKE, CONNECTING, WAITING, RELAY, LINGER, CLOSED = range(6)
_AGAIN = (BlockingIOError, InterruptedError)


class Hub(Protocol):
    """What a connection needs of its front's loop."""

    def watch(self, fd: int, read: bool, write: bool, conn: Conn | None) -> None:
        """Wait for ``fd`` to be readable / writable for ``conn`` (neither: forget it)."""

    def tell(self, kind: str, fields: dict[str, Any]) -> None:
        """Queue one message to the parent."""

    def tell_encoded(self, record: bytes) -> None:
        """Queue one record made by frontchan.encode."""

    def arm(self, conn: Conn, when: float) -> None:
        """Call ``conn.on_timer()`` at ``when`` (time.monotonic), unless it re-arms."""

    def ended(self, conn: Conn) -> None:
        """The connection is over: every fd of it closed, its last message queued."""

    def log(self, line: str) -> None:
        """One line to the front's log."""


class _Streams:
    """A connection's state and its byte moves: the client socket (plain, or TLS through the
    memory BIOs) and the service's pipes or socket, each step non-blocking and bounded."""

    __slots__ = (
        "_dead",
        "ab",
        "ab_state",
        "ba",
        "ba_state",
        "bufsize",
        "c_r",
        "c_w",
        "env",
        "fd",
        "hub",
        "id",
        "idle",
        "in_fd",
        "in_w",
        "inc",
        "last",
        "linger",
        "masks",
        "notified",
        "out_fd",
        "out_r",
        "outg",
        "peer",
        "phase",
        "quiet",
        "raw",
        "redirect",
        "sent_ab",
        "sent_ba",
        "sock",
        "target",
        "tls",
        "when",
    )

    def __init__(
        self,
        hub: Hub,
        cid: int,
        sock: socket.socket,
        ctx: ssl.SSLContext | None,
        *,
        peer: str,
        deadline: float,
        redirect: tuple[Any, ...] | None = None,
        banner: bytes = b"",
        bufsize: int = 65536,
        linger: float = 2.0,
        idle: float | None = None,
    ) -> None:
        self.hub, self.id, self.peer = hub, cid, peer
        self.sock, self.fd = sock, sock.fileno()
        self.bufsize, self.linger, self.idle = bufsize, linger, idle
        self.redirect = redirect  # (family, sockaddr) of the target, or None
        self.ab = bytearray()  # client -> service, plaintext
        self.ba = bytearray(banner)  # service -> client, plaintext (a TLS banner first)
        self.raw = bytearray()  # TLS: ciphertext for the client
        self.ab_state = self.ba_state = _OPEN
        self.c_r = self.c_w = True  # the client socket may be readable / writable
        self.in_fd = self.out_fd = -1  # the program's stdin (write end), stdout (read end)
        self.target: socket.socket | None = None  # redirect: the outbound socket
        self.in_w = self.out_r = False
        self.masks: dict[int, tuple[bool, bool]] = {}
        self.sent_ab = self.sent_ba = 0
        self.notified = False  # TLS: our close_notify made
        self.env: dict[str, str] = {}
        self._dead = False  # the client is gone (reset, protocol error)
        self.quiet = False  # F told: the end needs no E
        self.last = time.monotonic()
        self.when = 0.0
        self.tls: ssl.SSLObject | None = None
        self.inc = self.outg = None
        if ctx is not None:
            self.inc, self.outg = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.tls = ctx.wrap_bio(self.inc, self.outg, server_side=True)
            self.phase = HANDSHAKE
        else:
            self.phase = CONNECTING if redirect is not None else WAITING
        self.when = self.last + deadline  # armed by Conn.start

    def _wants_client_input(self) -> bool:
        return self.ab_state == _OPEN and len(self.ab) < self.bufsize and not self._dead

    def _recv_raw(self) -> bytes | None:
        """Bytes from the client socket; b"" at EOF; None when none wait (or it failed)."""
        try:
            data = self.sock.recv(_RECV)
        except _AGAIN:
            self.c_r = False
            return None
        except OSError:
            self._dead = True  # ECONNRESET, ETIMEDOUT
            return None
        self.last = time.monotonic()
        return data

    def _read_client(self) -> bool:
        if not self._wants_client_input():
            return False
        if self.tls is None:
            if not self.c_r:
                return False
            data = self._recv_raw()
            if data is None:
                return False
            if not data:
                self.ab_state = _EOF
            self.ab += data
            return True
        assert self.inc is not None
        progress = False
        while self._wants_client_input():
            try:
                data = self.tls.read(self.bufsize - len(self.ab))
            except ssl.SSLWantReadError:
                if not self.c_r or self.inc.eof:
                    break
                raw = self._recv_raw()
                if raw is None:
                    break
                if raw:
                    self.inc.write(raw)
                else:
                    self.inc.write_eof()
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                data = b""  # close_notify, or a TCP EOF without it: no more input either way
            except (ssl.SSLError, ValueError):
                self._dead = True  # a TLS protocol error: the stream is over
                break
            progress = True
            if not data:
                self.ab_state = _EOF
                break
            self.ab += data
        return progress

    def _write_client(self) -> bool:
        if self._dead:
            return False
        progress = False
        if self.tls is not None:
            assert self.outg is not None
            # Plaintext into records only once the handshake is done (a banner waits in ba),
            # and while the ciphertext for the socket is small.
            while self.ba and len(self.raw) < self.bufsize and self.phase != HANDSHAKE:
                n = min(len(self.ba), TLS_RECORD)
                try:
                    self.tls.write(self.ba[:n])
                except (ssl.SSLError, ValueError):
                    self._dead = True
                    return True
                del self.ba[:n]
                self.sent_ba += n
                progress = True
            if self.outg.pending:
                self.raw += self.outg.read()
            out = self.raw
        else:
            out = self.ba
        if out and self.c_w:
            try:
                sent = self.sock.send(out, socket.MSG_NOSIGNAL)
            except _AGAIN:
                self.c_w = False
                return progress
            except OSError:
                self._dead = True  # EPIPE, ECONNRESET
                return True
            if self.tls is None:
                self.sent_ba += sent
            if sent < len(out):
                self.c_w = False
            del out[:sent]
            if not out:
                # Give an idle connection's buffer back (a bytearray keeps its capacity).
                if self.tls is not None:
                    self.raw = bytearray()
                else:
                    self.ba = bytearray()
            self.last = time.monotonic()
            progress = progress or sent > 0
        return progress

    def _close_notify(self) -> None:
        """Our close_notify into ``raw``. SSL_shutdown's second step reads the client's alert
        from the incoming BIO and drops any application data it meets there
        (APPLICATION_DATA_AFTER_CLOSE_NOTIFY); the caller makes sure none is buffered."""
        assert self.tls is not None and self.outg is not None
        self.notified = True
        try:
            self.tls.unwrap()
        except ssl.SSLWantReadError:
            pass  # sent; the client's close_notify not seen yet: it may still send (6.1)
        except (ssl.SSLError, ValueError):
            pass  # the session had already failed: there is no alert to send
        else:
            if self.ab_state == _OPEN:
                self.ab_state = _EOF  # both close_notify are through
        self.raw += self.outg.read()

    def _write_service(self) -> bool:
        if not self.ab or not self.in_w or self.ab_state == _DEAD:
            return False
        try:
            if self.target is not None:
                sent = self.target.send(self.ab, socket.MSG_NOSIGNAL)
            else:
                sent = os.write(self.in_fd, self.ab)
        except _AGAIN:
            self.in_w = False
            return False
        except OSError:
            self._kill_ab()  # EPIPE: the program closed its stdin or exited
            return True
        if sent < len(self.ab):
            self.in_w = False
        del self.ab[:sent]
        self.sent_ab += sent
        if not self.ab:
            self.ab = bytearray()
        self.last = time.monotonic()
        return sent > 0

    def _read_service(self) -> bool:
        if self.ba_state != _OPEN or not self.out_r or len(self.ba) >= self.bufsize:
            return False
        room = self.bufsize - len(self.ba)
        try:
            if self.target is not None:
                data = self.target.recv(min(room, _RECV))
            else:
                data = os.read(self.out_fd, min(room, _RECV))
        except _AGAIN:
            self.out_r = False
            return False
        except OSError:
            # ECONNRESET from a redirect target: deliver what it sent, take no more input.
            self.ba_state = _EOF
            self._kill_ab()
            return True
        if not data:
            self.ba_state = _EOF
            return True
        if len(data) < min(room, _RECV):
            self.out_r = False
        self.ba += data
        self.last = time.monotonic()
        return True

    def _end_input(self) -> None:
        """No more input for the service: close the stdin pipe, or shutdown(SHUT_WR)."""
        if self.target is not None:
            with contextlib.suppress(OSError):
                self.target.shutdown(socket.SHUT_WR)
        elif self.in_fd >= 0:
            self._close_fd(self.in_fd)
            self.in_fd = -1

    def _kill_ab(self) -> None:
        if self.ab_state in (_DONE, _DEAD):
            return
        self.ab_state = _DEAD
        self.ab = bytearray()
        self._end_input()

    def _close_fd(self, fd: int) -> None:
        if fd in self.masks:
            del self.masks[fd]
            self.hub.watch(fd, False, False, None)
        with contextlib.suppress(OSError):
            os.close(fd)

    def _close_service(self) -> None:
        if self.target is not None:
            if self.target.fileno() in self.masks:
                del self.masks[self.target.fileno()]
                self.hub.watch(self.target.fileno(), False, False, None)
            self.target.close()
            self.target = None
        for fd in (self.in_fd, self.out_fd):
            if fd >= 0:
                self._close_fd(fd)
        self.in_fd = self.out_fd = -1

    def _close_all(self) -> None:
        self._close_service()
        if self.fd in self.masks:
            del self.masks[self.fd]
            self.hub.watch(self.fd, False, False, None)
        self.sock.close()
        self.tls = None
        self.inc = self.outg = None


class Conn(_Streams):
    """One connection: created on ``C``; ``on_event`` for readiness, ``attach`` on ``S``,
    ``refuse`` on ``N``, ``abort`` on ``K``, ``on_timer`` at its deadline."""

    __slots__ = ()

    def start(self) -> None:
        """First steps: the ClientHello is usually there already (the parent awaited it)."""
        self.hub.arm(self, self.when)
        if self.phase == CONNECTING:
            self._connect()
        elif self.phase == WAITING:
            self._handshake_done()
        self.pump()

    def _want(self, fd: int, read: bool, write: bool) -> None:
        if self.masks.get(fd, (False, False)) != (read, write):
            self.masks[fd] = (read, write)
            self.hub.watch(fd, read, write, self)

    def on_event(self, fd: int, readable: bool, writable: bool) -> None:
        if fd == self.fd:
            self.c_r |= readable
            self.c_w |= writable
        elif self.target is not None and fd == self.target.fileno():
            if self.phase == CONNECTING:
                self._connected()
            self.out_r |= readable
            self.in_w |= writable
        elif fd == self.in_fd:
            if readable:
                # A pipe's write end is readable only with POLLERR: the program closed its
                # stdin or exited, even while we have nothing to write.
                self._kill_ab()
            self.in_w |= writable
        elif fd == self.out_fd:
            self.out_r |= readable
        self.pump()

    def on_timer(self, now: float) -> None:
        if self.phase == HANDSHAKE:
            self._fail("TLS handshake not completed in time")
        elif self.phase == CONNECTING:
            self._fail("redirect: connect timed out")
        elif self.phase == LINGER:
            self._finish()
        elif self.phase == RELAY and self.idle is not None:
            if now - self.last >= self.idle:
                self._finish()
            else:
                self._arm(self.last + self.idle)

    def attach(self, stdin: int, stdout: int) -> None:
        """``S``: the program's pipes; relay from now on."""
        if self.phase != WAITING:
            os.close(stdin)
            os.close(stdout)
            return
        os.set_blocking(stdin, False)
        os.set_blocking(stdout, False)
        self.in_fd, self.out_fd = stdin, stdout
        self.in_w, self.out_r = True, True
        self.phase = RELAY
        if self._dead:
            self._finish(told=True)
            return
        self.pump()

    def refuse(self) -> None:
        """``N`` (or ``S`` whose fds were lost): no program; close_notify, close, ``E``."""
        if self.phase not in (WAITING, RELAY):
            return
        if self.tls is not None and not self.notified and not self._dead:
            self.ba.clear()
            self._close_notify()
            with contextlib.suppress(OSError):
                self.sock.send(self.raw, socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
        self._finish(told=True)

    def abort(self) -> None:
        """``K``: end now, telling the parent nothing more."""
        self._close_all()
        self.phase = CLOSED
        self.hub.ended(self)

    def pump(self) -> None:
        """Take every step possible without waiting, then say what to wait for."""
        if self.phase == CLOSED:
            return
        if self.phase == LINGER:
            self._linger_read()
        elif self.phase == HANDSHAKE:
            self._handshake()
        else:
            progress = True
            while progress and self.phase != CLOSED and not self._dead:
                progress = self._read_client()
                if self.phase in (RELAY,):
                    progress |= self._write_service()
                    progress |= self._read_service()
                progress |= self._write_client()
                if self.phase == RELAY:
                    progress |= self._advance()
            if self._dead and self.phase == CONNECTING:
                self._fail("the client went away before the redirect connected")
            elif self._dead and self.phase in (RELAY, WAITING):
                self._finish()
            elif self.phase == RELAY and self._over():
                return
        if self.phase != CLOSED:
            self._interest()

    def _over(self) -> bool:
        if self.ba_state != _DONE or self.ab_state not in (_DONE, _DEAD):
            return False
        if self.ab_state == _DEAD and self.linger > 0:
            # The client may still be sending what the program will never read: read and
            # drop it a while, so that our close does not send RST over the reply.
            self._close_service()
            self.phase = LINGER
            self._arm(time.monotonic() + self.linger)
            self._interest()
            self._linger_read()
            return self.phase == CLOSED
        self._finish()
        return True

    def _interest(self) -> None:
        tls_out = self.raw if self.tls is not None else self.ba
        if self.phase == LINGER:
            self._want(self.fd, True, False)
            return
        want_r = self._wants_client_input() or self.phase == HANDSHAKE
        self._want(self.fd, want_r, bool(tls_out) and not self._dead)
        if self.target is not None:
            connecting = self.phase == CONNECTING
            r = self.ba_state == _OPEN and len(self.ba) < self.bufsize and not connecting
            self._want(
                self.target.fileno(), r, connecting or (bool(self.ab) and self.ab_state != _DEAD)
            )
        if self.in_fd >= 0:
            self._want(self.in_fd, self.ab_state == _OPEN and not self.ab, bool(self.ab))
        if self.out_fd >= 0:
            self._want(self.out_fd, self.ba_state == _OPEN and len(self.ba) < self.bufsize, False)

    def _handshake(self) -> None:
        assert self.tls is not None and self.inc is not None and self.outg is not None
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.raw += self.outg.read()
                self._write_client()
                if self._dead:
                    self._fail("the client went away during the TLS handshake")
                    return
                raw = self._recv_raw() if self.c_r else None
                if self._dead:
                    self._fail("the client went away during the TLS handshake")
                    return
                if raw is None:
                    self._interest()
                    return
                if not raw:
                    self._fail("the client closed the connection during the TLS handshake")
                    return
                self.inc.write(raw)
            except (ssl.SSLError, ValueError) as exc:
                reason = getattr(exc, "reason", None) or str(exc)
                # The alert OpenSSL made (certificate_required, handshake_failure...) goes out
                # before the close, as it would from a socket BIO: the client learns why.
                self.raw += self.outg.read()
                with contextlib.suppress(OSError):
                    self.sock.send(self.raw, socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
                    self.sock.shutdown(socket.SHUT_WR)
                self._fail(f"TLS handshake failed: {reason}", linger=True)
                return
        # TLS 1.3 session tickets leave now, in the handshake's last flight (the client
        # socket has TCP_NODELAY, so the first reply never waits for their ACK).
        self.raw += self.outg.read()
        self.env = tlsconf.tls_environ(self.tls, self._warn)
        if self.redirect is not None:
            self.phase = CONNECTING
            self._connect()
        else:
            self._handshake_done()
        self.pump()

    def _warn(self, msg: str) -> None:
        self.hub.log(f"TLS from {self.peer}: {msg}")

    def _handshake_done(self) -> None:
        try:
            record = frontchan.encode("H", {"id": self.id, "env": self.env})
        except frontchan.ChannelError as exc:
            # A client certificate's names too long for the channel (values <= 4096 characters,
            # one record <= 8192 bytes): fail closed rather than start the program without
            # SSL_CLIENT_S_DN, which it may authorize by.
            self._fail(f"TLS facts too large to pass on: {exc}")
            return
        self.phase = WAITING
        self.when = 0.0  # the deadline is the parent's from here on
        self.hub.tell_encoded(record)

    def _linger_read(self) -> None:
        while self.c_r:
            raw = self._recv_raw()
            if raw is None and not self._dead:
                return
            if not raw:
                self._finish()
                return

    def _connect(self) -> None:
        assert self.redirect is not None
        family, addr = self.redirect
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self.hub.log(f"EMFILE: no fd for {self.peer}'s outbound connection")
            self._fail(f"redirect: {exc.strerror or exc}")
            return
        s.setblocking(False)
        # The relay writes what it read as one chunk: Nagle would hold replies for an ACK.
        with contextlib.suppress(OSError):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = s.connect_ex(addr)
        self.target = s
        if err not in (0, errno.EINPROGRESS):
            self._fail(f"redirect: {os.strerror(err)}")
            return
        if err == 0:
            self._connected()

    def _connected(self) -> None:
        assert self.target is not None
        err = self.target.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(f"redirect: {os.strerror(err)}")
            return
        self.phase = RELAY
        self.in_w, self.out_r = True, False
        self.hub.tell("H", {"id": self.id, "env": {}})
        self.when = 0.0
        if self.idle is not None:
            self._arm(time.monotonic() + self.idle)

    def _advance(self) -> bool:
        """Pass an EOF on once its buffer is empty."""
        progress = False
        if self.ab_state == _EOF and not self.ab:
            self._end_input()
            self.ab_state = _DONE
            progress = True
        if self.ba_state == _EOF and not self.ba:
            if self.tls is not None and not self.notified:
                assert self.inc is not None
                if self.ab_state == _OPEN and (self.inc.pending or self.tls.pending()):
                    return progress  # the client's buffered records first (_close_notify)
                self._close_notify()
                self._write_client()
                progress = True
            if self.tls is not None and self.raw:
                return progress  # the alert still on its way
            # The base socket's shutdown: TLS 1.3 (RFC 8446 6.1) lets the client go on
            # sending after our close_notify.
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
            self.ba_state = _DONE
            progress = True
        return progress

    def _arm(self, when: float) -> None:
        self.when = when
        self.hub.arm(self, when)

    def _fail(self, reason: str, linger: bool = False) -> None:
        """Before ``H``: ``F`` and close; ``linger``: after the client's unread bytes are read
        and dropped a while (a close with them unread is a RST, which can destroy the alert
        just sent before the client reads it)."""
        if linger and self.linger > 0 and not self._dead:
            self.quiet = True  # the id is over for the parent: no E at the end
            self._close_service()
            self.phase = LINGER
            self.c_r = True
            self._arm(time.monotonic() + min(self.linger, 1.0))
            self._interest()
            self.hub.tell("F", {"id": self.id, "reason": _printable(reason)})
            self._linger_read()
            return
        self._close_all()
        self.phase = CLOSED
        self.hub.tell("F", {"id": self.id, "reason": _printable(reason)})
        self.hub.ended(self)

    def _finish(self, told: bool = False) -> None:
        """After ``H`` (and ``S``/``N`` for a program, ``told``): close, ``E``."""
        if self.phase == CLOSED:
            return
        if self.phase == WAITING and not told:
            # The client went before the program was started: E only once S or N came,
            # which keeps the parent's order H, S/N, E.
            self._dead = True
            self._interest()
            return
        self._close_all()
        self.phase = CLOSED
        if not self.quiet:
            fields = {"id": self.id, "bytes_in": self.sent_ab, "bytes_out": self.sent_ba}
            self.hub.tell("E", fields)
        self.hub.ended(self)


def _printable(reason: str) -> str:
    """Printable ASCII, 200 characters at most: an OpenSSL reason or strerror never needs more."""
    return "".join(c if " " <= c <= "~" else "?" for c in reason[:200])
