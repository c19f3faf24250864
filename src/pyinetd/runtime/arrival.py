"""The arrival: what the children table needs to start a service's process for one connection,
datagram or wait-mode listener, as one frozen value.

connections.py builds it once, where the connection is known (a stream accepted, after its
PROXY header, after its TLS ClientHello; a datagram; a wait-mode listener turning readable),
and hands it to children.py, which keeps it for a zygote's answer (warm.py) and a cold start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import socket

    from pyinetd.runtime.services import Listener, ServiceState
    from pyinetd.runtime.stages import UDPReply
    from pyinetd.spawn.environ import EnvEntries


@dataclass(frozen=True, slots=True)
class Arrival:
    """One connection (or datagram, or wait-mode listener) on its way to a service process."""

    state: ServiceState  # the service it is for
    fd: int  # the process's stdin and stdout: the connection, a socketpair's end, a listener
    conn: socket.socket | None  # the connection itself (None: a datagram, wait mode)
    env: EnvEntries  # its variables (environ.ip_env, ipc_env, wait_env)
    peer: str  # the client, as logs say it ("1.2.3.4:5678", "unix", "wait")
    ip: str = ""  # the client's address ("" for a unix socket and wait mode)
    port: int = 0
    local: tuple[str, int] | None = None  # the address it came in on, where it has one
    src: str = ""  # the per_source key its slot is taken with (admission.admit)
    listener: Listener | None = None  # wait mode: the listener to resume when it exits
    reply: UDPReply | None = None  # a UDP nowait child's reply to the datagram's sender
    report: tuple[int, float] | None = None  # a TLS relay's report fd and its own deadline
    # A program behind its service's front: its stdout (``fd`` is its stdin), two pipes
    # whose other ends go to the front (frontpath.py); -1: ``fd`` is both
    stdout: int = -1
