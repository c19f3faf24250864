"""`pyinetd upgrade` (and SIGUSR2): the running parent execs the program installed in place.

Real processes and sockets: a churn of short connections across upgrades loses none, the
held children stay counted under max_connections and their ends are logged by the new image
with their old start times and peers, a broken configuration leaves the old image serving and
`upgrade` fails with the reason, the pid never changes."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from conftest import DEADLINE, Pyinetd, children_of, free_port, script, tcp_talk, wait_for

Start = Callable[..., Pyinetd]


def upgrade(p: Pyinetd) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyinetd", "upgrade", "-c", str(p.path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def upgraded(p: Pyinetd, count: int = 1) -> list[float]:
    """Wait for the new image's "upgraded in N ms" lines; their pauses, in ms."""
    lines = p.wait_log(r"upgraded in \d+ ms", count=count)
    return [float(re.search(r"upgraded in (\d+) ms", ln).group(1)) for ln in lines]  # type: ignore[union-attr]


def hold(port: int) -> socket.socket:
    """A connection whose child is running (it echoed a line)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    s.sendall(b"x\n")
    assert s.recv(10) == b"x\n"
    return s


def test_upgrades_under_a_churn_lose_no_connection(inetd: Start) -> None:
    port = free_port()
    p = inetd({"services": {"cat": {"listen": f"127.0.0.1:{port}", "exec": ["/bin/cat"]}}})
    stop = threading.Event()
    done: list[int] = []
    failed: list[str] = []

    def churn() -> None:
        n = 0
        while not stop.is_set():
            msg = f"hello {n}\n".encode()
            try:
                got = tcp_talk(port, msg)
            except OSError as exc:
                failed.append(repr(exc))
                continue
            if got != msg:
                failed.append(repr(got))
            n += 1
            done.append(n)

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for i in range(3):
            before = len(done)
            out = upgrade(p)
            assert out.returncode == 0, out.stderr
            assert f"serving as pid {p.pid}" in out.stdout
            upgraded(p, i + 1)
            wait_for(lambda b=before: len(done) > b + 20, what="connections after an upgrade")
    finally:
        stop.set()
        for t in threads:
            t.join(DEADLINE)
    assert not failed, failed[:5]
    assert len(done) > 60
    assert p.proc.poll() is None  # the same process, never restarted
    assert len(p.wait_log(r"listening: ", count=4)) == 4  # the first image and three more


def test_held_children_still_count_and_their_ends_are_logged(inetd: Start) -> None:
    port = free_port()
    few = {
        "listen": f"127.0.0.1:{port}",
        "exec": ["/bin/sh", "-c", "cat; echo bye"],
        "max_connections": 5,
        "on_limit": "reject",
        "busy_message": "busy",
    }
    p = inetd({"services": {"few": few}}, "--log-format", "json")
    held = [hold(port) for _ in range(5)]
    peers = {f"127.0.0.1:{s.getsockname()[1]}" for s in held}
    started = time.monotonic()
    out = upgrade(p)
    assert out.returncode == 0, out.stderr
    upgraded(p)
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
        assert b"busy" in s.recv(100)  # the five held children still count
    status = json.loads(
        subprocess.run(
            [sys.executable, "-m", "pyinetd", "status", "--json", "-c", str(p.path)],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        ).stdout
    )
    assert status["children"] == 5, status
    (svc,) = status["services"]
    assert sorted(c["peer"] for c in svc["children"]) == sorted(peers)
    for s in held:
        s.shutdown(socket.SHUT_WR)
        assert s.recv(100) == b"bye\n"
        s.close()
    ends = [json.loads(ln) for ln in p.wait_log(r'"event": ?"end"', count=5)]
    held_for = time.monotonic() - started
    assert {e["peer"] for e in ends} == peers
    # their durations count from their start in the image before, not from the upgrade
    assert all(e["duration"] >= held_for - 0.5 for e in ends), ends
    # and the slots are free again: a new connection is served
    assert tcp_talk(port, b"again\n") == b"again\nbye\n"


def test_a_broken_configuration_keeps_the_old_image_serving(inetd: Start) -> None:
    port = free_port()
    p = inetd({"services": {"cat": {"listen": f"127.0.0.1:{port}", "exec": ["/bin/cat"]}}})
    p.path.write_text(p.path.read_text() + "  broken: {listen: 1, exec: [/bin/cat], bogus: 1}\n")
    out = upgrade(p)
    assert out.returncode == 1
    assert "bogus" in out.stderr and str(p.path) in out.stderr, out.stderr
    assert "keeps serving" in out.stderr
    p.wait_log(r"upgrade failed, the running program keeps serving: .*bogus")
    assert tcp_talk(port, b"still\n") == b"still\n"
    assert "upgrade: exec" not in p.log()
    assert p.proc.poll() is None


def test_sigusr2_upgrades_and_the_pid_file_and_counters_stay(inetd: Start, tmp_path: Path) -> None:
    port = free_port()
    pid_file = tmp_path / "pyinetd.pid"
    conf = {"services": {"cat": {"listen": f"127.0.0.1:{port}", "exec": ["/bin/cat"]}}}
    p = inetd(conf, "--pid-file", str(pid_file))
    for _ in range(3):
        assert tcp_talk(port, b"a\n") == b"a\n"
    p.signal(signal.SIGUSR2)
    upgraded(p)
    assert pid_file.read_text() == f"{p.pid}\n"
    status = json.loads(
        subprocess.run(
            [sys.executable, "-m", "pyinetd", "status", "--json", "-c", str(p.path)],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        ).stdout
    )
    assert status["pid"] == p.pid
    svc = next(s for s in status["services"] if s["name"] == "cat")
    assert svc["accepted"] == 3, svc  # counted before the upgrade, kept across it
    assert p.stop() == 0
    assert not pid_file.exists()  # removed at stop by the new image


def test_a_timeout_set_before_the_upgrade_still_fires(inetd: Start, tmp_path: Path) -> None:
    port = free_port()
    conf = {
        "services": {
            "slow": {"listen": f"127.0.0.1:{port}", "exec": ["/bin/sleep", "60"], "timeout": 3}
        }
    }
    p = inetd(conf)
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
        p.wait_log(r"slow: .* -> pid \d+")
        out = upgrade(p)
        assert out.returncode == 0, out.stderr
        upgraded(p)
        p.wait_log(r"slow: pid \d+ timed out after 3", timeout=DEADLINE)
        p.wait_log(r"slow: pid \d+ ended \(signal SIGTERM\)")
        s.settimeout(DEADLINE)
        assert s.recv(10) == b""


def test_stderr_of_a_child_from_before_is_still_logged(inetd: Start, tmp_path: Path) -> None:
    port = free_port()
    body = '#!/bin/sh\nread line\necho "said $line" >&2\necho done\n'
    conf = {
        "services": {
            "talk": {"listen": f"127.0.0.1:{port}", "exec": [script(tmp_path, "t.sh", body)]}
        }
    }
    p = inetd(conf)
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
        p.wait_log(r"talk: .* -> pid \d+")
        out = upgrade(p)
        assert out.returncode == 0, out.stderr
        upgraded(p)
        s.sendall(b"late\n")
        s.settimeout(DEADLINE)
        assert s.recv(10) == b"done\n"
    p.wait_log(r"talk\[\d+\]: said late")


def test_warm_services_keep_serving_and_get_a_new_zygote(inetd: Start, tmp_path: Path) -> None:
    port = free_port()
    body = "#!/usr/bin/env python3\nimport sys\nsys.stdout.write(sys.stdin.read().upper())\n"
    conf = {
        "services": {
            "up": {
                "listen": f"127.0.0.1:{port}",
                "exec": [script(tmp_path, "up.py", body)],
                "warm": True,
            }
        }
    }
    p = inetd(conf)
    p.wait_log(r"zygote \d+ ready")
    assert tcp_talk(port, b"one") == b"ONE"
    stop = threading.Event()
    failed: list[str] = []
    served = [0]

    def churn() -> None:
        while not stop.is_set():
            try:
                got = tcp_talk(port, b"abc")
            except OSError as exc:
                failed.append(repr(exc))
                continue
            if got != b"ABC":
                failed.append(repr(got))
            served[0] += 1

    t = threading.Thread(target=churn)
    t.start()
    try:
        out = upgrade(p)
        assert out.returncode == 0, out.stderr
        upgraded(p)
        p.wait_log(r"zygote \d+ ready", count=2)  # the new image's own zygote
        before = served[0]
        wait_for(lambda: served[0] > before + 3, what="warm connections after the upgrade")
    finally:
        stop.set()
        t.join(DEADLINE)
    assert not failed, failed[:5]
    # the old zygote is gone: only the new one is a child of pyinetd besides the services
    zygotes = [
        pid
        for pid, _state in children_of(p.pid)
        if b"pyinetd-zygote" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(zygotes) == 1, zygotes


def test_workers_are_replaced_by_the_new_program(inetd: Start) -> None:
    port = free_port()
    conf = {
        "workers": 2,
        "services": {"cat": {"listen": f"127.0.0.1:{port}", "exec": ["/bin/cat"]}},
    }
    p = inetd(conf)
    (old,) = [
        int(m) for m in re.findall(r"worker 1: pid (\d+)", "\n".join(p.wait_log(r"worker 1: pid")))
    ]
    out = upgrade(p)
    assert out.returncode == 0, out.stderr
    upgraded(p)
    lines = p.wait_log(r"worker 1: pid \d+", count=2)
    new = int(re.search(r"worker 1: pid (\d+)", lines[-1]).group(1))  # type: ignore[union-attr]
    assert new != old
    wait_for(
        lambda: not os.path.exists(f"/proc/{old}") or old not in dict(children_of(p.pid)),
        what="the old worker to go",
    )
    for i in range(20):
        assert tcp_talk(port, b"%d\n" % i) == b"%d\n" % i


def test_a_built_in_session_goes_on_across_the_upgrade(inetd: Start) -> None:
    port = free_port()
    p = inetd({"services": {"echo": {"listen": f"127.0.0.1:{port}", "builtin": "echo"}}})
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
        s.sendall(b"before\n")
        assert s.recv(100) == b"before\n"
        out = upgrade(p)
        assert out.returncode == 0, out.stderr
        upgraded(p)
        s.sendall(b"after\n")
        assert s.recv(100) == b"after\n"
    line = p.wait_log(r"echo: built-in echo for .* ended")[0]
    assert "13 bytes in, 13 out" in line  # what it carried in both images


def test_a_connection_waiting_for_its_proxy_header_is_not_cut(inetd: Start) -> None:
    port = free_port()
    svc = {
        "listen": f"127.0.0.1:{port}",
        "exec": ["/bin/sh", "-c", 'echo "$REMOTE_ADDR"; cat'],
        "proxy_protocol": "v1",
        "proxy_from": ["127.0.0.1"],
        "proxy_timeout": 30,
    }
    p = inetd({"services": {"p": svc}})
    header = b"PROXY TCP4 192.0.2.1 192.0.2.2 5555 80\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
        s.sendall(header[:10])
        asker = subprocess.Popen(
            [sys.executable, "-m", "pyinetd", "upgrade", "-c", str(p.path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            p.wait_log(r"the probe of pyinetd .* passed; waiting for 1 connections")
            assert "upgrade: exec" not in p.log()
            s.sendall(header[10:] + b"hi\n")
            s.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := s.recv(100):
                got += chunk
            assert got == b"192.0.2.1\nhi\n"
            _stdout, stderr = asker.communicate(timeout=60)
            assert asker.returncode == 0, stderr
        finally:
            asker.kill()
            asker.wait()
    upgraded(p)


def test_the_program_installed_is_probed_then_run(inetd: Start, tmp_path: Path) -> None:
    """pyinetd runs from a copy of the package; a copy broken after the start fails the probe
    (the old image serves on); mended, with a new version, the upgrade runs the new one."""
    import shutil

    site = tmp_path / "site"
    shutil.copytree(Path(__file__).resolve().parent.parent / "src" / "pyinetd", site / "pyinetd")
    port = free_port()
    conf = {"services": {"cat": {"listen": f"127.0.0.1:{port}", "exec": ["/bin/cat"]}}}
    p = inetd(conf, env={"PYTHONPATH": str(site)})
    children_py = site / "pyinetd" / "runtime" / "children.py"
    good = children_py.read_text()
    children_py.write_text(good + '\nraise ImportError("a broken install")\n')
    out = upgrade(p)
    assert out.returncode == 1
    assert "ImportError: a broken install" in out.stderr, out.stderr
    assert tcp_talk(port, b"old\n") == b"old\n"
    children_py.write_text(good)
    init = site / "pyinetd" / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "', '__version__ = "9.9.9+'))
    out = subprocess.run(
        [sys.executable, "-m", "pyinetd", "upgrade", "-c", str(p.path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(site)},
    )
    assert out.returncode == 0, out.stderr
    assert "pyinetd 9.9.9+" in out.stdout and f"pid {p.pid}" in out.stdout
    p.wait_log(r"upgraded in \d+ ms: pyinetd 9\.9\.9\+")
    assert tcp_talk(port, b"new\n") == b"new\n"


def test_a_udp_child_s_reply_reaches_its_client_after_the_upgrade(
    inetd: Start, tmp_path: Path
) -> None:
    port = free_port(socket.SOCK_DGRAM)
    flag = tmp_path / "go"
    body = f'#!/bin/sh\nread x\nwhile [ ! -e {flag} ]; do sleep 0.01; done\necho "got $x"\n'
    svc = {
        "listen": f"127.0.0.1:{port}",
        "protocol": "udp",
        "exec": [script(tmp_path, "u.sh", body)],
    }
    p = inetd({"services": {"u": svc}})
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(DEADLINE)
        s.sendto(b"ping\n", ("127.0.0.1", port))
        p.wait_log(r"u: .* -> pid \d+")
        out = upgrade(p)
        assert out.returncode == 0, out.stderr
        upgraded(p)
        flag.touch()
        assert s.recv(100) == b"got ping\n"


def test_a_new_address_in_use_fails_the_upgrade_not_the_next_image(inetd: Start) -> None:
    port, taken = free_port(), free_port()
    conf = {"services": {"cat": {"listen": f"127.0.0.1:{port}", "exec": ["/bin/cat"]}}}
    p = inetd(conf)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", taken))
        holder.listen()
        more = {"listen": f"127.0.0.1:{taken}", "exec": ["/bin/cat"]}
        p.path.write_text(json.dumps({"services": {**conf["services"], "more": more}}))
        out = upgrade(p)
        assert out.returncode == 1
        assert f"127.0.0.1:{taken}" in out.stderr and "in use" in out.stderr, out.stderr
        assert "upgrade: exec" not in p.log()
        assert tcp_talk(port, b"old\n") == b"old\n"
    # once the address is free, the next image gets it bound by this one: both serve
    out = upgrade(p)
    assert out.returncode == 0, out.stderr
    upgraded(p)
    assert tcp_talk(taken, b"more\n") == b"more\n"
    assert tcp_talk(port, b"cat\n") == b"cat\n"


def test_per_source_counts_and_max_children_hold_across_the_upgrade(inetd: Start) -> None:
    port = free_port(host="0.0.0.0")
    svc = {
        "listen": f"{port}",
        "exec": ["/bin/cat"],
        "per_source": 1,
        "on_limit": "reject",
        "busy_message": "busy",
    }
    p = inetd({"max_children": 2, "services": {"cat": svc}})
    first = hold(port)  # 127.0.0.1: its one place under per_source
    out = upgrade(p)
    assert out.returncode == 0, out.stderr
    upgraded(p)
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
        assert b"busy" in s.recv(100)  # the source's count came across
    p.wait_log(r"refused 127\.0\.0\.1:\d+: per_source")
    with socket.socket() as s:  # another source has its own place
        s.bind(("127.0.0.2", 0))
        s.settimeout(DEADLINE)
        s.connect(("127.0.0.1", port))
        s.sendall(b"y\n")
        assert s.recv(10) == b"y\n"
        # max_children: 2 is reached (the child from before and this one): a third source
        # is refused
        with socket.socket() as t:
            t.bind(("127.0.0.3", 0))
            t.settimeout(DEADLINE)
            t.connect(("127.0.0.1", port))
            assert b"busy" in t.recv(100)
        p.wait_log(r"cat: refused 127\.0\.0\.3:\d+: max_children")
    first.close()


def test_a_drained_service_stays_drained_for_the_agent(inetd: Start) -> None:
    port, agent = free_port(), free_port()
    conf = {
        "agent": f"127.0.0.1:{agent}",
        "services": {"cat": {"listen": f"127.0.0.1:{port}", "exec": ["/bin/cat"]}},
    }
    p = inetd(conf)
    drained = subprocess.run(
        [sys.executable, "-m", "pyinetd", "drain", "cat", "-c", str(p.path)],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert drained.returncode == 0, drained.stderr
    assert tcp_talk(agent, b"cat\n", shut=False) == b"drain\n"
    out = upgrade(p)
    assert out.returncode == 0, out.stderr
    upgraded(p)
    assert tcp_talk(agent, b"cat\n", shut=False) == b"drain\n"
    assert tcp_talk(port, b"still served\n") == b"still served\n"


def test_a_tls_connection_held_across_an_upgrade_goes_on(inetd: Start, tmp_path: Path) -> None:
    # The old front is told D before the exec and finishes its connections alone; the next
    # image starts its own front for new connections and reaps the old one quietly.
    import ssl

    from conftest import write_pki

    pki = write_pki(tmp_path)
    port = free_port()
    tls = {"cert": str(pki / "cert.pem"), "key": str(pki / "key.pem")}
    p = inetd(
        {"services": {"t": {"listen": f"127.0.0.1:{port}", "exec": ["/bin/cat"], "tls": tls}}}
    )
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))

    def talk(s: ssl.SSLSocket, line: bytes) -> bytes:
        s.sendall(line)
        got = b""
        while not got.endswith(b"\n"):
            chunk = s.recv(100)
            assert chunk, got
            got += chunk
        return got

    held = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=DEADLINE),
                           server_hostname="localhost")  # fmt: skip
    with held:
        assert talk(held, b"before\n") == b"before\n"
        r = upgrade(p)
        assert r.returncode == 0, r.stdout + r.stderr
        upgraded(p)
        assert talk(held, b"after\n") == b"after\n"  # the same connection, the old front
        fresh = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=DEADLINE),
                                server_hostname="localhost")  # fmt: skip
        with fresh:
            assert talk(fresh, b"new\n") == b"new\n"
