"""websocket.Session with real clients (the `websockets` library, raw frames over a socket,
curl) against tests/wsloop.py, which drives the session as the front does with a real program
on pipes; and wsconf's environment check, which the parent applies to what a front sends."""

from __future__ import annotations

import base64
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wsloop import Server, serving

from pyinetd.config import wsconf
from pyinetd.config.wsconf import WebSocketSettings
from pyinetd.protocols.websocket import Phase

ANY = WebSocketSettings(origins="any")
CAT = ["/bin/cat"]


def ws_url(srv: Server, path: str = "/") -> str:
    return f"ws://127.0.0.1:{srv.port}{path}"


def sh(script: str) -> list[str]:
    return ["/bin/sh", "-c", script]


def close_code(ws: ClientConnection) -> int | None:
    """The code of the Close the server sent (None: none came)."""
    rcvd = ws.protocol.close_rcvd
    return None if rcvd is None else int(rcvd.code)


def recv_until_closed(ws: ClientConnection, timeout: float = 10.0) -> list[str | bytes]:
    got: list[str | bytes] = []
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            got.append(ws.recv(timeout=max(0.01, end - time.monotonic())))
    except ConnectionClosed:
        return got
    raise AssertionError(f"not closed within {timeout} s; got {got!r}")


# ---------------------------------------------------------------- raw frames


def upgrade_request(path: str = "/", extra: str = "", host: str = "127.0.0.1") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode("latin-1")


