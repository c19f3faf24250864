"""Admission: allow/deny, per-source keys, rate limiting, the one admit() decision. Pure.

A connection's peer address and the current time go in, a decision comes out. Nothing here opens a
socket, starts a process, logs or reads the clock: ``now`` is always passed in (a
``time.monotonic()`` value) so the server loop owns time and the tests are deterministic.

The config's value parsers (rates, durations, sizes) live in units.py.
"""

from __future__ import annotations

import ipaddress
import math
from enum import StrEnum
from typing import NamedTuple, Protocol

from pyinetd.config.access import AccessList, Network, parse_access_entry, parse_peer
from pyinetd.protocols.builtins import udp_source_is_unsafe

__all__ = [
    "AccessList",
    "Known",
    "Network",
    "StageSlots",
    "TokenBucket",
    "admit",
    "in_access_times",
    "parse_access_entry",
    "source_key",
]

# AccessList and its entries live in access.py (config builds them); re-exported here, where
# admission's users look for them. The value parsers live in units.py.


class Refusal(StrEnum):
    """Why a connection was refused: the one list the log, `status` and /metrics use."""

    DENY = "deny"  # allow / deny
    ACCESS_TIMES = "access_times"  # outside the service's hours
    MAX_LOAD = "max_load"  # the load average is over the service's max_load
    LIMIT = "limit"  # max_connections
    MAX_CHILDREN = "max_children"  # every service's children, at once
    PER_SOURCE = "per_source"
    RATE = "rate"
    PROXY = "proxy"  # a bad or missing PROXY header
    PROXY_FROM = "proxy_from"  # a PROXY header from a peer not in proxy_from
    TLS = "tls"  # no ClientHello, or not one
    WEBSOCKET = "websocket"  # no complete WebSocket upgrade request, or one answered 4xx
    PENDING = "pending"  # the service's pre-service pool is full
    PENDING_PER_SOURCE = "pending_per_source"
    LOOP = "loop"  # a datagram from one of our own UDP ports, or a built-in's to a low port


def source_key(addr: str, v6_prefix: int = 64) -> str:
    """The per_source key of a peer: its IPv4 address, its IPv6 /v6_prefix network, or ""."""
    if not 0 <= v6_prefix <= 128:
        raise ValueError(f"{v6_prefix!r}: IPv6 prefix length must be 0-128")
    ip = parse_peer(addr)
    if ip is None:
        return ""  # unix socket peers have no address to count by
    if ip.version == 4:
        return str(ip)
    # One IPv6 host usually owns a whole /64 (RFC 4291 section 2.5.4, SLAAC), so counting single
    # addresses would let one client bypass per_source by rotating through its subnet.
    net = ipaddress.IPv6Network((int(ip), v6_prefix), strict=False)
    return f"{net.network_address}/{v6_prefix}"


# ---------------------------------------------------------------- rate limiting


# Refill is float arithmetic: at 10/s, the tokens from 0.1 to 0.3 come to 1.9999999999999998, not
# 2. Counting a token within a billionth of whole avoids refusing a connection over rounding.
_EPSILON = 1e-9


class TokenBucket:
    """A token bucket: `burst` tokens, refilled continuously at `rate_per_s`, starts full."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        if not (math.isfinite(rate_per_s) and rate_per_s > 0):
            raise ValueError(f"{rate_per_s!r}: rate must be a positive number")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"{burst!r}: burst must be a whole number >= 1")
        self.rate_per_s = float(rate_per_s)
        self.burst = burst
        self._tokens = float(burst)
        self._last: float | None = None

    @property
    def tokens(self) -> float:
        """Tokens available as of the last take() (refill is applied lazily)."""
        return self._tokens

    def take(self, now: float) -> bool:
        """Consume one token if one is available at time `now`; True if it was."""
        if self._last is not None and now > self._last:
            self._tokens = min(
                float(self.burst), self._tokens + (now - self._last) * self.rate_per_s
            )
        # A clock step backwards refills nothing and becomes the new reference, so the bucket
        # neither stalls until the old time comes round again nor mints tokens for the step.
        self._last = now
        if self._tokens >= 1.0 - _EPSILON:
            self._tokens = max(0.0, self._tokens - 1.0)
            return True
        return False


# ---------------------------------------------------------------- pre-service stages


class StageSlots:
    """Slots for connections in a stage before their service starts (a PROXY header or a TLS
    ClientHello still due, a metrics or control request still being read).

    Such a connection costs an fd and nothing has proven it is a real client yet, so a slowloris
    that opens many and sends nothing would otherwise pin the parent at its fd limit.
    ``total`` bounds them all, ``per_source`` those of one source key; the key "" (a
    trusted proxy, a unix peer) is bounded by ``total`` alone.
    """

    def __init__(self, total: int, per_source: int) -> None:
        self.total = total
        self.per_source = per_source
        self.used = 0
        self._by_source: dict[str, int] = {}

    def take(self, key: str) -> Refusal | None:
        """Take a slot for ``key``: None when taken, else why not ("pending" or
        "pending_per_source")."""
        if self.used >= self.total:
            return Refusal.PENDING
        if key and self._by_source.get(key, 0) >= self.per_source:
            return Refusal.PENDING_PER_SOURCE
        self.used += 1
        if key:
            self._by_source[key] = self._by_source.get(key, 0) + 1
        return None

    def release(self, key: str) -> None:
        """Give back a slot taken for ``key``."""
        self.used = max(0, self.used - 1)
        if key:
            n = self._by_source.get(key, 0) - 1
            if n > 0:
                self._by_source[key] = n
            else:
                self._by_source.pop(key, None)


# ---------------------------------------------------------------- the decision


class Counts(Protocol):
    """What admit() reads of a service's running state (services.ServiceState)."""

    running: int
    hellos: int
    sources: dict[str, int]
    bucket: TokenBucket | None


