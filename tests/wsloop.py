"""A tiny event loop that drives websocket.Session the way the front does, for the tests: a
real listening socket, one thread per connection with its own selector, the program a real
process on two pipes. Not a mock: the client, the sockets, the pipes and the program are real;
only the parent's part (admission, the spawn through pyinetd) is this file's.

    python tests/wsloop.py PORT MODE PROGRAM...   # serve until killed (Autobahn by hand)
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from pyinetd.config.wsconf import WebSocketSettings
from pyinetd.protocols.websocket import Phase, Session

# Between the session's end and the program's SIGTERM, as the parent's ladder gives it.
GRACE = 1.0


@dataclass
class Served:
    """What one connection did, for the test to check."""

    session: Session | None = None
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    program_input: bytearray = field(default_factory=bytearray)


class Server:
    def __init__(
        self,
        settings: WebSocketSettings,
        argv: list[str],
        *,
        refuse: tuple[int, str] | None = None,
        deadline: float = 5.0,
        start_program: bool = True,
        port: int = 0,
        tls_env: dict[str, str] | None = None,
    ) -> None:
        self.settings, self.argv, self.refuse = settings, argv, refuse
        self.deadline, self.start_program = deadline, start_program
        self.tls_env = tls_env  # what a TLS front's handshake would add (SSL_*)
        self.sock = socket.create_server(("127.0.0.1", port))
        self.port = int(self.sock.getsockname()[1])
        self.served: list[Served] = []
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            one = Served()
            self.served.append(one)
            threading.Thread(target=self._drive, args=(conn, peer, one), daemon=True).start()

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for one in self.served:
            one.done.wait(10)
            if one.proc is not None:
                if one.proc.poll() is None:
                    one.proc.kill()
                one.proc.wait()
                for pipe in (one.proc.stdin, one.proc.stdout):
                    if pipe is not None:
                        pipe.close()

    def last(self, timeout: float = 10.0) -> Served:
        end = time.monotonic() + timeout
        while not self.served and time.monotonic() < end:
            time.sleep(0.01)
        one = self.served[-1]
        assert one.done.wait(timeout), "the connection did not end"
        return one

    # ---------------------------------------------------------------- one connection

    def _drive(self, conn: socket.socket, peer: tuple[str, int], one: Served) -> None:
        try:
            self._run(conn, peer, one)
        finally:
            conn.close()
            one.done.set()

    def _run(self, conn: socket.socket, peer: tuple[str, int], one: Served) -> None:
        now = time.monotonic()
        s = Session(
            self.settings,
            peer=peer,
            local=conn.getsockname(),
            now=now,
            deadline=now + self.deadline,
            refuse=self.refuse,
        )
        one.session = s
        conn.setblocking(False)
        sel = selectors.DefaultSelector()
        out_client = bytearray()
        out_prog = bytearray()
        stdin: int | None = None
        stdout: int | None = None
        client_open = True
        ended_at: float | None = None
        exit_told = False
        while True:
            one.log += s.take_log()
            if s.phase is Phase.UPGRADE and one.proc is None and self.start_program:
                one.env = s.environment(self.tls_env)
                one.log += s.take_log()
                # (the parent's service_environ sets PYTHONUNBUFFERED for websocket: services)
                env = {**os.environ, "PYTHONUNBUFFERED": "1", **one.env}
                one.proc = subprocess.Popen(
                    self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
                )
                assert one.proc.stdin is not None and one.proc.stdout is not None
                stdin, stdout = one.proc.stdin.fileno(), one.proc.stdout.fileno()
                os.set_blocking(stdin, False)
                os.set_blocking(stdout, False)
                s.accept()
            out_client += s.to_client()
            data = s.to_program()
            if stdin is not None:
                out_prog += data
                one.program_input += data
            # writes
            if out_client and client_open:
                try:
                    n = conn.send(out_client)
                    del out_client[:n]
                except BlockingIOError:
                    pass
                except OSError:
                    out_client.clear()
                    client_open = False
                    s.client_eof()
            if stdin is not None and out_prog:
                try:
                    n = os.write(stdin, out_prog)
                    del out_prog[:n]
                except BlockingIOError:
                    pass
                except OSError:
                    out_prog.clear()
            if stdin is not None and s.end_stdin and not out_prog:
                assert one.proc is not None and one.proc.stdin is not None
                one.proc.stdin.close()
                stdin = None
            if one.proc is not None and not exit_told and one.proc.poll() is not None:
                rc = one.proc.returncode
                exit_told = True
                s.program_exit(rc if rc >= 0 else None, -rc if rc < 0 else None)
                continue
            if s.end_program and one.proc is not None and one.proc.poll() is None:
                ended_at = ended_at or time.monotonic()
                if time.monotonic() > ended_at + GRACE:
                    one.proc.terminate()
            flushed = not out_client or not client_open
            if s.phase is Phase.CLOSED and flushed and (one.proc is None or exit_told):
                return
            # waits
            sel_map: dict[int, int] = {}
            if client_open and s.phase is not Phase.CLOSED and s.wants_client_input:
                sel_map[conn.fileno()] = selectors.EVENT_READ
            if out_client and client_open:
                sel_map[conn.fileno()] = sel_map.get(conn.fileno(), 0) | selectors.EVENT_WRITE
            if stdout is not None and s.wants_program_output:
                sel_map[stdout] = selectors.EVENT_READ
            if stdin is not None and out_prog:
                sel_map[stdin] = selectors.EVENT_WRITE
            for fd, ev in sel_map.items():
                sel.register(fd, ev)
            deadline = s.next_deadline()
            timeout = 0.05
            if deadline is not None:
                timeout = max(0.0, min(timeout, deadline - time.monotonic()))
            ready = sel.select(timeout)
            for fd in sel_map:
                sel.unregister(fd)
            s.tick(time.monotonic())
            for key, ev in ready:
                if key.fd == conn.fileno() and ev & selectors.EVENT_READ:
                    try:
                        chunk = conn.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        chunk = b""
                    if chunk:
                        s.receive_client(chunk)
                    else:
                        client_open = s.phase is Phase.CLOSED and bool(out_client)
                        s.client_eof()
                elif stdout is not None and key.fd == stdout:
                    try:
                        chunk = os.read(stdout, 65536)
                    except BlockingIOError:
                        continue
                    if chunk:
                        s.receive_program(chunk)
                    else:
                        s.program_eof()
                        stdout = None


@contextlib.contextmanager
def serving(settings: WebSocketSettings, argv: list[str], **kw: object) -> Iterator[Server]:
    server = Server(settings, argv, **kw)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.close()


if __name__ == "__main__":
    port, mode, *argv = sys.argv[1:]
    srv = Server(WebSocketSettings(mode=mode, origins="any"), argv, port=int(port))
    print(f"serving on {srv.port}", flush=True)
    signal.sigwait({signal.SIGINT, signal.SIGTERM})
