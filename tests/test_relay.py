"""Tests for pyinetd.spawn.relay with real sockets, pipes and service processes, plain and TLS."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import random
import select
import socket
import ssl
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import trustme

from pyinetd.spawn import relay as relay_mod
from pyinetd.spawn.relay import relay

MB = 1 << 20
DEADLINE = 20.0


# --- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def payload() -> bytes:
    return random.Random(4711).randbytes(10 * MB)


@dataclass(frozen=True)
class TLS:
    server: ssl.SSLContext
    client: ssl.SSLContext


@pytest.fixture(scope="module")
def tls() -> TLS:
    ca = trustme.CA()
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # As tlsconf.make_context does: OpenSSL 3 otherwise answers a TCP EOF without close_notify
    # with a fatal alert, and the reply to a "ragged" half-close could not be sent.
    server.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
    ca.issue_cert("localhost").configure_cert(server)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client)
    return TLS(server, client)


def tcp_pair(small_buffers: bool = False) -> tuple[socket.socket, socket.socket]:
    """A connected (client, server) TCP pair on loopback."""
    with socket.socket() as ls:
        client = socket.socket()
        if small_buffers:
            # Fixed buffers switch off Linux autotuning, which could otherwise absorb megabytes.
            for s in (ls, client):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        ls.bind(("127.0.0.1", 0))
        ls.listen()
        client.connect(ls.getsockname())
        server, _ = ls.accept()
    return client, server


class RelayRun:
    """relay() running in a thread (the code under test is single-threaded itself)."""

    def __init__(self, target: Callable[[], tuple[int, int]]) -> None:
        self.result: tuple[int, int] | None = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._run, args=(target,), daemon=True)
        self.thread.start()

    def _run(self, target: Callable[[], tuple[int, int]]) -> None:
        try:
            self.result = target()
        except BaseException as e:  # reported by join()
            self.error = e

    def join(self, timeout: float = DEADLINE) -> tuple[int, int]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "relay did not return"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def start_relay(
    server_sock: socket.socket,
    service: tuple[int | socket.socket, ...],
    tls: TLS | None,
    *,
    idle_timeout: float | None = None,
    bufsize: int = 65536,
) -> RelayRun:
    def target() -> tuple[int, int]:
        a = server_sock
        if tls is not None:
            server_sock.settimeout(10)
            a = tls.server.wrap_socket(server_sock, server_side=True)
        return relay(a, *service, idle_timeout=idle_timeout, bufsize=bufsize)

    return RelayRun(target)


@dataclass
class Services:
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(
        self,
        argv: list[str],
        kind: str,
        stderr: int | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> tuple[subprocess.Popen[bytes], tuple[int | socket.socket, ...]]:
        """Start argv with stdin/stdout on a socketpair end or on two pipes; return our ends."""
        if kind == "socketpair":
            ours, theirs = socket.socketpair()
            with theirs:
                proc = subprocess.Popen(
                    argv,
                    stdin=theirs.fileno(),
                    stdout=theirs.fileno(),
                    stderr=stderr,
                    pass_fds=pass_fds,
                )
            ends: tuple[int | socket.socket, ...] = (ours,)
        else:
            in_r, in_w = os.pipe()
            out_r, out_w = os.pipe()
            proc = subprocess.Popen(
                argv, stdin=in_r, stdout=out_w, stderr=stderr, pass_fds=pass_fds
            )
            os.close(in_r)
            os.close(out_w)
            ends = (in_w, out_r)
        self.procs.append(proc)
        return proc, ends


@pytest.fixture
def services() -> Iterator[Services]:
    s = Services()
    yield s
    for p in s.procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)
        if p.stderr is not None:
            p.stderr.close()


async def exchange(
    port: int, data: bytes, ctx: ssl.SSLContext | None, *, expect: int | None = None
) -> bytes:
    """Send data while reading concurrently; stop reading at EOF (or after expect bytes)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="localhost" if ctx else None
    )

    async def send() -> None:
        view = memoryview(data)
        with contextlib.suppress(ConnectionError):
            for i in range(0, len(data), 64 * 1024):
                writer.write(view[i : i + 64 * 1024])
                await writer.drain()
            if ctx is None:
                writer.write_eof()

    sender = asyncio.create_task(send())
    got = bytearray()
    with contextlib.suppress(ConnectionError):
        while expect is None or len(got) < expect:
            chunk = await reader.read(64 * 1024)
            if not chunk:
                break
            got += chunk
    await sender
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()
    return bytes(got)


