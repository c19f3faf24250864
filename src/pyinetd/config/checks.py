"""Checks of a service's values that look beyond its file: may its user write the stderr file,
does its sandbox let exec read the program, which addresses a redirect reaches, may workers
share a limit. Pure of runtime: no sockets opened, no processes started (fsuser switches the
effective ids of this thread for a moment, as --check does).

Whose failure a file's failure is: a file or folder the service's user can
change (``changeable_by``) fails that service alone, with a warning (``settle_file``): its user
could otherwise make the whole configuration invalid (swap its own err.log for a symlink to a
root file, chmod 000 its own folder) and with it every reload and the next start. The
administrator's own mistakes, in files only root can change, stay configuration errors.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from dataclasses import dataclass, field
from typing import Any

from pyinetd import fsuser, sandbox
from pyinetd.config import warmcmd
from pyinetd.config.parsers import ListenAddress

__all__ = [
    "FileFindings",
    "Unusable",
    "changeable_by",
    "check_reach",
    "check_sandbox",
    "check_stderr_file",
    "check_workers",
    "reaches",
    "settle_file",
]

# What the service is left with when a file its user can change fails at load.
FAILED = "the service is failed: it listens nowhere until this is mended and pyinetd reloaded"
WITHOUT_BANNER = "the service is served without its banner"
STDERR_TO_LOG = "the service's stderr goes to pyinetd's log (stderr: log) instead"
MAX_SYMLINKS = 40  # as the kernel's path walk (ELOOP)


@dataclass(frozen=True)
class Unusable:
    """A key whose file or folder is not usable now (parsers._FileStateError), as parsed
    before the service's user is known; settled by config.py with ``settle_file``."""

    where: str  # where the key was given: 'FILE: services.NAME' or 'FILE: defaults'
    key: str
    message: str
    path: str
    fallback: Any


@dataclass
class FileFindings:
    """One load's failures of files that services' users can change, by service."""

    failed: dict[str, str] = field(default_factory=dict)  # service -> 'key: why' (not served)
    notes: dict[str, list[str]] = field(default_factory=dict)  # service -> 'key: why; what now'
    warnings: list[str] = field(default_factory=list)  # 'FILE: services.NAME.KEY: why; what now'
    # errors of `defaults:` keys that a service claimed as its own / that one did not
    claimed: set[str] = field(default_factory=set)
    kept: set[str] = field(default_factory=set)


def service_user(values: dict[str, Any]) -> fsuser.User | None:
    """The user whose files fall under the rule: a service's own user, not root, while
    pyinetd runs as root. Not as root, every service runs as pyinetd's own user, whose files
    are the administrator's: their failures stay configuration errors; so do those of a
    service without `user:` (it runs as root: its files are root's by StrictModes)."""
    user = values.get("user")
    if os.geteuid() != 0 or user is None or user[1] == 0:
        return None
    return user  # type: ignore[no-any-return]


def changeable_by(user: fsuser.User, group: int | None, path: str) -> str | None:
    """The first entry on the way to ``path`` that ``user`` can change, or None.

    The way is walked as the kernel walks it, from /, each symlink followed (at most 40), with
    lstat only (nothing is opened, so a FIFO cannot block). An entry is the user's to change
    when the user owns it (chmod, or replace what is inside), when its folder is writable by
    the user (rename, replace: unless that folder is sticky and the entry is not the user's,
    as /tmp), when it is missing from a folder the user may write (create it), or, for the
    file at the end, when the user may write it (its content). Below a folder the user may
    not search, nothing is the user's to change. Mode bits and the user's groups decide
    (ACLs are not read)."""
    name, uid, gid = user
    gid = group if group is not None else gid
    groups = set(os.getgrouplist(name, gid)) if name else {gid}

    def may(st: os.stat_result, bit: int) -> bool:
        if st.st_uid == uid:
            return bool(st.st_mode & (bit << 6))
        if st.st_gid in groups:
            return bool(st.st_mode & (bit << 3))
        return bool(st.st_mode & bit)

    folder, fst = "/", os.lstat("/")
    if fst.st_uid == uid:
        return folder
    todo = list(reversed(os.path.join(os.getcwd(), path).split("/")))  # absolute stays
    st, links = fst, 0
    while todo:
        part = todo.pop()
        if part in ("", "."):
            continue
        if part == "..":
            folder = os.path.dirname(folder)
            st = fst = os.lstat(folder)
            continue
        if not may(fst, 0o1):
            return None  # the user cannot pass this folder
        entry = os.path.join(folder, part)
        try:
            st = os.lstat(entry)
        except FileNotFoundError:
            return folder if may(fst, 0o2) else None
        except OSError:  # ENOTDIR, ENAMETOOLONG: nothing the user made
            return None
        if st.st_uid == uid:
            return entry
        if may(fst, 0o2) and not fst.st_mode & stat.S_ISVTX:
            return folder
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_SYMLINKS:
                return None
            target = os.readlink(entry)
            if target.startswith("/"):
                folder, fst = "/", os.lstat("/")
            todo.extend(reversed(target.split("/")))
            continue
        folder, fst = entry, st
    if not stat.S_ISDIR(st.st_mode) and may(st, 0o2):
        return path
    return None


