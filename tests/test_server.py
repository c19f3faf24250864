"""End to end: the real pyinetd on loopback, real clients, real services."""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    DEADLINE,
    Pyinetd,
    children_of,
    free_port,
    pid_gone,
    script,
    tcp_talk,
    wait_for,
)

from pyinetd.protocols.builtins import CHARGEN_BLOCK, REGISTRY, RFC868_OFFSET
from pyinetd.runtime.listeners import has_ipv6

Start = Callable[..., Pyinetd]
needs_v6 = pytest.mark.skipif(not has_ipv6(), reason="no ::1 on this host")


def udp_talk(port: int, data: bytes, host: str = "127.0.0.1", count: int = 1) -> list[bytes]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(DEADLINE)
        s.bind((host, 0))
        s.sendto(data, (host, port))
        return [s.recv(65536) for _ in range(count)]


# ---------------------------------------------------------------- built-ins (RFC 862-868)
def test_builtin_echo_tcp_and_udp(inetd: Start) -> None:
    port = free_port()
    inetd(
        {
            "services": {
                "e": {"listen": f"127.0.0.1:{port}"},
                "u": {"listen": f"127.0.0.1:{port}", "protocol": "udp", "builtin": "echo"},
            }
        }
    )
    payload = os.urandom(300_000)
    assert tcp_talk(port, payload) == payload
    assert udp_talk(port, b"ping") == [b"ping"]


def test_builtin_sessions_log_start_and_end_with_their_bytes(inetd: Start) -> None:
    """A built-in session is accounted as a program is: a start and an end event, the end with
    the bytes read and written (ops-connection-accounting), for the whole-answer built-ins too."""
    echo, day = free_port(), free_port()
    p = inetd(
        {"services": {
            "e": {"listen": f"127.0.0.1:{echo}"},
            "d": {"listen": f"127.0.0.1:{day}", "builtin": "daytime"},
        }},
        "--log-format", "json",
    )  # fmt: skip
    assert tcp_talk(echo, b"yo\n") == b"yo\n"
    sent = tcp_talk(day, shut=False)
    for name, got_in, got_out in (("e", 3, 3), ("d", 0, len(sent))):
        start, end = (
            json.loads(p.wait_log(rf'"event": "{kind}".*"service": "{name}"')[0])
            for kind in ("start", "end")
        )
        assert start["peer"].startswith("127.0.0.1:") and start["builtin"] in ("echo", "daytime")
        assert (end["bytes_in"], end["bytes_out"]) == (got_in, got_out), end
        assert end["duration"] >= 0 and end["peer"] == start["peer"]


def test_the_start_line_names_the_local_address_of_a_service_on_several(inetd: Start) -> None:
    """A service listening on two addresses: its start line says which one the connection came
    in on (an administrator reading the log cannot tell otherwise); a one-address service's
    line stays as it was."""
    a, b, c = free_port(), free_port(), free_port()
    p = inetd({"services": {
        "two": {"listen": [f"127.0.0.1:{a}", f"127.0.0.2:{b}"], "exec": ["/bin/cat"]},
        "one": {"listen": f"127.0.0.1:{c}", "exec": ["/bin/cat"]},
    }})  # fmt: skip
    with socket.create_connection(("127.0.0.2", b), timeout=DEADLINE) as s:
        s.sendall(b"x")
        s.shutdown(socket.SHUT_WR)
        assert s.recv(10) == b"x"
    assert tcp_talk(c, b"y") == b"y"
    p.wait_log(rf"two: 127\.0\.0\.1:\d+ -> pid \d+ on 127\.0\.0\.2:{b}$")
    (line,) = p.wait_log(r"one: 127\.0\.0\.1:\d+ -> pid \d+")
    assert " on " not in line


