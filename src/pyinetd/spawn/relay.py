"""A blocking, bidirectional byte relay between a client connection and a service.

Meant for a forked child that owns one connection: single-threaded, ``selectors`` over
non-blocking fds, at most ``bufsize`` bytes buffered per direction, half-close passed through.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import ssl
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pyinetd.signals import HANDLED_SIGNALS

if TYPE_CHECKING:
    from pyinetd.config import Service

Environ = dict[bytes, bytes]

__all__ = ["LINGER", "relay", "serve_connection"]

# RFC 8446 5.1 / RFC 5246 6.2.1: a TLS record carries at most 2**14 plaintext bytes. Writes to
# a TLS client are cut to this size because OpenSSL (without SSL_MODE_ENABLE_PARTIAL_WRITE, which
# CPython does not set) must be retried with the same length after WANT_READ/WANT_WRITE.
_TLS_RECORD = 16384
# After the service's output has been delivered but its input is gone, the client's unread data
# is read and discarded for at most this long before closing: closing a TCP socket with unread
# data sends RST (RFC 1122 4.2.2.13), and a RST can destroy response bytes the client has not
# received yet (the same reason as Apache's lingering_close).
LINGER = 2.0

_R = selectors.EVENT_READ
_W = selectors.EVENT_WRITE

# Direction states. a->b: OPEN -> EOF (EOF read, buffer draining) -> DONE (EOF passed on), or DEAD
# (the service can no longer take input; buffered bytes dropped). b->a: OPEN -> EOF -> DONE.
_OPEN, _EOF, _DONE, _DEAD = "open", "eof", "done", "dead"


class _End:
    """One service-side fd: a socket (MSG_NOSIGNAL sends, shutdown half-close) or a pipe."""

    def __init__(self, obj: int | socket.socket) -> None:
        self.sock: socket.socket | None
        if isinstance(obj, socket.socket):
            self.sock = obj
        elif _is_socket(obj):
            self.sock = socket.socket(fileno=obj)
        else:
            self.sock = None
        if self.sock is not None:
            self.sock.setblocking(False)
            self.fd = self.sock.fileno()
        else:
            assert isinstance(obj, int)
            os.set_blocking(obj, False)
            self.fd = obj
        self.closed = False

    def read(self, n: int) -> bytes:
        return self.sock.recv(n) if self.sock is not None else os.read(self.fd, n)

    def write(self, data: bytes | bytearray) -> int:
        if self.sock is not None:
            return self.sock.send(data, socket.MSG_NOSIGNAL)
        return os.write(self.fd, data)

    def end_input(self) -> None:
        """Tell the service there is no more input: shutdown(SHUT_WR) a socket, close a pipe."""
        if self.sock is not None:
            # ENOTCONN means the peer is already gone, which says the same thing.
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
        else:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.sock is not None:
            self.sock.close()
        else:
            os.close(self.fd)


def _is_socket(fd: int) -> bool:
    return stat.S_ISSOCK(os.fstat(fd).st_mode)


def relay(
    a: socket.socket,
    b_in: int | socket.socket,
    b_out: int | socket.socket | None = None,
    *,
    idle_timeout: float | None = None,
    bufsize: int = 65536,
) -> tuple[int, int]:
    """Copy bytes a->b_in and b_out->a until both directions end; close everything; return counts.

    ``a`` is the client connection, plain or an ``ssl.SSLSocket`` after its handshake. The service
    is one socket (``b_in`` alone) or a pipe pair (``b_in``: its stdin, ``b_out``: its stdout).
    The relay takes ownership of every endpoint and closes all of them before returning. The
    returned counts are bytes delivered a->b and b->a. SIGPIPE must be ignored in the calling
    process (Python's default) since writes to a pipe or through OpenSSL cannot use MSG_NOSIGNAL.
    """
    if bufsize < 1:
        raise ValueError("bufsize must be at least 1")
    if idle_timeout is not None and idle_timeout <= 0:
        raise ValueError("idle_timeout must be positive")
    single = b_out is None or _fileno(b_out) == _fileno(b_in)
    if single and not isinstance(b_in, socket.socket) and not _is_socket(b_in):
        raise ValueError("a service fd without b_out must be a socket (pipes need both ends)")
    state = _Relay(a, b_in, None if single else b_out, bufsize)
    try:
        return state.run(idle_timeout)
    finally:
        state.close()


def _fileno(obj: int | socket.socket) -> int:
    return obj.fileno() if isinstance(obj, socket.socket) else obj


class _Relay:
    def __init__(
        self,
        a: socket.socket,
        b_in: int | socket.socket,
        b_out: int | socket.socket | None,
        bufsize: int,
    ) -> None:
        self.a = a
        self.a_fd = a.fileno()
        self.tls = isinstance(a, ssl.SSLSocket)  # cleared once both close_notify are through
        self.b_in = _End(b_in)
        self.b_out = self.b_in if b_out is None else _End(b_out)
        a.setblocking(False)
        self.bufsize = bufsize
        self.sel = selectors.DefaultSelector()
        self.ab = bytearray()  # client -> service
        self.ba = bytearray()  # service -> client
        self.ab_state = _OPEN
        self.ba_state = _OPEN
        self.a_dead = False
        # TLS reads can need the socket writable and writes readable (renegotiation, TLS 1.3
        # KeyUpdate): each remembers which readiness it is waiting for.
        self.a_read_wait = _R
        self.a_write_wait = _W
        self.a_write_len = 0  # TLS: length of a write that must be retried unchanged
        self.notify_sent = False  # TLS: close_notify produced (it may still sit in raw_out)
        self.raw_out = b""  # TLS: close_notify bytes not yet written to the socket
        self.notify_wait = 0  # readiness the end of our output is waiting for
        self.sent_ab = 0
        self.sent_ba = 0
        self.last_activity = time.monotonic()

    # --- the loop -------------------------------------------------------------------------------

    def run(self, idle_timeout: float | None) -> tuple[int, int]:
        while True:
            self._advance()
            if self.a_dead:
                break
            if self.ab_state in (_DONE, _DEAD) and self.ba_state == _DONE:
                if self.ab_state == _DEAD:
                    self._linger(idle_timeout)
                break
            interest = self._interest()
            # Data already decrypted inside the SSL object is invisible to select(): if there is
            # any and room for it, read it now instead of waiting for the socket.
            tls_pending = self._want_read_a() and self.a_read_wait == _R and self._pending() > 0
            if not interest and not tls_pending:
                break  # nothing could ever wake us; ending beats hanging
            self._update_selector(interest)
            timeout: float | None = 0 if tls_pending else None
            if idle_timeout is not None and not tls_pending:
                timeout = max(0.0, self.last_activity + idle_timeout - time.monotonic())
            events = self.sel.select(timeout)
            if not events and not tls_pending:
                idle = time.monotonic() - self.last_activity
                if idle_timeout is not None and idle >= idle_timeout:
                    break
                continue
            ready = {key.fd: mask for key, mask in events}
            self._dispatch(ready, tls_pending)
        return self.sent_ab, self.sent_ba

    def _dispatch(self, ready: dict[int, int], tls_pending: bool) -> None:
        a_mask = ready.get(self.a_fd, 0)
        if self._want_read_a() and (tls_pending or a_mask & self.a_read_wait):
            self._read_a()
        if not self.a_dead and self.ba and a_mask & self.a_write_wait:
            self._write_a()
        b_in_mask = 0 if self.b_in.closed else ready.get(self.b_in.fd, 0)
        if self.ab and b_in_mask & _W:
            self._write_b()
        if self._b_in_is_pipe() and b_in_mask & _R:
            self._kill_ab()
        if self._want_read_b() and ready.get(self.b_out.fd, 0) & _R:
            self._read_b()

    def _advance(self) -> None:
        """Take the steps that need no new readiness: passing EOF on once a buffer is empty."""
        if self.ab_state == _EOF and not self.ab:
            self._unregister(self.b_in)
            self.b_in.end_input()
            self.ab_state = _DONE
        if self.ba_state == _EOF and not self.ba and not self.a_dead:
            self._end_output_to_a()

    def _want_read_a(self) -> bool:
        return not self.a_dead and self.ab_state == _OPEN and len(self.ab) < self.bufsize

    def _b_in_is_pipe(self) -> bool:
        return self.b_in.sock is None and self.b_in is not self.b_out and not self.b_in.closed

    def _want_read_b(self) -> bool:
        return self.ba_state == _OPEN and len(self.ba) < self.bufsize

    def _interest(self) -> dict[int, int]:
        want: dict[int, int] = {}

        def add(fd: int, events: int) -> None:
            want[fd] = want.get(fd, 0) | events

        if self._want_read_a():
            add(self.a_fd, self.a_read_wait)
        if self.ba:
            add(self.a_fd, self.a_write_wait)
        if self.notify_wait:
            add(self.a_fd, self.notify_wait)
        if self.ab and not self.b_in.closed:
            add(self.b_in.fd, _W)
        elif self._b_in_is_pipe() and self.ab_state == _OPEN:
            # A pipe's write end is never readable, so read interest fires only with POLLERR,
            # i.e. when the service has closed its stdin or exited: noticed even while idle.
            add(self.b_in.fd, _R)
        if self._want_read_b():
            add(self.b_out.fd, _R)
        return want

    def _update_selector(self, want: dict[int, int]) -> None:
        registered = {fd: key.events for fd, key in self.sel.get_map().items()}
        for fd in registered.keys() - want.keys():
            self.sel.unregister(fd)
        for fd, events in want.items():
            if fd not in registered:
                self.sel.register(fd, events)
            elif registered[fd] != events:
                self.sel.modify(fd, events)

    def _unregister(self, end: _End) -> None:
        # Before a close: a stale epoll registration would outlive the fd number.
        if end.fd in self.sel.get_map():
            self.sel.unregister(end.fd)

    # --- client side ----------------------------------------------------------------------------

    def _pending(self) -> int:
        return self.a.pending() if isinstance(self.a, ssl.SSLSocket) else 0

    def _read_a(self) -> None:
        try:
            data = self.a.recv(self.bufsize - len(self.ab))
        except (BlockingIOError, ssl.SSLWantReadError):
            self.a_read_wait = _R
            return
        except ssl.SSLWantWriteError:
            self.a_read_wait = _W
            return
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            # close_notify, or (with suppress_ragged_eofs=False) a TCP EOF without it: either way
            # the client sends nothing more.
            data = b""
        except OSError:
            self.a_dead = True  # ECONNRESET, ETIMEDOUT, a TLS protocol error, ...
            return
        self.a_read_wait = _R
        if not data:
            self.ab_state = _EOF
            return
        self.ab += data
        self.last_activity = time.monotonic()

    def _write_a(self) -> None:
        n = self.a_write_len or min(len(self.ba), _TLS_RECORD) if self.tls else len(self.ba)
        chunk = self.ba[:n]
        try:
            # SSLSocket.send() refuses flags; OpenSSL's own send() cannot be told MSG_NOSIGNAL.
            sent = self.a.send(chunk) if self.tls else self.a.send(chunk, socket.MSG_NOSIGNAL)
        except (BlockingIOError, ssl.SSLWantWriteError):
            self.a_write_wait, self.a_write_len = _W, n
            return
        except ssl.SSLWantReadError:
            self.a_write_wait, self.a_write_len = _R, n
            return
        except OSError:
            self.a_dead = True  # EPIPE, ECONNRESET
            return
        self.a_write_wait, self.a_write_len = _W, 0
        del self.ba[:sent]
        self.sent_ba += sent
        self.last_activity = time.monotonic()

    def _end_output_to_a(self) -> None:
        """Pass the service's EOF on: TLS close_notify (best effort), then TCP shutdown(SHUT_WR)."""
        if self.tls and not self.notify_sent:
            if self.ab_state == _OPEN and self._pending() > 0:
                # Decrypted client data waits inside OpenSSL; SSL_shutdown() would trip over it
                # (APPLICATION_DATA_AFTER_CLOSE_NOTIFY). Let _read_a() take it first.
                return
            self.notify_sent = True
            self.raw_out = self._close_notify()
        if self.raw_out:
            try:
                # Already-encrypted alert bytes: the base-class send() bypasses OpenSSL.
                sent = socket.socket.send(self.a, self.raw_out, socket.MSG_NOSIGNAL)
            except BlockingIOError:
                self.notify_wait = _W
                return
            except OSError:
                self.a_dead = True
                return
            self.raw_out = self.raw_out[sent:]
            if self.raw_out:
                self.notify_wait = _W
                return
        self.notify_wait = 0
        # The base-class method: SSLSocket.shutdown() would also drop the SSL object, while
        # TLS 1.3 (RFC 8446 6.1) lets the client keep sending after our close_notify. ENOTCONN
        # after a reset is ignored: the next read or write on a reports it.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self.a, socket.SHUT_WR)
        self.ba_state = _DONE

    def _close_notify(self) -> bytes:
        """Make OpenSSL produce its close_notify alert, without reading; return the alert bytes.

        SSLSocket.unwrap() runs SSL_shutdown() twice: the first call sends close_notify, the
        second reads from the socket for the client's, and any application data it meets there
        is discarded with APPLICATION_DATA_AFTER_CLOSE_NOTIFY; on loopback a client reacting to
        the first call's alert can beat the second. So for the duration of unwrap() the fd
        number OpenSSL uses (CPython gives it a BIO_NOCLOSE socket BIO on that number) is
        pointed at a private non-blocking socketpair: the alert lands there, the read finds
        nothing (EAGAIN, i.e. SSLWantReadError), and the real socket is put back untouched.
        """
        assert isinstance(self.a, ssl.SSLSocket)
        if self.a_fd in self.sel.get_map():
            self.sel.unregister(self.a_fd)  # re-registered by the next _update_selector()
        inheritable = os.get_inheritable(self.a_fd)
        saved = os.dup(self.a_fd)
        decoy, tap = socket.socketpair()
        try:
            decoy.setblocking(False)
            tap.setblocking(False)
            os.dup2(decoy.fileno(), self.a_fd, inheritable=inheritable)
            try:
                self.a.unwrap()
            except ssl.SSLWantReadError:
                pass  # the expected outcome: alert written, client's not (yet) seen
            except OSError:
                pass  # the SSL object had already failed: there is no alert to send
            else:
                # The client's close_notify had already been processed: TLS is fully closed.
                self.tls = False
                if self.ab_state == _OPEN:
                    self.ab_state = _EOF
            finally:
                os.dup2(saved, self.a_fd, inheritable=inheritable)
            alert = bytearray()
            with contextlib.suppress(BlockingIOError):
                while chunk := tap.recv(4096):
                    alert += chunk
            return bytes(alert)
        finally:
            os.close(saved)
            decoy.close()
            tap.close()

    def _linger(self, idle_timeout: float | None) -> None:
        """Discard client input until its EOF, briefly, so closing does not reset the response."""
        limit = LINGER if idle_timeout is None else min(LINGER, idle_timeout)
        deadline = time.monotonic() + limit
        self._update_selector({self.a_fd: _R})
        while (remaining := deadline - time.monotonic()) > 0:
            if not self.sel.select(remaining):
                return
            try:
                # Raw bytes: after close_notify nothing from the client needs decrypting.
                if not socket.socket.recv(self.a, 65536):
                    return
            except BlockingIOError:
                continue
            except OSError:
                return

    # --- service side ---------------------------------------------------------------------------

    def _read_b(self) -> None:
        try:
            data = self.b_out.read(self.bufsize - len(self.ba))
        except BlockingIOError:
            return
        except OSError:
            # ECONNRESET from a redirect target or a socketpair whose holder exited with unread
            # input: the service is gone. Deliver what it produced, take no more input.
            self.ba_state = _EOF
            self._kill_ab()
            return
        if not data:
            self.ba_state = _EOF
            return
        self.ba += data
        self.last_activity = time.monotonic()

    def _write_b(self) -> None:
        try:
            sent = self.b_in.write(self.ab)
        except BlockingIOError:
            return
        except OSError:
            self._kill_ab()  # EPIPE: the service closed its input or exited.
            return
        del self.ab[:sent]
        self.sent_ab += sent
        self.last_activity = time.monotonic()

    def _kill_ab(self) -> None:
        if self.ab_state in (_DONE, _DEAD):
            return
        self.ab_state = _DEAD
        self.ab.clear()
        if self.b_in is not self.b_out:
            self._unregister(self.b_in)
        self.b_in.end_input()

    def close(self) -> None:
        self.sel.close()
        self.a.close()
        self.b_in.close()
        self.b_out.close()


def serve_connection(
    service: Service,
    conn: int,
    stderr: int,
    env: Environ,
    ctx: ssl.SSLContext | None,
    peer: str,
    settle: Callable[[Service], None],
    start: Callable[[Service, Environ, int, int], int],
    keep: frozenset[int] = frozenset(),
    report: tuple[int, float] | None = None,
) -> int:  # pragma: no cover - runs in the forked relay process
    """The body of a TLS or redirect service's relay process (spawn.spawn_relay forks it):
    close what the parent had open, take the service's process settings (``settle``) before
    a byte is read, handshake, then relay to the service's program (started by ``start``
    on a pair of pipes) or the redirect target. Returns the exit code.

    ``report`` (fd, seconds): the handshake's deadline, and where to say it is complete
    (one byte, then the fd is closed, before the client's first record is read or anything
    is started): the parent counts the connection as pending until then and kills the relay
    at its own deadline, a little earlier."""
    from pyinetd.protocols import tlsconf  # imported by the caller, before the privileges go

    signal.set_wakeup_fd(-1)
    os.dup2(stderr, 2)
    # Everything else the parent had open (listeners, other clients, its loop) is closed
    # here: a relay must not keep a closed port or another client's connection alive.
    # (``keep``: the service's sandbox fds, which ``settle`` applies and which are
    # close-on-exec.)
    report_fd, timeout = report if report is not None else (-1, None)
    kept = {0, 1, 2, conn, report_fd, *keep}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in kept:
            with contextlib.suppress(OSError):
                os.close(fd)
    for sig in HANDLED_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    # The service's session, limits and identity before the first byte from the client: the
    # handshake parses what a stranger sends, and the relay holds nothing that needs root
    # (the key is already loaded in ``ctx``). The program it starts inherits all of it.
    settle(service)
    sock = socket.socket(fileno=conn)
    sock.setblocking(True)
    # The relay writes what it has read as one TLS record or one chunk: Nagle's wait for the
    # peer's ACK (which the peer delays up to 40 ms) only holds a reply back, the first after
    # the handshake every time (stunnel sets TCP_NODELAY on both of its sockets for this).
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client: socket.socket = sock
    if service.tls is not None and ctx is None:
        # Fail closed: a TLS service never serves a client without its handshake.
        os.write(2, f"TLS service without a TLS context: refusing {peer}\n".encode())
        return 1
    if ctx is not None and service.tls is not None:
        if timeout is None:
            timeout = service.tls.handshake_timeout
        try:
            client = tlsconf.handshake(ctx, sock, timeout)
        except (OSError, ValueError) as exc:
            os.write(2, f"TLS handshake with {peer} failed: {exc}\n".encode(errors="replace"))
            return 1
        if report_fd >= 0:
            with contextlib.suppress(OSError):  # (the parent gone: nothing to tell)
                os.write(report_fd, b"\x01")
            os.close(report_fd)
        if service.banner:
            # Inside TLS, as the first record: in plaintext between the hellos it broke every
            # handshake. Bounded, as the parent's plaintext banner is (MSG_DONTWAIT there).
            try:
                client.settimeout(timeout)
                client.sendall(service.banner)
                client.settimeout(None)
            except (OSError, ValueError) as exc:
                os.write(2, f"TLS banner to {peer}: {exc}\n".encode(errors="replace"))
                return 1

        def warn(msg: str) -> None:
            os.write(2, f"TLS from {peer}: {msg}\n".encode(errors="replace"))

        tls_env = tlsconf.tls_environ(client, warn)
        env = {**env, **{k.encode(): v.encode() for k, v in tls_env.items()}}
    if service.redirect is not None:
        host, port = service.redirect
        try:
            target = socket.create_connection((host, port), timeout=10)
            target.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            os.write(2, f"redirect {peer} -> {host}:{port}: {exc}\n".encode(errors="replace"))
            client.close()
            return 1
        relay(client, target, idle_timeout=service.timeout)
        return 0
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    pid = start(service, env, in_r, out_w)
    os.close(in_r)
    os.close(out_w)
    relay(client, in_w, out_r)
    _, status = os.waitpid(pid, 0)
    return max(0, os.waitstatus_to_exitcode(status)) if os.WIFEXITED(status) else 1
