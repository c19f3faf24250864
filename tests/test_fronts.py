"""The fronts of TLS and redirect services (issue 27), seen from outside: real pyinetd,
real TLS clients, real fronts made to misbehave from outside (kill -9, SIGSTOP, bytes
written into their channel), and the program's user trying to reach them."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    DEADLINE,
    LocalUser,
    Pyinetd,
    children_of,
    free_port,
    pid_gone,
    status_of,
    tcp_talk,
    wait_for,
    write_pki,
)
from test_pre_service import canned_client_hello, echo_service, relays_of, tls_echo, tls_service
from test_sandbox_loopback import Netns, netns  # noqa: F401  (a fixture)

from pyinetd.protocols import frontchan

Start = Callable[..., Pyinetd]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (front uids)")


@pytest.fixture
def tls_files(tmp_path: Path) -> Path:
    return write_pki(tmp_path)


def fronts_of(p: Pyinetd, name: str) -> list[dict[str, Any]]:
    return list(status_of(p)[name]["fronts"] or [])


def front_pid(p: Pyinetd, name: str, other_than: int = 0) -> int:
    """The pid of the service's (one) front, once it is another than ``other_than``."""
    found: list[int] = []

    def ready() -> bool:
        found[:] = [f["pid"] for f in fronts_of(p, name) if f["pid"] != other_than]
        return bool(found)

    wait_for(ready, what=f"a front of {name}")
    return found[0]


def uid_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("Uid:"))


@contextlib.contextmanager
def open_tls(port: int, tls_files: Path) -> Iterator[ssl.SSLSocket]:
    ctx = ssl.create_default_context(cafile=str(tls_files / "ca.pem"))
    raw = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    with ctx.wrap_socket(raw, server_hostname="localhost") as s:
        yield s


def cat_service(port: int) -> dict[str, object]:
    return {**tls_service(port), "exec": ["/bin/cat"]}


def test_a_tls_connection_is_carried_by_the_services_front_not_a_process_of_its_own(
    inetd: Start, tls_files: Path
) -> None:
    """One front per service, under a uid of its own (not the program's, not in passwd),
    shown in `status` and /metrics; per connection only the program is a process."""
    port = free_port()
    p = inetd({"services": {"t": tls_service(port)}})
    (front,) = fronts_of(p, "t")
    assert front["generation"] == 1 and front["restarts"] == 0
    uid = uid_of(front["pid"])
    assert 61184 <= uid <= 65519 and uid != 65534
    with open_tls(port, tls_files) as s:
        assert s.recv(100) == b"127.0.0.1\n"
        (prog,) = relays_of(p.pid)  # the program, as nobody; the front is not nobody's
        assert [f["connections"] for f in fronts_of(p, "t")] == [1]
        s.sendall(b"ping\n")
        assert s.recv(100) == b"ping\n"
    p.wait_log(rf"t: pid {prog} ended \(exit 0\)")
    p.wait_log(r"t: front connection for 127\.0\.0\.1:\d+ ended after [\d.]+s, 5 bytes in, 15 out")
    wait_for(lambda: status_of(p)["t"]["bytes"] == {"in": 5, "out": 15}, what="bytes counted")
    assert [pid for pid, _ in children_of(p.pid) if pid != front["pid"]] == []


def test_kill_9_of_a_front_ends_only_its_connections_and_the_next_is_served(
    inetd: Start, tls_files: Path
) -> None:
    """Under load (connections open in the front), kill -9 the front: those connections end,
    an echo service beside it never pauses, and the next TLS connection is served by a new
    front (status counts the restart)."""
    port, other = free_port(), free_port()
    p = inetd({"services": {"t": cat_service(port), "e": echo_service(other)}})
    old = front_pid(p, "t")
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(open_tls(port, tls_files)) for _ in range(5)]
        for s in socks:
            s.sendall(b"x")
            assert s.recv(10) == b"x"
        worst = [0.0]
        stop = threading.Event()

        def ping() -> None:
            while not stop.wait(0.05):  # (a pace, not a wait for anything)
                t0 = time.monotonic()
                assert tcp_talk(other, b"still here") == b"still here"
                worst[0] = max(worst[0], time.monotonic() - t0)

        pinger = threading.Thread(target=ping, daemon=True)
        pinger.start()
        os.kill(old, signal.SIGKILL)
        for s in socks:
            s.settimeout(DEADLINE)
            with contextlib.suppress(OSError):
                assert s.recv(10) == b""
        new = front_pid(p, "t", other_than=old)
        with open_tls(port, tls_files) as s:
            s.sendall(b"next")
            assert s.recv(10) == b"next"
        stop.set()
        pinger.join(DEADLINE)
    assert worst[0] < 1.0, worst
    assert new != old and pid_gone(old)
    assert fronts_of(p, "t")[0]["restarts"] == 1
    p.wait_log(rf"t: front {old} ended \(.*\); 5 connections end with it")


