"""Admission: allow/deny, per-source keys, rate limiting, log throttling. Pure.

A connection's peer address and the current time go in, a decision comes out. Nothing here opens a
socket, starts a process, logs or reads the clock: ``now`` is always passed in (a
``time.monotonic()`` value) so the server loop owns time and the tests are deterministic.

The value parsers (``parse_rate``, ``parse_duration``, ``parse_size``) accept whatever YAML or TOML
produced and raise ``ValueError`` with a message of the form ``'<value>': <what was expected>``, so
the config layer can prefix it with the file and key path.
"""

from __future__ import annotations

import ipaddress
import math
import re
import resource
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Protocol

from pyinetd.builtins import udp_source_is_unsafe

__all__ = [
    "AccessList",
    "Network",
    "StageSlots",
    "TokenBucket",
    "admit",
    "parse_access_entry",
    "parse_duration",
    "parse_rate",
    "parse_size",
    "source_key",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_ALL_V4 = ipaddress.IPv4Network("0.0.0.0/0")
_ALL_V6 = ipaddress.IPv6Network("::/0")
# RFC 4291 section 2.5.5.2: IPv4-mapped IPv6 addresses, what a dual-stack (IPV6_V6ONLY=0) socket
# reports for an IPv4 peer.
_MAPPED_V6 = ipaddress.IPv6Network("::ffff:0:0/96")
_ALL_WORDS = frozenset({"all", "any"})


# ---------------------------------------------------------------- addresses


def _parse_peer(addr: str) -> _Address | None:
    """The peer's IP address with v4-mapped IPv6 unmapped, or None for a non-IP (unix) peer."""
    if not isinstance(addr, str):
        # A whole sockaddr tuple passed by mistake would otherwise look like a unix peer and get
        # the default decision, silently admitting everyone a deny-only list should refuse.
        raise TypeError(f"peer address must be a str, not {type(addr).__name__}")
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        # The same client must get the same decision whether the listener is v4-only or
        # dual-stack, so a mapped peer is the IPv4 address it stands for.
        return ip.ipv4_mapped
    return ip


def _unmap_network(net: Network) -> Network:
    """An IPv6 network inside ::ffff:0:0/96 as the IPv4 network it maps, others unchanged."""
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_MAPPED_V6):
        v4 = net.network_address.ipv4_mapped
        assert v4 is not None  # guaranteed by subnet_of(_MAPPED_V6)
        return ipaddress.IPv4Network((int(v4), net.prefixlen - 96))
    return net


def parse_access_entry(entry: object) -> tuple[Network, ...]:
    """One allow/deny entry -> its networks ('all'/'any' give both 0.0.0.0/0 and ::/0)."""
    if isinstance(entry, str):
        text = entry.strip()
        if text.lower() in _ALL_WORDS:
            return (_ALL_V4, _ALL_V6)
        try:
            # strict=False: host bits are ignored ("10.1.2.3/8" means 10.0.0.0/8), as in xinetd.
            return (_unmap_network(ipaddress.ip_network(text, strict=False)),)
        except ValueError:
            pass
    raise ValueError(f"{entry!r}: not an address or network")


# One table per address family: for each distinct prefix length, longest first, the netmask and
# the masked network numbers that deny and that allow. A lookup costs one mask-and-probe per
# distinct prefix length, however many entries the lists hold.
_Table = tuple[tuple[int, int, frozenset[int], frozenset[int]], ...]


def _build_table(allow: Sequence[Network], deny: Sequence[Network], bits: int) -> _Table:
    lengths = sorted({n.prefixlen for n in (*allow, *deny)}, reverse=True)
    rows = []
    for plen in lengths:
        mask = ((1 << bits) - 1) ^ ((1 << (bits - plen)) - 1)
        denied = frozenset(int(n.network_address) for n in deny if n.prefixlen == plen)
        allowed = frozenset(int(n.network_address) for n in allow if n.prefixlen == plen)
        rows.append((plen, mask, denied, allowed))
    return tuple(rows)


