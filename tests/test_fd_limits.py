"""The parent's file descriptors: its limit, what one client may hold of them, and what still
works at the limit (issue 24, items 5, 7 and 13). Real pyinetd processes, real sockets; the
parent's limit is lowered with prlimit as an administrator (or systemd's default) would set it.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    DEADLINE,
    Pyinetd,
    closed_by_server,
    free_port,
    idle_connections,
    tcp_talk,
    wait_for,
)

from pyinetd.config import build
from pyinetd.runtime import control, systemd

Start = Callable[..., Pyinetd]
NOFILE = 256  # the attack's soft limit (systemd's default is 1024)
EMFILE_LINE = r"accept: Too many open files"


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time ``pid`` has used (/proc/PID/stat utime, stime)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def soft_nofile(pid: int) -> int:
    return resource.prlimit(pid, resource.RLIMIT_NOFILE)[0]


def accepted_on(port: int) -> int:
    """Connections to local TCP ``port`` that a process has accepted (/proc/net/tcp: one in the
    backlog has inode 0 until accept() gives it a file)."""
    with open("/proc/net/tcp") as f:
        rows = [row.split() for row in f.read().splitlines()[1:]]
    return sum(
        1 for r in rows if int(r[1].rsplit(":", 1)[1], 16) == port and r[3] == "01" and r[9] != "0"
    )


def limit_fds(p: Pyinetd, soft: int = NOFILE, hard: int = NOFILE) -> None:
    """The running parent's RLIMIT_NOFILE, as `prlimit --pid PID --nofile=SOFT:HARD`."""
    resource.prlimit(p.pid, resource.RLIMIT_NOFILE, (soft, hard))
    assert fd_count(p.pid) < soft // 4


def status(path: Path) -> dict[str, Any]:
    """`pyinetd status` over the control socket, failing after 5 seconds."""
    answer = control.request(str(path), "status", timeout=5.0)
    assert answer["ok"], answer
    return answer


def unbounded_echo(port: int) -> dict[str, object]:
    """A built-in echo whose administrator lifted the per-client default: one client can
    take the parent to its fd limit."""
    return {"listen": f"127.0.0.1:{port}", "builtin": "echo", "per_source": 100_000}


# ---------------------------------------------------------------- item 5: the limit itself


@pytest.mark.parametrize("primitive", ["clone", "posix_spawn"])
def test_parent_raises_its_fd_limit_and_programs_get_the_one_it_was_given(
    inetd: Start, tmp_path: Path, primitive: str
) -> None:
    """Under systemd's soft limit (1024, here 256) one client's idle sessions pinned the parent
    at its limit; it never raised it. Programs must not get the raised limit (select() breaks
    above 1024): they get the limit pyinetd had, or their rlimits: {nofile}."""
    ports = [free_port() for _ in range(3)]
    show = ["/bin/sh", "-c", "echo $(ulimit -Sn) $(ulimit -Hn)"]
    p = inetd(
        {
            "workers": 2,  # a worker hands on the limit the first process was started with
            "services": {
                "plain": {"listen": f"127.0.0.1:{ports[0]}", "exec": show},
                "fork": {"listen": f"127.0.0.1:{ports[1]}", "exec": show, "user": "nobody"},
                "own": {
                    "listen": f"127.0.0.1:{ports[2]}",
                    "exec": show,
                    "rlimits": {"nofile": 100},
                },
            },
        },
        prefix=("prlimit", f"--nofile={NOFILE}:4096"),
        env={"PYINETD_SPAWN": primitive},
    )
    assert soft_nofile(p.pid) == 4096
    p.wait_log(r"worker 1: listening")
    for _ in range(8):  # (either process may accept a connection to "plain")
        assert tcp_talk(ports[0]) == f"{NOFILE} 4096\n".encode()
        assert tcp_talk(ports[1]) == f"{NOFILE} 4096\n".encode()
        assert tcp_talk(ports[2]) == b"100 100\n"


