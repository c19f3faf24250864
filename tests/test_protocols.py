"""TLS termination, PROXY protocol (with a real HAProxy) and redirect, end to end."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from conftest import (
    DEADLINE,
    Pyinetd,
    children_of,
    free_port,
    port_open,
    script,
    tcp_talk,
    wait_for,
)

trustme = pytest.importorskip("trustme")
Start = Callable[..., Pyinetd]


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, object]:
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    server.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    for blob in server.cert_chain_pems[1:]:
        blob.write_to_path(tmp_path / "cert.pem", append=True)
    server.private_key_pem.write_to_path(tmp_path / "key.pem")
    (tmp_path / "key.pem").chmod(0o600)  # as root pyinetd refuses a key others may read
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    client = ca.issue_cert("alice@example.org", common_name="alice")
    client.private_key_and_cert_chain_pem.write_to_path(tmp_path / "client.pem")
    return {"ca": ca, "dir": tmp_path}


def client_ctx(pki: dict[str, object], cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(Path(str(pki["dir"])) / "ca.pem"))
    if cert:
        ctx.load_cert_chain(str(Path(str(pki["dir"])) / "client.pem"))
    return ctx


def tls_talk(port: int, ctx: ssl.SSLContext, data: bytes, sni: str = "localhost") -> bytes:
    """TLS connect, send, half-close (a TCP FIN under TLS), read until the server closes."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as raw,
        ctx.wrap_socket(raw, server_hostname=sni) as s,
    ):
        s.sendall(data)
        socket.socket.shutdown(s, socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def tls_service(port: int, exec_: object, **extra: object) -> dict[str, object]:
    return {
        "listen": f"127.0.0.1:{port}",
        "exec": exec_,
        "tls": {"cert": "cert.pem", "key": "key.pem", **extra},
    }


# ---------------------------------------------------------------- TLS
def test_tls_service_sees_plain_bytes_and_ssl_environment(
    inetd: Start, pki: dict[str, object], tmp_path: Path
) -> None:
    port = free_port()
    show = script(
        tmp_path,
        "show.sh",
        "#!/bin/sh\nread line\n"
        'echo "$line|$SSL_PROTOCOL|$SSL_TLS_SNI_SERVERNAME|$REMOTE_ADDR|'
        '${SSL_CLIENT_VERIFY:-none}"\n',
    )
    inetd({"services": {"s": tls_service(port, show)}})
    out = tls_talk(port, client_ctx(pki), b"hello\n").decode().strip()
    line, proto, sni, addr, verify = out.split("|")
    assert (line, sni, addr) == ("hello", "localhost", "127.0.0.1")
    assert proto.startswith("TLSv1.")
    assert verify in ("NONE", "none")


def test_tls_ten_megabytes_each_way_with_half_close(
    inetd: Start, pki: dict[str, object], tmp_path: Path
) -> None:
    port = free_port()
    digest = script(
        tmp_path,
        "digest.sh",
        "#!/bin/sh\nsha256sum | cut -c1-64\nhead -c 10485760 /dev/zero | tr '\\0' x\n",
    )
    inetd({"services": {"s": tls_service(port, digest)}})
    payload = os.urandom(10 * 1024 * 1024)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as raw,
        client_ctx(pki).wrap_socket(raw, server_hostname="localhost") as s,
    ):
        sender = threading.Thread(target=s.sendall, args=(payload,))
        sender.start()
        sender.join(DEADLINE * 3)
        # Half-close: the service sees EOF on stdin only now, so its digest covers all.
        socket.socket.shutdown(s, socket.SHUT_WR)
        out = b""
        while chunk := s.recv(1 << 20):
            out += chunk
    assert out[:64].decode() == hashlib.sha256(payload).hexdigest()
    assert out[65:] == b"x" * 10485760


