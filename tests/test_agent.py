"""HAProxy's agent-check (`agent:`), `pyinetd drain` / `undrain`, the stop that drains the
balancer first, and a connection waiting for its PROXY header holding its max_connections
place. The 3-node cluster (network namespaces, kill -9, SIGTERM with retries 0) is
bench/agent_cluster.py (docs/operations.md)."""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import (
    DEADLINE,
    Pyinetd,
    closed_by_server,
    free_port,
    idle_connections,
    status_of,
    tcp_listening,
    tcp_talk,
    wait_for,
)

Start = Callable[..., Pyinetd]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyinetd", *args], capture_output=True, text=True, timeout=DEADLINE
    )


def ask(port: int, line: bytes, host: str = "127.0.0.1") -> str:
    """One agent-check as HAProxy makes it: connect, send the agent-send string, read a line."""
    with socket.create_connection((host, port), timeout=DEADLINE) as s:
        s.sendall(line)
        data = b""
        while chunk := s.recv(512):
            data += chunk
    assert data.endswith(b"\n") and data.count(b"\n") == 1, data
    return data.decode().rstrip("\n")


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=DEADLINE) as r:
        text: str = r.read().decode()
    return text


def test_agent_answers_up_maxconn_drain_maint_and_down(inetd: Start) -> None:
    few, echo, off, ag, mport = free_port(), free_port(), free_port(), free_port(), free_port()
    p = inetd(
        {
            "agent": [f"127.0.0.1:{ag}"],
            "metrics": f"127.0.0.1:{mport}",
            "services": {
                "few": {"listen": f"127.0.0.1:{few}", "exec": "/bin/cat", "max_connections": 4},
                "echo": {"listen": f"127.0.0.1:{echo}", "builtin": "echo"},
                "off": {"listen": f"127.0.0.1:{off}", "builtin": "echo", "enabled": False},
            },
        }
    )
    conf = str(p.path)
    assert ask(ag, b"few\n") == "up ready maxconn:4"
    assert ask(ag, b"echo\r\n") == "up ready"  # no max_connections: no maxconn
    assert ask(ag, b"off\n") == "maint"  # the operator disabled it
    assert ask(ag, b"nosuch\n") == "down#no such service"

    out = cli("drain", "few", "-c", conf)
    assert out.returncode == 0 and out.stdout == "pyinetd drain few: ok\n", out
    assert ask(ag, b"few\n") == "drain"
    assert ask(ag, b"echo\n") == "up ready"
    # Drained is still served, new connections included: only the balancer stops sending.
    assert tcp_talk(few, b"still served\n") == b"still served\n"
    st = status_of(p)
    assert st["few"]["draining"] is True and st["few"]["state"] == "draining", st["few"]
    assert st["echo"]["draining"] is False and st["echo"]["state"] == "listening"
    table = cli("status", "-c", conf).stdout
    assert any(ln.startswith("few ") and " draining " in ln for ln in table.splitlines()), table
    text = metrics(mport)
    assert 'pyinetd_service_draining{service="few"} 1' in text
    assert 'pyinetd_service_draining{service="echo"} 0' in text
    p.wait_log(r"few: draining: the agent answers drain")

    assert cli("undrain", "few", "-c", conf).returncode == 0
    assert ask(ag, b"few\n") == "up ready maxconn:4"
    assert status_of(p)["few"]["draining"] is False
    # Without a name: every service.
    assert cli("drain", "-c", conf).stdout == "pyinetd drain: ok\n"
    assert (ask(ag, b"few\n"), ask(ag, b"echo\n"), ask(ag, b"off\n")) == ("drain", "drain", "maint")
    assert cli("undrain", "-c", conf).returncode == 0
    assert ask(ag, b"echo\n") == "up ready"
    bad = cli("drain", "nosuch", "-c", conf)
    assert bad.returncode == 1 and "no such service 'nosuch'" in bad.stderr, bad