def http(port: int, request: bytes) -> tuple[int, bytes]:
    """Send a raw request; the status and body of the answer, read to the server's close."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A masked client frame (RFC 6455 5.2)."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def read_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def read_frame(s: socket.socket) -> tuple[int, bytes]:
    b0, b1 = read_exactly(s, 2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", read_exactly(s, 2))
    elif n == 127:
        (n,) = struct.unpack("!Q", read_exactly(s, 8))
    return b0 & 0x0F, read_exactly(s, n)


def raw_client(srv: Server, path: str = "/") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    s.sendall(upgrade_request(path))
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += read_exactly(s, 1)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return s


def read_close(s: socket.socket) -> int:
    while True:
        op, payload = read_frame(s)
        if op == 0x8:
            return int(struct.unpack("!H", payload[:2])[0]) if payload else 1005


# ---------------------------------------------------------------- modes


def test_lines_mode_echoes_a_text_message_as_a_line_and_a_newline_makes_two() -> None:
    with serving(ANY, CAT) as srv:
        with connect(ws_url(srv)) as ws:
            ws.send("hello")
            assert ws.recv(timeout=5) == "hello"
            ws.send("a\nb")
            assert [ws.recv(timeout=5), ws.recv(timeout=5)] == ["a", "b"]
        one = srv.last()
        assert bytes(one.program_input) == b"hello\na\nb\n"


def test_lines_mode_sends_the_last_line_without_a_newline_then_1000() -> None:
    with serving(ANY, sh("printf 'one\\r\\ntwo\\nthree'")) as srv, connect(ws_url(srv)) as ws:
        assert recv_until_closed(ws) == ["one", "two", "three"]
        assert close_code(ws) == 1000


def test_lines_mode_sends_a_long_line_in_pieces_and_non_utf8_as_binary() -> None:
    settings = WebSocketSettings(origins="any", max_line=4)
    # 'é' is two bytes: the piece 'abcé' would cut it; 'abc' is sent, then 'éde'.
    output = sh("printf 'abcdefghij\\nabc\\303\\251de\\n\\377\\376\\n'")
    with serving(settings, output) as srv, connect(ws_url(srv)) as ws:
        assert recv_until_closed(ws) == ["abcd", "efgh", "ij", "abc", "éde", b"\xff\xfe"]


def test_lines_mode_closes_with_1003_on_a_binary_message() -> None:
    with serving(ANY, CAT) as srv, connect(ws_url(srv)) as ws:
        ws.send(b"\x00")
        recv_until_closed(ws)
        assert close_code(ws) == 1003


def test_binary_mode_is_a_byte_stream_each_read_one_message() -> None:
    settings = WebSocketSettings(origins="any", mode="binary")
    blob = os.urandom(200_000)
    with serving(settings, CAT) as srv, connect(ws_url(srv), max_size=None) as ws:
        ws.send(blob)
        got = b""
        while len(got) < len(blob):
            part = ws.recv(timeout=5)
            assert isinstance(part, bytes) and len(part) <= 65536
            got += part
        assert got == blob


def test_frames_mode_echoes_exact_types_and_boundaries_through_cat() -> None:
    settings = WebSocketSettings(origins="any", mode="frames")
    with serving(settings, CAT) as srv:
        with connect(ws_url(srv)) as ws:
            for message in ["", "text\nwith newline", b"", b"\x00\n\xff", "é" * 1000]:
                ws.send(message)
                assert ws.recv(timeout=5) == message
            ws.send(["frag", "mented"])  # one message in two frames: one record
            assert ws.recv(timeout=5) == "fragmented"
        one = srv.last()
        assert bytes(one.program_input).startswith(b"text 0\ntext 17\ntext\nwith newline")
        assert b"text 10\nfragmented" in one.program_input


@pytest.mark.parametrize(
    "output",
    ["junk\\n", "text 5\\nab", "text -1\\n", "text 2\\n\\377\\376", "binary 2000000\\n"],
)
def test_frames_mode_closes_with_1011_on_a_malformed_record(output: str) -> None:
    settings = WebSocketSettings(origins="any", mode="frames")
    with serving(settings, sh(f"printf '{output}'; sleep 5")) as srv:
        with connect(ws_url(srv)) as ws:
            assert recv_until_closed(ws) == []
            assert close_code(ws) == 1011
        assert any("closing with 1011" in line for line in srv.last().log)


# ---------------------------------------------------------------- close codes


@pytest.mark.parametrize(
    ("script", "code", "reason"),
    [
        ("exit 0", 1000, ""),
        ("exit 3", 1011, "program exit 3"),
        ("kill -9 $$", 1011, "program killed by signal 9"),
    ],
)
def test_the_programs_end_gives_the_close_code(script: str, code: int, reason: str) -> None:
    with serving(ANY, sh(script)) as srv, connect(ws_url(srv)) as ws:
        recv_until_closed(ws)
        assert close_code(ws) == code
        assert ws.protocol.close_rcvd is not None
        assert ws.protocol.close_rcvd.reason == reason


def test_a_client_close_is_answered_at_once_with_its_code_then_stdin_ends() -> None:
    # The program would run 30 s unless its stdin ended: cat ends at EOF.
    with serving(ANY, CAT) as srv:
        with connect(ws_url(srv)) as ws:
            ws.send("x")
            assert ws.recv(timeout=5) == "x"
            t0 = time.monotonic()
            ws.close(code=4000, reason="bye")
            assert close_code(ws) == 4000
            assert time.monotonic() - t0 < 2
        one = srv.last()
        assert one.proc is not None and one.proc.wait(5) == 0


def test_invalid_utf8_from_the_client_closes_with_1007() -> None:
    with serving(ANY, CAT) as srv, raw_client(srv) as s:
        s.sendall(frame(0x1, b"ok \xff\xfe"))
        assert read_close(s) == 1007


def test_a_protocol_error_closes_with_1002() -> None:
    with serving(ANY, CAT) as srv, raw_client(srv) as s:
        s.sendall(frame(0x3, b"reserved opcode"))
        assert read_close(s) == 1002


def test_a_10_mib_message_to_a_1m_service_closes_1009_without_holding_it() -> None:
    settings = WebSocketSettings(origins="any", max_message=1 << 20, mode="frames")
    size, chunk = 10 << 20, os.urandom(65536)
    with serving(settings, CAT) as srv, raw_client(srv) as s:
        mask = b"\x00\x00\x00\x00"  # the payload is its own masked form
        s.sendall(bytes([0x82, 0x80 | 127]) + struct.pack("!Q", size) + mask)
        tracemalloc.start()
        try:
            sent = 0
            try:
                while sent < size:
                    s.sendall(chunk)
                    sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass  # closed by the server after its Close: fine
            code = read_close(s)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert code == 1009
        # The server kept at most a read or so of it (and never wrote any to the program).
        assert peak < 2 << 20, peak
        assert len(srv.last().program_input) == 0


def test_a_client_that_answers_no_ping_is_closed_and_its_program_ended() -> None:
    settings = WebSocketSettings(origins="any", ping_interval=0.2, ping_timeout=0.3)
    with serving(settings, ["/bin/sleep", "60"]) as srv, raw_client(srv) as s:
        op, _payload = read_frame(s)
        assert op == 0x9  # a ping; never answered (a client gone without a FIN)
        t0 = time.monotonic()
        one = srv.last(timeout=10)
        assert time.monotonic() - t0 < 5
        assert one.session is not None and one.session.end_program
        assert any("no pong" in line for line in one.log)
        assert one.proc is not None and one.proc.wait(5) != 0  # ended by its SIGTERM


def test_a_client_that_answers_pings_stays_and_client_pings_are_answered() -> None:
    settings = WebSocketSettings(origins="any", ping_interval=0.1, ping_timeout=0.5)
    with serving(settings, CAT) as srv:
        with connect(ws_url(srv)) as ws:
            assert ws.ping(b"p").wait(5)
            end = time.monotonic() + 1.5
            while time.monotonic() < end:  # the client library answers the server's pings
                ws.send("still here")
                assert ws.recv(timeout=5) == "still here"
        assert srv.served[-1].session is not None
        assert srv.last().session.close_code != 1006  # type: ignore[union-attr]


# ---------------------------------------------------------------- the handshake


def test_refusals_are_http_answers_before_any_program() -> None:
    settings = WebSocketSettings(path="/chat", origins=("https://app.example.com",))
    with serving(settings, CAT) as srv:
        port = srv.port
        plain = b"GET /chat HTTP/1.1\r\nHost: x\r\n\r\n"
        assert http(port, plain)[0] == 426
        assert http(port, upgrade_request("/other"))[0] == 404
        assert http(port, upgrade_request("/chat", "Origin: https://evil.example\r\n"))[0] == 403
        assert http(port, b"POST /chat HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 405
        assert http(port, b"GET /chat HTTP/1.1\r\nHost: x\r\n bad fold\r\n\r\n")[0] == 400
        big = upgrade_request("/chat", "X-Big: " + "a" * 20000 + "\r\n")
        assert http(port, big)[0] == 431
        many = upgrade_request("/chat", "".join(f"X-{i}: y\r\n" for i in range(70)))
        assert http(port, many)[0] == 431
        ok = upgrade_request("/chat", "Origin: https://APP.example.com:443\r\n")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(ok)
            assert s.recv(100).startswith(b"HTTP/1.1 101 ")
        time.sleep(0)  # (the connections end as they close)
        started = [one for one in srv.served if one.proc is not None]
        assert len(started) == 1, [one.log for one in srv.served]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl")
def test_curl_sees_426_and_the_parents_refusal_with_its_body() -> None:
    with serving(ANY, CAT) as srv:
        out = subprocess.run(
            ["curl", "-s", "-i", f"http://127.0.0.1:{srv.port}/"],
            capture_output=True,
            timeout=10,
            check=False,
        ).stdout
        assert out.startswith(b"HTTP/1.1 426 ") and b"Upgrade: websocket" in out
    with serving(ANY, CAT, refuse=(403, "go away\n")) as srv:
        out = subprocess.run(
            ["curl", "-s", "-i", f"http://127.0.0.1:{srv.port}/"],
            capture_output=True,
            timeout=10,
            check=False,
        ).stdout
        assert out.startswith(b"HTTP/1.1 403 ") and out.endswith(b"\r\n\r\ngo away\n")
        assert srv.last().proc is None


def test_the_parents_refusal_stands_for_a_good_upgrade_request() -> None:
    with serving(ANY, CAT, refuse=(429, "busy\n")) as srv:
        assert http(srv.port, upgrade_request()) == (429, b"busy\n")
        assert srv.last().proc is None


def test_an_incomplete_request_is_closed_at_its_deadline_without_a_program() -> None:
    with serving(ANY, CAT, deadline=0.3) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            t0 = time.monotonic()
            assert s.recv(100) == b""
            assert time.monotonic() - t0 < 5
        one = srv.last()
        assert one.proc is None and one.session is not None
        assert one.session.phase is Phase.CLOSED


def test_same_origin_allows_the_hosts_own_page_only() -> None:
    settings = WebSocketSettings(origins=(), same_origin=True)
    with serving(settings, CAT) as srv:
        own = upgrade_request("/", "Origin: http://app.test:8080\r\n", host="app.test:8080")
        other = upgrade_request("/", "Origin: http://evil.test:8080\r\n", host="app.test:8080")
        assert http(srv.port, other)[0] == 403
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(own)
            assert s.recv(100).startswith(b"HTTP/1.1 101 ")


def test_a_subprotocol_is_chosen_in_our_order_and_passed_on() -> None:
    settings = WebSocketSettings(origins="any", subprotocols=("chat.v2", "chat.v1"))
    offered = ["chat.v1", "chat.v2"]
    with (
        serving(settings, sh("echo $WEBSOCKET_SUBPROTOCOL")) as srv,
        connect(ws_url(srv), subprotocols=offered) as ws,  # type: ignore[arg-type]
    ):
        assert ws.subprotocol == "chat.v2"
        assert recv_until_closed(ws) == ["chat.v2"]


# ---------------------------------------------------------------- the environment


def test_the_environment_has_websocketds_names_and_only_safe_headers() -> None:
    settings = WebSocketSettings(origins="any", path="/app")
    with (
        serving(settings, ["/usr/bin/env"]) as srv,
        socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s,
    ):
        extra = (
            "X-Trace: abc\r\nX-Trace: def\r\nProxy: http://evil:3128\r\n"
            "X_Forwarded_For: 6.6.6.6\r\nX-Ctl: a\x01b\r\nX-Long: " + "z" * 5000 + "\r\n"
        )
        s.sendall(upgrade_request("/app?room=1&x=%20", extra, host="example.test:8443"))
        while s.recv(65536):
            pass
        one = srv.last()
    env = one.env
    assert env["GATEWAY_INTERFACE"] == "websocketd-CGI/0.1"
    assert env["SERVER_SOFTWARE"].startswith("pyinetd/")
    assert env["REMOTE_ADDR"] == env["REMOTE_HOST"] == "127.0.0.1"
    assert env["REMOTE_PORT"].isdigit()
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == ("example.test", "8443")
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1" and env["REQUEST_METHOD"] == "GET"
    assert env["REQUEST_URI"] == "/app?room=1&x=%20"
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("/app", "")
    assert env["QUERY_STRING"] == "room=1&x=%20"
    assert env["HTTP_HOST"] == "example.test:8443"
    assert env["HTTP_X_TRACE"] == "abc, def"
    assert env["HTTP_SEC_WEBSOCKET_VERSION"] == "13"
    assert "HTTPS" not in env and "WEBSOCKET_SUBPROTOCOL" not in env
    for gone in ("HTTP_SEC_WEBSOCKET_KEY", "HTTP_CONNECTION", "HTTP_UPGRADE", "HTTP_PROXY"):
        assert gone not in env
    assert "HTTP_X_FORWARDED_FOR" not in env  # X_Forwarded_For: never as X-Forwarded-For
    assert "HTTP_X_CTL" not in env and "HTTP_X_LONG" not in env
    assert any("HTTP_X_CTL" in line and "HTTP_X_LONG" in line for line in one.log), one.log
    assert wsconf.check_environment(env) == []


def test_the_parent_refuses_an_environment_past_the_bounds() -> None:
    good = {"GATEWAY_INTERFACE": "websocketd-CGI/0.1", "HTTP_X": "y", "SSL_PROTOCOL": "TLSv1.3"}
    assert wsconf.check_environment(good) == []
    for bad in (
        {"LD_PRELOAD": "/tmp/x.so"},
        {"HTTP_PROXY": "http://evil:3128"},
        {"HTTP_X": "a\nb"},
        {"HTTP_X": "é"},
        {"HTTP_X": "a" * 5000},
        {"http_x": "y"},
        {f"HTTP_X{i}": "y" for i in range(100)},
        {f"HTTP_X{i}": "y" * 4000 for i in range(8)},
        {"HTTP_X": 1},
        ["HTTP_X"],
    ):
        assert wsconf.check_environment(bad), bad


def test_headers_past_the_channels_bounds_are_left_out_and_the_rest_passes() -> None:
    # 45 headers of 300 bytes: more than one `H` record holds; the session keeps what fits
    # (SSL_* first), logs the rest, and the parent's check passes what it sends.
    extra = "".join(f"X-H{i}: {'v' * 300}\r\n" for i in range(45))
    tls = {"SSL_PROTOCOL": "TLSv1.3", "SSL_CIPHER": "x" * 200}
    for tls_env in (None, tls):
        with serving(ANY, ["/usr/bin/env"], tls_env=tls_env) as srv:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
                s.sendall(upgrade_request("/", extra))
                while s.recv(65536):
                    pass
            one = srv.last()
        env = one.env
        assert "HTTP_X_H0" in env and "HTTP_X_H44" not in env
        assert wsconf.check_environment(env) == []
        assert wsconf.env_size(env) <= wsconf.MAX_ENV_JSON
        assert any("HTTP_X_H44" in line for line in one.log)
        assert env.get("SSL_PROTOCOL") == (tls_env or {}).get("SSL_PROTOCOL")


def test_the_shipped_example_greets_and_answers_each_message() -> None:
    example = Path(__file__).resolve().parent.parent / "services" / "wsroom.py"
    settings = WebSocketSettings(path="/room", origins=("http://localhost:8080",))
    with (
        serving(settings, [sys.executable, str(example)]) as srv,
        connect(ws_url(srv, "/room?name=ada"), origin="http://localhost:8080") as ws,  # type: ignore[arg-type]
    ):
        assert ws.recv(timeout=5) == "hello 127.0.0.1 (name=ada)"
        ws.send("abc")
        assert ws.recv(timeout=5) == "3 ABC"


def test_bytes_after_the_closing_handshake_in_the_same_read_are_dropped() -> None:
    # A Close and then 100 KiB more handed over in one call (a front reading more than 64 KiB
    # at once): the rest must not reach wsproto after the close (it raises there).
    from pyinetd.protocols.websocket import Session

    s = Session(ANY, peer=("127.0.0.1", 1), now=0.0, deadline=10.0)
    s.receive_client(upgrade_request())
    assert s.phase is Phase.UPGRADE
    s.accept()
    s.receive_client(frame(0x8, struct.pack("!H", 1000)) + frame(0x1, b"x" * 100_000))
    assert s.phase is Phase.CLOSED and s.close_code == 1000
    assert s.to_client().endswith(b"\x88\x02\x03\xe8")  # our Close, code 1000


# ---------------------------------------------------------------- nothing a peer sends raises


@settings(max_examples=300, deadline=None)
@given(
    mode=st.sampled_from(["lines", "binary", "frames"]),
    head=st.booleans(),
    chunks=st.lists(st.binary(max_size=300), max_size=8),
    program=st.lists(st.binary(max_size=200), max_size=6),
    ends=st.permutations(["client_eof", "program_eof", "exit", "tick"]),
)
def test_no_bytes_from_the_client_or_the_program_make_the_session_raise(
    mode: str, head: bool, chunks: list[bytes], program: list[bytes], ends: list[str]
) -> None:
    # One front carries every connection of its service: an exception here would end them all.
    from pyinetd.protocols.websocket import Session

    ws = WebSocketSettings(origins="any", mode=mode, max_message=64, max_line=16)
    s = Session(ws, peer=("127.0.0.1", 1), now=0.0, deadline=10.0)
    if head:
        s.receive_client(upgrade_request())
        s.accept()
    masked = [frame(c[0] & 0x0F, c[1:], fin=bool(c[0] & 0x80)) if c else b"" for c in chunks]
    for i, data in enumerate(masked + chunks):
        s.receive_client(data)
        if i < len(program):
            s.receive_program(program[i])
        s.to_client(), s.to_program()
    for end in ends:
        if end == "client_eof":
            s.client_eof()
        elif end == "program_eof":
            s.program_eof()
        elif end == "exit":
            s.program_exit(0, None)
        else:
            s.tick(100.0)
        s.to_client(), s.to_program()
    s.tick(200.0)
    assert s.phase is Phase.CLOSED
