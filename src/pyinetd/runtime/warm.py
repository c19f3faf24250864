"""This process's warm services: one zygote each (zygote.py), started, replaced and stopped with
its service, asked for each connection's process.

The server hands in what a zygote needs when this is built (a service's base environment, its
stderr fd, the selector, ``call_later``, a way to tell the exit watcher about a pid) and calls
four things: ``sync`` after a (re)load, ``ask`` per connection (None: serve it cold), ``on_exit``
for a reaped pid it does not know, ``stop`` at shutdown. The answer to ``ask`` comes later, to
``replied``: the loop never waits for a zygote.
"""

from __future__ import annotations

import logging
import os
import selectors
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

from pyinetd import log, spawn
from pyinetd.config import Service
from pyinetd.spawn import environ
from pyinetd.zygote import (
    BACKOFF,
    FAILED,
    READY,
    REPLY_TIMEOUT,
    STARTING,
    Zygote,
    ZygoteUnavailable,
    is_child,
    script_id,
)

if TYPE_CHECKING:
    from pyinetd.runtime.arrival import Arrival

RETIRE_DEADLINE = 2.0  # seconds a replaced zygote has to exit before it is killed


class _Timer(Protocol):
    def cancel(self) -> None: ...


Ticket = tuple[Zygote, int]  # a request: the zygote asked, and the request's number