def test_drain_survives_a_reload_and_a_removed_service_is_gone(inetd: Start) -> None:
    a, b, ag = free_port(), free_port(), free_port()
    services = {
        "a": {"listen": f"127.0.0.1:{a}", "builtin": "echo"},
        "b": {"listen": f"127.0.0.1:{b}", "builtin": "echo"},
    }
    doc: dict[str, object] = {"agent": ag, "services": services}
    p = inetd(doc)
    assert cli("drain", "a", "-c", str(p.path)).returncode == 0

    p.path.write_text(yaml.safe_dump({**doc, "services": {"a": services["a"]}}))
    assert cli("reload", "-c", str(p.path)).returncode == 0
    assert ask(ag, b"a\n") == "drain"
    assert ask(ag, b"b\n") == "down#no such service"


def test_agent_says_down_for_a_service_failed_at_load(inetd: Start, folder: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("a service's own files are judged with its user's rights as root")
    nobody = pwd.getpwnam("nobody")
    work = folder / "work"
    work.mkdir()
    os.chown(work, nobody.pw_uid, nobody.pw_gid)
    work.chmod(0o000)  # its user made its own cwd unusable: the service fails, the rest serves
    port, ag = free_port(), free_port()
    p = inetd(
        {
            "agent": f"127.0.0.1:{ag}",
            "services": {
                "prog": {
                    "listen": f"127.0.0.1:{port}",
                    "exec": "/bin/cat",
                    "user": "nobody",
                    "cwd": str(work),
                }
            },
        }
    )
    assert status_of(p)["prog"]["state"] == "failed"
    # The key, not the reason: that names the user's files to whoever reaches the port.
    assert ask(ag, b"prog\n") == "down#failed at load: cwd"


def test_agent_says_down_while_a_warm_services_zygote_has_failed(
    inetd: Start, folder: Path
) -> None:
    script = folder / "svc.py"
    script.write_text("#!/usr/bin/env python3\nprint('hi')\n")
    script.chmod(0o755)
    port, ag = free_port(), free_port()
    svc = {"listen": f"127.0.0.1:{port}", "exec": [str(script)], "warm": True}
    p = inetd(
        {
            "agent": f"127.0.0.1:{ag}",
            "services": {"svc": {**svc, "preload": ["no_such_module_anywhere"]}},
        }
    )
    p.wait_log(r"svc: zygote: preload 'no_such_module_anywhere': ModuleNotFoundError")
    wait_for(lambda: ask(ag, b"svc\n").startswith("down#"), what="the agent to say down")
    answer = ask(ag, b"svc\n")
    assert answer.startswith("down#zygote failed: preload 'no_such_module_anywhere'"), answer
    assert "\n" not in answer and len(answer) <= 5 + 120, answer


def test_agent_port_is_bounded_per_source_in_line_length_and_time(inetd: Start) -> None:
    svc, ag = free_port(), free_port()
    inetd(
        {
            "agent": f"127.0.0.1:{ag}",
            "services": {"s": {"listen": f"127.0.0.1:{svc}", "builtin": "echo"}},
        }
    )
    # A line over 256 bytes is cut there: no service has that name.
    assert ask(ag, b"s" * 1000 + b"\n") == "down#no such service"
    with idle_connections(ag, 40) as idle:
        # The balancer (another address) is answered while a slowloris holds 40 connections,
        # of which the agent keeps at most 8 (the per-source bound); the rest it closed.
        assert ask(ag, b"s\n") == "up ready"
        wait_for(
            lambda: sum(not closed_by_server(s) for s in idle) <= 8,
            what="the agent to keep at most 8 idle clients of one source",
        )
        kept = [s for s in idle if not closed_by_server(s)]
        # Those it kept are closed at the 2 s deadline, unanswered.
        start = time.monotonic()
        wait_for(lambda: all(closed_by_server(s) for s in kept), what="the agent's deadline")
        assert time.monotonic() - start < 4.0


def test_stop_with_shutdown_drain_answers_drain_before_closing_the_listeners(
    inetd: Start,
) -> None:
    port, ag = free_port(), free_port()
    p = inetd(
        {
            "agent": f"127.0.0.1:{ag}",
            "shutdown": "drain",
            "agent_drain_time": "1.5s",
            "services": {"cat": {"listen": f"127.0.0.1:{port}", "exec": "/bin/cat"}},
        }
    )
    held = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    p.wait_log(r"cat: \S+ -> pid")
    p.signal(signal.SIGTERM)
    p.wait_log(r"SIGTERM: answering drain to the agent for 1\.5s before closing the listeners")
    sent = time.monotonic()
    assert ask(ag, b"cat\n") == "drain"
    # Still accepting meanwhile: what the balancer sent before it read `drain` is served.
    assert tcp_talk(port, b"late but served\n") == b"late but served\n"
    assert status_of(p)["cat"]["draining"] is True
    p.wait_log(r"SIGTERM: draining 1 connections")
    assert time.monotonic() - sent < 1.5 + DEADLINE
    assert not tcp_listening(port)
    assert ask(ag, b"cat\n") == "drain"  # until the process exits
    held.sendall(b"x")
    assert held.recv(10) == b"x"
    held.close()
    assert p.proc.wait(DEADLINE) == 0


def test_second_sigterm_in_agent_drain_time_closes_at_once(inetd: Start) -> None:
    port, ag = free_port(), free_port()
    p = inetd(
        {
            "agent": f"127.0.0.1:{ag}",
            "shutdown": "drain",
            "agent_drain_time": "10m",
            "services": {"cat": {"listen": f"127.0.0.1:{port}", "exec": "/bin/cat"}},
        }
    )
    p.signal(signal.SIGTERM)
    p.wait_log(r"answering drain to the agent for 600s")
    assert tcp_listening(port)
    p.signal(signal.SIGTERM)
    assert p.proc.wait(DEADLINE) == 0
    p.wait_log(r"SIGTERM: stopping")


@pytest.mark.parametrize(
    "extra", [{"shutdown": "leave"}, {"shutdown": "drain", "agent_drain_time": 0}, {}]
)
def test_stop_closes_at_once_without_the_agent_wait(inetd: Start, extra: dict[str, object]) -> None:
    port, ag = free_port(), free_port()
    doc: dict[str, object] = {"services": {"e": {"listen": f"127.0.0.1:{port}", "builtin": "echo"}}}
    # shutdown: leave, agent_drain_time: 0, or no agent: at all.
    if extra:
        doc.update(extra, agent=f"127.0.0.1:{ag}")
    else:
        doc["shutdown"] = "drain"
    p = inetd(doc)
    p.signal(signal.SIGTERM)
    assert p.proc.wait(DEADLINE) == 0
    assert "answering drain" not in p.log()


def test_a_connection_awaiting_its_proxy_header_holds_a_max_connections_place(
    inetd: Start,
) -> None:
    # max_connections: 1, on_limit: queue, behind a PROXY balancer. A connects and its header
    # is late; B comes complete. A holds the one place while its header is due, so B waits in
    # the backlog; without that hold B was served first and A, its header in, was refused
    # (closed with no answer: what HAProxy told `maxconn:` max_connections saw).
    port = free_port()
    p = inetd(
        {
            "services": {
                "p": {
                    "listen": f"127.0.0.1:{port}",
                    "exec": "/bin/cat",
                    "proxy_protocol": "v1",
                    "proxy_from": ["127.0.0.1"],
                    "max_connections": 1,
                    "on_limit": "queue",
                }
            }
        }
    )
    header = b"PROXY TCP4 192.0.2.7 192.0.2.1 4000 80\r\n"
    a = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    wait_for(lambda: backlog(port) == 0, what="pyinetd to accept A")
    assert _resting(p), status_of(p)["p"]  # A, its header due, holds the one place
    b = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    b.sendall(header + b"b\n")
    a.sendall(header + b"a\n")
    assert a.recv(10) == b"a\n"
    a.close()
    assert b.recv(10) == b"b\n"  # its turn once A's program has ended
    b.close()
    assert status_of(p)["p"]["refused"] == {}


def backlog(port: int) -> int:
    """Connections in the accept queue of the IPv4 listener on ``port`` (/proc/net/tcp: a
    listening socket's rx_queue is its accept queue)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
            return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"nothing listens on {port}")


def _resting(p: Pyinetd) -> bool:
    """No child runs, yet the listener rests at max_connections: a header holds the place."""
    st = status_of(p)["p"]
    return bool(st["running"] == 0 and st["state"] == "at limit (queueing)")
