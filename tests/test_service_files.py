"""A service's user cannot make the whole configuration invalid through the files it can change
(issue 24.8, 26.5).

Each attack is made by the service's own user (`user: nobody`) on the files of its service that
sit in a folder it owns: its `stderr:` file, its `banner:`, its program, its warm script, its
`cwd`. The failure found at load is that service's alone: `--check` exits 0 with a warning, a
reload goes on, the other services serve, the service is failed (it listens nowhere) or served
without the file, and `status` and /metrics say so. The administrator's own mistakes in files
only root can change stay configuration errors.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from conftest import DEADLINE, Pyinetd, free_port, status_of, tcp_talk, wait_for

from pyinetd import config
from pyinetd.config import checks

Start = Callable[..., Pyinetd]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a service's user)")

NOBODY = pwd.getpwnam("nobody") if os.geteuid() == 0 else None


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyinetd", *args], capture_output=True, text=True, timeout=DEADLINE
    )


def as_nobody(command: str) -> None:
    """What the service's user can do: ``command`` (sh) as nobody, no groups."""
    assert NOBODY is not None
    subprocess.run(
        ["setpriv", f"--reuid={NOBODY.pw_uid}", f"--regid={NOBODY.pw_gid}", "--clear-groups",
         "--inh-caps=-all", "--", "sh", "-c", command],
        check=True, capture_output=True, timeout=DEADLINE,
    )  # fmt: skip


@pytest.fixture
def base() -> Iterator[Path]:
    """A root folder anyone may enter, holding ``svc/`` (nobody's own, the usual layout of a
    service's files) and ``root-only`` (0600 root: what the attacks point at)."""
    assert NOBODY is not None
    path = Path(tempfile.mkdtemp(prefix="pyinetd-files-"))
    path.chmod(0o755)
    own = path / "svc"
    own.mkdir()
    os.chown(own, NOBODY.pw_uid, NOBODY.pw_gid)
    secret = path / "root-only"
    secret.write_text("SECRET\n")
    secret.chmod(0o600)
    yield path
    shutil.rmtree(path)


def nobodys(base: Path, name: str, text: str, mode: int = 0o644) -> Path:
    """A file of nobody's in its folder."""
    assert NOBODY is not None
    path = base / "svc" / name
    path.write_text(text)
    path.chmod(mode)
    os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    return path


def refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(DEADLINE)
        return s.connect_ex(("127.0.0.1", port)) != 0


def reload(p: Pyinetd, doc: dict[str, object]) -> None:
    """Write ``doc`` as the configuration and reload; the reload must be applied."""
    p.path.write_text(yaml.safe_dump(doc))
    out = cli("reload", "-c", str(p.path))
    assert out.returncode == 0, out.stdout + out.stderr


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=DEADLINE) as r:
        return str(r.read().decode())


