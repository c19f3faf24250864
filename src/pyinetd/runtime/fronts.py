"""The fronts of this process's TLS, redirect and WebSocket services: started with their
service, restarted when one dies, replaced by a new generation when a reload changes what
they hold, stopped with it; per connection, the next live front of the service's current
generation (round-robin).

The server hands in what a front needs when this is built (the selector, ``call_later``, a
service's stderr fd and sandbox, a way to tell the exit watcher about a pid) and calls:
``sync`` after a (re)load, ``pick`` per connection (None: no front serves now), ``on_exit``
for a reaped pid, ``stop`` at shutdown. A front's own channel and ids are frontproc.py's.

A generation is the set of fronts started from one version of a service: its definition and
its TLS files (their identity, size and mtime; the context itself is built anew at every
load). A reload that changes either starts a new generation for new connections and sends
``D`` to the old one, which finishes its connections within ``drain_timeout`` and is then
killed. A reload that changes neither keeps the fronts as they are.
"""

from __future__ import annotations

import logging
import os
import pwd
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pyinetd import log
from pyinetd.config import Config, Service
from pyinetd.runtime.frontproc import Front, available, start_front

if TYPE_CHECKING:
    import selectors
    import ssl

    from pyinetd.sandbox import Prepared

BACKOFF_FIRST = 1.0  # seconds before a front that died is started again (the first: at once)
BACKOFF_MAX = 60.0
STABLE_AFTER = 30.0  # a front that served this long resets the backoff
# The range the front uids are taken from: systemd's for DynamicUser= (61184-65519,
# systemd.exec(5)), whose uids are in no passwd file.
DYNAMIC_UIDS = range(61184, 65520)


class _Timer(Protocol):
    def cancel(self) -> None: ...


def fronted(svc: Service) -> bool:
    """Whether the service's connections go through a front: TLS, redirect or WebSocket."""
    return svc.enabled and (
        svc.tls is not None or svc.redirect is not None or svc.websocket is not None
    )


def _files_id(svc: Service) -> tuple[object, ...]:
    """What a reload compares of a service's TLS files: each one's identity, size, mtime."""
    if svc.tls is None:
        return ()
    out: list[object] = []
    for path in (svc.tls.cert, svc.tls.key, svc.tls.client_ca):
        if path is None:
            out.append(None)
            continue
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
            continue
        out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _uids_in_use() -> set[int]:
    """The real and effective uids of every process now (/proc/PID/status)."""
    used: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Uid:"):
                        used.update(int(v) for v in line.split()[1:])
                        break
        except (OSError, ValueError):
            continue
    return used


