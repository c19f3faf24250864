"""Files pyinetd reads or runs as root must be root's (sshd's StrictModes), and are read bounded.

As root, the configuration, its included files and folders, a program a service runs as root
and a TLS key decide what runs as root: another local user who can change any of them, or any
folder above them, owns the machine (a drop-in in a mode 1777 include folder would run
`/usr/bin/id` as uid 0). So, as sshd does for authorized_keys (auth.c, safe_path()):

- the file is opened once and the *opened* file is checked (fstat), never a second lookup of
  its name that an attacker could race;
- it and every folder above it, up to /, must be owned by root and not writable by group or
  others;
- a folder others may write is accepted only when it is sticky and root's (/tmp) and the entry
  below it is root's: no one else can then rename or remove that entry (unlink(2), EPERM);
- a TLS key must not be readable by others; group-readable only when the group is root's.

What runs as root is not only ``exec[0]``: an interpreter runs the script it is given
(``exec: [/bin/sh, /home/eve/evil.sh]``), ``/usr/bin/env NAME`` runs the NAME it
finds on PATH, a ``#!`` line names the interpreter the kernel runs. check_command() follows
each of these and checks every program and script on the way as it checks ``exec[0]``.

Only when pyinetd runs as root: a user running pyinetd for themselves trusts their own files.
Every file is opened non-blocking and must be a regular file: a FIFO or /dev/zero given as a
configuration must not hang or exhaust the loop.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import stat
from collections.abc import Callable, Sequence

__all__ = [
    "MAX_FILE_SIZE",
    "UntrustedError",
    "check_command",
    "check_folder",
    "check_program",
    "open_regular",
    "read_regular",
    "script_of",
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


def check_program(path: str | os.PathLike[str], what: str = "program run as root") -> None:
    """As root, refuse a program to run as root that is not root's (nor its folders)."""
    if not strict():
        return
    name = os.fspath(path)
    # O_PATH: a program need not be readable to be run, and nothing is read from it.
    fd = os.open(name, os.O_PATH | os.O_CLOEXEC)
    try:
        check_fd(fd, name, what)
    finally:
        os.close(fd)


# ------------------------------------------------------------- what an interpreter runs

_SHELLS = frozenset(("sh", "bash", "rbash", "dash", "zsh", "ksh", "ksh93", "mksh", "lksh", "pdksh",
                     "ash", "yash", "posh", "csh", "tcsh", "fish"))  # fmt: skip
_PERL = re.compile(r"perl(\d[\d.]*)?")
_RUBY = re.compile(r"ruby(\d[\d.]*)?")
_NODE = frozenset(("node", "nodejs"))
_PYTHON = re.compile(r"(python|pypy)(\d+(\.\d+)?t?)?")
# `#!` and env chains followed at most this deep (the kernel allows 4 levels of #!)
_MAX_HOPS = 8


def _next(words: Sequence[str], i: int) -> int:
    """Index after an option's separate argument at ``i + 1``."""
    return min(i + 2, len(words))


def _shell_script(words: Sequence[str]) -> tuple[str, bool] | None:
    """sh, bash, zsh, ...: the first word that is not an option; none with -c (a command
    string) or -s (stdin). -o/-O and bash's --rcfile/--init-file take the next word."""
    i = 0
    while i < len(words):
        word = words[i]
        if word in ("--", "-"):
            i += 1
            break
        if word.startswith("--"):
            i = _next(words, i) if word in ("--rcfile", "--init-file") else i + 1
            continue
        if word[:1] in ("-", "+") and len(word) > 1:
            letters = word[1:]
            if word[0] == "-" and ("c" in letters or "s" in letters):
                return None
            i += 1 + letters.count("o") + letters.count("O")
            continue
        break
    # bash and ksh look a name without a slash up on PATH when it is not in the folder
    return (words[i], True) if i < len(words) else None


# An interpreter's reading of one option word at ``i``: None when the option makes it run no
# script file (code on the command line, help, version), else the index after the option (and
# its separate argument) and whether the option makes it look the script up on PATH.
_Option = Callable[[Sequence[str], int], tuple[int, bool] | None]


def _script_after(words: Sequence[str], option: _Option) -> tuple[str, bool] | None:
    """The script an interpreter runs: the word after ``--`` or the first that is not an
    option; none where it reads stdin (``-``) or an option says so."""
    i, search = 0, False
    while i < len(words):
        word = words[i]
        if word == "--":
            i += 1
            break
        if word == "-":
            return None
        if not word.startswith("-"):
            break
        read = option(words, i)
        if read is None:
            return None
        i, looked_up = read
        search = search or looked_up
    return (words[i], search) if i < len(words) else None


