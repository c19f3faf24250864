"""The only module that forks or execs: (service, fds, environment) -> pid.

Ways to start a child, fastest first; the first one usable here is the fast path:

* ``pyinetd._spawn.start`` ("clone"; ``_spawn.c``, built at install time where a C compiler
  is there, x86_64 and arm64 Linux): ``clone(CLONE_VM)`` without ``CLONE_VFORK``, so the
  parent goes back to its loop at once instead of sleeping until the child has exec'd, and
  the child does only what a service needs: the few signals pyinetd handles or ignores back
  to their default, the connection onto 0 and 1 and the service's stderr onto 2, a session
  of its own (setsid), no_new_privs where the service wants it, an empty signal mask, exec.
  The child runs on a stack and a copy of its arguments of its own (a slot the kernel
  frees at its exec), with raw system calls only.
  A failed exec is known when the child is reaped: it exits 127 and ``exec_error(pid)``
  gives the errno (the fork path's child reports the same way, so a program that cannot
  start is counted alike with `user:` or without). Parent CPU per spawn 20 vs 45 us
  (bench/README.md).
* ``pyinetd._spawn.spawn`` ("vfork"): the same child with vfork: the parent sleeps until the
  exec, and knows at once if it failed.
* CPython's own spawn primitive, ``_posixsubprocess.fork_exec`` (what ``subprocess`` uses,
  also vfork-based): it takes the environment as a ready list of ``KEY=value`` bytes (cached
  per service here); its child asks for every signal's disposition and closes every fd
  above 2 by hand. Its call shape is private to CPython, so a mismatch falls back to
  ``os.posix_spawn`` for good.
* ``os.posix_spawn``: glibc's ``clone(CLONE_VM|CLONE_VFORK)``; the parent spends ~25% more
  CPU per spawn than with fork_exec.
* fork path, ``os.fork`` + ``os.execve``: for user/group switching, rlimits, umask, nice and
  cwd, which none of the above can set (and no_new_privs, where fork_exec or posix_spawn
  would be used). It costs the parent about three times the CPU.

Every one of them gives the child a session of its own. The fork path and the TLS/redirect
relay (``spawn_relay``) apply a service's process settings through one function,
``procsettings.apply_process_settings``; the environment a child starts from is
environ.py's (``service_environ``, cached per service).

A service's ``sandbox`` (sandbox.py) is prepared once per service (``Spawner.prepare``) and
applied by the clone and vfork children (``_spawn.c``) or, on every other path, by the fork
path (fork_exec and posix_spawn cannot apply it): ``_uses_fork`` decides, in one place.

``PYINETD_SPAWN=clone|vfork|fork_exec|posix_spawn`` picks one (tests, measurements).

In all, the child gets exactly fds 0, 1 and 2: every fd Python opens is close-on-exec
(PEP 446) and ``dup2`` clears the flag on its target only, so no listening socket, wake-up
fd or other client's socket can leak into a service, and nothing is closed by hand.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import signal
import struct
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from pyinetd import log, procsettings
from pyinetd.config import ConfigError, Service
from pyinetd.procsettings import (
    PR_CAP_AMBIENT,
    PR_CAP_AMBIENT_RAISE,
    PR_SET_DUMPABLE,
    PR_SET_KEEPCAPS,
    apply_process_settings,
    prctl,
)
from pyinetd.sandbox import Prepared, SandboxError, cgroupnet
from pyinetd.signals import PYTHON_IGNORED, handled_signals, ignored_signals
from pyinetd.spawn.environ import CONNECTION_KEYS, EnvEntries, Environ, env_dict, service_environ

if TYPE_CHECKING:
    import ssl

_FORK_EXEC: Callable[..., int] | None
try:  # CPython's subprocess primitive (Modules/_posixsubprocess.c)
    from _posixsubprocess import fork_exec as _FORK_EXEC
except ImportError:  # pragma: no cover - other interpreters
    _FORK_EXEC = None

_VFORK: Callable[..., int] | None
_START: Callable[..., int] | None
_SETTLE: Callable[[float], bool] | None
try:  # pyinetd's own, where it was built (_spawn.c)
    from pyinetd import _spawn

    _VFORK = _spawn.spawn
    _START = getattr(_spawn, "start", None)  # x86_64 and arm64 Linux only
    _SETTLE = getattr(_spawn, "settle", None)
    _SET_NOFILE = getattr(_spawn, "set_nofile", None)
except ImportError:  # pragma: no cover - installed without a C compiler
    _VFORK = _START = _SETTLE = _SET_NOFILE = None
C_MODULE_BUILT = _VFORK is not None

NO_NEW_PRIVS = 1  # _spawn.c's flag: prctl(PR_SET_NO_NEW_PRIVS, 1) in the child
PATH_FIRST = 2  # _spawn.c's flag: argv's first item is the path to execute, argv follows
# The capability a zygote holds from its exec until it is no longer dumpable (spawn_zygote):
# CAP_WAKE_ALARM, which no process of a service's user has and which grants little (alarm
# timers that wake a suspended system).
ZYGOTE_GUARD_CAP = 35

SETTLE_TIMEOUT = 1.0  # seconds; a child takes well under a millisecond to reach its exec

PRIMITIVES = ("clone", "vfork", "fork_exec", "posix_spawn")
# What a clone or fork-path child that could not exec writes before it exits 127: pid, errno.
_REPORT = struct.Struct("=ii")
EXIT_127 = 127 << 8  # its wait status then; also a shell's "command not found"


def seal_inherited_fds() -> None:
    """Make every fd above 2 that pyinetd was started with close-on-exec.

    PEP 446 covers each fd Python opens; one inherited from whoever started pyinetd (a
    shell's ``exec 7<file``, a supervisor's pipe) is not, and would reach every service.
    CPython's fork_exec closes such fds in each child; the other primitives count on
    close-on-exec, so they are sealed here once, before any child starts.
    """
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            with contextlib.suppress(OSError):  # (the directory listdir itself had open)
                os.set_inheritable(fd, False)


def needs_fork(service: Service) -> bool:
    """True when the service needs settings that only the fork path can apply
    (no_new_privs aside: the C module's primitives set it too)."""
    return bool(
        service.user
        or service.group is not None
        or service.cwd
        or service.umask is not None
        or service.nice is not None
        or service.rlimits
    )


# At exit, how long the cgroups of network: loopback services may take to empty (a warm
# service's zygote leaving) before pyinetd leaves them to the next start.
CGROUP_EXIT_WAIT = 1.0


class Spawner:
    """Starts service children; holds what is computed once rather than per connection."""

    def __init__(self) -> None:
        seal_inherited_fds()
        self._sigdef = ignored_signals()
        self._handled = handled_signals()
        self._base_env: dict[str, Environ] = {}
        self._env_list: dict[str, tuple[list[bytes], list[bytes]]] = {}
        self._errpipe: tuple[int, int] | None = None
        self._errpoll = select.poll()
        self._reports: tuple[int, int] | None = None
        self._exec_errors: dict[int, int] = {}
        self._sandboxes: dict[str, Prepared] = {}
        self.primitive = self._choose_primitive()
        self._report_fd()  # made once, at start: its two fds are not a change while serving

    def refresh_signals(self) -> None:
        """Recompute the signals to reset (call after installing the server's handlers)."""
        self._sigdef = ignored_signals()
        self._handled = handled_signals()
        self.primitive = self._choose_primitive()

    def _choose_primitive(self) -> str:
        """The fastest primitive usable here (or the one PYINETD_SPAWN names)."""
        usable = [p for p in PRIMITIVES if self._usable(p)]
        wanted = os.environ.get("PYINETD_SPAWN", "")
        return wanted if wanted in usable else usable[0]

    def _usable(self, primitive: str) -> bool:
        if primitive == "clone":
            return _START is not None
        if primitive == "vfork":
            return _VFORK is not None
        if primitive == "fork_exec":
            # Its child resets only SIGPIPE and SIGXFSZ and keeps the caller's signal mask;
            # posix_spawn is told both explicitly. Use it only where that is the same.
            return (
                _FORK_EXEC is not None
                and set(self._sigdef) <= set(PYTHON_IGNORED)
                and not signal.pthread_sigmask(signal.SIG_BLOCK, [])
            )
        return True

    def close(self) -> None:
        self._close_sandboxes()
        if cgroupnet.STALE:  # network: loopback cgroups still holding processes
            cgroupnet.settle_cgroups(CGROUP_EXIT_WAIT)
        if self._errpipe is not None:
            self._errpoll.unregister(self._errpipe[0])
            for fd in self._errpipe:
                os.close(fd)
            self._errpipe = None
        if self._reports is not None:
            for fd in self._reports:
                os.close(fd)
            self._reports = None

    def settle(self) -> None:
        """Wait until no child started by the clone primitive is still before its exec.

        Until its exec a clone child holds a copy of pyinetd's fds (it drops them at once,
        but it may not have run yet): call this after closing listening sockets, so that a
        reload or a new pyinetd can bind their addresses again right away.
        """
        if self.primitive == "clone" and _SETTLE is not None and not _SETTLE(SETTLE_TIMEOUT):
            log.event(
                logging.WARNING,
                f"a service process took over {SETTLE_TIMEOUT:g}s to start",
                event="settle",
            )

    def exec_error(self, pid: int, status: int) -> int | None:
        """The errno with which ``pid`` failed to exec, for a child started by the clone
        primitive or the fork path: known once it has exited 127, so call it for each child
        reaped."""
        if status != EXIT_127:
            if self._exec_errors:  # a report whose child then died otherwise: pids recur
                self._exec_errors.pop(pid, None)
            return None
        if self._reports is not None:
            while True:
                try:
                    data = os.read(self._reports[0], 64 * _REPORT.size)
                except BlockingIOError:
                    break
                whole = len(data) - len(data) % _REPORT.size  # (records are never split)
                for failed, err in _REPORT.iter_unpack(data[:whole]):
                    self._exec_errors[failed] = err
        return self._exec_errors.pop(pid, None)

    def base_environ(self, service: Service) -> Environ:
        """The environment every child of ``service`` starts from (``service_environ``),
        cached per service. Raises UserGone."""
        env = self._base_env.get(service.name)
        if env is None:
            env = self._base_env[service.name] = service_environ(service)
        return env

    def forget(self) -> None:
        """Drop cached per-service data (after a reload; install_sandboxes replaces the
        sandboxes)."""
        self._base_env.clear()
        self._env_list.clear()

    def prepare(self, service: Service) -> Prepared | None:
        """The service's sandbox, built at its first use (or at load, called for each service,
        so that a kernel that cannot build it refuses the service then). Raises
        SandboxError."""
        if service.sandbox is None:
            return None
        box = self._sandboxes.get(service.name)
        if box is None or box.settings != service.sandbox:
            if box is not None:
                self.settle()
                box.close()
            box = self._sandboxes[service.name] = Prepared(service.sandbox, service.name)
        return box

    def _box(self, service: Service) -> Prepared | None:
        """prepare(), where a failure is an OSError for this connection: a kernel that
        refuses now what it offered at load is logged, not raised out of the loop."""
        if service.sandbox is None:
            return None
        try:
            return self.prepare(service)
        except SandboxError as exc:
            raise OSError(errno.EPERM, f"sandbox: {exc}", service.argv[0]) from None

    def relay(
        self,
        service: Service,
        conn: int,
        stderr: int,
        env: Environ,
        ctx: ssl.SSLContext | None,
        peer: str,
        report: tuple[int, float] | None = None,
    ) -> int:
        """spawn_relay() in the service's sandbox: the relay (the handshake) and its program."""
        return spawn_relay(service, conn, stderr, env, ctx, peer, self._box(service), report)

    def zygote(self, service: Service, argv: list[str], env: Environ, ctl: int, err: int) -> int:
        """spawn_zygote() with the service's sandbox (a warm service's zygote, zygote.py)."""
        return spawn_zygote(service, argv, env, ctl, err, self._box(service))

    @property
    def sandboxes(self) -> Mapping[str, Prepared]:
        """The sandboxes in use, by service name (prepare_sandboxes keeps those unchanged)."""
        return self._sandboxes

    def install_sandboxes(self, boxes: dict[str, Prepared]) -> None:
        """Use ``boxes`` (from prepare_sandboxes, at a (re)load) from now on; the previous
        ones that are not among them are closed once no child is before its exec."""
        kept = {id(b) for b in boxes.values()}
        old = [b for b in self._sandboxes.values() if id(b) not in kept]
        if old:
            self.settle()  # a clone child before its exec may still setns to these fds
            for box in old:
                box.close()
        self._sandboxes = dict(boxes)

    def _close_sandboxes(self) -> None:
        if self._sandboxes:
            self.settle()  # a clone child before its exec may still setns to these fds
            for box in self._sandboxes.values():
                box.close()
            self._sandboxes.clear()

    def _uses_fork(self, service: Service) -> bool:
        """The one place that decides: the fork path, or the primitive (``self.primitive``)."""
        if needs_fork(service):
            return True
        if procsettings.CHILD_NOFILE is not None and (
            _SET_NOFILE is None or self.primitive not in ("clone", "vfork")
        ):
            # Only the fork path and _spawn.c's children set the fd limit pyinetd started with.
            return True
        # Only pyinetd's own children (_spawn.c) apply a sandbox; fork_exec and posix_spawn
        # cannot, so a sandboxed service takes the fork path there.
        return service.sandbox is not None and self.primitive not in ("clone", "vfork")

    def spawn(
        self,
        service: Service,
        stdin: int,
        stdout: int,
        stderr: int,
        extra_env: EnvEntries,
    ) -> int:
        """Start the service's program with the given fds on 0, 1, 2; return its pid.

        Raises OSError when the program cannot be started. Every primitive but clone
        knows at once (a vfork parent resumes only after the child exec'd or died); a
        clone child that cannot exec exits 127 and ``exec_error(pid)`` tells why.
        """
        fork = self._uses_fork(service)
        box = self._box(service)
        flags = (NO_NEW_PRIVS if service.nnp else 0) | PATH_FIRST
        if self.primitive == "clone" and not fork:
            bargv, envl = self._exec_lists(service)
            report = self._report_fd()
            assert _START is not None
            if box is not None:
                return _START(bargv, envl, extra_env, stdin, stdout, stderr, report,
                              self._handled, flags, sandbox=box.c_arg)  # fmt: skip
            return _START(bargv, envl, extra_env, stdin, stdout, stderr, report,
                          self._handled, flags)  # fmt: skip
        if self.primitive == "vfork" and not fork:
            bargv, envl = self._exec_lists(service)
            assert _VFORK is not None
            if box is not None:
                return _VFORK(bargv, envl, extra_env, stdin, stdout, stderr, -1, self._handled,
                              flags, sandbox=box.c_arg)  # fmt: skip
            return _VFORK(bargv, envl, extra_env, stdin, stdout, stderr, -1, self._handled, flags)
        # Neither fork_exec nor posix_spawn can set no_new_privs: the fork path does.
        fork = fork or service.nnp
        if self.primitive == "fork_exec" and not fork:
            try:
                return self._spawn_fork_exec(service, stdin, stdout, stderr, extra_env)
            except TypeError:  # not the call shape this CPython's fork_exec takes
                self.primitive = "posix_spawn"
        env = self.base_environ(service).copy()
        env.update(env_dict(extra_env))
        argv = service.argv
        if fork:
            return self._fork_exec(service, argv, env, stdin, stdout, stderr, box)
        return os.posix_spawn(
            service.program,
            argv,
            env,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, stdin, 0),
                (os.POSIX_SPAWN_DUP2, stdout, 1),
                (os.POSIX_SPAWN_DUP2, stderr, 2),
            ],
            setsigmask=(),
            setsigdef=self._sigdef,
            # Its own session (see apply_process_settings): no controlling terminal, and a
            # group of its own that a timeout signals with the helpers it started.
            setsid=True,
        )

    def _report_fd(self) -> int:
        """The write end of the pipe on which children that could not exec report (pid,
        errno), read by exec_error when they are reaped."""
        if self._reports is None:
            # Both ends non-blocking: a child must never wait on a full pipe.
            self._reports = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        return self._reports[1]

    def _exec_lists(self, service: Service) -> tuple[list[bytes], list[bytes]]:
        """argv and the base environment as execve takes them (cached per service)."""
        cached = self._env_list.get(service.name)
        if cached is None:
            base = self.base_environ(service)
            envl = [k + b"=" + v for k, v in base.items() if k not in CONNECTION_KEYS]
            # The path to execute, then argv (the C module's PATH_FIRST flag).
            cached = ([os.fsencode(a) for a in (service.program, *service.argv)], envl)
            self._env_list[service.name] = cached
        return cached

    def _error_pipe(self) -> tuple[int, int]:
        """One pipe for every spawn: the child writes to it only when it fails before or in
        exec, and the parent resumes only after that (vfork), so an empty pipe right after
        the call means the exec succeeded."""
        if self._errpipe is None:
            self._errpipe = os.pipe()
            os.set_blocking(self._errpipe[0], False)
            self._errpoll.register(self._errpipe[0], select.POLLIN)
        return self._errpipe

    def _spawn_fork_exec(
        self,
        service: Service,
        stdin: int,
        stdout: int,
        stderr: int,
        extra_env: EnvEntries,
    ) -> int:
        path_argv, envl = self._exec_lists(service)
        argv = path_argv[1:]  # fork_exec takes the path apart (executable_list)
        err_r, err_w = self._error_pipe()
        # Positional, as subprocess.Popen calls it (CPython 3.11-3.14): args,
        # executable_list, close_fds, pass_fds, cwd, env, p2cread, p2cwrite, c2pread,
        # c2pwrite, errread, errwrite, errpipe_read, errpipe_write, restore_signals,
        # call_setsid, pgid_to_set, gid, extra_groups, uid, child_umask, preexec_fn,
        # allow_vfork. call_setsid: a session of its own (see apply_process_settings).
        assert _FORK_EXEC is not None
        pid = _FORK_EXEC(
            argv, [os.fsencode(service.program)], True, (err_w,), None,
            envl + extra_env,
            stdin, -1, -1, stdout, -1, stderr, err_r, err_w,
            True, True, -1, None, None, None, -1, None, True,
        )  # fmt: skip
        if not self._errpoll.poll(0):  # (poll, not a read: no exception per spawn)
            return pid
        report = os.read(err_r, 4096)
        # "OSError:<hex errno>:<noexec or empty>", written just before the child's _exit
        os.waitpid(pid, 0)
        try:
            code = int(report.split(b":")[1], 16)
        except (IndexError, ValueError):
            code = errno.ENOEXEC
        raise OSError(code, os.strerror(code), service.program)

    def _fork_exec(
        self,
        service: Service,
        argv: tuple[str, ...],
        env: Environ,
        stdin: int,
        stdout: int,
        stderr: int,
        box: Prepared | None = None,
    ) -> int:
        sigdef, report = self._sigdef, self._report_fd()
        return _fork(
            lambda: _child_exec(
                service, argv, env, stdin, stdout, stderr, sigdef, box, report=report
            )
        )


