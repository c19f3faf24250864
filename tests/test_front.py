"""The front process (front.py, frontconn.py) with a stand-in parent (frontrig.py): real TLS
clients (Python's ssl, openssl s_client), real programs on pipes, a real SEQPACKET channel."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import select
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from frontrig import FrontRig

from pyinetd.protocols import frontchan


@pytest.fixture
def client_ctx(pki: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    return ctx


@pytest.fixture
def rig(tmp_path: Path, pki: Path) -> Iterator[FrontRig]:
    with FrontRig(tmp_path, cert=pki / "cert.pem", key=pki / "key.pem") as r:
        yield r


def _tls(ctx: ssl.SSLContext, port: int, timeout: float = 10.0) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def _read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def _line(s: socket.socket) -> bytes:
    got = b""
    while not got.endswith(b"\n"):
        chunk = s.recv(100)
        if not chunk:
            break
        got += chunk
    return got


def test_tls_echo_reports_h_with_ssl_facts_then_e_with_bytes(
    rig: FrontRig, client_ctx: ssl.SSLContext
) -> None:
    with _tls(client_ctx, rig.port) as s:
        s.sendall(b"hello\n")
        assert _line(s) == b"hello\n"
    h = rig.message("H", 1)
    assert h.fields["env"]["SSL_PROTOCOL"] == "TLSv1.3"
    assert h.fields["env"]["SSL_TLS_SNI_SERVERNAME"] == "localhost"
    assert h.fields["env"]["SSL_CLIENT_VERIFY"] == "NONE"
    assert set(h.fields["env"]) <= frontchan.TLS_ENV
    e = rig.message("E", 1)
    assert e.fields["bytes_in"] == 6
    assert e.fields["bytes_out"] == 6
    assert rig.kinds(1) == ["H", "E"]


def test_client_tcp_eof_reaches_the_program_and_its_reply_still_arrives(
    rig: FrontRig, client_ctx: ssl.SSLContext
) -> None:
    """The client half-closes (TCP FIN, no close_notify): cat gets EOF, echoes everything,
    exits; the client reads the whole reply, then close_notify (a clean EOF)."""
    data = os.urandom(300_000)
    with _tls(client_ctx, rig.port) as s:
        s.sendall(data)
        socket.socket.shutdown(s, socket.SHUT_WR)  # the base class: keep the TLS session
        assert _read_all(s) == data
    assert rig.message("E", 1).fields["bytes_out"] == len(data)


def _bio_client(
    ctx: ssl.SSLContext, port: int, rcvbuf: int = 0
) -> tuple[socket.socket, ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    sock = socket.socket()
    sock.settimeout(10)
    if rcvbuf:  # a small window: the server's replies wait in its kernel's send queue
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname="localhost")
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            sock.sendall(out.read())
            inc.write(sock.recv(65536))
    sock.sendall(out.read())
    return sock, obj, inc, out


def _bio_read_to_end(sock: socket.socket, obj: ssl.SSLObject, inc: ssl.MemoryBIO) -> bytes:
    got = b""
    while True:
        try:
            chunk = obj.read(65536)
        except ssl.SSLWantReadError:
            raw = sock.recv(65536)
            if not raw:
                raise AssertionError("TCP EOF without close_notify") from None
            inc.write(raw)
            continue
        except ssl.SSLZeroReturnError:
            return got
        if not chunk:  # close_notify (CPython returns b"" for SSL_ERROR_ZERO_RETURN)
            return got
        got += chunk


def test_client_close_notify_is_eof_and_the_reply_follows(
    rig: FrontRig, client_ctx: ssl.SSLContext
) -> None:
    """The client sends close_notify (and keeps its socket open, reading): cat gets EOF;
    its echo arrives, then our close_notify."""
    sock, obj, inc, out = _bio_client(client_ctx, rig.port)
    with sock:
        obj.write(b"one\ntwo\n")
        with pytest.raises(ssl.SSLWantReadError):
            obj.unwrap()  # close_notify made; the server's not seen yet
        sock.sendall(out.read())
        assert _bio_read_to_end(sock, obj, inc) == b"one\ntwo\n"
    assert rig.message("E", 1).fields["bytes_in"] == 8


def test_openssl_s_client_is_served(rig: FrontRig, pki: Path) -> None:
    out = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{rig.port}",
            "-quiet",
            "-no_ign_eof",
            "-CAfile",
            str(pki / "ca.pem"),
            "-servername",
            "localhost",
            "-verify_return_error",
        ],
        input=b"",
        capture_output=True,
        timeout=20,
    )
    assert b"verify return:1" in out.stderr, out.stderr
    rig.message("H", 1)


def test_program_stdout_eof_sends_close_notify_while_client_input_goes_on(
    tmp_path: Path, pki: Path, client_ctx: ssl.SSLContext
) -> None:
    """TLS 1.3 half-close the other way: the program closes its stdout first; the client gets
    close_notify and then still sends (RFC 8446 6.1), which the program reads to its EOF."""
    kept = tmp_path / "kept"
    prog = ["/bin/sh", "-c", f"echo hi; exec 1>&-; cat > {kept}"]
    with FrontRig(tmp_path, cert=pki / "cert.pem", key=pki / "key.pem", program=prog) as rig:
        sock, obj, inc, out = _bio_client(client_ctx, rig.port)
        with sock:
            assert _bio_read_to_end(sock, obj, inc) == b"hi\n"
            obj.write(b"after close_notify\n")
            sock.sendall(out.read())
            with contextlib.suppress(ssl.SSLError):
                obj.unwrap()
            sock.sendall(out.read())
            sock.shutdown(socket.SHUT_WR)
            rig.message("E", 1)
            assert rig.children[0].wait(10) == 0  # cat read to its EOF
        assert kept.read_bytes() == b"after close_notify\n"


def test_unread_client_data_is_drained_so_no_reset_destroys_the_reply(
    tmp_path: Path, pki: Path, client_ctx: ssl.SSLContext
) -> None:
    """The program writes 4 MB and exits without reading its input while the client is
    still sending: the front reads and drops the client's bytes (linger) instead of closing
    with them unread, which sends RST (RFC 1122 4.2.2.13) and drops the reply still queued
    in the kernel."""
    prog = ["/bin/sh", "-c", "head -c 4000000 /dev/zero"]
    with FrontRig(tmp_path, cert=pki / "cert.pem", key=pki / "key.pem", program=prog) as rig:
        for _ in range(2):
            sock, obj, inc, out = _bio_client(client_ctx, rig.port, rcvbuf=4096)
            with sock:
                assert _send_while_reading(sock, obj, inc, out, 16_000_000) == 4_000_000


def _send_while_reading(
    sock: socket.socket, obj: ssl.SSLObject, inc: ssl.MemoryBIO, out: ssl.MemoryBIO, n: int
) -> int:
    """Send n bytes while reading everything until close_notify; the bytes read (one
    thread: an SSL object may not be read and written at once from two)."""
    sock.setblocking(False)
    pending, got, end = b"", 0, time.monotonic() + 20
    while time.monotonic() < end:
        if not pending and n > 0:
            obj.write(b"x" * 16384)
            n -= 16384
            pending = out.read()
        r, w, _ = select.select([sock], [sock] if pending else [], [], 1)
        if w:
            with contextlib.suppress(BlockingIOError):
                pending = pending[sock.send(pending) :]
        if r:
            try:
                raw = sock.recv(65536)
            except BlockingIOError:
                continue
            if not raw:
                return got  # (no close_notify: the test's assertion on the count fails)
            inc.write(raw)
            while True:
                try:
                    chunk = obj.read(65536)
                except ssl.SSLWantReadError:
                    break
                if not chunk:
                    return got  # close_notify
                got += len(chunk)
    raise AssertionError(f"no end after {got} bytes")


def test_handshake_deadline_is_f(tmp_path: Path, pki: Path) -> None:
    with FrontRig(tmp_path, cert=pki / "cert.pem", key=pki / "key.pem", deadline=0.5) as rig:
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", rig.port)) as s:
            s.sendall(b"\x16\x03\x01\x00\xff")  # the start of a ClientHello, then nothing
            f = rig.message("F", 1)
            assert "not completed" in f.fields["reason"]
            assert time.monotonic() - t0 < 5
            s.settimeout(5)
            assert s.recv(100) == b""  # closed


def test_handshake_garbage_is_f_with_the_reason(rig: FrontRig) -> None:
    with socket.create_connection(("127.0.0.1", rig.port)) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        f = rig.message("F", 1)
        assert "TLS handshake failed" in f.fields["reason"]


def test_n_ends_the_connection_with_e(
    tmp_path: Path, pki: Path, client_ctx: ssl.SSLContext
) -> None:
    with FrontRig(tmp_path, cert=pki / "cert.pem", key=pki / "key.pem", answer="N") as rig:
        with _tls(client_ctx, rig.port) as s:
            s.sendall(b"x\n")
            assert _read_all(s) == b""
        rig.message("E", 1)
        assert rig.kinds(1) == ["H", "E"]


def test_garbage_from_the_parent_ends_the_front_non_zero_logged(rig: FrontRig) -> None:
    rig.send(b'C{"id":1}')
    assert rig.proc.wait(10) == 2
    assert "breaks the protocol" in rig.log()


def test_d_ends_the_front_once_its_connections_end(
    rig: FrontRig, client_ctx: ssl.SSLContext
) -> None:
    with _tls(client_ctx, rig.port) as s:
        s.sendall(b"a\n")
        assert _line(s) == b"a\n"
        rig.send(frontchan.encode("D", {}))
        with pytest.raises(subprocess.TimeoutExpired):
            rig.proc.wait(0.5)  # still serving s
        s.sendall(b"b\n")
        assert _line(s) == b"b\n"
    assert rig.proc.wait(10) == 0


def test_k_aborts_one_connection_only(rig: FrontRig, client_ctx: ssl.SSLContext) -> None:
    with _tls(client_ctx, rig.port) as a, _tls(client_ctx, rig.port) as b:
        a.sendall(b"a\n")
        b.sendall(b"b\n")
        assert _line(a) == b"a\n" and _line(b) == b"b\n"
        rig.send(frontchan.encode("K", {"id": 1}))
        assert a.recv(100) == b""
        b.sendall(b"still\n")
        assert _line(b) == b"still\n"
    rig.message("E", 2)
    assert "E" not in rig.kinds(1)


def test_a_slow_reader_does_not_slow_the_others(
    tmp_path: Path, pki: Path, client_ctx: ssl.SSLContext
) -> None:
    """One client's program writes 200 MB and the client reads none of it: the front holds
    at most its buffers for it (backpressure to the program), and serves another meanwhile."""
    prog = [
        "/bin/sh",
        "-c",
        "read first; if [ $first = flood ]; then head -c 200000000 /dev/zero; else echo $first; fi",
    ]
    with (
        FrontRig(tmp_path, cert=pki / "cert.pem", key=pki / "key.pem", program=prog) as rig,
        _tls(client_ctx, rig.port) as slow,
    ):
        rss0 = _rss_kib(rig.proc.pid)
        slow.sendall(b"flood\n")
        rig.message("H", 1)
        rss = []
        for i in range(5):
            t0 = time.monotonic()
            with _tls(client_ctx, rig.port) as s:
                s.sendall(b"quick%d\n" % i)
                assert _line(s) == b"quick%d\n" % i
            assert time.monotonic() - t0 < 3.0
            rss.append(_rss_kib(rig.proc.pid))
        # The flood is held back, not buffered: the front grows by its buffers at most.
        assert max(rss) - rss0 < 16 * 1024, (rss0, rss)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_the_front_is_hardened(rig: FrontRig, client_ctx: ssl.SSLContext) -> None:
    with _tls(client_ctx, rig.port) as s:
        s.sendall(b"x\n")
        assert _line(s) == b"x\n"
    status = Path(f"/proc/{rig.proc.pid}/status").read_text()
    assert "NoNewPrivs:\t1" in status
    assert "Seccomp:\t2" in status
    soft, hard = (
        int(v)
        for v in Path(f"/proc/{rig.proc.pid}/limits")
        .read_text()
        .split("Max open files")[1]
        .split()[:2]
    )
    assert soft == hard
    assert "not applied" not in rig.log()


def test_the_front_filter_forbids_exec_and_fork_but_not_threads() -> None:
    code = """