def pick_uids(config: Config, taken: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """The front uid (and gid) of each fronted service: its `front_user:`, else one of
    DYNAMIC_UIDS that no passwd entry names, no process runs as and no service's `user:`
    is, one per service (kept across reloads from ``taken``), as systemd's DynamicUser
    picks. No program runs as it: none can ptrace, read or signal its front."""
    services = [s for s in config.services if fronted(s)]
    users = {s.user[1] for s in config.services if s.user is not None}
    users |= {s.front_user[1] for s in services if s.front_user is not None}
    out: dict[str, tuple[int, int]] = {}
    free: Iterable[int] | None = None
    for svc in services:
        if svc.front_user is not None:
            out[svc.name] = (svc.front_user[1], svc.front_user[2])
            continue
        old = taken.get(svc.name)
        if old is not None and old[0] not in users:
            out[svc.name] = old
            continue
        if free is None:
            busy = _uids_in_use() | users | {u for u, _ in taken.values()}
            free = iter(u for u in DYNAMIC_UIDS if u not in busy and not _in_passwd(u))
        uid = next(iter(free), None)
        if uid is None:
            raise OSError("no free uid left for a front in 61184-65519")
        out[svc.name] = (uid, uid)
    return out


def _in_passwd(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


@dataclass
class Group:
    """A service's fronts: its current generation's, and those still draining."""

    service: Service
    generation: int
    files: tuple[object, ...]
    live: list[Front] = field(default_factory=list)
    turn: int = 0  # the round-robin's next index
    restarts: int = 0
    delay: float = 0.0  # the next restart's backoff
    timer: _Timer | None = None  # a restart due


class Fronts:
    """The fronts of the services this process serves, by service name."""

    def __init__(
        self,
        sel: selectors.BaseSelector,
        call_later: Callable[[float, Callable[[], None]], _Timer],
        track: Callable[[int], None],
        stderr_for: Callable[[Service], tuple[int, bool]],
        box_for: Callable[[Service], Prepared | None],
        context_for: Callable[[str], ssl.SSLContext | None],
        contexts: Callable[[], Iterable[object]],
    ) -> None:
        self._sel = sel
        self._call_later = call_later
        self._track = track
        self._stderr_for = stderr_for
        self._box_for = box_for
        self._context_for = context_for
        self._contexts = contexts  # every service's context (the front drops all but its own)
        self.groups: dict[str, Group] = {}
        self.uids: dict[str, tuple[int, int]] = {}
        self._by_pid: dict[int, Front] = {}  # every front not reaped yet
        self._draining: dict[Front, _Timer] = {}
        self._before: set[int] = set()  # fronts of the image before an upgrade, finishing
        self._drain_timeout = 30.0
        self.stopping = False
        # a connection's front ended (its links were told); for the log's one line
        self.lost: Callable[[Front, str], None] = lambda front, why: None

    # ------------------------------------------------------------------ lifecycle
    def sync(self, config: Config, served: Iterable[Service]) -> None:
        """After a (re)load: a generation of ``fronts:`` fronts for each fronted service
        this process serves; a changed one gets a new generation (the old one drains);
        the fronts of services gone drain."""
        self._drain_timeout = config.drain_timeout
        served = list(served)
        if not self.groups and not any(fronted(s) for s in served):
            return
        if not available():
            return  # (then each connection gets a relay process, relay.py)
        try:
            self.uids = pick_uids(config, self.uids)
        except OSError as exc:
            self._say(logging.ERROR, f"fronts: {exc}; TLS and redirect run a relay each")
            self.uids = {}
        wanted = {svc.name: svc for svc in served if fronted(svc) and svc.name in self.uids}
        for name, group in list(self.groups.items()):
            svc = wanted.get(name)
            if svc is None or svc != group.service or _files_id(svc) != group.files:
                self._retire_group(group)
                if svc is None:
                    del self.groups[name]
        for name, svc in wanted.items():
            old = self.groups.get(name)
            if old is not None and old.service == svc and old.live:
                continue
            gen = old.generation + 1 if old is not None else 1
            group = Group(svc, gen, _files_id(svc))
            if old is not None:
                group.restarts = old.restarts
            self.groups[name] = group
            for _ in range(svc.fronts):
                self._start(group)

    def _start(self, group: Group) -> Front | None:
        svc = group.service
        uid, gid = self.uids[svc.name]
        try:
            err, owned = self._stderr_for(svc)
        except OSError as exc:
            self._say(logging.ERROR, f"{svc.name}: front: stderr: {exc}")
            return None
        try:
            pid, sock = start_front(
                svc,
                self._context_for(svc.name),
                uid,
                gid,
                err,
                self._box_for(svc),
                self._contexts,
            )
        except OSError as exc:
            self._say(logging.ERROR, f"{svc.name}: cannot start a front: {exc}")
            self._schedule(group)
            return None
        finally:
            if owned:
                os.close(err)
        front = Front(svc, group.generation, sock, pid, self._sel, self._call_later, self._ended)
        group.live.append(front)
        self._by_pid[pid] = front
        self._track(pid)
        self._say(
            logging.INFO,
            f"{svc.name}: front {pid} started (generation {group.generation}, uid {uid})",
        )
        return front

    def _retire_group(self, group: Group) -> None:
        if group.timer is not None:
            group.timer.cancel()
            group.timer = None
        for front in group.live:
            self._retire(front)
        group.live = []

    def _retire(self, front: Front) -> None:
        """``D``; killed at drain_timeout if it has not exited by then."""
        if front.over:
            return
        front.drain()
        if not front.links:
            front.kill()  # nothing to finish: its end need not wait for it
            return
        self._draining[front] = self._call_later(self._drain_timeout, front.kill)

    def stop(self) -> None:
        """At shutdown: every front told to finish (killed at the drain's end, or at exit)."""
        self.stopping = True
        for group in self.groups.values():
            self._retire_group(group)

    def kill_all(self) -> None:
        for front in list(self._by_pid.values()):
            front.kill()

    def _ended(self, front: Front, why: str) -> None:
        """A front's channel ended or it was distrusted: out of its group; restarted (after
        its backoff) when it was of the current generation."""
        timer = self._draining.pop(front, None)
        if timer is not None:
            timer.cancel()
        group = self.groups.get(front.service.name)
        if why.startswith("distrusted") or not front.draining:
            level = logging.WARNING if not front.draining else logging.INFO
            self._say(
                level,
                f"{front.service.name}: front {front.pid} ended ({why}); "
                f"{front.connections} connections end with it",
            )
        self.lost(front, why)
        if group is None or front not in group.live:
            return
        group.live.remove(front)
        if self.stopping or front.draining:
            return
        group.restarts += 1
        if time.monotonic() - front.started >= STABLE_AFTER:
            group.delay = 0.0
        self._schedule(group)

    def _schedule(self, group: Group) -> None:
        if group.timer is not None or self.stopping:
            return
        delay = group.delay
        group.delay = min(max(BACKOFF_FIRST, delay * 2), BACKOFF_MAX)

        def restart() -> None:
            group.timer = None
            if self.groups.get(group.service.name) is not group or self.stopping:
                return
            while len(group.live) < group.service.fronts:
                if self._start(group) is None:
                    return

        group.timer = self._call_later(delay, restart)

    def on_exit(self, pid: int, status: int) -> bool:
        """A reaped pid: True if it was a front's (this image's or one before)."""
        if pid in self._before:
            self._before.discard(pid)
            return True
        front = self._by_pid.pop(pid, None)
        if front is None:
            return False
        if not front.over:
            code = os.waitstatus_to_exitcode(status)
            how = f"exit {code}" if code >= 0 else f"signal {-code}"
            front.end(f"process ended ({how})")
        return True

    def pids(self) -> list[int]:
        return [*self._by_pid, *self._before]

    # ----------------------------------------------------- `pyinetd upgrade` (upgrade.Carrier)
    name = "fronts"

    def carry(self) -> tuple[Any, list[int]]:
        """Just before the exec: every front is told ``D`` (sent now, not queued), so at its
        channel's end (the exec closes the parent's side) it finishes its open connections
        on its own and exits; the next image starts its own fronts and reaps these. Their
        connections are all relaying by then: the exec waits for no pending stage."""
        pids = []
        for front in list(self._by_pid.values()):
            front.drain()
            front.flush_now()
            pids.append(front.pid)
        return {"pids": [*pids, *self._before]}, []

    def adopt(self, facts: Any) -> None:
        """The next image: the fronts of the images before, reaped quietly as they end."""
        for pid in (facts or {}).get("pids", []):
            self._before.add(int(pid))
            self._track(int(pid))

    # ------------------------------------------------------------------ per connection
    def pick(self, name: str) -> Front | None:
        """The front for a new connection of service ``name``: the next usable one of its
        current generation, round-robin; None when none is."""
        group = self.groups.get(name)
        if group is None or self.stopping:
            return None
        n = len(group.live)
        for i in range(n):
            front = group.live[(group.turn + i) % n]
            if front.usable:
                group.turn = (group.turn + i + 1) % n
                return front
        return None

    # ------------------------------------------------------------------ status
    def describe(self, name: str) -> list[dict[str, object]] | None:
        """The service's fronts for `pyinetd status`: each one's pid, generation,
        connections, and the service's restarts; None for a service without fronts."""
        group = self.groups.get(name)
        draining = [f for f in self._by_pid.values() if f.service.name == name and f.draining]
        if group is None and not draining:
            return None
        out = []
        for front in [*(group.live if group else []), *draining]:
            entry = front.describe()
            entry["restarts"] = group.restarts if group else 0
            out.append(entry)
        return out

    @staticmethod
    def _say(level: int, msg: str) -> None:
        log.event(level, msg, event="front")
