"""The JSON Schema of the configuration, and its findings in the project's one-line error form.

``schema.json`` (package data, generated from the key declarations in keys.py by this module:
``python -m pyinetd.config.schema > src/pyinetd/schema.json``) is what editors use
(``# yaml-language-server: $schema=...``); config.build() runs it first, so a value of the wrong
type or an unknown key reads the same in the editor and on the command line::

    inetd.yaml: services.echo.usr: unknown key (did you mean 'user'?)
    inetd.yaml: services.echo.wait: 'yes': expected true or false

Pure module: no sockets, no processes.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pyinetd.config import keys
from pyinetd.suggest import unknown_key

if TYPE_CHECKING:  # jsonschema is imported only when a configuration has an error (config.py)
    from jsonschema import Draft202012Validator, ValidationError

__all__ = [
    "Findings",
    "KeyPath",
    "build_schema",
    "check",
    "load_schema",
    "schema_text",
    "unknown_key",
    "validate",
]

# A key path as people read it: ("max_children",), ("defaults", "timeout"),
# ("services", "echo", "wait"); shorter for errors about a whole mapping.
KeyPath = tuple[str, ...]

# How deep the path to one key goes under each top-level key (1 for the other top-level keys).
_KEY_DEPTH = {"defaults": 2, "services": 3}


@functools.cache
def _schema() -> dict[str, Any]:
    from importlib import resources  # only when the schema is needed

    text = resources.files("pyinetd").joinpath("schema.json").read_text(encoding="utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def load_schema() -> dict[str, Any]:
    """The configuration's JSON Schema (draft 2020-12), a fresh copy."""
    return copy.deepcopy(_schema())


@functools.cache
def _validator() -> Draft202012Validator:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(_schema())


def check(doc: Any) -> list[tuple[KeyPath, str]]:
    """Every schema violation in ``doc`` as (key path, message), in the validator's order."""
    found: list[tuple[KeyPath, str]] = []
    for error in _validator().iter_errors(doc):
        for path, message in _render(error):
            key, prefix = _split(path, doc)
            item = (key, prefix + message)
            if item not in found:
                found.append(item)
    return found


def validate(doc: Any, label: str) -> list[str]:
    """Schema errors of ``doc`` as 'label: key.path: message' lines, sorted by key path."""
    found = sorted(check(doc), key=lambda item: item[0])
    return [f"{label}: {'.'.join(key)}: {msg}" if key else f"{label}: {msg}" for key, msg in found]


def _render(error: ValidationError) -> Iterator[tuple[list[Any], str]]:
    """(instance path, message) for one jsonschema error; a few keywords get their own words."""
    path = list(error.absolute_path)
    schema = error.schema if isinstance(error.schema, Mapping) else {}
    instance: Any = error.instance
    if error.validator == "additionalProperties" and error.validator_value is False:
        known = list(schema.get("properties", {}))
        for key in instance:
            if key not in known:
                yield [*path, key], unknown_key(str(key), known)
    elif error.validator == "required":
        wanted: list[str] = list(schema.get("required", []))
        for key in wanted:
            if isinstance(instance, Mapping) and key not in instance:
                yield [*path, key], _missing(key, schema)
    elif error.validator == "not":
        # A `not` here only ever forbids a key's presence; its value is beside the point.
        yield path, str(schema.get("errorMessage", error.message))
    elif "errorMessage" in schema:
        yield path, f"{shown(instance)}: {schema['errorMessage']}"
    else:
        yield path, error.message


def shown(value: Any) -> str:
    """A value in the file's terms: `timeout: yes` is "a boolean" (YAML's yes), not True."""
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "an empty value"
    return repr(value)


def _missing(key: str, schema: Mapping[str, Any]) -> str:
    """'missing', with the key's first example: 'missing (e.g. listen: 127.0.0.1:7007)'."""
    prop = _resolve(schema.get("properties", {}).get(key, {}))
    examples = prop.get("examples") or []
    if examples and isinstance(examples[0], str | int | float):
        return f"missing (e.g. {key}: {examples[0]})"
    return "missing"


def _resolve(node: Mapping[str, Any]) -> Mapping[str, Any]:
    """Follow a local '#/$defs/NAME' reference (the only kind schema.json uses)."""
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        resolved: Mapping[str, Any] = _schema()["$defs"][ref.removeprefix("#/$defs/")]
        return resolved
    return node


