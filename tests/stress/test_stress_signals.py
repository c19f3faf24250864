"""Signal storms: SIGHUP reloads under load, SIGCHLD arriving in the middle of reloads."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from conftest import DEADLINE, Pyinetd, children_of, free_port, port_open, tcp_talk, wait_for
from stresslib import LoadThread, scaled

Start = Callable[..., Pyinetd]

HUPS = 100
HUP_SPACING = 0.01  # 100 SIGHUPs in about a second


def rewrite(path: Path, config: dict[str, object]) -> None:
    """Replace the configuration file atomically (a reload never reads half a file)."""
    tmp = path.with_suffix(".new")
    tmp.write_text(yaml.safe_dump(config))
    os.replace(tmp, path)


def hup_storm(p: Pyinetd, configs: list[dict[str, object]]) -> None:
    """Send HUPS SIGHUPs about HUP_SPACING apart, switching the file between ``configs``."""
    for i in range(HUPS):
        rewrite(p.path, configs[i % len(configs)])
        p.signal(signal.SIGHUP)
        time.sleep(HUP_SPACING)  # pacing the storm, not synchronisation


def test_sighup_storm_under_load_fails_no_connection(inetd: Start) -> None:
    cat, extra = free_port(), free_port()
    base = {"cat": {"listen": f"127.0.0.1:{cat}", "exec": "/bin/cat"}}
    with_extra = {**base, "extra": {"listen": f"127.0.0.1:{extra}", "builtin": "echo"}}
    p = inetd({"services": base})
    load = LoadThread(cat, total=10**6, concurrency=20)
    load.start()
    try:
        wait_for(lambda: load.progress[0] >= 50, what="load under way")
        at_start = load.progress[0]
        # Every other reload adds or removes a service; `cat` itself never changes.
        hup_storm(p, [{"services": with_extra}, {"services": base}])
        assert load.is_alive() and load.progress[0] > at_start + 50  # load ran throughout
    finally:
        res = load.finish()
    reloads = len(re.findall(r"reloaded: ", p.log()))
    print(f"\n{HUPS} SIGHUPs, {reloads} reloads; cat: {res.summary()}")
    assert not res.failed and res.ok > 100, res.summary()
    assert reloads >= 5
    assert "reload failed" not in p.log() and "internal error" not in p.log()
    # The reloads really applied: the last written file (without `extra`) is in force ...
    wait_for(lambda: not port_open(extra), what="extra removed by the last reload")
    rewrite(p.path, {"services": with_extra})
    p.signal(signal.SIGHUP)  # ... and the next one adds it again.
    wait_for(lambda: port_open(extra), what="extra added")
    assert tcp_talk(extra, b"x") == b"x"
    wait_for(lambda: not children_of(p.pid), what="every child reaped")


def test_sigchld_during_reloads_loses_no_reap(inetd: Start) -> None:
    port = free_port()

    def config(gen: int) -> dict[str, object]:
        # The service's definition changes at every reload; children of the previous
        # definition exit (SIGCHLD) while the next reloads happen.
        return {"services": {"die": {
            "listen": f"127.0.0.1:{port}", "env": {"GEN": str(gen)},
            "exec": ["/bin/sh", "-c", "exit 3"],
        }}}  # fmt: skip

    p = inetd(config(0))
    stop = threading.Event()
    talks = [0]
    errors: list[BaseException] = []

    def client() -> None:
        try:
            while not stop.is_set() and talks[0] < scaled(100_000):
                assert tcp_talk(port) == b""
                talks[0] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: talks[0] >= 20, what="children starting and exiting")
        hup_storm(p, [config(gen) for gen in range(1, 8)])
    finally:
        stop.set()
        for t in threads:
            t.join(DEADLINE)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    wait_for(lambda: not children_of(p.pid), what="every child reaped")  # no zombies
    wait_for(
        lambda: len(re.findall(r"die: pid \d+ ended", p.log())) == talks[0],
        what="an end line for every start",
    )
    log = p.log()
    started = set(re.findall(r"die: \S+ -> pid (\d+)", log))
    ended = set(re.findall(r"die: pid (\d+) ended \(exit 3\)", log))
    reloads = len(re.findall(r"reloaded: ", log))
    print(f"\n{talks[0]} children, {reloads} reloads")
    assert len(started) == talks[0] and started == ended  # every child reaped, exactly once
    assert reloads >= 5
    assert "internal error" not in log and "unknown pid" not in log
