"""A connection of a TLS or redirect service on its way through the service's front.

TLS: the ClientHello is awaited in the parent (stages.PendingHello, no process); then the
socket goes to a front (``C``, its deadline what is left of handshake_timeout) and the
connection stays in its service's pre-service pool as a ``PendingFront`` (max_pending,
max_pending_per_source; its place under max_connections and per_source held) until the front
says ``H`` or ``F``; the parent's own deadline (plus a grace) ends it with ``K``. At ``H`` it
is admitted as any connection (a rate token taken) and its program started as an exec
service on two pipes whose other ends go to the front (``S``), or refused (``N``). The
program is then an ordinary child (timeout, limits, user, sandbox, status, exit logging);
its exit goes to the front as ``X``; the front's ``E`` gives the bytes carried each way.

Redirect: ``C`` at admission; the connection holds a slot (SlotKind.FRONT) from ``C`` until
``E`` or ``F``: the front connects out and relays, no process is started.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any, Protocol

from pyinetd.log import LOG, event
from pyinetd.runtime.admission import Known, admit
from pyinetd.runtime.frontproc import Front, Link
from pyinetd.runtime.fronts import Fronts
from pyinetd.runtime.listeners import peer_text
from pyinetd.runtime.services import Listener, Services, ServiceState, Slot, SlotKind
from pyinetd.sandbox import SandboxError
from pyinetd.spawn import environ

if TYPE_CHECKING:
    import ssl
    from collections.abc import Iterable

    from pyinetd.config import Config, Service
    from pyinetd.runtime.loop import Loop
    from pyinetd.sandbox import Prepared

__all__ = ["FRONT_GRACE", "FrontPath", "PendingFront", "build"]

# The parent's deadline for a handshake is this much after the front's: the front's is the
# one that holds (it answers F), the parent's ends a front that never answers (K).
FRONT_GRACE = 2.0
REDIRECT_CONNECT = 10.0  # seconds a redirect's front has to connect to the target
# A WebSocket upgrade request (without TLS) is complete within this much of its arrival.
WS_DEADLINE = 10.0


class _Timer(Protocol):
    def cancel(self) -> None: ...


class Path(Protocol):
    """What the connection path does for a front's connection (connections.py)."""

    def refuse(
        self,
        state: ServiceState,
        conn: socket.socket | None,
        ip: str,
        port: int,
        reason: str,
        detail: str = "",
    ) -> None: ...

    def start_program(
        self, state: ServiceState, pipes: tuple[int, int], env: list[bytes], pend: PendingFront
    ) -> int: ...

    def known(self, svc: Service, ip: str, full: bool, now: float) -> Known: ...

    def local_address(self, lst: Listener, conn: socket.socket) -> tuple[str, int]: ...

    def leave_stage(self, pend: Any) -> None: ...

    def enter_stage(self, pend: Any, hello: Any) -> None: ...


