"""The masking loop in C: the same output as `masks.RowMasker`, a fraction of the CPU.

Strategy: `row_masker()` builds the rewriter of a masked result. When the C module
`proxy.policy._splice` is built (setuptools compiles it at install; a missing compiler leaves it
out) it returns a `SplicedRowMasker`, else the Python `RowMasker`. The C loop walks the
DataRows, and for the masks that have a text-level form it masks the values itself:

- `partial`, `redact`, `email` on text, varchar(n), char(n) and name, either format (their
  binary form is their text);
- `round` on integers and numerics in text format, with an integral `to`;
- `null`.

It does this only for values in the plain form PostgreSQL sends (ASCII text; numbers of at most
18 digits); every other value, and every other mask, goes to the column's Python masker, so the
two implementations agree byte for byte (tests/unit/test_fastmask.py checks it on random rows).
`TOPENG_PURE_PYTHON=1` in the environment turns the C module off.
"""

from __future__ import annotations

import decimal
from collections.abc import Mapping
from types import ModuleType
from typing import Final

from proxy import native
from proxy.policy import pgtypes as pt
from proxy.policy.masks import FieldMasker, MaskedCounter, RowMasker
from proxy.policy.pgtypes import Kind
from proxy.wire.framing import ProtocolViolation

__all__ = [
    "AVAILABLE",
    "FastOp",
    "MaskingRewriter",
    "SplicedRowMasker",
    "fast_op",
    "row_masker",
]


def _load() -> ModuleType | None:
    module = native.load("proxy.policy._splice")
    if module is not None:
        module.set_error(ProtocolViolation)
    return module


_splice: Final = _load()
AVAILABLE: Final = _splice is not None
"""Whether the C masking loop is in use (`topeng serve` logs it at start)."""

FastOp = tuple[int, int, int, int, int, int, int, int, int, int]
"""(op, strip, fit, n, first, last, fill, step, lo, hi): a mask's text-level form for C."""

# The op and fit codes of _splice.c.
_OP_NULL, _OP_PARTIAL, _OP_REDACT, _OP_EMAIL, _OP_ROUND_INT, _OP_ROUND_NUMERIC = 2, 3, 4, 5, 6, 7
_FIT_NONE, _FIT_CUT, _FIT_PAD = 0, 1, 2
_OP_CALL: Final[FastOp] = (1, 0, 0, -1, 0, 0, ord("*"), 0, 0, 0)
_MAX_KEEP: Final = 1 << 40  # longer than any field (1 GB), so clamping changes nothing
_MAX_STEP: Final = (1 << 63) - 1


def fast_op(
    mask: str, params: Mapping[str, object], *, type_oid: int, typmod: int, fmt: int
) -> FastOp | None:
    """The C form of a mask already accepted by `build_field_masker`, or None (Python only)."""
    if mask == "null":
        return (_OP_NULL, 0, 0, -1, 0, 0, ord("*"), 0, 0, 0)
    t = pt.type_info(type_oid)
    if t is None:
        return None
    if t.kind is Kind.STRING and mask in ("partial", "redact", "email"):
        return _string_op(mask, params, type_oid, typmod)
    if mask == "round" and fmt == 0 and t.kind in (Kind.INT, Kind.OID, Kind.NUMERIC):
        step = _integral_step(params.get("to"))
        if step is None:
            return None
        if t.kind is Kind.NUMERIC:
            return (_OP_ROUND_NUMERIC, 0, 0, -1, 0, 0, ord("*"), step, 0, 0)
        lo, hi = pt.int_range(type_oid)
        return (_OP_ROUND_INT, 0, 0, -1, 0, 0, ord("*"), step, lo, hi)
    return None


def _string_op(mask: str, params: Mapping[str, object], oid: int, typmod: int) -> FastOp | None:
    fill = params.get("char", "*")
    if not isinstance(fill, str) or len(fill) != 1 or not 0 < ord(fill) < 0x80:
        return None
    fit, n = _FIT_NONE, -1
    if oid == pt.BPCHAR and (length := pt.bpchar_length(typmod)) is not None:
        fit, n = _FIT_PAD, length
    elif oid == pt.VARCHAR and (length := pt.varchar_length(typmod)) is not None:
        fit, n = _FIT_CUT, length
    elif oid == pt.NAME:
        fit, n = _FIT_CUT, pt.NAME_MAX_BYTES
    # char(n) values are masked without their padding (redact replaces the padding too)
    strip = int(oid == pt.BPCHAR and mask != "redact")
    if mask == "partial":
        first, last = _keep(params, "keep_first"), _keep(params, "keep_last")
        return (_OP_PARTIAL, strip, fit, n, first, last, ord(fill), 0, 0, 0)
    op = _OP_REDACT if mask == "redact" else _OP_EMAIL
    return (op, strip, fit, n, 0, 0, ord(fill), 0, 0, 0)


def _keep(params: Mapping[str, object], name: str) -> int:
    value = params.get(name, 0)
    return min(value, _MAX_KEEP) if isinstance(value, int) else 0


def _integral_step(to: object) -> int | None:
    if isinstance(to, bool) or not isinstance(to, int | float | decimal.Decimal):
        return None
    step = decimal.Decimal(str(to))
    if not step.is_finite() or step <= 0 or step != step.to_integral_value():
        return None
    value = int(step)
    return value if value <= _MAX_STEP else None


class SplicedRowMasker(MaskedCounter):
    """`RowMasker`'s interface over the C plan (`_splice.Plan`), which counts rows and NULLs."""

    __slots__ = ("_plan", "row", "run")

    def __init__(
        self, maskers: Mapping[int, tuple[FieldMasker, str, FastOp | None]], columns: int
    ) -> None:
        super().__init__({i: label for i, (_, label, _) in maskers.items()}, columns)
        assert _splice is not None
        fields: list[tuple[object, ...] | None] = []
        for i in range(max(maskers, default=-1) + 1):
            if i not in maskers:
                fields.append(None)
                continue
            call, _, op = maskers[i]
            code = op if op is not None else _OP_CALL
            fields.append((code[0], call, *code[1:]))
        self._plan = _splice.Plan(columns, tuple(fields))
        self.row = self._plan.row
        self.run = self._plan.run

    def __call__(self, body: memoryview) -> bytes:
        """The whole new DataRow message (type byte, length, body) for a DataRow body."""
        out: bytes = self.row(body)
        return out

    def _collect(self) -> None:
        rows, nulls = self._plan.take()
        self._rows += rows
        for i, n in enumerate(nulls):
            self._nulls[i] += n


MaskingRewriter = RowMasker | SplicedRowMasker
"""The rewriter of a masked result, in Python or in C."""


def row_masker(
    maskers: Mapping[int, tuple[FieldMasker, str, FastOp | None]], columns: int
) -> MaskingRewriter:
    """The rewriter of a masked result: in C when the module is built, else in Python."""
    if _splice is not None:
        return SplicedRowMasker(maskers, columns)
    return RowMasker({i: (call, label) for i, (call, label, _) in maskers.items()}, columns)
