"""Per-service state and the listening sockets: what survives a reload.

Binding (or adopting, from systemd or the first process) every service's listeners,
applying a new configuration all at once, and watching or resting each listener according to
its limits and pauses. The handlers of arrivals (connections.py) are handed in; this module
starts nothing and knows no connection.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import os
import selectors
import socket
import time
from collections.abc import Callable, Sized
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pyinetd.config import Config, ConfigError, Service
from pyinetd.log import LOG, event
from pyinetd.runtime import systemd
from pyinetd.runtime.admission import TokenBucket
from pyinetd.runtime.listeners import (
    ListenError,
    ListenKey,
    bind_service,
    close_listener,
    peer_of,
    set_socket_options,
    sharers,
    steer_to,
)
from pyinetd.runtime.loop import Loop, Timer
from pyinetd.runtime.stderrlog import StderrLog
from pyinetd.sandbox import Prepared
from pyinetd.spawn import Spawner, discard_sandboxes, prepare_sandboxes

if TYPE_CHECKING:
    import ssl

Handler = Callable[["Listener", int], None]


@dataclass
class ServiceState:
    """Runtime state of a service that lives across reloads, pauses and resumes.

    ``running``, ``hellos`` and ``sources`` are written by Services.take_slot and free_slot
    only: a slot is freed when its process is reaped, its session closes or its hello's
    wait ends, whatever the reason (exit, crash, timeout kill), and nothing else resets them.
    """

    service: Service
    running: int = 0
    # Connections whose PROXY header, or whose TLS ClientHello or handshake, is due: they
    # hold a place under max_connections (and a hello under per_source) (SlotKind.PENDING)
    hellos: int = 0
    accepted: int = 0
    # Bytes pyinetd itself carried for the service's clients (built-in sessions), since start.
    bytes_in: int = 0
    bytes_out: int = 0
    spawn_failures: dict[str, int] = field(default_factory=dict)  # by reason (see spawn_failed)
    refused: dict[str, int] = field(default_factory=dict)
    sources: dict[str, int] = field(default_factory=dict)
    bucket: TokenBucket | None = None
    listeners: list[Listener] = field(default_factory=list)
    tls_context: ssl.SSLContext | None = None
    stderr_log: StderrLog | None = None  # made at the first child with `stderr: log`
    # `pyinetd drain` (or a stop's agent_drain_time): still served, the agent answers drain
    drained: bool = False

    def set_service(self, service: Service, tls_context: ssl.SSLContext | None = None) -> None:
        """Apply a (re)loaded definition with its TLS context, built by Services.prepare before
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

    def spawn_failed(self, reason: str) -> None:
        """A process of this service could not start: ``reason`` is an errno name (ENOENT,
        EACCES, EAGAIN...), ``stderr`` (its stderr target could not be opened) or
        ``user_gone`` (its user was deleted after load)."""
        self.spawn_failures[reason] = self.spawn_failures.get(reason, 0) + 1

    @property
    def failed_spawns(self) -> int:
        """Processes of this service that could not start, whatever the reason."""
        return sum(self.spawn_failures.values())


class SlotKind(enum.Enum):
    """What holds a slot: what it counts in its service's state."""

    CHILD = "child"  # a process (or one asked of a zygote): running, and max_children
    SESSION = "session"  # a built-in session in the loop: running
    PENDING = "pending"  # a PROXY header, TLS ClientHello or handshake due: hellos
    FRONT = "front"  # a redirect's connection carried by its front: running


@dataclass(eq=False)
class Slot:
    """A place a connection holds under its service's max_connections, and under per_source
    for its source ``key`` ("" where per_source does not apply). Made by Services.take_slot
    and given back by Services.free_slot, which are the only writers of the counts: a slot
    is freed once, whatever path ends its holder (a second free is a no-op)."""

    state: ServiceState
    key: str
    kind: SlotKind
    freed: bool = False


class WaitState(enum.Enum):
    """Who holds a wait-mode listener's socket (inetd's `wait`: one child at a time)."""

    IDLE = "idle"  # we do: watched whenever the service may start
    STARTING = "starting"  # a child is being started or asked of a zygote: not watched
    WAITING = "waiting"  # the child ``pid`` owns the socket until it is reaped


