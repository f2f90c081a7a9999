"""Analysis: SQL text + catalog + search_path -> the facts a policy decision needs.

Strategy: two parsers, each doing what it is good at, checked against each other.

1. pglast (libpg_query, PostgreSQL's own grammar) splits the string into statements with their
   source text, classifies each (`select`, `set`, `cursor`, ...), and collects what only an exact
   parse can be trusted with: relation names (already case-folded, quoted names kept, U&"..."
   decoded), functions and operators called, positional ORDER BY / GROUP BY / DISTINCT ON, the
   shape of SET / COPY / PREPARE / DECLARE. It reads libpg_query's JSON, which is five times
   faster than building pglast's Python objects.
2. For every query (a SELECT, or the query inside EXPLAIN / PREPARE / DECLARE / COPY), sqlglot
   parses the same text (pglast's deparse of it when the text holds anything sqlglot's lexer
   might read differently: backslashes, dollar quotes, U& escapes, block comments, non-ASCII),
   and a chain of pure passes follows, each testable alone:
   `_resolve_tables` (names -> catalog relations, by the session's search_path) ->
   `_cross_check` (both parsers must name the same relations) -> `_expand_views` (a view or
   matview becomes its definition, recursively) -> `_qualify` (sqlglot's qualify with the
   catalog as schema: every column gets its table, `*` is expanded) -> `_Lineage` (walks
   sqlglot's scopes: for each output column the base columns it derives from and whether it is
   a plain copy; for every column reference its clause and whether it is a `col = constant`
   style lookup).
3. Anything that could not be modelled leaves `StatementFacts.unsupported` set to a reason;
   the decision for a restricted role is then a refusal. Nothing here knows about rules or roles.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

import sqlglot
from pglast import ast as pglast_ast
from pglast import parser as pg_parser
from pglast import visitors as pglast_visitors
from sqlglot import exp
from sqlglot.optimizer.normalize_identifiers import normalize_identifiers
from sqlglot.optimizer.qualify import qualify
from sqlglot.optimizer.scope import Scope, traverse_scope
from sqlglot.schema import MappingSchema

from proxy.policy.catalog import Catalog, Relation
from proxy.policy.decision import CopyFormat
from proxy.policy.functions import is_set_config

__all__ = [
    "VIEW_SEARCH_PATH",
    "AnalysisError",
    "ColumnRef",
    "ColumnUse",
    "FOLDING_AGGREGATES",
    "OutputColumn",
    "RelationInfo",
    "Setting",
    "StatementFacts",
    "analyze",
    "fingerprint",
    "parse_statements",
]

ColumnRef = tuple[int, int]
"""(relation OID, attnum) of a base-table column."""

MAX_VIEW_DEPTH: Final = 8
VIEW_SEARCH_PATH: Final = ("pg_catalog", "public")
"""The search_path view definitions are read with: pg_get_viewdef qualifies a name only when the
catalog loader's search_path (the default, "$user", public) would not find it."""

QUERY_KINDS: Final = frozenset({"select"})


class AnalysisError(ValueError):
    """The SQL does not parse as PostgreSQL; `reason` is PostgreSQL's message."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Unsupported(Exception):
    """A construct the analysis cannot model; becomes `StatementFacts.unsupported`."""


# -- the facts -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutputColumn:
    """One result column: the base columns its values come from.

    `plain_copy`: every value is a verbatim value of one of `sources` (through aliases,
    subqueries, CTEs, views; for a set operation, every branch is a plain copy). `is_count`: a
    count(...), which carries no value of its sources.
    """

    name: str
    sources: frozenset[ColumnRef]
    plain_copy: bool
    is_count: bool = False


@dataclass(frozen=True, slots=True, order=True)
class ColumnUse:
    """A reference to a base column somewhere in a statement.

    clause: select, where, join, having, group, order, distinct_on, window, from (a table
    function's arguments), other (LIMIT, VALUES, ...). form: `plain` (the column itself),
    `equality` (a WHERE/HAVING/ON `col = const|$n`, `col IN (consts)`, `col IS [NOT] NULL`),
    `count` (inside count()), `expression` (anything else, including a subquery's output that
    feeds a predicate, and a derived column that is not a plain copy).
    """

    column: ColumnRef
    clause: str
    form: str


@dataclass(frozen=True, slots=True)
class Setting:
    """A SET / RESET. action: set, default (SET x TO DEFAULT), reset, reset_all, multi
    (SET TRANSACTION / SESSION CHARACTERISTICS), discard. Values are as written, joined by ', '."""

    action: str
    name: str
    value: str | None = None
    local: bool = False


@dataclass(frozen=True, slots=True)
class RelationInfo:
    """What decide needs of a relation: names for labels and messages, its columns."""

    oid: int
    schema: str
    name: str
    kind: str
    label_schema: str  # the partition root's: labels name the table a partition belongs to
    label_name: str
    columns: tuple[tuple[int, str], ...]  # (attnum, name)

    def column_name(self, attnum: int) -> str | None:
        for number, name in self.columns:
            if number == attnum:
                return name
        return None


@dataclass(frozen=True, slots=True)
class StatementFacts:
    """Everything the decision needs to know about one statement."""

    kind: str
    text: str
    outputs: tuple[OutputColumn, ...] | None = None
    uses: frozenset[ColumnUse] = frozenset()
    functions: frozenset[tuple[str, ...]] = frozenset()
    # per set_config call: the setting it changes (lower case), None if not all arguments are
    # constants
    config_settings: frozenset[str | None] = frozenset()
    operators: frozenset[tuple[str, ...]] = frozenset()
    whole_row_relations: frozenset[int] = frozenset()
    relations: frozenset[int] = frozenset()
    star_relations: frozenset[int] = frozenset()
    writes: bool = False
    into: bool = False
    positional_refs: bool = False
    unsupported: str | None = None
    unknown_relations: tuple[str, ...] = ()
    relation_info: tuple[RelationInfo, ...] = ()
    setting: Setting | None = None
    name: str | None = None  # PREPARE / EXECUTE / DEALLOCATE / DECLARE / FETCH / CLOSE target
    inner: StatementFacts | None = None  # EXPLAIN / PREPARE / DECLARE / COPY (query)
    copy_target: str | None = None  # client, file or program
    node: str = ""  # libpg_query's node name, for messages
    copy: CopyFormat | None = None  # COPY ... TO: the data format its options ask for
    folds: frozenset[str] = frozenset()  # constructs folding many rows into one value
    unfiltered: frozenset[int] = frozenset()  # relations read without a restricting WHERE

    def info(self, oid: int) -> RelationInfo | None:
        for item in self.relation_info:
            if item.oid == oid:
                return item
        return None

    def column_label(self, ref: ColumnRef) -> str:
        """`schema.table.column` of a base column, for messages."""
        info = self.info(ref[0])
        if info is None:
            return f"column {ref[1]} of relation {ref[0]}"
        return f"{info.schema}.{info.name}.{info.column_name(ref[1])}"


def fingerprint(sql: str) -> str:
    """libpg_query's fingerprint: equal for statements that differ only in constants."""
    return str(pg_parser.fingerprint(sql))


# -- pglast: split and classify ----------------------------------------------------------------

JsonNode = dict[str, Any]


def parse_statements(sql: str) -> list[tuple[str, JsonNode]]:
    """(source text, libpg_query JSON node `{"SelectStmt": {...}}`) of each statement."""
    try:
        doc = json.loads(pg_parser.parse_sql_json(sql))
    except pg_parser.ParseError as exc:
        raise AnalysisError(str(exc)) from None
    raw = sql.encode()
    result: list[tuple[str, JsonNode]] = []
    for item in doc.get("stmts", []):
        start = int(item.get("stmt_location", 0))
        length = int(item.get("stmt_len", 0))
        end = len(raw) if length == 0 else start + length
        text = raw[start:end].decode(errors="replace").strip()
        result.append((text, item["stmt"]))
    return result


def _walk_json(node: object) -> Iterator[tuple[str, JsonNode]]:
    """Every (node name, fields) pair below `node`, wrapped nodes only."""
    stack: list[object] = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if isinstance(value, dict) and key[:1].isupper():
                    yield key, value
                if isinstance(value, dict | list):
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


def _strings(items: object) -> tuple[str, ...]:
    """A libpg_query name list ([{"String": {"sval": "x"}}, ...]) as a tuple."""
    out: list[str] = []
    if isinstance(items, list):
        for item in items:
            if isinstance(item, dict) and "String" in item:
                out.append(str(item["String"].get("sval", "")))
            elif isinstance(item, dict) and "A_Star" in item:
                out.append("*")
    return tuple(out)


@dataclass(slots=True)
class _PgFacts:
    """What the exact parse says about a query."""

    rangevars: set[tuple[str, ...]] = field(default_factory=set)
    ctes: set[str] = field(default_factory=set)
    functions: set[tuple[str, ...]] = field(default_factory=set)
    config_settings: set[str | None] = field(default_factory=set)
    operators: set[tuple[str, ...]] = field(default_factory=set)
    positional: bool = False
    writes: bool = False
    folds: set[str] = field(default_factory=set)


FOLDING_AGGREGATES: Final = frozenset(
    {
        "string_agg",
        "array_agg",
        "json_agg",
        "json_agg_strict",
        "jsonb_agg",
        "jsonb_agg_strict",
        "json_object_agg",
        "json_object_agg_strict",
        "json_object_agg_unique",
        "json_object_agg_unique_strict",
        "jsonb_object_agg",
        "jsonb_object_agg_strict",
        "jsonb_object_agg_unique",
        "jsonb_object_agg_unique_strict",
        "xmlagg",
        "range_agg",
        "range_intersect_agg",
    }
)
"""Aggregates whose one value holds (a part of) every row they read."""

_TABLE_FUNCS_WITH_SQL: Final = frozenset({"RangeTableFunc", "JsonTable"})


def _pg_facts(node: JsonNode) -> _PgFacts:
    facts = _PgFacts()
    for name, fields in _walk_json(node):
        if name == "RangeVar":
            facts.rangevars.add(_rangevar_parts(fields))
        elif name == "CommonTableExpr":
            facts.ctes.add(str(fields.get("ctename", "")))
            query = fields.get("ctequery", {})
            if isinstance(query, dict) and set(query) & _WRITE_NODES:
                facts.writes = True
        elif name == "FuncCall":
            fname = _strings(fields.get("funcname"))
            facts.functions.add(fname)
            if is_set_config(fname):
                facts.config_settings.add(_set_config_setting(fields))
            if fname and fname[-1] in FOLDING_AGGREGATES:
                facts.folds.add(fname[-1])
        elif name in ("JsonArrayAgg", "JsonObjectAgg"):
            facts.folds.add("json_arrayagg" if name == "JsonArrayAgg" else "json_objectagg")
        elif name == "SubLink":
            if fields.get("subLinkType") == "ARRAY_SUBLINK":
                facts.folds.add("ARRAY(subquery)")
        elif name == "WithClause":
            if fields.get("recursive"):
                facts.folds.add("WITH RECURSIVE")
        elif name == "A_Expr":
            if fields.get("kind") in ("AEXPR_OP", "AEXPR_OP_ANY", "AEXPR_OP_ALL"):
                facts.operators.add(_strings(fields.get("name")))
        elif name == "SelectStmt":
            facts.positional |= _has_positional(fields)
        elif name in _WRITE_NODES:
            facts.writes = True
    return facts


_WRITE_NODES: Final = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})

