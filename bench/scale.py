"""Scale experiments for pyinetd on 127.0.0.1: many services, many live children, parent RSS.

usage: scale.py [--python python3] [--services 1,100] [--children 10,2000] [--rss-services 20]
                [--conns N] [--conc N] [--md bench/results/latest.md] [--outdir DIR]

(a) accept+spawn cost with 1 vs 100 services configured: the same load against one of them;
    conn/s and the parent's CPU (utime+stime from /proc/PID/stat) per 1000 connections.
    Reference rows: bench/ref_vfork.c (accept+vfork+execve in C) holding as many sockets.
(b) 10 vs 2000 live children: hold N connections open to an exec /bin/cat service (each
    confirmed by an echoed byte), then measure fresh connections on another service.
    Reference rows: tcpserver with as many children held.
(c) parent RSS with 20 services configured, idle and after a load run.
Load comes from the shared kit's loadgen.c (../shared/bench), compiled into --outdir at run
time. Every pyinetd started here is stopped here, with whatever children it left.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
PAYLOAD = 64
READY_S = 10.0  # pyinetd must listen and echo within this
HOLD_BATCH = 64  # connections in flight while building up the held set
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class LoadResult:
    """What loadgen printed for one run."""

    conns: int
    ok: int
    fail: int
    rate: float
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True)
class Row:
    """One line of the scale table."""

    experiment: str
    setting: str
    rate: float | None
    p50_ms: float | None
    p99_ms: float | None
    cpu_ms_per_1k: float | None
    rss_kb: int | None
    note: str


# ---------------------------------------------------------------- /proc probes


def _stat_fields(pid: int) -> list[str]:
    """Fields 3.. of /proc/PID/stat (after the parenthesised comm, which may hold spaces)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def cpu_ticks(pid: int) -> int:
    """utime + stime of pid itself (fields 14 and 15 of /proc/PID/stat), in clock ticks."""
    f = _stat_fields(pid)
    return int(f[11]) + int(f[12])


def rss_kb(pid: int) -> int | None:
    """VmRSS of pid in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


def _ppid_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, starttime) for every process."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            f = _stat_fields(int(entry.name))
        except (OSError, ValueError):
            continue  # gone between scandir and open
        table[int(entry.name)] = (int(f[1]), f[19])
    return table


def live_children(pid: int) -> int:
    """How many direct children of pid exist that are not zombies."""
    n = 0
    for child, (ppid, _start) in _ppid_table().items():
        if ppid != pid:
            continue
        try:
            if _stat_fields(child)[0] != "Z":
                n += 1
        except OSError:
            continue
    return n


def descendants(pid: int) -> dict[int, str]:
    """pid -> starttime of every descendant of pid."""
    table = _ppid_table()
    kids: dict[int, list[int]] = {}
    for p, (pp, _start) in table.items():
        kids.setdefault(pp, []).append(p)
    out: dict[int, str] = {}
    todo = list(kids.get(pid, []))
    while todo:
        p = todo.pop()
        out[p] = table[p][1]
        todo.extend(kids.get(p, []))
    return out


def _starttime(pid: int) -> str | None:
    try:
        return _stat_fields(pid)[19]
    except OSError:
        return None


# ---------------------------------------------------------------- load


def build_loadgen(shared: Path, outdir: Path) -> Path:
    """Compile the kit's loadgen.c into outdir (never into the repository)."""
    src = shared / "bench" / "loadgen.c"
    if not src.is_file():
        raise SystemExit(f"scale.py: {src} not found (set --shared)")
    if shutil.which("gcc") is None:
        raise SystemExit("scale.py: gcc is needed to build loadgen (apt-get install -y gcc)")
    exe = outdir / "loadgen"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(src)], check=True)
    return exe


def build_ref_vfork(outdir: Path) -> Path:
    """Compile bench/ref_vfork.c (the C floor) into outdir."""
    exe = outdir / "ref_vfork"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(HERE / "ref_vfork.c")], check=True)
    return exe


def run_load(loadgen: Path, port: int, conns: int, conc: int, timeout_s: int = 60) -> LoadResult:
    """Run loadgen once against HOST:port and parse its key=value line."""
    proc = subprocess.run(
        [str(loadgen), HOST, str(port), str(conns), str(conc), str(PAYLOAD), str(timeout_s)],
        capture_output=True,
        text=True,
        timeout=timeout_s + 15,
        check=False,
    )
    kv = dict(w.split("=", 1) for w in proc.stdout.split() if "=" in w)
    if "rate" not in kv:
        raise RuntimeError(f"loadgen gave no result: {proc.stdout!r} {proc.stderr!r}")
    return LoadResult(
        int(kv["conns"]),
        int(kv["ok"]),
        int(kv["fail"]),
        float(kv["rate"]),
        float(kv["p50_ms"]),
        float(kv["p99_ms"]),
    )