# ---------------------------------------------------------------- a misbehaving front

SYS_PIDFD_OPEN, SYS_PIDFD_GETFD = 434, 438


def take_channel(pid: int) -> socket.socket:
    """The front's own end of its channel, taken by root with pidfd_getfd(2) (no ptrace):
    what that front's code could write, written by the test."""
    libc = ctypes.CDLL(None, use_errno=True)
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                continue
            pidfd = libc.syscall(SYS_PIDFD_OPEN, pid, 0)
            assert pidfd >= 0, os.strerror(ctypes.get_errno())
            try:
                fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(name), 0)
            finally:
                os.close(pidfd)
            assert fd >= 0, os.strerror(ctypes.get_errno())
            sock = socket.socket(fileno=fd)
            if sock.type == socket.SOCK_SEQPACKET:
                return sock
            sock.detach()
            os.close(fd)
    raise AssertionError(f"no channel in front {pid}")


def assert_responsive_then_replaced(p: Pyinetd, old: int, port: int, tls_files: Path) -> None:
    """`status` answers at once, the front is gone and another serves the next client."""
    t0 = time.monotonic()
    assert "t" in status_of(p)  # `status` answers
    assert time.monotonic() - t0 < 2.0
    new = front_pid(p, "t", other_than=old)
    wait_for(lambda: pid_gone(old), what="the distrusted front killed")
    assert new != old
    assert tls_echo(port, tls_files) == b"127.0.0.1\n"
    assert "Traceback" not in p.log()


def test_a_front_that_sends_garbage_is_killed_and_replaced(inetd: Start, tls_files: Path) -> None:
    port = free_port()
    p = inetd({"services": {"t": tls_service(port)}})
    old = front_pid(p, "t")
    with take_channel(old) as chan:
        chan.send(b"Z{not json")
        p.wait_log(rf"t: front {old} ended \(distrusted: a bad message: ")
    assert_responsive_then_replaced(p, old, port, tls_files)


def test_a_front_that_names_an_id_it_was_never_given_is_distrusted(
    inetd: Start, tls_files: Path
) -> None:
    """A well-formed H for an id the parent never handed out: the id state machine."""
    port = free_port()
    p = inetd({"services": {"t": tls_service(port)}})
    old = front_pid(p, "t")
    with take_channel(old) as chan:
        chan.send(frontchan.encode("H", {"id": 4711, "env": {}}))
        p.wait_log(rf"t: front {old} ended \(distrusted: H for id 4711, which it does not hold")
    assert_responsive_then_replaced(p, old, port, tls_files)


def test_a_front_that_floods_its_channel_never_holds_the_loop(
    inetd: Start, tls_files: Path
) -> None:
    """Tens of thousands of records as fast as the socket takes them: the parent reads a
    bounded batch per wake-up, distrusts at the first message that is not one it expects,
    and `status` and another service answer throughout."""
    port, other = free_port(), free_port()
    p = inetd({"services": {"t": tls_service(port), "e": echo_service(other)}})
    old = front_pid(p, "t")
    record = frontchan.encode("E", {"id": 1, "bytes_in": 0, "bytes_out": 0})
    with take_channel(old) as chan:
        chan.settimeout(DEADLINE)

        def flood() -> None:
            with contextlib.suppress(OSError):
                for _ in range(50_000):
                    chan.send(record)

        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
        assert tcp_talk(other, b"still here") == b"still here"
        p.wait_log(rf"t: front {old} ended \(distrusted: ")
        flooder.join(DEADLINE)
    assert_responsive_then_replaced(p, old, port, tls_files)