class Zygotes:
    """The zygotes of the warm services this process serves, by service name."""

    def __init__(
        self,
        *,
        spawner: spawn.Spawner,
        stderr_for: Callable[[Service], tuple[int, bool]],
        sel: selectors.BaseSelector,
        call_later: Callable[[float, Callable[[], None]], _Timer],
        track: Callable[[int], None],
        replied: Callable[[Ticket, int | None, str], None],
        is_ours: Callable[[int], bool],
        is_tracked: Callable[[int], bool],
    ) -> None:
        self._spawner = spawner
        self._stderr_for = stderr_for
        self._sel = sel
        self._call_later = call_later
        self._track = track
        self._by_name: dict[str, Zygote] = {}
        # `warm_max_forks`: the zygote starting to replace the service's, until it is ready
        self._successors: dict[str, Zygote] = {}
        self._replaced: dict[str, int] = {}  # replacements by service name, for `status`
        self._by_pid: dict[int, Zygote] = {}  # every zygote process not reaped yet
        self._fds: dict[Zygote, int] = {}  # channels registered with the selector
        self._timers: dict[Zygote, _Timer] = {}
        self._expiry: dict[Zygote, _Timer] = {}  # zygotes with requests not answered yet
        # where the answers to ``ask`` go: (ticket, pid or None: serve it cold, why)
        self._replied = replied
        # whether a pid is pyinetd's child (the children table knows those reaped early)
        self._is_ours = is_ours
        # whether a pid has a slot already (the children table's running processes)
        self._is_tracked = is_tracked

    # ------------------------------------------------------------------ lifecycle
    def sync(self, services: Iterable[Service]) -> None:
        """After a (re)load: a zygote for each warm service given; one whose service changed,
        or whose script was edited (inode, mtime), is replaced (its running connections go
        on), and one that failed is tried again (a module installed since); those of services
        gone are stopped."""
        wanted = {svc.name: svc for svc in services if svc.warm and svc.enabled}
        for z in list(self._successors.values()):  # (started again after the next fork)
            self._retire(z)
        for name, z in list(self._by_name.items()):
            svc = wanted.get(name)
            if (
                svc is None
                or svc != z.service
                or script_id(z.script) != z.script_id
                or z.state == FAILED
            ):
                self._retire(z)
        for name, svc in wanted.items():
            if name not in self._by_name:
                self._start(svc)

    def _start(self, svc: Service, successor: bool = False) -> None:
        try:
            base = self._spawner.base_environ(svc)
        except environ.UserGone as exc:
            self._say(logging.WARNING, f"{svc.name}: zygote: {exc.strerror}; serving cold")
            return
        env = {k: v for k, v in base.items() if k not in environ.CONNECTION_KEYS}
        try:
            err, owned = self._stderr_for(svc)
        except OSError as exc:
            self._say(logging.WARNING, f"{svc.name}: zygote: stderr: {exc}; serving cold")
            return
        try:
            z = Zygote(
                svc,
                env,
                err,
                say=self._say,
                start_process=self._spawner.zygote,
                replied=lambda n, pid, why: self._replied((z, n), pid, why),
                is_ours=lambda pid: self._is_ours(pid) or is_child(pid),
                is_tracked=lambda pid: pid in self._by_pid or self._is_tracked(pid),
            )
        except (ValueError, OSError) as exc:  # the script changed since the load
            self._say(logging.WARNING, f"{svc.name}: zygote: {exc}; serving cold")
            return
        (self._successors if successor else self._by_name)[svc.name] = z
        try:
            z.start()
        finally:
            if owned:
                os.close(err)
        self._after(z)

    def _retire(self, z: Zygote) -> None:
        for zygotes in (self._by_name, self._successors):
            if zygotes.get(z.service.name) is z:
                del zygotes[z.service.name]
        for timers in (self._timers, self._expiry):
            timer = timers.pop(z, None)
            if timer is not None:
                timer.cancel()
        self._unregister(z)
        z.stop()  # it exits at the Q (or at the channel's end); on_exit reaps it
        if z.pid is not None:
            # One stopped (SIGSTOP, by its own user) never reads either: without a deadline
            # it would outlive the reload that replaced it, and pyinetd. (Once reaped, its
            # pid is None: a late kill names no other process.)
            self._call_later(RETIRE_DEADLINE, z.kill)

    def stop(self) -> None:
        """At shutdown: every zygote told to exit, and killed (pyinetd leaves before a
        retired zygote's deadline)."""
        for z in [*self._successors.values(), *self._by_name.values()]:
            self._retire(z)
            z.kill()

    def _after(self, z: Zygote) -> None:
        """Follow a zygote's state: its process tracked, its channel watched, its restart
        timed, its replacement started (`warm_max_forks`) and, once that one is no longer
        starting, put in its place."""
        name = z.service.name
        if self._successors.get(name) is z and z.state != STARTING:
            self._take_over(z)
        elif (
            self._by_name.get(name) is z
            and 0 < z.service.warm_max_forks <= z.process_forks
            and z.state == READY
            and name not in self._successors
        ):
            self._start(z.service, successor=True)
        if z.pid is not None and z.pid not in self._by_pid:
            self._by_pid[z.pid] = z
            self._track(z.pid)
        fd = z.fileno()
        if self._fds.get(z) != fd:
            self._unregister(z)
            if fd >= 0:
                self._sel.register(fd, selectors.EVENT_READ, lambda mask: self._readable(z))
                self._fds[z] = fd
        if z.state == BACKOFF and z not in self._timers and self._by_name.get(z.service.name) is z:
            delay = max(0.0, z.retry_at - z.now())
            self._timers[z] = self._call_later(delay, lambda: self._restart(z))

    def _take_over(self, new: Zygote) -> None:
        """The successor serves from now on (ready; or failed, then as any zygote that failed:
        cold, restarted after its backoff); the zygote it replaces goes on serving until then,
        so that no connection waits for an interpreter's start."""
        name = new.service.name
        del self._successors[name]
        old = self._by_name.get(name)
        self._by_name[name] = new
        self._replaced[name] = self._replaced.get(name, 0) + 1
        if old is not None:
            new.forks += old.forks
            self._say(
                logging.INFO,
                f"{name}: zygote {old.pid} replaced by {new.pid} after {old.process_forks} "
                f"forks (warm_max_forks {new.service.warm_max_forks})",
            )
            self._retire(old)

    def _unregister(self, z: Zygote) -> None:
        fd = self._fds.pop(z, None)
        if fd is not None:
            self._sel.unregister(fd)

    def _readable(self, z: Zygote) -> None:
        z.on_readable()
        self._after(z)

    def _restart(self, z: Zygote) -> None:
        self._timers.pop(z, None)
        if self._by_name.get(z.service.name) is z:
            z.tick()
            self._after(z)

    def on_exit(self, pid: int, status: int) -> bool:
        """A reaped pid: True if it was a zygote's (then restarted later, unless retired)."""
        z = self._by_pid.pop(pid, None)
        if z is None:
            return False
        z.on_exit(pid, status)
        self._after(z)
        return True

    # ------------------------------------------------------------------ per connection
    def ask(self, arrival: Arrival, stderr: int) -> Ticket | None:
        """Ask the arrival's service's zygote for its process (the arrival's fd on its stdin
        and stdout, ``stderr`` on its stderr), without waiting: its pid comes to ``replied``
        with the returned ticket (or None there: serve it cold then). None here when no
        zygote is ready (serve it cold now: one log line per outage, never a refusal)."""
        svc = arrival.state.service
        z = self._by_name.get(svc.name)
        if z is None:
            return None
        try:
            number = z.send(arrival.env, (arrival.fd, arrival.fd, stderr))
        except ZygoteUnavailable as exc:
            self.note_cold(z, str(exc))
            return None
        finally:
            self._after(z)
        if z not in self._expiry:
            self._expiry[z] = self._call_later(REPLY_TIMEOUT, lambda: self._expire(z))
        return (z, number)

    def note_cold(self, z: Zygote, why: str) -> None:
        note = z.cold_note()
        if note is not None:
            self._say(logging.INFO, f"{note} ({why})")

    def _expire(self, z: Zygote) -> None:
        self._expiry.pop(z, None)
        z.expire()
        self._after(z)
        due = z.next_deadline()
        if due is not None:
            delay = max(0.0, due - z.now())
            self._expiry[z] = self._call_later(delay, lambda: self._expire(z))

    def pids(self) -> list[int]:
        """The zygote processes not reaped yet (the exit watcher watches them too)."""
        return list(self._by_pid)

    def describe(self, name: str) -> dict[str, object] | None:
        """The service's zygote for `pyinetd status`, or None."""
        z = self._by_name.get(name)
        if z is None:
            return None
        out = z.describe()
        if z.service.warm_max_forks:
            out["max_forks"] = z.service.warm_max_forks
            out["process_forks"] = z.process_forks
            out["replaced"] = self._replaced.get(name, 0)
        return out

    @staticmethod
    def _say(level: int, msg: str) -> None:
        log.event(level, msg, event="zygote")
