"""Second lines of defence of a restricted session: server parameters it depends on, and server
errors and notices scrubbed of values."""

from __future__ import annotations

from typing import Any

import pytest
from wirekit import (
    MASK_MARKER,
    MarkerPolicy,
    data_row,
    error,
    param_status,
    query,
    ready,
    ready_session,
    row_desc,
)

from proxy.policy.decision import ALLOW, ColumnMask, Decision, Mask, Refuse
from proxy.policy.engine import RestrictedPolicy, parameter_refusal
from proxy.session import SessionRefused
from proxy.wire import messages as m


@pytest.mark.parametrize(
    ("name", "value", "ok"),
    [
        ("standard_conforming_strings", "on", True),
        ("standard_conforming_strings", "off", False),
        ("client_encoding", "UTF8", True),
        ("client_encoding", "LATIN1", False),
        ("DateStyle", "ISO, MDY", True),
        ("DateStyle", "SQL, DMY", False),
        ("IntervalStyle", "postgres", True),
        ("IntervalStyle", "iso_8601", False),
        ("application_name", "anything", True),
        ("TimeZone", "Asia/Jakarta", True),
    ],
)
def test_parameters_a_restricted_session_depends_on(name: str, value: str, ok: bool) -> None:
    refusal = parameter_refusal(name, value)
    assert (refusal is None) == ok
    if refusal is not None:
        assert refusal.message.startswith("topeng:") and name in refusal.message


def _scrub(decision: Decision | None, fields: tuple[tuple[str, str], ...]) -> Any:
    # scrub() uses nothing of the policy's state
    return RestrictedPolicy.scrub(object(), decision, m.ErrorFields(fields))  # type: ignore[arg-type]


def test_scrub_drops_detail_and_context_that_may_hold_row_values() -> None:
    fields = (
        ("S", "ERROR"), ("C", "23505"),
        ("M", 'duplicate key value violates unique constraint "customers_nik_key"'),
        ("D", "Key (nik)=(3273014501900001) already exists."), ("W", "SQL statement ..."),
        ("H", "a hint"),
    )  # fmt: skip
    scrubbed = _scrub(ALLOW, fields)
    codes = [code for code, _ in scrubbed.fields]
    assert "D" not in codes and "W" not in codes
    assert scrubbed.get("H") == "a hint"
    assert "customers_nik_key" in scrubbed.message  # quoted names kept when nothing is masked


def test_scrub_blanks_quoted_values_in_a_statement_that_reads_masked_columns() -> None:
    fields = (("S", "ERROR"), ("C", "22P02"), ("M", 'invalid input syntax: "3273014501900001"'))
    masked = Mask({0: ColumnMask("nik", "partial")})
    scrubbed = _scrub(masked, fields)
    assert "3273014501900001" not in scrubbed.message
    assert scrubbed.sqlstate == "22P02"


def test_scrub_leaves_plain_errors_alone() -> None:
    fields = (("S", "ERROR"), ("C", "42P01"), ("M", 'relation "nope" does not exist'))
    assert _scrub(ALLOW, fields) is None


class GuardedPolicy(MarkerPolicy):
    def check_parameter(self, name: str, value: str) -> Refuse | None:
        return parameter_refusal(name, value)

    def scrub(self, decision: Decision | None, error: m.ErrorFields) -> m.ErrorFields | None:
        self.scrubbed.append(decision)
        return m.ErrorFields(tuple((c, "X" if c == "D" else t) for c, t in error.fields))

    def __init__(self) -> None:
        super().__init__()
        self.scrubbed: list[Decision | None] = []


def test_a_parameter_change_mid_session_ends_it() -> None:
    pb = ready_session(GuardedPolicy())
    pb.to_server(query("SELECT 1"))
    with pytest.raises(SessionRefused) as caught:
        pb.server(param_status("standard_conforming_strings", "off"))
    assert caught.value.refusal.sqlstate == "0A000"


def test_a_harmless_parameter_change_passes() -> None:
    pb = ready_session(GuardedPolicy())
    out = pb.to_client(param_status("application_name", "psql"))
    assert out == param_status("application_name", "psql")


def test_server_errors_and_notices_go_through_scrub_with_their_statement() -> None:
    policy = GuardedPolicy()
    pb = ready_session(policy)
    sql = f"SELECT nik FROM customer /* {MASK_MARKER} */"
    pb.to_server(query(sql))
    notice = m.ErrorFields((("S", "NOTICE"), ("C", "00000"), ("M", "n"), ("D", "v"))).encode_as(
        b"N"
    )
    out = pb.to_client(
        row_desc("nik"), notice, data_row("1"), error("22012", "boom", detail="value"), ready("I")
    )
    assert b"value" not in out and b"\0Dv\0" not in out
    assert all(isinstance(d, Mask) for d in policy.scrubbed) and len(policy.scrubbed) == 2
