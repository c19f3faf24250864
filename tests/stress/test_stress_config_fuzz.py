"""Config fuzzing: whatever the file holds, `pyinetd --check` answers with exit 0 or 2 and
errors that each start with the file name; never a traceback, never a hang."""

from __future__ import annotations

import contextlib
import io
import os
import random
import re
import string
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import yaml
from conftest import DEADLINE
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from stresslib import scaled

from pyinetd import cli
from pyinetd.config import SERVICE_PARSERS, TOP_NAMES


def check(path: Path) -> tuple[int, str]:
    """Run `pyinetd -c PATH --check` in-process: (exit code, stderr)."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = cli.main(["-c", str(path), "--check"])
    return code, err.getvalue()


def assert_clean(path: Path, code: int, stderr: str) -> None:
    with contextlib.suppress(InvalidArgument):  # outside a @given test
        event(f"exit {code}")
    assert "Traceback" not in stderr
    assert code in (0, 2), (code, stderr)
    if code == 2:
        lines = stderr.rstrip("\n").split("\n")
        assert lines and all(names_its_file(line, path) for line in lines), stderr


def names_its_file(line: str, path: Path) -> bool:
    """An error line starts with the config file's name, or with the name of a file it
    includes when the error is in that file (hypothesis found `include: /bin/*`)."""
    # 'file: ...', or 'file:line:column: ...' where the position is known (issue 16).
    head = re.sub(r":\d+:\d+$", "", line.split(": ", 1)[0])
    if head == str(path):
        return True
    return os.path.isabs(head) and os.path.isfile(head)


# Characters and values that once broke the properties; each has a regression
# test below. Empty these once pyinetd handles them, and the fuzzing covers them again.
KNOWN_BAD_CHARS = ""

JUNK_KEYS = ["include", "usr", "Listen", "", "services ", "exec_", "0", "rlimit", "protocols"]
# Any character a UTF-8 file can hold (no lone surrogates).
CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters=KNOWN_BAD_CHARS)
KEYS = st.sampled_from([*SERVICE_PARSERS, *TOP_NAMES, *JUNK_KEYS]) | st.text(CHARS, max_size=8)
PLAUSIBLE = [
    "127.0.0.1:7007", "[::1]:7007", "0.0.0.0:7", "*:7", "localhost:7", "7007", "0", "65536",
    "[::1]", "/tmp/fuzz.sock", "@abstract", "/bin/cat", "cat", "cat -v", "'unterminated",
    "services/upper.py", "/", ".", "..", "50/s", "10/min", "1/h", "0/s", "-1/s", "30s", "5m",
    "500ms", "1d", "nan", "inf", "1e309", "512M", "1.5G", "0.3k", "unlimited", "infinity",
    "022", "999", "0o22", "nobody", "root", "nogroup", "65534", "log", "null", "socket",
    "/tmp/fuzz-stderr.log", "/no/such/dir/x.log", "tcp", "udp", "unix", "UDP", "echo",
    "chargen", "discard", "daytime", "time", "queue", "reject", "127.0.0.0/8", "::1",
    "10.0.0.0/8", "::ffff:127.0.0.1", "fe80::1%eth0", "300.1.1.1/8", "/dev/null", "v1", "v2",
    "any", "yes", "on", "~", "", " ", "é", "\t", "x" * 200,
]  # fmt: skip
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(CHARS, max_size=20)
    | st.sampled_from(PLAUSIBLE)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
)
SERVICE = st.dictionaries(KEYS, VALUES, max_size=8)
NAMES = st.sampled_from(["echo", "a", "tftp", "0", "x y"]) | st.text(
    alphabet=string.ascii_letters + string.digits + "-_. ", max_size=6
)
DOCUMENTS = VALUES | st.fixed_dictionaries(
    {},
    optional={
        "services": st.dictionaries(NAMES, SERVICE | VALUES, max_size=4),
        "defaults": SERVICE | VALUES,
        "max_children": VALUES,
        "include": VALUES,
    },
)
# Mostly valid: a service that would load, plus a few fuzzed settings, to reach every
# value parser and the checks that combine keys, not just the first error.
NEAR_VALID = st.builds(
    lambda name, listen, extra, top: {
        **top,
        "services": {name: {"listen": listen, **extra}},
    },
    NAMES,
    st.sampled_from(["127.0.0.1:7007", "7007", "[::1]:7", "/tmp/fuzz.sock", "*:7"]),
    st.dictionaries(
        st.sampled_from(list(SERVICE_PARSERS)),
        SCALARS | st.lists(SCALARS, max_size=3) | st.dictionaries(KEYS, SCALARS, max_size=3),
        max_size=3,
    ),
    st.fixed_dictionaries({}, optional={"max_children": SCALARS, "defaults": SERVICE}),
)
DOCUMENTS = DOCUMENTS | NEAR_VALID

FUZZ = settings(
    max_examples=scaled(300),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(doc=DOCUMENTS)
def test_fuzzed_yaml_documents(doc: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "inetd.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    assert_clean(path, *check(path))


@FUZZ
@given(doc=DOCUMENTS)
def test_fuzzed_toml_documents(doc: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "inetd.toml"
    try:
        text = tomli_w.dumps(doc if isinstance(doc, dict) else {"services": doc})
    except (TypeError, ValueError):
        text = "not = [valid"  # TOML has no null; still a file to check
    path.write_text(text, encoding="utf-8")
    assert_clean(path, *check(path))


@FUZZ
@given(data=st.binary(max_size=2000), suffix=st.sampled_from([".yaml", ".toml", ".yml"]))
def test_random_bytes(data: bytes, suffix: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("fuzz") / f"inetd{suffix}"
    path.write_bytes(data)
    assert_clean(path, *check(path))


# ---------------------------------------------------------------- found by fuzzing
REGRESSIONS = [
    pytest.param(
        'services:\n  a: {listen: 7, user: "a\\0b"}\n',
        id="user-nul",
    ),
    pytest.param(
        'services:\n  a: {listen: 7, group: "a\\0b"}\n',
        id="group-nul",
    ),
    pytest.param(
        'services:\n  a: {listen: 7, banner: "a\\0b"}\n',
        id="banner-nul",
    ),
    pytest.param(
        "max_children: " + "1" * 5000 + "\n",
        id="int-5000-digits",
    ),
    pytest.param(
        "services: " + "[" * 20000 + "]" * 20000 + "\n",
        id="deep-nesting",
    ),
    pytest.param(
        'services:\n  "a\\nb": {listen: 7, cwd: "x\\ny"}\n',
        id="newline-in-name-and-value",
    ),
    pytest.param(
        'services:\n  a: {listen: 7, "use\\nr": x}\n',
        id="newline-in-unknown-key",
    ),
    pytest.param(
        "services:\n  a: {listen: 7, user: -5, nice: 99, rlimits: {nproc: -1}}\n", id="bad-values"
    ),
    pytest.param("? [a, b]\n: c\n", id="unhashable-key"),
    pytest.param("services: &a\n  x: *a\n", id="recursive-alias"),
    pytest.param("\xef\xbb\xbf\ufeff\x00\x01", id="bom-and-controls"),
]


@pytest.mark.parametrize("text", REGRESSIONS)
def test_config_regressions(text: str, tmp_path: Path) -> None:
    path = tmp_path / "inetd.yaml"
    path.write_text(text, encoding="utf-8")
    assert_clean(path, *check(path))


def test_banner_that_is_not_a_regular_file_is_refused_quickly(tmp_path: Path) -> None:
    # A FIFO nobody writes to: open() blocks. (/dev/zero shows the same bug but eats memory.)
    os.mkfifo(tmp_path / "banner")
    path = tmp_path / "inetd.yaml"
    path.write_text("services:\n  a: {listen: 7, banner: banner}\n")
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pyinetd", "-c", str(path), "--check"],
            capture_output=True,
            text=True,
            timeout=3,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("`pyinetd --check` still reading the banner after 3 s")
    assert out.returncode == 2
    assert out.stderr.startswith(f"{path}:2:18: services.a.banner: banner: ")


# ---------------------------------------------------------------- the real command
SUBPROCESS_DOCS = [
    ("ok.yaml", "services:\n  echo: {listen: '127.0.0.1:7007'}\n", 0),
    ("bad.yaml", "services:\n  echo: {listen: '127.0.0.1:70000', usr: x}\n", 2),
    ("junk.yaml", random.Random(0).randbytes(512).decode("latin-1"), 2),
    ("ok.toml", '[services.echo]\nlisten = "127.0.0.1:7007"\n', 0),
    ("bad.toml", "[services.echo\nlisten = 7\n", 2),
    ("list.yaml", "- a\n- b\n", 2),
]


@pytest.mark.parametrize(("name", "text", "expected"), SUBPROCESS_DOCS)
def test_check_command(name: str, text: str, expected: int, tmp_path: Path) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="latin-1" if name == "junk.yaml" else "utf-8")
    out = subprocess.run(
        [sys.executable, "-m", "pyinetd", "-c", str(path), "--check"],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert_clean(path, out.returncode, out.stderr)
    assert out.returncode == expected, out.stderr