def echo_once(port: int, timeout: float = 2.0) -> bool:
    """True if HOST:port accepts a connection and echoes a short line."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.sendall(b"ping\n")
            got = b""
            while len(got) < 5:
                chunk = s.recv(5 - len(got))
                if not chunk:
                    return False
                got += chunk
            return got == b"ping\n"
    except OSError:
        return False


def free_ports(n: int) -> list[int]:
    """n distinct loopback ports that were free a moment ago (bound together, then closed)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def raise_nofile(need: int) -> None:
    """Lift RLIMIT_NOFILE to at least need (the hard limit too, which only root may do)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    new_hard = hard if hard == resource.RLIM_INFINITY or hard >= need else need
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, new_hard))
    except (ValueError, OSError) as exc:
        msg = f"scale.py: need {need} open files, limit is {soft}/{hard}: {exc}"
        raise SystemExit(msg) from exc


def hold_connections(port: int, n: int, deadline_s: float = 60.0) -> list[socket.socket]:
    """Open n connections to an echo-by-exec service, each confirmed by one echoed byte."""
    held: list[socket.socket] = []
    end = time.monotonic() + deadline_s
    try:
        while len(held) < n:
            batch: list[socket.socket] = []
            for _ in range(min(HOLD_BATCH, n - len(held))):
                s = socket.create_connection((HOST, port), timeout=max(0.1, end - time.monotonic()))
                batch.append(s)
                s.sendall(b"x")
            for s in batch:
                s.settimeout(max(0.1, end - time.monotonic()))
                if s.recv(1) != b"x":
                    raise RuntimeError(f"held connection {len(held)} got no echo")
                held.append(s)
            if time.monotonic() > end:
                raise TimeoutError(f"only {len(held)}/{n} connections held in {deadline_s}s")
    except BaseException:
        for s in held:
            s.close()
        raise
    return held


# ---------------------------------------------------------------- pyinetd under test


def launch_command(python: str) -> list[str]:
    """`python -m pyinetd`, or the console script's entry point if there is no __main__.py."""
    probe = "import importlib.util as u, sys; sys.exit(u.find_spec('pyinetd.__main__') is None)"
    if subprocess.run([python, "-c", probe], check=False).returncode == 0:
        return [python, "-m", "pyinetd"]
    return [python, "-c", "import sys; from pyinetd.cli import main; sys.exit(main())"]


def accepts_config(args: argparse.Namespace, config: dict[str, object]) -> bool:
    """True if `pyinetd --check` accepts config (e.g. a top-level key not every version has)."""
    path = args.outdir / "probe.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [*launch_command(args.python), "-c", str(path), "--check"]
    return subprocess.run(cmd, capture_output=True, check=False).returncode == 0


class Pyinetd:
    """One pyinetd process started on a config dict; stopped with its descendants."""

    def __init__(
        self,
        python: str,
        extra_args: Sequence[str],
        outdir: Path,
        tag: str,
        launch: Sequence[str] = (),
    ) -> None:
        self.python = python
        self.extra_args = list(extra_args)
        self.outdir = outdir
        self.tag = tag
        self.launch = list(launch)  # replaces `python -m pyinetd` (e.g. a profiling wrapper)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The parent's pid."""
        assert self.proc is not None
        return self.proc.pid

    def command(self, cfg: Path) -> list[str]:
        launch = self.launch or launch_command(self.python)
        return [*launch, "-c", str(cfg), *self.extra_args]

    def start(self, config: dict[str, object], ready_ports: Sequence[int]) -> None:
        """Write the config, start pyinetd, wait until every ready port echoes."""
        cfg = self.outdir / f"{self.tag}.yaml"
        cfg.write_text(yaml.safe_dump(config, sort_keys=False))
        log = (self.outdir / f"{self.tag}.log").open("wb")
        cmd = self.command(cfg)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        end = time.monotonic() + READY_S
        pending = list(ready_ports)
        while pending:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pyinetd exited {self.proc.returncode}; see {log.name}")
            if echo_once(pending[0], timeout=1.0):
                pending.pop(0)
                continue
            if time.monotonic() > end:
                raise TimeoutError(f"pyinetd not echoing on port {pending[0]}; see {log.name}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM the parent (SIGKILL after 5 s), then any descendant it left behind."""
        if self.proc is None:
            return
        kids = descendants(self.proc.pid) if self.proc.poll() is None else {}
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        for pid, start in kids.items():
            # Only a process that is still the one we saw (same start time) is ours to stop.
            if _starttime(pid) == start:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 15)
        self.proc = None


