"""The keys from the rest of xinetd and inetd.conf at run time: argv0, interface (SO_BINDTODEVICE),
access_times, max_load and the socket options (issue 16)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import pytest
from conftest import Pyinetd, free_port, tcp_talk

Start = Callable[..., Pyinetd]

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
