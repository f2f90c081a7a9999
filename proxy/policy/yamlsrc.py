"""YAML documents whose every mapping, sequence and scalar remembers where it was written.

Strategy: PyYAML's `SafeLoader` composes the text into a node graph (each node carries a start
mark); we convert that graph into three small immutable types, `YMap`, `YSeq` and `YScalar`, each
with a `Pos` (path as the caller gave it, 1-based line and column). Scalars are constructed with
the same safe constructors `yaml.safe_load` uses, so `50` is an int and `"50"` a string, and a tag
that safe loading refuses (`!!python/object`) is an error with its position. Nothing here ever
calls `yaml.load` or a non-safe loader.

Two things `safe_load` does silently are made visible instead: a key written twice in one mapping
is kept (both entries, in order) so the validator can name both places, and merge keys (`<<`) are
expanded by hand following the YAML merge-key rules (explicit keys win over merged ones; earlier
merged mappings win over later ones). Aliases are converted once and shared, so an "exponential
alias" document costs no more than its distinct nodes; a recursive alias is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

__all__ = ["Pos", "YMap", "YNode", "YScalar", "YSeq", "YamlSourceError", "parse_yaml"]

_MERGE_TAG = "tag:yaml.org,2002:merge"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MAP_TAG = "tag:yaml.org,2002:map"


@dataclass(frozen=True, slots=True)
class Pos:
    """A place in a source file: path as given by the caller, 1-based line and column."""

    path: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.column}"

    @classmethod
    def from_mark(cls, path: str, mark: yaml.Mark | None) -> Pos:
        if mark is None:
            return cls(path, 1, 1)
        return cls(path, mark.line + 1, mark.column + 1)


@dataclass(frozen=True, slots=True)
class YScalar:
    """A scalar: the value safe loading gives it (str, int, float, bool, None, date, ...)."""

    value: object
    pos: Pos
    quoted: bool = False

    @property
    def kind(self) -> str:
        return "scalar"


@dataclass(frozen=True, slots=True)
class YSeq:
    """A sequence of nodes."""

    items: tuple[YNode, ...]
    pos: Pos

    @property
    def kind(self) -> str:
        return "list"


@dataclass(frozen=True, slots=True)
class YMap:
    """A mapping: every (key, value) entry in the order written, duplicates included."""

    entries: tuple[tuple[YNode, YNode], ...]
    pos: Pos

    @property
    def kind(self) -> str:
        return "mapping"


YNode = YScalar | YSeq | YMap


class YamlSourceError(Exception):
    """The text is not a YAML document we can read; `pos` is where the problem was found."""

    def __init__(self, pos: Pos, message: str) -> None:
        super().__init__(f"{pos}: {message}")
        self.pos = pos
        self.message = message


def parse_yaml(text: str, path: str) -> YNode | None:
    """Compose `text` (read from `path`) into position-carrying nodes; None for an empty stream.

    Raises `YamlSourceError` for syntax errors, several documents, unsafe or unknown tags and
    recursive aliases.
    """
    loader = yaml.SafeLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            raise YamlSourceError(
                Pos.from_mark(path, exc.problem_mark or exc.context_mark), _describe(exc)
            ) from None
        except yaml.YAMLError as exc:  # pragma: no cover - reader errors carry no mark
            raise YamlSourceError(Pos(path, 1, 1), f"invalid YAML: {exc}") from None
        if root is None:
            return None
        return _Converter(loader, path).convert(root)
    finally:
        loader.dispose()


def _describe(exc: yaml.MarkedYAMLError) -> str:
    problem = exc.problem or "malformed document"
    if (exc.context or "").startswith("expected a single document"):
        return "invalid YAML: more than one document ('---'); expected a single document"
    if exc.context:
        return f"invalid YAML: {problem} ({exc.context})"
    return f"invalid YAML: {problem}"


class _Converter:
    def __init__(self, loader: yaml.SafeLoader, path: str) -> None:
        self._loader = loader
        self._path = path
        self._done: dict[int, YNode] = {}
        self._active: set[int] = set()

    def convert(self, node: yaml.Node) -> YNode:
        key = id(node)
        done = self._done.get(key)
        if done is not None:
            return done
        pos = Pos.from_mark(self._path, node.start_mark)
        if key in self._active:
            raise YamlSourceError(pos, "invalid YAML: recursive alias; expected a finite document")
        self._active.add(key)
        try:
            result: YNode
            if isinstance(node, yaml.ScalarNode):
                result = YScalar(self._scalar(node), pos, quoted=node.style in ("'", '"'))
            elif node.tag not in (_SEQ_TAG, _MAP_TAG):
                raise YamlSourceError(
                    pos, f"invalid YAML: tag '{node.tag}' is not allowed; expected plain YAML"
                )
            elif isinstance(node, yaml.SequenceNode):
                result = YSeq(tuple(self.convert(item) for item in node.value), pos)
            elif isinstance(node, yaml.MappingNode):
                result = YMap(self._entries(node), pos)
            else:  # pragma: no cover - the composer makes only these three
                raise YamlSourceError(pos, "invalid YAML: unexpected node")
        finally:
            self._active.discard(key)
        self._done[key] = result
        return result

    def _scalar(self, node: yaml.ScalarNode) -> object:
        try:
            value: Any = self._loader.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as exc:
            pos = Pos.from_mark(self._path, exc.problem_mark or node.start_mark)
            raise YamlSourceError(
                pos, f"invalid YAML: {exc.problem or 'unsupported value'}"
            ) from None
        return value

    def _entries(self, node: yaml.MappingNode) -> tuple[tuple[YNode, YNode], ...]:
        own: list[tuple[YNode, YNode]] = []
        merged: list[tuple[YNode, YNode]] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merged.extend(self._merge_sources(value_node))
                continue
            own.append((self.convert(key_node), self.convert(value_node)))
        if not merged:
            return tuple(own)
        # Explicit keys win over merged ones; among merged, the first source wins.
        seen = {_hashable_key(k) for k, _ in own}
        extra: list[tuple[YNode, YNode]] = []
        for k, v in merged:
            hk = _hashable_key(k)
            if hk in seen:
                continue
            seen.add(hk)
            extra.append((k, v))
        return tuple(extra + own)

    def _merge_sources(self, value: yaml.Node) -> list[tuple[YNode, YNode]]:
        sources = value.value if isinstance(value, yaml.SequenceNode) else [value]
        out: list[tuple[YNode, YNode]] = []
        for source in sources:
            converted = self.convert(source)
            if not isinstance(converted, YMap):
                raise YamlSourceError(
                    converted.pos,
                    "invalid YAML: a merge key (<<) needs a mapping or a list of mappings",
                )
            out.extend(converted.entries)
        return out


def _hashable_key(node: YNode) -> object:
    if isinstance(node, YScalar):
        try:
            hash(node.value)
        except TypeError:  # pragma: no cover - safe scalars are hashable
            return ("pos", node.pos)
        return ("v", type(node.value).__name__, node.value)
    return ("pos", node.pos)