# The moves a wait-mode listener makes: started (or asked), its pid known, reaped; a start
# that failed (or a zygote that answered with nothing) gives the socket back at once.
_WAIT_MOVES = {
    WaitState.IDLE: {WaitState.STARTING},
    WaitState.STARTING: {WaitState.WAITING, WaitState.IDLE},
    WaitState.WAITING: {WaitState.IDLE},
}


@dataclass(frozen=True)
class Wait:
    """A wait-mode listener's state, and the pid of the child holding its socket (WAITING)."""

    state: WaitState = WaitState.IDLE
    pid: int = 0

    @property
    def held(self) -> bool:
        """The socket is a child's (or about to be): not ours to watch or to close for good."""
        return self.state is not WaitState.IDLE

    @classmethod
    def on(cls, pid: int) -> Wait:
        """WAITING on the child ``pid`` (its pid is known: it holds the socket now)."""
        return cls(WaitState.WAITING, pid)


WAIT_IDLE = Wait()
WAIT_STARTING = Wait(WaitState.STARTING)


@dataclass
class Listener:
    """A bound socket serving one service."""

    key: ListenKey
    sock: socket.socket
    state: ServiceState
    local_ip: str = ""
    local_port: int = 0
    registered: bool = False
    waiting: Wait = WAIT_IDLE  # wait mode: whether a child holds the socket (change_wait)
    paused_until: float = 0.0  # rate limit or fd exhaustion: resume at this monotonic time
    resume_timer: Timer | None = None
    family: int = socket.AF_INET

    @property
    def service(self) -> Service:
        return self.state.service

    def change_wait(self, new: Wait) -> None:
        """The one place a wait-mode listener's state changes; a move outside _WAIT_MOVES is
        a bug, logged at error (the new state is still taken: it is what happened)."""
        if new.state not in _WAIT_MOVES[self.waiting.state]:
            LOG.error(
                "bug: %s listener %s/%s: wait state %s -> %s",
                self.service.name,
                self.key.protocol,
                self.key.address,
                self.waiting.state.value,
                new.state.value,
            )
        self.waiting = new


