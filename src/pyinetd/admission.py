"""Admission: allow/deny, per-source keys, rate limiting, log throttling. Pure.

A connection's peer address and the current time go in, a decision comes out. Nothing here opens a
socket, starts a process, logs or reads the clock: ``now`` is always passed in (a
``time.monotonic()`` value) so the server loop owns time and the tests are deterministic.

The config's value parsers (rates, durations, sizes) live in units.py.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict

from pyinetd.access import AccessList, Network, parse_access_entry, parse_peer

__all__ = [
    "AccessList",
    "LogLimiter",
    "Network",
    "StageSlots",
    "TokenBucket",
    "parse_access_entry",
    "source_key",
]

# AccessList and its entries live in access.py (config builds them); re-exported here, where
# admission's users look for them.


# ---------------------------------------------------------------- per-source keys


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


# ---------------------------------------------------------------- log throttling


class _Seen:
    """What a LogLimiter remembers about one key."""

    __slots__ = ("logged_at", "suppressed")

    def __init__(self, logged_at: float) -> None:
        self.logged_at = logged_at
        self.suppressed = 0


class LogLimiter:
    """Log a repeated event (a denied peer) at most once per key per `interval` seconds, and
    at most `max_lines` events in all per interval.

    The per-key memory is bounded (`max_keys`, least recently seen evicted), so sources that
    rotate through more addresses than that are each new again: 5,000 rotating sources gave
    15,000 "refused" lines (issue 18, item 11). `max_lines` bounds what any flood can log;
    the events it holds back are counted, for ``take_overflow()`` to report. The server keeps
    one LogLimiter per service, so that one service's flood evicts no other's keys.
    """

    def __init__(
        self, interval: float = 60.0, max_keys: int = 4096, max_lines: int | None = None
    ) -> None:
        if not (math.isfinite(interval) and interval >= 0):
            raise ValueError(f"{interval!r}: interval must be a number >= 0")
        if max_keys < 1:
            raise ValueError(f"{max_keys!r}: max_keys must be >= 1")
        if max_lines is not None and max_lines < 1:
            raise ValueError(f"{max_lines!r}: max_lines must be >= 1")
        self.interval = float(interval)
        self.max_keys = max_keys
        self.max_lines = max_lines
        self._seen: OrderedDict[str, _Seen] = OrderedDict()  # least recently seen first
        self._window = -math.inf  # when the current interval of max_lines began
        self._lines = 0  # events logged in it
        self._overflow = 0  # events of new keys held back by max_lines, not yet reported

    def __len__(self) -> int:
        return len(self._seen)

    def _room(self, now: float) -> bool:
        """One more line fits in this interval's max_lines (and is counted)."""
        if self.max_lines is None:
            return True
        if not self._window <= now < self._window + self.interval:
            self._window, self._lines = now, 0  # a new interval (or the clock stepped back)
        if self._lines >= self.max_lines:
            return False
        self._lines += 1
        return True

    def should_log(self, key: str, now: float) -> tuple[bool, int]:
        """(log this one?, events suppressed for `key` since its last logged one)."""
        seen = self._seen.get(key)
        if seen is None:
            if not self._room(now):
                self._overflow += 1
                return False, 0
            self._seen[key] = _Seen(now)
            # Bounded memory: a flood from ever-new addresses evicts the least recently seen key,
            # which at worst gets logged once more if it comes back (max_lines bounds that).
            if len(self._seen) > self.max_keys:
                self._seen.popitem(last=False)
            return True, 0
        self._seen.move_to_end(key)
        if now - seen.logged_at >= self.interval and self._room(now):
            suppressed, seen.logged_at, seen.suppressed = seen.suppressed, now, 0
            return True, suppressed
        if now < seen.logged_at:
            # The clock stepped back: restart the interval from here rather than stay silent until
            # the old time comes round again. Still suppressed, so this cannot flood either.
            seen.logged_at = now
        seen.suppressed += 1
        return False, seen.suppressed

    def take_overflow(self) -> int:
        """Events of new keys that max_lines held back since the last call."""
        out, self._overflow = self._overflow, 0
        return out
