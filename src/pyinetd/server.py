"""The loop: one thread, a selector over the listeners and the signal wake-up fd.

Connections come in on listeners, become children (spawn.py) or built-in sessions
(builtins.py); children are reaped in a ``waitpid(-1, WNOHANG)`` loop whenever any signal
wakes the loop, or, with many children alive, one by one as an exit watcher reports them
(reaper.py). Signal handlers do nothing: ``signal.set_wakeup_fd`` writes the signal
number to a socketpair the loop watches, and everything happens in the loop.
"""

from __future__ import annotations

import _socket
import contextlib
import errno
import functools
import heapq
import json
import logging
import os
import selectors
import signal
import socket
import stat
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

from pyinetd import builtins, control, fsuser, log, proxyproto, reaper, status, systemd
from pyinetd.admission import LogLimiter, StageSlots, TokenBucket, source_key
from pyinetd.config import Config, ConfigError, Service, load, parse_listen_item
from pyinetd.listeners import (
    ListenError,
    ListenKey,
    bind_listener,
    bind_service,
    close_listener,
)
from pyinetd.log import LOG, event
from pyinetd.metrics import Metrics
from pyinetd.spawn import (
    C_MODULE_BUILT,
    Spawner,
    UserGone,
    env_dict,
    ignored_signals,
    spawn_relay,
)
from pyinetd.stages import PendingHello, PendingProxy, UDPReply

if TYPE_CHECKING:
    import ssl

ACCEPT_BATCH = 64  # connections accepted per readiness event before looking at other fds
EMFILE_PAUSE = 0.5  # seconds a listener rests after accept() ran out of fds
STDERR_LINE_MAX = 4096
STDERR_READ = 65536  # bytes per read of a service's stderr socket
STDERR_READS = 16  # reads per wake-up (1 MiB): one chatty child cannot hold the loop
# Throttled events (refusals, spawn errors) logged per service a minute at most, whatever the
# number of sources: beyond, they are counted and the count logged with the next one.
THROTTLED_LINES = 100
LOG_RETRY = 0.25  # seconds between tries to write a log backlog to a stalled reader
KILL_GRACE = 5.0  # seconds between a timeout's SIGTERM and its SIGKILL
# A UDP child's reply socket is closed this long after the child is reaped, even when a
# process it left behind still holds its stdout (issue 14, item 10: 1,050 datagrams to such a
# service took the parent from 12 to 1,019 fds, outside every limit).
UDP_REPLY_GRACE = 1.0
HANDLED_SIGNALS = (
    signal.SIGCHLD,
    signal.SIGHUP,
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGUSR1,
)


Pending = PendingProxy["Listener"] | PendingHello["Listener"]


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
    """Runtime state of a service that lives across reloads, pauses and resumes.

    ``running`` and ``sources`` are kept by the children table and the built-in sessions
    only: a slot is freed when its process is reaped or its session closes, whatever the
    reason (exit, crash, timeout kill), and nothing else ever resets them.
    """

    service: Service
    running: int = 0
    hellos: int = 0  # TLS connections admitted, their ClientHello due: they hold a place
    accepted: int = 0
    failed_spawns: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    sources: dict[str, int] = field(default_factory=dict)
    bucket: TokenBucket | None = None
    listeners: list[Listener] = field(default_factory=list)
    tls_context: ssl.SSLContext | None = None
    stderr_log: StderrLog | None = None  # made at the first child with `stderr: log`

    def set_service(self, service: Service, tls_context: ssl.SSLContext | None = None) -> None:
        """Apply a (re)loaded definition with its TLS context, built by Server._prepare before
        anything changed (it cannot fail here); counts stay, the bucket follows the settings."""
        old = self.service
        self.service = service
        if self.stderr_log is not None:
            self.stderr_log.budget.set_rate(*service.stderr_rate)
        if service.rate is None:
            self.bucket = None
        elif self.bucket is None or old.rate != service.rate:
            self.bucket = TokenBucket(*service.rate)
        self.tls_context = tls_context

    def add_source(self, key: str) -> None:
        self.running += 1
        if key:
            self.sources[key] = self.sources.get(key, 0) + 1

    def drop_source(self, key: str) -> None:
        self.running -= 1
        if key:
            n = self.sources.get(key, 0) - 1
            if n > 0:
                self.sources[key] = n
            else:
                self.sources.pop(key, None)


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
    paused_until: float = 0.0  # rate limit or fd exhaustion: resume at this monotonic time
    resume_timer: Timer | None = None
    family: int = socket.AF_INET

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
    source: str = ""  # per_source key
    timer: Timer | None = None  # timeout
    killed: bool = False  # SIGTERM sent
    sigkilled: bool = False  # SIGKILL sent too


@dataclass(order=True)
class Timer:
    when: float
    seq: int
    callback: Callable[[], None] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)


class StderrLog:
    """A service's `stderr: log`: one socket for all its children, lines tagged `service[pid]`.

    Every child's fd 2 is the write end of one Unix stream socketpair per service. With
    SO_PASSCRED on the read end the kernel attaches the writer's pid to what it writes and
    never merges two writers' bytes in one recvmsg (unix_stream_read_generic), so lines
    keep their pid without a pipe, a registration and two closes per connection. A line
    left unterminated goes out when its writer is reaped (``ended``), or when it grows past
    STDERR_LINE_MAX. A helper the service started is tagged with its own pid.

    What is logged is bounded by the service's `stderr_rate` (log.StderrBudget); what is over
    is still read, so that no child blocks on a full socket, but dropped and counted. Each
    wake-up reads at most STDERR_READS x STDERR_READ bytes: one chatty child cannot hold the
    loop. Control characters are escaped (log.escape_controls).
    """

    MAX_PARTIAL = 256  # writers with an unterminated line; beyond that, flush them all

    def __init__(
        self,
        service: str,
        selector: selectors.BaseSelector,
        rate: tuple[float, float],
        call_later: Callable[[float, Callable[[], None]], Timer],
    ) -> None:
        self.tag = service
        self._sel = selector
        self._call_later = call_later
        self.budget = log.StderrBudget(*rate)
        self._reported = -1.0  # when dropped lines were last reported (monotonic)
        self._report_timer: Timer | None = None
        self._reopened = 0  # shutdowns mended since the last warning about them
        self._warned = -60.0
        self._partial: dict[int, bytes] = {}
        self._cmsg = socket.CMSG_SPACE(12)  # struct ucred
        self._open()

    def _open(self) -> None:
        self._r, self._w = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._r.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._r.setblocking(False)
        self._sel.register(self._r, selectors.EVENT_READ, self)

    def fileno(self) -> int:
        """The write end: what a child gets on fd 2."""
        return self._w.fileno()

    def __call__(self, mask: int) -> None:
        self.drain()

    def drain(self, limit: int = STDERR_READS) -> None:
        """Log what is waiting, at most ``limit`` reads (the loop comes back for the rest)."""
        for _ in range(limit):
            try:
                data, ancdata, _flags, _addr = self._r.recvmsg(STDERR_READ, self._cmsg)
            except OSError:  # nothing waiting (EAGAIN), or the socket is gone
                break
            if not data:
                self._reopen()
                break
            pid = 0
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("i", cdata[:4])[0]
            self._feed(pid, data)
        self._report(time.monotonic())

    def _reopen(self) -> None:
        """End-of-file: a child called shutdown(2, SHUT_WR) on the socket all share (pyinetd
        holds a write end, so nothing else ends it). The read end would stay readable at EOF
        for ever (the loop spun at 80 % CPU) and every later child writing to stderr would
        die of SIGPIPE: new children get a new socket. The children that share the old one
        lose their stderr, as they would with a pipe whose reader went away (issue 18, 9)."""
        self.close(drain=False)
        self._open()
        self._reopened += 1
        now = time.monotonic()
        if now - self._warned >= 60.0:
            times = f" ({self._reopened} times in a minute)" if self._reopened > 1 else ""
            event(
                logging.WARNING,
                f"{self.tag}: a child shut down the service's stderr socket{times}; "
                "children started from now on get a new one",
                event="stderr_shutdown",
                service=self.tag,
            )
            self._warned, self._reopened = now, 0

    def _feed(self, pid: int, data: bytes) -> None:
        budget = self.budget
        budget.refill(time.monotonic())
        data = self._partial.pop(pid, b"") + data
        # Split only what may be logged: a flood of short lines costs one count(), not a
        # bytes object per line.
        allowed = budget.lines_left()
        lines = data.split(b"\n", allowed) if allowed else [data]
        rest = lines.pop()
        cut = rest.rfind(b"\n")
        if cut >= 0:
            budget.drop(rest.count(b"\n"), cut + 1)
            rest = rest[cut + 1 :]
        if len(rest) > STDERR_LINE_MAX:
            lines.append(rest)
        elif rest:
            self._partial[pid] = rest
        for line in lines:
            if budget.take(len(line) + 1):
                self._emit(pid, line)
        if len(self._partial) > self.MAX_PARTIAL:
            for other in list(self._partial):
                self.ended(other)

    def ended(self, pid: int) -> None:
        """``pid`` is gone: its unterminated last line, if any, goes out now."""
        rest = self._partial.pop(pid, None)
        if rest:
            self.budget.refill(time.monotonic())
            if self.budget.take(len(rest)):
                self._emit(pid, rest)

    def _report(self, now: float, at_once: bool = False) -> None:
        """Say how many lines were dropped: at most once a second, and a second after the
        last drop at the latest (a timer, so that the end of a flood is told too)."""
        budget = self.budget
        if not budget.dropped_lines and not budget.dropped_bytes:
            return
        if not at_once and now - self._reported < 1.0:
            if self._report_timer is None:
                self._report_timer = self._call_later(
                    self._reported + 1.0 - now, self._on_report_timer
                )
            return
        self._reported = now
        lines, nbytes = budget.take_dropped()
        event(
            logging.WARNING,
            f"{self.tag}: {lines} stderr lines ({nbytes} bytes) not logged: over stderr_rate "
            f"(lines: {budget.lines_per_s:g}/s, bytes: {budget.bytes_per_s:g}/s)",
            event="stderr_dropped",
            service=self.tag,
            lines=lines,
            bytes=nbytes,
        )

    def _on_report_timer(self) -> None:
        self._report_timer = None
        self._report(time.monotonic())

    def _emit(self, pid: int, line: bytes) -> None:
        text = log.escape_controls(line.rstrip(b"\r").decode("utf-8", "replace"))
        event(logging.INFO, f"{self.tag}[{pid}]: {text}", event="stderr", service=self.tag, pid=pid)

    def close(self, drain: bool = True) -> None:
        if drain:
            self.drain()
            for pid in list(self._partial):
                self.ended(pid)
            self._report(time.monotonic(), at_once=True)
            if self._report_timer is not None:
                self._report_timer.cancelled = True
                self._report_timer = None
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(self._r)
        self._r.close()
        self._w.close()


