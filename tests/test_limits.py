"""Limits, access control and process settings, each shown biting on real connections."""

from __future__ import annotations

import os
import pwd
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import DEADLINE, Pyinetd, free_port, pid_gone, script, tcp_talk

from pyinetd.runtime.listeners import has_ipv6

Start = Callable[..., Pyinetd]
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")


def hold(port: int, host: str = "127.0.0.1", src: str | None = None) -> socket.socket:
    """Open a connection and leave it open."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(DEADLINE)
    if src:
        s.bind((src, 0))
    s.connect((host, port))
    return s


def read_all(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def reply(port: int, src: str | None = None) -> bytes:
    """Connect, read until EOF without sending anything, close."""
    with hold(port, src=src) as s:
        return read_all(s)


def refused(port: int, data: bytes = b"x", src: str | None = None) -> bytes:
    """Send to a connection that is expected to be refused: its reply, b"" for EOF or RST."""
    with hold(port, src=src) as s:
        try:
            s.sendall(data)
            return read_all(s)
        except (ConnectionResetError, BrokenPipeError):
            return b""


def started(p: Pyinetd, service: str, n: int) -> list[int]:
    """Wait for ``n`` start lines of ``service``; return their pids."""
    lines = p.wait_log(rf"{service}: \S+ -> pid \d+", count=n)
    return [int(ln.rsplit(" ", 1)[1]) for ln in lines]


def test_max_connections_queue_holds_the_next_client_in_the_backlog(inetd: Start) -> None:
    port = free_port()
    p = inetd(
        {
            "services": {
                "cat": {"listen": f"127.0.0.1:{port}", "exec": "/bin/cat", "max_connections": 2}
            }
        }
    )
    a, b = hold(port), hold(port)
    started(p, "cat", 2)
    c = hold(port)  # connects (kernel backlog) but no child starts for it
    c.sendall(b"third")
    c.settimeout(0.3)
    with pytest.raises(TimeoutError):
        c.recv(10)  # nothing answers while the service is at its limit
    assert len(p.wait_log(r"cat: \S+ -> pid")) == 2
    a.close()  # a slot frees: the queued client is served
    c.settimeout(DEADLINE)
    assert c.recv(10) == b"third"
    for s in (b, c):
        s.close()


def test_max_connections_reject_sends_busy_message_and_admits_after_a_slot_frees(
    inetd: Start,
) -> None:
    port = free_port()
    p = inetd(
        {
            "services": {
                "cat": {
                    "listen": f"127.0.0.1:{port}",
                    "exec": "/bin/cat",
                    "max_connections": 1,
                    "on_limit": "reject",
                    "busy_message": "busy, try later",
                }
            }
        }
    )
    a = hold(port)
    (pid,) = started(p, "cat", 1)
    assert reply(port) == b"busy, try later\r\n"
    p.wait_log(r"cat: refused 127\.0\.0\.1:\d+: limit")
    a.close()
    p.wait_log(rf"pid {pid} ended")
    assert tcp_talk(port, b"now") == b"now"


def test_global_max_children(inetd: Start) -> None:
    p1, p2 = free_port(), free_port()
    p = inetd(
        {
            "max_children": 1,
            "services": {
                "a": {"listen": f"127.0.0.1:{p1}", "exec": "/bin/cat"},
                "b": {"listen": f"127.0.0.1:{p2}", "exec": "/bin/cat"},
            },
        }
    )
    a = hold(p1)
    started(p, "a", 1)
    b = hold(p2)
    b.sendall(b"queued")
    b.settimeout(0.3)
    with pytest.raises(TimeoutError):
        b.recv(10)
    a.close()
    b.settimeout(DEADLINE)
    assert b.recv(10) == b"queued"
    b.close()


def test_per_source_refuses_only_that_address(inetd: Start) -> None:
    port = free_port()
    p = inetd(
        {
            "services": {
                "cat": {
                    "listen": f"0.0.0.0:{port}",
                    "exec": "/bin/cat",
                    "per_source": 2,
                    "busy_message": "too many",
                }
            }
        }
    )
    held = [hold(port, src="127.0.0.2"), hold(port, src="127.0.0.2")]
    first, _ = started(p, "cat", 2)
    assert reply(port, src="127.0.0.2") == b"too many\r\n"
    p.wait_log(r"cat: refused 127\.0\.0\.2:\d+: per_source")
    assert tcp_talk(port, b"other") == b"other"  # 127.0.0.1 is another source
    held[0].close()
    p.wait_log(rf"cat: pid {first} ended")
    s = hold(port, src="127.0.0.2")  # a freed slot admits that address again
    s.sendall(b"again")
    assert s.recv(10) == b"again"
    s.close()
    held[1].close()


def test_crashed_and_timed_out_children_free_their_slots(inetd: Start, tmp_path: Path) -> None:
    """systemd's MaxConnectionsPerSource kept counting failed connections; we must not."""
    port = free_port()
    crash = script(tmp_path, "crash.sh", "#!/bin/sh\nread x\nkill -SEGV $$\n")
    p = inetd(
        {
            "services": {
                "c": {
                    "listen": f"127.0.0.1:{port}",
                    "exec": crash,
                    "per_source": 1,
                    "max_connections": 1,
                    "on_limit": "reject",
                }
            }
        }
    )
    for i in range(1, 6):
        assert refused(port, b"go\n") == b""
        # The slot is free once the child is reaped; then the next one is admitted.
        p.wait_log(r"c: pid \d+ ended \(signal SIGSEGV\)", count=i)
    assert "refused" not in p.log()


