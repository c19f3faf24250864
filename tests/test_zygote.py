"""Warm Python services (issue 19), without the server: the same script run cold (pyinetd's
exec path, spawn.Spawner) and warm (forked by a zygote, zygote.Zygote) must tell the same story:
argv, environment, fds, signals, stdio, exit status, traceback, atexit, threads."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyinetd import config, spawn, zygote
from pyinetd.config import Service, warmcmd
from pyinetd.spawn import environ

PYTHON = sys.executable
MODES = ("cold", "warm")


class Runner:
    """Runs one service's script per 'connection' (a socketpair) cold or warm."""

    def __init__(self, service: Service, mode: str) -> None:
        self.service = service
        self.mode = mode
        self.spawner = spawn.Spawner()
        self.zygote: zygote.Zygote | None = None
        self.zygote_err = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        if mode == "warm":
            base = self.spawner.base_environ(service)
            env = {k: v for k, v in base.items() if k not in environ.CONNECTION_KEYS}
            self.zygote = zygote.Zygote(service, env, self.zygote_err)
            self.zygote.start()
            assert self.zygote.wait_ready(10), (self.zygote.state, self.zygote.reason)

    def start(self, extra: list[bytes], stdin: int, stdout: int, stderr: int) -> int:
        if self.zygote is None:
            return self.spawner.spawn(self.service, stdin, stdout, stderr, extra)
        return self.zygote.request(extra, (stdin, stdout, stderr))

    def run(
        self, data: bytes = b"", extra: list[bytes] | None = None, half_close: bool = True
    ) -> tuple[int, bytes, bytes]:
        """(wait status, what the script wrote to the connection, and to stderr)."""
        ours, theirs = socket.socketpair()
        err_r, err_w = os.pipe()
        try:
            pid = self.start(extra or [b"REMOTE_ADDR=127.0.0.1"], theirs.fileno(),
                             theirs.fileno(), err_w)  # fmt: skip
        finally:
            theirs.close()
            os.close(err_w)
        out, err = bytearray(), bytearray()
        pending = memoryview(data)
        if not pending and half_close:
            ours.shutdown(socket.SHUT_WR)
        open_fds = {ours.fileno(): out, err_r: err}
        while open_fds:
            wlist = [ours] if pending else []
            r, w, _ = select.select(list(open_fds), wlist, [], 10)
            assert r or w, "the script neither wrote nor ended in 10s"
            if w:
                n = ours.send(pending[:65536])
                pending = pending[n:]
                if not pending and half_close:
                    ours.shutdown(socket.SHUT_WR)
            for fd in r:
                chunk = os.read(fd, 65536)
                if chunk:
                    open_fds[fd] += chunk
                else:
                    del open_fds[fd]
        ours.close()
        os.close(err_r)
        _, status = os.waitpid(pid, 0)
        return status, bytes(out), bytes(err)

    def close(self) -> None:
        if self.zygote is not None:
            pid = self.zygote.pid
            self.zygote.stop()
            if pid is not None:
                os.waitpid(pid, 0)
        self.spawner.close()
        os.close(self.zygote_err)


@pytest.fixture
def service(folder: Path) -> Callable[..., Service]:
    """Write a script and a config for it; returns the loaded Service."""

    def make(body: str, extra: str = "", shebang: str = "", argv: str = "") -> Service:
        script = folder / "svc.py"
        script.write_text((shebang + "\n" if shebang else "") + textwrap.dedent(body))
        script.chmod(0o755)
        exe = argv or f"[{PYTHON}, ./svc.py, arg1, 'two words']"
        if shebang:
            exe = argv or "[./svc.py, arg1]"
        cfg = folder / "inetd.yaml"
        cfg.write_text(
            "services:\n  svc:\n    listen: 127.0.0.1:9\n"
            f"    exec: {exe}\n    cwd: {folder}\n    warm: true\n    env: {{SVC: x}}\n{extra}"
        )
        return config.load(cfg).services[0]

    return make


@pytest.fixture
def runners() -> Iterator[Callable[[Service, str], Runner]]:
    made: list[Runner] = []

    def make(svc: Service, mode: str) -> Runner:
        made.append(Runner(svc, mode))
        return made[-1]

    yield make
    for r in made:
        r.close()


