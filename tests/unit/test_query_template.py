"""Query templates (proxy/policy/template.py): a template only ever matches texts that
libpg_query normalizes exactly as the approved text, whatever fills its holes.

The fillers here follow the grammar the relay thread accepts (proxy/_relay.c, hole_filler):
digits for an integer hole; a quote, any characters but a quote or a backslash (two quotes
for one), a quote for a string hole. Each filled text must normalize to the approved text's
normalized form, or the analysis cache would hand it facts that are not its own.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pglast import parser as pg

from proxy.policy.template import HOLE_END, HOLE_INTEGER, HOLE_STRING, query_template

TEMPLATED = [
    "SELECT abalance FROM pgbench_accounts WHERE aid = 4711;",
    "SELECT abalance FROM pgbench_accounts WHERE aid = 4711",
    "SELECT full_name, email, city FROM customers WHERE nik = '3273014501900001'",
    "SELECT id, full_name FROM bank.customers WHERE id IN (1, 2, 3) LIMIT 20",
    "SELECT * FROM t WHERE a = 'it''s' AND b = 12 -- a comment with 'quotes' and 34\n",
    "SELECT '2020-01-01'::date, x FROM t WHERE y = 'héllo wörld' /* 5 */ ORDER BY x",
    "SELECT count(*) FROM customers WHERE city = 'Bandung' AND gender = 'P'",
]

UNTEMPLATED = [
    ("no constants", "SELECT id FROM customers"),
    ("a negative number", "SELECT id FROM t WHERE a = -5"),
    ("a float", "SELECT id FROM t WHERE a = 1.5"),
    ("an escape string", "SELECT id FROM t WHERE a = E'x\\ty'"),
    ("a unicode string", "SELECT id FROM t WHERE a = U&'x'"),
    ("a bit string", "SELECT id FROM t WHERE a = B'101'"),
    ("a hex integer", "SELECT id FROM t WHERE a = 0x1F"),
    ("a backslash in a string", "SELECT id FROM t WHERE a = 'x\\y'"),
    ("a dollar-quoted string", "SELECT id FROM t WHERE a = $$x$$"),
    ("strings continued across lines", "SELECT id FROM t WHERE a = 'x'\n'y'"),
    ("a syntax error", "SELEC id FROM t WHERE a = 1"),
]


def normalize(sql: str) -> str:
    return str(pg.normalize(sql))


@pytest.mark.parametrize("sql", TEMPLATED)
def test_queries_with_plain_constants_get_a_template(sql: str) -> None:
    template = query_template(sql, normalize(sql))
    assert template is not None
    assert template[-1][1] == HOLE_END
    assert all(hole in (HOLE_INTEGER, HOLE_STRING) for _, hole in template[:-1])


@pytest.mark.parametrize(("why", "sql"), UNTEMPLATED)
def test_other_constants_get_none(why: str, sql: str) -> None:
    try:
        normalized = normalize(sql)
    except Exception:
        normalized = sql
    assert query_template(sql, normalized) is None, why


def test_a_template_checked_against_another_normalized_text_is_refused() -> None:
    sql = TEMPLATED[0]
    assert query_template(sql, normalize("SELECT bid FROM pgbench_accounts WHERE aid = 1;")) is None


def test_the_pgbench_query_has_one_integer_hole() -> None:
    sql = "SELECT abalance FROM pgbench_accounts WHERE aid = 4711;"
    assert query_template(sql, normalize(sql)) == (
        (b"SELECT abalance FROM pgbench_accounts WHERE aid = ", HOLE_INTEGER),
        (b";", HOLE_END),
    )


integers = st.from_regex(r"\A[0-9]{1,32}\Z")
string_bodies = st.text(
    alphabet=st.characters(blacklist_characters="\\\x00", blacklist_categories=("Cs",)),
    max_size=30,
)
# what a string hole may hold, spiced with the characters that matter to a lexer
tricky = st.sampled_from(["--", "/*", "*/", "$$", "$1", ";", "''", "\n", "e'", '"', "::", "é"])
strings = st.lists(st.one_of(string_bodies, tricky), max_size=6).map(
    lambda parts: "'" + "".join(parts).replace("'", "''") + "'"
)


def fill(template: tuple[tuple[bytes, int], ...], fillers: list[str]) -> str:
    out = []
    for (segment, hole), filler in zip(template, fillers + [""], strict=True):
        out.append(segment.decode())
        if hole != HOLE_END:
            out.append(filler)
    return "".join(out)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(TEMPLATED), st.data())
def test_any_filled_template_normalizes_as_the_approved_text(sql: str, data: st.DataObject) -> None:
    normalized = normalize(sql)
    template = query_template(sql, normalized)
    assert template is not None
    fillers = [
        data.draw(integers if hole == HOLE_INTEGER else strings) for _, hole in template[:-1]
    ]
    filled = fill(template, fillers)
    assert normalize(filled) == normalized, filled
