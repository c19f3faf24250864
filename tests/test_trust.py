"""Config trust (StrictModes as root, issue 18.4) and bounded loading (issue 14.9)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import DEADLINE, LocalUser, Pyinetd, free_port, tcp_talk

from pyinetd import trust
from pyinetd.config import ConfigError, load
from pyinetd.config.document import MAX_NODES

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="StrictModes apply as root only")


def check(path: Path, timeout: float = DEADLINE) -> subprocess.CompletedProcess[str]:
    """`pyinetd --check` on path, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "pyinetd", "-c", str(path), "--check"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def refused(path: Path) -> str:
    """The one error line load() gives for path."""
    with pytest.raises(ConfigError) as info:
        load(path)
    assert len(info.value.errors) == 1, info.value.errors
    return info.value.errors[0]


def echo_config(port: int = 7) -> str:
    return f"services:\n  e: {{listen: '127.0.0.1:{port}', builtin: echo}}\n"


# --- issue 18.4: StrictModes -------------------------------------------------------------------


@needs_root
def test_tmp_path_as_root_is_trusted(tmp_path: Path) -> None:
    # pytest's tmp_path: /tmp (root, 1777) / pytest-of-root (root, 0700) / ...: every test's
    # configuration lives there, as /tmp/some-root-dir would on a real machine.
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "a.yaml").write_text("services:\n  a: {listen: 8, builtin: echo}\n")
    cfg = tmp_path / "inetd.yaml"
    cfg.write_text("include: conf.d/*.yaml\n" + echo_config())
    assert [s.name for s in load(cfg).services] == ["e", "a"]


@needs_root
def test_main_config_owned_by_another_user_is_refused(
    tmp_path: Path, local_user: LocalUser
) -> None:
    cfg = tmp_path / "inetd.yaml"
    cfg.write_text(echo_config())
    os.chown(cfg, local_user.uid, local_user.gid)  # mode 0644: the old check saw nothing
    r = check(cfg)
    assert r.returncode == 2, r
    assert r.stderr == f"{cfg}: configuration file owned by uid {local_user.uid} " + (
        f"({local_user.name}), not root\n"
    )


@needs_root
def test_config_group_writable_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "inetd.yaml"
    cfg.write_text(echo_config())
    cfg.chmod(0o664)
    assert refused(cfg) == (
        f"{cfg}: configuration file writable by group (mode 0664); chmod go-w {cfg}"
    )


@needs_root
def test_config_in_a_folder_of_another_user_is_refused(local_user: LocalUser) -> None:
    # A root-owned 0644 file in a folder the user owns: they can rename another file over it.
    cfg = local_user.home / "inetd.yaml"
    cfg.write_text(echo_config())
    assert refused(cfg) == (
        f"{local_user.home}: folder owned by uid {local_user.uid} ({local_user.name}), not root"
    )


@needs_root
def test_symlinked_config_is_checked_where_it_really_is(
    tmp_path: Path, local_user: LocalUser
) -> None:
    real = local_user.home / "inetd.yaml"
    real.write_text(echo_config())
    link = tmp_path / "inetd.yaml"
    link.symlink_to(real)
    assert refused(link).startswith(f"{local_user.home}: folder owned by uid {local_user.uid}")


@needs_root
def test_config_of_another_user_in_a_sticky_folder_is_refused(
    tmp_path: Path, local_user: LocalUser
) -> None:
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    cfg = sticky / "inetd.yaml"
    cfg.write_text(echo_config())
    load(cfg)  # root's file in a root-owned sticky folder: nobody else may replace it
    os.chown(cfg, local_user.uid, local_user.gid)
    assert "owned by uid" in refused(cfg)
    os.chown(cfg, 0, 0)
    os.chown(sticky, local_user.uid, local_user.gid)  # a sticky folder not root's: no
    assert refused(cfg) == (
        f"{sticky}: folder owned by uid {local_user.uid} ({local_user.name}), not root"
    )


@needs_root
def test_included_file_owned_by_another_user_is_refused(
    tmp_path: Path, local_user: LocalUser
) -> None:
    (tmp_path / "conf.d").mkdir()
    drop = tmp_path / "conf.d" / "evil.yaml"
    drop.write_text("services:\n  evil: {listen: 9, exec: [/usr/bin/id]}\n")
    os.chown(drop, local_user.uid, local_user.gid)
    cfg = tmp_path / "inetd.yaml"
    cfg.write_text("include: conf.d/*.yaml\n" + echo_config())
    assert refused(cfg).startswith(f"{drop}: configuration file owned by uid {local_user.uid}")


