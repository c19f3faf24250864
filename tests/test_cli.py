"""The command line as an administrator types it: per-command help, options on either side of
the command's words, and the man page listing every command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pyinetd.cli import COMMANDS, EXIT_OK, Command

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parent.parent


def pyinetd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyinetd", *args], capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_each_command_has_its_own_help(command: Command) -> None:
    name = command.name
    out = pyinetd(name, "--help")
    assert out.returncode == EXIT_OK, out.stderr
    assert out.stdout.startswith(f"usage: pyinetd {name} [options]")
    assert command.summary.split()[0] in out.stdout
    # the global help lists --schema; a command's own help lists only its options
    assert "--schema" not in out.stdout
    if name == "status":
        assert "--json" in out.stdout and "--pid-file" not in out.stdout


def test_help_before_a_command_word_is_the_global_help() -> None:
    out = pyinetd("--help")
    assert out.returncode == EXIT_OK and "--schema" in out.stdout


def test_options_go_before_or_after_the_file() -> None:
    conf = str(FIXTURES / "inetd.conf")
    after = pyinetd("convert", conf, "--format", "toml")
    before = pyinetd("convert", "--format", "toml", conf)
    assert after.returncode == EXIT_OK, after.stderr
    assert before.returncode == EXIT_OK, before.stderr
    assert before.stdout == after.stdout and "[services" in before.stdout


def test_the_man_page_lists_every_command_and_has_examples() -> None:
    page = (REPO / "contrib/pyinetd.8").read_text()
    commands = page.split(".SH COMMANDS", 1)[1].split(".SH ", 1)[0]
    for c in COMMANDS:
        assert f"\\fB{c.name}" in commands, c.name
    assert ".SH EXAMPLES" in page
    see_also = page.split(".SH SEE ALSO", 1)[1]
    assert "man pyinetd" not in see_also  # it names other pages, not itself
