"""The parent's view of one front's channel (frontproc.Front): the id state machine, the
bounded queue, distrust. The front here is the test, on the other end of a real
SOCK_SEQPACKET socketpair; the process distrust kills is a real `sleep`."""

from __future__ import annotations

import os
import selectors
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pyinetd.config import Service
from pyinetd.config.parsers import TLSSettings
from pyinetd.protocols import frontchan
from pyinetd.runtime.frontproc import QUEUE_MAX, READ_BATCH, Front, Link


@dataclass
class Owner:
    """A connection at the parent: what the front said of it."""

    said: list[tuple[str, object]] = field(default_factory=list)

    def hello(self, link: Link, env: dict[str, str]) -> None:
        self.said.append(("hello", env))

    def failed(self, link: Link, reason: str) -> None:
        self.said.append(("failed", reason))

    def ended(self, link: Link, bytes_in: int, bytes_out: int) -> None:
        self.said.append(("ended", (bytes_in, bytes_out)))

    def lost(self, link: Link, why: str) -> None:
        self.said.append(("lost", why))


class _Timer:
    def __init__(self, timers: list[tuple[float, Callable[[], None], _Timer]]) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class Rig:
    front: Front
    peer: socket.socket  # the front's end
    proc: subprocess.Popen[bytes]
    sel: selectors.BaseSelector
    ended: list[str]
    timers: list[tuple[float, Callable[[], None], _Timer]]

    def pump(self) -> None:
        """One wake-up of the parent's loop."""
        for key, mask in self.sel.select(0):
            key.data(mask)

    def say(self, kind: str, fields: dict[str, Any]) -> None:
        self.peer.send(frontchan.encode(kind, fields))
        self.pump()

    def hand(self) -> tuple[Link, Owner]:
        owner = Owner()
        a, b = socket.socketpair()
        b.close()
        link = self.front.hand(owner, {"peer": ["127.0.0.1", 1], "local": None,
                                       "deadline": 5.0, "refuse": None}, a)  # fmt: skip
        msg = frontchan.recv(self.peer, frontchan.PARENT_TO_FRONT)
        assert msg is not None and msg.kind == "C" and msg.fields["id"] == link.id
        frontchan.close_fds(msg.fds)
        return link, owner

    def distrusted(self) -> bool:
        return bool(self.front.over) and self.proc.wait(5) == -9


@pytest.fixture
def rig() -> Iterator[Rig]:
    tls = TLSSettings(cert=Path("c"), key=Path("k"))
    svc = Service(name="t", listen=(), exec=("/bin/cat",), tls=tls)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen(["sleep", "60"])
    sel = selectors.DefaultSelector()
    ended: list[str] = []
    timers: list[tuple[float, Callable[[], None], _Timer]] = []

    def call_later(delay: float, cb: Callable[[], None]) -> _Timer:
        t = _Timer(timers)
        timers.append((delay, cb, t))
        return t

    front = Front(svc, 1, ours, proc.pid, sel, call_later, lambda f, why: ended.append(why))
    try:
        yield Rig(front, theirs, proc, sel, ended, timers)
    finally:
        proc.kill()
        proc.wait()
        theirs.close()
        if not front.over:
            front.end("test over")
        sel.close()


def test_the_expected_messages_of_an_id_are_taken(rig: Rig) -> None:
    link, owner = rig.hand()
    rig.say("H", {"id": link.id, "env": {"SSL_PROTOCOL": "TLSv1.3"}})
    rig.say("E", {"id": link.id, "bytes_in": 3, "bytes_out": 4})
    assert owner.said == [("hello", {"SSL_PROTOCOL": "TLSv1.3"}), ("ended", (3, 4))]
    assert not rig.front.over and rig.front.connections == 0
    link2, owner2 = rig.hand()
    rig.say("F", {"id": link2.id, "reason": "bad record mac"})
    assert owner2.said == [("failed", "bad record mac")] and not rig.front.over


