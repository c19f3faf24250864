"""Incremental parser for the HAProxy PROXY protocol, versions 1 and 2.

Reference: haproxy doc/proxy-protocol.txt ("the spec" below). The parser is pure: it looks at
the bytes received so far and says "need more" (None), "here is the header" (ProxyHeader, whose
``length`` tells the caller how many bytes to drop), or "this is not a valid header" (ProxyError).
It never consumes the payload that follows the header.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
from dataclasses import dataclass

__all__ = [
    "MAX_HEADER",
    "MAX_V1",
    "V1_SIGNATURE",
    "V2_SIGNATURE",
    "ProxyError",
    "ProxyHeader",
    "crc32c",
    "parse",
]

V1_SIGNATURE = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

# Spec 2.1: the longest v1 line ("PROXY UNKNOWN <v6> <v6> 65535 65535\r\n") is 107 bytes, and a
# receiver "should declare the line invalid" if no CRLF is found within them.
MAX_V1 = 107
# Spec 2: both formats "are designed to fit in the smallest TCP segment that any TCP/IP host is
# required to support (576 - 40 = 536 bytes)", which is what lets a sender emit the header at once.
# A v2 header announcing more than that (16 + len > 536) is refused instead of buffering up to
# 64 KiB from a peer that has not proven anything yet. Callers expecting large TLVs may raise it
# with parse(..., max_header=N).
MAX_HEADER = 536

_V2_FIXED = 16
_V2_CMD_LOCAL = 0x0
_V2_CMD_PROXY = 0x1
_PP2_TYPE_CRC32C = 0x03

# (address family nibble, transport nibble) -> (family name, address block length).
# Spec 2.2: 0x11/0x12 IPv4 (12 bytes), 0x21/0x22 IPv6 (36 bytes), 0x31/0x32 AF_UNIX (216 bytes).
_V2_FAMILIES: dict[tuple[int, int], tuple[str, int]] = {
    (0x1, 0x1): ("TCP4", 12),
    (0x1, 0x2): ("UDP4", 12),
    (0x2, 0x1): ("TCP6", 36),
    (0x2, 0x2): ("UDP6", 36),
    (0x3, 0x1): ("UNIX", 216),
    (0x3, 0x2): ("UNIX_DGRAM", 216),
}

# Spec 2.1: decimal, "heading zeroes are not permitted", range 0..65535.
_PORT_RE = re.compile(r"0|[1-9][0-9]{0,4}")


class ProxyError(ValueError):
    """The bytes received are not a valid PROXY protocol header of an accepted version."""


@dataclass(frozen=True)
class ProxyHeader:
    """A parsed PROXY protocol header; addresses are None for LOCAL and UNKNOWN/UNSPEC."""

    version: int
    command: str  # "PROXY" or "LOCAL"
    family: str  # "TCP4" "TCP6" "UDP4" "UDP6" "UNIX" "UNIX_DGRAM" "UNKNOWN"
    src_addr: str | None
    src_port: int | None
    dst_addr: str | None
    dst_port: int | None
    length: int  # bytes the header occupied in the stream
    tlvs: tuple[tuple[int, bytes], ...] = ()


def parse(buf: bytes, accept: str, *, max_header: int = MAX_HEADER) -> ProxyHeader | None:
    """Parse a PROXY header at the start of buf; None means more bytes are needed."""
    if accept not in ("v1", "v2", "any"):
        raise ValueError(f"accept must be 'v1', 'v2' or 'any', not {accept!r}")
    buf = bytes(buf)
    if not buf:
        return None
    # Spec 2.2: the two signatures differ in their first byte ('P' vs CR), so one byte decides
    # which format this is, and any byte that leaves neither signature possible is rejected at
    # once rather than after a timeout (spec 2.1: "abort the connection as soon as possible").
    if accept in ("v2", "any") and _is_prefix_or_match(buf, V2_SIGNATURE):
        return _parse_v2(buf, max_header) if len(buf) >= len(V2_SIGNATURE) else None
    if accept in ("v1", "any") and _is_prefix_or_match(buf, V1_SIGNATURE):
        return _parse_v1(buf) if len(buf) >= len(V1_SIGNATURE) else None
    if accept == "v1" and _is_prefix_or_match(buf, V2_SIGNATURE):
        raise ProxyError("PROXY protocol v2 header received, but only v1 is accepted")
    if accept == "v2" and _is_prefix_or_match(buf, V1_SIGNATURE):
        raise ProxyError("PROXY protocol v1 header received, but only v2 is accepted")
    raise ProxyError("missing PROXY protocol signature")


def _is_prefix_or_match(buf: bytes, signature: bytes) -> bool:
    n = min(len(buf), len(signature))
    return buf[:n] == signature[:n]


# --- version 1 --------------------------------------------------------------------------------


def _parse_v1(buf: bytes) -> ProxyHeader | None:
    window = buf[:MAX_V1]
    # Spec 2.1: "The receiver must not tolerate a single CR or LF character to end the line".
    # So the first CR or LF in the line must be the CR of the terminating CRLF.
    cr, lf = window.find(b"\r"), window.find(b"\n")
    if lf != -1 and (cr == -1 or lf < cr):
        raise ProxyError("PROXY v1 line contains a bare LF")
    if cr == -1:
        if len(buf) >= MAX_V1:
            raise ProxyError(f"PROXY v1 line has no CRLF within {MAX_V1} bytes")
        return None
    if cr + 1 >= len(window):
        if len(buf) >= MAX_V1:
            raise ProxyError(f"PROXY v1 line has no CRLF within {MAX_V1} bytes")
        return None
    if window[cr + 1] != 0x0A:
        raise ProxyError("PROXY v1 line contains a bare CR")
    try:
        line = window[:cr].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyError("PROXY v1 line is not US-ASCII") from None
    length = cr + 2
    # "exactly one space" between fields: split(" ") turns doubled spaces into empty fields,
    # which then fail validation below.
    fields = line.split(" ")
    family = fields[1] if len(fields) > 1 else ""
    if family == "UNKNOWN":
        # Spec 2.1: for UNKNOWN "the receiver must ignore anything presented before the CRLF" and
        # use the real connection's addresses.
        return ProxyHeader(1, "PROXY", "UNKNOWN", None, None, None, None, length)
    if family not in ("TCP4", "TCP6"):
        raise ProxyError(f"PROXY v1 line has unknown protocol {family[:16]!r}")
    if len(fields) != 6:
        raise ProxyError(f"PROXY v1 {family} line needs 4 fields after the protocol")
    _, _, src, dst, sport, dport = fields
    return ProxyHeader(
        version=1,
        command="PROXY",
        family=family,
        src_addr=_v1_address(src, family),
        src_port=_v1_port(sport),
        dst_addr=_v1_address(dst, family),
        dst_port=_v1_port(dport),
        length=length,
    )


def _v1_address(text: str, family: str) -> str:
    # Returned in inet_ntop() form so it compares equal to what getpeername() reports.
    try:
        if family == "TCP4":
            v4 = ipaddress.IPv4Address(text)
            # ipaddress already refuses leading zeroes (bpo-36384); requiring the canonical
            # spelling also refuses anything else it might tolerate.
            if str(v4) != text:
                raise ValueError(text)
            return socket.inet_ntop(socket.AF_INET, v4.packed)
        # A scope id ("fe80::1%eth0") is accepted by ipaddress but is not part of the format.
        if "%" in text:
            raise ValueError(text)
        v6 = ipaddress.IPv6Address(text)
        return socket.inet_ntop(socket.AF_INET6, v6.packed)
    except ValueError:
        raise ProxyError(f"PROXY v1 {family} line has invalid address {text[:40]!r}") from None


def _v1_port(text: str) -> int:
    if not _PORT_RE.fullmatch(text) or int(text) > 65535:
        raise ProxyError(f"PROXY v1 line has invalid port {text[:8]!r}")
    return int(text)


# --- version 2 --------------------------------------------------------------------------------


def _parse_v2(buf: bytes, max_header: int) -> ProxyHeader | None:
    # Spec 2.2: the 13th byte is version (high nibble, must be 2) and command (low nibble,
    # LOCAL=0 or PROXY=1; "receivers must drop connections presenting unexpected values").
    # Each check runs as soon as its byte has arrived.
    if len(buf) > 12:
        ver_cmd = buf[12]
        if ver_cmd >> 4 != 2:
            raise ProxyError(f"PROXY v2 header has unsupported version {ver_cmd >> 4}")
        if ver_cmd & 0x0F not in (_V2_CMD_LOCAL, _V2_CMD_PROXY):
            raise ProxyError(f"PROXY v2 header has unknown command {ver_cmd & 0x0F}")
    if len(buf) > 13:
        fam, proto = buf[13] >> 4, buf[13] & 0x0F
        # Spec 2.2: families above AF_UNIX (3) and transports above DGRAM (2) "must be rejected
        # as invalid by receivers".
        if fam > 0x3 or proto > 0x2:
            raise ProxyError(f"PROXY v2 header has invalid family/protocol byte 0x{buf[13]:02x}")
    if len(buf) < _V2_FIXED:
        return None
    (addr_len,) = struct.unpack_from("!H", buf, 14)
    total = _V2_FIXED + addr_len
    if total > max_header:
        raise ProxyError(f"PROXY v2 header of {total} bytes exceeds the {max_header}-byte limit")
    if len(buf) < total:
        return None
    header = buf[:total]
    block = header[_V2_FIXED:]
    command = "LOCAL" if buf[12] & 0x0F == _V2_CMD_LOCAL else "PROXY"
    known = _V2_FAMILIES.get((buf[13] >> 4, buf[13] & 0x0F))

    if command == "LOCAL" or known is None:
        # Spec 2.2: for LOCAL the receiver "must use the real connection endpoints and discard
        # the protocol block including the family"; for UNSPEC it "should ignore address
        # information". What follows the (possibly absent) address block is kept as TLVs only
        # if it parses cleanly (HAProxy health checks send TLVs after a zero-length address);
        # a CRC32C that is present must still match.
        skip = known[1] if known is not None and addr_len >= known[1] else 0
        try:
            tlvs, crc_at = _split_tlvs(block, skip)
        except ProxyError:
            return ProxyHeader(2, command, "UNKNOWN", None, None, None, None, total)
        _check_crc32c(header, crc_at)
        return ProxyHeader(2, command, "UNKNOWN", None, None, None, None, total, tlvs)

    family, need = known
    if addr_len < need:
        raise ProxyError(
            f"PROXY v2 {family} address block is {addr_len} bytes, needs at least {need}"
        )
    src_addr: str
    dst_addr: str
    src_port: int | None
    dst_port: int | None
    if need == 12:
        src_addr = socket.inet_ntop(socket.AF_INET, block[0:4])
        dst_addr = socket.inet_ntop(socket.AF_INET, block[4:8])
        src_port, dst_port = struct.unpack_from("!HH", block, 8)
    elif need == 36:
        src_addr = socket.inet_ntop(socket.AF_INET6, block[0:16])
        dst_addr = socket.inet_ntop(socket.AF_INET6, block[16:32])
        src_port, dst_port = struct.unpack_from("!HH", block, 32)
    else:
        src_addr, dst_addr = _unix_path(block[0:108]), _unix_path(block[108:216])
        src_port = dst_port = None
    tlvs, crc_at = _split_tlvs(block, need)
    _check_crc32c(header, crc_at)
    return ProxyHeader(2, "PROXY", family, src_addr, src_port, dst_addr, dst_port, total, tlvs)


def _unix_path(raw: bytes) -> str:
    # sun_path semantics: NUL-terminated; a leading NUL means the Linux abstract namespace,
    # shown with the conventional '@' prefix (as ss(8) does).
    if raw[:1] == b"\0":
        return "@" + raw[1:].rstrip(b"\0").decode("utf-8", "backslashreplace")
    return raw.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")


def _split_tlvs(block: bytes, start: int) -> tuple[tuple[tuple[int, bytes], ...], int]:
    """Split block[start:] into (type, value) TLVs (spec 2.2); also return the CRC32C offset."""
    tlvs: list[tuple[int, bytes]] = []
    pos = start
    crc_at = -1
    while pos < len(block):
        if len(block) - pos < 3:
            raise ProxyError("PROXY v2 header ends inside a TLV")
        tlv_type = block[pos]
        (tlv_len,) = struct.unpack_from("!H", block, pos + 1)
        end = pos + 3 + tlv_len
        if end > len(block):
            raise ProxyError(f"PROXY v2 TLV 0x{tlv_type:02x} overruns the header")
        if tlv_type == _PP2_TYPE_CRC32C:
            if tlv_len != 4:
                raise ProxyError("PROXY v2 CRC32C TLV must be 4 bytes")
            crc_at = _V2_FIXED + pos + 3
        tlvs.append((tlv_type, block[pos + 3 : end]))
        pos = end
    return tuple(tlvs), crc_at


def _check_crc32c(header: bytes, crc_at: int) -> None:
    # Spec 2.2.3: a receiver that supports the checksum MUST zero the field, compute CRC32c over
    # the whole header and treat the connection as invalid on mismatch.
    if crc_at < 0:
        return
    (sent,) = struct.unpack_from("!I", header, crc_at)
    if crc32c(header[:crc_at] + b"\0\0\0\0" + header[crc_at + 4 :]) != sent:
        raise ProxyError("PROXY v2 header fails its CRC32C check")


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            # 0x82F63B78 is the reflected Castagnoli polynomial (RFC 4960 appendix B).
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """Return the CRC32c (Castagnoli) checksum of data, as used by PP2_TYPE_CRC32C."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF
