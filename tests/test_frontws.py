"""frontws.WSConn, a front's WebSocket connection: carried by tests/fronthub.py (front.py's
loop with the parent's part in-process) for ws:// and wss://, the channel's messages (H, F, E)
and refusals before any program; and by a real front process (front.run, hardened) over the
real channel (tests/wsrig.py), through which the Autobahn|Testsuite runs against a frames-mode
/bin/cat."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import REPO, free_port, write_pki
from fronthub import Hub
from test_websocket import http, recv_until_closed, upgrade_request
from wsrig import WSRig

from pyinetd.config.wsconf import WebSocketSettings

SHARED = Path(os.environ.get("SHARED", REPO.parent / "shared"))
# The Autobahn|Testsuite runner: the shared kit's when it is beside the checkout, else the copy
# shipped in scripts/ (CI runs a clean clone).
AUTOBAHN = next(
    (p for p in (SHARED / "ws/autobahn.sh", REPO / "scripts/autobahn.sh") if p.exists()),
    REPO / "scripts/autobahn.sh",
)
ANY = WebSocketSettings(origins="any")


@pytest.fixture
def hubs() -> Iterator[list[Hub]]:
    made: list[Hub] = []
    yield made
    for hub in made:
        hub.close()


def start(hubs: list[Hub], settings: WebSocketSettings, argv: list[str], **kw: Any) -> Hub:
    hub = Hub(settings, argv, **kw)
    hubs.append(hub)
    return hub


def test_ws_lines_echo_tells_h_then_e_with_the_bytes(hubs: list[Hub]) -> None:
    hub = start(hubs, ANY, ["/bin/cat"])
    with connect(f"ws://127.0.0.1:{hub.port}/x?y=1") as ws:
        ws.send("hello")
        assert ws.recv(timeout=5) == "hello"
    (e,) = hub.wait_told("E")
    assert [k for k, _ in hub.told] == ["H", "E"]
    assert e["bytes_in"] > 0 and e["bytes_out"] > 0
    (h,) = hub.messages("H")
    assert h["env"]["QUERY_STRING"] == "y=1" and "HTTPS" not in h["env"]


def test_wss_frames_echo_with_the_tls_variables(hubs: list[Hub], tmp_path: Path) -> None:
    pki = write_pki(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki / "cert.pem", pki / "key.pem")
    hub = start(hubs, WebSocketSettings(origins="any", mode="frames"), ["/bin/cat"], ctx=ctx)
    client = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    with connect(f"wss://localhost:{hub.port}/", ssl=client) as ws:
        for message in ["text", b"\x00\xff", "é" * 5000]:
            ws.send(message)
            assert ws.recv(timeout=5) == message
    hub.wait_told("E")
    (h,) = hub.messages("H")
    assert h["env"]["HTTPS"] == "on"
    assert h["env"]["SSL_PROTOCOL"].startswith("TLSv1")


def test_a_program_exit_3_over_wss_closes_1011(hubs: list[Hub], tmp_path: Path) -> None:
    pki = write_pki(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki / "cert.pem", pki / "key.pem")
    hub = start(hubs, ANY, ["/bin/sh", "-c", "echo bye; exit 3"], ctx=ctx)
    client = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    with connect(f"wss://localhost:{hub.port}/", ssl=client) as ws:
        assert recv_until_closed(ws) == ["bye"]
        assert ws.protocol.close_rcvd is not None
        assert (ws.protocol.close_rcvd.code, ws.protocol.close_rcvd.reason) == (
            1011,
            "program exit 3",
        )


def test_a_refused_request_is_answered_and_failed_before_any_program(hubs: list[Hub]) -> None:
    hub = start(hubs, WebSocketSettings(path="/chat", origins="any"), ["/bin/cat"])
    assert http(hub.port, upgrade_request("/other"))[0] == 404
    (f,) = hub.wait_told("F")
    assert f["reason"] == "websocket: answered 404"
    assert not hub.messages("H") and not hub.spawned


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl")
def test_the_parents_refusal_is_answered_with_its_body(hubs: list[Hub]) -> None:
    refuse = {"status": 403, "reason": "deny", "body": "not from there\r\n"}
    hub = start(hubs, ANY, ["/bin/cat"], refuse=refuse)
    out = subprocess.run(
        ["curl", "-s", "-i", f"http://127.0.0.1:{hub.port}/"],
        capture_output=True,
        timeout=10,
        check=False,
    ).stdout
    assert out.startswith(b"HTTP/1.1 403 ") and out.endswith(b"\r\n\r\nnot from there\r\n")
    (f,) = hub.wait_told("F")
    assert f["reason"] == "refused: deny" and not hub.messages("H")


def test_no_program_after_h_is_answered_503_then_e(hubs: list[Hub]) -> None:
    hub = start(hubs, ANY, ["/bin/cat"], start_program=False)
    status, _body = http(hub.port, upgrade_request())
    assert status == 503
    hub.wait_told("E")
    assert [k for k, _ in hub.told] == ["H", "E"]


@pytest.mark.parametrize(
    ("reason", "status", "body"),
    [("rate", 429, b"full, come back later\r\n"), ("deny", 403, b"not from there\r\n")],
)
def test_a_refusal_at_h_is_answered_with_its_status_and_message(
    hubs: list[Hub], reason: str, status: int, body: bytes
) -> None:
    hub = start(hubs, ANY, ["/bin/cat"], start_program=False, n_reason=reason)
    assert http(hub.port, upgrade_request()) == (status, body)


def test_a_client_gone_before_its_request_is_complete_is_failed(hubs: list[Hub]) -> None:
    hub = start(hubs, ANY, ["/bin/cat"])
    with socket.create_connection(("127.0.0.1", hub.port)) as s:
        s.sendall(b"GET / HTTP/1.1\r\n")
    (f,) = hub.wait_told("F")
    assert f["reason"] == "websocket: no complete upgrade request"


@pytest.fixture
def rigs() -> Iterator[list[WSRig]]:
    made: list[WSRig] = []
    yield made
    for rig in made:
        rig.close()


def test_a_real_front_carries_ws_and_tells_x_as_the_close_code(
    rigs: list[WSRig], tmp_path: Path
) -> None:
    rig = WSRig(tmp_path, {"origins": "any"}, ["/bin/sh", "-c", "read x; echo got $x; exit 3"])
    rigs.append(rig)
    with connect(f"ws://127.0.0.1:{rig.port}/") as ws:
        ws.send("hi")
        assert recv_until_closed(ws) == ["got hi"]
        assert ws.protocol.close_rcvd is not None
        assert (ws.protocol.close_rcvd.code, ws.protocol.close_rcvd.reason) == (
            1011,
            "program exit 3",
        )
    rig.told("E")
    assert rig.kinds() == ["H", "E"]


def test_a_real_front_carries_wss(rigs: list[WSRig], tmp_path: Path) -> None:
    pki = write_pki(tmp_path)
    rig = WSRig(
        tmp_path, {"mode": "frames", "origins": "any"}, ["/bin/cat"],
        cert=pki / "cert.pem", key=pki / "key.pem",
    )  # fmt: skip
    rigs.append(rig)
    client = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    with connect(f"wss://localhost:{rig.port}/", ssl=client) as ws:
        ws.send(b"\x00\x01")
        assert ws.recv(timeout=5) == b"\x00\x01"
    (h,) = rig.told("H")
    assert h["env"]["HTTPS"] == "on" and h["env"]["SSL_PROTOCOL"].startswith("TLSv1")


@pytest.mark.parametrize(
    ("refuse", "answer", "status", "body"),
    [
        ({"status": 403, "reason": "deny", "body": "go away\n"}, "S", 403, b"go away\n"),
        (None, "rate", 429, b"busy\r\n"),
        (None, "deny", 403, b"not from there\r\n"),
    ],
)
def test_a_real_front_answers_refusals_in_http(
    rigs: list[WSRig],
    tmp_path: Path,
    refuse: dict[str, Any] | None,
    answer: str,
    status: int,
    body: bytes,
) -> None:
    rig = WSRig(tmp_path, {"origins": "any"}, ["/bin/cat"], refuse=refuse, answer=answer)
    rigs.append(rig)
    assert http(rig.port, upgrade_request()) == (status, body)
    if refuse is not None:
        (f,) = rig.told("F")
        assert f["reason"] == "refused: deny" and "H" not in rig.kinds()
    else:
        rig.told("E")
        assert rig.kinds() == ["H", "E"] and not rig.children


def _python27() -> bool:
    for c in ("python2.7", "/root/.pyenv/versions/2.7.18/bin/python"):
        try:
            probe = [c, "-c", "import sys; sys.exit(sys.version_info[0] != 2)"]
            if subprocess.run(probe, capture_output=True, timeout=10).returncode == 0:
                return True
        except (OSError, subprocess.TimeoutExpired):
            continue
    return False


@pytest.mark.skipif(
    not AUTOBAHN.exists() or not _python27(),
    reason="the Autobahn runner (scripts/autobahn.sh) needs python2.7",
)
def test_autobahn_sections_1_to_7_and_10_pass_through_a_frames_cat(
    rigs: list[WSRig], tmp_path: Path
) -> None:
    # The real front (hardened) over the real channel, /bin/cat on pipes.
    port = free_port()
    rigs.append(WSRig(tmp_path, {"mode": "frames", "origins": "any"}, ["/bin/cat"], port=port))
    r = subprocess.run(
        ["bash", str(AUTOBAHN), str(port), "1,2,3,4,5,6,7,10"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "AB_TIMEOUT": "600", "AB_AGENT": "pyinetd"},
        check=False,
    )
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-300:]
    assert r.returncode == 0 and " 0 failed" in last, r.stdout[-2000:]
