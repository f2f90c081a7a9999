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

import functools
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from proxy.policy.analyze import StatementFacts, parse_statements
from proxy.policy.cache import AnalysisCache
from proxy.policy.catalog import Catalog
from proxy.policy.decide import judge_sql_with_facts, remember
from proxy.policy.decision import (
    ALLOW,
    FEATURE_NOT_SUPPORTED,
    INSUFFICIENT_PRIVILEGE,
    RATE_LIMIT,
    Allow,
    ColumnMask,
    Decision,
    Mask,
    Refuse,
)
from proxy.policy.fastmask import FastOp, fast_op, row_masker
from proxy.policy.limits import (
    HOUR,
    MINUTE,
    Exhausted,
    Limiter,
    count_lookups,
    counts_as_query,
    lookup_limits,
    reads_rows,
)
from proxy.policy.masks import (
    CopyMasker,
    FieldMasker,
    MaskCounts,
    MaskNotApplicable,
    build_copy_masker,
    build_field_masker,
)
from proxy.policy.rules import Role, Rules
from proxy.policy.template import Template, query_template
from proxy.session import UNLIMITED_GATE, CopyRewriter, GateBudget, RowLimit, RowRewriter
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

    generation = 0

    def judge_execute(self, sql: str, generation: int) -> tuple[Decision | None, int]:
        return None, 0

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

    generation = 0

    def judge_execute(self, sql: str, generation: int) -> tuple[Decision | None, int]:
        return self.refusal, 0

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


GATE_SHARE: Final = 8
"""A gated session holds 1/GATE_SHARE of what is left of each of its user's rates ahead."""
GATE_MIN_SHARE: Final = 4
"""No budget is held when a share would be smaller (statements or rows): near the end of a
user's budget every statement is judged in Python."""
GATE_MIN_SECONDS: Final = 1.0
"""No budget is held for a rate window that ends sooner than this."""