_CALL_MODIFIERS: Final = (
    "agg_order",
    "agg_filter",
    "over",
    "agg_within_group",
    "agg_star",
    "agg_distinct",
    "func_variadic",
)
_PLAIN_CASTS: Final = frozenset({"text", "varchar", "bool"})


def _set_config_setting(call: Mapping[str, Any]) -> str | None:
    """The setting a `set_config(name, value, is_local)` call changes (lower case, as PostgreSQL
    compares names), or None unless its name is a string literal and its value and flag are
    literals or `$n` parameters (each perhaps cast to text, varchar or boolean): no column, no
    expression, no named or variadic arguments."""
    args = call.get("args") or []
    if len(args) != 3 or any(call.get(key) for key in _CALL_MODIFIERS):
        return None
    name, value, flag = (_plain_constant(a) for a in args)
    if not (isinstance(name, dict) and "A_Const" in name and "sval" in name["A_Const"]):
        return None
    if value is None or flag is None:
        return None
    sval = name["A_Const"]["sval"]
    text = sval.get("sval", "") if isinstance(sval, dict) else sval
    return str(text).lower()


def _plain_constant(node: object) -> JsonNode | None:
    """The A_Const or ParamRef `node` is, under at most one plain cast; None for anything else
    (a NULL constant included)."""
    if not isinstance(node, dict):
        return None
    if "TypeCast" in node:
        cast = node["TypeCast"]
        type_name = cast.get("typeName", {})
        names = _strings(type_name.get("names"))
        if type_name.get("arrayBounds") or type_name.get("setof"):
            return None
        if not names or names[-1] not in _PLAIN_CASTS or names[:-1] not in ((), ("pg_catalog",)):
            return None
        node = cast.get("arg")
        if not isinstance(node, dict):
            return None
    if "ParamRef" in node:
        return node
    if "A_Const" in node and not node["A_Const"].get("isnull"):
        return node
    return None


def _rangevar_parts(fields: Mapping[str, Any]) -> tuple[str, ...]:
    parts = [fields.get("catalogname"), fields.get("schemaname"), fields.get("relname")]
    return tuple(str(p) for p in parts if p)


def _is_int_const(node: object) -> bool:
    return isinstance(node, dict) and "A_Const" in node and "ival" in node["A_Const"]


def _has_positional(select: Mapping[str, Any]) -> bool:
    for item in select.get("sortClause", []) or []:
        if _is_int_const(item.get("SortBy", {}).get("node")):
            return True
    for key in ("groupClause", "distinctClause"):
        for item in select.get(key, []) or []:
            if _is_int_const(item):
                return True
    return False


# -- classification ----------------------------------------------------------------------------

_KIND_BY_NODE: Final = {
    "SelectStmt": "select",
    "InsertStmt": "insert",
    "UpdateStmt": "update",
    "DeleteStmt": "delete",
    "MergeStmt": "merge",
    "VariableShowStmt": "show",
    "ExplainStmt": "explain",
    "CallStmt": "call",
    "DoStmt": "do",
    "ListenStmt": "listen",
    "UnlistenStmt": "listen",
    "NotifyStmt": "listen",
    "PrepareStmt": "prepare",
    "ExecuteStmt": "prepare",
    "DeallocateStmt": "prepare",
    "DeclareCursorStmt": "cursor",
    "FetchStmt": "cursor",
    "ClosePortalStmt": "cursor",
    "ConstraintsSetStmt": "transaction",
}

_DANGEROUS_TRANSACTION: Final = frozenset(
    {"TRANS_STMT_PREPARE", "TRANS_STMT_COMMIT_PREPARED", "TRANS_STMT_ROLLBACK_PREPARED"}
)


