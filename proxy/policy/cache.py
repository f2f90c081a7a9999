"""A bounded LRU cache of analysis results.

Strategy: analysis costs milliseconds, libpg_query's fingerprint microseconds, and an agent
repeats query shapes with new constants. So facts are kept by (fingerprint, catalog fingerprint,
search_path): the same shape over the same schema, resolved by the same path, has the same facts.
Two exceptions, because the fingerprint ignores constants and some constants change meaning:

- positional references: `ORDER BY 1` and `ORDER BY 2` share a fingerprint but sort by
  different columns (one may be a masked column, the other not), and likewise GROUP BY and
  DISTINCT ON. Facts with `positional_refs` go to a second map keyed by the exact SQL text.
- utility statements (SET, SHOW, PREPARE, DECLARE, FETCH, COPY, ...): `SET search_path = a`
  and `= b` share a fingerprint, and so do `FETCH c1` / `FETCH c2`. Only strings whose every
  statement is a plain query (select/insert/update/delete/merge) are cached by fingerprint;
  the rest go to the exact-text map.

The exact-text map is consulted first; it is bounded like the other. Both are per catalog
fingerprint and search_path, so a catalog refresh simply stops hitting old entries, which age
out. Not thread-safe: one per event loop.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

from proxy.policy.analyze import StatementFacts, analyze, fingerprint
from proxy.policy.catalog import Catalog

__all__ = ["AnalysisCache"]

_FINGERPRINTABLE: Final = frozenset({"select", "insert", "update", "delete", "merge"})

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
        self._by_fingerprint: OrderedDict[_Key, _Facts] = OrderedDict()
        self._by_text: OrderedDict[_Key, _Facts] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_fingerprint) + len(self._by_text)

    def clear(self) -> None:
        self._by_fingerprint.clear()
        self._by_text.clear()

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
        fp_key = (fingerprint(sql), catalog.fingerprint, search_path)
        found = _get(self._by_fingerprint, fp_key)
        if found is not None:
            self.hits += 1
            return _with_text(found, sql)
        self.misses += 1
        facts = analyze(sql, catalog, search_path)
        if _fingerprintable(facts):
            _put(self._by_fingerprint, fp_key, facts, self.size)
        else:
            _put(self._by_text, text_key, facts, self.size)
        return facts


def _fingerprintable(facts: _Facts) -> bool:
    return all(f.kind in _FINGERPRINTABLE and not f.positional_refs for f in facts)


def _with_text(facts: _Facts, sql: str) -> _Facts:
    """Facts found by fingerprint carry the first text seen; messages quote the statement only
    for utility statements, which never come from this map, so the text is left as it is."""
    return facts


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