PROBE = """\
    import gc, json, os, random, signal, sys
    fds = sorted(int(f) for f in os.listdir("/proc/self/fd"))
    sig = {n: str(signal.getsignal(getattr(signal, n)))
           for n in ("SIGPIPE", "SIGINT", "SIGTERM", "SIGHUP", "SIGCHLD", "SIGXFSZ", "SIGUSR1")}
    line = sys.stdin.readline()
    streams = [(s.encoding, s.errors, s.line_buffering, s.write_through, type(s.buffer).__name__,
                getattr(s.buffer, "raw", s.buffer).name, s.mode)
               for s in (sys.stdin, sys.stdout, sys.stderr)]
    out = {"argv": sys.argv, "orig_argv": sys.orig_argv, "name": __name__, "file": __file__,
           "doc": __doc__, "main": list(globals()), "fds": fds, "env": dict(os.environ), "sig": sig,
           "streams": streams, "dunder": sys.__stdout__ is sys.stdout, "flags": list(sys.flags),
           "line": line, "cwd": os.getcwd(), "path0": sys.path[0], "exe": sys.executable,
           "mask": sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])), "gc": gc.isenabled(),
           "leader": [os.getsid(0) == os.getpid(), os.getpgrp() == os.getpid()],
           "ppid": os.getppid() == int(os.environ["TEST_PID"]), "rand": random.random(),
           "ids": [os.getuid(), os.getgid(), sorted(os.getgroups())], "umask": os.umask(0o22)}
    print(json.dumps(out))
"""


def probe(runner: Runner) -> dict[str, object]:
    status, out, err = runner.run("héllo\n".encode(), [b"TEST_PID=%d" % os.getpid()])
    assert status == 0, err
    return json.loads(out)  # type: ignore[no-any-return]


def test_a_warm_child_sees_what_a_cold_one_sees(
    service: Callable[..., Service], runners: Callable[[Service, str], Runner]
) -> None:
    svc = service(PROBE, extra="    umask: '027'\n")
    cold, warm = probe(runners(svc, "cold")), probe(runners(svc, "warm"))
    again = probe(runners(svc, "warm"))
    assert cold["rand"] != warm["rand"] != again["rand"], "random state not reseeded per child"
    for d in (cold, warm, again):
        d.pop("rand")
    assert warm == cold
    assert cold["fds"] == [0, 1, 2, 3] and cold["ppid"] and cold["leader"] == [True, True]
    assert cold["argv"] == ["./svc.py", "arg1", "two words"] and cold["umask"] == 0o27


def test_a_shebang_scripts_interpreter_flags_are_honoured(
    service: Callable[..., Service], runners: Callable[[Service, str], Runner]
) -> None:
    svc = service(PROBE, shebang=f"#!{PYTHON} -uB")
    cold, warm = probe(runners(svc, "cold")), probe(runners(svc, "warm"))
    cold.pop("rand"), warm.pop("rand")
    assert warm == cold
    assert warm["streams"][1][3] is True, "-u: stdout write-through"  # type: ignore[index]
    assert warm["orig_argv"] == [PYTHON, "-uB", svc.argv[0], "arg1"]


@pytest.mark.parametrize("mode", MODES)
def test_exit_status_traceback_and_messages(
    mode: str, service: Callable[..., Service], runners: Callable[[Service, str], Runner]
) -> None:
    svc = service("""\
        import sys
        what = sys.stdin.readline().strip()
        def boom():
            raise ValueError("bad " + what)
        if what == "exit7":
            sys.exit(7)
        if what == "exitmsg":
            sys.exit("a message")
        if what == "none":
            sys.exit()
        boom()
    """)
    r = runners(svc, mode)
    assert os.waitstatus_to_exitcode(r.run(b"exit7\n")[0]) == 7
    status, _, err = r.run(b"exitmsg\n")
    assert (os.waitstatus_to_exitcode(status), err) == (1, b"a message\n")
    assert os.waitstatus_to_exitcode(r.run(b"none\n")[0]) == 0
    status, _, err = r.run(b"raise\n")
    assert os.waitstatus_to_exitcode(status) == 1
    path = f"{svc.cwd}/./svc.py"
    assert err.decode() == (
        "Traceback (most recent call last):\n"
        f'  File "{path}", line 11, in <module>\n    boom()\n'
        f'  File "{path}", line 4, in boom\n    raise ValueError("bad " + what)\n'
        "ValueError: bad raise\n"
    )


