"""Slots: every place a child, built-in session or pending hello holds under its service's
limits is taken by Services.take_slot and given back by Services.free_slot, once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port

from pyinetd.config import build
from pyinetd.loop import Loop
from pyinetd.services import Services, ServiceState, SlotKind
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
    services = Services(config, loop, Spawner(), 0, children)
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
