"""Every stage before a service starts is bounded and admitted: PROXY headers, TLS hellos,
metrics clients. Attacks from issue 14 (items 5, 6, 13) and issue 18 (item 6), run as root on
loopback against real pyinetd processes.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import selectors
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    ATTACKER,
    DEADLINE,
    Pyinetd,
    children_of,
    closed_by_server,
    free_port,
    idle_connections,
    status_of,
    tcp_talk,
    wait_for,
    write_pki,
)

from pyinetd.runtime.loop import Timer

Start = Callable[..., Pyinetd]
PER_SOURCE = 16  # max_pending_per_source's default


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rx_queue(local_port: int, remote_port: int) -> int | None:
    """Bytes waiting unread on pyinetd's end of a loopback TCP connection (/proc/net/tcp)."""
    with open("/proc/net/tcp") as f:
        for row in f.read().splitlines()[1:]:
            fields = row.split()
            lport = int(fields[1].rsplit(":", 1)[1], 16)
            rport = int(fields[2].rsplit(":", 1)[1], 16)
            if (lport, rport) == (local_port, remote_port):
                return int(fields[4].split(":")[1], 16)
    return None


def proxy_service(port: int, **extra: object) -> dict[str, object]:
    return {
        "listen": f"127.0.0.1:{port}",
        "exec": ["/bin/sh", "-c", 'echo "$REMOTE_ADDR"; cat'],
        "user": "nobody",
        "group": "nogroup",
        **extra,
    }


def echo_service(port: int) -> dict[str, object]:
    return {"listen": f"127.0.0.1:{port}", "builtin": "echo"}


# ---------------------------------------------------------------- PROXY


@pytest.mark.parametrize("version", ["v2", "any"])
def test_proxy_reader_refuses_a_split_bogus_v2_signature_at_once(
    inetd: Start, version: str
) -> None:
    port = free_port()
    p = inetd({"services": {"p": proxy_service(port, proxy_protocol=version, proxy_timeout=30)}})
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
        s.sendall(b"\r\n\r\n")  # a prefix of the v2 signature: consumed as header bytes
        me = s.getsockname()[1]
        wait_for(lambda: rx_queue(port, me) == 0, what="pyinetd to read the first bytes")
        s.sendall(b"XYZ")  # makes it no signature at all
        # Refused at once, not at proxy_timeout: once, recv(-2) raised ValueError on a
        # readable socket, 22,004 tracebacks and 4.7 s of CPU until the timeout.
        s.settimeout(3.0)
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(100) == b""
    p.wait_log(r"p: refused 127\.0\.0\.1:\d+: proxy \(")
    assert "internal error" not in p.log()
    assert "Traceback" not in p.log()


def test_proxy_slowloris_is_bounded_per_source_and_others_are_served(inetd: Start) -> None:
    port, other = free_port(), free_port()
    p = inetd(
        {
            "services": {
                "p": proxy_service(port, proxy_protocol="v1", proxy_timeout=30),
                "e": echo_service(other),
            },
        }
    )
    base = fd_count(p.pid)
    n = 300
    with idle_connections(port, n, b"PROX") as socks:
        # Unbounded, 1,100 of them pinned the parent at its fd limit.
        wait_for(
            lambda: sum(closed_by_server(s) for s in socks) >= n - PER_SOURCE,
            timeout=5.0,
            what="all but PER_SOURCE slowloris connections refused",
        )
        assert fd_count(p.pid) <= base + PER_SOURCE + 2
        assert status_of(p)["p"]["refused"] == {"pending_per_source": n - PER_SOURCE}
        assert tcp_talk(other, b"still here") == b"still here"
        # Another source still gets through the same service.
        header = b"PROXY TCP4 192.0.2.1 192.0.2.2 5555 80\r\n"
        assert tcp_talk(port, header + b"hi") == b"192.0.2.1\nhi"
    p.wait_log(rf"p: refused {ATTACKER}:\d+: pending_per_source")


def test_proxy_from_untrusted_peer_refused_before_reading(inetd: Start) -> None:
    port = free_port()
    p = inetd(
        {"services": {"p": proxy_service(port, proxy_protocol="v1", proxy_from=["127.0.0.9"])}}
    )
    base = fd_count(p.pid)
    with idle_connections(port, 50) as socks:
        # Nothing sent: refused on the socket's peer alone, holding nothing.
        wait_for(lambda: all(closed_by_server(s) for s in socks), timeout=5.0, what="refusals")
        assert fd_count(p.pid) <= base + 1
    assert status_of(p)["p"]["refused"] == {"proxy_from": 50}


