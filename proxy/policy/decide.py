"""Decide: statement facts + rules + role -> Allow | Refuse | Mask.

Strategy: a fixed sequence of gates, the first refusal wins, so the message names the most
fundamental problem: (1) the statement kind (with the kinds inside EXPLAIN, PREPARE, DECLARE and
COPY judged as statements of their own), (2) kind-specific rules (SET parameters, COPY targets,
SELECT INTO, data-modifying CTEs), (3) relations Topeng cannot place, then constructs the
analysis could not model (0A000: fail closed), (4) catalog views that expose data, (5) functions
and operators, (6) columns: denied anywhere, whole rows of protected relations, predicate uses by
the label's `filter`, and finally the output plan: a masked column copied as itself is masked,
any other way for it to reach the output is refused (count() excepted). Each base column's
policy is the strictest of its labels' policies for the role. Unrestricted roles are allowed
everything (callers should not ask). Every refusal message starts `topeng:`, names the rule,
and carries a HINT written for a person or an LLM agent; `Refuse.reason` is a low-cardinality
metrics label.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from types import MappingProxyType
from typing import Final

from proxy.policy.analyze import (
    AnalysisError,
    ColumnRef,
    ColumnUse,
    StatementFacts,
    analyze,
)
from proxy.policy.cache import AnalysisCache
from proxy.policy.catalog import Catalog
from proxy.policy.decision import (
    ALLOW,
    FEATURE_NOT_SUPPORTED,
    INSUFFICIENT_PRIVILEGE,
    ColumnMask,
    Decision,
    Mask,
    Refuse,
)
from proxy.policy.functions import (
    SET_CONFIG_SETTINGS,
    function_verdict,
    is_set_config,
    operator_ok,
    set_config_verdict,
)
from proxy.policy.rules import LabelPolicy, Role, Rules

__all__ = [
    "ALLOWED_SETTINGS",
    "CATALOG_VIEWS",
    "judge_sql",
    "judge_sql_with_facts",
    "judge_statement",
    "remember",
]

SYNTAX_ERROR: Final = "42601"
# Statements whose decision depends only on their facts, the rules and the role (not on the
# session's prepared statements or cursors): their decisions can be kept with the facts.
_DECIDED_ALIKE: Final = frozenset({"select", "insert", "update", "delete", "merge"})
_NO_DECISIONS: Final[Mapping[str, Decision]] = MappingProxyType({})

ALLOWED_SETTINGS: Final = SET_CONFIG_SETTINGS | frozenset(
    {
        "application_name",
        "datestyle",
        "intervalstyle",
        "timezone",
        "extra_float_digits",
        "statement_timeout",
        "lock_timeout",
        "idle_in_transaction_session_timeout",
        "idle_session_timeout",
        "client_min_messages",
        "bytea_output",
        "default_transaction_isolation",
        "default_transaction_read_only",
        "transaction_isolation",
        "transaction_read_only",
    }
)
"""Parameters a restricted role may SET: they change formats, timeouts and how the server plans
and executes (jit), never what is read. set_config may change only `SET_CONFIG_SETTINGS`, a
subset of these (see proxy.policy.functions for why)."""

CATALOG_VIEWS: Final = frozenset(
    {
        "pg_stats",
        "pg_stats_ext",
        "pg_stats_ext_exprs",
        "pg_statistic",
        "pg_statistic_ext",
        "pg_statistic_ext_data",
        "pg_stat_activity",
        "pg_authid",
        "pg_shadow",
        "pg_user_mappings",
        "pg_user_mapping",
        "pg_largeobject",
        "pg_largeobject_metadata",
        "pg_stat_statements",
        "pg_stat_statements_info",
        "pg_prepared_statements",
        "pg_cursors",
        "pg_file_settings",
        "pg_hba_file_rules",
        "pg_ident_file_mappings",
    }
)
"""System relations that expose column contents, other sessions' text or secrets."""