def _perl_option(words: Sequence[str], i: int) -> tuple[int, bool] | None:
    word = words[i]
    j, step, search = 1, 1, False
    while j < len(word):
        letter = word[j]
        if letter in "eE":
            return None
        if letter == "S":
            search = True
        if letter in "0l":  # -0[octal/hex digits], -l[octal digits]
            j += 1
            while j < len(word) and word[j] in "0123456789abcdefABCDEFx":
                j += 1
            continue
        if letter in "CdDFiIMmxV":  # the rest of the word is the option's argument
            if letter == "I" and j + 1 == len(word):
                step = 2  # -I DIR
            break
        j += 1
    return i + step, search


def _perl_script(words: Sequence[str]) -> tuple[str, bool] | None:
    """perl: none with -e/-E (code) or - (stdin); -S looks the script up on PATH."""
    return _script_after(words, _perl_option)


def _ruby_option(words: Sequence[str], i: int) -> tuple[int, bool] | None:
    word = words[i]
    if word.startswith("--"):
        if word in ("--version", "--help"):
            return None
        separate = ("--enable", "--disable", "--encoding", "--external-encoding",
                    "--internal-encoding", "--dump")  # fmt: skip
        return (_next(words, i) if word in separate else i + 1), False
    j, step, search = 1, 1, False
    while j < len(word):
        letter = word[j]
        if letter == "e":
            return None
        if letter == "S":
            search = True
        if letter in "CIrE":  # an argument, attached or the next word
            step = 2 if j + 1 == len(word) else 1
            break
        if letter in "x0iWTFK":  # an optional argument, attached
            break
        j += 1
    return i + step, search


def _ruby_script(words: Sequence[str]) -> tuple[str, bool] | None:
    """ruby: none with -e (code) or - (stdin); -S looks the script up on PATH."""
    return _script_after(words, _ruby_option)


_NODE_SEPARATE = frozenset(("-r", "--require", "--import", "--loader", "--experimental-loader",
                            "-C", "--conditions", "--input-type", "--title", "--env-file",
                            "--inspect-port", "--redirect-warnings", "--watch-path"))  # fmt: skip


def _node_option(words: Sequence[str], i: int) -> tuple[int, bool] | None:
    word = words[i]
    if word in ("-e", "--eval", "-p", "--print", "-pe", "-ep", "-i"):
        return None
    return (_next(words, i) if word in _NODE_SEPARATE else i + 1), False


def _node_script(words: Sequence[str]) -> tuple[str, bool] | None:
    """node: none with -e/--eval, -p/--print (code) or - (stdin)."""
    return _script_after(words, _node_option)


def _python_option(words: Sequence[str], i: int) -> tuple[int, bool] | None:
    word = words[i]
    if word.startswith("--"):
        if word in ("--help", "--version", "--help-all", "--help-env", "--help-xoptions"):
            return None
        return (_next(words, i) if word == "--check-hash-based-pycs" else i + 1), False
    step = 1
    for j, letter in enumerate(word[1:], 1):
        if letter in "cm":
            return None
        if letter in "hV" and len(word) == 2:
            return None
        if letter in "WX":
            step = 2 if j + 1 == len(word) else 1
            break
    return i + step, False


def _python_script(words: Sequence[str]) -> tuple[str, bool] | None:
    """python: none with -c (a command), -m (a module: found on the interpreter's sys.path
    when it runs, not a file known at load; a warm service cannot run one) or - (stdin)."""
    return _script_after(words, _python_option)


def _interpreter(name: str) -> str:
    """Which of the interpreters known here ``name`` (a program's base name) is, or ""."""
    if name in _SHELLS:
        return "shell"
    if _PERL.fullmatch(name):
        return "perl"
    if _RUBY.fullmatch(name):
        return "ruby"
    if name in _NODE:
        return "node"
    if _PYTHON.fullmatch(name):
        return "python"
    return ""


_SCRIPT_OF = {
    "shell": _shell_script,
    "perl": _perl_script,
    "ruby": _ruby_script,
    "node": _node_script,
    "python": _python_script,
}


def script_of(argv: Sequence[str]) -> tuple[str, bool] | None:
    """The script an interpreter's command line runs: (the word, whether a name without a
    slash is looked up on PATH when not found), or None when it runs no script file (-c,
    -e, stdin, a module) or the program is no interpreter known here. Pure."""
    kind = _interpreter(os.path.basename(argv[0])) if argv else ""
    return _SCRIPT_OF[kind](argv[1:]) if kind else None


