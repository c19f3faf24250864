"""A stand-in for pyinetd's side of a front (front.py) in tests: it listens, hands each accepted
connection to a real front process as ``C`` over the SEQPACKET channel, starts the program on
two pipes when the front says ``H`` and sends ``S``, and records what the front says."""

from __future__ import annotations

import contextlib
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyinetd.protocols import frontchan

REPO = Path(__file__).resolve().parent.parent

# The front's process: what pyinetd's fork does before front.run, done by a fresh
# interpreter (the test process must not fork itself with threads running).
_BOOT = """
import os, socket, sys
from pathlib import Path
from pyinetd.protocols import front, tlsconf
from pyinetd.config.parsers import TLSSettings
cert, key, target, linger, hardened, fd = sys.argv[1:7]
ctx = tlsconf.make_context(TLSSettings(Path(cert), Path(key))) if cert else None
redirect = None
if target:
    host, _, port = target.rpartition(":")
    redirect = (host, int(port))
settings = front.FrontSettings(name="t", ctx=ctx, redirect=redirect, linger=float(linger),
                               idle_timeout=None)
chan = socket.socket(fileno=int(fd))
sys.exit(front.run(chan, settings, hardened=hardened == "1"))
"""


class FrontRig:
    """One front process and the parent's part around it, served by a thread."""

    def __init__(
        self,
        tmp: Path,
        *,
        cert: Path | None = None,
        key: Path | None = None,
        redirect: str = "",
        program: list[str] | None = None,
        deadline: float = 10.0,
        linger: float = 2.0,
        nofile: tuple[int, int] | None = None,
        hardened: bool = True,
        answer: str = "S",
    ) -> None:
        self.program = program or ["/bin/cat"]
        self.deadline = deadline
        self.answer = answer  # what to send on H: "S" (start the program) or "N"
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1024)
        self.port = self.listener.getsockname()[1]
        self.chan, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.log_path = tmp / "front.log"
        self.messages: list[frontchan.Message] = []
        self.ids: dict[int, socket.socket] = {}
        self.children: list[subprocess.Popen[bytes]] = []
        self.cond = threading.Condition()
        self.next_id = 0
        self.stop = False
        self.pending: list[tuple[bytes, list[int]]] = []  # records to send, with fds

        def limits() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, nofile)

        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _BOOT,
                    str(cert or ""),
                    str(key or ""),
                    redirect,
                    str(linger),
                    "1" if hardened else "0",
                    str(theirs.fileno()),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                pass_fds=(theirs.fileno(),),
                preexec_fn=limits if nofile is not None else None,
                cwd=REPO,
            )
        theirs.close()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    # --- the parent's loop ------------------------------------------------------------------

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while not self.stop:
                r, _, _ = select.select([self.listener, self.chan], [], [], 0.05)
                if self.listener in r:
                    conn, addr = self.listener.accept()
                    self.next_id += 1
                    fields = {
                        "id": self.next_id,
                        "peer": [addr[0], addr[1]],
                        "local": ["127.0.0.1", self.port],
                        "deadline": self.deadline,
                        "refuse": None,
                    }
                    self.send(frontchan.encode("C", fields), [conn.fileno()])
                    conn.close()
                if self.chan in r:
                    self._read()
                with self.cond:
                    todo, self.pending = self.pending, []
                for data, fds in todo:
                    frontchan.send(self.chan, data, fds)
                    frontchan.close_fds(fds)

    def _read(self) -> None:
        msg = frontchan.recv(self.chan, frontchan.FRONT_TO_PARENT)
        if msg is None:
            self.stop = True
            with self.cond:
                self.cond.notify_all()
            return
        if msg.kind == "H" and self.answer == "S":
            in_r, in_w = os.pipe()
            out_r, out_w = os.pipe()
            child = subprocess.Popen(self.program, stdin=in_r, stdout=out_w, close_fds=True)
            os.close(in_r)
            os.close(out_w)
            self.children.append(child)
            frontchan.send(
                self.chan, frontchan.encode("S", {"id": msg.fields["id"]}), [in_w, out_r]
            )
            os.close(in_w)
            os.close(out_r)
        elif msg.kind == "H":
            reason = {"id": msg.fields["id"], "reason": "no program"}
            frontchan.send(self.chan, frontchan.encode("N", reason))
        with self.cond:
            self.messages.append(msg)
            self.cond.notify_all()

    # --- for the tests ----------------------------------------------------------------------

    def send(self, data: bytes, fds: list[int] | None = None) -> None:
        """Queue a raw record (the rig's thread sends it), fds dup'ed."""
        with self.cond:
            self.pending.append((data, [os.dup(fd) for fd in fds or []]))

    def wait(self, pred: Callable[[list[frontchan.Message]], Any], timeout: float = 10.0) -> Any:
        """Wait until ``pred(messages)`` is true; return it."""
        end = time.monotonic() + timeout
        with self.cond:
            while not (got := pred(self.messages)):
                left = end - time.monotonic()
                if left <= 0:
                    kinds = [(m.kind, m.fields.get("id")) for m in self.messages][-20:]
                    raise AssertionError(f"front did not answer in time: {kinds}; {self.log()}")
                self.cond.wait(left)
            return got

    def kinds(self, cid: int) -> list[str]:
        with self.cond:
            return [m.kind for m in self.messages if m.fields.get("id") == cid]

    def message(self, kind: str, cid: int | None = None) -> frontchan.Message:
        def find(ms: list[frontchan.Message]) -> frontchan.Message | None:
            for m in ms:
                if m.kind == kind and (cid is None or m.fields.get("id") == cid):
                    return m
            return None

        found: frontchan.Message = self.wait(find)
        return found

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        self.stop = True
        self.thread.join(5)
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)
        for child in self.children:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            child.wait(5)
        self.chan.close()
        self.listener.close()

    def __enter__(self) -> FrontRig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
