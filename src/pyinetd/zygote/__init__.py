"""A warm service's zygote: pyinetd's side of one (this package's root) and the program it
runs (``zygote_main``, sent to it, never imported).

A warm service (``warm: true``) keeps one zygote: the interpreter its script would run under,
started with the service's process settings, that has imported what the script imports (and
``preload``), compiled the script, frozen its GC and waits on a control channel
(zygote_main.py is the program it runs). Per connection pyinetd sends it the connection's fds,
argv and environment; the zygote forks a process that is pyinetd's own child (CLONE_PARENT,
``_spawn.serve``), which runs the script as a fresh interpreter would. That process tells
pyinetd its pid, and the kernel vouches for it (SCM_CREDENTIALS): a zygote runs the service's
code as the service's user, and must not be able to name another process for pyinetd to track
or signal.

The zygote is a boundary: its user's other processes (its own forks among them) cannot reach
it, as it is not dumpable (spawn.zygote_guarded, zygote_main._out_of_reach); and what comes on
its channel keeps its invariants (``_handle``): K, F and E only from the zygote's own pid, each
request answered at most once, by a new child of pyinetd that no slot tracks; anything else is
distrust (killed, channel closed, its requests served cold). Its text is escaped (``said``).

States (one ``_change_state``): starting -> ready; any -> backoff when the process dies or
misbehaves (restarted later, doubling delays), through ending when it died with requests open
(their pids may still come on its channel); failed when it cannot work at all (the
interpreter cannot load pyinetd's C module, preload failed, threads after the imports, the
script does not compile): the service runs cold until a reload replaces the zygote. Whenever a
zygote is not ready, connections are served cold by exec, never refused.
"""

from __future__ import annotations

import array
import contextlib
import logging
import marshal
import os
import select
import signal
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pyinetd import log, spawn
from pyinetd.config import Service, warmcmd
from pyinetd.spawn import environ

LOADER = "import os;exec(os.read(3,1<<20))"  # the zygote's -c: run the source pyinetd sends
SOURCE = (Path(__file__).parent / "zygote_main.py").read_bytes()
REPLY_TIMEOUT = 2.0  # seconds for a fork's reply; a fork takes about a millisecond
STOP_WAIT = 0.5  # seconds a retired zygote's forks have to report their pids
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
STABLE_AFTER = 30.0  # a zygote ready this long resets the backoff
_UCRED = struct.Struct("=iII")  # struct ucred: pid, uid, gid

STARTING, READY, BACKOFF, FAILED, STOPPED = "starting", "ready", "backoff", "failed", "stopped"
ENDING = "ending"  # the process is gone; its channel is read to its end for its last forks' pids


class ZygoteUnavailable(Exception):
    """No warm process for this connection; serve it cold."""


@dataclass(frozen=True)
class ScriptId:
    """What a reload compares to tell an edited script: the file's identity and mtime."""

    dev: int
    ino: int
    mtime_ns: int
    size: int


def script_path(service: Service, command: warmcmd.PythonCommand) -> str:
    """The script's path as the zygote opens it: relative to the service's folder."""
    base = service.cwd or os.getcwd()
    return os.path.join(base, command.script)