_REQUIRED_KINDS: Final = {"merge": ("insert", "update", "delete")}
_KIND_WORDS: Final = {
    "select": "SELECT",
    "insert": "INSERT",
    "update": "UPDATE",
    "delete": "DELETE",
    "merge": "MERGE",
    "copy_in": "COPY ... FROM",
    "copy_out": "COPY ... TO",
    "ddl": "DDL and administrative",
    "explain": "EXPLAIN",
    "call": "CALL",
    "do": "DO",
    "listen": "LISTEN / UNLISTEN / NOTIFY",
    "prepare": "PREPARE / EXECUTE / DEALLOCATE",
    "cursor": "DECLARE / FETCH / MOVE / CLOSE",
}
_STRICTNESS: Final = {
    "null": 1,
    "redact": 2,
    "constant": 3,
    "hash": 4,
    "fake": 5,
    "round": 6,
    "partial": 7,
    "email": 8,
}
_FILTER_STRICTNESS: Final = {"deny": 0, "equality": 1, "any": 2}
_CLAUSE_WORDS: Final = {
    "where": "WHERE",
    "having": "HAVING",
    "join": "a JOIN condition",
    "group": "GROUP BY",
    "order": "ORDER BY",
    "distinct_on": "DISTINCT ON",
    "distinct": "SELECT DISTINCT",
    "window": "a window's PARTITION BY / ORDER BY",
    "from": "a function in FROM",
    "other": "LIMIT, VALUES or another clause",
    "whole_row": "a whole-row reference",
    "select": "the select list",
}


def _refuse(
    sqlstate: str, reason: str, message: str, detail: str | None = None, hint: str | None = None
) -> Refuse:
    return Refuse(sqlstate, f"topeng: {message}", detail, hint, reason=reason)


# -- entry points ------------------------------------------------------------------------------


def judge_sql_with_facts(
    sql: str,
    catalog: Catalog,
    search_path: tuple[str, ...],
    rules: Rules,
    role: Role,
    *,
    prepared: Mapping[str, Decision] = _NO_DECISIONS,
    cursors: Mapping[str, Decision] = _NO_DECISIONS,
    cache: AnalysisCache | None = None,
) -> tuple[tuple[StatementFacts, Decision], ...] | Refuse:
    """Each statement's facts and decision, or one Refuse for the whole string.

    PREPARE / DECLARE earlier in the string are visible to EXECUTE / FETCH later in it. The
    caller keeps name -> decision for the session from the facts (kind prepare/cursor, `name`).
    """
    try:
        if cache is not None:
            all_facts = cache.analyze(sql, catalog, search_path)
        else:
            all_facts = analyze(sql, catalog, search_path)
    except AnalysisError as exc:
        return _refuse(
            SYNTAX_ERROR,
            "syntax",
            "the statement does not parse as PostgreSQL",
            detail=exc.reason,
            hint="fix the syntax error; Topeng forwards only statements it can read",
        )
    if cache is not None:
        known = cache.decided(all_facts, rules, role.name)
        if known is not None:
            return known
    local_prepared = dict(prepared)
    local_cursors = dict(cursors)
    results: list[tuple[StatementFacts, Decision]] = []
    for number, facts in enumerate(all_facts, start=1):
        decision = judge_statement(
            facts, rules, role, prepared=local_prepared, cursors=local_cursors
        )
        if isinstance(decision, Refuse):
            if len(all_facts) > 1:
                where = f"statement {number} of {len(all_facts)}"
                detail = f"{where}: {decision.detail}" if decision.detail else where
                return replace(decision, detail=detail)
            return decision
        remember(facts, decision, local_prepared, local_cursors)
        results.append((facts, decision))
    judged = tuple(results)
    if cache is not None and all(f.kind in _DECIDED_ALIKE for f in all_facts):
        cache.remember_decided(all_facts, rules, role.name, judged)
    return judged


def judge_sql(
    sql: str,
    catalog: Catalog,
    search_path: tuple[str, ...],
    rules: Rules,
    role: Role,
    *,
    prepared: Mapping[str, Decision] = _NO_DECISIONS,
    cursors: Mapping[str, Decision] = _NO_DECISIONS,
    cache: AnalysisCache | None = None,
) -> tuple[Decision, ...] | Refuse:
    """The decision of each statement of `sql`, or one Refuse if any statement is refused."""
    judged = judge_sql_with_facts(
        sql, catalog, search_path, rules, role, prepared=prepared, cursors=cursors, cache=cache
    )
    if isinstance(judged, Refuse):
        return judged
    return tuple(decision for _, decision in judged)


def remember(
    facts: StatementFacts,
    decision: Decision,
    prepared: dict[str, Decision],
    cursors: dict[str, Decision],
) -> None:
    if facts.node == "DeallocateStmt" and facts.name is None:
        prepared.clear()  # DEALLOCATE ALL
        return
    if facts.name is None:
        return
    if facts.node == "PrepareStmt":
        prepared[facts.name] = decision
    elif facts.node == "DeallocateStmt":
        prepared.pop(facts.name, None)
    elif facts.node == "DeclareCursorStmt":
        cursors[facts.name] = decision
    elif facts.node == "ClosePortalStmt":
        cursors.pop(facts.name, None)


