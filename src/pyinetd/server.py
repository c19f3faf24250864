"""The loop: one thread, a selector over the listeners and the signal wake-up fd.

Connections come in on listeners, become children (spawn.py) or built-in sessions
(builtins.py); children are reaped in a ``waitpid(-1, WNOHANG)`` loop whenever any signal
wakes the loop. Signal handlers do nothing: ``signal.set_wakeup_fd`` writes the signal
number to a socketpair the loop watches, and everything happens in the loop.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import logging
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pyinetd import builtins
from pyinetd.config import Config, Service
from pyinetd.listeners import ListenKey, bind_service, close_listener
from pyinetd.log import LOG, event
from pyinetd.spawn import Spawner, close_quietly

ACCEPT_BATCH = 64  # connections accepted per readiness event before looking at other fds
EMFILE_PAUSE = 0.5  # seconds a listener rests after accept() ran out of fds
STDERR_LINE_MAX = 4096
HANDLED_SIGNALS = (
    signal.SIGCHLD,
    signal.SIGHUP,
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGUSR1,
)


def _noop_handler(signum: int, frame: object) -> None:
    """Signal handlers do nothing: the wake-up fd carries the signal number to the loop."""


def format_ip(addr: str) -> str:
    """Unmap v4-mapped IPv6 addresses (::ffff:1.2.3.4 -> 1.2.3.4); drop a scope suffix."""
    if addr.startswith("::ffff:") and "." in addr:
        return addr[7:]
    return addr


def peer_of(family: int, addr: object) -> tuple[str, int]:
    """(ip, port) of a socket address; ("", 0) for unix sockets."""
    if family in (socket.AF_INET, socket.AF_INET6) and isinstance(addr, tuple):
        return format_ip(str(addr[0])), int(addr[1])
    return "", 0


def peer_text(ip: str, port: int) -> str:
    if not ip:
        return "unix"
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


@dataclass
class ServiceState:
    """Runtime state of a service that lives across reloads: counts, children."""

    service: Service
    running: int = 0
    accepted: int = 0
    failed_spawns: int = 0
    refused: dict[str, int] = field(default_factory=dict)


@dataclass
class Listener:
    """A bound socket serving one service."""

    key: ListenKey
    sock: socket.socket
    state: ServiceState
    local_ip: str = ""
    local_port: int = 0
    registered: bool = False
    waiting_on: int = 0  # pid of the wait-mode child that owns the socket
    resume_timer: Timer | None = None

    @property
    def service(self) -> Service:
        return self.state.service


@dataclass
class Child:
    """A running service process."""

    pid: int
    state: ServiceState
    peer: str
    started: float
    listener: Listener | None = None  # wait mode: the listener to resume when this exits


@dataclass(order=True)
class Timer:
    when: float
    seq: int
    callback: Callable[[], None] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)


class StderrPipe:
    """Reads a child's stderr and logs it line by line, tagged `service[pid]`."""

    def __init__(self, fd: int, service: str, selector: selectors.BaseSelector) -> None:
        self.fd = fd
        self.tag = service
        self.pid = 0
        self._sel = selector
        self._buf = b""
        os.set_blocking(fd, False)
        selector.register(fd, selectors.EVENT_READ, self)

    def __call__(self, mask: int) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            if self._buf:
                self._emit(self._buf)
            self._sel.unregister(self.fd)
            os.close(self.fd)
            return
        lines = (self._buf + data).split(b"\n")
        self._buf = lines.pop()
        if len(self._buf) > STDERR_LINE_MAX:
            lines.append(self._buf)
            self._buf = b""
        for line in lines:
            self._emit(line)

    def _emit(self, line: bytes) -> None:
        text = line.rstrip(b"\r").decode("utf-8", "replace")
        event(
            logging.INFO,
            f"{self.tag}[{self.pid}]: {text}",
            event="stderr",
            service=self.tag,
            pid=self.pid,
        )


class UDPReply:
    """Relays each write of a per-datagram UDP child (a SOCK_SEQPACKET record) to the client."""

    def __init__(
        self, fd: socket.socket, listener: socket.socket, peer: object, sel: selectors.BaseSelector
    ) -> None:
        self.sock = fd
        self._listener = listener
        self._peer = peer
        self._sel = sel
        fd.setblocking(False)
        sel.register(fd, selectors.EVENT_READ, self)

    def __call__(self, mask: int) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._sel.unregister(self.sock)
            self.sock.close()
            return
        with contextlib.suppress(OSError):
            self._listener.sendto(data[:65507], self._peer)


