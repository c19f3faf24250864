"""Configuration: parsing, defaults, and the exact error messages a person reads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pyinetd.config import ConfigError, ListenAddress, load


def write(tmp_path: Path, text: str, name: str = "inetd.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def errors_of(tmp_path: Path, text: str, name: str = "inetd.yaml") -> list[str]:
    p = write(tmp_path, text, name)
    with pytest.raises(ConfigError) as info:
        load(p)
    return [e.replace(str(p), name) for e in info.value.errors]


def test_minimal_service_is_builtin_echo(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, "services:\n  e:\n    listen: 127.0.0.1:7007\n"))
    (svc,) = cfg.services
    assert svc.builtin == "echo" and svc.protocol == "tcp" and not svc.wait and svc.enabled
    assert svc.listen == (ListenAddress("127.0.0.1", 7007),)


def test_listen_forms(tmp_path: Path) -> None:
    cfg = load(
        write(
            tmp_path,
            "services:\n  e:\n    listen: ['[::1]:7', 8, '*:9', 'localhost:10', '0.0.0.0:11']\n",
        )
    )
    assert [str(a) for a in cfg.services[0].listen] == [
        "[::1]:7",
        "8",
        "9",
        "127.0.0.1:10",
        "0.0.0.0:11",
    ]


def test_exec_relative_to_config_folder_and_string_split(tmp_path: Path) -> None:
    (tmp_path / "svc").mkdir()
    prog = tmp_path / "svc" / "x.sh"
    prog.write_text("#!/bin/sh\n")
    prog.chmod(0o755)
    cfg = load(write(tmp_path, "services:\n  x:\n    listen: 7\n    exec: \"svc/x.sh 'a b' c\"\n"))
    assert cfg.services[0].exec == (str(prog), "a b", "c")
    assert cfg.services[0].builtin is None


def test_defaults_apply_and_service_overrides(tmp_path: Path) -> None:
    cfg = load(
        write(
            tmp_path,
            "defaults:\n  protocol: udp\n  stderr: 'null'\n"
            "services:\n  a: {listen: 7}\n  b: {listen: 8, protocol: tcp}\n",
        )
    )
    a, b = cfg.services
    assert (a.protocol, a.stderr, b.protocol, b.stderr) == ("udp", "null", "tcp", "null")


def test_toml_has_the_same_structure(tmp_path: Path) -> None:
    cfg = load(
        write(
            tmp_path,
            '[services.echo]\nlisten = "127.0.0.1:7007"\nbuiltin = "echo"\n',
            "inetd.toml",
        )
    )
    assert cfg.services[0].name == "echo"


def test_all_errors_at_once_with_file_service_and_key(tmp_path: Path) -> None:
    errs = errors_of(
        tmp_path,
        """
services:
  echo:
    listen: 127.0.0.1:70000
  upper:
    listen: 7008
    exec: /srv/upper.py
    usr: nobody
  both:
    listen: 7009
    exec: /bin/cat
    builtin: echo
  proto:
    listen: 7010
    protocol: sctp
  bad:
    listen: '300.1.2.3:7'