def analyze(sql: str, catalog: Catalog, search_path: tuple[str, ...]) -> tuple[StatementFacts, ...]:
    """The facts of every statement in `sql`; AnalysisError if PostgreSQL would not parse it."""
    ctx = _Context(catalog, search_path)
    statements = parse_statements(sql)
    return tuple(_statement_facts(text, node, ctx) for text, node in statements)


@dataclass(slots=True)
class _Context:
    catalog: Catalog
    search_path: tuple[str, ...]


def _statement_facts(text: str, node: JsonNode, ctx: _Context) -> StatementFacts:
    ((name, fields),) = node.items()
    handler = _HANDLERS.get(name)
    if handler is not None:
        return handler(text, name, fields, ctx)
    kind = _KIND_BY_NODE.get(name, "ddl")
    if kind in ("select", "insert", "update", "delete", "merge"):
        return _query_facts(text, node, ctx, kind=kind)
    return StatementFacts(kind=kind, text=text, node=name, writes=kind == "ddl")


def _transaction(text: str, name: str, fields: JsonNode, ctx: _Context) -> StatementFacts:
    dangerous = fields.get("kind") in _DANGEROUS_TRANSACTION
    return StatementFacts(kind="ddl" if dangerous else "transaction", text=text, node=name)


def _const_text(node: object) -> str:
    """The text of an A_Const / TypeCast argument of SET, as PostgreSQL would take it."""
    if isinstance(node, dict):
        if "A_Const" in node:
            const = node["A_Const"]
            for key in ("sval", "ival", "fval", "boolval", "bsval"):
                if key in const:
                    inner = const[key]
                    value = inner.get(key, "") if isinstance(inner, dict) else inner
                    if key == "ival" and isinstance(inner, dict) and not inner:
                        value = 0
                    return str(value)
            return ""
        if "TypeCast" in node:
            return _const_text(node["TypeCast"].get("arg"))
    return "?"


def _set(text: str, name: str, fields: JsonNode, ctx: _Context) -> StatementFacts:
    kind_name = str(fields.get("kind", ""))
    var = str(fields.get("name", "")).lower()
    local = bool(fields.get("is_local", False))
    if kind_name == "VAR_SET_MULTI":
        kind = "transaction" if var in ("transaction", "session characteristics") else "set"
        return StatementFacts(kind=kind, text=text, node=name, setting=Setting("multi", var))
    action = {
        "VAR_SET_VALUE": "set",
        "VAR_SET_DEFAULT": "default",
        "VAR_SET_CURRENT": "default",
        "VAR_RESET": "reset",
        "VAR_RESET_ALL": "reset_all",
    }.get(kind_name, "set")
    value = None
    if action == "set":
        value = ", ".join(_const_text(a) for a in fields.get("args", []) or [])
    return StatementFacts(
        kind="set", text=text, node=name, setting=Setting(action, var, value, local)
    )


def _discard(text: str, name: str, fields: JsonNode, ctx: _Context) -> StatementFacts:
    target = str(fields.get("target", "")).removeprefix("DISCARD_").lower()
    return StatementFacts(kind="set", text=text, node=name, setting=Setting("discard", target))


def _notify(text: str, name: str, fields: JsonNode, ctx: _Context) -> StatementFacts:
    return StatementFacts(
        kind="listen", text=text, node=name, functions=frozenset({("pg_notify",)})
    )


def _inner_query(outer: str, fields: JsonNode, key: str, ctx: _Context) -> StatementFacts:
    """The facts of the query inside EXPLAIN / PREPARE / DECLARE / COPY / CREATE TABLE AS."""
    query = fields.get(key)
    if not isinstance(query, dict):
        return StatementFacts(kind="ddl", text="", unsupported="no query found")
    text = _deparse(outer, key)
    if text is None:
        return StatementFacts(kind="ddl", text="", unsupported="the query cannot be deparsed")
    parsed = parse_statements(text)
    if len(parsed) != 1:
        return StatementFacts(kind="ddl", text=text, unsupported="the query is not one statement")
    return _statement_facts(parsed[0][0], parsed[0][1], ctx)


def _explain(text: str, name: str, fields: JsonNode, ctx: _Context) -> StatementFacts:
    inner = _inner_query(text, fields, "query", ctx)
    return StatementFacts(kind="explain", text=text, node=name, inner=inner)


def _prepare(text: str, name: str, fields: JsonNode, ctx: _Context) -> StatementFacts:
    inner = _inner_query(text, fields, "query", ctx) if name == "PrepareStmt" else None
    target = fields.get("name")
    return StatementFacts(
        kind="prepare",
        text=text,
        node=name,
        inner=inner,
        name=None if target is None else str(target),
    )


def _cursor(text: str, name: str, fields: JsonNode, ctx: _Context) -> StatementFacts:
    inner = _inner_query(text, fields, "query", ctx) if name == "DeclareCursorStmt" else None
    target = fields.get("portalname")
    return StatementFacts(
        kind="cursor",
        text=text,
        node=name,
        inner=inner,
        name=None if target is None else str(target),
    )


def _create_table_as(text: str, name: str, fields: JsonNode, ctx: _Context) -> StatementFacts:
    inner = _inner_query(text, fields, "query", ctx)
    return StatementFacts(kind="ddl", text=text, node=name, inner=inner, into=True, writes=True)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _copy(text: str, name: str, fields: JsonNode, ctx: _Context) -> StatementFacts:
    is_from = bool(fields.get("is_from", False))
    if fields.get("is_program"):
        target = "program"
    elif fields.get("filename"):
        target = "file"
    else:
        target = "client"
    kind = "copy_in" if is_from else "copy_out"
    if is_from:
        relation = fields.get("relation") or {}
        parts = _rangevar_parts(relation)
        resolved = ctx.catalog.resolve(parts, ctx.search_path)
        return StatementFacts(
            kind=kind,
            text=text,
            node=name,
            copy_target=target,
            writes=True,
            relations=frozenset() if resolved is None else frozenset({resolved.oid}),
            unknown_relations=() if resolved is not None else (".".join(parts),),
        )
    if "query" in fields:
        inner = _inner_query(text, fields, "query", ctx)
    else:
        relation = fields.get("relation") or {}
        columns = _strings(fields.get("attlist"))
        target_list = ", ".join(_quote_ident(c) for c in columns) if columns else "*"
        table = ".".join(_quote_ident(p) for p in _rangevar_parts(relation))
        query_text = f"SELECT {target_list} FROM {table}"
        ((q_text, q_node),) = parse_statements(query_text)
        inner = _statement_facts(q_text, q_node, ctx)
    return StatementFacts(
        kind=kind,
        text=text,
        node=name,
        copy_target=target,
        inner=inner,
        copy=_copy_format(fields.get("options") or [], inner),
    )


_COPY_STRING_OPTIONS: Final = ("delimiter", "quote", "escape", "null")


