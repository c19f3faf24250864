"""The built-in sessions (echo, chargen, daytime...) running in the parent's loop: each holds
a slot under its service's limits until it closes, and its start and end are logged as a
program's are, the end with the bytes carried each way."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from pyinetd.log import LOG, event
from pyinetd.protocols import builtins
from pyinetd.runtime.loop import Loop, Timer
from pyinetd.runtime.services import Services, ServiceState, Slot, SlotKind

__all__ = ["Sessions", "log_session_end"]


class Sessions:
    """The built-in sessions (echo, chargen...) running in the loop, with their slot and timer."""

    def __init__(self, *, loop: Loop, services: Services, drained: Callable[[], None]) -> None:
        self._loop = loop
        self._services = services
        self._drained = drained  # a session ended while stopping
        self.table: dict[builtins.Session, tuple[Slot, str, Timer | None]] = {}

    def __len__(self) -> int:
        return len(self.table)

    def close_all(self) -> None:
        """Close every session (drain timeout, exit)."""
        for sess in list(self.table):
            sess.close()

    def start(
        self, state: ServiceState, conn: socket.socket, kind: str, src: str, peer: str
    ) -> None:
        """Run built-in ``kind`` on ``conn`` in the loop; it holds a slot until it closes.
        Its start and end are logged as a program's are, the end with the bytes carried."""
        name = state.service.name
        if LOG.isEnabledFor(logging.INFO):
            event(
                logging.INFO,
                f"{name}: {peer} -> built-in {kind}",
                event="start",
                service=name,
                peer=peer,
                builtin=kind,
            )
        slot = self._services.take_slot(state, src, SlotKind.SESSION)
        sess = builtins.Session(kind, conn, self._loop.sel, self._closed)
        if sess.closed:  # daytime, time: the whole answer sent at once
            self._services.free_slot(slot)
            state.bytes_out += sess.bytes_out
            log_session_end(name, peer, sess)
            return
        timer = None
        if state.service.timeout:
            timer = self._loop.call_later(state.service.timeout, sess.close)
        self.table[sess] = (slot, peer, timer)

    def resume(
        self, state: ServiceState, conn: socket.socket, facts: dict[str, Any], src: str, peer: str
    ) -> None:
        """A session of the image before this one (builtins.Session.carry, `pyinetd
        upgrade`) goes on here, its slot taken again and its timeout from its start."""
        slot = self._services.take_slot(state, src, SlotKind.SESSION)
        sess = builtins.Session(facts["kind"], conn, self._loop.sel, self._closed, facts)
        timer = None
        if state.service.timeout:
            due = max(0.0, sess.started + state.service.timeout - time.monotonic())
            timer = self._loop.call_later(due, sess.close)
        self.table[sess] = (slot, peer, timer)

    def _closed(self, sess: builtins.Session) -> None:
        entry = self.table.pop(sess, None)
        if entry is None:
            return  # closed while starting: start drops the slot and logs the end
        slot, peer, timer = entry
        state = slot.state
        if timer is not None:
            timer.cancel()
        log_session_end(state.service.name, peer, sess)
        state.bytes_in += sess.bytes_in
        state.bytes_out += sess.bytes_out
        self._services.free_slot(slot)
        if self._services.stopping:
            self._drained()


def log_session_end(name: str, peer: str, sess: builtins.Session) -> None:
    """A built-in session's end: after how long, and the bytes it read and wrote."""
    if not LOG.isEnabledFor(logging.INFO):
        return
    duration = time.monotonic() - sess.started
    event(
        logging.INFO,
        f"{name}: built-in {sess.kind} for {peer} ended after {duration:.3f}s, "
        f"{sess.bytes_in} bytes in, {sess.bytes_out} out",
        event="end",
        service=name,
        peer=peer,
        builtin=sess.kind,
        duration=round(duration, 6),
        bytes_in=sess.bytes_in,
        bytes_out=sess.bytes_out,
    )
