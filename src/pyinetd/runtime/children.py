"""The children table: starting a service's program, its timeout and their escalation,
exit accounting, and reaping through one of two strategies (reaper.py).

A child is started here (through spawn.py) for a connection, a datagram or a wait-mode
listener; what follows its end (a listener resumes, the drain ends) is told to the callables
handed in at construction.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pyinetd import fsuser
from pyinetd.config import Service
from pyinetd.log import LOG, ThrottledLog, event
from pyinetd.runtime import reaper
from pyinetd.runtime.arrival import Arrival
from pyinetd.runtime.loop import Loop, Timer
from pyinetd.runtime.metrics import Metrics
from pyinetd.runtime.reaper import Exited, Usage
from pyinetd.runtime.services import Listener, Services, ServiceState, Slot, SlotKind, Wait
from pyinetd.runtime.stages import UDPReply
from pyinetd.runtime.stderrlog import StderrLog
from pyinetd.runtime.warm import Ticket, Zygotes
from pyinetd.sandbox import cgroupnet
from pyinetd.spawn import Spawner
from pyinetd.spawn.environ import UserGone, env_dict

KILL_GRACE = 5.0  # seconds between a timeout's SIGTERM and its SIGKILL
# A UDP child's reply socket is closed this long after the child is reaped, even when a
# process it left behind still holds its stdout (else 1,050 datagrams to such a service take
# the parent from 12 to 1,019 fds, outside every limit).
UDP_REPLY_GRACE = 1.0


PENDING = -1  # start(): a zygote was asked for the process; its pid comes later


class ChildState(enum.Enum):
    """Where a service process is in its life; each holds the service's slot until reaped."""

    ASKED = "asked"  # a zygote was asked for it: no pid yet
    RUNNING = "running"
    TERMINATING = "terminating"  # SIGTERM sent (its timeout, the drain's end, a reload)
    KILLED = "killed"  # SIGKILL sent (KILL_GRACE after the SIGTERM, or the drain's end)
    STUCK = "stuck"  # KILL_GRACE after its SIGKILL, not reaped yet: state D, or not ours


# The moves a child makes (Child.change_state). TERMINATING again: a second SIGTERM for
# another reason (its timeout after a reload's SIGTERM), which restarts the escalation.
_MOVES = {
    ChildState.ASKED: {ChildState.RUNNING},
    ChildState.RUNNING: {ChildState.TERMINATING, ChildState.KILLED},
    ChildState.TERMINATING: {ChildState.TERMINATING, ChildState.KILLED},
    ChildState.KILLED: {ChildState.STUCK},
    ChildState.STUCK: set(),
}


@dataclass
class Child:
    """A service process, from its start (or the zygote asked for it) until it is reaped."""

    pid: int  # 0 while ASKED
    state: ServiceState
    peer: str
    started: float
    listener: Listener | None = None  # wait mode: the listener to resume when this exits
    slot: Slot | None = None  # its place under the limits, from its start (or request)
    timer: Timer | None = None  # timeout, then each step of its escalation
    lifecycle: ChildState = ChildState.RUNNING  # changed by change_state only
    why: str = ""  # what sent its SIGTERM or SIGKILL: timeout, drain, removed
    local: str = ""  # the address it was accepted on, where the service listens on several
    exit_status: int | None = None  # its wait status, once reaped

    def change_state(self, new: ChildState, why: str = "") -> None:
        """The one place a child's lifecycle state changes. A move outside _MOVES is a bug,
        logged at error; the new state is still taken (it is what the signal did)."""
        if new not in _MOVES[self.lifecycle]:
            LOG.error(
                "bug: %s: pid %d: state %s -> %s",
                self.state.service.name,
                self.pid,
                self.lifecycle.value,
                new.value,
            )
        self.lifecycle = new
        if why:
            self.why = why

    def send_signal(self, sig: int, why: str) -> None:
        """SIGTERM or SIGKILL to the child and its group, its state moved on: a child already
        further on (killed, stuck) keeps its state, and a SIGTERM keeps the reason of the
        one before (the timeout's escalation goes on)."""
        _kill_group(self.pid, sig)
        why = self.why or why  # a timeout's escalation stays the timeout's (its metrics)
        if sig == signal.SIGKILL:
            if self.lifecycle in (ChildState.RUNNING, ChildState.TERMINATING):
                self.change_state(ChildState.KILLED, why)
        elif self.lifecycle is ChildState.RUNNING:
            self.change_state(ChildState.TERMINATING, why)


