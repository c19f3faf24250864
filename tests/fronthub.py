"""A loop that carries frontws.WSConn connections as front.py does (epoll, timers), with the
parent's part played in-process: on ``H`` it starts the program on two real pipes and hands
them over (``S``), and tells the program's exit (``X``). Real sockets, pipes and programs.

    python tests/fronthub.py PORT MODE [--tls CERT KEY] PROGRAM...   # serve (Autobahn by hand)
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
from typing import Any

from pyinetd.config.wsconf import WebSocketSettings
from pyinetd.protocols.frontws import WSConn


class Hub:
    def __init__(
        self,
        settings: WebSocketSettings,
        argv: list[str],
        *,
        ctx: ssl.SSLContext | None = None,
        refuse: dict[str, Any] | None = None,
        start_program: bool = True,
        n_reason: str | None = None,
        port: int = 0,
    ) -> None:
        self.settings, self.argv, self.ctx, self.refuse = settings, argv, ctx, refuse
        self.start_program, self.n_reason = start_program, n_reason
        self.lsock = socket.create_server(("127.0.0.1", port))
        self.lsock.setblocking(False)
        self.port = int(self.lsock.getsockname()[1])
        self.ep = select.epoll()
        self.ep.register(self.lsock.fileno(), select.EPOLLIN)
        self.owner: dict[int, WSConn] = {}
        self.masks: dict[int, int] = {}
        self.timers: list[tuple[float, int, WSConn]] = []
        self.seq = itertools.count()
        self.ids = itertools.count(1)
        self.conns: dict[int, WSConn] = {}
        self.procs: dict[int, subprocess.Popen[bytes]] = {}  # attached: their exit is told
        self.spawned: list[subprocess.Popen[bytes]] = []
        self.told: list[tuple[str, dict[str, Any]]] = []
        self.logs: list[str] = []
        self.later: list[Any] = []
        self.stop = False
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    # the Hub a WSConn uses
    def watch(self, fd: int, read: bool, write: bool, conn: Any) -> None:
        events = (select.EPOLLIN if read else 0) | (select.EPOLLOUT if write else 0)
        old = self.masks.get(fd)
        if conn is None or not events:
            if old is not None:
                del self.masks[fd]
                self.owner.pop(fd, None)
                with contextlib.suppress(OSError):
                    self.ep.unregister(fd)
            return
        self.owner[fd], self.masks[fd] = conn, events
        if old is None:
            self.ep.register(fd, events)
        elif old != events:
            self.ep.modify(fd, events)

    def tell(self, kind: str, fields: dict[str, Any]) -> None:
        self.told.append((kind, fields))
        if kind == "H" and self.start_program:
            conn = self.conns[fields["id"]]
            env = {**os.environ, "PYTHONUNBUFFERED": "1", **fields["env"]}
            proc = subprocess.Popen(
                self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
            )
            assert proc.stdin is not None and proc.stdout is not None
            self.spawned.append(proc)
            stdin, stdout = os.dup(proc.stdin.fileno()), os.dup(proc.stdout.fileno())
            proc.stdin.close()
            proc.stdout.close()
            cid = fields["id"]

            def attach() -> None:  # S comes in a later wake-up, and always before X
                conn.attach(stdin, stdout)
                self.procs[cid] = proc

            self.later.append(attach)
        elif kind == "H":
            conn = self.conns[fields["id"]]
            self.later.append(lambda: conn.refuse(self.n_reason))

    def arm(self, conn: Any, when: float) -> None:
        heapq.heappush(self.timers, (when, next(self.seq), conn))

    def ended(self, conn: Any) -> None:
        self.conns.pop(conn.id, None)

    def log(self, line: str) -> None:
        self.logs.append(line)

    def messages(self, kind: str) -> list[dict[str, Any]]:
        return [f for k, f in list(self.told) if k == kind]

    def wait_told(self, kind: str, n: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
        end = time.monotonic() + timeout
        while len(self.messages(kind)) < n:
            assert time.monotonic() < end, f"no {kind} within {timeout} s: {self.told}"
            time.sleep(0.01)
        return self.messages(kind)

    def loop(self) -> None:
        while not self.stop:
            while self.later:
                self.later.pop(0)()
            timeout = 0.05
            if self.timers:
                timeout = max(0.0, min(timeout, self.timers[0][0] - time.monotonic()))
            for fd, ev in self.ep.poll(timeout):
                if fd == self.lsock.fileno():
                    self._accept()
                    continue
                conn = self.owner.get(fd)
                if conn is not None:
                    bad = select.EPOLLERR | select.EPOLLHUP
                    conn.on_event(
                        fd, bool(ev & (select.EPOLLIN | bad)), bool(ev & (select.EPOLLOUT | bad))
                    )
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                when, _, conn = heapq.heappop(self.timers)
                if self.conns.get(conn.id) is conn and conn.when == when:
                    conn.on_timer(now)
            for cid, proc in list(self.procs.items()):
                if proc.poll() is not None:
                    del self.procs[cid]
                    rc = proc.returncode
                    conn = self.conns.get(cid)
                    if conn is not None:
                        conn.exited(rc if rc >= 0 else None, -rc if rc < 0 else None)

    def _accept(self) -> None:
        try:
            sock, peer = self.lsock.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        cid = next(self.ids)
        conn = WSConn(
            self,
            cid,
            sock,
            self.ctx,
            settings=self.settings,
            peer=peer,
            local=sock.getsockname(),
            deadline=5.0,
            refuse=self.refuse,
            messages=("not from there\r\n", "full, come back later\r\n"),
        )
        self.conns[cid] = conn
        conn.start()

    def close(self) -> None:
        self.stop = True
        self.thread.join(10)
        for conn in list(self.conns.values()):
            conn.abort()
        for proc in self.spawned:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self.lsock.close()
        self.ep.close()


if __name__ == "__main__":
    args = sys.argv[1:]
    port, mode = int(args.pop(0)), args.pop(0)
    ctx = None
    if args[0] == "--tls":
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(args[1], args[2])
        args = args[3:]
    hub = Hub(WebSocketSettings(mode=mode, origins="any"), args, ctx=ctx, port=port)
    print(f"serving on {hub.port}", flush=True)
    hub.thread.join()
