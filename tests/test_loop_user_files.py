"""The root parent never opens, in its loop, a file a service's user controls (issue 24.2).

A warm service's script usually lives in a folder its user owns. That user can replace the
script with anything between two reads by root: a FIFO (whose open(2) or read(2) waits for a
writer: every service, `status` and SIGTERM hang), or a symlink to a file only root may read
(whose text root would echo in an error). The load reads the script's first line once, with
the user's rights, non-blocking, a regular file only; the zygote is started from that line.

The swap between the load's read and a later one is made deterministic with a fanotify
permission event: the kernel holds the load's open(2) of the script, its file already found,
until the test has swapped the name and answered.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pwd
import signal
import struct
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    DEADLINE,
    Pyinetd,
    children_of,
    free_port,
    status_of,
    tcp_talk,
    wait_for,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (user: nobody, fanotify)")

READY = r"zygote \d+ ready"
_FAN_CLASS_CONTENT = 0x4
_FAN_CLOEXEC = 0x1
_FAN_OPEN_PERM = 0x10000
_FAN_MARK_ADD = 0x1
_FAN_ALLOW = 0x1
_AT_FDCWD = -100
_EVENT = struct.Struct("=IBBHQii")  # struct fanotify_event_metadata


class OpenGate:
    """fanotify FAN_OPEN_PERM on one file: every open(2) of it waits for this thread's answer.
    The first open by ``pid`` runs ``act`` first (the file is already found: that open gets
    the old file, a later lookup of the name whatever ``act`` put there)."""

    def __init__(self, path: Path, pid: int, act: Callable[[], None]) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fanotify_mark.argtypes = [
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint64,
            ctypes.c_int,
            ctypes.c_char_p,
        ]
        fd = libc.fanotify_init(_FAN_CLASS_CONTENT | _FAN_CLOEXEC, os.O_RDONLY | os.O_CLOEXEC)
        if fd < 0:
            pytest.skip(f"fanotify: {os.strerror(ctypes.get_errno())}")
        self.fd: int = fd
        if libc.fanotify_mark(fd, _FAN_MARK_ADD, _FAN_OPEN_PERM, _AT_FDCWD, bytes(path)) < 0:
            os.close(fd)
            pytest.skip(f"fanotify permission events: {os.strerror(ctypes.get_errno())}")
        self._pid, self._act = pid, act
        self.acted = threading.Event()
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import select

        while True:
            ready, _, _ = select.select([self.fd, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            buf = os.read(self.fd, 4096)
            for at in range(0, len(buf), _EVENT.size):
                _, _, _, _, _, efd, pid = _EVENT.unpack_from(buf, at)
                try:
                    if pid == self._pid and not self.acted.is_set():
                        self._act()
                        self.acted.set()
                finally:
                    os.write(self.fd, struct.pack("=iI", efd, _FAN_ALLOW))
                    os.close(efd)

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(DEADLINE)
        for fd in (self.fd, self._stop_r, self._stop_w):
            os.close(fd)  # closing the group allows whatever still waits


@pytest.fixture
def user_folder() -> Iterator[Path]:
    """A folder `nobody` owns (a warm service's usual layout), below one any user may search."""
    top = Path(tempfile.mkdtemp(prefix="pyinetd-trust-"))
    top.chmod(0o755)
    mine = top / "svc"
    mine.mkdir()
    nobody = pwd.getpwnam("nobody")
    os.chown(mine, nobody.pw_uid, nobody.pw_gid)
    yield mine
    import shutil

    shutil.rmtree(top)


def _start(inetd: Callable[..., Pyinetd], folder: Path) -> tuple[Pyinetd, Path, int, int]:
    script = folder / "app.py"
    script.write_text("#!/usr/bin/env python3\nprint('warm')\n")
    script.chmod(0o755)
    nobody = pwd.getpwnam("nobody")
    os.chown(script, nobody.pw_uid, nobody.pw_gid)
    warm, echo = free_port(), free_port()
    services = {
        "app": {
            "listen": f"127.0.0.1:{warm}",
            "exec": [str(script)],
            "user": "nobody",
            "warm": True,
        },
        "echo": {"listen": f"127.0.0.1:{echo}", "builtin": "echo"},
    }
    p = inetd({"services": services})
    p.wait_log(READY)
    return p, script, warm, echo


def _serving(p: Pyinetd, echo: int) -> None:
    """`status` answers and another service serves, each within a bounded deadline."""
    try:
        status = status_of(p)  # subprocess timeout: DEADLINE
    except subprocess.TimeoutExpired:
        raise AssertionError("pyinetd status did not answer: the loop is blocked") from None
    assert "echo" in status, status
    try:
        assert tcp_talk(echo, b"ping", timeout=DEADLINE) == b"ping"
    except OSError as exc:
        raise AssertionError(f"the echo service stopped serving: {exc!r}") from None


def _stops(p: Pyinetd) -> None:
    """SIGTERM stops pyinetd within a bounded deadline. (A zygote blocked opening the FIFO
    as the service's user does not read the channel's "Q": what pyinetd leaves is killed.)"""
    kids = [pid for pid, _ in children_of(p.pid)]
    p.signal(signal.SIGTERM)
    try:
        p.proc.wait(DEADLINE)
    except subprocess.TimeoutExpired:
        raise AssertionError("SIGTERM did not stop pyinetd: the loop is blocked") from None
    finally:
        for kid in kids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(kid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(kid, signal.SIGKILL)


def _waits_for_a_fifo_writer(pid: int) -> bool:
    """Whether process ``pid`` is blocked in open(2) of a FIFO (no fd yet to see)."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f.read() == "wait_for_partner"
    except OSError:
        return False


def _has_open(pid: int, path: Path) -> bool:
    """Whether process ``pid`` holds ``path`` open."""
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                    return True
    return False


def _fifo_instead_of(script: Path) -> None:
    """What the script's user can do in its folder: put a FIFO in the script's place."""
    fifo = script.with_name(f".swap-{uuid.uuid4().hex[:8]}")
    os.mkfifo(fifo, 0o755)
    nobody = pwd.getpwnam("nobody")
    os.chown(fifo, nobody.pw_uid, nobody.pw_gid)
    os.rename(fifo, script)


def test_a_fifo_swapped_in_after_the_load_read_does_not_block_the_reload(
    inetd: Callable[..., Pyinetd], user_folder: Path
) -> None:
    """The script becomes a FIFO after the load has read it: the zygote is started from what
    the load read; root opened the FIFO with a blocking open(2) in its loop, which waited for
    a writer for ever."""
    p, script, _, echo = _start(inetd, user_folder)
    gate = OpenGate(script, p.pid, lambda: _fifo_instead_of(script))
    try:
        p.signal(signal.SIGHUP)
        assert gate.acted.wait(DEADLINE), "the reload never read the script"
        _serving(p, echo)
        p.wait_log(r"reloaded: ")
        _stops(p)
    finally:
        gate.close()


def test_a_fifo_with_a_writer_at_reload_time_does_not_block_the_load(
    inetd: Callable[..., Pyinetd], user_folder: Path
) -> None:
    """The script is a FIFO that the user holds open for writing when the reload comes: the
    load's read of its first line waited for bytes that never came. It is refused (not a
    regular file) and the loop goes on."""
    p, script, _, echo = _start(inetd, user_folder)
    _fifo_instead_of(script)
    writer = os.open(script, os.O_RDWR | os.O_NONBLOCK)  # a writer that writes nothing
    try:
        p.signal(signal.SIGHUP)
        # the reload has come: it holds the FIFO open (blocked in its read) or is done
        wait_for(lambda: _has_open(p.pid, script) or "reloaded: " in p.log())
        _serving(p, echo)
        # the user's own script: that service alone fails (sec-service-files-no-config-dos)
        p.wait_log(r"app\.warm: true: .*app\.py: not a regular file")
        _stops(p)
    finally:
        os.close(writer)


def test_a_root_only_file_behind_the_script_is_not_echoed(
    inetd: Callable[..., Pyinetd], user_folder: Path, tmp_path: Path
) -> None:
    """The user points the script at a file only root may read, after the load has read it:
    root read that file's first line and logged its text after `#!` ("not a Python script:
    #!..."). Nothing the user could not read reaches the log or `status`."""
    secret = f"SECRET-trust-{uuid.uuid4().hex}"
    hidden = tmp_path / "root-only"  # tmp_path: mode 0700, root's
    hidden.write_text(f"#!/{secret}\n")
    hidden.chmod(0o600)
    p, script, warm, echo = _start(inetd, user_folder)

    def symlink_instead() -> None:
        link = script.with_name(".swap-link")
        link.symlink_to(hidden)
        os.rename(link, script)

    gate = OpenGate(script, p.pid, symlink_instead)
    try:
        p.signal(signal.SIGHUP)
        assert gate.acted.wait(DEADLINE), "the reload never read the script"
        p.wait_log(r"reloaded: ")
        with contextlib.suppress(OSError):
            tcp_talk(warm, timeout=DEADLINE)  # whatever it serves now, cold or warm
        assert tcp_talk(echo, b"ping") == b"ping"
        shown = json.dumps(status_of(p))
    finally:
        gate.close()
    assert secret not in p.log()
    assert secret not in shown


def test_a_fifo_for_a_sandboxed_program_does_not_block_the_reload(
    inetd: Callable[..., Pyinetd], user_folder: Path
) -> None:
    """`sandbox: {read: ...}`: the load reads the program's `#!` line and ELF header to name
    what execve needs. The program lives in its user's folder; that user put a FIFO in its
    place, and root's blocking open(2) of it at the reload waited for a writer for ever."""
    prog = user_folder / "prog"
    prog.write_text("#!/bin/sh\nexec cat\n")
    prog.chmod(0o755)
    port, echo = free_port(), free_port()
    services = {
        "boxed": {
            "listen": f"127.0.0.1:{port}",
            "exec": [str(prog)],
            "user": "nobody",
            "sandbox": {"read": ["/usr", "/lib", "/lib64", "/bin", "/etc", str(user_folder)]},
        },
        "echo": {"listen": f"127.0.0.1:{echo}", "builtin": "echo"},
    }
    p = inetd({"services": services})
    _fifo_instead_of(prog)
    p.signal(signal.SIGHUP)
    wait_for(lambda: _waits_for_a_fifo_writer(p.pid) or "reload" in p.log())
    _serving(p, echo)
    p.wait_log(r"reload(ed| failed)")
    _stops(p)
