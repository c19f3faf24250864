"""pyinetd._spawn, called directly: real children, their fds, signals, exec errors, slots."""

from __future__ import annotations

import errno
import os
import platform
import select
import signal
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import DEADLINE

from pyinetd import _spawn
from pyinetd.signals import handled_signals

pytestmark = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "aarch64"), reason="start() is x86_64/arm64 only"
)

PROBE = (
    "ls /proc/self/fd; grep -E '^Sig(Blk|Ign):' /proc/self/status; cut -d' ' -f5,6,7 /proc/$$/stat"
)


def inheritable_fds() -> set[int]:
    """This process's fds above 2 without close-on-exec (pytest's own, the shell's)."""
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if int(name) > 2 and os.get_inheritable(int(name)):
                out.add(int(name))
        except OSError:
            continue  # the directory listdir had open
    return out


def read_all(sock: socket.socket) -> bytes:
    sock.settimeout(DEADLINE)
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def wait_exit(pid: int) -> int:
    """The child's exit code (waits at most DEADLINE through a pidfd)."""
    fd = os.pidfd_open(pid)
    try:
        assert select.select([fd], [], [], DEADLINE)[0], f"pid {pid} did not exit"
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.fixture
def report() -> Iterator[tuple[int, int]]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    yield r, w
    os.close(r)
    os.close(w)


@pytest.fixture(autouse=True)
def all_slots() -> Iterator[None]:
    yield
    _spawn.set_slots(16)


@pytest.mark.parametrize("how", ["start", "spawn"])
def test_child_gets_fds_0_1_2_its_own_session_and_no_handlers(
    how: str, report: tuple[int, int]
) -> None:
    ours, theirs = socket.socketpair()
    old = signal.signal(signal.SIGUSR1, lambda *_: None)
    other = socket.socket()  # an fd of ours that must not reach the child
    try:
        fn = _spawn.start if how == "start" else _spawn.spawn
        argv = [b"/bin/sh", b"-c", PROBE.encode()]
        pid = fn(argv, [b"PATH=/usr/bin:/bin"], [b"X=1"], theirs.fileno(), theirs.fileno(),
                 theirs.fileno(), report[1], handled_signals())  # fmt: skip
        theirs.close()
        out = read_all(ours).decode().split()
    finally:
        signal.signal(signal.SIGUSR1, old)
        other.close()
        ours.close()
    assert wait_exit(pid) == 0
    # pyinetd seals what it inherited at start (spawn.seal_inherited_fds); pytest has not.
    fds = {int(x) for x in out[: out.index("SigBlk:")]} - inheritable_fds()
    assert sorted(fds) == [0, 1, 2, 3], out  # 3: the directory ls reads
    for field in ("SigBlk:", "SigIgn:"):  # (caught ones: exec resets them anyway)
        assert int(out[out.index(field) + 1], 16) == 0, (field, out)
    pgrp, session, tty = (int(x) for x in out[-3:])
    # A session of its own (so a group too), with no controlling terminal (issue 18.3)
    assert (pgrp, session, tty) == (pid, pid, 0)


def test_failed_exec_is_reported_on_the_pipe_and_exits_127(report: tuple[int, int]) -> None:
    r, w = report
    pid = _spawn.start([b"/nonexistent/prog"], [], [], 0, 1, 2, w, ())
    assert wait_exit(pid) == 127
    failed, err = struct.unpack("=ii", os.read(r, 64))
    assert (failed, err) == (pid, errno.ENOENT)


def test_without_a_free_slot_start_takes_the_vfork_path(report: tuple[int, int]) -> None:
    """vfork knows at once: a failed exec raises instead of being reported later."""
    _spawn.set_slots(0)
    with pytest.raises(FileNotFoundError):
        _spawn.start([b"/nonexistent/prog"], [], [], 0, 1, 2, report[1], ())
    with pytest.raises(BlockingIOError):
        os.read(report[0], 64)  # nothing written: the error came back at once
    pid = _spawn.start([b"/bin/true"], [], [], 0, 1, 2, report[1], ())
    assert wait_exit(pid) == 0


def test_slots_are_reused_after_exec(report: tuple[int, int]) -> None:
    """Two slots, 200 children: each slot is freed by the kernel at its child's exec."""
    _spawn.set_slots(2)
    pids = [_spawn.start([b"/bin/true"], [], [], 0, 1, 2, report[1], ()) for _ in range(200)]
    assert [wait_exit(pid) for pid in pids] == [0] * 200


def test_an_environment_larger_than_a_slot_takes_the_vfork_path(
    report: tuple[int, int], tmp_path: Path
) -> None:
    big = [b"V%d=%s" % (i, b"x" * 1000) for i in range(400)]  # 400 kB > a slot's 256 kB
    out = tmp_path / "env"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC)
    try:
        pid = _spawn.start([b"/usr/bin/env"], big, [b"LAST=yes"], 0, fd, 2, report[1], ())
        assert wait_exit(pid) == 0
    finally:
        os.close(fd)
    lines = out.read_bytes().splitlines()
    assert lines == [*big, b"LAST=yes"]


