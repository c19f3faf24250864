"""Every stage before a service starts is bounded and admitted: PROXY headers, TLS hellos,
metrics clients. Attacks from issue 14 (items 5, 6, 13) and issue 18 (item 6), run as root on
loopback against real pyinetd processes.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import DEADLINE, Pyinetd, children_of, free_port, status_of, tcp_talk, wait_for

Start = Callable[..., Pyinetd]
ATTACKER = "127.0.0.2"  # the slowloris' source; 127.0.0.1 is everyone else
PER_SOURCE = 16  # max_pending_per_source's default


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@contextlib.contextmanager
def idle_connections(port: int, n: int, first: bytes = b"") -> Iterator[list[socket.socket]]:
    """``n`` connections from ATTACKER that send ``first`` and then nothing (a slowloris)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            socks.append(s)
            s.settimeout(DEADLINE)
            s.bind((ATTACKER, 0))
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
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    server.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    server.private_key_pem.write_to_path(tmp_path / "key.pem")
    (tmp_path / "key.pem").chmod(0o600)  # as root, a key others may read is refused
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    return tmp_path


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
                or len(children_of(p.pid)) >= PER_SOURCE
            ),
            timeout=5.0,
            what="the connections refused or forked",
        )
        assert children_of(p.pid) == []
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

    from pyinetd import proxyproto
    from pyinetd.config import build
    from pyinetd.server import Server

    port = free_port()
    svc = {"listen": f"127.0.0.1:{port}", "exec": "/bin/cat", "proxy_protocol": "v1"}
    server = Server(build({"services": {"p": svc}}, tmp_path / "inetd.yaml"))
    server.bind()
    try:
        (lst,) = server.listeners.values()
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as client:
            conn, addr = lst.sock.accept()
            server._serve_stream(lst, conn, addr)
            assert server._stage.used == 1

            def broken(*args: object, **kw: object) -> None:
                raise ValueError("a bug in the parser")

            monkeypatch.setattr(proxyproto, "parse", broken)
            client.sendall(b"PROXY ")
            key = server.sel.get_key(conn)
            with pytest.raises(ValueError):
                key.data(selectors.EVENT_READ)
            server._contain(key)
            assert conn.fileno() == -1
            assert conn not in {k.fileobj for k in server.sel.get_map().values()}
            assert not server.pending and server._stage.used == 0
            with contextlib.suppress(ConnectionResetError):  # closed with "PROXY " unread
                assert client.recv(10) == b""
    finally:
        for lst in server.listeners.values():
            lst.sock.close()
        server.sel.close()
        server._wake_r.close()
        server._wake_w.close()
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