def run_exchange(
    port: int, data: bytes, ctx: ssl.SSLContext | None, *, expect: int | None = None
) -> bytes:
    return asyncio.run(asyncio.wait_for(exchange(port, data, ctx, expect=expect), DEADLINE))


def listening_relay(
    service: tuple[int | socket.socket, ...], tls: TLS | None
) -> tuple[int, RelayRun]:
    """A one-shot listener whose accepted connection is relayed; returns (port, run)."""
    ls = socket.create_server(("127.0.0.1", 0))
    port = ls.getsockname()[1]

    def target() -> tuple[int, int]:
        with ls:
            ls.settimeout(10)
            conn, _ = ls.accept()
        a = conn
        if tls is not None:
            conn.settimeout(10)
            a = tls.server.wrap_socket(conn, server_side=True)
        return relay(a, *service)

    return port, RelayRun(target)


def digest(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def recv_all(sock: socket.socket) -> bytes:
    """Read until EOF; a TLS socket must end with close_notify (suppress_ragged_eofs=False)."""
    out = bytearray()
    while True:
        try:
            chunk = sock.recv(64 * 1024)
        except ssl.SSLZeroReturnError:
            break  # close_notify after we sent ours
        if not chunk:
            break
        out += chunk
    return bytes(out)


def tls_client(tls: TLS, sock: socket.socket) -> ssl.SSLSocket:
    sock.settimeout(10)
    return tls.client.wrap_socket(sock, server_hostname="localhost", suppress_ragged_eofs=False)


@contextlib.contextmanager
def client_conn(c: socket.socket, tls: TLS | None) -> Iterator[socket.socket]:
    """The client end, wrapped in TLS when tls is given; closed afterwards either way."""
    conn = c if tls is None else tls_client(tls, c)
    try:
        yield conn
    finally:
        conn.close()
        c.close()


def tls_half_close(c: socket.socket) -> None:
    """Send close_notify without waiting for the peer's (possible since nothing is in flight)."""
    assert isinstance(c, ssl.SSLSocket)
    c.setblocking(False)
    with contextlib.suppress(ssl.SSLWantReadError):
        c.unwrap()
    c.settimeout(10)


def tls_unwrap(c: socket.socket) -> None:
    assert isinstance(c, ssl.SSLSocket)
    c.unwrap()


KINDS = ["socketpair", "pipes"]
TRANSPORTS = ["plain", "tls"]
matrix = pytest.mark.parametrize(("transport", "kind"), [(t, k) for t in TRANSPORTS for k in KINDS])


# --- bulk transfer -----------------------------------------------------------------------------


@matrix
def test_10mb_each_way_arrives_intact(
    transport: str, kind: str, payload: bytes, tls: TLS, services: Services
) -> None:
    ctx = tls if transport == "tls" else None
    proc, ends = services.start(["cat"], kind)
    port, run = listening_relay(ends, ctx)
    got = run_exchange(port, payload, ctx.client if ctx else None, expect=len(payload))
    assert len(got) == len(payload) and digest(got) == digest(payload)
    assert run.join() == (len(payload), len(payload))
    assert proc.wait(10) == 0


# --- half-close --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("transport", "kind"),
    [(t, k) for t in ["plain", "tls", "tls-ragged"] for k in KINDS],
)
def test_client_half_close_reaches_service_and_reply_still_flows(
    transport: str, kind: str, tls: TLS, services: Services
) -> None:
    proc, ends = services.start(["wc", "-c"], kind)
    c, s = tcp_pair()
    run = start_relay(s, ends, tls if transport != "plain" else None)
    with client_conn(c, tls if transport != "plain" else None) as conn:
        conn.sendall(b"x" * MB)
        if transport == "tls":
            tls_half_close(conn)
        else:
            # "tls-ragged": a TCP FIN without close_notify is an EOF too.
            socket.socket.shutdown(conn, socket.SHUT_WR)
        reply = conn.recv(100) if transport == "tls-ragged" else recv_all(conn)
    assert reply.strip() == str(MB).encode()
    assert run.join() == (MB, len(reply))
    assert proc.wait(10) == 0


