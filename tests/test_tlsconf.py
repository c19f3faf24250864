"""pyinetd.protocols.tlsconf: contexts, handshake deadlines, variables, openssl s_client."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import trustme

from pyinetd.protocols.tlsconf import (
    TLSSettings,
    format_dn,
    handshake,
    host_name,
    make_context,
    tls_environ,
)
from pyinetd.spawn.relay import relay

OPENSSL = shutil.which("openssl")


@dataclass(frozen=True)
class PKI:
    dir: Path
    ca: Path  # signs the server certificate
    server: TLSSettings  # no client certificates
    mutual: TLSSettings  # client certificates from client_ca required
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from a CA nobody trusts
    rogue_key: Path
    trust: trustme.CA
    client_ca: trustme.CA
    rogue_ca: trustme.CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    ca, client_ca, rogue_ca = trustme.CA(), trustme.CA(), trustme.CA()
    server = ca.issue_cert("localhost", "pyinetd.test")
    client = client_ca.issue_cert(
        "alice@example.org",
        common_name="alice",
        organization_name="Example, Inc.",
        organization_unit_name="ops",
    )
    rogue = rogue_ca.issue_cert("mallory@example.org", common_name="mallory")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    client_ca.cert_pem.write_to_path(str(d / "client_ca.pem"))
    server.cert_chain_pems[0].write_to_path(str(d / "server.pem"))
    server.private_key_pem.write_to_path(str(d / "server.key"))
    client.cert_chain_pems[0].write_to_path(str(d / "client.pem"))
    client.private_key_pem.write_to_path(str(d / "client.key"))
    rogue.cert_chain_pems[0].write_to_path(str(d / "rogue.pem"))
    rogue.private_key_pem.write_to_path(str(d / "rogue.key"))
    for key in d.glob("*.key"):
        key.chmod(0o600)  # as root pyinetd refuses a key others may read
    plain = TLSSettings(cert=d / "server.pem", key=d / "server.key", handshake_timeout=5)
    return PKI(
        dir=d,
        ca=d / "ca.pem",
        server=plain,
        mutual=replace(plain, client_ca=d / "client_ca.pem"),
        client_cert=d / "client.pem",
        client_key=d / "client.key",
        rogue_cert=d / "rogue.pem",
        rogue_key=d / "rogue.key",
        trust=ca,
        client_ca=client_ca,
        rogue_ca=rogue_ca,
    )


def client_context(pki: PKI, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    pki.trust.configure_trust(ctx)
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as ls:
        client = socket.create_connection(ls.getsockname())
        server, _ = ls.accept()
    return client, server


class Background:
    """A function run in a thread (the client half while the test runs the server half)."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self.value: object = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], object]) -> None:
        try:
            self.value = fn()
        except BaseException as e:
            self.error = e

    def join(self, timeout: float = 10) -> object:
        self.thread.join(timeout)
        assert not self.thread.is_alive()
        return self.value


def handshake_pair(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    sni: str | None = "pyinetd.test",
    timeout: float = 5,
) -> tuple[ssl.SSLSocket | BaseException, BaseException | None]:
    """Handshake in-process; returns (server socket or its error, client error)."""
    c, s = tcp_pair()
    c.settimeout(10)

    def client_side() -> None:
        tc = client_ctx.wrap_socket(c, server_hostname=sni, do_handshake_on_connect=False)
        with tc:
            tc.do_handshake()
            tc.recv(1)  # TLS 1.3: a refused client certificate only shows up on the first read

    bg = Background(client_side)
    server: ssl.SSLSocket | BaseException
    try:
        server = handshake(server_ctx, s, timeout)
        server.sendall(b"!")
    except (OSError, ValueError) as e:
        server = e
    bg.join()
    c.close()
    return server, bg.error


# --- make_context ------------------------------------------------------------------------------


