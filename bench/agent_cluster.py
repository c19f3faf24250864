#!/usr/bin/env python3
"""Three pyinetd nodes behind a real HAProxy with agent-check: drain, kill -9, SIGTERM.

Each node runs in a network namespace of its own (`ip netns`, one veth pair each:
10.229.N.1 here, 10.229.N.2 in the node), HAProxy and the client in this one. HAProxy
checks each node (`check`, `agent-check` on the node's `agent:` port, `option redispatch`,
`observe layer4`), and a fixed-rate client (one thread, non-blocking sockets) opens short
connections through it: each sends a line and reads the node's answer (`nN LINE`) until EOF.
Scenarios, each in its own run of the cluster (as root; needs /usr/sbin/haproxy):

  drain     `pyinetd drain svc` on n1: how long until HAProxy sends it nothing new; failures
  parent    kill -9 of n1's pyinetd parent (its children go on): failures, time to reroute
  node      kill -9 of every process in n1's namespace: failures vs those in flight on n1
  sigterm   SIGTERM to n1 with shutdown: drain and HAProxy's `retries 0`: failures
  sigterm0  the same with agent_drain_time: 0 (the listeners close at once), for contrast

    python3 bench/agent_cluster.py [--rate 100] [--seconds 6] [SCENARIO ...]

Prints one line per scenario and a Markdown table (docs/operations.md has the figures). Every
namespace, veth and process it makes is removed at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import io
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

AGENT_INTER = 0.25  # seconds: HAProxy's agent-inter in these runs
CHECK_INTER = 0.5  # seconds: HAProxy's health check inter
SERVICE_PORT, AGENT_PORT = 7000, 9700


# ---------------------------------------------------------------- the fixed-rate client


@dataclass
class Conn:
    """One client connection: when it started and ended (monotonic), how, and what came back."""

    start: float
    sock: socket.socket | None = None
    end: float = 0.0
    outcome: str = ""  # ok, eof (closed with no answer), reset, refused, timeout, error
    reply: bytes = b""
    sent: bool = False

    @property
    def node(self) -> str:
        """The node that answered (`nN`), or ""."""
        return self.reply.split(b" ", 1)[0].decode() if self.outcome == "ok" else ""


@dataclass
class Load:
    """``rate`` connections a second to ``addr`` for ``seconds``, each `ping\\n` answered by a
    line ending in it; in a thread of its own (``start``, ``join``)."""

    addr: tuple[str, int]
    rate: float
    seconds: float
    conn_timeout: float = 10.0
    conns: list[Conn] = field(default_factory=list)
    _thread: threading.Thread | None = None

    def start(self) -> Load:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def join(self) -> list[Conn]:
        assert self._thread is not None
        self._thread.join(self.seconds + self.conn_timeout + 10)
        return self.conns

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        t0 = time.monotonic()
        total = int(self.rate * self.seconds)
        live: dict[socket.socket, Conn] = {}
        i = 0
        while i < total or live:
            now = time.monotonic()
            while i < total and t0 + i / self.rate <= now:
                self._open(sel, live, t0 + i / self.rate)
                i += 1
            wait = (t0 + i / self.rate - now) if i < total else 0.05
            for key, _mask in sel.select(max(0.0, min(wait, 0.05))):
                self._step(sel, live, key.fileobj)  # type: ignore[arg-type]
            now = time.monotonic()
            for sock, c in list(live.items()):
                if now - c.start > self.conn_timeout:
                    self._finish(sel, live, sock, "timeout")
        sel.close()

    def _open(
        self, sel: selectors.BaseSelector, live: dict[socket.socket, Conn], at: float
    ) -> None:
        c = Conn(start=at)
        self.conns.append(c)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex(self.addr)
        if err not in (0, errno.EINPROGRESS):
            c.outcome, c.end = "refused", time.monotonic()
            sock.close()
            return
        c.sock = sock
        live[sock] = c
        sel.register(sock, selectors.EVENT_WRITE)

    def _step(
        self, sel: selectors.BaseSelector, live: dict[socket.socket, Conn], sock: socket.socket
    ) -> None:
        c = live[sock]
        try:
            if not c.sent:
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._finish(
                        sel, live, sock, "refused" if err == errno.ECONNREFUSED else "error"
                    )
                    return
                sock.sendall(b"ping\n")
                sock.shutdown(socket.SHUT_WR)
                c.sent = True
                sel.modify(sock, selectors.EVENT_READ)
                return
            data = sock.recv(4096)
        except ConnectionResetError:
            self._finish(sel, live, sock, "reset")
            return
        except OSError:
            self._finish(sel, live, sock, "error")
            return
        if data:
            c.reply += data
            return
        self._finish(sel, live, sock, "ok" if c.reply.endswith(b" ping\n") else "eof")

    @staticmethod
    def _finish(
        sel: selectors.BaseSelector,
        live: dict[socket.socket, Conn],
        sock: socket.socket,
        outcome: str,
    ) -> None:
        c = live.pop(sock)
        c.outcome, c.end = outcome, time.monotonic()
        sel.unregister(sock)
        sock.close()


def failed_at(conns: list[Conn], t0: float) -> str:
    """When the failed connections began, in ms from the event (for the notes)."""
    times = [f"{(c.start - t0) * 1000:+.0f}" for c in conns if c.outcome != "ok"]
    return f"; failed ones began at {', '.join(times)} ms" if times else ""


def failures(conns: list[Conn]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in conns:
        if c.outcome != "ok":
            out[c.outcome] = out.get(c.outcome, 0) + 1
    return out


# ---------------------------------------------------------------- HAProxy


class HAProxy:
    """A HAProxy in front of ``servers`` ((name, address)), with an admin stats socket."""

    def __init__(
        self, folder: Path, servers: list[tuple[str, str]], front: int, retries: int = 3
    ) -> None:
        self.stats = folder / "haproxy.sock"
        self.front = front
        lines = [
            f"    server {name} {addr}:{SERVICE_PORT} check inter {int(CHECK_INTER * 1000)}ms "
            f"fall 2 rise 2 observe layer4 error-limit 1 on-error mark-down "
            f"agent-check agent-port {AGENT_PORT} agent-inter {int(AGENT_INTER * 1000)}ms "
            'agent-send "svc\\n"'
            for name, addr in servers
        ]
        cfg = folder / "haproxy.cfg"
        cfg.write_text(
            f"""global
    maxconn 4000
    stats socket {self.stats} mode 600 level admin
    log stdout format raw local0
