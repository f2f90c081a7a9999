"""A bounded LRU cache of analysis results.

Strategy: analysis costs milliseconds, and an agent repeats query shapes with new constants. So
facts are kept by the statement's NORMALIZED TEXT (libpg_query replaces each constant with a
$n placeholder and keeps everything else as written), with the catalog fingerprint and the
search_path: the same text but for its constants, over the same schema, resolved by the same
path, has the same facts.

Not the libpg_query fingerprint: it ignores the order of a select list and drops duplicate
entries (`SELECT id, nik` and `SELECT nik, id` share one), and the facts of one would then mask
the wrong positions of the other. The normalized text keeps order, duplicates, aliases and the
length of IN lists.

Three exceptions, where constants change meaning:

- positional references: `ORDER BY 1` and `ORDER BY 2` sort by different columns (one may be a
  masked column, the other not), and likewise GROUP BY and DISTINCT ON. Facts with
  `positional_refs` go to a second map keyed by the exact SQL text.
- utility statements (SET, SHOW, PREPARE, DECLARE, FETCH, COPY, ...): `SET search_path = a` and
  `= b` differ only in a constant, and so do `FETCH c1` / `FETCH c2`. Only strings whose every
  statement is a plain query (select/insert/update/delete/merge) are cached by normalized text;
  the rest go to the exact-text map.
- set_config calls: `set_config('jit', ...)` is allowed and `set_config('search_path', ...)` is
  not, yet they differ only in a constant. Facts with any set_config call (`config_settings`)
  go to the exact-text map too.

The exact-text map is consulted first; it is bounded like the other. Both are per catalog
fingerprint and search_path, so a catalog refresh simply stops hitting old entries, which age
out. A statement that does not parse is never cached (the analysis says why it does not).
Not thread-safe: one per event loop.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

from pglast import parser as _pg

from proxy.policy.analyze import StatementFacts, analyze
from proxy.policy.catalog import Catalog
from proxy.policy.decision import Decision

__all__ = ["AnalysisCache"]

_SHAREABLE: Final = frozenset({"select", "insert", "update", "delete", "merge"})

_Key = tuple[str, str, tuple[str, ...]]
_Facts = tuple[StatementFacts, ...]


class AnalysisCache:
    """LRU of `analyze` results; `hits` / `misses` count lookups."""

    def __init__(self, size: int = 4096) -> None:
        if size < 1:
            raise ValueError("cache size must be at least 1")
        self.size = size
        self.hits = 0
        self.misses = 0
        self._by_shape: OrderedDict[_Key, _Facts] = OrderedDict()
        self._by_text: OrderedDict[_Key, _Facts] = OrderedDict()
        # Decisions by (facts, rules, role), each holding its facts and rules so that their
        # ids stay theirs while the entry lives.
        self._decisions: dict[
            tuple[int, int, str], tuple[_Facts, object, tuple[tuple[StatementFacts, Decision], ...]]
        ] = {}

    def decided(
        self, facts: _Facts, rules: object, role: str
    ) -> tuple[tuple[StatementFacts, Decision], ...] | None:
        """The decisions made earlier for these very facts under these very rules."""
        found = self._decisions.get((id(facts), id(rules), role))
        if found is None or found[0] is not facts or found[1] is not rules:
            return None  # (an id can be reused once its object is gone: check identity)
        return found[2]

    def remember_decided(
        self,
        facts: _Facts,
        rules: object,
        role: str,
        judged: tuple[tuple[StatementFacts, Decision], ...],
    ) -> None:
        decisions = self._decisions
        if len(decisions) >= self.size:
            decisions.pop(next(iter(decisions)))
        decisions[(id(facts), id(rules), role)] = (facts, rules, judged)

    def __len__(self) -> int:
        return len(self._by_shape) + len(self._by_text)

    def clear(self) -> None:
        self._decisions.clear()
        self._by_shape.clear()
        self._by_text.clear()

    def shared_shape(self, sql: str, catalog: Catalog, search_path: tuple[str, ...]) -> str | None:
        """The normalized text under which `sql`'s facts are cached and shared with every text
        of the same form, or None (not cached, or cached by its exact text only)."""
        if (sql, catalog.fingerprint, search_path) in self._by_text:
            return None
        normalized = _normalize(sql)
        if (
            normalized is None
            or (normalized, catalog.fingerprint, search_path) not in self._by_shape
        ):
            return None
        return normalized

    def analyze(
        self, sql: str, catalog: Catalog, search_path: tuple[str, ...]
    ) -> tuple[StatementFacts, ...]:
        """`analyze(sql, catalog, search_path)`, from the cache when possible.

        AnalysisError propagates (and is not cached: a syntax error is cheap to find again).
        """
        text_key = (sql, catalog.fingerprint, search_path)
        found = _get(self._by_text, text_key)
        if found is not None:
            self.hits += 1
            return found
        normalized = _normalize(sql)
        if normalized is None:
            self.misses += 1
            return analyze(sql, catalog, search_path)  # raises AnalysisError with the reason
        shape_key = (normalized, catalog.fingerprint, search_path)
        found = _get(self._by_shape, shape_key)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        facts = analyze(sql, catalog, search_path)
        if _shareable(facts):
            _put(self._by_shape, shape_key, facts, self.size)
        else:
            _put(self._by_text, text_key, facts, self.size)
        return facts


def _normalize(sql: str) -> str | None:
    """The statement with its constants replaced by placeholders; None if it does not parse."""
    try:
        return str(_pg.normalize(sql))
    except Exception:  # pglast's ParseError, or anything libpg_query rejects
        return None


def _shareable(facts: _Facts) -> bool:
    """Facts that hold for every statement of the same normalized text (see the docstring).
    Facts found this way carry the first text seen; messages quote the statement only for
    utility statements, which are never shared."""
    return all(
        f.kind in _SHAREABLE and not f.positional_refs and not f.config_settings for f in facts
    )


def _get(store: OrderedDict[_Key, _Facts], key: _Key) -> _Facts | None:
    found = store.get(key)
    if found is not None:
        store.move_to_end(key)
    return found


def _put(store: OrderedDict[_Key, _Facts], key: _Key, facts: _Facts, size: int) -> None:
    store[key] = facts
    store.move_to_end(key)
    while len(store) > size:
        store.popitem(last=False)
