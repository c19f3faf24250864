"""pyinetd.protocols.proxyproto: the spec's edge cases, properties, and a real HAProxy sender."""

from __future__ import annotations

import contextlib
import ipaddress
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyinetd.protocols.proxyproto import MAX_HEADER, MAX_V1, ProxyError, ProxyHeader, crc32c, parse

# --- an independent encoder (written from the spec, not from the parser) ----------------------

SIG2 = bytes([0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A])


def encode_v1(family: str, src: str, dst: str, sport: int, dport: int) -> bytes:
    return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode("ascii")


def bitwise_crc32c(data: bytes) -> int:
    # Deliberately the slow bit-at-a-time form (RFC 4960 appendix B), not the parser's table.
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return ~crc & 0xFFFFFFFF


def encode_v2(
    command: int,
    fam_proto: int,
    addresses: bytes,
    tlvs: Sequence[tuple[int, bytes]] = (),
    *,
    with_crc: bool = False,
) -> bytes:
    body = addresses + b"".join(bytes([t]) + struct.pack(">H", len(v)) + v for t, v in tlvs)
    if with_crc:
        body += b"\x03\x00\x04\x00\x00\x00\x00"
    head = SIG2 + bytes([0x20 | command, fam_proto]) + struct.pack(">H", len(body))
    whole = head + body
    if with_crc:
        whole = whole[:-4] + struct.pack(">I", bitwise_crc32c(whole))
    return whole


def v2_inet(src: str, dst: str, sport: int, dport: int) -> tuple[int, bytes]:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    fam = 0x11 if s.version == 4 else 0x21
    return fam, s.packed + d.packed + struct.pack(">HH", sport, dport)


def same_ip(a: str | None, b: str) -> bool:
    return a is not None and ipaddress.ip_address(a) == ipaddress.ip_address(b)


# --- hand-picked cases -------------------------------------------------------------------------


def test_v1_tcp4_parses_and_leaves_payload() -> None:
    buf = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\n"
    h = parse(buf, "v1")
    assert h == ProxyHeader(1, "PROXY", "TCP4", "192.168.0.1", 56324, "192.168.0.11", 443, 47)
    assert buf[h.length :] == b"GET / HTTP/1.1\r\n"