@dataclass(frozen=True)
class AccessList:
    """A service's `allow:` and `deny:` lists: the most specific matching entry decides.

    Longest prefix over both lists wins; at equal prefix length deny wins. When nothing matches:
    permit if there are no allow entries, deny otherwise (xinetd: only_from present => default
    deny). IPv4-mapped peers (::ffff:a.b.c.d) are matched as the IPv4 address, so IPv4 entries
    cover them and IPv6 entries such as ::/0 do not. Non-IP peers (unix sockets) match no entry
    and get the default decision.
    """

    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()
    _v4: _Table = field(init=False, repr=False, compare=False)
    _v6: _Table = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        allow = [_unmap_network(n) for n in self.allow]
        deny = [_unmap_network(n) for n in self.deny]
        v4 = _build_table(
            [n for n in allow if n.version == 4], [n for n in deny if n.version == 4], 32
        )
        v6 = _build_table(
            [n for n in allow if n.version == 6], [n for n in deny if n.version == 6], 128
        )
        # Frozen dataclass: the derived tables are set once, here, through object.__setattr__.
        object.__setattr__(self, "_v4", v4)
        object.__setattr__(self, "_v6", v6)

    @classmethod
    def parse(cls, allow: Sequence[str], deny: Sequence[str]) -> AccessList:
        """Build from config lists; raises ValueError naming the first bad entry."""
        # A lone string (YAML `allow: all`) is one entry, not a sequence of characters.
        allow_entries = [allow] if isinstance(allow, str) else list(allow)
        deny_entries = [deny] if isinstance(deny, str) else list(deny)
        return cls(
            allow=tuple(n for e in allow_entries for n in parse_access_entry(e)),
            deny=tuple(n for e in deny_entries for n in parse_access_entry(e)),
        )

    @property
    def default_permit(self) -> bool:
        """The decision for a peer no entry matches."""
        return not self.allow

    def permits(self, addr: str) -> bool:
        """Whether a peer at `addr` (an IP literal, or "" / a path for unix peers) is admitted."""
        ip = _parse_peer(addr)
        if ip is None:
            return self.default_permit
        number = int(ip)
        table = self._v4 if ip.version == 4 else self._v6
        for _plen, mask, denied, allowed in table:
            key = number & mask
            if key in denied:
                return False
            if key in allowed:
                return True
        return self.default_permit


def source_key(addr: str, v6_prefix: int = 64) -> str:
    """The per_source key of a peer: its IPv4 address, its IPv6 /v6_prefix network, or ""."""
    if not 0 <= v6_prefix <= 128:
        raise ValueError(f"{v6_prefix!r}: IPv6 prefix length must be 0-128")
    ip = _parse_peer(addr)
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


_RATE_UNITS = {
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1.0),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60.0),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600.0),
}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_RATE_RE = re.compile(rf"({_NUMBER})\s*(?:/\s*([a-z]+))?")


def parse_rate(text: str | int | float) -> tuple[float, int]:
    """'50/s' -> (50.0 per second, default burst max(1, int(rate))); also /min, /m, /h."""
    rate: float | None = None
    if isinstance(text, bool):
        pass  # YAML `rate: yes` is a mistake, not 1/s
    elif isinstance(text, int | float):
        rate = float(text)  # a bare number: per second
    elif isinstance(text, str):
        match = _RATE_RE.fullmatch(text.strip().lower())
        if match is not None and (match.group(2) or "s") in _RATE_UNITS:
            rate = float(match.group(1)) / _RATE_UNITS[match.group(2) or "s"]
    if rate is None or not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"{text!r}: expected a positive rate such as '50/s', '600/min' or '100/h'")
    return rate, max(1, int(rate))


# ---------------------------------------------------------------- pre-service stages


class StageSlots:
    """Slots for connections in a stage before their service starts (a PROXY header or a TLS
    ClientHello still due, a metrics or control request still being read).

    Such a connection costs an fd and nothing has proven it is a real client yet, so a slowloris
    that opens many and sends nothing would otherwise pin the parent at its fd limit (issue 14,
    item 6). ``total`` bounds them all, ``per_source`` those of one source key; the key "" (a
    trusted proxy, a unix peer) is bounded by ``total`` alone.
    """

    def __init__(self, total: int, per_source: int) -> None:
        self.total = total
        self.per_source = per_source
        self.used = 0
        self._by_source: dict[str, int] = {}

    def take(self, key: str) -> str | None:
        """Take a slot for ``key``: None when taken, else why not ("pending" or
        "pending_per_source")."""
        if self.used >= self.total:
            return "pending"
        if key and self._by_source.get(key, 0) >= self.per_source:
            return "pending_per_source"
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


