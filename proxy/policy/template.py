"""Query templates: a simple query's text with holes where its constants are.

Strategy: the analysis cache shares facts between texts that libpg_query normalizes alike
(each constant replaced by a $n placeholder, everything else as written; see cache.py). The
relay thread's gate (proxy/relay.py) may run a simple query again without Python when its text
is an approved query's text with other constants, so a template must only ever match texts of
that same normalized form:

- holes are made for unsigned integer constants (digits) and plain string constants
  ('...' with no backslash and no prefix such as E, U&, B, X or N) only;
- the template is built from pglast's scan of the text and checked against pglast's normalize:
  replacing exactly the holes by $1, $2, ... must give the normalized text, byte for byte, or
  there is no template (a negative number, a float, a prefixed string);
- no character next to a hole may join a filler into a longer token (a letter, a digit, `_`,
  `$`, `.`, a quote, `&`), so the text between holes lexes exactly as in the approved text.

A filler the thread accepts is then one whole constant token of the same kind, and the text
that holds it normalizes to the approved text's normalized form. Only UTF-8 clients get
templates (in some other encodings a backslash byte can sit inside a character).
"""

from __future__ import annotations

from typing import Final

from pglast import parser as _pg

__all__ = ["HOLE_END", "HOLE_INTEGER", "HOLE_STRING", "Template", "query_template"]

HOLE_END, HOLE_INTEGER, HOLE_STRING = 0, 1, 2  # as proxy/_relay.c numbers them

Template = tuple[tuple[bytes, int], ...]
"""((segment, hole after it), ...): the last hole is HOLE_END."""

_JOINING: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_$.'\"&\\"
)


def query_template(sql: str, normalized: str) -> Template | None:
    """The template of `sql` (whose normalize is `normalized`), or None if it has none that
    is sure to match only texts of the same normalized form."""
    try:
        tokens = _pg.scan(sql)
    except Exception:  # pglast's ParseError, or anything the scanner rejects
        return None
    holes: list[tuple[int, int, int]] = []  # (start, end exclusive, hole kind)
    for token in tokens:
        start, end = token.start, token.end + 1
        if token.name == "ICONST":
            text = sql[start:end]
            if not text.isascii() or not text.isdigit():
                return None  # 0x1F, 1_000: an integer, but not one the thread would take
            kind = HOLE_INTEGER
        elif token.name == "SCONST":
            if not _plain_string(sql[start:end]):
                return None
            kind = HOLE_STRING
        else:
            continue
        before = sql[start - 1] if start > 0 else " "
        after = sql[end] if end < len(sql) else " "
        if before in _JOINING or after in _JOINING:
            return None
        holes.append((start, end, kind))
    if not holes:
        return None
    parts: list[str] = []
    at = 0
    for n, (start, end, _) in enumerate(holes, start=1):
        parts += [sql[at:start], f"${n}"]
        at = end
    parts.append(sql[at:])
    if "".join(parts) != normalized:
        return None  # normalize replaced something else too (a sign, a float): no template
    segments: list[tuple[bytes, int]] = []
    at = 0
    for start, end, kind in holes:
        segments.append((sql[at:start].encode(), kind))
        at = end
    segments.append((sql[at:].encode(), HOLE_END))
    return tuple(segments)


def _plain_string(token: str) -> bool:
    """'...' whose only quotes are doubled ones inside, and no backslash."""
    if len(token) < 2 or token[0] != "'" or token[-1] != "'" or "\\" in token:
        return False
    inner = token[1:-1]
    return "'" not in inner.replace("''", "")