def test_swapped_stderr_and_banner_fail_only_their_service(inetd: Start, base: Path) -> None:
    err = nobodys(base, "err.log", "")
    banner = nobodys(base, "banner.txt", "hello\n")
    secret = base / "root-only"
    mine, other, added, mport = free_port(), free_port(), free_port(), free_port()
    svc = {
        "listen": f"127.0.0.1:{mine}",
        "exec": ["/bin/sh", "-c", "echo hi; echo oops-on-stderr >&2"],
        "user": "nobody",
        "stderr": str(err),
        "banner": str(banner),
    }
    doc: dict[str, object] = {
        "metrics": f"127.0.0.1:{mport}",
        "services": {"mine": svc, "other": {"listen": f"127.0.0.1:{other}", "builtin": "echo"}},
    }
    p = inetd(doc)
    assert tcp_talk(mine) == b"hello\nhi\n"
    # The service's user swaps both files of its folder for symlinks to a root-only file.
    as_nobody(f"cd {base / 'svc'} && rm -f err.log banner.txt && "
              f"ln -s {secret} err.log && ln -s {secret} banner.txt")  # fmt: skip
    check = cli("-c", str(p.path), "--check")
    assert check.returncode == 0, check.stderr
    warnings = check.stderr.splitlines()
    at = rf"warning: {re.escape(str(p.path))}:\d+:\d+: services\.mine"  # file:line:col, service
    assert any(re.match(at + r"\.banner: .*without its banner$", w) for w in warnings), warnings
    assert any(re.match(at + r"\.stderr: .*stderr goes to pyinetd's log", w) for w in warnings)
    assert len(warnings) == 2, warnings
    # A reload that adds a service is applied; the others serve; the service is served
    # without its files: no banner, stderr to the log; the root file neither sent nor written.
    reload(p, {**doc, "services": {**doc["services"], "added": {"listen": f"127.0.0.1:{added}"}}})  # type: ignore[dict-item]
    assert tcp_talk(added, b"x\n") == b"x\n"
    assert tcp_talk(other, b"y\n") == b"y\n"
    assert tcp_talk(mine) == b"hi\n"
    p.wait_log(r"mine\[\d+\]: oops-on-stderr")
    assert secret.read_text() == "SECRET\n"
    p.wait_log(r"warning: .*services\.mine\.banner: .*without its banner")
    st = status_of(p)["mine"]
    assert st["state"] == "listening" and st["failed"] is None
    assert any(n.startswith("banner: ") for n in st["notes"]), st["notes"]
    assert any(n.startswith("stderr: ") for n in st["notes"]), st["notes"]
    assert 'pyinetd_service_failed{service="mine"} 0' in metrics(mport)
    # The next start of pyinetd from this configuration starts.
    p.stop()
    again = inetd(p.path.read_text(), name="again.yaml")
    assert tcp_talk(other, b"z\n") == b"z\n"
    assert tcp_talk(mine) == b"hi\n"
    again.stop()


ATTACKS = {
    # What the service's user can do to its own program and folders, and what --check says.
    "folder-000": ("chmod 000 {svc}", "services.prog.exec: "),
    "program-000": ("chmod 000 {svc}/prog", "services.prog.exec: "),
    "program-gone": ("rm {svc}/prog", "services.prog.exec: "),
    "program-fifo": ("rm {svc}/prog && mkfifo -m 755 {svc}/prog", "services.prog.exec: "),
    "cwd-000": ("chmod 000 {svc}/work", "services.prog.cwd: "),
    "cwd-gone": ("rmdir {svc}/work", "services.prog.cwd: "),
}


@pytest.mark.parametrize("attack", ATTACKS)
def test_broken_program_or_cwd_fails_only_its_service_until_mended(
    inetd: Start, base: Path, attack: str
) -> None:
    assert NOBODY is not None
    prog = nobodys(base, "prog", "#!/bin/sh\necho served-from-$(pwd)\n", 0o755)
    work = base / "svc" / "work"
    work.mkdir()
    os.chown(work, NOBODY.pw_uid, NOBODY.pw_gid)
    port, other, added, mport = free_port(), free_port(), free_port(), free_port()
    doc: dict[str, object] = {
        "metrics": f"127.0.0.1:{mport}",
        "services": {
            "prog": {"listen": f"127.0.0.1:{port}", "exec": str(prog), "user": "nobody",
                     "cwd": str(work)},
            "other": {"listen": f"127.0.0.1:{other}", "builtin": "echo"},
        },
    }  # fmt: skip
    p = inetd(doc)
    assert tcp_talk(port) == f"served-from-{work}\n".encode()
    command, key = ATTACKS[attack]
    as_nobody(command.format(svc=base / "svc"))
    check = cli("-c", str(p.path), "--check")
    assert check.returncode == 0, check.stderr
    assert key in check.stderr and "the service is failed" in check.stderr, check.stderr
    assert "1 failed: prog" in check.stdout
    services = {**doc["services"], "added": {"listen": f"127.0.0.1:{added}"}}  # type: ignore[dict-item]
    reload(p, {**doc, "services": services})
    assert tcp_talk(added, b"x\n") == b"x\n"
    assert tcp_talk(other, b"y\n") == b"y\n"
    assert refused(port)  # a failed service listens nowhere
    st = status_of(p)["prog"]
    assert st["state"] == "failed" and st["failed"].startswith(key.rpartition(".")[2]), st
    assert 'pyinetd_service_failed{service="prog"} 1' in metrics(mport)
    table = cli("status", "-c", str(p.path))
    assert "failed at load: " in table.stdout, table.stdout
    # Mended by its user, the service is served again at the next reload.
    shutil.rmtree(base / "svc")
    (base / "svc").mkdir()
    os.chown(base / "svc", NOBODY.pw_uid, NOBODY.pw_gid)
    nobodys(base, "prog", "#!/bin/sh\necho served-from-$(pwd)\n", 0o755)
    work.mkdir()
    os.chown(work, NOBODY.pw_uid, NOBODY.pw_gid)
    reload(p, {**doc, "services": services})
    assert tcp_talk(port) == f"served-from-{work}\n".encode()
    assert status_of(p)["prog"]["state"] == "listening"
    assert 'pyinetd_service_failed{service="prog"} 0' in metrics(mport)