@needs_root
@pytest.mark.parametrize("how", ["mode 1777", "owned by the user"])
def test_include_folder_others_may_write_is_refused(
    tmp_path: Path, local_user: LocalUser, how: str
) -> None:
    # The attack: anyone drops `exec: /usr/bin/id` into conf.d and it runs as uid 0. Refused
    # even when the drop-in is (made) root's: whoever may add files there adds services.
    conf_d = tmp_path / "conf.d"
    conf_d.mkdir()
    if how == "mode 1777":
        conf_d.chmod(0o1777)
        why = "include folder writable by group and others (mode 1777)"
    else:
        os.chown(conf_d, local_user.uid, local_user.gid)
        why = f"include folder owned by uid {local_user.uid} ({local_user.name}), not root"
    (conf_d / "evil.yaml").write_text("services:\n  evil: {listen: 9, exec: [/usr/bin/id]}\n")
    cfg = tmp_path / "inetd.yaml"
    cfg.write_text("include: conf.d/*.yaml\n" + echo_config())
    r = check(cfg)
    assert r.returncode == 2
    assert r.stderr.startswith(f"{cfg}:1:1: include: {conf_d}: {why}"), r.stderr


@needs_root
def test_exec_program_of_another_user_run_as_root_is_refused(
    tmp_path: Path, local_user: LocalUser
) -> None:
    prog = tmp_path / "svc.sh"
    prog.write_text("#!/bin/sh\nid\n")
    prog.chmod(0o755)
    os.chown(prog, local_user.uid, local_user.gid)
    cfg = tmp_path / "inetd.yaml"
    cfg.write_text(f"services:\n  s: {{listen: 9, exec: [{prog}]}}\n")
    assert refused(cfg) == (
        f"{cfg}: services.s.exec: {prog}: program run as root owned by uid {local_user.uid} "
        f"({local_user.name}), not root (the service runs as root)"
    )
    # Run as that very user it is theirs to change: accepted.
    cfg.write_text(f"services:\n  s: {{listen: 9, exec: [{prog}], user: {local_user.name}}}\n")
    assert load(cfg).services[0].exec == (str(prog),)


@needs_root
def test_exec_program_others_may_write_is_refused(tmp_path: Path) -> None:
    prog = tmp_path / "svc.sh"
    prog.write_text("#!/bin/sh\nid\n")
    prog.chmod(0o777)
    cfg = tmp_path / "inetd.yaml"
    cfg.write_text(f"services:\n  s: {{listen: 9, exec: [{prog}], user: root}}\n")
    assert "program run as root writable by group and others (mode 0777)" in refused(cfg)


def _evil_script(user: LocalUser, name: str, body: str) -> Path:
    """A script in another local user's home, theirs to change (/home/eve/bin/evil.sh)."""
    folder = user.home / "bin"
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(body)
    path.chmod(0o755)
    for p in (folder, path):
        os.chown(p, user.uid, user.gid)
    return path


def _owned_by(path: Path, user: LocalUser, what: str) -> str:
    return (
        f"{path}: {what} run as root owned by uid {user.uid} ({user.name}), not root "
        "(the service runs as root)"
    )


def _runs_a_script(
    tmp_path: Path, user: LocalUser, argv: list[str], body: str
) -> tuple[Path, Path, list[str]]:
    """A config whose one service runs ``argv`` with each SCRIPT replaced by a script of
    ``user``'s (``body``): (the config, the script, that argv); skipped where ``argv[0]`` is
    not installed."""
    if not os.path.exists(argv[0]):
        pytest.skip(f"no {argv[0]}")
    evil = _evil_script(user, "evil", body)
    argv = [str(evil) if a == "SCRIPT" else a for a in argv]
    cfg = tmp_path / "inetd.yaml"
    cfg.write_text(f"services:\n  s: {{listen: '127.0.0.1:9', exec: {argv!r}}}\n")
    return cfg, evil, argv