def judge_statement(
    facts: StatementFacts,
    rules: Rules,
    role: Role,
    *,
    prepared: Mapping[str, Decision] = _NO_DECISIONS,
    cursors: Mapping[str, Decision] = _NO_DECISIONS,
) -> Decision:
    """The decision for one statement of a (restricted) role."""
    if role.unrestricted or facts.node == "DeallocateStmt":
        # DEALLOCATE only drops prepared statements; drivers send it whatever the role
        # (psycopg: DEALLOCATE ALL after a rollback), and a role without `prepare` has none
        # of its own to drop.
        return ALLOW
    refused = _kind_gate(facts, role)
    if refused is not None:
        return refused
    judge = _BY_KIND.get(facts.kind)
    if judge is not None:
        return judge(facts, rules, role, prepared, cursors)
    return _judge_query(facts, rules, role)


def _kind_gate(facts: StatementFacts, role: Role) -> Refuse | None:
    for kind in _REQUIRED_KINDS.get(facts.kind, (facts.kind,)):
        if not role.permits(kind):
            allowed = ", ".join(sorted(role.permitted_statements))
            return _refuse(
                INSUFFICIENT_PRIVILEGE,
                "statement_kind",
                f"{_KIND_WORDS.get(facts.kind, facts.kind)} statements are not permitted "
                f"for role {role.name}",
                detail=f"the statement is a {facts.node or facts.kind} ({kind})",
                hint=f"role {role.name} may run: {allowed}",
            )
    return None


# -- kind-specific judges ------------------------------------------------------------------------


def _judge_set(
    facts: StatementFacts,
    rules: Rules,
    role: Role,
    prepared: Mapping[str, Decision],
    cursors: Mapping[str, Decision],
) -> Decision:
    setting = facts.setting
    if setting is None:
        return ALLOW
    name = setting.name
    if setting.action == "multi":
        if name in ("transaction", "session characteristics"):
            return ALLOW
        return _set_refusal(facts, f"SET {name.upper()} is not permitted", None)
    if setting.action == "discard":
        if setting.name == "all":
            return _set_refusal(
                facts, "DISCARD ALL is not permitted", "use DISCARD PLANS or DISCARD TEMP"
            )
        return ALLOW
    if setting.action == "reset_all":
        return _set_refusal(
            facts, "RESET ALL is not permitted", "reset the parameters you changed by name"
        )
    if name in ("role", "session_authorization"):
        what = "SET ROLE" if name == "role" else "SET SESSION AUTHORIZATION"
        return _set_refusal(
            facts,
            f"{what} is not permitted for role {role.name}",
            "connect as the user whose access you need; Topeng decides the role at login",
        )
    if name == "search_path":
        return _set_refusal(
            facts,
            f"changing search_path is not permitted for role {role.name}",
            "qualify table names with their schema instead, e.g. bank.customers",
        )
    if name == "standard_conforming_strings":
        return _set_refusal(
            facts,
            "changing standard_conforming_strings is not permitted",
            "write strings as standard SQL strings, or E'...' for backslash escapes",
        )
    if name == "client_encoding":
        value = (setting.value or "").strip("'\" ").lower().replace("-", "").replace("_", "")
        if setting.action == "set" and value in ("utf8", "unicode"):
            return ALLOW
        return _set_refusal(facts, "client_encoding may only be UTF8", "keep client_encoding UTF8")
    if name == "bytea_output" and setting.action == "set":
        if (setting.value or "").strip("'\" ").lower() != "hex":
            return _set_refusal(facts, "bytea_output may only be hex", "keep bytea_output hex")
    if name in ALLOWED_SETTINGS:
        return ALLOW
    return _set_refusal(
        facts,
        f"setting parameter {name} is not permitted for role {role.name}",
        "parameters that may be set: " + ", ".join(sorted(ALLOWED_SETTINGS)),
    )


def _set_refusal(facts: StatementFacts, message: str, hint: str | None) -> Refuse:
    return _refuse(INSUFFICIENT_PRIVILEGE, "set", message, detail=facts.text[:200], hint=hint)


