"""Reference for bench/run.sh: what a second spawning process would buy (not pyinetd).

usage: ref_twoloops.py PORT [LOOPS]

LOOPS processes (default 2) share one listening socket; each runs a minimal loop: accept,
CPython's _posixsubprocess.fork_exec of /bin/cat with the client on 0 and 1 (the primitive
pyinetd's fast path uses), close, reap on SIGCHLD. No limits, no logging, no config: with
LOOPS=1 it is the floor of pyinetd's exec path; with LOOPS=2 it shows what overlapping one
loop's vfork wait with the other loop's work gains on this machine, i.e. what `workers: 2`
could reach at best. Benchmark reference only.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import sys
from _posixsubprocess import fork_exec

PORT = int(sys.argv[1])
LOOPS = int(sys.argv[2]) if len(sys.argv) > 2 else 2
ARGV = [b"/bin/cat"]
ENV = [k + b"=" + v for k, v in os.environb.items()]


def serve(srv: socket.socket) -> None:
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    signal.signal(signal.SIGCHLD, lambda *_: None)
    err_r, err_w = os.pipe()
    srv.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ, "accept")
    sel.register(wake_r, selectors.EVENT_READ, "reap")
    while True:
        for key, _ in sel.select():
            if key.data == "reap":
                with contextlib.suppress(BlockingIOError):
                    wake_r.recv(4096)
                while True:
                    try:
                        pid, _status = os.waitpid(-1, os.WNOHANG)
                    except ChildProcessError:
                        break
                    if pid == 0:
                        break
                continue
            for _ in range(16):
                try:
                    fd, addr = srv._accept()  # type: ignore[attr-defined]
                except BlockingIOError:
                    break
                env = [*ENV, b"REMOTE_ADDR=" + addr[0].encode(), b"REMOTE_PORT=%d" % addr[1]]
                fork_exec(
                    ARGV, ARGV, True, (err_w,), None, env,
                    fd, -1, -1, fd, -1, 2, err_r, err_w,
                    True, False, 0, None, None, None, -1, None, True,
                )  # fmt: skip
                os.close(fd)


def main() -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", PORT))
    srv.listen(128)
    loops = []
    for _ in range(LOOPS - 1):
        pid = os.fork()
        if pid == 0:
            serve(srv)
        loops.append(pid)

    def stop(*_: object) -> None:
        # The first loop is the process the bench kit started: it takes the others with it.
        for pid in loops:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    serve(srv)


if __name__ == "__main__":
    main()
