"""A configuration file -> plain Python data, in bounded time and memory.

Unbounded, nine lines of YAML aliases ("billion laughs") take 51 s and 386 MB to check and freeze
every service for 31 s as a reload; `include: /dev/zero` ends in MemoryError; a FIFO hangs the
server for good. So: a regular file only, opened without blocking (trust.open_regular), at most
trust.MAX_FILE_SIZE bytes, and a YAML document whose tree, with every alias expanded, has at
most MAX_NODES nodes. An alias is still fine for what people use it for (a `<<: *defaults`).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer

from pyinetd import trust

__all__ = ["MAX_NODES", "DocumentError", "Marks", "read_document", "read_marked"]

# Nodes in one YAML document with its aliases expanded: a thousand services of 50 keys each.
MAX_NODES = 50_000


class _TooBig(Exception):
    pass


class _Counting(Composer):
    """PyYAML's composer, counting the nodes it builds (an alias is not built again)."""

    nodes: int

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _TooBig
        return super().compose_node(parent, index)


class _PyLoader(_Counting, yaml.SafeLoader):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.nodes = 0


# libyaml's parser when PyYAML has it (3x faster) under the counting composer: a 1 MiB file of
# small values stops at MAX_NODES in a fraction of a second. Its error messages differ from
# PyYAML's, so a file it refuses is parsed again by PyYAML for the message.
_CBase: Any = getattr(yaml, "CSafeLoader", None)
_Loaders: list[Any] = [_PyLoader]
if _CBase is not None:

    class _CLoader(_Counting, _CBase):  # type: ignore[misc]
        def __init__(self, data: bytes) -> None:
            _CBase.__init__(self, data)
            Composer.__init__(self)
            self.nodes = 0

    _Loaders.insert(0, _CLoader)


# (line, column), both from 1, of a key or a list entry in the file.
Position = tuple[int, int]
KeyPath = tuple[str, ...]


@dataclass
class Marks:
    """Where each key and list entry of a document is in its file, for errors that name the
    line (as haproxy -c does), and the keys a mapping was given twice."""

    keys: dict[KeyPath, Position] = field(default_factory=dict)
    # A list's scalar entries: (their text, where), by the key path of the list.
    items: dict[KeyPath, list[tuple[str, Position]]] = field(default_factory=dict)
    # (key path, first position, position of the repeat): YAML would silently keep the last.
    duplicates: list[tuple[KeyPath, Position, Position]] = field(default_factory=list)

    def locate(self, key: str, message: str) -> Position | None:
        """Where the error ``key: message`` points: the list entry the message quotes, the
        sub-key it names (``env: C: ...``), the key, or the nearest enclosing key."""
        parts = tuple(key.split(".")) if key else ()
        sub = message.partition(": ")[0]
        while parts:
            best: tuple[str, Position] | None = None
            for text, pos in self.items.get(parts, ()):
                if message.startswith((repr(text), text)) and (
                    not best or len(text) > len(best[0])
                ):
                    best = (text, pos)
            if best:
                return best[1]
            if (*parts, sub) in self.keys:
                return self.keys[(*parts, sub)]
            if parts in self.keys:
                return self.keys[parts]
            parts = parts[:-1]
        return None


def _where(node: yaml.Node) -> Position:
    return (node.start_mark.line + 1, node.start_mark.column + 1)


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _yaml_marks(root: yaml.Node) -> Marks:
    """Positions of every key and list entry under ``root`` (aliases followed: the tree was
    already bounded by _expanded_size), and every key given twice in one mapping."""
    marks = Marks()
    stack: list[tuple[yaml.Node, KeyPath, bool]] = [(root, (), False)]
    while stack:
        node, path, merged = stack.pop()
        if isinstance(node, yaml.SequenceNode):
            entries = marks.items.setdefault(path, [])
            for i, item in enumerate(node.value):
                if isinstance(item, yaml.ScalarNode):
                    entries.append((str(item.value), _where(item)))
                # A `<<: [*a, *b]` list of mappings merges into the same path.
                stack.append((item, path if merged else (*path, str(i)), merged))
        elif isinstance(node, yaml.MappingNode):
            seen: dict[str, Position] = {}
            for key, value in node.value:
                if key.tag == _MERGE_TAG:
                    stack.append((value, path, True))
                    continue
                name = str(key.value) if isinstance(key, yaml.ScalarNode) else "?"
                here = _where(key)
                if name in seen:
                    marks.duplicates.append(((*path, name), seen[name], here))
                seen[name] = here
                if merged:
                    marks.keys.setdefault((*path, name), here)  # the mapping's own keys win
                else:
                    marks.keys[(*path, name)] = here
                stack.append((value, (*path, name), False))
    return marks


# TOML: tomllib gives no positions, so a light scan of the text finds where each key is:
# [table] and [[table]] headers, `key = value` lines (dotted and quoted keys), one level of
# inline tables, and the quoted or bare entries of arrays. It does not parse TOML (tomllib
# did that); a key it misses is reported at the nearest key above it that it found.
_TOML_KEY = r'(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|\'[^\']*\')'
_TOML_DOTTED = re.compile(rf"\s*({_TOML_KEY}(?:\s*\.\s*{_TOML_KEY})*)\s*=\s*")
_TOML_HEADER = re.compile(rf"\s*\[\[?\s*({_TOML_KEY}(?:\s*\.\s*{_TOML_KEY})*)\s*\]\]?")
_TOML_PART = re.compile(_TOML_KEY)
_TOML_ENTRY = re.compile(r'"(?:[^"\\]|\\.)*"|\'[^\']*\'|[^\s,\[\]{}#]+')


