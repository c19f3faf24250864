"""Slots: every place a child, built-in session or pending hello holds under its service's
limits is taken by Services.take_slot and given back by Services.free_slot, once."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import DEADLINE, Pyinetd, free_port, status_of, tcp_talk, wait_for
from test_pre_service import canned_client_hello, relays_of, tls_echo, tls_service

from pyinetd.config import build
from pyinetd.runtime.loop import Loop
from pyinetd.runtime.services import Services, ServiceState, SlotKind
from pyinetd.spawn import Spawner

SRC = "192.0.2.7"


@pytest.fixture
def real() -> Iterator[tuple[Services, ServiceState, list[int]]]:
    """A real Services with a real Loop and a bound listener: max_connections 2 (queue),
    per_source 2, max_children 1; the list stands for the children table (its size)."""
    doc = {
        "max_children": 1,
        "services": {
            "s": {
                "listen": f"127.0.0.1:{free_port()}",
                "exec": "/bin/cat",
                "user": "nobody",
                "max_connections": 2,
                "on_limit": "queue",
                "per_source": 2,
            }
        },
    }
    config = build(doc, Path("/x/inetd.yaml"))
    loop = Loop()
    children: list[int] = []

    def unused(lst: object, mask: int) -> None:
        raise AssertionError("no arrival is served here")

    services = Services(
        config=config,
        loop=loop,
        spawner=Spawner(),
        worker=0,
        children=children,
        on_accept=unused,
        on_datagram=unused,
    )
    services.bind(config)
    for lst in services.listeners.values():
        services.refresh(lst)
    try:
        yield services, services.states["s"], children
    finally:
        services.close_all()
        loop.close()


def _counts(state: ServiceState) -> tuple[int, int, dict[str, int]]:
    return state.running, state.hellos, dict(state.sources)


def test_a_child_s_slot_pauses_at_max_children_and_frees_once(
    real: tuple[Services, ServiceState, list[int]],
) -> None:
    services, state, children = real
    (lst,) = state.listeners
    assert lst.registered
    children.append(1)  # in the table first, as Children does
    slot = services.take_slot(state, SRC, SlotKind.CHILD)
    assert _counts(state) == (1, 0, {SRC: 1})
    assert services.full and not lst.registered  # exec listeners wait at max_children
    children.pop()
    services.free_slot(slot)
    assert _counts(state) == (0, 0, {})
    assert not services.full and lst.registered
    services.free_slot(slot)  # a second path ending the same child: no double decrement
    services.free_slot(None)
    assert _counts(state) == (0, 0, {})


def test_sessions_and_pending_hellos_share_the_limits_and_free_once(
    real: tuple[Services, ServiceState, list[int]],
) -> None:
    services, state, _children = real
    (lst,) = state.listeners
    session = services.take_slot(state, SRC, SlotKind.SESSION)
    hello = services.take_slot(state, SRC, SlotKind.PENDING)
    assert _counts(state) == (1, 1, {SRC: 2})
    assert not lst.registered  # at max_connections (queue): clients wait in the backlog
    services.free_slot(hello)
    services.free_slot(hello)
    assert _counts(state) == (1, 0, {SRC: 1})
    assert lst.registered
    other = services.take_slot(state, "", SlotKind.SESSION)  # no per_source key
    services.free_slot(session)
    services.free_slot(session)  # must not free ``other``'s place
    assert _counts(state) == (1, 0, {})
    assert lst.registered
    services.free_slot(other)
    assert _counts(state) == (0, 0, {})


# ------------------------------------------------- end to end: a real pyinetd, real clients
# max_connections 1 and per_source 1: a place that a path took and did not give back
# (running, hellos or the source's count) refuses the next client with "limit" or
# "per_source", so serving one client after another shows every place was freed.
LIMITS: dict[str, object] = {"max_connections": 1, "per_source": 1}


def test_sessions_closed_while_starting_give_their_slot_back(
    inetd: Callable[..., Pyinetd],
) -> None:
    """daytime sends its whole answer while its session starts: closed before it is in the
    session table, its slot is freed by the start itself, once."""
    port = free_port()
    p = inetd({"services": {"d": {"listen": f"127.0.0.1:{port}", "builtin": "daytime", **LIMITS}}})
    for _ in range(3):
        assert tcp_talk(port).endswith(b"\r\n")
    wait_for(lambda: status_of(p)["d"]["running"] == 0, what="every slot free")
    assert status_of(p)["d"]["refused"] == {}


def test_a_tls_relay_killed_at_its_deadline_gives_its_places_back(
    inetd: Callable[..., Pyinetd], pki: Path
) -> None:
    """A pending handshake holds its places until its front says how it ended: at the
    handshake's deadline they are given back and the next clients are served."""
    port = free_port()
    service = {**tls_service(port, handshake_timeout=2), "busy_message": "x", **LIMITS}
    p = inetd({"services": {"t": service}})
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
        s.sendall(canned_client_hello())
        wait_for(lambda: status_of(p)["t"]["pending"] == 1, what="the handshake pending")
        assert relays_of(p.pid) == []
        p.wait_log(r"t: refused 127\.0\.0\.1:\d+: tls \(TLS handshake with")
    wait_for(lambda: status_of(p)["t"]["pending"] == 0, what="the handshake's places free")
    for _ in range(2):
        assert tls_echo(port, pki) == b"127.0.0.1\n"
    wait_for(lambda: status_of(p)["t"]["running"] == 0, what="every slot free")
    assert status_of(p)["t"]["refused"] == {"tls": 1}


def test_a_zygote_asked_child_served_cold_keeps_one_slot(
    inetd: Callable[..., Pyinetd], folder: Path
) -> None:
    """A child asked of a stopped zygote holds its slot from the request; served cold when
    no answer comes, that one slot is the cold child's, freed at its end."""
    script = folder / "up.py"
    script.write_text("#!/usr/bin/env python3\nimport sys\nprint(sys.stdin.readline().upper())\n")
    script.chmod(0o755)
    port = free_port()
    svc = {"listen": f"127.0.0.1:{port}", "exec": [str(script)], "warm": True, **LIMITS}
    p = inetd({"services": {"up": svc}})
    zpid = int(re.findall(r"zygote (\d+) ready", p.wait_log(r"zygote \d+ ready")[0])[0])
    os.kill(zpid, signal.SIGSTOP)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as w:
            w.sendall(b"late\n")
            assert w.makefile("rb").readline() == b"LATE\n"  # cold, after the reply timeout
        p.wait_log(r"up: zygote: no answer in \d+s; serving cold")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(zpid, signal.SIGKILL)
            os.kill(zpid, signal.SIGCONT)
    wait_for(lambda: status_of(p)["up"]["running"] == 0, what="the cold child's slot free")
    p.wait_log(r"zygote \d+ ready", count=2)  # restarted after its backoff
    for _ in range(2):
        assert tcp_talk(port, b"again\n") == b"AGAIN\n\n"
    assert status_of(p)["up"]["refused"] == {}