def _allow(
    facts: StatementFacts,
    rules: Rules,
    role: Role,
    prepared: Mapping[str, Decision],
    cursors: Mapping[str, Decision],
) -> Decision:
    return ALLOW


def _judge_listen(
    facts: StatementFacts,
    rules: Rules,
    role: Role,
    prepared: Mapping[str, Decision],
    cursors: Mapping[str, Decision],
) -> Decision:
    if facts.node == "NotifyStmt":
        return _refuse(
            INSUFFICIENT_PRIVILEGE,
            "function",
            f"NOTIFY is not permitted for role {role.name}",
            detail="NOTIFY sends text to other sessions (it is pg_notify)",
            hint="LISTEN and UNLISTEN are allowed; sending notifications is not",
        )
    return ALLOW


def _inner(
    facts: StatementFacts,
    rules: Rules,
    role: Role,
    prepared: Mapping[str, Decision],
    cursors: Mapping[str, Decision],
) -> Decision:
    if facts.inner is None:
        return _refuse(FEATURE_NOT_SUPPORTED, "unsupported", "no statement found inside")
    return judge_statement(facts.inner, rules, role, prepared=prepared, cursors=cursors)


def _judge_prepare(
    facts: StatementFacts,
    rules: Rules,
    role: Role,
    prepared: Mapping[str, Decision],
    cursors: Mapping[str, Decision],
) -> Decision:
    if facts.node == "PrepareStmt":
        return _inner(facts, rules, role, prepared, cursors)
    if facts.node == "ExecuteStmt":
        return _named(facts, prepared, "prepared statement", "PREPARE")
    return ALLOW  # DEALLOCATE


def _judge_cursor(
    facts: StatementFacts,
    rules: Rules,
    role: Role,
    prepared: Mapping[str, Decision],
    cursors: Mapping[str, Decision],
) -> Decision:
    if facts.node == "DeclareCursorStmt":
        return _inner(facts, rules, role, prepared, cursors)
    if facts.node == "FetchStmt":
        return _named(facts, cursors, "cursor", "DECLARE")
    return ALLOW  # CLOSE


def _named(facts: StatementFacts, known: Mapping[str, Decision], what: str, verb: str) -> Decision:
    name = facts.name or ""
    decision = known.get(name)
    if decision is None:
        return _refuse(
            FEATURE_NOT_SUPPORTED,
            "unsupported",
            f"{what} {name} is not known to Topeng",
            detail=f"{what}s must be created through Topeng in this session",
            hint=f"{verb} it again in this session before using it",
        )
    return decision


def _judge_explain(
    facts: StatementFacts,
    rules: Rules,
    role: Role,
    prepared: Mapping[str, Decision],
    cursors: Mapping[str, Decision],
) -> Decision:
    inner = _inner(facts, rules, role, prepared, cursors)
    return inner if isinstance(inner, Refuse) else ALLOW


def _judge_copy_out(
    facts: StatementFacts,
    rules: Rules,
    role: Role,
    prepared: Mapping[str, Decision],
    cursors: Mapping[str, Decision],
) -> Decision:
    if facts.copy_target != "client":
        return _copy_file_refusal(facts)
    inner = _inner(facts, rules, role, prepared, cursors)
    if isinstance(inner, Refuse):
        return inner
    if role.copy_out == "allow" and isinstance(inner, Mask):
        return _refuse(
            INSUFFICIENT_PRIVILEGE,
            "copy",
            f"COPY of masked columns is not permitted for role {role.name}",
            detail="copy_out: allow copies only data with nothing masked",
            hint="leave the masked columns out of the COPY, or SELECT them (masked) instead",
        )
    if isinstance(inner, Mask) and inner.columns:
        return _copy_mask(facts, inner, role)
    return inner


def _copy_mask(facts: StatementFacts, inner: Mask, role: Role) -> Decision:
    """A masked COPY TO STDOUT (copy_out: mask): the decision carries the COPY's format and
    the base columns of each masked column, which the masker needs for their types."""
    copy = facts.copy
    outputs = facts.inner.outputs if facts.inner is not None else None
    why = None
    if copy is None or outputs is None:
        why = "the COPY's data format could not be determined"
    elif copy.unsupported is not None:
        why = f"COPY option {copy.unsupported} cannot be combined with masking"
    if why is not None or copy is None or outputs is None:
        return _refuse(
            FEATURE_NOT_SUPPORTED,
            "copy",
            f"COPY of masked columns with these options is not supported for role {role.name}",
            detail=why,
            hint="use FORMAT text, csv or binary with DELIMITER, QUOTE, ESCAPE, NULL or HEADER "
            "only, or SELECT the columns (they are returned masked)",
        )
    sources = tuple(
        (index, tuple(sorted(outputs[index].sources)))
        for index in sorted(inner.columns)
        if index < len(outputs)
    )
    return Mask(inner.columns, copy=replace(copy, sources=sources))


