"""pyinetd's side of one front process: its process, its channel, its ids.

A front carries the connections of one TLS or redirect service (front.py is its body): the
parent hands it each client socket (``C``) and, once it says the handshake is done (``H``),
the program's pipes (``S``). The channel is a SOCK_SEQPACKET socketpair (frontchan.py: one
record per message, at most 8192 bytes and 2 fds). The parent never blocks on it: what it
sends waits in a bounded queue and goes out when the socket is writable; what it reads is
read in batches of at most READ_BATCH records per wake-up, so a front that floods its channel
costs the loop one batch a turn, never the turn.

Everything a front says is untrusted (it parses what strangers send): each message must be
the one the id it names expects now (``Link``: waiting -> hello -> over), and anything else
(garbage, an id never handed out, a second ``H``, an ``E`` before ``H``, a truncated record,
fds it should not send) is distrust: the front is killed, its connections end (logged), and
the manager (fronts.py) starts another.

``start_front`` forks the process: the service's contexts and configuration stay, every
other service's SSLContext is dropped first, then the service's cgroup (``network:
loopback``), the front uid, non-dumpable and no_new_privs, and front.run.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import importlib
import importlib.util
import os
import resource
import signal
import socket
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from pyinetd import procsettings, spawn
from pyinetd.config import wsconf
from pyinetd.log import LOG
from pyinetd.protocols import frontchan
from pyinetd.signals import HANDLED_SIGNALS

if TYPE_CHECKING:
    import selectors
    import ssl

    from pyinetd.config import Service
    from pyinetd.sandbox import Prepared

__all__ = ["Front", "Link", "start_front"]

READ_BATCH = 64  # records read per wake-up: a flooding front never holds the loop longer
QUEUE_MAX = 1024  # messages queued for one front; one more and it is distrusted
STALL_TIMEOUT = 5.0  # seconds a front may leave its queue unread before it is distrusted
LATE_MAX = 4096  # ids ended by the parent (K, N) whose one late message is still accepted
SEND_BUFFER = 256 * 1024  # the parent's socket buffer toward a front: bounded kernel memory

# An id's states at the parent (FRONT-API.md): C sent, waiting for H or F; H read, the
# program started or refused (S or N sent), waiting for E.
WAITING, HELLO = "waiting", "hello"


class _Timer(Protocol):
    def cancel(self) -> None: ...


class Owner(Protocol):
    """The connection an id stands for, at the parent: told what the front says of it."""

    def hello(self, link: Link, env: dict[str, str]) -> None: ...

    def failed(self, link: Link, reason: str) -> None: ...

    def ended(self, link: Link, bytes_in: int, bytes_out: int) -> None: ...

    def lost(self, link: Link, why: str) -> None: ...


class Link:
    """One id handed to a front: its state and the connection it stands for."""

    __slots__ = ("front", "id", "owner", "pid", "state")

    def __init__(self, front: Front, ident: int, owner: Owner) -> None:
        self.front, self.id, self.owner = front, ident, owner
        self.state = WAITING
        self.pid = 0  # the program's, once started

    def send(self, kind: str, payload: dict[str, Any], fds: Iterable[int] = ()) -> None:
        """A message about this id to its front (queued; fds closed here once sent)."""
        self.front.send(kind, {"id": self.id, **payload}, list(fds))

    def abort(self) -> None:
        """``K``: the parent ends this id (its deadline, a reload, a stop); one late message
        from the front is then accepted and dropped."""
        if self.front.links.pop(self.id, None) is self:
            self.front.forget(self.id)
            self.send("K", {})

    def finish(self) -> None:
        """The parent is done with this id without telling the front (after ``N``)."""
        if self.front.links.pop(self.id, None) is self:
            self.front.forget(self.id)


class Front:
    """One front process and its channel; ``say`` logs, ``dead`` tells the manager that it
    ended (reaped later) or was distrusted (killed)."""

    def __init__(
        self,
        service: Service,
        generation: int,
        sock: socket.socket,
        pid: int,
        sel: selectors.BaseSelector,
        call_later: Callable[[float, Callable[[], None]], _Timer],
        dead: Callable[[Front, str], None],
    ) -> None:
        self.service, self.generation, self.pid = service, generation, pid
        self.sock = sock
        self.started = time.monotonic()
        self._sel = sel
        self._call_later = call_later
        self._dead = dead
        self.links: dict[int, Link] = {}
        self._late: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._queue: collections.deque[tuple[bytes, list[int]]] = collections.deque()
        self._stall: _Timer | None = None
        self._next_id = 0
        self.draining = False  # D sent: no new connection goes to it
        self.over = ""  # why it no longer serves (distrusted, its channel ended)
        self.served = 0  # connections handed to it
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        sel.register(sock, _READ, self._on_event)

    # ------------------------------------------------------------ the connections
    @property
    def connections(self) -> int:
        return len(self.links)

    @property
    def usable(self) -> bool:
        """It takes new connections: alive, not draining, its queue not near full."""
        return not self.over and not self.draining and len(self._queue) < QUEUE_MAX // 2

    def hand(self, owner: Owner, payload: dict[str, Any], conn: socket.socket) -> Link:
        """``C``: a new id for ``owner``'s connection; the socket goes to the front (our
        copy is closed once sent: the parent keeps no fd of a front's connection)."""
        self._next_id += 1
        link = Link(self, self._next_id, owner)
        self.links[link.id] = link
        self.served += 1
        link.send("C", payload, [conn.detach()])
        return link

    def forget(self, ident: int) -> None:
        self._late[ident] = None
        while len(self._late) > LATE_MAX:
            self._late.popitem(last=False)

    def drain(self) -> None:
        """``D``: no more connections; it finishes its own, then exits."""
        if not self.draining and not self.over:
            self.draining = True
            self.send("D", {}, [])

    # ------------------------------------------------------------ sending
    def send(self, kind: str, payload: dict[str, Any], fds: list[int]) -> None:
        if self.over:
            _close_all(fds)
            return
        try:
            data = frontchan.encode(kind, payload)
        except (frontchan.ChannelError, ValueError) as exc:  # ours: a bug, never the front's
            _close_all(fds)
            self.distrust(f"cannot encode {kind}: {exc}")
            return
        if len(self._queue) >= QUEUE_MAX:
            _close_all(fds)
            self.distrust(f"it stopped reading: {QUEUE_MAX} messages queued")
            return
        self._queue.append((data, fds))
        if len(self._queue) == 1:
            self._flush()

    def flush_now(self) -> None:
        """What is queued, sent now, waiting up to a second for room (before an exec)."""
        if self.over or not self._queue:
            return
        self.sock.settimeout(1.0)
        try:
            while self._queue and not self.over:
                data, fds = self._queue.popleft()
                try:
                    frontchan.send(self.sock, data, fds)
                except OSError:
                    _close_all(fds)
                    return
                _close_all(fds)
        finally:
            with contextlib.suppress(OSError):
                self.sock.setblocking(False)

    def _flush(self) -> None:
        while self._queue:
            data, fds = self._queue[0]
            try:
                frontchan.send(self.sock, data, fds)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # EPIPE, ECONNRESET: the front is gone
                self._queue.popleft()
                _close_all(fds)
                self.end(f"channel: {exc.strerror or exc}")
                return
            self._queue.popleft()
            _close_all(fds)
        self._watch()

    def _watch(self) -> None:
        """Write interest, and the stall deadline, while something waits to be sent."""
        if self.over:
            return
        if self._queue:
            self._sel.modify(self.sock, _READ | _WRITE, self._on_event)
            if self._stall is None:
                self._stall = self._call_later(STALL_TIMEOUT, self._stalled)
        else:
            self._sel.modify(self.sock, _READ, self._on_event)
            if self._stall is not None:
                self._stall.cancel()
                self._stall = None

    def _stalled(self) -> None:
        self._stall = None
        if self._queue and not self.over:
            self.distrust(f"it read nothing for {STALL_TIMEOUT:g}s with messages queued")

    # ------------------------------------------------------------ reading
    def _on_event(self, mask: int) -> None:
        try:
            if mask & _WRITE:
                self._flush()
            if mask & _READ and not self.over:
                self._read()
        except Exception as exc:
            # A bug of ours, not the front's word: logged with its traceback, and the front
            # replaced, so that a readable channel cannot make the loop raise again and again.
            LOG.exception("internal error handling front %d", self.pid)
            self.distrust(f"internal error: {exc!r}")

    def _read(self) -> None:
        for _ in range(READ_BATCH):
            try:
                msg = frontchan.recv(self.sock, frontchan.FRONT_TO_PARENT)
            except (BlockingIOError, InterruptedError):
                return
            except frontchan.ChannelError as exc:
                self.distrust(f"a bad message: {exc}")
                return
            except OSError as exc:
                self.end(f"channel: {exc.strerror or exc}")
                return
            if msg is None:
                self.end("its channel closed")
                return
            _close_all(msg.fds)  # (no front message carries fds)
            self._handle(msg.kind, msg.fields)
            if self.over:
                return

    def _handle(self, kind: str, msg: dict[str, Any]) -> None:
        """The id state machine (FRONT-API.md): the expected message for the id's state, a
        late one for an id the parent ended, or distrust."""
        ident = msg.get("id")
        link = self.links.get(ident) if isinstance(ident, int) else None
        if link is None:
            if isinstance(ident, int) and ident in self._late:
                del self._late[ident]  # a race with our K or N: accepted once, dropped
                return
            self.distrust(f"{kind} for id {ident!r}, which it does not hold")
            return
        if kind == "H" and link.state == WAITING:
            env = msg.get("env", {})
            allowed = frontchan.TLS_ENV if self.service.tls is not None else frozenset()
            if self.service.websocket is not None:
                bad = not isinstance(env, dict) or bool(wsconf.check_environment(env))
            else:
                bad = not isinstance(env, dict) or not set(env) <= allowed
            if bad:
                # A TLS front says only today's SSL_* names; a redirect's says none; a
                # WebSocket front the CGI names and HTTP_* (wsconf): any other name would
                # reach the program's environment (LD_PRELOAD, PATH).
                self.distrust(f"H for id {link.id} with variables {sorted(env)[:4]!a}")
                return
            link.state = HELLO
            link.owner.hello(link, env)
        elif kind == "F" and link.state == WAITING:
            del self.links[link.id]
            link.owner.failed(link, str(msg.get("reason", "")))
        elif kind == "E" and link.state == HELLO:
            del self.links[link.id]
            link.owner.ended(link, int(msg.get("bytes_in", 0)), int(msg.get("bytes_out", 0)))
        else:
            self.distrust(f"{kind} for id {link.id} in state {link.state}")

    # ------------------------------------------------------------ its end
    def distrust(self, why: str) -> None:
        """Kill it: what it says can no longer be believed; its connections end."""
        if self.over:
            return
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)
        self.end(f"distrusted: {why}", distrusted=True)

    def end(self, why: str, distrusted: bool = False) -> None:
        """It no longer serves: channel closed, every id lost (told to its owner)."""
        if self.over:
            return
        self.over = why
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(self.sock)
        self.sock.close()
        while self._queue:
            _close_all(self._queue.popleft()[1])
        self._dead(self, why)  # (its connections still counted, for the log line)
        links, self.links = self.links, {}
        for link in links.values():
            link.owner.lost(link, why)

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)

    def describe(self) -> dict[str, object]:
        return {
            "pid": self.pid,
            "generation": self.generation,
            "connections": self.connections,
            "served": self.served,
            "state": "draining" if self.draining else "serving",
            "age": round(time.monotonic() - self.started, 3),
        }


