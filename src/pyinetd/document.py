"""A configuration file -> plain Python data, in bounded time and memory.

Issue 14.9: nine lines of YAML aliases ("billion laughs") took 51 s and 386 MB to check and froze
every service for 31 s as a reload; `include: /dev/zero` ended in MemoryError; a FIFO hung the
server for good. So: a regular file only, opened without blocking (trust.open_regular), at most
trust.MAX_FILE_SIZE bytes, and a YAML document whose tree, with every alias expanded, has at
most MAX_NODES nodes. An alias is still fine for what people use it for (a `<<: *defaults`).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer

from pyinetd import trust

__all__ = ["MAX_NODES", "DocumentError", "read_document"]

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


def _load_yaml(data: bytes, name: str) -> Any:
    try:
        return _load_with(_Loaders[0], data, name)
    except yaml.YAMLError:
        if len(_Loaders) == 1:
            raise
    return _load_with(_Loaders[-1], data, name)  # the same refusal, PyYAML's words


def _load_with(cls: Any, data: bytes, name: str) -> Any:
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
        return None if node is None else loader.construct_document(node)
    finally:
        loader.dispose()


def read_document(path: Path) -> Any:
    """Read a YAML or TOML file; DocumentError (one line) when it cannot be read or parsed,
    trust.UntrustedError when, as root, it is not root's."""
    name = str(path)
    try:
        data = trust.read_regular(path, "configuration file")
    except OSError as exc:
        raise DocumentError(f"{name}: {exc.strerror or exc}") from None
    try:
        if path.suffix == ".toml":
            return tomllib.loads(data.decode("utf-8"))
        return _load_yaml(data, name)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise DocumentError(f"{name}: not valid YAML: {where}{exc.problem}") from None
    except DocumentError:
        raise
    except (yaml.YAMLError, tomllib.TOMLDecodeError, ValueError, RecursionError) as exc:
        kind = "TOML" if path.suffix == ".toml" else "YAML"
        detail = " ".join(str(exc).split())[:200]
        raise DocumentError(f"{name}: not valid {kind}: {detail}") from None
