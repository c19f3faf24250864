"""TLS for services: the server context, a handshake with a deadline, and CGI-style variables."""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import socket
import ssl
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import cast

from pyinetd import trust
from pyinetd.config.parsers import TLSSettings  # the tls: block, as config.py parsed it

__all__ = [
    "VERSIONS",
    "TLSSettings",
    "build_contexts",
    "format_dn",
    "handshake",
    "host_name",
    "make_context",
    "tls_environ",
]

_Name = tuple[tuple[tuple[str, str], ...], ...]
VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}

# SNI names seen by make_context()'s sni_callback, per connection; weak so that a closed
# connection's entry goes away with it.
_sni_names: weakref.WeakKeyDictionary[object, str] = weakref.WeakKeyDictionary()


class _EncryptedKey(Exception):
    pass


def _refuse_passphrase() -> str:
    # Without a callback OpenSSL would prompt on the controlling terminal and block the server.
    raise _EncryptedKey


def _open(path: Path, what: str, marker: str, secret: bool = False) -> int:
    """Open a PEM file once (as root: only when it is root's, a key unreadable to others) and
    check it holds ``marker``; OpenSSL then reads that same open file (_fd_path)."""
    try:
        fd = trust.open_regular(path, f"TLS {what}", secret=secret)
    except OSError as e:
        raise ValueError(f"tls.{what}: {str(path)!r}: cannot read: {e.strerror}") from None
    except ValueError as e:
        raise ValueError(f"tls.{what}: {e}") from None
    try:
        if not _holds(fd, str(path), marker.encode(), secret):
            kind = "private key" if secret else "certificate"
            raise ValueError(f"tls.{what}: {str(path)!r}: no PEM {kind} in the file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _holds(fd: int, name: str, marker: bytes, secret: bool) -> bool:
    """Whether the file holds ``marker``. A key is read into one buffer that is zeroed
    after the look: freed memory is not cleared (glibc's tcache keeps small chunks as they
    were), and every process forked later (a service's front) would inherit every other
    service's key text in it. OpenSSL reads the file again, by its own path (_fd_path: a
    new open of the same file, from its start)."""
    if not secret:
        return marker in trust.read_fd(fd, name)
    size = os.fstat(fd).st_size
    if size > trust.MAX_FILE_SIZE:
        raise ValueError(f"{name}: larger than {trust.MAX_FILE_SIZE // 1024} KiB")
    buf = bytearray(size)
    try:
        got = os.readv(fd, [buf])
        return buf.find(marker, 0, got) >= 0
    finally:
        buf[:] = bytes(len(buf))


def _fd_path(fd: int, path: Path) -> str:
    # /proc/self/fd/N opens the file already opened and checked, whatever its name points
    # to now: a key renewed (or swapped) between the check and the load cannot slip in.
    proc = f"/proc/self/fd/{fd}"
    return proc if os.path.exists(proc) else str(path)


def make_context(s: TLSSettings) -> ssl.SSLContext:
    """Build the server SSLContext for s; ValueError says which file or value is wrong and why."""
    if s.min_version not in VERSIONS:
        raise ValueError(f"tls.min_version: {s.min_version!r}: expected '1.2' or '1.3'")
    with contextlib.ExitStack() as fds:
        cert = _open(s.cert, "cert", "-----BEGIN CERTIFICATE-----")
        fds.callback(os.close, cert)
        key = _open(s.key, "key", "PRIVATE KEY-----", secret=True)
        fds.callback(os.close, key)
        ca = None
        if s.client_ca is not None:
            # An attacker who may write the client CA file admits any client certificate.
            ca = _open(s.client_ca, "client_ca", "")
            fds.callback(os.close, ca)
        return _context(s, _fd_path(cert, s.cert), _fd_path(key, s.key), ca)


def _context(s: TLSSettings, cert: str, key: str, ca: int | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = VERSIONS[s.min_version]
    # Client-initiated renegotiation costs the server far more than the client (CVE-2011-1473).
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    # OpenSSL 3 answers a TCP EOF without close_notify with a fatal alert, after which no reply
    # can be sent; many clients half-close that way. The service sees EOF in both cases, as
    # with nginx, which sets the same option.
    ctx.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
    try:
        ctx.load_cert_chain(cert, key, password=_refuse_passphrase)
    except _EncryptedKey:
        raise ValueError(
            f"tls.key: {str(s.key)!r}: the key is encrypted; pyinetd cannot ask for a passphrase"
        ) from None
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            why = "the key does not belong to the certificate"
        else:
            why = f"OpenSSL says: {e}"
        raise ValueError(f"tls: {str(s.cert)!r} with key {str(s.key)!r}: {why}") from None
    if s.client_ca is not None and ca is not None:
        try:
            ctx.load_verify_locations(cafile=_fd_path(ca, s.client_ca))
        except ssl.SSLError as e:
            raise ValueError(
                f"tls.client_ca: {str(s.client_ca)!r}: no usable CA certificate ({e.reason or e})"
            ) from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.sni_callback = _remember_sni
    return ctx


def build_contexts(
    services: Iterable[tuple[str, str, TLSSettings | None]],
) -> tuple[dict[str, ssl.SSLContext], list[str]]:
    """The context of every (name, file, tls) given, each built once, and the errors, as
    'file: services.NAME.tls.KEY: why' lines. A (re)load applies only when there are none."""
    contexts: dict[str, ssl.SSLContext] = {}
    errors: list[str] = []
    _secure_heap()
    with _scrubbed_frees():
        for name, source, settings in services:
            if settings is None:
                continue
            try:
                contexts[name] = make_context(settings)
            except ValueError as e:
                # make_context names the key (tls.cert: ..., or tls: for the pair): one key path.
                key, sep, why = str(e).partition(": ")
                if not (sep and key.startswith("tls")):
                    key, why = "tls", str(e)
                errors.append(f"{source}: services.{name}.{key}: {why}")
    return contexts, errors


_M_PERTURB = -6  # glibc's mallopt(3): fill what free(3) frees


@contextlib.contextmanager
def _scrubbed_frees() -> Iterator[None]:
    """While the contexts are built, glibc overwrites the chunks it frees: OpenSSL's PEM
    decoder leaves a key's DER (an RSA key's d in it) in ordinary freed heap, which every
    process forked later (another service's front) would inherit. glibc does not fill what
    goes to its per-thread cache (chunks up to 1032 bytes, 7 per size): those are taken
    back afterwards, zeroed and freed again. Elsewhere than glibc: nothing changes."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt, malloc, free = libc.mallopt, libc.malloc, libc.free
    except (OSError, AttributeError):
        yield
        return
    malloc.restype = ctypes.c_void_p
    free.argtypes = [ctypes.c_void_p]
    mallopt(_M_PERTURB, 0x5A)
    try:
        yield
    finally:
        taken = []
        for size in range(8, _TCACHE_MAX + 1, 16):  # one request per size class
            for _ in range(_TCACHE_COUNT):
                ptr = malloc(ctypes.c_size_t(size))
                if ptr:
                    ctypes.memset(ptr, 0, size)
                    taken.append(ptr)
        for ptr in taken:
            free(ptr)
        mallopt(_M_PERTURB, 0)


_TCACHE_MAX = 1032  # glibc's largest request the per-thread cache keeps (tcache_max_bytes)
_TCACHE_COUNT = 7  # chunks it keeps per size (tcache_count)


SECURE_HEAP = 1 << 20  # bytes of OpenSSL's secure heap: a few KiB per key


def _secure_heap() -> None:
    """OpenSSL's secure heap, once per process, before the first key is loaded: its
    decoders keep a private key's numbers and the DER they come from there (BN_secure_new,
    PEM_FLAG_SECURE), in a mapping of its own that is cleared as it is freed. In the
    ordinary heap, the freed temporaries of one service's key (an RSA key's d) stayed in
    memory that every process forked later (another service's front) inherits. Without
    libcrypto's symbol (another build), nothing changes."""
    global _SECURE_HEAP_DONE
    if _SECURE_HEAP_DONE:
        return
    _SECURE_HEAP_DONE = True
    try:
        import ctypes

        lib = ctypes.CDLL("libcrypto.so.3")
        if not lib.CRYPTO_secure_malloc_initialized():
            lib.CRYPTO_secure_malloc_init(ctypes.c_size_t(SECURE_HEAP), ctypes.c_size_t(16))
    except (OSError, AttributeError):
        pass


_SECURE_HEAP_DONE = False


def _remember_sni(conn: object, server_name: str | None, ctx: ssl.SSLContext) -> None:
    # Called during the handshake with the SSLSocket; a server-side socket has no other record
    # of the name (its server_hostname stays None).
    if server_name is not None:
        _sni_names[conn] = server_name


def handshake(ctx: ssl.SSLContext, sock: socket.socket, timeout: float) -> ssl.SSLSocket:
    """Run the server side of a TLS handshake on sock, all of it within timeout seconds."""
    # One deadline for the whole handshake, not per read as with settimeout(): a client that
    # trickles a byte at a time must not be able to hold the connection open indefinitely.
    deadline = time.monotonic() + timeout
    original_timeout = sock.gettimeout()
    sock.setblocking(False)
    # wrap_socket() takes the fd over from sock, so from here on failures close tls.
    tls = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(tls, selectors.EVENT_READ)
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    sel.modify(tls, selectors.EVENT_READ)
                except ssl.SSLWantWriteError:
                    sel.modify(tls, selectors.EVENT_WRITE)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not sel.select(remaining):
                    raise TimeoutError(f"TLS handshake not completed within {timeout:g} s")
        tls.settimeout(original_timeout)
    except BaseException:
        tls.close()
        raise
    return tls


# RFC 1123 2.1 host name labels: letters, digits and hyphens, 1-63, no hyphen at either end.
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def host_name(name: str) -> str | None:
    """``name`` if it is a valid DNS host name (LDH labels, at most 253 characters in all),
    else None. An SNI name is chosen by the client: a newline, ``../``, shell metacharacters
    or terminal escapes in it must not reach services' environment byte for byte."""
    if not 0 < len(name) <= 253:
        return None
    return name if all(_LABEL.fullmatch(label) for label in name.split(".")) else None


def tls_environ(
    s: ssl.SSLSocket | ssl.SSLObject, warn: Callable[[str], None] | None = None
) -> dict[str, str]:
    """mod_ssl-style variables describing an established TLS connection.

    An SNI name that is not a valid host name is left out, and ``warn`` told why.
    """
    env: dict[str, str] = {}
    version = s.version()
    if version is not None:
        env["SSL_PROTOCOL"] = version
    cipher = s.cipher()
    if cipher is not None:
        env["SSL_CIPHER"] = cipher[0]
        env["SSL_CIPHER_USEKEYSIZE"] = str(cipher[2])
    sni = _sni_names.get(s)
    if sni is not None and host_name(sni) is None:
        if warn is not None:
            warn(f"SNI {sni[:256]!a} is not a host name; SSL_TLS_SNI_SERVERNAME left unset")
    elif sni is not None:
        env["SSL_TLS_SNI_SERVERNAME"] = sni
        env["SSL_TLS_SNI"] = sni  # mod_ssl's name for the same thing
    # getpeercert() returns the parsed certificate only when it was presented and verified.
    cert = s.getpeercert()
    if cert:
        env["SSL_CLIENT_VERIFY"] = "SUCCESS"
        # typeshed types every value of the dict as a union; subject and issuer are RDN tuples.
        for key, var in (("subject", "SSL_CLIENT_S_DN"), ("issuer", "SSL_CLIENT_I_DN")):
            if key in cert:
                env[var] = format_dn(cast(_Name, cert[key]))
    else:
        env["SSL_CLIENT_VERIFY"] = "NONE"
    return env


# RFC 4514 section 3 names; other attributes keep OpenSSL's name as Python reports it.
_SHORT_NAMES = {
    "commonName": "CN",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}


def format_dn(rdns: Iterable[Iterable[tuple[str, str]]]) -> str:
    """Format a getpeercert()-style name as an RFC 4514 string (most specific RDN first)."""
    parts = []
    for rdn in reversed(list(rdns)):
        parts.append("+".join(f"{_SHORT_NAMES.get(k, k)}={_escape_dn_value(v)}" for k, v in rdn))
    return ",".join(parts)


def _escape_dn_value(value: str) -> str:
    # RFC 4514 section 2.4; control characters and other non-printables as mod_ssl writes
    # them (OpenSSL's ASN1_STRFLGS_ESC_CTRL): each UTF-8 byte as \XX, so a newline is \0A. A
    # certificate's CN of "x\nSSL_CLIENT_VERIFY=SUCCESS" must not reach a service as a line
    # of its own.
    out = []
    for i, ch in enumerate(value):
        if ch in ',+"\\<>;' or (ch == "#" and i == 0) or (ch == " " and i in (0, len(value) - 1)):
            out.append("\\" + ch)
        elif not ch.isprintable():  # C0, DEL, C1, line/paragraph separators, bidi controls
            out.append("".join(f"\\{b:02X}" for b in ch.encode("utf-8", "surrogatepass")))
        else:
            out.append(ch)
    return "".join(out)
