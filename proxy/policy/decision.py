"""The closed set of outcomes of judging one statement for one role.

`Allow` forwards the statement untouched; `Refuse` answers the client with an ErrorResponse
and forwards nothing; `Mask` forwards the statement and rewrites the named result columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# SQLSTATEs of the refusals Topeng itself sends (DESIGN.md, "What a refused client sees").
INSUFFICIENT_PRIVILEGE = "42501"
FEATURE_NOT_SUPPORTED = "0A000"
PROGRAM_LIMIT_EXCEEDED = "54000"
CONFIGURATION_LIMIT_EXCEEDED = "53400"


@dataclass(frozen=True, slots=True)
class Allow:
    """Forward as it is; nothing in the result needs changing."""


@dataclass(frozen=True, slots=True)
class Refuse:
    """Answer with an ErrorResponse; the statement never reaches the server."""

    sqlstate: str
    message: str
    detail: str | None = None
    hint: str | None = None
    reason: str = "policy"  # low-cardinality label for topeng_refusals_total


@dataclass(frozen=True, slots=True)
class ColumnMask:
    """How one output column is masked: a mask name, its parameters and the label it protects."""

    label: str
    mask: str
    params: tuple[tuple[str, object], ...] = ()


@dataclass(frozen=True, slots=True)
class Mask:
    """Forward, and rewrite the output columns named by position (0-based)."""

    columns: dict[int, ColumnMask] = field(default_factory=dict)


Decision = Allow | Refuse | Mask

ALLOW = Allow()
