"""The loop: one thread, a selector, timers and the signal wake-up fd. It knows no services.

Signal handlers do nothing: ``signal.set_wakeup_fd`` writes the signal number to a
socketpair the loop watches, and the loop hands the signals it read to the one callback it
was given (gunicorn's deadlocks #3004 and #2667 came from doing work inside a handler).
Every handler runs guarded: one that raises is logged and handed to ``contain``, and the
loop serves on.
"""

from __future__ import annotations

import heapq
import selectors
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pyinetd import log
from pyinetd.log import LOG

__all__ = ["Loop", "Timer"]

LOG_RETRY = 0.25  # seconds between tries to write a log backlog to a stalled reader
# A cancelled timer stays in the heap until its time comes. Every built-in session has a
# timeout (300 s by default) that is cancelled when the session ends: at 30,000 sessions a
# second the heap would hold millions of dead timers. It is rebuilt without them whenever it
# has doubled since the last rebuild (and holds at least this many): amortised O(1) per timer.
COMPACT_MIN = 1024


@dataclass(order=True)
class Timer:
    when: float
    seq: int
    callback: Callable[[], None] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)

    def cancel(self) -> None:
        """Never run the callback: the timer stays in the heap (cheap) until its time comes
        or the heap is compacted."""
        self.cancelled = True


def _noop_handler(signum: int, frame: object) -> None:
    """Signal handlers do nothing: the wake-up fd carries the signal number to the loop."""


class Loop:
    """The selector, the timer heap and the wake-up fd of one pyinetd process."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self._timers: list[Timer] = []
        self._timer_seq = 0
        self._compact_at = COMPACT_MIN
        self._wake_r, self._wake_w = socket.socketpair()
        self.exit = False  # leave the loop at the next turn

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        """Run ``callback`` from the loop after ``delay`` seconds."""
        self._timer_seq += 1
        timer = Timer(time.monotonic() + delay, self._timer_seq, callback)
        heapq.heappush(self._timers, timer)
        if len(self._timers) > self._compact_at:
            self._timers = [t for t in self._timers if not t.cancelled]
            heapq.heapify(self._timers)
            self._compact_at = max(COMPACT_MIN, 2 * len(self._timers))
        return timer

    def run_timers(self) -> float | None:
        """Run what is due; the seconds until the next timer (None: none left)."""
        now = time.monotonic()
        while self._timers and (self._timers[0].when <= now or self._timers[0].cancelled):
            timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                timer.callback()
        if not self._timers:
            return None
        return max(0.0, self._timers[0].when - time.monotonic())

    def install_signals(
        self, signals: tuple[int, ...], on_signals: Callable[[set[int]], None]
    ) -> None:
        """Catch ``signals`` through the wake-up fd; the loop calls ``on_signals`` with the
        numbers read at each wake-up (SIGCHLD coalesces, and a full buffer drops bytes)."""
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in signals:
            signal.signal(sig, _noop_handler)
            signal.siginterrupt(sig, False)

        def on_wakeup(mask: int) -> None:
            try:
                data = self._wake_r.recv(4096)
            except BlockingIOError:
                data = b""
            on_signals(set(data))

        self.sel.register(self._wake_r, selectors.EVENT_READ, on_wakeup)

    def run(
        self,
        before_select: Callable[[], None],
        contain: Callable[[selectors.SelectorKey], None],
    ) -> None:
        """Serve until ``exit``: timers, ``before_select``, the log, then the ready fds."""
        while not self.exit:
            timeout = self.run_timers()
            before_select()
            log.flush()
            if log.backlog():  # the log reader stalls: try again soon, never block on it
                timeout = LOG_RETRY if timeout is None else min(timeout, LOG_RETRY)
            for key, mask in self.sel.select(timeout):
                try:
                    key.data(mask)
                except Exception:
                    # A bug in one handler must not take every service down with it.
                    LOG.exception("internal error handling an event; serving on")
                    contain(key)
                if self.exit:
                    break

    def close(self) -> None:
        """Stop catching signals into the wake-up fd; close the selector and the fds."""
        signal.set_wakeup_fd(-1)
        self.sel.close()
        self._wake_r.close()
        self._wake_w.close()