def _copy_format(options: list[Any], inner: StatementFacts) -> CopyFormat:
    """The format options of COPY ... TO (the legacy `CSV`, `BINARY`, `DELIMITER 'x'`, ...
    spellings reach here as the same DefElems as `WITH (FORMAT csv, ...)`)."""
    fmt = "text"
    values: dict[str, str] = {}
    header = False
    unsupported: str | None = None
    for item in options:
        elem = item.get("DefElem", {}) if isinstance(item, dict) else {}
        name = str(elem.get("defname", ""))
        arg = elem.get("arg")
        text = _defelem_text(arg)
        if name == "format":
            if text in ("text", "csv", "binary"):
                fmt = text
            else:
                unsupported = f"FORMAT {text}"
        elif name in _COPY_STRING_OPTIONS:
            if text is None:
                unsupported = name.upper()
            else:
                values[name] = text
        elif name == "header":
            if arg is None or text in ("true", "on", "1", "t", "yes"):
                header = True
            elif text in ("false", "off", "0", "f", "no"):
                header = False
            else:
                unsupported = f"HEADER {text}"
        else:
            unsupported = name.upper()
    if fmt == "binary" and (values or header):
        unsupported = unsupported or "options of the text formats with FORMAT binary"
    outputs = inner.outputs
    return CopyFormat(
        format=fmt,  # type: ignore[arg-type]
        delimiter=values.get("delimiter"),
        quote=values.get("quote"),
        escape=values.get("escape"),
        null=values.get("null"),
        header=header,
        column_count=None if outputs is None else len(outputs),
        unsupported=unsupported,
    )


def _defelem_text(arg: object) -> str | None:
    if not isinstance(arg, dict):
        return None
    if "String" in arg:
        return str(arg["String"].get("sval", ""))
    if "Boolean" in arg:
        return "true" if arg["Boolean"].get("boolval") else "false"
    if "Integer" in arg:
        return str(arg["Integer"].get("ival", 0))
    if "A_Star" in arg:
        return "*"
    return None


def _unfiltered(node: JsonNode, pg: _PgFacts, ctx: _Context) -> set[int]:
    """Relations some SELECT level reads (in its FROM, joins included) while that level has no
    WHERE, or a WHERE that restricts nothing: no column reference, or an OR with a branch
    that references no column (`WHERE true`, `WHERE 1 = 1`, `WHERE id > 0 OR true`). A
    syntactic test: `WHERE id > 0` counts as restricting."""
    found: set[int] = set()
    for fields in _select_levels(node):
        where = fields.get("whereClause")
        if where is not None and _restricts(where):
            continue
        for parts in _from_rangevars(fields.get("fromClause") or []):
            if len(parts) == 1 and parts[0] in pg.ctes:
                continue
            rel = ctx.catalog.resolve(parts, ctx.search_path)
            if rel is not None:
                found.add(rel.root.oid)
                found.add(rel.oid)
    return found


def _select_levels(node: object) -> Iterator[JsonNode]:
    for name, fields in _walk_json(node):
        if name == "SelectStmt" and fields.get("op", "SETOP_NONE") == "SETOP_NONE":
            yield fields


def _from_rangevars(items: list[Any]) -> Iterator[tuple[str, ...]]:
    """RangeVars of a FROM list, through joins, not into subqueries."""
    stack: list[object] = list(items)
    while stack:
        item = stack.pop()
        if not isinstance(item, dict):
            continue
        if "RangeVar" in item:
            yield _rangevar_parts(item["RangeVar"])
        elif "JoinExpr" in item:
            join = item["JoinExpr"]
            stack.extend([join.get("larg"), join.get("rarg")])


def _has_column(node: object) -> bool:
    return any(name == "ColumnRef" for name, _ in _walk_json({"x": node}))


def _restricts(where: object) -> bool:
    if not _has_column(where):
        return False
    if isinstance(where, dict) and "BoolExpr" in where:
        expr = where["BoolExpr"]
        args = expr.get("args") or []
        if expr.get("boolop") == "OR_EXPR":
            return all(_restricts(a) for a in args)
        if expr.get("boolop") == "AND_EXPR":
            return any(_restricts(a) for a in args)
    return True


_Handler = Callable[[str, str, JsonNode, _Context], StatementFacts]
_HANDLERS: Final[Mapping[str, _Handler]] = {
    "TransactionStmt": _transaction,
    "VariableSetStmt": _set,
    "DiscardStmt": _discard,
    "NotifyStmt": _notify,
    "ExplainStmt": _explain,
    "PrepareStmt": _prepare,
    "ExecuteStmt": _prepare,
    "DeallocateStmt": _prepare,
    "DeclareCursorStmt": _cursor,
    "FetchStmt": _cursor,
    "ClosePortalStmt": _cursor,
    "CreateTableAsStmt": _create_table_as,
    "CopyStmt": _copy,
}


def _deparse(text: str, key: str | None = None, *, for_sqlglot: bool = False) -> str | None:
    """pglast's deparse of the (first) statement of `text`, or of its field `key`. for_sqlglot:
    with arrays of object identifier types qualified (`$1::oid[]` as `pg_catalog.oid[]`)."""
    try:
        from pglast import parse_sql
        from pglast.stream import RawStream

        stmts = parse_sql(text)
        if len(stmts) != 1:
            return None
        node = stmts[0].stmt
        if key is not None:
            node = getattr(node, key)
        if node is None:
            return None
        if for_sqlglot:
            _QualifyOidArrays()(node)
        return str(RawStream()(node))
    except Exception:  # noqa: BLE001 - any failure here means: cannot model it
        return None


_OID_TYPES: Final = frozenset(
    """oid regclass regcollation regconfig regdictionary regnamespace regoper regoperator
    regproc regprocedure regrole regtype""".split()
)
"""Types sqlglot's PostgreSQL lexer reads as object identifiers, and then cannot parse an array
of (`$1::oid[]`, as asyncpg's type introspection writes): written `pg_catalog.oid[]` for it,
which it reads as an array of a named type. Which type a cast names does not change which
columns a query reads."""


def _has_oid_array(node: object) -> bool:
    for _, fields in _walk_json(node):
        type_name = fields.get("typeName")
        if isinstance(type_name, dict) and type_name.get("arrayBounds"):
            names = _strings(type_name.get("names"))
            if len(names) == 1 and names[0] in _OID_TYPES:
                return True
    return False


class _QualifyOidArrays(pglast_visitors.Visitor):
    def visit_TypeName(self, ancestors: object, node: pglast_ast.TypeName) -> object:
        names = tuple(getattr(n, "sval", None) for n in node.names or ())
        if not node.arrayBounds or len(names) != 1 or names[0] not in _OID_TYPES:
            return None
        return pglast_ast.TypeName(
            names=(pglast_ast.String("pg_catalog"), pglast_ast.String(names[0])),
            typmods=node.typmods,
            typemod=node.typemod,
            arrayBounds=node.arrayBounds,
            setof=node.setof,
            pct_type=node.pct_type,
            location=node.location,
        )


# -- queries: sqlglot ----------------------------------------------------------------------------

_RISKY_TEXT: Final = re.compile(r"[\\&]|\$(?!\d)|/\*|(?<![\w'])[eEbBxXnNuU]&?'|[^\x00-\x7f]")
"""Text sqlglot's lexer might read differently from PostgreSQL's: give it pglast's deparse."""


def _query_facts(text: str, node: JsonNode, ctx: _Context, *, kind: str) -> StatementFacts:
    ((name, fields),) = node.items()
    pg = _pg_facts(node)
    into = name == "SelectStmt" and "intoClause" in fields
    base = StatementFacts(
        kind=kind,
        text=text,
        node=name,
        functions=frozenset(pg.functions),
        config_settings=frozenset(pg.config_settings),
        operators=frozenset(pg.operators),
        positional_refs=pg.positional,
        writes=pg.writes or kind != "select",
        into=into,
        folds=frozenset(pg.folds),
        unfiltered=frozenset(_unfiltered(node, pg, ctx)),
    )
    if kind != "select":
        return _with_relations(base, pg, ctx, "data-modifying statements are not analysed")
    if into:
        return _with_relations(base, pg, ctx, None)
    try:
        return _select_facts(base, text, node, pg, ctx)
    except _Unsupported as exc:
        return _with_relations(base, pg, ctx, str(exc))
    except sqlglot.errors.SqlglotError as exc:
        return _with_relations(base, pg, ctx, f"the query could not be modelled: {exc}")
    except RecursionError:
        return _with_relations(base, pg, ctx, "the query is too deeply nested")
    except Exception as exc:  # noqa: BLE001 - fail closed on anything unexpected
        return _with_relations(base, pg, ctx, f"analysis failed: {type(exc).__name__}: {exc}")