@dataclass(slots=True)
class _GateHold:
    """A budget charged ahead for the relay thread (RestrictedPolicy.reserve_gate): the
    charges (counter, amount, whether it counts rows) and what the thread used of them."""

    release: Callable[[], None]
    keys: tuple[str, ...]
    charges: list[tuple[tuple[str, int, int], int, bool]]
    queries: int = 0
    rows: int = 0


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
        on_masked: Callable[[MaskCounts], None] | None = None,
        limiter: Limiter | None = None,
        user: str | None = None,
        rules_source: Callable[[], Rules] | None = None,
    ) -> None:
        """`limiter` and `user` enable the per-user rate limits (max_rows_per_minute,
        max_rows_per_hour, max_queries_per_minute, max_lookups_per_minute); without a limiter
        they are not enforced; without a user they are counted per role (all users of the
        role share one budget: stricter, never looser).

        `rules_source` returns the rules in force: when they change (a reload), the next
        statement is judged by the new ones. The session keeps its role by name; a reload that
        removes the role refuses the session's further statements."""
        self.limiter = limiter
        self.user = user if user is not None else f"role:{role.name}"
        self.rules_source = rules_source
        self._gone: Refuse | None = None
        self.generation = 0  # counts the rules adopted: what a prepared statement was judged by
        self._adopt(rules, role)
        self.catalog = catalog
        self.search_path = search_path
        self.cache = cache
        self.hash_key = hash_key
        self.on_masked = on_masked
        self.prepared: dict[str, Decision] = {}
        self.cursors: dict[str, Decision] = {}
        # The last statements judged (as the analysis cache keeps them) and their decisions.
        self._last_judged: object = None
        self._last_decisions: tuple[Decision, ...] = ()
        # Facts of prepared statements' SQL, for charging rates at each Execute.
        self._executed: dict[str, tuple[StatementFacts, ...]] = {}
        self._hold: _GateHold | None = None  # the budget a gated session spends (reserve_gate)
        # A request the relay thread forwarded is being replayed (Session.replay_request): it
        # is judged by the rules and budget it was forwarded under, not judged again.
        self.replaying = False

    def _adopt(self, rules: Rules, role: Role) -> None:
        """Judge by these rules and this role from now on."""
        self.generation += 1
        self.rules = rules
        self.role = role
        self._lookup_labels = lookup_limits(rules, role.name)
        limit = role.max_rows_per_query
        self._row_limit = (
            RowLimit(limit, truncate=role.on_row_limit == "truncate") if limit else None
        )
        self._protected_cache: dict[tuple[int, int], tuple[str, str] | None] = {}
        # Results that pass unchanged under these rules: (description, decision) by their ids
        # and the formats (see plan_rows).
        self._passing: dict[
            tuple[int, int, tuple[int, ...]], tuple[m.RowDescription, Decision]
        ] = {}
        # Whether any rate of the role draws on statements: without one, nothing is charged
        # and an Execute needs no look at the statement's facts.
        self._row_rated = bool(role.max_rows_per_minute or role.max_rows_per_hour)
        self._rated = bool(role.max_queries_per_minute or self._row_rated or self._lookup_labels)
        timeout_ms = role.statement_timeout_ms
        self.statement_timeout: float | None = timeout_ms / 1000 if timeout_ms else None

    def _current(self) -> Refuse | None:
        """Follow a rules reload; a Refuse if the session's role is gone or now unrestricted."""
        source = self.rules_source
        if source is None or self.replaying:
            return self._gone  # (a replayed request was judged when the thread forwarded it)
        rules = source()
        if rules is self.rules:
            return self._gone
        name = self.role.name
        try:
            role = rules.role(name)
        except KeyError:
            role = None
        if role is None or role.unrestricted:
            # A restricted session never becomes unrestricted mid-way, nor guesses a new role.
            self.rules = rules
            self._passing = {}
            self._gone = Refuse(
                FEATURE_NOT_SUPPORTED,
                f"topeng: role {name!r} changed in the rules since this session started",
                detail="the rules were reloaded and no longer define this restricted role",
                hint="Reconnect: a new session gets a role from the current rules.",
                reason="unsupported",
            )
            return self._gone
        self._gone = None
        self._adopt(rules, role)
        return None

    # -- statements

    def _judge(self, sql: str, *, charge: bool = True) -> Refuse | tuple[Decision, ...]:
        gone = self._current()
        if gone is not None:
            return gone
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
        if self.limiter is not None and self._rated:
            refused = self._charge(sql, [facts for facts, _ in judged], commit=charge)
            if refused is not None:
                return refused
        if judged is self._last_judged:
            # The same statements as last time (a cache hit of the same shape, decided under
            # the same rules): the same decisions, and no name to remember.
            return self._last_decisions
        named = False
        for facts, decision in judged:
            if facts.name is not None:
                named = True
                remember(facts, decision, self.prepared, self.cursors)
        decisions = tuple([decision for _, decision in judged])
        if not named:
            self._last_judged, self._last_decisions = judged, decisions
        return decisions

    def judge_query(self, sql: str) -> Refuse | Allow | tuple[Decision, ...]:
        return self._judge(sql)

    def approve_query(self, sql: str) -> Refuse | Allow | tuple[Decision, ...]:
        """`judge_query` for the gate's approval of a query not run now: rates are checked,
        not charged."""
        return self._judge(sql, charge=False)

    def judge_parse(self, sql: str, param_types: tuple[int, ...]) -> Decision:
        # Checked now (an exhausted rate refuses the Parse), charged at each Execute.
        judged = self._judge(sql, charge=False)
        if isinstance(judged, Refuse):
            return judged
        if len(judged) != 1:
            return Refuse(
                "42601",
                "cannot insert multiple commands into a prepared statement",
                reason="syntax",
            )
        return judged[0]

    def judge_execute(self, sql: str, generation: int) -> tuple[Decision | None, int]:
        """Each execution of a prepared statement: judged again if the rules were reloaded
        since it was prepared (`generation`), and charged to the rates again. Returns the new
        decision (None: the prepared one stands; a Refuse: this execution is refused) and the
        generation it belongs to."""
        gone = self._current()
        if gone is not None:
            return gone, self.generation
        decision: Decision | None = None
        if generation != self.generation:
            decision = self.judge_parse(sql, ())
            if isinstance(decision, Refuse):
                return decision, self.generation
        if self.limiter is not None and self._rated:
            facts = self._execute_facts(sql)
            if facts is None:  # it was analysed at Parse; this is no rate question
                return decision, self.generation
            refused = self._charge(sql, list(facts), commit=True)
            if refused is not None:
                return refused, self.generation
        return decision, self.generation

    def _execute_facts(self, sql: str) -> tuple[StatementFacts, ...] | None:
        """The facts of a prepared statement's SQL under this session's catalog and path,
        looked up once per statement text (an Execute repeats the text exactly)."""
        found = self._executed.get(sql)
        if found is not None:
            return found
        try:
            facts = self.cache.analyze(sql, self.catalog, self.search_path)
        except Exception:
            return None
        if len(self._executed) >= 256:
            self._executed.clear()
        self._executed[sql] = facts
        return facts

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

    # -- rate limits

    def _row_windows(self) -> Iterator[tuple[str, int, int]]:
        """(rule, limit, window seconds) of the role's row rates."""
        if self.role.max_rows_per_minute:
            yield "max_rows_per_minute", self.role.max_rows_per_minute, MINUTE
        if self.role.max_rows_per_hour:
            yield "max_rows_per_hour", self.role.max_rows_per_hour, HOUR

    def _charge(
        self, sql: str, all_facts: list[StatementFacts], *, commit: bool = True
    ) -> Refuse | None:
        """Check every rate the statements draw on and, when all fit, charge the statements
        and lookups (rows are charged as they are sent). A refused string costs nothing."""
        limiter = self.limiter
        assert limiter is not None
        if self.replaying:
            return None  # the thread forwarded it on its budget: checked and charged there
        role = self.role
        queries = sum(1 for f in all_facts if counts_as_query(f))
        lookups: dict[str, int] = {}
        if self._lookup_labels:
            split: list[str] = []

            def text_of(index: int) -> str:
                if not split:
                    split.extend(t for t, _ in parse_statements(sql))
                return split[index] if len(split) == len(all_facts) else sql

            for index, facts in enumerate(all_facts):
                counted = count_lookups(
                    facts, self.rules, self._lookup_labels, functools.partial(text_of, index)
                )
                if isinstance(counted, Refuse):
                    return counted
                for label, n in counted.items():
                    lookups[label] = lookups.get(label, 0) + n
        qkey = f"queries:{self.user}"
        if queries and role.max_queries_per_minute:
            out = self._check(qkey, role.max_queries_per_minute, MINUTE, queries)
            if out is not None:
                return self._rate_refusal("max_queries_per_minute", "statements", out)
        if any(reads_rows(f) for f in all_facts):
            for rule, limit, window in self._row_windows():
                out = self._check(f"rows:{self.user}", limit, window, 1)
                if out is not None:
                    return self._rate_refusal(rule, "rows", out)
        for label, n in sorted(lookups.items()):
            limit = self._lookup_labels[label]
            out = limiter.check(f"lookups:{label}:{self.user}", limit, MINUTE, n)
            if out is not None:
                return self._lookup_refusal(label, n, out)
        if not commit:
            return None
        if queries and role.max_queries_per_minute:
            limiter.add(qkey, MINUTE, queries)
        for label, n in lookups.items():
            limiter.add(f"lookups:{label}:{self.user}", MINUTE, n)
        return None

    def _check(self, key: str, limit: int, window: int, amount: int) -> Exhausted | None:
        """`Limiter.check`; when it fails while gated sessions of this process hold part of
        the budget ahead, they give it back first and the check is made again."""
        limiter = self.limiter
        assert limiter is not None
        out = limiter.check(key, limit, window, amount)
        if out is not None and limiter.reclaim(key):
            out = limiter.check(key, limit, window, amount)
        return out

    def _rate_refusal(self, rule: str, what: str, out: Exhausted) -> Refuse:
        span = "minute" if out.window == MINUTE else "hour"
        return Refuse(
            RATE_LIMIT,
            f"topeng: {rule} ({out.limit} {what}) is exhausted for user {self.user} "
            f"(role {self.role.name}); retry in {out.retry_after} seconds",
            detail=f"{out.used} {what} in the last {span}, counted across all sessions of "
            f"the user; the limit is {out.limit} a {span}. Retry after {out.retry_after} s.",
            hint=f"wait {out.retry_after} seconds before the next statement, and fetch fewer "
            "rows per statement (a LIMIT, a narrower WHERE)",
            reason="rate_limit",
        )

    def _lookup_refusal(self, label: str, n: int, out: Exhausted) -> Refuse:
        return Refuse(
            RATE_LIMIT,
            f"topeng: max_lookups_per_minute ({out.limit}) for label {label} is exhausted for "
            f"user {self.user}; retry in {out.retry_after} seconds",
            detail=f"{out.used} lookups by {label} in the last minute across all sessions of "
            f"the user; this statement looks up {n} more (each value of an IN list counts). "
            f"Retry after {out.retry_after} s.",
            hint=f"wait {out.retry_after} seconds; to find many rows, filter on another column "
            f"instead of enumerating {label} values",
            reason="lookup_limit",
        )

    def row_limit(self, decision: Decision) -> RowLimit | None:
        limiter = self.limiter
        if limiter is None or not self._row_rated:
            return self._row_limit
        per_query = self.role.max_rows_per_query
        key = f"rows:{self.user}"
        while True:
            best: tuple[int, str, int, int] | None = None  # rows left, rule, limit, window
            for rule, limit, window in self._row_windows():
                left = limiter.remaining(key, limit, window)
                if best is None or left < best[0]:
                    best = (left, rule, limit, window)
            if best is None or (per_query is not None and per_query <= best[0]):
                return self._row_limit
            # Fewer rows left than a statement may return: holds of gated sessions count
            # as used; give them back before this statement is held to what is left.
            if not limiter.reclaim(key):
                break
        assert best is not None
        left, rule, limit, window = best
        out = limiter.check(f"rows:{self.user}", limit, window, left + 1)
        refusal = self._rate_refusal(
            rule, "rows", out or Exhausted(limit, window, limit - left, window)
        )
        refusal = Refuse(
            refusal.sqlstate,
            refusal.message,
            detail=f"The statement returned more rows than are left of the user's {rule} "
            f"({left} of {limit}); it was cancelled. " + (refusal.detail or ""),
            hint=refusal.hint,
            reason="rate_limit",
        )
        return RowLimit(left, refusal=refusal)

    def rows_sent(self, decision: Decision, rows: int) -> None:
        if self.limiter is None or rows <= 0 or not self._row_rated:
            return
        for _, _, window in self._row_windows():
            self.limiter.add(f"rows:{self.user}", window, rows)

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
        masker = plan_copy_masker(decision, response, self.catalog, self.hash_key, self.role.name)
        if self.on_masked is not None and not isinstance(masker, Refuse):
            self.on_masked(masker)
        return masker

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
        """The plan of one result. A result found to pass unchanged is remembered by the very
        description and decision objects (the session hands over one RowDescription object per
        distinct message) and the formats; the memo is emptied whenever the rules change, so a
        repeated statement is not checked again against the same rules, but every other one
        is."""
        if self.passes(decision, description, formats):
            return None
        planned = self._plan_rows(decision, description, formats)
        if planned is None:
            if len(self._passing) >= 128:
                self._passing.clear()
            # Holding both objects keeps their ids theirs while the entry lives.
            self._passing[(id(description), id(decision), formats)] = (description, decision)
        return planned

    def gateable(self) -> bool:
        """Whether the relay thread may run this role's approved statements on its own
        (proxy/relay.py, the gate): nothing per statement to time out, and no lookups to
        count (their count depends on the values). Statement and row rates are spent from a
        budget charged ahead (`reserve_gate`). Follows a rules reload first, so a statement
        judged by older rules is not approved."""
        if self._current() is not None:
            return False
        return not self._lookup_labels and self.statement_timeout is None

    def gate_row_limit(self) -> int:
        """The most rows one reply the relay thread forwards may hold (0: no limit): the
        role's max_rows_per_query. Rows per minute or hour are the budget's (reserve_gate):
        the thread forwards no reply with more rows than the budget has left."""
        return self.role.max_rows_per_query or 0

    def reserve_gate(self, release: Callable[[], None]) -> GateBudget | None:
        """The budget the relay thread may spend on this session's approved statements,
        charged to the user's rates now (see proxy/policy/limits.py, holds): a share of what
        is left of each rate (1/GATE_SHARE, so that the user's other sessions find room to
        hold theirs), until the rate window in force ends. None when that is not worth it now
        (a share under GATE_MIN_SHARE, or the window ends within GATE_MIN_SECONDS): the
        statements are then judged here, one by one. `release` takes the session back from the
        thread, for another session of the user that needs the budget; it must end in
        `end_gate`, which gives back what was not used."""
        self.end_gate()
        limiter = self.limiter
        role = self.role
        if limiter is None or not self._rated:
            return UNLIMITED_GATE
        qkey, rkey = f"queries:{self.user}", f"rows:{self.user}"
        counters = [(qkey, limit, MINUTE) for limit in (role.max_queries_per_minute,) if limit]
        counters += [(rkey, limit, window) for _, limit, window in self._row_windows()]
        seconds = min(limiter.seconds_left(window) for _, _, window in counters)
        if seconds < GATE_MIN_SECONDS:
            return None
        shares = {qkey: -1, rkey: -1}  # the least share of each key's windows; -1: no limit
        for key, limit, window in counters:
            share = limiter.remaining(key, limit, window) // GATE_SHARE
            if share < GATE_MIN_SHARE:
                return None
            shares[key] = share if shares[key] < 0 else min(shares[key], share)
        charges = []
        for key, _, window in counters:
            slot = limiter.slot(key, window)
            limiter.charge(slot, shares[key])
            charges.append((slot, shares[key], key == rkey))
        hold = _GateHold(release, tuple(dict.fromkeys(key for key, _, _ in counters)), charges)
        for key in hold.keys:
            limiter.hold(key, release)
        self._hold = hold
        return GateBudget(shares[qkey], shares[rkey], seconds)

    def gate_ran(self, decision: Decision, runs: int, rows: int) -> None:
        """The relay thread ran `runs` statements of this session, which sent `rows` rows:
        spent from the budget held, or charged now if there is none."""
        hold = self._hold
        if hold is None:
            self.rows_sent(decision, rows)
            return
        hold.queries += runs
        hold.rows += rows

    def end_gate(self, in_flight: bool = False) -> None:
        """The session is back from the relay thread: what its budget held and it did not
        use is given back, to the windows it was charged to (so what stays charged is what
        was used, when it was used). `in_flight`: it came back with a request it forwarded,
        which stays charged (its replay is not charged again; its rows are, as they come)."""
        hold, limiter = self._hold, self.limiter
        if hold is None or limiter is None:
            return
        self._hold = None
        hold.queries += in_flight
        for key in hold.keys:
            limiter.unhold(key, hold.release)
        for slot, amount, is_rows in hold.charges:
            limiter.charge(slot, (hold.rows if is_rows else hold.queries) - amount)

    def query_template(self, sql: str) -> Template | None:
        """The template of a simple query whose facts the analysis cache shares by shape
        (proxy/policy/template.py), for the gate; None if it has none."""
        cache = self.cache
        if cache is None:
            return None
        normalized = cache.shared_shape(sql, self.catalog, self.search_path)
        return None if normalized is None else query_template(sql, normalized)

    def passes(
        self, decision: Decision, description: m.RowDescription, formats: tuple[int, ...]
    ) -> bool:
        """Whether plan_rows found, under the rules in force, that these rows pass unchanged
        (it then says so again without looking). Asks nothing new: False when not known."""
        known = self._passing.get((id(description), id(decision), formats))
        return known is not None and known[0] is description and known[1] is decision

    def _plan_rows(
        self, decision: Decision, description: m.RowDescription, formats: tuple[int, ...]
    ) -> RowRewriter | Refuse | None:
        if isinstance(decision, Refuse):
            return decision
        masks = decision.columns if isinstance(decision, Mask) else {}
        fields = description.fields
        for index in masks:
            if index >= len(fields):
                return _disagree(f"the analysis masks column {index + 1} of {len(fields)}")
        maskers: dict[int, tuple[FieldMasker, str, FastOp | None]] = {}
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
            built = _column_masker(
                spec, field.name, field.type_oid, field.type_modifier, fmt, self.hash_key
            )
            if isinstance(built, Refuse):
                return built
            masker, op = built
            maskers[index] = (masker, spec.label, op)
        if not maskers:
            return None
        rewriter = row_masker(maskers, len(fields))
        if self.on_masked is not None:
            self.on_masked(rewriter)
        return rewriter