class Tcpserver(Pyinetd):
    """The reference for (b): ucspi-tcp's tcpserver, fork+exec in C, reaping with
    waitpid(-1) like pyinetd's plain loop; its config dict is ignored."""

    def __init__(self, outdir: Path, tag: str, port: int, limit: int) -> None:
        super().__init__("", (), outdir, tag)
        self.port, self.limit = port, limit

    def command(self, cfg: Path) -> list[str]:
        return ["tcpserver", "-RHl0", "-c", str(self.limit), "-b", "128", HOST, str(self.port),
                "/bin/cat"]  # fmt: skip


class RefVfork(Tcpserver):
    """The reference for (a): bench/ref_vfork.c, a bare accept+vfork+execve loop in C, holding
    `extra` more idle sockets as a super-server with that many more services would."""

    def __init__(self, outdir: Path, tag: str, exe: Path, port: int, extra: int) -> None:
        super().__init__(outdir, tag, port, 0)
        self.exe, self.extra = exe, extra

    def command(self, cfg: Path) -> list[str]:
        return [str(self.exe), str(self.port), "1", str(self.extra)]


@contextlib.contextmanager
def running(
    args: argparse.Namespace, tag: str, config: dict[str, object], ready_ports: Sequence[int]
) -> Iterator[Pyinetd]:
    """A started pyinetd, always stopped on the way out."""
    server = Pyinetd(args.python, shlex.split(args.pyinetd_args), args.outdir, tag)
    try:
        server.start(config, ready_ports)
        yield server
    finally:
        server.stop()


def cat_service(port: int) -> dict[str, object]:
    """An exec /bin/cat service on HOST:port."""
    return {"listen": f"{HOST}:{port}", "exec": ["/bin/cat"]}


def measure(
    server: Pyinetd, loadgen: Path, port: int, args: argparse.Namespace
) -> tuple[LoadResult, float]:
    """Warm up, then one measured load run; returns it and parent CPU ms per 1000 conns."""
    if args.warmup:
        run_load(loadgen, port, args.warmup, args.conc)
    t0 = cpu_ticks(server.pid)
    res = run_load(loadgen, port, args.conns, args.conc)
    t1 = cpu_ticks(server.pid)
    return res, (t1 - t0) * 1000 / CLK_TCK / (args.conns / 1000)


def _note(res: LoadResult) -> str:
    return f"ok {res.ok}/{res.conns}" if res.fail == 0 else f"FAILED {res.fail}/{res.conns}"


# ---------------------------------------------------------------- experiments


def services_experiment(args: argparse.Namespace, loadgen: Path, n: int) -> Row:
    """(a) the same load on one of n configured exec services."""
    ports = free_ports(n)
    config: dict[str, object] = {
        "services": {f"s{i}": cat_service(p) for i, p in enumerate(ports)},
    }
    with running(args, f"services-{n}", config, [ports[0], ports[-1]]) as srv:
        res, cpu = measure(srv, loadgen, ports[0], args)
        rss = rss_kb(srv.pid)
    return Row("a: services configured", str(n), res.rate, res.p50_ms, res.p99_ms, cpu, rss,
               _note(res))  # fmt: skip


def c_services_experiment(args: argparse.Namespace, loadgen: Path, exe: Path, n: int) -> Row:
    """(a) for the C floor: the same load with n-1 more sockets open in the server."""
    port = free_ports(1)[0]
    srv = RefVfork(args.outdir, f"ref-c-services-{n}", exe, port, n - 1)
    try:
        srv.start({}, [port])
        res, cpu = measure(srv, loadgen, port, args)
    finally:
        srv.stop()
    note = f"{_note(res)}; {n} open sockets; reference (same run)"
    return Row("a: services, C vfork floor", str(n), res.rate, res.p50_ms, res.p99_ms, cpu, None,
               note)  # fmt: skip


