"""A service's `stderr: log`: its children's stderr, read by the loop and logged per line."""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import struct
import time
from collections.abc import Callable

from pyinetd import log
from pyinetd.log import event
from pyinetd.runtime.loop import Timer

STDERR_LINE_MAX = 4096
STDERR_READ = 65536  # bytes per read of a service's stderr socket
STDERR_READS = 16  # reads per wake-up (1 MiB): one chatty child cannot hold the loop


class StderrLog:
    """A service's `stderr: log`: one socket for all its children, lines tagged `service[pid]`.

    Every child's fd 2 is the write end of one Unix stream socketpair per service. With
    SO_PASSCRED on the read end the kernel attaches the writer's pid to what it writes and
    never merges two writers' bytes in one recvmsg (unix_stream_read_generic), so lines
    keep their pid without a pipe, a registration and two closes per connection. A line
    left unterminated goes out when its writer is reaped (``ended``), or when it grows past
    STDERR_LINE_MAX. A helper the service started is tagged with its own pid.

    What is logged is bounded by the service's `stderr_rate` (log.StderrBudget); what is over
    is still read, so that no child blocks on a full socket, but dropped and counted. Each
    wake-up reads at most STDERR_READS x STDERR_READ bytes: one chatty child cannot hold the
    loop. Control characters are escaped (log.escape_controls).
    """

    MAX_PARTIAL = 256  # writers with an unterminated line; beyond that, flush them all

    def __init__(
        self,
        service: str,
        selector: selectors.BaseSelector,
        rate: tuple[float, float],
        call_later: Callable[[float, Callable[[], None]], Timer],
        fds: tuple[int, int] | None = None,
    ) -> None:
        """``fds``: the read and write ends the image before this one made (`pyinetd
        upgrade`): its children still write to them."""
        self.tag = service
        self._sel = selector
        self._call_later = call_later
        self.budget = log.StderrBudget(*rate)
        self._reported = -1.0  # when dropped lines were last reported (monotonic)
        self._report_timer: Timer | None = None
        self._reopened = 0  # shutdowns mended since the last warning about them
        self._warned = -60.0
        self._partial: dict[int, bytes] = {}
        self._cmsg = socket.CMSG_SPACE(12)  # struct ucred
        self._open(fds)

    def _open(self, fds: tuple[int, int] | None = None) -> None:
        if fds is None:
            self._r, self._w = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            self._r, self._w = (socket.socket(fileno=fd) for fd in fds)
        self._r.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._r.setblocking(False)
        self._sel.register(self._r, selectors.EVENT_READ, self)

    def fileno(self) -> int:
        """The write end: what a child gets on fd 2."""
        return self._w.fileno()

    def carry(self) -> tuple[tuple[int, int], dict[int, bytes]]:
        """For `pyinetd upgrade`: the read and write ends, and the lines not finished yet."""
        return (self._r.fileno(), self._w.fileno()), dict(self._partial)

    def adopt_partial(self, partial: dict[int, bytes]) -> None:
        """The unfinished lines the image before this one had read (``carry``)."""
        self._partial.update(partial)

    def __call__(self, mask: int) -> None:
        self.drain()

    def drain(self, limit: int = STDERR_READS) -> None:
        """Log what is waiting, at most ``limit`` reads (the loop comes back for the rest)."""
        for _ in range(limit):
            try:
                data, ancdata, _flags, _addr = self._r.recvmsg(STDERR_READ, self._cmsg)
            except OSError:  # nothing waiting (EAGAIN), or the socket is gone
                break
            if not data:
                self._reopen()
                break
            pid = 0
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("i", cdata[:4])[0]
            self._feed(pid, data)
        self._report(time.monotonic())

    def _reopen(self) -> None:
        """End-of-file: a child called shutdown(2, SHUT_WR) on the socket all share (pyinetd
        holds a write end, so nothing else ends it). The read end would stay readable at EOF
        for ever (the loop spun at 80 % CPU) and every later child writing to stderr would
        die of SIGPIPE: new children get a new socket. The children that share the old one
        lose their stderr, as they would with a pipe whose reader went away."""
        self.close(drain=False)
        self._open()
        self._reopened += 1
        now = time.monotonic()
        if now - self._warned >= 60.0:
            times = f" ({self._reopened} times in a minute)" if self._reopened > 1 else ""
            event(
                logging.WARNING,
                f"{self.tag}: a child shut down the service's stderr socket{times}; "
                "children started from now on get a new one",
                event="stderr_shutdown",
                service=self.tag,
            )
            self._warned, self._reopened = now, 0

    def _feed(self, pid: int, data: bytes) -> None:
        budget = self.budget
        budget.refill(time.monotonic())
        data = self._partial.pop(pid, b"") + data
        # Split only what may be logged: a flood of short lines costs one count(), not a
        # bytes object per line.
        allowed = budget.lines_left()
        lines = data.split(b"\n", allowed) if allowed else [data]
        rest = lines.pop()
        cut = rest.rfind(b"\n")
        if cut >= 0:
            budget.drop(rest.count(b"\n"), cut + 1)
            rest = rest[cut + 1 :]
        if len(rest) > STDERR_LINE_MAX:
            lines.append(rest)
        elif rest:
            self._partial[pid] = rest
        for line in lines:
            if budget.take(len(line) + 1):
                self._emit(pid, line)
        if len(self._partial) > self.MAX_PARTIAL:
            for other in list(self._partial):
                self.ended(other)

    def ended(self, pid: int) -> None:
        """``pid`` is gone: its unterminated last line, if any, goes out now."""
        rest = self._partial.pop(pid, None)
        if rest:
            self.budget.refill(time.monotonic())
            if self.budget.take(len(rest)):
                self._emit(pid, rest)

    def _report(self, now: float, at_once: bool = False) -> None:
        """Say how many lines were dropped: at most once a second, and a second after the
        last drop at the latest (a timer, so that the end of a flood is told too)."""
        budget = self.budget
        if not budget.dropped_lines and not budget.dropped_bytes:
            return
        if not at_once and now - self._reported < 1.0:
            if self._report_timer is None:
                self._report_timer = self._call_later(
                    self._reported + 1.0 - now, self._on_report_timer
                )
            return
        self._reported = now
        lines, nbytes = budget.take_dropped()
        event(
            logging.WARNING,
            f"{self.tag}: {lines} stderr lines ({nbytes} bytes) not logged: over stderr_rate "
            f"(lines: {budget.lines_per_s:g}/s, bytes: {budget.bytes_per_s:g}/s)",
            event="stderr_dropped",
            service=self.tag,
            lines=lines,
            bytes=nbytes,
        )

    def _on_report_timer(self) -> None:
        self._report_timer = None
        self._report(time.monotonic())

    def _emit(self, pid: int, line: bytes) -> None:
        text = log.escape_controls(line.rstrip(b"\r").decode("utf-8", "replace"))
        event(logging.INFO, f"{self.tag}[{pid}]: {text}", event="stderr", service=self.tag, pid=pid)

    def close(self, drain: bool = True) -> None:
        if drain:
            self.drain()
            for pid in list(self._partial):
                self.ended(pid)
            self._report(time.monotonic(), at_once=True)
            if self._report_timer is not None:
                self._report_timer.cancel()
                self._report_timer = None
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(self._r)
        self._r.close()
        self._w.close()
