"""Statement policies the session consults, chosen per session once its role is known."""

from __future__ import annotations

from proxy.policy.decision import ALLOW, FEATURE_NOT_SUPPORTED, Allow, Decision, Refuse
from proxy.session import RowLimit, RowRewriter
from proxy.wire import messages as m


class AllowAll:
    """Tracks the protocol but changes nothing: for unrestricted sessions under `track_all`."""

    needs_descriptions = False

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


class RefuseAll:
    """Fail closed: every statement refused, with the reason given."""

    def __init__(self, message: str, detail: str | None = None, hint: str | None = None) -> None:
        self.refusal = Refuse(FEATURE_NOT_SUPPORTED, message, detail, hint, reason="unsupported")

    needs_descriptions = True

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
