"""The keys from the rest of xinetd and inetd.conf at run time: argv0, interface (SO_BINDTODEVICE),
access_times, max_load and the socket options (issue 16)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import DEADLINE, Pyinetd, free_port, script, tcp_talk

Start = Callable[..., Pyinetd]

# What the program sees of its connection: fd 0 is the accepted socket.
SHOW_SOCKET = f"""#!{sys.executable}
import socket, sys
s = socket.socket(fileno=0)
o = s.getsockopt
print(sys.argv[0], o(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
      o(socket.IPPROTO_TCP, socket.TCP_NODELAY), o(socket.SOL_SOCKET, socket.SO_SNDBUF),
      o(socket.SOL_SOCKET, socket.SO_RCVBUF), o(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16),
      flush=True)
s.detach()
"""


# argv[0] as the program got it (an interpreter's script would see its own path instead).
SHOW_ARGV0 = [sys.executable, "-c", "print(open('/proc/self/cmdline').read().split(chr(0))[0])"]


@pytest.mark.parametrize("settings", [{}, {"umask": "022"}], ids=["spawned", "forked"])
def test_argv0_is_what_the_program_sees_as_argv0(inetd: Start, settings: dict[str, str]) -> None:
    port = free_port()
    svc = {"listen": f"127.0.0.1:{port}", "exec": SHOW_ARGV0, "argv0": "applet", **settings}
    inetd({"services": {"s": svc}})
    assert tcp_talk(port) == b"applet\n"


@pytest.mark.skipif(not os.path.exists("/bin/busybox"), reason="no busybox")
def test_busybox_runs_the_applet_argv0_names(inetd: Start) -> None:
    # Issue 16: `/bin/busybox httpd -i` (inetd.conf) lost its applet; argv0 gives it back.
    port = free_port()
    svc = {"listen": f"127.0.0.1:{port}", "exec": ["/bin/busybox", "hello"], "argv0": "echo"}
    inetd({"services": {"s": svc}})
    assert tcp_talk(port) == b"hello\n"


def test_socket_options_reach_the_accepted_connection(inetd: Start, tmp_path: Path) -> None:
    show = script(tmp_path, "show.py", SHOW_SOCKET)
    port = free_port()
    svc = {"listen": f"127.0.0.1:{port}", "exec": [show], "keepalive": True, "nodelay": True,
           "send_buffer": "64k", "receive_buffer": 32768, "interface": "lo"}  # fmt: skip
    plain = {"listen": f"127.0.0.1:{(other := free_port())}", "exec": [show]}
    inetd({"services": {"s": svc, "plain": plain}})
    _argv0, keepalive, nodelay, sndbuf, rcvbuf, device = tcp_talk(port).split()
    # The kernel doubles the buffer sizes it is given (socket(7)).
    assert (keepalive, nodelay, sndbuf, rcvbuf) == (b"1", b"1", b"131072", b"65536")
    assert device.startswith(b"b'lo")
    _, keepalive, nodelay, *_ = tcp_talk(other).split()
    assert (keepalive, nodelay) == (b"0", b"0")


def other_interface() -> str | None:
    names = [name for _, name in socket.if_nameindex() if name != "lo"]
    return names[0] if names else None


def test_interface_refuses_what_arrives_on_another_interface(inetd: Start) -> None:
    # A connection to 127.0.0.1 arrives on lo: a service bound to another interface does not
    # see it, one bound to lo does (xinetd's bind = lo, issue 16).
    iface = other_interface()
    if iface is None:
        pytest.skip("no network interface but lo")
    on_lo, elsewhere = free_port(), free_port()
    inetd({"services": {
        "lo": {"listen": f"0.0.0.0:{on_lo}", "builtin": "echo", "interface": "lo"},
        "other": {"listen": f"0.0.0.0:{elsewhere}", "builtin": "echo", "interface": iface},
    }})  # fmt: skip
    assert tcp_talk(on_lo, b"hi\n") == b"hi\n"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", elsewhere), timeout=5).close()


def test_an_interface_that_does_not_exist_is_a_start_error(tmp_path: Path) -> None:
    # Known at bind (ENODEV), not at --check: an interface may come up after pyinetd's config.
    path = tmp_path / "inetd.yaml"
    path.write_text(f"services:\n  s: {{listen: {free_port()}, interface: nosuch0}}\n")
    out = subprocess.run(
        [sys.executable, "-m", "pyinetd", "-c", str(path)],
        capture_output=True, text=True, timeout=DEADLINE,
    )  # fmt: skip
    assert out.returncode == 1
    assert "services.s.interface: nosuch0: no such network interface" in out.stderr


def test_a_reload_gives_a_kept_listener_the_new_options(inetd: Start, tmp_path: Path) -> None:
    # The listener survives the reload (same address): its options must still follow the file.
    show = script(tmp_path, "show.py", SHOW_SOCKET)
    port = free_port()
    svc: dict[str, object] = {"listen": f"127.0.0.1:{port}", "exec": [show]}
    p = inetd({"services": {"s": svc}})
    assert tcp_talk(port).split()[1:3] == [b"0", b"0"]
    p.path.write_text(json.dumps({"services": {"s": {**svc, "keepalive": True, "nodelay": True}}}))
    p.signal(signal.SIGHUP)
    p.wait_log(r"reloaded")
    assert tcp_talk(port).split()[1:3] == [b"1", b"1"]


def window(offset_min: int, length_min: int) -> str:
    now = time.localtime()
    start = (now.tm_hour * 60 + now.tm_min + offset_min) % 1440
    end = (start + length_min) % 1440
    return f"{start // 60:02}:{start % 60:02}-{end // 60:02}:{end % 60:02}"


def test_access_times_refuse_outside_the_window(inetd: Start) -> None:
    open_now, closed_now = free_port(), free_port()
    p = inetd({"services": {
        "open": {"listen": f"127.0.0.1:{open_now}", "builtin": "echo",
                 "access_times": window(-60, 120)},
        "closed": {"listen": f"127.0.0.1:{closed_now}", "builtin": "echo",
                   "access_times": f"{window(120, 60)} {window(-300, 60)}",
                   "deny_message": "closed now\n"},
    }})  # fmt: skip
    assert tcp_talk(open_now, b"hi\n") == b"hi\n"
    assert tcp_talk(closed_now) == b"closed now\n"
    p.wait_log(r"closed: refused .*: access_times")


def test_max_load_refuses_while_the_load_is_above_it(inetd: Start) -> None:
    if os.getloadavg()[0] < 0.05:
        pytest.skip("the machine is idle: its load is below any useful max_load")
    low, high = free_port(), free_port()
    p = inetd({"services": {
        "low": {"listen": f"127.0.0.1:{low}", "builtin": "echo", "max_load": 0.01,
                "busy_message": "busy\n"},
        "high": {"listen": f"127.0.0.1:{high}", "builtin": "echo", "max_load": 10000},
    }})  # fmt: skip
    assert tcp_talk(high, b"hi\n") == b"hi\n"
    assert tcp_talk(low) == b"busy\n"
    p.wait_log(r"low: refused .*: max_load")