def test_program_the_user_cannot_reach_fails_that_service(inetd: Start, base: Path) -> None:
    # Issue 26.5: a 0700 folder root made: `--check` passed, and every connection failed.
    private = base / "private"
    private.mkdir(mode=0o700)
    prog = private / "prog"
    prog.write_text("#!/bin/sh\necho hi\n")
    prog.chmod(0o755)
    port, other = free_port(), free_port()
    doc = {
        "services": {
            "hidden": {"listen": f"127.0.0.1:{port}", "exec": str(prog), "user": "nobody"},
            "other": {"listen": f"127.0.0.1:{other}", "builtin": "echo"},
        }
    }
    path = base / "inetd.yaml"
    path.write_text(yaml.safe_dump(doc))
    check = cli("-c", str(path), "--check")
    assert check.returncode == 0, check.stderr
    assert f"services.hidden.exec: {prog}: user 'nobody' may not run it" in check.stderr
    p = inetd(doc)
    p.wait_log(r"warning: .*services\.hidden\.exec: .*may not run it")
    assert tcp_talk(other, b"y\n") == b"y\n"
    assert refused(port)
    assert status_of(p)["hidden"]["state"] == "failed"


def test_warm_script_its_user_breaks_fails_only_that_service(base: Path) -> None:
    app = nobodys(base, "app.py", "print('hi')\n")
    shebang = nobodys(base, "tool", "#!/usr/bin/python3\nprint('hi')\n", 0o755)
    doc = {
        "services": {
            "argv": {"listen": f"127.0.0.1:{free_port()}", "exec": ["/usr/bin/python3", str(app)],
                     "user": "nobody", "warm": True},
            "bang": {"listen": f"127.0.0.1:{free_port()}", "exec": str(shebang),
                     "user": "nobody", "warm": True},
        }
    }  # fmt: skip
    path = base / "inetd.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert config.load(path).failed == {}
    app.chmod(0o000)  # its user may make its script unreadable, or make it something else
    as_nobody(f"printf '#!/bin/sh\\necho hi\\n' > {shebang}")
    cfg = config.load(path)
    assert set(cfg.failed) == {"argv", "bang"}, cfg.warnings
    assert cfg.failed["argv"].startswith(f"exec: {app}: user 'nobody' may not read")
    assert cfg.failed["bang"].startswith("warm: true: "), cfg.failed
    assert [s.name for s in cfg.enabled_services] == []


