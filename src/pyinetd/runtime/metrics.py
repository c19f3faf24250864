"""Per-service distributions: how long service processes ran, and how they ended.

Counts in, numbers out: the server reports each ended process (its duration, wait status and
whether pyinetd killed it); status.py renders what is counted. Kept by service name, so the
counts survive a reload that keeps the service.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field

# Upper bounds in seconds (Prometheus histogram `le` labels); +Inf is implied. From a quick
# echo to an hour-long login session: inetd services span both.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)

# How a service process ended:
#   ok        exit 0
#   error     exit 1-125: the program reported a failure
#   not_run   exit 126/127: the shell's "not executable" / "not found" (and pyinetd's own 127
#             after a failed exec)
#   signal    killed by a signal pyinetd did not send (a crash: SIGSEGV, SIGABRT...)
#   killed    stopped by pyinetd's timeout: (a drain that runs out counts as signal)
EXIT_CLASSES = ("ok", "error", "not_run", "signal", "killed")


def exit_class(wait_status: int, killed_by_us: bool) -> str:
    """The EXIT_CLASSES entry for a wait status (see waitpid(2))."""
    code = os.waitstatus_to_exitcode(wait_status)
    if killed_by_us and (code < 0 or code == 128 + signal.SIGTERM):
        return "killed"
    if code < 0:
        return "signal"
    if code == 0:
        return "ok"
    return "not_run" if code in (126, 127) else "error"


@dataclass
class Histogram:
    """Counts per bucket (not cumulative), their sum and count: Prometheus' histogram."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        """Count one value in the first bucket whose bound is at least ``value``."""
        i = next((i for i, bound in enumerate(BUCKETS) if value <= bound), len(BUCKETS))
        self.counts[i] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(le label, count of values <= it) per bucket, +Inf last, as Prometheus wants."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, n in zip((*(f"{b:g}" for b in BUCKETS), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


@dataclass
class ServiceMetrics:
    """What one service's ended processes add up to."""

    durations: Histogram = field(default_factory=Histogram)
    exits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EXIT_CLASSES, 0))


@dataclass
class Metrics:
    """Every service's ServiceMetrics, by service name."""

    services: dict[str, ServiceMetrics] = field(default_factory=dict)

    def child_ended(self, service: str, duration: float, wait_status: int, killed: bool) -> None:
        """Count one ended service process."""
        m = self.services.get(service)
        if m is None:
            m = self.services[service] = ServiceMetrics()
        m.durations.observe(duration)
        m.exits[exit_class(wait_status, killed)] += 1

    def of(self, service: str) -> ServiceMetrics:
        """The service's metrics (all zero when nothing has ended yet)."""
        return self.services.get(service) or ServiceMetrics()