def _column_masker(
    spec: ColumnMask, column: str, type_oid: int, typmod: int, fmt: int, hash_key: bytes
) -> tuple[FieldMasker, FastOp | None] | Refuse:
    """The masker of one masked column of a result or a COPY, with its form for the C loop;
    or the refusal when the mask cannot apply to the column's type (fail closed)."""
    params = dict(spec.params)
    try:
        masker = build_field_masker(
            spec.mask, params, type_oid=type_oid, typmod=typmod, fmt=fmt, hash_key=hash_key
        )
    except MaskNotApplicable as exc:
        return Refuse(
            INSUFFICIENT_PRIVILEGE,
            f"topeng: column {column} (label {spec.label}) cannot be masked with {spec.mask}",
            detail=str(exc),
            hint="Ask your DBA to fix the mask of this label in the rules.",
            reason="mask",
        )
    return masker, fast_op(spec.mask, params, type_oid=type_oid, typmod=typmod, fmt=fmt)


def _copy_refusal(detail: str, role: str) -> Refuse:
    return Refuse(
        FEATURE_NOT_SUPPORTED,
        "topeng: this COPY of masked columns cannot be masked safely, so it is refused",
        detail=f"{detail} (role {role})",
        hint="SELECT the columns instead: they are returned masked.",
        reason="copy",
    )