def _with_relations(
    base: StatementFacts, pg: _PgFacts, ctx: _Context, unsupported: str | None
) -> StatementFacts:
    """`base` with the relations pglast names (resolved where possible) and a reason."""
    relations: set[int] = set()
    unknown: list[str] = []
    for parts in sorted(pg.rangevars):
        if len(parts) == 1 and parts[0] in pg.ctes:
            continue
        rel = ctx.catalog.resolve(parts, ctx.search_path)
        if rel is None:
            unknown.append(".".join(parts))
        else:
            relations.add(rel.oid)
    return replace(
        base,
        relations=frozenset(relations),
        unknown_relations=tuple(unknown),
        relation_info=_relation_infos(relations, ctx.catalog),
        unsupported=unsupported,
    )


def _relation_infos(oids: Iterable[int], catalog: Catalog) -> tuple[RelationInfo, ...]:
    infos: list[RelationInfo] = []
    for oid in sorted(set(oids)):
        rel = catalog.relation(oid)
        if rel is None:
            continue
        root = rel.root
        infos.append(
            RelationInfo(
                oid=rel.oid,
                schema=rel.schema,
                name=rel.name,
                kind=rel.kind,
                label_schema=root.schema,
                label_name=root.name,
                columns=tuple((c.attnum, c.name) for c in rel.columns),
            )
        )
    return tuple(infos)


def _sqlglot_text(text: str, node: JsonNode) -> str:
    if not _RISKY_TEXT.search(text) and not _has_oid_array(node):
        return text
    deparsed = _deparse(text, for_sqlglot=True)
    if deparsed is None:
        raise _Unsupported("the statement could not be normalised for analysis")
    return deparsed


def _parse_one(text: str) -> exp.Expr:
    expressions = [e for e in sqlglot.parse(text, read="postgres") if e is not None]
    if len(expressions) != 1:
        raise _Unsupported("the two parsers disagree on the number of statements")
    return expressions[0]


def _select_facts(
    base: StatementFacts, text: str, node: JsonNode, pg: _PgFacts, ctx: _Context
) -> StatementFacts:
    tree = _parse_one(_sqlglot_text(text, node))
    if not isinstance(tree, exp.Query | exp.Values):
        raise _Unsupported(f"sqlglot reads this as {type(tree).__name__}, not a query")
    tree = normalize_identifiers(tree, dialect="postgres")
    resolved = _resolve_tables(tree, ctx.catalog, ctx.search_path)
    if resolved.unknown:
        return replace(
            _with_relations(base, pg, ctx, None), unknown_relations=tuple(sorted(resolved.unknown))
        )
    _cross_check(resolved, pg, ctx)
    stars = _star_relations(tree)
    relations = set(resolved.oids)
    tree = _expand_views(tree, ctx.catalog, relations, depth=0)
    tree = _qualify(tree, ctx.catalog)
    lineage = _Lineage(tree, ctx.catalog)
    outputs = lineage.outputs()
    _check_output_count(outputs, node)
    return replace(
        base,
        outputs=outputs,
        uses=frozenset(lineage.uses),
        whole_row_relations=frozenset(lineage.whole_rows),
        relations=frozenset(relations),
        star_relations=frozenset(stars),
        relation_info=_relation_infos(relations, ctx.catalog),
        # what a view reads is read with the view's WHERE, not the query's: unfiltered
        unfiltered=base.unfiltered | frozenset(relations - resolved.oids),
    )


# -- pass: resolve table names -----------------------------------------------------------------

_OID: Final = "topeng_oid"


@dataclass(slots=True)
class _Resolved:
    oids: set[int] = field(default_factory=set)
    names: set[tuple[str, ...]] = field(default_factory=set)
    unknown: set[str] = field(default_factory=set)


def _cte_names(tree: exp.Expr) -> set[str]:
    return {str(cte.alias_or_name) for cte in tree.find_all(exp.CTE)}


def _table_parts(table: exp.Table) -> tuple[str, ...]:
    parts = [table.args.get("catalog"), table.args.get("db"), table.this]
    return tuple(str(p.name) for p in parts if p is not None)


def _resolve_tables(tree: exp.Expr, catalog: Catalog, search_path: tuple[str, ...]) -> _Resolved:
    """Annotate every table reference with its relation OID (meta `topeng_oid`) and rewrite it
    to `schema.name`, quoted, so qualify finds exactly that relation."""
    result = _Resolved()
    ctes = _cte_names(tree)
    for table in list(tree.find_all(exp.Table)):
        if not isinstance(table.this, exp.Identifier):
            continue  # a table function: FROM generate_series(...)
        parts = _table_parts(table)
        if len(parts) == 1 and parts[0] in ctes:
            continue
        result.names.add(parts)
        relation = catalog.resolve(parts, search_path)
        if relation is None:
            result.unknown.add(".".join(parts))
            continue
        _pin(table, relation)
        result.oids.add(relation.oid)
    return result


def _pin(table: exp.Table, relation: Relation) -> None:
    alias = table.args.get("alias")
    table.set("catalog", None)
    table.set("db", exp.to_identifier(relation.schema, quoted=True))
    table.set("this", exp.to_identifier(relation.name, quoted=True))
    if alias is None:
        # keep the name the query uses for the table: `customers.nik` must still resolve
        table.set("alias", exp.TableAlias(this=exp.to_identifier(relation.name, quoted=True)))
    table.meta[_OID] = relation.oid


def _cross_check(resolved: _Resolved, pg: _PgFacts, ctx: _Context) -> None:
    expected = {p for p in pg.rangevars if not (len(p) == 1 and p[0] in pg.ctes)}
    if expected != resolved.names:
        raise _Unsupported(
            "the two parsers disagree on the relations this statement reads "
            f"({_names(expected)} vs {_names(resolved.names)})"
        )


def _names(parts: Iterable[tuple[str, ...]]) -> str:
    return ", ".join(sorted(".".join(p) for p in parts)) or "none"


def _star_relations(tree: exp.Expr) -> set[int]:
    """Relations whose columns a `*` or `t.*` in a select list expands to (base tables, views)."""
    found: set[int] = set()
    for select in tree.find_all(exp.Select):
        tables = _select_tables(select)
        for projection in select.expressions:
            if isinstance(projection, exp.Star):
                found.update(oid for oid in tables.values())
            elif isinstance(projection, exp.Column) and isinstance(projection.this, exp.Star):
                oid = tables.get(str(projection.table))
                if oid is not None:
                    found.add(oid)
    return found


def _select_tables(select: exp.Select) -> dict[str, int]:
    tables: dict[str, int] = {}
    sources: list[exp.Expr] = []
    from_ = select.args.get("from_") or select.args.get("from")
    if from_ is not None:
        sources.append(from_.this)
    sources.extend(join.this for join in select.args.get("joins") or [])
    for source in sources:
        if isinstance(source, exp.Table) and _OID in source.meta:
            tables[str(source.alias_or_name)] = int(source.meta[_OID])
    return tables


