"""Access lists: a service's `allow:` and `deny:` networks, and the peer they decide on. Pure.

Data the configuration holds (config.py builds an AccessList) and admission consults; no socket,
no clock.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["AccessList", "Network", "parse_access_entry", "parse_peer"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_ALL_V4 = ipaddress.IPv4Network("0.0.0.0/0")
_ALL_V6 = ipaddress.IPv6Network("::/0")
# RFC 4291 section 2.5.5.2: IPv4-mapped IPv6 addresses, what a dual-stack (IPV6_V6ONLY=0) socket
# reports for an IPv4 peer.
_MAPPED_V6 = ipaddress.IPv6Network("::ffff:0:0/96")
_ALL_WORDS = frozenset({"all", "any"})


# ---------------------------------------------------------------- addresses


def parse_peer(addr: str) -> _Address | None:
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
        ip = parse_peer(addr)
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
