"""What is running: one snapshot, rendered as a table, as JSON, or as Prometheus metrics."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyinetd.server import Server

REASONS = (
    "deny",
    "limit",
    "max_children",
    "per_source",
    "rate",
    "proxy",
    "proxy_from",
    "tls",
    "pending",
    "pending_per_source",
    "loop",
)


def snapshot(server: Server) -> dict[str, Any]:
    """The state of every configured service and of its children, as plain data."""
    now = time.monotonic()
    services = []
    for svc in server.config.services:
        state = server.states.get(svc.name)
        listeners = state.listeners if state else []
        if not svc.enabled:
            status = "disabled"
        elif any(lst.waiting_on for lst in listeners):
            pid = next(lst.waiting_on for lst in listeners if lst.waiting_on)
            status = f"waiting on child {pid}"
        elif any(lst.paused_until > now for lst in listeners):
            until = max(lst.paused_until for lst in listeners)
            wall = time.strftime("%H:%M:%S", time.localtime(time.time() + until - now))
            status = f"paused until {wall}"
        elif listeners and not all(lst.registered for lst in listeners):
            status = "at limit (queueing)"
        else:
            status = "listening"
        kids = [
            {"pid": c.pid, "peer": c.peer, "age": round(now - c.started, 3)}
            for c in server.children.values()
            if c.state is state
        ]
        sessions = sum(1 for st, _, _ in server.sessions.values() if st is state)
        ended = server.child_metrics.of(svc.name)
        services.append(
            {
                "name": svc.name,
                "protocol": svc.protocol,
                "listen": [str(a) for a in svc.listen],
                "state": status,
                "running": state.running if state else 0,
                "children": kids,
                "builtin_sessions": sessions,
                "accepted": state.accepted if state else 0,
                "refused": dict(state.refused) if state else {},
                "failed_spawns": state.failed_spawns if state else 0,
                # Ended service processes: how (metrics.EXIT_CLASSES), and after how long.
                "exits": dict(ended.exits),
                "durations": {
                    "count": ended.durations.count,
                    "sum": round(ended.durations.total, 6),
                    "buckets": ended.durations.cumulative(),
                },
            }
        )
    return {
        "pid": server.pid,
        "config": str(server.config.path),
        "uptime": round(now - server.started, 3),
        "children": len(server.children),
        # `workers: N`: the other accept loops; their children and counts are their own
        "workers": sorted(server.workers),
        "services": services,
    }


def render_table(snap: dict[str, Any]) -> str:
    """A table for people: one row per service, then its children."""
    rows = [("SERVICE", "LISTEN", "STATE", "RUNNING", "ACCEPTED", "REFUSED", "FAILED")]
    for s in snap["services"]:
        refused = ",".join(f"{k}={v}" for k, v in sorted(s["refused"].items())) or "0"
        rows.append(
            (
                s["name"],
                " ".join(f"{s['protocol']}/{a}" for a in s["listen"]),
                s["state"],
                str(s["running"]),
                str(s["accepted"]),
                refused,
                str(s["failed_spawns"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        f"pyinetd pid {snap['pid']}, {snap['config']}, up {snap['uptime']:.0f}s, "
        f"{snap['children']} children"
        + (
            f"; workers {' '.join(map(str, snap['workers']))} (counts above are this process's)"
            if snap.get("workers")
            else ""
        )
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    for s in snap["services"]:
        durations = s.get("durations", {})
        if durations.get("count"):
            exits = " ".join(f"{k}={v}" for k, v in s["exits"].items() if v)
            mean = durations["sum"] / durations["count"]
            lines.append(f"  {s['name']}: {durations['count']} ended ({exits}), mean {mean:.3f}s")
        for c in s["children"]:
            lines.append(f"  {s['name']}: pid {c['pid']} {c['peer']} age {c['age']:.1f}s")
    return "\n".join(lines)


def _label(value: str) -> str:
    """Escape a Prometheus label value (text format: backslash, quote, newline)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_prometheus(snap: dict[str, Any]) -> str:
    """The Prometheus text exposition format (version 0.0.4)."""
    out: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")

    family("pyinetd_up_seconds", "gauge", "Seconds since pyinetd started.")
    out.append(f"pyinetd_up_seconds {snap['uptime']}")
    family("pyinetd_children", "gauge", "Running service processes, all services.")
    out.append(f"pyinetd_children {snap['children']}")
    family("pyinetd_service_running", "gauge", "Running instances (processes and built-ins).")
    for s in snap["services"]:
        out.append(f'pyinetd_service_running{{service="{_label(s["name"])}"}} {s["running"]}')
    family("pyinetd_connections_accepted_total", "counter", "Connections admitted.")
    for s in snap["services"]:
        out.append(
            f'pyinetd_connections_accepted_total{{service="{_label(s["name"])}"}} {s["accepted"]}'
        )
    family("pyinetd_connections_refused_total", "counter", "Connections refused, by reason.")
    for s in snap["services"]:
        for reason in REASONS:
            n = s["refused"].get(reason, 0)
            out.append(
                f'pyinetd_connections_refused_total{{service="{_label(s["name"])}",'
                f'reason="{reason}"}} {n}'
            )
    family("pyinetd_spawn_failures_total", "counter", "Service processes that failed to start.")
    for s in snap["services"]:
        out.append(
            f'pyinetd_spawn_failures_total{{service="{_label(s["name"])}"}} {s["failed_spawns"]}'
        )
    family(
        "pyinetd_process_duration_seconds",
        "histogram",
        "How long service processes ran, from start to exit.",
    )
    for s in snap["services"]:
        name = _label(s["name"])
        durations = s["durations"]
        for le, n in durations["buckets"]:
            out.append(f'pyinetd_process_duration_seconds_bucket{{service="{name}",le="{le}"}} {n}')
        out.append(f'pyinetd_process_duration_seconds_sum{{service="{name}"}} {durations["sum"]}')
        out.append(
            f'pyinetd_process_duration_seconds_count{{service="{name}"}} {durations["count"]}'
        )
    family(
        "pyinetd_process_exits_total",
        "counter",
        "Service processes ended, by how: ok (exit 0), error (exit 1-125), not_run (126, 127), "
        "signal, killed (by the service's timeout).",
    )
    for s in snap["services"]:
        for how, n in s["exits"].items():
            out.append(
                f'pyinetd_process_exits_total{{service="{_label(s["name"])}",class="{how}"}} {n}'
            )
    return "\n".join(out) + "\n"