@dataclass
class Awaiting:
    """A connection whose process was asked of a zygote, until its answer."""

    child: Child  # ASKED (pid 0) until then
    held: int  # our copy of the connection's fd (its stdin and stdout), for a cold start
    arrival: Arrival


class ChildStderr:
    """What a child gets as its stderr, by its service's `stderr:`; the fds made once."""

    def __init__(self, *, loop: Loop) -> None:
        self._loop = loop
        self._devnull = -1  # `stderr: null`, opened once

    def fd(self, state: ServiceState, conn: int | None) -> tuple[int, bool]:
        """The fd for the child's stderr, and whether it is ours to close after the spawn.

        Only a `stderr: FILE` opens anything per connection (so that a rotated log file is
        followed); `log` and `null` use fds made once, `socket` the connection itself.
        """
        mode = state.service.stderr
        if mode == "log":
            if state.stderr_log is None:
                svc = state.service
                state.stderr_log = StderrLog(
                    svc.name, self._loop.sel, svc.stderr_rate, self._loop.call_later
                )
            return state.stderr_log.fileno(), False
        if mode == "socket" and conn is not None:
            return conn, False
        if mode in ("null", "socket"):
            if self._devnull < 0:
                self._devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            return self._devnull, False
        # Opened with the service user's rights: that user may own the folder and swap the
        # file for a symlink to a root file, which root would append to.
        svc = state.service
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        return fsuser.open_as(svc.user, svc.group, mode, flags, 0o640), True

    def close(self) -> None:
        """At exit: the fd held for `stderr: null`."""
        if self._devnull >= 0:
            os.close(self._devnull)
            self._devnull = -1


