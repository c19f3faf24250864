"""Running out of file descriptors and processes: the parent survives, logs once, recovers."""

from __future__ import annotations

import os
import pwd
import re
import resource
import select
import shutil
import socket
import time
from collections.abc import Callable

import pytest
from conftest import (
    DEADLINE,
    Pyinetd,
    children_of,
    free_port,
    status_of,
    tcp_talk,
    wait_for,
)
from stresslib import WrappedPyinetd, fd_count, public_dir

Start = Callable[..., Pyinetd]

NOFILE = 64
EMFILE_LINE = r"Too many open files"
ACCEPT_EMFILE = r"accept: Too many open files"


def limit_fds(p: Pyinetd) -> None:
    """Give the running parent a low RLIMIT_NOFILE, as `prlimit --pid PID --nofile=64:64`."""
    resource.prlimit(p.pid, resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
    assert fd_count(p.pid) < NOFILE // 4  # room for dozens of connections first


def unbounded_echo(port: int) -> dict[str, object]:
    """The built-in echo without its per_source default (10): every connection here comes
    from one address."""
    return {"listen": f"127.0.0.1:{port}", "builtin": "echo", "per_source": 100_000}


def count(p: Pyinetd, pattern: str) -> int:
    return len(re.findall(pattern, p.log()))


def readable(s: socket.socket) -> bool:
    return bool(select.select([s], [], [], 0)[0])


def exhaust(
    p: Pyinetd, port: int, extra: int, pattern: str = EMFILE_LINE
) -> tuple[list[socket.socket], list[socket.socket], int]:
    """Open connections (each sends b"ping") one by one until the parent logs running out
    of fds, then ``extra`` more. Returns (echoed, waiting, dropped): connections that were
    served, that wait unanswered, and how many were closed without an answer."""
    before = count(p, pattern)
    served: list[socket.socket] = []
    dropped = 0
    for _ in range(4 * NOFILE):
        s = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        s.sendall(b"ping")
        wait_for(lambda s=s: readable(s) or count(p, pattern) > before, what="echo or EMFILE")  # type: ignore[misc]
        if readable(s):
            try:
                got = s.recv(10)
            except ConnectionResetError:
                got = b""
            if got == b"ping":
                served.append(s)
                continue
            dropped += 1
            s.close()
            continue
        waiting = [s]
        break
    else:
        raise AssertionError(f"no fd exhaustion after {4 * NOFILE} connections:\n{p.log()}")
    for _ in range(extra):
        s = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        s.sendall(b"ping")
        waiting.append(s)
    return served, waiting, dropped


def hold_exhausted(p: Pyinetd, seconds: float) -> None:
    """Keep the parent out of fds for a while (several of its retry pauses); it stays up."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert p.proc.poll() is None
        assert fd_count(p.pid) >= NOFILE - 2  # - 2: a pipe needs two
        time.sleep(0.05)  # a soak for a fixed duration, not synchronisation


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


def test_fd_exhaustion_logged_once_per_episode_and_recovers(inetd: Start) -> None:
    port = free_port()
    p = inetd({"services": {"echo": unbounded_echo(port)}})
    limit_fds(p)
    for episode in (1, 2):
        served, waiting, dropped = exhaust(p, port, extra=5)
        try:
            assert dropped == 0 and len(served) > NOFILE // 2
            assert fd_count(p.pid) == NOFILE
            print(f"\nepisode {episode}: {len(served)} sessions at RLIMIT_NOFILE {NOFILE}, "
                  f"{len(waiting)} waiting in the backlog")  # fmt: skip
            hold_exhausted(p, 1.5)  # three EMFILE_PAUSE retries, all failing
            assert count(p, ACCEPT_EMFILE) == episode
            close_all(served)
            for s in waiting:  # the clients waiting in the backlog are served, not dropped
                assert s.recv(10) == b"ping"
        finally:
            close_all(served + waiting)
        p.wait_log(r"accepting again: file descriptors available", count=episode)
        assert tcp_talk(port, b"again") == b"again"
        assert count(p, ACCEPT_EMFILE) == episode
    assert count(p, EMFILE_LINE) == 2


def test_fd_exhaustion_slots_freeing_one_by_one_stay_one_episode(inetd: Start) -> None:
    port = free_port()
    p = inetd({"services": {"echo": unbounded_echo(port)}})
    limit_fds(p)
    served, waiting, _ = exhaust(p, port, extra=4)
    try:
        for old, new in zip(served, waiting, strict=False):
            old.close()  # one slot frees; a waiting client takes it; the parent is full again
            assert new.recv(10) == b"ping"
        assert count(p, EMFILE_LINE) == 1, p.log()
    finally:
        close_all(served + waiting)


def test_exec_children_cost_the_parent_no_fd_each(inetd: Start) -> None:
    """Twice RLIMIT_NOFILE long-lived exec children: the parent closes each connection once
    the child has it, and stderr: log (the default) is one socket per service, so it never
    runs out of fds however many children run."""
    port = free_port()
    p = inetd({"services": {"cat": {"listen": f"127.0.0.1:{port}", "exec": "/bin/cat"}}})
    limit_fds(p)
    held: list[socket.socket] = []
    try:
        for i in range(2 * NOFILE):
            s = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
            held.append(s)
            s.sendall(b"ping%d" % i)
            assert s.recv(16) == b"ping%d" % i
        assert len(children_of(p.pid)) == 2 * NOFILE
        assert fd_count(p.pid) < NOFILE // 4, fd_count(p.pid)
        assert count(p, EMFILE_LINE) == 0, p.log()
    finally:
        close_all(held)
    wait_for(lambda: not children_of(p.pid), what="every cat reaped")
    assert tcp_talk(port, b"again") == b"again"


# ---------------------------------------------------------------- processes
def hold(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the service as nobody")
def test_service_nproc_limit_fails_spawns_and_others_keep_serving(inetd: Start) -> None:
    """RLIMIT_NPROC is not enforced for root: the service runs as nobody, where it is."""
    port, echo = free_port(), free_port()
    nproc = 3
    p = inetd({"services": {
        "capped": {"listen": f"127.0.0.1:{port}", "exec": "/bin/cat", "user": "nobody",
                   "cwd": "/", "rlimits": {"nproc": nproc}},
        "echo": {"listen": f"127.0.0.1:{echo}"},
    }})  # fmt: skip
    held: list[socket.socket] = []
    try:
        for _ in range(nproc + 4):
            s = hold(port)
            held.append(s)
            s.sendall(b"up")
            try:
                got = s.recv(10)
            except ConnectionResetError:
                got = b""
            if got != b"up":
                break
        else:
            pytest.fail(f"{nproc + 4} processes of nobody with rlimits nproc {nproc}")
        # The limit bites at (about) the configured count: Linux counts nobody's processes
        # at setuid() and at execve(), so one more may slip in, never fewer.
        assert nproc <= len(held) - 1 <= nproc + 1
        # The child could not exec: a spawn failure by its errno, one error line, as on
        # every path; the parent lives on.
        p.wait_log(r"error: capped: cannot start \S*/cat: Resource temporarily unavailable")
        assert status_of(p)["capped"]["spawn_failures"].get("EAGAIN", 0) >= 1
        assert tcp_talk(echo, b"fine") == b"fine"
    finally:
        close_all(held)
    wait_for(lambda: not children_of(p.pid), what="every child reaped")
    assert tcp_talk(port, b"again") == b"again"


def nobody_processes() -> int:
    uid = pwd.getpwnam("nobody").pw_uid
    n = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    n += 1
            except FileNotFoundError:
                continue
    return n


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run pyinetd as nobody")
def test_parent_nproc_limit_spawn_failures_logged_parent_serves_on() -> None:
    """The parent itself at its RLIMIT_NPROC: posix_spawn fails with EAGAIN in the parent."""
    port, echo = free_port(), free_port()
    config = {"services": {
        "cat": {"listen": f"127.0.0.1:{port}", "exec": "/bin/cat"},
        "echo": {"listen": f"127.0.0.1:{echo}"},
    }}  # fmt: skip
    if shutil.which("setpriv") is None or shutil.which("prlimit") is None:
        pytest.skip("setpriv or prlimit not installed")
    # Room for the parent itself and two children of nobody (plus nobody's other processes).
    limit = nobody_processes() + 3
    prefix = [f"--nproc={limit}:{limit}", "setpriv", "--reuid=nobody", "--regid=nogroup",
              "--clear-groups", "--"]  # fmt: skip
    with public_dir() as folder:
        p = WrappedPyinetd(config, folder, ["prlimit", *prefix])
        try:
            parent_at_its_nproc_limit(p, port, echo)
        finally:
            p.stop()


def parent_at_its_nproc_limit(p: Pyinetd, port: int, echo: int) -> None:
    held: list[socket.socket] = []
    try:
        for _ in range(2):
            s = hold(port)
            held.append(s)
            s.sendall(b"up")
            assert s.recv(10) == b"up"
        for i in range(1, 4):
            assert tcp_talk(port) == b""  # cannot start: the client is closed
            p.wait_log(r"cat: cannot start \S*/cat: Resource temporarily unavailable; "
                       r"closing 127\.0\.0\.1:\d+", count=i)  # fmt: skip
            assert tcp_talk(echo, b"fine") == b"fine"
        close_all(held)
        wait_for(lambda: not children_of(p.pid), what="every child reaped")
        assert tcp_talk(port, b"again") == b"again"
        assert p.proc.poll() is None
    finally:
        close_all(held)