_READ, _WRITE = 1, 4  # selectors.EVENT_READ, EVENT_WRITE (not imported at run time)


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


# ---------------------------------------------------------------- the process


def available() -> bool:
    """Whether the front's body (front.py) is installed: without it, TLS and redirect
    connections each get a relay process (relay.py)."""
    return importlib.util.find_spec("pyinetd.protocols.front") is not None


def start_front(
    service: Service,
    ctx: ssl.SSLContext | None,
    uid: int,
    gid: int,
    stderr: int,
    box: Prepared | None,
    others: Callable[[], Iterable[object]],
) -> tuple[int, socket.socket]:
    """Fork a front for ``service``: its pid and the parent's end of its channel.

    In the child, before the first byte of a stranger is parsed: every fd but the channel,
    ``stderr`` (onto 2) and the sandbox's closed; signals back to their default; every other
    service's SSLContext (``others``) dropped, so that the front holds only its own
    service's key; its own session; the service's cgroup and namespaces (``network:
    loopback`` then governs redirect's outbound connections); RLIMIT_NOFILE soft raised to
    hard; no supplementary groups, ``gid``, ``uid`` (the front uid, which no program runs
    as: none can ptrace or signal it); not dumpable, no_new_privs; the sandbox's rules; then
    front.run. The parent's loop goes on at once (fork: no exec to wait for)."""
    # Imported here, as root, before the uid change (the front uid may not read the venv).
    front = importlib.import_module("pyinetd.protocols.front")
    # (socket.create_connection encodes host names with the idna codec, imported on first
    # use: by then the front uid may not read the standard library.)
    importlib.import_module("encodings.idna")

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def child() -> None:  # pragma: no cover - runs in the forked front
        code = 1
        try:
            chan = theirs.fileno()
            keep = {chan, stderr, *(box.fds() if box is not None else ())}
            signal.set_wakeup_fd(-1)
            for name in os.listdir("/proc/self/fd"):
                fd = int(name)
                if fd > 2 and fd not in keep:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            os.dup2(stderr, 2)
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            os.close(devnull)
            for sig in HANDLED_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)
            _drop_contexts(ctx, others())
            os.setsid()
            if box is not None:
                box.enter()
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
            procsettings.prctl(procsettings.PR_SET_DUMPABLE, 0)
            if box is not None:
                box.restrict()  # no_new_privs, Landlock, seccomp
            else:
                procsettings.prctl(_PR_SET_NO_NEW_PRIVS, 1)
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            sock = socket.socket(fileno=chan)
            code = front.run(sock, front.FrontSettings.from_service(service, ctx))
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.write(2, f"front of {service.name}: {exc!r}\n".encode(errors="replace"))
        finally:
            os._exit(code)

    try:
        pid = spawn._fork(child)
    finally:
        theirs.close()
    return pid, ours


