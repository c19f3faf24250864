"""pyinetd behind a real HAProxy with agent-check: a burst at `maxconn:` max_connections on
loopback, and the 3-node cluster of bench/agent_cluster.py (network namespaces, as root):
drain, kill -9 of a parent and of a whole node, SIGTERM with shutdown: drain and retries 0."""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
from conftest import DEADLINE, REPO, Pyinetd, free_port, port_open, status_of, wait_for

Start = Callable[..., Pyinetd]


def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("agent_cluster", REPO / "bench/agent_cluster.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


CLUSTER = bench()
NEEDS_CLUSTER = CLUSTER.usable()
HAPROXY = shutil.which("haproxy") or (
    "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else ""
)


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Callable[[str], int]]:
    """Start HAProxy with ``backend`` (its server lines); the front port."""
    if not HAPROXY:
        pytest.skip("haproxy not installed")
    procs: list[subprocess.Popen[bytes]] = []

    def start(backend: str) -> int:
        front = free_port()
        cfg = tmp_path / f"haproxy-{front}.cfg"
        cfg.write_text(f"""global
    maxconn 2000
    stats socket {tmp_path}/haproxy-{front}.sock mode 600 level admin
defaults
    mode tcp
    timeout connect 2s
    timeout client 20s
    timeout server 20s
    timeout queue 20s
    timeout check 1s
frontend fe
    bind 127.0.0.1:{front}
    default_backend be
backend be
{backend}
""")
        procs.append(
            subprocess.Popen(
                [HAPROXY, "-db", "-f", str(cfg)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        wait_for(lambda: port_open(front), what="haproxy listening")
        return front

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(DEADLINE)


def slim(sock: Path) -> str:
    """The backend server's maximum connections as HAProxy holds it (set by the agent), from
    its stats socket's `show stat`."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(DEADLINE)
        s.connect(str(sock))
        s.sendall(b"show stat\n")
        text = b""
        while chunk := s.recv(65536):
            text += chunk
    for line in text.decode().splitlines():
        cols = line.split(",")
        if cols[:2] == ["be", "s1"]:
            return cols[6]  # slim
    return ""


def test_burst_behind_haproxy_at_maxconn_from_the_agent_answers_every_connection(
    inetd: Start, haproxy: Callable[[str], int], tmp_path: Path
) -> None:
    # HAProxy learns maxconn:5 from the agent and queues the rest; pyinetd serves exactly 5 at
    # a time (on_limit: queue) with no margin: a connection whose PROXY header is due holds
    # its place, so none is accepted and then refused when its header comes.
    port, ag = free_port(), free_port()
    p = inetd(
        {
            "agent": f"127.0.0.1:{ag}",
            "services": {
                "s1": {
                    "listen": f"127.0.0.1:{port}",
                    # It closes the connection 50 ms before it exits: HAProxy frees its place
                    # before pyinetd reaps the program and frees its own.
                    "exec": ["/bin/sh", "-c", 'read x; echo "s1 $x"; exec <&- >&-; sleep 0.05'],
                    "proxy_protocol": "v2",
                    "proxy_from": ["127.0.0.1"],
                    "max_connections": 5,
                    "on_limit": "queue",
                }
            },
        }
    )
    front = haproxy(
        f"    server s1 127.0.0.1:{port} send-proxy-v2 agent-check agent-port {ag} "
        'agent-inter 200ms agent-send "s1\\n"'
    )
    sock = next(tmp_path.glob("haproxy-*.sock"))
    wait_for(lambda: slim(sock) == "5", what="HAProxy to take maxconn:5 from the agent")
    load = CLUSTER.Load(("127.0.0.1", front), rate=400.0, seconds=0.75).start()
    conns = load.join()
    assert len(conns) == 300
    assert CLUSTER.failures(conns) == {}, CLUSTER.failed_at(conns, conns[0].start)
    assert status_of(p)["s1"]["refused"] == {}


needs_cluster = pytest.mark.skipif(bool(NEEDS_CLUSTER), reason=NEEDS_CLUSTER or "")


@pytest.fixture
def agent_inter() -> Iterator[float]:
    """HAProxy's agent-inter for the cluster: 0.5 s, so that a loaded machine's scheduling
    delays do not decide the drain bound."""
    old = CLUSTER.AGENT_INTER
    CLUSTER.AGENT_INTER = 0.5
    yield CLUSTER.AGENT_INTER
    CLUSTER.AGENT_INTER = old


RATE, SECONDS = 100.0, 6.0  # 600 connections a scenario


@needs_cluster
def test_cluster_drain_of_a_node_moves_new_connections_away_and_loses_none(
    agent_inter: float,
) -> None:
    result = CLUSTER.run_drain(RATE, SECONDS)
    print(result.line())
    assert result.failed == {}, result.line()
    # No new connection for n1 once HAProxy has read `drain` (2 agent intervals).
    assert result.last_ms <= 2 * agent_inter * 1000, result.line()


@needs_cluster
def test_cluster_kill_9_of_a_parent_loses_nothing(agent_inter: float) -> None:
    result = CLUSTER.run_kill(RATE, SECONDS, everything=False)
    print(result.line())
    # Its children go on and finish their connections; what came after was redispatched.
    assert result.failed == {}, result.line()


@needs_cluster
def test_cluster_kill_9_of_a_whole_node_loses_at_most_its_connections_in_flight(
    agent_inter: float,
) -> None:
    result = CLUSTER.run_kill(RATE, SECONDS, everything=True)
    print(result.line())
    assert sum(result.failed.values()) <= result.figures["in_flight"], result.line()
    # Those that came after the kill were redispatched: every failure began before it.
    assert all(c.start <= result.t0 for c in result.conns if c.outcome != "ok"), result.line()


@needs_cluster
def test_cluster_sigterm_with_shutdown_drain_loses_none_even_with_retries_0(
    agent_inter: float,
) -> None:
    started = time.monotonic()
    result = CLUSTER.run_sigterm(RATE, SECONDS, 1.5)
    print(result.line())
    assert result.figures["code"] == 0
    assert result.failed == {}, result.line()
    assert time.monotonic() - started < 120