def test_tls_openssl_s_client(inetd: Start, pki: dict[str, object]) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    port = free_port()
    inetd({"services": {"s": tls_service(port, ["/bin/echo", "through openssl"])}})
    out = subprocess.run(
        [
            "openssl",
            "s_client",
            "-quiet",
            "-connect",
            f"127.0.0.1:{port}",
            "-servername",
            "localhost",
            "-CAfile",
            str(Path(str(pki["dir"])) / "ca.pem"),
            "-verify_return_error",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=DEADLINE,
    )
    assert b"through openssl\n" in out.stdout, out.stderr


def test_tls_client_certificate_required_accepted_and_refused(
    inetd: Start, pki: dict[str, object], tmp_path: Path
) -> None:
    port = free_port()
    show = script(tmp_path, "who.sh", '#!/bin/sh\necho "$SSL_CLIENT_VERIFY $SSL_CLIENT_S_DN"\n')
    p = inetd({"services": {"s": tls_service(port, show, client_ca="ca.pem")}})
    out = tls_talk(port, client_ctx(pki, cert=True), b"")
    assert out.startswith(b"SUCCESS ") and b"CN=alice" in out
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        tls_talk(port, client_ctx(pki, cert=False), b"x")
    p.wait_log(r"TLS handshake with 127\.0\.0\.1:\d+ failed")


def test_tls_slow_client_never_finishing_the_handshake(
    inetd: Start, tmp_path: Path, pki: dict[str, object]
) -> None:
    port = free_port()
    marker = tmp_path / "started"
    svc = script(tmp_path, "mark.sh", f"#!/bin/sh\ntouch {marker}\ncat\n")
    p = inetd({"services": {"s": tls_service(port, svc, handshake_timeout=0.5)}})
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
        s.sendall(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
        # Closed by the deadline, by the parent, before any relay was forked; with the
        # three bytes unread that close is a reset (RFC 1122 4.2.2.13).
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(100) == b""
    p.wait_log(r"s: refused 127\.0\.0\.1:\d+: tls \(no TLS ClientHello in time\)")
    assert not marker.exists()  # the service never started


def test_tls_certificate_reread_on_reload(inetd: Start, pki: dict[str, object]) -> None:
    port = free_port()
    p = inetd({"services": {"s": tls_service(port, "/bin/cat")}})
    assert tls_talk(port, client_ctx(pki), b"one") == b"one"
    other = trustme.CA()
    cert = other.issue_cert("localhost")
    d = Path(str(pki["dir"]))
    cert.cert_chain_pems[0].write_to_path(d / "cert.pem")
    cert.private_key_pem.write_to_path(d / "key.pem")
    p.signal(signal.SIGHUP)
    p.wait_log("reloaded")
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_talk(port, client_ctx(pki), b"two")  # the new certificate is served
    ctx = ssl.create_default_context()
    other.configure_trust(ctx)
    assert tls_talk(port, ctx, b"three") == b"three"


# A renewal landing at the worst moment of a SIGHUP: after the new configuration is read and
# checked, before it is applied. The driver runs the real pyinetd, its `load` wrapped to move
# key.next over key.pem right after a reload's load returns.
_SWAP_DRIVER = """
import os, sys
import pyinetd.server as server
from pyinetd import cli

real_load = server.load

def load(path):
    config = real_load(path)
    key = os.path.join(os.path.dirname(str(path)), "key.pem")
    if os.path.exists(key + ".next"):
        os.replace(key + ".next", key)
    return config

server.load = load
sys.exit(cli.main(sys.argv[sys.argv.index("-c"):]))
"""


def test_tls_key_swapped_during_reload_never_serves_plaintext(
    inetd: Start, pki: dict[str, object], tmp_path: Path
) -> None:
    # Before: the context was set to None, the second read failed outside any try, the relay
    # skipped the handshake, and `nc` with no certificate got `uid=0(root)`; the services after
    # it were never updated while the new config was already in place.
    tls_port, later_port = free_port(), free_port()
    driver = tmp_path / "driver.py"
    driver.write_text(_SWAP_DRIVER)
    ca = str(Path(str(pki["dir"])) / "ca.pem")
    config = {
        "services": {
            "s": tls_service(tls_port, "/usr/bin/id", client_ca=ca),
            "later": {"listen": f"127.0.0.1:{later_port}", "builtin": "echo"},
        }
    }
    p = inetd(config, prefix=(sys.executable, str(driver)))
    assert tls_talk(tls_port, client_ctx(pki, cert=True), b"").startswith(b"uid=0(root)")
    other = trustme.CA().issue_cert("x")
    (tmp_path / "key.pem.next").write_bytes(other.private_key_pem.bytes())
    (tmp_path / "key.pem.next").chmod(0o600)
    changed = {**config["services"], "later": {**config["services"]["later"], "builtin": "daytime"}}
    p.path.write_text(yaml.safe_dump({"services": changed}))
    p.signal(signal.SIGHUP)
    p.wait_log("reload failed|internal error")  # (before the fix: the latter, mid-apply)
    assert not (tmp_path / "key.pem.next").exists()  # the swap did happen
    # No TLS, or TLS without a client certificate: nothing from the service.
    try:
        plain = tcp_talk(tls_port, b"hello\n")
    except ConnectionResetError:
        plain = b""  # the handshake failed with our bytes unread
    assert b"uid=" not in plain
    with contextlib.suppress(ssl.SSLError, OSError):
        assert b"uid=" not in tls_talk(tls_port, client_ctx(pki), b"")
    # The running configuration is whole: the TLS service as it was, and the one after it too.
    assert tls_talk(tls_port, client_ctx(pki, cert=True), b"").startswith(b"uid=0(root)")
    assert tcp_talk(later_port, b"still echo\n") == b"still echo\n"
    p.wait_log(r"reload failed, keeping the running configuration: .*key\.pem'?: the key does not")


def test_tls_bad_key_is_a_config_error(tmp_path: Path, pki: dict[str, object]) -> None:
    (tmp_path / "bad.pem").write_text("not a key")
    cfg = tmp_path / "inetd.yaml"
    cfg.write_text(
        "services:\n  s: {listen: 7, exec: /bin/cat, tls: {cert: cert.pem, key: bad.pem}}\n"
    )
    out = subprocess.run(
        [os.sys.executable, "-m", "pyinetd", "-c", str(cfg), "--check"],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert out.returncode == 2
    assert out.stderr.startswith(f"{cfg}:2:")
    assert ": services.s.tls" in out.stderr


# ---------------------------------------------------------------- PROXY protocol
def addr_service(port: int, **extra: object) -> dict[str, object]:
    return {
        "listen": f"127.0.0.1:{port}",
        "exec": ["/bin/sh", "-c", 'echo "$REMOTE_ADDR $REMOTE_PORT $TCPLOCALPORT"; cat'],
        **extra,
    }


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Callable[[str, int], int]]:
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy not installed")
    procs: list[subprocess.Popen[bytes]] = []

    def start(send_proxy: str, backend: int) -> int:
        front = free_port()
        cfg = tmp_path / f"haproxy-{front}.cfg"
        cfg.write_text(f"""global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend fe
    bind 127.0.0.1:{front}
    default_backend be
backend be
    server s1 127.0.0.1:{backend} {send_proxy}
""")
        proc = subprocess.Popen(
            ["haproxy", "-db", "-f", str(cfg)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        procs.append(proc)
        wait_for(lambda: port_open(front), what="haproxy listening")
        return front

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(DEADLINE)


@pytest.mark.parametrize("send_proxy", ["send-proxy", "send-proxy-v2"])
def test_proxy_protocol_behind_a_real_haproxy(
    inetd: Start, haproxy: Callable[[str, int], int], send_proxy: str
) -> None:
    port = free_port()
    inetd({"services": {"p": addr_service(port, proxy_protocol="any")}})
    front = haproxy(send_proxy, port)
    with socket.socket() as s:
        s.settimeout(DEADLINE)
        s.bind(("127.0.0.5", 0))
        s.connect(("127.0.0.1", front))
        me = s.getsockname()
        s.sendall(b"payload after the header\n")
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(4096):
            out += chunk
    # The client HAProxy saw, not HAProxy's own address; then the bytes intact.
    assert out == f"127.0.0.5 {me[1]} {front}\npayload after the header\n".encode()


def test_proxy_address_drives_allow_deny(inetd: Start, haproxy: Callable[[str, int], int]) -> None:
    port = free_port()
    p = inetd({"services": {"p": addr_service(port, proxy_protocol="v2", deny=["127.0.0.6"])}})
    front = haproxy("send-proxy-v2", port)
    with socket.socket() as s:
        s.settimeout(DEADLINE)
        s.bind(("127.0.0.6", 0))
        s.connect(("127.0.0.1", front))
        assert s.recv(100) == b""
    p.wait_log(r"p: refused 127\.0\.0\.6:\d+: deny")


def raw_proxy(port: int, data: bytes, close: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
        s.sendall(data)
        if close:
            # a malformed header may be refused (reset) before the half-close
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while chunk := s.recv(4096):
                out += chunk
        except ConnectionResetError:
            pass
        return out


V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def test_hand_made_headers_good_and_malformed(inetd: Start) -> None:
    port = free_port()
    p = inetd({"services": {"p": addr_service(port, proxy_protocol="any", proxy_timeout=0.5)}})
    assert raw_proxy(port, b"PROXY TCP4 192.0.2.1 192.0.2.2 5555 80\r\nrest") == (
        b"192.0.2.1 5555 80\nrest"
    )
    v2 = (
        V2_SIG
        + b"\x21\x11\x00\x0c"
        + socket.inet_aton("198.51.100.7")
        + socket.inet_aton("198.51.100.8")
        + (4242).to_bytes(2, "big")
        + (443).to_bytes(2, "big")
    )
    assert raw_proxy(port, v2 + b"after") == b"198.51.100.7 4242 443\nafter"
    local = V2_SIG + b"\x20\x00\x00\x00"  # LOCAL: health check, the socket's peer is kept
    assert raw_proxy(port, local).startswith(b"127.0.0.1 ")
    bad = [
        b"GET / HTTP/1.0\r\n\r\n",  # no header at all
        b"PROXY TCP4 192.0.2.1 192.0.2.2 99999 80\r\n",  # port out of range
        b"PROXY TCP4 192.0.2.1\r\n",  # truncated line
        b"PROXY TCP6 192.0.2.1 192.0.2.2 1 2\r\n",  # wrong family
        b"PROXY " + b"A" * 200,  # no CRLF within 107 bytes
        V2_SIG + b"\x21\x11\x00\x04abcd",  # address block too short
        V2_SIG[:8],  # closed in the middle of the signature
    ]
    for data in bad:
        assert raw_proxy(port, data) == b"", data
    assert raw_proxy(port, b"PROXY TCP4 1.2.3.4", close=False) == b""  # never finishes
    # Each refusal counted (the log shows the first per address and minute), no child.
    out = subprocess.run(
        [os.sys.executable, "-m", "pyinetd", "status", "--json", "-c", str(p.path)],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    (svc,) = json.loads(out.stdout)["services"]
    assert svc["refused"] == {"proxy": len(bad) + 1}
    assert svc["accepted"] == 3
    p.wait_log(r"refused 127\.0\.0\.1:\d+: proxy \(missing PROXY protocol signature\)")


def test_proxy_from_limits_who_may_send_a_header(inetd: Start) -> None:
    port = free_port()
    p = inetd(
        {"services": {"p": addr_service(port, proxy_protocol="v1", proxy_from=["127.0.0.9"])}}
    )
    assert raw_proxy(port, b"PROXY TCP4 192.0.2.1 192.0.2.2 5555 80\r\n") == b""
    p.wait_log(r"refused 127\.0\.0\.1:\d+: proxy_from")


# ---------------------------------------------------------------- redirect
def test_redirect_relays_to_the_target_and_closes_when_unreachable(inetd: Start) -> None:
    port, target, dead, nowhere = free_port(), free_port(), free_port(), free_port()
    p = inetd(
        {
            "services": {
                "echo": {"listen": f"127.0.0.1:{target}"},
                "fwd": {"listen": f"127.0.0.1:{port}", "redirect": f"127.0.0.1:{target}"},
                "nowhere": {"listen": f"127.0.0.1:{nowhere}", "redirect": f"127.0.0.1:{dead}"},
            }
        }
    )
    payload = os.urandom(2_000_000)
    assert tcp_talk(port, payload) == payload
    assert raw_proxy(nowhere, b"anyone?") == b""  # closed (EOF or reset), nothing relayed
    p.wait_log(
        rf"nowhere(\[\d+\])?: redirect 127\.0\.0\.1:\d+ -> 127\.0\.0\.1:{dead}: "
        r".*Connection refused"
    )
    assert tcp_talk(port, b"still") == b"still"


# ---------------------------------------------------------------- client-chosen bytes (18.7)
@pytest.mark.parametrize(
    "sni",
    ["a\nEVIL=1", "../../../etc/passwd", "x;rm -rf /", "\x1b]0;owned\x07", "a" * 64],
    ids=["newline", "path", "shell", "escape", "long-label"],
)
def test_sni_that_is_not_a_host_name_is_left_out_and_logged(
    inetd: Start, pki: dict[str, object], sni: str
) -> None:
    """The SNI name reached SSL_TLS_SNI_SERVERNAME byte for byte: a newline, a path, shell
    metacharacters, a terminal escape. Only a valid host name is passed on."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    port = free_port()
    p = inetd({"services": {"s": tls_service(port, ["/usr/bin/env"])}})
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", sni, "-quiet",
         "-CAfile", str(Path(str(pki["dir"])) / "ca.pem")],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=DEADLINE,
    ).stdout  # fmt: skip
    assert b"PYINETD_SERVICE=s" in out  # the service ran
    assert b"SSL_TLS_SNI" not in out and b"\nEVIL=1" not in out
    p.wait_log(r"s\[\d+\]: TLS from 127\.0\.0\.1:\d+: SNI .* is not a host name")


def test_sni_host_name_still_reaches_the_service(inetd: Start, pki: dict[str, object]) -> None:
    port = free_port()
    inetd({"services": {"s": tls_service(port, ["/usr/bin/env"])}})
    out = tls_talk(port, client_ctx(pki), b"", sni="localhost").decode()
    assert "SSL_TLS_SNI_SERVERNAME=localhost\n" in out


def test_client_dn_with_a_newline_is_escaped_as_mod_ssl_does(
    inetd: Start, pki: dict[str, object], tmp_path: Path
) -> None:
    """A trusted client certificate whose CN holds "\\nEVIL=1" put a line of its own into
    SSL_CLIENT_S_DN: now the newline is \\0A, as mod_ssl writes it."""
    ca = pki["ca"]
    evil = ca.issue_cert("evil@example.org", common_name="alice\nEVIL=1")  # type: ignore[attr-defined]
    evil.private_key_and_cert_chain_pem.write_to_path(tmp_path / "evil.pem")
    port = free_port()
    inetd({"services": {"s": tls_service(port, ["/usr/bin/env"], client_ca="ca.pem")}})
    ctx = client_ctx(pki)
    ctx.load_cert_chain(str(tmp_path / "evil.pem"))
    lines = tls_talk(port, ctx, b"").decode().splitlines()
    dn = [x for x in lines if x.startswith("SSL_CLIENT_S_DN=")]
    assert dn and dn[0].startswith("SSL_CLIENT_S_DN=CN=alice\\0AEVIL=1,"), dn
    assert "EVIL=1" not in lines


def test_a_tls_relay_sends_without_nagle(
    inetd: Start, pki: dict[str, object], tmp_path: Path
) -> None:
    """With `nodelay` unset, each first reply after the handshake waited ~40 ms (Nagle behind the
    client's delayed ACK; tls-no-reply-stall). The relay's client socket has TCP_NODELAY: read
    from the relay itself (pidfd_getfd, as root)."""
    if os.geteuid() != 0:
        pytest.skip("pidfd_getfd of another process needs root")
    port = free_port()
    p = inetd({"services": {"s": tls_service(port, "/bin/cat")}})
    ctx = client_ctx(pki)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as s,
    ):
        s.sendall(b"x\n")
        assert s.recv(10) == b"x\n"
        mine = s.getsockname()
        relays = [pid for pid, _ in children_of(p.pid)]
        found = []
        for pid in relays:
            pidfd = os.pidfd_open(pid)
            try:
                for name in os.listdir(f"/proc/{pid}/fd"):
                    try:  # an fd may close meanwhile (EBADF, ENOENT)
                        if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                            continue
                        sock = socket.socket(fileno=_pidfd_getfd(pidfd, int(name)))
                    except OSError:
                        continue
                    with sock, contextlib.suppress(OSError):
                        if sock.getpeername() == mine:
                            found.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            finally:
                os.close(pidfd)
    assert found and all(found), found


def _pidfd_getfd(pidfd: int, fd: int) -> int:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    got = libc.syscall(438, pidfd, fd, 0)  # pidfd_getfd(2)
    if got < 0:
        raise OSError(ctypes.get_errno(), "pidfd_getfd")
    return int(got)
