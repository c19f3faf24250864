"""The exit watcher: with many children alive, exits are reported to pyinetd one pid at a time
(reaper.py) instead of found by a waitpid(-1) walk over every child. PYINETD_WATCH_FROM=4
makes "many" four here, and the backup sweep is off so that only the watcher can reap."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from conftest import Pyinetd, children_of, free_port, pid_gone, wait_for

Start = Callable[..., Pyinetd]
ENV = {"PYINETD_WATCH_FROM": "4", "PYINETD_SWEEP_EVERY": "3600"}  # no backup sweep here


@contextmanager
def held(port: int, n: int) -> Iterator[list[socket.socket]]:
    """``n`` open connections to an echo (cat) service, each confirmed by an echoed byte."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            socks.append(s)
            s.sendall(b"x")
            assert s.recv(1) == b"x"
        yield socks
    finally:
        for s in socks:
            s.close()


def watcher_pid(p: Pyinetd, nth: int = 1) -> int:
    line = p.wait_log(r"children: exit watcher started \(pid \d+\)$", count=nth)[nth - 1]
    return int(line.rsplit(" ", 1)[1].rstrip(")"))


def cat_service(port: int) -> dict[str, object]:
    return {"services": {"cat": {"listen": f"127.0.0.1:{port}", "exec": ["/bin/cat"]}}}


def test_many_children_are_reaped_through_the_watcher_which_leaves_when_few_remain(
    inetd: Start,
) -> None:
    port = free_port()
    p = inetd(cat_service(port), env=ENV)
    with held(port, 6):
        watcher = watcher_pid(p)
        assert watcher in dict(children_of(p.pid))
    # each of the six is reaped (its end line) and no zombie stays behind
    p.wait_log(r"cat: pid \d+ ended \(exit 0\)", count=6)
    wait_for(lambda: all(state != "Z" for _, state in children_of(p.pid)), what="no zombies")
    # under a quarter of the threshold the watcher is stopped, and reaped like any child
    wait_for(lambda: pid_gone(watcher) and watcher not in dict(children_of(p.pid)),
             what="the watcher gone and reaped")  # fmt: skip
    # and it comes back when the children are many again
    with held(port, 5):
        second = watcher_pid(p, 2)
        assert second != watcher
    p.wait_log(r"cat: pid \d+ ended \(exit 0\)", count=11)


def test_a_dead_watcher_is_replaced_by_the_waitpid_loop(inetd: Start) -> None:
    port = free_port()
    p = inetd(cat_service(port), env=ENV)
    with held(port, 5) as socks:
        watcher = watcher_pid(p)
        os.kill(watcher, signal.SIGKILL)
        p.wait_log(r"exit watcher gone \(.*\); reaping with waitpid\(-1\)$")
        for s in socks[:2]:
            s.close()
        p.wait_log(r"cat: pid \d+ ended \(exit 0\)", count=2)
    p.wait_log(r"cat: pid \d+ ended \(exit 0\)", count=5)
    wait_for(lambda: not children_of(p.pid), what="every child reaped, the watcher too")
    assert "children: exit watcher started" not in p.log().split("exit watcher gone", 1)[1]