def _toml_parts(dotted: str) -> KeyPath:
    return tuple(p.strip("\"'") for p in _TOML_PART.findall(dotted))


def _toml_marks(text: str) -> Marks:
    marks = Marks()
    table: KeyPath = ()
    for n, line in enumerate(text.splitlines(), 1):
        header = _TOML_HEADER.match(line)
        if header and not _TOML_DOTTED.match(line):
            table = _toml_parts(header.group(1))
            marks.keys.setdefault(table, (n, header.start(1) + 1))
            continue
        _toml_line(marks, table, line, n)
    return marks


def _toml_line(marks: Marks, table: KeyPath, line: str, n: int) -> None:
    """Keys (and array entries) on one line, inside ``table``."""
    pos, inline = 0, table
    while pos < len(line):
        m = _TOML_DOTTED.match(line, pos)
        if m is None:
            break
        path = (*inline, *_toml_parts(m.group(1)))
        marks.keys.setdefault(path, (n, m.start(1) + 1))
        pos = m.end()
        if line.startswith("{", pos):  # an inline table: its keys one level down
            inline, pos = path, pos + 1
            continue
        if line.startswith("[", pos):
            end = line.find("]", pos)
            end = len(line) if end < 0 else end
            entries = marks.items.setdefault(path, [])
            for e in _TOML_ENTRY.finditer(line, pos + 1, end):
                entries.append((e.group().strip("\"'"), (n, e.start() + 1)))
            pos = end + 1
        # Past this value: the next `key =` of an inline table, if any.
        comma = line.find(",", pos)
        if comma < 0:
            break
        pos = comma + 1


class DocumentError(ValueError):
    """The file cannot be read or parsed; the message is one short line naming the file."""


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """Nodes under ``root`` with every alias expanded, counted up to ``limit`` + 1.

    Iterative (a deep document must not exhaust the stack) and memoised per node, so shared
    subtrees cost their size each time they are referenced without being walked again. A node
    that contains itself (``&a [*a]``) is infinite.
    """
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        kids: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            kids = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            kids = [n for pair in node.value for n in pair]
        if done:
            on_path.discard(key)
            sizes[key] = min(limit + 1, 1 + sum(sizes[id(k)] for k in kids))
            continue
        if key in sizes:
            continue
        if key in on_path:
            return limit + 1  # an alias inside its own anchor
        on_path.add(key)
        stack.append((node, True))
        for kid in kids:
            if id(kid) in on_path:
                return limit + 1
            if id(kid) not in sizes:
                stack.append((kid, False))
    return sizes[id(root)]


def _load_yaml(data: bytes, name: str) -> tuple[Any, Marks]:
    try:
        return _load_with(_Loaders[0], data, name)
    except yaml.YAMLError:
        if len(_Loaders) == 1:
            raise
    return _load_with(_Loaders[-1], data, name)  # the same refusal, PyYAML's words


def _load_with(cls: Any, data: bytes, name: str) -> tuple[Any, Marks]:
    loader = cls(data)
    try:
        try:
            node = loader.get_single_node()
        except _TooBig:
            node = None
        if loader.nodes > MAX_NODES or (
            node is not None and _expanded_size(node, MAX_NODES) > MAX_NODES
        ):
            raise DocumentError(
                f"{name}: more than {MAX_NODES} values (aliases expanded); refusing it"
            )
        if node is None:
            return None, Marks()
        return loader.construct_document(node), _yaml_marks(node)
    finally:
        loader.dispose()


def read_document(path: Path) -> Any:
    """Read a YAML or TOML file; DocumentError (one line) when it cannot be read or parsed,
    trust.UntrustedError when, as root, it is not root's."""
    return read_marked(path)[0]


def read_marked(path: Path) -> tuple[Any, Marks]:
    """read_document, and where each key and list entry is in the file."""
    name = str(path)
    try:
        data = trust.read_regular(path, "configuration file")
    except OSError as exc:
        raise DocumentError(f"{name}: {exc.strerror or exc}") from None
    try:
        if path.suffix == ".toml":
            text = data.decode("utf-8")
            return tomllib.loads(text), _toml_marks(text)
        return _load_yaml(data, name)
    except yaml.MarkedYAMLError as exc:
        # FILE:LINE:COL: as every other error, so that editors and CI jump to it.
        mark = exc.problem_mark
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        raise DocumentError(f"{where}: not valid YAML: {exc.problem}{_yaml_hint(exc)}") from None
    except DocumentError:
        raise
    except tomllib.TOMLDecodeError as exc:
        # tomllib puts the position in its message only: "... (at line 3, column 19)".
        detail = " ".join(str(exc).split())
        at = _TOML_AT.search(detail)
        if at:
            detail = detail[: at.start()].rstrip()
            name = f"{name}:{at.group(1)}:{at.group(2)}"
        raise DocumentError(f"{name}: not valid TOML: {detail[:200]}") from None
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        kind = "TOML" if path.suffix == ".toml" else "YAML"
        detail = " ".join(str(exc).split())[:200]
        raise DocumentError(f"{name}: not valid {kind}: {detail}") from None


_TOML_AT = re.compile(r"\(at line (\d+), column (\d+)\)")


def _yaml_hint(exc: yaml.MarkedYAMLError) -> str:
    """What the parser's words mean to a person, where they are known to puzzle."""
    if "'\\t'" in (exc.problem or ""):
        return " (YAML forbids tabs in indentation: indent with spaces)"
    return ""
