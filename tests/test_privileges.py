"""Privileges, sessions and environment of service processes, as root, end to end: every path
that starts a service program applies the same process settings (issue 14.1), every service
has a session of its own (18.3), no_new_privs (14), what reaches a service's environment."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import (
    DEADLINE,
    LocalUser,
    Pyinetd,
    children_of,
    free_port,
    tcp_talk,
    wait_for,
    write_pki,
)

Start = Callable[..., Pyinetd]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (user: nobody)")

# What a service process is: identity, limits, folder, umask, priority, privileges, terminal.
# In wait mode it accepts the connection itself; elsewhere it writes to stdout.
PROBE = r"""#!/usr/bin/env python3
import os, resource, socket, sys
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
stat = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
facts = " ".join([
    f"uid={os.getuid()},{os.geteuid()}", f"gid={os.getgid()},{os.getegid()}",
    f"groups={sorted(os.getgroups())}", f"nofile={resource.getrlimit(resource.RLIMIT_NOFILE)}",
    f"cwd={os.getcwd()}", f"umask={os.umask(0):o}", f"nice={os.getpriority(os.PRIO_PROCESS, 0)}",
    f"nnp={status['NoNewPrivs'].strip()}", f"caps={status['CapEff'].strip()}", f"tty={stat[4]}",
])
out = (facts + " sid=" + stat[3] + "\n").encode()
import stat as st
s = socket.socket(fileno=0) if st.S_ISSOCK(os.fstat(0).st_mode) else None  # TLS: a pipe
if s and s.type == socket.SOCK_STREAM and s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
    conn, _ = s.accept()
    conn.sendall(out)
    conn.close()
else:
    os.write(1, out)