""",
    )
    assert errs == [
        "inetd.yaml: services.echo.listen: '127.0.0.1:70000': port must be 1-65535",
        "inetd.yaml: services.upper.exec: /srv/upper.py: no such file",
        errs[2],
        "inetd.yaml: services.both.exec: give either exec or builtin, not both",
        "inetd.yaml: services.proto.protocol: 'sctp': expected one of tcp, udp, unix",
        "inetd.yaml: services.bad.listen: '300.1.2.3:7': '300.1.2.3' is not an IP address",
    ]
    assert errs[2].startswith("inetd.yaml: services.upper.usr: unknown key")


def test_unknown_key_suggests_the_near_one(tmp_path: Path) -> None:
    errs = errors_of(tmp_path, "services:\n  e:\n    listen: 7\n    protcol: udp\n")
    assert errs == ["inetd.yaml: services.e.protcol: unknown key (did you mean 'protocol'?)"]


def test_duplicate_listen_addresses(tmp_path: Path) -> None:
    errs = errors_of(
        tmp_path,
        "services:\n  a: {listen: '127.0.0.1:7'}\n  b: {listen: 7}\n"
        "  c: {listen: 7, protocol: udp}\n",
    )
    assert errs == ["inetd.yaml: services.b.listen: '7': already used by service 'a' (127.0.0.1:7)"]


def test_not_executable(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("data")
    errs = errors_of(tmp_path, "services:\n  x: {listen: 7, exec: ./x}\n")
    assert errs == ["inetd.yaml: services.x.exec: ./x: not an executable file"]


def test_missing_listen_and_bad_yaml(tmp_path: Path) -> None:
    assert errors_of(tmp_path, "services:\n  x: {}\n") == [
        "inetd.yaml: services.x.listen: missing (e.g. listen: 127.0.0.1:7007)"
    ]
    (err,) = errors_of(tmp_path, "services: [\n")
    assert err == (
        "inetd.yaml:2:1: not valid YAML: expected the node content, but found '<stream end>'"
    )


def test_unknown_top_level_key(tmp_path: Path) -> None:
    errs = errors_of(tmp_path, "service:\n  x: {listen: 7}\n")
    assert errs[0] == "inetd.yaml: service: unknown key (did you mean 'services'?)"


def test_check_exit_codes(tmp_path: Path) -> None:
    good = write(tmp_path, "services:\n  e: {listen: 7007}\n", "good.yaml")
    bad = write(tmp_path, "services:\n  e: {listen: 70000}\n", "bad.yaml")
    ok = subprocess.run(
        [sys.executable, "-m", "pyinetd", "-c", str(good), "--check"],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    no = subprocess.run(
        [sys.executable, "-m", "pyinetd", "-c", str(bad), "--check"], capture_output=True, text=True
    )
    assert no.returncode == 2
    assert no.stderr == f"{bad}:2:7: services.e.listen: '70000': port must be 1-65535\n"


def test_shipped_config_is_valid() -> None:
    repo = Path(__file__).resolve().parent.parent
    cfg = load(repo / "inetd.yaml")
    assert {s.name for s in cfg.services} >= {"echo", "echo-udp"}


@pytest.mark.parametrize(
    ("listen", "redirect"),
    [
        ("127.0.0.1:7100", "127.0.0.1:7100"),
        ("7100", "127.0.0.5:7100"),  # every address: any loopback reaches it
        ("0.0.0.0:7100", "localhost:7100"),
        ("127.0.0.1:7100", "0.0.0.0:7100"),  # connect() to 0.0.0.0 is loopback
        ("'[::1]:7100'", "'[::]:7100'"),
    ],
)
def test_a_redirect_to_its_own_address_is_a_config_error(
    tmp_path: Path, listen: str, redirect: str
) -> None:
    """A self-redirect passed --check: one client built a chain of 30 relays (18.10)."""
    errs = errors_of(tmp_path, f"services:\n  r: {{listen: {listen}, redirect: {redirect}}}\n")
    assert len(errs) == 1 and errs[0].startswith("inetd.yaml: services.r.redirect: '"), errs
    assert errs[0].endswith("reaches the service's own listen address: a relay loop")


def test_a_redirect_loop_through_two_services_is_a_config_error(tmp_path: Path) -> None:
    errs = errors_of(
        tmp_path,
        "services:\n"
        "  a: {listen: 127.0.0.1:7101, redirect: 127.0.0.1:7102}\n"
        "  b: {listen: 127.0.0.1:7102, redirect: 127.0.0.1:7101}\n",
    )
    assert len(errs) == 2 and all("through other redirects: a relay loop" in e for e in errs)


def test_redirects_elsewhere_load_and_are_bounded_by_default(tmp_path: Path) -> None:
    """A redirect's connections are its front's: max_connections 1000 unless set; nodelay
    defaults to true for a front's service (tls, redirect), false for the others."""
    cfg = load(
        write(
            tmp_path,
            "services:\n"
            "  a: {listen: 127.0.0.1:7101, redirect: 127.0.0.1:7102}\n"
            "  b: {listen: 127.0.0.2:7101, redirect: 127.0.0.1:7101, max_connections: 3}\n"
            "  c: {listen: 127.0.0.1:7102, exec: /bin/cat}\n",
        )
    )
    limits = {s.name: s.max_connections for s in cfg.services}
    assert limits == {"a": 1000, "b": 3, "c": None}
    assert {s.name: s.nodelay for s in cfg.services} == {"a": True, "b": True, "c": False}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("cpu: 500ms", "cpu: '500ms': expected whole seconds >= 1 such as 10, '30s' or '5m'"),
        ("cpu: 1.5", "cpu: 1.5: expected CPU seconds such as 10, '10s' or '5m'"),  # the schema's
        ("cpu: 0", "cpu: 0: expected whole seconds >= 1 such as 10, '30s' or '5m'"),
        ("nofile: 1T", "nofile: '1T': expected 3 to {nr_open} (fs.nr_open)"),
        ("nofile: unlimited", "nofile: 'unlimited': expected 3 to {nr_open} (fs.nr_open)"),
        ("nofile: 2", "nofile: 2: expected 3 to {nr_open} (fs.nr_open)"),
    ],
)
def test_rlimits_that_would_kill_or_fail_every_spawn_are_refused(
    tmp_path: Path, value: str, message: str
) -> None:
    # `cpu: 500ms` became 0 (killed at once); `nofile: 1T` passed --check, then every spawn
    # failed with EPERM (above fs.nr_open even for root).
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    errs = errors_of(
        tmp_path, f"services:\n  x: {{listen: 7, exec: /bin/true, rlimits: {{{value}}}}}\n"
    )
    assert errs == [f"inetd.yaml: services.x.rlimits: {message.format(nr_open=nr_open)}"]


