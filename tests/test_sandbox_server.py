"""The sandbox (issue 17) end to end: the real pyinetd, real clients, on every path that starts
a program (plain, wait, UDP, TLS relay, redirect), and the shipped inetd.yaml."""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import DEADLINE, Pyinetd, free_port, tcp_talk

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="sandbox tests run as root"),
    pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"), reason="x86_64/arm64"),
]

Start = Callable[..., Pyinetd]
REPO = Path(__file__).resolve().parent.parent
SYSTEM = ["/usr", "/lib", "/lib64", "/bin", "/sbin", "/etc"]


@pytest.fixture
def box() -> Iterator[Path]:
    """A folder outside /tmp that nobody may read and write (only the sandbox refuses)."""
    root = Path(tempfile.mkdtemp(prefix="pyinetd-sbx-", dir="/var/lib"))
    root.chmod(0o755)
    for sub in ("ro", "rw"):
        (root / sub).mkdir()
        (root / sub).chmod(0o777)
    (root / "bin").mkdir(mode=0o755)  # the programs: not writable by others (trust checks)
    (root / "ro" / "ok.txt").write_text("allowed\n")
    (root / "secret.txt").write_text("SECRET\n")
    for f in ("ro/ok.txt", "secret.txt"):
        (root / f).chmod(0o644)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def probe(box: Path, target_port: int, read_first: bool = False) -> str:
    """A shell service that tries each thing a sandbox stops, and says what worked."""
    path = box / "bin" / "probe.sh"
    path.write_text(
        "#!/bin/bash\n"
        + ("read -r _line\n" if read_first else "")
        + 'r() { if "$@" >/dev/null 2>&1; then echo yes; else echo no; fi; }\n'
        f"echo read_allowed=$(r cat {box}/ro/ok.txt)\n"
        f"echo read_secret=$(r cat {box}/secret.txt)\n"
        f"echo write_ro=$(r sh -c 'echo x > {box}/ro/w')\n"
        f"echo write_rw=$(r sh -c 'echo x > {box}/rw/w')\n"
        f"echo connect=$(r bash -c 'exec 3<>/dev/tcp/127.0.0.1/{target_port}')\n"
        f"echo mount=$(r mount -t tmpfs none {box}/rw)\n"
        "echo tmp_sees_host=$(r ls /tmp/pyinetd-sbx-host-marker)\n"
    )
    path.chmod(0o755)
    return str(path)


FULL = {
    "write_ro": "no",
    "write_rw": "yes",
    "read_allowed": "yes",
    "read_secret": "no",
    "connect": "no",
    "mount": "no",
    "tmp_sees_host": "no",
}


def sandbox_of(box: Path) -> dict[str, Any]:
    return {
        "read": [*SYSTEM, f"{box}/ro", f"{box}/bin"],
        "write": [f"{box}/rw", "/dev/null"],
        "network": "none",
        "private_tmp": True,
        "syscalls": "default",
    }


def answers(out: bytes) -> dict[str, str]:
    text = out.decode(errors="replace")
    return dict(line.split("=", 1) for line in text.split() if "=" in line)


@pytest.fixture
def target() -> Iterator[int]:
    """A loopback port a sandboxed service must not reach."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


@pytest.fixture
def host_marker() -> Iterator[None]:
    """A file in the host's /tmp, as another service would leave one."""
    marker = Path("/tmp/pyinetd-sbx-host-marker")
    marker.write_text("x")
    yield
    marker.unlink(missing_ok=True)


@pytest.mark.parametrize("user", [None, "nobody"])
def test_pyinetd_serves_a_sandboxed_tcp_service_confined(
    inetd: Start, box: Path, target: int, host_marker: None, user: str | None
) -> None:
    port = free_port()
    svc: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "exec": probe(box, target),
        "sandbox": sandbox_of(box),
    }
    if user:
        svc["user"] = user
    inetd({"services": {"boxed": svc}})
    assert answers(tcp_talk(port)) == FULL


def test_pyinetd_serves_a_sandboxed_udp_service_confined(
    inetd: Start, box: Path, target: int, host_marker: None
) -> None:
    port = free_port(socket.SOCK_DGRAM)
    svc = {
        "listen": f"127.0.0.1:{port}",
        "protocol": "udp",
        "exec": probe(box, target, read_first=True),
        "sandbox": sandbox_of(box),
        "user": "nobody",
    }
    inetd({"services": {"boxed": svc}})
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.settimeout(DEADLINE)
        c.sendto(b"go\n", ("127.0.0.1", port))
        assert answers(c.recv(65536)) == FULL


