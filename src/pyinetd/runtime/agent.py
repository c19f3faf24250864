"""HAProxy's agent-check, `pyinetd drain` / `undrain`, and the stop that drains the balancer.

With `agent: ADDRESSES`, HAProxy (`server ... agent-check agent-port P agent-send "NAME\\n"`)
connects, names a service and reads one line, which pyinetd writes and then closes
(HAProxy's configuration manual, "agent-check": words separated by spaces, the line ended by
a newline or the end of the connection):

- ``up ready maxconn:N``: serving; N is the service's max_connections (left out without one),
  so HAProxy queues what pyinetd would queue or refuse. ``ready`` cancels a ``drain`` or
  ``maint`` this agent said before: HAProxy keeps an agent's administrative state until the
  agent itself reverts it.
- ``drain``: `pyinetd drain` (the service or every service), or a stop with `shutdown:
  drain` (agent_drain_time before the listeners close, then until the process exits):
  everything is still served and new connections are still accepted; HAProxy sends none.
- ``maint``: the operator disabled the service (`enabled: false`).
- ``down#why``: it cannot serve: failed at load (by a file its user can change), no
  listening socket, its zygote failed for good; ``down#no such service``.

The agent's port is served like the metrics page (control.RequestServer): at most
MAX_CLIENTS at once, MAX_PER_SOURCE from one address, each AGENT_DEADLINE seconds to send a
line of at most AGENT_LINE_MAX bytes, so a slowloris cannot pin the parent's fds.
"""

from __future__ import annotations

import logging
import selectors
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyinetd.config import parse_listen_item
from pyinetd.log import event
from pyinetd.runtime import control, systemd
from pyinetd.runtime.listeners import bind_listener

if TYPE_CHECKING:
    from pyinetd.config import Config
    from pyinetd.runtime.services import Services, ServiceState

AGENT_DEADLINE = 2.0  # HAProxy sends its agent-send string as it connects
AGENT_LINE_MAX = 256  # a service's name and its newline
MAX_CLIENTS = 32
MAX_PER_SOURCE = 8  # one HAProxy checks each of its servers (services) on its own connection
REASON_MAX = 120  # characters of a down#reason


def _reason(text: str) -> str:
    """A down#reason on one line of printable ASCII (HAProxy shows it on its stats page)."""
    clean = "".join(c if " " <= c <= "~" else "?" for c in text)
    return clean[:REASON_MAX]


class Agent:
    """The agent's answers from the services' state, the drain marks, and the agent port."""

    def __init__(
        self, *, services: Services, zygote_of: Callable[[str], dict[str, object] | None]
    ) -> None:
        self._services = services
        self._zygote_of = zygote_of
        self.servers: list[control.RequestServer] = []
        self._call_later: Callable[[float, Callable[[], None]], Any] | None = None
        self._stop_timer: Any = None  # the agent_drain_time wait of a stop
        self._held = False  # a stop has waited (or is waiting) agent_drain_time

    # ------------------------------------------------------------ the answer
    def health(self, name: str) -> str:
        """The agent's line (without its newline) for the service ``name``."""
        services = self._services
        config = services.config
        state = services.states.get(name)
        if state is None or not any(s is state.service for s in config.services):
            return "down#no such service"
        svc = state.service
        if not svc.enabled:
            return "maint"
        if name in config.failed:
            key = config.failed[name].split(":", 1)[0]  # 'key: why'; the why may name files
            return f"down#{_reason(f'failed at load: {key}')}"
        if state.drained or services.stopping:
            return "drain"
        if not state.listeners:
            return "down#not listening"
        zygote = self._zygote_of(name)
        if zygote is not None and zygote.get("state") == "failed":
            why = zygote.get("reason") or ""
            return f"down#{_reason(f'zygote failed: {why}')}"
        return f"up ready maxconn:{svc.max_connections}" if svc.max_connections else "up ready"

    def on_request(self, request: bytes) -> bytes:
        """One agent-check: the line HAProxy sent names the service."""
        name = request.split(b"\n", 1)[0].strip().decode("utf-8", "replace")
        return self.health(name).encode() + b"\n"

    # ------------------------------------------------------------ drain
    def drain(self, name: str, on: bool) -> list[str]:
        """`pyinetd drain|undrain [NAME]`: mark the service (every service for "") drained or
        not; the errors (an unknown name)."""
        states = self._known()
        if name and name not in states:
            return [f"no such service {name!r}"]
        chosen = [states[name]] if name else list(states.values())
        for state in chosen:
            state.drained = on
        what = name or "every service"
        event(
            logging.INFO,
            f"{what}: {'draining: the agent answers drain' if on else 'undrained'}",
            event="drain" if on else "undrain",
            service=name or None,
        )
        return []

    def _known(self) -> dict[str, ServiceState]:
        """The states of the services configured now (a removed service's state lingers)."""
        states = self._services.states
        return {s.name: states[s.name] for s in self._services.config.services if s.name in states}

    def hold_stop(self, why: str, stop: Callable[[str], None]) -> bool:
        """A stop with `agent:` and `shutdown: drain`: answer drain for agent_drain_time,
        still accepting, and only then ``stop`` (close the listeners and drain the children).
        True while that wait holds the stop; a second stop during the wait goes ahead."""
        if self._stop_timer is not None:
            self._stop_timer.cancel()
            self._stop_timer = None
            return False
        config = self._services.config
        wait = config.agent_drain_time
        if self._call_later is None or config.shutdown != "drain" or wait <= 0:
            return False  # no agent port, shutdown: leave, or agent_drain_time: 0
        if self._services.stopping or self._held:
            return False  # the wait is over: the stop goes ahead
        self._held = True
        for state in self._services.states.values():
            state.drained = True
        systemd.notify("STOPPING=1")
        event(
            logging.INFO,
            f"{why}: answering drain to the agent for {wait:g}s before closing the listeners",
            event="agent_drain",
            seconds=wait,
        )

        def go() -> None:
            self._stop_timer = None
            stop(why)

        self._stop_timer = self._call_later(wait, go)
        return True

    # ------------------------------------------------------------ the port
    def start(
        self,
        config: Config,
        sel: selectors.BaseSelector,
        call_later: Callable[[float, Callable[[], None]], Any],
    ) -> None:
        """Listen on the `agent:` addresses (a failure is logged: pyinetd serves on)."""
        for text in config.agent:
            addr = parse_listen_item(text, "tcp", Path("."))
            try:
                sock = bind_listener("tcp", addr)
            except OSError as exc:
                event(logging.WARNING, f"agent {addr}: {exc.strerror or exc}", event="agent_error")
                continue
            self.servers.append(
                control.RequestServer(
                    sock=sock,
                    selector=sel,
                    handle=self.on_request,
                    terminator=b"\n",
                    call_later=call_later,
                    max_clients=MAX_CLIENTS,
                    max_per_source=MAX_PER_SOURCE,
                    deadline=AGENT_DEADLINE,
                    request_max=AGENT_LINE_MAX,
                )
            )
        if self.servers:
            self._call_later = call_later

    def close(self) -> None:
        """Stop answering (pyinetd exits)."""
        if self._stop_timer is not None:
            self._stop_timer.cancel()
            self._stop_timer = None
        for server in self.servers:
            server.close()
        self.servers.clear()