class Server:
    """One pyinetd instance: listeners, children, the loop."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.sel = selectors.DefaultSelector()
        self.spawner = Spawner()
        self.states: dict[str, ServiceState] = {}
        self.listeners: dict[ListenKey, Listener] = {}
        self.children: dict[int, Child] = {}
        self.sessions: set[builtins.Session] = set()
        self._timers: list[Timer] = []
        self._timer_seq = 0
        self._stopping = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._emfile_logged = False
        self._devnull = -1

    # ------------------------------------------------------------ start-up
    def bind(self) -> None:
        """Bind every enabled service's listeners; ListenError (nothing left bound) on failure."""
        bound: list[tuple[ServiceState, list[tuple[ListenKey, socket.socket]]]] = []
        try:
            for svc in self.config.enabled_services:
                state = self.states.setdefault(svc.name, ServiceState(svc))
                bound.append((state, bind_service(svc)))
        except Exception:
            for _, socks in bound:
                for _, sock in socks:
                    close_listener(sock)
            raise
        for state, socks in bound:
            for key, sock in socks:
                self._add_listener(key, sock, state)

    def _add_listener(self, key: ListenKey, sock: socket.socket, state: ServiceState) -> None:
        lst = Listener(key=key, sock=sock, state=state)
        if key.address.host and sock.family != socket.AF_UNIX:
            # Bound to one address: the local end of every connection is known without
            # a getsockname() per connection.
            lst.local_ip, lst.local_port = peer_of(sock.family, sock.getsockname())
        self.listeners[key] = lst
        self._resume(lst)

    def _resume(self, lst: Listener) -> None:
        if lst.registered or self._stopping:
            return
        if lst.key.protocol == "udp":
            handler: Callable[[int], None] = lambda mask, lst=lst: self._on_datagram(lst)
        else:
            handler = lambda mask, lst=lst: self._on_accept(lst)
        self.sel.register(lst.sock, selectors.EVENT_READ, handler)
        lst.registered = True

    def _pause(self, lst: Listener) -> None:
        if lst.registered:
            self.sel.unregister(lst.sock)
            lst.registered = False

    def _install_signals(self) -> None:
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, _noop_handler)
            signal.siginterrupt(sig, False)
        self.spawner.refresh_signals()
        self.sel.register(self._wake_r, selectors.EVENT_READ, self._on_wakeup)

    # ------------------------------------------------------------ timers
    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        """Run ``callback`` from the loop after ``delay`` seconds."""
        self._timer_seq += 1
        timer = Timer(time.monotonic() + delay, self._timer_seq, callback)
        heapq.heappush(self._timers, timer)
        return timer

    def _run_timers(self) -> float | None:
        now = time.monotonic()
        while self._timers and (self._timers[0].when <= now or self._timers[0].cancelled):
            timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                timer.callback()
        if not self._timers:
            return None
        return max(0.0, self._timers[0].when - time.monotonic())

    # ------------------------------------------------------------ the loop
    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit code."""
        self._install_signals()
        self.reap_children()  # children left from before exec (e.g. by a wrapper script)
        names = ", ".join(
            f"{s.name} ({s.protocol} {' '.join(str(a) for a in s.listen)})"
            for s in self.config.enabled_services
        )
        event(logging.INFO, f"listening: {names}", event="ready")
        try:
            while not self._stopping:
                timeout = self._run_timers()
                for key, mask in self.sel.select(timeout):
                    key.data(mask)
                    if self._stopping:
                        break
        finally:
            self._shutdown()
        return 0

    def _on_wakeup(self, mask: int) -> None:
        try:
            data = self._wake_r.recv(4096)
        except BlockingIOError:
            data = b""
        signums = set(data)
        # SIGCHLD coalesces, and a full wake-up buffer drops bytes: reap on every wake-up.
        self.reap_children()
        if signal.SIGTERM in signums or signal.SIGINT in signums:
            which = "SIGTERM" if signal.SIGTERM in signums else "SIGINT"
            event(logging.INFO, f"{which}: stopping", event="stopping")
            self._stopping = True

    def _shutdown(self) -> None:
        for lst in list(self.listeners.values()):
            self._pause(lst)
            if not lst.waiting_on:
                close_listener(lst.sock)
            else:
                lst.sock.close()  # the wait-mode child still holds it
        self.listeners.clear()
        for sess in list(self.sessions):
            sess.close()
        signal.set_wakeup_fd(-1)
        if self.children:
            event(
                logging.INFO,
                f"exiting; {len(self.children)} children left to finish on their own",
                event="exit",
                children=len(self.children),
            )
        self.sel.close()
        self._wake_r.close()
        self._wake_w.close()

    # ------------------------------------------------------------ children
    def reap_children(self) -> None:
        """Reap every exited child: loop until waitpid says none are left (SIGCHLD coalesces)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._child_exited(pid, status)

    def _child_exited(self, pid: int, status: int) -> None:
        child = self.children.pop(pid, None)
        if child is None:
            LOG.debug("reaped unknown pid %d", pid)  # gunicorn #3566: not an error
            return
        child.state.running -= 1
        code = os.waitstatus_to_exitcode(status)
        how = f"exit {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
        duration = time.monotonic() - child.started
        event(
            logging.INFO,
            f"{child.state.service.name}: pid {pid} ended ({how}) after {duration:.3f}s",
            event="end",
            service=child.state.service.name,
            pid=pid,
            peer=child.peer,
            status=code,
            duration=round(duration, 6),
        )
        if child.listener is not None:
            lst = child.listener
            lst.waiting_on = 0
            if self.listeners.get(lst.key) is lst:
                lst.sock.setblocking(False)
                self._resume(lst)

    # ------------------------------------------------------------ connections
    def _on_accept(self, lst: Listener) -> None:
        svc = lst.service
        if svc.wait:
            self._start_wait_child(lst)
            return
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = lst.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                self._accept_failed(lst, exc)
                return
            if self._emfile_logged:
                event(logging.WARNING, "accepting again: file descriptors available")
                self._emfile_logged = False
            self._serve_stream(lst, conn, addr)
            if not lst.registered:
                return

    def _accept_failed(self, lst: Listener, exc: OSError) -> None:
        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            # Level-triggered: the listener would wake us again at once. Rest it briefly
            # and log once per episode, not once per try.
            if not self._emfile_logged:
                event(
                    logging.ERROR,
                    f"{lst.service.name}: accept: {exc.strerror}; pausing accepts "
                    f"for {EMFILE_PAUSE}s at a time until descriptors free up",
                    event="accept_error",
                    service=lst.service.name,
                )
                self._emfile_logged = True
            self._pause(lst)
            lst.resume_timer = self.call_later(EMFILE_PAUSE, lambda: self._resume(lst))
        elif exc.errno not in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
            event(logging.WARNING, f"{lst.service.name}: accept: {exc}", event="accept_error")

    def _connection_env(
        self, lst: Listener, conn: socket.socket, ip: str, port: int
    ) -> dict[bytes, bytes]:
        svc = lst.service
        if svc.protocol == "unix":
            env = {b"PROTO": b"IPC", b"IPCLOCALPATH": str(lst.key.address).encode()}
            with contextlib.suppress(OSError):
                creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                pid, uid, gid = int.from_bytes(creds[0:4], "little"), *(
                    int.from_bytes(creds[i : i + 4], "little") for i in (4, 8)
                )
                env[b"IPCREMOTEPID"] = str(pid).encode()
                env[b"IPCREMOTEEUID"] = str(uid).encode()
                env[b"IPCREMOTEEGID"] = str(gid).encode()
            return env
        if lst.local_ip:
            lip, lport = lst.local_ip, lst.local_port
        else:
            try:
                lip, lport = peer_of(conn.family, conn.getsockname())
            except OSError:
                lip, lport = "", 0
        return self._ip_env("TCP", ip, port, lip, lport)

    @staticmethod
    def _ip_env(proto: str, ip: str, port: int, lip: str, lport: int) -> dict[bytes, bytes]:
        sport, slport = str(port).encode(), str(lport).encode()
        bip, blip = ip.encode(), lip.encode()
        p = proto.encode()
        return {
            b"PROTO": p,
            b"REMOTE_ADDR": bip,
            b"REMOTE_PORT": sport,
            p + b"REMOTEIP": bip,
            p + b"REMOTEPORT": sport,
            p + b"LOCALIP": blip,
            p + b"LOCALPORT": slport,
        }

    def _serve_stream(self, lst: Listener, conn: socket.socket, addr: object) -> None:
        state = lst.state
        svc = state.service
        ip, port = peer_of(conn.family, addr)
        state.accepted += 1
        if svc.builtin is not None:
            conn.setblocking(False)
            self._start_session(state, conn, svc.builtin)
            return
        try:
            env = self._connection_env(lst, conn, ip, port)
            self._start_child(state, conn.fileno(), conn.fileno(), conn, env, peer_text(ip, port))
        finally:
            conn.close()

    def _start_session(self, state: ServiceState, conn: socket.socket, kind: str) -> None:
        state.running += 1
        sess = builtins.Session(kind, conn, self.sel, lambda s: self._session_closed(state, s))
        if not sess.closed:
            self.sessions.add(sess)

    def _session_closed(self, state: ServiceState, sess: builtins.Session) -> None:
        state.running -= 1
        self.sessions.discard(sess)

    def _stderr_fd(self, svc: Service, conn: socket.socket | None) -> tuple[int, StderrPipe | None]:
        """The fd for the child's stderr, and the pipe reader when it goes to the log."""
        mode = svc.stderr
        if mode == "log":
            r, w = os.pipe()
            return w, StderrPipe(r, svc.name, self.sel)
        if mode == "socket" and conn is not None:
            return os.dup(conn.fileno()), None
        if mode in ("null", "socket"):
            return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC), None
        return os.open(mode, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640), None

    def _start_child(
        self,
        state: ServiceState,
        stdin: int,
        stdout: int,
        conn: socket.socket | None,
        env: dict[bytes, bytes],
        peer: str,
        listener: Listener | None = None,
    ) -> int:
        """Spawn the service's program; returns the pid, or 0 when it could not start."""
        svc = state.service
        try:
            err_fd, pipe = self._stderr_fd(svc, conn)
        except OSError as exc:
            state.failed_spawns += 1
            event(logging.ERROR, f"{svc.name}: stderr {svc.stderr}: {exc}", event="spawn_error")
            return 0
        try:
            pid = self.spawner.spawn(svc, stdin, stdout, err_fd, env)
        except OSError as exc:
            state.failed_spawns += 1
            if pipe is not None:
                pipe(selectors.EVENT_READ)  # nothing to read: EOF closes it
            event(
                logging.ERROR,
                f"{svc.name}: cannot start {svc.argv[0]}: {exc.strerror or exc}; "
                f"closing {peer}",
                event="spawn_error",
                service=svc.name,
                peer=peer,
                error=str(exc),
            )
            return 0
        finally:
            os.close(err_fd)
        if pipe is not None:
            pipe.pid = pid
        state.running += 1
        self.children[pid] = Child(pid, state, peer, time.monotonic(), listener)
        event(
            logging.INFO,
            f"{svc.name}: {peer} -> pid {pid}",
            event="start",
            service=svc.name,
            peer=peer,
            pid=pid,
        )
        return pid

    def _start_wait_child(self, lst: Listener) -> None:
        """inetd wait mode: the child gets the listening socket itself; we stop watching it."""
        self._pause(lst)
        fd = lst.sock.fileno()
        lst.sock.setblocking(True)  # the service expects a blocking socket, as from inetd
        proto = "UDP" if lst.key.protocol == "udp" else "TCP"
        env: dict[bytes, bytes] = {b"PROTO": proto.encode()}
        if lst.local_ip:
            env[proto.encode() + b"LOCALIP"] = lst.local_ip.encode()
            env[proto.encode() + b"LOCALPORT"] = str(lst.local_port).encode()
        lst.state.accepted += 1
        pid = self._start_child(lst.state, fd, fd, None, env, "wait", listener=lst)
        if pid:
            lst.waiting_on = pid
        else:
            lst.sock.setblocking(False)
            # Do not spin on a readable socket whose service cannot start.
            lst.resume_timer = self.call_later(1.0, lambda: self._resume(lst))

    def _on_datagram(self, lst: Listener) -> None:
        svc = lst.service
        if svc.wait:
            self._start_wait_child(lst)
            return
        for _ in range(ACCEPT_BATCH):
            try:
                data, addr = lst.sock.recvfrom(65535)
            except BlockingIOError:
                return
            except OSError as exc:
                event(logging.WARNING, f"{svc.name}: recvfrom: {exc}", event="recv_error")
                return
            ip, port = peer_of(lst.sock.family, addr)
            lst.state.accepted += 1
            if svc.builtin is not None:
                if builtins.udp_source_is_unsafe(port):
                    continue
                reply = builtins.udp_reply(svc.builtin, data)
                if reply is not None:
                    with contextlib.suppress(OSError):
                        lst.sock.sendto(reply, addr)
                continue
            self._spawn_for_datagram(lst, data, addr, ip, port)

    def _spawn_for_datagram(
        self, lst: Listener, data: bytes, addr: object, ip: str, port: int
    ) -> None:
        """nowait UDP: stdin is a pipe holding the datagram then EOF; each write() the child
        makes on stdout (a SOCK_SEQPACKET socket) goes back to the sender as one datagram."""
        r, w = os.pipe()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            os.write(w, data)  # a datagram (<= 65507 bytes) fits an empty pipe (64 KiB)
            os.close(w)
            w = -1
            lip, lport = lst.local_ip, lst.local_port
            if not lip:
                lip, lport = peer_of(lst.sock.family, lst.sock.getsockname())
            env = self._ip_env("UDP", ip, port, lip, lport)
            pid = self._start_child(lst.state, r, theirs.fileno(), None, env, peer_text(ip, port))
        finally:
            if w >= 0:
                close_quietly(w)
            os.close(r)
            theirs.close()
        if pid:
            UDPReply(ours, lst.sock, addr, self.sel)
        else:
            ours.close()

    def __repr__(self) -> str:
        return f"<Server {len(self.listeners)} listeners, {len(self.children)} children>"