def test_make_context_defaults(pki: PKI) -> None:
    ctx = make_context(pki.server)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_NONE
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    ctx = make_context(replace(pki.mutual, min_version="1.3"))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.verify_mode == ssl.CERT_REQUIRED


PASS_OUT = ["-passout", "pass:secret", "-out"]


def _bad_settings(pki: PKI) -> list[tuple[TLSSettings, str]]:
    d = pki.dir
    (d / "junk.pem").write_text("not a certificate\n")
    (d / "other.key").write_bytes(trustme.CA().issue_cert("x").private_key_pem.bytes())
    enc = d / "encrypted.key"
    if not enc.exists() and OPENSSL:
        subprocess.run(
            [OPENSSL, "pkey", "-in", str(d / "server.key"), "-aes256", *PASS_OUT, str(enc)],
            check=True,
        )
    (d / "cert-as.key").write_bytes((d / "server.pem").read_bytes())
    for key in (d / "other.key", enc, d / "cert-as.key"):
        if key.exists():
            key.chmod(0o600)  # refused as root otherwise, before what is tested here
    s = pki.server
    cases = [
        (
            replace(s, cert=d / "missing.pem"),
            r"tls.cert: '.*missing.pem': cannot read: No such file",
        ),
        (replace(s, key=d / "missing.key"), r"tls.key: '.*missing.key': cannot read"),
        (replace(s, cert=d / "junk.pem"), r"tls.cert: '.*junk.pem': no PEM certificate"),
        (replace(s, key=d / "cert-as.key"), r"tls.key: '.*cert-as.key': no PEM private key"),
        (replace(s, key=d / "other.key"), r"'.*other.key': the key does not belong to the cert"),
        (replace(s, client_ca=d / "missing_ca.pem"), r"tls.client_ca: '.*missing_ca.pem': cannot"),
        (replace(s, client_ca=d / "junk.pem"), r"tls.client_ca: '.*junk.pem': no usable CA"),
        (replace(s, min_version="1.1"), r"tls.min_version: '1.1': expected '1.2' or '1.3'"),
    ]
    if OPENSSL:
        cases.append((replace(s, key=enc), r"'.*encrypted.key': the key is encrypted"))
    return cases


def test_make_context_explains_what_is_wrong(pki: PKI) -> None:
    for settings, message in _bad_settings(pki):
        with pytest.raises(ValueError, match=message):
            make_context(settings)


# --- handshake ---------------------------------------------------------------------------------


def test_handshake_without_client_cert_and_environ(pki: PKI) -> None:
    c, s = tcp_pair()
    s.settimeout(7)
    ctx = client_context(pki)
    bg = Background(lambda: ctx.wrap_socket(c, server_hostname="pyinetd.test"))
    tls = handshake(make_context(pki.server), s, 5)
    with tls:
        client = bg.join()
        assert isinstance(client, ssl.SSLSocket)
        with client:
            assert tls.gettimeout() == 7  # the caller's blocking mode is restored
            env = tls_environ(tls)
    assert env["SSL_PROTOCOL"] == "TLSv1.3"
    assert env["SSL_CIPHER"].startswith("TLS_")
    assert int(env["SSL_CIPHER_USEKEYSIZE"]) >= 128
    assert env["SSL_TLS_SNI_SERVERNAME"] == env["SSL_TLS_SNI"] == "pyinetd.test"
    assert env["SSL_CLIENT_VERIFY"] == "NONE"
    assert "SSL_CLIENT_S_DN" not in env


def test_no_sni_means_no_sni_variable(pki: PKI) -> None:
    ctx = client_context(pki)
    ctx.check_hostname = False
    server, client_error = handshake_pair(make_context(pki.server), ctx, sni=None)
    assert client_error is None
    assert isinstance(server, ssl.SSLSocket)
    with server:
        assert "SSL_TLS_SNI_SERVERNAME" not in tls_environ(server)


