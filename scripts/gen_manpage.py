"""The man pages pyinetd(8) and pyinetd.yaml(5), from the declarations they document.

    python scripts/gen_manpage.py          # writes contrib/pyinetd.8 and contrib/pyinetd.yaml.5
    python scripts/gen_manpage.py --check  # exit 1 if either shipped page is out of date

pyinetd(8) comes from the argparse parser (options, arguments, exit codes) plus the sections a
daemon's page needs (commands, signals, files, environment); pyinetd.yaml(5) comes from the JSON
Schema (src/pyinetd/schema.json), the one list of every configuration key with its description,
default, accepted values and examples, built from the key declarations (src/pyinetd/config/keys.py).
tests/test_packaging.py checks both are current.

Own generator rather than argparse-manpage: that one reflows the YAML example of the description
(no .nf) and stamps the build date, so the committed page would change on every run.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pyinetd import __version__
from pyinetd.cli import COMMANDS, EXIT_CONFIG, EXIT_OK, EXIT_RUNTIME, build_parser
from pyinetd.config.schema import build_schema
from pyinetd.spawn import PRIMITIVES

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"


def esc(text: str) -> str:
    """Text safe for roff: backslashes, hyphens (as minus signs) and leading control characters."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line[:1] in (".", "'") else line for line in text.split("\n"))


def prose(text: str) -> str:
    """Escaped text with `code` spans in bold and name(N) references in bold."""
    out = esc(text)
    out = re.sub(r"`([^`]+)`", r"\\fB\1\\fR", out)
    return re.sub(r"\b([a-z_][\w.]*)\((\d)\)", r"\\fB\1\\fR(\2)", out)


def paragraphs(text: str) -> list[str]:
    """Description text as roff: indented blocks verbatim (.nf), the rest as filled paragraphs."""
    out: list[str] = []
    for block in text.strip("\n").split("\n\n"):
        lines = block.split("\n")
        if all(line.startswith(" ") or not line for line in lines):
            out += [".PP", ".RS 4", ".nf", esc("\n".join(lines)), ".fi", ".RE"]
        else:
            out += [".PP", prose(" ".join(line.strip() for line in lines))]
    return out