class Server:
    """One pyinetd instance: listeners, children, the loop."""

    def __init__(self, config: Config, worker: int = 0) -> None:
        self.config = config
        self.worker = worker  # 0: the first process; N: worker N (see _start_workers)
        self.workers: dict[int, int] = {}  # first process: worker pid -> its number
        self.sel = selectors.DefaultSelector()
        self.spawner = Spawner()
        self.states: dict[str, ServiceState] = {}
        self.listeners: dict[ListenKey, Listener] = {}
        self.children: dict[int, Child] = {}
        self.sessions: dict[builtins.Session, tuple[ServiceState, str, Timer | None]] = {}
        self._timers: list[Timer] = []
        self._timer_seq = 0
        self._stopping = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._emfile_logged = False
        self._full = False  # at the global max_children: exec listeners are paused
        self._refusals = LogLimiter(60.0, max_lines=THROTTLED_LINES)  # events of no service
        self._limiters: dict[str, LogLimiter] = {}  # per service: one's flood resets no other's
        self._exit = False  # leave the loop (after _stopping: draining is over)
        self._drain_timer: Timer | None = None
        self.pid = os.getpid()
        self.started = time.monotonic()
        self.child_metrics = Metrics()  # durations and exit classes, by service name
        self._activated: dict[ListenKey, socket.socket] = {}
        self._control: control.RequestServer | None = None
        self._metrics: control.RequestServer | None = None
        self._pid_file: str | None = None
        self._pid_entry: tuple[int, str, int, int] | None = None  # folder fd, name, dev, inode
        self.pending: set[Pending] = set()  # connections whose PROXY header/ClientHello is due
        self._stage = StageSlots(config.max_pending, config.max_pending_per_source)
        self._loop_ports: frozenset[int] = frozenset()  # ports of our UDP built-ins
        self._udp_replies: dict[int, UDPReply] = {}  # pid of a UDP nowait child -> its reply
        self._devnull = -1  # `stderr: null`, opened once
        self._orphan_groups: set[int] = set()  # reaped leaders whose group outlives them
        self._watcher: reaper.ExitWatcher | None = None  # with many children (reaper.py)
        self._watcher_retry = 0.0  # no new watcher before this (monotonic), after a failure
        self._sweep_timer: Timer | None = None

    # ------------------------------------------------------------ start-up
    def bind(self) -> None:
        """Bind every enabled service's listeners; ListenError (nothing left bound) on failure.

        Sockets handed over by systemd socket activation are adopted instead of bound.
        """
        inherited = worker_fds() if self.worker else systemd.listen_fds()
        for sock, _name in inherited:
            key = systemd.key_of(sock)
            if key is None:
                sock.close()
                continue
            self._activated[key] = sock
        contexts = self._prepare(self.config)
        self._apply(self.config, self._bind_new(self.config, {}), contexts)
        for key, sock in self._activated.items():
            event(
                logging.WARNING,
                f"socket activation: no service listens on {key.protocol} "
                f"{key.address}; closing it",
                event="activation_unused",
            )
            sock.close()
        self._activated.clear()

    def _adopt(self, key: ListenKey) -> socket.socket | None:
        """An activated socket for ``key``: exact address, or any-address for PORT alone."""
        sock = self._activated.pop(key, None)
        if sock is None and not key.address.host and not key.address.path:
            for host in ("0.0.0.0", "::"):
                alt = ListenKey(key.protocol, type(key.address)(host=host, port=key.address.port))
                sock = self._activated.pop(alt, None)
                if sock is not None:
                    break
        if sock is not None and not self.worker:
            event(
                logging.INFO,
                f"socket activation: adopted {key.protocol} {key.address}",
                event="activation",
            )
        return sock

    def _bind_new(
        self, config: Config, keep: dict[ListenKey, Listener]
    ) -> dict[ListenKey, socket.socket]:
        """Bind every listen address of ``config`` not in ``keep``; all or nothing."""
        fresh: dict[ListenKey, socket.socket] = {}
        reuseport = config.workers > 1
        try:
            for svc in config.enabled_services:
                skip: dict[ListenKey, object] = {**keep, **fresh}
                for addr in svc.listen:
                    key = ListenKey(svc.protocol, addr)
                    if not self._serves(svc, key):
                        skip[key] = None
                    elif key not in keep and (sock := self._adopt(key)) is not None:
                        fresh[key] = skip[key] = sock
                for key, sock in bind_service(svc, skip=skip, reuseport=reuseport):
                    fresh[key] = sock
        except Exception:
            for sock in fresh.values():
                close_listener(sock)
            raise
        return fresh

    @staticmethod
    def _prepare(config: Config) -> dict[str, ssl.SSLContext]:
        """Everything a (re)load needs that can fail, before anything changes: each TLS
        context, built once from the files as they are now (issue 18.2: read again at apply,
        a key swapped in between left a TLS service serving plaintext). ConfigError if any
        fails."""
        if not any(svc.tls for svc in config.services):
            return {}
        from pyinetd.tlsconf import build_contexts  # ssl only where tls is used

        contexts, errors = build_contexts((s.name, s.source, s.tls) for s in config.services)
        if errors:
            raise ConfigError(errors)
        return contexts

    def _apply(
        self,
        config: Config,
        fresh: dict[ListenKey, socket.socket],
        contexts: dict[str, ssl.SSLContext],
    ) -> None:
        """Switch to ``config``: reuse kept sockets, add fresh ones, close the rest. Nothing
        here may fail: what can was done by _prepare and _bind_new."""
        self.config = config
        self.spawner.forget()
        wanted: dict[ListenKey, Service] = {}
        for svc in config.enabled_services:
            for addr in svc.listen:
                key = ListenKey(svc.protocol, addr)
                if self._serves(svc, key):
                    wanted[key] = svc
        for state in self.states.values():
            state.listeners.clear()
        enabled = {svc.name for svc in config.enabled_services}
        if config.reload_kills_removed:
            for child in list(self.children.values()):
                if child.state.service.name not in enabled:
                    _kill_group(child.pid, signal.SIGTERM)
        for svc in config.services:
            known = self.states.get(svc.name)
            if (known is None or known.service != svc) and not self.worker:
                _warn_if_root(svc)  # once per service and load, not per connection
            if svc.name not in self.states:
                self.states[svc.name] = ServiceState(svc)
            self.states[svc.name].set_service(svc, contexts.get(svc.name))
        closed = False
        for key, lst in list(self.listeners.items()):
            if key not in wanted:
                self._pause(lst)
                if lst.resume_timer:
                    lst.resume_timer.cancelled = True
                del self.listeners[key]
                if lst.waiting_on:
                    lst.sock.close()  # the wait-mode child keeps its own reference
                else:
                    close_listener(lst.sock)
                closed = True
        if closed:
            self.spawner.settle()  # no child still holds them: the next reload may rebind
        for key, svc in wanted.items():
            state = self.states[svc.name]
            existing = self.listeners.get(key)
            lst = existing if existing is not None else self._new_listener(key, fresh[key], state)
            lst.state = state
            state.listeners.append(lst)
            self._refresh(lst)
        self._full = self._at_max_children()
        for lst in self.listeners.values():
            self._refresh(lst)
        self._stage.total = config.max_pending
        self._stage.per_source = config.max_pending_per_source
        self._loop_ports = self._builtin_udp_ports(config)
        for svc in config.enabled_services:
            if svc.proxy_protocol and svc.proxy_from is None and not self.worker:
                # Issue 14, item 13: then anyone may claim any address, past allow/deny.
                event(
                    logging.WARNING,
                    f"{svc.name}: proxy_protocol without proxy_from: any client may send a "
                    "PROXY header and claim any address (allow/deny then decide on that claim)",
                    event="proxy_untrusted",
                    service=svc.name,
                )

    def _builtin_udp_ports(self, config: Config) -> frozenset[int]:
        """The ports our UDP built-ins answer on: a datagram from one of them is a loop."""
        ports = {
            addr.port
            for svc in config.enabled_services
            if svc.protocol == "udp" and svc.builtin is not None
            for addr in svc.listen
            if addr.port
        }
        for lst in self.listeners.values():
            if lst.key.protocol == "udp" and lst.service.builtin is not None:
                with contextlib.suppress(OSError):
                    ports.add(peer_of(lst.family, lst.sock.getsockname())[1])
        return frozenset(ports)

    def _new_listener(self, key: ListenKey, sock: socket.socket, state: ServiceState) -> Listener:
        lst = Listener(key=key, sock=sock, state=state, family=int(sock.family))
        if key.address.host and sock.family != socket.AF_UNIX:
            # Bound to one address: the local end of every connection is known without
            # a getsockname() per connection.
            lst.local_ip, lst.local_port = peer_of(sock.family, sock.getsockname())
        self.listeners[key] = lst
        return lst

    # ------------------------------------------------------------ listener state
    def _should_listen(self, lst: Listener) -> bool:
        if self._stopping or lst.waiting_on or self.listeners.get(lst.key) is not lst:
            return False
        if lst.paused_until and time.monotonic() < lst.paused_until:
            return False
        svc = lst.state.service
        if (
            svc.max_connections
            and svc.on_limit == "queue"
            and not svc.wait
            and lst.state.running + lst.state.hellos >= svc.max_connections
        ):
            return False  # clients wait in the backlog, like tcpserver -c
        return not (self._full and not svc.is_builtin and svc.on_limit == "queue")

    def _refresh(self, lst: Listener) -> None:
        """Watch or stop watching a listener according to its limits and pauses."""
        if self._should_listen(lst):
            if not lst.registered:
                if lst.key.protocol == "udp":
                    handler = functools.partial(self._on_datagram, lst)
                else:
                    handler = functools.partial(self._on_accept, lst)
                self.sel.register(lst.sock, selectors.EVENT_READ, handler)
                lst.registered = True
        else:
            self._pause(lst)

    def _pause(self, lst: Listener) -> None:
        if lst.registered:
            self.sel.unregister(lst.sock)
            lst.registered = False

    def _pause_for(self, lst: Listener, seconds: float) -> None:
        """Stop accepting on ``lst`` for a while; the socket stays open and bound."""
        lst.paused_until = time.monotonic() + seconds
        self._pause(lst)
        if lst.resume_timer:
            lst.resume_timer.cancelled = True
        lst.resume_timer = self.call_later(seconds, functools.partial(self._resume, lst))

    def _resume(self, lst: Listener) -> None:
        lst.paused_until = 0.0
        lst.resume_timer = None
        self._refresh(lst)
        if lst.registered:
            event(
                logging.INFO,
                f"{lst.state.service.name}: {lst.key.address}: accepting again",
                event="resume",
                service=lst.state.service.name,
            )

    def _at_max_children(self) -> bool:
        limit = self.config.max_children
        return limit is not None and len(self.children) >= limit

    def _install_signals(self) -> None:
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        # Signals we were started with ignored (`pyinetd &` in a script ignores SIGINT and
        # SIGQUIT) stay ignored for pyinetd, through a handler that does nothing: exec resets
        # caught signals to their default, so no service inherits an ignored signal. Python's
        # own SIGPIPE and SIGXFSZ are reset by the spawn primitive.
        inherited = [s for s in ignored_signals() if s not in (signal.SIGPIPE, signal.SIGXFSZ)]
        for sig in (*HANDLED_SIGNALS, *inherited):
            signal.signal(sig, _noop_handler)
            signal.siginterrupt(sig, False)
        self.spawner.refresh_signals()
        prim = self.spawner.primitive
        if C_MODULE_BUILT or "PYINETD_SPAWN" in os.environ or self.worker:
            event(logging.DEBUG, f"services start with {prim}", event="spawn")
        else:
            event(
                logging.INFO,
                f"services start with {prim}: pyinetd._spawn was not built at install "
                "(no C compiler or Python headers); see README, Performance",
                event="spawn",
            )
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
    def run(self, pid_file: str | None = None, control_path: str | None = None) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit code.

        ``control_path``: the control socket (`--control`), before the config's `control_socket`.
        """
        self._install_signals()
        self.reap_children()  # children left from before exec (e.g. by a wrapper script)
        if self.worker:
            event(logging.INFO, f"worker {self.worker}: listening", event="worker_ready")
        else:
            self._start_control(control_path)
            pid_file = pid_file or self.config.pid_file  # `pid_file:` was read, never used
            if pid_file:
                try:
                    self._write_pid_file(pid_file)
                except OSError as exc:
                    reason = exc.strerror or str(exc)
                    event(logging.ERROR, f"pid file {pid_file}: {reason}", event="pid_file")
                    self._shutdown()
                    return 1
            self._start_workers()
            event(logging.INFO, f"listening: {self._describe()}", event="ready")
            systemd.notify("READY=1", f"STATUS={self._status_line()}")
            systemd.start_watchdog(self.call_later)
        log.batching(True)
        try:
            while not self._exit:
                timeout = self._run_timers()
                if self._watcher is not None and not self._watcher.flush():
                    self._watcher_gone()
                log.flush()
                if log.backlog():  # the log reader stalls: try again soon, never block on it
                    timeout = LOG_RETRY if timeout is None else min(timeout, LOG_RETRY)
                for key, mask in self.sel.select(timeout):
                    try:
                        key.data(mask)
                    except Exception:
                        # A bug in one handler must not take every service down with it.
                        LOG.exception("internal error handling an event; serving on")
                        self._contain(key)
                    if self._exit:
                        break
        finally:
            try:
                self._shutdown()
            finally:
                log.batching(False)
        return 0

    def _contain(self, key: selectors.SelectorKey) -> None:
        """After a handler raised: close its connection, or rest its listener, so that a
        level-triggered fd cannot make it raise again and again (issue 18, item 6: 22,004
        tracebacks from one connection). Other handlers (signals, the exit watcher, stderr
        logs) stay as they are."""
        handler = key.data
        target = handler.args[0] if isinstance(handler, functools.partial) else None
        try:
            if isinstance(target, Listener):
                self._pause_for(target, EMFILE_PAUSE)
                return
            if not isinstance(handler, _CONNECTIONS):
                return
            handler.close()
        except Exception:
            LOG.exception("internal error closing the connection that raised")
        with contextlib.suppress(KeyError, ValueError):
            if self.sel.get_key(key.fileobj).data is handler:
                self.sel.unregister(key.fileobj)
        with contextlib.suppress(OSError):
            if isinstance(key.fileobj, socket.socket):
                key.fileobj.close()

    # ------------------------------------------------------------ operations
    def _start_control(self, path: str | None = None) -> None:
        path = path or self.config.control_socket or control.default_control_path(self.config.path)
        try:
            sock = control.bind_control(path)
        except OSError as exc:
            event(
                logging.WARNING,
                f"control socket {path}: {exc.strerror or exc}; "
                "`pyinetd status/reload/stop` will not reach this instance",
                event="control_error",
            )
        else:
            self._control = control.RequestServer(
                sock, self.sel, self._on_control, b"\n", self.call_later
            )
        if self.config.metrics:
            addr = parse_listen_item(self.config.metrics, "tcp", Path("."))
            try:
                msock = bind_listener("tcp", addr)
            except OSError as exc:
                event(
                    logging.WARNING, f"metrics {addr}: {exc.strerror or exc}", event="metrics_error"
                )
            else:
                self._metrics = control.RequestServer(
                    msock, self.sel, self._on_metrics, b"\r\n\r\n", self.call_later
                )

    def _on_control(self, request: bytes) -> bytes:
        words = request.decode("utf-8", "replace").split()
        cmd = words[0] if words else ""
        answer: dict[str, object]
        if cmd == "status":
            answer = {"ok": True, "status": status.snapshot(self)}
        elif cmd == "reload":
            errors = self.reload()
            answer = {"ok": not errors, "errors": errors}
        elif cmd == "stop":
            self._begin_stop("control socket")
            answer = {"ok": True}
        else:
            answer = {"ok": False, "errors": [f"unknown command {cmd!r}"]}
        return json.dumps(answer).encode() + b"\n"

    def _on_metrics(self, request: bytes) -> bytes:
        line = request.split(b"\r\n", 1)[0].split()
        if len(line) >= 2 and line[0] == b"GET" and line[1].split(b"?")[0] in (b"/metrics", b"/"):
            body = status.render_prometheus(status.snapshot(self)).encode()
            return control.http_response("200 OK", body, "text/plain; version=0.0.4")
        return control.http_response("404 Not Found", b"not found\n", "text/plain")

    def _write_pid_file(self, path: str) -> None:
        """Write the pid file atomically, from an fd on its folder, under a name no one can guess.

        The temporary name was PATH.PID.tmp, opened following symlinks: a local user who
        planted symlinks for the next pids had root overwrite a file of their choosing (issue
        14.4). A folder others may write (unless sticky) or another user owns is refused: they
        could swap the file under us, and its removal at stop.
        """
        folder, name = os.path.split(os.path.abspath(path))
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            st = os.fstat(dfd)
            if st.st_uid not in (os.geteuid(), 0):
                raise OSError(
                    errno.EPERM, f"folder {folder} is owned by uid {st.st_uid}; refusing it"
                )
            if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
                mode = f"{stat.S_IMODE(st.st_mode):04o}"
                raise OSError(
                    errno.EPERM, f"folder {folder} is writable by others (mode {mode}); refusing it"
                )
            # os.urandom, not secrets/tempfile: those load hashlib (libcrypto, 3.5 MiB).
            tmp = f".{name}.{os.urandom(8).hex()}"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(tmp, flags, 0o644, dir_fd=dfd)
            try:
                os.write(fd, f"{self.pid}\n".encode())
                written = os.fstat(fd)
            finally:
                os.close(fd)
            # atomic: a reader never sees a half-written file
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            os.close(dfd)
            raise
        self._pid_file = path
        self._pid_entry = (dfd, name, written.st_dev, written.st_ino)

    def _remove_pid_file(self) -> None:
        """Unlink the pid file, in the folder it was written to, only if it is still ours."""
        if self._pid_entry is None:
            return
        dfd, name, dev, ino = self._pid_entry
        self._pid_entry = None
        with contextlib.suppress(OSError):
            st = os.lstat(name, dir_fd=dfd)
            if (st.st_dev, st.st_ino) == (dev, ino):
                os.unlink(name, dir_fd=dfd)
        os.close(dfd)

    def _status_line(self) -> str:
        refused = sum(sum(st.refused.values()) for st in self.states.values())
        accepted = sum(st.accepted for st in self.states.values())
        return (
            f"{len(self.config.enabled_services)} services, {len(self.children)} children, "
            f"{accepted} accepted, {refused} refused"
        )

    def dump_status(self) -> None:
        """SIGUSR1: write the status table to the log (like xinetd's dump)."""
        snap = status.snapshot(self)
        for line in status.render_table(snap).splitlines():
            event(logging.INFO, f"status: {line}", event="status")

    def _begin_stop(self, why: str) -> None:
        """Stop listening; then leave at once, or drain the children first."""
        if self._stopping:
            event(logging.INFO, f"{why} again: stopping now", event="stop_now")
            self._signal_workers(signal.SIGTERM)
            self._exit = True
            return
        self._stopping = True
        systemd.notify("STOPPING=1")
        for lst in list(self.listeners.values()):
            self._pause(lst)
            if lst.resume_timer:
                lst.resume_timer.cancelled = True
            if lst.waiting_on:
                lst.sock.close()  # the wait-mode child still holds it
            else:
                close_listener(lst.sock)
        self.listeners.clear()
        self.spawner.settle()  # the ports are free for a new pyinetd once this one stops
        self._signal_workers(signal.SIGTERM)  # each stops (leave or drain) as we do
        running = len(self.children) + len(self.sessions)
        if self.config.shutdown != "drain" or not (running or self.workers):
            event(logging.INFO, f"{why}: stopping", event="stopping")
            self._exit = True
            return
        event(
            logging.INFO,
            f"{why}: draining {running} connections (up to {self.config.drain_timeout:g}s)",
            event="draining",
            running=running,
        )
        self._drain_timer = self.call_later(self.config.drain_timeout, self._drain_expired)

    def _drain_expired(self) -> None:
        event(
            logging.WARNING,
            f"drain timeout: sending SIGTERM to {len(self.children)} children",
            event="drain_timeout",
        )
        for sess in list(self.sessions):
            sess.close()
        for pid in list(self.children):
            _kill_group(pid, signal.SIGTERM)
        self._drain_timer = self.call_later(KILL_GRACE, self._drain_kill)

    def _drain_kill(self) -> None:
        for pid in list(self.children):
            _kill_group(pid, signal.SIGKILL)
        self._exit = True

    def _check_drained(self) -> None:
        if self._stopping and not self.children and not self.sessions and not self.workers:
            if self._drain_timer is not None:
                self._drain_timer.cancelled = True
            self._exit = True

    def _describe(self) -> str:
        return ", ".join(
            f"{s.name} ({s.protocol} {' '.join(str(a) for a in s.listen)})"
            for s in self.config.enabled_services
        )

    def _on_wakeup(self, mask: int) -> None:
        try:
            data = self._wake_r.recv(4096)
        except BlockingIOError:
            data = b""
        signums = set(data)
        # SIGCHLD coalesces, and a full wake-up buffer drops bytes: reap on every wake-up.
        self.reap_children()
        if signal.SIGTERM in signums or signal.SIGINT in signums:
            self._begin_stop("SIGTERM" if signal.SIGTERM in signums else "SIGINT")
            return
        if signal.SIGHUP in signums and not self._stopping:
            self.reload()
        if signal.SIGUSR1 in signums:
            self.dump_status()

    def reload(self) -> list[str]:
        """Re-read the configuration file; on any error keep everything as it is.

        Returns the errors (empty on success).
        """
        systemd.reloading()
        try:
            new = load(self.config.path)
            contexts = self._prepare(new)
            fresh = self._bind_new(new, self.listeners)
        except ConfigError as exc:
            errors = exc.errors
        except ListenError as exc:
            errors = [f"{self.config.path}: {exc}"]
        else:
            self._apply(new, fresh, contexts)
            if not self.worker:
                self._reload_workers()
            event(logging.INFO, f"reloaded: {self._describe()}", event="reloaded")
            systemd.notify("READY=1", f"STATUS={self._status_line()}")
            return []
        event(
            logging.ERROR,
            "reload failed, keeping the running configuration: " + "; ".join(errors),
            event="reload_failed",
            errors=errors,
        )
        systemd.notify("READY=1", f"STATUS=reload failed: {errors[0] if errors else ''}")
        return errors

    def _shutdown(self) -> None:
        if not self._stopping:
            self._begin_stop("exit")
        for server in (self._control, self._metrics):
            if server is not None:
                server.close()
        for sess in list(self.sessions):
            sess.close()
        for pend in list(self.pending):
            pend.close()
        for state in self.states.values():
            if state.stderr_log is not None:
                state.stderr_log.close()
                state.stderr_log = None
        if self._devnull >= 0:
            os.close(self._devnull)
            self._devnull = -1
        self._remove_pid_file()
        signal.set_wakeup_fd(-1)
        self.spawner.close()
        self._stop_watcher(reap=False)  # it exits when its pipe closes
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

    # ------------------------------------------------------------ workers
    def _serves(self, svc: Service, key: ListenKey) -> bool:
        return not self.worker or _worker_serves(svc, key)

    def _start_workers(self) -> None:
        for number in range(1, self.config.workers):
            if number not in self.workers.values():
                self._spawn_worker(number)

    def _spawn_worker(self, number: int) -> None:
        """Start worker ``number``: a fresh `pyinetd -c CONFIG` that adopts our listening
        sockets (their fd numbers in PYINETD_LISTEN_FDS) and serves them with its own loop."""
        socks = [
            lst.sock for lst in self.listeners.values() if _worker_serves(lst.service, lst.key)
        ]
        env = dict(os.environ)
        env.update(
            PYINETD_WORKER=str(number),
            PYINETD_LISTEN_FDS=",".join(str(s.fileno()) for s in socks),
        )
        env.pop("NOTIFY_SOCKET", None)
        # The same pyinetd code as ours, whatever the worker's import path would find.
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        code = (
            f"import sys; sys.path.insert(0, {root!r}); "
            "from pyinetd.cli import main; sys.exit(main())"
        )
        argv = [sys.executable, "-c", code, "-c", str(self.config.path), *log.cli_args()]
        for sock in socks:
            os.set_inheritable(sock.fileno(), True)
        try:
            pid = os.posix_spawn(argv[0], argv, env, setsigmask=(), setsigdef=ignored_signals())
        except OSError as exc:
            event(logging.ERROR, f"worker {number}: cannot start: {exc}", event="worker_error")
            return
        finally:
            for sock in socks:
                os.set_inheritable(sock.fileno(), False)
        self.workers[pid] = number
        self._track(pid)
        event(logging.INFO, f"worker {number}: pid {pid}", event="worker_start", pid=pid)

    def _reload_workers(self) -> None:
        """After our reload: workers beyond the new number retire, the others reload."""
        self._signal_workers(signal.SIGHUP, retire=signal.SIGTERM)
        self._start_workers()

    def _signal_workers(self, sig: int, retire: int | None = None) -> None:
        """Send ``sig`` to every worker (``retire`` instead to those numbered past the
        configured count)."""
        for pid, number in list(self.workers.items()):
            send = retire if retire is not None and number >= self.config.workers else sig
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, send)

    def _worker_exited(self, pid: int, status: int) -> None:
        number = self.workers.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if self._stopping:
            self._check_drained()
            return
        if number >= self.config.workers:
            return  # retired by a reload
        event(
            logging.ERROR,
            f"worker {number} (pid {pid}) exited ({code}); starting it again in 1s",
            event="worker_exit",
            pid=pid,
        )
        self.call_later(1.0, self._restart_workers)

    def _restart_workers(self) -> None:
        if not self._stopping:
            self._start_workers()

    # ------------------------------------------------------------ children
    def reap_children(self) -> None:
        """On SIGCHLD: reap every exited child, unless the exit watcher reports them."""
        if self._watcher is None:
            self._reap_all()

    def _reap_all(self) -> None:
        """Reap every exited child: loop until waitpid says none are left (SIGCHLD coalesces)."""
        exited: list[tuple[int, int]] = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            exited.append((pid, status))
        self._handle_exited(exited)

    def _handle_exited(self, exited: list[tuple[int, int]]) -> None:
        if not exited:
            return
        # What the children wrote to stderr before they exited is logged before their end.
        drained: set[StderrLog] = set()
        for pid, _status in exited:
            child = self.children.get(pid)
            stderr_log = child.state.stderr_log if child is not None else None
            if stderr_log is not None:
                if stderr_log not in drained:
                    drained.add(stderr_log)
                    stderr_log.drain()
                stderr_log.ended(pid)
        for pid, wstatus in exited:
            self._child_exited(pid, wstatus)

    # ------------------------------------------------------------ the exit watcher
    def _track(self, pid: int) -> None:
        """A child started: give its pid to the watcher, or start one if they are many."""
        if self._watcher is not None:
            self._watcher.watch(pid)
        elif len(self.children) >= reaper.WATCH_FROM and time.monotonic() >= self._watcher_retry:
            self._start_watcher()

    def _start_watcher(self) -> None:
        try:
            watcher = reaper.ExitWatcher()
        except OSError as exc:
            self._watcher_retry = time.monotonic() + 60.0
            event(logging.WARNING, f"cannot start the exit watcher: {exc}", event="watcher")
            return
        self._watcher = watcher
        for pid in (*self.children, *self.workers):
            watcher.watch(pid)
        self.sel.register(watcher.fileno(), selectors.EVENT_READ, self._on_watcher)
        self._sweep_timer = self.call_later(reaper.SWEEP_EVERY, self._sweep)
        event(
            logging.INFO,
            f"{len(self.children)} children: exit watcher started (pid {watcher.pid})",
            event="watcher",
            pid=watcher.pid,
        )

    def _on_watcher(self, mask: int) -> None:
        if self._watcher is None:
            return
        pids = self._watcher.exited()
        if pids is None:
            self._watcher_gone()
            return
        exited: list[tuple[int, int]] = []
        for pid in pids:
            try:
                got, wstatus = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue  # reaped by a sweep meanwhile
            if got:
                exited.append((got, wstatus))
        self._handle_exited(exited)
        if len(self.children) < reaper.WATCH_FROM // 4:
            self._stop_watcher()

    def _watcher_gone(self) -> None:
        """The watcher died (EOF, EPIPE) or gave up: back to waitpid(-1) now, said once."""
        self._watcher_retry = time.monotonic() + 60.0
        event(
            logging.WARNING,
            "exit watcher gone (it exited, or ran out of file descriptors); "
            "reaping with waitpid(-1)",
            event="watcher",
        )
        self._stop_watcher()  # reaps at once what exited before the watcher could say

    def _sweep(self) -> None:
        """The watcher's backup: a full waitpid(-1) loop every few seconds."""
        self._reap_all()
        if self._watcher is not None:
            self._sweep_timer = self.call_later(reaper.SWEEP_EVERY, self._sweep)

    def _stop_watcher(self, reap: bool = True) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is None:
            return
        self.sel.unregister(watcher.fileno())
        watcher.close()
        if self._sweep_timer is not None:
            self._sweep_timer.cancelled = True
            self._sweep_timer = None
        if reap:
            self._reap_all()  # what exited before the watcher could say

    def _child_exited(self, pid: int, status: int) -> None:
        if pid in self.workers:
            self._worker_exited(pid, status)
            return
        child = self.children.pop(pid, None)
        if child is None:
            LOG.debug("reaped unknown pid %d", pid)  # gunicorn #3566: not an error
            return
        if child.timer is not None:
            if _group_alive(pid):
                # The service left processes behind in its group (a grandchild still holding
                # the connection): the timeout still applies to them.
                self._orphan_groups.add(pid)
            else:
                child.timer.cancelled = True
        state = child.state
        state.drop_source(child.source)
        reply = self._udp_replies.pop(pid, None)
        if reply is not None and not reply.closed:
            self.call_later(UDP_REPLY_GRACE, reply.finish)
        err = self.spawner.exec_error(pid, status)
        if err is None:
            duration = time.monotonic() - child.started
            self.child_metrics.child_ended(state.service.name, duration, status, child.killed)
        if err is not None:  # started by the clone primitive, which reports exec errors late
            state.failed_spawns += 1
            self._log_exec_error(state.service, os.strerror(err), child.peer)
        elif LOG.isEnabledFor(logging.INFO):  # formatting costs even when nothing is logged
            self._log_end(child, pid, status)
        if self._stopping:
            self._check_drained()
            return
        if child.listener is not None:
            lst = child.listener
            lst.waiting_on = 0
            if self.listeners.get(lst.key) is lst:
                lst.sock.setblocking(False)
        if self._full and not self._at_max_children():
            self._full = False
            for lst in self.listeners.values():
                self._refresh(lst)
        else:
            for lst in state.listeners:
                if not lst.registered:
                    self._refresh(lst)

    def _log_end(self, child: Child, pid: int, status: int) -> None:
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

    def _on_timeout(self, pid: int) -> None:
        child = self.children.get(pid)
        if child is None:
            if pid in self._orphan_groups:
                self._orphan_groups.discard(pid)
                if _group_alive(pid):
                    event(
                        logging.WARNING,
                        f"timeout: process group {pid} outlived its "
                        "service; sending SIGTERM, then SIGKILL",
                        event="timeout_group",
                    )
                    with contextlib.suppress(OSError):  # the leader is reaped: the group only
                        os.killpg(pid, signal.SIGTERM)
                    self.call_later(KILL_GRACE, lambda: _kill_orphan(pid, self.children))
            return
        name = child.state.service.name
        if not child.killed:
            child.killed = True
            event(
                logging.WARNING,
                f"{name}: pid {pid} timed out after "
                f"{child.state.service.timeout}s; sending SIGTERM",
                event="timeout",
                service=name,
                pid=pid,
                peer=child.peer,
            )
            _kill_group(pid, signal.SIGTERM)
            child.timer = self.call_later(KILL_GRACE, lambda: self._on_timeout(pid))
        elif not child.sigkilled:
            child.sigkilled = True
            event(
                logging.WARNING,
                f"{name}: pid {pid} still running {KILL_GRACE}s after SIGTERM; sending SIGKILL",
                event="timeout_kill",
                service=name,
                pid=pid,
            )
            _kill_group(pid, signal.SIGKILL)
            # Check that it died (issue 18.3: a service that had left its group survived a
            # killpg while "sending SIGKILL" was logged, and kept its max_connections slot).
            child.timer = self.call_later(KILL_GRACE, lambda: self._on_timeout(pid))
        else:
            # Still not reaped: stuck in the kernel (state D) or a pid we cannot signal.
            event(
                logging.ERROR,
                f"{name}: pid {pid} survived SIGKILL for {KILL_GRACE}s; its slot stays taken",
                event="timeout_unkillable",
                service=name,
                pid=pid,
            )
            child.timer = None

    # ------------------------------------------------------------ admission
    def _refuse(
        self,
        state: ServiceState,
        conn: socket.socket | None,
        ip: str,
        port: int,
        reason: str,
        detail: str = "",
    ) -> None:
        """Count, log (throttled per address) and answer a refused connection, then close it."""
        svc = state.service
        state.refused[reason] = state.refused.get(reason, 0) + 1
        src = source_key(ip, svc.per_source_prefix) if ip else "unix"
        why = f" ({detail})" if detail else ""
        self._log_throttled(
            f"{svc.name} {reason} {src}",
            logging.WARNING,
            f"{svc.name}: refused {peer_text(ip, port)}: {reason}{why}",
            event="refused",
            service=svc.name,
            peer=peer_text(ip, port),
            reason=reason,
        )
        if conn is not None:
            msg = svc.deny_message if reason == "deny" else svc.busy_message
            if msg:
                with contextlib.suppress(OSError):
                    conn.send(msg.encode(), socket.MSG_DONTWAIT)
            conn.close()

    def _admit(
        self, state: ServiceState, ip: str, take_token: bool = True
    ) -> tuple[str | None, str]:
        """(refusal reason or None, per_source key) for a new connection from ``ip``.

        Every path asks here: TCP, unix, after a PROXY header, before and after a TLS
        ClientHello, each UDP datagram (built-in or not).
        """
        svc = state.service
        if svc.access is not None and not svc.access.permits(ip):
            return "deny", ""
        if svc.max_connections and state.running + state.hellos >= svc.max_connections:
            return "limit", ""
        if self._full and not svc.is_builtin:
            return "max_children", ""
        key = source_key(ip, svc.per_source_prefix) if svc.per_source and ip else ""
        if key and svc.per_source and state.sources.get(key, 0) >= svc.per_source:
            return "per_source", key
        if take_token and state.bucket is not None and not state.bucket.take(time.monotonic()):
            return "rate", key

        return None, key

    # ------------------------------------------------------------ connections
    def _on_accept(self, lst: Listener, mask: int = 0) -> None:
        if lst.state.service.wait:
            self._start_wait_child(lst)
            return
        for _ in range(ACCEPT_BATCH):
            try:
                # The C-level accept and socket type: socket.socket.accept() builds a Python
                # subclass object and converts enums per connection, ~10% of the parent's
                # time per connection in the profile (bench/README.md).
                fd, addr = lst.sock._accept()  # type: ignore[attr-defined]
                conn = cast(socket.socket, _socket.socket(lst.family, socket.SOCK_STREAM, 0, fd))
            except BlockingIOError:
                if self._emfile_logged:
                    # The episode ends when the backlog has drained, not at the first slot.
                    event(logging.WARNING, "accepting again: file descriptors available")
                    self._emfile_logged = False
                return
            except OSError as exc:
                self._accept_failed(lst, exc)
                return
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
                    f"{lst.state.service.name}: accept: {exc.strerror}; pausing accepts "
                    f"for {EMFILE_PAUSE}s at a time until descriptors free up",
                    event="accept_error",
                    service=lst.state.service.name,
                )
                self._emfile_logged = True
            self._pause_for(lst, EMFILE_PAUSE)
        elif exc.errno not in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
            event(logging.WARNING, f"{lst.state.service.name}: accept: {exc}", event="accept_error")

    def _connection_env(
        self, lst: Listener, conn: socket.socket, ip: str, port: int
    ) -> list[bytes]:
        if lst.key.protocol == "unix":
            env = [b"PROTO=IPC", b"IPCLOCALPATH=" + os.fsencode(str(lst.key.address))]
            with contextlib.suppress(OSError):
                creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                pid, uid, gid = struct.unpack("3i", creds)
                env += [b"IPCREMOTEPID=%d" % pid, b"IPCREMOTEEUID=%d" % uid]
                env.append(b"IPCREMOTEEGID=%d" % gid)
            return env
        if lst.local_ip:
            lip, lport = lst.local_ip, lst.local_port
        else:
            try:
                lip, lport = peer_of(lst.family, conn.getsockname())
            except OSError:
                lip, lport = "", 0
        return self._ip_env(b"TCP", ip, port, lip, lport)

    @staticmethod
    def _ip_env(proto: bytes, ip: str, port: int, lip: str, lport: int) -> list[bytes]:
        """The UCSPI variables and REMOTE_ADDR/REMOTE_PORT, as KEY=value entries."""
        bip, sport = ip.encode(), b"%d" % port
        return [
            b"PROTO=" + proto,
            b"REMOTE_ADDR=" + bip,
            b"REMOTE_PORT=" + sport,
            proto + b"REMOTEIP=" + bip,
            proto + b"REMOTEPORT=" + sport,
            proto + b"LOCALIP=" + lip.encode(),
            proto + b"LOCALPORT=%d" % lport,
        ]

    def _serve_stream(self, lst: Listener, conn: socket.socket, addr: object) -> None:
        svc = lst.state.service
        ip, port = peer_of(lst.family, addr)
        if svc.proxy_protocol:
            # The socket's peer is checked before a byte is read: only a trusted proxy may
            # hold a pre-service slot for its header, and it is not counted per source (it
            # speaks for many clients).
            key = source_key(ip) if ip else ""
            if svc.proxy_from is not None:
                if not svc.proxy_from.permits(ip):
                    self._refuse(lst.state, conn, ip, port, "proxy_from")
                    return
                key = ""
            if not self._take_slot(lst.state, conn, ip, port, key):
                return
            conn.setblocking(False)
            accept = svc.proxy_protocol
            pend = PendingProxy(self, lst, conn, (ip, port), key, svc.proxy_timeout, accept)
            self.pending.add(pend)
            pend(0)  # the header usually came with the connection: no wait, no slot held
            return
        self._after_header(lst, conn, ip, port, None)

    def _take_slot(
        self, state: ServiceState, conn: socket.socket, ip: str, port: int, key: str
    ) -> bool:
        """A pre-service slot for this connection, or it is refused (and False)."""
        reason = self._stage.take(key)
        if reason is not None:
            self._refuse(state, conn, ip, port, reason)
            return False
        return True

    def leave_stage(self, pend: Pending) -> None:
        """``pend`` no longer waits: its slot is free."""
        if pend in self.pending:
            self.pending.discard(pend)
            self._stage.release(pend.key)
            if isinstance(pend, PendingHello):
                # Its place under max_connections goes back: to the fork (stage_done), or to
                # the next connection (a queued listener may listen again).
                state = pend.lst.state
                state.hellos = max(0, state.hellos - 1)
                for lst in state.listeners:
                    if not lst.registered:
                        self._refresh(lst)

    def stage_failed(self, pend: Pending, why: str) -> None:
        """No valid PROXY header or ClientHello in time: refused, counted, logged."""
        self.leave_stage(pend)
        reason = "proxy" if isinstance(pend, PendingProxy) else "tls"
        self._refuse(pend.lst.state, pend.conn, pend.ip, pend.port, reason, detail=why)

    def stage_done(self, pend: Pending, header: proxyproto.ProxyHeader | None) -> None:
        """A PROXY header is read (the balancer's client replaces the socket's peer), or a
        ClientHello has arrived (admit, counted, and fork the relay for the handshake)."""
        self.leave_stage(pend)
        lst, conn = pend.lst, pend.conn
        if self.listeners.get(lst.key) is not lst:
            conn.close()  # removed by a reload meanwhile
            return
        conn.setblocking(True)
        if header is None:
            self._serve_admitted(lst, conn, pend.ip, pend.port, pend.local)
            return
        ip, port, local = pend.ip, pend.port, None
        if header.src_addr is not None and header.src_port is not None:
            ip, port = format_ip(header.src_addr), header.src_port
            if header.dst_addr is not None and header.dst_port is not None:
                local = (format_ip(header.dst_addr), header.dst_port)
        self._after_header(lst, conn, ip, port, local)

    def _after_header(
        self,
        lst: Listener,
        conn: socket.socket,
        ip: str,
        port: int,
        local: tuple[str, int] | None,
    ) -> None:
        """The client's address is known: a TLS service waits (in the parent, bounded) for
        the ClientHello before a relay is forked; anything else is admitted now."""
        svc = lst.state.service
        if svc.tls is None:
            self._serve_admitted(lst, conn, ip, port, local)
            return
        # Issue 14, item 5: access and limits before any handshake or fork. They are checked
        # now (no rate token taken: the hello may never come) and again, counted, at the fork.
        reason, _src = self._admit(lst.state, ip, take_token=False)
        if reason is not None:
            self._refuse(lst.state, conn, ip, port, reason)
            return
        key = source_key(ip) if ip else ""
        if not self._take_slot(lst.state, conn, ip, port, key):
            return
        conn.setblocking(False)
        timeout = svc.tls.handshake_timeout
        hello = PendingHello(self, lst, conn, (ip, port), key, timeout, local)
        self.pending.add(hello)
        lst.state.hellos += 1  # holds its place under max_connections (on_limit: queue)
        self._instance_started(lst.state)
        hello(0)

    def _serve_admitted(
        self,
        lst: Listener,
        conn: socket.socket,
        ip: str,
        port: int,
        local: tuple[str, int] | None,
    ) -> None:
        state = lst.state
        svc = state.service
        reason, src = self._admit(state, ip)
        if reason is not None:
            self._refuse(state, conn, ip, port, reason)
            if reason == "rate":
                self._rate_pause(state)
            return
        state.accepted += 1
        if svc.banner:
            with contextlib.suppress(OSError):
                conn.send(svc.banner, socket.MSG_DONTWAIT)
        if svc.builtin is not None:
            conn.setblocking(False)
            self._start_session(state, conn, svc.builtin, src)
            return
        try:
            if local is not None:
                env = self._ip_env(b"TCP", ip, port, *local)
            else:
                env = self._connection_env(lst, conn, ip, port)
            self._start_child(
                state, conn.fileno(), conn.fileno(), conn, env, peer_text(ip, port), src=src
            )
        finally:
            conn.close()

    def _rate_pause(self, state: ServiceState) -> None:
        svc = state.service
        event(
            logging.WARNING,
            f"{svc.name}: over the rate of {svc.rate[0] if svc.rate else 0:g}/s; "
            f"pausing for {svc.rate_pause:g}s (the port stays open)",
            event="rate_pause",
            service=svc.name,
        )
        for lst in state.listeners:
            self._pause_for(lst, svc.rate_pause)

    def _start_session(self, state: ServiceState, conn: socket.socket, kind: str, src: str) -> None:
        state.add_source(src)
        sess = builtins.Session(kind, conn, self.sel, self._session_closed)
        if sess.closed:
            state.drop_source(src)
            return
        timer = None
        if state.service.timeout:
            timer = self.call_later(state.service.timeout, sess.close)
        self.sessions[sess] = (state, src, timer)
        self._instance_started(state)

    def _instance_started(self, state: ServiceState) -> None:
        """A child or session started: at a limit, stop accepting (queue) until one ends."""
        if self._full:
            for lst in self.listeners.values():
                self._refresh(lst)
        elif (
            state.service.max_connections
            and state.running + state.hellos >= state.service.max_connections
        ):
            for lst in state.listeners:
                self._refresh(lst)

    def _session_closed(self, sess: builtins.Session) -> None:
        entry = self.sessions.pop(sess, None)
        if entry is None:
            return  # closed while starting: _start_session drops the slot
        state, src, timer = entry
        if timer is not None:
            timer.cancelled = True
        state.drop_source(src)
        if self._stopping:
            self._check_drained()
            return
        for lst in state.listeners:
            if not lst.registered:
                self._refresh(lst)

    def _stderr_fd(self, state: ServiceState, conn: socket.socket | None) -> tuple[int, bool]:
        """The fd for the child's stderr, and whether it is ours to close after the spawn.

        Only a `stderr: FILE` opens anything per connection (so that a rotated log file is
        followed); `log` and `null` use fds made once, `socket` the connection itself.
        """
        mode = state.service.stderr
        if mode == "log":
            if state.stderr_log is None:
                svc = state.service
                state.stderr_log = StderrLog(svc.name, self.sel, svc.stderr_rate, self.call_later)
            return state.stderr_log.fileno(), False
        if mode == "socket" and conn is not None:
            return conn.fileno(), False
        if mode in ("null", "socket"):
            if self._devnull < 0:
                self._devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            return self._devnull, False
        # Opened with the service user's rights: that user may own the folder and swap the
        # file for a symlink to a root file, which root would append to (issue 14.3).
        svc = state.service
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        return fsuser.open_as(svc.user, svc.group, mode, flags, 0o640), True

    def _start_child(
        self,
        state: ServiceState,
        stdin: int,
        stdout: int,
        conn: socket.socket | None,
        env: list[bytes],
        peer: str,
        listener: Listener | None = None,
        src: str = "",
    ) -> int:
        """Spawn the service's program; returns the pid, or 0 when it could not start."""
        svc = state.service
        try:
            err_fd, owned = self._stderr_fd(state, conn)
        except OSError as exc:
            state.failed_spawns += 1
            self._spawn_error(svc, peer, f"stderr {svc.stderr}: {exc.strerror or exc}")
            return 0
        try:
            if svc.needs_relay:
                full_env = {**self.spawner.base_environ(svc), **env_dict(env)}
                pid = spawn_relay(svc, stdin, err_fd, full_env, state.tls_context, peer)
            else:
                pid = self.spawner.spawn(svc, stdin, stdout, err_fd, env)
        except UserGone as exc:
            # Deleted after load: one line a minute, not a traceback per connection (18.16).
            state.failed_spawns += 1
            self._spawn_error(svc, peer, f"cannot start: {exc.strerror}")
            return 0
        except OSError as exc:
            state.failed_spawns += 1
            self._log_exec_error(svc, exc.strerror or str(exc), peer)
            return 0
        finally:
            if owned:
                os.close(err_fd)
        state.add_source(src)
        child = Child(pid, state, peer, time.monotonic(), listener, src)
        if svc.timeout:
            child.timer = self.call_later(svc.timeout, lambda: self._on_timeout(pid))
        self.children[pid] = child
        self._track(pid)
        if self.config.max_children is not None and not self._full:
            self._full = self._at_max_children()
        self._instance_started(state)
        if LOG.isEnabledFor(logging.INFO):
            event(
                logging.INFO,
                f"{svc.name}: {peer} -> pid {pid}",
                event="start",
                service=svc.name,
                peer=peer,
                pid=pid,
            )
        return pid

    def _log_exec_error(self, svc: Service, why: str, peer: str) -> None:
        event(
            logging.ERROR,
            f"{svc.name}: cannot start {svc.argv[0]}: {why}; closing {peer}",
            event="spawn_error",
            service=svc.name,
            peer=peer,
            error=why,
        )

    def _spawn_error(self, svc: Service, peer: str, what: str) -> None:
        """Log a failed start; the same failure repeating is logged once a minute."""
        self._log_throttled(
            f"{svc.name} spawn {what}",
            logging.ERROR,
            f"{svc.name}: {what}; closing {peer}",
            event="spawn_error",
            service=svc.name,
            peer=peer,
            error=what,
        )

    def _log_throttled(self, key: str, level: int, msg: str, **fields: object) -> None:
        """Log an event at most once a minute per ``key``, saying how many were suppressed,
        and at most THROTTLED_LINES such events a minute per service."""
        service = str(fields.get("service", ""))
        limiter = self._limiters.get(service) if service else self._refusals
        if limiter is None:
            limiter = self._limiters[service] = LogLimiter(60.0, max_lines=THROTTLED_LINES)
        show, suppressed = limiter.should_log(key, time.monotonic())
        if show:
            held = limiter.take_overflow()
            if held:
                event(
                    level,
                    f"{service or 'pyinetd'}: {held} more refusals or errors not logged: "
                    f"over {THROTTLED_LINES} a minute",
                    event="log_overflow",
                    service=service,
                    suppressed=held,
                )
            more = f" ({suppressed} more since last logged)" if suppressed else ""
            event(level, msg + more, suppressed=suppressed, **fields)

    def _start_wait_child(self, lst: Listener) -> None:
        """inetd wait mode: the child gets the listening socket itself; we stop watching it."""
        self._pause(lst)
        fd = lst.sock.fileno()
        lst.sock.setblocking(True)  # the service expects a blocking socket, as from inetd
        proto = b"UDP" if lst.key.protocol == "udp" else b"TCP"
        env = [b"PROTO=" + proto]
        if lst.local_ip:
            env.append(proto + b"LOCALIP=" + lst.local_ip.encode())
            env.append(proto + b"LOCALPORT=%d" % lst.local_port)
        lst.state.accepted += 1
        lst.waiting_on = -1  # set before spawning: _refresh must not re-register meanwhile
        pid = self._start_child(lst.state, fd, fd, None, env, "wait", listener=lst)
        lst.waiting_on = pid
        if not pid:
            lst.sock.setblocking(False)
            # Do not spin on a readable socket whose service cannot start.
            self._pause_for(lst, 1.0)

    def _on_datagram(self, lst: Listener, mask: int = 0) -> None:
        svc = lst.state.service
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
            reason, src = self._admit_datagram(lst.state, ip, port)
            if reason is not None:
                self._refuse(lst.state, None, ip, port, reason)
                if reason == "rate":
                    self._rate_pause(lst.state)
                    return
                continue
            lst.state.accepted += 1
            if svc.builtin is not None:
                reply = builtins.udp_reply(svc.builtin, data)
                if reply is not None:
                    with contextlib.suppress(OSError):
                        lst.sock.sendto(reply, addr)
                continue
            self._spawn_for_datagram(lst, data, addr, ip, port, src)
            if not lst.registered:
                return

    def _admit_datagram(self, state: ServiceState, ip: str, port: int) -> tuple[str | None, str]:
        """_admit for one datagram, after the loop guard: a datagram from the port of one of
        our UDP built-ins is refused (FreeBSD inetd's check_loop; issue 18, item 1: one spoofed
        datagram from 127.0.0.1:27007 to the echo on 127.0.0.1:27007 echoed itself forever),
        and a built-in never answers a privileged port (CERT CA-1996-01: echo <-> chargen)."""
        if port in self._loop_ports or (
            state.service.builtin is not None and builtins.udp_source_is_unsafe(port)
        ):
            return "loop", ""
        return self._admit(state, ip)

    def _spawn_for_datagram(
        self, lst: Listener, data: bytes, addr: object, ip: str, port: int, src: str
    ) -> None:
        """nowait UDP: the child's stdin and stdout are one end of a stream socketpair. It
        reads the datagram then EOF; what it writes until it closes stdout goes back to the
        sender as one datagram (so a shell script's several echos make one reply)."""
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:  # out of fds: this datagram is dropped, as UDP allows
            lst.state.failed_spawns += 1
            self._spawn_error(lst.state.service, peer_text(ip, port), f"socketpair: {exc}")
            return
        try:
            ours.sendall(data)  # <= 65507 bytes: fits an empty unix socket buffer at once
            ours.shutdown(socket.SHUT_WR)
            lip, lport = lst.local_ip, lst.local_port
            if not lip:
                lip, lport = peer_of(lst.sock.family, lst.sock.getsockname())
            env = self._ip_env(b"UDP", ip, port, lip, lport)
            fd = theirs.fileno()
            pid = self._start_child(lst.state, fd, fd, None, env, peer_text(ip, port), src=src)
        finally:
            theirs.close()
        if pid:
            self._udp_replies[pid] = UDPReply(ours, lst.sock, addr, self.sel)
        else:
            ours.close()

    def __repr__(self) -> str:
        return f"<Server {len(self.listeners)} listeners, {len(self.children)} children>"