defaults
    log global
    option tcplog
    mode tcp
    timeout connect 1s
    timeout client 15s
    timeout server 15s
    timeout queue 15s
    timeout check 1s
    retries {retries}
    option redispatch
frontend fe
    bind 127.0.0.1:{front}
    default_backend be
backend be
    balance roundrobin
"""
            + "\n".join(lines)
            + "\n"
        )
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        self.log = open(folder / "haproxy.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [haproxy, "-db", "-f", str(cfg)],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=self.log,
            start_new_session=True,
        )

    def command(self, text: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.stats))
            s.sendall(text.encode() + b"\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        return out.decode()

    def servers(self) -> dict[str, tuple[str, str]]:
        """Each server's (status, maximum connections) from `show stat`: UP, DOWN, DRAIN..."""
        text = self.command("show stat").lstrip("# ")
        out = {}
        for row in csv.DictReader(io.StringIO(text)):
            if row["pxname"] == "be" and row["svname"] not in ("BACKEND", "FRONTEND"):
                out[row["svname"]] = (row["status"], row["slim"])
        return out

    def wait(self, want: dict[str, str], timeout: float = 15.0, maxconn: str = "") -> float:
        """Wait until each named server's status starts with the one wanted (and its maximum
        of connections is ``maxconn``); the seconds taken."""
        start = time.monotonic()
        got: dict[str, tuple[str, str]] = {}
        while True:
            with contextlib.suppress(OSError, KeyError):
                got = self.servers()
                if all(
                    got[n][0].startswith(s) and (not maxconn or got[n][1] == maxconn)
                    for n, s in want.items()
                ):
                    return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"HAProxy: servers not {want} within {timeout}s: {got}")
            time.sleep(0.02)

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()


# ---------------------------------------------------------------- nodes in namespaces


