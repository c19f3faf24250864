"""The pyinetd(1) man page from the argparse parser.

Run: python scripts/gen_manpage.py > contrib/pyinetd.1 (tests/test_schema.py checks it is current).

Own generator rather than argparse-manpage: that one reflows the YAML example of the description
(no .nf) and stamps the build date, so the committed page would change on every run.
"""

from __future__ import annotations

import argparse
import sys

from pyinetd import __version__
from pyinetd.cli import EXIT_CONFIG, EXIT_OK, EXIT_RUNTIME, build_parser


def esc(text: str) -> str:
    """Text safe for roff: backslashes, hyphens (as minus signs) and leading control characters."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line[:1] in (".", "'") else line for line in text.split("\n"))


def paragraphs(text: str) -> list[str]:
    """Description text as roff: indented blocks verbatim (.nf), the rest as filled paragraphs."""
    out: list[str] = []
    for block in text.strip("\n").split("\n\n"):
        lines = block.split("\n")
        if all(line.startswith(" ") or not line for line in lines):
            out += [".PP", ".RS 4", ".nf", esc("\n".join(lines)), ".fi", ".RE"]
        else:
            out += [".PP", esc(" ".join(line.strip() for line in lines))]
    return out


def option_label(action: argparse.Action) -> str:
    names = ", ".join(f"\\fB{esc(s)}\\fR" for s in action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar or (
        "{" + ",".join(action.choices) + "}" if action.choices else action.dest.upper()
    )
    return f"{names} \\fI{esc(str(metavar))}\\fR"


def render(parser: argparse.ArgumentParser) -> str:
    """The whole man page."""
    usage = " ".join(parser.format_usage().removeprefix("usage: ").split())
    lines = [
        f'.TH PYINETD 1 "" "pyinetd {__version__}" "User Commands"',
        ".SH NAME",
        "pyinetd \\- an inetd\\-style super\\-server",
        ".SH SYNOPSIS",
        esc(usage),
        ".SH DESCRIPTION",
        *paragraphs(parser.description or ""),
        ".SH ARGUMENTS",
    ]
    for action in parser._actions:  # argparse has no public list of its actions
        if not action.option_strings:
            lines += [".TP", f"\\fI{esc(action.dest)}\\fR", esc(action.help or "")]
    lines.append(".SH OPTIONS")
    for action in parser._actions:
        if action.option_strings:
            text = action.help or ""
            shown = action.default not in (None, False, argparse.SUPPRESS) and action.nargs != 0
            if shown and "default" not in text:
                text += f" (default: {action.default})"
            lines += [".TP", option_label(action), esc(text.strip())]
    lines += [
        ".SH CONFIGURATION",
        esc(
            "pyinetd --schema prints the JSON Schema of the configuration file; editors that "
            "speak the YAML language server protocol use it when the file's first line is "
            "'# yaml-language-server: $schema=PATH/schema.json'. "
            "pyinetd -c FILE --print-config prints the configuration as pyinetd reads it: "
            "defaults applied, paths absolute, included files merged."
        ),
        ".SH EXIT STATUS",
        ".TP",
        str(EXIT_OK),
        "success",
        ".TP",
        str(EXIT_CONFIG),
        "the configuration is not valid (every error is printed, one per line)",
        ".TP",
        str(EXIT_RUNTIME),
        "a failure at start, such as a port already in use",
        ".SH SEE ALSO",
        "\\fBinetd\\fR(8), \\fBxinetd\\fR(8), \\fBsystemd.socket\\fR(5)",
    ]
    if parser.epilog:
        lines += [".PP", esc(parser.epilog)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render(build_parser()))
