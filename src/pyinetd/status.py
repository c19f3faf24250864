"""What is running: one snapshot, rendered as a table, as JSON, or as Prometheus metrics."""

from __future__ import annotations

import json
import logging
import selectors
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyinetd.config import parse_listen_item
from pyinetd.log import event
from pyinetd.runtime import control
from pyinetd.runtime.admission import Refusal
from pyinetd.runtime.listeners import bind_listener
from pyinetd.runtime.services import WaitState

if TYPE_CHECKING:
    from pyinetd.config import Config
    from pyinetd.runtime.agent import Agent
    from pyinetd.runtime.children import Child
    from pyinetd.runtime.loop import Timer
    from pyinetd.runtime.metrics import Metrics
    from pyinetd.runtime.services import ServiceState

REASONS = tuple(Refusal)  # every one, 0 or not, so that a rate() of each is defined


def snapshot(
    config: Config,
    states: Mapping[str, ServiceState],
    children: Iterable[Child],
    session_states: Iterable[ServiceState],
    metrics: Metrics,
    pid: int,
    started: float,
    workers: Iterable[int],
    zygote_of: Callable[[str], dict[str, object] | None] = lambda name: None,
    fronts_of: Callable[[str], list[dict[str, object]] | None] = lambda name: None,
) -> dict[str, Any]:
    """The state of every configured service and of its children, as plain data: from the
    service states, the children, the state of each built-in session and the ended
    children's metrics it is handed."""
    now = time.monotonic()
    services = []
    children = list(children)
    session_states = list(session_states)
    for svc in config.services:
        state = states.get(svc.name)
        listeners = state.listeners if state else []
        if not svc.enabled:
            status = "disabled"
        elif any(lst.waiting.state is WaitState.WAITING for lst in listeners):
            busy = next(lst.waiting.pid for lst in listeners if lst.waiting.pid)
            status = f"waiting on child {busy}"
        elif any(lst.waiting.held for lst in listeners):
            status = "starting child"  # the socket is the child's once its pid is known
        elif any(lst.paused_until > now for lst in listeners):
            until = max(lst.paused_until for lst in listeners)
            wall = time.strftime("%H:%M:%S", time.localtime(time.time() + until - now))
            status = f"paused until {wall}"
        elif listeners and not all(lst.registered for lst in listeners):
            status = "at limit (queueing)"
        else:
            status = "listening"
        if svc.enabled and svc.name in config.failed:
            status = "failed"  # by a file its user can change (config.Config.failed): unbound
        drained = bool(state and state.drained and svc.enabled)
        if drained:  # `pyinetd drain` or a stop's agent_drain_time: served, the agent says drain
            status = "draining" if status == "listening" else f"{status}, draining"
        kids = [
            {
                "pid": c.pid or None,  # none yet while the zygote is asked
                # asked, running, terminating, killed, stuck (children.ChildState): why a
                # slot stays taken, and what sent its signal (timeout, drain, removed)
                "state": c.lifecycle.value,
                "signalled_by": c.why or None,
                "peer": c.peer,
                "age": round(now - c.started, 3),
            }
            for c in children
            if c.state is state
        ]
        sessions = sum(1 for st in session_states if st is state)
        ended = metrics.of(svc.name)
        services.append(
            {
                "name": svc.name,
                "protocol": svc.protocol,
                "listen": [str(a) for a in svc.listen],
                "state": status,
                "draining": drained,
                "running": state.running if state else 0,
                # TLS connections admitted whose ClientHello or handshake is still due
                "pending": state.hellos if state else 0,
                "children": kids,
                # `wait: true`: who holds each socket (services.WaitState): idle (pyinetd,
                # watching it), starting, waiting (the child pid); null for nowait services
                "wait": [
                    {
                        "listen": str(lst.key.address),
                        "state": lst.waiting.state.value,
                        "pid": lst.waiting.pid or None,
                    }
                    for lst in listeners
                ]
                if svc.wait
                else None,
                "builtin_sessions": sessions,
                "accepted": state.accepted if state else 0,
                "bytes": {
                    "in": state.bytes_in if state else 0,
                    "out": state.bytes_out if state else 0,
                },
                "refused": dict(state.refused) if state else {},
                "failed_spawns": state.failed_spawns if state else 0,
                # by reason: an errno name, "stderr" or "user_gone" (ServiceState.spawn_failed)
                "spawn_failures": dict(state.spawn_failures) if state else {},
                # `stderr: log` lines and bytes dropped over stderr_rate, since start
                "stderr_dropped": _stderr_dropped(state),
                # Ended service processes: how (metrics.EXIT_CLASSES), and after how long.
                "exits": dict(ended.exits),
                "durations": {
                    "count": ended.durations.count,
                    "sum": round(ended.durations.total, 6),
                    "buckets": ended.durations.cumulative(),
                },
                # `warm: true`: the zygote (pid, RSS, forks served, state)
                "zygote": zygote_of(svc.name),
                # tls or redirect: its fronts (pid, generation, connections, restarts)
                "fronts": fronts_of(svc.name),
                # failed at load by a file its user can change: 'key: why'
                "failed": config.failed.get(svc.name) if svc.enabled else None,
                # served without such a file (banner, stderr): 'key: why: what instead'
                "notes": list(config.notes.get(svc.name, ())),
            }
        )
    return {
        "pid": pid,
        "config": str(config.path),
        "uptime": round(now - started, 3),
        "children": len(children),
        # `workers: N`: the other accept loops; their children and counts are their own
        "workers": sorted(workers),
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
        if s.get("failed"):
            lines.append(f"  {s['name']}: failed at load: {s['failed']}")
        for note in s.get("notes", ()):
            lines.append(f"  {s['name']}: {note}")
        durations = s.get("durations", {})
        if durations.get("count"):
            exits = " ".join(f"{k}={v}" for k, v in s["exits"].items() if v)
            mean = durations["sum"] / durations["count"]
            lines.append(f"  {s['name']}: {durations['count']} ended ({exits}), mean {mean:.3f}s")
        why = " ".join(f"{k}={v}" for k, v in sorted(s.get("spawn_failures", {}).items()))
        if why:
            lines.append(f"  {s['name']}: failed to start: {why}")
        dropped = s.get("stderr_dropped", {})
        if dropped.get("lines"):
            lines.append(
                f"  {s['name']}: stderr over stderr_rate: {dropped['lines']} lines, "
                f"{dropped['bytes']} bytes dropped"
            )
        for f in s.get("fronts") or ():
            lines.append(
                f"  {s['name']}: front pid {f['pid']} generation {f['generation']} {f['state']}, "
                f"{f['connections']} connections, {f['served']} served, {f['restarts']} restarts"
            )
        z = s.get("zygote")
        if z:
            rss = f"{z['rss_kib'] / 1024:.1f} MiB" if z.get("rss_kib") else "-"
            why = f" ({z['reason']})" if z.get("reason") else ""
            lines.append(
                f"  {s['name']}: zygote pid {z['pid'] or '-'} {z['state']}{why}, RSS {rss}, "
                f"{z['forks']} forks served"
                + (
                    f", {z['process_forks']} of {z['max_forks']} before its replacement "
                    f"({z['replaced']} replaced)"
                    if z.get("max_forks")
                    else ""
                )
            )
        for c in s["children"]:
            by = f" ({c['signalled_by']})" if c.get("signalled_by") else ""
            lines.append(
                f"  {s['name']}: pid {c['pid'] or '-'} {c['peer']} age {c['age']:.1f}s "
                f"{c['state']}{by}"
            )
    return "\n".join(lines)


def _stderr_dropped(state: ServiceState | None) -> dict[str, int]:
    log = state.stderr_log if state else None
    if log is None:
        return {"lines": 0, "bytes": 0}
    return {"lines": log.budget.total_dropped_lines, "bytes": log.budget.total_dropped_bytes}


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
    family(
        "pyinetd_service_failed",
        "gauge",
        "1 when the service failed at load by a file its user can change (not listening).",
    )
    for s in snap["services"]:
        out.append(
            f'pyinetd_service_failed{{service="{_label(s["name"])}"}} {int(bool(s.get("failed")))}'
        )
    family(
        "pyinetd_service_draining",
        "gauge",
        "1 while the service drains (pyinetd drain, or a stop): the agent-check answers drain.",
    )
    for s in snap["services"]:
        draining = int(bool(s.get("draining")))
        out.append(f'pyinetd_service_draining{{service="{_label(s["name"])}"}} {draining}')
    family("pyinetd_connections_accepted_total", "counter", "Connections admitted.")
    for s in snap["services"]:
        out.append(
            f'pyinetd_connections_accepted_total{{service="{_label(s["name"])}"}} {s["accepted"]}'
        )
    family(
        "pyinetd_bytes_total",
        "counter",
        "Bytes pyinetd carried for a service's clients (built-ins), by direction.",
    )
    for s in snap["services"]:
        for direction in ("in", "out"):
            out.append(
                f'pyinetd_bytes_total{{service="{_label(s["name"])}",direction="{direction}"}} '
                f"{s['bytes'][direction]}"
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
        "pyinetd_spawn_failures_by_reason_total",
        "counter",
        "Service processes that failed to start, by reason (errno name, stderr, user_gone).",
    )
    for s in snap["services"]:
        for reason, n in sorted(s.get("spawn_failures", {}).items()):
            out.append(
                f'pyinetd_spawn_failures_by_reason_total{{service="{_label(s["name"])}",'
                f'reason="{_label(reason)}"}} {n}'
            )
    for unit in ("lines", "bytes"):
        name = f"pyinetd_stderr_dropped_{unit}_total"
        family(name, "counter", f"{unit.capitalize()} of service stderr dropped over stderr_rate.")
        for s in snap["services"]:
            n = s.get("stderr_dropped", {}).get(unit, 0)
            out.append(f'{name}{{service="{_label(s["name"])}"}} {n}')
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
    warm = [(_label(s["name"]), s["zygote"]) for s in snap["services"] if s.get("zygote")]
    if warm:
        family("pyinetd_zygote_ready", "gauge", "1 when a warm service's zygote is ready.")
        for name, z in warm:
            out.append(f'pyinetd_zygote_ready{{service="{name}"}} {int(z["state"] == "ready")}')
        family("pyinetd_zygote_forks_total", "counter", "Processes a warm service's zygote forked.")
        for name, z in warm:
            out.append(f'pyinetd_zygote_forks_total{{service="{name}"}} {z["forks"]}')
        family("pyinetd_zygote_rss_bytes", "gauge", "Resident memory of a warm service's zygote.")
        for name, z in warm:
            out.append(f'pyinetd_zygote_rss_bytes{{service="{name}"}} {(z["rss_kib"] or 0) * 1024}')
    fronted = [(_label(s["name"]), f) for s in snap["services"] for f in s.get("fronts") or ()]
    for metric, key, kind, text in _FRONT_METRICS:
        if fronted:
            family(metric, kind, text)
        for name, f in fronted:
            labels = f'service="{name}",pid="{f["pid"]}",generation="{f["generation"]}"'
            out.append(f"{metric}{{{labels}}} {f[key]}")
    return "\n".join(out) + "\n"


_FRONT_METRICS = (
    ("pyinetd_front_connections", "connections", "gauge", "Connections a front carries now."),
    ("pyinetd_front_served_total", "served", "counter", "Connections handed to a front."),
    ("pyinetd_front_restarts_total", "restarts", "counter", "Fronts of the service restarted."),
)


# ---------------------------------------------------------------- control socket and metrics


class Operations:
    """The control socket's commands, the metrics page and the agent-check port (``agent``),
    over the callables handed in."""

    def __init__(
        self,
        *,
        snapshot: Callable[[], dict[str, Any]],
        reload: Callable[[], list[str]],
        stop: Callable[[str], None],
        agent: Agent,
    ) -> None:
        self._snapshot, self._reload, self._stop = snapshot, reload, stop
        self.agent = agent
        self.servers: list[control.RequestServer] = []
        # An fd the control socket may give up at the fd limit (control.FdReserve): `status`
        # and `stop` answer while clients hold every other fd.
        self._reserve: control.FdReserve | None = None
        # `pyinetd upgrade` (upgrade.Upgrade.begin), answered later: set by the server
        self.upgrade: Callable[[control.Later | None], None] | None = None

    def start(
        self,
        config: Config,
        path: str | None,
        sel: selectors.BaseSelector,
        call_later: Callable[[float, Callable[[], None]], Timer],
    ) -> None:
        """Open the control socket (`--control`, else the config's) and the metrics port."""
        path = path or config.control_socket or control.default_control_path(config.path)
        try:
            sock = control.bind_control(path)
        except OSError as exc:
            event(
                logging.WARNING,
                f"control socket {path}: {exc.strerror or exc}; "
                "`pyinetd status/reload/stop` will not reach this instance",
                event="control_error",
            )
        else:
            self._reserve = control.FdReserve()
            self.servers.append(
                control.RequestServer(
                    sock=sock,
                    selector=sel,
                    handle=self.on_control,
                    terminator=b"\n",
                    call_later=call_later,
                    reserve=self._reserve,
                )
            )
        if config.metrics:
            addr = parse_listen_item(config.metrics, "tcp", Path("."))
            try:
                msock = bind_listener("tcp", addr)
            except OSError as exc:
                event(
                    logging.WARNING, f"metrics {addr}: {exc.strerror or exc}", event="metrics_error"
                )
            else:
                self.servers.append(
                    control.RequestServer(
                        sock=msock,
                        selector=sel,
                        handle=self.on_metrics,
                        terminator=b"\r\n\r\n",
                        call_later=call_later,
                    )
                )
        self.agent.start(config, sel, call_later)

    def close(self) -> None:
        """Close the control socket, the metrics port and the agent's."""
        self.agent.close()
        for server in self.servers:
            server.close()
        self.servers.clear()
        if self._reserve is not None:
            self._reserve.close()
            self._reserve = None

    def stop(self, why: str) -> None:
        """SIGTERM or `pyinetd stop`: with an agent port and `shutdown: drain`, the agent says
        drain for agent_drain_time before the stop closes the listeners (Agent.hold_stop)."""
        if not self.agent.hold_stop(why, self._stop):
            self._stop(why)

    def on_control(self, request: bytes) -> bytes | control.Later:
        """Answer one control request (status, reload, stop, drain [NAME], undrain [NAME],
        upgrade) as a JSON line."""
        line = request.decode("utf-8", "replace").split("\n", 1)[0]
        words = line.split(None, 1)
        cmd = words[0] if words else ""
        answer: dict[str, object]
        if cmd == "status":
            answer = {"ok": True, "status": self._snapshot()}
        elif cmd == "reload":
            errors = self._reload()
            answer = {"ok": not errors, "errors": errors}
        elif cmd == "stop":
            self.stop("control socket")
            answer = {"ok": True}
        elif cmd in ("drain", "undrain"):
            # The rest of the line is the name (a service's name may hold spaces).
            errors = self.agent.drain(words[1].strip() if len(words) > 1 else "", cmd == "drain")
            answer = {"ok": not errors, "errors": errors}
        elif cmd == "upgrade" and self.upgrade is not None:
            later = control.Later()
            self.upgrade(later)
            return later
        else:
            answer = {"ok": False, "errors": [f"unknown command {cmd!r}"]}
        return json.dumps(answer).encode() + b"\n"

    def on_metrics(self, request: bytes) -> bytes:
        """Answer one HTTP request for /metrics."""
        line = request.split(b"\r\n", 1)[0].split()
        if len(line) >= 2 and line[0] == b"GET" and line[1].split(b"?")[0] in (b"/metrics", b"/"):
            body = render_prometheus(self._snapshot()).encode()
            return control.http_response("200 OK", body, "text/plain; version=0.0.4")
        return control.http_response("404 Not Found", b"not found\n", "text/plain")