def test_proxy_protocol_without_proxy_from_warns_at_load(inetd: Start) -> None:
    port, trusted = free_port(), free_port()
    p = inetd(
        {
            "services": {
                "open": proxy_service(port, proxy_protocol="any"),
                "fine": proxy_service(trusted, proxy_protocol="any", proxy_from=["127.0.0.1"]),
            }
        }
    )
    (line,) = p.wait_log(r"proxy_protocol without proxy_from")
    assert "open:" in line
    assert "fine:" not in p.log()


# ---------------------------------------------------------------- TLS


@pytest.fixture
def tls_files(tmp_path: Path) -> Path:
    return write_pki(tmp_path)


def test_half_open_tls_connections_fork_nothing_and_stall_nothing(
    inetd: Start, tls_files: Path
) -> None:
    import ssl

    port, other = free_port(), free_port()
    p = inetd(
        {
            "services": {
                "t": {
                    **proxy_service(port),
                    "tls": {"cert": "cert.pem", "key": "key.pem", "handshake_timeout": 30},
                    "deny": ["127.0.0.3"],
                },
                "e": echo_service(other),
            },
        }
    )
    n = 200
    with idle_connections(port, n) as socks:
        # Once, each forked a relay before its handshake: 3,000 made 864 processes.
        wait_for(
            lambda: (
                sum(closed_by_server(s) for s in socks) >= n - PER_SOURCE
                or len(relays_of(p.pid)) >= PER_SOURCE
            ),
            timeout=5.0,
            what="the connections refused or forked",
        )
        assert relays_of(p.pid) == []  # (the service's front is no child of nobody's)
        assert status_of(p)["t"]["refused"] == {"pending_per_source": n - PER_SOURCE}
        assert tcp_talk(other, b"still here") == b"still here"
        # A real client from elsewhere is served meanwhile.
        ctx = ssl.create_default_context(cafile=str(tls_files / "ca.pem"))
        with (
            socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as s,
        ):
            assert s.recv(100) == b"127.0.0.1\n"
    # deny is checked before any handshake, fork or slot.
    with socket.socket() as s:
        s.settimeout(DEADLINE)
        s.bind(("127.0.0.3", 0))
        s.connect(("127.0.0.1", port))
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(100) == b""
    p.wait_log(r"t: refused 127\.0\.0\.3:\d+: deny")


def test_tls_port_refuses_what_is_not_a_client_hello_without_forking(
    inetd: Start, tls_files: Path
) -> None:
    port = free_port()
    p = inetd(
        {"services": {"t": {**proxy_service(port), "tls": {"cert": "cert.pem", "key": "key.pem"}}}}
    )
    with contextlib.suppress(ConnectionResetError):  # closed with the request unread
        assert tcp_talk(port, b"GET / HTTP/1.0\r\n\r\n") == b""
    p.wait_log(r"t: refused 127\.0\.0\.1:\d+: tls \(not a TLS ClientHello\)")
    assert "-> pid" not in p.log()


# ---------------------------------------------------------------- metrics


def test_metrics_slowloris_is_bounded_and_scrapes_still_work(inetd: Start) -> None:
    mport = free_port()
    p = inetd({"metrics": f"127.0.0.1:{mport}", "services": {"e": echo_service(free_port())}})
    base = fd_count(p.pid)
    n = 100
    with idle_connections(mport, n) as socks:
        # Held until CLIENT_DEADLINE (5 s) each, unbounded; this waits 3 s at most.
        wait_for(
            lambda: sum(closed_by_server(s) for s in socks) >= n - 8,
            timeout=3.0,
            what="all but 8 metrics clients refused",
        )
        assert fd_count(p.pid) <= base + 8 + 1
        out = tcp_talk(mport, b"GET /metrics HTTP/1.0\r\n\r\n")
        assert out.startswith(b"HTTP/1.0 200 OK")


# ---------------------------------------------------------------- the loop's guard


