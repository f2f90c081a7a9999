"""`topeng explain --rules RULES --user NAME [--dsn DSN] [--json] "SQL"`: what Topeng would do.

Strategy: reproduce, outside the proxy, exactly the steps a session takes, with the same
functions: load the rules (`load_rules`), look up the user's PostgreSQL role memberships with
the proxy's own query (for the named user instead of `session_user`), resolve the role
(`resolve_role`), load the catalog (`load_catalog`) and judge the SQL
(`judge_sql_with_facts`, the proxy's entry point, for the verdict on the whole string). For the
explanation, every statement is also analysed (`analyze`) and judged on its own
(`judge_statement`), so a refused statement still shows its lineage, and the facts are laid out:
statement kind, relations, each output column's base columns with their labels and this role's
policy, the mask the decision applies, predicate uses and functions.

The search_path is the one the user would get at login: the `search_path` setting of
`pg_db_role_setting` (per user and database, per user, per database, global, in PostgreSQL's
order of precedence), else the server's configured value, evaluated with `SET LOCAL ROLE` to
the user so that "$user" and schema privileges resolve as for them. When that is not possible
(the --dsn user may not SET ROLE to the user, or the user does not exist), the --dsn session's
own `current_schemas(true)` is used, and the output says so.

Without --dsn there is no catalog and no membership: the role is the first one the user-name
globs give (or the default role), labelled as unchecked where membership could have decided,
and statements are classified (pglast) but their columns are not traced.

The JSON keys are documented in docs/rules.md ("topeng explain"); keep the two in agreement.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, TextIO

from proxy.policy.analyze import AnalysisError, ColumnRef, StatementFacts, analyze
from proxy.policy.catalog import Catalog, load_catalog
from proxy.policy.decide import judge_sql_with_facts, judge_statement, remember
from proxy.policy.decision import Allow, Decision, Mask, Refuse
from proxy.policy.roles import RoleMatch, needs_membership, resolve_role
from proxy.policy.rules import LabelPolicy, Role, Rules, RulesError, load_rules

__all__ = ["JSON_FORMAT", "MEMBERSHIP_SQL", "explain_document", "render_text", "run_explain"]

JSON_FORMAT: Final = 1

MEMBERSHIP_SQL: Final = (
    "SELECT r.rolname FROM pg_catalog.pg_roles r "
    "WHERE pg_catalog.pg_has_role($1, r.oid, 'MEMBER') AND r.rolname <> $1"
)
"""The proxy's membership lookup (proxy/server.py), for a given user instead of session_user."""

_ROLE_EXISTS_SQL: Final = "SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1"

# The search_path a new session of ($1 = user) in the current database starts with, from
# ALTER ROLE ... [IN DATABASE ...] SET and ALTER DATABASE ... SET, most specific first
# (PostgreSQL's precedence: database+role, role, database, ALTER ROLE ALL).
_SETTING_SQL: Final = """
SELECT s.setdatabase <> 0 AS by_database, s.setrole <> 0 AS by_role,
       substr(c.item, length('search_path=') + 1) AS value
FROM pg_catalog.pg_db_role_setting s
CROSS JOIN LATERAL pg_catalog.unnest(s.setconfig) AS c(item)
WHERE c.item LIKE 'search\\_path=%'
  AND s.setdatabase IN (0, (SELECT oid FROM pg_catalog.pg_database
                            WHERE datname = pg_catalog.current_database()))
  AND s.setrole IN (0, (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = $1))
ORDER BY (s.setrole <> 0) DESC, (s.setdatabase <> 0) DESC
LIMIT 1
"""

# The server's own value when nothing above sets one: this session's value unless this
# session's user or database changed it (then the compiled-in default).
_SERVER_DEFAULT_SQL: Final = """
SELECT CASE WHEN source IN ('default', 'configuration file', 'command line',
                            'environment variable', 'override')
            THEN reset_val ELSE boot_val END
FROM pg_catalog.pg_settings WHERE name = 'search_path'
"""

_EMPTY_CATALOG: Final = Catalog(
    database="",
    server_version_num=0,
    schemas=MappingProxyType({}),
    relations_by_oid=MappingProxyType({}),
    fingerprint="",
)

