"""Operations: reload, include, control socket, stop modes, systemd integration, status."""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import (
    DEADLINE,
    Pyinetd,
    free_port,
    local_account,
    pid_gone,
    port_open,
    script,
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


def rewrite(p: Pyinetd, config: dict[str, object]) -> None:
    p.path.write_text(yaml.safe_dump(config))


class Hammer:
    """A client loop in a thread: connect, echo, close, as fast as it can; counts failures."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                got = tcp_talk(self.port, b"ping %d" % self.ok)
                if got != b"ping %d" % self.ok:
                    self.failures.append(f"mismatch {got!r}")
                self.ok += 1
            except OSError as exc:
                self.failures.append(repr(exc))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(DEADLINE)


def test_reload_under_load_drops_nothing(inetd: Start) -> None:
    port, other = free_port(), free_port()
    cfg: dict[str, object] = {
        "services": {"cat": {"listen": f"127.0.0.1:{port}", "exec": "/bin/cat"}}
    }
    p = inetd(cfg, "--log-level", "warning")
    hammer = Hammer(port)
    for i in range(20):
        # Alternate a second service in and out, so each reload really changes something.
        services = dict(cfg["services"])  # type: ignore[call-overload]
        if i % 2 == 0:
            services["extra"] = {"listen": f"127.0.0.1:{other}"}
        rewrite(p, {"services": services})
        start = hammer.ok
        p.signal(signal.SIGHUP)
        wait_for(lambda start=start: hammer.ok >= start + 100, what="100 connections")
    hammer.stop()
    assert hammer.failures == []
    assert hammer.ok >= 2000
    assert "reload failed" not in p.log()


def test_bad_reload_keeps_the_old_config_serving(inetd: Start) -> None:
    port = free_port()
    p = inetd({"services": {"e": {"listen": f"127.0.0.1:{port}"}}})
    p.path.write_text("services:\n  e: {listen: '127.0.0.1:70000'}\n")
    p.signal(signal.SIGHUP)
    p.wait_log(
        r"reload failed, keeping the running configuration: .*inetd\.yaml:2:7: "
        r"services\.e\.listen: '127\.0\.0\.1:70000': port must be 1-65535"
    )
    assert tcp_talk(port, b"still") == b"still"
    # The same through `pyinetd reload`: errors printed, non-zero exit.
    out = cli("reload", "-c", str(p.path))
    assert out.returncode == 2
    assert "port must be 1-65535" in out.stderr and "unchanged" in out.stderr


def test_reload_with_a_port_taken_keeps_everything(inetd: Start) -> None:
    port = free_port()
    p = inetd({"services": {"e": {"listen": f"127.0.0.1:{port}"}}})
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        rewrite(
            p,
            {
                "services": {
                    "e": {"listen": f"127.0.0.1:{port}"},
                    "new": {"listen": f"127.0.0.1:{taken}"},
                }
            },
        )
        p.signal(signal.SIGHUP)
        p.wait_log(r"reload failed.*Address already in use")
    assert tcp_talk(port, b"ok") == b"ok"


def test_reload_adds_removes_and_changes_services(inetd: Start, tmp_path: Path) -> None:
    a, b = free_port(), free_port()
    p = inetd({"services": {"a": {"listen": f"127.0.0.1:{a}"}}})
    held = socket.create_connection(("127.0.0.1", a), timeout=DEADLINE)
    rewrite(p, {"services": {"b": {"listen": f"127.0.0.1:{b}", "builtin": "daytime"}}})
    p.signal(signal.SIGHUP)
    p.wait_log(r"reloaded: b ")
    assert tcp_talk(b).endswith(b"\r\n")
    assert not port_open(a)
    held.sendall(b"old session lives")  # a removed service's connection is not killed
    assert held.recv(100) == b"old session lives"
    held.close()
    # Change: same address, new program; applies to new connections.
    rewrite(p, {"services": {"b": {"listen": f"127.0.0.1:{b}", "builtin": "echo"}}})
    p.signal(signal.SIGHUP)
    p.wait_log(r"reloaded: b ", count=2)
    assert tcp_talk(b, b"echo now") == b"echo now"


def test_reload_kills_removed_when_asked(inetd: Start) -> None:
    a = free_port()
    p = inetd(
        {
            "reload_kills_removed": True,
            "services": {"a": {"listen": f"127.0.0.1:{a}", "exec": "/bin/cat"}},
        }
    )
    held = socket.create_connection(("127.0.0.1", a), timeout=DEADLINE)
    (line,) = p.wait_log(r"a: \S+ -> pid \d+")
    pid = int(line.rsplit(" ", 1)[1])
    rewrite(p, {"reload_kills_removed": True, "services": {"b": {"listen": free_port()}}})
    p.signal(signal.SIGHUP)
    p.wait_log(rf"a: pid {pid} ended \(signal SIGTERM\)")
    held.close()


def test_include_merges_drop_ins_and_names_both_files_on_a_clash(
    inetd: Start, tmp_path: Path
) -> None:
    a, b = free_port(), free_port()
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "b.yaml").write_text(
        yaml.safe_dump({"services": {"b": {"listen": f"127.0.0.1:{b}"}}})
    )
    p = inetd({"include": "conf.d/*.yaml", "services": {"a": {"listen": f"127.0.0.1:{a}"}}})
    assert tcp_talk(b, b"from drop-in") == b"from drop-in"
    (tmp_path / "conf.d" / "c.yaml").write_text(
        yaml.safe_dump({"services": {"a": {"listen": f"127.0.0.1:{free_port()}"}}})
    )
    out = cli("-c", str(p.path), "--check")
    assert out.returncode == 2
    assert out.stderr == f"{tmp_path}/conf.d/c.yaml:2:3: services.a: already defined in {p.path}\n"


def test_control_status_json_and_table(inetd: Start) -> None:
    port = free_port()
    p = inetd(
        {
            "services": {
                "cat": {"listen": f"127.0.0.1:{port}", "exec": "/bin/cat", "deny": ["127.0.0.2"]}
            }
        }
    )
    held = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    p.wait_log(r"cat: \S+ -> pid")
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        s.connect(("127.0.0.1", port))
        assert s.recv(10) == b""
    p.wait_log(r"refused 127\.0\.0\.2")
    out = cli("status", "-c", str(p.path), "--json")
    assert out.returncode == 0, out.stderr
    snap = json.loads(out.stdout)
    (svc,) = snap["services"]
    assert svc["state"] == "listening" and svc["running"] == 1
    assert svc["accepted"] == 1 and svc["refused"] == {"deny": 1}
    assert svc["children"][0]["peer"].startswith("127.0.0.1:")
    table = cli("status", "-c", str(p.path)).stdout
    assert re.search(
        r"^cat\s+tcp/127\.0\.0\.1:\d+\s+listening\s+1\s+1\s+deny=1\s+0$", table, re.M
    ), table
    held.close()


def test_control_stop(inetd: Start) -> None:
    p = inetd({"services": {"e": {"listen": f"127.0.0.1:{free_port()}"}}})
    out = cli("stop", "-c", str(p.path))
    assert out.returncode == 0 and out.stdout == "pyinetd stop: ok\n"
    assert p.proc.wait(DEADLINE) == 0


def test_control_socket_is_private(inetd: Start, tmp_path: Path) -> None:
    sock = tmp_path / "ctl.sock"
    inetd({"control_socket": str(sock), "services": {"e": {"listen": free_port()}}})
    assert oct(sock.stat().st_mode & 0o777) == "0o600"


def test_drain_waits_for_children_then_exits_0(inetd: Start) -> None:
    port = free_port()
    p = inetd(
        {
            "shutdown": "drain",
            "drain_timeout": 30,
            "services": {"cat": {"listen": f"127.0.0.1:{port}", "exec": "/bin/cat"}},
        }
    )
    held = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    p.wait_log(r"cat: \S+ -> pid")
    p.signal(signal.SIGTERM)
    p.wait_log(r"SIGTERM: draining 1 connections")
    assert not tcp_listening(port)  # no new connections while draining
    assert p.proc.poll() is None
    held.sendall(b"served while draining")
    assert held.recv(100) == b"served while draining"
    held.close()
    assert p.proc.wait(DEADLINE) == 0


def test_drain_timeout_terminates_children(inetd: Start) -> None:
    port = free_port()
    p = inetd(
        {
            "shutdown": "drain",
            "drain_timeout": 0.3,
            "services": {"cat": {"listen": f"127.0.0.1:{port}", "exec": "/bin/cat"}},
        }
    )
    held = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    (line,) = p.wait_log(r"cat: \S+ -> pid \d+")
    pid = int(line.rsplit(" ", 1)[1])
    p.signal(signal.SIGTERM)
    assert p.proc.wait(DEADLINE) == 0
    p.wait_log(r"drain timeout: sending SIGTERM to 1 children")
    wait_for(lambda: pid_gone(pid), what="the child to be terminated")
    held.close()


def test_second_sigterm_during_drain_stops_at_once(inetd: Start) -> None:
    port = free_port()
    p = inetd(
        {
            "shutdown": "drain",
            "drain_timeout": 600,
            "services": {"cat": {"listen": f"127.0.0.1:{port}", "exec": "/bin/cat"}},
        }
    )
    held = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    p.wait_log(r"cat: \S+ -> pid")
    p.signal(signal.SIGTERM)
    p.wait_log("draining")
    p.signal(signal.SIGTERM)
    assert p.proc.wait(DEADLINE) == 0
    p.wait_log("SIGTERM again: stopping now")
    held.close()


def test_sigusr1_dumps_status_to_the_log(inetd: Start) -> None:
    port = free_port()
    p = inetd({"services": {"cat": {"listen": f"127.0.0.1:{port}", "exec": "/bin/cat"}}})
    held = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    (line,) = p.wait_log(r"cat: \S+ -> pid \d+")
    pid = line.rsplit(" ", 1)[1]
    p.signal(signal.SIGUSR1)
    p.wait_log(r"status: cat\s+tcp/127\.0\.0\.1:\d+\s+listening\s+1\s+1\s+0\s+0")
    p.wait_log(rf"status:   cat: pid {pid} 127\.0\.0\.1:\d+ age")
    held.close()


def test_metrics_scraped_over_http_reflect_traffic(inetd: Start) -> None:
    port, mport = free_port(), free_port()
    p = inetd(
        {
            "metrics": f"127.0.0.1:{mport}",
            "services": {"e": {"listen": f"127.0.0.1:{port}", "deny": ["127.0.0.2"]}},
        }
    )
    for _ in range(3):
        assert tcp_talk(port, b"x") == b"x"
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        s.connect(("127.0.0.1", port))
        assert s.recv(10) == b""
    p.wait_log("refused")
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=DEADLINE) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['pyinetd_connections_accepted_total{service="e"}'] == 3
    assert samples['pyinetd_connections_refused_total{service="e",reason="deny"}'] == 1
    # the built-in echo carried 1 byte each way per connection (closed before the client's EOF)
    assert samples['pyinetd_bytes_total{service="e",direction="in"}'] == 3
    assert samples['pyinetd_bytes_total{service="e",direction="out"}'] == 3
    if shutil.which("curl"):
        out = subprocess.run(
            ["curl", "-sf", f"http://127.0.0.1:{mport}/metrics"],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        )
        assert "# TYPE pyinetd_connections_accepted_total counter" in out.stdout


def test_pid_file_written_and_removed(inetd: Start, tmp_path: Path) -> None:
    pidf = tmp_path / "pyinetd.pid"
    p = inetd({"services": {"e": {"listen": free_port()}}}, "--pid-file", str(pidf))
    assert pidf.read_text() == f"{p.pid}\n"
    assert p.stop() == 0
    assert not pidf.exists()


def test_sd_notify_messages_on_a_real_datagram_socket(inetd: Start, tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ns:
        ns.bind(str(path))
        ns.settimeout(DEADLINE)
        p = inetd(
            {"services": {"e": {"listen": f"127.0.0.1:{free_port()}"}}},
            env={"NOTIFY_SOCKET": str(path)},
        )
        first = ns.recv(4096).decode().split("\n")
        assert first[0] == "READY=1" and first[1].startswith("STATUS=1 services")
        p.signal(signal.SIGHUP)
        reloading = ns.recv(4096).decode().split("\n")
        assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC=")
        assert ns.recv(4096).decode().startswith("READY=1")
        p.signal(signal.SIGTERM)
        assert ns.recv(4096) == b"STOPPING=1"
        assert p.proc.wait(DEADLINE) == 0


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate not installed (Debian package systemd)",
)
def test_socket_activation_with_systemd_socket_activate(tmp_path: Path) -> None:
    port, other = free_port(), free_port()
    cfg = tmp_path / "inetd.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "services": {
                    "act": {
                        "listen": f"127.0.0.1:{port}",
                        "exec": ["/bin/sh", "-c", 'echo "$LISTEN_FDS|"; cat'],
                    },
                    "own": {"listen": f"127.0.0.1:{other}"},
                }
            }
        )
    )
    proc = subprocess.Popen(
        [
            "systemd-socket-activate",
            "-l",
            f"127.0.0.1:{port}",
            sys.executable,
            "-m",
            "pyinetd",
            "-c",
            str(cfg),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        # The socket exists before pyinetd runs: the first connection starts it.
        wait_for(lambda: port_open(port), what="systemd-socket-activate listening")
        assert tcp_talk(port, b"hello") == b"|\nhello"  # LISTEN_FDS not passed to services
        wait_for(lambda: port_open(other), what="pyinetd's own listener")
        assert tcp_talk(other, b"own") == b"own"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(DEADLINE)
        assert proc.stderr is not None
        log = proc.stderr.read().decode()
        proc.stderr.close()
    assert "socket activation: adopted tcp 127.0.0.1:" in log


def closed_pipe_run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run pyinetd with stdout a pipe whose reader has already gone (as `| head -1` leaves it)."""
    r, w = os.pipe()
    os.close(r)  # closed before the start: every write fails with EPIPE, no race with a reader
    try:
        return subprocess.run(
            [sys.executable, "-m", "pyinetd", *args],
            stdout=w,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
            timeout=DEADLINE,
        )
    finally:
        os.close(w)


def test_schema_and_status_into_a_closed_pipe_end_without_a_traceback(inetd: Start) -> None:
    """`pyinetd --schema | head` and `pyinetd status | head -1` printed a BrokenPipeError."""
    p = inetd({"services": {"e": {"listen": f"127.0.0.1:{free_port()}"}}})
    for args in (
        ("--schema",),
        ("status", "-c", str(p.path)),
        ("status", "-c", str(p.path), "--json"),
    ):
        run = closed_pipe_run(*args)
        assert (run.returncode, run.stderr) == (1, ""), args


def test_status_from_another_folder_names_the_config_it_assumed(tmp_path: Path) -> None:
    """`pyinetd status` away from the config said only 'cannot reach pyinetd at ...sock'."""
    run = subprocess.run(
        [sys.executable, "-m", "pyinetd", "status"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=DEADLINE,
    )
    assert run.returncode == 1
    first, second = run.stderr.splitlines()
    assert first.startswith("pyinetd status: cannot reach pyinetd at ")
    assert second == (
        f"pyinetd status: that is the control socket for {tmp_path / 'inetd.yaml'}, which does "
        "not exist; name the running instance's config with -c FILE, or its socket with "
        "--control PATH"
    )


def in_private_dev(dev: Path) -> tuple[str, ...]:
    """A command prefix that runs the command with ``dev`` mounted over /dev (own namespace).

    The folder gets /dev/null; whatever else the test puts there (a log socket, or nothing)
    is all the command sees: the machine's /dev/log is neither needed nor touched.
    """
    (dev / "null").touch()
    return (
        "unshare",
        "--mount",
        "sh",
        "-c",
        f'mount --bind /dev/null {dev}/null && mount --bind {dev} /dev && exec "$@"',
        "sh",
    )


needs_unshare = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare(1) for a private /dev",
)


@needs_unshare
def test_syslog_without_dev_log_is_an_error_not_udp_514(tmp_path: Path) -> None:
    """--syslog without /dev/log sent every line to UDP localhost:514, where nobody listened."""
    dev = tmp_path / "dev"
    dev.mkdir()
    conf = tmp_path / "inetd.yaml"
    conf.write_text(f"services:\n  e: {{listen: '127.0.0.1:{free_port()}'}}\n")
    run = subprocess.run(
        [*in_private_dev(dev), sys.executable, "-m", "pyinetd", "-c", str(conf), "--syslog"],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert run.returncode == 1, run.stderr
    assert run.stderr == (
        "pyinetd: --syslog: cannot reach the syslog socket /dev/log: No such file or directory "
        "(is a syslog daemon or journald running? without --syslog pyinetd logs to stderr)\n"
    )


@needs_unshare
def test_syslog_lines_reach_the_local_syslog_socket(inetd: Start, tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    dev.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog:
        syslog.bind(str(dev / "log"))
        syslog.settimeout(DEADLINE)
        port = free_port()
        p = inetd(
            {"services": {"e": {"listen": f"127.0.0.1:{port}"}}},
            "--syslog",
            prefix=in_private_dev(dev),
            wait_ready=False,
        )
        line = syslog.recv(4096).decode()
        # <30> is facility daemon (3 * 8) + severity info (6), RFC 3164.
        assert line.startswith("<30>pyinetd: ") and f"127.0.0.1:{port}" in line, line
        p.signal(signal.SIGTERM)
        assert p.proc.wait(DEADLINE) == 0


def recv_until(sock: socket.socket, prefix: bytes, deadline: float = DEADLINE) -> list[bytes]:
    """Datagrams received until one starts with ``prefix`` (bounded); all of them, in order."""
    got: list[bytes] = []
    end = time.monotonic() + deadline
    while not got or not got[-1].startswith(prefix):
        sock.settimeout(max(0.001, end - time.monotonic()))
        got.append(sock.recv(4096))
    return got


def test_watchdog_is_petted_at_half_the_interval_while_the_loop_runs(
    inetd: Start, tmp_path: Path
) -> None:
    """systemd's WatchdogSec= restarted a healthy pyinetd: it never sent WATCHDOG=1."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ns:
        ns.bind(str(path))
        p = inetd(
            {"services": {"e": {"listen": f"127.0.0.1:{free_port()}"}}},
            env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"},  # 0.2 s
        )
        assert recv_until(ns, b"WATCHDOG=1")[0].startswith(b"READY=1")
        times = []
        for _ in range(6):
            recv_until(ns, b"WATCHDOG=1")
            times.append(time.monotonic())
        gaps = sorted(b - a for a, b in itertools.pairwise(times))
        # Every 0.1 s, half of 0.2 s (the median: one late wake-up on a loaded machine is no
        # failure, a pet per whole interval is).
        assert gaps[0] > 0.07 and gaps[2] < 0.16, gaps

        # The pets come from the loop itself: pyinetd has no other thread that could pet for
        # a stuck loop (config loading no longer blocks on a FIFO, which this test used).
        assert os.listdir(f"/proc/{p.pid}/task") == [str(p.pid)]
        # A loop that does not run does not pet: stopped, not one pet in three intervals.
        p.signal(signal.SIGSTOP)
        try:
            while True:  # what was sent before the stop
                ns.settimeout(0.05)
                try:
                    ns.recv(4096)
                except TimeoutError:
                    break
            ns.settimeout(0.6)
            with pytest.raises(TimeoutError):
                ns.recv(4096)
        finally:
            p.signal(signal.SIGCONT)
        recv_until(ns, b"WATCHDOG=1")


def test_process_durations_and_exit_classes_in_metrics_and_status(
    inetd: Start, tmp_path: Path
) -> None:
    """Metrics counted connections, not how long their processes ran or how they ended."""
    port, mport = free_port(), free_port()
    prog = script(
        tmp_path,
        "outcome.sh",
        "#!/bin/sh\nread how\ncase $how in\n"
        "ok) exit 0;;\nerr) exit 3;;\ncrash) kill -SEGV $$;;\n"
        "missing) exec /nonexistent/program;;\nhang) exec sleep 30;;\nesac\n",
    )
    p = inetd(
        {
            "metrics": f"127.0.0.1:{mport}",
            "services": {"s": {"listen": f"127.0.0.1:{port}", "exec": prog, "timeout": 0.5}},
        }
    )
    for n, how in enumerate(("ok", "err", "crash", "missing", "hang"), 1):
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as c:
            c.sendall(how.encode() + b"\n")
            p.wait_log(r"s: pid \d+ ended", count=n)
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=DEADLINE) as r:
        text = r.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert "# TYPE pyinetd_process_duration_seconds histogram" in text
    for how in ("ok", "error", "signal", "not_run", "killed"):
        assert samples[f'pyinetd_process_exits_total{{service="s",class="{how}"}}'] == 1, how
    bucket = 'pyinetd_process_duration_seconds_bucket{{service="s",le="{}"}}'
    assert samples['pyinetd_process_duration_seconds_count{service="s"}'] == 5
    assert samples[bucket.format("+Inf")] == 5
    # Four end at once; the hung one ran until its 0.5 s timeout.
    assert samples[bucket.format("0.25")] == 4
    assert samples['pyinetd_process_duration_seconds_sum{service="s"}'] >= 0.5
    table = cli("status", "-c", str(p.path)).stdout
    assert re.search(
        r"^  s: 5 ended \(ok=1 error=1 not_run=1 signal=1 killed=1\), mean 0\.\d{3}s$", table, re.M
    ), table


def test_spawn_failures_by_reason_and_dropped_stderr_in_metrics_and_status(
    inetd: Start, tmp_path: Path
) -> None:
    """Metrics said how many processes failed to start, not why, and nothing of the stderr
    lines stderr_rate dropped (issue 16, Operations)."""
    port, chatty_port, mport = free_port(), free_port(), free_port()
    gone = script(tmp_path, "gone.sh", "#!/bin/sh\nexit 0\n")
    chatty = script(
        tmp_path,
        "chatty.sh",
        "#!/bin/sh\ni=0\nwhile [ $i -lt 50 ]; do echo line $i >&2; i=$((i+1)); done\n",
    )
    p = inetd(
        {
            "metrics": f"127.0.0.1:{mport}",
            "services": {
                "gone": {"listen": f"127.0.0.1:{port}", "exec": gone},
                "chatty": {
                    "listen": f"127.0.0.1:{chatty_port}",
                    "exec": chatty,
                    "stderr_rate": {"lines": "1/s", "bytes": "1k/s"},
                },
            },
        }
    )
    os.unlink(gone)  # after load: every start now fails with ENOENT
    for _ in range(2):
        tcp_talk(port)
    tcp_talk(chatty_port)

    def samples() -> dict[str, float]:
        url = f"http://127.0.0.1:{mport}/metrics"
        with urllib.request.urlopen(url, timeout=DEADLINE) as r:
            text = r.read().decode()
        return {
            name: float(value)
            for name, value in (
                line.rsplit(" ", 1) for line in text.splitlines() if line and line[0] != "#"
            )
        }

    failed = 'pyinetd_spawn_failures_by_reason_total{service="gone",reason="ENOENT"}'
    dropped = 'pyinetd_stderr_dropped_lines_total{service="chatty"}'
    wait_for(lambda: samples().get(failed) == 2, what="two ENOENT failures counted")
    # 50 lines at 1 line/s with a burst of one: all but the first few are dropped
    wait_for(lambda: samples().get(dropped, 0) >= 45, what="the dropped lines counted")
    assert samples()['pyinetd_spawn_failures_total{service="gone"}'] == 2
    table = cli("status", "-c", str(p.path)).stdout
    assert re.search(r"^  gone: failed to start: ENOENT=2$", table, re.M), table
    assert re.search(r"^  chatty: stderr over stderr_rate: \d+ lines, \d+ bytes dropped$",
                     table, re.M), table  # fmt: skip


def test_every_refusal_reason_reaches_metrics_and_status(inetd: Start) -> None:
    """access_times and max_load refusals were counted in `status` but missing from /metrics
    (its list of reasons was written by hand). Every reason of admission.Refusal has a series,
    and a live access_times refusal shows in both with the same count."""
    from pyinetd.runtime.admission import Refusal

    now = time.localtime()
    later = (now.tm_hour + 6) % 24
    port, mport = free_port(), free_port()
    p = inetd({
        "metrics": f"127.0.0.1:{mport}",
        "services": {"closed": {
            "listen": f"127.0.0.1:{port}", "exec": ["/bin/cat"],
            "access_times": f"{later:02d}:00-{later:02d}:01",
        }},
    })  # fmt: skip
    for _ in range(3):
        with contextlib.suppress(ConnectionResetError):  # refused: closed with data unread
            assert tcp_talk(port, b"x") == b""
    wait_for(lambda: status_of(p)["closed"]["refused"].get("access_times") == 3)
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=DEADLINE) as r:
        text = r.read().decode()
    for reason in Refusal:
        want = 3 if reason is Refusal.ACCESS_TIMES else 0
        assert (
            f'pyinetd_connections_refused_total{{service="closed",reason="{reason}"}} {want}'
            in text
        ), reason


# A UDP wait program that answers each datagram with its pid; b"linger" makes it keep the
# socket until it is killed, as in.tftpd keeps it for its next request.
LINGERING_UDP = """#!/usr/bin/python3
import os, signal, socket
s = socket.socket(fileno=0)
data, peer = s.recvfrom(100)
s.sendto(str(os.getpid()).encode(), peer)
if data == b"linger":
    signal.pause()
"""


def udp_ask(port: int, data: bytes) -> int:
    """Send one datagram to the wait service, return the pid its program answers with."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.settimeout(DEADLINE)
        c.sendto(data, ("127.0.0.1", port))
        return int(c.recv(100))


def lingering_service(folder: Path, port: int) -> dict[str, object]:
    exe = script(folder, "linger.py", LINGERING_UDP)
    svc = {"listen": f"127.0.0.1:{port}", "protocol": "udp", "wait": True, "exec": exe}
    return {"services": {"tftp": {**svc, "user": "nobody"}}}


def test_status_names_pyinetd_while_a_wait_child_holds_the_socket(
    inetd: Start, folder: Path
) -> None:
    port = free_port(socket.SOCK_DGRAM)
    p = inetd(lingering_service(folder, port))
    busy = udp_ask(port, b"linger")
    try:
        snap = json.loads(cli("status", "--json", "-c", str(p.path)).stdout)
        # `kill -HUP $(pyinetd status --json | jq .pid)` must reach pyinetd, not the program.
        assert snap["pid"] == p.pid, (snap["pid"], p.pid, busy)
        assert snap["services"][0]["state"] == f"waiting on child {busy}"
        table = cli("status", "-c", str(p.path)).stdout
        assert table.startswith(f"pyinetd pid {p.pid},"), table
    finally:
        os.kill(busy, signal.SIGKILL)


def test_restart_beside_a_lingering_wait_program_serves_and_keeps_others_off(
    inetd: Start, folder: Path
) -> None:
    """systemctl restart with KillMode=process: pyinetd stops, its UDP wait program (as
    nobody) still holds the port; the new pyinetd starts and answers every new datagram, a
    second local user cannot bind the port meanwhile (SO_REUSEPORT joins only sockets of the
    creator's uid, root), and once the old program is gone the new pyinetd's program answers."""
    port = free_port(socket.SOCK_DGRAM)
    config = lingering_service(folder, port)
    first = inetd(config)
    old = udp_ask(port, b"linger")
    try:
        assert first.stop() == 0
        assert not pid_gone(old)  # it lingers, holding the socket
        second = inetd(config, name="restarted.yaml")
        second.wait_log(rf"tftp: udp 127\.0\.0\.1:{port} is also bound by pid {old} \(")
        steal = (
            "import socket, sys\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n"
            "try:\n"
            "    s.bind((sys.argv[1], int(sys.argv[2])))\n"
            "except OSError as e:\n"
            "    print(e.errno)\n"
            "else:\n"
            "    print('bound')\n"
        )
        with local_account("pyi-admin-") as eve:
            for host in ("127.0.0.1", "0.0.0.0"):
                out = eve.run(["/usr/bin/python3", "-c", steal, host, str(port)])
                assert out.stdout.decode().strip() == str(errno.EADDRINUSE), (host, out)
        # Meanwhile every new datagram comes to the new pyinetd, whatever its source port
        # (the kernel's hash would give about half to the lingering program, which reads no
        # more): each gets an answer from a program the new pyinetd started.
        for _ in range(8):
            new = udp_ask(port, b"hello")
            second.wait_log(rf"tftp: \S+ -> pid {new}$")
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: pid_gone(old), what="the old program gone")
        new = udp_ask(port, b"hello")
        assert new != old
        second.wait_log(rf"tftp: \S+ -> pid {new}$")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(old, signal.SIGKILL)


def test_a_converted_debian_xinetd_d_with_disabled_uninstalled_servers_checks_and_starts(
    inetd: Start, tmp_path: Path
) -> None:
    """Debian's xinetd.d ships services `disable = yes` whose servers are not installed (and
    whose users do not exist): xinetd ignores them; the converted file passes --check, pyinetd
    starts, serves the enabled service and binds nothing for the disabled one."""
    echo_port, telnet_port = free_port(), free_port()
    confd = tmp_path / "xinetd.d"
    confd.mkdir()
    (confd / "echo").write_text(
        "service echo\n{\n type = INTERNAL UNLISTED\n id = echo-stream\n socket_type = stream\n"
        f" protocol = tcp\n wait = no\n user = root\n port = {echo_port}\n"
        " bind = 127.0.0.1\n disable = no\n}\n"
    )
    (confd / "telnet").write_text(
        "service telnet\n{\n type = UNLISTED\n socket_type = stream\n protocol = tcp\n"
        f" wait = no\n user = pyi-admin-telnetd\n port = {telnet_port}\n bind = 127.0.0.1\n"
        " server = /usr/sbin/in.telnetd-pyi-admin-not-installed\n disable = yes\n}\n"
    )
    main = tmp_path / "xinetd.conf"
    main.write_text(f"defaults\n{{\n}}\nincludedir {confd}\n")
    converted = cli("convert", str(main))
    assert converted.returncode == 0, converted.stderr
    conf = tmp_path / "converted.yaml"
    conf.write_text(converted.stdout)
    assert yaml.safe_load(converted.stdout)["services"]["telnet"]["enabled"] is False
    check = cli("--check", "-c", str(conf))
    assert check.returncode == 0, check.stderr
    p = inetd(converted.stdout, name="converted.yaml")
    assert tcp_talk(echo_port, b"still served\n") == b"still served\n"
    assert not tcp_listening(telnet_port)
    states = {
        s["name"]: s["state"]
        for s in json.loads(cli("status", "--json", "-c", str(p.path)).stdout)["services"]
    }
    assert (
        states["telnet"] == "disabled"
        and states[next(n for n in states if n != "telnet")] == "listening"
    )


@pytest.mark.parametrize("primitive", ["clone", "posix_spawn"])
def test_a_program_that_cannot_start_is_counted_alike_with_user_and_without(
    inetd: Start, folder: Path, primitive: str
) -> None:
    """Without `user:` a missing program was an error line and a spawn failure (ENOENT);
    with `user:` (the fork path) an info stderr line, "ended (exit 127)" and no failure. Both
    are now the one error line, FAILED=1 and ENOENT=1, in status and in metrics; a setting
    that fails in the child (a removed `cwd`) is counted the same way."""
    plain, dropped, nocwd, mport = free_port(), free_port(), free_port(), free_port()
    prog = script(folder, "gone.sh", "#!/bin/sh\nexit 0\n")
    work = folder / "work"
    work.mkdir()
    p = inetd(
        {
            "metrics": f"127.0.0.1:{mport}",
            "services": {
                "plain": {"listen": f"127.0.0.1:{plain}", "exec": prog},
                "dropped": {"listen": f"127.0.0.1:{dropped}", "exec": prog, "user": "nobody"},
                "nocwd": {
                    "listen": f"127.0.0.1:{nocwd}",
                    "exec": "/bin/true",
                    "user": "nobody",
                    "cwd": str(work),
                },
            },
        },
        env={"PYINETD_SPAWN": primitive},
    )
    os.unlink(prog)  # after load: every start now fails with ENOENT
    work.rmdir()
    for port in (plain, dropped, nocwd):
        assert tcp_talk(port) == b""
    for name, why in (("plain", "/gone.sh"), ("dropped", "/gone.sh"), ("nocwd", "/true")):
        p.wait_log(rf"error: {name}: cannot start \S*{re.escape(why)}: No such file or directory")
    # The fork path's child says which setting failed, in the service's stderr line.
    p.wait_log(r"nocwd\[\d+\]: pyinetd: nocwd: cannot start \S*/true: .*No such file.*/work'")
    assert not re.search(r"ended \(exit 127\)", p.log()), p.log()
    states = status_of(p)
    for name in ("plain", "dropped", "nocwd"):
        assert states[name]["failed_spawns"] == 1, (name, states[name])
        assert states[name]["spawn_failures"] == {"ENOENT": 1}, (name, states[name])
        assert not any(states[name]["exits"].values()), (name, states[name])
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=DEADLINE) as r:
        text = r.read().decode()
    for name in ("plain", "dropped", "nocwd"):
        assert f'pyinetd_spawn_failures_total{{service="{name}"}} 1' in text, text


@pytest.mark.parametrize("warm", [False, True])
def test_each_end_logs_the_programs_cpu_time_and_peak_memory(
    inetd: Start, folder: Path, warm: bool
) -> None:
    """systemd and xinetd users read a connection's CPU time and memory at its end: the
    reaper's wait4 rusage, on the `end` event (cpu_ms, max_rss_kib) and in the text line."""
    port = free_port()
    burn = script(
        folder,
        "burn.py",
        "#!/usr/bin/python3\nimport time\nend = time.process_time() + 0.05\n"
        "while time.process_time() < end:\n    pass\nprint('done', flush=True)\n",
    )
    svc: dict[str, object] = {"listen": f"127.0.0.1:{port}", "exec": burn, "user": "nobody"}
    if warm:
        svc["warm"] = True
    for fmt in ("json", "text"):
        p = inetd({"services": {"burn": svc}}, "--log-format", fmt, name=f"{fmt}.yaml")
        if warm:
            p.wait_log(r"zygote \d+ ready")
        assert tcp_talk(port) == b"done\n"
        if fmt == "json":
            (line,) = p.wait_log(r'"event": ?"end"')
            end = json.loads(line)
            assert end["cpu_ms"] >= 50 and end["max_rss_kib"] > 1000, end
        else:
            (line,) = p.wait_log(r"burn: pid \d+ ended \(exit 0\) after")
            m = re.search(r"after \d+\.\d{3}s, (\d+\.\d) ms CPU, ([\d,]+) KiB$", line)
            assert m and float(m[1]) >= 50 and int(m[2].replace(",", "")) > 1000, line
        p.stop()


def test_restart_beside_a_lingering_tcp_wait_program_takes_the_new_connections(
    inetd: Start, folder: Path
) -> None:
    """The same for a TCP wait program holding its listening socket: the new pyinetd binds
    beside it and every new connection reaches the new pyinetd's program."""
    port = free_port()
    exe = script(
        folder,
        "tcplinger.py",
        "#!/usr/bin/python3\nimport os, signal, socket\nls = socket.socket(fileno=0)\n"
        "c, _ = ls.accept()\nline = c.makefile().readline()\n"
        "c.sendall(str(os.getpid()).encode())\nc.close()\n"
        "if line == 'linger\\n':\n    signal.pause()\n",
    )
    config = {"services": {"w": {"listen": f"127.0.0.1:{port}", "wait": True, "exec": exe}}}
    first = inetd({"services": {"w": {**config["services"]["w"], "user": "nobody"}}})
    old = int(tcp_talk(port, b"linger\n"))
    try:
        assert first.stop() == 0
        second = inetd(config, name="restarted.yaml")
        second.wait_log(rf"w: tcp 127\.0\.0\.1:{port} is also bound by pid {old} \(")
        for _ in range(8):  # the kernel's hash alone would give half to the old program
            new = int(tcp_talk(port, b"hello\n"))
            assert new != old
            second.wait_log(rf"w: \S+ -> pid {new}$")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(old, signal.SIGKILL)