def test_a_handler_that_raises_gets_its_connection_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the loop does after any handler raised (issue 18, item 6: a readable socket
    whose handler raised was left registered, and raised again 22,004 times)."""
    import selectors

    from pyinetd.config import build
    from pyinetd.protocols import proxyproto
    from pyinetd.server import Server

    port = free_port()
    svc = {"listen": f"127.0.0.1:{port}", "exec": "/bin/cat", "proxy_protocol": "v1"}
    server = Server(build({"services": {"p": svc}}, tmp_path / "inetd.yaml"))
    server.bind()
    connections, sel = server.connections, server.loop.sel
    pools = connections.stages.pools
    try:
        (lst,) = server.services.listeners.values()
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as client:
            conn, addr = lst.sock.accept()
            connections.serve_stream(lst, conn, addr)
            assert pools["p"].slots.used == 1

            def broken(*args: object, **kw: object) -> None:
                raise ValueError("a bug in the parser")

            monkeypatch.setattr(proxyproto, "parse", broken)
            client.sendall(b"PROXY ")
            key = sel.get_key(conn)
            with pytest.raises(ValueError):
                key.data(selectors.EVENT_READ)
            connections.contain(key)
            assert conn.fileno() == -1
            assert conn not in {k.fileobj for k in sel.get_map().values()}
            assert not connections.stages.pending and pools["p"].slots.used == 0
            with contextlib.suppress(ConnectionResetError):  # closed with "PROXY " unread
                assert client.recv(10) == b""
    finally:
        for lst in server.services.listeners.values():
            lst.sock.close()
        server.loop.close()
        server.spawner.close()


def test_tls_waiting_for_a_hello_holds_its_place_under_max_connections(
    inetd: Start, tls_files: Path
) -> None:
    """on_limit: queue still queues: a connection waiting for its ClientHello counts, so the
    next one waits in the backlog instead of being refused when its hello comes second."""
    import ssl
    import threading

    port = free_port()
    inetd(
        {
            "services": {
                "t": {
                    "listen": f"127.0.0.1:{port}",
                    "exec": ["/bin/sh", "-c", "echo hi; cat >/dev/null"],
                    "user": "nobody",
                    "group": "nogroup",
                    "tls": {"cert": "cert.pem", "key": "key.pem"},
                    "max_connections": 1,
                }
            }
        }
    )
    ctx = ssl.create_default_context(cafile=str(tls_files / "ca.pem"))
    a = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    b = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    bport = b.getsockname()[1]
    got: list[bytes | Exception] = []

    def second() -> None:
        try:
            with ctx.wrap_socket(b, server_hostname="localhost") as tb:
                got.append(tb.recv(100))
        except (OSError, ssl.SSLError) as exc:
            got.append(exc)

    with ctx.wrap_socket(a, server_hostname="localhost") as ta:
        assert ta.recv(100) == b"hi\n"
        thread = threading.Thread(target=second, daemon=True)
        thread.start()
        # B's ClientHello has reached pyinetd's end (queued, or already refused).
        wait_for(lambda: rx_queue(port, bport) != 0, what="the second ClientHello sent")
    thread.join(DEADLINE)
    b.close()
    assert got == [b"hi\n"]


# ------------------------------------------------- TLS handshakes and pools (issue 24)


def canned_client_hello() -> bytes:
    """A real TLS ClientHello (a client's first flight), made once and replayable: what an
    attacker sends on every connection before it stalls."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    assert hello[0] == 22 and len(hello) > 200  # a handshake record
    return hello


def tls_echo(port: int, tls_files: Path, source: str = "127.0.0.1") -> bytes:
    """A real TLS client from ``source``: the service's first line (``$REMOTE_ADDR``)."""
    import ssl

    ctx = ssl.create_default_context(cafile=str(tls_files / "ca.pem"))
    with socket.socket() as raw:
        raw.settimeout(DEADLINE)
        raw.bind((source, 0))
        raw.connect(("127.0.0.1", port))
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            return s.recv(100)


def tls_service(port: int, **tls: object) -> dict[str, object]:
    return {**proxy_service(port), "tls": {"cert": "cert.pem", "key": "key.pem", **tls}}


def relays_of(pid: int) -> list[int]:
    """The live processes of pyinetd ``pid`` running as the service's user (nobody): a
    program, or a relay where no front serves; the exit watcher, should it start, is root's,
    and a front runs under its own uid."""
    nobody = pwd.getpwnam("nobody").pw_uid
    out = []
    for kid, state in children_of(pid):
        with contextlib.suppress(OSError), open(f"/proc/{kid}/status") as f:
            # (its real uid: a relay is not dumpable, so /proc/PID itself is root's)
            uid = next(int(ln.split()[1]) for ln in f if ln.startswith("Uid:"))
            if state != "Z" and uid == nobody:
                out.append(kid)
    return out


def ended_after_server_bytes(s: socket.socket) -> bool:
    """True when the server has closed ``s``, after whatever it sent (a ServerHello) is read;
    never blocks."""
    s.setblocking(False)
    try:
        while s.recv(65536):
            pass
    except BlockingIOError:
        return False
    except OSError:
        pass
    return True


def stalled_hello(port: int, hello: bytes, source: str = ATTACKER) -> socket.socket:
    """A connection from ``source`` that sends ``hello`` and then nothing."""
    s = socket.socket()
    s.settimeout(DEADLINE)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    with contextlib.suppress(OSError):  # (a refused one may be reset)
        s.sendall(hello)
    return s


def test_canned_client_hellos_that_stall_hold_at_most_max_pending_per_source_and_no_process(
    inetd: Start, tls_files: Path
) -> None:
    """Issue 24, item 3: 300 connections that sent a pre-computed ClientHello and stalled
    made 300 relays in 4 s: the hello freed the pending slot, and the relay waited for the
    rest of the handshake. The connection now keeps its slot until its front reports the
    handshake complete: at most max_pending_per_source pending from one address, the rest
    refused pending_per_source, no process for any of them; another service and a real
    client are served."""
    port, other = free_port(), free_port()
    p = inetd(
        {"services": {"t": tls_service(port, handshake_timeout=30), "e": echo_service(other)}}
    )
    hello = canned_client_hello()
    n, most = 300, 0
    socks: list[socket.socket] = []
    try:

        def relays() -> int:
            nonlocal most
            most = max(most, len(relays_of(p.pid)))
            return most

        for i in range(n):
            socks.append(stalled_hello(port, hello))
            if i % 5 == 4:
                relays()
        wait_for(
            lambda: (
                sum(closed_by_server(s) for s in socks) >= n - PER_SOURCE or relays() > PER_SOURCE
            ),
            what="all but PER_SOURCE stalled handshakes refused (or more relays)",
        )
        assert relays() == 0, f"{most} processes alive at once for stalled handshakes"
        # The PER_SOURCE admitted ones wait in their front's handshakes, counted as pending.
        assert status_of(p)["t"]["pending"] == PER_SOURCE
        assert sum(closed_by_server(s) for s in socks) == n - PER_SOURCE
        assert status_of(p)["t"]["refused"] == {"pending_per_source": n - PER_SOURCE}
        # Another service answers, and the same service serves a real client from elsewhere.
        t0 = time.monotonic()
        assert tcp_talk(other, b"still here", timeout=2.0) == b"still here"
        assert time.monotonic() - t0 < 2.0
        assert tls_echo(port, tls_files) == b"127.0.0.1\n"
        assert len(relays_of(p.pid)) <= 1
    finally:
        for s in socks:
            s.close()


def test_a_stalled_handshake_s_relay_is_killed_by_the_parent_at_its_deadline(
    inetd: Start, tls_files: Path
) -> None:
    """The handshake's deadline counts from the connection's arrival: a client that stalls
    after its hello is dropped by its front when what is left of handshake_timeout has
    passed (the parent's own deadline, a grace later, is the backstop), counted and logged.
    Its slot is free again."""
    port = free_port()
    # (busy_message: nothing is written into a connection its relay has taken over)
    service = {**tls_service(port, handshake_timeout=3), "busy_message": "x"}
    p = inetd({"services": {"t": service}})
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
        arrived = time.monotonic()
        # The hello comes late (within hello_timeout, 3 s): 2 of the handshake's 3 s are gone.
        wait_for(lambda: time.monotonic() - arrived >= 2.0, what="two seconds")
        s.sendall(canned_client_hello())
        wait_for(lambda: status_of(p)["t"]["pending"] == 1, what="the handshake pending")
        p.wait_log(r"t: refused 127\.0\.0\.1:\d+: tls \(TLS handshake with .* failed in front")
        elapsed = time.monotonic() - arrived
        # At 3 s from the arrival; a deadline counted from the hand-over would be 5 s.
        assert 2.9 <= elapsed < 4.5, elapsed
        got = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):  # the relay's first flight, then EOF
                got += chunk
        assert got[:1] == b"\x16"  # a ServerHello came, from the front
    assert status_of(p)["t"]["refused"] == {"tls": 1}
    assert "internal error" not in p.log() and "Traceback" not in p.log()
    # The slot and the place are free: a real client is served.
    assert tls_echo(port, tls_files) == b"127.0.0.1\n"


