"""Which Python a warm service's script runs under, read from its command line or shebang.

Pure: text in, a ``PythonCommand`` (or a ValueError saying why the service cannot be served
warm) out, so config.py can refuse ``warm: true`` at load with the reason, and zygote.py can
start the interpreter the script would have run under with the same options.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

# CPython's launcher names (python, python3, python3.11, python3.13t). PyPy and others do not
# load pyinetd's C module, which makes each connection's process pyinetd's child.
_PYTHON = re.compile(r"python(\d+(\.\d+)?t?)?")
# Options that set sys.flags, sys.warnoptions or sys._xoptions: the zygote is started with them,
# so it has exactly the flags the script would have had.
_FLAG_LETTERS = frozenset("bBdEIOPqRsSuv")
_WITH_ARGUMENT = frozenset("WX")
# What cannot run as "compile the script once, run it per connection": a module (-m), a command
# (-c), stdin (-), an interactive prompt after the script (-i), a source whose first line is to
# be skipped (-x), and anything that prints and exits.
_REFUSED = {
    "c": "-c runs a command, not a script",
    "m": "-m runs a module, not a script",
    "i": "-i starts an interactive prompt after the script",
    "x": "-x skips the script's first line",
    "h": "-h only prints help",
    "V": "-V only prints the version",
}


@dataclass(frozen=True)
class PythonCommand:
    """How a cold start runs the script, split into what a zygote needs."""

    interpreter: str  # a path, or a bare name to look up on the service's PATH (env shebang)
    options: tuple[str, ...]  # the interpreter's options, before the script
    script: str  # the script as the interpreter is given it: sys.argv[0]
    args: tuple[str, ...]  # sys.argv[1:]
    orig_argv: tuple[str, ...]  # sys.orig_argv of a cold start
    # `#!/usr/bin/env python3`: that env, which finds the interpreter on the service's PATH as
    # the service's user (directories that user may not search are skipped), as a cold start
    launcher: str = ""

    def interpreter_argv(self) -> list[str]:
        """The interpreter and its options, as the zygote is started with them ("--" left
        out: it would end the options before the zygote's own -c)."""
        opts = [o for o in self.options if o != "--"]
        return [*([self.launcher] if self.launcher else []), self.interpreter, *opts]


def is_python(program: str) -> bool:
    """Whether ``program`` (a path or a name) is a CPython interpreter by its name."""
    return _PYTHON.fullmatch(os.path.basename(program)) is not None


def parse_options(words: list[str]) -> tuple[tuple[str, ...], int]:
    """Python's own options at the start of ``words``: (the options, index of the script).
    Raises ValueError for an option a warm service cannot honour, or no script."""
    out: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word == "--":
            i += 1
            break
        if word == "-" or not word.startswith("-"):
            if word == "-":
                raise ValueError("the script is read from stdin (-)")
            break
        if word.startswith("--"):
            if word == "--check-hash-based-pycs" and i + 1 < len(words):
                out += [word, words[i + 1]]
                i += 2
                continue
            raise ValueError(f"python option {word!r} is not supported warm")
        j = 1
        while j < len(word):
            letter = word[j]
            if letter in _REFUSED:
                raise ValueError(_REFUSED[letter])
            if letter in _WITH_ARGUMENT:
                value = word[j + 1 :]
                if not value:
                    i += 1
                    if i >= len(words):
                        raise ValueError(f"python option -{letter} needs an argument")
                    value = words[i]
                out.append(f"-{letter}{value}")
                break
            if letter not in _FLAG_LETTERS:
                raise ValueError(f"python option -{letter} is not supported warm")
            out.append(f"-{letter}")
            j += 1
        i += 1
    if i >= len(words):
        raise ValueError("no script to run")
    return tuple(out), i


def from_argv(argv: tuple[str, ...] | list[str]) -> PythonCommand:
    """``exec: [python3, options..., script.py, args...]``."""
    options, at = parse_options(list(argv[1:]))
    script = argv[1 + at]
    return PythonCommand(argv[0], options, script, tuple(argv[2 + at :]), tuple(argv))


def from_shebang(argv: tuple[str, ...] | list[str], first_line: bytes) -> PythonCommand:
    """``exec: [script.py, args...]`` with a ``#!`` line, split as Linux does: the interpreter
    up to the first blank, the rest (trimmed) as its one optional argument (binfmt_script)."""
    if not first_line.startswith(b"#!"):
        raise ValueError("not a Python script: no #! line")
    text = first_line[2:].split(b"\n", 1)[0].strip(b" \t\r").decode(errors="surrogateescape")
    interp, _, rest = text.replace("\t", " ").partition(" ")
    arg = rest.strip(" ")
    if os.path.basename(interp) == "env":
        # env NAME, or env -S "NAME OPTIONS" (env splits that one argument itself)
        words = arg[2:].split() if arg.startswith("-S") else ([arg] if arg else [])
        if not words or words[0].startswith("-") or (" " in arg and not arg.startswith("-S")):
            raise ValueError(f"not a Python script: #!{text}")
        name, opts = words[0], words[1:]
        cold = (name, *opts, *argv)
        launcher = interp
    else:
        name, opts = interp, ([arg] if arg else [])
        cold = (interp, *opts, *argv)
        launcher = ""
    if not is_python(name):
        raise ValueError(f"not a Python script: #!{text}")
    options, at = parse_options([*opts, argv[0]])
    if at != len(opts):
        raise ValueError(f"#!{text}: the options end before the script")
    return PythonCommand(name, options, argv[0], tuple(argv[1:]), cold, launcher)


def python_command(argv: tuple[str, ...] | list[str], first_line: bytes) -> PythonCommand:
    """The Python command behind a service's exec argv; ``first_line`` is the program's first
    line (only read when ``argv[0]`` is not itself a python). Raises ValueError."""
    if not argv:
        raise ValueError("no program")
    if is_python(argv[0]):
        return from_argv(argv)
    return from_shebang(argv, first_line)
