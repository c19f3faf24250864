"""Listening sockets: bind what a Service asks for; keep what survives a reload."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import stat
import struct
import weakref
from collections.abc import Callable, Container
from dataclasses import dataclass
from pathlib import Path

from pyinetd.config import ListenAddress, Service

BACKLOG = 1024  # the kernel caps it at net.core.somaxconn


class ListenError(Exception):
    """A socket could not be bound; the message names the service's key and the address,
    ``source`` the file that defines the service."""

    def __init__(self, message: str, source: str = "") -> None:
        super().__init__(message)
        self.source = source


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


@dataclass(frozen=True)
class SocketPerms:
    """A unix socket file's mode and owner (`socket_mode`, `socket_user`, `socket_group`);
    None and -1 leave what bind(2) gives (mode from pyinetd's umask, owner pyinetd)."""

    mode: int | None = None
    uid: int = -1
    gid: int = -1

    @classmethod
    def of(cls, service: Service) -> SocketPerms:
        uid = service.socket_user[1] if service.socket_user else -1
        gid = service.socket_group if service.socket_group is not None else -1
        return cls(service.socket_mode, uid, gid)


@dataclass(frozen=True)
class _UnixFile:
    """Where pyinetd bound a unix socket: its folder (an fd opened at bind), name and inode."""

    dir_fd: int
    name: str
    dev: int
    ino: int
    close_dir: Callable[[], object]  # weakref.finalize: also runs if the socket is dropped

    def remove(self) -> None:
        """Unlink the socket file, from the folder it was bound in, if it is still ours."""
        try:
            with contextlib.suppress(OSError):
                _unlink_if_same(self.dir_fd, self.name, self.dev, self.ino)
        finally:
            self.close_dir()


# The unix socket files pyinetd made, by listening socket: close_listener removes them.
_UNIX_FILES: weakref.WeakKeyDictionary[socket.socket, _UnixFile] = weakref.WeakKeyDictionary()


def _unlink_if_same(dir_fd: int, name: str, dev: int, ino: int) -> None:
    # lstat then unlink, both in the folder pinned by dir_fd: a swapped folder (a symlink to
    # /etc/victim) is never followed. Only someone who can write that very folder could still
    # swap the entry in between, and they could remove it themselves anyway.
    st = os.lstat(name, dir_fd=dir_fd)
    if (st.st_dev, st.st_ino) == (dev, ino) and stat.S_ISSOCK(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)


def unix_file_of(sock: socket.socket) -> tuple[int, str, int, int] | None:
    """The unix socket file pyinetd made for ``sock``: its folder's fd, name, device, inode."""
    made = _UNIX_FILES.get(sock)
    return None if made is None else (made.dir_fd, made.name, made.dev, made.ino)


def adopt_unix_file(sock: socket.socket, dir_fd: int, name: str, dev: int, ino: int) -> None:
    """``sock``'s file, made by the image before this one (`pyinetd upgrade`): removed at
    close_listener as if this process had bound it, through the same folder fd."""
    close_dir = weakref.finalize(sock, os.close, dir_fd)
    _UNIX_FILES[sock] = _UnixFile(dir_fd, name, dev, ino, close_dir)


def set_socket_options(sock: socket.socket, service: Service) -> None:
    """The service's interface and socket options on its listening socket; the connections
    accepted from it inherit them (Linux copies them to the new socket). Set before bind, so
    that nothing from another interface is queued meanwhile."""
    if sock.family == socket.AF_UNIX:
        return
    device = (service.interface or "").encode()
    # Clearing needs CAP_NET_RAW as setting does: only a socket bound to a device is cleared.
    if device or sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16).strip(b"\0"):
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device)
        except OSError as exc:
            raise OSError(exc.errno, f"interface {service.interface}: {exc.strerror}") from None
    if sock.type == socket.SOCK_STREAM:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, int(service.keepalive))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(service.nodelay))
    if service.send_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, service.send_buffer)
    if service.receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, service.receive_buffer)