def test_rlimits_in_range_are_kept(tmp_path: Path) -> None:
    import resource

    cfg = load(
        write(
            tmp_path,
            "services:\n  x: {listen: 7, exec: /bin/true, "
            "rlimits: {cpu: 2m, nofile: 64, as: unlimited}}\n",
        )
    )
    assert dict(cfg.services[0].rlimits) == {
        resource.RLIMIT_CPU: 120,
        resource.RLIMIT_NOFILE: 64,
        resource.RLIMIT_AS: resource.RLIM_INFINITY,
    }


# ---------------------------------------------------------------- errors name file:line:column


def lines_of(path: Path) -> list[str]:
    """The errors as --check prints them, with the folder left out."""
    with pytest.raises(ConfigError) as info:
        load(path)
    return [e.replace(f"{path.parent}/", "") for e in info.value.lines]


def test_every_error_names_the_line_and_column_of_its_key_or_list_entry(tmp_path: Path) -> None:
    # Issue 16: only syntax errors had a position; a wrong type or a bad entry had none.
    path = write(
        tmp_path,
        "services:\n"
        "  two:\n"
        "    listen: 127.0.0.1:7302\n"
        "    exec: [/nonexistent/prog]\n"
        "  three:\n"
        "    listen: 127.0.0.1:7303\n"
        "    allow: [10.0.0.0/33, 192.168.1.300, '::1/129']\n"
        "    timeout: yes\n"
        "    env: {A: b, C: [1]}\n",
    )
    assert lines_of(path) == [
        "inetd.yaml:4:12: services.two.exec: /nonexistent/prog: no such file",
        "inetd.yaml:7:13: services.three.allow: '10.0.0.0/33': not an address or network",
        "inetd.yaml:7:26: services.three.allow: '192.168.1.300': not an address or network",
        "inetd.yaml:7:41: services.three.allow: '::1/129': not an address or network",
        # `yes` is YAML's true: said in the file's terms, not Python's `True`
        "inetd.yaml:8:5: services.three.timeout: a boolean: expected a duration >= 0 such as "
        "30, '30s', '500ms' or '5m'",
        "inetd.yaml:9:17: services.three.env: C: [1]: expected text",
    ]


def test_a_service_given_twice_in_one_file_is_an_error_naming_both_lines(tmp_path: Path) -> None:
    # YAML keeps the last of two equal keys: the first service vanished and --check said ok.
    path = write(
        tmp_path,
        "services:\n"
        "  one: {listen: 127.0.0.1:7301}\n"
        "  two: {listen: 127.0.0.1:7302, wait: false, wait: true}\n"
        "  one: {listen: 127.0.0.1:7304}\n",
    )
    assert lines_of(path) == [
        "inetd.yaml:4:3: services.one: given twice, on lines 2 and 4",
        "inetd.yaml:3:46: services.two.wait: given twice, on lines 3 and 3",
    ]


