"""Connection churn: thousands of short connections to an exec'd service leave nothing behind."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from conftest import Pyinetd, children_of, free_port, wait_for
from stresslib import fd_count, rss_kb, run_load, scaled

Start = Callable[..., Pyinetd]

CHURN = int(os.environ.get("STRESS_CHURN", "0")) or scaled(5000)
IN_FLIGHT = 200
WARM_UP = 1000


def idle(p: Pyinetd) -> None:
    """Wait until every child of the parent has been reaped."""
    wait_for(lambda: not children_of(p.pid), timeout=30, what="every child reaped")


# "watcher": the exit watcher (reaper.py) starts at 50 live children, so with 200 in flight
# it comes and goes with the load, and most children are reaped through it.
@pytest.mark.parametrize("watch_from", [0, 50], ids=["waitpid", "watcher"])
def test_churn_leaves_no_failures_zombies_fds_or_memory(inetd: Start, watch_from: int) -> None:
    port = free_port()
    env = {"PYINETD_WATCH_FROM": str(watch_from or 10**6)}
    p = inetd(
        {"services": {"cat": {"listen": f"127.0.0.1:{port}", "exec": "/bin/cat"}}},
        "--log-level",
        "info" if watch_from else "warning",
        env=env,
    )
    warm = run_load(port, WARM_UP, IN_FLIGHT)
    assert warm.ok == WARM_UP, warm.summary()
    idle(p)
    fds_before, rss_before = fd_count(p.pid), rss_kb(p.pid)

    res = run_load(port, CHURN, IN_FLIGHT, deadline=300)
    print(f"\nchurn {CHURN} x /bin/cat at {IN_FLIGHT} in flight: {res.summary()}")
    assert res.ok == CHURN and not res.failed, res.summary()

    idle(p)
    assert children_of(p.pid) == []  # no zombies: every child was reaped
    fds_after, rss_after = fd_count(p.pid), rss_kb(p.pid)
    print(f"parent fds {fds_before} -> {fds_after}, VmRSS {rss_before} -> {rss_after} KiB")
    assert fds_after == fds_before
    assert abs(rss_after - rss_before) <= 0.05 * rss_before, (rss_before, rss_after)
    assert p.proc.poll() is None
    assert "error" not in p.log()
    if watch_from:
        assert "exit watcher started" in p.log()
        assert "exit watcher gone" not in p.log()
