"""One WebSocket connection inside a service's front (front.py): its TLS (wss://), its
websocket.Session, the program's two pipes, and the messages to the parent.

The same entry points as frontconn.Conn, for the same loop: ``start``, ``on_event``,
``on_timer``, ``attach`` (``S``), ``refuse`` (``N``), ``abort`` (``K``), plus ``exited`` (``X``:
the program's exit status, from which the Close code comes). The order towards the parent is
the channel's: the upgrade request read and good -> ``H`` with its environment; a request
refused here (426, 404, 403...) or by the parent (``C``'s ``refuse``), a TLS failure or a client
gone before that -> ``F``; after ``H``, ``E`` once ``S`` or ``N`` came and the connection is over.
Buffers are bounded: the session holds at most its high-water mark for either side (the other
side is not read meanwhile), and ciphertext at most ``bufsize``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import time
from typing import Any, Protocol

from pyinetd.config.wsconf import WebSocketSettings, refusal
from pyinetd.protocols import tlsconf
from pyinetd.protocols.websocket import Phase, Session

__all__ = ["WSConn"]

_RECV = 65536
_AGAIN = (BlockingIOError, InterruptedError)
# Answers for the program the parent could not start (N).
NO_PROGRAM = (503, "the service cannot start its program now\n")


class Hub(Protocol):
    def watch(self, fd: int, read: bool, write: bool, conn: Any) -> None: ...
    def tell(self, kind: str, fields: dict[str, Any]) -> None: ...
    def arm(self, conn: Any, when: float) -> None: ...
    def ended(self, conn: Any) -> None: ...
    def log(self, line: str) -> None: ...


class ClientStream:
    """The client's side of a connection: its socket, with TLS over two MemoryBIOs when the
    service has ``tls:`` (a protocol of our own: the loop never blocks in a handshake)."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext | None) -> None:
        self.sock, self.fd = sock, sock.fileno()
        self.tls: ssl.SSLObject | None = None
        self.inc = self.outg = None
        if ctx is not None:
            self.inc, self.outg = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.tls = ctx.wrap_bio(self.inc, self.outg, server_side=True)
        self.handshaking = ctx is not None
        self.out = bytearray()  # for the socket: ciphertext under TLS
        self.c_r = self.c_w = True  # may be readable / writable
        self.eof = False
        self.dead = False  # the socket failed (reset, EPIPE, a TLS error): nothing more to send

    def recv_raw(self) -> bytes | None:
        """Bytes from the socket; b"" at EOF (or a failure); None when none wait."""
        if not self.c_r or self.dead:
            return None
        try:
            data = self.sock.recv(_RECV)
        except _AGAIN:
            self.c_r = False
            return None
        except OSError:
            self.dead = True
            return b""
        return data

    def handshake(self) -> str | bool:
        """Take the TLS handshake on: True once done, False while it waits for the client, or
        why it failed."""
        assert self.tls is not None and self.inc is not None and self.outg is not None
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.out += self.outg.read()
                self.send()
                raw = self.recv_raw()
                if raw is None and not self.dead:
                    return False
                if not raw:
                    return "the client went away during the TLS handshake"
                self.inc.write(raw)
            except (ssl.SSLError, ValueError) as exc:
                return f"TLS handshake failed: {getattr(exc, 'reason', None) or exc}"
        self.out += self.outg.read()  # TLS 1.3 session tickets, in the last flight
        self.handshaking = False
        return True

    def read(self) -> bytes | None:
        """Plaintext from the client; b"" at its end; None when none waits."""
        if self.tls is None:
            return self.recv_raw()
        assert self.inc is not None
        try:
            return self.tls.read(_RECV)
        except ssl.SSLWantReadError:
            raw = self.recv_raw()
            if raw is None:
                return None
            if raw:
                self.inc.write(raw)
            else:
                self.inc.write_eof()
            return self.read()
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return b""
        except (ssl.SSLError, ValueError):
            self.dead = True  # a TLS protocol error: the stream is over
            return b""

    def write(self, data: bytes) -> None:
        if self.dead or not data:
            return
        if self.tls is None:
            self.out += data
            return
        assert self.outg is not None
        try:
            self.tls.write(data)
        except (ssl.SSLError, ValueError):
            self.dead = True
        self.out += self.outg.read()

    def send(self) -> bool:
        if not self.out or not self.c_w or self.dead:
            return False
        try:
            sent = self.sock.send(self.out, socket.MSG_NOSIGNAL)
        except _AGAIN:
            self.c_w = False
            return False
        except OSError:
            self.dead = True
            self.out = bytearray()
            return True
        if sent < len(self.out):
            self.c_w = False
        del self.out[:sent]
        if not self.out:
            self.out = bytearray()  # an idle connection gives its buffer's capacity back
        return sent > 0

    def shut(self) -> None:
        """close_notify (TLS), then shutdown(SHUT_WR): our side is over."""
        if self.tls is not None and not self.dead and not self.handshaking:
            assert self.outg is not None
            with contextlib.suppress(ssl.SSLError, ValueError):
                self.tls.unwrap()
            self.out += self.outg.read()
            self.send()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.dead = True
        self.out = bytearray()
        self.sock.close()
        self.tls = None
        self.inc = self.outg = None