def test_rate_pauses_then_resumes_by_itself_and_never_closes_the_port(inetd: Start) -> None:
    port = free_port()
    p = inetd(
        {
            "services": {
                "e": {"listen": f"127.0.0.1:{port}", "rate": "5/s", "burst": 3, "rate_pause": 1}
            }
        }
    )
    for i in range(3):
        assert tcp_talk(port, b"%d" % i) == b"%d" % i
    assert refused(port) == b""  # over the rate: closed
    p.wait_log(r"e: over the rate of 5/s; pausing for 1s")
    t0 = time.monotonic()
    # During the pause the port still accepts into the backlog (never refused) ...
    s = hold(port)
    s.sendall(b"waited")
    # ... and the listener resumes by itself: the queued client gets served.
    assert s.recv(10) == b"waited"
    assert time.monotonic() - t0 >= 0.5
    s.close()
    p.wait_log(r"accepting again")


def test_counts_survive_a_rate_pause(inetd: Start) -> None:
    """xinetd reset its instance count on resume; instances must keep holding."""
    port = free_port()
    p = inetd(
        {
            "services": {
                "cat": {
                    "listen": f"127.0.0.1:{port}",
                    "exec": "/bin/cat",
                    "max_connections": 2,
                    "on_limit": "reject",
                    "busy_message": "busy",
                    "rate": "30/min",
                    "burst": 2,
                    "rate_pause": 2,
                }
            }
        }
    )
    a = hold(port)  # token 1, instance 1
    started(p, "cat", 1)
    assert tcp_talk(port, b"b") == b"b"  # token 2
    p.wait_log(r"cat: pid \d+ ended")
    assert refused(port) == b""  # no token left: the listener pauses
    p.wait_log(r"cat: over the rate")
    p.wait_log(r"accepting again")
    d = hold(port)  # instance 2 (a still runs)
    started(p, "cat", 3)
    assert reply(port) == b"busy\r\n"  # the count held across the pause and resume
    p.wait_log(r"refused 127\.0\.0\.1:\d+: limit")
    a.close()
    d.close()