_CLAUSES: Final = {
    "where": "WHERE",
    "having": "HAVING",
    "join": "JOIN ... ON",
    "group": "GROUP BY",
    "order": "ORDER BY",
    "distinct_on": "DISTINCT ON",
    "distinct": "SELECT DISTINCT",
    "window": "window PARTITION BY / ORDER BY",
    "from": "a function in FROM",
    "other": "LIMIT, VALUES or another clause",
    "whole_row": "a whole-row reference",
    "select": "the select list",
}


# -- gathering -----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Live:
    """What --dsn told us."""

    database: str
    catalog: Catalog
    search_path: tuple[str, ...]
    search_path_source: str
    user_exists: bool
    memberships: frozenset[str] | None  # None: not looked up (the name decided)


@dataclass(slots=True)
class _Context:
    rules: Rules
    user: str
    live: _Live | None
    match: RoleMatch
    membership: str  # looked_up, not_needed, unchecked
    notes: list[str] = field(default_factory=list)


async def _connect_and_load(dsn: str, user: str, rules: Rules) -> _Live:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=15)
    try:
        database = str(await conn.fetchval("SELECT pg_catalog.current_database()"))
        exists = await conn.fetchval(_ROLE_EXISTS_SQL, user) is not None
        memberships: frozenset[str] | None = None
        if needs_membership(rules, user):
            if exists:
                rows = await conn.fetch(MEMBERSHIP_SQL, user)
                memberships = frozenset(str(r[0]) for r in rows)
            else:
                memberships = frozenset()
        catalog = await load_catalog(conn)
        search_path, source = await _user_search_path(conn, user, exists)
    finally:
        await conn.close()
    return _Live(database, catalog, search_path, source, exists, memberships)


async def _user_search_path(conn: Any, user: str, exists: bool) -> tuple[tuple[str, ...], str]:
    """(current_schemas(true) as `user` would have it, where that came from)."""
    row = await conn.fetchrow(_SETTING_SQL, user)
    if row is not None:
        value = str(row["value"])
        if row["by_role"] and row["by_database"]:
            origin = f"ALTER ROLE {user} IN DATABASE ... SET search_path"
        elif row["by_role"]:
            origin = f"ALTER ROLE {user} SET search_path"
        elif row["by_database"]:
            origin = "ALTER DATABASE ... SET search_path"
        else:
            origin = "ALTER ROLE ALL SET search_path"
    else:
        value = str(await conn.fetchval(_SERVER_DEFAULT_SQL))
        origin = "the server's default search_path"
    if exists:
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL ROLE {_quote_ident(user)}")
                await conn.fetchval("SELECT pg_catalog.set_config('search_path', $1, true)", value)
                schemas = await conn.fetchval("SELECT pg_catalog.current_schemas(true)")
                raise _Rollback(tuple(str(s) for s in schemas))
        except _Rollback as done:
            return done.schemas, f"{origin} ({value}), resolved as user {user}"
        except Exception as exc:  # any refusal means: fall back, and say so
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            fallback = f"cannot SET ROLE {user} over --dsn ({why})"
    else:
        fallback = f"user {user} does not exist in the database"
    schemas = await conn.fetchval("SELECT pg_catalog.current_schemas(true)")
    return (
        tuple(str(s) for s in schemas),
        f"the --dsn session's own current_schemas(true): {fallback}; a session of {user} may "
        "resolve unqualified names differently",
    )


class _Rollback(Exception):
    def __init__(self, schemas: tuple[str, ...]) -> None:
        super().__init__("rollback")
        self.schemas = schemas


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _resolve_without_membership(rules: Rules, user: str) -> tuple[RoleMatch, str]:
    """The role the globs alone give, and whether membership could have changed it."""
    if not needs_membership(rules, user):
        return resolve_role(rules, user, None), "not_needed"
    return resolve_role(rules, user, frozenset()), "unchecked"


# -- describing ----------------------------------------------------------------------------------


def _policy_doc(policy: LabelPolicy) -> dict[str, Any]:
    doc: dict[str, Any] = {"kind": policy.kind}
    if policy.kind == "mask":
        doc["mask"] = policy.mask
        doc["params"] = dict(policy.param_items)
        doc["filter"] = policy.filter
    return doc