class Services:
    """Every service's state and listeners, and whether each listener is watched."""

    def __init__(
        self,
        *,
        config: Config,
        loop: Loop,
        spawner: Spawner,
        worker: int,
        children: Sized,
        on_accept: Handler,
        on_datagram: Handler,
    ) -> None:
        self.config = config
        self._loop = loop
        self._spawner = spawner
        self._sandboxes: dict[str, Prepared] = {}  # prepared, not yet applied
        self.worker = worker  # 0: the first process; N: worker N, which serves a subset
        self._children = children  # the children table (its size, for max_children)
        self.states: dict[str, ServiceState] = {}
        self.listeners: dict[ListenKey, Listener] = {}
        self._activated: dict[ListenKey, socket.socket] = {}
        self._quiet: set[ListenKey] = set()  # carried across an upgrade: adopted unsaid
        self.stopping = False  # no listener is watched any more
        self.full = False  # at the global max_children: exec listeners are paused
        self.loop_ports: frozenset[int] = frozenset()  # ports of our UDP listeners
        # A listener's arrival handlers (Connections.on_accept, on_datagram): an accept or
        # wait-mode start for a stream listener, the datagrams of a UDP one.
        self.on_accept = on_accept
        self.on_datagram = on_datagram

    # ------------------------------------------------------------ bind, adopt, apply
    def bind(self, config: Config, carried: dict[ListenKey, socket.socket] | None = None) -> None:
        """Bind every enabled service's listeners; ListenError (nothing left bound) on failure.

        Sockets handed over by systemd socket activation are adopted instead of bound, as are
        ``carried``: the sockets of the image before this one (`pyinetd upgrade`).
        """
        self._activated.update(carried or {})
        self._quiet = set(carried or ())
        inherited = worker_fds() if self.worker else systemd.listen_fds()
        for sock, _name in inherited:
            key = systemd.key_of(sock)
            if key is None:
                sock.close()
                continue
            self._activated[key] = sock
        contexts = self.prepare(config)
        self.apply(config, self.bind_new(config, {}), contexts)
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
        if sock is not None and not self.worker and key not in self._quiet:
            event(
                logging.INFO,
                f"socket activation: adopted {key.protocol} {key.address}",
                event="activation",
            )
        return sock

    def bind_new(
        self, config: Config, keep: dict[ListenKey, Listener]
    ) -> dict[ListenKey, socket.socket]:
        """Bind every listen address of ``config`` not in ``keep``; all or nothing."""
        fresh: dict[ListenKey, socket.socket] = {}
        reuseport = config.workers > 1
        try:
            for svc in config.enabled_services:
                if svc.interface and svc.protocol != "unix":
                    try:
                        socket.if_nametoindex(svc.interface)
                    except OSError:
                        # Checked here, where a reload may still fail, for kept sockets too.
                        raise ListenError(
                            f"services.{svc.name}.interface: {svc.interface}: no such network "
                            "interface",
                            svc.source,
                        ) from None
                skip: dict[ListenKey, object] = {**keep, **fresh}
                for addr in svc.listen:
                    key = ListenKey(svc.protocol, addr)
                    if not self.serves(svc, key):
                        skip[key] = None
                    elif key not in keep and (sock := self._adopt(key)) is not None:
                        fresh[key] = skip[key] = sock
                for key, sock in bind_service(svc, skip=skip, reuseport=reuseport):
                    fresh[key] = sock
                    if svc.wait and not self.worker:
                        _take_over_if_shared(svc, key, sock)
        except Exception:
            for sock in fresh.values():
                close_listener(sock)
            raise
        return fresh

    def prepare(self, config: Config) -> dict[str, ssl.SSLContext]:
        """Everything a (re)load needs that can fail, before anything changes: each TLS
        context, built once from the files as they are now (read again at apply,
        a key swapped in between would leave a TLS service serving plaintext), and each service's
        sandbox (a kernel that refuses one refuses the load), which apply() hands
        to the spawner. ConfigError if any fails."""
        # from a prepare whose bind then failed
        discard_sandboxes(self._sandboxes, self._spawner.sandboxes)
        # A service failed at load runs nothing: no sandbox (its read paths may be its user's).
        serving = [s for s in config.services if s.name not in config.failed]
        self._sandboxes = prepare_sandboxes(serving, self._spawner.sandboxes)
        enabled = config.enabled_services  # a disabled service's TLS files are not read
        if not any(svc.tls for svc in enabled):
            return {}
        from pyinetd.protocols.tlsconf import build_contexts  # ssl only where tls is used

        contexts, errors = build_contexts((s.name, s.source, s.tls) for s in enabled)
        if errors:
            raise ConfigError(errors, config.located(errors))
        return contexts

    def apply(
        self,
        config: Config,
        fresh: dict[ListenKey, socket.socket],
        contexts: dict[str, ssl.SSLContext],
    ) -> None:
        """Switch to ``config``: reuse kept sockets, add fresh ones, close the rest. Nothing
        here may fail: what can was done by prepare and bind_new."""
        self.config = config
        self._spawner.forget()
        self._spawner.install_sandboxes(self._sandboxes)
        self._sandboxes = {}
        wanted: dict[ListenKey, Service] = {}
        for svc in config.enabled_services:
            for addr in svc.listen:
                key = ListenKey(svc.protocol, addr)
                if self.serves(svc, key):
                    wanted[key] = svc
        for state in self.states.values():
            state.listeners.clear()
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
                self.pause(lst)
                if lst.resume_timer:
                    lst.resume_timer.cancel()
                del self.listeners[key]
                if lst.waiting.held:
                    lst.sock.close()  # the wait-mode child keeps its own reference
                else:
                    close_listener(lst.sock)
                closed = True
        if closed:
            self._spawner.settle()  # no child still holds them: the next reload may rebind
        for key, svc in wanted.items():
            state = self.states[svc.name]
            existing = self.listeners.get(key)
            lst = existing if existing is not None else self._new_listener(key, fresh[key], state)
            # A socket kept across the reload (or handed over by systemd) takes the options as
            # they are now; bind_new checked the interface exists (a fresh socket had them
            # before bind).
            with contextlib.suppress(OSError):
                set_socket_options(lst.sock, svc)
            lst.state = state
            state.listeners.append(lst)
            self.refresh(lst)
        self.full = self.at_max_children()
        for lst in self.listeners.values():
            self.refresh(lst)
        self.loop_ports = self._udp_ports(config)
        for svc in config.enabled_services:
            if svc.proxy_protocol and svc.proxy_from is None and not self.worker:
                # Then anyone may claim any address, past allow/deny.
                event(
                    logging.WARNING,
                    f"{svc.name}: proxy_protocol without proxy_from: any client may send a "
                    "PROXY header and claim any address (allow/deny then decide on that claim)",
                    event="proxy_untrusted",
                    service=svc.name,
                )

    def _udp_ports(self, config: Config) -> frozenset[int]:
        """The ports every UDP listener of this instance answers on, built-in or exec: a
        datagram from one of them is a loop (one datagram spoofed from one nowait exec
        service's port to another's would fork ~950 processes a second, forever)."""
        ports = {
            addr.port
            for svc in config.enabled_services
            if svc.protocol == "udp"
            for addr in svc.listen
            if addr.port
        }
        for lst in self.listeners.values():
            if lst.key.protocol == "udp":
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
    def should_listen(self, lst: Listener) -> bool:
        """Whether ``lst`` is watched now: not stopping, not paused, not at a queueing limit."""
        if self.stopping or lst.waiting.held or self.listeners.get(lst.key) is not lst:
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
        return not (self.full and not svc.is_builtin and svc.on_limit == "queue")

    def refresh(self, lst: Listener) -> None:
        """Watch or stop watching a listener according to its limits and pauses."""
        if self.should_listen(lst):
            if not lst.registered:
                if lst.key.protocol == "udp":
                    handler = functools.partial(self.on_datagram, lst)
                else:
                    handler = functools.partial(self.on_accept, lst)
                self._loop.sel.register(lst.sock, selectors.EVENT_READ, handler)
                lst.registered = True
        else:
            self.pause(lst)

    def pause(self, lst: Listener) -> None:
        """Stop watching ``lst`` (the socket stays open; clients wait in its backlog)."""
        if lst.registered:
            self._loop.sel.unregister(lst.sock)
            lst.registered = False

    def pause_for(self, lst: Listener, seconds: float) -> None:
        """Stop accepting on ``lst`` for a while; the socket stays open and bound."""
        lst.paused_until = time.monotonic() + seconds
        self.pause(lst)
        if lst.resume_timer:
            lst.resume_timer.cancel()
        lst.resume_timer = self._loop.call_later(seconds, functools.partial(self.resume, lst))

    def resume(self, lst: Listener) -> None:
        """A pause is over: watch ``lst`` again if its limits allow."""
        lst.paused_until = 0.0
        lst.resume_timer = None
        self.refresh(lst)
        if lst.registered:
            event(
                logging.INFO,
                f"{lst.state.service.name}: {lst.key.address}: accepting again",
                event="resume",
                service=lst.state.service.name,
            )

    def at_max_children(self) -> bool:
        """At the global max_children: exec services take no new connection."""
        limit = self.config.max_children
        return limit is not None and len(self._children) >= limit

    def serves(self, svc: Service, key: ListenKey) -> bool:
        """Whether this process serves ``key`` (a worker leaves some to the first process)."""
        return not self.worker or worker_serves(svc, key)

    # ------------------------------------------------------------ by limits
    def take_slot(self, state: ServiceState, key: str, kind: SlotKind) -> Slot:
        """A child, session or pending hello of ``state`` starts: counted under its limits
        (and its source ``key``), and at a limit its listeners stop accepting (queue)."""
        if kind is SlotKind.PENDING:
            state.hellos += 1
        else:
            state.running += 1
        if key:
            state.sources[key] = state.sources.get(key, 0) + 1
        if kind is SlotKind.CHILD and self.config.max_children is not None and not self.full:
            self.full = self.at_max_children()  # exec listeners pause at max_children
        if self.full:
            for lst in self.listeners.values():
                self.refresh(lst)
        elif (
            state.service.max_connections
            and state.running + state.hellos >= state.service.max_connections
        ):
            for lst in state.listeners:
                self.refresh(lst)
        return Slot(state, key, kind)

    def free_slot(self, slot: Slot | None) -> None:
        """``slot``'s holder ended: its places are free, and below the limits the paused
        listeners listen again. Freeing a slot twice (or None) changes nothing."""
        if slot is None or slot.freed:
            return
        slot.freed = True
        state, key = slot.state, slot.key
        if slot.kind is SlotKind.PENDING:
            state.hellos -= 1
        else:
            state.running -= 1
        if key:
            n = state.sources.get(key, 0) - 1
            if n > 0:
                state.sources[key] = n
            else:
                state.sources.pop(key, None)
        if slot.kind is SlotKind.CHILD and self.full and not self.at_max_children():
            self.full = False
            for lst in self.listeners.values():
                self.refresh(lst)
            return
        for lst in state.listeners:
            if not lst.registered:
                self.refresh(lst)

    def rate_pause(self, state: ServiceState) -> None:
        """Over the service's rate: rest all its listeners for `rate_pause` seconds."""
        svc = state.service
        event(
            logging.WARNING,
            f"{svc.name}: over the rate of {svc.rate[0] if svc.rate else 0:g}/s; "
            f"pausing for {svc.rate_pause:g}s (the port stays open)",
            event="rate_pause",
            service=svc.name,
        )
        for lst in state.listeners:
            self.pause_for(lst, svc.rate_pause)

    def child_ended(self, listener: Listener | None) -> None:
        """A child was reaped (its slot freed): its wait-mode listener is free again."""
        if listener is not None:
            lst = listener
            lst.change_wait(WAIT_IDLE)
            if self.listeners.get(lst.key) is lst:
                lst.sock.setblocking(False)
            if not lst.registered:
                self.refresh(lst)

    def close_all(self) -> None:
        """Stop: no listener is watched any more, every socket is closed."""
        self.stopping = True
        for lst in list(self.listeners.values()):
            self.pause(lst)
            if lst.resume_timer:
                lst.resume_timer.cancel()
            if lst.waiting.held:
                lst.sock.close()  # the wait-mode child still holds it
            else:
                close_listener(lst.sock)
        self.listeners.clear()
        self._spawner.settle()  # the ports are free for a new pyinetd once this one stops


