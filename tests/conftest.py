"""Fixtures: start the real pyinetd on free loopback ports, talk to it, always clean up."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEADLINE = 10.0


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    """A port that is free for both TCP and UDP on ``host`` right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while True:
        with socket.socket(family, kind) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        other = socket.SOCK_DGRAM if kind == socket.SOCK_STREAM else socket.SOCK_STREAM
        try:
            with socket.socket(family, other) as s:
                s.bind((host, port))
        except OSError:
            continue
        return port


def wait_for(
    pred: Callable[[], object], timeout: float = DEADLINE, what: str = "condition"
) -> None:
    """Poll ``pred`` until true, failing the test after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    delay = 0.001
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)  # polling a condition with a deadline, not synchronising on time
        delay = min(delay * 2, 0.05)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when a TCP connection to host:port succeeds (then closed at once)."""
    try:
        with socket.create_connection((host, port), timeout=DEADLINE):
            return True
    except OSError:
        return False


def pid_gone(pid: int) -> bool:
    """True when ``pid`` no longer exists or is a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def children_of(pid: int) -> list[tuple[int, str]]:
    """(pid, state) of the direct children of ``pid``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append((int(entry), fields[0]))
    return out


class Pyinetd:
    """A running pyinetd process with its stderr captured line by line."""

    def __init__(
        self,
        config: dict[str, object] | str,
        tmp: Path,
        args: tuple[str, ...] = (),
        name: str = "inetd.yaml",
        env: dict[str, str] | None = None,
        wait_ready: bool = True,
    ) -> None:
        self.path = tmp / name
        if isinstance(config, str):
            self.path.write_text(config)
        else:
            self.path.write_text(yaml.safe_dump(config))
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pyinetd", "-c", str(self.path), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
            cwd=tmp,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait_ready:
            self.wait_log(r"listening: ")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.lines.append("<EOF>")
            self._cond.notify_all()

    def wait_log(self, pattern: str, timeout: float = DEADLINE, count: int = 1) -> list[str]:
        """Wait until ``count`` stderr lines match ``pattern``; return the matches."""
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [ln for ln in self.lines if rx.search(ln)]
                if len(found) >= count:
                    return found
                if "<EOF>" in self.lines and self.proc.poll() is not None:
                    raise AssertionError(
                        f"pyinetd exited ({self.proc.returncode}) before logging {pattern!r}:\n"
                        + "\n".join(self.lines)
                    )
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no log line matching {pattern!r} within {timeout}s:\n"
                        + "\n".join(self.lines)
                    )
                self._cond.wait(left)

    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        """SIGTERM, wait (bounded), SIGKILL if needed; kill what its children left behind."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(DEADLINE)
        self._reader.join(DEADLINE)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return self.proc.returncode


@pytest.fixture
def inetd(tmp_path: Path) -> Iterator[Callable[..., Pyinetd]]:
    """Factory: inetd(config_dict) starts pyinetd and waits until it listens."""
    started: list[Pyinetd] = []

    def start(config: dict[str, object] | str, *args: str, **kw: object) -> Pyinetd:
        p = Pyinetd(config, tmp_path, tuple(args), **kw)  # type: ignore[arg-type]
        started.append(p)
        return p

    yield start
    for p in started:
        kids = [pid for pid, _ in children_of(p.pid)]
        p.stop()
        for kid in kids:
            try:
                os.killpg(kid, signal.SIGKILL)  # services run in their own process group
            except (ProcessLookupError, PermissionError):
                pass


def script(tmp: Path, name: str, body: str) -> str:
    """Write an executable script into ``tmp`` and return its path."""
    path = tmp / name
    path.write_text(body)
    path.chmod(0o755)
    return str(path)


def tcp_talk(
    port: int,
    data: bytes = b"",
    host: str = "127.0.0.1",
    shut: bool = True,
    timeout: float = DEADLINE,
) -> bytes:
    """Connect, send ``data``, half-close, read until EOF."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect((host, port))
        if data:
            s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
