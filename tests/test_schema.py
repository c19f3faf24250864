"""The configuration's JSON Schema: its keys, its messages, and print-config round trips."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pwd
import re
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from pyinetd import config
from pyinetd.cli import main
from pyinetd.config import Config, ConfigError, keys, load, parsers, schema
from pyinetd.config.printconfig import to_dict
from pyinetd.config.writer import write
from pyinetd.sandbox import SandboxSettings

REPO = Path(__file__).resolve().parent.parent

# Service keys in the schema that config.py does not parse yet (relay, TLS, PROXY protocol).
PLANNED_SERVICE_KEYS: set[str] = set()
PLANNED_TOP_KEYS: set[str] = set()


def schema_errors(doc: Any) -> list[str]:
    return schema.validate(doc, "inetd.yaml")


def load_errors(tmp_path: Path, doc: Any, name: str = "inetd.yaml") -> list[str]:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(ConfigError) as info:
        load(path)
    return [e.replace(str(path), name) for e in info.value.errors]


# ---------------------------------------------------------------- the schema itself


def test_schema_is_a_valid_draft_2020_12_schema() -> None:
    doc = schema.load_schema()
    assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(doc)


def test_schema_keys_are_config_keys_plus_planned_ones() -> None:
    defs = schema.load_schema()["$defs"]
    service = set(defs["service"]["properties"])
    assert service == set(config.SERVICE_PARSERS) | PLANNED_SERVICE_KEYS
    assert set(defs["defaults"]["properties"]) == service - {"listen"}
    top = set(schema.load_schema()["properties"])
    assert top == set(config.TOP_NAMES) | PLANNED_TOP_KEYS


def test_every_key_has_a_description_and_every_mapping_is_closed() -> None:
    doc = schema.load_schema()
    defs = doc["$defs"]
    for key in defs["service"]["properties"]:
        assert defs[key].get("description"), key
    for key, node in doc["properties"].items():
        assert (defs[node["$ref"].split("/")[-1]] if "$ref" in node else node)["description"], key

    def walk(node: Any, where: str) -> None:
        if isinstance(node, Mapping):
            if "properties" in node and "type" in node:  # not the if/then fragments
                assert node.get("additionalProperties") is False, where
            for k, v in node.items():
                walk(v, f"{where}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}/{i}")

    walk(doc, "#")


def test_load_schema_returns_a_copy() -> None:
    schema.load_schema()["properties"].clear()
    assert "services" in schema.load_schema()["properties"]


# ---------------------------------------------------------------- messages


def test_validate_words_errors_like_config_py() -> None:
    doc = {
        "max_children": 0,
        "services": {
            "echo": {"listen": 7007, "usr": "nobody", "wait": "yes", "protocol": "sctp"},
            "x": {"exec": "/bin/cat", "builtin": "echo", "env": {"A=B": "1", "C": True}},
        },
    }
    assert schema_errors(doc) == [
        "inetd.yaml: max_children: 0: expected a whole number >= 1",
        "inetd.yaml: services.echo.protocol: 'sctp': expected one of tcp, udp, unix",
        "inetd.yaml: services.echo.usr: unknown key (did you mean 'user'?)",
        "inetd.yaml: services.echo.wait: 'yes': expected true or false",
        "inetd.yaml: services.x.env: 'A=B': not a valid environment variable name",
        "inetd.yaml: services.x.env: C: a boolean: expected text",
        "inetd.yaml: services.x.exec: give either exec or builtin, not both",
        "inetd.yaml: services.x.listen: missing (e.g. listen: 127.0.0.1:7007)",
    ]


def test_validate_nested_keys_and_list_items() -> None:
    doc = {
        "include": ["conf.d/*.yaml", 3],
        "services": {
            "t": {
                "listen": [7, True],
                "rlimits": {"nofile": "lots", "fsz": 1},
                "tls": {"cert": "c.pem", "min_version": "1.1"},
            }
        },
    }
    assert schema_errors(doc) == [
        "inetd.yaml: include: 3: expected a glob pattern or a list of them",
        "inetd.yaml: services.t.listen: a boolean: expected HOST:PORT, [IPV6]:PORT or PORT "
        "(port 1-65535)",
        "inetd.yaml: services.t.rlimits: nofile: 'lots': expected a whole size such as 100, "
        "'64k', '512M', '1G' or 'unlimited'",
        "inetd.yaml: services.t.rlimits: fsz: unknown key (did you mean 'fsize'?)",
        "inetd.yaml: services.t.tls: min_version: '1.1': expected '1.2' or '1.3'",
        "inetd.yaml: services.t.tls: key: missing",
    ]


def test_validate_accepts_the_shipped_config_and_empty_documents() -> None:
    assert schema_errors(yaml.safe_load((REPO / "inetd.yaml").read_text())) == []
    assert schema_errors(None) == []
    assert schema_errors({"services": {"x": None}, "defaults": None}) == []


def test_shipped_config_names_the_schema_on_its_first_line() -> None:
    first = (REPO / "inetd.yaml").read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=src/pyinetd/schema.json"
    shipped = json.loads((REPO / "src/pyinetd/schema.json").read_text())
    assert shipped == schema.load_schema()


def test_shipped_schema_is_generated_from_the_key_declarations() -> None:
    # schema.json is not edited by hand (regenerated by `python -m pyinetd.config.schema`).
    shipped = (REPO / "src/pyinetd/schema.json").read_text(encoding="utf-8")
    assert shipped == schema.schema_text(), (
        "python -m pyinetd.config.schema > src/pyinetd/schema.json"
    )


def test_every_service_field_is_filled_by_a_declared_key() -> None:
    # Service, the parsers and --print-config agree: each field comes from one declared key.
    targets = {k.target for k in keys.SERVICE_KEYS.values()}
    # exec_first_line: what the load read of the program (its #!), no key's
    derived = {"name", "source", "exec_first_line"}
    fields = {f.name for f in dataclasses.fields(config.Service)} - derived
    assert fields == targets - {None}


# What a field holds when its key is not set and declares no default.
_NOT_SET = (None, (), "", b"", dataclasses.MISSING)  # MISSING: a required field (listen)


def test_every_field_default_is_its_keys_declared_one() -> None:
    # A default is written once, in the key's declaration (its schema's "default", which the
    # schema and the man page show): Service and Config take theirs from it (keys.declared),
    # and a field whose key declares none holds "not set", never a default of its own.
    for cls, declared in ((config.Service, keys.SERVICE_KEYS), (config.Config, keys.TOP_KEYS)):
        by_field = {k.target: k for k in declared.values() if k.target}
        for f in dataclasses.fields(cls):
            key = by_field.get(f.name)
            if key is None:
                continue
            if "default" in key.schema:
                assert f.default == key.stored_default(), f"{cls.__name__}.{f.name}"
            else:
                assert f.default in _NOT_SET, f"{cls.__name__}.{f.name}: declare it in keys"
    # The stderr_rate parser fills what a mapping leaves out from the same default.
    assert keys.declared("stderr_rate") == parsers.STDERR_RATE


@pytest.mark.parametrize(
    ("name", "cls"), [("tls", parsers.TLSSettings), ("sandbox", SandboxSettings)]
)
def test_a_mapping_keys_declared_defaults_are_its_settings_defaults(name: str, cls: type) -> None:
    # tls: and sandbox: parse into their own dataclasses; the defaults their parts declare
    # (the schema's and the man page's) are the ones those dataclasses hold.
    parts = keys.SERVICE_KEYS[name].schema["properties"]
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    declared = {k: node["default"] for k, node in parts.items() if "default" in node}
    assert declared and all(defaults[k] == v for k, v in declared.items()), (declared, defaults)


def _default_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_default_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def _documented() -> list[tuple[str, str, dict[str, Any]]]:
    """(name, description, schema) of every key and of every sub-key of a mapping key."""
    out = []
    for key in keys.KEYS:
        out.append((key.name, key.doc, dict(key.schema)))
        whole = key.schema.get("default", {})
        for sub, node in key.schema.get("properties", {}).items():
            if sub in whole:  # the mapping's default declares its parts' (stderr_rate)
                node = {**node, "default": whole[sub]}
            out.append((f"{key.name}.{sub}", node.get("description", ""), node))
    return out


@pytest.mark.parametrize(("name", "doc", "node"), _documented(), ids=lambda v: str(v)[:30])
def test_a_default_a_description_names_is_the_declared_one(
    name: str, doc: str, node: dict[str, Any]
) -> None:
    # The descriptions repeat a default for the reader ("(default 10 seconds)", "tcp
    # (default)"): it must be the declared one, which --print-config and the dataclasses use.
    if "default" in node:
        if "default" in doc.lower() and not isinstance(node["default"], bool):  # in words
            assert _default_text(node["default"]) in doc, f"{name}: {doc}"
    else:
        assert not re.search(r"\(default \d|\w+ \(default\)", doc), f"{name}: declare it"


def _readme_key_names(text: str) -> set[str]:
    """The keys README's key table names (first column of a `| key | meaning |` table) and its
    "Top level:" paragraph names (each backticked word before a ':' or '/')."""
    names: set[str] = set()
    for table in re.findall(r"^\| key \| meaning \|\n\|---\|---\|\n((?:\|.*\n)+)", text, re.M):
        for row in table.splitlines():
            names.update(re.findall(r"`([a-z_0-9]+)`", row.split(" | ")[0]))
    for para in re.findall(r"^Top level: (.*?)\n\n", text, re.M | re.S):
        names.update(re.findall(r"`([a-z_0-9]+)(?=[`:])", para))
    return names


def test_readme_key_table_names_declared_keys_and_points_to_the_man_page() -> None:
    # README's key table is a short list of the keys used first; the reference of every key
    # is the man page, generated from the declarations (test_every_configuration_key_is_in_
    # pyinetd_yaml_5). What README names must be a declared key, and it must say where the
    # rest is.
    text = (REPO / "README.md").read_text()
    named = _readme_key_names(text)
    declared = {*keys.SERVICE_KEYS, *keys.TOP_KEYS, "defaults", "services"}
    assert len(named) >= 20, named
    assert named <= declared, named - declared
    # A key with a section of its own (`warm`, `sandbox`) is in the table, pointing to it.
    sections = set(re.findall(r"^#+ .*?`([a-z_0-9]+)", text, re.M)) & declared
    assert sections and sections <= named, sections - named
    assert re.search(r"full reference of every key\*\* is the man page: `man pyinetd\.yaml`", text)
    # docs/configuration.md says more about each key: every declared key is in its tables.
    more = _readme_key_names((REPO / "docs" / "configuration.md").read_text())
    assert more <= declared, more - declared
    assert declared <= more, declared - more


def test_build_reports_schema_errors_in_file_order_among_semantic_ones(tmp_path: Path) -> None:
    errs = load_errors(
        tmp_path,
        {
            "max_children": "many",
            "defaults": {"timeout": "soon", "listen": 7},
            "services": {
                "a": {"listen": 70000, "wait": "yes"},
                "b": {"listen": 7008, "exec": "/nonexistent/x", "nice": 40},
                "c": "echo",
            },
        },
    )
    assert errs == [
        "inetd.yaml: max_children: 'many': expected a whole number >= 1",
        "inetd.yaml: defaults.timeout: 'soon': expected a duration >= 0 such as 30, '30s', "
        "'500ms' or '5m'",
        "inetd.yaml: defaults.listen: listen addresses are per service, not a default",
        "inetd.yaml: services.a.wait: 'yes': expected true or false",
        "inetd.yaml: services.a.listen: '70000': port must be 1-65535",
        "inetd.yaml: services.b.exec: /nonexistent/x: no such file",
        "inetd.yaml: services.b.nice: 40: expected a number from -20 to 19",
        "inetd.yaml: services.c: 'echo': expected a mapping of settings",
    ]


def test_build_runs_the_schema_on_included_files(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    inc = tmp_path / "conf.d" / "x.yaml"
    inc.write_text(yaml.safe_dump({"services": {"x": {"listen": 7009, "wiat": True}}}))
    errs = load_errors(tmp_path, {"include": "conf.d/*.yaml"})
    assert errs == [f"{inc}: services.x.wiat: unknown key (did you mean 'wait'?)"]


# ---------------------------------------------------------------- schema agrees with the parsers

_WORDS = ["s", "ms", "m", "min", "h", "hours", "d", "day", "k", "M", "G", "Kib", "b", "/s", "/min"]
_WORDS += ["tcp", "UDP", "Unix", "echo", "queue", "reject", "unlimited", "yes", "022", "777"]
_ASCII = st.text(alphabet="0123456789. /smhdkMGbiBTPunlimtedcpqrjx=-", max_size=10)
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(_WORDS),
    st.builds(lambda n, w: f"{n}{w}", st.integers(0, 10**6), st.sampled_from(_WORDS)),
    _ASCII,
)
_VALUES = st.one_of(
    _SCALARS,
    st.lists(_SCALARS, max_size=3),
    st.dictionaries(st.sampled_from(["as", "cpu", "nofile", "A", "B=C", ""]), _SCALARS, max_size=2),
)

# Keys whose parser checks nothing the schema cannot: the two must agree on every value.
_SAME_VERDICT = [
    "wait",
    "enabled",
    "env_clear",
    "no_new_privs",
    "protocol",
    "builtin",
    "on_limit",
    "max_connections",
    "per_source",
    "burst",
    "per_source_prefix",
    "busy_message",
    "deny_message",
    "banner_text",
    "rate",
    "rate_pause",
    "timeout",
    "umask",
    "env",
]


def _schema_accepts(key: str, value: Any) -> bool:
    return not schema.check({"services": {"s": {"listen": 7, key: value}}})


def _schema_is_stricter(key: str, value: Any) -> bool:
    """Values a parser takes by accident and the schema (run first) refuses: true/false as a
    user or group number (True == 1 in Python) or as a command-line argument."""
    if key in ("user", "group"):
        return isinstance(value, bool)
    return key == "exec" and isinstance(value, list) and any(isinstance(v, bool) for v in value)


def _parser_accepts(key: str, value: Any) -> bool:
    try:
        config.SERVICE_PARSERS[key](value, Path(tempfile.gettempdir()))
    except config._KeyError:
        return False
    return True


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(sorted(set(config.SERVICE_PARSERS) - {"listen"})), value=_VALUES)
def test_schema_accepts_whatever_a_parser_accepts(key: str, value: Any) -> None:
    if _parser_accepts(key, value) and not _schema_is_stricter(key, value):
        assert _schema_accepts(key, value), (key, value)


@settings(max_examples=600, deadline=None)
@given(key=st.sampled_from(_SAME_VERDICT), value=_VALUES)
def test_schema_and_parser_agree_on_plain_values(key: str, value: Any) -> None:
    if isinstance(value, float) and value.is_integer():
        value = str(value)  # jsonschema counts 2.0 as an integer, the parsers do not
    assert _schema_accepts(key, value) == _parser_accepts(key, value), (key, value)


# ---------------------------------------------------------------- print-config round trips

_ME = pwd.getpwuid(os.geteuid()).pw_name
_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
_NETS = st.sampled_from(["127.0.0.0/8", "::1", "10.1.2.3/8", "all", "192.168.0.0/16", "fe80::/10"])
_DURATION = st.one_of(
    st.integers(0, 10**6),
    st.floats(0, 10**6, allow_nan=False).map(lambda f: round(f, 3)),
    st.sampled_from(["30s", "500ms", "5m", "1h", "1.5d", "0"]),
)


def _under_hard_limit(name: str, values: list[Any]) -> st.SearchStrategy[Any]:
    """The values a non-root pyinetd may set (the parser refuses more than the hard limit)."""
    ok = [v for v in values if _parser_accepts("rlimits", {name: v})]
    assert ok, name
    return st.sampled_from(ok)


_SETTINGS: dict[str, st.SearchStrategy[Any]] = {
    "enabled": st.booleans(),
    "stderr": st.sampled_from(["log", "socket", "null"]),
    "stderr_rate": st.fixed_dictionaries(
        {},
        optional={
            "lines": st.sampled_from([1, 250, "50/s", "600/min", 0.5]),
            "bytes": st.sampled_from([1024, "64k/s", "1M/min", 100.5]),
        },
    ),
    "max_connections": st.integers(1, 1000),
    "on_limit": st.sampled_from(["queue", "reject"]),
    "busy_message": _TEXT,
    "per_source": st.integers(1, 100),
    "per_source_prefix": st.integers(0, 128),
    "rate": st.one_of(
        st.integers(1, 1000),
        st.floats(0.001, 1000).map(lambda f: round(f, 4)).filter(lambda f: f > 0),
        st.sampled_from(["50/s", "600/min", "100/h", "7.5/m"]),
    ),
    "rate_pause": _DURATION,
    "allow": st.one_of(_NETS, st.lists(_NETS, max_size=3)),
    "deny": st.one_of(_NETS, st.lists(_NETS, max_size=3)),
    "deny_message": _TEXT,
    "timeout": _DURATION,
    "user": st.just(_ME),
    "env": st.dictionaries(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True), _TEXT),
    "env_clear": st.booleans(),
    "no_new_privs": st.booleans(),
    "umask": st.integers(0, 0o777).map(lambda n: f"{n:03o}"),
    "nice": st.integers(0, 19),
    "rlimits": st.fixed_dictionaries(
        {},
        optional={
            "core": _under_hard_limit("core", [0, "1M", "unlimited"]),
            "cpu": _under_hard_limit("cpu", [5, "10s", "2m"]),
            "nofile": _under_hard_limit("nofile", [16, 64, 256]),
            "as": _under_hard_limit("as", ["512M", "1.5G", "unlimited"]),
        },
    ),
    "banner_text": _TEXT,
}


@st.composite
def _settings(draw: st.DrawFn) -> dict[str, Any]:
    keys = draw(st.lists(st.sampled_from(sorted(_SETTINGS)), unique=True, max_size=8))
    out = {k: draw(_SETTINGS[k]) for k in keys}
    if "rate" in out and draw(st.booleans()):
        out["burst"] = draw(st.integers(1, 500))
    return out


@st.composite
def _configs(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(
        st.lists(st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True), min_size=1, max_size=4)
    )
    names = list(dict.fromkeys(names))
    ports = draw(st.lists(st.integers(1024, 65535), min_size=len(names), unique=True))
    services: dict[str, Any] = {}
    for name, port in zip(names, ports, strict=False):
        body: dict[str, Any] = {
            "listen": draw(st.sampled_from([f"127.0.0.1:{port}", [f"127.0.0.1:{port}"]]))
        }
        body["protocol"] = draw(st.sampled_from(["tcp", "udp", "TCP"]))
        kind = draw(st.sampled_from(["exec", "builtin", "neither"]))
        if kind == "exec":
            body["exec"] = draw(st.sampled_from(["/bin/cat", ["/bin/cat", "-u"], "cat"]))
            body["wait"] = draw(st.booleans())
        elif kind == "builtin":
            body["builtin"] = draw(st.sampled_from(sorted(config.BUILTINS)))
        body |= draw(_settings())
        if body["protocol"] != "tcp" and kind != "exec":
            # A UDP built-in refuses the limits nothing is counted against (issue 18, item 5).
            body.pop("max_connections", None)
            body.pop("per_source", None)
        services[name] = body
    doc: dict[str, Any] = {"services": services}
    defaults = draw(_settings())
    if defaults:
        doc["defaults"] = defaults
    if draw(st.booleans()):
        doc["max_children"] = draw(st.integers(1, 500))
    return doc


def _same_meaning(cfg: Config) -> Config:
    """The Config without what names its file (path, each service's source)."""
    services = tuple(dataclasses.replace(s, source="") for s in cfg.services)
    return dataclasses.replace(cfg, path=Path("-"), services=services)


def _reload(folder: Path, resolved: dict[str, Any], fmt: str) -> Config:
    path = folder / f"printed.{fmt}"
    path.write_text(write(resolved, fmt))
    return load(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=_configs())
def test_print_config_round_trips_yaml_toml_yaml(doc: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        source = folder / "inetd.yaml"
        source.write_text(yaml.safe_dump(doc))
        first = load(source)
        printed = to_dict(first)
        assert "defaults" not in printed
        assert schema.check(printed) == []
        via_toml = _reload(folder, printed, "toml")
        assert to_dict(via_toml) == printed
        back = _reload(folder, to_dict(via_toml), "yaml")
        assert to_dict(back) == printed
        assert _same_meaning(first) == _same_meaning(via_toml) == _same_meaning(back)


def test_print_config_applies_defaults_resolves_paths_and_merges_includes(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "logs").mkdir()
    (tmp_path / "conf.d" / "b.yaml").write_text("services:\n  b: {listen: 7102}\n")
    (tmp_path / "banner.txt").write_text("hello\n")
    (tmp_path / "inetd.yaml").write_text(
        "include: conf.d/*.yaml\n"
        "defaults: {timeout: 5m, stderr: logs/err.log, banner: banner.txt}\n"
        "services:\n  a: {listen: 7101, exec: cat, rate: 600/min, umask: '027'}\n"
    )
    printed = to_dict(load(tmp_path / "inetd.yaml"))
    common = {"stderr": str(tmp_path / "logs" / "err.log"), "timeout": "5m"}
    assert printed == {
        "services": {
            "a": {
                "listen": "7101",
                "exec": [str(Path("/bin/cat").resolve())],
                **common,
                "rate": "10/s",
                "umask": "027",
                "banner_text": "hello\n",
            },
            # A TCP built-in's per_source default is printed like any key.
            "b": {
                "listen": "7102",
                "builtin": "echo",
                **common,
                "banner_text": "hello\n",
                "per_source": 10,
            },
        }
    }


def test_print_config_keeps_names_rate_units_and_unresolved_paths(tmp_path: Path) -> None:
    # Issue 16: group: nogroup came back as 65534, rate: 100/min as 1.6666666666666667 and
    # /bin/cat as /usr/bin/cat (a symlink resolved). What runs is still the resolved program.
    link = tmp_path / "prog"
    link.symlink_to("/bin/cat")
    (tmp_path / "inetd.yaml").write_text(
        "services:\n"
        "  a: {listen: 7101, exec: [./prog, -u], group: nogroup, rate: 100/min,"
        " stderr_rate: {lines: 30/min}}\n"
        "  b: {listen: 7102, exec: /bin/cat, rate: 50, burst: 7, group: 0}\n"
    )
    cfg = load(tmp_path / "inetd.yaml")
    assert cfg.services[0].exec == (str(Path("/bin/cat").resolve()), "-u")
    a, b = to_dict(cfg)["services"].values()
    assert (a["exec"], a["group"], a["rate"]) == ([str(link), "-u"], "nogroup", "100/min")
    assert a["stderr_rate"]["lines"] == "30/min"
    assert (b["exec"], b["rate"], b["burst"], b["group"]) == (["/bin/cat"], "50/s", 7, "root")


@pytest.mark.parametrize("fmt", ["yaml", "toml", "json"])
def test_print_config_writes_a_duration_in_its_unit(tmp_path: Path, fmt: str) -> None:
    # `timeout: 5 minutes` came back as `timeout: 300`: a duration is written in the largest
    # unit of which it is a whole number, and loads back to an equal Config.
    (tmp_path / "inetd.yaml").write_text(
        "drain_timeout: 2 hours\nshutdown: drain\n"
        "services:\n"
        "  a: {listen: 7101, timeout: 5 minutes, rate: 5/s, rate_pause: 90}\n"
        "  b: {listen: 7102, timeout: 1.5, proxy_protocol: v1, proxy_timeout: 0.25}\n"
        "  c: {listen: 7103, timeout: 0, rate_pause: 1d}\n"
    )
    first = load(tmp_path / "inetd.yaml")
    printed = to_dict(first)
    a, b, c = printed["services"].values()
    assert printed["drain_timeout"] == "2h"
    assert (a["timeout"], a["rate_pause"]) == ("5m", "90s")
    assert (b["timeout"], b["proxy_timeout"]) == ("1500ms", "250ms")
    assert (c["timeout"], c["rate_pause"]) == ("0s", "1d")
    again = _reload(tmp_path, printed, fmt)
    assert _same_meaning(again) == _same_meaning(first)
    assert to_dict(again) == printed


def test_print_config_writes_a_tls_service(tmp_path: Path, pki: Path) -> None:
    # A tls: service made --print-config fail with a traceback (TLSSettings had no input form).
    (tmp_path / "inetd.yaml").write_text(
        "services:\n"
        "  t: {listen: 7101, exec: /bin/cat, tls: {cert: cert.pem, key: key.pem}}\n"
        "  u: {listen: 7102, exec: /bin/cat, tls: {cert: cert.pem, key: key.pem,"
        " client_ca: ca.pem, min_version: '1.3', handshake_timeout: 2m}}\n"
    )
    first = load(tmp_path / "inetd.yaml")
    printed = to_dict(first)
    t, u = (s["tls"] for s in printed["services"].values())
    assert t == {"cert": str(pki / "cert.pem"), "key": str(pki / "key.pem")}
    assert (u["client_ca"], u["min_version"], u["handshake_timeout"]) == (
        str(pki / "ca.pem"),
        "1.3",
        "2m",
    )
    assert _same_meaning(_reload(tmp_path, printed, "toml")) == _same_meaning(first)


def test_yaml_output_keeps_a_next_line_character() -> None:
    # Found by the round trip above: PyYAML wrote U+0085 raw in a single-quoted scalar and read
    # it back as a space.
    text = {"banner_text": "a\x85b", "busy_message": "\x85"}
    assert yaml.safe_load(write(text, "yaml")) == text


def test_print_config_refuses_a_binary_banner(tmp_path: Path) -> None:
    (tmp_path / "b.bin").write_bytes(b"\xff\xfe")
    (tmp_path / "inetd.yaml").write_text("services:\n  a: {listen: 7101, banner: b.bin}\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        to_dict(load(tmp_path / "inetd.yaml"))


# ---------------------------------------------------------------- command line


def test_cli_schema_prints_the_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--schema"]) == 0
    assert json.loads(capsys.readouterr().out) == schema.load_schema()


@pytest.mark.parametrize("fmt", ["yaml", "toml", "json"])
def test_cli_print_config_in_each_format(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    (tmp_path / "inetd.yaml").write_text(
        "defaults: {wait: true}\nservices:\n  e: {listen: 7007, exec: /bin/cat}\n"
    )
    assert main(["-c", str(tmp_path / "inetd.yaml"), "--print-config", "--format", fmt]) == 0
    out = capsys.readouterr().out
    readers: dict[str, Callable[[str], Any]] = {
        "yaml": yaml.safe_load,
        "toml": tomllib.loads,
        "json": json.loads,
    }
    parsed = readers[fmt](out)
    assert parsed == {"services": {"e": {"listen": "7007", "exec": ["/bin/cat"], "wait": True}}}


def test_cli_print_config_of_a_bad_file_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "inetd.yaml"
    bad.write_text("services:\n  e: {listen: 7007, wait: 'yes'}\n")
    run = subprocess.run(
        [sys.executable, "-m", "pyinetd", "-c", str(bad), "--print-config"],
        capture_output=True,
        text=True,
    )
    assert (run.returncode, run.stdout) == (2, "")
    assert run.stderr == f"{bad}:2:21: services.e.wait: 'yes': expected true or false\n"


def test_print_config_does_not_import_the_converter(tmp_path: Path) -> None:
    # The writer is the configuration's (writer.py); convert.py uses it, not the other way.
    (tmp_path / "inetd.yaml").write_text("services:\n  e: {listen: 7007, timeout: 5 minutes}\n")
    code = (
        "import sys; from pyinetd.cli import main; "
        f"rc = main(['-c', {str(tmp_path / 'inetd.yaml')!r}, '--print-config']); "
        "assert rc == 0 and 'pyinetd.convert' not in sys.modules, sorted(sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert yaml.safe_load(run.stdout)["services"]["e"]["listen"] == "7007"


def test_man_page_is_current() -> None:
    spec = importlib.util.spec_from_file_location("gen_manpage", REPO / "scripts/gen_manpage.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    from pyinetd.cli import build_parser

    expected = gen.render(build_parser())
    assert (REPO / "contrib" / "pyinetd.8").read_text() == expected, (
        "run: python scripts/gen_manpage.py"
    )