# -- pass: expand views --------------------------------------------------------------------------

_VIEW_CACHE: dict[tuple[str, int], exp.Expr] = {}
_VIEW_CACHE_MAX: Final = 512


def _view_body(relation: Relation, catalog: Catalog) -> exp.Expr:
    key = (catalog.fingerprint, relation.oid)
    cached = _VIEW_CACHE.get(key)
    if cached is None:
        if relation.view_sql is None:
            raise _Unsupported(
                f"the definition of view {relation.schema}.{relation.name} is unknown"
            )
        parsed = normalize_identifiers(_parse_one(relation.view_sql), dialect="postgres")
        if not isinstance(parsed, exp.Query):
            raise _Unsupported(f"view {relation.schema}.{relation.name} is not a query")
        resolved = _resolve_tables(parsed, catalog, VIEW_SEARCH_PATH)
        if resolved.unknown:
            raise _Unsupported(
                f"view {relation.schema}.{relation.name} reads relations Topeng cannot place: "
                + ", ".join(sorted(resolved.unknown))
            )
        if len(_VIEW_CACHE) >= _VIEW_CACHE_MAX:
            _VIEW_CACHE.clear()
        _VIEW_CACHE[key] = cached = parsed
    return cached.copy()


def _expand_views(tree: exp.Expr, catalog: Catalog, relations: set[int], *, depth: int) -> exp.Expr:
    """Replace each view / matview reference by its definition as a derived table."""
    for table in list(tree.find_all(exp.Table)):
        oid = table.meta.get(_OID)
        relation = None if oid is None else catalog.relation(int(oid))
        if relation is None or relation.kind not in ("view", "matview") or relation.is_system:
            continue
        if depth >= MAX_VIEW_DEPTH:
            raise _Unsupported("views nested too deeply")
        body = _view_body(relation, catalog)
        for inner in body.find_all(exp.Table):
            if _OID in inner.meta:
                relations.add(int(inner.meta[_OID]))
        body = _expand_views(body, catalog, relations, depth=depth + 1)
        alias = table.args.get("alias")
        alias = (
            alias.copy()
            if alias is not None
            else exp.TableAlias(this=exp.to_identifier(relation.name, quoted=True))
        )
        derived = exp.Subquery(this=body, alias=alias)
        if table is tree:
            raise _Unsupported("a bare view reference")
        table.replace(derived)
    return tree


# -- pass: qualify -------------------------------------------------------------------------------

_SCHEMAS: dict[str, MappingSchema] = {}


def _schema(catalog: Catalog) -> MappingSchema:
    schema = _SCHEMAS.get(catalog.fingerprint)
    if schema is None:
        # types do not matter to lineage, and some catalog types are not sqlglot's
        tables: dict[str, dict[str, dict[str, str]]] = {}
        for relation in catalog.relations_by_oid.values():
            columns = {c.name: "text" for c in relation.columns}
            tables.setdefault(relation.schema, {})[relation.name] = columns
        plain: dict[str, object] = dict(tables)
        schema = MappingSchema(plain, dialect="postgres", normalize=False)
        if len(_SCHEMAS) > 8:
            _SCHEMAS.clear()
        _SCHEMAS[catalog.fingerprint] = schema
    return schema


def _qualify(tree: exp.Expr, catalog: Catalog) -> exp.Expr:
    try:
        qualified = qualify(
            tree,
            schema=_schema(catalog),
            dialect="postgres",
            validate_qualify_columns=True,
            quote_identifiers=False,
            identify=False,
        )
    except sqlglot.errors.SqlglotError as exc:
        raise _Unsupported(f"the columns could not be resolved: {exc}") from None
    if not isinstance(qualified, exp.Expr):
        raise _Unsupported("qualify returned nothing")
    return qualified


def _check_output_count(outputs: tuple[OutputColumn, ...], node: JsonNode) -> None:
    expected = _pg_output_count(node)
    if expected is not None and expected != len(outputs):
        raise _Unsupported(
            f"the two parsers disagree on the number of output columns ({expected} vs "
            f"{len(outputs)})"
        )


def _pg_output_count(node: JsonNode) -> int | None:
    """The number of output columns libpg_query sees, when no `*` makes it depend on tables."""
    select = node.get("SelectStmt")
    if not isinstance(select, dict):
        return None
    if select.get("op", "SETOP_NONE") != "SETOP_NONE":
        larg = select.get("larg")
        return _pg_output_count({"SelectStmt": larg}) if isinstance(larg, dict) else None
    values = select.get("valuesLists")
    if values:
        first = values[0].get("List", {}).get("items", [])
        return len(first)
    targets = select.get("targetList") or []
    for target in targets:
        val = target.get("ResTarget", {}).get("val", {})
        if "ColumnRef" in val and _strings(val["ColumnRef"].get("fields"))[-1:] == ("*",):
            return None
    return len(targets)


# -- pass: lineage and uses ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Lin:
    sources: frozenset[ColumnRef] = frozenset()
    plain: bool = False
    count: bool = False

    def merge(self, other: _Lin) -> _Lin:
        return _Lin(self.sources | other.sources, False, False)


_EMPTY: Final = _Lin()
_CONST_TYPES: Final = (exp.Literal, exp.Null, exp.Boolean, exp.Placeholder, exp.Parameter)
_PREDICATE_CLAUSES: Final = frozenset({"where", "having", "join"})
_BOOLEAN_GLUE: Final = (exp.And, exp.Or, exp.Not, exp.Paren)