@needs_root
@pytest.mark.parametrize(
    "argv",
    [
        ["/usr/bin/env", "python3", "SCRIPT"],
        ["/bin/bash", "-e", "SCRIPT"],
        ["/bin/sh", "SCRIPT", "arg"],
        ["/usr/bin/env", "-S", "bash -e", "SCRIPT"],
        ["/usr/bin/python3", "-u", "-W", "ignore", "SCRIPT"],
        ["/usr/bin/perl", "-w", "SCRIPT"],
        ["/usr/bin/node", "--require", "fs", "SCRIPT"],
    ],
    ids=["env-python3", "bash-e", "sh", "env-S", "python3", "perl", "node"],
)
def test_the_script_an_interpreter_runs_as_root_is_checked_like_the_program(
    tmp_path: Path, local_user: LocalUser, argv: list[str]
) -> None:
    """Another user's script handed to a root-owned interpreter ran as root (--check ok, the
    service printed uid 0), while `exec: [SCRIPT]` was refused (issue 24.9)."""
    cfg, evil, _ = _runs_a_script(tmp_path, local_user, argv, "#!/bin/sh\nid -u\n")
    r = check(cfg)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"{cfg}:2:" in r.stderr, r.stderr  # file:line:col, as every error
    assert _owned_by(evil, local_user, "script") in r.stderr, r.stderr
    assert refused(cfg) == f"{cfg}: services.s.exec: " + _owned_by(evil, local_user, "script")
    # Run as that very user it is theirs to change: accepted.
    cfg.write_text(
        f"services:\n  s: {{listen: '127.0.0.1:9', exec: {argv!r}, user: {local_user.name}}}\n"
    )
    assert load(cfg).services[0].exec[1:] == tuple(argv[1:])


@pytest.mark.parametrize(
    ("argv", "script"),
    [
        (["/bin/sh", "-c", "cmd", "x"], None),
        (["bash", "-eu", "-o", "pipefail", "S", "a"], ("S", True)),
        (["zsh", "+o", "x", "--", "-S"], ("-S", True)),
        (["bash", "-s", "x"], None),
        (["bash", "--rcfile", "rc", "S"], ("S", True)),
        (["perl", "-lne", "print", "x"], None),
        (["perl", "-I", "lib", "-Mstrict", "-w", "S"], ("S", False)),
        (["perl", "-S", "S"], ("S", True)),
        (["ruby", "-r", "json", "-W0", "S"], ("S", False)),
        (["ruby", "-e", "p 1"], None),
        (["node", "--require", "m", "--inspect=9", "S"], ("S", False)),
        (["node", "-pe", "1"], None),
        (["python3", "-u", "-W", "ignore", "-X", "dev", "S", "-c"], ("S", False)),
        (["python3.11", "-Bc", "print()", "x"], None),
        (["python3", "-m", "http.server"], None),
        (["python3", "-"], None),
        (["/usr/bin/cat", "S"], None),  # no interpreter: cat reads S, runs nothing
    ],
)
def test_the_script_of_a_command_line(argv: list[str], script: tuple[str, bool] | None) -> None:
    assert trust.script_of(argv) == script


def test_what_env_runs() -> None:
    assert trust.env_target(["-S", "python3 -u", "S"], "/p", "/") == (
        "python3",
        ["-u", "S"],
        "/p",
        "/",
    )
    assert trust.env_target(["-i", "A=1", "x"], "/p", "/") == ("x", [], "/bin:/usr/bin", "/")
    assert trust.env_target(["--chdir=/t", "-u", "V", "PATH=/o", "n"], "/p", "/") == (
        "n", [], "/o", "/t"
    )  # fmt: skip
    assert trust.env_target(["-i", "A=1"], "/p", "/") is None


@needs_root
def test_a_warm_python_script_of_another_user_run_as_root_is_refused(
    tmp_path: Path, local_user: LocalUser
) -> None:
    """`warm: true` with `exec: [/usr/bin/python3, SCRIPT]`: the zygote, as root, compiles and
    runs the script another user owns."""
    evil = _evil_script(local_user, "evil.py", "import os\nprint(os.getuid())\n")
    cfg = tmp_path / "inetd.yaml"
    cfg.write_text(
        f"services:\n  s: {{listen: '127.0.0.1:9', exec: [/usr/bin/python3, {evil}], warm: true}}\n"
    )
    assert refused(cfg) == f"{cfg}: services.s.exec: " + _owned_by(evil, local_user, "script")


@needs_root
def test_what_env_and_a_shebang_run_as_root_is_checked_like_the_program(
    tmp_path: Path, local_user: LocalUser
) -> None:
    """`env NAME` runs the NAME it finds on the service's PATH; a root script's `#!` names
    the interpreter the kernel runs: another user's program either way."""
    evil = _evil_script(local_user, "evil", "#!/bin/sh\nid -u\n")
    cfg = tmp_path / "inetd.yaml"
    cfg.write_text(
        f"services:\n  s: {{listen: '127.0.0.1:9', exec: [/usr/bin/env, evil], "
        f"env: {{PATH: '{evil.parent}:/usr/bin'}}}}\n"
    )
    assert refused(cfg) == f"{cfg}: services.s.exec: " + _owned_by(evil, local_user, "program")
    mine = tmp_path / "svc"
    mine.write_text(f"#!{evil} -x\n")
    mine.chmod(0o755)
    cfg.write_text(f"services:\n  s: {{listen: '127.0.0.1:9', exec: [{mine}]}}\n")
    assert refused(cfg) == f"{cfg}: services.s.exec: " + _owned_by(evil, local_user, "program")


