"""A configuration mapping (plain data in the input vocabulary) as YAML, TOML or JSON text.

What ``--print-config`` prints (printconfig.to_dict's mapping) and what ``pyinetd convert`` writes
(convert.py, which adds its warnings as leading comments). Pure module.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import tomli_w
import yaml

__all__ = ["write"]


class _YamlDumper(yaml.SafeDumper):
    """SafeDumper that double-quotes text holding U+0085 (NEL).

    PyYAML with allow_unicode writes NEL raw inside a single-quoted scalar, and its reader then
    folds it, a YAML line break, into a space: the text would not load back as it was.
    """


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = '"' if "\x85" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_YamlDumper.add_representer(str, _represent_str)


def write(doc: Mapping[str, Any], fmt: str, comments: str = "") -> str:
    """``doc`` as YAML, TOML or JSON text, keys in their order; ``comments`` (whole ``# ...``
    lines, already escaped) lead the text, except in JSON, which has none."""
    if fmt == "yaml":
        body = yaml.dump(
            dict(doc),
            Dumper=_YamlDumper,
            sort_keys=False,
            default_flow_style=False,
            allow_unicode=True,
        )
    elif fmt == "toml":
        body = tomli_w.dumps(doc)
    elif fmt == "json":
        return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    else:
        raise ValueError(f"unknown format {fmt!r} (expected 'yaml', 'toml' or 'json')")
    return comments + body