def _decision_doc(decision: Decision | None) -> dict[str, Any]:
    if decision is None:
        return {"decision": "unknown"}
    if isinstance(decision, Refuse):
        return {
            "decision": "refuse",
            "sqlstate": decision.sqlstate,
            "message": decision.message,
            "detail": decision.detail,
            "hint": decision.hint,
            "reason": decision.reason,
        }
    if isinstance(decision, Mask):
        return {
            "decision": "mask",
            "masked_columns": [
                {
                    "position": index + 1,
                    "label": spec.label,
                    "mask": spec.mask,
                    "params": dict(spec.params),
                }
                for index, spec in sorted(decision.columns.items())
            ],
        }
    return {"decision": "allow"}


def _column_doc(facts: StatementFacts, ref: ColumnRef, ctx: _Context) -> dict[str, Any]:
    info = facts.info(ref[0])
    column = None if info is None else info.column_name(ref[1])
    labels: list[dict[str, Any]] = []
    if info is not None and column is not None:
        for label in ctx.rules.labels_for_column(info.label_schema, info.label_name, column):
            policy = ctx.rules.policy_for(ctx.match.role.name, label)
            labels.append({"label": label, "policy": _policy_doc(policy)})
    doc: dict[str, Any] = {"column": facts.column_label(ref), "labels": labels}
    if info is not None and (info.label_schema, info.label_name) != (info.schema, info.name):
        doc["labelled_as"] = f"{info.label_schema}.{info.label_name}.{column}"
    return doc


def _statement_doc(
    facts: StatementFacts, decision: Decision | None, ctx: _Context, *, traced: bool
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "text": facts.text,
        "kind": facts.kind,
        "node": facts.node,
        "decision": _decision_doc(decision),
    }
    if not traced:
        return doc
    masks = decision.columns if isinstance(decision, Mask) else {}
    outputs: list[dict[str, Any]] | None = None
    if facts.outputs is not None:
        outputs = []
        for index, output in enumerate(facts.outputs):
            spec = masks.get(index)
            if isinstance(decision, Refuse):
                result = "refused"
            elif spec is not None:
                result = "masked"
            elif output.is_count:
                result = "count"
            else:
                result = "as_stored"
            outputs.append(
                {
                    "position": index + 1,
                    "name": output.name,
                    "form": "count"
                    if output.is_count
                    else ("copy" if output.plain_copy else "expression"),
                    "sources": [_column_doc(facts, ref, ctx) for ref in sorted(output.sources)],
                    "result": result,
                    "mask": None
                    if spec is None
                    else {"label": spec.label, "mask": spec.mask, "params": dict(spec.params)},
                }
            )
    predicates = [
        {"clause": use.clause, "form": use.form, **_column_doc(facts, use.column, ctx)}
        for use in sorted(facts.uses)
        if use.clause != "select"
    ]
    doc.update(
        {
            "relations": [
                {"name": f"{r.schema}.{r.name}", "kind": r.kind}
                for r in sorted(facts.relation_info, key=lambda r: (r.schema, r.name))
            ],
            "unknown_relations": list(facts.unknown_relations),
            "outputs": outputs,
            "predicates": predicates,
            "functions": sorted(".".join(f) for f in facts.functions),
            "operators": sorted(".".join(o) for o in facts.operators),
            "unsupported": facts.unsupported,
            "inner": None if facts.inner is None else _inner_doc(facts, decision, ctx),
        }
    )
    return doc


def _inner_doc(facts: StatementFacts, decision: Decision | None, ctx: _Context) -> dict[str, Any]:
    """The query inside EXPLAIN / PREPARE / DECLARE / COPY / CREATE TABLE AS.

    Its rows are what the outer statement returns (PREPARE, DECLARE, COPY), so the outer
    decision applies to them; EXPLAIN returns a plan and CREATE TABLE AS a row count instead.
    """
    assert facts.inner is not None
    returns_rows = facts.kind in ("prepare", "cursor", "copy_out")
    inner_decision = decision if returns_rows or isinstance(decision, Refuse) else None
    doc = _statement_doc(facts.inner, inner_decision, ctx, traced=True)
    if inner_decision is None:
        for output in doc["outputs"] or ():
            output["result"] = "not_returned"
    return doc