@needs_root
@pytest.mark.parametrize(
    "argv",
    [
        ["/bin/sh", "-c", "exec cat", "SCRIPT"],  # a command string; SCRIPT is its $0
        ["/usr/bin/python3", "-c", "print(1)", "SCRIPT"],
        ["/usr/bin/python3", "-m", "http.server"],  # a module on sys.path, not a file
        ["/usr/bin/perl", "-e", "print 1", "SCRIPT"],
        ["/usr/bin/env", "-i", "FOO=1", "/bin/cat", "SCRIPT"],  # cat reads it, runs nothing
    ],
    ids=["sh-c", "python-c", "python-m", "perl-e", "env-cat"],
)
def test_a_command_with_no_script_file_is_not_refused(
    tmp_path: Path, local_user: LocalUser, argv: list[str]
) -> None:
    cfg, _, argv = _runs_a_script(tmp_path, local_user, argv, "id\n")
    assert load(cfg).services[0].exec[1:] == tuple(argv[1:])


@needs_root
def test_a_script_not_there_yet_must_be_in_a_folder_only_root_may_write(
    tmp_path: Path, local_user: LocalUser
) -> None:
    later = _evil_script(local_user, "x", "").parent / "later.sh"
    cfg = tmp_path / "inetd.yaml"
    cfg.write_text(f"services:\n  s: {{listen: '127.0.0.1:9', exec: [/bin/sh, {later}]}}\n")
    assert refused(cfg) == (
        f"{cfg}: services.s.exec: {later.parent}: folder of a script run as root owned by "
        f"uid {local_user.uid} ({local_user.name}), not root (the service runs as root)"
    )
    cfg.write_text(
        f"services:\n  s: {{listen: '127.0.0.1:9', exec: [/bin/sh, {tmp_path}/later.sh]}}\n"
    )
    assert load(cfg).services[0].exec[1] == f"{tmp_path}/later.sh"


def test_untrusted_files_are_fine_when_not_root(tmp_path: Path) -> None:
    # StrictModes are for root; a user running pyinetd trusts their own files.
    if os.geteuid() == 0:
        r = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
             "from pyinetd import trust; trust.check_folder('/tmp'); print('ok')"],
            capture_output=True, text=True, timeout=DEADLINE, cwd="/",
        )  # fmt: skip
        assert r.stdout == "ok\n", r.stderr
    else:
        trust.check_folder("/tmp")


# --- issue 14.9: bounded loading ---------------------------------------------------------------

# The nine lines of the report: each list holds nine of the one before, 9**9 "lol"s in all.
BOMB = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + "".join(
    f"{a}: &{a} [{', '.join([f'*{prev}'] * 9)}]\n"
    for prev, a in zip("abcdefgh", "bcdefghi", strict=True)
)


def test_billion_laughs_is_refused_at_once(tmp_path: Path) -> None:
    cfg = tmp_path / "inetd.yaml"
    cfg.write_text(BOMB + echo_config())
    # Bounded, not timed: the loader stops counting at MAX_NODES (the message says so); the
    # subprocess deadline only keeps a regression from hanging the suite (it took 51 s, 386 MB).
    r = check(cfg, timeout=DEADLINE)
    assert r.returncode == 2
    assert r.stderr == (f"{cfg}: more than {MAX_NODES} values (aliases expanded); refusing it\n")


def test_alias_to_itself_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "inetd.yaml"
    cfg.write_text("x: &x [1, *x]\n" + echo_config())
    assert "aliases expanded" in refused(cfg)


def test_a_few_aliases_are_fine(tmp_path: Path) -> None:
    cfg = tmp_path / "inetd.yaml"
    cfg.write_text(
        "x-common: &common {builtin: echo, timeout: 5}\n"
        "services:\n  a: {<<: *common, listen: 7}\n  b: {<<: *common, listen: 8}\n"
    )
    with pytest.raises(ConfigError, match="x-common: unknown key"):
        load(cfg)  # (a top-level anchor holder is an unknown key; the aliases are not refused)
    cfg.write_text(
        "defaults: &d {timeout: 5}\nservices:\n  a: {<<: *d, listen: 7}\n  b: {<<: *d, listen: 8}\n"
    )
    assert [s.timeout for s in load(cfg).services] == [5, 5]


