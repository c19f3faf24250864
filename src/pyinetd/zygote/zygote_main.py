# The program a warm service's zygote runs (see zygote.py for pyinetd's side).
#
# Not imported as part of pyinetd: pyinetd sends this file's text over the control channel and
# the zygote runs it (python [script options] -c LOADER), so that it runs in the interpreter
# the script would have run under, with that interpreter's flags, as the service's user, who
# may not be allowed to read pyinetd's installation. It imports nothing but builtin modules of
# its own, so that a connection's process finds in sys.modules what the script and `preload`
# imported and little else.
#
# The zygote: reads the script, imports the modules the script imports at top level (found
# by parsing it, never by running it) and those `preload` names, compiles the script once,
# freezes the GC, tells pyinetd it is ready, and then serves requests in pyinetd's C module
# (_spawn.serve: the loop, and per request a fork whose child is pyinetd's, CLONE_PARENT), each
# child becoming, as far as the script can tell, a fresh `python script.py args` with the
# connection on stdin and stdout.
#
# Control channel (fd 3, a SOCK_SEQPACKET socketpair), one message each:
#   pyinetd -> zygote: this source; then SETUP = marshal of a dict, with pyinetd's C module's
#                      fd (SCM_RIGHTS); then per connection REQUEST = b"R" + the
#                      connection's variables (KEY=value, NUL between them: no marshal in
#                      the child), with fds [stdin, stdout, stderr]; b"Q" to stop.
#   zygote -> pyinetd: b"K" ready; b"F" + why (then it exits); b"E<n> <errno>" when request n
#                      (counted from 1) got no process. The child sends b"P<n>" (first thing
#                      after the fork, from C): pyinetd takes its pid from the kernel's
#                      SCM_CREDENTIALS, never from the message.
# mypy: ignore-errors
# ruff: noqa: SIM105, SIM115, UP020  (no contextlib: nothing imported that the script did not;
# io.open as create_stdio calls it)
import _socket
import gc
import marshal
import os
import sys

_CTL = 3
_PyCF_ONLY_AST = 0x400  # ast.PyCF_ONLY_AST, without importing ast
_SCOPES = ("body", "orelse", "handlers", "finalbody")  # statements run at module level


def _send(msg):
    _ctl.send(msg)


def _fail(why):
    try:
        _send(b"F" + why.encode("utf-8", "replace")[:4000])
    finally:
        os._exit(1)


def _recv_fds(size):
    """One message and the fds that came with it."""
    msg, anc, _flags, _addr = _ctl.recvmsg(size, _socket.CMSG_SPACE(16 * 4))
    fds = []
    for level, kind, data in anc:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            whole = len(data) - len(data) % 4
            fds += [int.from_bytes(data[i : i + 4], sys.byteorder) for i in range(0, whole, 4)]
    return msg, fds


def _imports(tree):
    """Module names the script imports at module level (not inside functions or classes)."""
    names = []
    todo = list(tree.body)
    while todo:
        node = todo.pop(0)
        kind = type(node).__name__
        if kind == "Import":
            names += [alias.name for alias in node.names]
        elif kind == "ImportFrom":
            if not node.level and node.module and node.module != "__future__":
                names.append((node.module, [a.name for a in node.names if a.name != "*"]))
        elif kind not in ("FunctionDef", "AsyncFunctionDef", "ClassDef", "Lambda"):
            for scope in _SCOPES:
                for item in getattr(node, scope, ()) or ():
                    if type(item).__name__ == "ExceptHandler":
                        todo += item.body
                    elif hasattr(item, "lineno"):
                        todo.append(item)
            for case in getattr(node, "cases", ()) or ():  # match statements
                todo += case.body
    return names