def children_experiment(args: argparse.Namespace, loadgen: Path, n: int) -> Row:
    """(b) fresh connections on one service while n children are held on another."""
    hold_port, fresh_port = free_ports(2)
    config: dict[str, object] = {
        "services": {"hold": cat_service(hold_port), "fresh": cat_service(fresh_port)},
    }
    limit = n + args.conc + 100  # room for the held children plus the load's in-flight ones
    if accepts_config(args, {"max_children": limit, **config}):
        config = {"max_children": limit, **config}
    raise_nofile(n + args.conc + 256)
    with running(args, f"children-{n}", config, [hold_port, fresh_port]) as srv:
        t0 = time.monotonic()
        held = hold_connections(hold_port, n)
        hold_s = time.monotonic() - t0
        try:
            live = live_children(srv.pid)
            res, cpu = measure(srv, loadgen, fresh_port, args)
            rss = rss_kb(srv.pid)
        finally:
            for s in held:
                s.close()
        # Let the held cats see EOF and be reaped before the parent is stopped (bounded).
        end = time.monotonic() + 10
        while live_children(srv.pid) and time.monotonic() < end:
            time.sleep(0.05)
        left = live_children(srv.pid)
    note = f"{_note(res)}; {live} live children; held in {hold_s:.1f}s; {left} left after 10s"
    if "max_children" not in config:
        note += "; no max_children key"
    return Row("b: live children", str(n), res.rate, res.p50_ms, res.p99_ms, cpu, rss, note)


def tcpserver_children_experiment(args: argparse.Namespace, loadgen: Path, n: int) -> Row:
    """(b) for tcpserver: fresh connections while n are held, all on its one port."""
    port = free_ports(1)[0]
    raise_nofile(n + args.conc + 256)
    srv = Tcpserver(args.outdir, f"tcpserver-children-{n}", port, n + args.conc + 100)
    try:
        srv.start({}, [port])
        held = hold_connections(port, n)
        try:
            live = live_children(srv.pid)
            res, cpu = measure(srv, loadgen, port, args)
        finally:
            for s in held:
                s.close()
    finally:
        srv.stop()
    note = f"{_note(res)}; {live} live children; reference (same run)"
    return Row("b: live children, tcpserver", str(n), res.rate, res.p50_ms, res.p99_ms, cpu,
               None, note)  # fmt: skip


def rss_experiment(args: argparse.Namespace, loadgen: Path, n: int) -> list[Row]:
    """(c) parent RSS with n services configured, idle and after one load run."""
    ports = free_ports(n)
    config: dict[str, object] = {
        "services": {f"s{i}": cat_service(p) for i, p in enumerate(ports)},
    }
    with running(args, f"rss-{n}", config, ports) as srv:
        idle = rss_kb(srv.pid)
        res, cpu = measure(srv, loadgen, ports[0], args)
        after = rss_kb(srv.pid)
    return [
        Row("c: parent RSS", f"{n} services, idle", None, None, None, None, idle, "after start"),
        Row("c: parent RSS", f"{n} services, loaded", res.rate, res.p50_ms, res.p99_ms, cpu,
            after, f"{_note(res)}; after {args.warmup}+{args.conns} conns"),
    ]  # fmt: skip


# ---------------------------------------------------------------- output