import os, threading, errno
from pyinetd import sandbox
from pyinetd.procsettings import prctl, PR_SET_NO_NEW_PRIVS
prctl(PR_SET_NO_NEW_PRIVS, 1)
sandbox.attach_filter(sandbox.seccomp_filter(front=True))
t = threading.Thread(target=lambda: None); t.start(); t.join()
for what, call in (("fork", os.fork), ("exec", lambda: os.execv("/bin/true", ["true"]))):
    try:
        pid = call()
    except PermissionError:
        print(what, "denied")
    else:
        if pid == 0:
            os._exit(0)
        print(what, "allowed")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    assert out.stdout.split("\n")[:2] == ["fork denied", "exec denied"], out.stderr


def _serve_echo() -> tuple[socket.socket, int]:
    lsn = socket.socket()
    lsn.bind(("127.0.0.1", 0))
    lsn.listen(64)
    return lsn, lsn.getsockname()[1]


def test_redirect_relays_with_half_close_both_ways(tmp_path: Path) -> None:
    lsn, port = _serve_echo()
    with lsn, FrontRig(tmp_path, redirect=f"127.0.0.1:{port}") as rig:
        with socket.create_connection(("127.0.0.1", rig.port), timeout=10) as c:
            c.sendall(b"to the target")
            c.shutdown(socket.SHUT_WR)
            t, _ = lsn.accept()
            with t:
                t.settimeout(10)
                assert _read_all(t) == b"to the target"  # the client's EOF passed on
                t.sendall(b"reply after EOF")
                t.shutdown(socket.SHUT_WR)
                assert _read_all(c) == b"reply after EOF"
        e = rig.message("E", 1)
        assert (e.fields["bytes_in"], e.fields["bytes_out"]) == (13, 15)
        assert rig.kinds(1) == ["H", "E"]