class _Lineage:
    """Walks the qualified tree's scopes: output lineage, column uses, whole-row references."""

    def __init__(self, tree: exp.Expr, catalog: Catalog) -> None:
        self.tree = tree
        self.catalog = catalog
        if isinstance(tree, exp.Values):
            if any(tree.find_all(exp.Column, exp.Query, exp.TableColumn)):
                raise _Unsupported("VALUES with column references or subqueries")
        try:
            self.scopes: list[Scope] = list(traverse_scope(tree))
        except sqlglot.errors.SqlglotError as exc:
            raise _Unsupported(f"the query's scopes could not be built: {exc}") from None
        if not self.scopes and not isinstance(tree, exp.Values):
            raise _Unsupported("the query has no scope")
        self.by_expr: dict[int, Scope] = {id(s.expression): s for s in self.scopes}
        self.memo: dict[int, tuple[tuple[str, _Lin], ...]] = {}
        self.in_progress: dict[int, tuple[tuple[str, _Lin], ...] | None] = {}
        self.uses: set[ColumnUse] = set()
        self.whole_rows: set[int] = set()

    # outputs

    def outputs(self) -> tuple[OutputColumn, ...]:
        if isinstance(self.tree, exp.Values):
            width = max((len(row.expressions) for row in self.tree.expressions), default=0)
            return tuple(OutputColumn(f"column{i + 1}", frozenset(), False) for i in range(width))
        root = self.scopes[-1]
        for scope in self.scopes:
            self._collect_uses(scope)
        return tuple(
            OutputColumn(name, lin.sources, lin.plain and len(lin.sources) >= 1, lin.count)
            for name, lin in self.scope_outputs(root)
        )

    def _canonical(self, scope: Scope) -> Scope:
        """sqlglot gives a recursive CTE's self-reference a scope of the anchor alone: use the
        whole CTE (the fixpoint), and the listed scope for any other expression."""
        node = scope.expression
        parent = node.parent
        if (
            isinstance(parent, exp.SetOperation)
            and parent.this is node
            and isinstance(parent.parent, exp.CTE)
            and scope is not self.by_expr.get(id(node))
            and id(parent) in self.by_expr
        ):
            return self.by_expr[id(parent)]
        return self.by_expr.get(id(node), scope)

    def scope_outputs(self, scope: Scope) -> tuple[tuple[str, _Lin], ...]:
        scope = self._canonical(scope)
        key = id(scope)
        if key in self.memo:
            return self.memo[key]
        if key in self.in_progress:
            approx = self.in_progress[key]
            if approx is None:
                raise _Unsupported("a query refers to itself in a way Topeng cannot follow")
            return approx
        self.in_progress[key] = None
        try:
            result = self._compute_outputs(scope)
        finally:
            del self.in_progress[key]
        self.memo[key] = result
        return result

    def _compute_outputs(self, scope: Scope) -> tuple[tuple[str, _Lin], ...]:
        node = scope.expression
        if isinstance(node, exp.Select):
            return tuple((str(p.alias_or_name), self.lin(p, scope)) for p in node.expressions)
        if isinstance(node, exp.SetOperation):
            return self._set_operation(scope, node)
        if isinstance(node, exp.Values):
            return self._values(scope, node)
        if isinstance(node, exp.Lateral | exp.Unnest):
            return self._udtf(scope, node)
        raise _Unsupported(f"a {type(node).__name__} scope is not modelled")

    def _set_operation(self, scope: Scope, node: exp.SetOperation) -> tuple[tuple[str, _Lin], ...]:
        left_scope = self._child_scope(node.left)
        right_scope = self._child_scope(node.right)
        left = self.scope_outputs(left_scope)
        recursive = self._is_recursive(scope)
        if recursive:
            self.in_progress[id(scope)] = left
        current = left
        for _ in range(16):
            if recursive:
                self.memo.pop(id(right_scope), None)
                self._forget_below(right_scope)
            right = self.scope_outputs(right_scope)
            if len(left) != len(right):
                raise _Unsupported("set operation branches have different column counts")
            combined = tuple(
                (name, _combine_branch(a, b))
                for (name, a), (_, b) in zip(current, right, strict=True)
            )
            if not recursive or combined == current:
                return combined
            current = combined
            self.in_progress[id(scope)] = current
        raise _Unsupported("a recursive query's lineage does not settle")

    def _forget_below(self, scope: Scope) -> None:
        for child in scope.traverse():
            self.memo.pop(id(child), None)

    def _is_recursive(self, scope: Scope) -> bool:
        parent = scope.expression.parent
        if not isinstance(parent, exp.CTE):
            return False
        with_ = parent.parent
        return isinstance(with_, exp.With) and bool(with_.args.get("recursive"))

    def _child_scope(self, node: exp.Expr) -> Scope:
        target = node.this if isinstance(node, exp.Subquery) else node
        scope = self.by_expr.get(id(target))
        if scope is None:
            raise _Unsupported(f"no scope for a {type(target).__name__}")
        return scope

    def _values(self, scope: Scope, node: exp.Values) -> tuple[tuple[str, _Lin], ...]:
        names = [str(c) for c in node.alias_column_names] if node.alias else []
        width = 0
        lins: list[_Lin] = []
        for row in node.expressions:
            cells = list(row.expressions) if isinstance(row, exp.Tuple) else [row]
            width = max(width, len(cells))
            while len(lins) < len(cells):
                lins.append(_EMPTY)
            for i, cell in enumerate(cells):
                lins[i] = lins[i].merge(self.lin(cell, scope))
        names += [f"column{i + 1}" for i in range(len(names), width)]
        return tuple(zip(names, lins, strict=False))

    def _udtf(self, scope: Scope, node: exp.Expr) -> tuple[tuple[str, _Lin], ...]:
        inner = node.this if isinstance(node, exp.Lateral) else None
        if isinstance(inner, exp.Subquery):
            return self.scope_outputs(self._child_scope(inner))
        combined = _EMPTY
        for column in node.find_all(exp.Column):
            combined = combined.merge(self.column_lin(column, scope))
        return (("*", combined),)

    # expressions

    def lin(self, node: exp.Expr, scope: Scope) -> _Lin:
        if isinstance(node, exp.Alias | exp.Paren):
            return self.lin(node.this, scope)
        if isinstance(node, exp.Column):
            return self.column_lin(node, scope)
        if isinstance(node, exp.TableColumn):
            return self._whole_row(str(node.name), scope, node)
        if isinstance(node, exp.Subquery | exp.Select | exp.SetOperation):
            outputs = self.scope_outputs(self._child_scope(node))
            if len(outputs) != 1:
                return _merge_all(lin for _, lin in outputs)
            return outputs[0][1]
        if isinstance(node, exp.Count):
            inner = _merge_all(self.lin(c, scope) for c in node.iter_expressions())
            return _Lin(inner.sources, False, True)
        if isinstance(node, exp.Window) and isinstance(node.this, exp.Count):
            inner = self.lin(node.this, scope)
            return inner
        if isinstance(node, (exp.Star, *_CONST_TYPES)):
            return _EMPTY
        return _merge_all(self.lin(c, scope) for c in node.iter_expressions())

    def column_lin(self, column: exp.Column, scope: Scope) -> _Lin:
        if isinstance(column.this, exp.Star):
            return self._whole_row(str(column.table), scope, column)
        table = str(column.table)
        if not table:
            return self._unqualified(column, scope)
        found = self._find_source(table, scope)
        if found is None:
            raise _Unsupported(f"column {column.sql('postgres')} has no source")
        source, owner = found
        return self._source_column(source, owner, str(column.name), column)

    def _find_source(self, table: str, scope: Scope) -> tuple[object, Scope] | None:
        current: Scope | None = scope
        while current is not None:
            if table in current.sources:
                return current.sources[table], current
            current = current.parent
        return None

    def _source_column(self, source: object, owner: Scope, name: str, node: exp.Column) -> _Lin:
        if isinstance(source, exp.Table):
            if _OID not in source.meta:
                if not isinstance(source.this, exp.Identifier):
                    return self._table_function(source, owner)
                raise _Unsupported(f"relation {source.sql('postgres')} was not resolved")
            relation = self.catalog.relation(int(source.meta[_OID]))
            if relation is None:
                raise _Unsupported("a relation vanished from the catalog")
            for col in relation.columns:
                if col.name == name:
                    return _Lin(frozenset({(relation.oid, col.attnum)}), True)
            raise _Unsupported(f"column {name} is not in {relation.schema}.{relation.name}")
        if isinstance(source, Scope):
            outputs = self.scope_outputs(source)
            matches = [lin for out, lin in outputs if out == name or out == "*"]
            if not matches:
                positional = self._positional_alias(source, name)
                if positional is not None:
                    return positional
                raise _Unsupported(f"column {name} is not an output of its subquery")
            if len(matches) == 1:
                return matches[0]
            return _merge_all(matches)
        raise _Unsupported(f"a {type(source).__name__} source is not modelled")

    def _positional_alias(self, source: Scope, name: str) -> _Lin | None:
        """`(subquery) AS s(a, b)`: qualify renames outputs; look the alias up by position."""
        alias = source.expression.parent
        if isinstance(alias, exp.Subquery | exp.CTE):
            columns = [str(c) for c in alias.alias_column_names]
            if name in columns:
                outputs = self.scope_outputs(source)
                index = columns.index(name)
                if index < len(outputs):
                    return outputs[index][1]
        return None

    def _table_function(self, source: exp.Table, owner: Scope) -> _Lin:
        combined = _EMPTY
        for column in source.this.find_all(exp.Column):
            combined = combined.merge(self.column_lin(column, owner))
        return _Lin(combined.sources, False)

    def _unqualified(self, column: exp.Column, scope: Scope) -> _Lin:
        name = str(column.name)
        if self._find_source(name, scope) is not None:
            return self._whole_row(name, scope, column)
        node = scope.expression
        if isinstance(node, exp.Select):
            for projection in node.expressions:
                if str(projection.alias_or_name) == name and projection is not column.parent:
                    if column.find_ancestor(exp.Select) is node:
                        return self.lin(projection, scope)
        if isinstance(node, exp.SetOperation):
            for out, lin in self.scope_outputs(scope):
                if out == name:
                    return lin
        raise _Unsupported(f"column {name} could not be placed")

    def _whole_row(self, table: str, scope: Scope, node: exp.Expr) -> _Lin:
        found = self._find_source(table, scope)
        if found is None:
            raise _Unsupported(f"whole-row reference {table} has no source")
        source, owner = found
        if isinstance(source, exp.Table) and _OID in source.meta:
            oid = int(source.meta[_OID])
            self.whole_rows.add(oid)
            relation = self.catalog.relation(oid)
            cols = () if relation is None else relation.columns
            return _Lin(frozenset((oid, c.attnum) for c in cols), False)
        if isinstance(source, Scope):
            combined = _merge_all(lin for _, lin in self.scope_outputs(source))
            for ref in combined.sources:
                self.uses.add(ColumnUse(ref, "whole_row", "expression"))
            return _Lin(combined.sources, False)
        raise _Unsupported(f"whole-row reference {table} is not modelled")

    # uses

    def _collect_uses(self, scope: Scope) -> None:
        own = scope.expression
        distinct = own.args.get("distinct") if isinstance(own, exp.Select) else None
        if isinstance(distinct, exp.Distinct) and not distinct.args.get("on"):
            # SELECT DISTINCT compares every output value, like GROUP BY all of them
            for _, lin in self.scope_outputs(scope):
                for ref in lin.sources:
                    self.uses.add(
                        ColumnUse(ref, "distinct", "plain" if lin.plain else "expression")
                    )
        for node, clause in _own_nodes(own, self.by_expr):
            if isinstance(node, exp.Column):
                self._column_use(node, clause, scope)
            elif isinstance(node, exp.TableColumn):
                self._whole_row(str(node.name), scope, node)
            elif id(node) in self.by_expr and node is not own:
                self._subquery_use(node, clause)

    def _column_use(self, column: exp.Column, clause: str, scope: Scope) -> None:
        lin = self.column_lin(column, scope)
        if not lin.sources:
            return
        form = _form(column, clause)
        if not lin.plain and form != "count":
            form = "expression"
        for ref in lin.sources:
            self.uses.add(ColumnUse(ref, clause, form))

    def _subquery_use(self, node: exp.Expr, clause: str) -> None:
        if clause in ("select", "from", "with"):
            return  # lineage follows values that reach the output; derived tables are sources
        if isinstance(node.parent, exp.Exists) or (
            isinstance(node.parent, exp.Subquery) and isinstance(node.parent.parent, exp.Exists)
        ):
            return
        scope = self.by_expr[id(node)]
        for _, lin in self.scope_outputs(scope):
            for ref in lin.sources:
                self.uses.add(ColumnUse(ref, clause, "expression"))


