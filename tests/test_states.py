"""Named lifecycle states in `pyinetd status`: a child's (children.ChildState) and a wait-mode
listener's (services.WaitState), so that an operator sees why a slot stays taken."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DEADLINE, Pyinetd, free_port, status_json, status_of, wait_for

from pyinetd.config import load
from pyinetd.log import LOG
from pyinetd.runtime.children import Child, ChildState
from pyinetd.runtime.listeners import ListenKey
from pyinetd.runtime.services import WAIT_IDLE, WAIT_STARTING, Listener, ServiceState, Wait

Start = Callable[..., Pyinetd]

PTRACE_SEIZE = 0x4206
WALL = 0x40000000  # __WALL: a tracee that is not our child


def _children(p: Pyinetd, name: str) -> list[dict[str, Any]]:
    children: list[dict[str, Any]] = status_of(p)[name]["children"]
    return children


def _child_state(p: Pyinetd, name: str, state: str, deadline: float) -> dict[str, Any]:
    """Wait (bounded) until the service's one child shows ``state`` in status --json."""
    seen: list[dict[str, Any]] = []

    def shows() -> bool:
        try:
            seen[:] = _children(p, name)
        except subprocess.CalledProcessError as exc:  # a status call that failed: ask again
            seen[:] = [{"status failed": exc.returncode, "stderr": exc.stderr}]
            return False
        return len(seen) == 1 and seen[0]["state"] == state

    wait_for(shows, deadline, f"{name}'s child {state} (last seen: {seen})")
    return seen[0]


@contextlib.contextmanager
def _traced(pid: int) -> Iterator[None]:
    """PTRACE_SEIZE ``pid``: once it dies, its parent (pyinetd) cannot reap it until we, the
    tracer, have waited for it: a child that survives its SIGKILL, as one in state D does."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    if libc.ptrace(PTRACE_SEIZE, pid, None, None) != 0:
        pytest.skip(f"ptrace: {os.strerror(ctypes.get_errno())}")
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while True:  # stops first (its SIGTERM), then its exit hands it back to pyinetd
            _, status = os.waitpid(pid, WALL)
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                break


def test_a_child_that_ignores_sigterm_shows_terminating_killed_then_stuck(
    inetd: Start,
) -> None:
    port = free_port()
    p = inetd(
        {
            "services": {
                "stubborn": {
                    "listen": f"127.0.0.1:{port}",
                    "exec": ["/bin/sh", "-c", "trap '' TERM; exec sleep 60"],
                    "timeout": 1,
                }
            }
        }
    )
    held = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    try:
        (line,) = p.wait_log(r"stubborn: \S+ -> pid \d+")
        pid = int(line.rsplit(" ", 1)[1])
        with _traced(pid):
            child = _children(p, "stubborn")[0]
            assert child["pid"] == pid and child["state"] in ("running", "terminating")
            # timeout 1 s: SIGTERM (ignored); KILL_GRACE (5 s) later SIGKILL, which kills it,
            # but its reaping waits for its tracer (us); KILL_GRACE later still, stuck.
            child = _child_state(p, "stubborn", "terminating", DEADLINE)
            assert child["signalled_by"] == "timeout" and child["pid"] == pid
            child = _child_state(p, "stubborn", "killed", DEADLINE + 5)
            assert child["signalled_by"] == "timeout"
            child = _child_state(p, "stubborn", "stuck", DEADLINE + 5)
            out = subprocess.run(
                [sys.executable, "-m", "pyinetd", "status", "-c", str(p.path)],
                capture_output=True,
                text=True,
                timeout=DEADLINE,
                check=True,
            ).stdout
            assert re.search(
                rf"stubborn: pid {pid} 127\.0\.0\.1:\d+ age \S+ stuck \(timeout\)", out
            )
            assert status_of(p)["stubborn"]["running"] == 1  # the slot it still takes
        p.wait_log(rf"stubborn: pid {pid} ended \(signal SIGKILL\)")
        wait_for(lambda: not _children(p, "stubborn"), what="the child gone from status")
        assert status_of(p)["stubborn"]["exits"]["killed"] == 1  # counted as its timeout's kill
    finally:
        held.close()


def test_a_wait_listener_shows_who_holds_its_socket(inetd: Start) -> None:
    port = free_port(socket.SOCK_DGRAM)
    p = inetd(
        {
            "services": {
                "waiter": {
                    "listen": f"127.0.0.1:{port}",
                    "protocol": "udp",
                    "wait": True,
                    # reads its datagram (or it would start the next child at once)
                    "exec": ["/bin/sh", "-c", "head -c 1 >/dev/null; exec sleep 60"],
                }
            }
        }
    )
    svc = status_of(p)["waiter"]
    assert svc["state"] == "listening"
    assert svc["wait"] == [{"listen": f"127.0.0.1:{port}", "state": "idle", "pid": None}]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"hello", ("127.0.0.1", port))
    (line,) = p.wait_log(r"waiter: \S+ -> pid \d+")
    pid = int(line.rsplit(" ", 1)[1])
    svc = status_of(p)["waiter"]
    assert svc["state"] == f"waiting on child {pid}"
    assert svc["wait"] == [{"listen": f"127.0.0.1:{port}", "state": "waiting", "pid": pid}]
    assert svc["children"][0]["state"] == "running"
    assert status_json(p)["pid"] == p.pid  # pyinetd's own pid, not the busy child's
    os.kill(pid, signal.SIGTERM)
    p.wait_log(rf"waiter: pid {pid} ended")
    wait_for(lambda: status_of(p)["waiter"]["wait"][0]["state"] == "idle", what="the socket back")
    assert status_of(p)["waiter"]["state"] == "listening"


def test_only_the_lifecycles_moves_are_allowed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every move between two child states and two wait states: those of the lifecycle
    pass silently, any other is logged at error as a bug (and still taken)."""
    path = tmp_path / "inetd.yaml"
    path.write_text(f"services:\n  echo:\n    listen: 127.0.0.1:{free_port()}\n    protocol: tcp\n")
    svc = load(path).services[0]
    allowed = {
        ("asked", "running"),
        ("running", "terminating"),
        ("running", "killed"),
        ("terminating", "terminating"),
        ("terminating", "killed"),
        ("killed", "stuck"),
    }
    for old in ChildState:
        for new in ChildState:
            child = Child(7, ServiceState(svc), "peer", 0.0, lifecycle=old)
            caplog.clear()
            with caplog.at_level(logging.ERROR, logger=LOG.name):
                child.change_state(new)
            assert child.lifecycle is new
            bug = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
            if (old.value, new.value) in allowed:
                assert not bug, (old, new)
            else:
                assert bug == [f"bug: echo: pid 7: state {old.value} -> {new.value}"]
    waits = {"idle": WAIT_IDLE, "starting": WAIT_STARTING, "waiting": Wait.on(9)}
    wait_moves = {("idle", "starting"), ("starting", "waiting"), ("starting", "idle")}
    wait_moves.add(("waiting", "idle"))
    with socket.socket() as sock:
        for old_name, old_wait in waits.items():
            for new_name, new_wait in waits.items():
                key = ListenKey("tcp", svc.listen[0])
                lst = Listener(key, sock, ServiceState(svc), waiting=old_wait)
                caplog.clear()
                with caplog.at_level(logging.ERROR, logger=LOG.name):
                    lst.change_wait(new_wait)
                assert lst.waiting is new_wait
                bugs = [r for r in caplog.records if r.levelno == logging.ERROR]
                assert bool(bugs) is ((old_name, new_name) not in wait_moves), (old_name, new_name)