def test_errors_in_an_included_file_name_its_lines(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    write(
        tmp_path / "conf.d",
        "services:\n  x: {listen: 7401}\n  y:\n    listen: 127.0.0.1:7402\n    nice: 40\n"
        "  x: {listen: 7403}\n",
        "x.yaml",
    )
    path = write(tmp_path, "include: conf.d/*.yaml\n")
    assert lines_of(path) == [
        "conf.d/x.yaml:6:3: services.x: given twice, on lines 2 and 6",
        "conf.d/x.yaml:5:5: services.y.nice: 40: expected a number from -20 to 19",
    ]


def test_toml_errors_name_the_line_found_by_scanning_the_text(tmp_path: Path) -> None:
    # tomllib gives no positions; a light scan of the text finds the keys and list entries.
    path = write(
        tmp_path,
        'workers = 1\n\n[services.one]\nlisten = "127.0.0.1:7301"\n'
        'allow = ["10.0.0.0/33", "10.0.0.1", "1.2.3.400"]\n\n'
        '[services."two"]\nlisten = "127.0.0.1:7302"\nenv = { A = "b", C = true }\n',
        "inetd.toml",
    )
    assert lines_of(path) == [
        "inetd.toml:5:10: services.one.allow: '10.0.0.0/33': not an address or network",
        "inetd.toml:5:37: services.one.allow: '1.2.3.400': not an address or network",
        "inetd.toml:9:18: services.two.env: C: a boolean: expected text",
    ]


def test_check_prints_the_positions(tmp_path: Path) -> None:
    path = write(tmp_path, "services:\n  e:\n    listen: 7007\n    wait: 'yes'\n")
    out = subprocess.run(
        [sys.executable, "-m", "pyinetd", "-c", str(path), "--check"],
        capture_output=True,
        text=True,
    )
    assert (out.returncode, out.stderr) == (
        2,
        f"{path}:4:5: services.e.wait: 'yes': expected true or false\n",
    )


def test_argv0_is_for_services_that_start_a_program(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "defaults: {argv0: httpd}\n"
        "services:\n"
        "  www: {listen: 7008, exec: [/bin/cat, -u]}\n"
        "  echo: {listen: 7009}\n",
    )
    www, echo = load(path).services
    assert (www.exec[1:], www.argv0, echo.argv0) == (("-u",), "httpd", None)
    assert errors_of(tmp_path, "services:\n  e: {listen: 7007, builtin: echo, argv0: x}\n") == [
        "inetd.yaml: services.e.argv0: only with exec (the argv[0] of the program it starts)"
    ]


def test_interface_access_times_load_and_socket_option_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "defaults: {keepalive: true, nodelay: true, interface: lo}\n"
        "services:\n"
        "  t:\n"
        "    listen: 127.0.0.1:7010\n"
        "    access_times: '08:00-12:00 22:00-02:00'\n"
        "    max_load: 4\n"
        "    send_buffer: 256k\n"
        "    receive_buffer: 65536\n"
        "  u: {listen: 127.0.0.1:7011, protocol: udp}\n"
        "  x: {listen: x.sock, protocol: unix}\n",
    )
    t, u, x = load(path).services
    assert (t.interface, t.access_times, t.max_load) == ("lo", ((480, 720), (1320, 120)), 4.0)
    assert (t.keepalive, t.nodelay, t.send_buffer, t.receive_buffer) == (True, True, 262144, 65536)
    # From defaults, what does not apply to a protocol is left out; given there, it is an error.
    assert (u.interface, u.keepalive, u.nodelay) == ("lo", False, False)
    assert (x.interface, x.keepalive) == (None, False)
    assert errors_of(
        tmp_path,
        "services:\n"
        "  u: {listen: 7012, protocol: udp, nodelay: true, access_times: '8:00-9:00 9:60-10:00'}\n"
        "  t: {listen: 7013, interface: 'a/b', max_load: 0, send_buffer: 1T, keepalive: 1}\n",
    ) == [
        "inetd.yaml: services.u.access_times: '9:60-10:00': expected HH:MM-HH:MM, 00:00 to 24:00",
        "inetd.yaml: services.u.nodelay: only for protocol tcp",
        "inetd.yaml: services.t.interface: 'a/b': expected a network interface name such as lo "
        "or eth0",
        "inetd.yaml: services.t.max_load: 0: expected a load average such as 4 or 2.5",
        "inetd.yaml: services.t.send_buffer: '1T': expected a size in bytes such as 65536 or "
        "'256k'",
        "inetd.yaml: services.t.keepalive: 1: expected true or false",
    ]