def test_a_full_pool_of_stalled_handshakes_evicts_its_oldest(inetd: Start, tls_files: Path) -> None:
    """A pool full of handshakes whose clients stalled after their hello (none waits for its
    first bytes) makes room for a new connection by ending its oldest (K to its front),
    rather than refuse every client until the handshake deadline."""
    port = free_port()
    p = inetd({"max_pending": 4, "services": {"t": tls_service(port, handshake_timeout=60)}})
    hello = canned_client_hello()
    socks: list[socket.socket] = []
    try:
        for _ in range(4):
            socks.append(stalled_hello(port, hello))
        wait_for(lambda: status_of(p)["t"]["pending"] == 4, what="four in their handshake")
        first = socks[0].getsockname()[1]
        assert tls_echo(port, tls_files) == b"127.0.0.1\n"
        p.wait_log(
            rf"t: refused 127\.0\.0\.2:{first}: pending \(evicted: the oldest of a full pool\)"
        )
        wait_for(
            lambda: ended_after_server_bytes(socks[0]), what="the oldest stalled handshake ended"
        )
        assert not any(ended_after_server_bytes(s) for s in socks[1:])
        assert status_of(p)["t"]["pending"] == 3  # the stalled ones left: no process each
        # (the real client's program, once its connection is over, is the only one there was)
        wait_for(lambda: relays_of(p.pid) == [], what="no process left")
        assert status_of(p)["t"]["refused"] == {"pending": 1}
    finally:
        for s in socks:
            s.close()


