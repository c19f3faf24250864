"""pyinetd's side of a WebSocket service's front, for tests: a real front process (front.run,
hardened: non-dumpable, seccomp without exec or fork) over the real SEQPACKET channel; this rig
listens, hands each connection over as ``C``, starts the program on two pipes at ``H`` (``S``),
tells its exit (``X``) and records what the front says.

    python tests/wsrig.py PORT MODE PROGRAM...    # serve until killed (Autobahn by hand)
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pyinetd.protocols import frontchan

REPO = Path(__file__).resolve().parent.parent

# What pyinetd's fork does before front.run, by a fresh interpreter (the test process has
# threads: it must not fork).
_BOOT = """
import json, socket, sys
from pathlib import Path
from pyinetd.protocols import front, tlsconf
from pyinetd.config.parsers import TLSSettings
from pyinetd.config.wsconf import parse_websocket
cert, key, ws, fd = sys.argv[1:5]
ctx = tlsconf.make_context(TLSSettings(Path(cert), Path(key))) if cert else None
settings = front.FrontSettings(name="ws", ctx=ctx, websocket=parse_websocket(json.loads(ws)),
                               messages=("not from there\\r\\n", "busy\\r\\n"))
sys.exit(front.run(socket.socket(fileno=int(fd)), settings, hardened=True))
"""


class WSRig:
    def __init__(
        self,
        tmp: Path,
        websocket: dict[str, Any],
        program: list[str],
        *,
        cert: Path | None = None,
        key: Path | None = None,
        refuse: dict[str, Any] | None = None,
        answer: str = "S",
        port: int = 0,
    ) -> None:
        import json

        self.program, self.refuse, self.answer = program, refuse, answer
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = int(self.listener.getsockname()[1])
        self.chan, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.log_path = tmp / "front.log"
        self.messages: list[frontchan.Message] = []
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self.cond = threading.Condition()
        self.next_id = 0
        self.stop = False
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _BOOT,
                    str(cert or ""),
                    str(key or ""),
                    json.dumps(websocket),
                    str(theirs.fileno()),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                pass_fds=(theirs.fileno(),),
                cwd=REPO,
            )
        theirs.close()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while not self.stop:
                r, _, _ = select.select([self.listener, self.chan], [], [], 0.02)
                if self.listener in r:
                    conn, addr = self.listener.accept()
                    self.next_id += 1
                    fields = {
                        "id": self.next_id,
                        "peer": [addr[0], addr[1]],
                        "local": ["127.0.0.1", self.port],
                        "deadline": 5.0,
                        "refuse": self.refuse,
                    }
                    frontchan.send(self.chan, frontchan.encode("C", fields), [conn.fileno()])
                    conn.close()
                if self.chan in r:
                    self._read()
                for cid, child in list(self.children.items()):
                    rc = child.poll()
                    if rc is not None:
                        del self.children[cid]
                        code, sig = (rc, None) if rc >= 0 else (None, -rc)
                        x = {"id": cid, "code": code, "signal": sig}
                        frontchan.send(self.chan, frontchan.encode("X", x))

    def _read(self) -> None:
        msg = frontchan.recv(self.chan, frontchan.FRONT_TO_PARENT)
        if msg is None:
            self.stop = True
            return
        cid = msg.fields["id"]
        if msg.kind == "H" and self.answer == "S":
            in_r, in_w = os.pipe()
            out_r, out_w = os.pipe()
            env = {**os.environ, "PYTHONUNBUFFERED": "1", **msg.fields["env"]}
            child = subprocess.Popen(self.program, stdin=in_r, stdout=out_w, env=env)
            os.close(in_r)
            os.close(out_w)
            frontchan.send(self.chan, frontchan.encode("S", {"id": cid}), [in_w, out_r])
            os.close(in_w)
            os.close(out_r)
            self.children[cid] = child  # (its X only after its S)
        elif msg.kind == "H":
            frontchan.send(self.chan, frontchan.encode("N", {"id": cid, "reason": self.answer}))
        with self.cond:
            self.messages.append(msg)
            self.cond.notify_all()

    def told(self, kind: str, n: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
        end = time.monotonic() + timeout
        with self.cond:
            while len(got := [m.fields for m in self.messages if m.kind == kind]) < n:
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {kind}: {self.messages}; {self.log()}")
                self.cond.wait(left)
            return got

    def kinds(self) -> list[str]:
        with self.cond:
            return [m.kind for m in self.messages]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        self.stop = True
        self.thread.join(5)
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)
        for child in self.children.values():
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            child.wait(5)
        self.listener.close()
        self.chan.close()


if __name__ == "__main__":
    import tempfile

    port, mode, *argv = sys.argv[1:]
    rig = WSRig(Path(tempfile.mkdtemp()), {"mode": mode, "origins": "any"}, argv, port=int(port))
    print(f"serving on {rig.port}", flush=True)
    rig.thread.join()