# Handlers that own one connection: the loop closes one that raised (Server._contain).
_CONNECTIONS = (PendingProxy, PendingHello, UDPReply, builtins.Session, control.Exchange)


def _worker_serves(svc: Service, key: ListenKey) -> bool:
    """Workers leave unix sockets, wait-mode services and services with a counted limit to
    the first process (a wait service's socket belongs to one child at a time; a unix path
    to one binder; max_connections, per_source and rate are counted in one place)."""
    return key.protocol != "unix" and not svc.wait and not svc.counts_connections


def worker_fds() -> list[tuple[socket.socket, str]]:
    """In a worker: the listening sockets the first process passed down."""
    value = os.environ.pop("PYINETD_LISTEN_FDS", "")
    return [(systemd.adopt_fd(int(text)), "") for text in filter(None, value.split(","))]


def _group_alive(pgid: int) -> bool:
    """True when process group ``pgid`` still has members."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _warn_if_root(svc: Service) -> None:
    """A service without `user:` runs its programs as root when pyinetd is root (xinetd
    refuses such services): say so, once, at load."""
    if os.geteuid() == 0 and svc.user is None and svc.enabled and not svc.is_builtin:
        what = "its relay runs" if svc.redirect is not None else "its programs run"
        event(
            logging.WARNING,
            f"{svc.name}: no user: set, so {what} as root "
            "(set user:, or a default for every service: defaults: {user: nobody})",
            event="runs_as_root",
            service=svc.name,
        )


def _kill_orphan(pgid: int, children: dict[int, Child]) -> None:
    # A pid in use is never handed out as a new pgid, but once the group is empty the
    # number may lead a new child's group: leave that one alone.
    if pgid not in children:
        with contextlib.suppress(OSError):  # (its leader is reaped: never kill(pgid) here)
            os.killpg(pgid, signal.SIGKILL)


def _kill_group(pid: int, sig: int) -> None:
    """Signal a live (unreaped) service child and everything it started: its group (it leads
    its own session), and its pid itself, which the group misses when the child left it
    (setpgid elsewhere) or has not reached its setsid yet (the clone primitive)."""
    with contextlib.suppress(OSError):  # ESRCH: the group is empty; EPERM: not ours
        os.killpg(pid, sig)
    with contextlib.suppress(OSError):  # (a zombie until reaped: the pid is not reused)
        os.kill(pid, sig)