SERVICE_CLOSES_OUTPUT_FIRST = r"""
import os, socket, stat, sys
os.write(1, b"banner\n")
if stat.S_ISSOCK(os.fstat(1).st_mode):
    socket.socket(fileno=os.dup(1)).shutdown(socket.SHUT_WR)
else:
    os.close(1)
n = 0
while chunk := os.read(0, 65536):
    n += len(chunk)
sys.stderr.write(str(n))
"""


@matrix
def test_service_half_close_reaches_client_and_upload_still_flows(
    transport: str, kind: str, tls: TLS, services: Services
) -> None:
    proc, ends = services.start(
        [sys.executable, "-c", SERVICE_CLOSES_OUTPUT_FIRST], kind, stderr=subprocess.PIPE
    )
    c, s = tcp_pair()
    run = start_relay(s, ends, tls if transport == "tls" else None)
    with client_conn(c, tls if transport != "plain" else None) as conn:
        # EOF (for TLS: a close_notify, else recv raises SSLEOFError) while we still send.
        assert recv_all(conn) == b"banner\n"
        conn.sendall(b"y" * MB)
        if transport == "tls":
            tls_unwrap(conn)  # completes: the relay's alert is in
        socket.socket.shutdown(conn, socket.SHUT_WR)
        assert proc.stderr is not None
        assert proc.stderr.read() == str(MB).encode()
    assert run.join() == (MB, len(b"banner\n"))


SERVICE_CLOSES_OUTPUT_ON_SIGNAL = r"""
import os, socket, stat, sys
os.read(int(sys.argv[1]), 1)
if stat.S_ISSOCK(os.fstat(1).st_mode):
    socket.socket(fileno=os.dup(1)).shutdown(socket.SHUT_WR)
else:
    os.close(1)
n = 0
while chunk := os.read(0, 65536):
    n += len(chunk)
sys.stderr.write(str(n))
"""


@pytest.mark.parametrize("kind", KINDS)
def test_tls_close_notify_waits_for_client_data_already_in_flight(
    kind: str, tls: TLS, services: Services
) -> None:
    # SSLSocket.unwrap() runs SSL_shutdown() twice and the second one would read, and discard
    # with APPLICATION_DATA_AFTER_CLOSE_NOTIFY, client data already waiting on the socket.
    go_r, go_w = os.pipe()
    proc, ends = services.start(
        [sys.executable, "-c", SERVICE_CLOSES_OUTPUT_ON_SIGNAL, str(go_r)],
        kind,
        stderr=subprocess.PIPE,
        pass_fds=(go_r,),
    )
    os.close(go_r)
    c, s = tcp_pair()
    run = start_relay(s, ends, tls)
    with client_conn(c, tls) as conn:
        # More than the relay buffer and the service's pipe or socket buffer hold, so that
        # records are still waiting on the relay's socket when the service closes its output.
        conn.sendall(b"q" * 400_000)
        os.write(go_w, b"!")
        os.close(go_w)
        assert recv_all(conn) == b""
        tls_unwrap(conn)
        socket.socket.shutdown(conn, socket.SHUT_WR)
        assert proc.stderr is not None
        assert proc.stderr.read() == b"400000"
    assert run.join() == (400_000, 0)