def test_idle_tls_connections_to_one_service_refuse_no_other_service(
    inetd: Start, tls_files: Path
) -> None:
    """Issue 24, item 6: max_pending (256) was one pool for every service: 256 idle
    connections from 16 addresses to one TLS service refused every other TLS and PROXY
    service, a trusted balancer's connections included. Each service has its own pool now,
    and a full pool evicts its oldest waiting connection for a new one."""
    t1, t2, px = free_port(), free_port(), free_port()
    p = inetd(
        {
            "services": {
                "t1": tls_service(t1, handshake_timeout=60, hello_timeout=60),
                "t2": tls_service(t2),
                "px": proxy_service(px, proxy_protocol="v1", proxy_from=["127.0.0.1"]),
            },
        }
    )
    sources = [f"127.0.0.{10 + i}" for i in range(16)]
    socks: list[socket.socket] = []
    try:
        for src in sources:
            for _ in range(PER_SOURCE):
                s = socket.socket()
                socks.append(s)
                s.bind((src, 0))
                s.connect(("127.0.0.1", t1))
        # All accepted (the listener's accept queue, /proc/net/tcp's rx_queue, is empty).
        wait_for(lambda: rx_queue(t1, 0) == 0, what="pyinetd accepting the idle connections")
        assert not any(closed_by_server(s) for s in socks)
        # Another TLS service, and a PROXY service behind its trusted balancer.
        assert tls_echo(t2, tls_files) == b"127.0.0.1\n"
        header = b"PROXY TCP4 192.0.2.1 192.0.2.2 5555 80\r\n"
        assert tcp_talk(px, header + b"hi") == b"192.0.2.1\nhi"
        # The full pool itself makes room: the oldest idle connection goes, the new one is
        # served.
        assert tls_echo(t1, tls_files) == b"127.0.0.1\n"
        wait_for(lambda: closed_by_server(socks[0]), what="the oldest idle connection evicted")
        assert sum(closed_by_server(s) for s in socks) == 1
        refused = status_of(p)
        assert refused["t1"]["refused"] == {"pending": 1}
        assert refused["t2"]["refused"] == {} and refused["px"]["refused"] == {}
    finally:
        for s in socks:
            s.close()