def test_builtin_discard_chargen_daytime_time(inetd: Start) -> None:
    ports = [free_port() for _ in range(4)]
    names = ["discard", "chargen", "daytime", "time"]
    inetd(
        {
            "services": {
                n: {"listen": f"127.0.0.1:{p}", "builtin": n}
                for n, p in zip(names, ports, strict=True)
            }
        }
    )
    assert tcp_talk(ports[0], b"x" * 100_000) == b""
    with socket.create_connection(("127.0.0.1", ports[1]), timeout=DEADLINE) as s:
        got = b""
        while len(got) < 3 * len(CHARGEN_BLOCK):
            got += s.recv(65536)
    lines = got.split(b"\r\n")[:100]
    assert all(len(line) == 72 for line in lines)
    assert lines[0] == bytes(range(32, 104)) and lines[1] == bytes(range(33, 105))
    day = tcp_talk(ports[2], shut=False)
    assert day.endswith(b"\r\n") and str(time.localtime().tm_year).encode() in day
    raw = tcp_talk(ports[3], shut=False)
    assert len(raw) == 4
    assert abs(struct.unpack("!I", raw)[0] - RFC868_OFFSET - time.time()) < 5


def test_builtin_udp_time_and_daytime(inetd: Start) -> None:
    p1, p2 = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    inetd(
        {
            "services": {
                "t": {"listen": f"127.0.0.1:{p1}", "protocol": "udp", "builtin": "time"},
                "d": {"listen": f"127.0.0.1:{p2}", "protocol": "udp", "builtin": "daytime"},
            }
        }
    )
    (raw,) = udp_talk(p1, b"")
    assert abs(struct.unpack("!I", raw)[0] - RFC868_OFFSET - time.time()) < 5
    (day,) = udp_talk(p2, b"?")
    assert day.endswith(b"\r\n")


