"""A configuration error as a person reads it: one short line per error, in the
'file: key: message' form and, where the file's marks know the key, 'file:line:column: key:
message' (``ConfigError``, ``located``), and a key given twice in one mapping (``duplicates``).
"""

from __future__ import annotations

from collections.abc import Mapping

from pyinetd.config.document import Marks

MAX_ERROR = 1000  # characters of one error line


class ConfigError(Exception):
    """One or more configuration errors, each a full 'file: key: message' line."""

    def __init__(self, errors: list[str], located: list[str] | None = None) -> None:
        errors = one_short_line(errors)
        super().__init__("\n".join(errors))
        self.errors = errors
        # As shown to a person: 'file:line:column: key: message' where the position is known
        # (as haproxy -c and compilers do); `errors` keeps the 'file: key' form.
        self.lines = one_short_line(located) if located else errors


def one_short_line(errors: list[str]) -> list[str]:
    # One error, one line: a control character in a name or value must not split it.
    errors = [
        e.encode("unicode_escape").decode("ascii") if not e.isprintable() else e for e in errors
    ]
    # One error, one short line: a value quoted whole could be a megabyte.
    return [e if len(e) <= MAX_ERROR else e[: MAX_ERROR - 3] + "..." for e in errors]


def located(errors: list[str], marks: Mapping[str, Marks]) -> list[str]:
    """Each 'file: key: message' error as 'file:line:column: key: message' where the file's
    marks know the key (or the list entry the message quotes)."""
    out = []
    for error in errors:
        label = max((f for f in marks if error.startswith(f + ": ")), key=len, default=None)
        pos = None
        if label is not None:
            rest = error[len(label) + 2 :]
            key, _, message = rest.partition(": ")
            pos = marks[label].locate(key, message)
        out.append(f"{label}:{pos[0]}:{pos[1]}: {rest}" if pos and label else error)
    return out


def duplicates(label: str, marks: Marks) -> list[str]:
    """A key given twice in one mapping: YAML keeps the last without a word (a second service
    of the same name replaced the first, and --check said ok)."""
    return [
        f"{label}: {'.'.join(path)}: given twice, on lines {first[0]} and {again[0]}"
        for path, first, again in marks.duplicates
    ]