def test_builtin_tcp_services_get_per_source_and_timeout_by_default(tmp_path: Path) -> None:
    cfg = build(
        {
            "services": {
                "e": {"listen": 7, "builtin": "echo"},
                "u": {"listen": 7, "builtin": "echo", "protocol": "udp"},
                "x": {"listen": 8, "exec": "/bin/cat"},
                "mine": {"listen": 9, "builtin": "chargen", "per_source": 50, "timeout": 0},
                # max_connections set: the administrator's bound, no per_source added
                "big": {"listen": 10, "builtin": "echo", "max_connections": 1000},
            }
        },
        tmp_path / "inetd.yaml",
    )
    by_name = {s.name: s for s in cfg.services}
    assert (by_name["e"].per_source, by_name["e"].timeout) == (10, 300.0)
    assert (by_name["u"].per_source, by_name["u"].timeout) == (None, None)
    assert (by_name["x"].per_source, by_name["x"].timeout) == (None, None)
    assert (by_name["mine"].per_source, by_name["mine"].timeout) == (50, 0.0)
    assert (by_name["big"].per_source, by_name["big"].timeout) == (None, 300.0)


def test_one_clients_idle_echo_sessions_leave_status_and_other_services_working(
    inetd: Start, tmp_path: Path
) -> None:
    """5,000 connects from one client, half to the built-in echo: parent at 256/256 fds,
    `pyinetd status` timed out, every service failed."""
    echo, cat = free_port(), free_port()
    path = tmp_path / "control.sock"
    p = inetd(
        {
            "services": {
                "echo": {"listen": f"127.0.0.1:{echo}", "builtin": "echo"},
                "cat": {"listen": f"127.0.0.1:{cat}", "exec": "/bin/cat"},
            }
        },
        "--control",
        str(path),
    )
    limit_fds(p)
    n = 2 * NOFILE
    with idle_connections(echo, n) as socks:
        # Each connection is either held by pyinetd or refused; stop waiting when pyinetd is
        # done with them all, or when it is at its limit (the attack).
        wait_for(
            lambda: (
                sum(closed_by_server(s) for s in socks) >= n - 10 or fd_count(p.pid) >= NOFILE - 1
            ),
            what="every connection held or refused",
        )
        answer = status(path)
        (entry,) = [s for s in answer["status"]["services"] if s["name"] == "echo"]
        assert entry["refused"].get("per_source", 0) >= n - 10, entry
        assert fd_count(p.pid) < NOFILE // 2
        assert tcp_talk(cat, b"still served\n", timeout=5.0) == b"still served\n"


def test_status_answers_with_every_parent_fd_taken(inetd: Start, tmp_path: Path) -> None:
    """The control socket keeps an fd in reserve: at the fd limit `status` still answers (and
    again, once the reserve is back), and the parent does not spin on the queued client."""
    echo = free_port()
    path = tmp_path / "control.sock"
    p = inetd({"services": {"echo": unbounded_echo(echo)}}, "--control", str(path))
    limit_fds(p)
    with idle_connections(echo, NOFILE + 16):
        p.wait_log(EMFILE_LINE)
        wait_for(lambda: fd_count(p.pid) >= NOFILE, what="the parent at its fd limit")
        for _ in range(3):
            assert status(path)["status"]["services"][0]["running"] >= NOFILE // 2


def test_watchdog_pets_go_on_with_every_parent_fd_taken(inetd: Start, tmp_path: Path) -> None:
    """With 1,000 idle echo connections 0 WATCHDOG=1 in 12 s (a socket per message, and no fd
    free for it): systemd restarted pyinetd every WatchdogSec=. The socket is kept open."""
    echo = free_port()
    npath = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ns:
        ns.bind(str(npath))
        p = inetd(
            {"services": {"echo": unbounded_echo(echo)}},
            env={"NOTIFY_SOCKET": str(npath), "WATCHDOG_USEC": "200000"},  # a pet each 0.1 s
        )
        limit_fds(p)
        with idle_connections(echo, NOFILE + 16):
            p.wait_log(EMFILE_LINE)
            wait_for(lambda: fd_count(p.pid) >= NOFILE, what="the parent at its fd limit")
            ns.settimeout(0.0)
            with contextlib.suppress(BlockingIOError):
                while True:  # what was sent before the limit was reached
                    ns.recv(4096)
            ns.settimeout(DEADLINE)
            pets = 0
            end = time.monotonic() + DEADLINE
            while pets < 5 and time.monotonic() < end:
                try:
                    pets += ns.recv(4096) == b"WATCHDOG=1"
                except TimeoutError:
                    break
            assert pets == 5, f"{pets} pets at the fd limit"


