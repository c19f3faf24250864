"""Command line: argv -> Config -> Server.run() -> exit code. Nothing else."""

from __future__ import annotations

import argparse
import json
import os
import pwd
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyinetd import __version__
from pyinetd.config import Config, ConfigError, load
from pyinetd.log import SYSLOG_SOCKET, setup_logging
from pyinetd.runtime.listeners import ListenError

EXIT_OK, EXIT_RUNTIME, EXIT_CONFIG = 0, 1, 2

DESCRIPTION = """\
pyinetd listens on the ports of the services in its configuration file and, for each
connection, starts the service's program with the connection on its stdin and stdout.

Configuration (YAML, or TOML when the file ends in .toml):

  services:
    echo:
      listen: 127.0.0.1:7007      # HOST:PORT, [V6]:PORT, PORT, a list; a path for unix
      protocol: tcp               # tcp | udp | unix
      builtin: echo               # echo | discard | chargen | daytime | time
    upper:
      listen: 7008
      exec: [services/upper.py]   # argv; relative to the config file's folder
      wait: false                 # true: the child gets the listening socket itself
"""


def _ensure_std_fds() -> None:
    """Open /dev/null on any of fds 0-2 that is closed, so no socket ever lands there."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


@dataclass(frozen=True)
class Command:
    """A command word: what it does (its --help and the man page's COMMANDS) and its options."""

    name: str
    args: str  # the positional words it takes, as usage shows them
    summary: str
    options: tuple[str, ...]


_LOGGING = ("log_level", "log_format", "syslog")
COMMANDS = (
    Command(
        "run",
        "",
        "The default: bind every enabled service's listening sockets, then serve in the "
        "foreground until SIGTERM or SIGINT. Logs go to stderr (or syslog with --syslog).",
        ("config", "pid_file", "control", "check", "print_config", "format", *_LOGGING),
    ),
    Command(
        "status",
        "",
        "Print the running instance's services, their states, counts and children, as a "
        "table or, with --json, as JSON. The instance is found through its control socket.",
        ("config", "control", "json"),
    ),
    Command(
        "reload",
        "",
        "Make the running instance re-read its configuration, as SIGHUP does, and print "
        f"the errors of a bad file (exit {EXIT_CONFIG}); a bad file changes nothing.",
        ("config", "control"),
    ),
    Command(
        "stop",
        "",
        "Stop the running instance, as SIGTERM does (with agent: and shutdown: drain, the "
        "agent answers drain for agent_drain_time before the listeners close).",
        ("config", "control"),
    ),
    Command(
        "drain",
        "[SERVICE]",
        "Drain SERVICE (every service without one): the agent-check (agent:) answers drain, "
        "so that HAProxy sends it no new connection, while pyinetd still serves the "
        "accepted connections, the running children and the new connections that come; "
        "status and /metrics show it. It lasts until undrain or the instance stops (then "
        "shutdown: drain waits up to drain_timeout for what runs).",
        ("config", "control"),
    ),
    Command(
        "undrain",
        "[SERVICE]",
        "End a drain of SERVICE (every service without one): the agent answers up again.",
        ("config", "control"),
    ),
    Command(
        "upgrade",
        "",
        "Replace the running instance by the pyinetd now installed, as SIGUSR2 does: the "
        "same pid, the same listening sockets, its children still counted and their ends "
        "logged. The new program is probed first (it imports, loads and checks the "
        f"configuration); if that fails the running one keeps serving (exit {EXIT_RUNTIME}).",
        ("config", "control"),
    ),
    Command(
        "convert",
        "FILE",
        "Print an inetd.conf(5) or xinetd.conf(5) file (following includedir) as "
        "pyinetd configuration, with a warning for each setting that has no equivalent.",
        ("format",),
    ),
    Command(
        "security",
        "",
        "Print one line per service: the user it runs as, what contains it (no_new_privs, "
        "the sandbox's filesystem, syscall and network rules) and an exposure score from "
        "0 (contained) to 10 (UNSAFE), as systemd-analyze security scores units. Built-in "
        "services run inside pyinetd itself and score as pyinetd does.",
        ("config",),
    ),
)

# Each option declared once: the top-level parser takes them all, a command's --help shows its own.
_OPTIONS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "config": (("-c", "--config"), {"default": "inetd.yaml", "help": "configuration file"}),
    "pid_file": (("--pid-file",), {"help": "write the pid here while running"}),
    "control": (("--control",), {"help": "control socket path (default: from the config)"}),
    "json": (("--json",), {"action": "store_true", "help": "status: print JSON"}),
    "format": (
        ("--format",),
        {
            "default": "yaml",
            "choices": ["yaml", "toml", "json"],
            "help": "output format of convert and --print-config",
        },
    ),
    "check": (
        ("--check",),
        {"action": "store_true", "help": "validate the configuration, exit"},
    ),
    "log_level": (
        ("--log-level",),
        {
            "default": "info",
            "choices": ["debug", "info", "warning", "error"],
            "help": "info logs one line per connection start and end (default)",
        },
    ),
    "log_format": (("--log-format",), {"default": "text", "choices": ["text", "json"]}),
    "syslog": (
        ("--syslog",),
        {"action": "store_true", "help": "log to the local syslog socket"},
    ),
    "version": (("--version",), {"action": "version", "version": f"pyinetd {__version__}"}),
    # What a running pyinetd runs before `upgrade` execs the program installed (upgrade.py).
    "probe": (("--probe",), {"action": "store_true", "help": argparse.SUPPRESS}),
    "schema": (
        ("--schema",),
        {"action": "store_true", "help": "print the configuration's JSON Schema, exit"},
    ),
    "print_config": (
        ("--print-config",),
        {
            "action": "store_true",
            "help": "print the configuration as pyinetd reads it (defaults applied, paths "
            "absolute, includes merged, names kept, rates and durations in their unit: '5m', "
            "'90s', '100/min'; see --format), exit",
        },
    ),
}