def explain_document(rules: Rules, user: str, sql: str, live: _Live | None) -> dict[str, Any]:
    """The whole explanation as a JSON-ready dict (the `--json` output)."""
    notes: list[str] = []
    if live is not None:
        if live.memberships is None:
            match, membership = resolve_role(rules, user, None), "not_needed"
        else:
            match, membership = resolve_role(rules, user, live.memberships), "looked_up"
        if not live.user_exists:
            notes.append(
                f"user {user} does not exist in the database: no memberships, and PostgreSQL "
                "would refuse the login"
            )
    else:
        match, membership = _resolve_without_membership(rules, user)
        if membership == "unchecked":
            notes.append(
                "membership could not be checked without --dsn: the role shown is what the "
                "users globs alone give (or the default role); a member_of match could change it"
            )
    ctx = _Context(rules, user, live, match, membership, notes)
    role = match.role
    doc: dict[str, Any] = {
        "format": JSON_FORMAT,
        "user": user,
        "role": _role_doc(match, membership, live),
        "database": None if live is None else live.database,
        "search_path": None if live is None else list(live.search_path),
        "search_path_source": None if live is None else live.search_path_source,
        "catalog": live is not None,
        "notes": notes,
    }
    if role.unrestricted:
        notes.append(
            f"role {role.name} is unrestricted: nothing is analysed, limited or masked; "
            "every statement is relayed as it is"
        )
        doc["decision"] = _decision_doc(Allow())
        doc["statements"] = [
            _statement_doc(f, Allow(), ctx, traced=False) for f in _classify(sql, notes)
        ]
        return doc
    if live is None:
        notes.append(
            "no --dsn: without the catalog, column lineage, labels and masks cannot be traced; "
            "only statement kinds are shown (and a refusal that needs no catalog)"
        )
        statements = []
        decisions: list[Decision | None] = []
        all_facts = _classify(sql, notes)
        for facts in all_facts:
            decision = _decide_without_catalog(facts, rules, role)
            decisions.append(decision)
            statements.append(_statement_doc(facts, decision, ctx, traced=False))
        refusals = [d for d in decisions if isinstance(d, Refuse)]
        overall_unknown: Decision | None
        if not all_facts:
            # does not parse: the proxy's own refusal, which needs no catalog
            overall_unknown = _syntax_refusal(sql, rules, role)
        elif refusals:
            overall_unknown = refusals[0]
        elif any(d is None for d in decisions):
            overall_unknown = None
        else:
            overall_unknown = Allow()
        doc["decision"] = _decision_doc(overall_unknown)
        doc["statements"] = statements
        return doc
    judged = judge_sql_with_facts(sql, live.catalog, live.search_path, rules, role)
    overall: Decision
    if isinstance(judged, Refuse):
        overall = judged
    else:
        masks = [d for _, d in judged if isinstance(d, Mask)]
        if not masks:
            overall = Allow()
        elif len(judged) == 1:
            overall = masks[0]
        else:
            overall = Mask({})  # several statements: each one lists its own masks
    doc["decision"] = _decision_doc(overall)
    try:
        all_facts = analyze(sql, live.catalog, live.search_path)
    except AnalysisError as exc:
        notes.append(f"the SQL does not parse as PostgreSQL: {exc.reason}")
        doc["statements"] = []
        return doc
    prepared: dict[str, Decision] = {}
    cursors: dict[str, Decision] = {}
    statements = []
    for facts in all_facts:
        decision = judge_statement(facts, rules, role, prepared=prepared, cursors=cursors)
        if not isinstance(decision, Refuse):
            remember(facts, decision, prepared, cursors)
        statements.append(_statement_doc(facts, decision, ctx, traced=True))
    doc["statements"] = statements
    return doc


def _role_doc(match: RoleMatch, membership: str, live: _Live | None) -> dict[str, Any]:
    role = match.role
    how: str = match.how
    if membership == "unchecked" and how == "default":
        how = "default_unchecked"
    elif membership == "unchecked":
        how = f"{how}_unchecked"
    memberships = None
    if live is not None and live.memberships is not None:
        memberships = sorted(live.memberships)
    return {
        "name": role.name,
        "unrestricted": role.unrestricted,
        "how": how,
        "matched": match.matched,
        "reason": match.reason,
        "membership": membership,
        "memberships": memberships,
        "limits": _limits(role),
    }