@pytest.mark.parametrize("mode", MODES)
def test_atexit_threads_and_unclosed_files_at_the_end(
    mode: str, service: Callable[..., Service], runners: Callable[[Service, str], Runner]
) -> None:
    svc = service("""\
        import atexit, sys, threading
        log = open("left-open.txt", "w")
        log.write("flushed at exit")  # never closed: the interpreter's end flushes it
        atexit.register(lambda: print("atexit ran", flush=True))
        gate = threading.Event()
        def late():
            gate.wait()
            sys.stdout.write("thread outlived main\\n")  # buffered: flushed at the end
        threading.Thread(target=late).start()
        print("main done")
        gate.set()
    """)
    status, out, err = runners(svc, mode).run()
    assert (status, err) == (0, b"")
    assert out == b"main done\nthread outlived main\natexit ran\n"
    assert (Path(svc.cwd or "") / "left-open.txt").read_text() == "flushed at exit"


@pytest.mark.parametrize("mode", MODES)
def test_large_output_and_reading_to_eof(
    mode: str, service: Callable[..., Service], runners: Callable[[Service, str], Runner]
) -> None:
    svc = service("""\
        import hashlib, sys
        data = sys.stdin.buffer.read()
        sys.stdout.write(hashlib.sha256(data).hexdigest() + "\\n")
        sys.stdout.buffer.write(data * 4)
    """)
    blob = os.urandom(1 << 20)
    status, out, _ = runners(svc, mode).run(blob)
    import hashlib

    assert status == 0
    assert out == hashlib.sha256(blob).hexdigest().encode() + b"\n" + blob * 4


@pytest.mark.parametrize("mode", MODES)
def test_keyboard_interrupt_ends_with_sigint_as_cpython_does(
    mode: str, service: Callable[..., Service], runners: Callable[[Service, str], Runner]
) -> None:
    svc = service("""\
        import atexit, os, signal
        atexit.register(lambda: print("atexit ran", flush=True))
        os.kill(os.getpid(), signal.SIGINT)
    """)
    status, out, err = runners(svc, mode).run()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGINT
    assert out == b"atexit ran\n" and err.endswith(b"KeyboardInterrupt\n")


@pytest.mark.parametrize("mode", MODES)
def test_sigpipe_ignored_and_broken_pipe_as_a_fresh_interpreter(
    mode: str, service: Callable[..., Service], runners: Callable[[Service, str], Runner]
) -> None:
    svc = service("""\
        import sys
        sys.stdin.read()
        try:
            while True:
                sys.stdout.write("x" * 65536)
                sys.stdout.flush()
        except BrokenPipeError:
            sys.stderr.write("EPIPE\\n")
    """)
    r = runners(svc, mode)
    ours, theirs = socket.socketpair()
    err_r, err_w = os.pipe()
    pid = r.start([], theirs.fileno(), theirs.fileno(), err_w)
    theirs.close()
    os.close(err_w)
    ours.shutdown(socket.SHUT_WR)
    ours.recv(10)
    ours.close()
    _, status = os.waitpid(pid, 0)
    err = os.read(err_r, 4096)
    os.close(err_r)
    # caught, the script goes on; the data left in the buffer is dropped at the final flush
    assert (err, os.waitstatus_to_exitcode(status)) == (b"EPIPE\n", 0)