EPILOG = "Documentation: man pyinetd, man pyinetd.yaml (contrib/ in the source), README.md."


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser (also used to generate the man page)."""
    parser = argparse.ArgumentParser(
        prog="pyinetd",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument(
        "command",
        nargs="?",
        default="run",
        choices=[c.name for c in COMMANDS],
        help="run (default): serve; status/reload/stop/drain/undrain/upgrade: talk to the "
        "running instance through its control socket; convert FILE: translate inetd.conf or "
        "xinetd.conf; "
        "security: what contains each service, and its exposure; "
        "`pyinetd COMMAND --help` describes one",
    )
    parser.add_argument(
        "file",
        nargs="?",
        help="for convert: the inetd.conf or xinetd.conf; for drain and undrain: the service",
    )
    for flags, kwargs in _OPTIONS.values():
        parser.add_argument(*flags, **kwargs)
    return parser


def command_parser(command: Command) -> argparse.ArgumentParser:
    """The parser `pyinetd COMMAND --help` prints: the command's words and its options only."""
    usage = f"pyinetd {command.name} [options]" + (f" {command.args}" if command.args else "")
    parser = argparse.ArgumentParser(
        prog=f"pyinetd {command.name}", usage=usage, description=command.summary, epilog=EPILOG
    )
    for name in command.options:
        flags, kwargs = _OPTIONS[name]
        parser.add_argument(*flags, **kwargs)
    return parser


