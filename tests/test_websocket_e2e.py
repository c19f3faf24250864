"""WebSocket services end to end through pyinetd itself: the parent hands each connection to the
service's front, which reads the upgrade with no process; the program starts at the front's `H`
as an exec service's child. Real clients: the `websockets` library and curl."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Pyinetd, free_port, script
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

Start = Callable[..., Pyinetd]


def _children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def test_lines_mode_echoes_and_sees_the_cgi_environment(inetd: Start, tmp_path: Path) -> None:
    prog = script(
        tmp_path,
        "env.py",
        f"#!{sys.executable}\nimport os, sys\n"
        "print(os.environ['REQUEST_URI'], os.environ['QUERY_STRING'], os.environ['REMOTE_ADDR'],"
        " os.environ.get('HTTP_X_HELLO', '-'), os.environ['TCPREMOTEIP'])\n"
        "for line in sys.stdin:\n    print('got', line.strip())\n",
    )
    port = free_port()
    inetd({"services": {"w": {"listen": f"127.0.0.1:{port}", "exec": [prog],
                              "websocket": {"path": "/chat", "origins": "any"}}}})  # fmt: skip
    headers = {"X-Hello": "there"}
    with connect(f"ws://127.0.0.1:{port}/chat?a=1", additional_headers=headers) as ws:
        assert ws.recv(timeout=10) == "/chat?a=1 a=1 127.0.0.1 there 127.0.0.1"
        ws.send("ping")
        assert ws.recv(timeout=10) == "got ping"


def test_frames_mode_cat_is_an_exact_echo_and_exit_0_closes_1000(inetd: Start) -> None:
    port = free_port()
    inetd({"services": {"w": {"listen": f"127.0.0.1:{port}", "exec": ["/bin/cat"],
                              "websocket": {"mode": "frames", "origins": "any"}}}})  # fmt: skip
    with connect(f"ws://127.0.0.1:{port}/") as ws:
        ws.send(b"\x00\x01binary\n")
        assert ws.recv(timeout=10) == b"\x00\x01binary\n"
        ws.send("text with\nnewline")
        assert ws.recv(timeout=10) == "text with\nnewline"


def test_a_program_that_exits_3_closes_1011(inetd: Start) -> None:
    port = free_port()
    inetd({"services": {"w": {"listen": f"127.0.0.1:{port}",
                              "exec": ["/bin/sh", "-c", "echo bye; exit 3"],
                              "websocket": {"origins": "any"}}}})  # fmt: skip
    with connect(f"ws://127.0.0.1:{port}/") as ws:
        assert ws.recv(timeout=10) == "bye"
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=10)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1011


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_refusals_are_http_answers_before_any_program(inetd: Start, tmp_path: Path) -> None:
    marker = tmp_path / "started"
    port, denied = free_port(), free_port()
    p = inetd(
        {
            "services": {
                "w": {"listen": f"127.0.0.1:{port}", "exec": ["/bin/sh", "-c", f"touch {marker}"],
                      "websocket": {"path": "/ok", "origins": ["https://good.example"]}},
                "d": {"listen": f"127.0.0.1:{denied}", "exec": ["/bin/sh", "-c", f"touch {marker}"],
                      "deny": ["127.0.0.0/8"], "deny_message": "not you",
                      "websocket": {"origins": "any"}},
            }
        }
    )  # fmt: skip

    def curl(url: str, *headers: str) -> tuple[str, str]:
        args = ["curl", "-s", "-m", "10", "-o", "-", "-w", "\n%{http_code}", url]
        for h in headers:
            args += ["-H", h]
        out = subprocess.run(args, capture_output=True, text=True, timeout=20).stdout
        body, _, code = out.rpartition("\n")
        return code, body

    upgrade = ("Connection: Upgrade", "Upgrade: websocket", "Sec-WebSocket-Version: 13",
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==")  # fmt: skip
    assert curl(f"http://127.0.0.1:{port}/ok")[0] == "426"  # not a WebSocket request
    assert curl(f"http://127.0.0.1:{port}/other", *upgrade)[0] == "404"
    assert curl(f"http://127.0.0.1:{port}/ok", *upgrade, "Origin: https://evil.example")[0] == "403"
    code, body = curl(f"http://127.0.0.1:{denied}/", *upgrade)
    assert code == "403" and "not you" in body
    assert not marker.exists()  # no program ran for any of them
    p.wait_log(r"refused")


def test_a_websocket_connection_waits_for_its_upgrade_with_no_process(inetd: Start) -> None:
    port = free_port()
    p = inetd({"services": {"w": {"listen": f"127.0.0.1:{port}", "exec": ["/bin/cat"],
                                  "websocket": {"origins": "any"}}}})  # fmt: skip
    with connect(f"ws://127.0.0.1:{port}/") as ws:  # the front is up
        ws.send("x")
        assert ws.recv(timeout=10) == "x"
    before = 1  # the service's one front (fronts: 1)
    idle = [
        socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(10)
    ]  # (under max_pending_per_source)
    try:
        for s in idle:
            s.sendall(b"GET / HTTP/1.1\r\n")  # half a request head, then nothing
        # every request head is in the front (the last one's too: a connection after them
        # is answered), and no process was started for any
        with connect(f"ws://127.0.0.1:{port}/") as ws:
            ws.send("y")
            assert ws.recv(timeout=10) == "y"
        # the round trip's own program ends after its client's close; then only the front
        # (and no process for the ten heads) is left
        deadline = time.monotonic() + 10
        while len(_children_of(p.proc.pid)) > before and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(_children_of(p.proc.pid)) <= before
    finally:
        for s in idle:
            s.close()


def test_stalled_upgrade_heads_from_one_address_are_bounded_by_max_pending_per_source(
    inetd: Start,
) -> None:
    # One client opens connections that send half a request head and stall: each costs an fd
    # in the front and no process; past max_pending_per_source the next is refused at once.
    port = free_port()
    p = inetd({"max_pending_per_source": 4,
               "services": {"w": {"listen": f"127.0.0.1:{port}", "exec": ["/bin/cat"],
                                  "websocket": {"origins": "any"}}}})  # fmt: skip
    stalled = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(4)]
    try:
        for s in stalled:
            s.sendall(b"GET / HTTP/1.1\r\n")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as extra:
            extra.sendall(b"GET / HTTP/1.1\r\n")
            try:
                got = extra.recv(100)
            except ConnectionResetError:  # closed with our bytes unread: RST
                got = b""
            assert got == b""  # refused: pending_per_source
        p.wait_log(r"w: refused 127\.0\.0\.1:\d+: pending_per_source")
        assert len(_children_of(p.proc.pid)) == 1  # the front alone
    finally:
        for s in stalled:
            s.close()
