"""systemd integration without libsystemd: sd_notify(3) and socket activation (sd_listen_fds)."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import time
from collections.abc import Callable

from pyinetd.config import ListenAddress
from pyinetd.runtime.listeners import ListenKey

SD_LISTEN_FDS_START = 3


# The socket to $NOTIFY_SOCKET, opened at the first notification and kept for the process's
# life: a socket per message needs a free fd for each, and a pyinetd whose clients hold every
# fd would send no WATCHDOG=1, and systemd would restart it every WatchdogSec= for as long as
# one client held its sockets. Close-on-exec (PEP 446): no service inherits it.
_notify_sock: socket.socket | None = None
_GONE = (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTCONN)
# What watchdog_interval took from the environment: `pyinetd upgrade` puts it back for the
# next image (same pid), which would otherwise never pet the watchdog.
_taken: dict[str, str] = {}


def taken_environ() -> dict[str, str]:
    """The variables systemd gave this process that it removed from its environment."""
    return dict(_taken)


def _notify_path() -> str | None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return None
    return "\0" + path[1:] if path.startswith("@") else path  # @: the abstract namespace


def _connected(path: str) -> socket.socket:
    global _notify_sock
    if _notify_sock is None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            s.connect(path)
        except OSError:
            s.close()
            raise
        _notify_sock = s
    return _notify_sock


def notify(*fields: str) -> bool:
    """Send a notification to $NOTIFY_SOCKET (e.g. "READY=1"); a no-op without it."""
    path = _notify_path()
    if path is None:
        return False
    message = "\n".join(fields).encode()
    for _attempt in range(2):
        try:
            sock = _connected(path)
            # Never block the loop on a receiver that does not read: a dropped status
            # message is better than a super-server that stops accepting.
            sock.send(message, socket.MSG_DONTWAIT)
            return True
        except OSError as exc:
            if exc.errno not in _GONE or _notify_sock is None:
                return False
            # The receiver went away (systemd re-executed, or a new socket at that path):
            # connect again once, into the fd the old socket frees.
            close_notify()
    return False


def close_notify() -> None:
    """Close the kept notification socket (the next notify() connects again)."""
    global _notify_sock
    if _notify_sock is not None:
        _notify_sock.close()
        _notify_sock = None


def reloading() -> None:
    """RELOADING=1 with the MONOTONIC_USEC systemd 253+ wants for Type=notify-reload."""
    notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def watchdog_interval() -> float | None:
    """Seconds between two WATCHDOG=1 (half of $WATCHDOG_USEC), or None when none is asked.

    As sd_watchdog_enabled(3) with unset_environment: the variables are removed, so neither a
    service nor a worker pyinetd starts believes it is the one systemd watches.
    """
    usec_text = os.environ.pop("WATCHDOG_USEC", "")
    pid_text = os.environ.pop("WATCHDOG_PID", "")
    if usec_text:
        _taken.update(WATCHDOG_USEC=usec_text, WATCHDOG_PID=pid_text or str(os.getpid()))
    try:
        usec = int(usec_text)
        if pid_text and int(pid_text) != os.getpid():
            return None  # meant for another process (e.g. a wrapper that exec'd something else)
    except ValueError:
        return None
    # Half the timeout, as sd_watchdog_enabled(3) recommends: one late pet is not a restart.
    return usec / 2_000_000 if usec > 0 else None


def start_watchdog(call_later: Callable[[float, Callable[[], None]], object]) -> float | None:
    """Pet systemd's watchdog from the event loop's timers; returns the interval, or None.

    The pets are timers of the one loop thread, never a thread of their own: a loop stuck in a
    handler stops petting, and systemd restarts it (WatchdogSec=, systemd.service(5)).
    """
    every = watchdog_interval()
    if every is None:
        return None

    def pet() -> None:
        notify("WATCHDOG=1")
        call_later(every, pet)

    pet()
    return every


def listen_fds() -> list[tuple[socket.socket, str]]:
    """Sockets passed by socket activation ($LISTEN_FDS for our pid), with their names.

    The variables are removed from the environment so services never see them, and the
    fds are made close-on-exec so they cannot leak into services.
    """
    try:
        pid = int(os.environ.get("LISTEN_PID", ""))
        count = int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    if pid != os.getpid() or count <= 0:
        return []
    out = []
    for i in range(count):
        sock = adopt_fd(SD_LISTEN_FDS_START + i)
        out.append((sock, names[i] if i < len(names) else ""))
    return out


def adopt_fd(fd: int) -> socket.socket:
    """A listening socket handed down by another process: close-on-exec, non-blocking."""
    os.set_inheritable(fd, False)
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock


def key_of(sock: socket.socket) -> ListenKey | None:
    """The ListenKey an activated socket serves, read from the socket itself."""
    try:
        name = sock.getsockname()
    except OSError:
        return None
    if sock.family == socket.AF_UNIX:
        if not isinstance(name, str) or not name:
            return None
        path = "@" + name[1:] if name.startswith("\0") else name
        return ListenKey("unix", ListenAddress(host="", port=0, path=path))
    proto = "udp" if sock.type == socket.SOCK_DGRAM else "tcp"
    host, port = str(name[0]), int(name[1])
    if host in ("::", "0.0.0.0"):
        v6only = 1
        if sock.family == socket.AF_INET6:
            with contextlib.suppress(OSError):
                v6only = sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
        if sock.family == socket.AF_INET6 and not v6only:
            return ListenKey(proto, ListenAddress(host="", port=port))  # PORT alone
        return ListenKey(proto, ListenAddress(host=host, port=port))
    if host.startswith("::ffff:"):
        host = host[7:]
    return ListenKey(proto, ListenAddress(host=host, port=port))