"""

SETTINGS: dict[str, object] = {
    "user": "nobody",
    "group": "nogroup",
    "rlimits": {"nofile": 77},
    "cwd": "/tmp",
    "umask": "027",
    "nice": 5,
}
WANT = (
    "uid=65534,65534 gid=65534,65534 groups=[65534] nofile=(77, 77) cwd=/tmp umask=27 nice=5"
    " nnp=1 caps=0000000000000000 tty=0"
)


@pytest.fixture
def world() -> Iterator[Path]:
    """A folder every user can read and search (pytest's tmp_path is root's, mode 0700)."""
    d = Path(tempfile.mkdtemp(prefix="pyinetd-priv-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def probe(world: Path) -> str:
    path = world / "probe.py"
    path.write_text(PROBE)
    path.chmod(0o755)
    return str(path)


def tls_files(tmp_path: Path) -> tuple[dict[str, str], ssl.SSLContext]:
    write_pki(tmp_path)
    ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    return {"cert": str(tmp_path / "cert.pem"), "key": str(tmp_path / "key.pem")}, ctx


def tls_read(port: int, ctx: ssl.SSLContext) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as s,
    ):
        out = b""
        with contextlib.suppress(ssl.SSLError, OSError):
            while chunk := s.recv(4096):
                out += chunk
        return out


def split_sid(line: str) -> tuple[str, int]:
    facts, _, sid = line.strip().rpartition(" sid=")
    return facts, int(sid)


def proc_facts(pid: int) -> str:
    """The probe's facts, read from outside for a process that runs no probe (a relay)."""
    status = dict(ln.split(":", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines())
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    uid, euid = status["Uid"].split()[:2]
    gid, egid = status["Gid"].split()[:2]
    groups = sorted(int(g) for g in status["Groups"].split())
    limits = Path(f"/proc/{pid}/limits").read_text()
    nofile = next(ln for ln in limits.splitlines() if ln.startswith("Max open files")).split()
    umask = int(status["Umask"].strip(), 8)
    return " ".join([
        f"uid={uid},{euid}", f"gid={gid},{egid}", f"groups={groups}",
        f"nofile=({nofile[3]}, {nofile[4]})", f"cwd={os.readlink(f'/proc/{pid}/cwd')}",
        f"umask={umask:o}", f"nice={int(stat[16])}",
        f"nnp={status['NoNewPrivs'].strip()}", f"caps={status['CapEff'].strip()}",
        f"tty={stat[4]}",
    ])  # fmt: skip


def test_every_path_that_starts_a_service_applies_the_same_settings(
    inetd: Start, tmp_path: Path, world: Path
) -> None:
    """One probe through plain, wait, UDP, PROXY and TLS: the same uid, gid, groups, nofile,
    folder, umask, nice, no_new_privs, no capabilities, no terminal. A TLS service ran as
    root with every capability in the config's folder (issue 14.1)."""
    exe = probe(world)
    tls, ctx = tls_files(tmp_path)
    plain, wait, udp, proxy, tls_port = (free_port() for _ in range(5))
    p = inetd(
        {
            "services": {
                "plain": {"listen": f"127.0.0.1:{plain}", "exec": exe, **SETTINGS},
                "wait": {"listen": f"127.0.0.1:{wait}", "exec": exe, "wait": True, **SETTINGS},
                "udp": {
                    "listen": f"127.0.0.1:{udp}",
                    "protocol": "udp",
                    "exec": exe,
                    **SETTINGS,
                },
                "proxy": {
                    "listen": f"127.0.0.1:{proxy}",
                    "exec": exe,
                    "proxy_protocol": "v1",
                    "proxy_from": "127.0.0.1",
                    **SETTINGS,
                },
                "tls": {"listen": f"127.0.0.1:{tls_port}", "exec": exe, "tls": tls, **SETTINGS},
            }
        }
    )
    ours = os.getsid(p.pid)
    seen = {
        "plain": tcp_talk(plain),
        "wait": tcp_talk(wait),
        "proxy": tcp_talk(proxy, b"PROXY TCP4 192.0.2.1 192.0.2.2 1000 2000\r\n"),
        "tls": tls_read(tls_port, ctx),
    }
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(DEADLINE)
        s.sendto(b"x", ("127.0.0.1", udp))
        seen["udp"] = s.recv(4096)
    for path, raw in seen.items():
        assert raw, f"{path}: nothing came back:\n{p.log()}"
    got = {path: split_sid(raw.decode()) for path, raw in seen.items()}
    assert {path: facts for path, (facts, _) in got.items()} == dict.fromkeys(got, WANT)
    assert all(sid != ours for _, sid in got.values()), got  # not pyinetd's session


def test_a_redirects_front_runs_as_its_front_uid_without_privileges(
    inetd: Start, tmp_path: Path, world: Path
) -> None:
    """The redirect's outbound connection comes from the service's front, which drops to its
    front uid (not root, not the service's user), no capability, no_new_privs, not dumpable
    and a session of its own before it touches a client: a redirect relay once ran as root
    with every capability (issue 14.1)."""
    target = socket.create_server(("127.0.0.1", 0))
    port = free_port()
    p = inetd(
        {
            "services": {
                "r": {
                    "listen": f"127.0.0.1:{port}",
                    "redirect": f"127.0.0.1:{target.getsockname()[1]}",
                    **SETTINGS,
                }
            }
        }
    )
    with target, socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as client:
        target.settimeout(DEADLINE)
        try:
            conn, _ = target.accept()
        except TimeoutError:
            raise AssertionError(f"the relay did not connect:\n{p.log()}") from None
        with conn:
            kids = children_of(p.pid)
            assert len(kids) == 1, kids
            relay = kids[0][0]
            facts = proc_facts(relay)
            uid = int(facts.split()[0].split("=")[1].split(",")[0])
            assert 61184 <= uid <= 65519, facts  # a front uid: no passwd entry, no program's
            assert f"uid={uid},{uid} gid={uid},{uid} groups=[]" in facts
            assert "nnp=1 caps=0000000000000000" in facts
            assert os.getsid(relay) == relay  # a session of its own
            # Not dumpable (its /proc entries stay root's): no other process of the user may
            # ptrace it or read its memory, where a TLS relay holds the key.
            assert os.stat(f"/proc/{relay}/mem").st_uid == 0
            conn.sendall(b"through\n")
            assert client.recv(100) == b"through\n"


def test_no_new_privs_a_setuid_root_binary_gains_nothing(
    inetd: Start, tmp_path: Path, world: Path
) -> None:
    """A `user:` service runs with no_new_privs by default: a setuid-root copy of id stays
    uid nobody; with `no_new_privs: false` the setuid bit works again (the opt-out)."""
    suid = world / "id"
    shutil.copy("/usr/bin/id", suid)
    suid.chmod(0o4755)
    on, off = free_port(), free_port()
    inetd(
        {
            "services": {
                "on": {"listen": f"127.0.0.1:{on}", "exec": [str(suid)], "user": "nobody"},
                "off": {
                    "listen": f"127.0.0.1:{off}",
                    "exec": [str(suid)],
                    "user": "nobody",
                    "no_new_privs": False,
                },
            }
        }
    )
    assert b"euid=0" not in tcp_talk(on)
    assert b"uid=65534" in tcp_talk(on)
    assert b"euid=0(root)" in tcp_talk(off)


@pytest.mark.parametrize("primitive", ["clone", "vfork", "fork_exec", "posix_spawn"])
def test_no_new_privs_on_a_root_service_with_every_primitive(
    inetd: Start, tmp_path: Path, primitive: str
) -> None:
    """`no_new_privs: true` without `user:` reaches the child whichever primitive starts it;
    the default for such a service is off."""
    on, off = free_port(), free_port()
    show = ["/bin/grep", "^NoNewPrivs:", "/proc/self/status"]
    inetd(
        {
            "services": {
                "on": {"listen": f"127.0.0.1:{on}", "exec": show, "no_new_privs": True},
                "off": {"listen": f"127.0.0.1:{off}", "exec": show},
            }
        },
        env={"PYINETD_SPAWN": primitive},
    )
    assert tcp_talk(on).split() == [b"NoNewPrivs:", b"1"]
    assert tcp_talk(off).split() == [b"NoNewPrivs:", b"0"]


# pyinetd with a terminal of its own, as when root starts it in the foreground: the prefix
# makes a pty its controlling terminal (it is a session leader: Popen's start_new_session),
# keeps both ends open across the exec, and execs pyinetd.
ON_A_PTY = (
    sys.executable,
    "-c",
    "import fcntl, os, sys, termios\n"
    "m, s = os.openpty()\n"
    "fcntl.ioctl(s, termios.TIOCSCTTY, 0)\n"
    "os.set_inheritable(m, True); os.set_inheritable(s, True)\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n",
)

TTY_PROBE = r"""#!/usr/bin/env python3
import errno, fcntl, os, termios
try:
    fd = os.open("/dev/tty", os.O_RDWR)
except OSError as e:
    print("open /dev/tty:", errno.errorcode[e.errno])
else:
    try:
        fcntl.ioctl(fd, termios.TIOCSTI, b"#")
        print("open /dev/tty: ok, TIOCSTI: ok")
    except OSError as e:
        print("open /dev/tty: ok, TIOCSTI:", errno.errorcode[e.errno])
"""


def test_a_service_cannot_reach_pyinetds_terminal(
    inetd: Start, tmp_path: Path, world: Path
) -> None:
    """With pyinetd on root's terminal, a `user: nobody` service opened /dev/tty (and could
    type into root's shell with TIOCSTI): it shared pyinetd's session (issue 18.3)."""
    exe = world / "tty.py"
    exe.write_text(TTY_PROBE)
    exe.chmod(0o755)
    port = free_port()
    p = inetd(
        {"services": {"t": {"listen": f"127.0.0.1:{port}", "exec": str(exe), "user": "nobody"}}},
        prefix=ON_A_PTY,
    )
    tty_nr = int(Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()[4])
    assert tty_nr != 0  # pyinetd does have a controlling terminal
    assert tcp_talk(port).decode().strip() == "open /dev/tty: ENXIO"


SETPGID_PROBE = r"""#!/usr/bin/env python3
import os, sys, time
try:
    os.setpgid(0, os.getpgid(os.getppid()))
    print("joined", os.getpid(), flush=True)
except OSError:
    print("refused", os.getpid(), flush=True)
time.sleep(30)
"""


def test_timeout_kills_a_service_that_left_its_group_and_frees_its_slot(
    inetd: Start, tmp_path: Path, world: Path
) -> None:
    """A service that setpgid()s into pyinetd's group escaped the timeout's killpg (ESRCH):
    it lived on and kept its max_connections slot. Now it cannot leave its session, and the
    timeout signals its pid too (issue 18.3)."""
    exe = world / "pgid.py"
    exe.write_text(SETPGID_PROBE)
    exe.chmod(0o755)
    port = free_port()
    p = inetd(
        {
            "services": {
                "g": {
                    "listen": f"127.0.0.1:{port}",
                    "exec": str(exe),
                    "user": "nobody",
                    "timeout": 0.3,
                    "max_connections": 1,
                }
            }
        }
    )
    pids: list[int] = []
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as first:
            line = first.makefile().readline().split()
            pids.append(int(line[1]))
            assert line[0] == "refused"
            assert first.recv(100) == b""  # killed at the timeout: EOF, not a hang
        wait_for(lambda: not Path(f"/proc/{pids[0]}").exists(), what="the service to go")
        p.wait_log(r"g: pid \d+ timed out")
        # Its slot is free: the next client is served, not queued behind a live process.
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as second:
            line = second.makefile().readline().split()
            pids.append(int(line[1]))
    finally:
        for pid in pids:  # (before the fix it outlives pyinetd, in pyinetd's group)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_user_deleted_after_load_is_one_throttled_line_and_a_closed_connection(
    inetd: Start, local_user: LocalUser
) -> None:
    """Every connection to a service whose `user:` was deleted after load logged an
    "internal error" traceback (issue 18.16): now one line a minute, the client closed."""
    port, other = free_port(), free_port()
    p = inetd(
        {
            "services": {
                "gone": {"listen": f"127.0.0.1:{port}", "exec": ["/bin/echo", "hi"],
                         "user": local_user.name},
                "echo": {"listen": f"127.0.0.1:{other}", "builtin": "echo"},
            }
        }
    )  # fmt: skip
    subprocess.run(["userdel", local_user.name], check=True, capture_output=True)
    for _ in range(5):
        assert tcp_talk(port) == b""  # closed at once, no hang
    assert tcp_talk(other, b"still here") == b"still here"
    lines = p.wait_log(rf"gone: cannot start: user '{local_user.name}' no longer exists")
    assert len(lines) == 1, p.log()
    assert "Traceback" not in p.log() and "internal error" not in p.log()