def test_user_drop_as_root(
    service: Callable[..., Service], runners: Callable[[Service, str], Runner]
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    # An interpreter the user may run (the test's own may live under /root).
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None or not warmcmd.is_python(python):
        pytest.skip("no /usr/bin/python3")
    svc = service(PROBE, extra="    user: nobody\n", argv=f"[{python}, ./svc.py]")
    cold, warm = probe(runners(svc, "cold")), probe(runners(svc, "warm"))
    cold.pop("rand"), warm.pop("rand")
    assert warm == cold
    assert warm["ids"][0] != 0 and warm["ids"][1] != 0  # type: ignore[index]


def test_the_zygote_holds_no_fd_but_its_channel(
    service: Callable[..., Service], runners: Callable[[Service, str], Runner]
) -> None:
    svc = service("import json\nprint(json.dumps([1]))\n")
    r = runners(svc, "warm")
    assert r.zygote is not None and r.zygote.pid is not None
    fds = sorted(int(f) for f in os.listdir(f"/proc/{r.zygote.pid}/fd"))
    assert fds == [0, 1, 2, 3]
    assert os.readlink(f"/proc/{r.zygote.pid}/fd/3").startswith("socket:")
    # it imported the script's imports ahead, and runs as a session of its own
    maps = Path(f"/proc/{r.zygote.pid}/maps").read_text()
    assert "_json" in maps
    assert r.run()[1] == b"[1]\n"
    assert r.zygote.describe()["forks"] == 1


def test_preload_failure_runs_the_service_cold(
    service: Callable[..., Service], runners: Callable[[Service, str], Runner]
) -> None:
    svc = service("print('hi')\n", extra="    preload: [no_such_module_here]\n")
    base = spawn.Spawner().base_environ(svc)
    z = zygote.Zygote(svc, base, 2, say=lambda level, msg: None)
    z.start()
    pid = z.pid
    assert not z.wait_ready(10)
    assert z.state == zygote.FAILED and "no_such_module_here" in z.reason
    assert pid is not None
    os.waitpid(pid, 0)
    with pytest.raises(zygote.ZygoteUnavailable):
        z.request([], (0, 1, 2))


def test_threads_after_the_imports_run_the_service_cold(
    service: Callable[..., Service], folder: Path
) -> None:
    (folder / "spinner.py").write_text(
        "import threading\nthreading.Thread(target=threading.Event().wait, daemon=True).start()\n"
    )
    svc = service("import spinner\n")
    z = zygote.Zygote(svc, spawn.Spawner().base_environ(svc), 2, say=lambda level, msg: None)
    z.start()
    pid = z.pid
    assert not z.wait_ready(10)
    assert z.state == zygote.FAILED and "2 threads" in z.reason
    assert pid is not None
    os.waitpid(pid, 0)


def test_a_dead_zygote_is_restarted_with_backoff(
    service: Callable[..., Service], runners: Callable[[Service, str], Runner]
) -> None:
    svc = service("print('hi')\n")
    now = [1000.0]
    said: list[str] = []
    base = spawn.Spawner().base_environ(svc)
    z = zygote.Zygote(svc, base, 2, clock=lambda: now[0], say=lambda level, msg: said.append(msg))
    z.start()
    assert z.wait_ready(10)
    first = z.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    _, status = os.waitpid(first, 0)
    assert z.on_exit(first, status)
    assert z.state == zygote.BACKOFF and "signal 9" in said[-1]
    with pytest.raises(zygote.ZygoteUnavailable):
        z.request([], (0, 1, 2))
    assert z.cold_note() is not None and z.cold_note() is None  # one line per outage
    z.tick()
    assert z.state == zygote.BACKOFF  # not yet: 1s of backoff
    now[0] += 1.0
    z.tick()
    assert z.state == zygote.STARTING and z.pid not in (None, first)
    assert z.wait_ready(10)
    pid = z.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    z.on_exit(pid, status)
    assert z.retry_at == now[0] + 2.0  # doubled
    z.stop()


def test_script_identity_changes_when_edited(folder: Path) -> None:
    path = folder / "s.py"
    path.write_text("print(1)\n")
    before = zygote.script_id(str(path))
    os.utime(path, ns=(1, 1))
    assert zygote.script_id(str(path)) != before


# ---------------------------------------------------------------- which commands can be warm


@pytest.mark.parametrize(
    ("argv", "line", "expect"),
    [
        (["/usr/bin/python3", "s.py", "a"], b"", ("/usr/bin/python3", (), "s.py", ("a",))),
        (["/usr/bin/python3", "-u", "-X", "dev", "s.py"], b"", ("/usr/bin/python3", ("-u", "-Xdev"), "s.py", ())),  # noqa: E501
        (["/srv/s.py", "a"], b"#!/usr/bin/env python3\n", ("python3", (), "/srv/s.py", ("a",))),
        (["/srv/s.py"], b"#!/usr/bin/python3.11 -uO\n", ("/usr/bin/python3.11", ("-u", "-O"), "/srv/s.py", ())),  # noqa: E501
        (["/srv/s.py"], b"#!/usr/bin/env -S python3 -B\n", ("python3", ("-B",), "/srv/s.py", ())),
    ],
)  # fmt: skip
def test_python_commands(argv: list[str], line: bytes, expect: tuple[object, ...]) -> None:
    cmd = warmcmd.python_command(argv, line)
    assert (cmd.interpreter, cmd.options, cmd.script, cmd.args) == expect


@pytest.mark.parametrize(
    ("argv", "line", "why"),
    [
        (["/bin/cat"], b"\x7fELF", "no #! line"),
        (["/srv/s.sh"], b"#!/bin/sh\n", "not a Python script"),
        (["/usr/bin/python3", "-c", "print(1)"], b"", "-c runs a command"),
        (["/usr/bin/python3", "-m", "http.server"], b"", "-m runs a module"),
        (["/usr/bin/python3", "-i", "s.py"], b"", "interactive"),
        (["/srv/s.py"], b"#!/usr/bin/python3 -u -O\n", "not supported"),
        (["/usr/bin/python3"], b"", "no script"),
    ],
)
def test_commands_that_cannot_be_warm(argv: list[str], line: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        warmcmd.python_command(argv, line)


def test_warm_on_a_program_that_is_not_python_is_a_config_error(tmp_path: Path) -> None:
    cfg = tmp_path / "inetd.yaml"
    cfg.write_text(
        "services:\n"
        "  cat: {listen: 127.0.0.1:9, exec: /bin/cat, warm: true}\n"
        "  echo: {listen: 127.0.0.1:10, builtin: echo, warm: true}\n"
        "  pre: {listen: 127.0.0.1:11, exec: /bin/cat, preload: [json]}\n"
        "  mf: {listen: 127.0.0.1:14, exec: /bin/cat, warm_max_forks: 5}\n"
        "  neg: {listen: 127.0.0.1:15, exec: [/usr/bin/python3, s.py], warm: true,"
        " warm_max_forks: -1}\n"
        "  a0: {listen: 127.0.0.1:13, exec: [/usr/bin/python3, s.py], argv0: py, warm: true}\n"
        "  bad: {listen: 127.0.0.1:12, exec: [/usr/bin/python3, -m, x], warm: true,"
        " preload: ['1x']}\n"
    )
    with pytest.raises(config.ConfigError) as err:
        config.load(cfg)
    text = str(err.value)
    assert f"{cfg}: services.cat.warm: true: /usr/bin/cat: not a Python script: no #! line" in text
    assert "services.echo.warm: true: only for an exec service" in text
    assert "services.pre.preload: only with warm: true" in text
    assert "services.mf.warm_max_forks: only with warm: true" in text
    assert "services.neg.warm_max_forks: -1: expected a whole number >= 0" in text
    assert "services.a0.warm: true: not with argv0" in text
    assert "services.bad.preload: '1x': expected a module name" in text


def test_a_zygote_cannot_make_pyinetd_adopt_a_process_that_is_not_its_child(
    service: Callable[..., Service], folder: Path
) -> None:
    """The zygote runs the service's imports as the service's user: a module that forks at
    import keeps the control channel and answers the next request itself. pyinetd takes the
    pid from the kernel (SCM_CREDENTIALS), never from the message, and only a child of its own:
    otherwise it would count, and at a timeout killpg(), a process the service chose."""
    (folder / "evil.py").write_text(
        textwrap.dedent("""\
        import os, time
        if os.fork() == 0:
            time.sleep(0.3)  # until the zygote is ready
            os.write(3, b"P1")  # "I am the process of request 1"
            open("sent", "w").close()
            time.sleep(30)
            os._exit(0)
        """)
    )
    svc = service("import evil\nprint('served')\n")
    z = zygote.Zygote(svc, spawn.Spawner().base_environ(svc), 2, say=lambda level, msg: None)
    z.start()
    zpid = z.pid
    assert zpid is not None and z.wait_ready(10)
    sent = folder / "sent"
    wait_for_path(sent)
    liar = [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == zpid]
    ours, theirs = socket.socketpair()
    try:
        try:
            adopted: int | None = z.request([], (theirs.fileno(), theirs.fileno(), 2))
        except zygote.ZygoteUnavailable:
            adopted = None
        assert adopted is None, f"pyinetd took pid {adopted} (parent {_ppid(adopted)})"
        assert z.state == zygote.BACKOFF and "not a child of pyinetd" in z.reason
    finally:
        ours.close()
        theirs.close()
        for pid in liar:
            os.kill(pid, signal.SIGKILL)
        z.kill()
        os.waitpid(zpid, 0)


def test_answers_to_no_request_make_pyinetd_distrust_the_zygote(
    service: Callable[..., Service], folder: Path
) -> None:
    """A process of the service's user that kept the zygote's channel (here: a module that
    forks at import) floods it with failure answers to requests never made. pyinetd ignored
    them and read on, for as long as they came; now the first one is distrust: the zygote is
    killed and its channel closed, so the flood reaches no one."""
    (folder / "flood.py").write_text(
        textwrap.dedent("""\
        import os, time
        if os.fork() == 0:
            time.sleep(0.3)  # until the zygote is ready
            for _ in range(50):  # (what the socket's buffer holds unread)
                os.write(3, b"E7 0")
            open("sent", "w").close()
            time.sleep(30)
            os._exit(0)
        """)
    )
    svc = service("import flood\nprint('served')\n")
    z = zygote.Zygote(svc, spawn.Spawner().base_environ(svc), 2, say=lambda level, msg: None)
    z.start()
    zpid = z.pid
    assert zpid is not None and z.wait_ready(10)
    wait_for_path(folder / "sent")
    flooder = [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == zpid]
    try:
        z.on_readable()
        assert z.state == zygote.BACKOFF and "E from" in z.reason, z.reason
        assert z.fileno() == -1  # the channel is closed
    finally:
        for pid in flooder:
            os.kill(pid, signal.SIGKILL)
        z.kill()


def wait_for_path(path: Path) -> None:
    from tests.conftest import wait_for

    wait_for(path.exists, what=str(path))


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2 :].split()[1])