def prepare_sandboxes(
    services: Iterable[Service], current: Mapping[str, Prepared] | None = None
) -> dict[str, Prepared]:
    """Each sandboxed service's sandbox, built before a (re)load changes anything, so that one
    the kernel refuses (no namespaces for pyinetd's user, a path gone) refuses the
    configuration: ConfigError naming file, service and key; nothing stays open then. A
    sandbox in ``current`` (the running one) whose settings did not change is kept as it is:
    a reload that changes nothing rebuilds nothing."""
    boxes: dict[str, Prepared] = {}
    errors: list[str] = []
    for svc in services:
        if svc.sandbox is None or not svc.enabled or svc.is_builtin:
            continue
        old = (current or {}).get(svc.name)
        if old is not None and old.settings == svc.sandbox:
            boxes[svc.name] = old
            continue
        try:
            boxes[svc.name] = Prepared(svc.sandbox, svc.name)
        except (SandboxError, OSError) as exc:
            errors.append(f"{svc.source}: services.{svc.name}.sandbox: cannot prepare: {exc}")
    if errors:
        discard_sandboxes(boxes, current)
        raise ConfigError(errors)
    return boxes


def discard_sandboxes(
    boxes: Mapping[str, Prepared], current: Mapping[str, Prepared] | None
) -> None:
    """Close the prepared sandboxes that never got used (those of ``current`` stay)."""
    running = {id(b) for b in (current or {}).values()}
    for box in boxes.values():
        if id(box) not in running:
            box.close()