def test_arguments_are_checked_before_any_child_starts(report: tuple[int, int]) -> None:
    with pytest.raises(TypeError):
        _spawn.start(["/bin/true"], [], [], 0, 1, 2, report[1], ())  # type: ignore[list-item]
    with pytest.raises(ValueError):
        _spawn.start([], [], [], 0, 1, 2, report[1], ())
    with pytest.raises(ValueError):
        _spawn.set_slots(17)


def test_a_child_before_its_exec_is_held_until_settle(
    report: tuple[int, int],
) -> None:
    """Until its exec a clone child holds a copy of every fd: a listener closed meanwhile
    keeps its port. settle() waits that out (what a reload and a stop call)."""
    cpus = os.sched_getaffinity(0)
    # One CPU for parent and child: after clone the parent runs on, so the SIGSTOP below
    # usually lands before the child has run at all.
    os.sched_setaffinity(0, {min(cpus)})
    pid = 0
    try:
        for _ in range(50):
            lst = socket.socket()
            lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lst.bind(("127.0.0.1", 0))
            lst.listen()
            addr = lst.getsockname()
            pid = _spawn.start([b"/bin/true"], [], [], 0, 1, 2, report[1], ())
            os.kill(pid, signal.SIGSTOP)
            lst.close()
            if _spawn.settle(0.05):  # it had exec'd before the stop: try again
                os.kill(pid, signal.SIGCONT)
                assert wait_exit(pid) == 0
                pid = 0
                continue
            # Not run yet: still in our group, as no parent-side setpgid may make it a group
            # leader (its setsid would fail); server._kill_group signals the pid itself too.
            with socket.socket() as again:
                again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    again.bind(addr)
                except OSError as exc:
                    assert exc.errno == errno.EADDRINUSE  # held by the stopped child
                else:  # stopped after its close_range, just before its exec: try again
                    os.kill(pid, signal.SIGCONT)
                    assert wait_exit(pid) == 0
                    pid = 0
                    continue
                os.kill(pid, signal.SIGCONT)
                assert _spawn.settle(DEADLINE)
                again.bind(addr)  # free now: the child dropped it before its exec
            assert wait_exit(pid) == 0
            pid = 0
            return
        pytest.fail("no child could be stopped before its close_range in 50 tries")
    finally:
        os.sched_setaffinity(0, cpus)
        if pid:  # a failure above: a stopped child before its exec holds our stdout
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


@pytest.mark.parametrize("how", ["start", "spawn"])
@pytest.mark.parametrize("flags", [0, 1])
def test_no_new_privs_flag_reaches_the_child(
    how: str, flags: int, report: tuple[int, int], tmp_path: Path
) -> None:
    """flags=1: prctl(PR_SET_NO_NEW_PRIVS) in the child before its exec; 0: left alone."""
    out = tmp_path / "status"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC)
    try:
        fn = _spawn.start if how == "start" else _spawn.spawn
        pid = fn([b"/bin/grep", b"^NoNewPrivs:", b"/proc/self/status"], [], [], 0, fd, 2,
                 report[1], (), flags)  # fmt: skip
        assert wait_exit(pid) == 0
    finally:
        os.close(fd)
    assert out.read_text().split() == ["NoNewPrivs:", str(flags)]
    with pytest.raises(ValueError):
        fn([b"/bin/true"], [], [], 0, 1, 2, report[1], (), 4)


def test_a_child_without_a_sandbox_is_started_without_clone3(tmp_path: Path) -> None:
    """clone3 (CLONE_INTO_CGROUP) is for `network: loopback` only. A service without a sandbox
    had cgroup fd 0 (the parsed sandbox zeroed), so every spawn first made a clone3 that the
    kernel refused halfway through creating the process: 9 us more of pyinetd's CPU per
    connection on the plain /bin/cat path (bench/warm_cost.sh: 0.041 vs 0.032 ms)."""
    import shutil
    import subprocess
    import sys

    if shutil.which("strace") is None:
        pytest.skip("no strace")
    script = (
        "import os; from pyinetd import _spawn\n"
        "r, w = os.pipe()\n"
        "for _ in range(3):\n"
        "    pid = _spawn.start([b'/bin/true'], [], [], 0, 1, 2, w, ())\n"
        "    os.waitpid(pid, 0)\n"
    )
    log = tmp_path / "strace.txt"
    subprocess.run(
        [
            "strace",
            "-f",
            "-qq",
            "-e",
            "trace=clone,clone3",
            "-o",
            str(log),
            sys.executable,
            "-c",
            script,
        ],
        check=True,
        timeout=DEADLINE,
    )
    calls = log.read_text().splitlines()
    assert not [c for c in calls if "clone3(" in c], calls
    assert len([c for c in calls if "clone(" in c]) >= 3  # (the strace works)