def _judge_copy_in(
    facts: StatementFacts,
    rules: Rules,
    role: Role,
    prepared: Mapping[str, Decision],
    cursors: Mapping[str, Decision],
) -> Decision:
    if facts.copy_target != "client":
        return _copy_file_refusal(facts)
    if facts.unknown_relations:
        return _unknown_relation(facts)
    return ALLOW


def _copy_file_refusal(facts: StatementFacts) -> Refuse:
    return _refuse(
        INSUFFICIENT_PRIVILEGE,
        "copy",
        f"COPY to or from a server {facts.copy_target} is not permitted",
        detail=facts.text[:200],
        hint="use COPY ... TO STDOUT / FROM STDIN, which goes through your connection",
    )


def _judge_ddl(
    facts: StatementFacts,
    rules: Rules,
    role: Role,
    prepared: Mapping[str, Decision],
    cursors: Mapping[str, Decision],
) -> Decision:
    if facts.inner is None:
        return ALLOW
    inner = _inner(facts, rules, role, prepared, cursors)
    if isinstance(inner, Refuse):
        return inner
    if isinstance(inner, Mask):
        return _refuse(
            INSUFFICIENT_PRIVILEGE,
            "statement_kind",
            "CREATE TABLE AS / SELECT INTO of masked columns is not permitted",
            detail="the new table would hold protected values under new names",
            hint="leave the masked columns out, or SELECT them (masked) instead",
        )
    return ALLOW


def _judge_writes(
    facts: StatementFacts,
    rules: Rules,
    role: Role,
    prepared: Mapping[str, Decision],
    cursors: Mapping[str, Decision],
) -> Decision:
    if facts.unknown_relations:
        return _unknown_relation(facts)
    return _unsupported(facts, facts.unsupported or "data-modifying statements")


_Judge = type(_allow)
_BY_KIND: Final = {
    "set": _judge_set,
    "transaction": _allow,
    "show": _allow,
    "listen": _judge_listen,
    "prepare": _judge_prepare,
    "cursor": _judge_cursor,
    "explain": _judge_explain,
    "copy_out": _judge_copy_out,
    "copy_in": _judge_copy_in,
    "ddl": _judge_ddl,
    "call": _allow,
    "do": _allow,
    "insert": _judge_writes,
    "update": _judge_writes,
    "delete": _judge_writes,
    "merge": _judge_writes,
}


# -- queries -------------------------------------------------------------------------------------


def _unknown_relation(facts: StatementFacts) -> Refuse:
    names = ", ".join(facts.unknown_relations)
    return _refuse(
        FEATURE_NOT_SUPPORTED,
        "unknown_relation",
        f"relation {names} is not in Topeng's catalog",
        detail="a relation Topeng cannot place (a temporary table or view, a new partition, or "
        "a name that does not exist) could carry protected data",
        hint="qualify the name with its schema (e.g. bank.customers); new tables are seen after "
        "Topeng's next catalog refresh",
    )


def _unsupported(facts: StatementFacts, why: str) -> Refuse:
    return _refuse(
        FEATURE_NOT_SUPPORTED,
        "unsupported",
        "this statement cannot be analysed safely, so it is refused",
        detail=why,
        hint="rewrite it as a plain SELECT of the columns you need (joins, subqueries and CTEs "
        "are fine)",
    )


def _judge_query(facts: StatementFacts, rules: Rules, role: Role) -> Decision:
    if facts.into:
        return _refuse(
            INSUFFICIENT_PRIVILEGE,
            "statement_kind",
            f"SELECT INTO is not permitted for role {role.name}",
            detail="SELECT INTO creates a table",
            hint="drop the INTO clause to read the rows",
        )
    if facts.writes:
        return _refuse(
            INSUFFICIENT_PRIVILEGE,
            "statement_kind",
            f"data-modifying statements inside a query are not permitted for role {role.name}",
            detail="a WITH clause contains INSERT, UPDATE, DELETE or MERGE",
            hint="run only the SELECT",
        )
    if facts.unknown_relations:
        return _unknown_relation(facts)
    refused = _catalog_views(facts, role)
    if refused is not None:
        return refused
    if facts.unsupported is not None:
        return _unsupported(facts, facts.unsupported)
    refused = _functions(facts, role)
    if refused is not None:
        return refused
    refused = _require_where(facts, role)
    if refused is not None:
        return refused
    decision = _ColumnJudge(facts, rules, role).judge()
    if isinstance(decision, Refuse):
        return decision
    refused = _folding(facts, rules, role)
    return refused if refused is not None else decision