def test_a_stopped_front_is_replaced_and_its_handshakes_end_at_the_parents_deadline(
    inetd: Start, tls_files: Path
) -> None:
    """SIGSTOP (by its own uid's means, or a debugger): it reads nothing and answers
    nothing. The connection it holds is refused at the parent's deadline (the front's
    own, plus a grace), the front killed and replaced; `status` answers meanwhile."""
    port = free_port()
    p = inetd({"services": {"t": tls_service(port, handshake_timeout=2)}})
    old = front_pid(p, "t")
    os.kill(old, signal.SIGSTOP)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
            s.sendall(canned_client_hello())
            wait_for(lambda: status_of(p)["t"]["pending"] == 1, what="the handshake pending")
            p.wait_log(r"t: refused 127\.0\.0\.1:\d+: tls \(TLS handshake not complete in time\)")
            p.wait_log(rf"t: front {old} ended \(distrusted: no answer for id 1 by its deadline")
            assert status_of(p)["t"]["pending"] == 0
        assert_responsive_then_replaced(p, old, port, tls_files)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(old, signal.SIGKILL)
            os.kill(old, signal.SIGCONT)


# ---------------------------------------------------------------- out of the program's reach

PTRACE_ATTACH = 16

PROBE = r"""
import ctypes, os, signal, sys
pid = int(sys.argv[1])
out = []
try:
    os.kill(pid, 0)
    out.append("kill:ok")
except OSError as e:
    out.append(f"kill:{e.errno}")
try:
    with open(f"/proc/{pid}/mem", "rb") as f:
        f.read(1)
    out.append("mem:ok")
except OSError as e:
    out.append(f"mem:{e.errno}")
libc = ctypes.CDLL(None, use_errno=True)
r = libc.ptrace(16, pid, None, None)
out.append("ptrace:ok" if r == 0 else f"ptrace:{ctypes.get_errno()}")
print(" ".join(out))
"""


def probe_as(user: str, group: str, pid: int) -> str:
    out = subprocess.run(
        ["setpriv", f"--reuid={user}", f"--regid={group}", "--clear-groups", sys.executable,
         "-c", PROBE, str(pid)],
        capture_output=True, text=True, timeout=DEADLINE, check=True,
    )  # fmt: skip
    return out.stdout.strip()


def test_the_programs_user_can_neither_signal_nor_read_nor_trace_its_front(
    inetd: Start, tls_files: Path, local_user: LocalUser
) -> None:
    """As the program's user (nobody), and as a second local user who is the user of
    another service: kill(), /proc/PID/mem and ptrace on the front are refused."""
    port, other = free_port(), free_port()
    mine = {**tls_service(other), "user": local_user.name, "group": local_user.name}
    p = inetd({"services": {"t": tls_service(port), "u": mine}})
    me = local_user.name
    for name, user, group in (("t", "nobody", "nogroup"), ("u", me, me), ("t", me, me)):
        pid = front_pid(p, name)
        assert probe_as(user, group, pid) == "kill:1 mem:13 ptrace:1", (name, user)
    assert uid_of(front_pid(p, "t")) != uid_of(front_pid(p, "u"))


def test_a_service_whose_user_is_a_front_user_is_a_config_error(
    tmp_path: Path, tls_files: Path
) -> None:
    from pyinetd.config import ConfigError, load

    port, other = free_port(), free_port()
    path = tmp_path / "inetd.yaml"
    path.write_text(
        "services:\n"
        f"  t: {{listen: 127.0.0.1:{port}, exec: /bin/cat, front_user: daemon,\n"
        "      tls: {cert: cert.pem, key: key.pem}}\n"
        f"  p: {{listen: 127.0.0.1:{other}, exec: /bin/cat, user: daemon}}\n"
    )
    with pytest.raises(ConfigError) as err:
        load(path)
    (line,) = err.value.lines
    assert re.match(rf"{re.escape(str(path))}:\d+:\d+: services\.p\.user: 'daemon' is the", line)


