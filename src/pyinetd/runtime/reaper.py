"""Reaping that does not walk every child: an exit watcher for when many children are alive.

``waitpid(-1)`` makes the kernel walk the caller's whole list of children (~40 ns each here),
and a reap loop calls it once per exited child plus once to find none left: with 2,000
long-lived connections, every short one costs the parent ~170 us more (bench/README.md).
``waitpid(pid)`` is O(1), but needs to know which pid exited. A pidfd per child would tell,
yet every fd the parent holds is copied into each vfork'd child and closed again there
(2,000 pidfds: +230 us per spawn). So the pidfds live in another process, the watcher: the
parent writes each child's pid to it, it opens a pidfd (any process may watch any pid; only
the parent can reap, so the pid cannot be reused meanwhile) and writes the pid back once
the child has exited; the parent then reaps exactly that pid.

The children table (children.py) starts a watcher when WATCH_FROM children are alive and
stops it below a quarter of that (the plain loop is cheaper with few children); while it
runs, a full ``waitpid(-1)`` sweep every SWEEP_EVERY seconds backs it up, and if it dies the
table goes back to the plain loop at once. Pids travel as native 4-byte ints; a pid of 0
from the watcher means it cannot watch any more (out of fds) and should be stopped. The two
ways of reaping are two strategies behind one small interface (WaitpidReaping,
WatcherReaping), as CPython's asyncio child watchers.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import select
import selectors
import signal
import struct
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, NamedTuple

from pyinetd.signals import HANDLED_SIGNALS, PYTHON_IGNORED

if TYPE_CHECKING:
    from pyinetd.runtime.loop import Timer

# Environment overrides are for the tests (a low threshold; no sweep to hide a silent watcher).
WATCH_FROM = int(os.environ.get("PYINETD_WATCH_FROM", "512"))
SWEEP_EVERY = float(os.environ.get("PYINETD_SWEEP_EVERY", "5"))
PID = struct.Struct("=i")


def _pids(data: bytes) -> tuple[list[int], bytes]:
    """The whole pids in ``data``, and the bytes of an incomplete one left for the next read."""
    whole = len(data) - len(data) % PID.size
    return [pid for (pid,) in PID.iter_unpack(data[:whole])], data[whole:]


class ExitWatcher:
    """The parent's end: pids out (batched per loop turn), exited pids back."""

    def __init__(self) -> None:
        to_r, self._to_w = os.pipe2(os.O_CLOEXEC)
        self._from_r, from_w = os.pipe2(os.O_CLOEXEC)
        from pyinetd.spawn import start_python  # (the watcher process itself needs none of it)

        try:
            self.pid = start_python(
                "from pyinetd.runtime.reaper import main; main()",
                [],
                os.environ,
                sigdef=PYTHON_IGNORED,
                dup2=((to_r, 0), (from_w, 1)),
            )
        except OSError:
            for fd in (self._to_w, self._from_r):
                os.close(fd)
            raise
        finally:
            os.close(to_r)
            os.close(from_w)
        os.set_blocking(self._to_w, False)
        os.set_blocking(self._from_r, False)
        self._out = bytearray()
        self._in = b""

    def fileno(self) -> int:
        return self._from_r

    def watch(self, pid: int) -> None:
        self._out += PID.pack(pid)

    def flush(self) -> bool:
        """Send the pids gathered this loop turn (what a full pipe refuses waits for the next).

        False when the watcher is gone: it may be killed at any instant, and then the write
        fails with EPIPE (pyinetd ignores SIGPIPE) before its EOF reaches the loop.
        """
        if not self._out:
            return True
        try:
            sent = os.write(self._to_w, self._out)
        except BlockingIOError:
            return True
        except OSError:  # EPIPE, or anything else: the caller goes back to waitpid(-1)
            return False
        del self._out[:sent]
        return True

    def exited(self) -> list[int] | None:
        """Pids the watcher saw exit; None when it is gone or gave up."""
        try:
            data = os.read(self._from_r, 65536)
        except BlockingIOError:
            return []
        except OSError:  # ECONNRESET, EIO...: as good as end-of-file
            return None
        if not data:
            return None
        pids, self._in = _pids(self._in + data)
        return None if 0 in pids else pids

    def close(self) -> None:
        """Close both pipes: the watcher reads end-of-file and exits (the server reaps it)."""
        for fd in (self._to_w, self._from_r):
            with contextlib.suppress(OSError):
                os.close(fd)


