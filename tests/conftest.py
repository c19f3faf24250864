"""Fixtures: start the real pyinetd on free loopback ports, talk to it, always clean up."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEADLINE = 10.0


_HANDED_OUT: set[int] = set()  # ports free_port gave in this test process


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    """A port that is free for both TCP and UDP on ``host`` and on every address (tests that
    `listen: PORT` bind them all) right now, and not handed out before in this process: the
    kernel may give the same port to two bind(0) calls in a row, and a test taking two ports
    then got one twice (its reload failed with "Address already in use", held by itself)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while True:
        with socket.socket(family, kind) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port in _HANDED_OUT:
            continue
        try:
            for k in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                for where in {host, "::" if family == socket.AF_INET6 else "0.0.0.0"}:
                    if k == kind and where == host:
                        continue  # the bind above
                    with socket.socket(family, k) as s:
                        s.bind((where, port))
        except OSError:
            continue
        _HANDED_OUT.add(port)
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


def tcp_listening(port: int) -> bool:
    """True when some socket on this host listens on TCP ``port`` (from /proc/net/tcp*)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def pid_gone(pid: int) -> bool:
    """True when ``pid`` no longer exists or is a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):  # (reaped between open and read: ESRCH)
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
        prefix: tuple[str, ...] = (),
    ) -> None:
        self.path = tmp / name
        if isinstance(config, str):
            self.path.write_text(config)
        else:
            self.path.write_text(yaml.safe_dump(config))
        self.lines: list[str] = []
        self._cond = threading.Condition()
        env = {**os.environ, **(env or {})}
        # Readiness through sd_notify (READY=1), whatever the log level; a test that brings
        # its own NOTIFY_SOCKET waits for the "listening:" log line instead.
        self._notify: socket.socket | None = None
        # (Behind a prefix such as setpriv, pyinetd may run as a user who cannot reach it.)
        if "NOTIFY_SOCKET" not in env and not prefix:
            self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._notify.bind(str(tmp / f"notify-{name}.sock"))
            env["NOTIFY_SOCKET"] = self._notify.getsockname()
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "pyinetd", "-c", str(self.path), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            cwd=tmp,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait_ready:
            try:
                self.wait_ready()
            except BaseException:
                self.stop()  # a failed start leaves nothing running
                raise

    def wait_ready(self, timeout: float = DEADLINE) -> None:
        """Wait until pyinetd listens: its READY=1, or its "listening:" log line."""
        if self._notify is None:
            self.wait_log(r"listening: ", timeout)
            return
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                self._reader.join(DEADLINE)
                raise AssertionError(
                    f"pyinetd exited ({self.proc.returncode}) before it was ready:\n" + self.log()
                )
            self._notify.settimeout(min(0.1, max(0.001, end - time.monotonic())))
            try:
                if b"READY=1" in self._notify.recv(4096).split(b"\n"):
                    return
            except TimeoutError:
                continue
        raise AssertionError(f"pyinetd not ready within {timeout}s:\n" + self.log())

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
        if self._notify is not None:
            self._notify.close()
        return self.proc.returncode


@pytest.fixture
def inetd(tmp_path: Path) -> Iterator[Callable[..., Pyinetd]]:
    """Factory: inetd(config_dict) starts pyinetd and waits until it listens."""
    started: list[Pyinetd] = []

    def start(config: dict[str, object] | str, *args: str, **kw: object) -> Pyinetd:
        wait_ready = bool(kw.pop("wait_ready", True))
        p = Pyinetd(config, tmp_path, tuple(args), wait_ready=False, **kw)  # type: ignore[arg-type]
        started.append(p)  # recorded before waiting: a failed start is still cleaned up
        if wait_ready:
            p.wait_ready()
        return p

    yield start
    for p in started:
        kids = [pid for pid, _ in children_of(p.pid)]
        p.stop()
        for kid in kids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(kid, signal.SIGKILL)  # services run in their own process group


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
    """Connect, send ``data`` (from a thread, while reading), half-close, read until EOF."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect((host, port))

        def send() -> None:
            # A peer that closes or resets early shows in what is read back, which is what
            # the caller checks.
            with contextlib.suppress(OSError):
                if data:
                    s.sendall(data)
                if shut:
                    s.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
        sender.join(timeout)
        return b"".join(chunks)


class LocalUser:
    """A throwaway local account (useradd), for attacks a second local user would try."""

    def __init__(self, name: str, uid: int, gid: int, home: Path) -> None:
        self.name = name
        self.uid = uid
        self.gid = gid
        self.home = home

    def run(
        self, argv: list[str], check: bool = True, timeout: float = DEADLINE, **kw: object
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` as this user (setpriv: its uid, gid, no supplementary groups)."""
        cmd = [
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--clear-groups",
            "--inh-caps=-all",
            "--",
            *argv,
        ]
        return subprocess.run(  # type: ignore[call-overload, no-any-return]
            cmd, check=check, timeout=timeout, capture_output=True, **kw
        )