def memory_of(pid: int) -> bytes:
    """Every readable private mapping of ``pid`` (as root: /proc/PID/maps and mem)."""
    chunks = []
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            addrs, perms = line.split()[:2]
            if not perms.startswith("r"):
                continue
            lo, hi = (int(a, 16) for a in addrs.split("-"))
            with contextlib.suppress(OSError, OverflowError, ValueError):
                mem.seek(lo)
                chunks.append(mem.read(hi - lo))
    return b"".join(chunks)


def secrets_of(key_pem: Path) -> list[bytes]:
    """What of a private key could sit in memory: the PEM's base64 lines and the private
    number itself (an EC key's scalar, an RSA key's d), either byte order."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    pem = key_pem.read_bytes()
    key = serialization.load_pem_private_key(pem, None)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        n = key.private_numbers().private_value
    else:
        assert isinstance(key, rsa.RSAPrivateKey)
        n = key.private_numbers().d
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    lines = [ln for ln in pem.splitlines() if ln and not ln.startswith(b"-----")]
    return [*lines[:2], raw[:24], raw[-24:][::-1]]


def pki_of(folder: Path, key_type: str) -> Path:
    """write_pki's files, with an EC (trustme's default) or an RSA-2048 key."""
    import trustme

    folder.mkdir()
    ca = trustme.CA(key_type=getattr(trustme.KeyType, key_type))
    server = ca.issue_cert("localhost", "127.0.0.1", key_type=getattr(trustme.KeyType, key_type))
    server.cert_chain_pems[0].write_to_path(folder / "cert.pem")
    server.private_key_pem.write_to_path(folder / "key.pem")
    (folder / "key.pem").chmod(0o600)
    ca.cert_pem.write_to_path(folder / "ca.pem")
    return folder


@pytest.mark.parametrize("key_type", ["ECDSA", "RSA"])
def test_a_front_holds_only_its_own_services_key(
    inetd: Start, tmp_path: Path, key_type: str
) -> None:
    """Two TLS services with their own keys: read as root, the memory of each one's front
    holds none of the other's private key (neither its PEM text nor its numbers)."""
    a, b = pki_of(tmp_path / "a", key_type), pki_of(tmp_path / "b", key_type)
    pa, pb = free_port(), free_port()
    p = inetd(
        {
            "services": {
                "a": tls_service(pa, cert="a/cert.pem", key="a/key.pem"),
                "b": tls_service(pb, cert="b/cert.pem", key="b/key.pem"),
            }
        }
    )
    for name, own, other, port in (("a", a, b, pa), ("b", b, a, pb)):
        assert tls_echo(port, own) == b"127.0.0.1\n"
        memory = memory_of(front_pid(p, name))
        theirs = [s for s in secrets_of(other / "key.pem") if s in memory]
        assert theirs == [], f"front of {name} holds {len(theirs)} pieces of the other key"
        # (the check can fail: its own key's number is there, as OpenSSL needs it)
        assert any(s in memory for s in secrets_of(own / "key.pem")[2:])


# ---------------------------------------------------------------- reload


def test_a_reload_with_a_new_certificate_starts_a_new_generation_and_old_connections_finish(
    inetd: Start, tmp_path: Path
) -> None:
    port = free_port()
    first = write_pki(tmp_path)
    p = inetd({"services": {"t": cat_service(port)}})
    old = front_pid(p, "t")
    ca_old = (first / "ca.pem").read_bytes()
    (tmp_path / "ca-old.pem").write_bytes(ca_old)
    with open_tls(port, first) as held:
        held.sendall(b"before\n")
        assert held.recv(100) == b"before\n"
        write_pki(tmp_path)  # a new CA, certificate and key under the same names
        p.signal(signal.SIGHUP)
        p.wait_log(r"reloaded: ")
        new = front_pid(p, "t", other_than=old)
        gens = {f["pid"]: (f["generation"], f["state"]) for f in fronts_of(p, "t")}
        assert gens == {new: (2, "serving"), old: (1, "draining")}
        # A new connection: the new certificate (the old CA no longer verifies it).
        with pytest.raises(ssl.SSLCertVerificationError):
            _verify(port, tmp_path / "ca-old.pem")
        assert _verify(port, tmp_path / "ca.pem") == b"x"
        # The connection from before goes on, in the old front.
        held.sendall(b"after\n")
        assert held.recv(100) == b"after\n"
    wait_for(lambda: pid_gone(old), what="the drained front gone")
    assert [f["pid"] for f in fronts_of(p, "t")] == [new]