def test_a_service_without_user_is_named_once_at_load(inetd: Start) -> None:
    """As root, a service with no `user:` ran its programs as root without a word (xinetd
    refuses such services): one warning per service at load, not per connection, none for
    a service with `user:` or a built-in, none again for an unchanged reload."""
    root, nobody, builtin = free_port(), free_port(), free_port()
    p = inetd(
        {
            "services": {
                "asroot": {"listen": f"127.0.0.1:{root}", "exec": ["/bin/echo", "x"]},
                "dropped": {
                    "listen": f"127.0.0.1:{nobody}",
                    "exec": ["/bin/echo", "x"],
                    "user": "nobody",
                },
                "inside": {"listen": f"127.0.0.1:{builtin}", "builtin": "echo"},
            }
        }
    )
    for _ in range(3):
        assert tcp_talk(root) == b"x\n"
    p.signal(signal.SIGHUP)
    p.wait_log("reloaded: ")
    assert tcp_talk(root) == b"x\n"
    warned = [ln for ln in p.log().splitlines() if "as root" in ln]
    assert len(warned) == 1 and "asroot: no user: set" in warned[0], p.log()


def test_pyinetds_environment_does_not_reach_a_user_service(inetd: Start) -> None:
    """A `user:` service got root's whole environment (a secret, NOTIFY_SOCKET, PYINETD_*):
    now PATH, the locale and TZ of it, and the user's own HOME, USER, LOGNAME (14.13)."""
    port = free_port()
    inetd(
        {"services": {"e": {"listen": f"127.0.0.1:{port}", "exec": "/usr/bin/env",
                            "user": "nobody", "env": {"MINE": "yes"}}}},
        env={"ROOT_SECRET": "s3cret", "PYINETD_X": "1", "LANG": "C.UTF-8", "TZ": "UTC"},
    )  # fmt: skip
    env = dict(ln.split("=", 1) for ln in tcp_talk(port).decode().splitlines())
    assert "ROOT_SECRET" not in env and "NOTIFY_SOCKET" not in env and "PYINETD_X" not in env
    assert (env["USER"], env["HOME"], env["MINE"]) == ("nobody", "/nonexistent", "yes")
    assert (env["LANG"], env["TZ"], env["PYINETD_SERVICE"]) == ("C.UTF-8", "UTC", "e")
    assert env["PATH"]


@pytest.mark.parametrize("primitive", ["clone", "vfork", "fork_exec", "posix_spawn"])
def test_every_primitive_starts_a_session_with_no_terminal(inetd: Start, primitive: str) -> None:
    """setsid in each spawn primitive, for a service without user: (issue 18.3): the child
    leads its own session and group, with no controlling terminal, even with pyinetd on one."""
    port = free_port()
    show = ["/bin/sh", "-c", "echo $$ $(cut -d' ' -f5,6,7 /proc/$$/stat)"]
    inetd(
        {"services": {"s": {"listen": f"127.0.0.1:{port}", "exec": show}}},
        env={"PYINETD_SPAWN": primitive},
        prefix=ON_A_PTY,
    )
    pid, pgrp, sid, tty = tcp_talk(port).split()
    assert pid == pgrp == sid and tty == b"0"
