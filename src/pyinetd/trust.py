"""Files pyinetd reads or runs as root must be root's (sshd's StrictModes), and are read bounded.

As root, the configuration, its included files and folders, a program a service runs as root
and a TLS key decide what runs as root: another local user who can change any of them, or any
folder above them, owns the machine (issue 18.4: a drop-in in a mode 1777 include folder ran
`/usr/bin/id` as uid 0). So, as sshd does for authorized_keys (auth.c, safe_path()):

- the file is opened once and the *opened* file is checked (fstat), never a second lookup of
  its name that an attacker could race;
- it and every folder above it, up to /, must be owned by root and not writable by group or
  others;
- a folder others may write is accepted only when it is sticky and root's (/tmp) and the entry
  below it is root's: no one else can then rename or remove that entry (unlink(2), EPERM);
- a TLS key must not be readable by others; group-readable only when the group is root's.

Only when pyinetd runs as root: a user running pyinetd for themselves trusts their own files.
Every file is opened non-blocking and must be a regular file: a FIFO or /dev/zero given as a
configuration must not hang or exhaust the loop (issue 14.9).
"""

from __future__ import annotations

import os
import pwd
import stat

__all__ = [
    "MAX_FILE_SIZE",
    "UntrustedError",
    "check_folder",
    "check_program",
    "open_regular",
    "read_regular",
]

# One configuration file (or included file, or PEM file) may be at most this large.
MAX_FILE_SIZE = 1 << 20


class UntrustedError(ValueError):
    """A file or folder other users could change; the message is 'PATH: why'."""


def strict() -> bool:
    """StrictModes apply: pyinetd runs as root."""
    return os.geteuid() == 0


def _owner(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _writers(mode: int) -> str:
    return " and ".join(w for bit, w in ((0o020, "group"), (0o002, "others")) if mode & bit)


def _check_entry(path: str, st: os.stat_result, what: str) -> None:
    if st.st_uid != 0:
        raise UntrustedError(f"{path}: {what} owned by {_owner(st.st_uid)}, not root")
    if st.st_mode & 0o022:
        mode = stat.S_IMODE(st.st_mode)
        raise UntrustedError(
            f"{path}: {what} writable by {_writers(mode)} (mode {mode:04o}); chmod go-w {path}"
        )


def _check_folders(real: str, entry_uid: int) -> None:
    """Every folder above ``real`` (an absolute path without symlinks), up to /."""
    folder = os.path.dirname(real)
    while True:
        st = os.lstat(folder)
        mode = stat.S_IMODE(st.st_mode)
        if not (mode & 0o022 and mode & stat.S_ISVTX and st.st_uid == 0 and entry_uid == 0):
            _check_entry(folder, st, "folder")
        # else /tmp: others may add entries there, not rename or remove this root-owned one
        if folder == "/":
            return
        entry_uid = st.st_uid
        folder = os.path.dirname(folder)


def _real_path(fd: int, path: str) -> str:
    """The name the opened file has now (not the one asked for, which may be a symlink)."""
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # no /proc: the name, resolved
        return os.path.realpath(path)
    return real.removesuffix(" (deleted)")


def check_fd(fd: int, path: str, what: str = "file", *, secret: bool = False) -> None:
    """As root, refuse the opened file ``fd`` (named ``path``) unless it and its folders are
    root's; with ``secret`` (a private key) also unless others cannot read it."""
    if not strict():
        return
    st = os.fstat(fd)
    _check_entry(path, st, what)
    if secret:
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o004 or (mode & 0o040 and st.st_gid != 0):
            who = "others" if mode & 0o004 else f"group {st.st_gid}"
            raise UntrustedError(
                f"{path}: {what} readable by {who} (mode {mode:04o}); chmod go-rwx {path}"
            )
    _check_folders(_real_path(fd, path), st.st_uid)


def open_regular(path: str | os.PathLike[str], what: str = "file", *, secret: bool = False) -> int:
    """Open ``path`` for reading without blocking; a regular file only, checked as root.

    OSError when it cannot be opened; UntrustedError when it is not a regular file or not
    root's. The caller closes the fd."""
    name = os.fspath(path)
    fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UntrustedError(f"{name}: not a regular file")
        check_fd(fd, name, what, secret=secret)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_fd(fd: int, name: str, limit: int = MAX_FILE_SIZE) -> bytes:
    """Read all of ``fd``, refusing more than ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while chunk := os.read(fd, min(1 << 16, limit + 1 - size)):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise UntrustedError(f"{name}: larger than {limit // 1024} KiB")
    return b"".join(chunks)


def read_regular(
    path: str | os.PathLike[str], what: str = "file", limit: int = MAX_FILE_SIZE
) -> bytes:
    """open_regular() then read at most ``limit`` bytes from the file that was checked."""
    fd = open_regular(path, what)
    try:
        return read_fd(fd, os.fspath(path), limit)
    finally:
        os.close(fd)


def check_folder(path: str | os.PathLike[str], what: str = "include folder") -> None:
    """As root, refuse a folder that anyone but root may write, sticky or not (anyone could
    add a file there), or one below such a folder."""
    if not strict():
        return
    name = os.fspath(path)
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        _check_entry(name, st, what)
        _check_folders(_real_path(fd, name), st.st_uid)
    finally:
        os.close(fd)


def check_program(path: str | os.PathLike[str]) -> None:
    """As root, refuse a program to run as root that is not root's (nor its folders)."""
    if not strict():
        return
    name = os.fspath(path)
    # O_PATH: a program need not be readable to be run, and nothing is read from it.
    fd = os.open(name, os.O_PATH | os.O_CLOEXEC)
    try:
        check_fd(fd, name, "program run as root")
    finally:
        os.close(fd)