def _command_help(argv: Sequence[str]) -> str | None:
    """`pyinetd COMMAND ... --help` (or -h): that command's help, not the global one."""
    if not {"-h", "--help"} & set(argv):
        return None
    words = {c.name: c for c in COMMANDS}
    for word in argv:
        if word in ("-h", "--help"):
            return None  # help asked before any command word: the global help
        if word in words:
            return command_parser(words[word]).format_help()
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pyinetd` command."""
    try:
        code = _main(argv)
        sys.stdout.flush()  # inside the try: a pipe closed early fails here, not at exit
    except BrokenPipeError:
        # `pyinetd status | head -1`: the reader has gone, which is no error of ours. As the
        # signal module's docs recommend: point stdout at /dev/null so the interpreter's
        # final flush cannot raise again, and exit quietly with 1 (what EPIPE gives).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_RUNTIME
    return code


def _main(argv: Sequence[str] | None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    text = _command_help(words)
    if text is not None:
        print(text, end="")
        return EXIT_OK
    # Intermixed: options go before or after the command's words (`convert --format toml FILE`).
    args = build_parser().parse_intermixed_args(words)
    if args.schema or args.print_config:
        return _print_schema() if args.schema else _print_config(args.config, args.format)
    if args.command == "convert":
        return _convert(args)
    if args.command == "upgrade" and args.probe:
        return _probe(args.config)
    if args.command in ("status", "reload", "stop", "drain", "undrain", "upgrade"):
        return _control(args)
    try:
        config = load(args.config)
        if args.check and any(svc.tls for svc in config.enabled_services):
            from pyinetd.protocols.tlsconf import (
                build_contexts,  # as a (re)load will: read the files
            )

            errors = build_contexts((s.name, s.source, s.tls) for s in config.enabled_services)[1]
            if errors:
                raise ConfigError(errors, config.located(errors))
    except ConfigError as exc:
        for line in exc.lines:
            print(line, file=sys.stderr)
        return EXIT_CONFIG
    if args.check:
        for line in config.warnings:  # a service's own files: that service's failure alone
            print(f"warning: {line}", file=sys.stderr)
        failed = [s.name for s in config.services if s.enabled and s.name in config.failed]
        some = f" ({len(failed)} failed: {', '.join(failed)})" if failed else ""
        print(f"{args.config}: ok, {len(config.services)} services{some}")
        return EXIT_OK
    if args.command == "security":
        return _security(config)
    _ensure_std_fds()
    try:
        setup_logging(args.log_level, args.log_format, args.syslog)
    except OSError as exc:
        print(
            f"pyinetd: --syslog: cannot reach the syslog socket {SYSLOG_SOCKET}: "
            f"{exc.strerror or exc} (is a syslog daemon or journald running? without "
            "--syslog pyinetd logs to stderr)",
            file=sys.stderr,
        )
        return EXIT_RUNTIME
    from pyinetd.server import Server  # imported late: --check needs none of it

    # A worker of a running pyinetd (its `workers:` setting) is started with this set.
    worker = int(os.environ.pop("PYINETD_WORKER", "0") or 0)
    server = Server(config, worker=worker)
    try:
        server.bind()
    except ConfigError as exc:  # a TLS file, read when the contexts are built
        for line in exc.lines:
            print(line, file=sys.stderr)
        return EXIT_CONFIG
    except ListenError as exc:
        print(config.located([f"{exc.source or args.config}: {exc}"])[0], file=sys.stderr)
        return EXIT_RUNTIME
    return server.run(pid_file=None if worker else args.pid_file, control_path=args.control)


def _probe(path: str) -> int:
    """`pyinetd upgrade --probe -c FILE`, run by a pyinetd about to exec this program: what
    the next image imports can be imported and the configuration loads; the last line says
    so (upgrade.PROBE_OK), with the state versions this program reads."""
    from pyinetd import server, zygote  # noqa: F401  (what the runtime imports)
    from pyinetd.runtime import reaper  # noqa: F401  (what the runtime imports)
    from pyinetd.runtime.upgrade import PROBE_OK, READS

    code = _main(["--check", "-c", path])
    if code != EXIT_OK:
        return code
    print(f"{PROBE_OK} {__version__} {','.join(map(str, READS))}", flush=True)
    return EXIT_OK


def _security(config: Config) -> int:
    """One line per service: what it runs as, what contains it, its exposure."""
    from pyinetd.sandbox import describe

    me = pwd.getpwuid(os.geteuid()).pw_name
    rows = []
    for svc in config.services:
        if svc.is_builtin:
            user, nnp, box = f"{me} (built-in, inside pyinetd)", False, None
        else:
            user, nnp, box = (svc.user[0] if svc.user else me), svc.nnp, svc.sandbox
        cols = describe(user.split(" ")[0], nnp, box)
        cols["user"] = user
        rows.append((svc.name, cols))
    width = max((len(name) for name, _ in rows), default=0)
    for name, cols in rows:
        exposure = cols.pop("exposure")
        rest = "  ".join(f"{k}={v}" for k, v in cols.items())
        print(f"{name:<{width}}  {exposure:<12}  {rest}")
    return EXIT_OK


def _convert(args: argparse.Namespace) -> int:
    from pyinetd.convert import convert_file, dump, escape

    if not args.file:
        print("pyinetd convert: give the file to convert, e.g. /etc/inetd.conf", file=sys.stderr)
        return EXIT_CONFIG
    try:
        conv = convert_file(Path(args.file))
    except OSError as exc:
        print(f"{args.file}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_RUNTIME
    sys.stdout.write(dump(conv, args.format))
    for w in conv.warnings:
        print(f"warning: {escape(str(w))}", file=sys.stderr)  # a file name may hold ESC
    return EXIT_OK


def _control(args: argparse.Namespace) -> int:
    from pyinetd import status
    from pyinetd.runtime import control

    path = args.control
    if path is None:
        try:
            path = load(args.config).control_socket
        except ConfigError:
            path = None  # a broken file still names the instance running it
        path = path or control.default_control_path(args.config)
    request = args.command
    if args.command in ("drain", "undrain") and args.file:
        request = f"{args.command} {args.file}"
    try:
        # An upgrade's answer comes from the next image, after the probe and the exec.
        answer = control.request(path, request, 120.0 if args.command == "upgrade" else 30.0)
    except (OSError, ValueError) as exc:
        print(f"pyinetd {args.command}: cannot reach pyinetd at {path}: {exc}", file=sys.stderr)
        if args.control is None:
            # The socket's name comes from the config file's path: from another folder the
            # default ./inetd.yaml names another instance (or none). Say what was assumed.
            config = Path(args.config).absolute()
            missing = "" if config.exists() else ", which does not exist"
            print(
                f"pyinetd {args.command}: that is the control socket for {config}{missing}; "
                "name the running instance's config with -c FILE, or its socket with "
                "--control PATH",
                file=sys.stderr,
            )
        return EXIT_RUNTIME
    if args.command == "status":
        snap = answer.get("status", {})
        print(json.dumps(snap, indent=2) if args.json else status.render_table(snap))
        return EXIT_OK
    for err in answer.get("errors", []):
        print(err, file=sys.stderr)
    if not answer.get("ok"):
        if args.command == "reload":
            print("pyinetd reload: failed, the running configuration is unchanged", file=sys.stderr)
        if args.command == "upgrade" and "ok" not in answer:
            # The connection closed unanswered: the new image did not start (its log says why).
            print(
                "pyinetd upgrade: no answer from the new program; see pyinetd's log",
                file=sys.stderr,
            )
        elif args.command == "upgrade":
            print("pyinetd upgrade: failed, the running program keeps serving", file=sys.stderr)
        return EXIT_CONFIG if args.command == "reload" else EXIT_RUNTIME
    if args.command == "upgrade":
        print(
            f"pyinetd upgrade: ok, pyinetd {answer.get('version')} serving as pid "
            f"{answer.get('pid')}; accepting paused {answer.get('pause_ms')} ms"
        )
        return EXIT_OK
    what = f" {args.file}" if args.command in ("drain", "undrain") and args.file else ""
    print(f"pyinetd {args.command}{what}: ok")
    return EXIT_OK


def _print_schema() -> int:
    from pyinetd.config.schema import load_schema

    print(json.dumps(load_schema(), indent=2, ensure_ascii=False))
    return EXIT_OK


def _print_config(path: str, fmt: str) -> int:
    from pyinetd.config.printconfig import to_dict
    from pyinetd.config.writer import write

    try:
        resolved = to_dict(load(path))
    except ConfigError as exc:
        for line in exc.lines:
            print(line, file=sys.stderr)
        return EXIT_CONFIG
    except ValueError as exc:  # a value with no text form (a binary banner file)
        print(f"{path}: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    sys.stdout.write(write(resolved, fmt))
    return EXIT_OK