def settle_file(
    values: dict[str, Any],
    where: str,
    line: str,
    path: str,
    errors: list[str],
    found: FileFindings,
    *,
    without: str | None = None,
    always: bool = False,
) -> bool:
    """A check of ``where`` (FILE: services.NAME) failed with ``line`` (WHERE.KEY: why) on
    ``path``: a configuration error, unless the service's user can change that path (or
    ``always``: a check made with the user's rights, which no root file decides alone). Then
    it is a warning and the service's alone: failed, or, with ``without``, served on without
    that file (``without`` says how). True when it is the service's."""
    user = service_user(values)
    who = None if user is None else changeable_by(user, values.get("group"), path)
    if user is None or (who is None and not always):
        errors.append(line)
        return False
    name = where.partition(": services.")[2]
    why = line[len(where) + 1 :] if line.startswith(where + ".") else line
    because = f"; {user[0]!r} can change {who!r}" if who else ""
    found.warnings.append(f"{line}{because}: {without or FAILED}")
    if without is None:
        found.failed.setdefault(name, why)
    else:
        found.notes.setdefault(name, []).append(f"{why}: {without}")
    return True


def _regular(path: str) -> bool:
    """execve(2) runs a regular file only (EACCES for a FIFO, a device); stat, not open: a
    FIFO must not block the load."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def check_reach(values: dict[str, Any], where: str, errors: list[str], found: FileFindings) -> None:
    """The program and cwd, checked with the rights of the service's user, as the child will
    use them (execve after setuid, chdir after setuid): a program in a folder that user may
    not search fails every connection. Always the service's failure, never the
    configuration's: its user may have made its own folder 0700."""
    user = service_user(values)
    argv = values.get("exec") or ()
    if user is None or not argv:
        return
    given = getattr(argv, "given", argv)
    cwd = values.get("cwd")
    script = ""
    if values.get("warm") and warmcmd.is_python(argv[0]) and len(argv) > 1:
        try:
            script = warmcmd.from_argv(argv).script
        except (ValueError, IndexError):
            script = ""
    with fsuser.user_rights(user, values.get("group")):
        run = os.access(argv[0], os.X_OK, effective_ids=True) and _regular(argv[0])
        into = cwd is None or os.access(cwd, os.X_OK, effective_ids=True)
        read = not os.path.isabs(script) or os.access(script, os.R_OK, effective_ids=True)
    who = f"user {user[0]!r}"
    if not run:
        why = "may not run it (not reachable, or not an executable file)"
        line = f"{where}.exec: {given[0]}: {who} {why}"
        settle_file(values, where, line, given[0], errors, found, always=True)
    elif not read:
        line = f"{where}.exec: {script}: {who} may not read the script"
        settle_file(values, where, line, script, errors, found, always=True)
    if not into and cwd is not None:
        line = f"{where}.cwd: {cwd}: {who} may not enter it"
        settle_file(values, where, line, cwd, errors, found, always=True)


def check_workers(workers: int, max_children: int | None, label: str) -> list[str]:
    """max_children counts every service's children: with several worker processes each
    would count only its own, so a limit of N would let workers x N through. Refused, not
    multiplied. (A service with its own counted limit stays with the first process.)"""
    if workers <= 1 or max_children is None:
        return []
    why = f"not with workers: {workers} (each worker process counts only its own children)"
    return [f"{label}: max_children: {why}"]


def check_stderr_file(values: dict[str, Any], where: str, errors: list[str]) -> None:
    """`stderr: FILE` is opened with the service user's rights: say at load, not
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
            # Read once, here: the zygote is started from this line, not from a second read
            # by root in the loop of a path the user controls.
            first = fsuser.read_first_line_as(values.get("user"), values.get("group"), argv[0])
            values["exec_first_line"] = first
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
