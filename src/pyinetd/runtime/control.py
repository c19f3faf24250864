"""Small request/response servers inside the loop (control socket, metrics) and the client.

The control socket is a unix stream socket, mode 0600. A client sends one line (`status`,
`reload`, `stop`) and reads one JSON object back; the connection then closes. The metrics
endpoint answers `GET /metrics` in the Prometheus text format over HTTP/1.0.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import selectors
import socket
import stat
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyinetd.log import event
from pyinetd.runtime.admission import StageSlots

REQUEST_MAX = 8192
CLIENT_DEADLINE = 5.0  # seconds a control or metrics client may take to send its request
# Clients still sending their request or reading the answer, at most, per server and per source
# address; more are closed at accept. Each costs the parent an fd for up to CLIENT_DEADLINE, so a
# slowloris on the metrics port (or the control socket) must not pin the parent at its fd limit.
MAX_CLIENTS = 32
MAX_CLIENTS_PER_SOURCE = 8
# Seconds a request server stops accepting after accept() ran out of fds (EMFILE, ENFILE...):
# the selector is level-triggered, so a queued client would wake the loop again at once and
# spin it at 100% CPU for as long as the fds stay taken.
ACCEPT_PAUSE = 0.5
OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def default_control_path(config_path: str | Path) -> str:
    """Where the control socket of the instance running ``config_path`` lives by default.

    One name per configuration file (several instances may run), in $XDG_RUNTIME_DIR, else
    /run/pyinetd for root, else /tmp/pyinetd-UID.
    """
    # crc32, not hashlib: hashlib loads libcrypto, 3.5 MiB of the parent's memory.
    digest = f"{zlib.crc32(str(Path(config_path).resolve()).encode()):08x}"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        folder = Path(runtime)
    elif os.geteuid() == 0:
        folder = Path("/run/pyinetd")
    else:
        folder = Path(f"/tmp/pyinetd-{os.geteuid()}")
    return str(folder / f"pyinetd-{digest}.sock")


class UnsafeControlPath(OSError):
    """The control socket's folder, or the socket in it, could be another user's."""


def check_control_folder(path: str) -> None:
    """Refuse a control socket whose folder another user could own or write (as ssh-agent and
    tmux do): another user who made /tmp/pyinetd-UID first (mode 777) could swap in their own
    socket, and the victim's `pyinetd stop` would print "ok" to the impostor.

    The folder must be a real folder (not a symlink), owned by us or root, and not writable by
    group or others unless sticky (as /tmp: then only an entry's owner may replace it, and
    check_control_socket looks at the entry).
    """
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(folder):
            raise UnsafeControlPath(f"{folder}: a symbolic link; refusing it") from None
        raise
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if st.st_uid not in (os.geteuid(), 0):
        raise UnsafeControlPath(
            f"{folder}: owned by uid {st.st_uid}, not by uid {os.geteuid()} or root; "
            "refusing it (remove it, or give --control)"
        )
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise UnsafeControlPath(
            f"{folder}: writable by other users (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"refusing it (chmod go-w {folder})"
        )


def check_control_socket(path: str) -> None:
    """Refuse to talk to a socket that is not ours or root's: another user planted it."""
    check_control_folder(path)
    st = os.lstat(path)
    if not stat.S_ISSOCK(st.st_mode):
        raise UnsafeControlPath(f"{path}: not a socket")
    if st.st_uid not in (os.geteuid(), 0):
        raise UnsafeControlPath(
            f"{path}: owned by uid {st.st_uid}, not by uid {os.geteuid()} or root; "
            "not pyinetd's socket, refusing it"
        )


