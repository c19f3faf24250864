"""Files and sockets root opens, creates or removes on a service's or a user's behalf.

Each test is an attack by a second local user (the `local_user` fixture), or by a service's own
`user:`, who owns a folder root works in: symlinks, swapped folders, planted entries.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import DEADLINE, LocalUser, Pyinetd, free_port, script, tcp_talk

Start = Callable[..., Pyinetd]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyinetd", *args],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env={**os.environ, **(env or {})},
    )


def _root_only_file(folder: Path, name: str = "root-only") -> Path:
    """A 0600 root file the local user must neither read nor write."""
    victim = folder / name
    victim.write_text("SECRET\n")
    os.chown(victim, 0, 0)
    victim.chmod(0o600)
    return victim


def test_stderr_file_swapped_for_symlink_does_not_append_to_root_file(
    inetd: Start, local_user: LocalUser
) -> None:
    home = local_user.home
    logs = home / "logs"
    logs.mkdir()
    os.chown(logs, local_user.uid, local_user.gid)
    victim = _root_only_file(home)
    # The service's own user swaps its log for a symlink to the root file.
    evil = script(
        home,
        "evil.sh",
        f"#!/bin/sh\necho INJECTED >&2\nln -sfn {victim} {logs}/err.log\necho done\n",
    )
    port = free_port()
    svc = {
        "listen": f"127.0.0.1:{port}",
        "exec": evil,
        "user": local_user.name,
        "stderr": str(logs / "err.log"),
    }
    p = inetd({"services": {"s": svc}})
    assert tcp_talk(port) == b"done\n"
    assert (logs / "err.log").is_symlink()  # the first child's stderr was the real file
    tcp_talk(port)  # pyinetd opens err.log again for this one
    p.wait_log(r"s: stderr .*err\.log: Permission denied; closing")
    assert victim.read_text() == "SECRET\n"
    assert tcp_talk(port) == b""  # refused again, not half-started


def test_stderr_file_is_created_by_the_service_user(inetd: Start, local_user: LocalUser) -> None:
    logs = local_user.home / "logs"
    logs.mkdir()
    os.chown(logs, local_user.uid, local_user.gid)
    noisy = script(local_user.home, "noisy.sh", "#!/bin/sh\necho err >&2\necho out\n")
    port = free_port()
    svc = {"listen": f"127.0.0.1:{port}", "exec": noisy, "user": local_user.name}
    p = inetd({"services": {"s": {**svc, "stderr": str(logs / "err.log")}}})
    assert tcp_talk(port) == b"out\n"
    p.wait_log(r"s: pid \d+ ended")
    st = (logs / "err.log").stat()
    assert (st.st_uid, st.st_gid) == (local_user.uid, local_user.gid)
    assert (logs / "err.log").read_text() == "err\n"
    assert os.geteuid() == 0 and "Permission" not in p.log()


def test_banner_linked_to_root_file_is_not_sent_after_reload(
    inetd: Start, local_user: LocalUser
) -> None:
    home = local_user.home
    victim = _root_only_file(home, "shadow")
    local_user.run(["sh", "-c", f"echo hello > {home}/banner.txt"])
    port = free_port()
    svc = {
        "listen": f"127.0.0.1:{port}",
        "exec": "/bin/cat",
        "user": local_user.name,
        "banner": str(home / "banner.txt"),
    }
    p = inetd({"services": {"s": svc}})
    assert tcp_talk(port) == b"hello\n"
    # The service's user points its banner at a file only root may read, then waits for a reload.
    local_user.run(["ln", "-sfn", str(victim), str(home / "banner.txt")])
    p.signal(signal.SIGHUP)
    # The banner is the service's own file: the reload goes on, the service without it (24.8).
    p.wait_log(r"services\.s\.banner: .*banner\.txt: Permission denied.*without its banner")
    p.wait_log(r"reloaded: s ")
    assert tcp_talk(port, b"x\n") == b"x\n"  # served, without the banner and the secret


def test_server_listens_on_the_control_path_given_on_the_command_line(
    inetd: Start, tmp_path: Path
) -> None:
    sock = tmp_path / "ctl.sock"
    p = inetd({"services": {"e": {"listen": f"127.0.0.1:{free_port()}"}}}, "--control", str(sock))
    assert sock.is_socket()
    out = cli("stop", "-c", str(p.path), "--control", str(sock))
    assert (out.returncode, out.stdout) == (0, "pyinetd stop: ok\n"), out.stderr
    assert p.proc.wait(DEADLINE) == 0
    assert not sock.exists()


# An impostor control socket: answers every client "ok", as a running pyinetd would to `stop`.
IMPOSTOR = """
import os, socket, sys
folder, path = sys.argv[1], sys.argv[2]
os.mkdir(folder)
os.chmod(folder, 0o777)
s = socket.socket(socket.AF_UNIX)
s.bind(path)
os.chmod(path, 0o777)
s.listen()
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.recv(100)
    c.sendall(b'{"ok": true}')
    c.close()