def spawn_relay(
    service: Service,
    conn: int,
    stderr: int,
    env: Environ,
    ctx: ssl.SSLContext | None,
    peer: str,
    box: Prepared | None = None,
    report: tuple[int, float] | None = None,
) -> int:
    """Fork a relay process for a TLS or redirect service; returns its pid.

    The relay does the TLS handshake (with its deadline) and then starts the service on a
    pair of pipes, or connects to the redirect target, and relays bytes until both sides are
    done. It takes the service's process settings (apply_process_settings: its own session,
    the service's user, limits, folder) before it reads a byte, and the service inherits
    them; a timeout's killpg reaches both. The parent's loop never blocks on a handshake or
    a connect. ``report``: where it says its handshake is complete, and its deadline.
    """

    def child() -> None:  # pragma: no cover - runs in the forked relay process
        code = 1
        try:
            # Every import happens here, before the privileges go: as the service's user,
            # Python's own library may be out of reach (an interpreter under /root), and a
            # lazy import would fail mid-connection; socket.create_connection encodes host
            # names with the idna codec, imported on first use.
            import encodings.idna  # noqa: F401

            from pyinetd.protocols import tlsconf  # noqa: F401
            from pyinetd.spawn import relay

            code = relay.serve_connection(
                service,
                conn,
                stderr,
                env,
                ctx,
                peer,
                lambda svc: _settle_relay(svc, box),
                _start_behind_relay,
                keep=_box_fds(box),
                report=report,
            )
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.write(2, f"relay for {peer}: {exc!r}\n".encode(errors="replace"))
        finally:
            os._exit(code)

    return _fork(child)