class Children:
    """Every running service process, by pid."""

    def __init__(
        self,
        *,
        loop: Loop,
        spawner: Spawner,
        services: Services,
        metrics: Metrics,
        throttled: ThrottledLog,
        table: dict[int, Child],
        ended: Callable[[Child], None],
        other_exited: Callable[[int, int], bool],
        other_pids: Callable[[], Iterable[int]],
    ) -> None:
        self._loop = loop
        self._spawner = spawner
        self._services = services
        self._metrics = metrics  # durations and exit classes, by service name
        self._throttled = throttled
        self._ended = ended  # after a child's end is accounted for
        self._other_exited = other_exited  # a pid that is no child of ours (a worker)?
        self._other_pids = other_pids  # pids the exit watcher must watch too (workers)
        self.table = table  # shared with Services, which counts it for max_children
        self._udp_replies: dict[int, UDPReply] = {}  # pid of a UDP nowait child -> its reply
        self._stderr = ChildStderr(loop=loop)  # the fds children get as their stderr
        self._orphan_groups: set[int] = set()  # reaped leaders whose group outlives them
        self._reaping = reaper.Reaping(
            sel=loop.sel,
            call_later=loop.call_later,
            handle=self.on_reaped,
            pids=lambda: (*self.table, *self._other_pids(), *self.zygotes.pids()),
            count=lambda: len(self.table),
            say=lambda level, msg, pid: event(
                level, msg, event="watcher", **({"pid": pid} if pid else {})
            ),
        )
        # `warm: true` services' zygotes (warm.py): they fork children of ours
        self.zygotes = Zygotes(
            spawner=spawner,
            stderr_for=lambda svc: self._stderr.fd(services.states[svc.name], None),
            sel=loop.sel,
            call_later=loop.call_later,
            track=self.track,
            replied=self._warm_replied,
            is_ours=self._is_reaped_child,
            is_tracked=self.table.__contains__,
        )
        self._awaiting: dict[Ticket, Awaiting] = {}  # asked of a zygote, no pid yet
        # pid -> (status, usage): reaped before its pid came
        self._reaped_early: dict[int, tuple[int, Usage]] = {}

    def __len__(self) -> int:
        """Running children, and those asked of a zygote whose pid has not come yet."""
        return len(self.table) + len(self._awaiting)

    def every(self) -> list[Child]:
        """Every child holding a slot, in any state: the table's, then those ASKED."""
        return [*self.table.values(), *(entry.child for entry in self._awaiting.values())]

    def udp_replies(self) -> dict[int, UDPReply]:
        """The replies of UDP nowait children, by pid (what `pyinetd upgrade` hands over)."""
        return self._udp_replies

    # ------------------------------------------------------------ start
    def start(self, arrival: Arrival) -> int:
        """Spawn the service's program for ``arrival``: its pid; PENDING when the service's
        zygote was asked for it (its pid comes with the answer, ``_warm_replied``; the slot is
        held from now); 0 when it could not start. A UDP nowait child's reply is closed soon
        after the child's end (at once when there is no child)."""
        state = arrival.state
        if state.service.warm and arrival.stdout < 0 and self._ask_zygote(arrival):
            return PENDING
        pid = self._spawn(arrival, arrival.fd)
        if not pid:
            if arrival.reply is not None:
                arrival.reply.close()
            return 0
        child = Child(pid, state, arrival.peer, time.monotonic(), arrival.listener)
        child.local = local_of(state.service, arrival.local)
        self._running(child, arrival.reply)
        child.slot = self._services.take_slot(state, arrival.src, SlotKind.CHILD)
        return pid

    def _spawn(self, arrival: Arrival, fd: int) -> int:
        """Start the program (by exec, or the relay) with ``fd`` on its stdin and stdout (the
        arrival's, or our copy of it after a zygote failed it); its pid, or 0 (said and
        counted)."""
        state, peer = arrival.state, arrival.peer
        svc = state.service
        conn_fd = fd if arrival.conn is not None else None
        try:
            err_fd, owned = self._stderr.fd(state, conn_fd)
        except OSError as exc:
            state.spawn_failed("stderr")
            self.spawn_error(svc, peer, f"stderr {svc.stderr}: {exc.strerror or exc}")
            return 0
        try:
            if svc.needs_relay and arrival.stdout < 0:  # (a front's program: by exec)
                full_env = {**self._spawner.base_environ(svc), **env_dict(arrival.env)}
                ctx = state.tls_context
                report = arrival.report
                return self._spawner.relay(svc, fd, err_fd, full_env, ctx, peer, report)
            out = arrival.stdout if arrival.stdout >= 0 else fd
            return self._spawner.spawn(svc, fd, out, err_fd, arrival.env)
        except UserGone as exc:
            # Deleted after load: one line a minute, not a traceback per connection (18.16).
            state.spawn_failed("user_gone")
            self.spawn_error(svc, peer, f"cannot start: {exc.strerror}")
            return 0
        except OSError as exc:
            state.spawn_failed(errno_name(exc.errno))
            log_exec_error(svc, exc.strerror or str(exc), peer)
            return 0
        finally:
            if owned:
                os.close(err_fd)

    def _running(self, child: Child, reply: UDPReply | None) -> None:
        """``child`` has its pid: into the table, its timeout set, its reaping arranged."""
        pid = child.pid
        svc = child.state.service
        if svc.timeout:
            child.timer = self._loop.call_later(svc.timeout, lambda: self.on_timeout(pid))
        self.table[pid] = child
        if reply is not None:
            self._udp_replies[pid] = reply
        if child.listener is not None:
            child.listener.change_wait(Wait.on(pid))
        self.track(pid)
        if LOG.isEnabledFor(logging.INFO):
            where = {"local": child.local} if child.local else {}
            event(
                logging.INFO,
                f"{svc.name}: {child.peer} -> pid {pid}" + (f" on {child.local}" if where else ""),
                event="start",
                service=svc.name,
                peer=child.peer,
                pid=pid,
                **where,
            )

    def stderr_of(self, state: ServiceState) -> tuple[int, bool]:
        """The stderr a long-lived process of the service gets (a zygote, a front)."""
        return self._stderr.fd(state, None)

    # ------------------------------------------------------------ warm: the zygote's answers
    def _ask_zygote(self, arrival: Arrival) -> bool:
        """Ask the service's zygote for the arrival's process and hold its slot until the
        answer; False when there is no zygote ready (start it cold now)."""
        state, fd = arrival.state, arrival.fd
        try:
            err_fd, owned = self._stderr.fd(state, fd if arrival.conn is not None else None)
        except OSError:
            return False  # the cold start meets the same error, and says it
        try:
            ticket = self.zygotes.ask(arrival, err_fd)
        finally:
            if owned:
                os.close(err_fd)
        if ticket is None:
            return False
        # Our own copy of the connection, for a cold start if no process comes of the request.
        try:
            held = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
        except OSError:
            held = -1  # (out of fds: then the client is closed if the zygote fails it)
        child = Child(
            0, state, arrival.peer, time.monotonic(), arrival.listener, lifecycle=ChildState.ASKED
        )
        child.local = local_of(state.service, arrival.local)
        self._awaiting[ticket] = Awaiting(child, held, arrival)
        child.slot = self._services.take_slot(state, arrival.src, SlotKind.CHILD)
        return True

    def _warm_replied(self, ticket: Ticket, pid: int | None, why: str) -> None:
        """The zygote answered a request: the process's pid, or None (then start it cold)."""
        entry = self._awaiting.pop(ticket, None)
        if entry is None:
            return
        child, held, reply = entry.child, entry.held, entry.arrival.reply
        if pid is None:
            self.zygotes.note_cold(ticket[0], why)
            if held >= 0:
                pid = self._spawn(entry.arrival, held)
        if held >= 0:
            os.close(held)
        if not pid:  # the slot taken at the request is given back, as at a child's end
            self._services.free_slot(child.slot)
            if reply is not None:
                reply.close()
            self._ended(child)
            return
        child.pid = pid
        child.change_state(ChildState.RUNNING)
        self._running(child, reply)
        early = self._reaped_early.pop(pid, None)
        if early is not None:  # it ended before its pid was read
            self.on_reaped([(pid, *early)])

    def _is_reaped_child(self, pid: int) -> bool:
        return pid in self._reaped_early

    def spawn_error(self, svc: Service, peer: str, what: str) -> None:
        """Log a failed start; the same failure repeating is logged once a minute."""
        self._throttled(
            f"{svc.name} spawn {what}",
            logging.ERROR,
            f"{svc.name}: {what}; closing {peer}",
            event="spawn_error",
            service=svc.name,
            peer=peer,
            error=what,
        )

    def signal_all(self, sig: int) -> None:
        """Send ``sig`` (SIGTERM or SIGKILL) to every child and its group (drain's end)."""
        for child in list(self.table.values()):
            child.send_signal(sig, "drain")

    def kill(self, pid: int) -> None:
        """SIGKILL child ``pid`` and its group while it is ours (a reaped pid may be reused)."""
        child = self.table.get(pid)
        if child is not None:
            child.send_signal(signal.SIGKILL, "handshake")

    def kill_removed(self, enabled: set[str]) -> None:
        """`reload_kills_removed`: SIGTERM to the children of services no longer enabled."""
        for child in list(self.table.values()):
            if child.state.service.name not in enabled:
                child.send_signal(signal.SIGTERM, "removed")

    def close(self) -> None:
        """At exit: the fds held for children; the exit watcher exits when its pipe closes."""
        self._stderr.close()
        self._reaping.stop(reap=False)

    # ------------------------------------------------------------ reaping
    def reap(self) -> None:
        """At every wake-up (SIGCHLD coalesces): reap, unless the exit watcher reports."""
        self._reaping.on_wakeup()

    def flush(self) -> None:
        """Before each select: pids to the exit watcher (reaper.Reaping)."""
        self._reaping.flush()

    def track(self, pid: int) -> None:
        """A child started: its pid to the exit watcher, or one started if they are many."""
        self._reaping.track(pid)

    def on_reaped(self, exited: Exited) -> None:
        """Account for reaped (pid, status, usage): stderr first, then each end."""
        if not exited:
            return
        # What the children wrote to stderr before they exited is logged before their end.
        drained: set[StderrLog] = set()
        for pid, _status, _usage in exited:
            child = self.table.get(pid)
            stderr_log = child.state.stderr_log if child is not None else None
            if stderr_log is not None:
                if stderr_log not in drained:
                    drained.add(stderr_log)
                    stderr_log.drain()
                stderr_log.ended(pid)
        for pid, wstatus, usage in exited:
            self._account(pid, wstatus, usage)
        # A replaced sandbox's cgroup (network: loopback), removed once its last process (a
        # child, a zygote) has gone.
        if cgroupnet.STALE:
            cgroupnet.sweep_cgroups()

    def _account(self, pid: int, status: int, usage: Usage) -> None:
        """``pid`` was reaped: free its slot, account for its end, tell whoever waits."""
        if self._other_exited(pid, status):
            return  # a worker
        child = self.table.pop(pid, None)
        if child is None:
            if self.zygotes.on_exit(pid, status):
                return
            if self._awaiting:  # a zygote's fork whose pid is not read yet (warm.py)
                if len(self._reaped_early) >= len(self._awaiting) + 64:
                    del self._reaped_early[next(iter(self._reaped_early))]
                self._reaped_early[pid] = (status, usage)
                return
            LOG.debug("reaped unknown pid %d", pid)  # gunicorn #3566: not an error
            return
        if child.timer is not None:
            if _group_alive(pid):
                # The service left processes behind in its group (a grandchild still holding
                # the connection): the timeout still applies to them.
                self._orphan_groups.add(pid)
            else:
                child.timer.cancel()
        state = child.state
        child.exit_status = status
        self._services.free_slot(child.slot)
        reply = self._udp_replies.pop(pid, None)
        if reply is not None and not reply.closed:
            self._loop.call_later(UDP_REPLY_GRACE, reply.finish)
        err = self._spawner.exec_error(pid, status)
        if err is None:
            duration = time.monotonic() - child.started
            timed_out = child.why == "timeout"
            self._metrics.child_ended(state.service.name, duration, status, timed_out)
        if err is not None:  # clone and fork-path children report exec errors late
            state.spawn_failed(errno_name(err))
            log_exec_error(state.service, os.strerror(err), child.peer)
        elif LOG.isEnabledFor(logging.INFO):  # formatting costs even when nothing is logged
            log_end(child, pid, status, usage)
        self._ended(child)

    def on_timeout(self, pid: int) -> None:
        """A child's timeout (or its escalation) is due: SIGTERM, then SIGKILL, then say so."""
        child = self.table.get(pid)
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
                    self._loop.call_later(KILL_GRACE, lambda: _kill_orphan(pid, self.table))
            return
        name = child.state.service.name
        if child.why != "timeout":  # RUNNING, or signalled for another reason meanwhile
            if child.lifecycle in (ChildState.KILLED, ChildState.STUCK):
                return  # SIGKILL sent at the drain's end: the loop exits now
            child.change_state(ChildState.TERMINATING, "timeout")
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
            child.timer = self._loop.call_later(KILL_GRACE, lambda: self.on_timeout(pid))
        elif child.lifecycle is ChildState.TERMINATING:
            child.change_state(ChildState.KILLED)
            event(
                logging.WARNING,
                f"{name}: pid {pid} still running {KILL_GRACE}s after SIGTERM; sending SIGKILL",
                event="timeout_kill",
                service=name,
                pid=pid,
            )
            _kill_group(pid, signal.SIGKILL)
            # Check that it died: a service that has left its group survives a killpg
            # while "sending SIGKILL" is logged, and would keep its max_connections slot.
            child.timer = self._loop.call_later(KILL_GRACE, lambda: self.on_timeout(pid))
        elif child.lifecycle is ChildState.KILLED:
            # Still not reaped: stuck in the kernel (state D) or a pid we cannot signal.
            child.change_state(ChildState.STUCK)
            event(
                logging.ERROR,
                f"{name}: pid {pid} survived SIGKILL for {KILL_GRACE}s; its slot stays taken",
                event="timeout_unkillable",
                service=name,
                pid=pid,
            )
            child.timer = None