def _make_stdio(stdio, socket_fds):
    """sys.stdin/stdout/stderr for the children, made once, here, on fds 0, 1, 2 as CPython's
    create_stdio() makes them at start-up (Python/pylifecycle.c): same encodings and errors,
    stdin buffered, stdout and stderr unbuffered under -u, line buffering only on a tty
    (stderr: always), no closefd. Each child takes its pristine copy instead of building its
    own: building them touched (and so copied) 113 of the zygote's pages per connection.

    What the objects learn from their fd at creation (fstat's block size, seekable, isatty)
    must be what they would learn in a child: fds 0 and 1 are a socket there (the connection,
    or a UDP child's socketpair), and so is 2 with `stderr: socket` (``socket_fds``), so a
    socket stands on those fds while they are made; fd 2 is otherwise the service's stderr
    target of the same kind as a child's (the log socket, /dev/null, the file)."""
    import io

    ours, peer = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
    saved = {fd: os.dup(fd) for fd in socket_fds}
    try:
        for fd in socket_fds:
            os.dup2(ours.fileno(), fd)
        unbuffered = stdio[1][2]
        made = []
        for fd, name, (encoding, errors, _wt) in zip(
            (0, 1, 2), ("stdin", "stdout", "stderr"), stdio, strict=True
        ):
            write = fd != 0
            buffering = 0 if unbuffered and write else -1
            buf = io.open(fd, "wb" if write else "rb", buffering, None, None, None, False)
            raw = buf if buffering == 0 else buf.raw
            raw.name = f"<{name}>"
            tty = raw.isatty()
            stream = io.TextIOWrapper(
                buf, encoding, errors, "\n", not unbuffered and (tty or fd == 2), unbuffered
            )
            stream.mode = "w" if write else "r"
            made.append(stream)
    finally:
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        ours.close()
        peer.close()
    return made


def _std_streams():
    return (sys.stdin, sys.stdout, sys.stderr)


def _new_main():
    """The script's __main__, made in the zygote (each child made its own: 25 pages): its
    names in the order a cold start makes them (pylifecycle.c, pythonrun.c)."""
    main = type(sys)("__main__")
    main.__annotations__ = {}
    main.__builtins__ = sys.modules["builtins"]
    main.__file__ = _file
    main.__cached__ = None
    main.__loader__ = _loader
    return main


def _flush_std():
    """CPython's flush_std_files(): a failed flush of stdout makes the exit status 120."""
    status = 0
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name, None)
        if stream is None or getattr(stream, "closed", True):
            continue
        try:
            stream.flush()
        except BaseException:
            if name == "stdout":
                sys.unraisablehook(_unraisable(sys.exc_info()[1], stream))
                status = 120
    return status


def _unraisable(exc, obj):
    import types

    return types.SimpleNamespace(
        exc_type=type(exc), exc_value=exc, exc_traceback=exc.__traceback__, err_msg=None, object=obj
    )