# --- failures ----------------------------------------------------------------------------------


@matrix
def test_service_dying_mid_transfer_ends_relay_and_delivers_its_output(
    transport: str, kind: str, payload: bytes, tls: TLS, services: Services
) -> None:
    ctx = tls if transport == "tls" else None
    _, ends = services.start(["head", "-c", "1000000"], kind)
    port, run = listening_relay(ends, ctx)
    got = run_exchange(port, payload, ctx.client if ctx else None)
    assert got == payload[:1000000]
    sent_ab, sent_ba = run.join()
    assert sent_ba == 1000000
    assert 1000000 <= sent_ab < len(payload)


@matrix
def test_client_reset_mid_transfer_ends_relay_and_service_sees_eof(
    transport: str, kind: str, tls: TLS, services: Services
) -> None:
    proc, ends = services.start(["cat"], kind)
    c, s = tcp_pair()
    run = start_relay(s, ends, tls if transport == "tls" else None)
    with client_conn(c, tls if transport != "plain" else None) as conn:
        conn.sendall(b"z" * 100_000)  # fits in the socket buffers: nobody has to read
        assert conn.recv(1) == b"z"  # the transfer is under way
        # SO_LINGER with a zero timeout turns close() into a RST (RFC 793 "abort").
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sent_ab, sent_ba = run.join()
    assert 0 < sent_ab <= 100_000 and sent_ba <= sent_ab
    proc.wait(10)  # the service saw EOF (or EPIPE) and exited instead of hanging