def test_allow_deny_most_specific_wins_v4(inetd: Start) -> None:
    port = free_port()
    p = inetd(
        {
            "services": {
                "e": {
                    "listen": f"0.0.0.0:{port}",
                    "allow": ["127.0.0.0/8"],
                    "deny": ["127.0.0.2"],
                    "deny_message": "go away",
                }
            }
        }
    )
    assert tcp_talk(port, b"ok") == b"ok"
    assert reply(port, src="127.0.0.2") == b"go away\r\n"
    p.wait_log(r"e: refused 127\.0\.0\.2:\d+: deny")


@pytest.mark.skipif(not has_ipv6(), reason="no ::1 on this host")
def test_allow_deny_v6_and_v4_mapped(inetd: Start) -> None:
    port = free_port()
    p = inetd({"services": {"e": {"listen": port, "deny": ["127.0.0.1"], "allow": ["::1"]}}})
    assert tcp_talk(port, b"v6", host="::1") == b"v6"
    # A v4 client on the dual-stack socket arrives as ::ffff:127.0.0.1 and is matched as v4.
    assert refused(port) == b""
    p.wait_log(r"e: refused 127\.0\.0\.1:\d+: deny")


def test_denied_address_is_logged_once_per_minute(inetd: Start) -> None:
    port = free_port()
    p = inetd({"services": {"e": {"listen": f"127.0.0.1:{port}", "deny": ["127.0.0.1"]}}})
    for _ in range(20):
        assert refused(port) == b""
    p.signal(signal.SIGTERM)
    p.proc.wait(DEADLINE)
    assert len(p.wait_log(r"refused 127\.0\.0\.1")) == 1


def test_timeout_terms_then_kills_a_hung_service(inetd: Start, tmp_path: Path) -> None:
    port = free_port()
    stubborn = script(
        tmp_path, "stubborn.sh", "#!/bin/sh\ntrap '' TERM\nwhile :; do sleep 1; done\n"
    )
    polite = free_port()
    p = inetd(
        {
            "services": {
                "hang": {"listen": f"127.0.0.1:{port}", "exec": stubborn, "timeout": "0.5s"},
                "cat": {"listen": f"127.0.0.1:{polite}", "exec": "/bin/cat", "timeout": 0.3},
            }
        }
    )
    s = hold(polite)
    (cat_pid,) = started(p, "cat", 1)
    p.wait_log(rf"cat: pid {cat_pid} ended \(signal SIGTERM\)")
    assert read_all(s) == b""
    h = hold(port)
    (pid,) = started(p, "hang", 1)
    p.wait_log(rf"hang: pid {pid} timed out after 0.5s; sending SIGTERM")
    p.wait_log(rf"hang: pid {pid} ended \(signal SIGKILL\)", timeout=DEADLINE)
    assert pid_gone(pid)
    h.close()
    s.close()


def test_banner_arrives_before_service_output(inetd: Start, tmp_path: Path) -> None:
    port, port2 = free_port(), free_port()
    (tmp_path / "banner.txt").write_text("Authorized use only\n")
    inetd(
        {
            "services": {
                "a": {"listen": f"127.0.0.1:{port}", "exec": "/bin/cat", "banner": "banner.txt"},
                "b": {"listen": f"127.0.0.1:{port2}", "builtin": "echo", "banner_text": "hi\n"},
            }
        }
    )
    assert tcp_talk(port, b"data") == b"Authorized use only\ndata"
    assert tcp_talk(port2, b"x") == b"hi\nx"


def test_env_env_clear_cwd_umask_nice(inetd: Start, tmp_path: Path) -> None:
    port, port2 = free_port(), free_port()
    show = script(
        tmp_path,
        "show.sh",
        '#!/bin/sh\necho "$GREETING|$HOME|$PYINETD_SERVICE|$REMOTE_ADDR"\npwd\numask\n'
        "cut -d' ' -f19 /proc/self/stat\nenv | wc -l\n",
    )
    work = tmp_path / "work"
    work.mkdir()
    inetd(
        {
            "services": {
                "a": {
                    "listen": f"127.0.0.1:{port}",
                    "exec": show,
                    "env": {"GREETING": "hello"},
                    "env_clear": True,
                    "cwd": "work",
                    "umask": "027",
                    "nice": 7,
                },
                "b": {"listen": f"127.0.0.1:{port2}", "exec": show},
            }
        },
        env={"HOME": "/somewhere"},
    )
    first, cwd, umask, nice, count = tcp_talk(port).decode().split("\n")[:5]
    assert first == "hello||a|127.0.0.1"  # env_clear: HOME is gone, connection vars stay
    assert cwd == str(work) and umask == "0027" and nice == "7"
    assert int(count) < 15
    assert tcp_talk(port2).decode().split("\n")[0] == "||b|127.0.0.1".replace("||", "|/somewhere|")