def _split(path: Sequence[Any], doc: Any) -> tuple[KeyPath, str]:
    """The key path of an error, and the message prefix naming what lies below that key.

    Below a key, mapping keys become a prefix (``services.x.env: FOO: ...``, as config.py
    words it) and list positions are dropped: the message shows the offending item itself.
    """
    depth = _KEY_DEPTH.get(str(path[0]), 1) if path else 0
    key = tuple(str(p) for p in path[:depth])
    node = doc
    for part in path[:depth]:
        node = node.get(part) if isinstance(node, Mapping) else None
    below: list[str] = []
    for part in path[depth:]:
        if not isinstance(node, Mapping):
            break
        below.append(str(part))
        node = node.get(part)
    return key, "".join(f"{part}: " for part in below)


# ---------------------------------------------------------------- generating schema.json

_EXEC_OR_BUILTIN = {
    "if": {"required": ["builtin"]},
    "then": {
        "properties": {"exec": {"not": {}, "errorMessage": "give either exec or builtin, not both"}}
    },
}


def _service_schema(listen: bool) -> dict[str, Any]:
    names = [k for k in keys.SERVICE_KEYS if listen or k != "listen"]
    if listen:
        head = {
            "description": "One service: where it listens and what answers (exec or builtin).",
            "type": ["object", "null"],
        }
        tail: dict[str, Any] = {"required": ["listen"]}
        message = "expected a mapping of settings"
    else:
        head = {
            "description": "Settings applied to every service unless the service sets them "
            "(not listen).",
            "type": ["object", "null"],
        }
        tail, message = {}, "expected a mapping of service keys"
    return {
        **head,
        "properties": {k: {"$ref": f"#/$defs/{k}"} for k in names},
        **tail,
        "additionalProperties": False,
        **_EXEC_OR_BUILTIN,
        "errorMessage": message,
    }


def build_schema() -> dict[str, Any]:
    """The configuration's JSON Schema (draft 2020-12), from the key declarations."""
    top: dict[str, Any] = {
        "defaults": {"$ref": "#/$defs/defaults"},
        "services": {
            "description": "The services, by name.",
            "type": ["object", "null"],
            "additionalProperties": {"$ref": "#/$defs/service"},
            "errorMessage": "expected a mapping of service name to settings",
        },
    }
    top.update({k.name: {"description": k.doc, **k.schema} for k in keys.TOP_KEYS.values()})
    defs: dict[str, Any] = {"service": _service_schema(True), "defaults": _service_schema(False)}
    defs.update({k.name: {"description": k.doc, **k.schema} for k in keys.SERVICE_KEYS.values()})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "pyinetd configuration",
        "description": "The configuration file of pyinetd, an inetd-style super-server "
        "(YAML or TOML).",
        "type": ["object", "null"],
        "properties": top,
        "additionalProperties": False,
        "errorMessage": "expected a mapping with a 'services' key at the top",
        "$defs": defs,
    }


def schema_text() -> str:
    """schema.json as shipped: the schema, indented by two, ending in a newline."""
    return json.dumps(build_schema(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(schema_text())


class Findings:
    """The schema's findings by (file, key path), each handed out once, where config.build()
    reaches that key, so they come out in file order among config.py's own (semantic) errors."""

    def __init__(self, enabled: bool) -> None:
        self._found: dict[tuple[str, KeyPath], list[str]] = {}
        self._enabled = enabled

    def add(self, label: str, doc: Any) -> None:
        """Validate one file's document against the schema."""
        if not self._enabled:
            return
        for key, message in check(doc):
            line = f"{label}: {'.'.join(key)}: {message}" if key else f"{label}: {message}"
            self._found.setdefault((label, key), []).append(line)

    @property
    def enabled(self) -> bool:
        return self._enabled

    def take(self, label: str, *key: str) -> list[str]:
        """The error lines for exactly this key path (none if it is fine), removed."""
        return self._found.pop((label, key), [])

    def rest(self) -> list[str]:
        """What no check reached (a safety net: every finding is reported)."""
        lines = [line for lines in self._found.values() for line in lines]
        self._found.clear()
        return lines
