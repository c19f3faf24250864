"""An arrival becomes a child, a built-in session, or a refusal.

An arrival is an accepted connection, a datagram, or a wait-mode listener turning readable.
A connection may first wait in a pre-service stage (stages.py: its PROXY header, its TLS
ClientHello), in its service's pool (Pool); then admission.admit() decides, and the connection
goes to the children table (children.py, which starts the program through spawn.py) or to a
built-in session (builtins.py). A TLS connection's relay does the handshake, and the
connection stays in the pool until the relay reports it complete. Each connection that goes to
a process is one arrival.Arrival, built here with its environment (environ.py's UCSPI entries).
"""

from __future__ import annotations

import _socket
import contextlib
import errno
import functools
import logging
import os
import selectors
import socket
import struct
import time
from collections.abc import Callable
from typing import cast

from pyinetd.config import Config, Service, wsconf
from pyinetd.log import LOG, ThrottledLog, event
from pyinetd.protocols import builtins, proxyproto
from pyinetd.runtime import control
from pyinetd.runtime.admission import Known, StageSlots, admit, source_key
from pyinetd.runtime.arrival import Arrival
from pyinetd.runtime.children import Children, errno_name
from pyinetd.runtime.frontpath import FrontPath, PendingFront
from pyinetd.runtime.listeners import format_ip, peer_of, peer_text
from pyinetd.runtime.loop import Loop
from pyinetd.runtime.services import (
    WAIT_IDLE,
    WAIT_STARTING,
    Listener,
    Services,
    ServiceState,
    Slot,
    SlotKind,
)
from pyinetd.runtime.sessions import Sessions
from pyinetd.runtime.stages import PendingHello, PendingProxy, PendingRelay, UDPReply
from pyinetd.spawn import environ
from pyinetd.spawn.environ import EnvEntries

ACCEPT_BATCH = 64  # connections accepted per readiness event before looking at other fds
EMFILE_PAUSE = 0.5  # seconds a listener rests after accept() ran out of fds
# A relay's own handshake deadline is this much later than the parent's, which kills it: the
# parent's is the one that holds; the relay's is the backstop should the parent's be missed.
RELAY_DEADLINE_GRACE = 2.0

Pending = PendingProxy[Listener] | PendingHello[Listener] | PendingRelay[Listener] | PendingFront


class Pool:
    """One service's connections in a pre-service stage: its own slots, so that idle
    connections to one service never refuse another's (with one shared pool, 256 idle
    connections to one TLS service refuse every other TLS and PROXY service), in arrival
    order, so that a full pool makes room by evicting its oldest."""

    def __init__(self, total: int, per_source: int) -> None:
        self.slots = StageSlots(total, per_source)
        self.members: dict[Pending, None] = {}  # oldest first

    def oldest(self) -> Pending | None:
        """The connection to evict: the oldest still waiting for its first bytes (a PROXY
        header, a ClientHello), else the oldest whose relay is in its handshake (it has sent
        its hello; a real client's handshake takes a round trip, so the oldest is the likeliest
        to have stalled)."""
        first = None
        for pend in self.members:
            if not isinstance(pend, PendingRelay | PendingFront):
                return pend
            first = first or pend
        return first