def test_syntax_errors_have_the_file_line_column_form(tmp_path: Path) -> None:
    """Editors and CI parse FILE:LINE:COL: the parsers' own errors have it too, and a tab
    (which YAML forbids in indentation) is named in plain words."""
    tab = tmp_path / "tab.yaml"
    tab.write_text("services:\n  cat:\n\tlisten: 127.0.0.1:7100\n    exec: [/bin/cat]\n")
    toml = tmp_path / "bad.toml"
    toml.write_text('[services.cat]\nlisten = "127.0.0.1:7101"\nexec = ["/bin/cat]\n')
    with pytest.raises(ConfigError) as yaml_err:
        load(tab)
    assert yaml_err.value.lines == [
        f"{tab}:3:1: not valid YAML: found character '\\t' that cannot start any token "
        "(YAML forbids tabs in indentation: indent with spaces)"
    ]
    with pytest.raises(ConfigError) as toml_err:
        load(toml)
    assert toml_err.value.lines[0].startswith(f"{toml}:3:19: not valid TOML: ")


def test_a_disabled_service_is_checked_for_types_only_and_never_stops_the_rest(
    tmp_path: Path,
) -> None:
    """Debian's xinetd.d keeps services `disable = yes` whose servers are not installed:
    their program, user, group, folders and TLS files need not exist, their port may be
    another service's; a wrong type is still an error."""
    text = (
        "services:\n"
        "  echo: {listen: '127.0.0.1:7007'}\n"
        "  telnet:\n"
        "    listen: '127.0.0.1:7007'\n"
        "    enabled: false\n"
        "    exec: [/usr/sbin/in.telnetd-not-installed, -h]\n"
        "    user: pyi-admin-no-such-user\n"
        "    group: pyi-admin-no-such-group\n"
        "    cwd: /nonexistent/folder\n"
        "    stderr: /nonexistent/folder/telnet.log\n"
        "    banner: /nonexistent/banner.txt\n"
        "  tftp: {listen: /nonexistent/folder/t.sock, protocol: unix, enabled: false,\n"
        "         exec: not-in-path-pyi-admin}\n"
        "  tls: {listen: 7008, enabled: false, exec: /bin/cat,\n"
        "        tls: {cert: /nonexistent/c.pem, key: /nonexistent/k.pem}}\n"
    )
    cfg = load(write(tmp_path, text))
    telnet = next(s for s in cfg.services if s.name == "telnet")
    assert not telnet.enabled
    assert telnet.exec == ("/usr/sbin/in.telnetd-not-installed", "-h")
    assert telnet.user is not None and telnet.user[0] == "pyi-admin-no-such-user"
    assert [s.name for s in cfg.enabled_services] == ["echo"]
    # The same services enabled: each lookup is an error again.
    errors = errors_of(tmp_path, text.replace("enabled: false", "enabled: true"))
    assert any("in.telnetd-not-installed: no such file" in e for e in errors), errors
    assert any("'pyi-admin-no-such-user': no such user" in e for e in errors), errors
    # Types and forms are still checked on a disabled service.
    bad = errors_of(
        tmp_path,
        "services:\n  t: {listen: 7009, enabled: false, exec: /bin/cat, timeout: soon,"
        " user: [1]}\n",
    )
    assert any("services.t.timeout: 'soon'" in e for e in bad), bad
    assert any("services.t.user: [1]: expected a user name or number" in e for e in bad), bad


def test_check_and_start_skip_a_disabled_services_tls_files(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "services:\n  e: {listen: '127.0.0.1:7011'}\n"
        "  t: {listen: 7012, enabled: false, exec: /bin/cat,"
        " tls: {cert: /nonexistent/c.pem, key: /nonexistent/k.pem}}\n",
    )
    out = subprocess.run(
        [sys.executable, "-m", "pyinetd", "--check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{path}: ok, 2 services"
