"""Listening sockets: bind what a Service asks for; keep what survives a reload."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from collections.abc import Container
from dataclasses import dataclass

from pyinetd.config import ListenAddress, Service

BACKLOG = 1024  # the kernel caps it at net.core.somaxconn


class ListenError(Exception):
    """A socket could not be bound; the message names the service and the address."""


@dataclass(frozen=True)
class ListenKey:
    """What identifies a listening socket across reloads."""

    protocol: str
    address: ListenAddress


def has_ipv6() -> bool:
    """True when this host can bind an IPv6 socket."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def bind_listener(protocol: str, addr: ListenAddress, reuseport: bool = False) -> socket.socket:
    """Create, bind and (for stream sockets) listen; non-blocking, close-on-exec (PEP 446).

    ``reuseport``: SO_REUSEPORT, so that every worker process binds the same address (and
    the kernel spreads connections over them); only pyinetd's own processes can join, since
    the kernel requires the same user.
    """
    if protocol == "unix":
        return _bind_unix(addr.path)
    kind = socket.SOCK_DGRAM if protocol == "udp" else socket.SOCK_STREAM
    if addr.host:
        family = socket.AF_INET6 if addr.is_v6 else socket.AF_INET
        host = addr.host
    elif has_ipv6():
        family, host = socket.AF_INET6, "::"
    else:
        family, host = socket.AF_INET, "0.0.0.0"
    sock = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            # TIME_WAIT from the last run must not block a restart (every inetd sets this).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # PORT alone means every address, v4 and v6; an explicit v6 address means v6 only.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if not addr.host else 1)
        sock.bind((host, addr.port))
        if kind == socket.SOCK_STREAM:
            sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _bind_unix(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bind_path = "\0" + path[1:] if path.startswith("@") else path
    try:
        if not path.startswith("@"):
            _remove_stale_socket(path)
        sock.bind(bind_path)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _remove_stale_socket(path: str) -> None:
    """Unlink a socket file left by a dead server; refuse to touch a live one or a non-socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, "exists and is not a socket", path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
            return
        except OSError:
            return
    raise OSError(errno.EADDRINUSE, "another server is listening on it", path)


def bind_service(
    service: Service, skip: Container[ListenKey] = (), reuseport: bool = False
) -> list[tuple[ListenKey, socket.socket]]:
    """Bind the listen addresses of a service not in ``skip`` (those are already bound);
    on failure close what was bound and raise ListenError."""
    bound: list[tuple[ListenKey, socket.socket]] = []
    for addr in service.listen:
        key = ListenKey(service.protocol, addr)
        if key in skip:
            continue
        try:
            bound.append((key, bind_listener(service.protocol, addr, reuseport)))
        except OSError as exc:
            for _, sock in bound:
                close_listener(sock)
            reason = exc.strerror or str(exc)
            raise ListenError(
                f"services.{service.name}.listen: {addr} ({service.protocol}): {reason}"
            ) from None
    return bound


def close_listener(sock: socket.socket) -> None:
    """Close a listening socket and remove its unix socket file."""
    path = ""
    if sock.family == socket.AF_UNIX:
        with contextlib.suppress(OSError):
            name = sock.getsockname()
            path = name if isinstance(name, str) else ""
    sock.close()
    if path and not path.startswith("\0"):
        with contextlib.suppress(OSError):
            os.unlink(path)