@pytest.mark.parametrize("target", ["/dev/zero", "fifo"])
def test_include_of_something_not_a_file_is_refused(tmp_path: Path, target: str) -> None:
    if target == "fifo":
        (tmp_path / "conf.d").mkdir()
        os.mkfifo(tmp_path / "conf.d" / "x.yaml")  # a --check used to hang on it for good
        pattern, name = "conf.d/*.yaml", str(tmp_path / "conf.d" / "x.yaml")
    else:
        pattern = name = target  # was a MemoryError traceback
    cfg = tmp_path / "inetd.yaml"
    cfg.write_text(f"include: {pattern}\n" + echo_config())
    r = check(cfg)
    assert (r.returncode, r.stderr) == (2, f"{name}: not a regular file\n")


def test_main_config_fifo_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "inetd.yaml")
    r = check(tmp_path / "inetd.yaml")
    assert (r.returncode, r.stderr) == (2, f"{tmp_path / 'inetd.yaml'}: not a regular file\n")


def test_config_over_one_mib_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "inetd.yaml"
    cfg.write_text(echo_config() + "#" * (1 << 20) + "\n")
    assert refused(cfg) == f"{cfg}: larger than 1024 KiB"


def test_many_env_keys_are_refused(tmp_path: Path) -> None:
    # 300,000 keys took 27 s and 440 MB; 1 MiB holds ~100,000, and a service gets 1,000.
    cfg = tmp_path / "inetd.yaml"
    env = "".join(f"      K{i}: v\n" for i in range(300_000))
    cfg.write_text(echo_config() + "    env:\n" + env)
    assert "larger than 1024 KiB" in refused(cfg)
    env = "".join(f"      K{i}: v\n" for i in range(1001))
    cfg.write_text("services:\n  e:\n    listen: 7\n    exec: [/bin/true]\n    env:\n" + env)
    assert refused(cfg) == f"{cfg}: services.e.env: 1001 variables: at most 1000"


def test_many_values_are_refused_quickly(tmp_path: Path) -> None:
    cfg = tmp_path / "inetd.yaml"
    cfg.write_text(echo_config() + "x: [" + ",".join(["1"] * 300_000) + "]\n")
    assert "more than 50000 values" in refused(cfg)


def test_error_lines_are_short(tmp_path: Path) -> None:
    cfg = tmp_path / "inetd.yaml"
    cfg.write_text(f"services:\n  e: {{listen: 7, builtin: {'x' * 100_000}}}\n")
    (err,) = refused(cfg).splitlines()
    assert len(err) <= 1000 and err.endswith("...")


def test_alias_bomb_reload_keeps_serving(tmp_path: Path, inetd: Callable[..., Pyinetd]) -> None:
    port = free_port()
    p = inetd(echo_config(port))
    p.path.write_text(BOMB + echo_config(port))
    p.signal(signal.SIGHUP)
    p.wait_log("reload failed.*aliases expanded")  # (it froze every service for 31 s)
    assert tcp_talk(port, b"still here\n") == b"still here\n"


@needs_root
@pytest.mark.parametrize(
    ("mode", "owner", "why"),
    [
        (0o666, "root", "TLS key writable by group and others (mode 0666); chmod go-w {key}"),
        (0o604, "root", "TLS key readable by others (mode 0604); chmod go-rwx {key}"),
        (0o640, "group", "TLS key readable by group {gid} (mode 0640); chmod go-rwx {key}"),
        (0o600, "user", "TLS key owned by uid {uid} ({name}), not root"),
        (0o640, "root", None),  # group-readable by root's own group: fine
    ],
)
def test_tls_key_others_may_read_or_write_is_refused(
    tmp_path: Path, local_user: LocalUser, mode: int, owner: str, why: str | None
) -> None:
    trustme = pytest.importorskip("trustme")
    cert = trustme.CA().issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    key = tmp_path / "key.pem"
    cert.private_key_pem.write_to_path(key)
    key.chmod(mode)
    if owner != "root":
        os.chown(key, local_user.uid if owner == "user" else 0, local_user.gid)
    cfg = tmp_path / "inetd.yaml"
    cfg.write_text(
        "services:\n  t: {listen: 9, exec: [/bin/cat], tls: {cert: cert.pem, key: key.pem}}\n"
    )
    r = check(cfg)
    if why is None:
        assert r.returncode == 0, r.stderr
        return
    why = why.format(uid=local_user.uid, gid=local_user.gid, name=local_user.name, key=key)
    assert (r.returncode, r.stderr) == (2, f"{cfg}:2:58: services.t.tls.key: {key}: {why}\n")