def _require_where(facts: StatementFacts, role: Role) -> Refuse | None:
    """A relation named by the role's `require_where` read without a restricting WHERE."""
    if not role.require_where:
        return None
    for info in facts.relation_info:
        if info.oid not in facts.unfiltered:
            continue
        names = {f"{info.schema}.{info.name}", f"{info.label_schema}.{info.label_name}"}
        glob = next((g for g in role.require_where if any(fnmatchcase(n, g) for n in names)), None)
        if glob is None:
            continue
        shown = f"{info.schema}.{info.name}"
        return _refuse(
            INSUFFICIENT_PRIVILEGE,
            "require_where",
            f"reading {shown} without a WHERE clause is not permitted for role {role.name} "
            f"(require_where: {glob})",
            detail=f"the statement reads {shown} with no WHERE, a WHERE that is always true, "
            "or through a view or COPY of the whole table",
            hint=f"add a WHERE on a key column of {shown}, e.g. WHERE id = 42, and select "
            "only the rows you need",
        )
    return None


def _labelled(facts: StatementFacts, rules: Rules) -> str | None:
    """`schema.table` of the first relation the statement reads that has labelled columns."""
    for info in facts.relation_info:
        for _, column in info.columns:
            if rules.labels_for_column(info.label_schema, info.label_name, column):
                return f"{info.schema}.{info.name}"
    return None


def _folding(facts: StatementFacts, rules: Rules, role: Role) -> Refuse | None:
    """Aggregates that fold many rows into one value over a table with labelled columns: a
    one-row result must not carry a whole table past max_rows_per_query. Roles without any
    row limit may use them."""
    if not facts.folds:
        return None
    if (
        role.max_rows_per_query is None
        and role.max_rows_per_minute is None
        and role.max_rows_per_hour is None
    ):
        return None
    table = _labelled(facts, rules)
    if table is None:
        return None
    what = ", ".join(sorted(facts.folds))
    return _refuse(
        INSUFFICIENT_PRIVILEGE,
        "aggregate",
        f"{what} over {table} is not permitted for role {role.name}: it folds many rows into "
        "one value, around the row limit",
        detail=f"{table} has labelled columns, and role {role.name} has a row limit",
        hint="select the rows themselves with a LIMIT (e.g. SELECT full_name FROM ... "
        "WHERE ... LIMIT 50); count(), sum(), min() and max() are allowed",
    )


def _catalog_views(facts: StatementFacts, role: Role) -> Refuse | None:
    for info in facts.relation_info:
        system = info.schema in ("pg_catalog", "information_schema")
        if (system and info.name in CATALOG_VIEWS) or info.name.startswith("pg_stat_statements"):
            return _refuse(
                INSUFFICIENT_PRIVILEGE,
                "catalog_view",
                f"{info.schema}.{info.name} is not readable for role {role.name}",
                detail=f"{info.name} exposes column contents, other sessions' statements or "
                "secrets",
                hint="catalog tables describing structure (pg_class, pg_attribute, "
                "information_schema.columns, ...) are readable",
            )
    return None


def _functions(facts: StatementFacts, role: Role) -> Refuse | None:
    for name in sorted(facts.functions):
        why = function_verdict(name)
        hint = (
            "use built-in functions over the columns you may read; user-defined "
            "functions can read protected tables internally"
        )
        if is_set_config(name):
            why = set_config_verdict(facts.config_settings)
            hint = "change session parameters with SET; parameters that may be set: " + ", ".join(
                sorted(ALLOWED_SETTINGS)
            )
        if why is not None:
            shown = ".".join(name)
            return _refuse(
                INSUFFICIENT_PRIVILEGE,
                "function",
                f"function {shown} is not permitted for role {role.name}",
                detail=f"{shown} {why}",
                hint=hint,
            )
    for op in sorted(facts.operators):
        if not operator_ok(op):
            shown = ".".join(op)
            return _refuse(
                INSUFFICIENT_PRIVILEGE,
                "function",
                f"operator {shown} is not permitted for role {role.name}",
                detail=f"{shown} is not a built-in operator Topeng knows",
                hint="use the standard operators (=, <, LIKE, ||, ->>, ...)",
            )
    return None


