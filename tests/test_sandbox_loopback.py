"""`sandbox: {network: loopback}` (issue 17): the real pyinetd, a `user: nobody` service (the fork
path), a root service (the C clone primitive, born in its cgroup by clone3), a warm service's
child, each trying what the rule allows and refuses against the host's loopback and against the
address of a network namespace the test makes (a veth pair), which the host itself reaches."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import DEADLINE, Pyinetd, free_port, wait_for

from pyinetd.cli import main
from pyinetd.config import ConfigError, load
from pyinetd.sandbox import Prepared, SandboxSettings, cgroupnet

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network: loopback tests run as root"),
    pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"), reason="x86_64/arm64"),
    pytest.mark.skipif(
        cgroupnet.own_cgroup() is None, reason="no cgroup v2 hierarchy holding this process"
    ),
]

Start = Callable[..., Pyinetd]


def _own_cgroup() -> str:
    own = cgroupnet.own_cgroup()
    assert own is not None
    return own


def cgroups_of(pid: int) -> list[str]:
    """The cgroup folders pyinetd ``pid`` made (pyinetd-PID-*)."""
    return sorted(p for p in os.listdir(_own_cgroup()) if p.startswith(f"pyinetd-{pid}-"))


@dataclass
class Netns:
    """A network namespace joined to the host by a veth pair: the host has ``host_ip``, the
    namespace ``ns_ip``, where ``ns_port`` answers b"ns\\n" to every connection."""

    name: str
    host_ip: str
    ns_ip: str
    ns_port: int

    def run(self, code: str) -> str:
        """Python ``code`` inside the namespace; its output."""
        out = subprocess.run(
            ["ip", "netns", "exec", self.name, sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        )
        return out.stdout.strip() + out.stderr.strip()

    def connect_from(self, ip: str, port: int, wait: float = 1.0) -> str:
        """Connect from inside the namespace: 'connected', 'timeout' or the errno name. A
        dropped SYN gets no answer: ``wait`` bounds how long it is given."""
        return self.run(
            "import socket, errno\n"
            "try:\n"
            f"    socket.create_connection(({ip!r}, {port}), timeout={wait}).close()\n"
            "    print('connected')\n"
            "except TimeoutError:\n"
            "    print('timeout')\n"
            "except OSError as e:\n"
            "    print(errno.errorcode.get(e.errno, e.errno))\n"
        )


@pytest.fixture
def netns() -> Iterator[Netns]:
    if shutil.which("ip") is None:
        pytest.skip("no ip(8)")
    n = os.getpid() % 100000
    name, host_if, ns_if = f"pyinetd-lo-{n}", f"pil{n}h", f"pil{n}n"
    net = f"10.{200 + n % 50}.{n // 50 % 250}"
    host_ip, ns_ip = f"{net}.1", f"{net}.2"
    listener: subprocess.Popen[bytes] | None = None

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=DEADLINE)

    try:
        ip("netns", "add", name)
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", name)
        ip("addr", "add", f"{host_ip}/24", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("-n", name, "addr", "add", f"{ns_ip}/24", "dev", ns_if)
        ip("-n", name, "link", "set", ns_if, "up")
        ip("-n", name, "link", "set", "lo", "up")
        code = textwrap.dedent(f"""\
            import socket, sys
            s = socket.create_server(({ns_ip!r}, 0))
            print(s.getsockname()[1], flush=True)
            while True:
                c, _ = s.accept()
                c.sendall(b"ns\\n")
                c.close()
            """)
        listener = subprocess.Popen(
            ["ip", "netns", "exec", name, sys.executable, "-c", code], stdout=subprocess.PIPE
        )
        assert listener.stdout is not None
        port = int(listener.stdout.readline())
        yield Netns(name, host_ip, ns_ip, port)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot make a network namespace here: {exc.stderr!r}")
    finally:
        if listener is not None:
            listener.kill()
            listener.wait(DEADLINE)
            if listener.stdout is not None:
                listener.stdout.close()
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=DEADLINE)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=DEADLINE)


@pytest.fixture
def folder() -> Iterator[Path]:
    """Scripts any user may read and nobody but root may change (the trust checks)."""
    path = Path(tempfile.mkdtemp(prefix="pyinetd-lo-", dir="/var/lib"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# What a service tries, in its order; every result goes to the connection pyinetd handed it.
PROBE = """\
import errno, os, socket, sys
lo_port, ns_ip, ns_port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])

def say(key, value):
    sys.stdout.write(f"{key}={value}\\n")
    sys.stdout.flush()