def test_v1_tcp6_returns_inet_ntop_form() -> None:
    h = parse(b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::FFFF:1.2.3.4 1 65535\r\n", "any")
    assert h is not None
    assert (h.src_addr, h.dst_addr, h.src_port, h.dst_port) == (
        "2001:db8::1",
        "::ffff:1.2.3.4",
        1,
        65535,
    )


@pytest.mark.parametrize(
    "line", [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff:: ffff:: 65535 65535\r\n"]
)
def test_v1_unknown_is_accepted_without_addresses(line: bytes) -> None:
    assert parse(line + b"x", "v1") == ProxyHeader(
        1, "PROXY", "UNKNOWN", None, None, None, None, len(line)
    )


def test_v1_worst_case_of_107_bytes_is_accepted() -> None:
    v6 = "ffff:" * 7 + "ffff"
    line = f"PROXY UNKNOWN {v6} {v6} 65535 65535\r\n".encode()
    assert len(line) == MAX_V1
    assert parse(line, "v1") is not None


@pytest.mark.parametrize(
    ("buf", "message"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "missing PROXY protocol signature"),
        (b"PROXYTCP4", "missing"),
        (b"\x16\x03\x01\x02\x00", "missing"),  # a TLS ClientHello
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "bare LF"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", "bare CR"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", "bare CR"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 a 2\r\n", "invalid port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "invalid port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "invalid port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "invalid port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "invalid port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \xd9\xa1\r\n", "US-ASCII"),
        (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "invalid address"),
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "invalid address"),
        (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "invalid address"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "invalid address"),
        (b"PROXY TCP6 fe80::1%lo ::1 1 2\r\n", "invalid address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "needs 4 fields"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "needs 4 fields"),
        (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "needs 4 fields"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "needs 4 fields"),
        (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "unknown protocol"),
        (b"PROXY \r\n", "unknown protocol"),
        (b"PROXY UNKNOWN " + b"a" * 200, "no CRLF within 107"),
        (b"PROXY UNKNOWN " + b"a" * 92 + b"\r\n", "no CRLF within 107"),  # CRLF at 107-108
    ],
)
def test_v1_rejects(buf: bytes, message: str) -> None:
    with pytest.raises(ProxyError, match=message):
        parse(buf, "any")


def test_v2_tcp4_with_tlvs_and_payload() -> None:
    fam, addrs = v2_inet("10.0.0.1", "10.0.0.2", 1234, 80)
    hdr = encode_v2(1, fam, addrs, [(0x01, b"h2"), (0xE0, b"")])
    h = parse(hdr + b"payload", "v2")
    assert h == ProxyHeader(
        2, "PROXY", "TCP4", "10.0.0.1", 1234, "10.0.0.2", 80, len(hdr), ((1, b"h2"), (0xE0, b""))
    )


def test_v2_udp6_and_unix_families() -> None:
    _, addrs = v2_inet("2001:db8::1", "::1", 53, 5353)
    h = parse(encode_v2(1, 0x22, addrs), "any")
    assert h is not None and (h.family, h.src_addr, h.dst_port) == ("UDP6", "2001:db8::1", 5353)
    src = b"/run/a.sock".ljust(108, b"\0")
    dst = (b"\0abstract").ljust(108, b"\0")
    h = parse(encode_v2(1, 0x31, src + dst), "v2")
    assert h is not None
    assert (h.family, h.src_addr, h.dst_addr, h.src_port) == (
        "UNIX",
        "/run/a.sock",
        "@abstract",
        None,
    )


def test_v2_local_ignores_addresses_and_keeps_tlvs() -> None:
    h = parse(encode_v2(0, 0x00, b"", [(0x05, b"id")], with_crc=True), "v2")
    assert h is not None
    assert (h.command, h.family, h.src_addr, h.src_port) == ("LOCAL", "UNKNOWN", None, None)
    assert h.tlvs[0] == (0x05, b"id")
    # Spec: receivers "must not assume zero is presented for LOCAL connections".
    fam, addrs = v2_inet("1.2.3.4", "5.6.7.8", 1, 2)
    h = parse(encode_v2(0, fam, addrs), "v2")
    assert h is not None and h.command == "LOCAL" and h.src_addr is None and h.length == 28


def test_v2_unspec_proxy_is_accepted_as_unknown() -> None:
    h = parse(encode_v2(1, 0x00, b"whatever"), "v2")
    assert h is not None and (h.command, h.family, h.src_addr) == ("PROXY", "UNKNOWN", None)


def test_v2_crc32c_is_verified() -> None:
    assert crc32c(b"123456789") == bitwise_crc32c(b"123456789") == 0xE3069283
    fam, addrs = v2_inet("1.2.3.4", "5.6.7.8", 1, 2)
    good = encode_v2(1, fam, addrs, [(0x02, b"example.com")], with_crc=True)
    assert parse(good, "v2") is not None
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    with pytest.raises(ProxyError, match="CRC32C"):
        parse(bytes(bad), "v2")
    bad_local = bytearray(encode_v2(0, 0x00, b"", with_crc=True))
    bad_local[-1] ^= 0xFF
    with pytest.raises(ProxyError, match="CRC32C"):
        parse(bytes(bad_local), "v2")


def _v2_raw(ver_cmd: int, fam: int, body: bytes, length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return SIG2 + bytes([ver_cmd, fam]) + struct.pack(">H", n) + body


@pytest.mark.parametrize(
    ("buf", "message"),
    [
        (_v2_raw(0x11, 0x11, bytes(12)), "unsupported version 1"),
        (_v2_raw(0x31, 0x11, bytes(12)), "unsupported version 3"),
        (_v2_raw(0x22, 0x11, bytes(12)), "unknown command 2"),
        (_v2_raw(0x2F, 0x11, bytes(12)), "unknown command 15"),
        (_v2_raw(0x21, 0x41, bytes(12)), "invalid family"),
        (_v2_raw(0x21, 0x13, bytes(12)), "invalid family"),
        (_v2_raw(0x21, 0x11, b"", MAX_HEADER - 15), "exceeds the 536-byte limit"),
        (_v2_raw(0x21, 0x11, bytes(8)), "needs at least 12"),
        (_v2_raw(0x21, 0x21, bytes(12)), "needs at least 36"),
        (_v2_raw(0x21, 0x31, bytes(200)), "needs at least 216"),
        (_v2_raw(0x21, 0x11, bytes(12) + b"\x01\x00"), "ends inside a TLV"),
        (_v2_raw(0x21, 0x11, bytes(12) + b"\x01\x00\x05ab"), "overruns"),
        (_v2_raw(0x21, 0x11, bytes(12) + b"\x03\x00\x02ab"), "CRC32C TLV must be 4"),
    ],
)
def test_v2_rejects(buf: bytes, message: str) -> None:
    with pytest.raises(ProxyError, match=message):
        parse(buf, "v2")


def test_v2_bad_version_is_rejected_before_the_rest_arrives() -> None:
    with pytest.raises(ProxyError, match="version"):
        parse(SIG2 + b"\x10", "v2")
    with pytest.raises(ProxyError, match="exceeds"):
        parse(SIG2 + b"\x21\x11\xff\xff", "v2")


def test_max_header_can_be_raised() -> None:
    fam, addrs = v2_inet("1.2.3.4", "5.6.7.8", 1, 2)
    big = encode_v2(1, fam, addrs, [(0xE1, bytes(1000))])
    with pytest.raises(ProxyError, match="limit"):
        parse(big, "v2")
    h = parse(big, "v2", max_header=2048)
    assert h is not None and h.tlvs == ((0xE1, bytes(1000)),)


def test_wrong_version_is_rejected() -> None:
    v1 = encode_v1("TCP4", "1.2.3.4", "5.6.7.8", 1, 2)
    v2 = encode_v2(1, *v2_inet("1.2.3.4", "5.6.7.8", 1, 2))
    with pytest.raises(ProxyError, match="only v2"):
        parse(v1, "v2")
    with pytest.raises(ProxyError, match="only v2"):
        parse(b"P", "v2")
    with pytest.raises(ProxyError, match="only v1"):
        parse(v2, "v1")
    with pytest.raises(ProxyError, match="only v1"):
        parse(b"\r\n", "v1")
    with pytest.raises(ValueError, match="accept"):
        parse(v1, "v3")


def test_empty_and_partial_signature_need_more() -> None:
    for accept in ("v1", "v2", "any"):
        assert parse(b"", accept) is None
    assert parse(b"PROX", "any") is None
    assert parse(SIG2[:5], "any") is None


# --- properties --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    wire: bytes
    version: int
    family: str
    src: str
    dst: str
    sport: int
    dport: int
    tlvs: tuple[tuple[int, bytes], ...]


ports = st.integers(0, 65535)
tlv_lists = st.lists(
    st.tuples(st.integers(0, 255).filter(lambda t: t != 0x03), st.binary(max_size=40)),
    max_size=6,
)


@st.composite
def headers(draw: st.DrawFn) -> Case:
    version = draw(st.sampled_from([1, 2]))
    addresses = draw(st.sampled_from([st.ip_addresses(v=4), st.ip_addresses(v=6)]))
    src, dst = draw(addresses), draw(addresses)
    v = src.version
    sport, dport = draw(ports), draw(ports)
    family = f"TCP{v}"
    if version == 1:
        # Senders spell IPv6 either compressed or in full; both are the canonical format.
        spell = draw(st.sampled_from(["compressed", "exploded"]))
        s_txt, d_txt = getattr(src, spell), getattr(dst, spell)
        wire = encode_v1(family, s_txt, d_txt, sport, dport)
        return Case(wire, 1, family, str(src), str(dst), sport, dport, ())
    tlvs = draw(tlv_lists)
    fam, addrs = v2_inet(str(src), str(dst), sport, dport)
    with_crc = draw(st.booleans())
    wire = encode_v2(1, fam, addrs, tlvs, with_crc=with_crc)
    expect = tuple(tlvs) + (((0x03, wire[-4:]),) if with_crc else ())
    return Case(wire, 2, family, str(src), str(dst), sport, dport, expect)


@settings(max_examples=300)
@given(headers(), st.binary(max_size=64))
def test_encoded_headers_round_trip(case: Case, payload: bytes) -> None:
    for accept in ("any", f"v{case.version}"):
        h = parse(case.wire + payload, accept)
        assert h is not None
        assert (h.version, h.command, h.family, h.length) == (
            case.version,
            "PROXY",
            case.family,
            len(case.wire),
        )
        assert same_ip(h.src_addr, case.src) and same_ip(h.dst_addr, case.dst)
        assert (h.src_port, h.dst_port) == (case.sport, case.dport)
        assert h.tlvs == case.tlvs
        assert (case.wire + payload)[h.length :] == payload


@settings(max_examples=150)
@given(headers())
def test_every_prefix_needs_more(case: Case) -> None:
    for k in range(len(case.wire)):
        assert parse(case.wire[:k], "any") is None, k


junk = st.one_of(
    st.binary(max_size=600),
    st.binary(max_size=300).map(lambda b: b"PROXY " + b),
    st.binary(max_size=600).map(lambda b: SIG2 + b),
    st.tuples(st.sampled_from([b"TCP4 ", b"TCP6 ", b"UNKNOWN"]), st.binary(max_size=100)).map(
        lambda t: b"PROXY " + t[0] + t[1]
    ),
)


@settings(max_examples=500)
@given(junk, st.sampled_from(["v1", "v2", "any"]))
def test_random_bytes_only_ever_raise_proxy_error(buf: bytes, accept: str) -> None:
    try:
        h = parse(buf, accept)
    except ProxyError:
        return
    assert h is None or 0 < h.length <= len(buf)


@settings(max_examples=300)
@given(headers(), st.data())
def test_corrupted_headers_only_ever_raise_proxy_error(case: Case, data: st.DataObject) -> None:
    wire = bytearray(case.wire)
    i = data.draw(st.integers(0, len(wire) - 1))
    wire[i] = data.draw(st.integers(0, 255))
    with contextlib.suppress(ProxyError):
        parse(bytes(wire), "any")


# --- a real sender: HAProxy ----------------------------------------------------------------------

HAPROXY = shutil.which("haproxy")


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@dataclass
class HAProxy:
    fronts: dict[str, tuple[str, int]]  # name -> address clients connect to
    backend: socket.socket  # where HAProxy connects, sending the PROXY header


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[HAProxy]:
    if HAPROXY is None:
        pytest.skip("haproxy is not installed")
    backend = socket.create_server(("127.0.0.1", 0))
    backend.settimeout(10)
    bport = backend.getsockname()[1]
    # The listening sockets are created and bound here and handed over as fd@N, so there is no
    # port race and no need to wait for HAProxy to bind: the kernel queues connections already.
    specs = [
        ("v1", socket.AF_INET, "send-proxy"),
        ("v2", socket.AF_INET, "send-proxy-v2"),
        ("v2crc", socket.AF_INET, "send-proxy-v2 proxy-v2-options crc32c"),
    ]
    if _ipv6_loopback():
        specs += [
            ("v1_6", socket.AF_INET6, "send-proxy"),
            ("v2_6", socket.AF_INET6, "send-proxy-v2"),
        ]
    listeners = []
    cfg = [
        "global",
        "    maxconn 100",
        "defaults",
        "    mode tcp",
        "    timeout connect 5s",
        "    timeout client 10s",
        "    timeout server 10s",
    ]
    fronts = {}
    for name, family, option in specs:
        host = "127.0.0.1" if family == socket.AF_INET else "::1"
        ls = socket.create_server((host, 0), family=family)
        ls.set_inheritable(True)
        listeners.append(ls)
        fronts[name] = ls.getsockname()[:2]
        cfg += [
            f"frontend fe_{name}",
            f"    bind fd@{ls.fileno()}",
            f"    default_backend be_{name}",
            f"backend be_{name}",
            f"    server s 127.0.0.1:{bport} {option}",
        ]
    conf = tmp_path / "haproxy.cfg"
    conf.write_text("\n".join(cfg) + "\n")
    proc = subprocess.Popen(
        [HAPROXY, "-db", "-f", str(conf)],
        pass_fds=[ls.fileno() for ls in listeners],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield HAProxy(fronts, backend)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
        for ls in listeners:
            ls.close()
        backend.close()


def _receive_header(backend: socket.socket, accept: str) -> tuple[ProxyHeader, bytes]:
    conn, _ = backend.accept()
    with conn:
        conn.settimeout(10)
        buf = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            h = parse(buf, accept)
            if h is not None and len(buf) >= h.length + 5:
                return h, buf[h.length :]
            chunk = conn.recv(4096)
            if not chunk:
                break
            buf += chunk
    raise AssertionError(f"no header and payload from HAProxy: {buf!r}")


@pytest.mark.parametrize("name", ["v1", "v2", "v2crc", "v1_6", "v2_6"])
def test_haproxy_header_carries_the_real_client_address(haproxy: HAProxy, name: str) -> None:
    if name not in haproxy.fronts:
        pytest.skip("no IPv6 loopback")
    front = haproxy.fronts[name]
    family = socket.AF_INET6 if ":" in front[0] else socket.AF_INET
    with socket.socket(family) as client:
        client.settimeout(10)
        client.connect(front)
        client.sendall(b"hello")
        h, rest = _receive_header(haproxy.backend, "any")
        me = client.getsockname()
    assert h.version == (1 if name.startswith("v1") else 2)
    assert h.command == "PROXY"
    assert h.family == ("TCP6" if family == socket.AF_INET6 else "TCP4")
    assert (h.src_addr, h.src_port) == (me[0], me[1])
    assert (h.dst_addr, h.dst_port) == (front[0], front[1])
    assert rest == b"hello"
    if name == "v2crc":
        assert any(t == 0x03 for t, _ in h.tlvs)