def bind_control(path: str) -> socket.socket:
    """Bind the control socket with mode 0600 (no moment where others could connect)."""
    carried = CARRIED.pop(path, None)
    if carried is not None:
        return carried
    folder = os.path.dirname(path)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    check_control_folder(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    sock.setblocking(False)
    return sock


class Later:
    """An answer a handler gives later (`pyinetd upgrade`: after its probe, from the next
    image): the exchange stops reading and drops its deadline until ``answer`` is called."""

    def __init__(self) -> None:
        self.exchange: Exchange | None = None
        self._early: bytes | None = None  # answered before the exchange took it

    def bind(self, exchange: Exchange) -> None:
        self.exchange = exchange
        if self._early is not None:
            exchange.reply(self._early)

    def answer(self, data: bytes) -> None:
        """Send ``data`` to the client that asked, then close."""
        if self.exchange is None:
            self._early = data
        else:
            self.exchange.reply(data)


Handler = Callable[[bytes], "bytes | Later"]
# Control sockets handed over by the image before this one (`pyinetd upgrade`), by path:
# bind_control takes one from here instead of binding, so `pyinetd status` never misses.
CARRIED: dict[str, socket.socket] = {}


class FdReserve:
    """One fd held open (/dev/null) so that it can be given up when the process is at its fd
    limit: closed just before an accept(), it makes room for one control client, so that
    `pyinetd status` and `stop` still answer while clients hold every other fd.
    ``restore`` takes it back once that client is gone."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._closed = False
        self.restore()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> bool:
        """Close the reserved fd; False when none was held."""
        if self._fd is None:
            return False
        os.close(self._fd)
        self._fd = None
        return True

    def restore(self) -> None:
        """Hold an fd again (best effort: at the limit, the next restore tries again)."""
        if self._fd is None and not self._closed:
            with contextlib.suppress(OSError):
                self._fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        self._closed = True
        self.release()


class RequestServer:
    """Accepts connections on ``sock``; each sends one request, gets one response, closes.

    At most ``max_clients`` clients at once, ``max_per_source`` from one address, each with
    ``deadline`` seconds to send a request of at most ``request_max`` bytes. When those
    are taken, the oldest client that has not sent its whole request yet (of the same address,
    when its address is the one at its bound) is closed for the new one: idle clients cannot
    lock a scraper out for their whole deadline; a client that has sent its
    request is never the one dropped. When accept() runs out of fds the server gives up its
    ``reserve`` fd (if it has one) to accept one client, else it stops accepting for
    ACCEPT_PAUSE seconds.
    """

    def __init__(
        self,
        *,
        sock: socket.socket,
        selector: selectors.BaseSelector,
        handle: Handler,
        terminator: bytes,
        call_later: Callable[[float, Callable[[], None]], Any],
        max_clients: int = MAX_CLIENTS,
        max_per_source: int = MAX_CLIENTS_PER_SOURCE,
        reserve: FdReserve | None = None,
        deadline: float = CLIENT_DEADLINE,
        request_max: int = REQUEST_MAX,
    ) -> None:
        self.sock = sock
        self._sel = selector
        self._handle = handle
        self._term = terminator
        self._call_later = call_later
        self._limits = (deadline, request_max)
        self._slots = StageSlots(max_clients, max_per_source)
        self._clients: dict[Exchange, str] = {}  # by age, oldest first: client -> its key
        self._reserve = reserve
        self._on_reserve: Exchange | None = None  # the client the reserve fd made room for
        self._resume: Any = None  # the timer that ends a pause
        self._pause_logged = False
        self.refused = 0  # clients closed at accept because the slots were taken
        self.dropped = 0  # idle clients closed to make room for a newer one
        selector.register(sock, selectors.EVENT_READ, self._on_accept)

    def _on_accept(self, mask: int) -> None:
        for _ in range(16):
            via_reserve = False
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in OUT_OF_FDS:
                    return
                conn_addr = self._accept_on_reserve()
                if conn_addr is None:
                    self._pause(exc)
                    return
                conn, addr = conn_addr
                via_reserve = True
            if not via_reserve:
                self._pause_logged = False
            # A unix peer has no address: the total alone bounds those.
            key = str(addr[0]) if isinstance(addr, tuple) else ""
            if not self._make_room(key):
                self.refused += 1
                conn.close()
                if via_reserve:
                    self._reserve_back()
                continue
            conn.setblocking(False)
            ex = Exchange(
                conn=conn,
                sel=self._sel,
                handle=self._handle,
                term=self._term,
                call_later=self._call_later,
                on_close=functools.partial(self._closed, key),
                deadline=self._limits[0],
                request_max=self._limits[1],
            )
            if ex.closed:
                self._slots.release(key)
                if via_reserve:
                    self._reserve_back()
                continue
            self._clients[ex] = key
            if via_reserve:
                self._on_reserve = ex

    def _accept_on_reserve(self) -> tuple[socket.socket, Any] | None:
        """At the fd limit: give up the reserve fd and accept one client into its place."""
        if self._reserve is None or not self._reserve.release():
            return None
        try:
            return self.sock.accept()
        except OSError:
            self._reserve.restore()
            return None

    def _reserve_back(self) -> None:
        """The client the reserve made room for is gone (or was refused): hold it again."""
        self._on_reserve = None
        if self._reserve is not None:
            self._reserve.restore()

    def _make_room(self, key: str) -> bool:
        """Take a slot for a client of ``key``, closing the oldest idle client if need be."""
        why = self._slots.take(key)
        if why is None:
            return True
        victim = next(
            (
                ex
                for ex, k in self._clients.items()
                if ex.reading and (why != "pending_per_source" or k == key)
            ),
            None,
        )
        if victim is None:
            return False
        self.dropped += 1
        victim.close()
        return self._slots.take(key) is None

    def _closed(self, key: str, ex: Exchange) -> None:
        if self._clients.pop(ex, None) is not None:
            self._slots.release(key)
        if ex is self._on_reserve:
            self._reserve_back()

    def _pause(self, exc: OSError) -> None:
        """Out of fds and no reserve: stop watching the socket for ACCEPT_PAUSE seconds (logged
        once until an accept succeeds again)."""
        if self._resume is not None:
            return
        if not self._pause_logged:
            self._pause_logged = True
            where = "request server"
            with contextlib.suppress(OSError):
                name = self.sock.getsockname()
                where = f"{name[0]}:{name[1]}" if isinstance(name, tuple) else f"{name}"
            event(
                logging.WARNING,
                f"{where}: accept: {exc.strerror}; pausing accepts for {ACCEPT_PAUSE}s at a "
                "time until descriptors free up",
                event="accept_error",
            )
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(self.sock)
        self._resume = self._call_later(ACCEPT_PAUSE, self._unpause)

    def _unpause(self) -> None:
        self._resume = None
        if self.sock.fileno() >= 0:
            self._sel.register(self.sock, selectors.EVENT_READ, self._on_accept)

    def close(self) -> None:
        """Stop accepting and close the socket (and remove a unix socket's file)."""
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        else:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(self.sock)
        path = self.sock.getsockname() if self.sock.family == socket.AF_UNIX else ""
        self.sock.close()
        if isinstance(path, str) and path:
            with contextlib.suppress(OSError):
                os.unlink(path)


class Exchange:
    """One client: read the request (bounded, with a deadline), write the response."""

    def __init__(
        self,
        *,
        conn: socket.socket,
        sel: selectors.BaseSelector,
        handle: Handler,
        term: bytes,
        call_later: Callable[[float, Callable[[], None]], Any],
        on_close: Callable[[Exchange], None] = lambda _ex: None,
        deadline: float = CLIENT_DEADLINE,
        request_max: int = REQUEST_MAX,
    ) -> None:
        self.conn = conn
        self._max = request_max
        self._on_close = on_close
        self._sel = sel
        self._handle = handle
        self._term = term
        self._in = b""
        self._out = b""
        self._done = False
        self._timer: Any = None
        try:
            sel.register(conn, selectors.EVENT_READ, self)
        except (OSError, ValueError):  # (epoll_ctl: ENOMEM, ENOSPC)
            self.close()
            return
        self._timer = call_later(deadline, self.close)

    @property
    def closed(self) -> bool:
        return self._done

    @property
    def reading(self) -> bool:
        """Still waiting for (the rest of) its request: no response started yet."""
        return not self._done and not self._out

    def __call__(self, mask: int) -> None:
        try:
            if self._out:
                self._write()
                return
            data = self.conn.recv(4096)
            if data:
                self._in += data
            if self._term in self._in or not data or len(self._in) > self._max:
                out = self._handle(self._in[: self._max])
                if isinstance(out, Later):
                    self._timer.cancel()  # the answer's time is the handler's
                    self._sel.unregister(self.conn)
                    out.bind(self)
                    return
                self.reply(out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()

    def reply(self, data: bytes) -> None:
        """Write the answer ``data``, then close."""
        if self._done:
            return
        self._out = data or b"\n"
        try:
            if self.conn.fileno() not in self._sel.get_map():
                self._sel.register(self.conn, selectors.EVENT_WRITE, self)
            else:
                self._sel.modify(self.conn, selectors.EVENT_WRITE, self)
            self._write()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()

    def _write(self) -> None:
        sent = self.conn.send(self._out)
        self._out = self._out[sent:]
        if not self._out:
            self.close()

    def close(self) -> None:
        if self._done:
            return
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(self.conn)
        self.conn.close()
        self._on_close(self)


def request(path: str, command: str, timeout: float = 30.0) -> dict[str, Any]:
    """Send one command to a running pyinetd's control socket; return its JSON answer."""
    check_control_socket(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    answer = json.loads(b"".join(chunks) or b"{}")
    if not isinstance(answer, dict):
        raise ValueError("unexpected answer from pyinetd")
    return answer


def http_response(status: str, body: bytes, content_type: str) -> bytes:
    """A complete HTTP/1.0 response."""
    head = (
        f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body