def option_label(action: argparse.Action) -> str:
    names = ", ".join(f"\\fB{esc(s)}\\fR" for s in action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar or (
        "{" + ",".join(action.choices) + "}" if action.choices else action.dest.upper()
    )
    return f"{names} \\fI{esc(str(metavar))}\\fR"


def definitions(items: list[tuple[str, str]]) -> list[str]:
    """A .TP list: each term in bold, then its text."""
    out: list[str] = []
    for term, text in items:
        out += [".TP", f"\\fB{esc(term)}\\fR", prose(text)]
    return out


# What pyinetd(8) says beyond the parser (the commands come from cli.COMMANDS). Each list is the
# one place the page takes it from; the facts behind them live in server.py (signals), control.py
# (socket paths) and systemd.py.
SIGNALS = [
    (
        "SIGTERM, SIGINT",
        "Stop listening, then exit 0: at once (shutdown: leave, the default, "
        "which lets running service processes finish on their own) or once the running "
        "connections are over (shutdown: drain, at most drain_timeout; then they get SIGTERM, "
        "and SIGKILL soon after). With agent: and shutdown: drain, the agent first answers "
        "drain for agent_drain_time while pyinetd still accepts. The same signal a second "
        "time stops at once.",
    ),
    (
        "SIGHUP",
        "Reload the configuration: the new file is read and checked completely, and its "
        "ports bound, before anything changes; a bad file or a port in use keeps the old "
        "configuration serving and is logged. Services that keep their listen addresses keep "
        "their sockets, so no connection is refused during a reload.",
    ),
    ("SIGUSR1", "Write the status table (as `pyinetd status`) to the log."),
    (
        "SIGUSR2",
        "Upgrade, as `pyinetd upgrade`: probe the pyinetd now installed, then exec it in "
        "place (the same pid and listening sockets, the running children kept and counted); "
        "a failed probe is logged and the running program keeps serving.",
    ),
    ("SIGCHLD", "Handled: service processes are reaped as they exit."),
]

FILES = [
    (
        "./inetd.yaml",
        "The configuration read when -c is not given: relative to the current "
        "folder. See pyinetd.yaml(5).",
    ),
    ("/etc/pyinetd/inetd.yaml", "The configuration contrib/pyinetd.service runs."),
    (
        "$XDG_RUNTIME_DIR/pyinetd-HASH.sock, /run/pyinetd/pyinetd-HASH.sock, "
        "/tmp/pyinetd-UID/pyinetd-HASH.sock",
        "The control socket that status, reload and stop talk to, mode 0600: in the first of "
        "these folders that applies (XDG_RUNTIME_DIR when set, /run/pyinetd for root), named "
        "after the configuration file's absolute path, so instances with different files do not "
        "meet. control_socket in the configuration, or --control, names another.",
    ),
    (
        "/dev/log",
        "The local syslog socket --syslog writes to; pyinetd refuses to start with "
        "--syslog when it cannot connect to it.",
    ),
]

ENVIRONMENT = [
    (
        "NOTIFY_SOCKET",
        "sd_notify(3): pyinetd sends READY=1 once it listens, RELOADING=1 and "
        "READY=1 around a reload, STOPPING=1 and a STATUS= line (Type=notify units).",
    ),
    (
        "WATCHDOG_USEC, WATCHDOG_PID",
        "systemd's WatchdogSec=: pyinetd sends WATCHDOG=1 every "
        "half interval from its event loop, so a stuck loop is restarted. Removed from the "
        "environment services see.",
    ),
    (
        "LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES",
        "Socket activation (sd_listen_fds(3)): each "
        "passed socket is adopted by the service whose listen address it has; the others are "
        "bound as usual. Removed from the environment services see.",
    ),
    ("XDG_RUNTIME_DIR", "Where the control socket lives by default (see FILES)."),
    (
        "JOURNAL_STREAM",
        "When set (stderr goes to the journal), log lines carry no time stamp: "
        "the journal adds its own.",
    ),
    (
        "PYINETD_SPAWN",
        f"Force a process start primitive ({', '.join(PRIMITIVES)}) where it "
        "works here: for tests and measurements.",
    ),
]

EXAMPLES = [
    ("pyinetd -c inetd.yaml", "Serve the shipped example in the foreground (loopback ports only)."),
    ("pyinetd -c /etc/pyinetd/inetd.yaml --check", "Validate a file before a reload."),
    ("pyinetd status --json -c /etc/pyinetd/inetd.yaml", "The running instance's state, as JSON."),
    (
        "pyinetd convert /etc/xinetd.conf > /etc/pyinetd/inetd.yaml",
        "Translate an xinetd configuration (with its includedir); warnings go to stderr.",
    ),
    (
        "man -l .venv/share/man/man8/pyinetd.8",
        "Read this page after a pip install into a virtual environment whose bin is not on "
        "PATH (man(1) finds pages from PATH; `. .venv/bin/activate` does the same).",
    ),
]

SEE_ALSO = (
    "\\fBpyinetd.yaml\\fR(5), \\fBinetd\\fR(8), \\fBxinetd\\fR(8), \\fBsystemd.service\\fR(5), "
    "\\fBsystemd.socket\\fR(5), \\fBsd_notify\\fR(3)"
)


def render(parser: argparse.ArgumentParser) -> str:
    """The whole pyinetd(8) page."""
    usage = " ".join(parser.format_usage().removeprefix("usage: ").split())
    lines = [
        f'.TH PYINETD 8 "" "pyinetd {__version__}" "System Administration"',
        ".SH NAME",
        "pyinetd \\- an inetd\\-style super\\-server",
        ".SH SYNOPSIS",
        esc(usage),
        ".SH DESCRIPTION",
        *paragraphs(parser.description or ""),
        ".PP",
        prose("Every configuration key is described in pyinetd.yaml(5)."),
        ".SH COMMANDS",
        *definitions([(c.name + (f" {c.args}" if c.args else ""), c.summary) for c in COMMANDS]),
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
            "defaults applied, paths absolute, included files merged; a duration in the "
            "largest unit of which it is a whole number ('5m', '90s', '250ms'), a rate as "
            "'100/min'. It loads back to the same configuration."
        ),
        ".SH SIGNALS",
        *definitions(SIGNALS),
        ".SH EXIT STATUS",
        ".TP",
        str(EXIT_OK),
        "success; after SIGTERM or SIGINT, a clean stop",
        ".TP",
        str(EXIT_CONFIG),
        "the configuration is not valid (every error is printed, one per line, naming the "
        "file, the key and the value); also a failed reload",
        ".TP",
        str(EXIT_RUNTIME),
        esc(
            "a failure at start, such as a port already in use or no syslog socket for "
            "--syslog; status, reload and stop could not reach the running instance"
        ),
        ".SH ENVIRONMENT",
        *definitions(ENVIRONMENT),
        ".SH FILES",
        *definitions(FILES),
        ".SH EXAMPLES",
        *definitions(EXAMPLES),
        ".SH SEE ALSO",
        SEE_ALSO,
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- pyinetd.yaml(5)


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """``node`` with a local $ref ("#/$defs/NAME") followed."""
    while "$ref" in node:
        name = node["$ref"].removeprefix("#/$defs/")
        node = schema["$defs"][name]
    return node


def _value_text(value: Any) -> str:
    """A default or example as the user writes it in YAML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, dict):  # YAML's flow form: {lines: 100/s, bytes: 64k/s}
        return "{" + ", ".join(f"{k}: {_value_text(v)}" for k, v in value.items()) + "}"
    return json.dumps(value, ensure_ascii=False)


def _key_entry(term: str, node: dict[str, Any]) -> list[str]:
    """One key: its name, what it means, what it takes, its default and examples."""
    text = node.get("description", "").strip()
    facts: list[str] = []
    expected = node.get("errorMessage", "")
    if expected.startswith("expected "):
        facts.append("Value: " + expected.removeprefix("expected ") + ".")
    if "default" in node:
        facts.append(f"Default: {_value_text(node['default'])}.")
    examples = node.get("examples", [])
    if examples and node.get("type") != "object" and "such as" not in expected:
        facts.append("Example: " + ", ".join(_value_text(e) for e in examples) + ".")
    out = [".TP", f"\\fB{esc(term)}\\fR", prose(text)]
    if facts:
        out += [".br", prose(" ".join(facts))]
    return out


def _keys(schema: dict[str, Any], props: dict[str, Any], prefix: str = "") -> Iterator[list[str]]:
    for name, raw in props.items():
        node = _resolve(schema, raw)
        yield _key_entry(prefix + name, node)
        if isinstance(node.get("properties"), dict):
            required = set(node.get("required", []))
            subs = {
                (f"{k} (required)" if k in required else k): v
                for k, v in node["properties"].items()
            }
            yield from _keys(schema, subs, prefix + name + ".")


EXAMPLE = """\
# yaml-language-server: $schema=/path/to/pyinetd/schema.json
max_children: 500
include: conf.d/*.yaml
defaults:
  timeout: 5m
services:
  echo:
    listen: 127.0.0.1:7007
    builtin: echo
  upper:
    listen: [127.0.0.1:7008, "[::1]:7008"]
    exec: [services/upper.py]
    user: nobody
    max_connections: 50
    rate: 100/min
    allow: [127.0.0.0/8, ::1]
"""


def render_config(schema: dict[str, Any]) -> str:
    """The whole pyinetd.yaml(5) page: every key of the schema, in declaration order."""
    top = dict(schema["properties"])
    services = top.pop("services")
    defaults = _resolve(schema, top.pop("defaults"))
    service = schema["$defs"]["service"]
    lines = [
        f'.TH PYINETD.YAML 5 "" "pyinetd {__version__}" "File Formats"',
        ".SH NAME",
        "pyinetd.yaml \\- the configuration file of pyinetd",
        ".SH SYNOPSIS",
        "\\fIinetd.yaml\\fR, \\fI/etc/pyinetd/inetd.yaml\\fR, or any \\fIFILE\\fR.yaml, "
        "\\fIFILE\\fR.toml given with \\fBpyinetd \\-c\\fR",
        ".SH DESCRIPTION",
        ".PP",
        prose(schema.get("description", "")),
        ".PP",
        prose(
            "A YAML mapping (or the same structure in TOML, when the file name ends in .toml) "
            "with a services mapping of service name to settings, optional defaults for every "
            "service, and the settings of pyinetd itself. Unknown keys are errors. Relative "
            "paths are relative to the folder of the file they are written in. "
            "`pyinetd -c FILE --check` checks a file and prints every error, naming the file, "
            "the key and the value; `pyinetd --schema` prints the JSON Schema this page is "
            "made from."
        ),
        ".SH TOP\\-LEVEL KEYS",
        *_key_entry("services", services),
        *_key_entry("defaults", defaults),
    ]
    for entry in _keys(schema, top):
        lines += entry
    lines += [
        ".SH SERVICE KEYS",
        ".PP",
        prose(
            "The settings of one service, under services.NAME. Every key but listen may also "
            "be given under defaults."
        ),
    ]
    for entry in _keys(schema, service["properties"]):
        lines += entry
    lines += [
        ".SH EXAMPLE",
        ".RS 4",
        ".nf",
        esc(EXAMPLE.rstrip("\n")),
        ".fi",
        ".RE",
        ".SH SEE ALSO",
        "\\fBpyinetd\\fR(8), \\fBinetd.conf\\fR(5), \\fBxinetd.conf\\fR(5)",
    ]
    return "\n".join(lines) + "\n"


def pages() -> dict[Path, str]:
    """Each shipped page's path and its current text."""
    return {
        CONTRIB / "pyinetd.8": render(build_parser()),
        CONTRIB / "pyinetd.yaml.5": render_config(build_schema()),
    }


def main(argv: list[str]) -> int:
    stale = [
        path for path, text in pages().items() if not path.is_file() or path.read_text() != text
    ]
    if "--check" in argv:
        for path in stale:
            print(f"{path}: out of date; run python scripts/gen_manpage.py", file=sys.stderr)
        return 1 if stale else 0
    for path, text in pages().items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
