#!/usr/bin/env python3
"""Per-rule cost of the sandbox (issue 17): N spawns of /bin/true through pyinetd's spawn
primitive (_spawn.start, the clone child), one after the other, with each rule alone and all
together; the cost is the time from start() to the child's exit, less the same without a
sandbox. Run as root (namespaces need it):

    sudo .venv/bin/python bench/sandbox_micro.py [-n 2000] [--primitive start|spawn|fork]

Small and serial on purpose: it measures what one connection pays, not throughput (that is
bench/run.sh's row, which the lead runs on a quiet machine).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from pyinetd import _spawn
from pyinetd.config import Service
from pyinetd.sandbox import Prepared, SandboxSettings
from pyinetd.spawn import Spawner, handled_signals

SYSTEM = ("/usr", "/lib", "/lib64", "/bin", "/etc")
RULES: dict[str, SandboxSettings | None] = {
    "none (no sandbox)": None,
    "no_new_privs only (sandbox: {})": SandboxSettings(),
    "read (Landlock)": SandboxSettings(read=SYSTEM),
    "write (Landlock)": SandboxSettings(write=("/dev/null",)),
    "network: none (setns)": SandboxSettings(network="none"),
    # start: born in the cgroup (clone3); spawn and fork: the child moves itself there
    "network: loopback (cgroup BPF)": SandboxSettings(network="loopback"),
    "private_tmp (setns)": SandboxSettings(private_tmp=True),
    "syscalls: default (seccomp)": SandboxSettings(syscalls="default"),
    "all of them": SandboxSettings(
        read=SYSTEM, write=("/dev/null",), network="none", private_tmp=True, syscalls="default"
    ),
}


def one_round(how: str, settings: SandboxSettings | None, n: int) -> list[float]:
    """n spawn-to-exit times in microseconds."""
    null = os.open(os.devnull, os.O_RDWR)
    report_r, report_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    box = Prepared(settings, "bench") if settings is not None else None
    reset = handled_signals()
    argv, env = [b"/bin/true"], [b"PATH=/usr/bin:/bin"]
    spawner = Spawner()
    spawner.primitive = "posix_spawn"
    # umask: every row on the fork path (os.fork + Python), the baseline too
    svc = Service(name="b", listen=(), exec=("/bin/true",), sandbox=settings, umask=0o022)
    out = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            if how == "fork":
                pid = spawner.spawn(svc, null, null, null, [])
            elif box is None:
                pid = getattr(_spawn, how)(argv, env, [], null, null, null, report_w, reset)
            else:
                pid = getattr(_spawn, how)(
                    argv, env, [], null, null, null, report_w, reset, sandbox=box.c_arg
                )
            _, status = os.waitpid(pid, 0)
            out.append((time.perf_counter() - t0) * 1e6)
            if status != 0:
                sys.exit(f"/bin/true failed under {settings}: status {status}")
    finally:
        spawner.close()
        if box is not None:
            box.close()
        for fd in (null, report_r, report_w):
            os.close(fd)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=2000, help="spawns per rule (default 2000)")
    ap.add_argument("--primitive", default="start", choices=["start", "spawn", "fork"])
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root: network: none and private_tmp prepare namespaces", file=sys.stderr)
        return 2
    one_round(args.primitive, None, 50)  # warm up: slots mapped, caches hot
    base = 0.0
    print(f"{args.n} spawns of /bin/true each, primitive {args.primitive}, median us per spawn")
    # Interleaved in 4 rounds, so that the machine's other load falls on every rule alike.
    results: dict[str, list[float]] = {name: [] for name in RULES}
    for _ in range(4):
        for name, settings in RULES.items():
            results[name] += one_round(args.primitive, settings, args.n // 4)
    for name in RULES:
        med = statistics.median(results[name])
        if name.startswith("none"):
            base = med
        print(f"  {name:<36} {med:8.1f} us   {med - base:+7.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