def test_redirect_refused_target_is_f(tmp_path: Path) -> None:
    lsn, port = _serve_echo()
    lsn.close()  # nothing listens there now
    with (
        FrontRig(tmp_path, redirect=f"127.0.0.1:{port}") as rig,
        socket.create_connection(("127.0.0.1", rig.port), timeout=10) as c,
    ):
        assert "refused" in rig.message("F", 1).fields["reason"]
        assert c.recv(10) == b""


async def _many(ctx: ssl.SSLContext, port: int, n: int) -> list[bool]:
    """n TLS clients, each echoing one line; all held open until every one has echoed or
    failed, then closed. True for each that echoed."""
    settled = 0
    all_settled = asyncio.Event()
    go = asyncio.Event()

    def settle() -> None:
        nonlocal settled
        settled += 1
        if settled == n:
            all_settled.set()

    async def one(i: int) -> bool:
        w = None
        try:
            r, w = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost"),
                60,
            )
            w.write(b"%d\n" % i)
            ok = await asyncio.wait_for(r.readline(), 60) == b"%d\n" % i
        except (TimeoutError, OSError, ssl.SSLError, asyncio.IncompleteReadError):
            ok = False
        settle()
        await go.wait()  # every connection open at once
        if w is not None:
            w.close()
            with contextlib.suppress(Exception):
                await w.wait_closed()
        return ok

    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    await asyncio.wait_for(all_settled.wait(), 120)
    go.set()
    return list(await asyncio.gather(*tasks))