@dataclass(frozen=True, slots=True)
class _Protected:
    label: str
    policy: LabelPolicy


class _ColumnJudge:
    """The column gates for one query."""

    def __init__(self, facts: StatementFacts, rules: Rules, role: Role) -> None:
        self.facts = facts
        self.rules = rules
        self.role = role
        self.cache: dict[ColumnRef, _Protected | None] = {}

    def protection(self, ref: ColumnRef) -> _Protected | None:
        if ref in self.cache:
            return self.cache[ref]
        result = self._compute(ref)
        self.cache[ref] = result
        return result

    def _compute(self, ref: ColumnRef) -> _Protected | None:
        info = self.facts.info(ref[0])
        column = None if info is None else info.column_name(ref[1])
        if info is None or column is None:
            # fail closed: a column we cannot name is treated as denied
            return _Protected("unknown", LabelPolicy("deny"))
        labels = self.rules.labels_for_column(info.label_schema, info.label_name, column)
        best: _Protected | None = None
        for label in labels:
            policy = self.rules.policy_for(self.role.name, label)
            if policy.kind == "allow":
                continue
            candidate = _Protected(label, policy)
            best = candidate if best is None else _stricter(best, candidate)
        return best

    def judge(self) -> Decision:
        for gate in (self._whole_rows, self._denied, self._uses):
            refused = gate()
            if refused is not None:
                return refused
        return self._outputs()

    def _all_refs(self) -> Iterable[tuple[ColumnRef, str]]:
        for output in self.facts.outputs or ():
            for ref in output.sources:
                yield ref, "select"
        for use in self.facts.uses:
            # a plain select-list reference that reaches no output and no condition is never
            # read; an expression may be evaluated (and fail, with the value in the error)
            if use.clause != "select" or use.form == "expression":
                yield use.column, use.clause

    def _denied(self) -> Refuse | None:
        for ref, clause in sorted(self._all_refs()):
            protected = self.protection(ref)
            if protected is not None and protected.policy.kind == "deny":
                if ref[0] in self.facts.star_relations:
                    refused = self._star(ref[0])
                    if refused is not None:
                        return refused
                name = self.facts.column_label(ref)
                return _refuse(
                    INSUFFICIENT_PRIVILEGE,
                    "denied_column",
                    f"column {name} (label {protected.label}) is denied for role {self.role.name}",
                    detail=f"the statement uses {name} in {_CLAUSE_WORDS.get(clause, clause)}",
                    hint=f"remove {ref_column(name)} from the query: role {self.role.name} may "
                    "not select, filter, join, group or order on it",
                )
        return None

    def _star(self, oid: int) -> Refuse | None:
        info = self.facts.info(oid)
        if info is None:
            return None
        denied = [
            (name, p)
            for attnum, name in info.columns
            if (p := self.protection((oid, attnum))) is not None and p.policy.kind == "deny"
        ]
        if not denied:
            return None
        allowed = [
            name
            for attnum, name in info.columns
            if (p := self.protection((oid, attnum))) is None or p.policy.kind != "deny"
        ]
        names = ", ".join(f"{n} (label {p.label})" for n, p in denied)
        return _refuse(
            INSUFFICIENT_PRIVILEGE,
            "denied_column",
            f"SELECT * over {info.schema}.{info.name} includes denied column {names} for role "
            f"{self.role.name}",
            detail=f"* expands to every column of {info.schema}.{info.name}",
            hint=f"name the columns instead of *; role {self.role.name} may select from "
            f"{info.schema}.{info.name}: " + ", ".join(allowed),
        )

    def _whole_rows(self) -> Refuse | None:
        for oid in sorted(self.facts.whole_row_relations):
            info = self.facts.info(oid)
            protected = [
                name
                for attnum, name in (info.columns if info else ())
                if self.protection((oid, attnum)) is not None
            ]
            if protected or info is None:
                shown = f"{info.schema}.{info.name}" if info else str(oid)
                return _refuse(
                    INSUFFICIENT_PRIVILEGE,
                    "whole_row",
                    f"whole-row reference to {shown} is refused for role {self.role.name}",
                    detail=f"{shown} has protected columns: " + ", ".join(protected),
                    hint="select the columns you need by name (they are masked as the rules "
                    "say) instead of the whole row (t, t.*, row_to_json(t), t::text)",
                )
        for use in sorted(self.facts.uses):
            if use.clause == "whole_row" and self.protection(use.column) is not None:
                name = self.facts.column_label(use.column)
                return _refuse(
                    INSUFFICIENT_PRIVILEGE,
                    "whole_row",
                    f"whole-row reference covering {name} is refused for role {self.role.name}",
                    detail=f"the row includes protected column {name}",
                    hint="select the columns you need by name instead of the whole row",
                )
        return None

    def _uses(self) -> Refuse | None:
        masked = [
            (use, p)
            for use in sorted(self.facts.uses)
            if use.clause != "whole_row"
            and (p := self.protection(use.column)) is not None
            and p.policy.kind == "mask"
        ]
        for use, protected in masked:
            if use.clause != "select":
                refused = self._use_refusal(use, protected)
                if refused is not None:
                    return refused
        for use, protected in masked:
            if use.clause == "select" and use.form == "expression":
                return self._expression_refusal(use.column, protected, "a select list")
        return None

    def _use_refusal(self, use: ColumnUse, protected: _Protected) -> Refuse | None:
        mode = protected.policy.filter
        if mode == "any":
            return None
        if mode == "equality" and use.clause in ("where", "having") and use.form == "equality":
            return None
        name = self.facts.column_label(use.column)
        column = ref_column(name)
        where = _CLAUSE_WORDS.get(use.clause, use.clause)
        found = f"{column} is used in {where}"
        if use.form == "expression":
            found += " inside an expression, a comparison with another column or a subquery"
        if mode == "deny":
            message = (
                f"column {name} (label {protected.label}) may not be used in conditions, "
                f"joins, grouping or ordering by role {self.role.name}"
            )
            hint = f"select {column} (it is returned masked) and filter on another column"
        else:
            message = (
                f"column {name} (label {protected.label}) may only be compared with = or IN "
                f"against constants or parameters by role {self.role.name}"
            )
            hint = (
                f"look rows up with {column} = '...' or {column} IN ('...', '...') in WHERE; "
                "to join, group or sort use an unprotected column such as id"
            )
        return _refuse(INSUFFICIENT_PRIVILEGE, "predicate", message, detail=found, hint=hint)

    def _outputs(self) -> Decision:
        masks: dict[int, ColumnMask] = {}
        for index, output in enumerate(self.facts.outputs or ()):
            protected = {ref: self.protection(ref) for ref in output.sources}
            found = sorted((ref, p) for ref, p in protected.items() if p is not None)
            if not found or output.is_count:
                continue
            policies = {p.policy if p else None for p in protected.values()}
            if output.plain_copy and len(policies) == 1:
                first = found[0][1]
                masks[index] = ColumnMask(
                    first.label, first.policy.mask or "redact", first.policy.param_items
                )
                continue
            ref, p = found[0]
            return self._expression_refusal(ref, p, f"output column {output.name}")
        return Mask(masks) if masks else ALLOW

    def _expression_refusal(self, ref: ColumnRef, p: _Protected, where: str) -> Refuse:
        name = self.facts.column_label(ref)
        column = ref_column(name)
        return _refuse(
            INSUFFICIENT_PRIVILEGE,
            "masked_expression",
            f"an expression over masked column {name} (label {p.label}) is not permitted for "
            f"role {self.role.name}; it may only be selected as it is",
            detail=f"{where} computes on {column} (a function, cast, operator, aggregate, "
            "CASE, window, or a set operation mixing columns)",
            hint=f"select the column itself ({column}), which is returned masked; "
            f"count({column}) is allowed",
        )


def ref_column(qualified: str) -> str:
    """The column part of `schema.table.column`."""
    return qualified.rsplit(".", 1)[-1]


def _stricter(a: _Protected, b: _Protected) -> _Protected:
    pa, pb = a.policy, b.policy
    if pa.kind == "deny":
        return a
    if pb.kind == "deny":
        return b
    filt = min(pa.filter, pb.filter, key=lambda f: _FILTER_STRICTNESS.get(f, 0))
    first = a if _STRICTNESS.get(pa.mask or "", 0) <= _STRICTNESS.get(pb.mask or "", 0) else b
    return replace(first, policy=replace(first.policy, filter=filt))