def _limits(role: Role) -> dict[str, Any]:
    if role.unrestricted:
        return {}
    out: dict[str, Any] = {"statements": sorted(role.permitted_statements)}
    for key in (
        "max_rows_per_query",
        "max_rows_per_minute",
        "max_rows_per_hour",
        "max_queries_per_minute",
        "statement_timeout_ms",
    ):
        value = getattr(role, key)
        if value is not None:
            out[key] = value
    out["copy_out"] = role.copy_out
    out["copy_in"] = role.copy_in
    return out


def _classify(sql: str, notes: list[str]) -> tuple[StatementFacts, ...]:
    """Statement kinds only (no catalog): every relation is unknown."""
    try:
        return analyze(sql, _EMPTY_CATALOG, ())
    except AnalysisError as exc:
        notes.append(f"the SQL does not parse as PostgreSQL: {exc.reason}")
        return ()


def _syntax_refusal(sql: str, rules: Rules, role: Role) -> Decision | None:
    judged = judge_sql_with_facts(sql, _EMPTY_CATALOG, (), rules, role)
    return judged if isinstance(judged, Refuse) else None


_NO_CATALOG_KINDS: Final = frozenset({"set", "transaction", "show", "listen"})


def _decide_without_catalog(facts: StatementFacts, rules: Rules, role: Role) -> Decision | None:
    """The decision where it needs no catalog (statement kind, SET, ...), else None."""
    if facts.kind in _NO_CATALOG_KINDS or not role.permits(facts.kind):
        return judge_statement(facts, rules, role)
    if facts.kind == "merge" and not all(role.permits(k) for k in ("insert", "update", "delete")):
        return judge_statement(facts, rules, role)
    return None


# -- text ----------------------------------------------------------------------------------------


def _policy_text(policy: Mapping[str, Any]) -> str:
    if policy["kind"] != "mask":
        return str(policy["kind"])
    params = ", ".join(f"{k}={v!r}" for k, v in policy["params"].items())
    text = f"mask {policy['mask']}" + (f"({params})" if params else "")
    return text + f", filter {policy['filter']}"


def _labels_text(labels: list[dict[str, Any]]) -> str:
    return "; ".join(f"label {lb['label']}, {_policy_text(lb['policy'])}" for lb in labels)


def _decision_lines(decision: Mapping[str, Any], indent: str) -> list[str]:
    kind = decision["decision"]
    if kind == "refuse":
        lines = [f"{indent}decision: refuse (SQLSTATE {decision['sqlstate']})"]
        lines.append(f"{indent}  message: {decision['message']}")
        for key in ("detail", "hint"):
            if decision.get(key):
                lines.append(f"{indent}  {key}:{' ' * (8 - len(key))}{decision[key]}")
        return lines
    if kind == "mask":
        cols = decision.get("masked_columns")
        if isinstance(cols, list) and cols:
            shown = ", ".join(f"column {c['position']} ({c['label']}: {c['mask']})" for c in cols)
            return [f"{indent}decision: mask {shown}"]
        return [f"{indent}decision: mask (see each statement)"]
    if kind == "unknown":
        return [f"{indent}decision: not decided without --dsn (needs the catalog)"]
    return [f"{indent}decision: allow"]