@pytest.fixture
def many_fds() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_1000_concurrent_connections_are_served(
    tmp_path: Path, pki: Path, client_ctx: ssl.SSLContext, many_fds: None
) -> None:
    """Started with a soft fd limit of 1024 (3 fds a connection here), the front raises it."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with FrontRig(
        tmp_path, cert=pki / "cert.pem", key=pki / "key.pem", nofile=(1024, min(hard, 8192))
    ) as rig:
        results = asyncio.run(_many(client_ctx, rig.port, 1000))
        assert sum(results) == 1000


def test_past_the_fd_limit_connections_are_refused_with_one_log_line(
    tmp_path: Path, pki: Path, client_ctx: ssl.SSLContext, many_fds: None
) -> None:
    with FrontRig(tmp_path, cert=pki / "cert.pem", key=pki / "key.pem", nofile=(200, 200)) as rig:
        results = asyncio.run(_many(client_ctx, rig.port, 300))
        assert 0 < sum(results) < 300
        assert rig.proc.poll() is None  # alive
        lines = [ln for ln in rig.log().splitlines() if "out of fds" in ln or "EMFILE" in ln]
        assert 1 <= len(lines) <= 2, rig.log()
        assert any(m.kind == "F" and "fd" in m.fields["reason"] for m in rig.messages)
        # Once the load is gone, the next connection is served.
        with _tls(client_ctx, rig.port) as s:
            s.sendall(b"after\n")
            assert _line(s) == b"after\n"