def plan_copy_masker(
    decision: Mask, response: m.CopyResponse, catalog: Catalog, hash_key: bytes, role: str
) -> CopyMasker | Refuse:
    """The masker of a COPY TO STDOUT (copy_out: mask), in the COPY's own format; the masked
    columns' types come from the catalog (CopyOutResponse carries none). Fail closed."""
    copy = decision.copy
    if copy is None:
        return _copy_refusal("the decision carries no COPY format", role)
    binary = copy.format == "binary"
    if response.format != (1 if binary else 0):
        return _copy_refusal(
            f"the server sends format {response.format} for a {copy.format} COPY", role
        )
    count = copy.column_count
    if count is None or (response.column_formats and len(response.column_formats) != count):
        return _disagree(
            f"the COPY sends {len(response.column_formats)} columns where the analysis expects "
            f"{count}"
        )
    sources = dict(copy.sources)
    maskers: dict[int, tuple[FieldMasker, str]] = {}
    for index, spec in sorted(decision.columns.items()):
        refs = sources.get(index, ())
        types = {
            (col.type_oid, col.typmod)
            for ref in refs
            if (col := catalog.column(ref[0], ref[1])) is not None
        }
        if not refs or len(types) != 1 or index >= count:
            return _copy_refusal(f"the type of masked column {index + 1} is not known", role)
        ((type_oid, typmod),) = types
        built = _column_masker(spec, str(index + 1), type_oid, typmod, 1 if binary else 0, hash_key)
        if isinstance(built, Refuse):
            return built
        masker, _ = built  # COPY data is masked in Python (its formats are not DataRows)
        maskers[index] = (masker, spec.label)
    try:
        return build_copy_masker(
            copy.format,
            maskers,
            column_count=count,
            delimiter=copy.delimiter,
            quote=copy.quote,
            escape=copy.escape,
            null=copy.null,
            header=copy.header,
        )
    except ValueError as exc:
        return _copy_refusal(str(exc), role)