def script_id(path: str) -> ScriptId | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return ScriptId(st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def c_module_path() -> str | None:
    """The file of pyinetd's C module, which the zygote loads for its loop (serve)."""
    if not spawn.C_MODULE_BUILT:
        return None
    from pyinetd import _spawn

    return getattr(_spawn, "__file__", None)


class Zygote:
    """One warm service's zygote process and its control channel."""

    def __init__(
        self,
        service: Service,
        env: environ.Environ,
        stderr: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        say: Callable[[int, str], None] | None = None,
        start_process: Callable[
            [Service, list[str], environ.Environ, int, int], int
        ] = spawn.spawn_zygote,
        replied: Callable[[int, int | None, str], None] = lambda n, pid, why: None,
        is_ours: Callable[[int], bool] | None = None,
        is_tracked: Callable[[int], bool] = lambda pid: False,
    ) -> None:
        self.service = service
        # As a cold start: `exec: [python, ...]` runs the interpreter with argv[0] as written
        # (a venv's python finds its venv from it); a #! script is run by the kernel from
        # its resolved path, which the interpreter then sees.
        given = service.argv if warmcmd.is_python(service.argv[0]) else service.exec
        self.command = warmcmd.python_command(given, _first_line(service))
        self.script = script_path(service, self.command)
        self._env = env
        self._stderr = stderr
        self._clock = clock
        self._start_process = start_process  # Spawner.zygote: with the service's sandbox
        self._say = say or (lambda level, msg: log.event(level, msg, event="zygote"))
        self.state = STOPPED
        self.reason = ""
        self.pid: int | None = None
        self._speaker = 0  # the pid whose own words (K, F, E) the channel carries, while open
        self.forks = 0  # the service's, across restarts and replacements (warm.py)
        self.process_forks = 0  # this process's: what `warm_max_forks` counts
        self.started_at = 0.0
        self.ready_at = 0.0
        self.retry_at = 0.0
        self.delay = BACKOFF_FIRST
        self.script_id: ScriptId | None = None
        self._sock: socket.socket | None = None
        self._seq = 0  # requests sent to this process (its replies are numbered)
        self._ended = ""  # how the process ended, once reaped
        self._pending: set[int] = set()  # numbers of the requests not answered yet
        self._heard_at = 0.0  # when the zygote last answered, or was asked with none open
        # Where answers go: (request number, pid or None, why not); whether a pid is a child
        # of pyinetd's (one reaped before its b"P" was read is); whether a pid is pyinetd's
        # already: a connection's process (it has a slot), a zygote.
        self.replied, self.is_ours, self.is_tracked = replied, is_ours or is_child, is_tracked
        self._cold_noted = False

    # ------------------------------------------------------------------ lifecycle
    def _change_state(self, state: str, reason: str = "") -> None:
        self.state, self.reason = state, reason
        if state == READY:
            self._cold_noted = False

    def fileno(self) -> int:
        """The control channel (-1 when none): readable when the zygote says something."""
        return self._sock.fileno() if self._sock is not None else -1

    def start(self) -> None:
        """Start the zygote process; it is ready once ``on_readable`` has seen it say so."""
        self.script_id = script_id(self.script)
        so = c_module_path()
        if so is None:
            self._fail("pyinetd's C module was not built (it makes the child pyinetd's own)")
            return
        argv = [*self.command.interpreter_argv(), "-c", LOADER, "pyinetd-zygote"]
        argv.append(self.service.name)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            so_fd = _module_fd(so)
            try:
                self.pid = self._start_process(
                    self.service, argv, self._env, theirs.fileno(), self._stderr
                )
                self._speaker = self.pid
                setup = {
                    "script": self.command.script,
                    # sys.argv: the script and its arguments as the service's exec gives them
                    "argv": [self.command.script, *self.command.args],
                    "orig_argv": list(self.command.orig_argv),
                    "preload": list(self.service.preload),
                    # a child's fd 2 is then its connection (the zygote's: /dev/null)
                    "stderr_socket": self.service.stderr == "socket",
                    # it holds spawn.ZYGOTE_GUARD_CAP, to drop once it is not dumpable
                    "guarded": spawn.zygote_guarded(self.service),
                }
                ours.send(SOURCE)
                ours.sendmsg(
                    [marshal.dumps(setup)],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [so_fd]))],
                )
            finally:
                os.close(so_fd)
        except OSError as exc:
            ours.close()
            self._died_early(f"cannot start: {exc}")
            return
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock = ours
        self._seq = 0
        self._ended = ""
        self.process_forks = 0
        self.started_at = self._clock()
        self._change_state(STARTING)

    def _died_early(self, why: str) -> None:
        self._close()
        self._backoff(why)

    def _fail(self, why: str) -> None:
        """For good (until a reload): the service runs cold."""
        self._close()
        self._change_state(FAILED, why)
        self._say(logging.WARNING, f"{self.service.name}: zygote: {why}; serving cold")

    def _backoff(self, why: str) -> None:
        now = self._clock()
        if self.ready_at and now - self.ready_at >= STABLE_AFTER:
            self.delay = BACKOFF_FIRST
        self.retry_at = now + self.delay
        self._say(
            logging.WARNING,
            f"{self.service.name}: zygote: {why}; serving cold, restart in {self.delay:g}s",
        )
        self.delay = min(self.delay * 2, BACKOFF_MAX)
        self.ready_at = 0.0
        self._change_state(BACKOFF, why)

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._answer_all(self.reason or "zygote gone")

    def stop(self) -> None:
        """Ask the zygote to exit (it also exits at the channel's end); pyinetd reaps it.
        The answers to requests sent before are read first (for at most STOP_WAIT): a process
        it forked for one must not be started a second time, cold."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.send(b"Q")
            deadline = self._clock() + STOP_WAIT
            while self._pending and self._sock is not None and self._clock() < deadline:
                select.select([self._sock], [], [], max(0.0, deadline - self._clock()))
                self.on_readable()
        self._close()
        self._change_state(STOPPED)

    def kill(self) -> None:
        """SIGKILL the zygote process (it no longer answers)."""
        if self.pid is not None:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)

    def on_exit(self, pid: int, status: int) -> bool:
        """A child was reaped: True if it was this zygote (then restart later, or not)."""
        if pid != self.pid:
            return False
        self.pid = None
        if self.state in (STARTING, READY):
            code = os.waitstatus_to_exitcode(status)
            how = f"exit {code}" if code >= 0 else f"signal {-code}"
            self._ended = f"process ended ({how})"
            self.on_readable()  # the pids its last forks sent, before the channel goes
            if self.state == READY and self._pending:
                # A process it forked just before it died may not have said its pid yet: were
                # its connection served cold now, two processes would read it. Every fork
                # closes the channel after its b"P": its end (or REPLY_TIMEOUT without a word,
                # expire) says none is left.
                self._change_state(ENDING, self._ended)
            elif self.state in (STARTING, READY):
                self._close()
                self._backoff(self._ended)
        return True

    def now(self) -> float:
        return self._clock()

    def tick(self) -> None:
        """Restart a zygote whose backoff is over (call from the loop's timers)."""
        if self.state == BACKOFF and self._clock() >= self.retry_at:
            self.kill()  # (killed already, unless it went on without its channel)
            self.start()

    def on_readable(self) -> None:
        """Read what the zygote and its children said: ready, why it cannot serve, the pids
        of the processes it forked."""
        while self._sock is not None:
            try:
                msg, anc, _flags, _addr = self._sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
            except BlockingIOError:
                return
            except OSError:  # ECONNRESET: it died with a message of ours unread
                msg, anc = b"", []
            self._handle(msg, anc)

    def _handle(self, msg: bytes, anc: list[tuple[int, int, bytes]]) -> None:
        kind = msg[:1]
        if kind == b"P" and self.state in (READY, ENDING):
            self._started(msg[1:], _sender(anc))
        elif kind in (b"K", b"F", b"E") and _sender(anc) != self._speaker:
            # Only the zygote itself says these (its children say b"P"): from any other
            # holder of the channel, an E would have the connection served cold while the
            # zygote's own fork serves it too, an F or K would steer the zygote's state.
            self.kill()
            self._died_early(f"{kind.decode()} from {_sender(anc)}, not the zygote")
        elif kind == b"E" and self.state in (READY, ENDING):
            number, _, err = msg[1:].partition(b" ")
            if not number.isdigit() or int(number) not in self._pending:
                # Never from a sound zygote: a process of the service's user holding its channel
                # could otherwise keep pyinetd reading replies to nothing, without end.
                self.kill()
                self._died_early(f"an answer to no request: {msg[:20]!r}")
                return
            why = os.strerror(int(err)) if err.isdigit() else said(err)
            self._answer(int(number), None, f"fork failed: {why}")
        elif msg == b"K" and self.state == STARTING:
            seen = _inspect(self.pid) if self.pid else {}
            threads = seen.get(b"Threads:")
            if threads is not None and threads > 1:
                self.kill()
                self._fail(f"{threads} threads after the imports: forking then is unsafe")
                return
            unsafe = _reachable(seen, self.service)
            if unsafe:
                self.kill()
                self._fail(f"within its user's reach: {unsafe}")
                return
            self.ready_at = self._clock()
            self._change_state(READY)
            self._say(
                logging.INFO,
                f"{self.service.name}: zygote {self.pid} ready "
                f"({self.ready_at - self.started_at:.2f}s)",
            )
        elif kind == b"F" and self.state == STARTING:  # it cannot work at all: for good
            self.kill()
            self._fail(said(msg[1:]))
        elif kind == b"F" and self.state in (READY, ENDING):
            # Its loop failed (it says nothing after ready, but for that): restarted with
            # backoff, as a death is; never the failed state, which only a reload ends.
            self.kill()
            self._died_early(f"failed when ready: {said(msg[1:])}")
        elif not msg:  # the channel's end: the process is going; on_exit will say why
            self._close()
            if self.state in (STARTING, READY, ENDING):
                self.kill()
                self._backoff(self._ended or "control channel closed")
        elif self.state in (READY, ENDING):  # an unexpected message: distrust the channel
            self.kill()
            self._died_early(f"unexpected message {msg[:20]!r}")

    def _started(self, number: bytes, pid: int | None) -> None:
        """A forked process said b"P<n>": request n's process is ``pid`` (the kernel's word).
        Only a new child of pyinetd's own is taken, for a request of this zygote's not
        answered yet: the zygote runs the service's code as its user and could otherwise have
        pyinetd count, and at a timeout killpg(), a process it chose, or make one process
        stand for several connections. Anything else is distrust: the zygote is killed, its
        channel closed, its open requests served cold."""
        n = int(number) if number.isdigit() else -1
        if n not in self._pending or pid is None or pid == self.pid or not self.is_ours(pid):
            self.kill()
            self._died_early(f"a reply from {pid}, not a child of pyinetd")
            return
        if self.is_tracked(pid):
            # One pid standing for several connections: each answer would take a slot that
            # its one end could give back only once (slots lost until restart).
            self.kill()
            self._died_early(f"a reply from {pid}, which already has a slot")
            return
        self.forks += 1
        self.process_forks += 1
        self._answer(n, pid)

    def wait_ready(self, timeout: float) -> bool:
        """Block until the zygote is ready or failed (tests, and a first connection)."""
        deadline = time.monotonic() + timeout
        while self.state == STARTING and self._sock is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            select.select([self._sock], [], [], left)
            self.on_readable()
        return self.state == READY

    # ------------------------------------------------------------------ per connection
    def cold_note(self) -> str | None:
        """The one log line for a run of connections served cold (None after the first)."""
        if self._cold_noted:
            return None
        self._cold_noted = True
        return f"{self.service.name}: zygote {self.state}: serving by exec"

    def send(self, env: list[bytes], fds: tuple[int, int, int]) -> int:
        """Ask the zygote to fork this connection's process with ``fds`` on 0, 1, 2 and the
        connection's variables ``env`` (KEY=value entries, no NUL in them) added to the
        zygote's environment (the service's, given at start). Returns the request's number at once:
        pyinetd's loop never waits for a zygote (one stopped with SIGSTOP by the service's
        own code would freeze every service). The answer comes to ``replied`` from
        ``on_readable``: the pid (pyinetd's child), or None when no process came of the
        request (then serve the connection cold), within REPLY_TIMEOUT (``expire``).

        Raises ZygoteUnavailable: serve the connection cold (nothing was asked).
        """
        if self.state == STARTING:
            self.on_readable()
        sock = self._sock
        if self.state != READY or sock is None:
            raise ZygoteUnavailable(self.state)
        msg = b"R" + b"\0".join(env)
        try:
            sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        except OSError as exc:
            self.kill()
            self._died_early(f"send: {exc}")
            raise ZygoteUnavailable(self.state) from None
        self._seq += 1
        if not self._pending:
            self._heard_at = self._clock()
        self._pending.add(self._seq)
        return self._seq

    def pending(self) -> int:
        """Requests not answered yet."""
        return len(self._pending)

    def next_deadline(self) -> float | None:
        """When the zygote is due to have answered something (the clock's time), None when
        nothing is asked of it."""
        return self._heard_at + REPLY_TIMEOUT if self._pending else None

    def expire(self) -> None:
        """Nothing answered for REPLY_TIMEOUT while requests wait: the zygote is killed
        (restarted after a backoff) and every request still open is answered None (served
        cold). It is its progress that is timed, not each request's wait: under a load that
        queues hundreds of requests before it, a zygote that keeps forking is not killed.
        What it said before is read first, so that a process it forked is not started twice."""
        due = self.next_deadline()
        if due is not None and due <= self._clock():
            self.on_readable()
            due = self.next_deadline()
            if due is not None and due <= self._clock():
                self.kill()
                self._died_early(f"no answer in {REPLY_TIMEOUT:g}s")

    def _answer(self, number: int, pid: int | None, why: str = "") -> None:
        self._heard_at = self._clock()
        if number in self._pending:
            self._pending.discard(number)
            self.replied(number, pid, why)

    def _answer_all(self, why: str) -> None:
        for number in sorted(self._pending):
            self._answer(number, None, why)

    def request(self, env: list[bytes], fds: tuple[int, int, int]) -> int:
        """``send``, then wait (up to REPLY_TIMEOUT) for the pid: for tests and tools, never
        pyinetd's loop. Raises ZygoteUnavailable when no process came of it."""
        number = self.send(env, fds)
        answers: dict[int, tuple[int | None, str]] = {}
        replied = self.replied
        self.replied = lambda n, pid, why: answers.__setitem__(n, (pid, why))
        try:
            while number not in answers:
                due = self.next_deadline()
                if self._sock is None or due is None:
                    self._answer_all(self.reason or self.state)
                    continue
                select.select([self._sock], [], [], max(0.0, due - self._clock()))
                self.on_readable()
                self.expire()
        finally:
            self.replied = replied
        for n, (pid, why) in answers.items():
            if n != number:
                replied(n, pid, why)
        pid, why = answers[number]
        if pid is None:
            raise ZygoteUnavailable(why)
        return pid

    # ------------------------------------------------------------------ status
    def describe(self) -> dict[str, object]:
        """For `pyinetd status`: pid, RSS, forks served, state (and why, when not ready)."""
        out: dict[str, object] = {
            "pid": self.pid,
            "rss_kib": _rss_kib(self.pid) if self.pid else None,
            "forks": self.forks,
            "state": self.state,
        }
        if self.reason:
            out["reason"] = self.reason
        return out


SAID_MAX = 200  # characters of the zygote's own text kept for the log and `status`


def said(raw: bytes) -> str:
    """Text the zygote sent (a preload or compile error: the service's code chose it, as its
    user) for the log and `status`: control characters escaped as a service's stderr lines
    are (log.escape_controls: a `\\r` or an ESC sequence forged a whole log line and retitled
    the reader's terminal), cut to SAID_MAX characters."""
    text = log.escape_controls(raw[: SAID_MAX * 4].decode("utf-8", "replace"))
    return text if len(text) <= SAID_MAX else text[: SAID_MAX - 3] + "..."


def _module_fd(path: str) -> int:
    """An fd on a copy of pyinetd's C module in memory (memfd), for the zygote to load: it may
    run as a user who cannot open pyinetd's installation, or in a sandbox whose Landlock rules
    do not cover it (a memfd is no path of the filesystem). The file itself where memfds are
    not offered."""
    global _MODULE_BYTES
    try:
        if _MODULE_BYTES is None:
            _MODULE_BYTES = Path(path).read_bytes()
        fd = os.memfd_create("pyinetd-_spawn", os.MFD_CLOEXEC)
    except (OSError, AttributeError):
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        view = memoryview(_MODULE_BYTES)
        while view:
            view = view[os.write(fd, view) :]
    except OSError:
        os.close(fd)
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    return fd


_MODULE_BYTES: bytes | None = None


def _first_line(service: Service) -> bytes:
    """The program's first line (its #!), when argv[0] is not itself a python: as the load
    read it with the service user's rights, never read again by root in the loop (the user
    could have put a FIFO or a symlink to a root-only file there since)."""
    if not service.exec or warmcmd.is_python(service.exec[0]):
        return b""
    return service.exec_first_line


def _sender(anc: list[tuple[int, int, bytes]]) -> int | None:
    """The sending process's pid, as the kernel wrote it (SO_PASSCRED)."""
    for level, kind, data in anc:
        if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS) and len(data) >= 12:
            return int(_UCRED.unpack_from(data)[0])
    return None