@pytest.fixture
def local_user() -> Iterator[LocalUser]:
    """A second local account, created for one test and removed after (needs root)."""
    with local_account() as user:
        yield user


@contextlib.contextmanager
def local_account(prefix: str = "pyi") -> Iterator[LocalUser]:
    """A local account named ``prefix`` and 8 random hex digits, removed on leaving."""
    if os.geteuid() != 0:
        pytest.skip("needs root (useradd)")
    import pwd
    import uuid

    name = prefix + uuid.uuid4().hex[:8]
    home = Path("/home") / name
    subprocess.run(
        [
            "useradd",
            "--create-home",
            "--home-dir",
            str(home),
            "--shell",
            "/bin/sh",
            "--user-group",
            name,
        ],
        check=True,
        capture_output=True,
        timeout=DEADLINE,
    )
    try:
        pw = pwd.getpwnam(name)
        yield LocalUser(name, pw.pw_uid, pw.pw_gid, home)
    finally:
        # Whatever the test left running as this user goes first, then the account.
        subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True, timeout=DEADLINE)
        subprocess.run(
            ["userdel", "--remove", "--force", name], capture_output=True, timeout=DEADLINE
        )


def status_json(p: Pyinetd) -> dict[str, Any]:
    """The whole answer of `pyinetd status --json` (pid, services, ...), as the CLI prints it."""
    out = subprocess.run(
        [sys.executable, "-m", "pyinetd", "status", "--json", "-c", str(p.path)],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=True,
    )
    answer: dict[str, Any] = json.loads(out.stdout)
    return answer


def status_of(p: Pyinetd) -> dict[str, dict[str, Any]]:
    """Each service's status entry (accepted, refused, ...) from `pyinetd status --json`."""
    return {s["name"]: s for s in status_json(p)["services"]}


# A client that stands for an attacker on loopback; 127.0.0.1 is everyone else.
ATTACKER = "127.0.0.2"


@contextlib.contextmanager
def idle_connections(
    port: int, n: int, first: bytes = b"", source: str = ATTACKER
) -> Iterator[list[socket.socket]]:
    """``n`` connections from ``source`` that send ``first`` and then nothing (a slowloris;
    the kernel completes each one, accepted by pyinetd or waiting in its backlog)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            socks.append(s)
            s.settimeout(DEADLINE)
            s.bind((source, 0))
            s.connect(("127.0.0.1", port))
            if first:
                s.sendall(first)
        yield socks
    finally:
        for s in socks:
            s.close()


def closed_by_server(s: socket.socket) -> bool:
    """True when the server has closed ``s`` (EOF or reset); never blocks."""
    s.setblocking(False)  # (with a timeout set, Python polls before any recv)
    try:
        return s.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def write_pki(folder: Path) -> Path:
    """A CA (ca.pem) and a server certificate for localhost and 127.0.0.1 (cert.pem, key.pem)
    written into ``folder`` (trustme; the test is skipped without it)."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    server.cert_chain_pems[0].write_to_path(folder / "cert.pem")
    server.private_key_pem.write_to_path(folder / "key.pem")
    (folder / "key.pem").chmod(0o600)
    ca.cert_pem.write_to_path(folder / "ca.pem")
    return folder


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """write_pki in the test's folder."""
    return write_pki(tmp_path)


@pytest.fixture
def folder() -> Iterator[Path]:
    """A folder any user may read (services with `user:` read their script from it); a test
    module may define its own."""
    path = Path(tempfile.mkdtemp(prefix="pyinetd-warm-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)