class PendingFront:
    """A TLS connection whose handshake its front does: in its pool until ``H`` or ``F``."""

    conn: socket.socket | None = None  # the front has the socket; the parent none

    def __init__(
        self,
        path: FrontPath,
        lst: Listener,
        peer: tuple[str, int],
        key: str,
        local: tuple[str, int] | None,
        since: float,
        deadline: float,
    ) -> None:
        self._path = path
        self.lst, self.key, self.local, self.since = lst, key, local, since
        self.ip, self.port = peer
        self.link: Link | None = None
        self.started = 0.0  # when the program started (at H)
        self.src = ""
        self.refused = False  # handed with C's refuse: counted at the hand-over, not at F
        self._timer: _Timer | None = path.call_later(deadline, self._expired)

    def detach(self) -> None:
        """Its deadline cancelled (the stage ends)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        """Dropped (a full pool's oldest, exit): ``K`` to the front, its slot freed."""
        self.detach()
        if self.link is not None:
            self.link.abort()
        self._path.path.leave_stage(self)

    def _expired(self) -> None:
        """The parent's deadline, a grace after the front's own: a front that has not
        answered by then (F at its deadline) has stopped making progress: it is replaced,
        and this connection ends."""
        self._timer = None
        link, self.link = self.link, None
        self._path.fail(self, "TLS handshake not complete in time")
        if link is not None:
            link.abort()
            link.front.distrust(f"no answer for id {link.id} by its deadline")

    # --- what the front says (frontproc.Owner)
    def hello(self, link: Link, env: dict[str, str]) -> None:
        self._path.hello(self, link, env)

    def failed(self, link: Link, reason: str) -> None:
        # A WebSocket service's front fails its TLS (wss://) as a TLS front does, and its
        # upgrade with reasons of its own (frontws: "websocket: ...", "refused: ...").
        tls = self.lst.state.service.websocket is None or "TLS" in reason
        what = "TLS handshake" if tls else "WebSocket upgrade"
        why = f"{what} with {peer_text(self.ip, self.port)} failed in front {link.front.pid}"
        self._path.fail(self, f"{why}: {reason}", "tls" if tls else "websocket")

    def ended(self, link: Link, bytes_in: int, bytes_out: int) -> None:
        self._path.ended(self.lst.state, peer_text(self.ip, self.port), self, bytes_in, bytes_out)

    def lost(self, link: Link, why: str) -> None:
        if link.state == "waiting":
            self._path.fail(self, f"front {link.front.pid} {why}")


class FrontSession:
    """A redirect's connection in its front: its slot from ``C`` until ``E`` or ``F``."""

    def __init__(self, path: FrontPath, state: ServiceState, slot: Slot, peer: str) -> None:
        self._path, self.state, self.slot, self.peer = path, state, slot, peer
        self.since = time.monotonic()

    def hello(self, link: Link, env: dict[str, str]) -> None:
        pass  # connected: the front relays

    def failed(self, link: Link, reason: str) -> None:
        self._path.services.free_slot(self.slot)
        svc = self.state.service
        target = f"{svc.redirect[0]}:{svc.redirect[1]}" if svc.redirect else "?"
        event(
            logging.WARNING,
            f"{svc.name}: redirect {self.peer} -> {target}: {reason}",
            event="redirect_failed",
            service=svc.name,
            peer=self.peer,
        )

    def ended(self, link: Link, bytes_in: int, bytes_out: int) -> None:
        self._path.services.free_slot(self.slot)
        self._path.ended(self.state, self.peer, self, bytes_in, bytes_out)

    def lost(self, link: Link, why: str) -> None:
        self._path.services.free_slot(self.slot)
        event(
            logging.WARNING,
            f"{self.state.service.name}: {self.peer}: closed: front {link.front.pid} {why}",
            event="front_lost",
            service=self.state.service.name,
            peer=self.peer,
        )


class FrontPath:
    """Hands connections to the fronts and follows what they say of them."""

    def __init__(self, loop: Loop, services: Services, fronts: Fronts, path: Path) -> None:
        self.call_later = loop.call_later
        self.services = services
        self.fronts = fronts
        self.path = path
        self._programs: dict[int, Link] = {}  # a program's pid -> its connection's id

    def hand_hello(self, hello: Any) -> bool:
        """The ClientHello is in (stages.PendingHello): to a front, the connection kept in
        its pool (False: no front serves the service now)."""
        lst: Listener = hello.lst
        svc = lst.state.service
        assert svc.tls is not None
        front = self.fronts.pick(svc.name)
        if front is None:
            return False
        left = max(0.05, svc.tls.handshake_timeout - (time.monotonic() - hello.since))
        pend = PendingFront(
            self, lst, (hello.ip, hello.port), hello.key, hello.local, hello.since,
            left + FRONT_GRACE,
        )  # fmt: skip
        self.path.enter_stage(pend, hello)
        conn = hello.conn
        if pend.local is None:  # (where the listener is on a wildcard address)
            pend.local = self.path.local_address(lst, conn)
        conn.setblocking(True)
        pend.link = front.hand(pend, _payload(hello.ip, hello.port, hello.local, left), conn)
        return True

    def hand_upgrade(
        self,
        lst: Listener,
        conn: socket.socket,
        peer: tuple[str, int],
        key: str,
        local: tuple[str, int] | None,
        refuse: dict[str, object] | None,
    ) -> PendingFront | None:
        """A WebSocket connection without TLS: to a front at once, which reads its upgrade
        request (None: no front serves now)."""
        front = self.fronts.pick(lst.state.service.name)
        if front is None:
            return None
        pend = PendingFront(
            self, lst, peer, key, local, time.monotonic(), WS_DEADLINE + FRONT_GRACE
        )
        if pend.local is None:  # (where the listener is on a wildcard address)
            pend.local = self.path.local_address(lst, conn)
        conn.setblocking(True)
        fields = _payload(peer[0], peer[1], local, WS_DEADLINE)
        fields["refuse"] = refuse
        pend.link = front.hand(pend, fields, conn)
        return pend

    def hand_redirect(
        self,
        state: ServiceState,
        conn: socket.socket,
        ip: str,
        port: int,
        local: tuple[str, int] | None,
        src: str,
    ) -> bool:
        """An admitted redirect connection: to a front (False: no front serves now)."""
        front = self.fronts.pick(state.service.name)
        if front is None:
            return False
        slot = self.services.take_slot(state, src, SlotKind.FRONT)
        peer = peer_text(ip, port)
        sess = FrontSession(self, state, slot, peer)
        if LOG.isEnabledFor(logging.INFO):
            event(
                logging.INFO,
                f"{state.service.name}: {peer} -> front {front.pid}",
                event="start",
                service=state.service.name,
                peer=peer,
                front=front.pid,
            )
        conn.setblocking(True)
        front.hand(sess, _payload(ip, port, local, REDIRECT_CONNECT), conn)
        return True

    # --- TLS, what its front says
    def fail(self, pend: PendingFront, why: str, reason: str = "tls") -> None:
        """No handshake: refused as a bad hello is (counted under ``reason``: tls, or
        websocket for a WebSocket upgrade; logged); one the parent refused was counted
        already."""
        pend.detach()
        self.path.leave_stage(pend)
        if pend.refused:
            return
        self.path.refuse(pend.lst.state, None, pend.ip, pend.port, reason, detail=why)

    def hello(self, pend: PendingFront, link: Link, env: dict[str, str]) -> None:
        """Handshake done: admitted (a rate token taken), its program started on two pipes
        whose other ends go to the front (S); or refused (N)."""
        pend.detach()
        self.path.leave_stage(pend)
        lst, state = pend.lst, pend.lst.state
        svc = state.service
        if self.services.listeners.get(lst.key) is not lst:
            link.send("N", {"reason": "the service was removed"})
            return
        now = time.monotonic()
        reason, src = admit(svc, state, self.path.known(svc, pend.ip, self.services.full, now))
        if reason is not None:
            self.path.refuse(state, None, pend.ip, pend.port, reason)
            if reason == "rate":
                self.services.rate_pause(state)
            link.send("N", {"reason": reason})
            return
        state.accepted += 1
        # The handshake's SSL_* after the connection's variables (frontproc checked the
        # names against frontchan.TLS_ENV and frontchan the values: bounded, no NUL).
        pend.src = src
        ours = environ.CONNECTION_KEYS  # the parent's (a PROXY header's) facts win
        entries = [f"{k}={v}".encode() for k, v in sorted(env.items()) if k.encode() not in ours]
        try:
            in_r, in_w = os.pipe()
        except OSError as exc:
            self.path.refuse(state, None, pend.ip, pend.port, "tls", detail=f"pipe: {exc}")
            link.send("N", {"reason": "out of fds"})
            return
        try:
            out_r, out_w = os.pipe()
        except OSError as exc:
            os.close(in_r)
            os.close(in_w)
            self.path.refuse(state, None, pend.ip, pend.port, "tls", detail=f"pipe: {exc}")
            link.send("N", {"reason": "out of fds"})
            return
        try:
            pid = self.path.start_program(state, (in_r, out_w), entries, pend)
        finally:
            os.close(in_r)
            os.close(out_w)
        if pid <= 0:
            os.close(in_w)
            os.close(out_r)
            link.send("N", {"reason": "the program could not start"})
            return
        link.pid = pid
        pend.started = time.monotonic()
        self._programs[pid] = link
        link.send("S", {}, [in_w, out_r])  # (closed here once sent)

    def program_ended(self, pid: int, status: int | None) -> None:
        """A program behind a front was reaped: ``X`` with its exit code or signal."""
        link = self._programs.pop(pid, None)
        if link is None or status is None or link.front.links.get(link.id) is not link:
            return
        code = os.waitstatus_to_exitcode(status)
        payload = {"code": code, "signal": None} if code >= 0 else {"code": None, "signal": -code}
        link.send("X", payload)

    def ended(
        self, state: ServiceState, peer: str, who: object, bytes_in: int, bytes_out: int
    ) -> None:
        """A front's connection is over: its bytes counted and logged with its end."""
        state.bytes_in += bytes_in
        state.bytes_out += bytes_out
        if not LOG.isEnabledFor(logging.INFO):
            return
        since = getattr(who, "since", time.monotonic())
        duration = time.monotonic() - since
        name = state.service.name
        event(
            logging.INFO,
            f"{name}: front connection for {peer} ended after {duration:.3f}s, "
            f"{bytes_in} bytes in, {bytes_out} out",
            event="end",
            service=name,
            peer=peer,
            duration=round(duration, 6),
            bytes_in=bytes_in,
            bytes_out=bytes_out,
        )

    # What the server calls, at a (re)load, a stop, at exit, per reaped pid, for `status`.
    def sync(self, config: Config, served: Iterable[Service]) -> None:
        self.fronts.sync(config, served)

    def stop(self) -> None:
        self.fronts.stop()

    def kill_all(self) -> None:
        self.fronts.kill_all()

    def on_exit(self, pid: int, status: int) -> bool:
        return self.fronts.on_exit(pid, status)

    def pids(self) -> list[int]:
        return self.fronts.pids()

    @property
    def carrier(self) -> Fronts:
        """What `pyinetd upgrade` hands over of the fronts (upgrade.Carrier)."""
        return self.fronts

    def describe(self, name: str) -> list[dict[str, object]] | None:
        return self.fronts.describe(name)

    def front_lost(self, front: Front, why: str) -> None:
        """A front ended: its programs' ids are gone with it (their X goes nowhere)."""
        for pid in [p for p, link in self._programs.items() if link.front is front]:
            del self._programs[pid]


def _payload(
    ip: str, port: int, local: tuple[str, int] | None, deadline: float
) -> dict[str, object]:
    return {
        "peer": [ip, port],
        "local": list(local) if local is not None else None,
        "deadline": min(deadline, 3600.0),
        "refuse": None,
    }


class _Children(Protocol):
    def track(self, pid: int) -> None: ...

    def stderr_of(self, state: ServiceState) -> tuple[int, bool]: ...


class _Spawner(Protocol):
    def prepare(self, service: Service) -> Prepared | None: ...


class _Connections(Path, Protocol):
    front_path: FrontPath | None


class _Parts(Protocol):
    """The parts of the server a front needs (server.Server)."""

    @property
    def loop(self) -> Loop: ...

    @property
    def spawner(self) -> _Spawner: ...

    @property
    def services(self) -> Services: ...

    @property
    def children(self) -> _Children: ...

    @property
    def connections(self) -> _Connections: ...


def build(parts: _Parts) -> FrontPath:
    """The fronts of this process and the path through them, wired to the parts the server
    built (its connection path gets it as its ``front_path``)."""
    loop, spawner, services, children = parts.loop, parts.spawner, parts.services, parts.children

    def box_for(svc: Service) -> Prepared | None:
        try:
            return spawner.prepare(svc)
        except SandboxError:
            return None  # (prepared at load: a kernel that refuses it now is said by spawns)

    def context_for(name: str) -> ssl.SSLContext | None:
        state = services.states.get(name)
        return state.tls_context if state is not None else None

    fronts = Fronts(
        loop.sel,
        loop.call_later,
        children.track,
        lambda svc: children.stderr_of(services.states[svc.name]),
        box_for,
        context_for,
        lambda: [st.tls_context for st in services.states.values() if st.tls_context],
    )
    front_path = FrontPath(loop, services, fronts, parts.connections)
    fronts.lost = front_path.front_lost
    parts.connections.front_path = front_path
    return front_path
