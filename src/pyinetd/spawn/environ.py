"""The environment a service process sees: the names of the variables pyinetd sets per
connection (``PROTO``, the UCSPI ``TCPREMOTEIP``...), those of pyinetd and its service
manager that never reach a service, what a service with ``user:`` keeps of root's, and the
environment every child of a service starts from (``service_environ``).
"""

from __future__ import annotations

import errno
import os
import pwd
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyinetd.config import Service

Environ = dict[bytes, bytes]
# A connection's variables, as the KEY=value entries execve takes: built once per
# connection in that form, they go to fork_exec without a dict in between.
EnvEntries = list[bytes]


def env_dict(entries: EnvEntries) -> Environ:
    """KEY=value entries as a mapping (for os.posix_spawn and execve)."""
    return {k: v for k, _, v in (e.partition(b"=") for e in entries)}


# The variables set per connection, named here only: UCSPI's (PROTO, then TCPREMOTEIP,
# TCPREMOTEPORT, TCPLOCALIP, TCPLOCALPORT, the same with UDP for a datagram, IPC* for a
# unix socket, after tcpserver/ucspi-unix) and systemd's REMOTE_ADDR, REMOTE_PORT.
TCP, UDP, IPC = b"TCP", b"UDP", b"IPC"
PROTO = b"PROTO"
REMOTE_ADDR, REMOTE_PORT = b"REMOTE_ADDR", b"REMOTE_PORT"
_IP_SUFFIXES = (b"REMOTEIP", b"REMOTEPORT", b"LOCALIP", b"LOCALPORT")
_IPC_NAMES = (b"IPCLOCALPATH", b"IPCREMOTEPID", b"IPCREMOTEEUID", b"IPCREMOTEEGID")
# Per protocol: the "NAME=" prefixes of PROTO and its four UCSPI variables, made once (the
# entries are built per connection).
_PREFIXES = {
    proto: (PROTO + b"=" + proto, *(proto + s + b"=" for s in _IP_SUFFIXES)) for proto in (TCP, UDP)
}

# They are left out of the cached base list: a stale copy from pyinetd's own environment must
# never sit next to the connection's value.
CONNECTION_KEYS = frozenset(
    {PROTO, REMOTE_ADDR, REMOTE_PORT, *_IPC_NAMES}
    | {proto + s for proto in (TCP, UDP) for s in _IP_SUFFIXES}
)


def ip_env(proto: bytes, ip: str, port: int, local_ip: str, local_port: int) -> EnvEntries:
    """A TCP or UDP connection's variables: PROTO, REMOTE_ADDR/REMOTE_PORT and the UCSPI four."""
    p_proto, p_rip, p_rport, p_lip, p_lport = _PREFIXES[proto]
    bip, sport = ip.encode(), b"%d" % port
    return [
        p_proto,
        b"REMOTE_ADDR=" + bip,
        b"REMOTE_PORT=" + sport,
        p_rip + bip,
        p_rport + sport,
        p_lip + local_ip.encode(),
        p_lport + b"%d" % local_port,
    ]


def ipc_env(path: bytes, creds: tuple[int, int, int] | None) -> EnvEntries:
    """A unix socket connection's variables: its path and the client's (pid, uid, gid) as
    SO_PEERCRED gave them, when it did."""
    local, pid, uid, gid = _IPC_NAMES
    env = [PROTO + b"=" + IPC, local + b"=" + path]
    if creds is not None:
        env += [b"%s=%d" % (name, v) for name, v in zip((pid, uid, gid), creds, strict=True)]
    return env


def wait_env(proto: bytes, local: tuple[str, int] | None) -> EnvEntries:
    """A wait-mode child's variables (it accepts or reads itself): PROTO, and the listener's
    own address when it is bound to one."""
    p_proto, _, _, p_lip, p_lport = _PREFIXES[proto]
    if local is None:
        return [p_proto]
    return [p_proto, p_lip + local[0].encode(), p_lport + b"%d" % local[1]]


# pyinetd's own variables, and those its service manager gave it, never reach a service:
# NOTIFY_SOCKET would let any service tell systemd pyinetd is ready or stopping (sd_notify),
# LISTEN_* describe pyinetd's sockets, not the service's, CREDENTIALS_DIRECTORY points to
# pyinetd's secrets, PYINETD_* steer pyinetd itself.
PRIVATE_KEYS = frozenset(
    {b"NOTIFY_SOCKET", b"LISTEN_FDS", b"LISTEN_PID", b"LISTEN_FDNAMES", b"WATCHDOG_USEC",
     b"WATCHDOG_PID", b"JOURNAL_STREAM", b"INVOCATION_ID", b"MANAGERPID", b"SYSTEMD_EXEC_PID",
     b"CREDENTIALS_DIRECTORY"}
)  # fmt: skip
PRIVATE_PREFIX = b"PYINETD_"
# What a service with `user:` takes from pyinetd's (root's) environment: the locale, the time
# zone and PATH, as sudo's env_reset and `su -` do; HOME, USER and LOGNAME are the user's own.
USER_PASS_KEYS = frozenset({b"PATH", b"LANG", b"LANGUAGE", b"TZ"})
DEFAULT_PATH = b"/usr/local/bin:/usr/bin:/bin"


class UserGone(OSError):
    """The service's `user:` no longer exists (deleted after the configuration was loaded)."""


def _inherited(service: Service) -> Environ:
    """The part of pyinetd's environment a service starts from (before its `env:`)."""
    if service.env_clear:
        return {b"PATH": os.environb.get(b"PATH", DEFAULT_PATH)}
    env = {
        k: v
        for k, v in os.environb.items()
        if k not in PRIVATE_KEYS and not k.startswith(PRIVATE_PREFIX)
    }
    if service.user:
        env = {k: v for k, v in env.items() if k in USER_PASS_KEYS or k.startswith(b"LC_")}
        env.setdefault(b"PATH", DEFAULT_PATH)
    return env


def service_environ(service: Service) -> Environ:
    """The environment every child of ``service`` starts from.

    Without ``env_clear``: pyinetd's environment without pyinetd's own variables
    (PRIVATE_KEYS, PYINETD_*), as xinetd passes its own environment on; for a service
    with ``user:`` only PATH, the locale and TZ of it, and the user's HOME, USER and
    LOGNAME. PYTHONUNBUFFERED=1 for a WebSocket service. Then the service's ``env:``, then
    PYINETD_SERVICE. Raises UserGone.
    """
    env = _inherited(service)
    if service.user:
        name, _, _ = service.user
        try:
            home = pwd.getpwnam(name).pw_dir
        except KeyError:  # a user deleted after the configuration was loaded
            raise UserGone(errno.ENOENT, f"user {name!r} no longer exists") from None
        env.update({b"USER": name.encode(), b"LOGNAME": name.encode(), b"HOME": os.fsencode(home)})
    if service.websocket is not None:
        # A message is sent when the program writes it: Python's stdout on a pipe is block
        # buffered, and a script's replies would wait in it until 8 KiB or its exit. A warm
        # service's zygote starts with it too, and makes its children's stdout unbuffered
        # (zygote_main._make_stdio). The service's env: may say otherwise.
        env[b"PYTHONUNBUFFERED"] = b"1"
    for key, value in service.env:
        env[os.fsencode(key)] = os.fsencode(value)
    env[b"PYINETD_SERVICE"] = service.name.encode()
    return env
