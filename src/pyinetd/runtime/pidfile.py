"""The pid file: written atomically from an fd on its folder, removed only if still ours."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from typing import Any


class PidFile:
    """Where the pid file was written (its folder's fd, its name and inode), for its removal."""

    def __init__(self) -> None:
        self.path: str | None = None
        self._entry: tuple[int, str, int, int] | None = None  # folder fd, name, dev, inode

    def write(self, path: str, pid: int) -> None:
        """Write the pid file atomically, from an fd on its folder, under a name no one can
        guess; a file this process already wrote there (kept across `pyinetd upgrade`, same
        pid) is left as it is.

        A guessable name opened following symlinks lets a local user who plants symlinks for
        the next pids have root overwrite a file of their choosing. A folder others may write
        (unless sticky) or another user owns is refused: they could swap the file under us.
        """
        if self._entry is not None and self.path == path:
            return
        folder, name = os.path.split(os.path.abspath(path))
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            st = os.fstat(dfd)
            if st.st_uid not in (os.geteuid(), 0):
                raise OSError(
                    errno.EPERM, f"folder {folder} is owned by uid {st.st_uid}; refusing it"
                )
            if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
                mode = f"{stat.S_IMODE(st.st_mode):04o}"
                raise OSError(
                    errno.EPERM, f"folder {folder} is writable by others (mode {mode}); refusing it"
                )
            # os.urandom, not secrets/tempfile: those load hashlib (libcrypto, 3.5 MiB).
            tmp = f".{name}.{os.urandom(8).hex()}"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(tmp, flags, 0o644, dir_fd=dfd)
            try:
                os.write(fd, f"{pid}\n".encode())
                written = os.fstat(fd)
            finally:
                os.close(fd)
            # atomic: a reader never sees a half-written file
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            os.close(dfd)
            raise
        self.path = path
        self._entry = (dfd, name, written.st_dev, written.st_ino)

    def remove(self) -> None:
        """Unlink the pid file, in the folder it was written to, only if it is still ours."""
        if self._entry is None:
            return
        dfd, name, dev, ino = self._entry
        self._entry = None
        with contextlib.suppress(OSError):
            st = os.lstat(name, dir_fd=dfd)
            if (st.st_dev, st.st_ino) == (dev, ino):
                os.unlink(name, dir_fd=dfd)
        os.close(dfd)

    # ------------------------------------------------------------ across `pyinetd upgrade`
    def carry(self) -> tuple[list[Any] | None, list[int]]:
        """What the next image needs to remove the file at its stop: facts, and the folder's
        fd to keep open across exec."""
        if self._entry is None:
            return None, []
        dfd, name, dev, ino = self._entry
        return [self.path, dfd, name, dev, ino], [dfd]

    def adopt(self, facts: list[Any] | None) -> None:
        """The pid file the image before this one wrote (``carry``), now this image's."""
        if facts:
            path, dfd, name, dev, ino = facts
            self.path = path
            self._entry = (dfd, name, dev, ino)