def main() -> None:
    """The watcher process: stdin brings pids to watch, stdout takes back those that exited."""
    for sig in HANDLED_SIGNALS:
        if sig != signal.SIGCHLD:  # the parent's group signals are the parent's
            signal.signal(sig, signal.SIG_IGN)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ep = select.epoll()
    ep.register(0, select.EPOLLIN)
    watched: dict[int, int] = {}  # pidfd -> pid
    rest = b""
    while True:
        done: list[int] = []
        for fd, _mask in ep.poll():
            if fd != 0:
                ep.unregister(fd)
                os.close(fd)
                done.append(watched.pop(fd))
                continue
            data = os.read(0, 65536)
            if not data:
                return  # the server closed its end (or is gone)
            pids, rest = _pids(rest + data)
            for pid in pids:
                try:
                    pidfd = os.pidfd_open(pid)
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                        done.append(0)  # cannot watch: the server goes back to waitpid(-1)
                    else:
                        done.append(pid)  # already reaped by a sweep: let the server see
                    continue
                watched[pidfd] = pid
                ep.register(pidfd, select.EPOLLIN)
        if done:
            out = memoryview(b"".join(PID.pack(pid) for pid in done))
            while out:
                out = out[os.write(1, out) :]


# ---------------------------------------------------------------- the two reaping strategies
# One small interface, as CPython's asyncio child watchers: watch(pid) when a child starts,
# on_wakeup() at every loop wake-up (SIGCHLD), flush() before each select (False: the
# strategy failed), close(reap). Both hand the (pid, wait status) pairs they reaped to
# ``handle``.


class Usage(NamedTuple):
    """What a reaped child used, from wait4(2)'s rusage (its own and that of the children it
    reaped itself): user + system CPU in milliseconds, peak resident memory in KiB (Linux
    gives ru_maxrss in KiB)."""

    cpu_ms: float
    max_rss_kib: int

    @classmethod
    def of(cls, ru: resource.struct_rusage) -> Usage:
        return cls(round((ru.ru_utime + ru.ru_stime) * 1000, 3), int(ru.ru_maxrss))


# (pid, wait status, usage) of each child reaped: every path reaps with wait4, which gives
# the rusage at no extra system call (systemd and xinetd log CPU time and memory per end).
Exited = list[tuple[int, int, Usage]]


def reap_all() -> Exited:
    """Every exited child: wait4(-1, WNOHANG) until it says none are left (SIGCHLD
    coalesces)."""
    exited: Exited = []
    while True:
        try:
            pid, status, ru = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        exited.append((pid, status, Usage.of(ru)))
    return exited


class WaitpidReaping:
    """The plain strategy: a waitpid(-1) loop at each wake-up; cheapest with few children."""

    def __init__(self, handle: Callable[[Exited], None]) -> None:
        self._handle = handle

    def watch(self, pid: int) -> None:
        """Nothing to do: waitpid(-1) finds every child."""

    def on_wakeup(self) -> None:
        self._handle(reap_all())

    def flush(self) -> bool:
        return True

    def close(self, reap: bool = True) -> None:
        """Nothing held."""