def admit(
    svc: Admitted,
    counts: Counts,
    ip: str,
    full: bool,
    now: float,
    take_token: bool = True,
    datagram_port: int | None = None,
    loop_ports: frozenset[int] = frozenset(),
) -> tuple[str | None, str]:
    """(refusal reason or None, per_source key) for a new connection from ``ip``.

    Every path asks here: TCP, unix, after a PROXY header, before (``take_token`` False: the
    hello may never come) and after a TLS ClientHello, each UDP datagram (built-in or not).
    ``full``: at the global max_children. A datagram (``datagram_port``, its source port) from
    the port of one of our UDP built-ins (``loop_ports``) is refused (FreeBSD inetd's
    check_loop; issue 18, item 1: one spoofed datagram from 127.0.0.1:27007 to the echo on
    127.0.0.1:27007 echoed itself forever), and a built-in never answers a privileged port
    (CERT CA-1996-01: echo <-> chargen).
    """
    if datagram_port is not None and (
        datagram_port in loop_ports
        or (svc.builtin is not None and udp_source_is_unsafe(datagram_port))
    ):
        return "loop", ""
    if svc.access is not None and not svc.access.permits(ip):
        return "deny", ""
    if svc.max_connections and counts.running + counts.hellos >= svc.max_connections:
        return "limit", ""
    if full and not svc.is_builtin:
        return "max_children", ""
    key = source_key(ip, svc.per_source_prefix) if svc.per_source and ip else ""
    if key and svc.per_source and counts.sources.get(key, 0) >= svc.per_source:
        return "per_source", key
    if take_token and counts.bucket is not None and not counts.bucket.take(now):
        return "rate", key
    return None, key


# ---------------------------------------------------------------- durations and sizes

_DURATION_UNITS = {
    **_RATE_UNITS,
    "": 1.0,
    "ms": 0.001,
    **dict.fromkeys(("d", "day", "days"), 86400.0),
}
_DURATION_RE = re.compile(rf"({_NUMBER})\s*([a-z]*)")


def parse_duration(text: str | int | float) -> float:
    """Seconds from 30, 1.5, '30', '30s', '500ms', '5m', '1h', '1d'; ValueError on junk."""
    seconds: float | None = None
    if isinstance(text, bool):
        pass  # YAML `timeout: yes` is a mistake, not 1 second
    elif isinstance(text, int | float):
        seconds = float(text)
    elif isinstance(text, str):
        match = _DURATION_RE.fullmatch(text.strip().lower())
        if match is not None and match.group(2) in _DURATION_UNITS:
            seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{text!r}: expected a duration >= 0 such as 30, '30s', '500ms' or '5m'")
    return seconds


_SIZE_UNITS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}
_SIZE_RE = re.compile(rf"({_NUMBER})\s*([kmgtp]?)(?:i?b)?")
_UNLIMITED = frozenset({"unlimited", "infinity"})
# resource.setrlimit() converts through a signed C long long: anything larger raises OverflowError
# at spawn time, so refuse it here, where the config error can name the key.
_MAX_RLIM = 2**63 - 1


def parse_size(text: str | int) -> int:
    """An rlimit value: 100, '64k', '512M', '1G' (powers of 1024), 'unlimited' -> RLIM_INFINITY."""
    size: Fraction | None = None
    if isinstance(text, bool):
        pass  # YAML `core: no` is a mistake, not 0 bytes
    elif isinstance(text, int):
        size = Fraction(text)
    elif isinstance(text, str):
        lowered = text.strip().lower()
        if lowered in _UNLIMITED:
            return resource.RLIM_INFINITY
        match = _SIZE_RE.fullmatch(lowered)
        if match is not None and len(match.group(1)) <= 64:  # int() refuses >4300 digits anyway
            # Fraction, not float: "1.5G" must be exactly 1610612736, not off by rounding.
            size = Fraction(match.group(1)) * 1024 ** _SIZE_UNITS[match.group(2)]
    # A fractional number of bytes ("0.3k") is a mistake, not something to round silently.
    if size is None or size < 0 or size.denominator != 1 or size > _MAX_RLIM:
        raise ValueError(
            f"{text!r}: expected a whole size such as 100, '64k', '512M', '1G' or 'unlimited'"
        )
    return int(size)