def test_service_exit_is_noticed_while_the_client_is_idle(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pipe trick: the write end of a pipe polls as an error once its reader is gone.
    monkeypatch.setattr(relay_mod, "LINGER", 0.2)
    _, ends = services.start(["sh", "-c", "exec 0<&-; echo bye"], "pipes")
    c, s = tcp_pair()
    run = start_relay(s, ends, None)
    with c:
        c.settimeout(10)
        assert recv_all(c) == b"bye\n"
        assert run.join(5) == (0, 4)  # the client never closed its side


def test_idle_timeout_ends_a_silent_connection(services: Services) -> None:
    _, ends = services.start(["cat"], "socketpair")
    c, s = tcp_pair()
    with c:
        run = start_relay(s, ends, None, idle_timeout=0.3)
        assert run.join(5) == (0, 0)
        assert time.monotonic() - run.started >= 0.3


def test_service_socket_may_be_given_as_a_bare_fd(services: Services) -> None:
    _, (ours,) = services.start(["cat"], "socketpair")
    assert isinstance(ours, socket.socket)
    c, s = tcp_pair()
    run = start_relay(s, (ours.detach(),), None)
    with c:
        c.sendall(b"fd" * 1000)
        c.shutdown(socket.SHUT_WR)
        c.settimeout(10)
        assert recv_all(c) == b"fd" * 1000
    assert run.join() == (2000, 2000)


def test_a_lone_pipe_fd_is_refused() -> None:
    r, w = os.pipe()
    c, s = tcp_pair()
    with c, s, pytest.raises(ValueError, match="must be a socket"):
        relay(s, w)
    os.close(r)
    os.close(w)


# --- bounded buffering -------------------------------------------------------------------------


def send_until_blocked(sock: socket.socket, data: bytes) -> int:
    """Send without blocking until the socket stays unwritable for a while; return bytes sent."""
    sock.setblocking(False)
    sent = 0
    while sent < len(data):
        try:
            sent += sock.send(data[sent : sent + 16384])
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            # Not writable for 0.5 s means the whole chain is full and nobody drains it.
            if not select.select([], [sock], [], 0.5)[1]:
                break
    return sent


def queued(fd: int, request: int) -> int:
    """Bytes the kernel holds for fd: SIOCINQ (unread) or SIOCOUTQ (TCP: not yet acknowledged)."""
    return int(struct.unpack("i", fcntl.ioctl(fd, request, b"\0" * 4))[0])


SIOCINQ = termios.FIONREAD
SIOCOUTQ = termios.TIOCOUTQ
# What the relay may hold beyond bufsize: with TLS, one decrypted record inside OpenSSL.
SLACK = {"plain": 0, "tls": 16384}


def small_socketpair() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair()
    for x in (ours, theirs):
        x.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        x.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    return ours, theirs


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_slow_service_bounds_what_the_relay_buffers(
    transport: str, payload: bytes, tls: TLS
) -> None:
    c, s = tcp_pair(small_buffers=True)
    ours, theirs = small_socketpair()
    s_fd = s.fileno()
    run = start_relay(s, (ours,), tls if transport == "tls" else None)
    with client_conn(c, tls if transport != "plain" else None) as conn, theirs:
        accepted = send_until_blocked(conn, payload)
        assert accepted < 2 * MB, accepted
        # Everything the client got rid of is in a kernel queue or in the relay's buffer. For
        # TLS the queues hold ciphertext (a little more than the plaintext), which only makes
        # the estimate of the relay's share smaller.
        in_kernel = (
            queued(conn.fileno(), SIOCOUTQ)
            + queued(s_fd, SIOCINQ)
            + queued(theirs.fileno(), SIOCINQ)
        )
        assert accepted - in_kernel <= 65536 + SLACK[transport], (accepted, in_kernel)
        conn.settimeout(10)
        sender = threading.Thread(target=conn.sendall, args=(payload[accepted:],))
        sender.start()
        got = bytearray()
        theirs.settimeout(10)
        while len(got) < len(payload):
            chunk = theirs.recv(MB)
            assert chunk
            got += chunk
        sender.join(DEADLINE)
        assert digest(bytes(got)) == digest(payload)
        socket.socket.shutdown(conn, socket.SHUT_WR)
        theirs.shutdown(socket.SHUT_WR)
        assert run.join() == (len(payload), 0)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_slow_client_bounds_what_the_relay_buffers(
    transport: str, payload: bytes, tls: TLS
) -> None:
    c, s = tcp_pair(small_buffers=True)
    ours, theirs = small_socketpair()
    s_fd, ours_fd = s.fileno(), ours.fileno()
    run = start_relay(s, (ours,), tls if transport == "tls" else None)
    with client_conn(c, tls if transport != "plain" else None) as conn, theirs:
        accepted = send_until_blocked(theirs, payload)
        assert accepted < 2 * MB, accepted
        in_kernel = (
            queued(ours_fd, SIOCINQ) + queued(s_fd, SIOCOUTQ) + queued(conn.fileno(), SIOCINQ)
        )
        assert accepted - in_kernel <= 65536 + SLACK[transport], (accepted, in_kernel)
        theirs.settimeout(10)

        def rest() -> None:
            theirs.sendall(payload[accepted:])
            theirs.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=rest)
        sender.start()
        conn.settimeout(10)
        got = recv_all(conn)
        sender.join(DEADLINE)
        assert digest(got) == digest(payload)
        if transport == "tls":
            tls_unwrap(conn)
        socket.socket.shutdown(conn, socket.SHUT_WR)
        assert run.join() == (0, len(payload))


def test_tls_data_buffered_inside_openssl_is_not_stranded(tls: TLS, services: Services) -> None:
    # One 10000-byte TLS record, a 1000-byte relay buffer: after the first read the rest sits
    # decrypted inside the SSL object and the socket no longer polls readable (SSLSocket.pending).
    _, ends = services.start(["cat"], "socketpair")
    c, s = tcp_pair()
    run = start_relay(s, ends, tls, bufsize=1000)
    with client_conn(c, tls) as conn:
        conn.sendall(b"p" * 10000)
        got = b""
        while len(got) < 10000:
            chunk = conn.recv(65536)
            assert chunk
            got += chunk
        tls_half_close(conn)
        assert recv_all(conn) == b""
    assert run.join() == (10000, 10000)
