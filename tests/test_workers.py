"""`workers: N`: more accept loops in separate processes, sharing the listening sockets."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from conftest import Pyinetd, free_port, pid_gone, script, tcp_talk, wait_for

Start = Callable[..., Pyinetd]


def worker_pid(p: Pyinetd, after: int = 0) -> int:
    """The pid of worker 1 from pyinetd's log (the ``after``-th start line, counting from 0)."""
    lines = p.wait_log(r"worker 1: pid \d+$", count=after + 1)
    return int(lines[after].rsplit(" ", 1)[1])


@contextmanager
def stopped(pid: int) -> Iterator[None]:
    """SIGSTOP ``pid`` for the block: only the other process can accept meanwhile."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def served_by(port: int) -> int:
    """The pid of the process that started the service for one connection (its PPID)."""
    return int(tcp_talk(port).split()[0])


def ppid_service(tmp_path: Path) -> str:
    return script(tmp_path, "ppid.sh", "#!/bin/sh\necho $PPID\n")


def test_both_processes_accept_on_the_shared_sockets(inetd: Start, tmp_path: Path) -> None:
    port = free_port()
    sock = str(tmp_path / "u.sock")
    svc = ppid_service(tmp_path)
    p = inetd({"workers": 2, "services": {
        "who": {"listen": f"127.0.0.1:{port}", "exec": svc},
        "local": {"listen": sock, "protocol": "unix", "exec": svc},
    }})  # fmt: skip
    worker = worker_pid(p)
    p.wait_log(r"worker 1: listening")
    with stopped(p.pid):  # the first process cannot accept: the worker serves
        assert served_by(port) == worker
    with stopped(worker):
        assert served_by(port) == p.pid
    status = subprocess.run(
        [sys.executable, "-m", "pyinetd", "status", "-c", str(p.path)],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    assert f"; workers {worker} (counts above are this process's)" in status
    # unix sockets stay with the first process (one binder per path)
    out = subprocess.run(
        ["socat", "-t5", "-", f"UNIX-CONNECT:{sock}"],
        input=b"", capture_output=True, timeout=10, check=True,
    ).stdout  # fmt: skip
    assert int(out.split()[0]) == p.pid


def test_max_children_is_refused_with_workers(tmp_path: Path) -> None:
    doc = {"workers": 2, "max_children": 10, "services": {"s": {"listen": "127.0.0.1:7"}}}
    path = tmp_path / "inetd.yaml"
    path.write_text(yaml.safe_dump(doc))
    r = subprocess.run(
        [sys.executable, "-m", "pyinetd", "-c", str(path), "--check"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip() == (
        f"{path}:1:1: max_children: not with workers: 2 (each worker process counts only its own "
        "children)"
    )


def listening_pids(port: int) -> set[int]:
    out = subprocess.run(
        ["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    return {int(x) for x in re.findall(r"pid=(\d+)", out)}


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_reload_binds_new_ports_in_every_process_and_retires_extra_workers(
    inetd: Start, tmp_path: Path
) -> None:
    port, new = free_port(), free_port()
    svc = ppid_service(tmp_path)
    cfg: dict[str, object] = {
        "workers": 2,
        "services": {"a": {"listen": f"127.0.0.1:{port}", "exec": svc}},
    }
    p = inetd(cfg)
    worker = worker_pid(p)
    p.wait_log(r"worker 1: listening")
    cfg["services"] = {
        "a": {"listen": f"127.0.0.1:{port}", "exec": svc},
        "b": {"listen": f"127.0.0.1:{new}", "exec": svc},
    }
    p.path.write_text(yaml.safe_dump(cfg))
    p.signal(signal.SIGHUP)
    p.wait_log(rf"pyinetd\[{worker}\]: reloaded")
    p.wait_log(rf"pyinetd\[{p.pid}\]: reloaded")
    # SO_REUSEPORT: each process bound the new port itself; both accept there
    wait_for(lambda: listening_pids(new) == {p.pid, worker}, what="both processes on the new port")
    assert served_by(new) in (p.pid, worker)
    cfg["workers"] = 1
    p.path.write_text(yaml.safe_dump(cfg))
    p.signal(signal.SIGHUP)
    wait_for(lambda: pid_gone(worker), what="the extra worker retired")
    assert served_by(new) == p.pid
    assert served_by(port) == p.pid


def test_a_dead_worker_is_started_again_and_stop_takes_workers_along(
    inetd: Start, tmp_path: Path
) -> None:
    port = free_port()
    p = inetd(
        {
            "workers": 2,
            "services": {"a": {"listen": f"127.0.0.1:{port}", "exec": ppid_service(tmp_path)}},
        }
    )
    first = worker_pid(p)
    p.wait_log(r"worker 1: listening")
    os.kill(first, signal.SIGKILL)
    p.wait_log(rf"worker 1 \(pid {first}\) exited \(-9\); starting it again in 1s")
    second = worker_pid(p, after=1)
    p.wait_log(rf"pyinetd\[{second}\]: worker 1: listening")
    with stopped(p.pid):
        assert served_by(port) == second
    assert p.stop() == 0
    wait_for(lambda: pid_gone(second), what="the worker stopped with the first process")


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
@pytest.mark.parametrize(
    "limit",
    [{"max_connections": 5}, {"per_source": 2}, {"rate": "100/s"}],
    ids=lambda d: next(iter(d)),
)
def test_a_service_with_a_counted_limit_stays_with_the_first_process(
    inetd: Start, tmp_path: Path, limit: dict[str, object]
) -> None:
    free, limited = free_port(), free_port()
    svc = ppid_service(tmp_path)
    cfg: dict[str, object] = {
        "workers": 2,
        "services": {
            "free": {"listen": f"127.0.0.1:{free}", "exec": svc},
            "limited": {"listen": f"127.0.0.1:{limited}", "exec": svc, **limit},
        },
    }
    p = inetd(cfg)
    worker = worker_pid(p)
    p.wait_log(r"worker 1: listening")
    assert listening_pids(free) == {p.pid, worker}
    assert listening_pids(limited) == {p.pid}  # one process counts its connections
    with stopped(p.pid):
        assert served_by(free) == worker
    assert served_by(limited) == p.pid
    # a limit added by a reload takes the service away from the worker
    cfg["services"]["free"].update(limit)  # type: ignore[index]
    p.path.write_text(yaml.safe_dump(cfg))
    p.signal(signal.SIGHUP)
    p.wait_log(rf"pyinetd\[{worker}\]: reloaded")
    wait_for(lambda: listening_pids(free) == {p.pid}, what="the worker closed the limited port")
    assert served_by(free) == p.pid