def _box_fds(box: Prepared | None) -> frozenset[int]:
    """The sandbox's fds, which a relay keeps open until it applies the sandbox."""
    return frozenset() if box is None else box.fds()


def _settle_relay(
    service: Service, box: Prepared | None = None
) -> None:  # pragma: no cover - in the relay process
    """The service's session, limits and identity for a relay, and no core dumps: the relay
    holds the TLS key in its memory, so that no other process of the service's user may
    ptrace it or read /proc/PID/mem. (The kernel does this on the uid change anyway unless
    fs.suid_dumpable says otherwise; a relay that keeps root's uid is covered too.) The
    program the relay execs is dumpable again, and holds no key. A sandbox contains the
    relay (it parses the client's handshake) and so the program it starts."""
    apply_process_settings(service, box)
    prctl(PR_SET_DUMPABLE, 0)


def _start_behind_relay(
    service: Service, env: Environ, stdin: int, stdout: int
) -> int:  # pragma: no cover - in the relay process
    """The relay's service program, on the relay's pipes; it inherits the relay's settings."""
    return os.posix_spawn(
        service.program,
        service.argv,
        env,
        file_actions=[(os.POSIX_SPAWN_DUP2, stdin, 0), (os.POSIX_SPAWN_DUP2, stdout, 1)],
        setsigmask=(),
        setsigdef=PYTHON_IGNORED,
    )