@pytest.mark.skipif(shutil.which("rdate") is None, reason="rdate not installed")
def test_builtin_time_with_rdate(inetd: Start) -> None:
    port = free_port()
    inetd({"services": {"t": {"listen": f"127.0.0.1:{port}", "builtin": "time"}}})
    # -p: print, do not set; -o: port; without -n rdate speaks RFC 868 over TCP.
    out = subprocess.run(
        ["rdate", "-p", "-o", str(port), "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert out.returncode == 0, out.stderr
    assert str(time.gmtime().tm_year) in out.stdout


# ---------------------------------------------------------------- exec'd services
def test_services_script_end_to_end_with_nc(inetd: Start) -> None:
    if shutil.which("nc") is None:
        pytest.skip("nc not installed")
    repo = Path(__file__).resolve().parent.parent
    port = free_port()
    inetd(
        {
            "services": {
                "upper": {"listen": f"127.0.0.1:{port}", "exec": str(repo / "services/upper.py")}
            }
        }
    )
    out = subprocess.run(
        ["nc", "-N", "127.0.0.1", str(port)],
        input=b"hello\nworld\n",
        capture_output=True,
        timeout=DEADLINE,
    )
    assert out.stdout == b"HELLO\nWORLD\n"


def test_environment_the_service_sees(inetd: Start, tmp_path: Path) -> None:
    port = free_port()
    env_sh = script(tmp_path, "env.sh", "#!/bin/sh\nenv\n")
    inetd(
        {"services": {"envsvc": {"listen": f"127.0.0.1:{port}", "exec": env_sh}}},
        env={"TEST_MARK": "inherited", "PYINETD_TEST_MARK": "pyinetd's own"},
    )
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
        cport = s.getsockname()[1]
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    env = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
    assert env["PYINETD_SERVICE"] == "envsvc"
    assert env["PROTO"] == "TCP"
    assert env["REMOTE_ADDR"] == env["TCPREMOTEIP"] == "127.0.0.1"
    assert env["REMOTE_PORT"] == env["TCPREMOTEPORT"] == str(cport)
    assert env["TCPLOCALIP"] == "127.0.0.1" and env["TCPLOCALPORT"] == str(port)
    assert env["TEST_MARK"] == "inherited"  # pyinetd's environment is passed on (as xinetd)
    # ... but not pyinetd's own variables: the fixture gives pyinetd a NOTIFY_SOCKET, with
    # which any service could tell systemd that pyinetd is ready or stopping (issue 14.13).
    assert "NOTIFY_SOCKET" not in env and "PYINETD_TEST_MARK" not in env


# A shell script's `pyinetd &` starts it with SIGINT and SIGQUIT ignored: services must
# still get every signal at its default. Both starts also hand pyinetd an fd (7) without
# close-on-exec, as a shell's `exec 7<file` does: no service may get it.
LEAKING = ("/bin/sh", "-c", 'exec 7</dev/null; exec "$@"', "sh")
IGNORING = ("/bin/sh", "-c", 'exec 7</dev/null; trap "" INT QUIT; exec "$@"', "sh")


PRIMITIVES = ("clone", "vfork", "fork_exec", "posix_spawn")


def test_the_c_spawn_primitive_is_built() -> None:
    """pyinetd._spawn is optional at install time; where the tests run, it must be there,
    or every "vfork" case below would quietly test the fallback."""
    from pyinetd import _spawn

    assert callable(_spawn.spawn)
    if platform.machine() in ("x86_64", "aarch64"):
        assert callable(_spawn.start)


def test_without_the_c_module_services_start_through_fork_exec_and_the_log_says_so(
    inetd: Start, tmp_path: Path
) -> None:
    """What an install without a C compiler runs: pyinetd._spawn missing."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['pyinetd._spawn'] = None\n")
    port = free_port()
    p = inetd(
        {"services": {"cat": {"listen": f"127.0.0.1:{port}", "exec": ["/bin/cat"]}}},
        env={"PYTHONPATH": str(hide)},
    )
    p.wait_log(r"services start with fork_exec: pyinetd\._spawn was not built")
    assert tcp_talk(port, b"still served") == b"still served"


@pytest.mark.parametrize(
    ("primitive", "prefix"),
    [(p, LEAKING) for p in PRIMITIVES] + [(p, IGNORING) for p in PRIMITIVES],
    ids=[*PRIMITIVES, *(f"{p}-started-ignoring" for p in PRIMITIVES)],
)
def test_service_gets_exactly_fds_0_1_2_and_default_signals(
    inetd: Start, tmp_path: Path, primitive: str, prefix: tuple[str, ...]
) -> None:
    port, other = free_port(), free_port()
    probe = script(
        tmp_path,
        "probe.sh",
        "#!/bin/sh\nls /proc/self/fd\ngrep -E '^Sig(Blk|Ign):' /proc/self/status\n",
    )
    p = inetd(
        {
            "services": {
                "probe": {"listen": f"127.0.0.1:{port}", "exec": ["/bin/sh", probe]},
                "other": {"listen": f"127.0.0.1:{other}"},
            }
        },
        "--log-level",
        "debug",
        env={"PYINETD_SPAWN": primitive},
        prefix=prefix,
    )
    p.wait_log(f"services start with {primitive}$")
    with socket.create_connection(("127.0.0.1", other)):  # another client's socket is open
        out = tcp_talk(port).decode().split()
    # ls itself opens one fd for the directory; the shell runs ls with 0, 1, 2 only.
    fds = sorted(int(x) for x in out[: out.index("SigBlk:")])
    assert fds == [0, 1, 2, 3], out
    assert out[out.index("SigBlk:") + 1] == "0000000000000000"
    # No signal is ignored (Python ignores SIGPIPE and SIGXFSZ; the child must not).
    # glibc 2.36's posix_spawn, the fallback, leaves its two internal signals 32 and 33
    # (SIGCANCEL, SIGSETXID; SIGRTMIN is 34) ignored in every spawned child; programs
    # cannot use them. pyinetd's own primitives and CPython's fork_exec leave none.
    ignored = int(out[out.index("SigIgn:") + 1], 16)
    if primitive == "posix_spawn":
        ignored &= ~((1 << 31) | (1 << 32))
    assert ignored == 0, hex(ignored)
    if prefix is IGNORING:  # pyinetd itself still ignores what it was started ignoring
        os.kill(p.pid, signal.SIGQUIT)
        assert b"SigIgn" in tcp_talk(port)
        assert p.proc.poll() is None


def test_stderr_goes_to_the_log_tagged_not_to_the_client(inetd: Start, tmp_path: Path) -> None:
    port = free_port()
    noisy = script(tmp_path, "noisy.sh", "#!/bin/sh\necho to-client\necho oops >&2\n")
    p = inetd({"services": {"noisy": {"listen": f"127.0.0.1:{port}", "exec": noisy}}})
    assert tcp_talk(port) == b"to-client\n"
    (line,) = p.wait_log(r"noisy\[\d+\]: oops")
    pid = int(line.split("noisy[")[1].split("]")[0])
    p.wait_log(rf"noisy: pid {pid} ended \(exit 0\)")


def test_stderr_lines_keep_their_writer_pid_and_an_unterminated_line_is_kept(
    inetd: Start, tmp_path: Path
) -> None:
    """All children of a service share one stderr socket: each line still carries the pid
    that wrote it, interleaved writers never mix, and a last line without a newline is
    logged when its writer is reaped, before its end line."""
    port = free_port()
    body = (
        "#!/bin/sh\n"
        "read what\n"  # the client says when: both children are running by then
        "printf 'first half of %s, ' $$ >&2\n"
        "echo go\n"
        "read what\n"
        "printf 'second half of %s\\nlast of %s' $$ $$ >&2\n"
    )
    svc = script(tmp_path, "halves.sh", body)
    p = inetd({"services": {"halves": {"listen": f"127.0.0.1:{port}", "exec": svc}}})
    a = socket.create_connection(("127.0.0.1", port), timeout=10)
    b = socket.create_connection(("127.0.0.1", port), timeout=10)
    with a, b:
        for s in (a, b):  # interleave: a's first half, b's first half, a's second, b's second
            s.sendall(b"1\n")
            assert s.recv(10) == b"go\n"
        for s in (a, b):
            s.sendall(b"2\n")
            assert s.recv(10) == b""
    lines = p.wait_log(r"halves\[\d+\]: first half of \d+, second half of \d+$", count=2)
    for line in lines:
        tag, text = line.split("halves[")[1].split("]: ")
        assert text == f"first half of {tag}, second half of {tag}", line
        p.wait_log(rf"halves: pid {tag} ended")
        log = p.log()
        end = log.index(f"halves: pid {tag} ended")
        assert log.index(f"halves[{tag}]: last of {tag}") < end


def test_stderr_socket_opt_in(inetd: Start, tmp_path: Path) -> None:
    port = free_port()
    noisy = script(tmp_path, "noisy.sh", "#!/bin/sh\necho oops >&2\n")
    inetd({"services": {"n": {"listen": f"127.0.0.1:{port}", "exec": noisy, "stderr": "socket"}}})
    assert tcp_talk(port) == b"oops\n"


def test_udp_nowait_child_per_datagram(inetd: Start, tmp_path: Path) -> None:
    port = free_port(socket.SOCK_DGRAM)
    rev = script(
        tmp_path,
        "rev.sh",
        '#!/bin/sh\nread line\necho "$PROTO $UDPREMOTEIP $line" | rev\necho second\n',
    )
    inetd({"services": {"rev": {"listen": f"127.0.0.1:{port}", "protocol": "udp", "exec": rev}}})
    # Everything the child writes comes back as one datagram.
    assert udp_talk(port, b"abc\n") == [b"cba 1.0.0.721 PDU\nsecond\n"]


def test_udp_wait_gets_the_bound_socket(inetd: Start, tmp_path: Path) -> None:
    port = free_port(socket.SOCK_DGRAM)
    server = script(
        tmp_path,
        "udpwait.py",
        f"""#!{os.sys.executable}
import os, socket
s = socket.socket(fileno=0)
for _ in range(2):
    data, peer = s.recvfrom(100)
    s.sendto(data.upper() + str(os.getpid()).encode(), peer)
""",
    )
    p = inetd(
        {
            "services": {
                "w": {
                    "listen": f"127.0.0.1:{port}",
                    "protocol": "udp",
                    "wait": True,
                    "exec": server,
                }
            }
        }
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.settimeout(DEADLINE)
        replies = []
        for msg in (b"a", b"b"):
            c.sendto(msg, ("127.0.0.1", port))
            replies.append(c.recv(100))
    assert replies[0][:1] == b"A" and replies[1][:1] == b"B"
    assert replies[0][1:] == replies[1][1:]  # one child served both: wait mode
    p.wait_log(r"w: pid \d+ ended \(exit 0\)")
    # The parent watches the socket again: the next datagram starts a new child.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.settimeout(DEADLINE)
        c.sendto(b"c", ("127.0.0.1", port))
        third = c.recv(100)
    assert third[:1] == b"C" and third[1:] != replies[0][1:]


def test_tcp_wait_child_accepts_itself(inetd: Start, tmp_path: Path) -> None:
    port = free_port()
    server = script(
        tmp_path,
        "tcpwait.py",
        f"""#!{os.sys.executable}
import os, socket
ls = socket.socket(fileno=0)
for _ in range(2):
    c, _ = ls.accept()
    c.sendall(b"pid %d\\n" % os.getpid())
    c.close()
""",
    )
    inetd({"services": {"w": {"listen": f"127.0.0.1:{port}", "wait": True, "exec": server}}})
    assert tcp_talk(port) == tcp_talk(port)


def test_unix_stream_service(inetd: Start, tmp_path: Path) -> None:
    path = tmp_path / "svc.sock"
    env_sh = script(tmp_path, "env.sh", '#!/bin/sh\necho "$PROTO $IPCREMOTEEUID"\ncat\n')
    p = inetd({"services": {"u": {"listen": str(path), "protocol": "unix", "exec": env_sh}}})
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(DEADLINE)
        s.connect(str(path))
        s.sendall(b"hi\n")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(100):
            data += chunk
    assert data == f"IPC {os.getuid()}\nhi\n".encode()
    assert p.stop() == 0
    assert not path.exists()  # the socket file is removed at exit


@needs_v6
def test_ipv6_and_dual_stack(inetd: Start, tmp_path: Path) -> None:
    v6, dual = free_port(host="::1"), free_port()
    env_sh = script(tmp_path, "addr.sh", '#!/bin/sh\necho "$REMOTE_ADDR $TCPLOCALIP"\n')
    inetd(
        {
            "services": {
                "v6": {"listen": f"[::1]:{v6}", "exec": env_sh},
                "dual": {"listen": dual, "exec": env_sh},
            }
        }
    )
    assert tcp_talk(v6, host="::1") == b"::1 ::1\n"
    assert tcp_talk(dual, host="::1") == b"::1 ::1\n"
    # A v4 client on the dual-stack socket is reported as 127.0.0.1, not ::ffff:127.0.0.1.
    assert tcp_talk(dual) == b"127.0.0.1 127.0.0.1\n"


@pytest.mark.skipif(shutil.which("socat") is None, reason="socat not installed")
def test_socat_client_and_udp_v6(inetd: Start) -> None:
    port = free_port()
    inetd({"services": {"e": {"listen": f"127.0.0.1:{port}"}}})
    out = subprocess.run(
        ["socat", "-", f"TCP:127.0.0.1:{port}"],
        input=b"via socat\n",
        capture_output=True,
        timeout=DEADLINE,
    )
    assert out.stdout == b"via socat\n"


# ---------------------------------------------------------------- robustness
@pytest.mark.parametrize("primitive", PRIMITIVES)
def test_missing_executable_at_runtime_closes_client_and_keeps_serving(
    inetd: Start, tmp_path: Path, primitive: str
) -> None:
    port, echo = free_port(), free_port()
    prog = script(tmp_path, "gone.sh", "#!/bin/sh\necho hi\n")
    p = inetd(
        {
            "services": {
                "gone": {"listen": f"127.0.0.1:{port}", "exec": prog},
                "echo": {"listen": f"127.0.0.1:{echo}"},
            }
        },
        env={"PYINETD_SPAWN": primitive},
    )
    os.unlink(prog)
    assert tcp_talk(port) == b""
    p.wait_log(r"gone: cannot start .*gone.sh: No such file or directory; closing 127\.0\.0\.1:")
    Path(prog).write_text("#!/bin/sh\necho hi\n")  # exists, no execute bit: EACCES
    assert tcp_talk(port) == b""
    p.wait_log(r"gone: cannot start .*gone.sh: Permission denied; closing")
    os.unlink(prog)
    os.symlink("/bin/cat", prog)  # comes back: served again, nothing restarted
    assert tcp_talk(port, b"back") == b"back"
    assert tcp_talk(echo, b"still") == b"still"


def test_a_service_that_exits_127_itself_is_not_an_exec_failure(inetd: Start) -> None:
    """The clone primitive learns of a failed exec when it reaps an exit 127; a program
    that ran and exited 127 (a shell's "command not found") is an ordinary end."""
    port = free_port()
    svc = {"listen": f"127.0.0.1:{port}", "exec": ["/bin/sh", "-c", "echo ran; exit 127"]}
    p = inetd({"services": {"sh127": svc}})
    assert tcp_talk(port) == b"ran\n"
    p.wait_log(r"sh127: pid \d+ ended \(exit 127\)")
    assert "cannot start" not in p.log()


def test_port_in_use_is_exit_1_with_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = tmp_path / "inetd.yaml"
        cfg.write_text(f"services:\n  e: {{listen: '127.0.0.1:{port}'}}\n")
        out = subprocess.run(
            [os.sys.executable, "-m", "pyinetd", "-c", str(cfg)],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        )
    assert out.returncode == 1
    # FILE:LINE:COL as every configuration error, and who holds the port (this test)
    assert out.stderr == (
        f"{cfg}:2:7: services.e.listen: 127.0.0.1:{port} (tcp): Address already in use "
        f"(held by pid {os.getpid()} ({Path(f'/proc/{os.getpid()}/comm').read_text().strip()}))\n"
    )


def test_no_zombies_after_500_connections(inetd: Start) -> None:
    port = free_port()
    p = inetd(
        {"services": {"cat": {"listen": f"127.0.0.1:{port}", "exec": "/bin/cat"}}},
        "--log-level",
        "warning",
    )
    socks = []
    for i in range(500):
        s = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        s.sendall(b"%d" % i)
        s.shutdown(socket.SHUT_WR)
        socks.append(s)
        if len(socks) == 50:
            for c in socks:
                assert c.recv(10)
                c.close()
            socks.clear()
    for c in socks:
        c.close()
    wait_for(lambda: not children_of(p.pid), what="every child reaped")
    assert [st for _, st in children_of(p.pid) if st == "Z"] == []


def test_sigterm_stops_listening_exits_0_and_leaves_children(inetd: Start, tmp_path: Path) -> None:
    port = free_port()
    p = inetd({"services": {"cat": {"listen": f"127.0.0.1:{port}", "exec": "/bin/cat"}}})
    s = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    (line,) = p.wait_log(r"cat: 127\.0\.0\.1:\d+ -> pid \d+")
    child = int(line.rsplit(" ", 1)[1])
    p.signal(signal.SIGTERM)
    assert p.proc.wait(DEADLINE) == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    # The running child still serves its client.
    s.sendall(b"still here")
    assert s.recv(100) == b"still here"
    s.close()
    wait_for(lambda: pid_gone(child), what="the child to finish")


def test_ctrl_c_sigint_also_exits_0(inetd: Start) -> None:
    port = free_port()
    p = inetd({"services": {"e": {"listen": f"127.0.0.1:{port}"}}})
    p.signal(signal.SIGINT)
    assert p.proc.wait(DEADLINE) == 0
    p.wait_log("SIGINT: stopping")


def test_shipped_services_library(inetd: Start) -> None:
    """Each script in services/ works end to end as its header comment says."""
    repo = Path(__file__).resolve().parent.parent
    ports = {name: free_port() for name in ("echo", "hello", "tod", "who")}
    inetd(
        {
            "services": {
                "echo": {
                    "listen": f"127.0.0.1:{ports['echo']}",
                    "exec": str(repo / "services/echo.sh"),
                },
                "hello": {
                    "listen": f"127.0.0.1:{ports['hello']}",
                    "exec": str(repo / "services/http_hello.py"),
                },
                "tod": {
                    "listen": f"127.0.0.1:{ports['tod']}",
                    "exec": str(repo / "services/timeofday.sh"),
                },
                "who": {
                    "listen": f"127.0.0.1:{ports['who']}",
                    "exec": str(repo / "services/whoami.sh"),
                },
            }
        }
    )
    assert tcp_talk(ports["echo"], b"ping\n") == b"ping\n"
    reply = tcp_talk(ports["hello"], b"GET /x HTTP/1.0\r\nHost: a\r\n\r\n")
    assert reply.startswith(b"HTTP/1.0 200 OK\r\n") and b"you asked for /x" in reply
    assert tcp_talk(ports["tod"]).decode().startswith(str(time.gmtime().tm_year))
    assert b"service:  who" in tcp_talk(ports["who"])
    if shutil.which("curl"):
        out = subprocess.run(
            ["curl", "-sf", f"http://127.0.0.1:{ports['hello']}/c"],
            capture_output=True,
            timeout=DEADLINE,
        )
        assert b"you asked for /c" in out.stdout


def test_every_builtin_the_config_accepts_is_in_the_registry() -> None:
    # One list of names (parsers.BUILTINS, which config and convert use), one registry of what
    # each does (builtins.REGISTRY): a name in one and not the other is a service that passes
    # --check and then fails at its first connection.
    from pyinetd.config.parsers import BUILTINS

    assert set(REGISTRY) == set(BUILTINS)


@pytest.mark.parametrize("primitive", PRIMITIVES)
def test_a_program_sees_its_path_as_written_in_argv0(
    inetd: Callable[..., Pyinetd], tmp_path: Path, primitive: str
) -> None:
    """pyinetd ran a symlinked program with its resolved path as argv[0]: a venv's python
    (a symlink to the base interpreter) lost its venv, since CPython finds pyvenv.cfg from
    argv[0], and a multi-call binary (busybox) did not know its applet. The resolved path
    is still what runs (what trust.py checked); argv[0] is the path as written."""
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("no busybox (apt-get install busybox)")
    port, vport = free_port(), free_port()
    applet = tmp_path / "echo"
    applet.symlink_to(busybox)
    venv_probe = "import sys; print(sys.prefix != sys.base_prefix, sys.executable)"
    inetd(
        {
            "services": {
                "applet": {"listen": f"127.0.0.1:{port}", "exec": [str(applet), "hello"]},
                # the interpreter running these tests: a venv's (CI's scripts/test.sh makes one)
                "py": {"listen": f"127.0.0.1:{vport}", "exec": [sys.executable, "-c", venv_probe]},
            }
        },
        env={"PYINETD_SPAWN": primitive},
    )
    assert tcp_talk(port) == b"hello\n"
    in_venv = sys.prefix != sys.base_prefix
    assert tcp_talk(vport).decode().split() == [str(in_venv), sys.executable]


def test_a_low_port_refused_to_a_user_says_what_allows_it() -> None:
    """As a user, binding port 99 fails with EACCES: the error says what would allow it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to become another user")
    if int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text()) <= 99:
        pytest.skip("ports below 100 are open to every user here")
    with tempfile.TemporaryDirectory(prefix="lowport-") as name:  # pytest's tmp is root's
        folder = Path(name)
        folder.chmod(0o755)
        cfg = folder / "inetd.yaml"
        cfg.write_text("services:\n  e: {listen: '127.0.0.1:99'}\n")
        cfg.chmod(0o644)
        out = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             sys.executable, "-m", "pyinetd", "-c", str(cfg)],
            capture_output=True, text=True, timeout=DEADLINE, cwd=folder,
        )  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert out.stderr == (
        f"{cfg}:2:7: services.e.listen: 127.0.0.1:99 (tcp): Permission denied; ports below "
        "1024 need root, CAP_NET_BIND_SERVICE, or sysctl net.ipv4.ip_unprivileged_port_start<=99\n"
    )
