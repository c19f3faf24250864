"""Misbehaving services: the parent reaps, kills on timeout and keeps serving everyone else."""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import DEADLINE, Pyinetd, children_of, free_port, wait_for
from stresslib import LoadThread, group_alive, kill_group, scaled

Start = Callable[..., Pyinetd]

TEN_MB = 10 * 1024 * 1024
TIMEOUT = 1  # seconds, the hung services' timeout


def talk_until_closed(port: int, data: bytes = b"", limit: float = DEADLINE) -> tuple[bytes, str]:
    """Connect, send ``data`` (may be cut short), read until EOF or reset: (reply, how)."""
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as s:
        got = b""
        try:
            if data:
                s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            while chunk := s.recv(65536):
                got += chunk
        except (ConnectionResetError, BrokenPipeError):
            return got, "reset"
        except OSError as exc:
            # The service may exit and the peer reset before our shutdown(): ENOTCONN.
            if exc.errno != errno.ENOTCONN:
                raise
            return got, "reset"
        return got, "eof"


def test_faulty_services_never_stop_the_parent(inetd: Start) -> None:
    ports = {name: free_port() for name in ("exit", "segv", "noread", "noexit", "echo")}
    svc: dict[str, object] = {
        "exit": {"exec": "/bin/true"},
        "segv": {"exec": ["/bin/sh", "-c", "kill -SEGV $$"]},
        # Never reads: the client's 10 MB fill the socket buffers; the timeout kills it.
        "noread": {"exec": ["/bin/sleep", "1000"], "timeout": TIMEOUT},
        # Answers, then never exits.
        "noexit": {"exec": ["/bin/sh", "-c", "echo hi; exec sleep 1000"], "timeout": TIMEOUT},
        "echo": {"builtin": "echo"},
    }
    config = {
        "services": {n: {"listen": f"127.0.0.1:{ports[n]}", **s} for n, s in svc.items()}  # type: ignore[dict-item]
    }
    p = inetd(config)
    load = LoadThread(ports["echo"], total=10**6, concurrency=4)
    load.start()
    rounds, quick, hung = 3, scaled(30), 3
    try:
        for r in range(1, rounds + 1):
            t0 = time.monotonic()
            with ThreadPoolExecutor(max_workers=2 * quick + 2 * hung) as pool:
                exits = [pool.submit(talk_until_closed, ports["exit"]) for _ in range(quick)]
                segvs = [pool.submit(talk_until_closed, ports["segv"], b"x") for _ in range(quick)]
                noreads = [
                    pool.submit(talk_until_closed, ports["noread"], b"z" * TEN_MB)
                    for _ in range(hung)
                ]
                noexits = [pool.submit(talk_until_closed, ports["noexit"]) for _ in range(hung)]
                for f in exits + segvs:
                    assert f.result()[0] == b""
                for f in noreads:
                    assert f.result() in ((b"", "reset"), (b"", "eof"))
                for f in noexits:
                    assert f.result() == (b"hi\n", "eof")
            # The hung ones ended by the timeout, not earlier and not much later.
            assert TIMEOUT <= time.monotonic() - t0 < TIMEOUT + DEADLINE / 2
            p.wait_log(r"exit: pid \d+ ended \(exit 0\)", count=quick * r)
            p.wait_log(r"segv: pid \d+ ended \(signal SIGSEGV\)", count=quick * r)
            for name in ("noread", "noexit"):
                p.wait_log(rf"{name}: pid \d+ timed out after {TIMEOUT}(\.0)?s", count=hung * r)
                p.wait_log(rf"{name}: pid \d+ ended \(signal SIGTERM\)", count=hung * r)
    finally:
        res = load.finish()
    print(f"\nfaults: {rounds} rounds x ({quick} exit + {quick} SIGSEGV + {hung} never-read "
          f"+ {hung} never-exit); echo alongside: {res.summary()}")  # fmt: skip
    assert res.ok > 0 and not res.failed, res.summary()
    wait_for(lambda: not children_of(p.pid), what="every child reaped")
    assert p.proc.poll() is None
    assert "internal error" not in p.log()


def grandchild_service(inetd: Start) -> tuple[Pyinetd, int, int]:
    """A service that leaves a grandchild holding the connection; (pyinetd, port, echo port)."""
    port, echo = free_port(), free_port()
    p = inetd({"services": {
        "fork": {"listen": f"127.0.0.1:{port}", "timeout": TIMEOUT,
                 "exec": ["/bin/sh", "-c", "sleep 1000 & echo forked; exit 0"]},
        "echo": {"listen": f"127.0.0.1:{echo}"},
    }})  # fmt: skip
    return p, port, echo


def test_child_that_forks_and_exits_is_reaped_at_once(inetd: Start) -> None:
    p, port, echo = grandchild_service(inetd)
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
        (line,) = p.wait_log(r"fork: \S+ -> pid \d+")
        pgid = int(line.rsplit(" ", 1)[1])
        try:
            assert s.recv(100) == b"forked\n"
            p.wait_log(rf"fork: pid {pgid} ended \(exit 0\)")
            assert children_of(p.pid) == []  # reaped: no zombie while the grandchild lives
            assert group_alive(pgid)  # the grandchild still holds the connection
            with socket.create_connection(("127.0.0.1", echo), timeout=DEADLINE) as e:
                e.sendall(b"still serving")
                assert e.recv(100) == b"still serving"
        finally:
            kill_group(pgid)


def test_timeout_kills_the_process_group_a_reaped_child_left_behind(inetd: Start) -> None:
    p, port, _ = grandchild_service(inetd)
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
        (line,) = p.wait_log(r"fork: \S+ -> pid \d+")
        pgid = int(line.rsplit(" ", 1)[1])
        try:
            p.wait_log(rf"fork: pid {pgid} ended \(exit 0\)")
            s.settimeout(TIMEOUT + 3)
            got = b""
            try:
                while chunk := s.recv(100):
                    got += chunk
            except TimeoutError:
                pytest.fail("the grandchild still holds the connection after the timeout")
            assert got == b"forked\n"
            wait_for(lambda: not group_alive(pgid), what="the process group to be killed")
        finally:
            kill_group(pgid)