class Node:
    """pyinetd in the network namespace ``ns`` at 10.229.N.2."""

    def __init__(self, n: int, folder: Path, shutdown: str, agent_drain_time: float) -> None:
        self.n = n
        self.name = f"n{n}"
        self.ns = f"pyi-agent-{os.getpid()}-{n}"
        self.addr = f"10.229.{n}.2"
        self.host_if, self.node_if = f"pyiag{n}h{os.getpid() % 10000}", f"pyiag{n}n"
        self.conf = folder / f"{self.name}.yaml"
        self.conf.write_text(
            f"""agent: "{self.addr}:{AGENT_PORT}"
shutdown: {shutdown}
agent_drain_time: {agent_drain_time}
drain_timeout: 20
services:
  svc:
    listen: "{self.addr}:{SERVICE_PORT}"
    exec: [/bin/sh, -c, 'read x; sleep 0.1; echo {self.name} $x']
    max_connections: 60
    on_limit: queue
"""
        )
        self.log = open(folder / f"{self.name}.log", "wb")  # noqa: SIM115
        self.proc: subprocess.Popen[bytes] | None = None

    def up(self) -> None:
        def ip(*args: str, ns: bool = False) -> None:
            pre = ["ip", "netns", "exec", self.ns] if ns else []
            subprocess.run([*pre, "ip", *args], check=True, capture_output=True)

        subprocess.run(["ip", "netns", "add", self.ns], check=True, capture_output=True)
        ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.node_if)
        ip("link", "set", self.node_if, "netns", self.ns)
        ip("addr", "add", f"10.229.{self.n}.1/24", "dev", self.host_if)
        ip("link", "set", self.host_if, "up")
        ip("addr", "add", f"{self.addr}/24", "dev", self.node_if, ns=True)
        ip("link", "set", self.node_if, "up", ns=True)
        ip("link", "set", "lo", "up", ns=True)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable, "-m", "pyinetd", "-c", str(self.conf)],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=self.log,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the node's agent answers `up` (pyinetd has bound everything)."""
        end = time.monotonic() + timeout
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.addr, AGENT_PORT), timeout=2) as s,
            ):
                s.sendall(b"svc\n")
                if s.recv(100).startswith(b"up"):
                    return
            if time.monotonic() > end:
                raise RuntimeError(f"{self.name}: not ready within {timeout}s")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        """pyinetd's pid (`ip netns exec` execs it: the same process)."""
        assert self.proc is not None
        return self.proc.pid

    def control(self, command: str) -> None:
        """A command on the node's control socket, as the `pyinetd` command line sends it."""
        from pyinetd.runtime import control

        answer = control.request(control.default_control_path(self.conf), command, timeout=10)
        if not answer.get("ok"):
            raise RuntimeError(f"{self.name}: {command}: {answer}")

    def pids(self) -> list[int]:
        """Every process in the node's namespace."""
        out = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def in_flight(self) -> int:
        """pyinetd's children: the node's connections in flight."""
        path = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        return len(path.read_text().split())

    def down(self) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        self.log.close()


