"""Command line: argv -> Config -> Server.run() -> exit code. Nothing else."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from pyinetd import __version__
from pyinetd.config import ConfigError, load
from pyinetd.listeners import ListenError
from pyinetd.log import setup_logging

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


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser (also used to generate the man page)."""
    parser = argparse.ArgumentParser(
        prog="pyinetd",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Documentation: README.md in the source tree.",
    )
    parser.add_argument("-c", "--config", default="inetd.yaml", help="configuration file")
    parser.add_argument("--check", action="store_true", help="validate the configuration, exit")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="info logs one line per connection start and end (default)",
    )
    parser.add_argument("--log-format", default="text", choices=["text", "json"])
    parser.add_argument("--syslog", action="store_true", help="log to the local syslog socket")
    parser.add_argument("--version", action="version", version=f"pyinetd {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pyinetd` command."""
    args = build_parser().parse_args(argv)
    try:
        config = load(args.config)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return EXIT_CONFIG
    if args.check:
        print(f"{args.config}: ok, {len(config.services)} services")
        return EXIT_OK
    _ensure_std_fds()
    setup_logging(args.log_level, args.log_format, args.syslog)
    from pyinetd.server import Server  # imported late: --check needs none of it

    server = Server(config)
    try:
        server.bind()
    except ListenError as exc:
        print(f"{args.config}: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    return server.run()