def _median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def combine(runs: Sequence[Row]) -> list[Row]:
    """One row per (experiment, setting): medians over rounds; notes of each round kept."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in runs:
        groups.setdefault((r.experiment, r.setting), []).append(r)
    out: list[Row] = []
    for (experiment, setting), rs in groups.items():
        if len(rs) == 1:
            out.append(rs[0])
            continue
        rss = _median([r.rss_kb for r in rs])
        # The first round's note, plus any round's that reports failed connections.
        notes = list(dict.fromkeys([rs[0].note, *(r.note for r in rs if "FAILED" in r.note)]))
        out.append(
            Row(
                experiment,
                setting,
                _median([r.rate for r in rs]),
                _median([r.p50_ms for r in rs]),
                _median([r.p99_ms for r in rs]),
                _median([r.cpu_ms_per_1k for r in rs]),
                None if rss is None else int(rss),
                f"median of {len(rs)}; " + " / ".join(notes),
            )
        )
    return out


def _f(v: float | None, places: int = 1) -> str:
    return "-" if v is None else f"{v:.{places}f}"


def _mib(kb: int | None) -> str:
    return "-" if kb is None else f"{kb / 1024:.1f}"


HEADER = ("experiment", "setting", "conn/s", "p50 ms", "p99 ms", "CPU ms/1k", "RSS MiB", "notes")


def _cells(r: Row) -> tuple[str, ...]:
    return (r.experiment, r.setting, _f(r.rate), _f(r.p50_ms, 2), _f(r.p99_ms, 2),
            _f(r.cpu_ms_per_1k), _mib(r.rss_kb), r.note)  # fmt: skip


def render_text(rows: Sequence[Row]) -> str:
    """A fixed-width table for the terminal."""
    fmt = "{:<22} {:<20} {:>8} {:>7} {:>7} {:>9} {:>7}  {}"
    return "\n".join([fmt.format(*HEADER), *(fmt.format(*_cells(r)) for r in rows)])


def render_markdown(rows: Sequence[Row], args: argparse.Namespace) -> str:
    """The section appended to latest.md."""
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out = [
        "",
        "## Scale experiments (bench/scale.py)",
        "",
        f"`{' '.join(['bench/scale.py', *sys.argv[1:]])}`; {args.rounds} round(s), "
        f"load: {args.conns} connections ({args.warmup} warm-up), {args.conc} in flight, "
        f"{PAYLOAD}-byte echo through exec /bin/cat. {when}",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|---|---|--:|--:|--:|--:|--:|---|",
        *("| " + " | ".join(_cells(r)) + " |" for r in rows),
        "",
        "CPU ms/1k: the pyinetd parent's own utime+stime per 1000 measured connections.",
        "RSS: the parent's VmRSS after the measured run. (a) a flat line from 1 to 100 services",
        "means the accept path does not scan the services; (b) a flat line from few to many live",
        "children means the children table and reaping do not scan the children. The C floor's",
        "(a) rows show what the kernel charges per open socket at every vfork (the fd table is",
        "copied into each child and closed at its exec), whatever the server is written in.",
        "",
    ]
    return "\n".join(out)


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the experiments, print the table, append it to the markdown report."""
    env = os.environ
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", default=env.get("PYINETD_PYTHON", "python3"))
    ap.add_argument("--pyinetd-args", default=env.get("PYINETD_ARGS", ""))
    ap.add_argument("--services", type=_int_list, default=[1, 100])
    ap.add_argument("--children", type=_int_list, default=[10, 2000])
    ap.add_argument("--rss-services", type=int, default=20)
    ap.add_argument("--conns", type=int, default=int(env.get("SCALE_CONNS", "2000")))
    ap.add_argument("--warmup", type=int, default=int(env.get("SCALE_WARMUP", "200")))
    ap.add_argument("--conc", type=int, default=int(env.get("CONC", "32")))
    ap.add_argument("--rounds", type=int, default=int(env.get("ROUNDS", "1")))
    ap.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared")
    ap.add_argument("--outdir", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=HERE / "results" / "latest.md")
    ap.add_argument("--no-md", action="store_true", help="print only")
    ap.add_argument("--no-peer", dest="peer", action="store_false",
                    help="leave out the references (C floor in (a), tcpserver in (b))")  # fmt: skip
    args = ap.parse_args(argv)
    if args.conns < 1 or args.conc < 1 or args.warmup < 0 or args.rounds < 1:
        ap.error("--conns, --conc and --rounds must be >= 1, --warmup >= 0")
    counts = [*args.services, *args.children, *([args.rss_services] if args.rss_services else [])]
    if any(n < 1 or n > 10000 for n in counts):
        ap.error("service and children counts must be in 1..10000 (loopback, bounded)")
    if args.outdir is None:
        args.outdir = HERE / "out" / f"scale-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    args.outdir.mkdir(parents=True, exist_ok=True)

    loadgen = build_loadgen(args.shared, args.outdir)
    ref_c = build_ref_vfork(args.outdir) if args.peer else None
    runs: list[Row] = []
    # Interleaved (1 100 10 2000 1 100 ...): drift on a shared machine hits every setting alike.
    for r in range(1, args.rounds + 1):
        for n in args.services:
            runs.append(services_experiment(args, loadgen, n))
            print(f"r{r} " + render_text(runs[-1:]).splitlines()[1], flush=True)
            if ref_c is not None:
                runs.append(c_services_experiment(args, loadgen, ref_c, n))
                print(f"r{r} " + render_text(runs[-1:]).splitlines()[1], flush=True)
        for n in args.children:
            runs.append(children_experiment(args, loadgen, n))
            print(f"r{r} " + render_text(runs[-1:]).splitlines()[1], flush=True)
            if args.peer and shutil.which("tcpserver"):
                runs.append(tcpserver_children_experiment(args, loadgen, n))
                print(f"r{r} " + render_text(runs[-1:]).splitlines()[1], flush=True)
        if args.rss_services:
            runs.extend(rss_experiment(args, loadgen, args.rss_services))
    rows = combine(runs)
    print()
    print(render_text(rows))
    if not args.no_md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        with args.md.open("a") as f:
            f.write(render_markdown(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