def _statement_lines(st: Mapping[str, Any], indent: str, *, decision: bool = True) -> list[str]:
    lines: list[str] = []
    if decision:
        lines.extend(_decision_lines(st["decision"], indent))
    if "relations" not in st:
        return lines
    rels = [f"{r['name']} ({r['kind']})" for r in st["relations"]]
    rels += [f"{name} (not in the catalog)" for name in st["unknown_relations"]]
    if rels or st["outputs"] is not None:
        lines.append(f"{indent}relations: {', '.join(rels) if rels else 'none'}")
    if st["outputs"] is not None:
        lines.append(f"{indent}output columns:")
        if not st["outputs"]:
            lines.append(f"{indent}  none")
        for out in st["outputs"]:
            sources = [s["column"] for s in out["sources"]]
            arrow = f" <- {', '.join(sources)}" if sources else " <- (no column: a constant)"
            lines.append(f"{indent}  {out['position']}. {out['name']}{arrow} ({out['form']})")
            for source in out["sources"]:
                if source["labels"]:
                    lines.append(
                        f"{indent}       {source['column']}: {_labels_text(source['labels'])}"
                    )
            if out["mask"] is not None:
                spec = out["mask"]
                params = ", ".join(f"{k}={v!r}" for k, v in spec["params"].items())
                lines.append(
                    f"{indent}       -> masked with {spec['mask']}"
                    + (f"({params})" if params else "")
                    + f" for label {spec['label']}"
                )
            elif out["result"] == "count":
                lines.append(f"{indent}       -> a count: no values of its columns")
            elif out["result"] == "refused":
                lines.append(f"{indent}       -> not returned: the statement is refused")
            elif out["result"] == "not_returned":
                lines.append(f"{indent}       -> not returned to the client by this statement")
            else:
                lines.append(f"{indent}       -> returned as stored")
    if st["predicates"]:
        lines.append(f"{indent}used in conditions:")
        for use in st["predicates"]:
            where = _CLAUSES.get(use["clause"], use["clause"])
            line = f"{indent}  {use['column']} in {where} ({use['form']})"
            if use["labels"]:
                line += f": {_labels_text(use['labels'])}"
            lines.append(line)
    if st["functions"]:
        lines.append(f"{indent}functions: {', '.join(st['functions'])}")
    if st["operators"]:
        lines.append(f"{indent}operators: {', '.join(st['operators'])}")
    if st["unsupported"]:
        lines.append(f"{indent}cannot be analysed: {st['unsupported']}")
    if st["inner"] is not None:
        inner = st["inner"]
        lines.append(f"{indent}inner statement ({inner['kind']}): {inner['text']}")
        lines.extend(_statement_lines(inner, indent + "  ", decision=False))
    return lines


def render_text(doc: Mapping[str, Any]) -> str:
    """The human-readable layout of an explanation document."""
    role = doc["role"]
    kind = "unrestricted" if role["unrestricted"] else "restricted"
    lines = [f"user:        {doc['user']}", f"role:        {role['name']} ({kind})"]
    lines.append(f"  why:       {role['reason']}")
    if role["how"].endswith("_unchecked"):
        lines.append("  caution:   membership not checked (no --dsn); a member_of role may apply")
    if role["membership"] == "looked_up":
        shown = ", ".join(role["memberships"]) or "none"
        lines.append(f"  member of: {shown}")
    elif role["membership"] == "not_needed":
        lines.append("  member of: not looked up (the user name decides)")
    limits = role["limits"]
    if limits:
        rows = limits.get("max_rows_per_query")
        extra = f"; at most {rows} rows a query" if rows else ""
        lines.append(f"  may run:   {', '.join(limits['statements'])}{extra}")
    if doc["database"] is not None:
        lines.append(f"database:    {doc['database']}")
        lines.append(f"search_path: {', '.join(doc['search_path'])}")
        lines.append(f"  from:      {doc['search_path_source']}")
    for note in doc["notes"]:
        lines.append(f"note: {note}")
    lines.append("")
    lines.extend(_decision_lines(doc["decision"], ""))
    statements = doc["statements"]
    for number, st in enumerate(statements, start=1):
        lines.append("")
        lines.append(f"statement {number} of {len(statements)}: {st['kind']} ({st['node']})")
        lines.append(f"  {st['text']}")
        lines.extend(_statement_lines(st, "  ", decision=len(statements) > 1))
    return "\n".join(lines) + "\n"


# -- the command -----------------------------------------------------------------------------------


async def run_explain(
    rules: str,
    *,
    user: str,
    dsn: str | None,
    sql: str,
    as_json: bool,
    out: TextIO | None = None,
) -> int:
    """Print the explanation; 0 when answered, 2 for rules that do not load, 1 for --dsn errors."""
    out = out or sys.stdout
    try:
        loaded = load_rules(rules)
    except RulesError as exc:
        for error in exc.errors:
            print(str(error), file=sys.stderr)
        print(f"topeng explain: {rules}: {len(exc.errors)} error(s)", file=sys.stderr)
        return 2
    live: _Live | None = None
    if dsn:
        try:
            live = await _connect_and_load(dsn, user, loaded)
        except Exception as exc:  # any failure to connect or read, reported alike
            print(f"topeng explain: cannot read the database from --dsn: {exc}", file=sys.stderr)
            return 1
    doc = explain_document(loaded, user, sql, live)
    if as_json:
        print(json.dumps(doc, indent=2, default=str), file=out)
    else:
        print(render_text(doc), end="", file=out)
    return 0