class Stages:
    """The connections in a pre-service stage (a PROXY header or a TLS ClientHello still due,
    or a TLS handshake its relay has not reported complete), each in its service's Pool; the
    ``Gate`` their stages report to. What comes after a stage (admission, the fork, a
    refusal) is the connection path's (Connections)."""

    def __init__(
        self,
        *,
        config: Config,
        loop: Loop,
        services: Services,
        path: Connections,
        kill: Callable[[int], None],
    ) -> None:
        self.sel = loop.sel
        self.call_later = loop.call_later
        self._services = services
        self._path = path
        self._kill = kill  # SIGKILL a relay that is still a child (Children.kill)
        # Connections in a pre-service stage, each with the pool it holds a slot in; a pool
        # per service name.
        self.pending: dict[Pending, Pool] = {}
        # The places of the connections whose PROXY header or hello is due (SlotKind.PENDING)
        self.holds: dict[Pending, Slot] = {}
        self.pools: dict[str, Pool] = {}
        self._bounds = (config.max_pending, config.max_pending_per_source)

    def configure(self, config: Config) -> None:
        """A (re)loaded configuration's bounds on the pre-service stages, for every pool; the
        empty pools of services no longer configured go."""
        self._bounds = (config.max_pending, config.max_pending_per_source)
        names = {svc.name for svc in config.services}
        for name, pool in list(self.pools.items()):
            pool.slots.total, pool.slots.per_source = self._bounds
            if name not in names and not pool.members:
                del self.pools[name]

    def pool(self, state: ServiceState) -> Pool:
        """The pre-service pool of ``state``'s service."""
        pool = self.pools.get(state.service.name)
        if pool is None:
            pool = self.pools[state.service.name] = Pool(*self._bounds)
        return pool

    def close_pending(self) -> None:
        """Drop every connection still in a pre-service stage (exit)."""
        for pend in list(self.pending):
            pend.close()

    def _take_slot(
        self, state: ServiceState, conn: socket.socket, ip: str, port: int, key: str
    ) -> Pool | None:
        """A slot in the service's pool for this connection (the pool), or it is refused
        (None). A full pool evicts its oldest connection for it (a relay in its handshake
        only when none waits for its first bytes: it is killed); a source at its own bound is
        refused."""
        pool = self.pool(state)
        reason = pool.slots.take(key)
        if reason == "pending" and (oldest := pool.oldest()) is not None:
            # (A relay that has reported, or ended, meanwhile frees its slot by settling.)
            if not (isinstance(oldest, PendingRelay) and oldest.settle()):
                oldest.detach()
                self.stage_failed(oldest, "evicted: the oldest of a full pool", reason="pending")
            reason = pool.slots.take(key)
        if reason is not None:
            self._path.refuse(state, conn, ip, port, reason)
            return None
        return pool

    def enter_stage(self, pend: Pending, hello: Pending) -> None:
        """``pend`` takes ``hello``'s place in its pool, and its hold under the limits."""
        pool = self.pending.pop(hello)
        pool.members.pop(hello, None)
        self._enter(pool, pend)
        hold = self.holds.pop(hello, None)
        if hold is not None:
            self.holds[pend] = hold

    def _enter(self, pool: Pool, pend: Pending) -> None:
        self.pending[pend] = pool
        pool.members[pend] = None

    def leave_stage(self, pend: Pending) -> None:
        """``pend`` no longer waits: its slot is free."""
        pool = self.pending.pop(pend, None)
        if pool is None:
            return
        pool.members.pop(pend, None)
        pool.slots.release(pend.key)
        # A hello's places under max_connections and per_source go back: to the relay
        # (_fork_relay), or to the next connection (a queued listener may listen again).
        self._services.free_slot(self.holds.pop(pend, None))

    def stage_failed(self, pend: Pending, why: str, reason: str = "") -> None:
        """No valid PROXY header or ClientHello in time, no handshake reported by its
        relay in time (the relay is killed), or evicted: refused, counted, logged."""
        self.leave_stage(pend)
        reason = reason or ("proxy" if isinstance(pend, PendingProxy) else "tls")
        state = pend.lst.state
        if isinstance(pend, PendingFront):
            if pend.link is not None:
                pend.link.abort()  # K: the front drops it
            self._path.refuse(state, None, pend.ip, pend.port, reason, detail=why)
            return
        if isinstance(pend, PendingRelay):
            # Still our child (Children.kill checks): the relay has not reported, so it has
            # not started the service's program; the client's connection is the relay's.
            self._kill(pend.pid)
            pend.conn.close()
            why = f"{why}; relay pid {pend.pid} killed"
            self._path.refuse(state, None, pend.ip, pend.port, reason, detail=why)
            return
        self._path.refuse(state, pend.conn, pend.ip, pend.port, reason, detail=why)

    def stage_done(self, pend: Pending, header: proxyproto.ProxyHeader | None) -> None:
        """A PROXY header is read (the balancer's client replaces the socket's peer), a
        ClientHello has arrived (admitted, a rate token taken: the relay is forked for the
        handshake), or a relay has reported its handshake complete (its slot is free)."""
        lst, conn = pend.lst, pend.conn
        if isinstance(pend, PendingRelay | PendingFront):
            self.leave_stage(pend)
            if conn is not None:
                conn.close()
            return
        assert conn is not None  # (only a PendingFront has none)
        if self._services.listeners.get(lst.key) is not lst:
            self.leave_stage(pend)
            conn.close()  # removed by a reload meanwhile
            return
        if isinstance(pend, PendingHello):
            fronts = self._path.front_path
            if fronts is None or not fronts.hand_hello(pend):
                self._fork_relay(pend)
            return
        self.leave_stage(pend)
        conn.setblocking(True)
        if header is None:  # (a PROXY stage always ends with its header)
            conn.close()
            return
        ip, port, local = pend.ip, pend.port, None
        if header.src_addr is not None and header.src_port is not None:
            ip, port = format_ip(header.src_addr), header.src_port
            if header.dst_addr is not None and header.dst_port is not None:
                local = (format_ip(header.dst_addr), header.dst_port)
        self._path.after_header(lst, conn, ip, port, local)

    def _fork_relay(self, hello: PendingHello[Listener]) -> None:
        """The ClientHello is in: admitted (a rate token taken) and the relay forked, which
        takes the service's user and sandbox before it parses a TLS byte and does the
        handshake. The slot the hello held in the pool is the relay's until it reports the
        handshake complete (PendingRelay), and its deadline (what is left of
        handshake_timeout since the arrival) is kept here: the relay is killed at it."""
        lst, state, conn = hello.lst, hello.lst.state, hello.conn
        tls = state.service.tls
        assert tls is not None
        pool = self.pending.pop(hello)
        pool.members.pop(hello, None)
        # Its hold on max_connections and per_source goes to the relay (a running child).
        self._services.free_slot(self.holds.pop(hello, None))
        conn.setblocking(True)
        left = max(0.0, tls.handshake_timeout - (time.monotonic() - hello.since))
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:  # out of fds
            pool.slots.release(hello.key)
            self._path.refuse(state, conn, hello.ip, hello.port, "tls", detail=f"socketpair: {exc}")
            return
        try:
            report = (theirs.fileno(), left + RELAY_DEADLINE_GRACE)
            pid = self._path.serve_admitted(
                lst, conn, hello.ip, hello.port, hello.local, report=report
            )
        finally:
            theirs.close()
        if pid <= 0:  # refused, or it could not start (said and counted)
            pool.slots.release(hello.key)
            ours.close()
            return
        ours.setblocking(False)
        peer = (hello.ip, hello.port)
        relay = PendingRelay(self, lst, ours, peer, hello.key, left, pid, hello.local)
        relay.since = hello.since
        self._enter(pool, relay)

    def wait_for_header(
        self, lst: Listener, conn: socket.socket, ip: str, port: int, key: str
    ) -> None:
        """A PROXY header is due: in the service's pool, read in the loop with a deadline,
        holding a place under max_connections meanwhile as a TLS hello does: a balancer told
        `maxconn:` max_connections (agent.py) may have that many connections at pyinetd, and
        each must find its place when its header is in (on_limit: queue waits in the backlog,
        it is not accepted and then refused). Per source it is counted after the header, by
        the client it names."""
        state = lst.state
        svc = state.service
        if svc.max_connections and state.running + state.hellos >= svc.max_connections:
            self._path.refuse(state, conn, ip, port, "limit")  # (on_limit: reject)
            return
        pool = self._take_slot(state, conn, ip, port, key)
        if pool is None:
            return
        conn.setblocking(False)
        accept = svc.proxy_protocol
        assert accept is not None
        pend = PendingProxy(self, lst, conn, (ip, port), key, svc.proxy_timeout, accept)
        self._enter(pool, pend)
        self.holds[pend] = self._services.take_slot(state, "", SlotKind.PENDING)
        pend(0)  # the header usually came with the connection: no wait, no slot held

    def wait_for_hello(
        self,
        lst: Listener,
        conn: socket.socket,
        ip: str,
        port: int,
        local: tuple[str, int] | None,
    ) -> None:
        """A TLS connection: admitted (no rate token taken: the hello may never come), then
        its ClientHello awaited in the service's pool, holding its places meanwhile."""
        state = lst.state
        svc = state.service
        assert svc.tls is not None
        # Access and limits before any handshake or fork. They are checked
        # now, and again, with a rate token, when the hello is in, before the fork.
        reason, src = admit(svc, state, known(svc, ip, self._services.full, 0.0, False))
        if reason is not None:
            self._path.refuse(state, conn, ip, port, reason)
            return
        key = source_key(ip) if ip else ""
        pool = self._take_slot(state, conn, ip, port, key)
        if pool is None:
            return
        conn.setblocking(False)
        # The hello fits one packet: it comes at once, or after a retransmission or two.
        timeout = min(svc.tls.hello_timeout, svc.tls.handshake_timeout)
        hello = PendingHello(self, lst, conn, (ip, port), key, timeout, local)
        self._enter(pool, hello)
        # It holds its place under max_connections (on_limit: queue) and per_source.
        self.holds[hello] = self._services.take_slot(state, src, SlotKind.PENDING)
        hello(0)

    def wait_for_upgrade(
        self,
        lst: Listener,
        conn: socket.socket,
        ip: str,
        port: int,
        local: tuple[str, int] | None,
    ) -> bool:
        """A WebSocket connection (no TLS): to its front at once, in the service's pool until
        H or F. One refused by access or limits goes too, with its HTTP answer (C's refuse:
        403, 503 or 429 with the service's message), holding no place under the limits.
        False: no front serves now."""
        state = lst.state
        svc = state.service
        reason, src = admit(svc, state, known(svc, ip, self._services.full, 0.0, False))
        refuse = None
        if reason is not None:
            refuse = wsconf.refusal(reason, svc.deny_message, svc.busy_message)
            if refuse is None:
                self._path.refuse(state, conn, ip, port, reason)
                return True
        key = source_key(ip) if ip else ""
        pool = self._take_slot(state, conn, ip, port, key)
        if pool is None:
            return True
        fronts = self._path.front_path
        assert fronts is not None
        pend = fronts.hand_upgrade(lst, conn, (ip, port), key, local, refuse)
        if pend is None:
            pool.slots.release(key)
            return False
        self._enter(pool, pend)
        if reason is None:
            self.holds[pend] = self._services.take_slot(state, src, SlotKind.PENDING)
        else:
            pend.refused = True  # counted here; its F is not counted again
            self._path.refuse(state, None, ip, port, reason, detail="answered in HTTP")
        return True