def _exit_code(exc):
    """SystemExit's code as the interpreter's exit status (_Py_HandleSystemExit)."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        sys.stderr.write(str(code) + "\n")
        sys.stderr.flush()
    except BaseException:
        pass
    return 1


def _run_child():
    """In the forked child, where _serve_c has put the connection (or UDP socketpair end) on
    fds 0 and 1, the service's stderr target on 2, closed the channel, called setsid() and
    added the connection's variables to the environment: become `python script args` for
    this connection; never returns."""
    # (_ctl's fd is closed: the object is never freed, so never closes what reuses the number)
    # The zygote's own environment (what pyinetd gave it, as a launcher such as a pyenv shim
    # changed it, as at a cold start) with the connection's variables: _serve_c added them.
    # sys.argv, sys.orig_argv, the std streams, __main__ and the GC's state are the child's
    # already: the zygote set them before its first fork (_become_the_script).
    main = _main
    status = 0
    interrupted = False
    try:
        try:
            exec(_code, main.__dict__)
        except SystemExit as exc:
            status = _exit_code(exc)
        except BaseException as exc:
            # The traceback as a cold start prints it: from the script's own frame down.
            tb = exc.__traceback__
            tb = tb.tb_next if tb is not None else tb
            exc.__traceback__ = tb
            sys.last_type, sys.last_value, sys.last_traceback = type(exc), exc, tb
            interrupted = isinstance(exc, KeyboardInterrupt)
            try:
                sys.excepthook(type(exc), exc, tb)
            except BaseException:
                pass
            status = 1
        del main
        status = _finalize(status)
    except SystemExit as exc:  # sys.exit() in an atexit handler or a thread's end
        status = _exit_code(exc)
    except BaseException:
        status = 1
    if interrupted:
        # CPython ends with SIGINT itself after an uncaught KeyboardInterrupt (bpo-1054041)
        import signal

        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(status)


def _finalize(status):
    """Py_FinalizeEx's order: non-daemon threads joined, atexit handlers, std streams flushed;
    then the script's globals cleared (so that files it left open are flushed and closed by
    their finalizers, as at interpreter exit), std streams flushed again."""
    threading = sys.modules.get("threading")
    if threading is not None:
        try:
            threading._shutdown()
        except BaseException as exc:
            sys.unraisablehook(_unraisable(exc, threading._shutdown))
    atexit = sys.modules.get("atexit")  # (no handler without it; importing it costs)
    if atexit is not None:
        atexit._run_exitfuncs()
    if _flush_std():
        status = 120
    main = sys.modules.get("__main__")
    if main is not None:
        d = main.__dict__
        for key in [k for k in d if k.startswith("_") and not k.startswith("__")]:
            d[key] = None
        for key in [k for k in d if k != "__builtins__"]:
            d[key] = None
    gc.collect()
    if _flush_std():
        status = 120
    return status


def _serve():
    # returns True in each child; in the zygote only at the end
    if not _serve_c(_CTL, _environ_data):
        os._exit(0)
    try:  # a child never goes back to the zygote's loop, whatever fails
        _run_child()
    finally:
        os._exit(1)


def _load_spawn(fd):
    """pyinetd's C module, from the fd pyinetd opened on it (the service's user may not be
    allowed to open its path); through _imp, as ExtensionFileLoader does, without importing
    importlib.util and what it imports."""
    import _imp

    spec = sys.modules["_frozen_importlib"].ModuleSpec("_spawn", None, origin=f"/proc/self/fd/{fd}")
    module = _imp.create_dynamic(spec)
    os.close(fd)
    return module


def _out_of_reach(spawn):
    """Not dumpable, first: then no process of this user can ptrace this one, take its fds
    (pidfd_getfd: the channel, the connections) or write its memory (/proc/PID/mem), which
    would give it every later connection (the kernel judges all three on the target's flag;
    nothing here changes ids again, which would reset it). Until now the capability pyinetd
    started it with kept them out (spawn.zygote_guarded); it is dropped now, before any code
    of the service's runs here, so that no child has it. The children make themselves
    dumpable again once they have closed the channel (_spawn.serve)."""
    spawn.prctl(4, 0)  # PR_SET_DUMPABLE
    if _setup.get("guarded"):
        spawn.capset(0, 0, 0)


def _start():
    global _setup, _file, _code, _loader, _serve_c, _stdio, _gc_was_enabled, _environ_data
    _gc_was_enabled = gc.isenabled()
    gc.disable()  # no holes in pages the children share (gc.freeze's documentation)
    msg, fds = _recv_fds(1 << 20)
    _setup = marshal.loads(msg)
    if len(fds) != 1:
        _fail("no C module fd")
    try:
        spawn = _load_spawn(fds[0])
        _serve_c = spawn.serve
    except Exception as exc:
        _fail(
            f"cannot load pyinetd's C module into {sys.executable} {sys.version.split()[0]}: {exc}"
        )
    try:
        _out_of_reach(spawn)
    except Exception as exc:
        _fail(f"cannot make the zygote undumpable: {exc}")
    script = _setup["script"]
    # __file__ and code filenames: the script's path made absolute without resolving links,
    # as CPython 3.9+ does (_Py_abspath: the working folder joined with the path as given)
    _file = script if script.startswith("/") else os.getcwd() + "/" + script
    if not (sys.flags.isolated or getattr(sys.flags, "safe_path", False)):
        # sys.path[0]: the script's folder, links resolved, where -c put ''
        sys.path[0] = os.path.dirname(os.path.realpath(script))
    try:
        with open(script, "rb") as f:
            source = f.read()
        tree = compile(source, _file, "exec", _PyCF_ONLY_AST, dont_inherit=True)
        _code = compile(source, _file, "exec", dont_inherit=True)
    except (OSError, SyntaxError, ValueError) as exc:
        _fail(f"cannot compile {script}: {exc!r}")
    for name in _imports(tree):
        try:  # failures are the script's to meet, at its own run, as a cold start would
            if isinstance(name, tuple):
                __import__(name[0], fromlist=name[1])
            else:
                __import__(name)
        except BaseException:  # (SystemExit too: a module that exits at import)
            pass
    for name in _setup["preload"]:
        try:
            __import__(name)
        except BaseException as exc:
            _fail(f"preload {name!r}: {type(exc).__name__}: {exc}")
    # the dict behind os.environ and os.environb (bytes -> bytes on POSIX), which _serve_c
    # updates in each child
    _environ_data = getattr(os.environ, "_data", None)
    if type(_environ_data) is not dict or _environ_data is not getattr(os.environb, "_data", 0):
        _fail("os.environ is not CPython's (a dict of bytes shared with os.environb)")
    _loader = sys.modules["_frozen_importlib_external"].SourceFileLoader("__main__", _file)
    try:  # (pyinetd counts them too, from outside: a sandbox may hide /proc)
        threads = len(os.listdir("/proc/self/task"))
    except OSError:
        threads = 1
    if threads > 1:
        _fail(f"{threads} threads after the imports: forking then is unsafe")
    _stdio = _make_stdio(
        [(s.encoding, s.errors, getattr(s, "write_through", False)) for s in _std_streams()],
        (0, 1, 2) if _setup.get("stderr_socket") else (0, 1),
    )
    for stream in _std_streams():
        try:  # (a module that printed at import: to /dev/null, or to a closed pipe)
            stream.flush()
        except OSError:
            pass
    _become_the_script()
    gc.collect()
    gc.freeze()  # the children's collections never touch (and copy) these objects' pages
    if _gc_was_enabled:
        gc.enable()  # (the zygote allocates nothing more in Python: its loop is C)
    _send(b"K")
    _serve()


def _become_the_script():
    """What each child would set is set once, here, before the first fork: sys.argv and
    sys.orig_argv as the cold start's, the std streams made for the children, the script's
    __main__ (the zygote runs nothing in Python after this but its C loop, and writes its
    errors to the same fd 2). Every assignment a child made wrote the sys module's and its
    objects' pages: about 30 copies per connection. What they replace is kept alive: freed,
    the zygote's own streams would run their finalizers."""
    global _kept, _main
    _main = _new_main()
    _kept = (
        sys.stdin, sys.stdout, sys.stderr, sys.__stdin__, sys.__stdout__, sys.__stderr__,
        sys.argv, sys.orig_argv, sys.modules.get("__main__"),
    )  # fmt: skip
    sys.argv = list(_setup["argv"])
    sys.orig_argv = list(_setup["orig_argv"])
    sys.stdin, sys.stdout, sys.stderr = sys.__stdin__, sys.__stdout__, sys.__stderr__ = _stdio
    sys.modules["__main__"] = _main


_ctl = _socket.socket(fileno=_CTL)
try:
    _start()
except Exception as exc:  # said once, and the service runs cold, instead of a restart loop
    _fail(f"{type(exc).__name__}: {exc}")
