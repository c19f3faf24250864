"""The loop (loop.py) and the two reaping strategies (reaper.py), without a server: real
timers, a real signal through the wake-up fd, real children."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
from collections.abc import Iterator

import pytest
from conftest import DEADLINE, wait_for

from pyinetd.runtime import reaper
from pyinetd.runtime.loop import Loop
from pyinetd.signals import HANDLED_SIGNALS


@pytest.fixture
def loop() -> Iterator[Loop]:
    lp = Loop()
    old = {sig: signal.getsignal(sig) for sig in HANDLED_SIGNALS}
    try:
        yield lp
    finally:
        lp.close()
        for sig, how in old.items():
            signal.signal(sig, how)


def test_timers_run_in_order_and_a_cancelled_one_never_runs(loop: Loop) -> None:
    ran: list[str] = []
    loop.call_later(0.02, lambda: ran.append("late"))
    loop.call_later(0.0, lambda: ran.append("now"))
    loop.call_later(0.0, lambda: ran.append("cancelled")).cancel()
    loop.call_later(0.01, lambda: ran.append("soon"))
    wait_for(lambda: loop.run_timers() is None, what="every timer ran")
    assert ran == ["now", "soon", "late"]


def test_a_signal_reaches_the_dispatch_through_the_wakeup_fd(loop: Loop) -> None:
    got: list[set[int]] = []

    def on_signals(signums: set[int]) -> None:
        got.append(signums)
        loop.exit = True

    loop.install_signals(HANDLED_SIGNALS, on_signals)
    loop.call_later(0.0, lambda: os.kill(os.getpid(), signal.SIGUSR1))
    loop.call_later(DEADLINE, lambda: setattr(loop, "exit", True))  # bounded
    loop.run(lambda: None, lambda key: None)
    assert got == [{signal.SIGUSR1}]


def test_a_handler_that_raises_is_contained_and_the_loop_serves_on(loop: Loop) -> None:
    """Issue 18, item 6: one handler's bug must not stop the loop; ``contain`` gets its key."""
    a, b = socket.socketpair()
    contained: list[object] = []

    def broken(mask: int) -> None:
        raise ValueError("a bug")

    def contain(key: selectors.SelectorKey) -> None:
        contained.append(key.fileobj)
        loop.sel.unregister(key.fileobj)
        loop.exit = True

    with a, b:
        loop.sel.register(a, selectors.EVENT_READ, broken)
        b.send(b"x")
        loop.call_later(DEADLINE, lambda: setattr(loop, "exit", True))  # bounded
        loop.run(lambda: None, contain)
    assert contained == [a]


def _exits(n: int) -> list[int]:
    """Start ``n`` children that exit at once (status 3); their pids. Popen is used only to
    start them: the strategies under test reap them with waitpid."""
    pids = []
    for _ in range(n):
        proc = subprocess.Popen(["/bin/sh", "-c", "exit 3"])
        proc.returncode = 0  # Popen must not reap it itself (its __del__ would try)
        pids.append(proc.pid)
    return pids


def test_the_waitpid_strategy_reaps_every_exited_child() -> None:
    reaped: reaper.Exited = []
    strategy = reaper.WaitpidReaping(reaped.extend)
    pids = _exits(3)

    def all_reaped() -> bool:
        strategy.on_wakeup()
        return len(reaped) == 3

    wait_for(all_reaped, what="three children reaped")
    assert sorted(pid for pid, _, _ in reaped) == sorted(pids)
    assert {os.waitstatus_to_exitcode(status) for _, status, _ in reaped} == {3}
    # wait4's rusage: a shell has a resident set, its CPU time is not negative
    assert all(usage.max_rss_kib > 0 and usage.cpu_ms >= 0 for _, _, usage in reaped)


def test_the_watcher_strategy_reaps_exactly_the_pids_it_reports(loop: Loop) -> None:
    reaped: reaper.Exited = []
    pids = _exits(3)
    strategy = reaper.WatcherReaping(
        sel=loop.sel,
        call_later=loop.call_later,
        handle=reaped.extend,
        pids=pids,
        after=lambda: None,
        gone=lambda: None,
    )
    try:
        assert strategy.flush()

        def all_reported() -> bool:
            for key, mask in loop.sel.select(0.05):
                key.data(mask)
            return len(reaped) == 3

        wait_for(all_reported, what="three children reported by the watcher")
        assert sorted(pid for pid, _, _ in reaped) == sorted(pids)
        assert all(usage.max_rss_kib > 0 for _, _, usage in reaped)
    finally:
        strategy.close(reap=False)
    os.waitpid(strategy.pid, 0)  # the watcher exits when its pipe closes


def test_cancelled_timers_do_not_pile_up_in_the_heap(loop: Loop) -> None:
    """Each built-in session's timeout (300 s by default) is cancelled when the session ends,
    and stayed in the heap for its 300 s: millions of dead timers at a built-in's rate."""
    ran: list[int] = []
    live = [loop.call_later(0.0, lambda i=i: ran.append(i)) for i in range(10)]  # type: ignore[misc]
    for _ in range(100_000):
        loop.call_later(300.0, lambda: None).cancel()
    assert len(loop._timers) < 4 * 1024
    assert all(t in loop._timers for t in live)
    loop.run_timers()
    assert sorted(ran) == list(range(10))  # all ran (equal deadlines keep no order)
