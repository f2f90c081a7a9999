"""Statement policies the session consults, chosen per session once its role is known.

Strategy: `RestrictedPolicy` is the session's judge for a restricted role. It holds what the
session fixed at its start (rules snapshot, role, the database's catalog, the search_path) and
what the session created since (SQL-level prepared statements and cursors, by name). Statements
are judged by `decide` over cached `analyze` facts; result rows are planned from the decision
and the server's RowDescription, which is checked against the rules independently: a column the
RowDescription places in a protected base column must be masked by the plan, or the result never
reaches the client (two sources of truth, both must agree).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from proxy.policy.cache import AnalysisCache
from proxy.policy.catalog import Catalog
from proxy.policy.decide import judge_sql_with_facts, remember
from proxy.policy.decision import (
    ALLOW,
    FEATURE_NOT_SUPPORTED,
    INSUFFICIENT_PRIVILEGE,
    Allow,
    Decision,
    Mask,
    Refuse,
)
from proxy.policy.masks import FieldMasker, MaskNotApplicable, RowMasker, build_field_masker
from proxy.policy.rules import Role, Rules
from proxy.session import CopyRewriter, RowLimit, RowRewriter
from proxy.wire import messages as m

log = logging.getLogger("topeng.policy")


class AllowAll:
    """Tracks the protocol but changes nothing: for unrestricted sessions under `track_all`."""

    needs_descriptions = False
    statement_timeout: float | None = None

    def judge_query(self, sql: str) -> Refuse | Allow | tuple[Decision, ...]:
        return ALLOW

    def judge_parse(self, sql: str, param_types: tuple[int, ...]) -> Decision:
        return ALLOW

    def judge_function_call(self, call: m.FunctionCall) -> Decision:
        return ALLOW

    def plan_rows(
        self, decision: Decision, description: m.RowDescription, formats: tuple[int, ...]
    ) -> RowRewriter | Refuse | None:
        return None

    def row_limit(self, decision: Decision) -> RowLimit | None:
        return None

    def unknown_portal(self) -> Decision:
        return ALLOW

    def plan_copy(
        self, decision: Decision, response: m.CopyResponse
    ) -> CopyRewriter | Refuse | None:
        return None

    def rows_sent(self, decision: Decision, rows: int) -> None:
        pass

    def check_parameter(self, name: str, value: str) -> Refuse | None:
        return None

    def scrub(self, decision: Decision | None, error: m.ErrorFields) -> m.ErrorFields | None:
        return None


class RefuseAll:
    """Fail closed: every statement refused, with the reason given."""

    def __init__(self, message: str, detail: str | None = None, hint: str | None = None) -> None:
        self.refusal = Refuse(FEATURE_NOT_SUPPORTED, message, detail, hint, reason="unsupported")

    needs_descriptions = True
    statement_timeout: float | None = None

    def judge_query(self, sql: str) -> Refuse | Allow | tuple[Decision, ...]:
        return self.refusal

    def judge_parse(self, sql: str, param_types: tuple[int, ...]) -> Decision:
        return self.refusal

    def judge_function_call(self, call: m.FunctionCall) -> Decision:
        return self.refusal

    def plan_rows(
        self, decision: Decision, description: m.RowDescription, formats: tuple[int, ...]
    ) -> RowRewriter | Refuse | None:
        return self.refusal  # never reached: every statement was refused

    def row_limit(self, decision: Decision) -> RowLimit | None:
        return RowLimit(0)

    def unknown_portal(self) -> Decision:
        return self.refusal

    def plan_copy(
        self, decision: Decision, response: m.CopyResponse
    ) -> CopyRewriter | Refuse | None:
        return self.refusal

    def rows_sent(self, decision: Decision, rows: int) -> None:
        pass

    def check_parameter(self, name: str, value: str) -> Refuse | None:
        return None

    def scrub(self, decision: Decision | None, error: m.ErrorFields) -> m.ErrorFields | None:
        return None


def _disagree(detail: str) -> Refuse:
    return Refuse(
        FEATURE_NOT_SUPPORTED,
        "topeng: the result does not match the analysis of the statement",
        detail=detail,
        hint="Select the columns you need by name from the tables themselves.",
        reason="unsupported",
    )


# Server parameters the analysis and the masks depend on, and the values they need: the parse of
# string literals (standard_conforming_strings), the text encoding, and the date/interval text
# formats the masks read.
REQUIRED_PARAMETERS = {
    "standard_conforming_strings": ("on",),
    "client_encoding": ("UTF8",),
    "DateStyle": ("ISO, MDY", "ISO, DMY", "ISO, YMD", "ISO"),
    "IntervalStyle": ("postgres",),
}

# Error fields that may carry values of rows (DETAIL: "Key (nik)=(...) already exists",
# "Failing row contains (...)"; WHERE: the context of the error).
_VALUE_FIELDS = frozenset({"D", "W"})
_QUOTED = re.compile(r'"[^"]*"')


def parameter_refusal(name: str, value: str) -> Refuse | None:
    """A session of a restricted role cannot go on with this parameter value."""
    allowed = REQUIRED_PARAMETERS.get(name)
    if allowed is None or value in allowed:
        return None
    return Refuse(
        FEATURE_NOT_SUPPORTED,
        f"topeng: {name} must be {allowed[0]} for a restricted role, not {value!r}",
        detail="Topeng reads statements and masks values assuming this setting",
        hint=f"Connect without changing {name} (it is set by the client, the role or "
        "the database).",
        reason="set",
    )


class RestrictedPolicy:
    """Judges one restricted session's statements and plans the masking of its results."""

    needs_descriptions = True

    def __init__(
        self,
        rules: Rules,
        role: Role,
        catalog: Catalog,
        search_path: tuple[str, ...],
        *,
        cache: AnalysisCache,
        hash_key: bytes,
        on_masked: Callable[[RowMasker], None] | None = None,
    ) -> None:
        self.rules = rules
        self.role = role
        self.catalog = catalog
        self.search_path = search_path
        self.cache = cache
        self.hash_key = hash_key
        self.on_masked = on_masked
        self.prepared: dict[str, Decision] = {}
        self.cursors: dict[str, Decision] = {}
        limit = role.max_rows_per_query
        self._row_limit = (
            RowLimit(limit, truncate=role.on_row_limit == "truncate") if limit else None
        )
        self._protected_cache: dict[tuple[int, int], tuple[str, str] | None] = {}
        timeout_ms = role.statement_timeout_ms
        self.statement_timeout: float | None = timeout_ms / 1000 if timeout_ms else None

    # -- statements

    def _judge(self, sql: str) -> Refuse | tuple[Decision, ...]:
        judged = judge_sql_with_facts(
            sql,
            self.catalog,
            self.search_path,
            self.rules,
            self.role,
            prepared=self.prepared,
            cursors=self.cursors,
            cache=self.cache,
        )
        if isinstance(judged, Refuse):
            return judged
        for facts, decision in judged:
            remember(facts, decision, self.prepared, self.cursors)
        return tuple(decision for _, decision in judged)

    def judge_query(self, sql: str) -> Refuse | Allow | tuple[Decision, ...]:
        return self._judge(sql)

    def judge_parse(self, sql: str, param_types: tuple[int, ...]) -> Decision:
        judged = self._judge(sql)
        if isinstance(judged, Refuse):
            return judged
        if len(judged) != 1:
            return Refuse(
                "42601",
                "cannot insert multiple commands into a prepared statement",
                reason="syntax",
            )
        return judged[0]

    def judge_function_call(self, call: m.FunctionCall) -> Decision:
        return Refuse(
            INSUFFICIENT_PRIVILEGE,
            f"topeng: the FunctionCall protocol message is not allowed for role {self.role.name!r}",
            detail=f"function OID {call.function_oid} called outside SQL",
            hint="Call the function in a SELECT statement instead.",
            reason="function",
        )

    def unknown_portal(self) -> Decision:
        return Refuse(
            FEATURE_NOT_SUPPORTED,
            "topeng: rows of a statement Topeng has not judged",
            detail="the portal was not bound through this session's protocol messages",
            hint="Prepare and bind the statement with the extended protocol, or run it as SQL.",
            reason="unsupported",
        )

    def row_limit(self, decision: Decision) -> RowLimit | None:
        return self._row_limit

    def rows_sent(self, decision: Decision, rows: int) -> None:
        pass

    def check_parameter(self, name: str, value: str) -> Refuse | None:
        return parameter_refusal(name, value)

    def scrub(self, decision: Decision | None, error: m.ErrorFields) -> m.ErrorFields | None:
        """Drop the fields of a server error that may carry row values; in a statement that
        read masked columns also blank quoted values in the message."""
        fields = error.fields
        masked = isinstance(decision, Mask)
        if not masked and not any(code in _VALUE_FIELDS for code, _ in fields):
            return None
        out = []
        for code, text in fields:
            if code in _VALUE_FIELDS:
                continue
            if masked and code == "M":
                text = _QUOTED.sub('"***"', text)
            out.append((code, text))
        return m.ErrorFields(tuple(out))

    def plan_copy(
        self, decision: Decision, response: m.CopyResponse
    ) -> CopyRewriter | Refuse | None:
        if isinstance(decision, Refuse):
            return decision
        if not isinstance(decision, Mask) or not decision.columns:
            return None
        # Masking COPY data needs the COPY's own format options (text, CSV, binary): until
        # the decision carries them, a masked COPY is refused rather than sent as it is.
        return Refuse(
            FEATURE_NOT_SUPPORTED,
            "topeng: COPY of masked columns is not supported yet",
            detail="the COPY selects columns that are masked for role " + repr(self.role.name),
            hint="SELECT the columns instead: they are returned masked.",
            reason="copy",
        )

    # -- results

    def _protection(self, table_oid: int, attnum: int) -> tuple[str, str] | None:
        """(label, policy kind) of the strictest protection of one base column, or None."""
        key = (table_oid, attnum)
        if key in self._protected_cache:
            return self._protected_cache[key]
        found: tuple[str, str] | None = None
        relation = self.catalog.relation(table_oid)
        column = relation.column(attnum) if relation is not None else None
        if relation is None or column is None:
            found = ("unknown", "deny")
        else:
            root = relation.root
            for label in self.rules.labels_for_column(root.schema, root.name, column.name):
                kind = self.rules.policy_for(self.role.name, label).kind
                if kind == "deny" or (kind == "mask" and found is None):
                    found = (label, kind)
        self._protected_cache[key] = found
        return found

    def plan_rows(
        self, decision: Decision, description: m.RowDescription, formats: tuple[int, ...]
    ) -> RowRewriter | Refuse | None:
        if isinstance(decision, Refuse):
            return decision
        masks = decision.columns if isinstance(decision, Mask) else {}
        fields = description.fields
        for index in masks:
            if index >= len(fields):
                return _disagree(f"the analysis masks column {index + 1} of {len(fields)}")
        maskers: dict[int, tuple[FieldMasker, str]] = {}
        for index, field in enumerate(fields):
            if field.table_oid and field.column > 0:
                protection = self._protection(field.table_oid, field.column)
                if protection is not None:
                    label, kind = protection
                    if kind == "deny" or index not in masks:
                        return _disagree(
                            f"column {index + 1} ({field.name}) comes from a column labelled "
                            f"{label}, which the analysis did not mask"
                        )
            elif field.table_oid and field.column == 0:
                return _disagree(f"column {index + 1} ({field.name}) is a whole row")
            spec = masks.get(index)
            if spec is None:
                continue
            fmt = formats[index] if index < len(formats) else 0
            try:
                masker = build_field_masker(
                    spec.mask,
                    dict(spec.params),
                    type_oid=field.type_oid,
                    typmod=field.type_modifier,
                    fmt=fmt,
                    hash_key=self.hash_key,
                )
            except MaskNotApplicable as exc:
                return Refuse(
                    INSUFFICIENT_PRIVILEGE,
                    f"topeng: column {field.name} (label {spec.label}) cannot be masked with "
                    f"{spec.mask}",
                    detail=str(exc),
                    hint="Ask your DBA to fix the mask of this label in the rules.",
                    reason="mask",
                )
            maskers[index] = (masker, spec.label)
        if not maskers:
            return None
        rewriter = RowMasker(maskers, len(fields))
        if self.on_masked is not None:
            self.on_masked(rewriter)
        return rewriter