def attempt(f):
    try:
        f()
        return "ok"
    except TimeoutError:
        return "timeout"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))

def connect(ip, port, family=socket.AF_INET):
    with socket.socket(family) as s:
        s.settimeout(5)
        s.connect((ip, port))

def sendto(ip):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"x", (ip, ns_port))

def bind(ip, family=socket.AF_INET):
    with socket.socket(family) as s:
        s.bind((ip, 0))

say("cgroup", open("/proc/self/cgroup").read().splitlines()[-1].split("/")[-1])
say("warm", int(b"zygote" in open("/proc/self/cmdline", "rb").read()))
say("connect_lo", attempt(lambda: connect("127.0.0.1", lo_port)))
say("connect_ns", attempt(lambda: connect(ns_ip, ns_port)))
say("connect_mapped_ns", attempt(lambda: connect("::ffff:" + ns_ip, ns_port, socket.AF_INET6)))
say("sendto_ns", attempt(lambda: sendto(ns_ip)))
say("sendto_lo", attempt(lambda: sendto("127.0.0.1")))
say("bind_any", attempt(lambda: bind("0.0.0.0")))
say("bind_lo", attempt(lambda: bind("127.0.0.1")))
# listen() without bind(): the kernel binds it to 0.0.0.0 itself, where no bind hook looks
listener = socket.socket()
listener.listen(4)
listener.settimeout(10)
say("autobound", listener.getsockname()[1])
try:
    conn, peer = listener.accept()
    say("accepted", peer[0])
except OSError as e:
    say("accepted", "none")
