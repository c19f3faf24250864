"""Smoke test of the benchmark harness (bench/run.sh, report.py, scale.py) at tiny counts."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SHARED", REPO.parent / "shared"))
APT_PROBES = {"ucspi-tcp": "tcpserver", "socat": "socat", "gcc": "gcc"}
MISSING = [pkg for pkg, exe in APT_PROBES.items() if shutil.which(exe) is None]
if not os.access("/usr/sbin/inetd", os.X_OK):
    MISSING.append("openbsd-inetd")

pytestmark = [
    pytest.mark.skipif(
        bool(MISSING), reason=f"apt packages missing: {' '.join(MISSING)} (see bench/run.sh)"
    ),
    pytest.mark.skipif(
        not (SHARED / "bench" / "anchors.sh").is_file(),
        reason=f"shared bench kit not found at {SHARED}",
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("pyinetd.cli") is None, reason="pyinetd.cli not importable yet"
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed"
    ),
]


def _free_port_base() -> int:
    """A PORT_BASE below the ephemeral range whose 25 ports (run.sh uses +0..+24) are all
    free right now."""
    for base in range(21001, 32000, 25):
        socks: list[socket.socket] = []
        try:
            for p in range(base, base + 25):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    pytest.skip("no block of 25 free loopback ports")


def test_run_sh_writes_report_with_pyinetd_rows(tmp_path: Path) -> None:
    """The whole pipeline at tiny counts: anchors kit, pyinetd rows, report, scale section."""
    base = _free_port_base()
    env = {
        **os.environ,
        "SHARED": str(SHARED),
        "PYINETD_PYTHON": sys.executable,
        "PORT_BASE": str(base),
        "CONNS": "50",
        "WARMUP": "10",
        "ROUNDS": "1",
        "FLOOR_N": "0",
        "ONLY": "tcpserver pyinetd pyinetd-echo pyinetd-w2 ref-c",
        # xinetd is not in ONLY; a set path keeps the kit from fetching it.
        "XINETD": "/nonexistent/xinetd",
        "OUTDIR": str(tmp_path / "out"),
        "RESULTS_DIR": str(tmp_path / "results"),
        "SCALE_ARGS": "--services 1,3 --children 2,20 --rss-services 3 --conns 50 --warmup 10",
        "TIME_BUDGET": "40",
    }
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "run.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    rows = [
        line.split("\t")
        for line in (tmp_path / "out" / "results.tsv").read_text().splitlines()
        if line
    ]
    by_name = {r[0]: r for r in rows}
    for name in ("tcpserver", "pyinetd", "pyinetd-echo", "pyinetd-w2", "ref-c"):
        assert by_name[name][3] == "ok", by_name[name]
        assert by_name[name][4] == "50", by_name[name]  # all 50 connections echoed

    md = (tmp_path / "results" / "latest.md").read_text()
    assert "| **pyinetd** | exec |" in md
    assert "| **pyinetd-echo** | internal |" in md
    assert "## Targets" in md
    assert "## Scale experiments" in md
    assert "| b: live children | 20 |" in md
    assert "| a: services, C vfork floor | 3 |" in md
    png = (tmp_path / "results" / "latest.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