class Admitted(Protocol):
    """What admit() reads of a service's definition (config.Service)."""

    @property
    def access(self) -> AccessList | None: ...
    @property
    def max_connections(self) -> int | None: ...
    @property
    def is_builtin(self) -> bool: ...
    @property
    def builtin(self) -> str | None: ...
    @property
    def per_source(self) -> int | None: ...
    @property
    def per_source_prefix(self) -> int: ...
    @property
    def access_times(self) -> tuple[tuple[int, int], ...]: ...
    @property
    def max_load(self) -> float | None: ...


def in_access_times(times: tuple[tuple[int, int], ...], minute: int) -> bool:
    """Whether ``minute`` of the day is in one of the (first, last) ranges, both ends included
    as xinetd's access_times; a range whose first minute is after its last passes midnight."""
    return any(a <= minute <= b if a <= b else minute >= a or minute <= b for a, b in times)


class Known(NamedTuple):
    """What is known of an arrival when admit() is asked: its peer's address, the time, and
    what the caller read for it (one value per connection, built by connections.py). A named
    tuple, immutable as a frozen dataclass is and built in a quarter of its time: every
    connection, built-ins included, makes one."""

    ip: str  # the peer's address ("" for a unix socket)
    now: float  # time.monotonic(), for the rate bucket
    full: bool = False  # every service's children at the global max_children
    take_token: bool = True  # False before a TLS ClientHello: the hello may never come
    datagram_port: int | None = None  # a datagram's source port
    loop_ports: frozenset[int] = frozenset()  # the ports of our own UDP listeners
    minute: int = -1  # local minute of the day, read only for a service with access_times
    load: float = 0.0  # 1-minute load average, read only for a service with max_load


def admit(svc: Admitted, counts: Counts, known: Known) -> tuple[Refusal | None, str]:
    """(refusal reason or None, per_source key) for a new connection from ``known.ip``.

    Every path asks here: TCP, unix, after a PROXY header, before (``take_token`` False: the
    hello may never come) and after a TLS ClientHello, each UDP datagram (built-in or not).
    ``known.full``: at the global max_children. A datagram (``datagram_port``, its source port) from
    the port of any of our UDP listeners, built-in or exec (``loop_ports``), is refused (FreeBSD
    inetd's check_loop, there for built-ins only: one spoofed datagram from 127.0.0.1:27007
    to the echo on 127.0.0.1:27007 would echo itself forever, and two replying exec services
    would fork ~950 processes a second), and a built-in never answers a
    privileged port (CERT CA-1996-01: echo <-> chargen).
    """
    ip, datagram_port = known.ip, known.datagram_port
    if datagram_port is not None and (
        datagram_port in known.loop_ports
        or (svc.builtin is not None and udp_source_is_unsafe(datagram_port))
    ):
        return Refusal.LOOP, ""
    if svc.access is not None and not svc.access.permits(ip):
        return Refusal.DENY, ""
    # ``minute`` (local minute of the day) and ``load`` (1-minute load average): read by the
    # caller, only for a service with these keys (connections.conditions).
    if svc.access_times and not in_access_times(svc.access_times, known.minute):
        return Refusal.ACCESS_TIMES, ""
    if svc.max_load is not None and known.load > svc.max_load:
        return Refusal.MAX_LOAD, ""
    if svc.max_connections and counts.running + counts.hellos >= svc.max_connections:
        return Refusal.LIMIT, ""
    if known.full and not svc.is_builtin:
        return Refusal.MAX_CHILDREN, ""
    key = source_key(ip, svc.per_source_prefix) if svc.per_source and ip else ""
    if key and svc.per_source and counts.sources.get(key, 0) >= svc.per_source:
        return Refusal.PER_SOURCE, key
    if known.take_token and counts.bucket is not None and not counts.bucket.take(known.now):
        return Refusal.RATE, key
    return None, key