def test_client_certificate_is_verified_and_described(pki: PKI) -> None:
    ctx = client_context(pki, pki.client_cert, pki.client_key)
    server, client_error = handshake_pair(make_context(pki.mutual), ctx)
    assert client_error is None
    assert isinstance(server, ssl.SSLSocket)
    with server:
        env = tls_environ(server)
    assert env["SSL_CLIENT_VERIFY"] == "SUCCESS"
    assert env["SSL_CLIENT_S_DN"] == r"CN=alice,OU=ops,O=Example\, Inc."
    assert env["SSL_CLIENT_I_DN"].startswith("OU=Testing CA #")


@pytest.mark.parametrize("who", ["nobody", "rogue"])
def test_client_certificate_missing_or_untrusted_is_refused(pki: PKI, who: str) -> None:
    cert, key = (None, None) if who == "nobody" else (pki.rogue_cert, pki.rogue_key)
    server, client_error = handshake_pair(make_context(pki.mutual), client_context(pki, cert, key))
    assert isinstance(server, ssl.SSLError)
    assert "CERTIFICATE" in str(server).upper()
    assert client_error is not None


def test_min_version_13_refuses_a_tls12_client(pki: PKI) -> None:
    ctx = client_context(pki)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    server, client_error = handshake_pair(make_context(replace(pki.server, min_version="1.3")), ctx)
    assert isinstance(server, ssl.SSLError)
    assert "UNSUPPORTED_PROTOCOL" in str(server)
    assert client_error is not None


def test_handshake_times_out_when_the_client_says_nothing(pki: PKI) -> None:
    c, s = tcp_pair()
    with c:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=r"not completed within 0\.3 s"):
            handshake(make_context(pki.server), s, 0.3)
        assert 0.3 <= time.monotonic() - start < 3
        assert s.fileno() == -1  # taken over by the TLS socket, which was closed


def test_handshake_deadline_covers_a_trickling_client(pki: PKI) -> None:
    # A real ClientHello, sent a byte at a time: every read makes progress, so only a deadline
    # for the whole handshake (not a per-read timeout) can stop it.
    obj = client_context(pki).wrap_bio(
        ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="localhost"
    )
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    c, s = tcp_pair()
    stop = threading.Event()

    def trickle() -> None:
        for byte in hello:
            if stop.wait(0.05):  # pacing a deliberately slow client, not synchronisation
                return
            with contextlib.suppress(OSError):
                c.send(bytes([byte]))

    bg = Background(trickle)
    try:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            handshake(make_context(pki.server), s, 0.5)
        assert 0.5 <= time.monotonic() - start < 3
    finally:
        stop.set()
        bg.join()
        c.close()


def test_format_dn_escapes_per_rfc_4514() -> None:
    name = (
        (("countryName", "DE"),),
        (("organizationName", 'A+B "C"; <D>'),),
        (("commonName", "#lead"), ("emailAddress", " x\\y ")),
    )
    assert format_dn(name) == (r"CN=\#lead+emailAddress=\ x\\y\ ,O=A\+B \"C\"\; \<D\>,C=DE")
    assert format_dn(((("commonName", "nul\0"),),)) == r"CN=nul\00"


# --- openssl s_client against handshake() + relay() in a forked child ---------------------------


@dataclass
class ForkedServer:
    port: int
    pid: int
    report: int  # read end of the child's JSON report

    def result(self, timeout: float = 10) -> dict[str, Any]:
        """Wait (bounded) for the child to exit and return its report."""
        pidfd = os.pidfd_open(self.pid)
        try:
            assert select.select([pidfd], [], [], timeout)[0], "server child did not exit"
        finally:
            os.close(pidfd)
        os.waitpid(self.pid, 0)
        self.pid = 0
        with os.fdopen(self.report, "rb") as f:
            data = f.read()
        parsed: dict[str, Any] = json.loads(data)
        return parsed