def bind_listener(
    protocol: str,
    addr: ListenAddress,
    reuseport: bool = False,
    perms: SocketPerms | None = None,
    service: Service | None = None,
) -> socket.socket:
    """Create, bind and (for stream sockets) listen; non-blocking, close-on-exec (PEP 446).

    ``reuseport``: SO_REUSEPORT, so that every worker process binds the same address (and
    the kernel spreads connections over them); only pyinetd's own processes can join, since
    the kernel requires the same user. ``perms``: a unix socket file's mode and owner.
    """
    if protocol == "unix":
        return _bind_unix(addr.path, perms or SocketPerms())
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
        if service is not None:
            set_socket_options(sock, service)
        sock.bind((host, addr.port))
        if kind == socket.SOCK_STREAM:
            sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _bind_unix(path: str, perms: SocketPerms) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if path.startswith("@"):  # abstract: no file, reachable by every local user
        try:
            sock.bind("\0" + path[1:])
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock
    # The folder is opened once, here, and the socket's file is handled only through that fd
    # afterwards: a service user who owns the folder's parent could swap the folder for a symlink
    # to /etc/victim, and root would unlink /etc/victim/app.sock at stop.
    folder, name = os.path.split(path)
    real = os.path.realpath(folder)
    try:
        dir_fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        sock.close()
        raise
    close_dir = weakref.finalize(sock, os.close, dir_fd)
    try:
        bound = os.path.join(real, name)
        _remove_stale_socket(dir_fd, name, bound)
        old = os.umask(0o777 & ~perms.mode) if perms.mode is not None else None
        try:
            sock.bind(bound)  # created with exactly socket_mode: no moment with more
        finally:
            if old is not None:
                os.umask(old)
        st = os.lstat(name, dir_fd=dir_fd)
        here = os.fstat(dir_fd)
        there = os.stat(real)
        if (here.st_dev, here.st_ino) != (there.st_dev, there.st_ino):
            raise OSError(errno.EAGAIN, "its folder was replaced while binding", path)
        if perms.uid != -1 or perms.gid != -1:
            # lchown from the folder fd: a swapped entry (a symlink) is not followed.
            os.chown(name, perms.uid, perms.gid, dir_fd=dir_fd, follow_symlinks=False)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        close_dir()
        raise
    _UNIX_FILES[sock] = _UnixFile(dir_fd, name, st.st_dev, st.st_ino, close_dir)
    return sock