class Connections:
    """The arrival handlers of every listener; the connections in a pre-service stage are
    its ``stages`` (Stages)."""

    def __init__(
        self,
        *,
        config: Config,
        loop: Loop,
        services: Services,
        children: Children,
        sessions: Sessions,
        throttled: ThrottledLog,
    ) -> None:
        self._loop = loop
        self.sel = loop.sel
        self.call_later = loop.call_later
        self._services = services
        self._children = children
        self.sessions = sessions
        self._throttled = throttled
        self._emfile_logged = False
        self.stages = Stages(
            config=config, loop=loop, services=services, path=self, kill=children.kill
        )
        self.front_path: FrontPath | None = None  # the TLS and redirect fronts (fronts.py)
        self.leave_stage = self.stages.leave_stage
        self.enter_stage = self.stages.enter_stage
        self.configure = self.stages.configure
        self.close_pending = self.stages.close_pending

    def refuse(
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
        self._throttled(
            f"{svc.name} {reason} {src}",
            logging.WARNING,
            f"{svc.name}: refused {peer_text(ip, port)}: {reason}{why}",
            event="refused",
            service=svc.name,
            peer=peer_text(ip, port),
            reason=reason,
        )
        if conn is not None:
            msg = svc.deny_message if reason in ("deny", "access_times") else svc.busy_message
            if msg:
                with contextlib.suppress(OSError):
                    conn.send(msg.encode(), socket.MSG_DONTWAIT)
            conn.close()

    def on_accept(self, lst: Listener, mask: int = 0) -> None:
        """A stream listener is readable: accept a batch, or start its wait-mode child."""
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
            self.serve_stream(lst, conn, addr)
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
            self._services.pause_for(lst, EMFILE_PAUSE)
        elif exc.errno not in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
            event(logging.WARNING, f"{lst.state.service.name}: accept: {exc}", event="accept_error")

    def serve_stream(self, lst: Listener, conn: socket.socket, addr: object) -> None:
        """An accepted connection: a PROXY header first if the service wants one."""
        svc = lst.state.service
        ip, port = peer_of(lst.family, addr)
        if svc.proxy_protocol:
            # The socket's peer is checked before a byte is read: only a trusted proxy may
            # hold a pre-service slot for its header, and it is not counted per source (it
            # speaks for many clients).
            key = source_key(ip) if ip else ""
            if svc.proxy_from is not None:
                if not svc.proxy_from.permits(ip):
                    self.refuse(lst.state, conn, ip, port, "proxy_from")
                    return
                key = ""
            self.stages.wait_for_header(lst, conn, ip, port, key)
            return
        self.after_header(lst, conn, ip, port, None)

    def after_header(
        self,
        lst: Listener,
        conn: socket.socket,
        ip: str,
        port: int,
        local: tuple[str, int] | None,
    ) -> None:
        """The client's address is known: a TLS service waits (in the parent, bounded) for
        the ClientHello before a relay is forked for the handshake; anything else is admitted
        now."""
        svc = lst.state.service
        ws = svc.websocket is not None and svc.tls is None and self.front_path is not None
        if ws and self.stages.wait_for_upgrade(lst, conn, ip, port, local):
            return
        if svc.tls is None:
            self.serve_admitted(lst, conn, ip, port, local)
            return
        self.stages.wait_for_hello(lst, conn, ip, port, local)

    def serve_admitted(
        self,
        lst: Listener,
        conn: socket.socket,
        ip: str,
        port: int,
        local: tuple[str, int] | None,
        report: tuple[int, float] | None = None,
    ) -> int:
        """Admit and start the connection's program, relay or built-in session: the child's
        pid (0: refused, a built-in, or it could not start). ``report``: a TLS relay's report
        fd and its own handshake deadline (Stages._fork_relay)."""
        state = lst.state
        svc = state.service
        reason, src = admit(svc, state, known(svc, ip, self._services.full, time.monotonic()))
        if reason is not None:
            self.refuse(state, conn, ip, port, reason)
            if reason == "rate":
                self._services.rate_pause(state)
            return 0
        state.accepted += 1
        if svc.banner and svc.tls is None:  # (a TLS service's relay sends it inside TLS)
            with contextlib.suppress(OSError):
                conn.send(svc.banner, socket.MSG_DONTWAIT)
        if svc.builtin is not None:
            conn.setblocking(False)
            self.sessions.start(state, conn, svc.builtin, src, peer_text(ip, port))
            return 0
        fronts = self.front_path if svc.redirect is not None and report is None else None
        if fronts is not None and fronts.hand_redirect(state, conn, ip, port, local, src):
            return 0
        try:
            if local is None and lst.key.protocol == "unix":
                env = unix_env(lst, conn)
            else:
                local = local or local_address(lst, conn)
                env = environ.ip_env(environ.TCP, ip, port, *local)
            fd = conn.fileno()
            peer = peer_text(ip, port)
            arrival = Arrival(state, fd, conn, env, peer, ip, port, local, src, report=report)
            return self._children.start(arrival)
        finally:
            conn.close()

    def start_program(
        self, state: ServiceState, pipes: tuple[int, int], env: EnvEntries, pend: PendingFront
    ) -> int:
        """A front's connection's program, on its pipes (stdin, stdout), as an exec
        service's child, with the connection's variables and then ``env`` (SSL_*)."""
        local = pend.local or ("", 0)
        env = [*environ.ip_env(environ.TCP, pend.ip, pend.port, *local), *env]
        peer = peer_text(pend.ip, pend.port)
        arrival = Arrival(state, pipes[0], None, env, peer, pend.ip, pend.port, pend.local,
                          pend.src, stdout=pipes[1])  # fmt: skip
        return self._children.start(arrival)

    known = staticmethod(lambda svc, ip, full, now: known(svc, ip, full, now))
    local_address = staticmethod(lambda lst, conn: local_address(lst, conn))

    def _start_wait_child(self, lst: Listener) -> None:
        """inetd wait mode: the child gets the listening socket itself; we stop watching it."""
        self._services.pause(lst)
        fd = lst.sock.fileno()
        lst.sock.setblocking(True)  # the service expects a blocking socket, as from inetd
        proto = environ.UDP if lst.key.protocol == "udp" else environ.TCP
        local = (lst.local_ip, lst.local_port) if lst.local_ip else None
        env = environ.wait_env(proto, local)
        lst.state.accepted += 1
        # Before spawning: Services.refresh must not re-register it meanwhile. The children
        # table makes it WAITING once the child's pid is known (at once, or at the zygote's
        # answer).
        lst.change_wait(WAIT_STARTING)
        arrival = Arrival(lst.state, fd, None, env, "wait", local=local, listener=lst)
        pid = self._children.start(arrival)
        if not pid:
            lst.change_wait(WAIT_IDLE)
            lst.sock.setblocking(False)
            # Do not spin on a readable socket whose service cannot start.
            self._services.pause_for(lst, 1.0)

    def on_datagram(self, lst: Listener, mask: int = 0) -> None:
        """A UDP listener is readable: admit and answer (built-in) or start a child per datagram."""
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
            services = self._services
            seen = known(svc, ip, services.full, time.monotonic(), True, port, services.loop_ports)
            reason, src = admit(svc, lst.state, seen)
            if reason is not None:
                self.refuse(lst.state, None, ip, port, reason)
                if reason == "rate":
                    self._services.rate_pause(lst.state)
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

    def _spawn_for_datagram(
        self, lst: Listener, data: bytes, addr: object, ip: str, port: int, src: str
    ) -> None:
        """nowait UDP: the child's stdin and stdout are one end of a stream socketpair. It
        reads the datagram then EOF; what it writes until it closes stdout goes back to the
        sender as one datagram (so a shell script's several echos make one reply)."""
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:  # out of fds: this datagram is dropped, as UDP allows
            lst.state.spawn_failed(errno_name(exc.errno))
            self._children.spawn_error(lst.state.service, peer_text(ip, port), f"socketpair: {exc}")
            return
        try:
            ours.sendall(data)  # <= 65507 bytes: fits an empty unix socket buffer at once
            ours.shutdown(socket.SHUT_WR)
            lip, lport = lst.local_ip, lst.local_port
            if not lip:
                lip, lport = peer_of(lst.sock.family, lst.sock.getsockname())
            env = environ.ip_env(environ.UDP, ip, port, lip, lport)
            reply = UDPReply(ours, lst.sock, addr, self.sel)  # (closed if no child comes)
            peer = peer_text(ip, port)
            fd = theirs.fileno()
            local = (lip, lport)
            arrival = Arrival(lst.state, fd, None, env, peer, ip, port, local, src, reply=reply)
            self._children.start(arrival)
        finally:
            theirs.close()

    def contain(self, key: selectors.SelectorKey) -> None:
        """After a handler raised: close its connection, or rest its listener, so that a
        level-triggered fd cannot make it raise again and again (22,004
        tracebacks from one connection otherwise). Other handlers (signals, the exit watcher, stderr
        logs) stay as they are."""
        handler = key.data
        target = handler.args[0] if isinstance(handler, functools.partial) else None
        try:
            if isinstance(target, Listener):
                self._services.pause_for(target, EMFILE_PAUSE)
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


# Handlers that own one connection: the loop closes one that raised (Connections.contain).
_CONNECTIONS = (
    PendingProxy,
    PendingHello,
    PendingRelay,
    UDPReply,
    builtins.Session,
    control.Exchange,
)


def known(
    svc: Service,
    ip: str,
    full: bool,
    now: float,
    take_token: bool = True,
    datagram_port: int | None = None,
    loop_ports: frozenset[int] = frozenset(),
) -> Known:
    """What admit() is told of an arrival from ``ip``; for a service with access_times or
    max_load also the local minute of the day and the 1-minute load average (nothing read for
    the others)."""
    minute, load = -1, 0.0
    if svc.access_times:
        t = time.localtime()
        minute = t.tm_hour * 60 + t.tm_min
    if svc.max_load is not None:
        load = os.getloadavg()[0]
    return Known(ip, now, full, take_token, datagram_port, loop_ports, minute, load)


def unix_env(lst: Listener, conn: socket.socket) -> EnvEntries:
    """The UCSPI variables of a unix socket connection: its path, the client's credentials."""
    creds = None
    with contextlib.suppress(OSError):
        raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        creds = cast(tuple[int, int, int], struct.unpack("3i", raw))
    return environ.ipc_env(os.fsencode(str(lst.key.address)), creds)


def local_address(lst: Listener, conn: socket.socket) -> tuple[str, int]:
    """The address a TCP connection came in on: its listener's, or the socket's own for a
    listener on a wildcard address (("", 0) if the kernel will not say)."""
    if lst.local_ip:
        return lst.local_ip, lst.local_port
    try:
        return peer_of(lst.family, conn.getsockname())
    except OSError:
        return "", 0