def test_sd_notify_connects_again_to_a_new_receiver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One socket for the process's life, connected again when the receiver at the path is
    replaced (systemd re-executed)."""
    path = tmp_path / "notify.sock"
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as first:
            first.bind(str(path))
            first.settimeout(DEADLINE)
            assert systemd.notify("STATUS=one")
            kept = systemd._notify_sock
            assert systemd.notify("STATUS=two")
            assert systemd._notify_sock is kept
            assert [first.recv(64), first.recv(64)] == [b"STATUS=one", b"STATUS=two"]
        path.unlink()
        assert not systemd.notify("STATUS=lost")  # nobody listens: dropped, not raised
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as second:
            second.bind(str(path))
            second.settimeout(DEADLINE)
            assert systemd.notify("STATUS=three")
            assert second.recv(64) == b"STATUS=three"
    finally:
        systemd.close_notify()


# ---------------------------------------------------------------- item 7: no spin at the limit


def test_a_queued_metrics_client_at_the_fd_limit_does_not_spin_the_parent(
    inetd: Start, tmp_path: Path
) -> None:
    """At the fd limit one queued metrics connection took 2.98 s of CPU in 3 s: the request
    server's accept handler returned on EMFILE and the level-triggered selector called it again
    at once. It rests instead, and serves the client once fds are free."""
    echo, mport = free_port(), free_port()
    p = inetd({"metrics": f"127.0.0.1:{mport}", "services": {"echo": unbounded_echo(echo)}})
    limit_fds(p)
    with contextlib.ExitStack() as stack:
        with idle_connections(echo, NOFILE + 16):
            p.wait_log(EMFILE_LINE)
            wait_for(lambda: fd_count(p.pid) >= NOFILE, what="the parent at its fd limit")
            queued = stack.enter_context(socket.create_connection(("127.0.0.1", mport), 5.0))
            queued.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            before = cpu_seconds(p.pid)
            time.sleep(2.0)  # the window the CPU time is measured over, not a wait
            used = cpu_seconds(p.pid) - before
            assert used < 0.3, f"{used:.2f} s of CPU in 2 s at the fd limit"
        # The idle connections are gone: the queued client is answered.
        queued.settimeout(DEADLINE)
        chunks = []
        while chunk := queued.recv(65536):
            chunks.append(chunk)
        assert b"".join(chunks).startswith(b"HTTP/1.0 200 OK")


# ---------------------------------------------------------------- item 13: idle metrics clients


def test_idle_metrics_clients_make_room_for_a_scrape(inetd: Start) -> None:
    """32 idle connections from 4 addresses (8 each, the per-source bound) took every metrics
    slot until their 5 s deadline: Prometheus' scrape got a reset. The oldest idle one goes."""
    mport = free_port()
    inetd(
        {"metrics": f"127.0.0.1:{mport}", "services": {"e": {"listen": f"127.0.0.1:{free_port()}"}}}
    )
    sources = [f"127.0.0.{i}" for i in range(2, 6)]
    with contextlib.ExitStack() as stack:
        idle = [stack.enter_context(idle_connections(mport, 8, source=src)) for src in sources]
        wait_for(lambda: accepted_on(mport) == 32, what="32 idle metrics clients accepted")
        out = tcp_talk(mport, b"GET /metrics HTTP/1.0\r\n\r\n", timeout=5.0)
        assert out.startswith(b"HTTP/1.0 200 OK"), out[:100]
        assert b"pyinetd_connections_accepted_total" in out
        # The oldest idle client was the one closed; the other 31 are still held.
        assert closed_by_server(idle[0][0])
        assert sum(closed_by_server(s) for group in idle for s in group) == 1