def _remove_stale_socket(dir_fd: int, name: str, path: str) -> None:
    """Unlink a socket file left by a dead server; refuse to touch a live one or a non-socket."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, "exists and is not a socket", path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            # Only the entry we looked at, in the folder we hold: not whatever a swapped
            # path leads to by now (a check-then-unlink race).
            _unlink_if_same(dir_fd, name, st.st_dev, st.st_ino)
            return
        except OSError:
            return
    raise OSError(errno.EADDRINUSE, "another server is listening on it", path)


def _bind_hint(exc: OSError, protocol: str, addr: ListenAddress) -> str:
    """What a person can do about a bind error: the ways to a low port, or who holds it."""
    if protocol == "unix":
        return ""
    if exc.errno == errno.EACCES and 0 < addr.port < 1024:
        return (
            f"; ports below 1024 need root, CAP_NET_BIND_SERVICE, or "
            f"sysctl net.ipv4.ip_unprivileged_port_start<={addr.port}"
        )
    if exc.errno == errno.EADDRINUSE:
        holder = port_holder(protocol, addr.port)
        return f" (held by {holder})" if holder else ""
    return ""


def port_holder(protocol: str, port: int) -> str | None:
    """'pid N (COMM)' of a process with a socket bound to ``port``, as far as this process
    may see (/proc/net lists the sockets, /proc/PID/fd links them to their owners: another
    user's are visible to root only); None when none is found."""
    inodes: set[str] = set()
    for table in (protocol, protocol + "6"):
        try:
            lines = Path("/proc/net", table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            # local_address is HEXADDR:HEXPORT; a TCP listener is state 0A
            listening = protocol != "tcp" or (len(cols) > 3 and cols[3] == "0A")
            if len(cols) > 9 and listening and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{cols[9]}]")
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        comm = (proc / "comm").read_text().strip()
                        return f"pid {proc.name} ({comm})"
    return None


def bind_service(
    service: Service, skip: Container[ListenKey] = (), reuseport: bool = False
) -> list[tuple[ListenKey, socket.socket]]:
    """Bind the listen addresses of a service not in ``skip`` (those are already bound);
    on failure close what was bound and raise ListenError.

    A `wait` service's TCP and UDP sockets always get SO_REUSEPORT: its program holds the
    socket itself and may outlive pyinetd (in.tftpd waits 15 minutes for a next request; the
    unit stops pyinetd alone, KillMode=process), and a new pyinetd must still bind the port.
    The kernel lets a socket join only where the sockets already bound were created with the
    same effective uid (root, pyinetd, whatever user the program runs as), so no other local
    user can bind beside it; SO_REUSEADDR on UDP would let any user who also sets it bind the
    port and take the datagrams.
    """
    bound: list[tuple[ListenKey, socket.socket]] = []
    for addr in service.listen:
        key = ListenKey(service.protocol, addr)
        if key in skip:
            continue
        try:
            perms = SocketPerms.of(service)
            sock = bind_listener(service.protocol, addr, reuseport or service.wait, perms, service)
            bound.append((key, sock))
        except OSError as exc:
            for _, sock in bound:
                close_listener(sock)
            reason = (exc.strerror or str(exc)) + _bind_hint(exc, service.protocol, addr)
            raise ListenError(
                f"services.{service.name}.listen: {addr} ({service.protocol}): {reason}",
                service.source,
            ) from None
    return bound


def sharers(sock: socket.socket) -> tuple[int, list[tuple[int, str]]]:
    """How many other sockets are bound to the very address of ``sock`` (SO_REUSEPORT let
    them bind; for TCP, listening ones), and the processes (pid, command name) holding them,
    from /proc/net and /proc/PID/fd: (0, []) when none is; the list is empty when the holders
    cannot be seen (another pid namespace)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return 0, []
    table = "udp" if sock.type == socket.SOCK_DGRAM else "tcp"
    table += "6" if sock.family == socket.AF_INET6 else ""
    ours = os.fstat(sock.fileno()).st_ino
    try:
        with open(f"/proc/net/{table}") as f:
            rows = [row.split() for row in f.read().splitlines()[1:]]
    except OSError:
        return 0, []
    # Fields: sl local_address rem_address st ... uid timeout inode
    mine = next((r for r in rows if len(r) > 9 and r[9] == str(ours)), None)
    if mine is None:
        return 0, []
    others = {
        f"socket:[{r[9]}]"
        for r in rows
        if len(r) > 9
        and r[1] == mine[1]
        and r[9] != str(ours)
        and (table.startswith("udp") or r[3] == "0A")  # 0A: TCP_LISTEN
    }
    if not others:
        return 0, []
    found: list[tuple[int, str]] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
            if any(os.readlink(f"/proc/{entry}/fd/{fd}") in others for fd in fds):
                with open(f"/proc/{entry}/comm") as f:
                    found.append((int(entry), f.read().strip()))
        except OSError:  # gone meanwhile, or not ours to look at
            continue
    return len(others), found


SO_ATTACH_REUSEPORT_CBPF = 51  # asm-generic/socket.h (Linux 4.5)
_BPF_RET_K = 0x06  # BPF_RET | BPF_K: return the constant k


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def steer_to(sock: socket.socket, index: int) -> None:
    """Have the kernel hand every new datagram or connection of the SO_REUSEPORT group of
    ``sock`` to the member at ``index`` (the order they joined): a classic BPF program that
    returns ``index``. Where the group has no such member any more (the others closed and
    the kernel moved this socket down), the kernel falls back to its hash over the members
    left (net/core/sock_reuseport.c), which is then this socket alone."""
    insn = ctypes.create_string_buffer(struct.pack("=HBBI", _BPF_RET_K, 0, 0, index), 8)
    prog = _SockFprog(1, ctypes.cast(insn, ctypes.c_void_p))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(prog))


def close_listener(sock: socket.socket) -> None:
    """Close a listening socket and remove the unix socket file pyinetd made for it."""
    made = _UNIX_FILES.pop(sock, None)
    sock.close()
    if made is not None:
        made.remove()


# ---------------------------------------------------------------- peer addresses


def format_ip(addr: str) -> str:
    """Unmap v4-mapped IPv6 addresses (::ffff:1.2.3.4 -> 1.2.3.4); drop a scope suffix."""
    if addr.startswith("::ffff:") and "." in addr:
        return addr[7:]
    return addr


def peer_of(family: int, addr: object) -> tuple[str, int]:
    """(ip, port) of a socket address; ("", 0) for unix sockets."""
    if family in (socket.AF_INET, socket.AF_INET6) and isinstance(addr, tuple):
        return format_ip(str(addr[0])), int(addr[1])
    return "", 0


def peer_text(ip: str, port: int) -> str:
    if not ip:
        return "unix"
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