# a UDP socket bound by its first sendto (to loopback, allowed) to 0.0.0.0: only the ingress
# program keeps other addresses' datagrams from it
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.sendto(b"x", ("127.0.0.1", lo_port))
udp.settimeout(10)
say("udp_autobound", udp.getsockname()[1])
say("udp_from", attempt(lambda: say("udp_first", udp.recvfrom(10)[1][0])))
"""

ALLOWED_REFUSED = {
    "connect_lo": "ok",
    "connect_ns": "EPERM",
    # (a v4-mapped address through an IPv6 socket: where the host has IPv6)
    "connect_mapped_ns": "EPERM" if os.path.exists("/proc/net/if_inet6") else "EAFNOSUPPORT",
    "sendto_ns": "EPERM",
    "sendto_lo": "ok",
    "bind_any": "EPERM",
    "bind_lo": "ok",
    "accepted": "127.0.0.1",  # the namespace's connection never got through; ours did
    "udp_first": "127.0.0.1",  # the namespace's datagram, sent first, was dropped
}


def probe_service(folder: Path, lo_port: int, ns: Netns, **keys: object) -> dict[str, object]:
    path = folder / "probe.py"
    path.write_text("#!/usr/bin/python3\n" + PROBE)
    path.chmod(0o755)
    svc: dict[str, object] = {
        "exec": [str(path), str(lo_port), ns.ns_ip, str(ns.ns_port)],
        "sandbox": {"network": "loopback"},
    }
    svc.update(keys)
    return svc


def run_probe(
    port: int, ns: Netns, p: Pyinetd, tls: ssl.SSLContext | None = None
) -> dict[str, str]:
    """Talk to the probe: once it listens without bind, connect to that port from the
    namespace (must not get through), then from loopback (must)."""
    out: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        s = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=DEADLINE))
        if tls is not None:
            s = stack.enter_context(tls.wrap_socket(s, server_hostname="localhost"))
        for line in stack.enter_context(s.makefile("r")):
            key, _, value = line.strip().partition("=")
            out[key] = value
            if key == "autobound":
                out["from_ns"] = ns.connect_from(ns.host_ip, int(value))
                socket.create_connection(("127.0.0.1", int(value)), timeout=DEADLINE).close()
            elif key == "udp_autobound":
                ns.run(
                    "import socket\n"
                    "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                    f"u.sendto(b'ns', ({ns.host_ip!r}, {value}))"
                )
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                    u.sendto(b"lo", ("127.0.0.1", int(value)))
    assert "udp_from" in out, (out, p.log())
    return out


@pytest.fixture
def lo_target() -> Iterator[int]:
    """A loopback port that listens: a local database, as far as the service knows."""
    with socket.create_server(("127.0.0.1", 0), backlog=16) as s:
        yield s.getsockname()[1]


def test_the_namespace_is_reachable_without_the_sandbox(netns: Netns) -> None:
    """The control: from the host, unsandboxed, the namespace's listener answers, and a
    listener without bind() is reached from the namespace."""
    with socket.create_connection((netns.ns_ip, netns.ns_port), timeout=DEADLINE) as s:
        assert s.recv(10) == b"ns\n"
    with socket.socket() as lst:
        lst.listen(1)
        assert netns.connect_from(netns.host_ip, lst.getsockname()[1]) == "connected"


@pytest.mark.parametrize(
    ("user", "primitive"),
    [("nobody", ""), (None, ""), (None, "vfork")],
    ids=["fork-nobody", "clone3-root", "vfork-root"],
)
def test_loopback_service_reaches_only_loopback_and_still_answers_its_client(
    inetd: Start, folder: Path, netns: Netns, lo_target: int, user: str | None, primitive: str
) -> None:
    """As nobody: the fork path, the child moves itself into the cgroup. As root: the C
    clone child, born in the cgroup (clone3), or the vfork child, which moves itself."""
    port = free_port()
    svc = probe_service(folder, lo_target, netns, listen=f"127.0.0.1:{port}")
    if user:
        svc["user"] = user
    p = inetd({"services": {"probe": svc}}, env={"PYINETD_SPAWN": primitive})
    out = run_probe(port, netns, p)
    assert out["from_ns"] == "timeout", out  # no handshake (ingress and egress drop it)
    assert {k: out[k] for k in ALLOWED_REFUSED} == ALLOWED_REFUSED, out
    (made,) = cgroups_of(p.pid)
    assert out["cgroup"] == made  # its own cgroup, born in it or moved there before its code
    p.stop()
    assert cgroups_of(p.pid) == []  # removed at the stop


def test_a_tls_services_relay_and_program_are_contained(
    inetd: Start, folder: Path, netns: Netns, lo_target: int, pki: Path
) -> None:
    """The TLS relay joins the cgroup before the handshake; the program it starts inherits
    it; the client's connection (the relay's fd) still carries every answer."""
    port = free_port()
    svc = probe_service(folder, lo_target, netns, listen=f"127.0.0.1:{port}", user="nobody")
    svc["tls"] = {"cert": "cert.pem", "key": "key.pem"}
    p = inetd({"services": {"probe": svc}})
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    out = run_probe(port, netns, p, ctx)
    assert {k: out[k] for k in ALLOWED_REFUSED} == ALLOWED_REFUSED, out
    assert out["from_ns"] == "timeout"
    (made,) = cgroups_of(p.pid)
    assert out["cgroup"] == made


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_the_socket_pyinetd_hands_it_still_reaches_a_client_outside_loopback(
    inetd: Start, folder: Path, netns: Netns, protocol: str
) -> None:
    """Beyond its fds: the connection (tcp) or the socket (udp) pyinetd made is not the
    service's, and answers a client in the namespace, while the service's own connect to
    that same client's address is refused."""
    kind = socket.SOCK_DGRAM if protocol == "udp" else socket.SOCK_STREAM
    port = free_port(kind, netns.host_ip)
    path = folder / "answer.sh"
    path.write_text(
        "#!/bin/bash\n"
        "read -r line\n"
        f"if exec 3<>/dev/tcp/{netns.ns_ip}/{netns.ns_port}; then r=yes; else r=no; fi"
        " 2>/dev/null\n"
        'echo "got=$line connect_ns=$r"\n'
    )
    path.chmod(0o755)
    svc = {
        "listen": f"{netns.host_ip}:{port}",
        "protocol": protocol,
        "exec": [str(path)],
        "user": "nobody",
        "sandbox": {"network": "loopback"},
    }
    inetd({"services": {"answer": svc}})
    out = netns.run(
        "import socket\n"
        f"s = socket.socket(socket.AF_INET, {int(kind)})\n"
        f"s.settimeout({DEADLINE})\n"
        f"s.connect(({netns.host_ip!r}, {port}))\n"
        "s.send(b'hi\\n')\n"
        "print(s.recv(100).decode().strip())\n"
    )
    assert out == "got=hi connect_ns=no", out


