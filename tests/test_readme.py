"""README.md's five-minute tour stays true: every command in it runs against the shipped inetd.yaml.

The tour's ```sh blocks hold client commands (`echo ... | nc ...`, `nc ...`, `curl ...`), each with
the answer the README promises after a `→`, and pyinetd commands (`status`, `security`). The test
starts pyinetd on a copy of the shipped inetd.yaml (and services/) with every port replaced by a
free one, rewrites each command's port the same way, runs it with a deadline and checks that it
answers what the README says. A README that names a port the configuration does not serve, a
command without its answer, or an answer the service does not give fails the test.
"""

from __future__ import annotations

import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import DEADLINE, REPO, Pyinetd, free_port

Start = Callable[..., Pyinetd]

CLIENT = re.compile(r"^(?:echo |nc |curl )")
ANSWER = re.compile(r"^(?P<cmd>.*?)\s+#[^#]*→ `(?P<answer>[^`]*)`\s*$")
PORT = re.compile(r"127\.0\.0\.1[: ](\d+)")
PYINETD = ".venv/bin/pyinetd "


def tour_lines(readme: str) -> list[str]:
    """The lines of the ```sh blocks under "## A five-minute tour"."""
    section = readme.split("\n## A five-minute tour\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    return [ln.strip() for block in blocks for ln in block.splitlines() if ln.strip()]


def client_commands(lines: list[str], ports: dict[int, int]) -> list[tuple[str, str]]:
    """(command with its port mapped, answer pattern) for each client line; ValueError if a line
    has no answer or names a port that the configuration does not serve."""
    out = []
    for line in lines:
        if not CLIENT.match(line):
            continue
        m = ANSWER.match(line)
        if m is None:
            raise ValueError(f"README tour line without an answer after '→': {line!r}")
        cmd = m["cmd"]
        named = [int(p) for p in PORT.findall(cmd)]
        if not named:
            raise ValueError(f"README tour line names no 127.0.0.1 port: {line!r}")
        for port in named:
            if port not in ports:
                raise ValueError(f"README tour names port {port}, which inetd.yaml does not serve")
        cmd = PORT.sub(lambda p: p[0][: -len(p[1])] + str(ports[int(p[1])]), cmd)
        # Digits in an answer stand for any digits (the time of day, a date).
        pattern = "".join(
            r"\d+" if part.isdigit() else re.escape(part)
            for part in re.split(r"(\d+)", m["answer"])
        )
        out.append((cmd, pattern))
    return out


def free_tcp_and_udp_port() -> int:
    """A loopback port free for both TCP and UDP (the shipped echo serves both on one port)."""
    for _ in range(100):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                u.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise AssertionError("no port free for both TCP and UDP")


def shipped_config_on_free_ports(folder: Path) -> tuple[str, dict[int, int]]:
    """The shipped inetd.yaml's text with each listen port replaced; services/ copied beside it."""
    text = (REPO / "inetd.yaml").read_text()
    shutil.copytree(REPO / "services", folder / "services")
    listen = re.compile(r"^(\s+listen: 127\.0\.0\.1:)(\d+)\s*$", re.M)
    ports = {int(port): 0 for _, port in listen.findall(text)}
    assert ports, "the shipped inetd.yaml has no 127.0.0.1 listen address"
    for old in ports:
        ports[old] = free_tcp_and_udp_port()
    return listen.sub(lambda m: f"{m[1]}{ports[int(m[2])]}", text), ports


def test_the_tour_parser_refuses_a_port_the_configuration_does_not_serve() -> None:
    """The check can fail: a tour line whose port inetd.yaml lacks, or without its answer."""
    with pytest.raises(ValueError, match=r"port 9, which inetd\.yaml does not serve"):
        client_commands(["nc -N 127.0.0.1 9 </dev/null   # discard → ``"], {7007: 40000})
    with pytest.raises(ValueError, match="without an answer"):
        client_commands(["nc -N 127.0.0.1 7007 </dev/null   # echo"], {7007: 40000})
    ((cmd, pattern),) = client_commands(["nc 127.0.0.1 7013   # daytime → `20:33:42`"], {7013: 4})
    assert cmd == "nc 127.0.0.1 4" and re.fullmatch(pattern, "09:05:59")


@pytest.mark.skipif(not (shutil.which("nc") and shutil.which("curl")), reason="needs nc and curl")
def test_every_command_of_the_readme_tour_answers_against_the_shipped_config(
    inetd: Start, tmp_path: Path
) -> None:
    lines = tour_lines((REPO / "README.md").read_text())
    config, ports = shipped_config_on_free_ports(tmp_path)
    commands = client_commands(lines, ports)
    assert len(commands) >= 5, lines
    p = inetd(config)
    for cmd, pattern in commands:
        run = subprocess.run(
            ["bash", "-c", cmd], cwd=tmp_path, capture_output=True, text=True, timeout=DEADLINE
        )
        assert re.search(pattern, run.stdout), (
            f"README tour: {cmd!r} answered {run.stdout!r} (stderr {run.stderr!r}), "
            f"expected /{pattern}/\n{p.log()}"
        )
    # The pyinetd commands of the tour run against the same instance and name every service.
    names = list(yaml.safe_load(config)["services"])
    ran = 0
    for line in lines:
        if not line.startswith(PYINETD) or "$" in line:
            continue
        args = shlex.split(line[len(PYINETD) :].split("#", 1)[0])
        run = subprocess.run(
            [sys.executable, "-m", "pyinetd", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        )
        assert run.returncode == 0, f"README tour: {line!r}: {run.stderr}"
        missing = [n for n in names if n not in run.stdout]
        assert not missing, f"README tour: {line!r} does not show {missing}:\n{run.stdout}"
        ran += 1
    assert ran >= 2, lines


def test_every_test_the_documents_name_exists() -> None:
    """docs/security.md (and the other documents) name the test proving each row: it must exist."""
    defined = set()
    for path in (REPO / "tests").rglob("test_*.py"):
        defined.update(re.findall(r"^\s*(?:async )?def (test_\w+)", path.read_text(), re.M))
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    named = {(doc.name, n) for doc in docs for n in re.findall(r"`(test_\w+)", doc.read_text())}
    assert len([n for d, n in named if d == "security.md"]) >= 50
    missing = sorted(f"{d}: {n}" for d, n in named if n not in defined)
    assert not missing, missing