def _serve_one(ls: socket.socket, ctx: ssl.SSLContext, timeout: float, report: int) -> None:
    """The child: one connection, handshake(), then relay() to cat over a socketpair."""
    out: dict[str, Any]
    try:
        conn, _ = ls.accept()
        ls.close()
        try:
            tls = handshake(ctx, conn, timeout)
        except Exception as e:
            out = {"error": f"{type(e).__name__}: {e}"}
        else:
            env = tls_environ(tls)
            ours, theirs = socket.socketpair()
            with theirs:
                cat = subprocess.Popen(["cat"], stdin=theirs.fileno(), stdout=theirs.fileno())
            counts = relay(tls, ours, idle_timeout=10)
            out = {"env": env, "counts": list(counts), "cat": cat.wait(10)}
    except BaseException as e:
        out = {"error": f"child: {type(e).__name__}: {e}"}
    os.write(report, json.dumps(out).encode())


@pytest.fixture
def forked_server() -> Iterator[Callable[[ssl.SSLContext], ForkedServer]]:
    started: list[ForkedServer] = []

    def start(ctx: ssl.SSLContext, timeout: float = 5) -> ForkedServer:
        ls = socket.create_server(("127.0.0.1", 0))
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.close(r)
                _serve_one(ls, ctx, timeout, w)
            finally:
                os._exit(0)
        os.close(w)
        port = ls.getsockname()[1]
        ls.close()
        server = ForkedServer(port, pid, r)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(server.pid, signal.SIGKILL)
            os.waitpid(server.pid, 0)
            os.close(server.report)