def _verify(port: int, ca: Path) -> bytes:
    ctx = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as s,
    ):
        s.sendall(b"x")
        return s.recv(10)


def test_a_reload_that_changes_nothing_keeps_the_fronts(inetd: Start, tls_files: Path) -> None:
    port = free_port()
    p = inetd({"services": {"t": tls_service(port)}})
    old = front_pid(p, "t")
    p.signal(signal.SIGHUP)
    p.wait_log(r"reloaded: ")
    assert [(f["pid"], f["generation"]) for f in fronts_of(p, "t")] == [(old, 1)]


def test_fronts_n_spreads_connections_round_robin(inetd: Start, tls_files: Path) -> None:
    port = free_port()
    p = inetd({"services": {"t": {**cat_service(port), "fronts": 2}}})
    wait_for(lambda: len(fronts_of(p, "t")) == 2, what="two fronts")
    with contextlib.ExitStack() as stack:
        for _ in range(4):
            s = stack.enter_context(open_tls(port, tls_files))
            s.sendall(b"x")
            assert s.recv(1) == b"x"
        assert sorted(f["connections"] for f in fronts_of(p, "t")) == [2, 2]


# ---------------------------------------------------------------- redirect under loopback

JOIN_AND_CONNECT = r"""
import errno, os, socket, sys
procs, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if procs:
    with open(procs, "w") as f:
        f.write(str(os.getpid()))
try:
    socket.create_connection((ip, port), timeout=2).close()
    print("connected")
except TimeoutError:
    print("timeout")
except OSError as e:
    print(errno.errorcode.get(e.errno, e.errno))
"""


def test_a_redirects_front_lives_in_the_services_loopback_cgroup(
    inetd: Start,
    netns: Netns,  # noqa: F811
) -> None:
    """`sandbox: {network: loopback}` governs redirect's outbound connections, made by its
    front: the front is in the service's cgroup, where a connection to an address off
    loopback is refused (EPERM), while the same connection from outside it is made."""
    from pyinetd.sandbox import cgroupnet

    own = cgroupnet.own_cgroup()
    if own is None:
        pytest.skip("no cgroup v2 hierarchy holding this process")
    with socket.create_server(("127.0.0.1", 0)) as upstream:
        port = free_port()
        svc = {"listen": f"127.0.0.1:{port}", "redirect": f"127.0.0.1:{upstream.getsockname()[1]}",
               "sandbox": {"network": "loopback"}}  # fmt: skip
        p = inetd({"services": {"r": svc}})
        front = front_pid(p, "r")
        lines = Path(f"/proc/{front}/cgroup").read_text().splitlines()
        line = next(ln for ln in lines if ln.startswith("0::"))  # (cgroup v2's)
        made = line.rsplit("/", 1)[1]
        assert made.startswith(f"pyinetd-{p.pid}-"), line
        procs = str(Path(own, made, "cgroup.procs"))

        def attempt(where: str) -> str:
            out = subprocess.run(
                [sys.executable, "-c", JOIN_AND_CONNECT, where, netns.ns_ip, str(netns.ns_port)],
                capture_output=True, text=True, timeout=DEADLINE,
            )  # fmt: skip
            return out.stdout.strip() + out.stderr.strip()

        assert attempt("") == "connected"
        assert attempt(procs) == "EPERM"
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as client:
            upstream.settimeout(DEADLINE)
            conn, _ = upstream.accept()
            with conn:
                conn.sendall(b"pong\n")
                client.settimeout(DEADLINE)
                assert client.recv(100) == b"pong\n"