def test_a_warm_services_child_is_contained_too(
    inetd: Start, folder: Path, netns: Netns, lo_target: int
) -> None:
    """The zygote joins the service's cgroup; the processes it forks inherit it."""
    port = free_port()
    svc = probe_service(folder, lo_target, netns, listen=f"127.0.0.1:{port}", warm=True)
    svc["user"] = "nobody"
    p = inetd({"services": {"probe": svc}})
    zpid = int(re.findall(r"zygote (\d+) ready", p.wait_log(r"zygote \d+ ready")[0])[0])
    (made,) = cgroups_of(p.pid)
    assert Path(f"/proc/{zpid}/cgroup").read_text().rstrip().endswith("/" + made)
    out = run_probe(port, netns, p)
    assert out["warm"] == "1", (out, p.log())  # forked from the zygote, not exec'd cold
    assert out["cgroup"] == made
    assert {k: out[k] for k in ALLOWED_REFUSED} == ALLOWED_REFUSED, out
    assert out["from_ns"] == "timeout"
    p.stop()
    wait_for(lambda: not os.path.exists(f"/proc/{zpid}"), what="the zygote to leave")
    assert cgroups_of(p.pid) == []


def test_a_reload_keeps_an_unchanged_cgroup_and_removes_a_dropped_one_once_empty(
    inetd: Start, folder: Path
) -> None:
    """Nothing is rebuilt when nothing changed; a dropped service's cgroup stays while its
    process runs (rmdir says EBUSY), and goes when that process is reaped."""
    port, other = free_port(), free_port()
    hold = folder / "hold.sh"
    hold.write_text("#!/bin/sh\necho ready\nread -r line\necho bye\n")
    hold.chmod(0o755)
    conf = {
        "services": {
            "hold": {"listen": f"127.0.0.1:{port}", "exec": [str(hold)],
                     "sandbox": {"network": "loopback"}},
            "echo": {"listen": f"127.0.0.1:{other}", "builtin": "echo"},
        }
    }  # fmt: skip
    p = inetd(conf)
    (made,) = cgroups_of(p.pid)
    p.path.write_text(yaml.safe_dump(conf))
    p.signal(signal.SIGHUP)
    p.wait_log("reloaded: ")
    assert cgroups_of(p.pid) == [made]  # the same folder: nothing rebuilt
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
        assert s.recv(10) == b"ready\n"
        del conf["services"]["hold"]
        p.path.write_text(yaml.safe_dump(conf))
        p.signal(signal.SIGHUP)
        p.wait_log("reloaded: ", count=2)
        assert cgroups_of(p.pid) == [made]  # its process is still in it
        s.sendall(b"go\n")
        assert s.recv(10) == b"bye\n"
    wait_for(lambda: cgroups_of(p.pid) == [], what="the dropped service's cgroup to go")


def write_config(tmp_path: Path, box_cfg: object, **keys: object) -> Path:
    path = tmp_path / "inetd.yaml"
    svc = {"listen": "127.0.0.1:7990", "exec": ["/bin/cat"], "sandbox": box_cfg, **keys}
    path.write_text(yaml.safe_dump({"services": {"app": svc}}))
    return path


def test_loopback_without_cgroup_bpf_refuses_the_service_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYINETD_TEST_NO_CGROUP_BPF", "1")
    path = write_config(tmp_path, {"network": "loopback"})
    with pytest.raises(ConfigError) as info:
        load(path)
    (err,) = info.value.errors
    assert err.startswith(f"{path}: services.app.sandbox: network: loopback: needs a cgroup v2")
    assert "refused rather than run less contained" in err
    assert main(["--check", "-c", str(path)]) == 2


