"""The composition root: builds the parts, runs the loop, reloads, stops and drains.

One thread. loop.py owns the selector, the timers and the signal wake-up fd; services.py the
services' state and listeners; connections.py turns each arrival into a child (children.py,
which starts it through spawn.py), a built-in session or a refusal; children.py also reaps,
through one of two strategies (reaper.py). Signal handlers do nothing: the loop reads the
signal numbers from its wake-up fd and ``_on_signals`` dispatches them through SIGNALS.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import TYPE_CHECKING

from pyinetd import log, procsettings
from pyinetd.config import Config, ConfigError, load
from pyinetd.log import ThrottledLog, event
from pyinetd.runtime import frontpath, systemd
from pyinetd.runtime.agent import Agent
from pyinetd.runtime.children import KILL_GRACE, Child, Children
from pyinetd.runtime.connections import Connections
from pyinetd.runtime.listeners import ListenError, ListenKey
from pyinetd.runtime.loop import Loop, Timer
from pyinetd.runtime.metrics import Metrics
from pyinetd.runtime.pidfile import PidFile
from pyinetd.runtime.services import Services
from pyinetd.runtime.sessions import Sessions
from pyinetd.runtime.upgrade import Upgrade
from pyinetd.runtime.workers import Workers
from pyinetd.signals import HANDLED_SIGNALS, PYTHON_IGNORED, ignored_signals
from pyinetd.spawn import C_MODULE_BUILT, Spawner
from pyinetd.status import Operations, render_table, snapshot

if TYPE_CHECKING:
    import socket
    import ssl


class Server:
    """One pyinetd instance: the parts, and what the signals and the control socket ask."""

    def __init__(self, config: Config, worker: int = 0) -> None:
        self.config = config
        self.worker = worker  # 0: the first process; N: worker N (see workers.py)
        self.pid = os.getpid()
        self.started = time.monotonic()
        self.loop = loop = Loop()
        self.spawner = Spawner()
        self.child_metrics = Metrics()  # durations and exit classes, by service name
        throttled = ThrottledLog()
        table: dict[int, Child] = {}  # the children, by pid
        # Who calls whom: a listener's arrivals go to the connections (built below: the
        # lambdas); a child's, a session's and a worker's end come back here (the drain).
        self.services = services = Services(
            config=config,
            loop=loop,
            spawner=self.spawner,
            worker=worker,
            children=table,
            on_accept=lambda lst, mask: self.connections.on_accept(lst, mask),
            on_datagram=lambda lst, mask: self.connections.on_datagram(lst, mask),
        )
        self.children = Children(
            loop=loop,
            spawner=self.spawner,
            services=services,
            metrics=self.child_metrics,
            throttled=throttled,
            table=table,
            ended=self._child_ended,
            other_exited=lambda pid, st: (
                self._workers.exited(pid, st)
                or self.fronts.on_exit(pid, st)
                or self.upgrade.exited(pid, st)
            ),
            other_pids=lambda: [*self._workers.table, *self.fronts.pids()],
        )
        self._workers = Workers(
            loop=loop, services=services, track=self.children.track, drained=self._check_drained
        )
        self.sessions = Sessions(loop=loop, services=services, drained=self._check_drained)
        self.connections = Connections(
            config=config,
            loop=loop,
            services=services,
            children=self.children,
            sessions=self.sessions,
            throttled=throttled,
        )
        self.fronts = frontpath.build(self)  # the tls and redirect services' fronts
        self.agent = Agent(services=services, zygote_of=self.children.zygotes.describe)
        self.ops = Operations(
            snapshot=self.snapshot, reload=self.reload, stop=self._begin_stop, agent=self.agent
        )
        self._drain_timer: Timer | None = None
        self._pid = PidFile()
        self.upgrade = Upgrade(
            loop=loop,
            spawner=self.spawner,
            services=services,
            children=self.children,
            sessions=self.sessions,
            pending=self.connections.stages.pending,
            metrics=self.child_metrics,
            workers=self._workers,
            ops_servers=lambda: self.ops.servers,
            pidfile=self._pid,
            config=lambda: self.config,
            resume=self._sync_zygotes,
            started=self.started,
        )
        self.upgrade.carriers.append(self.fronts.carrier)
        self.ops.upgrade = self.upgrade.begin

    # ------------------------------------------------------------ start-up
    def bind(self) -> None:
        """Bind every enabled service's listeners (adopt those systemd socket activation
        handed over, and an upgrade's: upgrade.py); ListenError (nothing left bound) on failure."""
        self.services.bind(self.config, self.upgrade.listeners())

    def _install_signals(self) -> None:
        # Signals we were started with ignored (`pyinetd &` in a script ignores SIGINT and
        # SIGQUIT) stay ignored for pyinetd, through a handler that does nothing: exec resets
        # caught signals to their default, so no service inherits an ignored signal. Python's
        # own SIGPIPE and SIGXFSZ are reset by the spawn primitive.
        inherited = [s for s in ignored_signals() if s not in PYTHON_IGNORED]
        self.loop.install_signals((*HANDLED_SIGNALS, *inherited), self._on_signals)
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

    # ------------------------------------------------------------ the loop
    def run(self, pid_file: str | None = None, control_path: str | None = None) -> int:
        """Serve until SIGTERM/SIGINT; the exit code. ``control_path``: `--control`'s socket,
        before the config's `control_socket`."""
        procsettings.raise_nofile()  # before the first process starts (it gets the limit given)
        self._install_signals()
        self.started = self.upgrade.adopt(self.started)  # before the first reap (upgrade.py)
        self.children.reap()  # children left from before exec (e.g. by a wrapper script)
        self._sync_zygotes()
        if self.worker:
            event(logging.INFO, f"worker {self.worker}: listening", event="worker_ready")
        else:
            self.ops.start(self.config, control_path, self.loop.sel, self.loop.call_later)
            pid_file = pid_file or self.config.pid_file  # `pid_file:` was read, never used
            if pid_file:
                try:
                    self._pid.write(pid_file, self.pid)
                except OSError as exc:
                    reason = exc.strerror or str(exc)
                    event(logging.ERROR, f"pid file {pid_file}: {reason}", event="pid_file")
                    self._shutdown()
                    return 1
            self._workers.start()
            self._log_file_warnings()
            event(logging.INFO, f"listening: {self._describe()}", event="ready")
            systemd.notify("READY=1", f"STATUS={self._status_line()}")
            systemd.start_watchdog(self.loop.call_later)
            self.upgrade.finish()
        log.batching(True)
        try:
            self.loop.run(self.children.flush, self.connections.contain)
        finally:
            try:
                self._shutdown()
            finally:
                log.batching(False)
        return 0

    def _on_signals(self, signums: set[int]) -> None:
        """The loop read ``signums`` from its wake-up fd: dispatch them through SIGNALS."""
        # SIGCHLD coalesces, and a full wake-up buffer drops bytes: reap on every wake-up.
        self.children.reap()
        for sig, action in SIGNALS:
            if sig in signums and action(self, sig) is STOP:
                return

    def _on_stop_signal(self, sig: int) -> object:
        self.ops.stop(signal.Signals(sig).name)  # after agent_drain_time with an agent
        return STOP

    def _on_sighup(self, sig: int) -> object:
        if not self.services.stopping:
            self.reload()
        return None

    def _on_sigusr1(self, sig: int) -> object:
        self.dump_status()
        return None

    def _on_sigusr2(self, sig: int) -> object:
        self.upgrade.begin()  # upgrade.py: the program installed replaces this one, same pid
        return None

    # ------------------------------------------------------------ operations
    def snapshot(self) -> dict[str, object]:
        """The status, as plain data (status.py renders it)."""
        return snapshot(
            self.config,
            self.services.states,
            self.children.every(),
            (entry[0].state for entry in self.sessions.table.values()),
            self.child_metrics,
            self.pid,
            self.started,
            self._workers.table,
            self.children.zygotes.describe,
            self.fronts.describe,
        )

    def _status_line(self) -> str:
        states = self.services.states.values()
        refused = sum(sum(st.refused.values()) for st in states)
        accepted = sum(st.accepted for st in states)
        return (
            f"{len(self.config.enabled_services)} services, {len(self.children)} children, "
            f"{accepted} accepted, {refused} refused"
        )

    def dump_status(self) -> None:
        """SIGUSR1: write the status table to the log (like xinetd's dump)."""
        for line in render_table(self.snapshot()).splitlines():
            event(logging.INFO, f"status: {line}", event="status")

    def _begin_stop(self, why: str) -> None:
        """Stop listening; then leave at once, or drain the children first."""
        if self.services.stopping:
            event(logging.INFO, f"{why} again: stopping now", event="stop_now")
            self._workers.signal(signal.SIGTERM)
            self.loop.exit = True
            return
        systemd.notify("STOPPING=1")
        self.services.close_all()
        self.children.zygotes.stop()
        self.fronts.stop()
        self._workers.signal(signal.SIGTERM)  # each stops (leave or drain) as we do
        running = len(self.children) + len(self.sessions)
        if self.config.shutdown != "drain" or not (running or self._workers.table):
            event(logging.INFO, f"{why}: stopping", event="stopping")
            self.loop.exit = True
            return
        event(
            logging.INFO,
            f"{why}: draining {running} connections (up to {self.config.drain_timeout:g}s)",
            event="draining",
            running=running,
        )
        self._drain_timer = self.loop.call_later(self.config.drain_timeout, self._drain_expired)

    def _drain_expired(self) -> None:
        event(
            logging.WARNING,
            f"drain timeout: sending SIGTERM to {len(self.children)} children",
            event="drain_timeout",
        )
        self.sessions.close_all()
        self.children.signal_all(signal.SIGTERM)
        self._drain_timer = self.loop.call_later(KILL_GRACE, self._drain_kill)

    def _drain_kill(self) -> None:
        self.children.signal_all(signal.SIGKILL)
        self.loop.exit = True

    def _check_drained(self) -> None:
        idle = not (self.children or self.sessions or self._workers.table)
        if self.services.stopping and idle:
            if self._drain_timer is not None:
                self._drain_timer.cancel()
            self.loop.exit = True

    def _child_ended(self, child: Child) -> None:
        """A child's end is accounted for: the drain may be over, or a listener resumes."""
        self.fronts.program_ended(child.pid, child.exit_status)
        if self.services.stopping:
            self._check_drained()
            return
        self.services.child_ended(child.listener)

    def _describe(self) -> str:
        return ", ".join(
            f"{s.name} ({s.protocol} {' '.join(str(a) for a in s.listen)})"
            for s in self.config.enabled_services
        )

    def reload(self) -> list[str]:
        """Re-read the configuration file; on any error keep everything as it is (the errors)."""
        systemd.reloading()
        try:
            new = load(self.config.path)
            contexts = self.services.prepare(new)
            fresh = self.services.bind_new(new, self.services.listeners)
        except ConfigError as exc:
            errors = exc.lines  # 'file:line:column: key: message'
        except ListenError as exc:
            errors = new.located([f"{exc.source or self.config.path}: {exc}"])
        else:
            self._apply(new, fresh, contexts)
            if not self.worker:
                self._workers.reload()
                self._log_file_warnings()
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

    def _log_file_warnings(self) -> None:
        """Config.warnings (a file its user can change failed a service): warned at each load."""
        for line in self.config.warnings:
            event(logging.WARNING, line, event="service_file")

    def _apply(
        self,
        new: Config,
        fresh: dict[ListenKey, socket.socket],
        contexts: dict[str, ssl.SSLContext],
    ) -> None:
        """Switch every part to ``new``; nothing here may fail."""
        self.config = new
        if new.reload_kills_removed:
            self.children.kill_removed({svc.name for svc in new.enabled_services})
        self.services.apply(new, fresh, contexts)
        self.connections.configure(new)
        self._sync_zygotes()

    def _sync_zygotes(self) -> None:
        """A zygote for each warm service this process listens for (warm.py)."""
        served = {lst.service.name: lst.service for lst in self.services.listeners.values()}
        self.children.zygotes.sync(served.values())
        self.fronts.sync(self.config, served.values())

    def _shutdown(self) -> None:
        if not self.services.stopping:
            self._begin_stop("exit")
        self.ops.close()
        self.sessions.close_all()
        self.connections.close_pending()
        for state in self.services.states.values():
            if state.stderr_log is not None:
                state.stderr_log.close()
                state.stderr_log = None
        self.children.close()
        self.fronts.kill_all()
        self._pid.remove()
        self.spawner.close()
        if self.children:
            event(
                logging.INFO,
                f"exiting; {len(self.children)} children left to finish on their own",
                event="exit",
                children=len(self.children),
            )
        self.loop.close()


STOP = object()  # a signal's action returns it: the others of this wake-up are not looked at
# What each signal does, in this order (a stop signal first: the others wait for no one).
SIGNALS = (
    (signal.SIGTERM, Server._on_stop_signal),
    (signal.SIGINT, Server._on_stop_signal),
    (signal.SIGHUP, Server._on_sighup),
    (signal.SIGUSR1, Server._on_sigusr1),
    (signal.SIGUSR2, Server._on_sigusr2),
)