def worker_serves(svc: Service, key: ListenKey) -> bool:
    """Workers leave unix sockets, wait-mode services and services with a counted limit to
    the first process (a wait service's socket belongs to one child at a time; a unix path
    to one binder; max_connections, per_source and rate are counted in one place)."""
    return (
        key.protocol != "unix"
        and not svc.wait
        and not svc.counts_connections
        and not svc.needs_relay  # a front's services: their fronts are the first process's
    )


def worker_fds() -> list[tuple[socket.socket, str]]:
    """In a worker: the listening sockets the first process passed down."""
    value = os.environ.pop("PYINETD_LISTEN_FDS", "")
    return [(systemd.adopt_fd(int(text)), "") for text in filter(None, value.split(","))]


def _take_over_if_shared(svc: Service, key: ListenKey, sock: socket.socket) -> None:
    """A wait service's port bound beside sockets that programs of an earlier run still hold
    (SO_REUSEPORT, see listeners.bind_service): every new datagram or connection comes to
    this socket (it joined last, after those), so the new configuration serves them and a
    lingering program gets none it has not already queued; say who holds the others."""
    count, held = sharers(sock)
    if not count:
        return
    steered = True
    try:
        steer_to(sock, count)
    except OSError:  # a kernel without SO_ATTACH_REUSEPORT_CBPF: its hash shares them
        steered = False
    who = ", ".join(f"pid {pid} ({name})" for pid, name in held) or "a process not visible here"
    what = "datagrams" if key.protocol == "udp" else "connections"
    event(
        logging.WARNING,
        f"{svc.name}: {key.protocol} {key.address} is also bound by {who}, a wait program "
        + (
            f"still running from before: new {what} come to pyinetd"
            if steered
            else f"still running from before: the kernel shares new {what} with it until it exits"
        ),
        event="listen_shared",
        service=svc.name,
        pids=[pid for pid, _ in held],
    )


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