class WSConn:
    """One client's WebSocket connection, from ``C`` to its ``F`` or ``E``."""

    def __init__(
        self,
        hub: Hub,
        cid: int,
        sock: socket.socket,
        ctx: ssl.SSLContext | None,
        *,
        settings: WebSocketSettings,
        peer: tuple[str, int],
        local: tuple[str, int] | None,
        deadline: float,
        refuse: dict[str, Any] | None = None,
        messages: tuple[str, str] = ("", ""),
        bufsize: int = 65536,
        linger: float = 2.0,
    ) -> None:
        self.hub, self.id, self.fd = hub, cid, sock.fileno()
        self.bufsize, self.linger = bufsize, linger
        self.messages = messages  # the service's deny_message and busy_message, for N
        self.peer = f"{peer[0]}:{peer[1]}"
        now = time.monotonic()
        answer = (int(refuse["status"]), str(refuse["body"])) if refuse else None
        self.refusal = str(refuse.get("reason", "")) if refuse else ""
        self.session = Session(
            settings,
            peer=peer,
            local=local,
            tls=ctx is not None,
            now=now,
            deadline=now + deadline,
            refuse=answer,
        )
        self.deadline = now + deadline
        self.client = ClientStream(sock, ctx)
        self.tls_env: dict[str, str] = {}
        self.to_prog = bytearray()
        self.in_fd = self.out_fd = -1
        self.in_w = self.out_r = False
        self.told_h = False
        self.answered = False  # S or N came
        self.lingering = False
        self.ending = False  # _end ran: only the linger and the last message are left
        self.closed = False
        self.bytes_in = self.bytes_out = 0
        self.masks: dict[int, tuple[bool, bool]] = {}
        self.when = 0.0
        self._arm(self.deadline)

    # --- entry points from the loop ------------------------------------------------------------

    def start(self) -> None:
        self.pump()

    def on_event(self, fd: int, readable: bool, writable: bool) -> None:
        if fd == self.fd:
            self.client.c_r |= readable
            self.client.c_w |= writable
        elif fd == self.in_fd:
            if readable:  # POLLERR on a pipe's write end: the program closed its stdin
                self._close_stdin()
            self.in_w |= writable
        elif fd == self.out_fd:
            self.out_r |= readable
        self.pump()

    def on_timer(self, now: float) -> None:
        if self.lingering:
            self._finish()
            return
        if self.client.handshaking and now >= self.deadline:
            self._fail("TLS handshake not completed in time")
            return
        self.session.tick(now)
        self.pump()

    def attach(self, stdin: int, stdout: int) -> None:
        """``S``: the program runs; answer 101 and relay."""
        self.answered = True
        if self.closed or self.session.phase is not Phase.UPGRADE or self.client.dead:
            os.close(stdin)
            os.close(stdout)
            if self.ending and not self.lingering:
                self._finish()
            self.pump()
            return
        os.set_blocking(stdin, False)
        os.set_blocking(stdout, False)
        self.in_fd, self.out_fd = stdin, stdout
        self.in_w = self.out_r = True
        self.session.accept()
        self.pump()

    def refuse(self, reason: str | None = None) -> None:
        """``N`` (or an ``S`` whose fds were lost): no program. Refused by the parent's
        admission at ``H`` (``reason`` one of admission.Refusal's): its HTTP answer
        (wsconf.refusal); otherwise 503. Then close, ``E``."""
        self.answered = True
        answer = refusal(reason or "", *self.messages)
        if answer is not None:
            self.session.refuse(answer["status"], answer["body"])
        else:
            self.session.refuse(*NO_PROGRAM)
        if self.ending and not self.lingering:
            self._finish()
        self.pump()

    def exited(self, code: int | None, signal: int | None) -> None:
        """``X``: the program's exit status (the Close code follows from it)."""
        self.session.tick(time.monotonic())
        self.session.program_exit(code, signal)
        self.pump()

    def abort(self) -> None:
        """``K``: end now, telling the parent nothing more."""
        self._close_all()
        self.closed = True
        self.hub.ended(self)

    # --- the pump ------------------------------------------------------------------------------

    def pump(self) -> None:
        if self.closed or (self.ending and not self.lingering):
            return
        if self.lingering:
            self._linger_read()
            return
        if self.client.handshaking:
            done = self.client.handshake()
            if isinstance(done, str):
                self._fail(done)
                return
            if not done:
                self._interest()
                return
            assert self.client.tls is not None
            self.tls_env = tlsconf.tls_environ(self.client.tls, self._warn)
        s = self.session
        s.tick(time.monotonic())  # the session's clock: its Close and ping deadlines count from now
        progress = True
        while progress and not self.closed:
            progress = self._read_client()
            if s.phase is Phase.UPGRADE and not self.told_h:
                self.told_h = True
                self.hub.tell("H", {"id": self.id, "env": s.environment(self.tls_env)})
            for line in s.take_log():
                self.hub.log(f"websocket {self.peer}: {line}")
            progress |= self._write_client()
            progress |= self._write_program()
            progress |= self._read_program()
        if self.closed:
            return
        if s.phase is Phase.CLOSED and (not self.client.out or self.client.dead):
            self._end()
            return
        when = s.next_deadline()
        if when is not None and when != self.when:
            self._arm(when)
        self._interest()

    def _interest(self) -> None:
        s, c = self.session, self.client
        read = (
            not c.eof
            and not c.dead
            and (c.handshaking or (s.phase is not Phase.CLOSED and s.wants_client_input))
        )
        self._want(self.fd, read, bool(c.out) and not c.dead)
        if self.in_fd >= 0:
            self._want(self.in_fd, not self.to_prog, bool(self.to_prog))
        if self.out_fd >= 0:
            self._want(self.out_fd, s.wants_program_output, False)

    def _want(self, fd: int, read: bool, write: bool) -> None:
        if self.masks.get(fd, (False, False)) != (read, write):
            self.masks[fd] = (read, write)
            self.hub.watch(fd, read, write, self)

    # --- the client side -----------------------------------------------------------------------

    def _warn(self, msg: str) -> None:
        self.hub.log(f"TLS from {self.peer}: {msg}")

    def _read_client(self) -> bool:
        s, c = self.session, self.client
        if c.eof or s.phase is Phase.CLOSED or not s.wants_client_input:
            return False
        data = c.read()
        if data is None:
            return False
        if not data:
            c.eof = True
            s.client_eof()
            return True
        self.bytes_in += len(data)
        s.receive_client(data)
        return True

    def _write_client(self) -> bool:
        data = self.session.to_client()
        self.bytes_out += len(data)
        self.client.write(data)
        return self.client.send() or bool(data)

    # --- the program's side --------------------------------------------------------------------

    def _write_program(self) -> bool:
        if self.in_fd < 0:
            self.session.to_program()  # (no program: nothing to give it)
            return False
        self.to_prog += self.session.to_program()
        progress = False
        if self.to_prog and self.in_w:
            try:
                n = os.write(self.in_fd, self.to_prog)
            except _AGAIN:
                self.in_w = False
                n = 0
            except OSError:  # EPIPE: the program closed its stdin or exited
                self._close_stdin()
                return True
            if n < len(self.to_prog):
                self.in_w = False
            del self.to_prog[:n]
            progress = n > 0
        if self.session.end_stdin and not self.to_prog:
            self._close_stdin()
            progress = True
        return progress

    def _read_program(self) -> bool:
        if self.out_fd < 0 or not self.out_r or not self.session.wants_program_output:
            return False
        try:
            data = os.read(self.out_fd, _RECV)
        except _AGAIN:
            self.out_r = False
            return False
        except OSError:
            data = b""
        if not data:
            self._close_fd(self.out_fd)
            self.out_fd = -1
            self.session.program_eof()
            return True
        if len(data) < _RECV:
            self.out_r = False
        self.session.receive_program(data)
        return True

    def _close_stdin(self) -> None:
        if self.in_fd >= 0:
            self._close_fd(self.in_fd)
            self.in_fd = -1
        self.to_prog = bytearray()

    # --- the end -------------------------------------------------------------------------------

    def _end(self) -> None:
        """The session is over and its last bytes are sent: close_notify, shutdown, a linger,
        then ``F`` (before ``H``) or ``E`` (once ``S`` or ``N`` came: the parent's order is H,
        S/N, E)."""
        if self.ending:
            return
        self.ending = True
        self._close_program()
        self.client.shut()
        if self.client.dead or self.client.eof or self.linger <= 0:
            self._finish()
            return
        # Read and drop what the client still sends a while: our close must not send an RST
        # over the last frames or the refusal (RFC 1122 4.2.2.13).
        self.lingering = True
        self._arm(time.monotonic() + self.linger)
        self._want(self.fd, True, False)
        self._linger_read()

    def _linger_read(self) -> None:
        while True:
            raw = self.client.recv_raw()
            if raw is None and not self.client.dead:
                return
            if not raw:
                self._finish()
                return

    def _finish(self) -> None:
        """The client is done with: the last message, unless ``S``/``N`` is still due."""
        if self.closed:
            return
        self.lingering = False
        if not self.told_h:
            status = self.session.refused
            if self.refusal:
                self._fail(f"refused: {self.refusal}")
            elif status is not None:
                self._fail(f"websocket: answered {status}")
            else:
                self._fail("websocket: no complete upgrade request")
            return
        if self.fd in self.masks or not self.client.dead:
            self._close_client()
        if not self.answered:
            return  # attach() or refuse() comes back here
        self._close_all()
        self.closed = True
        self.hub.tell("E", {"id": self.id, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out})
        self.hub.ended(self)

    def _fail(self, reason: str) -> None:
        self._close_all()
        self.closed = True
        self.hub.tell("F", {"id": self.id, "reason": reason[:200]})
        self.hub.ended(self)

    def _arm(self, when: float) -> None:
        self.when = when
        self.hub.arm(self, when)

    def _close_fd(self, fd: int) -> None:
        if fd in self.masks:
            del self.masks[fd]
            self.hub.watch(fd, False, False, None)
        with contextlib.suppress(OSError):
            os.close(fd)

    def _close_program(self) -> None:
        for fd in (self.in_fd, self.out_fd):
            if fd >= 0:
                self._close_fd(fd)
        self.in_fd = self.out_fd = -1

    def _close_client(self) -> None:
        if self.fd in self.masks:
            del self.masks[self.fd]
            self.hub.watch(self.fd, False, False, None)
        self.client.close()

    def _close_all(self) -> None:
        self._close_program()
        self._close_client()