def s_client(port: int, pki: PKI, *extra: str) -> subprocess.Popen[bytes]:
    assert OPENSSL is not None
    return subprocess.Popen(
        [
            *(OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "pyinetd.test"),
            *("-CAfile", str(pki.ca), "-verify_return_error", "-verify_hostname", "pyinetd.test"),
            *("-quiet", "-no_ign_eof", *extra),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def echo_through(proc: subprocess.Popen[bytes], line: bytes) -> bytes:
    """Write line, read until it comes back (bounded), then end input and let s_client exit."""
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        proc.stdin.write(line)
        proc.stdin.flush()
    except BrokenPipeError:
        pass  # s_client already gone (a refused handshake): what it printed is the answer
    got = b""
    deadline = time.monotonic() + 10
    fd = proc.stdout.fileno()
    while line not in got and (remaining := deadline - time.monotonic()) > 0:
        if not select.select([fd], [], [], remaining)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        got += chunk
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.close()
    proc.wait(10)
    proc.stdout.close()
    proc.stderr.close()
    return got


needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl command not installed")


@needs_openssl
def test_s_client_echo_with_sni(pki: PKI, forked_server: Callable[..., ForkedServer]) -> None:
    server = forked_server(make_context(pki.server))
    assert echo_through(s_client(server.port, pki), b"hello pyinetd\n") == b"hello pyinetd\n"
    report = server.result()
    assert report["counts"] == [14, 14] and report["cat"] == 0
    assert report["env"]["SSL_TLS_SNI_SERVERNAME"] == "pyinetd.test"
    assert report["env"]["SSL_CLIENT_VERIFY"] == "NONE"


@needs_openssl
def test_s_client_with_required_client_cert(
    pki: PKI, forked_server: Callable[..., ForkedServer]
) -> None:
    server = forked_server(make_context(pki.mutual))
    proc = s_client(server.port, pki, "-cert", str(pki.client_cert), "-key", str(pki.client_key))
    assert echo_through(proc, b"mutual\n") == b"mutual\n"
    env = server.result()["env"]
    assert env["SSL_CLIENT_VERIFY"] == "SUCCESS"
    assert env["SSL_CLIENT_S_DN"] == r"CN=alice,OU=ops,O=Example\, Inc."


@needs_openssl
@pytest.mark.parametrize("who", ["nobody", "rogue"])
def test_s_client_without_acceptable_client_cert_is_refused(
    pki: PKI, forked_server: Callable[..., ForkedServer], who: str
) -> None:
    server = forked_server(make_context(pki.mutual))
    extra = [] if who == "nobody" else ["-cert", str(pki.rogue_cert), "-key", str(pki.rogue_key)]
    assert echo_through(s_client(server.port, pki, *extra), b"let me in\n") == b""
    report = server.result()
    assert "error" in report and "CERTIFICATE" in report["error"].upper()


@needs_openssl
def test_s_client_refused_below_min_version(
    pki: PKI, forked_server: Callable[..., ForkedServer]
) -> None:
    server = forked_server(make_context(replace(pki.server, min_version="1.3")))
    assert echo_through(s_client(server.port, pki, "-tls1_2"), b"old\n") == b""
    assert "UNSUPPORTED_PROTOCOL" in server.result()["error"]


def test_forked_server_gives_up_on_a_client_that_never_handshakes(
    pki: PKI, forked_server: Callable[..., ForkedServer]
) -> None:
    server = forked_server(make_context(pki.server), 0.3)
    with socket.create_connection(("127.0.0.1", server.port)):
        report = server.result(5)  # while the client is still connected and silent
    assert report["error"].startswith("TimeoutError: TLS handshake not completed within 0.3 s")


def test_tls_service_without_a_context_refuses(pki: PKI, tmp_path: Path) -> None:
    # Fail closed (issue 18.2): whatever left a TLS service without its context, the relay
    # never hands the client to the service without a handshake.
    from pyinetd.config import load
    from pyinetd.spawn import spawn_relay

    cfg = tmp_path / "inetd.yaml"
    cfg.write_text(
        f"services:\n  s: {{listen: 7, exec: [/usr/bin/id], "
        f"tls: {{cert: {pki.server.cert}, key: {pki.server.key}}}}}\n"
    )
    (svc,) = load(cfg).services
    ours, theirs = socket.socketpair()
    err_r, err_w = os.pipe()
    with ours:
        ours.sendall(b"hello\n")  # no ClientHello
        pid = spawn_relay(svc, theirs.fileno(), err_w, {b"PATH": b"/usr/bin:/bin"}, None, "peer")
        theirs.close()
        os.close(err_w)
        _, status = os.waitpid(pid, 0)
        ours.settimeout(10)
        try:
            got = ours.recv(4096)
        except ConnectionResetError:  # closed with our bytes unread
            got = b""
        assert got == b""
    with os.fdopen(err_r, "rb") as err:
        assert err.read() == b"TLS service without a TLS context: refusing peer\n"
    assert os.waitstatus_to_exitcode(status) == 1


@pytest.mark.parametrize(
    "name",
    ["localhost", "pyinetd.test", "xn--bcher-kva.example", "a-b.c1", "a" * 63 + ".x",
     ".".join(["a" * 63] * 3) + "." + "a" * 61],
)  # fmt: skip
def test_host_name_accepts_ldh_names(name: str) -> None:
    assert host_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "a\nEVIL=1", "../../../etc/passwd", "x;rm -rf /", "\x1b]0;t\x07", "a" * 64,
     "-a.b", "a-.b", "a..b", "a.", ".a", "a_b", "a b", "bücher.example", "a\0",
     ".".join(["a" * 63] * 4)],
)  # fmt: skip
def test_host_name_refuses_what_is_not_a_host_name(name: str) -> None:
    assert host_name(name) is None


def test_format_dn_escapes_control_characters_as_mod_ssl() -> None:
    """A newline is \\0A (OpenSSL's ASN1_STRFLGS_ESC_CTRL, what mod_ssl shows), C1 and other
    non-printables byte by byte; printable non-ASCII stays as it is."""
    name = ((("commonName", "a\nSSL_CLIENT_VERIFY=SUCCESS\r\x1b[2J\x7f\u202e\x85é"),),)
    assert format_dn(name) == r"CN=a\0ASSL_CLIENT_VERIFY=SUCCESS\0D\1B[2J\7F\E2\80\AE\C2\85é"