def test_rlimits_visible_inside_the_service(inetd: Start, tmp_path: Path) -> None:
    port = free_port()
    show = script(tmp_path, "limits.sh", "#!/bin/sh\nulimit -n\nulimit -c\n")
    inetd(
        {
            "services": {
                "l": {
                    "listen": f"127.0.0.1:{port}",
                    "exec": show,
                    "rlimits": {"nofile": 64, "core": 0},
                }
            }
        }
    )
    assert tcp_talk(port).split() == [b"64", b"0"]


def test_stderr_to_file_and_null(inetd: Start, tmp_path: Path) -> None:
    port, port2 = free_port(), free_port()
    noisy = script(tmp_path, "noisy.sh", "#!/bin/sh\necho out\necho err >&2\n")
    p = inetd(
        {
            "services": {
                "f": {"listen": f"127.0.0.1:{port}", "exec": noisy, "stderr": "errors.log"},
                "n": {"listen": f"127.0.0.1:{port2}", "exec": noisy, "stderr": "null"},
            }
        }
    )
    assert tcp_talk(port) == b"out\n" and tcp_talk(port2) == b"out\n"
    p.wait_log(r"n: pid \d+ ended")
    p.wait_log(r"f: pid \d+ ended")
    assert (tmp_path / "errors.log").read_text() == "err\n"
    assert "err" not in p.log()


@root_only
def test_user_nobody_really_runs_as_nobody(inetd: Start, tmp_path: Path) -> None:
    port = free_port()
    # Inline, not a script file: pytest's tmp folders are private to root.
    show = [
        "/bin/sh",
        "-c",
        "id -u; id -g; cat /etc/shadow >/dev/null 2>&1 && echo can-read-shadow || echo denied",
    ]
    inetd(
        {
            "services": {
                "n": {"listen": f"127.0.0.1:{port}", "exec": show, "user": "nobody", "cwd": "/"}
            }
        }
    )
    nobody = pwd.getpwnam("nobody")
    assert tcp_talk(port).split() == [
        str(nobody.pw_uid).encode(),
        str(nobody.pw_gid).encode(),
        b"denied",
    ]


def test_user_switch_refused_at_load_time_when_not_root(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("as root every user is allowed")
    from pyinetd.config import ConfigError, load

    cfg = tmp_path / "inetd.yaml"
    cfg.write_text("services:\n  n: {listen: 7, user: nobody}\n")
    with pytest.raises(ConfigError) as info:
        load(cfg)
    assert "cannot switch users" in info.value.errors[0]


def test_max_connections_queue_holds_for_builtin_sessions_too(inetd: Start) -> None:
    """A built-in session counts like a child: at the limit the next client waits, it is not
    refused (the queue default), and is served when the session ends."""
    port = free_port()
    p = inetd({"services": {"e": {"listen": f"127.0.0.1:{port}", "max_connections": 1}}})
    a = hold(port)
    a.sendall(b"first")
    assert a.recv(10) == b"first"  # the session is running
    b = hold(port)
    b.sendall(b"queued")
    b.settimeout(0.3)
    with pytest.raises(TimeoutError):
        b.recv(10)
    a.close()
    b.settimeout(DEADLINE)
    assert b.recv(10) == b"queued"
    b.close()
    assert "refused" not in p.log()