def test_the_administrators_own_files_stay_configuration_errors(base: Path) -> None:
    # Root's folders, which the service's user cannot change: a mistake of the configuration.
    (base / "logs").mkdir(mode=0o755)
    doc = {
        "services": {
            "a": {"listen": f"127.0.0.1:{free_port()}", "exec": str(base / "nope"),
                  "user": "nobody"},
            "b": {"listen": f"127.0.0.1:{free_port()}", "exec": "/bin/cat", "user": "nobody",
                  "stderr": str(base / "logs" / "err.log")},
            "c": {"listen": f"127.0.0.1:{free_port()}", "exec": "/bin/cat", "user": "nobody",
                  "banner": str(base / "root-only")},
            "d": {"listen": f"127.0.0.1:{free_port()}", "exec": "/bin/cat", "user": "nobody",
                  "cwd": str(base / "nodir")},
        }
    }  # fmt: skip
    path = base / "inetd.yaml"
    path.write_text(yaml.safe_dump(doc))
    check = cli("-c", str(path), "--check")
    assert check.returncode == 2
    lines = check.stderr.splitlines()
    assert len(lines) == 4 and "warning" not in check.stderr, lines
    for name, key in (("a", "exec"), ("b", "stderr"), ("c", "banner"), ("d", "cwd")):
        assert any(f"services.{name}.{key}: " in line for line in lines), (name, lines)


def test_a_bad_default_is_an_error_unless_each_service_can_claim_it(base: Path) -> None:
    assert NOBODY is not None
    gone = base / "svc" / "gone"  # in nobody's folder: nobody's to mend
    doc: dict[str, object] = {
        "defaults": {"cwd": str(gone)},
        "services": {"a": {"listen": f"127.0.0.1:{free_port()}", "exec": "/bin/cat",
                           "user": "nobody"}},
    }  # fmt: skip
    path = base / "inetd.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert set(config.load(path).failed) == {"a"}
    doc["services"]["b"] = {"listen": f"127.0.0.1:{free_port()}", "exec": "/bin/cat"}  # type: ignore[index]
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(config.ConfigError) as exc:
        config.load(path)  # b runs as root: the default is the administrator's mistake
    assert exc.value.errors == [f"{path}: defaults.cwd: {gone}: no such folder"]


def test_changeable_by_walks_the_path_as_the_kernel_does(base: Path) -> None:
    assert NOBODY is not None
    user = ("nobody", NOBODY.pw_uid, NOBODY.pw_gid)
    own = base / "svc"
    assert checks.changeable_by(user, None, str(base / "root-only")) is None
    assert checks.changeable_by(user, None, str(own / "x")) == str(own)
    # A root symlink into nobody's folder: the target's way counts too.
    (base / "link").symlink_to(own)
    assert checks.changeable_by(user, None, str(base / "link" / "x")) == str(own)
    # A sticky world-writable folder (as /tmp): its root entries are no one else's to rename,
    # a missing one anyone may create.
    sticky = base / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "root-file").write_text("")
    assert checks.changeable_by(user, None, str(sticky / "root-file")) is None
    assert checks.changeable_by(user, None, str(sticky / "missing")) == str(sticky)
    # Below a folder the user may not enter, nothing is the user's to change.
    closed = base / "closed"
    closed.mkdir(mode=0o700)
    (closed / "inner").mkdir()
    os.chown(closed / "inner", NOBODY.pw_uid, NOBODY.pw_gid)
    assert checks.changeable_by(user, None, str(closed / "inner" / "x")) is None
    # A file the user may write: its content is the user's.
    (base / "open").write_text("")
    (base / "open").chmod(0o666)
    assert checks.changeable_by(user, None, str(base / "open")) == str(base / "open")


def test_service_failed_is_logged_at_each_load_and_status_shows_it(
    inetd: Start, base: Path
) -> None:
    prog = nobodys(base, "prog", "#!/bin/sh\necho hi\n", 0o755)
    port = free_port()
    doc = {"services": {"prog": {"listen": f"127.0.0.1:{port}", "exec": str(prog),
                                 "user": "nobody"}}}  # fmt: skip
    p = inetd(doc)
    as_nobody(f"rm {prog}")
    p.signal(signal.SIGHUP)
    p.wait_log(r"warning: .*services\.prog\.exec: .*no such file.*the service is failed")
    p.wait_log(r"reloaded: $")
    wait_for(lambda: refused(port), DEADLINE)
    assert status_of(p)["prog"]["failed"] == f"exec: {prog}: no such file"
