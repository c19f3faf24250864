"""Checks of a service's values that look beyond its file: may its user write the stderr file,
does its sandbox let exec read the program, which addresses a redirect reaches, may workers
share a limit. Pure of runtime: no sockets opened, no processes started (fsuser switches the
effective ids of this thread for a moment, as --check does).
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any

from pyinetd import fsuser, sandbox, warmcmd
from pyinetd.parsers import ListenAddress

__all__ = ["check_sandbox", "check_stderr_file", "check_workers", "reaches"]


def check_workers(workers: int, max_children: int | None, label: str) -> list[str]:
    """max_children counts every service's children: with several worker processes each
    would count only its own, so a limit of N would let workers x N through. Refused, not
    multiplied. (A service with its own counted limit stays with the first process.)"""
    if workers <= 1 or max_children is None:
        return []
    why = f"not with workers: {workers} (each worker process counts only its own children)"
    return [f"{label}: max_children: {why}"]


def check_stderr_file(values: dict[str, Any], where: str, errors: list[str]) -> None:
    """`stderr: FILE` is opened with the service user's rights (issue 14.3): say at load, not
    at each connection, when that user may not write it (or create it in its folder)."""
    path, user = values.get("stderr"), values.get("user")
    if path in (None, "log", "socket", "null") or user is None or user[1] == 0:
        return
    if os.geteuid() != 0:
        return  # the service runs as pyinetd's own user: it opens what pyinetd may
    with fsuser.user_rights(user, values.get("group")):
        if os.path.lexists(path):
            ok = os.access(path, os.W_OK, effective_ids=True)
        else:
            ok = os.access(os.path.dirname(path), os.W_OK | os.X_OK, effective_ids=True)
    if not ok:
        errors.append(
            f"{where}.stderr: {path!r}: user {user[0]!r} may not write it "
            "(the file is opened with the service user's rights)"
        )


def check_sandbox(values: dict[str, Any], where: str, errors: list[str], explicit: bool) -> None:
    """What execve reads (the program, its shebang interpreter, the loader) must be under
    sandbox.read: said at load and by --check, not by a service failing at each connection."""
    box = values.get("sandbox")
    if box is None:
        return
    if not explicit and values.get("builtin") is not None:
        values.pop("sandbox")  # from defaults: meant for the programs among them
        return
    if values.get("no_new_privs") is False:
        errors.append(f"{where}.no_new_privs: false: a sandbox implies no_new_privs")
    if values.get("redirect") is not None and box.network == "none":
        errors.append(f"{where}.sandbox.network: none: a redirect must connect to its target")
    if values.get("redirect") is not None and box.network == "loopback":
        host = values["redirect"][0]
        targets = _local_targets(host)
        if targets is None or not all(t.is_loopback for t in targets):
            errors.append(f"{where}.sandbox.network: loopback: the redirect target {host!r} is "
                          "not a loopback address, which the relay may not connect to")  # fmt: skip
    if not values.get("exec"):
        if values.get("builtin") is not None:
            errors.append(f"{where}.sandbox: needs exec (built-ins run inside pyinetd)")
        return
    env = dict(values.get("env", ()))
    search = env.get("PATH") or os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    for path in sandbox.unreadable_exec_paths(box, values["exec"][0], search):
        errors.append(
            f"{where}.sandbox.read: {path!r} is not under read, and exec needs it "
            f"to start {values['exec'][0]!r}"
        )


def check_warm(values: dict[str, Any], where: str, errors: list[str]) -> None:
    """`warm: true` is for a Python script only (a #! python script, or [python3, script.py]):
    say at load why another program cannot be served warm."""
    if not values.get("warm"):
        if values.get("preload"):
            errors.append(f"{where}.preload: only with warm: true")
        if values.get("warm_max_forks"):
            errors.append(f"{where}.warm_max_forks: only with warm: true")
        return
    argv = values.get("exec") or ()
    if not argv or values.get("tls") is not None or values.get("redirect") is not None:
        errors.append(f"{where}.warm: true: only for an exec service without tls or redirect")
        return
    if values.get("argv0") is not None:
        errors.append(f"{where}.warm: true: not with argv0 (the interpreter names itself)")
        return
    first = b""
    if not warmcmd.is_python(argv[0]):
        try:
            # With the service user's rights: a user may have linked the program elsewhere.
            fd = fsuser.open_as(values.get("user"), values.get("group"), argv[0], os.O_RDONLY)
            with os.fdopen(fd, "rb") as f:
                first = f.readline(256)
        except OSError as exc:
            errors.append(f"{where}.warm: true: {argv[0]}: {exc.strerror or exc}")
            return
    try:
        warmcmd.python_command(argv, first)
    except ValueError as exc:
        errors.append(f"{where}.warm: true: {argv[0]}: {exc}")


def _local_targets(host: str) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address] | None:
    """The addresses a connection to ``host`` arrives at, for literals and localhost; None
    for other names (not resolved at load: config.py opens no sockets)."""
    if host == "localhost":
        return {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.is_unspecified:  # connect() to 0.0.0.0 or :: reaches the loopback address (Linux)
        return {ipaddress.ip_address("::1" if ip.version == 6 else "127.0.0.1")}
    return {ip}


def reaches(addr: ListenAddress, host: str, port: int) -> bool:
    """True when a connection to host:port can arrive at a socket listening on ``addr``."""
    targets = _local_targets(host)
    if addr.path or addr.port != port or targets is None:
        return False
    if not addr.host or ipaddress.ip_address(addr.host).is_unspecified:
        # Every address of the host: loopback certainly (other addresses of this machine
        # are not known at load).
        return any(t.is_loopback for t in targets)
    return ipaddress.ip_address(addr.host) in targets