def test_loopback_with_bpf_refused_at_preparation_refuses_the_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bpf(2) refused (a container without CAP_BPF): the load fails naming file, service
    and key, and neither a cgroup folder nor an fd stays behind."""
    from pyinetd.spawn import prepare_sandboxes

    monkeypatch.setenv("PYINETD_TEST_BPF_FAILS", "1")
    cfg = load(write_config(tmp_path, {"network": "loopback"}))
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(ConfigError) as info:
        prepare_sandboxes(cfg.services)
    (err,) = info.value.errors
    assert err.startswith(
        f"{cfg.path}: services.app.sandbox: cannot prepare: network: loopback: needs bpf(2)"
    ), err
    assert set(os.listdir("/proc/self/fd")) <= before
    assert cgroups_of(os.getpid()) == []


def test_pyinetd_refuses_to_start_a_loopback_service_it_cannot_contain(inetd: Start) -> None:
    port = free_port()
    conf = {"services": {"boxed": {"listen": f"127.0.0.1:{port}", "exec": "/bin/cat",
                                   "sandbox": {"network": "loopback"}}}}  # fmt: skip
    p = inetd(conf, env={"PYINETD_TEST_BPF_FAILS": "1"}, wait_ready=False)
    p.wait_log(r"services\.boxed\.sandbox: cannot prepare: network: loopback: needs bpf\(2\)")
    assert p.proc.wait(DEADLINE) != 0
    assert cgroups_of(p.pid) == []


def test_a_redirect_under_loopback_must_target_loopback(tmp_path: Path) -> None:
    path = tmp_path / "inetd.yaml"
    svc = {
        "listen": "127.0.0.1:7990",
        "redirect": "192.0.2.1:80",
        "sandbox": {"network": "loopback"},
    }
    text = yaml.safe_dump({"services": {"app": svc}})
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert "services.app.sandbox.network: loopback: the redirect target '192.0.2.1'" in str(
        info.value
    )
    path.write_text(text.replace("192.0.2.1", "127.0.0.1"))
    assert load(path).services[0].redirect == ("127.0.0.1", 80)


def test_security_shows_network_loopback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, {"network": "loopback"}, user="nobody")
    assert main(["security", "-c", str(path)]) == 0
    assert "network=loopback" in capsys.readouterr().out


def test_the_programs_say_loopback_for_exactly_the_loopback_addresses() -> None:
    """The address hook, run by the kernel on every kind of address (a program loaded and
    attached to a cgroup of this test's own, with a child in it that binds)."""
    box = Prepared(SandboxSettings(network="loopback"), "addresses")
    made = box.cgroup
    try:
        cases = {
            ("127.0.0.1", socket.AF_INET): True,
            ("127.255.0.9", socket.AF_INET): True,
            ("0.0.0.0", socket.AF_INET): False,
            ("10.0.0.1", socket.AF_INET): False,
            ("128.0.0.1", socket.AF_INET): False,
            ("::1", socket.AF_INET6): True,
            ("::ffff:127.0.0.1", socket.AF_INET6): True,
            ("::", socket.AF_INET6): False,
            ("::2", socket.AF_INET6): False,
            ("::ffff:10.0.0.1", socket.AF_INET6): False,
            ("fe80::1", socket.AF_INET6): False,
            ("1::1", socket.AF_INET6): False,
        }
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                box.enter()
                res = []
                for (addr, fam), _ in cases.items():
                    with socket.socket(fam, socket.SOCK_DGRAM) as s:
                        try:
                            # connect() on UDP sends nothing: the connect hook alone judges
                            s.connect((addr, 9))
                            res.append("1")
                        except OSError as e:
                            res.append("1" if e.errno != 1 else "0")  # 1: EPERM
                os.write(w, "".join(res).encode())
            finally:
                os._exit(0)
        os.close(w)
        got = os.read(r, 100).decode()
        os.close(r)
        os.waitpid(pid, 0)
        assert got == "".join("1" if ok else "0" for ok in cases.values())
    finally:
        box.close()
    assert made and not os.path.exists(made)


def test_a_cgroup_a_gone_pyinetd_left_is_removed_at_the_next_start(inetd: Start) -> None:
    """shutdown: leave lets service processes outlive pyinetd, in their cgroup (still
    contained): the next pyinetd removes such a folder once it is empty."""
    gone = subprocess.Popen(["true"])
    gone.wait(DEADLINE)
    assert not os.path.exists(f"/proc/{gone.pid}")
    left = os.path.join(_own_cgroup(), f"pyinetd-{gone.pid}-1-old")
    os.mkdir(left)
    try:
        port = free_port()
        conf = {"services": {"boxed": {"listen": f"127.0.0.1:{port}", "exec": "/bin/cat",
                                       "sandbox": {"network": "loopback"}}}}  # fmt: skip
        inetd(conf)
        assert not os.path.exists(left)
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(left)


def test_a_loopback_redirect_relay_reaches_its_loopback_target_from_its_cgroup(
    inetd: Start,
) -> None:
    """The redirect relay joins the cgroup before it connects: a loopback target is allowed."""
    with socket.create_server(("127.0.0.1", 0)) as upstream:
        port = free_port()
        target = f"127.0.0.1:{upstream.getsockname()[1]}"
        svc = {"listen": f"127.0.0.1:{port}", "redirect": target,
               "sandbox": {"network": "loopback"}}  # fmt: skip
        p = inetd({"services": {"r": svc}})
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as client:
            upstream.settimeout(DEADLINE)
            conn, _ = upstream.accept()
            with conn:
                conn.sendall(b"pong\n")
                client.settimeout(DEADLINE)
                assert client.recv(100) == b"pong\n"
                (made,) = cgroups_of(p.pid)
                procs = Path(_own_cgroup(), made, "cgroup.procs").read_text().split()
                assert len(procs) == 1  # the relay
