"""Slow and hostile clients: idle hordes, resets mid-transfer, a UDP flood."""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import sys
from collections.abc import Callable

from conftest import DEADLINE, Pyinetd, children_of, free_port, tcp_talk, wait_for
from stresslib import fd_count, median, scaled, timed_talk

Start = Callable[..., Pyinetd]


def latency_p50(port: int, n: int = 50) -> float:
    return median([timed_talk(port, b"ping %d" % i) for i in range(n)])


def test_idle_connections_do_not_slow_other_services(inetd: Start) -> None:
    idle_port, other = free_port(), free_port()
    p = inetd({"services": {
        # (one client address: past the built-in's per_source default of 10)
        "idle": {"listen": f"127.0.0.1:{idle_port}", "builtin": "echo", "per_source": 100_000},
        "other": {"listen": f"127.0.0.1:{other}", "builtin": "echo"},
    }})  # fmt: skip
    latency_p50(other, 10)  # warm-up
    before = latency_p50(other)
    base_fds = fd_count(p.pid)
    n = scaled(500)
    idle = [socket.create_connection(("127.0.0.1", idle_port), timeout=DEADLINE) for _ in range(n)]
    try:
        # Every idle connection is accepted and held as a session (one fd each).
        wait_for(lambda: fd_count(p.pid) == base_fds + n, what=f"{n} idle sessions")
        during = latency_p50(other)
        print(f"\n{n} idle: other service p50 {before * 1e3:.3f} ms -> {during * 1e3:.3f} ms")
        assert during <= max(5 * before, before + 0.002), (before, during)
        for s in idle[:: max(1, n // 10)]:  # the idle ones are still served when they speak
            s.sendall(b"late")
            assert s.recv(10) == b"late"
    finally:
        for s in idle:
            s.close()
    wait_for(lambda: fd_count(p.pid) == base_fds, what="idle sessions closed")
    assert p.proc.poll() is None


def reset_mid_transfer(port: int, chunk: int = 65536) -> None:
    """Send, see the echo begin, send more, then close with SO_LINGER 0 (an RST)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    s.sendall(b"r" * chunk)
    assert s.recv(1) == b"r"  # the transfer is under way
    s.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        s.send(b"s" * chunk)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def test_connections_reset_mid_transfer_leave_nothing_behind(inetd: Start) -> None:
    echo, cat = free_port(), free_port()
    p = inetd({"services": {
        "echo": {"listen": f"127.0.0.1:{echo}", "builtin": "echo"},
        "cat": {"listen": f"127.0.0.1:{cat}", "exec": "/bin/cat"},
    }})  # fmt: skip
    assert tcp_talk(echo, b"warm") == b"warm" and tcp_talk(cat, b"warm") == b"warm"
    wait_for(lambda: not children_of(p.pid), what="warm-up child reaped")
    base_fds = fd_count(p.pid)
    n = scaled(100)
    for _ in range(n):
        reset_mid_transfer(echo)
        reset_mid_transfer(cat)
    # Every cat saw the reset (EPIPE/ECONNRESET or SIGPIPE) and was reaped; every echo
    # session and stderr pipe was closed.
    p.wait_log(r"cat: pid \d+ ended", count=n + 1)
    wait_for(lambda: not children_of(p.pid), what="every cat reaped")
    wait_for(lambda: fd_count(p.pid) == base_fds, what="parent back to its idle fds")
    assert tcp_talk(echo, b"after") == b"after" and tcp_talk(cat, b"after") == b"after"
    print(f"\n{n} resets to echo + {n} to cat: parent back to {base_fds} fds, no children")
    assert "internal error" not in p.log()


FLOODER = """
import socket, sys, time
port, total, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
payload = b"f" * 64
bursts = 50
sent = received = 0
t0 = time.monotonic()
for b in range(bursts):
    for _ in range(total // bursts):
        try:
            s.sendto(payload, ("127.0.0.1", port))
            sent += 1
        except BlockingIOError:
            pass
        try:
            while s.recv(100):
                received += 1
        except BlockingIOError:
            pass
    # Pacing the load over the requested duration, not synchronisation.
    time.sleep(max(0.0, t0 + seconds * (b + 1) / bursts - time.monotonic()))
print(sent, received, round(time.monotonic() - t0, 3))
"""


def test_udp_flood_does_not_starve_tcp(inetd: Start) -> None:
    udp, tcp = free_port(socket.SOCK_DGRAM), free_port()
    p = inetd({"services": {
        "uecho": {"listen": f"127.0.0.1:{udp}", "protocol": "udp", "builtin": "echo"},
        "tcp": {"listen": f"127.0.0.1:{tcp}", "exec": "/bin/cat"},
    }})  # fmt: skip
    total = scaled(20_000)
    flood = subprocess.Popen(
        [sys.executable, "-c", FLOODER, str(udp), str(total), "1.5"],
        stdout=subprocess.PIPE,
        text=True,
    )
    latencies = []
    try:
        while flood.poll() is None:
            latencies.append(timed_talk(tcp, b"during the flood", timeout=2.0))
        out, _ = flood.communicate(timeout=DEADLINE)
    finally:
        if flood.poll() is None:
            flood.kill()
            flood.wait()
    sent, received, took = out.split()
    print(f"\nUDP flood: {sent} sent, {received} echoed in {took}s; "
          f"{len(latencies)} TCP requests, max {max(latencies) * 1e3:.1f} ms")  # fmt: skip
    assert int(sent) >= total * 0.9 and float(took) <= 2.5
    assert int(received) > 0  # the UDP service was answering
    assert len(latencies) >= 10  # TCP requests kept being served throughout
    assert max(latencies) < 1.0
    assert p.proc.poll() is None