def env_target(
    words: Sequence[str], search: str, cwd: str
) -> tuple[str, list[str], str, str] | None:
    """``env [OPTION]... [NAME=VALUE]... NAME [ARG]...`` (GNU env: -i, -u, -C, -S, --):
    (NAME, [ARG...], the PATH env looks NAME up on, the folder it runs in); None without
    a NAME. Pure."""
    todo, cleared = list(words), False
    while todo:
        word = todo[0]
        if word == "--":
            todo.pop(0)
            break
        if word == "-":
            todo.pop(0)
            cleared = True
            continue
        if not word.startswith("-"):
            break
        todo.pop(0)
        if word.startswith("--"):
            name, eq, value = word.partition("=")
            if name in ("--unset", "--chdir", "--split-string") and not eq:
                value = todo.pop(0) if todo else ""
            if name == "--ignore-environment":
                cleared = True
            elif name == "--chdir":
                cwd = os.path.join(cwd, value)
            elif name == "--split-string":
                todo[:0] = shlex.split(value)
            continue
        for j, letter in enumerate(word[1:], 1):
            if letter == "i":
                cleared = True
            if letter in "uCS":
                value = word[j + 1 :] or (todo.pop(0) if todo else "")
                if letter == "C":
                    cwd = os.path.join(cwd, value)
                elif letter == "S":
                    todo[:0] = shlex.split(value)
                break
    path = None
    while todo and "=" in todo[0]:
        key, _, value = todo.pop(0).partition("=")
        if key == "PATH":
            path = value
    if not todo:
        return None
    if path is None:
        # env execs with execvp: the PATH of the environment it made (the C library's
        # default when it has none)
        path = "/bin:/usr/bin" if cleared else search
    return todo[0], todo[1:], path, cwd


def _find(word: str, cwd: str, search: str | None) -> str | None:
    """``word`` as a program or script path: relative to ``cwd``; a bare name not there is
    looked up on ``search`` when given."""
    path = os.path.join(cwd, word)
    if os.path.lexists(path) or "/" in word or search is None:
        return path
    import shutil  # lazily: it imports bz2 and lzma, ~1 MiB of the parent

    return shutil.which(word, path=search)


def _shebang(path: str) -> list[str]:
    """The interpreter and its one optional argument of a ``#!`` line, as Linux splits it
    (binfmt_script); [] when there is none. ``path`` has passed check_program: root's, in
    root's folders, so no one else can swap it; opened non-blocking, a regular file only."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return []  # not readable: the kernel cannot read a #! either
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return []
        head = os.pread(fd, 256, 0)
    finally:
        os.close(fd)
    if not head.startswith(b"#!"):
        return []
    text = os.fsdecode(head[2:].split(b"\n", 1)[0].replace(b"\t", b" ").strip(b" \r"))
    interp, _, arg = text.partition(" ")
    arg = arg.strip(" ")
    return [interp, arg] if arg else [interp] if interp else []


def _check_script(path: str) -> None:
    """The script file itself (and a Python folder's or zip's __main__.py) like a program; a
    script that is not there yet must be in a folder only root may write (or no one else
    could put one there). UntrustedError names the path."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        try:
            check_folder(os.path.dirname(path) or ".", "folder of a script run as root")
        except OSError as exc:
            raise UntrustedError(f"{path}: {exc.strerror or exc}") from None
        return
    except OSError as exc:
        raise UntrustedError(f"{path}: {exc.strerror or exc}") from None
    try:
        check_fd(fd, path, "script run as root")
    finally:
        os.close(fd)
    main = os.path.join(path, "__main__.py")
    if os.path.isdir(path) and os.path.lexists(main):
        check_program(main, "script run as root")


def _check_found(path: str) -> None:
    """check_program for a program found on the way (not exec[0]): UntrustedError names it."""
    try:
        check_program(path)
    except OSError as exc:
        raise UntrustedError(f"{path}: {exc.strerror or exc}") from None


def check_command(argv: Sequence[str], search: str, cwd: str, argv0: str | None = None) -> None:
    """As root, refuse a command line whose program, or anything it runs on the way, is not
    root's (nor its folders): ``exec[0]``, the interpreter of its ``#!``, the NAME that
    ``env`` runs (looked up on ``search``, the service's PATH) and the script an interpreter
    (a shell, perl, ruby, node, python) is given, relative to ``cwd``, the service's folder.
    ``argv0``: the name the program is run under, when it is not ``argv[0]`` (busybox).

    UntrustedError names the path; OSError when ``argv[0]`` cannot be opened."""
    if not strict() or not argv:
        return
    words = list(argv)
    check_program(words[0])
    name = argv0 or words[0]
    for _ in range(_MAX_HOPS):
        if os.path.basename(name) == "env":
            target = env_target(words[1:], search, cwd)
            if target is None:
                return
            wanted, rest, path, cwd = target
            found = _find(wanted, cwd, path if "/" not in wanted else None)
            if found is None:
                return  # env finds nothing to run: nothing runs
            _check_found(found)
            words, name = [found, *rest], wanted
            continue
        # By the name it is run under: a `python3` on PATH that is a wrapper script (a
        # pyenv shim) still runs the script it is given.
        script = script_of([name, *words[1:]])
        if script is not None:
            word, look_up = script
            found = _find(word, cwd, search if look_up else None)
            if found is not None:
                _check_script(found)
        interp = _shebang(words[0])
        if not interp:
            return
        # the kernel runs `INTERP [ARG] PROGRAM ARGS...`
        words = [*interp, *words]
        name = words[0]
        _check_found(words[0])