def _own_code(statement: str) -> str:
    """``python -c`` code running ``statement`` with the same pyinetd code as ours, whatever
    the new interpreter's import path would find."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return f"import sys; sys.path.insert(0, {root!r}); {statement}"


def start_python(
    statement: str,
    args: list[str],
    env: Mapping[str, str],
    sigdef: tuple[int, ...],
    dup2: tuple[tuple[int, int], ...] = (),
) -> int:
    """Start pyinetd's own code in a fresh interpreter (a worker, the exit watcher); returns
    its pid. posix_spawn: no fork of the parent's memory, an empty signal mask, ``sigdef`` at
    their default, ``dup2`` as (from, to) fd pairs. OSError if it cannot start."""
    argv = [sys.executable, "-c", _own_code(statement), *args]
    actions = [(os.POSIX_SPAWN_DUP2, src, dst) for src, dst in dup2]
    return os.posix_spawn(argv[0], argv, env, file_actions=actions, setsigmask=(), setsigdef=sigdef)


def _fork(child: Callable[[], None]) -> int:
    """os.fork() with every signal blocked across it; ``child`` runs in the child and must
    leave through exec or os._exit. Blocked, no Python handler can run in the child before
    it resets them (it would write to the parent's wake-up fd)."""
    log.flush()
    for stream in (sys.stdout, sys.stderr):  # nothing buffered may be written twice
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    old_mask = signal.pthread_sigmask(signal.SIG_SETMASK, signal.valid_signals())
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                child()
            finally:
                os._exit(127)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    return pid


def _child_exec(
    service: Service,
    argv: tuple[str, ...],
    env: Environ,
    stdin: int,
    stdout: int,
    stderr: int,
    sigdef: tuple[signal.Signals, ...],
    box: Prepared | None = None,
    program: str | None = None,
    before_exec: Callable[[], None] | None = None,
    report: int = -1,
) -> None:  # pragma: no cover - child side
    """In the forked child: set up fds and process settings, exec ``program`` (the service's
    by default; ``before_exec`` called just before); never returns. A failure (a setting, or
    the exec) is reported as (pid, errno) on ``report`` where one is given, as the clone
    primitive's child does: the parent then counts a spawn failure by its errno, not an exit
    127."""
    try:
        signal.set_wakeup_fd(-1)
        # dup2 order: a source fd may itself be 0, 1 or 2 only if pyinetd was started with
        # closed std fds, which cli.py prevents; stderr first so failures below are seen.
        os.dup2(stderr, 2)
        os.dup2(stdin, 0)
        os.dup2(stdout, 1)
        apply_process_settings(service, box)
        for sig in signal.valid_signals():
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                with contextlib.suppress(OSError, ValueError):
                    signal.signal(sig, signal.SIG_DFL)
        for sig in sigdef:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        if before_exec is not None:
            before_exec()
        os.execve(program or service.program, argv, env)
    except BaseException as exc:
        try:
            err = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EINVAL
            told = False
            if report >= 0:
                with contextlib.suppress(OSError):
                    told = os.write(report, _REPORT.pack(os.getpid(), err)) == _REPORT.size
            if (
                not told
                or not isinstance(exc, OSError)
                or exc.filename != (program or service.program)
            ):
                # Not the exec itself (a setting: cwd, user, limits): the detail goes to the
                # service's stderr, which the parent's one error line cannot carry.
                msg = f"pyinetd: {service.name}: cannot start {service.program}: {exc}\n"
                os.write(2, msg.encode(errors="replace"))
        finally:
            os._exit(127)
    os._exit(127)


ZYGOTE_CTL_FD = 3  # where a warm service's zygote finds its control channel (zygote_main.py)


def zygote_guarded(service: Service) -> bool:
    """Whether the service's zygote starts with ZYGOTE_GUARD_CAP: when it runs as a user other
    than root. An exec makes a process dumpable, and until the zygote has made itself not
    dumpable (its first act, zygote_main.py) any process of its user (a connection process
    that killed the zygote, to race its restart) could ptrace it, take its channel with
    pidfd_getfd or open /proc/PID/mem for writing, and keep what it got after. The kernel
    refuses all three to a caller whose permitted capabilities are not a superset of the
    target's (security/commoncap.c, cap_ptrace_access_check), dumpable or not: with one
    capability the user's processes lack, the zygote is out of their reach from its exec
    on. It drops the capability once it is not dumpable, before its first fork."""
    return service.user is not None and service.user[1] != 0 and os.geteuid() == 0


def _raise_guard() -> None:  # pragma: no cover - runs in the forked child
    """After the identity change (PR_SET_KEEPCAPS kept root's permitted set): permitted and
    inheritable reduced to ZYGOTE_GUARD_CAP, which the ambient set then carries across the
    exec (capabilities(7): a non-root exec keeps only the ambient set). No AT_SECURE follows:
    the file gains nothing, the ids do not change."""
    bit = 1 << ZYGOTE_GUARD_CAP
    _spawn.capset(0, bit, bit)
    _spawn.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, ZYGOTE_GUARD_CAP)


def spawn_zygote(
    service: Service,
    argv: list[str],
    env: Environ,
    ctl: int,
    stderr: int,
    box: Prepared | None = None,
) -> int:
    """Start a warm service's zygote (zygote.py): ``argv`` with the service's process settings
    and sandbox (apply_process_settings, through the same child path as every fork-path
    service), /dev/null on 0 and 1, ``stderr`` on 2 and ``ctl`` on fd 3; returns its pid. The
    processes it forks inherit all of it."""
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    sigdef = ignored_signals()
    guard = zygote_guarded(service)

    def child() -> None:  # pragma: no cover - runs in the forked child
        # Every source above 3 first, so that no dup2 below lands on a source still needed.
        hi = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (ctl, stderr, devnull)]
        os.dup2(hi[0], ZYGOTE_CTL_FD)  # inheritable: the one fd above 2 the zygote gets
        if guard:
            prctl(PR_SET_KEEPCAPS, 1)  # setuid() keeps the permitted set, for the raise below
        _child_exec(
            service, tuple(argv), env, hi[2], hi[2], hi[1], sigdef, box, argv[0],
            _raise_guard if guard else None,
        )  # fmt: skip

    try:
        return _fork(child)
    finally:
        os.close(devnull)