"""

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]


def test_control_folder_made_first_by_another_user_is_refused(
    local_user: LocalUser, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The victim (local_user) runs pyinetd with the default control socket, in
    # /tmp/pyinetd-UID; the attacker (nobody) made that folder first, mode 777, with its socket.
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    conf = local_user.home / "inetd.yaml"
    where = local_user.run(
        [
            sys.executable,
            "-c",
            f"import pyinetd.runtime.control as c; print(c.default_control_path({str(conf)!r}))",
        ]
    )
    path = where.stdout.decode().strip()
    folder = os.path.dirname(path)
    assert folder == f"/tmp/pyinetd-{local_user.uid}"
    impostor = subprocess.Popen(
        [*NOBODY, sys.executable, "-c", IMPOSTOR, folder, path],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    prefix = (
        "setpriv",
        f"--reuid={local_user.uid}",
        f"--regid={local_user.gid}",
        "--clear-groups",
        "--",
    )
    server: Pyinetd | None = None
    try:
        assert impostor.stdout is not None and impostor.stdout.readline() == b"ready\n"
        listen = f"127.0.0.1:{free_port()}"
        server = Pyinetd({"services": {"e": {"listen": listen}}}, local_user.home, prefix=prefix)
        server.wait_log(rf"control socket {path}: {folder}: owned by uid 65534, not by uid")
        assert os.stat(path).st_uid == 65534  # the server left the folder alone
        out = local_user.run(
            [sys.executable, "-m", "pyinetd", "stop", "-c", str(conf)], check=False
        )
        assert out.returncode == 1 and out.stdout == b""
        assert b"owned by uid 65534" in out.stderr and b"refusing" in out.stderr
        assert server.proc.poll() is None
    finally:
        if server is not None:
            server.stop()
        impostor.kill()
        impostor.wait()
        assert impostor.stdout is not None
        impostor.stdout.close()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("mode", [0o1777, 0o777])
def test_pid_file_temp_name_planted_as_symlink_does_not_overwrite_root_file(
    inetd: Start, local_user: LocalUser, tmp_path: Path, mode: int
) -> None:
    run = local_user.home / "run"
    run.mkdir()
    run.chmod(mode)
    victim = _root_only_file(tmp_path)
    pidf = run / "pyinetd.pid"
    # The local user plants a symlink under the temporary name pyinetd used to write, for the
    # very pid pyinetd gets ($$ of the shell that execs it).
    plant = (
        f"setpriv --reuid={local_user.uid} --regid={local_user.gid} --clear-groups -- "
        f'ln -s {victim} {pidf}.$$.tmp && exec "$@"'
    )
    config = {"services": {"e": {"listen": f"127.0.0.1:{free_port()}"}}}
    p = inetd(config, "--pid-file", str(pidf), prefix=("sh", "-c", plant, "sh"), wait_ready=False)
    if mode & 0o1000:  # sticky, as /run and /tmp: served, under a name no one could guess
        p.wait_ready()
        assert pidf.read_text() == f"{p.pid}\n"
        assert p.stop() == 0
        assert not pidf.exists()
    else:  # anyone may swap entries in this folder: refused
        assert p.proc.wait(DEADLINE) == 1
        p.wait_log(rf"pid file {pidf}: folder {run} is writable by others \(mode 0777\)")
        assert not pidf.exists()
    assert victim.read_text() == "SECRET\n"


def test_unix_socket_folder_swapped_for_symlink_is_not_followed_at_stop(
    inetd: Start, local_user: LocalUser, tmp_path: Path
) -> None:
    # The service's user owns the folder above the socket's folder: it may rename that folder.
    sockdir = local_user.home / "sock"
    sockdir.mkdir()
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    victim = _root_only_file(victim_dir, "app.sock")
    path = sockdir / "app.sock"
    p = inetd({"services": {"u": {"listen": str(path), "protocol": "unix", "exec": "/bin/cat"}}})
    assert path.is_socket()
    local_user.run(["mv", str(sockdir), f"{sockdir}.old"])
    local_user.run(["ln", "-s", str(victim_dir), str(sockdir)])
    assert p.stop() == 0
    assert victim.read_text() == "SECRET\n"
    assert not (local_user.home / "sock.old" / "app.sock").exists()  # its own socket went


def test_unix_socket_mode_and_owner_let_that_user_connect(
    inetd: Start, local_user: LocalUser
) -> None:
    path = local_user.home / "app.sock"
    svc = {
        "listen": str(path),
        "protocol": "unix",
        "exec": "/bin/cat",
        "socket_mode": "0660",
        "socket_user": local_user.name,
        "socket_group": local_user.gid,
    }
    inetd({"services": {"u": svc}})
    st = path.lstat()
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o660, local_user.uid, local_user.gid)
    talk = (
        "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
        "s.sendall(b'hi'); s.shutdown(socket.SHUT_WR); print(s.recv(10).decode())"
    )
    assert local_user.run([sys.executable, "-c", talk, str(path)]).stdout == b"hi\n"


def test_socket_keys_refused_where_there_is_no_socket_file(tmp_path: Path) -> None:
    conf = tmp_path / "inetd.yaml"
    port = free_port()
    conf.write_text(
        "services:\n"
        "  a: {listen: '@pyinetd-test', protocol: unix, exec: /bin/cat, socket_mode: '0600'}\n"
        f"  t: {{listen: {port}, exec: /bin/cat, socket_group: 0}}\n"
    )
    out = cli("-c", str(conf), "--check")
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"{conf}:2:64: services.a.socket_mode: only for a unix socket file (an abstract @name has "
        "no file and any local user can connect to it)",
        f"{conf}:3:{len(str(port)) + 33}: services.t.socket_group: only for a unix socket file "
        "(an abstract @name has no file and any local user can connect to it)",
    ]


def test_unix_socket_stale_file_is_replaced_but_not_a_regular_file(
    inetd: Start, tmp_path: Path
) -> None:
    path = tmp_path / "app.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))  # a server that died without removing its socket
    svc = {"listen": str(path), "protocol": "unix", "exec": "/bin/cat"}
    p = inetd({"services": {"u": svc}})
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))  # it is pyinetd's now
    assert p.stop() == 0
    assert not path.exists()
    path.write_text("data\n")
    out = cli("-c", str(p.path))
    assert out.returncode == 1 and "exists and is not a socket" in out.stderr
    assert path.read_text() == "data\n"


def test_stderr_file_the_service_user_may_not_write_is_a_load_error(
    local_user: LocalUser, tmp_path: Path
) -> None:
    logs = tmp_path / "logs"  # root's, 0755: the service's user cannot create err.log there
    logs.mkdir(mode=0o755)
    conf = tmp_path / "inetd.yaml"
    line = (
        f"  s: {{listen: {free_port()}, exec: /bin/cat, user: {local_user.name}, "
        f"stderr: {logs}/err.log}}"
    )
    conf.write_text(f"services:\n{line}\n")
    out = cli("-c", str(conf), "--check")
    assert (out.returncode, out.stderr) == (
        2,
        f"{conf}:2:{line.index('stderr:') + 1}: services.s.stderr: "
        f"'{logs}/err.log': user '{local_user.name}' may not write "
        "it (the file is opened with the service user's rights)\n",
    )


def test_pid_file_key_of_the_config_is_written(inetd: Start, tmp_path: Path) -> None:
    pidf = tmp_path / "from-config.pid"
    p = inetd({"pid_file": str(pidf), "services": {"e": {"listen": f"127.0.0.1:{free_port()}"}}})
    assert pidf.read_text() == f"{p.pid}\n"
    assert p.stop() == 0
    assert not pidf.exists()