def test_pyinetd_serves_a_sandboxed_wait_service_confined(
    inetd: Start, box: Path, target: int, host_marker: None
) -> None:
    """wait: true hands the listening socket itself to the program, inside its sandbox."""
    port = free_port()
    server = box / "bin" / "waiter.py"
    server.write_text(
        "#!/usr/bin/python3\n"
        "import socket, subprocess\n"
        "s = socket.socket(fileno=0)\n"
        "c, _ = s.accept()\n"
        f"out = subprocess.run([{probe(box, target)!r}], capture_output=True).stdout\n"
        "c.sendall(out)\n"
        "c.close()\n"
    )
    server.chmod(0o755)
    svc = {
        "listen": f"127.0.0.1:{port}",
        "wait": True,
        "exec": str(server),
        "sandbox": sandbox_of(box),
    }
    inetd({"services": {"boxed": svc}})
    assert answers(tcp_talk(port)) == FULL


def test_pyinetd_refuses_at_start_a_sandbox_the_kernel_cannot_enforce(
    inetd: Start, box: Path, tmp_path: Path
) -> None:
    port = free_port()
    conf = {"services": {"boxed": {"listen": f"127.0.0.1:{port}", "exec": "/bin/cat",
                                   "sandbox": {"read": SYSTEM}}}}  # fmt: skip
    p = inetd(conf, env={"PYINETD_TEST_NO_LANDLOCK": "1"}, wait_ready=False)
    p.wait_log(r"services\.boxed\.sandbox: read: this kernel has Landlock ABI 0")
    assert p.proc.wait(DEADLINE) == 2


def test_shipped_config_services_work_sandboxed(inetd: Start, tmp_path: Path) -> None:
    """The shipped inetd.yaml sandboxes its programs, and each still answers."""
    doc = yaml.safe_load((REPO / "inetd.yaml").read_text())
    box = doc["defaults"]["sandbox"]
    assert box["syscalls"] == "default" and "read" in box and "write" in box
    box["read"] = [str(REPO / p) if not p.startswith("/") else p for p in box["read"]]
    ports: dict[str, int] = {}
    for name, svc in doc["services"].items():
        ports[name] = free_port(socket.SOCK_DGRAM if svc.get("protocol") == "udp" else 1)
        svc["listen"] = f"127.0.0.1:{ports[name]}"
        if "exec" in svc:
            svc["exec"] = str(REPO / svc["exec"])
    inetd(doc)
    assert tcp_talk(ports["upper"], b"hello\n") == b"HELLO\n"
    assert b"service:  whoami" in tcp_talk(ports["whoami"])
    assert tcp_talk(ports["timeofday"]).decode().startswith("20")
    assert tcp_talk(ports["hello"], b"GET / HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200")


def test_pyinetd_serves_a_sandboxed_tls_service_confined(
    inetd: Start, box: Path, target: int, host_marker: None, pki: Path
) -> None:
    """The TLS relay applies the sandbox before the handshake; the program inherits it."""
    import ssl

    port = free_port()
    svc = {
        "listen": f"127.0.0.1:{port}",
        "exec": probe(box, target),
        "tls": {"cert": "cert.pem", "key": "key.pem"},
        "sandbox": sandbox_of(box),
        "user": "nobody",
    }
    p = inetd({"services": {"boxed": svc}})
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as s,
    ):
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    assert answers(out) == FULL, p.log()


def test_a_sandboxed_redirect_relay_still_reaches_its_target(inetd: Start, box: Path) -> None:
    """A redirect's relay runs inside the sandbox (syscalls, Landlock) and still connects."""
    with socket.create_server(("127.0.0.1", 0)) as upstream:
        port = free_port()
        svc = {
            "listen": f"127.0.0.1:{port}",
            "redirect": f"127.0.0.1:{upstream.getsockname()[1]}",
            "sandbox": {"read": SYSTEM, "write": ["/dev/null"], "syscalls": "default"},
        }
        p = inetd({"services": {"r": svc}})
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as client:
            upstream.settimeout(DEADLINE)
            try:
                conn, _ = upstream.accept()
            except TimeoutError:
                raise AssertionError(f"the relay did not connect:\n{p.log()}") from None
            with conn:
                conn.sendall(b"pong\n")
                client.settimeout(DEADLINE)
                assert client.recv(100) == b"pong\n"
                relay = [pid for pid, _ in __import__("conftest").children_of(p.pid)]
                assert len(relay) == 1
                status = Path(f"/proc/{relay[0]}/status").read_text()
                assert "NoNewPrivs:\t1" in status and "Seccomp:\t2" in status, status


