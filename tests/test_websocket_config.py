"""The `websocket:` keys: their values, the services they go with, the cross-site hijacking
warning, the load check without wsproto, and what a WebSocket program's environment gets."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Pyinetd, free_port, script

from pyinetd.config import ConfigError, load
from pyinetd.config.wsconf import WebSocketSettings
from pyinetd.spawn import environ

Start = Callable[..., Pyinetd]
SERVICE = "services:\n  chat:\n    listen: 127.0.0.1:18080\n    exec: /bin/cat\n"


def load_lines(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "inetd.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(path)
    return [line.replace(str(path), "inetd.yaml") for line in info.value.lines]


def test_the_keys_load_with_their_defaults_and_forms(tmp_path: Path) -> None:
    path = tmp_path / "inetd.yaml"
    path.write_text(
        SERVICE + "    websocket:\n      path: /chat\n      mode: frames\n"
        "      origins: [https://App.Example.com:443, 'http://localhost:8080']\n"
        "      max_message: 2M\n      max_line: 1k\n      ping_interval: 0\n"
        "      ping_timeout: 500ms\n      subprotocols: [chat.v1]\n"
        "  plain:\n    listen: 127.0.0.1:18081\n    exec: /bin/cat\n    websocket:\n"
    )
    config = load(path)
    chat, plain = config.services
    assert chat.websocket == WebSocketSettings(
        path="/chat",
        mode="frames",
        origins=("https://app.example.com", "http://localhost:8080"),
        max_message=2 << 20,
        max_line=1024,
        ping_interval=0.0,
        ping_timeout=0.5,
        subprotocols=("chat.v1",),
    )
    assert plain.websocket == WebSocketSettings()
    assert (plain.websocket.max_message, plain.websocket.max_line) == (1 << 20, 64 << 10)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("{mode: text}", "mode: 'text': expected one of lines, binary, frames"),
        ("{path: chat}", "path: 'chat': expected a URL path such as /chat"),
        ("{max_message: 0}", "max_message: 0: expected a size from 1 to 1G"),
        ("{max_line: 2G}", "max_line: '2G': expected a size from 1 to 1G"),
        ("{origins: ['ftp//x']}", "origins: 'ftp//x': expected an origin"),
        ("{ping_timeout: 0}", "ping_timeout: 0: expected a duration > 0"),
        ("{ping_interval: soon}", "ping_interval: 'soon': expected a duration"),
        ("{subprotocols: ['a b']}", "subprotocols: 'a b': expected a subprotocol name"),
        ("{pth: /x}", "pth: unknown key (did you mean 'path'?)"),
        ("[1]", "[1]: expected a mapping such as {path: /chat, mode: lines}"),
    ],
)
def test_a_bad_value_is_an_error_at_its_line_and_column(
    tmp_path: Path, body: str, message: str
) -> None:
    (line,) = load_lines(tmp_path, SERVICE + f"    websocket: {body}\n")
    assert line.startswith("inetd.yaml:5:"), line
    assert f"services.chat.websocket: {message}" in line, line


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("    redirect: 127.0.0.1:9\n", "not with redirect"),
        ("    wait: true\n", "not with wait"),
        ("    protocol: udp\n", "only for protocol tcp"),
    ],
)
def test_websocket_needs_a_program_per_connection(tmp_path: Path, extra: str, message: str) -> None:
    text = SERVICE + "    websocket: {origins: any}\n" + extra
    if "redirect" in extra:
        text = text.replace("    exec: /bin/cat\n", "")
    lines = load_lines(tmp_path, text)
    assert any(f"services.chat.websocket: {message}" in line for line in lines), lines
    builtin = "services:\n  e:\n    listen: 127.0.0.1:18080\n    websocket: {origins: any}\n"
    (line,) = load_lines(tmp_path, builtin)
    assert "inetd.yaml:4:5: services.e.websocket: not with a built-in" in line


def test_no_origins_loads_with_a_hijacking_warning_and_any_without(tmp_path: Path) -> None:
    path = tmp_path / "inetd.yaml"
    path.write_text(
        SERVICE + "    websocket: {path: /chat}\n"
        "  open:\n    listen: 127.0.0.1:18081\n    exec: /bin/cat\n"
        "    websocket: {origins: any}\n"
        "  listed:\n    listen: 127.0.0.1:18082\n    exec: /bin/cat\n"
        "    websocket: {origins: [https://a.example]}\n"
    )
    config = load(path)
    (warning,) = config.warnings
    assert warning.startswith(f"{path}:5:5: services.chat.websocket: no origins"), warning
    assert "cross-site WebSocket hijacking" in warning
    out = subprocess.run(
        [sys.executable, "-m", "pyinetd", "--check", "-c", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "cross-site WebSocket hijacking" in out.stderr
    assert "services.open" not in out.stderr and "services.listed" not in out.stderr


def test_the_load_check_does_not_import_wsproto(tmp_path: Path) -> None:
    path = tmp_path / "inetd.yaml"
    path.write_text(SERVICE + "    websocket: {mode: frames, origins: any}\n")
    code = (
        "import sys; from pyinetd.config import load, wsconf; from pyinetd.spawn import environ; "
        f"c = load({str(path)!r}); assert c.services[0].websocket.mode == 'frames'; "
        "assert not [m for m in sys.modules if m.startswith(('wsproto', 'h11'))], sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run(
        [sys.executable, "-m", "pyinetd", "--check", "-c", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr


def test_print_config_writes_the_websocket_block_back(tmp_path: Path) -> None:
    path = tmp_path / "inetd.yaml"
    path.write_text(
        SERVICE + "    websocket: {path: /c, origins: any, ping_timeout: 5s, max_line: 1k}\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "pyinetd", "--print-config", "-c", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    again = tmp_path / "again.yaml"
    again.write_text(out)
    assert load(again).services[0].websocket == load(path).services[0].websocket


# ---------------------------------------------------------------- stdout buffering


def test_a_websocket_service_gets_pythonunbuffered_unless_its_env_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)  # (pyinetd's own: not the test's)
    path = tmp_path / "inetd.yaml"
    path.write_text(
        SERVICE + "    websocket: {origins: any}\n"
        "  own:\n    listen: 127.0.0.1:18081\n    exec: /bin/cat\n"
        "    websocket: {origins: any}\n    env: {PYTHONUNBUFFERED: ''}\n"
        "  tcp:\n    listen: 127.0.0.1:18082\n    exec: /bin/cat\n"
    )
    chat, own, tcp = load(path).services
    assert environ.service_environ(chat)[b"PYTHONUNBUFFERED"] == b"1"
    assert environ.service_environ(own)[b"PYTHONUNBUFFERED"] == b""
    assert b"PYTHONUNBUFFERED" not in environ.service_environ(tcp)


def test_a_warm_websocket_services_child_writes_stdout_unbuffered(
    inetd: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)  # pyinetd starts without it
    # The script prints without flushing and waits for input: a buffered stdout would hold
    # the line until the script's exit, and the client would read nothing first.
    prog = script(
        tmp_path,
        "hello.py",
        f"#!{sys.executable}\nimport sys\nprint('ready', sys.stdout.write_through)\n"
        "sys.stdin.readline()\n",
    )
    port = free_port()
    p = inetd(
        {
            "services": {
                "w": {
                    "listen": f"127.0.0.1:{port}",
                    "exec": [prog],
                    "warm": True,
                    "websocket": {"origins": "any"},
                }
            }
        }
    )
    p.wait_log(r"zygote \d+ ready")
    from websockets.sync.client import connect

    with connect(f"ws://127.0.0.1:{port}/", open_timeout=10) as ws:
        # the line comes before the script reads: nothing held it in a buffer
        assert ws.recv(timeout=10) == "ready True"


def test_each_admission_refusal_has_its_http_answer() -> None:
    from pyinetd.config import wsconf
    from pyinetd.runtime import admission

    got = {
        r.value: wsconf.refusal(r.value, "not you\r\n", "")
        for r in admission.Refusal
        if wsconf.refusal(r.value, "not you\r\n", "") is not None
    }
    assert {k: v["status"] for k, v in got.items()} == {
        "deny": 403,
        "access_times": 403,
        "limit": 503,
        "max_children": 503,
        "max_load": 503,
        "per_source": 429,
        "rate": 429,
    }
    assert got["deny"]["body"] == "not you\r\n" and got["rate"]["body"] == "too many requests\n"
    assert wsconf.refusal("proxy", "", "") is None