_PR_SET_NO_NEW_PRIVS = 38


def _drop_contexts(keep: object, others: Iterable[object]) -> None:  # pragma: no cover
    """In the front: every SSLContext but its own loses its references (the dicts, lists
    and attributes that hold it), so that OpenSSL frees it and the key it holds (its
    private key's numbers are cleared when freed, BN_clear_free)."""
    import ssl

    doomed = [o for o in others if o is not keep and isinstance(o, ssl.SSLContext)]
    doomed += [
        o
        for o in gc.get_objects()
        if isinstance(o, ssl.SSLContext) and o is not keep and o not in doomed
    ]
    for ctx in doomed:
        for ref in gc.get_referrers(ctx):
            if isinstance(ref, dict):
                for k in [k for k, v in ref.items() if v is ctx]:
                    del ref[k]
            elif isinstance(ref, list):
                ref[:] = [None if v is ctx else v for v in ref]
            else:
                for name in getattr(ref, "__slots__", ()) or ():
                    if getattr(ref, name, None) is ctx:
                        with contextlib.suppress(AttributeError, TypeError):
                            setattr(ref, name, None)
                with contextlib.suppress(TypeError):
                    for name, value in list(vars(ref).items()):
                        if value is ctx:
                            setattr(ref, name, None)
    del doomed
    gc.collect()
