"""What a configuration key declaration is (Key), and the JSON Schema pieces keys share.

The declarations themselves: service_keys.py (the keys of a service) and keys.py (the top-level
keys, and the tables the rest of pyinetd reads). Pure module.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyinetd.config.parsers import Out, Parser
from pyinetd.config.units import DURATION_UNITS, RATE_UNITS

__all__ = ["Key"]


@dataclass(frozen=True)
class Key:
    """One configuration key."""

    name: str
    parse: Parser  # (value, config folder) -> stored value, or _KeyError
    doc: str  # one paragraph: the man page and the schema's description
    schema: Mapping[str, Any]  # its JSON Schema, what editors check as one types
    top: bool = False  # a top-level key; otherwise a service key (also allowed in defaults:)
    # The Service field it fills: its own name, another (allow -> access), or None when it is
    # folded into another key's field by config._combine (burst, deny, banner_text).
    field: str | None = ""
    out: Out | None = None  # stored value -> input form, when they differ

    @property
    def target(self) -> str | None:
        return self.name if self.field == "" else self.field

    @property
    def default(self) -> Any:
        """The key's default, the one place it is written: its schema's "default", in the input
        form (what the schema, the man page and editors show), or None where it declares none."""
        return self.schema.get("default")

    def stored_default(self) -> Any:
        """The default as the key's parser stores it (10 -> 10.0 seconds): what the Service or
        Config field it fills holds when no file sets the key (config.declared)."""
        if "default" not in self.schema:
            raise LookupError(f"{self.name}: its declaration names no default")
        return self.parse(self.schema["default"], Path("/"))


# ---------------------------------------------------------------- patterns, from units.py


def _ci(word: str) -> str:
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in word)


def _alternatives(words: Any) -> str:
    """A case-insensitive alternation, longest words first (a regex takes the first match)."""
    return "|".join(_ci(w) for w in sorted(set(words), key=lambda w: (-len(w), w)))


_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
DURATION_PATTERN = rf"^\s*{_NUMBER}\s*(?:{_alternatives(k for k in DURATION_UNITS if k)})?\s*$"
RATE_PATTERN = rf"^\s*(?=[0.]*[1-9]){_NUMBER}\s*(?:/\s*(?:{_alternatives(RATE_UNITS)}))?\s*$"
_UNLIMITED = _alternatives(["unlimited", "infinity"])
BYTE_RATE_PATTERN = rf"^\s*{_NUMBER}\s*[kmgtpKMGTP]?(?:[iI]?[bB])?\s*(?:/\s*[a-zA-Z]+)?\s*$"
# RLIMIT_CPU: a duration, or unlimited (parsers._cpu_seconds takes both).
_DURATION_WORDS = _alternatives(k for k in DURATION_UNITS if k)
CPU_PATTERN = rf"^\s*(?:{_NUMBER}\s*(?:{_DURATION_WORDS})?|(?:{_UNLIMITED}))\s*$"
BUFFER_PATTERN = rf"^\s*{_NUMBER}\s*[kmgKMG]?(?:[iI]?[bB])?\s*$"
SIZE_PATTERN = rf"^\s*(?:{_NUMBER}\s*[kmgtpKMGTP]?(?:[iI]?[bB])?|(?:{_UNLIMITED}))\s*$"


# Schema fragments several keys share.
SIZE: dict[str, Any] = {
    "type": ["integer", "string"],
    "minimum": 0,
    "maximum": 9223372036854775807,
    "pattern": SIZE_PATTERN,
    "errorMessage": "expected a whole size such as 100, '64k', '512M', '1G' or 'unlimited'",
}
DURATION: dict[str, Any] = {
    "type": ["number", "string"],
    "minimum": 0,
    "pattern": DURATION_PATTERN,
    "examples": [30, "30s", "500ms", "5m"],
    "errorMessage": "expected a duration >= 0 such as 30, '30s', '500ms' or '5m'",
}
ADDRESSES: dict[str, Any] = {
    "type": ["string", "array"],
    "minLength": 1,
    "items": {"type": "string", "minLength": 1, "errorMessage": "not an address or network"},
    "examples": [["127.0.0.0/8", "::1"]],
    "errorMessage": "not an address or network",
}
FILE_PATH: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "errorMessage": "expected a file path",
}
COUNT: dict[str, Any] = {
    "type": "integer",
    "minimum": 1,
    "errorMessage": "expected a whole number >= 1",
}
BOOLEAN: dict[str, Any] = {"type": "boolean", "errorMessage": "expected true or false"}
TEXT: dict[str, Any] = {"type": "string", "errorMessage": "expected text"}


def parse_listen_raw(value: Any, _base: Any) -> Any:
    return value  # parsed by config._service, which knows the protocol
