"""This process's warm services: one zygote each (zygote.py), started, replaced and stopped with
its service, asked for each connection's process.

The server hands in what a zygote needs when this is built (a service's base environment, its
stderr fd, the selector, ``call_later``, a way to tell the exit watcher about a pid) and calls
four things: ``sync`` after a (re)load, ``spawn`` per connection (0: serve it cold), ``on_exit``
for a reaped pid it does not know, ``stop`` at shutdown.
"""

from __future__ import annotations

import logging
import os
import selectors
from collections.abc import Callable, Iterable
from typing import Protocol

from pyinetd import log, spawn
from pyinetd.config import Service
from pyinetd.zygote import BACKOFF, FAILED, Zygote, ZygoteUnavailable, script_id


class _Timer(Protocol):
    cancelled: bool


class Zygotes:
    """The zygotes of the warm services this process serves, by service name."""

    def __init__(
        self,
        spawner: spawn.Spawner,
        stderr_for: Callable[[Service], tuple[int, bool]],
        sel: selectors.BaseSelector,
        call_later: Callable[[float, Callable[[], None]], _Timer],
        track: Callable[[int], None],
    ) -> None:
        self._spawner = spawner
        self._stderr_for = stderr_for
        self._sel = sel
        self._call_later = call_later
        self._track = track
        self._by_name: dict[str, Zygote] = {}
        self._by_pid: dict[int, Zygote] = {}  # every zygote process not reaped yet
        self._fds: dict[Zygote, int] = {}  # channels registered with the selector
        self._timers: dict[Zygote, _Timer] = {}

    # ------------------------------------------------------------------ lifecycle
    def sync(self, services: Iterable[Service]) -> None:
        """After a (re)load: a zygote for each warm service given; one whose service changed,
        or whose script was edited (inode, mtime), is replaced (its running connections go
        on), and one that failed is tried again (a module installed since); those of services
        gone are stopped."""
        wanted = {svc.name: svc for svc in services if svc.warm and svc.enabled}
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

    def _start(self, svc: Service) -> None:
        try:
            base = self._spawner.base_environ(svc)
        except spawn.UserGone as exc:
            self._say(logging.WARNING, f"{svc.name}: zygote: {exc.strerror}; serving cold")
            return
        env = {k: v for k, v in base.items() if k not in spawn.CONNECTION_KEYS}
        try:
            err, owned = self._stderr_for(svc)
        except OSError as exc:
            self._say(logging.WARNING, f"{svc.name}: zygote: stderr: {exc}; serving cold")
            return
        try:
            z = Zygote(svc, env, err, say=self._say, start_process=self._spawner.zygote)
        except (ValueError, OSError) as exc:  # the script changed since the load
            self._say(logging.WARNING, f"{svc.name}: zygote: {exc}; serving cold")
            return
        self._by_name[svc.name] = z
        try:
            z.start()
        finally:
            if owned:
                os.close(err)
        self._after(z)

    def _retire(self, z: Zygote) -> None:
        self._by_name.pop(z.service.name, None)
        timer = self._timers.pop(z, None)
        if timer is not None:
            timer.cancelled = True
        self._unregister(z)
        z.stop()  # it exits at the Q (or at the channel's end); on_exit reaps it

    def stop(self) -> None:
        """At shutdown: every zygote told to exit."""
        for z in list(self._by_name.values()):
            self._retire(z)

    def _after(self, z: Zygote) -> None:
        """Follow a zygote's state: its process tracked, its channel watched, its restart
        timed."""
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
    def spawn(self, svc: Service, env: list[bytes], fds: tuple[int, int, int]) -> int:
        """The connection's process forked by the service's zygote; 0 when there is none
        ready (serve it cold: one log line per outage, never a refusal)."""
        z = self._by_name.get(svc.name)
        if z is None:
            return 0
        try:
            return z.request(env, fds)
        except ZygoteUnavailable as exc:
            note = z.cold_note()
            if note is not None:
                self._say(logging.INFO, f"{note} ({exc})")
            return 0
        finally:
            self._after(z)

    def pids(self) -> list[int]:
        """The zygote processes not reaped yet (the exit watcher watches them too)."""
        return list(self._by_pid)

    def describe(self, name: str) -> dict[str, object] | None:
        """The service's zygote for `pyinetd status`, or None."""
        z = self._by_name.get(name)
        return z.describe() if z is not None else None

    @staticmethod
    def _say(level: int, msg: str) -> None:
        log.event(level, msg, event="zygote")
