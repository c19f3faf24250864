"""Reference for the warm Python rows (issue 19): the 20-line server a Python programmer would
write to serve a script without an interpreter start-up per connection, and nothing else.

usage: ref_pyfork.py PORT SCRIPT

Compile SCRIPT once, freeze the GC, then per connection: os.fork(); the child puts the
connection on fds 0 and 1, gives the script new sys.stdin/stdout on them, runs it, flushes and
_exit()s. No limits, environment, session, stderr, finalization, or accounting: the floor of
fork-per-connection CPython on this machine, which py-warm (a fresh-interpreter-equivalent
process per connection, pyinetd's own child) is measured against. Benchmark reference only.
"""

import gc
import io
import os
import signal
import socket
import sys

PORT, SCRIPT = int(sys.argv[1]), sys.argv[2]
with open(SCRIPT, "rb") as f:
    CODE = compile(f.read(), SCRIPT, "exec")


def reap(_signum: int, _frame: object) -> None:
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return


signal.signal(signal.SIGCHLD, reap)
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", PORT))
srv.listen(128)
gc.collect()
gc.freeze()
while True:
    conn, _ = srv.accept()
    if os.fork() == 0:
        os.dup2(conn.fileno(), 0)
        os.dup2(conn.fileno(), 1)
        conn.close()
        srv.close()
        sys.stdin = io.TextIOWrapper(open(0, "rb", closefd=False))  # noqa: SIM115
        sys.stdout = io.TextIOWrapper(open(1, "wb", closefd=False))  # noqa: SIM115
        exec(CODE, {"__name__": "__main__"})
        sys.stdout.flush()
        os._exit(0)
    conn.close()