@contextlib.contextmanager
def cluster(
    retries: int = 3, shutdown: str = "drain", agent_drain_time: float = 1.0
) -> Iterator[tuple[HAProxy, list[Node]]]:
    folder = Path(tempfile.mkdtemp(prefix="pyinetd-cluster-"))
    nodes = [Node(n, folder, shutdown, agent_drain_time) for n in (1, 2, 3)]
    proxy: HAProxy | None = None
    try:
        for node in nodes:
            node.up()
            node.start()
        for node in nodes:
            node.wait_ready()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            front = s.getsockname()[1]
        proxy = HAProxy(folder, [(n.name, n.addr) for n in nodes], front, retries)
        # HAProxy starts its servers UP: wait until every agent has been read (maxconn set).
        proxy.wait({n.name: "UP" for n in nodes}, timeout=30, maxconn="60")
        yield proxy, nodes
    finally:
        if proxy is not None:
            proxy.close()
        for node in nodes:
            node.down()
        if os.environ.get("KEEP"):
            print(f"kept {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------- scenarios


@dataclass
class Result:
    """A scenario's connections, its failures by kind, and its figures (ms, counts)."""

    scenario: str
    conns: list[Conn]
    t0: float  # the event (drain returned, kill, SIGTERM), monotonic
    figures: dict[str, float]
    note: str

    @property
    def failed(self) -> dict[str, int]:
        return failures(self.conns)

    @property
    def last_ms(self) -> float:
        """When n1's last answered connection began, in ms after the event."""
        last = max((c.start for c in self.conns if c.node == "n1"), default=self.t0)
        return (last - self.t0) * 1000

    def line(self) -> str:
        bad = sum(self.failed.values())
        why = " ".join(f"{k}={v}" for k, v in sorted(self.failed.items()))
        why = f" ({why})" if why else ""
        return (
            f"{self.scenario}: {bad} of {len(self.conns)} failed{why}; "
            f"{self.note.format(last=self.last_ms, **self.figures)}"
            + failed_at(self.conns, self.t0)
        )


def run_drain(rate: float, seconds: float) -> Result:
    with cluster() as (proxy, nodes):
        load = Load(("127.0.0.1", proxy.front), rate, seconds).start()
        time.sleep(seconds / 3)
        t0 = time.monotonic()
        nodes[0].control("drain svc")  # `pyinetd drain svc`, through the control socket
        proxy.wait({"n1": "DRAIN"})
        drained = time.monotonic() - t0
        conns = load.join()
        after = sum(1 for c in conns if c.node == "n1" and c.start > t0)
        note = (
            "HAProxy showed DRAIN {drained:.0f} ms after `pyinetd drain`; n1's last "
            "new connection began {last:.0f} ms after it ({after:.0f} began after it; 2 agent "
            "intervals = {bound:.0f} ms)"
        )
        figures = {"drained": drained * 1000, "after": after, "bound": 2 * AGENT_INTER * 1000}
        return Result("drain", conns, t0, figures, note)


def run_kill(rate: float, seconds: float, everything: bool) -> Result:
    with cluster() as (proxy, nodes):
        load = Load(("127.0.0.1", proxy.front), rate, seconds).start()
        time.sleep(seconds / 3)
        n1 = nodes[0]
        flying = n1.in_flight()
        t0 = time.monotonic()
        victims = n1.pids() if everything else [n1.pid]
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        down = proxy.wait({"n1": "DOWN"})
        conns = load.join()
        what = "every process of n1" if everything else "n1's parent (its children go on)"
        note = (
            f"kill -9 of {what}, {{in_flight:.0f}} in flight on n1; HAProxy marked n1 DOWN "
            "after {down:.0f} ms; n1's last answered connection began {last:.0f} ms after the "
            "kill"
        )
        figures = {"in_flight": flying, "down": down * 1000}
        return Result("node" if everything else "parent", conns, t0, figures, note)


def run_sigterm(rate: float, seconds: float, agent_drain_time: float) -> Result:
    with cluster(retries=0, agent_drain_time=agent_drain_time) as (proxy, nodes):
        load = Load(("127.0.0.1", proxy.front), rate, seconds).start()
        time.sleep(seconds / 3)
        n1 = nodes[0]
        assert n1.proc is not None
        t0 = time.monotonic()
        n1.proc.send_signal(signal.SIGTERM)
        code = n1.proc.wait(30)
        exited = time.monotonic() - t0
        conns = load.join()
        note = (
            f"retries 0, agent_drain_time {agent_drain_time:g}s: n1 exited {code} after "
            "{exited:.0f} ms; its last connection began {last:.0f} ms after SIGTERM"
        )
        name = "sigterm" if agent_drain_time else "sigterm0"
        return Result(name, conns, t0, {"exited": exited * 1000, "code": code}, note)


SCENARIOS = {
    "drain": lambda r, s: run_drain(r, s),
    "parent": lambda r, s: run_kill(r, s, everything=False),
    "node": lambda r, s: run_kill(r, s, everything=True),
    "sigterm": lambda r, s: run_sigterm(r, s, 1.0),
    "sigterm0": lambda r, s: run_sigterm(r, s, 0.0),
}


def usable() -> str:
    """Why the cluster cannot run here, or ""."""
    if os.geteuid() != 0:
        return "needs root (ip netns)"
    if not (shutil.which("haproxy") or Path("/usr/sbin/haproxy").exists()):
        return "needs haproxy"
    probe = f"pyi-agent-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True)
    if made.returncode:
        return f"ip netns add: {made.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


def main() -> int:
    global AGENT_INTER
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=100.0, help="connections a second")
    parser.add_argument("--seconds", type=float, default=6.0, help="of load per scenario")
    parser.add_argument("--agent-inter", type=float, default=AGENT_INTER, help="seconds")
    parser.add_argument("scenarios", nargs="*", help=f"of {', '.join(SCENARIOS)} (default: all)")
    args = parser.parse_args()
    AGENT_INTER = args.agent_inter
    unknown = [name for name in args.scenarios if name not in SCENARIOS]
    if unknown:
        parser.error(f"no scenario {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    why = usable()
    if why:
        print(why, file=sys.stderr)
        return 2
    results = []
    for name in args.scenarios or SCENARIOS:
        result = SCENARIOS[name](args.rate, args.seconds)
        print(result.line(), flush=True)
        results.append(result)
    print("\n| scenario | connections | failed | notes |\n|---|--:|--:|---|")
    for r in results:
        scenario, rest = r.line().split(": ", 1)
        counts, note = rest.split("; ", 1)
        print(f"| {scenario} | {len(r.conns)} | {counts.split(' of ')[0]} | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