def _reach_as(uid: int, gid: int, pid: int) -> list[str]:
    """What a process of ``uid`` gets of ``pid``: its memory opened for writing, a ptrace
    attach, its fd 3 through pidfd_getfd (the empty list: nothing)."""
    import ctypes

    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the attacker
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            libc = ctypes.CDLL(None, use_errno=True)
            got = []
            try:
                with open(f"/proc/{pid}/mem", "r+b", buffering=0):
                    got.append("mem")
            except OSError:
                pass
            if libc.syscall(101, 0x4206, pid, 0, 0) == 0:  # PTRACE_SEIZE: no stop to undo
                got.append("ptrace")
            pidfd = libc.syscall(434, pid, 0)
            if pidfd >= 0 and libc.syscall(438, pidfd, 3, 0) >= 0:
                got.append("getfd")
            os.write(w, " ".join(got).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(child, 0)
    return out.split()


def test_a_starting_zygote_is_out_of_its_users_reach(service: Callable[..., Service]) -> None:
    """An exec makes a process dumpable, and the zygote only makes itself not dumpable once
    its interpreter runs pyinetd's code: a process of its user (a connection process that
    killed the zygote, to race its restart) could ptrace it, open its memory or take its
    channel in between, and keep them. Held here before its first read of the channel, the
    zygote is out of reach: it holds a capability that no process of its user has."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no /usr/bin/python3")
    svc = service("pass\n", extra="    user: nobody\n", argv=f"[{python}, ./svc.py]")
    assert svc.user is not None
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    argv = [python, "-c", zygote.LOADER, "pyinetd-zygote", "svc"]
    pid = spawn.spawn_zygote(svc, argv, {b"PATH": b"/usr/bin"}, theirs.fileno(), 2)
    theirs.close()
    try:
        from tests.conftest import wait_for

        # (its exec done: the interpreter waits in the loader's read of the channel)
        wait_for(
            lambda: b"pyinetd-zygote" in Path(f"/proc/{pid}/cmdline").read_bytes(),
            what="the zygote's exec",
        )
        assert _reach_as(svc.user[1], svc.user[2], pid) == []
    finally:
        ours.close()
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
