"""Privileges: a service switched to another user really loses root's access."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Pyinetd, free_port, tcp_talk
from stresslib import public_dir

Start = Callable[..., Pyinetd]
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@root_only
def test_service_as_nobody_cannot_read_a_root_only_file(inetd: Start) -> None:
    port = free_port()
    with public_dir() as folder:  # nobody may enter it: only the files' modes decide
        secret, public = folder / "secret", folder / "public"
        secret.write_text("root only\n")
        secret.chmod(0o600)
        public.write_text("anyone\n")
        public.chmod(0o644)
        show = ["/bin/sh", "-c", f"id -un; cat {public}; cat {secret} 2>&1 || echo denied"]
        inetd({"services": {"n": {"listen": f"127.0.0.1:{port}", "exec": show,
                                  "user": "nobody", "cwd": "/"}}})  # fmt: skip
        out = tcp_talk(port).decode().splitlines()
    assert out[:2] == ["nobody", "anyone"]  # runs as nobody; the folder is readable
    assert "root only" not in out
    assert out[-1] == "denied" and "Permission denied" in out[-2]


@root_only
@pytest.mark.parametrize("mode", [0o646, 0o664], ids=["other-writable", "group-writable"])
def test_root_refuses_a_config_file_writable_by_others(
    inetd: Start, tmp_path: Path, mode: int
) -> None:
    port = free_port()
    path = tmp_path / "open.yaml"
    path.touch()
    path.chmod(mode)  # the fixture rewrites the file in place: the mode stays
    q = inetd({"services": {"e": {"listen": f"127.0.0.1:{port}"}}}, name=path.name,
              wait_ready=False)  # fmt: skip
    assert path.stat().st_mode & 0o777 == mode
    (line,) = q.wait_log(r"listening: |writable by (group|others)")
    assert "listening" not in line, "pyinetd runs as root with a config anyone may edit"
    assert q.proc.wait(10) == 2
    assert q.log().splitlines() == [
        f"{path}: configuration file writable by {'others' if mode & 0o002 else 'group'} "
        f"(mode {mode:04o}); chmod go-w {path}",
        "<EOF>",
    ]