class WatcherReaping:
    """The exit watcher's strategy: it says which pids exited, each is reaped with
    waitpid(pid); a full waitpid(-1) sweep every SWEEP_EVERY seconds backs it up.
    OSError at construction when the watcher cannot start."""

    def __init__(
        self,
        *,
        sel: selectors.BaseSelector,
        call_later: Callable[[float, Callable[[], None]], Timer],
        handle: Callable[[Exited], None],
        pids: Iterable[int],
        after: Callable[[], None],
        gone: Callable[[], None],
    ) -> None:
        self._watcher = ExitWatcher()
        self.pid = self._watcher.pid
        self._sel, self._call_later = sel, call_later
        self._handle, self._after, self._gone = handle, after, gone
        self._closed = False
        for pid in pids:
            self._watcher.watch(pid)
        sel.register(self._watcher.fileno(), selectors.EVENT_READ, self._on_readable)
        self._sweep_timer: Timer | None = call_later(SWEEP_EVERY, self._sweep)

    def watch(self, pid: int) -> None:
        self._watcher.watch(pid)

    def on_wakeup(self) -> None:
        """Nothing to do: the watcher reports exits through its pipe."""

    def flush(self) -> bool:
        return self._watcher.flush()

    def _on_readable(self, mask: int) -> None:
        if self._closed:
            return
        pids = self._watcher.exited()
        if pids is None:
            self._gone()
            return
        exited: Exited = []
        for pid in pids:
            try:
                got, wstatus, ru = os.wait4(pid, os.WNOHANG)
            except ChildProcessError:
                continue  # reaped by a sweep meanwhile
            if got:
                exited.append((got, wstatus, Usage.of(ru)))
        self._handle(exited)
        self._after()

    def _sweep(self) -> None:
        """The watcher's backup: a full waitpid(-1) loop every few seconds."""
        self._handle(reap_all())
        if not self._closed:
            self._sweep_timer = self._call_later(SWEEP_EVERY, self._sweep)

    def close(self, reap: bool = True) -> None:
        """Stop the watcher (it exits when its pipe closes); with ``reap``, reap at once what
        exited before it could say."""
        self._closed = True
        self._sel.unregister(self._watcher.fileno())
        self._watcher.close()
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None
        if reap:
            self._handle(reap_all())


class Reaping:
    """The children table's one handle on reaping: which strategy reaps now. waitpid(-1)
    while children are few; the exit watcher from WATCH_FROM of them, until fewer than a
    quarter of that are left or it is gone (then waitpid(-1) at once, said once, and no new
    watcher for a minute). ``pids``: every pid a new watcher must watch; ``count``: the
    children alive; ``say(level, message, watcher's pid)``: a log line."""

    def __init__(
        self,
        *,
        sel: selectors.BaseSelector,
        call_later: Callable[[float, Callable[[], None]], Timer],
        handle: Callable[[Exited], None],
        pids: Callable[[], Iterable[int]],
        count: Callable[[], int],
        say: Callable[[int, str, int | None], None],
    ) -> None:
        self._sel, self._call_later, self._handle = sel, call_later, handle
        self._pids, self._count, self._say = pids, count, say
        self._strategy: WaitpidReaping | WatcherReaping = WaitpidReaping(handle)
        self._retry = 0.0  # no new watcher before this (monotonic), after a failure

    def on_wakeup(self) -> None:
        """At every wake-up (SIGCHLD coalesces): reap, unless the exit watcher reports."""
        self._strategy.on_wakeup()

    def flush(self) -> None:
        """Before each select: pids to the exit watcher; back to waitpid(-1) if it is gone."""
        if not self._strategy.flush():
            self._gone()

    def track(self, pid: int) -> None:
        """A child started: give its pid to the watcher, or start one if they are many."""
        if isinstance(self._strategy, WatcherReaping):
            self._strategy.watch(pid)
        elif self._count() >= WATCH_FROM and time.monotonic() >= self._retry:
            self._start()

    def _start(self) -> None:
        try:
            watcher = WatcherReaping(
                sel=self._sel,
                call_later=self._call_later,
                handle=self._handle,
                pids=self._pids(),
                after=self._fewer,
                gone=self._gone,
            )
        except OSError as exc:
            self._retry = time.monotonic() + 60.0
            self._say(logging.WARNING, f"cannot start the exit watcher: {exc}", None)
            return
        self._strategy = watcher
        self._say(
            logging.INFO,
            f"{self._count()} children: exit watcher started (pid {watcher.pid})",
            watcher.pid,
        )

    def _fewer(self) -> None:
        if self._count() < WATCH_FROM // 4:
            self.stop()

    def _gone(self) -> None:
        """The watcher died (EOF, EPIPE) or gave up: back to waitpid(-1) now, said once."""
        self._retry = time.monotonic() + 60.0
        self._say(
            logging.WARNING,
            "exit watcher gone (it exited, or ran out of file descriptors); "
            "reaping with waitpid(-1)",
            None,
        )
        self.stop()  # reaps at once what exited before the watcher could say

    def stop(self, reap: bool = True) -> None:
        """Back to waitpid(-1) (at exit: ``reap`` False, the watcher just exits)."""
        watcher = self._strategy
        if not isinstance(watcher, WatcherReaping):
            return
        self._strategy = WaitpidReaping(self._handle)
        watcher.close(reap)
