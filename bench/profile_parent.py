"""Profile the pyinetd parent under load: where does its time go, per connection?

usage: profile.py [--mode cprofile|pyspy] [--conns 5000] [--service exec|echo] [--top 25]
                  [--pyinetd-args "--log-level warning"] [--outdir DIR]

cprofile: pyinetd runs its own main() under cProfile with a CPU-time clock
          (time.process_time), so the table is the parent's CPU by function: what
          "parent CPU ms/1k" in latest.md is made of. cProfile adds its own overhead per call.
pyspy:    py-spy samples the running parent (pip install py-spy; needs ptrace, i.e. root):
          wall time of a non-idle parent, so time blocked in posix_spawn (the vfork child
          runs until its exec, and the parent waits) shows up, where cProfile shows none.
Both print the top functions by self time, then by inclusive time.
"""

from __future__ import annotations

import argparse
import collections
import os
import pstats
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from scale import (
    HERE,
    Pyinetd,
    build_loadgen,
    cat_service,
    cpu_ticks,
    free_ports,
    run_load,
)

CPROFILE_MAIN = """\
import cProfile, sys, time
from pyinetd.cli import main
out = sys.argv[1]
sys.argv = ["pyinetd", *sys.argv[2:]]
prof = cProfile.Profile(time.process_time)
try:
    prof.runcall(main)
finally:
    prof.dump_stats(out)
"""


def collapsed_top(raw: Path, top: int) -> str:
    """Self and inclusive sample counts per frame from py-spy's collapsed (raw) output."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            incl[frame] += n
    out = [f"{total} samples of the non-idle parent", "", "self %  samples  frame"]
    out += [f"{100 * n / total:6.1f}  {n:7d}  {f}" for f, n in own.most_common(top)]
    out += ["", "incl %  samples  frame"]
    out += [f"{100 * n / total:6.1f}  {n:7d}  {f}" for f, n in incl.most_common(top)]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    """Start pyinetd (profiled), load it, print where the parent's time went."""
    env = os.environ
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["cprofile", "pyspy"], default="cprofile")
    ap.add_argument("--python", default=env.get("PYINETD_PYTHON", "python3"))
    ap.add_argument("--pyinetd-args", default=env.get("PYINETD_ARGS", "--log-level warning"))
    ap.add_argument("--service", choices=["exec", "echo"], default="exec")
    ap.add_argument("--conns", type=int, default=5000)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--conc", type=int, default=32)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared")
    ap.add_argument("--outdir", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.outdir is None:
        args.outdir = HERE / "out" / f"profile-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    args.outdir.mkdir(parents=True, exist_ok=True)
    if args.mode == "pyspy" and shutil.which("py-spy") is None:
        ap.error("py-spy not found (pip install py-spy)")

    loadgen = build_loadgen(args.shared, args.outdir)
    (port,) = free_ports(1)
    service: dict[str, object] = (
        cat_service(port)
        if args.service == "exec"
        else {"listen": f"127.0.0.1:{port}", "builtin": "echo"}
    )
    prof_out = args.outdir / "parent.prof"
    launch = [args.python, "-c", CPROFILE_MAIN, str(prof_out)] if args.mode == "cprofile" else []
    server = Pyinetd(args.python, shlex.split(args.pyinetd_args), args.outdir, "profile", launch)
    spy: subprocess.Popen[bytes] | None = None
    raw = args.outdir / "parent.raw"
    try:
        server.start({"services": {"svc": service}}, [port])
        run_load(loadgen, port, args.warmup, args.conc)
        if args.mode == "pyspy":
            spy = subprocess.Popen(
                ["py-spy", "record", "--pid", str(server.pid), "--rate", str(args.rate),
                 "--format", "raw", "-o", str(raw)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(0.5)  # py-spy attaches asynchronously; nothing to wait on but time
        t0, c0 = time.monotonic(), cpu_ticks(server.pid)
        res = run_load(loadgen, port, args.conns, args.conc)
        wall, cpu_s = time.monotonic() - t0, (cpu_ticks(server.pid) - c0) / os.sysconf("SC_CLK_TCK")
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
            spy.wait(30)
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
            spy.wait()
        server.stop()  # SIGTERM: pyinetd returns from main(), so cProfile dumps its stats

    print(
        f"{args.mode}: {res.ok}/{res.conns} ok, {res.rate:.0f} conn/s, p99 {res.p99_ms:.1f} ms; "
        f"parent CPU {cpu_s * 1000 / (args.conns / 1000):.0f} ms/1k conns "
        f"({100 * cpu_s / wall:.0f}% of wall){' with cProfile overhead' if launch else ''}"
    )
    if args.mode == "cprofile":
        stats = pstats.Stats(str(prof_out))
        stats.sort_stats("tottime").print_stats(args.top)
        stats.sort_stats("cumtime").print_stats(args.top)
        print(f"stats: {prof_out} (python -m pstats {prof_out})")
    else:
        print(collapsed_top(raw, args.top))
        print(f"stacks: {raw} (collapsed; flamegraph.pl or speedscope open it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