def _combine_branch(a: _Lin, b: _Lin) -> _Lin:
    return _Lin(a.sources | b.sources, a.plain and b.plain, a.count and b.count)


def _merge_all(lins: Iterable[_Lin]) -> _Lin:
    result = _EMPTY
    for lin in lins:
        result = result.merge(lin)
    return result


_SELECT_CLAUSES: Final = {
    "expressions": "select",
    "where": "where",
    "group": "group",
    "having": "having",
    "order": "order",
    "distinct": "distinct_on",
    "joins": "join",
    "from": "from",
    "from_": "from",
    "qualify": "where",
    "windows": "window",
    "with": "with",
    "with_": "with",
    "this": "from",  # the branches of a set operation
    "expression": "from",
}


def _own_nodes(root: exp.Expr, scopes: Mapping[int, Scope]) -> Iterator[tuple[exp.Expr, str]]:
    """Nodes of `root`'s own scope with their clause; child scope roots are yielded, not
    entered."""
    query_root = isinstance(root, exp.Select | exp.SetOperation)
    stack: list[tuple[exp.Expr, str]] = [(root, "other" if query_root else "from")]
    while stack:
        node, clause = stack.pop()
        for child in node.iter_expressions():
            child_clause = _clause_of(node, child, clause, root) if query_root else "from"
            if id(child) in scopes and child is not root:
                yield child, child_clause
                continue
            if isinstance(child, exp.Subquery) and id(child.this) in scopes:
                yield child.this, child_clause
                continue
            yield child, child_clause
            stack.append((child, child_clause))


def _clause_of(parent: exp.Expr, child: exp.Expr, clause: str, root: exp.Expr) -> str:
    key = str(child.arg_key)
    if parent is root:
        return _SELECT_CLAUSES.get(key, "other")
    if isinstance(parent, exp.Window) and key in ("partition_by", "order"):
        return "window"
    if isinstance(parent, exp.Join):
        if key in ("on", "using"):
            return "join"
        return "from" if clause == "join" else clause
    return clause


def _is_const(node: exp.Expr | None) -> bool:
    if node is None:
        return False
    if isinstance(node, _CONST_TYPES):
        return True
    if isinstance(node, exp.Cast | exp.Paren | exp.Neg):
        return _is_const(node.this)
    if isinstance(node, exp.Any):
        inner = node.this
        if isinstance(inner, exp.Array):
            return all(_is_const(e) for e in inner.expressions)
        return _is_const(inner)
    return False


def _form(column: exp.Column, clause: str) -> str:
    node: exp.Expr = column
    parent = node.parent
    while isinstance(parent, exp.Paren):
        node, parent = parent, parent.parent
    if clause == "select":
        if isinstance(parent, exp.Count) or (
            isinstance(parent, exp.Distinct) and isinstance(parent.parent, exp.Count)
        ):
            return "count"
        return "plain" if isinstance(parent, exp.Alias | exp.Select) else "expression"
    if clause in _PREDICATE_CLAUSES:
        return "equality" if _is_lookup(node, parent) else "expression"
    if clause in ("group", "order", "distinct_on", "window"):
        plain_parent = isinstance(parent, exp.Ordered | exp.Group | exp.Select | exp.Window)
        plain_parent = plain_parent or isinstance(parent, exp.Distinct | exp.Order)
        return "plain" if plain_parent else "expression"
    return "expression"


def _is_lookup(node: exp.Expr, parent: exp.Expr | None) -> bool:
    if isinstance(parent, exp.EQ):
        other = parent.expression if parent.this is node else parent.this
        ok = _is_const(other)
    elif isinstance(parent, exp.In):
        ok = (
            parent.this is node
            and not parent.args.get("query")
            and not parent.args.get("unnest")
            and all(_is_const(e) for e in parent.expressions)
        )
    elif isinstance(parent, exp.Is):
        ok = parent.this is node and isinstance(parent.expression, exp.Null)
    else:
        ok = False
    if not ok or parent is None:
        return False
    up = parent.parent
    while isinstance(up, _BOOLEAN_GLUE):
        up = up.parent
    return isinstance(up, exp.Where | exp.Having | exp.Join)
