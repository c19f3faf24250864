"""What ships: the man pages are current and render, the systemd unit verifies, the sdist is
complete enough to test itself."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
CONTRIB = REPO / "contrib"


def gen_manpage() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_manpage", REPO / "scripts/gen_manpage.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    return gen


def test_man_pages_are_current() -> None:
    """A key added to the schema (or an option to the parser) shows in the shipped pages."""
    for path, text in gen_manpage().pages().items():
        assert path.read_text() == text, f"{path.name} is out of date: run scripts/gen_manpage.py"


def test_every_configuration_key_is_in_pyinetd_yaml_5() -> None:
    from pyinetd.config.schema import load_schema

    schema = load_schema()
    page = (CONTRIB / "pyinetd.yaml.5").read_text()
    keys = list(schema["properties"]) + list(schema["$defs"]["service"]["properties"])
    for name, node in schema["$defs"].items():  # keys of nested mappings: rlimits.as, tls.cert
        keys += [f"{name}.{sub}" for sub in node.get("properties", {}) if name != "service"]
    keys = [k for k in keys if not k.startswith("defaults.")]
    missing = [k for k in keys if "\\fB" + k.replace("-", "\\-") not in page]
    assert not missing, f"pyinetd.yaml.5 does not describe {missing}"


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff not installed")
@pytest.mark.parametrize("page", ["pyinetd.8", "pyinetd.yaml.5"])
def test_man_pages_render_without_warnings(page: str) -> None:
    run = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z", str(CONTRIB / page)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (run.returncode, run.stderr) == (0, "")


def systemd_search_path() -> str:
    """The folders systemd looks an ExecStart= command up in (systemd.service(5))."""
    run = subprocess.run(
        ["systemd-path", "search-binaries-default"], capture_output=True, text=True, timeout=10
    )
    return run.stdout.strip() if run.returncode == 0 else "/usr/local/bin:/usr/bin:/bin"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_unit_verifies_with_its_man_pages(tmp_path: Path) -> None:
    """The unit hard-coded /usr/local/bin and named a man page that did not exist."""
    unit = (CONTRIB / "pyinetd.service").read_text()
    assert "/usr/local/bin" not in unit.split("[Unit]")[1]
    exec_lines = [ln for ln in unit.splitlines() if ln.startswith("ExecStart=")]
    assert exec_lines == ["ExecStart=pyinetd -c /etc/pyinetd/inetd.yaml"]
    if shutil.which("pyinetd", path=systemd_search_path()) is None:
        # Installed in a virtual environment: what the unit's comment tells such an install
        # to do (a drop-in with the full path). verify checks the command exists.
        here = shutil.which("pyinetd", path=os.path.dirname(sys.executable))
        assert here is not None
        unit = unit.replace("ExecStart=pyinetd ", f"ExecStart={here} ")
    (tmp_path / "pyinetd.service").write_text(unit)
    # Documentation=man:...: verify runs man(1) on each; the shipped pages, as installed.
    man = tmp_path / "man"
    for page, section in (("pyinetd.8", "man8"), ("pyinetd.yaml.5", "man5")):
        (man / section).mkdir(parents=True, exist_ok=True)
        shutil.copy(CONTRIB / page, man / section / page)
    run = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "pyinetd.service")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MANPATH": str(man)},
    )
    assert (run.returncode, run.stderr) == (0, ""), run.stderr


def git_files() -> list[str]:
    run = subprocess.run(
        ["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True, timeout=30
    )
    return run.stdout.splitlines() if run.returncode == 0 else []


@pytest.mark.skipif(importlib.util.find_spec("build") is None, reason="build not installed")
def test_sdist_carries_every_file_its_tests_need(tmp_path: Path) -> None:
    """The sdist left out contrib/, inetd.yaml, services/ and the fixtures: its tests failed."""
    # From a copy without the egg-info a previous build or `pip install -e` left: setuptools
    # takes that folder's SOURCES.txt as a list of files to ship, hiding a MANIFEST.in gap.
    tree = tmp_path / "tree"
    shutil.copytree(
        REPO,
        tree,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "*.egg-info", "build", "dist", "__pycache__", ".*_cache", "*.so"
        ),
    )
    run = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--outdir", str(tmp_path), str(tree)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    (sdist,) = tmp_path.glob("pyinetd-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    wanted = [
        "LICENSE",
        "README.md",
        "inetd.yaml",
        "contrib/pyinetd.service",
        "contrib/pyinetd.8",
        "contrib/pyinetd.yaml.5",
        "tests/conftest.py",
        "tests/fixtures/inetd.conf",
        "scripts/gen_manpage.py",
        "services/upper.py",
    ]
    # In a git checkout: every tracked file but git's own.
    wanted += [f for f in git_files() if not f.startswith(".git")]
    missing = sorted(set(wanted) - names)
    assert not missing, f"the sdist lacks {missing}"
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".so"))]
