"""'unknown key (did you mean ...?)': the one wording of an unknown key, for every part of the
configuration that has keys (the schema, the parsers, the sandbox block). A leaf module."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

__all__ = ["unknown_key"]


def unknown_key(key: str, known: Sequence[str]) -> str:
    """'unknown key', with the nearest known key as a suggestion when there is one."""
    near = difflib.get_close_matches(key, list(known), n=1)
    return "unknown key" + (f" (did you mean {near[0]!r}?)" if near else "")