def test_tls_per_source_counts_connections_waiting_for_their_hello(
    inetd: Start, tls_files: Path
) -> None:
    """Issue 24, item 6: per_source did not count connections whose ClientHello was due,
    while max_connections did: with per_source: 2, one address held 4 of 5 places and the
    next client timed out."""
    port = free_port()
    service = tls_service(port, handshake_timeout=60, hello_timeout=60)
    p = inetd({"services": {"t": {**service, "max_connections": 5, "per_source": 2}}})
    with idle_connections(port, 4) as socks:
        wait_for(
            lambda: sum(closed_by_server(s) for s in socks) >= 2,
            timeout=5.0,
            what="the attacker's third and fourth connections refused (per_source)",
        )
        assert sum(closed_by_server(s) for s in socks) == 2
        assert status_of(p)["t"]["refused"] == {"per_source": 2}
        # Three other clients get the three places left, at once.
        import ssl

        ctx = ssl.create_default_context(cafile=str(tls_files / "ca.pem"))
        held: list[ssl.SSLSocket] = []
        try:
            for i in range(3):
                raw = socket.socket()
                raw.settimeout(DEADLINE)
                raw.bind((f"127.0.0.{3 + i}", 0))
                raw.connect(("127.0.0.1", port))
                held.append(ctx.wrap_socket(raw, server_hostname="localhost"))
                assert held[-1].recv(100) == f"127.0.0.{3 + i}\n".encode()
        finally:
            for t in held:
                t.close()


def test_a_tls_services_banner_is_sent_inside_tls(inetd: Start, tls_files: Path) -> None:
    """The banner goes out once the handshake is complete, as the first TLS record (it was
    written in plaintext between the client's hello and the server's, breaking every
    handshake of a TLS service with a banner)."""
    port = free_port()
    inetd({"services": {"t": {**tls_service(port), "banner_text": "welcome\n"}}})
    assert tls_echo(port, tls_files) == b"welcome\n"


class _Gate:
    """A gate that records what a stage tells it (the stage's own logic under test)."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.told: list[str] = []

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return Timer(delay, 0, callback)  # never run: the test drives the stage itself

    def stage_done(self, pend: object, header: object) -> None:
        self.told.append("done")

    def stage_failed(self, pend: object, why: str) -> None:
        self.told.append(f"failed: {why}")

    def leave_stage(self, pend: object) -> None:
        self.told.append("left")


@pytest.mark.parametrize(
    ("relay_writes", "told", "unread"),
    [
        (b"\x01", ["done"], b""),
        (b"\x01\x01\x01", ["done"], b"\x01\x01"),  # a second report is never read
        (b"x\x01", ["left"], b"\x01"),  # anything else ends the stage, quietly
        (None, ["left"], b""),  # EOF: the relay ended without a report
        (b"", ["failed: TLS handshake not complete in time"], b""),  # the deadline
    ],
)
def test_a_relays_report_is_one_byte_read_once(
    relay_writes: bytes | None, told: list[str], unread: bytes
) -> None:
    """The parent reads at most one byte of what a relay (the service's user) writes on
    its report socket: the report ends the stage once, anything else ends it as "ended";
    nothing a relay writes can make the stage report twice or fail it."""
    from pyinetd.runtime.stages import PendingRelay

    gate = _Gate()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    # The same socket on another fd, to see what the stage left unread after it closed its own.
    peek = socket.socket(fileno=os.dup(ours.fileno()))
    peek.setblocking(False)
    stage = PendingRelay(gate, None, ours, ("192.0.2.1", 1), "k", 10.0, 12345, None)
    if relay_writes is None:
        theirs.close()
    else:
        theirs.sendall(relay_writes)
    stage._fail("TLS handshake not complete in time")  # the deadline, whatever has come
    stage(selectors.EVENT_READ)  # a wake-up after the end changes nothing
    stage._fail("again")
    assert gate.told == told
    assert not gate.sel.get_map()
    got = b""
    with contextlib.suppress(BlockingIOError):
        got = peek.recv(10)
    assert got == unread
    peek.close()
    ours.close()
    theirs.close()