@pytest.mark.parametrize(
    "script",
    [
        [("H", {"env": {}}), ("H", {"env": {}})],  # a second H
        [("E", {"bytes_in": 0, "bytes_out": 0})],  # E before H
        [("H", {"env": {}}), ("F", {"reason": "late"})],  # F after H
        [("H", {"env": {"LD_PRELOAD": "/tmp/x.so"}})],  # not an SSL_* name of a TLS front
        [
            ("H", {"env": {}}),
            ("E", {"bytes_in": 0, "bytes_out": 0}),
            ("E", {"bytes_in": 0, "bytes_out": 0}),
        ],
    ],
    ids=["second-H", "E-before-H", "F-after-H", "foreign-variable", "second-E"],
)
def test_a_message_its_id_does_not_expect_is_distrust(
    rig: Rig, script: list[tuple[str, dict[str, Any]]]
) -> None:
    link, _owner = rig.hand()
    for kind, fields in script:
        rig.say(kind, {"id": link.id, **fields})
    assert rig.distrusted()
    assert rig.ended and rig.ended[0].startswith("distrusted: ")


def test_an_id_never_handed_out_is_distrust(rig: Rig) -> None:
    rig.say("F", {"id": 99, "reason": "x"})
    assert rig.distrusted()


def test_after_k_one_late_message_is_dropped_a_second_is_distrust(rig: Rig) -> None:
    link, owner = rig.hand()
    link.abort()
    msg = frontchan.recv(rig.peer, frontchan.PARENT_TO_FRONT)
    assert msg is not None and msg.kind == "K"
    rig.say("H", {"id": link.id, "env": {}})  # the race: accepted once, dropped
    assert not rig.front.over and owner.said == []
    rig.say("E", {"id": link.id, "bytes_in": 0, "bytes_out": 0})
    assert rig.distrusted()


def test_a_lost_front_tells_each_of_its_connections(rig: Rig) -> None:
    (_, a), (_, b) = rig.hand(), rig.hand()
    rig.peer.close()  # the front's end goes: EOF
    rig.pump()
    assert a.said == b.said == [("lost", "its channel closed")]
    assert rig.ended == ["its channel closed"]


def test_a_flood_is_read_a_batch_per_wake_up(rig: Rig) -> None:
    """Records the parent must read: at most READ_BATCH of them per wake-up."""
    links = [rig.hand() for _ in range(READ_BATCH + 10)]
    for link, _ in links:
        rig.peer.send(frontchan.encode("F", {"id": link.id, "reason": "x"}))
    rig.pump()
    assert sum(bool(owner.said) for _, owner in links) == READ_BATCH
    rig.pump()
    assert all(owner.said for _, owner in links) and not rig.front.over


def test_a_front_that_stops_reading_is_distrusted_at_its_queues_bound(rig: Rig) -> None:
    """Nothing is read on the front's end: the parent queues, never blocks, and one message
    past QUEUE_MAX (or the stall deadline, whichever comes first) is distrust."""
    for _ in range(QUEUE_MAX * 4):
        if rig.front.over:
            break
        rig.front.send("X", {"id": 1, "code": 0, "signal": None}, [])
    assert rig.distrusted()
    assert "stopped reading" in rig.ended[0]


def test_the_stall_deadline_distrusts_a_front_with_messages_queued(rig: Rig) -> None:
    while not rig.timers:  # until the socket is full and a message waits in the queue
        rig.front.send("X", {"id": 1, "code": 0, "signal": None}, [])
    delay, expire, _ = rig.timers[0]
    assert delay == 5.0
    expire()
    assert rig.distrusted()
    assert "read nothing for 5s" in rig.ended[0]


def test_fds_queued_for_a_front_that_goes_are_closed(rig: Rig) -> None:
    while not rig.timers:
        rig.front.send("X", {"id": 1, "code": 0, "signal": None}, [])
    r, w = os.pipe()
    rig.front.send("S", {"id": 1}, [r, w])
    rig.front.distrust("test")
    for fd in (r, w):
        with pytest.raises(OSError):
            os.fstat(fd)