def test_redirect_with_network_none_is_a_config_error(tmp_path: Path) -> None:
    from pyinetd.config import ConfigError, load

    path = tmp_path / "inetd.yaml"
    svc = {"listen": "127.0.0.1:7995", "redirect": "127.0.0.1:7994", "sandbox": {"network": "none"}}
    path.write_text(yaml.safe_dump({"services": {"r": svc}}))
    with pytest.raises(ConfigError) as info:
        load(path)
    assert "services.r.sandbox.network: none: a redirect must connect to its target" in str(
        info.value
    )


def test_a_reload_whose_sandbox_cannot_be_prepared_keeps_the_old_config(
    inetd: Start, tmp_path: Path
) -> None:
    """Namespaces refused at preparation (a container): the reload fails as a whole, naming
    the service, and the running configuration keeps serving."""
    import signal

    port, new_port = free_port(), free_port()
    old = {"services": {"echo": {"listen": f"127.0.0.1:{port}", "builtin": "echo"}}}
    p = inetd(old, env={"PYINETD_TEST_UNSHARE_FAILS": "1"})
    new = {
        "services": {
            **old["services"],
            "boxed": {
                "listen": f"127.0.0.1:{new_port}",
                "exec": "/bin/cat",
                "sandbox": {"network": "none"},
            },
        }
    }
    p.path.write_text(yaml.safe_dump(new))
    p.signal(signal.SIGHUP)
    p.wait_log(r"reload failed.*services\.boxed\.sandbox: cannot prepare: .*unshare")
    assert tcp_talk(port, b"still\n") == b"still\n"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", new_port), timeout=DEADLINE).close()


def ipc_probe(box: Path) -> str:
    """A service that tries to signal a process given by pid and to connect to an abstract
    unix socket given by name (its arguments), and says what each attempt returned."""
    path = box / "bin" / "ipc.py"
    path.write_text(
        "#!/usr/bin/python3\n"
        "import errno, os, signal, socket, sys\n"
        "pid, name = int(sys.argv[1]), sys.argv[2]\n"
        "def attempt(f):\n"
        "    try:\n"
        "        f()\n"
        "        return 'ok'\n"
        "    except OSError as exc:\n"
        "        return errno.errorcode[exc.errno]\n"
        "print('kill0=' + attempt(lambda: os.kill(pid, 0)))\n"
        "print('term=' + attempt(lambda: os.kill(pid, signal.SIGTERM)))\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
        "print('abstract=' + attempt(lambda: s.connect('\\0' + name)))\n"
    )
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize(
    ("network", "paths", "abstract"),
    [
        # The abstract socket is the test's network namespace's: only the scope refuses it.
        ("loopback", True, "EPERM"),
        # Its own network namespace has no such socket, scope or not; and a sandbox without
        # read/write gets a ruleset for the scopes alone.
        ("none", False, "ECONNREFUSED"),
        # network: any sets no network rule: abstract sockets stay reachable, signals do not.
        ("any", True, "ok"),
    ],
)
def test_a_sandboxed_service_cannot_signal_or_reach_ipc_of_its_user_outside(
    inetd: Start, box: Path, network: str, paths: bool, abstract: str
) -> None:
    from pyinetd.sandbox import landlock_abi

    if landlock_abi() < 6:
        pytest.skip("Landlock scopes need ABI 6 (Linux 6.12)")
    if network == "loopback":
        from pyinetd.sandbox import cgroupnet

        if cgroupnet.missing():
            pytest.skip(f"network: loopback needs {cgroupnet.missing()}")
    # Outside the sandbox, as the service's own user: a process and an abstract socket.
    victim = subprocess.Popen(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "sleep", "60"]
    )
    name = f"pyi-udpbox-{uuid.uuid4().hex}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind("\0" + name)
        listener.listen(4)
        port = free_port()
        sandbox: dict[str, Any] = {"network": network}
        if paths:
            sandbox["read"] = [*SYSTEM, f"{box}/bin"]
        svc = {
            "listen": f"127.0.0.1:{port}",
            "exec": [ipc_probe(box), str(victim.pid), name],
            "user": "nobody",
            "group": "nogroup",
            "sandbox": sandbox,
        }
        inetd({"services": {"boxed": svc}})
        got = answers(tcp_talk(port))
        # Unscoped: kill0=ok, term=ok (the sleep ended), abstract=ok: kill(2) checks the uid
        # alone, and an abstract socket has no file whose rights could refuse.
        assert got == {"kill0": "EPERM", "term": "EPERM", "abstract": abstract}, got
        assert victim.poll() is None
    finally:
        listener.close()
        victim.kill()
        victim.wait(DEADLINE)
