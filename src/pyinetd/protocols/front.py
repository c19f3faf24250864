"""A service's front process: one event loop carrying every TLS or redirect connection of it.

pyinetd forks a front per service that has ``tls:`` or ``redirect:`` (the SSLContext is built
and checked in the parent and inherited; the parent closes every other fd, puts the process in
the service's cgroup and under its own uid) and then calls ``run``. The parent keeps
accepting, admitting and spawning; the front does the handshakes and relays bytes
(frontconn.py), talking to the parent over one SEQPACKET socket (frontchan.py): ``C`` a
connection, ``H`` handshake done, ``S`` the program's pipes, ``E`` over, and so on.

At start ``run`` raises the soft RLIMIT_NOFILE to the hard limit (a connection costs up to
three fds here), makes the process non-dumpable (no ptrace or /proc/PID/mem by the programs'
users: the key is in this memory), sets no_new_privs, and attaches a seccomp filter that denies
execve, execveat, fork, vfork, clone other than a thread's, ptrace and process_vm_* on top of
``syscalls: default``: what a client's bytes might take over can start nothing.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import heapq
import itertools
import os
import resource
import select
import socket
import ssl
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyinetd import sandbox
from pyinetd.config.wsconf import WebSocketSettings
from pyinetd.procsettings import PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, prctl
from pyinetd.protocols import frontchan
from pyinetd.protocols.frontchan import ChannelError, FdsLost
from pyinetd.protocols.frontconn import Conn
from pyinetd.protocols.frontws import WSConn

if TYPE_CHECKING:
    from pyinetd.config import Service

__all__ = ["FrontSettings", "harden", "run"]

LINGER = 2.0  # seconds of reading and dropping a client's unread data before a close
BUFSIZE = 65536  # plaintext bytes buffered per direction and connection
_BATCH = 64  # channel records read per wake-up, so that connections are not starved
_MAX_QUEUE = 65536  # messages to the parent not yet written: beyond, the parent is stuck
_LOG_EVERY = 10.0  # seconds between two "no fd" lines
_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_BAD = select.EPOLLERR | select.EPOLLHUP
AnyConn = Conn | WSConn  # a TLS or redirect connection, or a WebSocket one


@dataclass(frozen=True)
class FrontSettings:
    """What a front needs of its service."""

    name: str
    ctx: ssl.SSLContext | None = None
    redirect: tuple[str, int] | None = None
    idle_timeout: float | None = None  # a redirect's ``timeout``: idle seconds, then closed
    banner: bytes = b""  # TLS: sent inside TLS as the first record
    nodelay: bool = True  # TCP_NODELAY on the client socket (and always on the outbound one)
    linger: float = LINGER
    bufsize: int = BUFSIZE
    websocket: WebSocketSettings | None = None  # a WebSocket service: frontws.WSConn
    messages: tuple[str, str] = ("", "")  # WebSocket: deny_message, busy_message (for N)

    @classmethod
    def from_service(cls, service: Service, ctx: ssl.SSLContext | None) -> FrontSettings:
        return cls(
            name=service.name,
            ctx=ctx if service.tls is not None else None,
            redirect=service.redirect,
            idle_timeout=service.timeout if service.redirect is not None else None,
            banner=service.banner if service.tls is not None else b"",
            nodelay=service.nodelay,
            websocket=service.websocket,
            messages=(service.deny_message, service.busy_message),
        )


def harden() -> list[str]:
    """The front's own limits and protections; returns what could not be applied (logged
    by the caller: a kernel without seccomp still runs fronts, as ``syscalls: off`` would)."""
    missing: list[str] = []
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    prctl(PR_SET_DUMPABLE, 0)
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    try:
        if sandbox._arch() is None:
            raise OSError(errno.ENOSYS, "no seccomp filter for this architecture")
        sandbox.attach_filter(sandbox.seccomp_filter(front=True))
    except OSError as exc:
        missing.append(f"seccomp: {exc.strerror or exc}")
    return missing


def run(chan: socket.socket, settings: FrontSettings, *, hardened: bool = True) -> int:
    """Serve the connections the parent sends on ``chan`` until ``D`` and the last one's end
    (0), or the parent's EOF (1), or a record that breaks the protocol (2). Returns the exit
    code; the caller exits with it."""
    front = Front(chan, settings)
    if hardened:
        for what in harden():
            front.log(f"not applied: {what}")
    return front.loop()


class Front:
    """The loop: epoll over the channel and every connection's fds, and a timer heap."""

    def __init__(self, chan: socket.socket, settings: FrontSettings) -> None:
        self.chan = chan
        chan.setblocking(False)
        self.s = settings
        self.ep = select.epoll()
        self.owner: dict[int, AnyConn] = {}  # fd -> its connection
        self.masks: dict[int, int] = {}  # fd -> the events registered
        self.conns: dict[int, AnyConn] = {}  # id -> connection
        self.out: collections.deque[bytes] = collections.deque()
        self.timers: list[tuple[float, int, AnyConn]] = []
        self.seq = itertools.count()
        self.draining = False
        self.orphan = False  # the parent is gone after D: no more messages
        self.target: tuple[Any, ...] | None = None
        self.last_nofd = 0.0
        self.nofd_quiet = 0
        self.ep.register(chan.fileno(), _IN)
        self.chan_mask = _IN

    # --- the Hub the connections use ----------------------------------------------------------

    def watch(self, fd: int, read: bool, write: bool, conn: AnyConn | None) -> None:
        events = (_IN if read else 0) | (_OUT if write else 0)
        old = self.masks.get(fd)
        if conn is None or not events:
            if old is not None:
                del self.masks[fd]
                self.owner.pop(fd, None)
                with contextlib.suppress(OSError):  # (already closed: epoll forgot it)
                    self.ep.unregister(fd)
            return
        self.owner[fd] = conn
        self.masks[fd] = events
        if old is None:
            self.ep.register(fd, events)
        elif old != events:
            self.ep.modify(fd, events)

    def tell(self, kind: str, fields: dict[str, Any]) -> None:
        self.tell_encoded(frontchan.encode(kind, fields))

    def tell_encoded(self, record: bytes) -> None:
        self.out.append(record)
        self._flush()

    def arm(self, conn: AnyConn, when: float) -> None:
        heapq.heappush(self.timers, (when, next(self.seq), conn))

    def ended(self, conn: AnyConn) -> None:
        self.conns.pop(conn.id, None)

    def log(self, line: str) -> None:
        with contextlib.suppress(OSError):
            os.write(
                2, f"pyinetd front {self.s.name}[{os.getpid()}]: {line}\n".encode(errors="replace")
            )

    # --- the loop ------------------------------------------------------------------------------

    def loop(self) -> int:
        try:
            while True:
                if self.draining and not self.conns and not self.out:
                    return 0
                timeout = -1.0
                if self.timers:
                    timeout = max(0.0, self.timers[0][0] - time.monotonic())
                try:
                    events = self.ep.poll(timeout)
                except InterruptedError:
                    continue
                chan_fd = self.chan.fileno()
                for fd, ev in events:
                    if fd == chan_fd:
                        if ev & _OUT:
                            self._flush()
                        if ev & (_IN | _BAD) and self._read_channel() is not None:
                            if not self.draining:
                                return 1  # the parent is gone
                            self._orphaned()  # after D (an upgrade's exec): finish alone
                        continue
                    conn = self.owner.get(fd)
                    if conn is not None:
                        conn.on_event(fd, bool(ev & (_IN | _BAD)), bool(ev & (_OUT | _BAD)))
                self._run_timers()
        except ChannelError as exc:
            self.log(f"the parent sent a record that breaks the protocol: {exc}")
            return 2
        except _ParentStuck:
            self.log(f"{len(self.out)} messages the parent does not read: giving up")
            return 1
        finally:
            for conn in list(self.conns.values()):
                conn.abort()

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            when, _, conn = heapq.heappop(self.timers)
            if conn.id in self.conns and self.conns[conn.id] is conn and conn.when == when:
                conn.on_timer(now)

    def _orphaned(self) -> None:
        """The parent said D, then its side closed (`pyinetd upgrade` execs in place): the
        open connections go on, all relaying, and nothing more is said to anyone."""
        with contextlib.suppress(OSError, ValueError):
            self.ep.unregister(self.chan.fileno())
        self.orphan = True
        self.out.clear()

    def _flush(self) -> None:
        if self.orphan:
            self.out.clear()
            return
        while self.out:
            try:
                frontchan.send(self.chan, self.out[0])
            except BlockingIOError:
                break
            except OSError:
                self.out.clear()  # EPIPE: the parent is gone; the next read says so
                break
            self.out.popleft()
        if len(self.out) > _MAX_QUEUE:
            raise _ParentStuck
        want = _IN | (_OUT if self.out else 0)
        if want != self.chan_mask:
            self.chan_mask = want
            self.ep.modify(self.chan.fileno(), want)

    def _read_channel(self) -> int | None:
        """Handle up to _BATCH records; 1 at the parent's EOF, else None."""
        for _ in range(_BATCH):
            try:
                msg = frontchan.recv(self.chan, frontchan.PARENT_TO_FRONT)
            except BlockingIOError:
                return None
            except FdsLost as lost:
                self._fds_lost(lost.message)
                continue
            except ConnectionResetError:
                return 1
            if msg is None:
                return 1
            self._handle(msg)
        return None

    def _handle(self, msg: frontchan.Message) -> None:
        kind, f = msg.kind, msg.fields
        if kind == "C":
            self._new(f, msg.fds[0])
            return
        if kind == "D":
            self.draining = True
            return
        conn = self.conns.get(f["id"])
        if kind == "S":
            if conn is None:  # ended meanwhile (its client went, the E crossed the S)
                frontchan.close_fds(msg.fds)
            else:
                conn.attach(msg.fds[0], msg.fds[1])
        elif conn is None:
            return  # X after E, K or N for an id that just ended: a race, not an error
        elif kind == "N" and isinstance(conn, WSConn):
            conn.refuse(f["reason"])  # an admission refusal at H: its HTTP answer
        elif kind == "N":
            conn.refuse()
        elif kind == "K":
            conn.abort()
        elif kind == "X" and isinstance(conn, WSConn):
            conn.exited(f["code"], f["signal"])  # the Close code follows from it
        # X: the program's exit status; the pipes already tell the relay all it needs.

    def _new(self, f: dict[str, Any], fd: int) -> None:
        cid = f["id"]
        if self.draining or cid in self.conns:
            os.close(fd)
            why = "after D" if self.draining else "for an id already open"
            raise ChannelError(f"C {why}: {cid}")
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:  # not a socket
            os.close(fd)
            raise ChannelError(f"C: fd is not a socket: {exc}") from None
        sock.setblocking(False)
        if self.s.nodelay and sock.family in (socket.AF_INET, socket.AF_INET6):
            # TLS 1.3 session tickets follow the handshake; with Nagle the first reply waits
            # for their ACK (delayed up to 40 ms by the client). stunnel sets it too.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        redirect = None
        if self.s.redirect is not None:
            redirect = self._target()
            if redirect is None:
                sock.close()
                self.tell("F", {"id": cid, "reason": "redirect: cannot resolve the target"})
                return
        if self.s.websocket is not None:
            self.conns[cid] = ws = WSConn(
                self,
                cid,
                sock,
                self.s.ctx,
                settings=self.s.websocket,
                peer=(f["peer"][0], f["peer"][1]),
                local=(f["local"][0], f["local"][1]) if f["local"] else None,
                deadline=f["deadline"],
                refuse=f["refuse"],
                messages=self.s.messages,
                bufsize=self.s.bufsize,
                linger=self.s.linger,
            )
            ws.start()
            return
        peer = f"{f['peer'][0]}:{f['peer'][1]}"
        conn = Conn(
            self,
            cid,
            sock,
            self.s.ctx,
            peer=peer,
            deadline=f["deadline"],
            redirect=redirect,
            banner=self.s.banner,
            bufsize=self.s.bufsize,
            linger=self.s.linger,
            idle=self.s.idle_timeout,
        )
        self.conns[cid] = conn
        conn.start()

    def _target(self) -> tuple[Any, ...] | None:
        """The redirect target's (family, address), resolved once per front (a reload starts
        a new front)."""
        if self.target is None and self.s.redirect is not None:
            host, port = self.s.redirect
            try:
                info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (OSError, UnicodeError) as exc:
                self.log(f"redirect target {host}:{port}: {exc}")
                return None
            self.target = (info[0][0], info[0][4])
        return self.target

    def _fds_lost(self, msg: frontchan.Message) -> None:
        """A connection whose fds the kernel could not hand over (EMFILE): refused, with one
        log line per _LOG_EVERY seconds at most, never a crash."""
        now = time.monotonic()
        if now - self.last_nofd >= _LOG_EVERY:
            more = f" ({self.nofd_quiet} more since the last line)" if self.nofd_quiet else ""
            self.log(f"out of fds (RLIMIT_NOFILE): connection {msg.fields.get('id')} refused{more}")
            self.last_nofd, self.nofd_quiet = now, 0
        else:
            self.nofd_quiet += 1
        cid = msg.fields.get("id")
        if msg.kind == "C" and cid is not None:
            self.tell("F", {"id": cid, "reason": "the front has no fd left (EMFILE)"})
        elif msg.kind == "S" and cid in self.conns:
            self.conns[cid].refuse()


class _ParentStuck(Exception):
    pass
