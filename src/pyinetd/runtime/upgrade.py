"""`pyinetd upgrade` and SIGUSR2: the running parent replaces itself by the program now
installed, by execve(2) in place, with nothing lost.

The same pid (systemd's MainPID, the children's parent, the pid file stay right) and the same
listening sockets (a queued connection is neither reset nor refused: they wait in the backlog
during the exec); the state goes to the next image in a memfd whose number is in
$PYINETD_UPGRADE_STATE. Every fd to keep is made inheritable just before the exec and close-
on-exec again as the next image reads the state; everything else stays close-on-exec.

The old image (``begin``): a probe first, the new program run as a child of its own
(`pyinetd upgrade --probe`: it imports what the runtime imports, loads and checks the
configuration and says which state versions it reads), read in the loop; a probe that fails
leaves this image serving, and the `pyinetd upgrade` that asked gets the reason. Then
(``_exec``): the zygotes are stopped (their answers read: no request is left open; warm
services are served cold until the next image's zygotes are ready), the exit watcher goes,
the state is written and the image execs.

The next image: ``listeners`` hands the sockets to Services.bind, ``adopt`` (before the first
reap) fills the children table with the old children (their start times, peers, states and
timeouts; their slots taken again through Services.take_slot, so every limit counts them),
the counters and metrics, the stderr-log sockets, the pid file and the control socket;
``finish`` (just before the first accept) logs the pause and answers the client that asked.

Parts that hold fds of their own join through ``carriers`` (see Carrier): what they carry is
handed back to them, by name, in the next image.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable, Sized
from dataclasses import asdict
from typing import Any, Protocol

from pyinetd import __version__, log
from pyinetd.config import Config, ConfigError, ListenAddress, load
from pyinetd.log import event
from pyinetd.runtime import control, systemd
from pyinetd.runtime.children import Child, Children, ChildState
from pyinetd.runtime.listeners import (
    ListenError,
    ListenKey,
    adopt_unix_file,
    close_listener,
    unix_file_of,
)
from pyinetd.runtime.loop import Loop, Timer
from pyinetd.runtime.metrics import Histogram, Metrics, ServiceMetrics
from pyinetd.runtime.pidfile import PidFile
from pyinetd.runtime.services import Services, SlotKind, Wait
from pyinetd.runtime.sessions import Sessions
from pyinetd.runtime.stages import UDPReply
from pyinetd.runtime.stderrlog import StderrLog
from pyinetd.runtime.workers import Workers
from pyinetd.signals import HANDLED_SIGNALS, ignored_signals
from pyinetd.spawn import Spawner, start_python

STATE_ENV = "PYINETD_UPGRADE_STATE"  # the memfd's number, in the next image's environment
STATE_VERSION = 1  # what the state's layout is; the probe says which versions it reads
READS = (STATE_VERSION,)
PROBE_OK = "pyinetd-probe-ok"  # the probe's last line: PROBE_OK VERSION STATE_VERSIONS
PROBE_TIMEOUT = 60.0  # seconds the probe may take (a cold page cache, a slow disk)
PROBE_OUTPUT_MAX = 65536
PENDING_WAIT = 5.0  # seconds the exec waits for a moment with no pre-service stage pending


class Carrier(Protocol):
    """A part with fds that must live across the exec (a front's channels, say): ``carry``
    gives JSON-able facts and the fds to keep open, ``adopt`` takes the facts back in the next
    image (None when the image before had none). Register with ``Upgrade.carriers``, in both
    images, before Server.run."""

    name: str

    def carry(self) -> tuple[Any, list[int]]: ...

    def adopt(self, facts: Any) -> None: ...


def _key(key: ListenKey) -> list[Any]:
    return [key.protocol, key.address.host, key.address.port, key.address.path]


def _unkey(facts: list[Any]) -> ListenKey:
    protocol, host, port, path = facts
    return ListenKey(protocol, ListenAddress(host=host, port=port, path=path))


def _program() -> list[str]:
    """The command line this image was started with: the interpreter, its options and the
    script (or `-m pyinetd`), run again from the same paths (which now hold the program
    installed), and pyinetd's own arguments."""
    args = len(sys.argv) - 1
    words = sys.orig_argv[: len(sys.orig_argv) - args] if args else list(sys.orig_argv)
    return [sys.executable, *words[1:], *sys.argv[1:]]


class _Probe:
    """The new program, run once as a child: its stdout and stderr read in the loop."""

    def __init__(
        self,
        config: Config,
        loop: Loop,
        done: Callable[[str], None],
    ) -> None:
        self._loop, self._done = loop, done
        r, w = os.pipe()
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        args = ["upgrade", "--probe", "-c", str(config.path)]
        try:
            self.pid = start_python(
                "from pyinetd.cli import main; sys.exit(main())",
                args,
                env,
                sigdef=ignored_signals(),
                dup2=((w, 1), (w, 2)),
            )
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        os.set_blocking(r, False)
        self._r = r
        self._out = b""
        loop.sel.register(r, selectors.EVENT_READ, self._readable)
        self._timer: Timer | None = loop.call_later(PROBE_TIMEOUT, self._late)

    def _readable(self, mask: int) -> None:
        try:
            data = os.read(self._r, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self._out = (self._out + data)[-PROBE_OUTPUT_MAX:]
        if not data:
            self._end(self._out.decode("utf-8", "replace"))

    def _late(self) -> None:
        self._timer = None
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)
        self._end(f"the probe took over {PROBE_TIMEOUT:g}s")

    def _end(self, output: str) -> None:
        if self._r < 0:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._loop.sel.unregister(self._r)
        os.close(self._r)
        self._r = -1
        self._done(output)


class Handover:
    """What one image hands to the next: ``capture`` in the old one (facts and fds), then
    ``listeners`` and ``adopt`` in the next one."""

    def __init__(
        self,
        *,
        loop: Loop,
        spawner: Spawner,
        services: Services,
        children: Children,
        sessions: Sessions,
        pending: Sized,
        metrics: Metrics,
        workers: Workers,
        ops_servers: Callable[[], list[control.RequestServer]],
        pidfile: PidFile,
        config: Callable[[], Config],
        resume: Callable[[], None],
        started: float,
    ) -> None:
        self._loop, self._spawner, self._services = loop, spawner, services
        self._children, self._sessions, self._metrics = children, sessions, metrics
        self._pending = pending  # connections in a pre-service stage (connections.Stages)
        self._workers, self._ops_servers, self._pidfile = workers, ops_servers, pidfile
        self._config, self._resume = config, resume
        self.started = started  # the first image's start (monotonic), for `status`
        self.carriers: list[Carrier] = []
        self._probe: _Probe | None = None
        self._fresh: dict[ListenKey, socket.socket] = {}  # bound for the next image (_bind_new)
        self._busy = False  # from the probe's start to the exec, or the failure
        self._asked: list[control.Later] = []  # `pyinetd upgrade` clients waiting
        self._quiet: dict[int, str] = {}  # pids of the images before: what each was
        self.state: dict[str, Any] | None = read_state()

    def capture(self) -> tuple[dict[str, Any], list[int]]:
        """The state as JSON-able facts, and every fd it names."""
        fds: list[int] = []
        listeners = []
        for key, lst in self._services.listeners.items():
            fds.append(lst.sock.fileno())
            unix = unix_file_of(lst.sock)
            if unix is not None:
                fds.append(unix[0])
            held = lst.waiting.pid if lst.waiting.held else 0
            until = lst.paused_until
            listeners.append([lst.sock.fileno(), _key(key), held, until, unix])
        for key, sock in self._fresh.items():
            fds.append(sock.fileno())
            unix = unix_file_of(sock)
            if unix is not None:
                fds.append(unix[0])
            listeners.append([sock.fileno(), _key(key), 0, 0.0, unix])
        kids = []
        for pid, child in self._children.table.items():
            slot = child.slot
            timer = child.timer
            kids.append(
                {
                    "pid": pid,
                    "service": child.state.service.name,
                    "peer": child.peer,
                    "started": child.started,
                    "listener": _key(child.listener.key) if child.listener else None,
                    "slot": [slot.key, slot.kind.value] if slot and not slot.freed else None,
                    "state": child.lifecycle.value,
                    "why": child.why,
                    "local": child.local,
                    "timer": timer.when if timer is not None and not timer.cancelled else None,
                }
            )
        states = {}
        for name, st in self._services.states.items():
            logfds, partial = st.stderr_log.carry() if st.stderr_log else (None, {})
            fds.extend(logfds or ())
            states[name] = {
                "accepted": st.accepted,
                "bytes": [st.bytes_in, st.bytes_out],
                "spawn_failures": st.spawn_failures,
                "refused": st.refused,
                "drained": st.drained,  # `pyinetd drain`: the agent still answers drain
                "stderr_log": logfds,
                "partial": {str(pid): text.hex() for pid, text in partial.items()},
            }
        keys = {lst.sock.fileno(): key for key, lst in self._services.listeners.items()}
        replies = []
        for pid, reply in self._children.udp_replies().items():
            fd, lfd, to, written = reply.carry()
            if not reply.closed and lfd in keys and isinstance(to, tuple):
                fds.append(fd)
                replies.append([pid, fd, _key(keys[lfd]), list(to), written.hex()])
        sessions = []
        for sess, (slot, peer, _timer) in self._sessions.table.items():
            fds.append(sess.sock.fileno())
            facts = {"fd": sess.sock.fileno(), "service": slot.state.service.name}
            sessions.append({**facts, "src": slot.key, "peer": peer, **sess.carry()})
        controls = []
        for server in self._ops_servers():
            if server.sock.family == socket.AF_UNIX:
                controls.append([server.sock.getsockname(), server.sock.fileno()])
                fds.append(server.sock.fileno())
        asked = []
        for later in self._asked:
            if later.exchange is not None and later.exchange.conn.fileno() >= 0:
                asked.append(later.exchange.conn.fileno())
        fds.extend(asked)
        pidfile, pidfds = self._pidfile.carry()
        fds.extend(pidfds)
        carried = {}
        for part in self.carriers:
            carried[part.name], more = part.carry()
            fds.extend(more)
        facts = {
            "version": STATE_VERSION,
            "fds": fds,
            "listeners": listeners,
            "children": kids,
            "sessions": sessions,
            "udp_replies": replies,
            "states": states,
            "metrics": asdict(self._metrics),
            "control": controls,
            "asked": asked,
            "pidfile": pidfile,
            "workers": list(self._workers.table),
            "quiet": {str(pid): what for pid, what in self._quiet.items()},
            "started": self.started,
            "carried": carried,
        }
        return facts, fds

    # ------------------------------------------------------------ the next image
    def listeners(self) -> dict[ListenKey, socket.socket]:
        """The listening sockets of the image before, by key (for Services.bind)."""
        if self.state is None:
            return {}
        out = {}
        for fd, key, _held, _until, unix in self.state["listeners"]:
            sock = socket.socket(fileno=fd)
            sock.setblocking(False)
            if unix is not None:
                adopt_unix_file(sock, *unix)
            out[_unkey(key)] = sock
        return out

    def adopt(self, started: float) -> float:
        """Everything else of the image before, before the first reap and the first accept;
        returns when pyinetd started (the first image's time)."""
        state = self.state
        if state is None:
            return started
        # Caught now (Server._install_signals): what came during the exec is delivered.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        self._spawner.refresh_signals()
        services, now = self._services, time.monotonic()
        for _fd, key, held, until, _unix in state["listeners"]:
            lst = services.listeners.get(_unkey(key))
            if lst is None:
                continue
            if held:
                lst.waiting = Wait.on(held)  # the wait child from before holds the socket
                services.pause(lst)
            elif until > now:
                services.pause_for(lst, until - now)
        for name, facts in state["states"].items():
            st = services.states.get(name)
            logfds = facts["stderr_log"]
            if st is None:
                for fd in logfds or ():
                    os.close(fd)
                continue
            st.accepted = facts["accepted"]
            st.bytes_in, st.bytes_out = facts["bytes"]
            st.spawn_failures.update(facts["spawn_failures"])
            st.refused.update(facts["refused"])
            st.drained = facts["drained"]
            if logfds:
                svc = st.service
                st.stderr_log = StderrLog(
                    svc.name, self._loop.sel, svc.stderr_rate, self._loop.call_later, tuple(logfds)
                )
                st.stderr_log.adopt_partial(
                    {int(p): bytes.fromhex(t) for p, t in facts["partial"].items()}
                )
        for name, m in state["metrics"]["services"].items():
            self._metrics.services[name] = ServiceMetrics(
                durations=Histogram(**m["durations"]), exits=m["exits"]
            )
        for facts in state["children"]:
            self._adopt_child(facts, now)
        for pid, fd, key, to, written in state["udp_replies"]:
            conn, lst = socket.socket(fileno=fd), services.listeners.get(_unkey(key))
            if lst is None or pid not in self._children.table:
                conn.close()
                continue
            reply = UDPReply(conn, lst.sock, tuple(to), self._loop.sel, bytes.fromhex(written))
            self._children.udp_replies()[pid] = reply
        for facts in state["sessions"]:
            conn = socket.socket(fileno=facts["fd"])
            st = services.states.get(facts["service"])
            if st is None:
                conn.close()  # its service left the file
            else:
                self._sessions.resume(st, conn, facts, facts["src"], facts["peer"])
        for path, fd in state["control"]:
            control.CARRIED[path] = socket.socket(fileno=fd)
        self._pidfile.adopt(state["pidfile"])
        self._quiet.update({int(p): what for p, what in state["quiet"].items()})
        self._quiet.update(dict.fromkeys(state["workers"], "worker"))
        carried = state["carried"]
        for part in self.carriers:
            part.adopt(carried.get(part.name))
        self.started = float(state["started"]) or started
        return self.started

    def _adopt_child(self, facts: dict[str, Any], now: float) -> None:
        pid = facts["pid"]
        services, children = self._services, self._children
        st = services.states.get(facts["service"])
        listener = services.listeners.get(_unkey(facts["listener"])) if facts["listener"] else None
        if st is None:  # its service left the file: reaped and logged, counted nowhere
            self._quiet[pid] = f"{facts['service']} child"
            return
        child = Child(
            pid,
            st,
            facts["peer"],
            facts["started"],
            listener,
            lifecycle=ChildState(facts["state"]),
            why=facts["why"],
            local=facts["local"],
        )
        if facts["slot"] is not None:
            key, kind = facts["slot"]
            child.slot = services.take_slot(st, key, SlotKind(kind))
        if facts["timer"] is not None:
            due = max(0.0, facts["timer"] - now)
            child.timer = self._loop.call_later(due, lambda: children.on_timeout(pid))
        children.table[pid] = child
        children.track(pid)


class Upgrade(Handover):
    """One image's side of an upgrade: the old image probes and execs, the next one adopts
    (Handover) and then says so."""

    # ------------------------------------------------------------ the old image
    def begin(self, later: control.Later | None = None) -> None:
        """Upgrade now (SIGUSR2, `pyinetd upgrade`): the probe first; ``later`` is answered
        with the outcome, by the next image when it succeeds."""
        if later is not None:
            self._asked.append(later)
        if self._busy:
            return  # one at a time: this client waits for the one running
        if self._services.stopping:
            self._fail("pyinetd is stopping")
            return
        if self._services.worker:
            return  # the first process upgrades, and starts its workers anew
        self._busy = True
        systemd.reloading()
        event(logging.INFO, "upgrade: probing the program installed", event="upgrade")
        try:
            self._probe = _Probe(self._config(), self._loop, self._probed)
        except OSError as exc:
            self._fail(f"cannot start the probe: {exc.strerror or exc}")
            return
        self._quiet[self._probe.pid] = "probe"

    def _probed(self, output: str) -> None:
        self._probe = None
        lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
        last = lines[-1].split() if lines else []
        if len(last) == 3 and last[0] == PROBE_OK:
            versions = {int(v) for v in last[2].split(",") if v.isdigit()}
            if STATE_VERSION in versions:
                why = self._bind_new()
                if why:
                    self._fail(why)
                    return
                if self._pending:
                    event(
                        logging.INFO,
                        f"upgrade: the probe of pyinetd {last[1]} passed; waiting for "
                        f"{len(self._pending)} connections in a pre-service stage",
                        event="upgrade_wait",
                    )
                self._when_none_pending(last[1], time.monotonic() + PENDING_WAIT)
                return
            why = f"pyinetd {last[1]} reads state versions {last[2]}, not {STATE_VERSION}"
            self._fail(why)
            return
        self._fail("; ".join(lines[-3:]) or "the probe said nothing")

    def _bind_new(self) -> str:
        """Bind here what the file now asks for beyond the listeners this image holds (it is
        read again by the next image), to hand over with them: an address that cannot be bound
        fails the upgrade now, while this image can still serve, and not the next image at
        its start. A file this image cannot read (keys of the new program) binds nothing here:
        the probe of the new program read it."""
        try:
            new = load(self._config().path)
            self._fresh = self._services.bind_new(new, self._services.listeners)
        except ConfigError:
            return ""
        except ListenError as exc:
            return str(exc)
        return ""

    def _when_none_pending(self, version: str, deadline: float) -> None:
        """Exec at the first moment no connection is in a pre-service stage (a PROXY header,
        a ClientHello or a relay's handshake due: each lives in this image's memory and
        ends in a few milliseconds), accepting meanwhile; at ``deadline`` those left are
        closed by the exec, and said."""
        left = len(self._pending)
        if left and time.monotonic() < deadline:
            self._loop.call_later(0.005, lambda: self._when_none_pending(version, deadline))
            return
        if left:
            event(
                logging.WARNING,
                f"upgrade: {left} connections still in a pre-service stage after "
                f"{PENDING_WAIT:g}s; the exec closes them",
                event="upgrade_pending",
            )
        self._exec(version)

    def _fail(self, why: str) -> None:
        event(
            logging.ERROR,
            f"upgrade failed, the running program keeps serving: {why}",
            event="upgrade_failed",
            error=why,
        )
        self._busy = False
        systemd.notify("READY=1", f"STATUS=upgrade failed: {why}")
        answer = json.dumps({"ok": False, "errors": [why]}).encode() + b"\n"
        for later in self._asked:
            later.answer(answer)
        self._asked.clear()

    def _exec(self, version: str) -> None:
        """Hand everything over and exec the program installed (which the probe ran)."""
        t0 = time.monotonic()
        self._children.zygotes.stop()  # their answers read first: no request left open
        self._children.close()  # the exit watcher exits at its pipe's end
        self._spawner.settle()  # no clone child still shares this image's memory
        facts, fds = self.capture()
        facts["t0"] = t0
        memfd = os.memfd_create("pyinetd-upgrade", 0)
        data = json.dumps(facts, separators=(",", ":")).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(memfd, view) :]
        argv = _program()
        env = {**os.environ, **systemd.taken_environ(), STATE_ENV: str(memfd)}
        keep = [*fds, memfd]
        ready_ms = (time.monotonic() - t0) * 1000
        event(
            logging.INFO,
            f"upgrade: exec of pyinetd {version}: {len(self._services.listeners)} listeners, "
            f"{len(facts['children'])} children handed over (state ready in {ready_ms:.1f} ms)",
            event="upgrade_exec",
        )
        log.batching(False)  # every line written before the image goes
        # Blocked across the exec (a mask survives it, a handler does not): a SIGHUP or
        # SIGTERM before the next image catches them would kill it (their default).
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            for fd in keep:
                os.set_inheritable(fd, True)
            os.execve(argv[0], argv, env)
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
            for sock in self._fresh.values():
                close_listener(sock)
            self._fresh = {}
            for fd in keep:
                with contextlib.suppress(OSError):
                    os.set_inheritable(fd, False)
            os.close(memfd)
            log.batching(True)
            self._resume()  # the zygotes again
            self._fail(f"exec {argv[0]}: {exc.strerror or exc}")

    def finish(self) -> None:
        """Just before the first accept: say how long nothing was accepted, answer the
        client that asked, retire the workers of the image before."""
        state, self.state = self.state, None
        if state is None:
            return
        pause_ms = (time.monotonic() - state["t0"]) * 1000
        kept = len(state["children"])
        event(
            logging.INFO,
            f"upgraded in {pause_ms:.0f} ms: pyinetd {__version__}, pid {os.getpid()}, "
            f"{len(state['listeners'])} listeners and {kept} children kept",
            event="upgraded",
            pause_ms=round(pause_ms, 1),
        )
        answer = {"ok": True, "pid": os.getpid(), "version": __version__}
        answer["pause_ms"] = round(pause_ms, 1)
        for fd in state["asked"]:
            with contextlib.suppress(OSError), socket.socket(fileno=fd) as conn:
                conn.setblocking(True)
                conn.settimeout(1.0)
                conn.sendall(json.dumps(answer).encode() + b"\n")
        for pid in state["workers"]:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)

    def exited(self, pid: int, status: int) -> bool:
        """A reaped pid of an image before (its probe, a worker, a child whose service left
        the file): True when it was one (a child's end is logged as any child's)."""
        what = self._quiet.pop(pid, None)
        if what is None:
            return False
        if what.endswith(" child"):
            code = os.waitstatus_to_exitcode(status)
            event(
                logging.INFO,
                f"{what[: -len(' child')]}: pid {pid} ended (exit {code}); its service was "
                "removed at an upgrade",
                event="end",
                pid=pid,
                status=code,
            )
        return True


def read_state() -> dict[str, Any] | None:
    """The state the image before handed over ($PYINETD_UPGRADE_STATE), or None; its fds are
    close-on-exec again before anything can start a process."""
    text = os.environ.pop(STATE_ENV, "")
    if not text.isdigit():
        return None
    fd = int(text)
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    finally:
        os.close(fd)
    state: dict[str, Any] = json.loads(b"".join(chunks))
    for kept in state["fds"]:
        with contextlib.suppress(OSError):
            os.set_inheritable(kept, False)
    return state