def is_child(pid: int) -> bool:
    """Whether ``pid`` is a child of this process, running or not reaped yet: the kernel's
    answer to waitid(WNOWAIT), which reaps nothing (one system call, no /proc to read)."""
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except OSError:  # ECHILD: not ours
        return False
    return True


def _inspect(pid: int) -> dict[bytes, int]:
    """What pyinetd checks of a zygote that says it is ready, from outside (a sandbox may
    hide /proc from the zygote itself): from /proc/PID/status its threads, tracer and
    permitted capabilities, and whether it is dumpable: the kernel gives the files of a
    process that is not dumpable to root (fs/proc/base.c, task_dump_owner; not /proc/PID
    itself, which shows the euid)."""
    seen: dict[bytes, int] = {}
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            seen[b"owner"] = os.fstat(f.fileno()).st_uid
            for line in f:
                key, _, value = line.partition(b"\t")
                if key in (b"Threads:", b"TracerPid:", b"Uid:"):
                    seen[key] = int(value.split()[0])
                elif key == b"CapPrm:":
                    seen[key] = int(value.strip(), 16)
    except (OSError, ValueError, IndexError):
        pass
    return seen


def _reachable(seen: dict[bytes, int], service: Service) -> str:
    """Why a ready zygote could be reached by its user's processes ("" when it cannot): it is
    dumpable (its own code made it so again), still holds its start-up capability (its
    children would too), or is being traced."""
    if seen.get(b"TracerPid:"):
        return f"traced by {seen[b'TracerPid:']}"
    if not seen.get(b"Uid:"):  # root's (or unknown): its user's processes are root's
        return ""
    if seen.get(b"owner") != 0:
        return "dumpable"
    if spawn.zygote_guarded(service) and seen.get(b"CapPrm:"):
        return f"capabilities {seen[b'CapPrm:']:#x} kept"
    return ""


def _status_number(pid: int, field: bytes) -> int | None:
    """The number after ``field`` (b"Threads:", b"VmRSS:") in /proc/PID/status; None when
    unknown."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _rss_kib(pid: int) -> int | None:
    return _status_number(pid, b"VmRSS:")
    return None
