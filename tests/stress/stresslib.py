"""Helpers for the stress suite: sizes, a bounded load client, /proc measurements.

Sizes scale with ``STRESS_SCALE`` (default 1, the CI sizes); ``STRESS_CHURN`` sets the churn
test's connection count directly (the report run uses 20000).
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from conftest import DEADLINE, Pyinetd

SCALE = float(os.environ.get("STRESS_SCALE", "1"))


def scaled(n: int) -> int:
    """``n`` times STRESS_SCALE, at least 1."""
    return max(1, round(n * SCALE))


# ---------------------------------------------------------------- /proc measurements
def fd_count(pid: int) -> int:
    """Number of open file descriptors of ``pid``."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def descendants(pid: int) -> list[int]:
    """Every process whose ancestry leads to ``pid`` (not ``pid`` itself)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out.extend(kids)
        todo.extend(kids)
    return out


def group_alive(pgid: int) -> bool:
    """True while any process is in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def kill_group(pgid: int) -> None:
    """SIGKILL a process group if it still exists (test clean-up)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


@contextlib.contextmanager
def public_dir() -> Iterator[Path]:
    """A fresh folder every user may enter and read (pytest's tmp folders are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="pyinetd-stress-"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- clients
def timed_talk(port: int, data: bytes, timeout: float = DEADLINE) -> float:
    """One echo round trip (connect, send, half-close, read to EOF); its seconds."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    took = time.perf_counter() - t0
    if got != data:
        raise AssertionError(f"echo mismatch on port {port}: sent {data!r}, got {got!r}")
    return took


def median(values: list[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2]


@dataclass
class LoadResult:
    """What a load run did: successes, failures by kind, latencies (seconds)."""

    ok: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def attempted(self) -> int:
        return self.ok + sum(self.failed.values())

    def quantile(self, q: float) -> float:
        s = sorted(self.latencies)
        return s[min(len(s) - 1, int(q * len(s)))] if s else 0.0

    def summary(self) -> str:
        rate = self.ok / self.seconds if self.seconds else 0.0
        return (
            f"ok={self.ok} failed={dict(self.failed)} secs={self.seconds:.2f} rate={rate:.0f}/s "
            f"p50={self.quantile(0.5) * 1e3:.2f}ms p99={self.quantile(0.99) * 1e3:.2f}ms "
            f"max={max(self.latencies, default=0) * 1e3:.2f}ms"
        )


@dataclass
class _Conn:
    sock: socket.socket
    payload: bytes
    started: float
    got: bytearray = field(default_factory=bytearray)
    connected: bool = False


def run_load(
    port: int,
    total: int,
    concurrency: int,
    payload: bytes = b"hello pyinetd\n",
    conn_timeout: float = DEADLINE,
    deadline: float = 120.0,
    stop: threading.Event | None = None,
    progress: list[int] | None = None,
) -> LoadResult:
    """Echo load: up to ``total`` connections, ``concurrency`` in flight, each sending
    ``payload``, half-closing and expecting ``payload`` back before EOF.

    Bounded: stops after ``deadline`` seconds (what is unfinished counts as "timeout"), or
    when ``stop`` is set (then what is in flight still finishes). ``progress[0]`` counts
    finished connections for a watching thread.
    """
    sel = selectors.DefaultSelector()
    res = LoadResult()
    t0 = time.monotonic()
    end = t0 + deadline
    launched = 0
    inflight: dict[socket.socket, _Conn] = {}

    def finish(c: _Conn, error: str | None) -> None:
        sel.unregister(c.sock)
        c.sock.close()
        del inflight[c.sock]
        if error is None:
            res.ok += 1
            res.latencies.append(time.monotonic() - c.started)
        else:
            res.failed[error] += 1
        if progress is not None:
            progress[0] += 1

    try:
        while True:
            now = time.monotonic()
            stopping = stop is not None and stop.is_set()
            while launched < total and len(inflight) < concurrency and not stopping and now < end:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                err = s.connect_ex(("127.0.0.1", port))
                launched += 1
                c = _Conn(s, payload, time.monotonic())
                inflight[s] = c
                sel.register(s, selectors.EVENT_WRITE, c)
                if err not in (0, errno.EINPROGRESS):
                    finish(c, errno.errorcode.get(err, str(err)))
            if not inflight:
                break
            if now > end:
                for c in list(inflight.values()):
                    finish(c, "timeout")
                break
            for key, _mask in sel.select(0.05):
                c = key.data
                try:
                    if not c.connected:
                        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if err:
                            finish(c, errno.errorcode.get(err, str(err)))
                            continue
                        c.connected = True
                        c.sock.sendall(c.payload)  # small: fits an empty socket buffer
                        c.sock.shutdown(socket.SHUT_WR)
                        sel.modify(c.sock, selectors.EVENT_READ, c)
                        continue
                    chunk = c.sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    finish(c, errno.errorcode.get(exc.errno or 0, type(exc).__name__))
                    continue
                if chunk:
                    c.got += chunk
                    if len(c.got) > len(c.payload):
                        finish(c, "mismatch")
                else:
                    finish(c, None if c.got == c.payload else "mismatch")
            now = time.monotonic()
            for c in [c for c in inflight.values() if now - c.started > conn_timeout]:
                finish(c, "timeout")
    finally:
        for c in list(inflight.values()):
            c.sock.close()
        sel.close()
    res.seconds = time.monotonic() - t0
    return res


class LoadThread(threading.Thread):
    """run_load in a background thread, until stopped (or ``total`` connections)."""

    def __init__(self, port: int, total: int, concurrency: int, deadline: float = 60.0) -> None:
        super().__init__(daemon=True)
        self.port, self.total, self.concurrency, self.deadline = port, total, concurrency, deadline
        self.stop_event = threading.Event()
        self.progress = [0]
        self.result: LoadResult | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = run_load(
                self.port,
                self.total,
                self.concurrency,
                deadline=self.deadline,
                stop=self.stop_event,
                progress=self.progress,
            )
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def finish(self) -> LoadResult:
        """Stop launching, wait for what is in flight, return the result."""
        self.stop_event.set()
        self.join(self.deadline + DEADLINE)
        assert not self.is_alive(), "load thread did not finish"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


# ---------------------------------------------------------------- running pyinetd wrapped
class WrappedPyinetd(Pyinetd):
    """Pyinetd started behind a command prefix (e.g. setpriv to run it as another user)."""

    def __init__(
        self,
        config: dict[str, object],
        folder: Path,
        prefix: list[str],
        args: tuple[str, ...] = (),
    ) -> None:
        path = folder / "inetd.yaml"
        path.touch()
        path.chmod(0o644)  # readable by the user the prefix switches to; writing keeps the mode
        super().__init__(yaml.safe_dump(config), folder, args, prefix=tuple(prefix))
