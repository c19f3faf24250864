"""Open files on a service's behalf with that service user's rights, not root's.

As root, pyinetd opens a few files for a service: its `stderr: FILE` (per connection) and its
`banner:` (at load). When the service's user can write the folder, it can swap the file, or the
folder, for a symlink to a file that only root may write or read (/etc/passwd, /etc/shadow); root
would follow it. Instead of re-implementing the kernel's path walk (symlinks,
every folder's owner and mode, hard links), the open runs with the service user's effective uid,
gid and supplementary groups, so that the kernel makes exactly the check the service itself
would get, and a file the user cannot reach is refused with EACCES.

The effective ids are process-wide. pyinetd runs one thread (and glibc applies set*id(2) to every
thread anyway); they are switched back before returning, also on error. The real and saved uid
stay 0 meanwhile, so the user cannot signal or ptrace pyinetd in between (kill(2) and ptrace
compare against the target's real and saved ids).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator

User = tuple[str, int, int]  # (name, uid, gid), as config.Service.user


@contextlib.contextmanager
def user_rights(user: User | None, group: int | None = None) -> Iterator[None]:
    """File access inside the block is checked as ``user`` (with ``group`` as its gid).

    Nothing changes when pyinetd is not root (it cannot switch, and the service then runs as
    pyinetd's own user) or when the service runs as root.
    """
    if user is None or user[1] == 0 or os.geteuid() != 0:
        yield
        return
    name, uid, gid = user
    gid = group if group is not None else gid
    # The service gets initgroups(name, gid) (spawn.py): the same groups here.
    groups = os.getgrouplist(name, gid) if name else [gid]
    saved_groups, saved_gid = os.getgroups(), os.getegid()
    os.setgroups(groups)
    try:
        os.setegid(gid)
        try:
            os.seteuid(uid)
            try:
                yield
            finally:
                os.seteuid(0)
        finally:
            os.setegid(saved_gid)
    finally:
        os.setgroups(saved_groups)


def open_as(user: User | None, group: int | None, path: str, flags: int, mode: int = 0o640) -> int:
    """os.open(path, flags | O_CLOEXEC | O_NONBLOCK) with the rights of ``user``.

    O_NONBLOCK: a FIFO put where a file was expected (by the user who owns the folder) must not
    hang pyinetd in open(2) waiting for a reader (it fails with ENXIO instead); the fd is made
    blocking again before it is returned, as the service expects.
    """
    with user_rights(user, group):
        fd = os.open(path, flags | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    try:
        os.set_blocking(fd, True)
    except OSError:
        os.close(fd)
        raise
    return fd


def read_first_line_as(user: User | None, group: int | None, path: str, limit: int = 256) -> bytes:
    """Up to ``limit`` bytes of the first line of the regular file ``path``, opened with the
    rights of ``user``: what a service's program says in its ``#!``, read once at load.

    The path is in a folder the service's user may own, who can put anything there between
    two reads: so it is opened non-blocking (a FIFO must not hang pyinetd in open(2) or read(2)),
    and refused unless the opened file is a regular one (OSError ENXIO). A
    symlink is followed as the user would follow it: to nothing the user may not read."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    with user_rights(user, group):
        fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.ENXIO, "not a regular file")
        head = os.pread(fd, limit, 0)
    finally:
        os.close(fd)
    end = head.find(b"\n")
    return head if end < 0 else head[: end + 1]