def _group_alive(pgid: int) -> bool:
    """True when process group ``pgid`` still has members."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


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


def errno_name(number: int | None) -> str:
    """ENOENT for 2: the reason a spawn failed, as metrics and status count it."""
    return errno.errorcode.get(number or 0, "error")


def log_exec_error(svc: Service, why: str, peer: str) -> None:
    """Log a program that could not start."""
    event(
        logging.ERROR,
        f"{svc.name}: cannot start {svc.program}: {why}; closing {peer}",
        event="spawn_error",
        service=svc.name,
        peer=peer,
        error=why,
    )


def local_of(svc: Service, local: tuple[str, int] | None) -> str:
    """Where a connection came in (its arrival's local address), for the start line of a
    service that listens on several addresses; "" when it listens on one."""
    if len(svc.listen) < 2 or local is None or not local[0]:
        return ""
    host, port = local
    return (f"[{host}]" if ":" in host else host) + f":{port}"


def log_end(child: Child, pid: int, status: int, usage: Usage) -> None:
    """Log a child's end: how, after how long, its CPU time and peak memory."""
    code = os.waitstatus_to_exitcode(status)
    how = f"exit {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
    duration = time.monotonic() - child.started
    event(
        logging.INFO,
        f"{child.state.service.name}: pid {pid} ended ({how}) after {duration:.3f}s, "
        f"{usage.cpu_ms:.1f} ms CPU, {usage.max_rss_kib:,} KiB",
        event="end",
        service=child.state.service.name,
        pid=pid,
        peer=child.peer,
        status=code,
        duration=round(duration, 6),
        cpu_ms=usage.cpu_ms,
        max_rss_kib=usage.max_rss_kib,
    )
