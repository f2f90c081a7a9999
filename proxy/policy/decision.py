"""The closed set of outcomes of judging one statement for one role.

`Allow` forwards the statement untouched; `Refuse` answers the client with an ErrorResponse
and forwards nothing; `Mask` forwards the statement and rewrites the named result columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# SQLSTATEs of the refusals Topeng itself sends (DESIGN.md, "What a refused client sees").
INSUFFICIENT_PRIVILEGE = "42501"
FEATURE_NOT_SUPPORTED = "0A000"
PROGRAM_LIMIT_EXCEEDED = "54000"
CONFIGURATION_LIMIT_EXCEEDED = "53400"
RATE_LIMIT = CONFIGURATION_LIMIT_EXCEEDED


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
class CopyFormat:
    """The data format of a `COPY ... TO STDOUT`, as its options say (None: PostgreSQL's
    default for the format), and what masking its data needs beyond the ColumnMasks.

    `sources` maps each masked output column (0-based) to the base columns, (relation OID,
    attnum), its values come from: COPY sends no column types, so the masker takes them from
    the catalog. `unsupported` names an option the masker cannot honour (then the COPY of
    masked columns is refused); `column_count` is the number of columns each row has.
    """

    format: Literal["text", "csv", "binary"] = "text"
    delimiter: str | None = None
    quote: str | None = None
    escape: str | None = None
    null: str | None = None
    header: bool = False
    column_count: int | None = None
    sources: tuple[tuple[int, tuple[tuple[int, int], ...]], ...] = ()
    unsupported: str | None = None


@dataclass(frozen=True, slots=True)
class Mask:
    """Forward, and rewrite the output columns named by position (0-based). `copy` is set for
    a COPY TO STDOUT whose data is masked (copy_out: mask)."""

    columns: dict[int, ColumnMask] = field(default_factory=dict)
    copy: CopyFormat | None = None


Decision = Allow | Refuse | Mask

ALLOW = Allow()
