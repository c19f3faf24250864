"""A service's process settings, applied in a forked child before it execs the service or
(a TLS or redirect relay) reads a client's byte: its own session, the sandbox's namespaces,
limits, priority, umask, identity, no_new_privs, folder, the sandbox's rules
(``apply_process_settings``); prctl(2) for them; and the RLIMIT_NOFILE pyinetd was started
with, which every service process gets back while pyinetd runs with its raised one
(``raise_nofile``). spawn.py, which starts every process, calls these; nothing here forks.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyinetd.config import Service
    from pyinetd.sandbox import Prepared

_SET_NOFILE: Callable[[int, int], None] | None
try:  # pyinetd's own, where it was built (_spawn.c)
    from pyinetd import _spawn

    C_MODULE_BUILT = True
    _SET_NOFILE = getattr(_spawn, "set_nofile", None)
except ImportError:  # pragma: no cover - installed without a C compiler
    C_MODULE_BUILT = False
    _SET_NOFILE = None

PR_SET_DUMPABLE = 4  # <linux/prctl.h>
PR_SET_KEEPCAPS = 8
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE = 47, 2

# The RLIMIT_NOFILE pyinetd was started with, (soft, hard), which every service process gets
# back; None while pyinetd runs with the limit it was given (raise_nofile()).
CHILD_NOFILE: tuple[int, int] | None = None
# How a worker (started with the first process's raised limit) learns the one to hand on.
NOFILE_ENV = "PYINETD_CHILD_NOFILE"


def raise_nofile() -> None:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit, and remember the soft limit
    it was started with for the service processes (``CHILD_NOFILE``).

    Built-in sessions, pending connections and control clients each hold a parent's fd: under
    systemd's default soft limit of 1024 (256 in the attack) one client's idle connections
    held every fd and `status` and every service failed. Programs get the
    limit pyinetd had (or their `rlimits: {nofile}`): a program that uses select() breaks on a
    fd above 1024 (select(2), FD_SETSIZE), so it must not be handed a raised soft limit.
    """
    global CHILD_NOFILE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    given = os.environ.get(NOFILE_ENV, "")
    if given.isdigit() and int(given) <= hard:
        soft = int(given)  # a worker: the first process's own starting limit
    if soft >= hard and CHILD_NOFILE is None:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return
    CHILD_NOFILE = (soft, hard)
    os.environ[NOFILE_ENV] = str(soft)  # (PYINETD_*: never passed to a service)
    if _SET_NOFILE is not None:
        _SET_NOFILE(soft, hard)


def prctl(option: int, arg: int) -> None:  # pragma: no cover - runs in a forked child
    """prctl(option, arg, 0, 0, 0) in this process (prctl(2)); raises OSError."""
    if C_MODULE_BUILT:
        _spawn.prctl(option, arg)
        return
    import ctypes  # only where the C module was not built

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def apply_process_settings(  # pragma: no cover - forked child
    service: Service, box: Prepared | None = None
) -> None:
    """In a forked child, before it execs the service or (a TLS or redirect relay) reads a
    byte from the client: everything a service's process settings say, in one place, for
    every path that starts a service program.

    A session of its own first: sharing pyinetd's, a service could open pyinetd's
    controlling terminal and type into root's shell (TIOCSTI), or setpgid() into pyinetd's
    process group and escape the timeout's killpg. Limits and priority before
    the identity changes: raising them may need root. The identity in the order that can
    work: supplementary groups and gid while still root, the uid last (setuid(2) drops the
    right to change the others). no_new_privs after that (prctl(2)), the folder last, as the
    service's user, who must be allowed there. A sandbox (``box``): its namespaces
    joined while still root (setns needs CAP_SYS_ADMIN), its no_new_privs, Landlock and
    seccomp rules last, so that the filter need not allow the setup calls.
    """
    os.setsid()
    if box is not None:
        box.enter()
    if CHILD_NOFILE is not None:  # the limit pyinetd was started with, not its raised one
        resource.setrlimit(resource.RLIMIT_NOFILE, CHILD_NOFILE)
    for res, value in service.rlimits:
        resource.setrlimit(res, (value, value))
    if service.nice is not None:
        os.setpriority(os.PRIO_PROCESS, 0, service.nice)  # absolute, like xinetd's nice
    if service.umask is not None:
        os.umask(service.umask)
    if service.user or service.group is not None:
        name, uid, gid = service.user or ("", -1, os.getgid())
        gid = service.group if service.group is not None else gid
        if os.geteuid() == 0:
            if name:
                os.initgroups(name, gid)  # the user's supplementary groups
            else:
                os.setgroups([gid])
        os.setgid(gid)
        if uid >= 0:
            os.setuid(uid)
    if service.nnp:
        # From here on no setuid bit or file capability raises the privileges of this
        # process or anything it execs.
        prctl(PR_SET_NO_NEW_PRIVS, 1)
    if service.cwd:
        os.chdir(service.cwd)
    if box is not None:
        box.restrict()
