"""Masks: rewrite protected values in DataRows and COPY output, keeping every column's type valid.

Strategy: all the thinking happens once, when a result's masking plan is built.
`build_field_masker(mask, params, type_oid=, typmod=, fmt=, hash_key=)` checks that the mask
applies to the column's type (else `MaskNotApplicable`, and the caller fails closed), folds the
parameters, the type's length limit (varchar(n), char(n), name) and the wire format into one
closure, `FieldMasker(memoryview) -> bytes | None`, and precomputes what it can (a constant's
bytes). Per value, a masker decodes only its own field, applies the mask to a Python value and
encodes the result in the same format. `RowMasker` walks a DataRow's length words, calls the
maskers of the masked columns and splices every other field's bytes through untouched, in one
`bytes.join`. `build_copy_masker` does the same for `COPY (query) TO STDOUT` data in text, CSV
and binary formats, buffering partial rows across CopyData messages.

Decisions, per mask (the type rules are in `_KIND_MASKS` below; anything else is refused with
`MaskNotApplicable` at build time, which `mask_applies` reports for `topeng check`):

- `null`: SQL NULL, for every type (an array becomes NULL as a whole).
- `partial` (keep_first, keep_last, char): strings keep the first/last characters and replace
  the rest with `char`, length kept; char(n) works on the value without its padding and pads
  again. If keep_first + keep_last would show the whole value, everything is replaced: a short
  value is never shown in full. Integers and numerics: the same on the decimal digits, the
  hidden digits become `char` if it is a digit, else 0 (integers fall back to 0 when a `9` would
  overflow the type); sign, decimal point and scale are kept, so numeric(15,2) stays valid.
  floats: the same on the digits of the shortest text form. uuid: on the 32 hex digits, hidden
  ones 0 (or `char` if it is a hex digit). bytea: bytewise. json/jsonb: the document's text, sent
  as a JSON string. "char": always replaced. Not for bool, dates, times, intervals, xml.
- `redact` (char): strings: every character (char(n): padding too) becomes `char`, length kept;
  bytea: every byte; numbers: 0 (numeric keeps its scale: 0.00); uuid: the nil uuid;
  json/jsonb: a JSON string of `char` as long as the document; xml: `char`s (plain content);
  bool, date, time, timestamp(tz), interval: NULL (no value of those types hides anything).
- `hash`: HMAC-SHA256 with the rules' key over a canonical form of the value (char(n) without
  padding, numerics normalized, timestamptz as UTC), so equal values give equal outputs in both
  formats and across text/varchar/char columns. Strings of digits (optionally with `+-(). /`
  separators, e.g. a NIK or a phone number) keep their form: each digit is replaced by a hash
  digit. Other strings become lower-case hex: 32 characters, cut to varchar(n), exactly n for
  char(n). Integers: a non-negative integer of the same type; numerics: the same number of
  digits and the same scale; floats: a non-negative integer-valued float; date/timestamp: a
  date (and time, whole seconds) between 1900 and 2050; time: a time of day; uuid: a version-4
  uuid; bytea: 32 bytes; json/jsonb: a JSON string of 32 hex digits; xml: 32 hex digits.
- `email`: strings only: the local part becomes its first character and `***` (`*` alone for a
  one-character local part), the domain is kept: budi.santoso@gmail.com -> b***@gmail.com; fewer
  stars when the column's length limit requires. A value without `@` is redacted with `*`.
  json/jsonb: the document text, as a JSON string.
- `round` (to): integers, numerics, floats: towards zero to a multiple of `to` (so it never
  overflows and -1.5M rounds to -1M), numerics keep their scale (12345678.90 -> 12000000.00),
  integer columns need an integral `to`. date, timestamp, timestamptz: to the start of the
  `month` or `year` (timestamptz in text format: in the UTC offset the value was shown with;
  in binary: in UTC). NaN and +-infinity stay as they are.
- `fake` (kind): strings (and json/jsonb as a JSON string): a realistic Indonesian name,
  address, city, phone or e-mail (`proxy.policy.fakedata`), chosen by the value's HMAC, so it is
  deterministic; shortened to fit varchar(n)/char(n).
- `constant` (value): validated and converted to the column's type when the masker is built
  (a string is read as the type's text input; a number, date or datetime is converted; for
  json/jsonb a string that is not JSON becomes a JSON string); too long for varchar(n)/char(n),
  out of range, or not convertible: `MaskNotApplicable`. `value: null` gives NULL.

Arrays of the supported types are masked element by element (NULL elements stay NULL).
A value a masker cannot read (malformed for its type, which PostgreSQL never sends) becomes
NULL: fail closed, never the original. NULL itself is never passed to a masker.
"""

from __future__ import annotations

import decimal
import hmac
import json
import math
import re
import struct
import uuid as uuidlib
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime, time, timedelta
from typing import Final, Literal, Protocol, TypeVar

from proxy.policy import fakedata
from proxy.policy import pgtypes as pt
from proxy.policy.pgtypes import Kind
from proxy.wire.framing import ProtocolViolation

__all__ = [
    "MASK_NAMES",
    "CopyMasker",
    "MaskCounts",
    "MaskedCounter",
    "FieldMasker",
    "MaskNotApplicable",
    "RowMasker",
    "build_copy_masker",
    "build_field_masker",
    "mask_applies",
]

_T = TypeVar("_T")

FieldMasker = Callable[[memoryview], bytes | None]
"""Masks one non-NULL field value (in the column's format); returns the new value or None."""

MASK_NAMES: Final = ("partial", "redact", "null", "hash", "email", "round", "fake", "constant")

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_HEAD = struct.Struct("!cI")
_F32 = struct.Struct("!f")
_NULL_LEN: Final = b"\xff\xff\xff\xff"
_EPOCH_DT: Final = datetime(2000, 1, 1)
_DAY_US: Final = pt.USECS_PER_DAY
_HASH_DATE_FROM: Final = pt.date_from_ymd(1900, 1, 1)
_HASH_DATE_SPAN: Final = pt.date_from_ymd(2050, 1, 1) - _HASH_DATE_FROM
_HEX_HASH_LEN: Final = 32
_DIGITISH: Final = re.compile(r"[0-9 +\-().\/]*[0-9][0-9 +\-().\/]*", re.ASCII)
_NOT_DIGIT: Final = re.compile(r"[^0-9]", re.ASCII)


class MaskNotApplicable(ValueError):
    """A mask cannot apply to a column's type (or its parameters do not fit the column)."""


# Which masks apply to which kinds of type; the rest are refused at build time.
_STRINGY: Final = frozenset({Kind.STRING, Kind.JSON, Kind.JSONB})
_NUMBERS: Final = frozenset({Kind.INT, Kind.OID, Kind.NUMERIC, Kind.FLOAT})
_TEMPORAL: Final = frozenset({Kind.DATE, Kind.TIMESTAMP, Kind.TIMESTAMPTZ})
_KIND_MASKS: Final[Mapping[str, frozenset[Kind]]] = {
    "partial": _STRINGY | _NUMBERS | {Kind.UUID, Kind.BYTEA, Kind.CHAR},
    "redact": frozenset(Kind) - {Kind.ARRAY},
    "hash": _STRINGY
    | _NUMBERS
    | _TEMPORAL
    | {Kind.TIME, Kind.UUID, Kind.BYTEA, Kind.CHAR, Kind.XML},
    "email": _STRINGY,
    "round": _NUMBERS | _TEMPORAL,
    "fake": _STRINGY,
    "constant": frozenset(Kind) - {Kind.ARRAY},
}
_SUGGEST: Final = {
    "email": "it applies to text, varchar, char(n) and json columns",
    "fake": "it applies to text, varchar, char(n) and json columns",
    "round": "it applies to numbers (to: a number) and dates/timestamps (to: month or year)",
    "partial": "use redact, hash, null or constant instead",
    "hash": "use redact, null or constant instead",
}


# --------------------------------------------------------------------------------------------
# Building field maskers


def mask_applies(
    mask: str, params: Mapping[str, object], type_oid: int, typmod: int = -1
) -> str | None:
    """None if `mask` with `params` applies to the type, else why not (for `topeng check`)."""
    try:
        for fmt in (0, 1):
            build_field_masker(
                mask, params, type_oid=type_oid, typmod=typmod, fmt=fmt, hash_key=b"check"
            )
    except MaskNotApplicable as exc:
        return str(exc)
    return None


def build_field_masker(
    mask: str,
    params: Mapping[str, object],
    *,
    type_oid: int,
    typmod: int,
    fmt: int,
    hash_key: bytes,
) -> FieldMasker:
    """A masker for the values of one result column; raises MaskNotApplicable if it cannot be.

    `fmt` is the column's format code (0 text, 1 binary); `typmod` comes from RowDescription.
    """
    if fmt not in (0, 1):
        raise MaskNotApplicable(f"unknown format code {fmt}")
    if mask not in MASK_NAMES:
        raise MaskNotApplicable(f"unknown mask '{mask}'")
    if mask == "null":
        return _null
    t = pt.type_info(type_oid)
    if t is None:
        raise MaskNotApplicable(
            f"mask '{mask}' cannot be applied to a column of type OID {type_oid}, which Topeng "
            "does not know; use mask null"
        )
    if t.kind is Kind.ARRAY:
        elem = build_field_masker(
            mask, params, type_oid=t.elem_oid, typmod=typmod, fmt=fmt, hash_key=hash_key
        )
        return _array_masker(elem, t.elem_oid, fmt)
    if t.kind not in _KIND_MASKS[mask]:
        hint = _SUGGEST.get(mask, "use null or constant instead")
        raise MaskNotApplicable(f"mask '{mask}' does not apply to {t.name} columns; {hint}")
    spec = _Spec(t, typmod, fmt, hash_key, params)
    if mask == "constant":
        return _constant(spec)
    builder = _VALUE_MASKS[mask]
    return _guard(builder(spec))


def _null(value: memoryview) -> bytes | None:
    return None


class _Spec:
    """Everything a builder needs to know about the column."""

    __slots__ = ("t", "kind", "oid", "typmod", "fmt", "key", "params")

    def __init__(
        self, t: pt.PgType, typmod: int, fmt: int, key: bytes, params: Mapping[str, object]
    ) -> None:
        self.t = t
        self.kind = t.kind
        self.oid = t.oid
        self.typmod = typmod
        self.fmt = fmt
        self.key = key
        self.params = params

    def char(self) -> str:
        c = self.params.get("char", "*")
        if not isinstance(c, str) or len(c) != 1:
            raise MaskNotApplicable(f"char must be a single character, got {c!r}")
        return c

    def int_param(self, name: str) -> int:
        v = self.params.get(name, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise MaskNotApplicable(f"{name} must be an integer >= 0, got {v!r}")
        return v

    def decode(self) -> Callable[[memoryview], object]:
        oid = self.oid
        if self.fmt == 0:
            return lambda v: pt.decode_text(oid, v)
        return lambda v: pt.decode_binary(oid, v)

    def encode(self) -> Callable[[object], bytes]:
        oid = self.oid
        if self.fmt == 0:
            return lambda x: pt.encode_text(oid, x)
        return lambda x: pt.encode_binary(oid, x)

    def digest(self, tag: bytes, data: bytes) -> bytes:
        return hmac.digest(self.key, tag + data, "sha256")


_FAIL: Final = (ValueError, ArithmeticError, struct.error, OverflowError, UnicodeError, KeyError)


def _guard(masker: FieldMasker) -> FieldMasker:
    """Fail closed: a value the masker cannot read becomes NULL, never passes through."""

    def guarded(value: memoryview) -> bytes | None:
        try:
            return masker(value)
        except _FAIL:
            return None

    return guarded


def _values(spec: _Spec, fn: Callable[[object], object | None]) -> FieldMasker:
    """decode -> fn -> encode, in the column's format."""
    dec, enc = spec.decode(), spec.encode()

    def masker(value: memoryview) -> bytes | None:
        out = fn(dec(value))
        return None if out is None else enc(out)

    return masker


# -- strings ----------------------------------------------------------------------------------


def _string_limit(spec: _Spec) -> tuple[int | None, Callable[[str], str]]:
    """(max characters, fit) for a string column: char(n) padded to n, varchar(n) cut, name."""
    if spec.oid == pt.BPCHAR:
        n = pt.bpchar_length(spec.typmod)
        if n is not None:
            return n, lambda s: s[:n].ljust(n)
    if spec.oid == pt.VARCHAR:
        n = pt.varchar_length(spec.typmod)
        if n is not None:
            return n, lambda s: s[:n]
    if spec.oid == pt.NAME:

        def fit_name(s: str) -> str:
            b = s.encode()
            if len(b) <= pt.NAME_MAX_BYTES:
                return s
            return b[: pt.NAME_MAX_BYTES].decode("utf-8", "ignore")

        return pt.NAME_MAX_BYTES, fit_name
    return None, lambda s: s


def _string_masker(
    spec: _Spec, fn: Callable[[str, int | None], str], *, strip_padding: bool = True
) -> FieldMasker:
    """A masker from a str -> str function (given the character limit), for every string kind.

    char(n) values are masked without their padding and padded again; json/jsonb documents
    are masked as text and sent as a JSON string.
    """
    kind = spec.kind
    if kind is Kind.JSON or kind is Kind.JSONB:
        prefix = b"\x01" if kind is Kind.JSONB and spec.fmt == 1 else b""
        skip = 1 if prefix else 0

        def json_masker(value: memoryview) -> bytes | None:
            if skip and (not value or value[0] != 1):
                raise ValueError("jsonb: unsupported version")
            doc = str(value[skip:], "utf-8")
            return prefix + json.dumps(fn(doc, None), ensure_ascii=False).encode()

        return json_masker
    limit, fit = _string_limit(spec)
    bpchar = spec.oid == pt.BPCHAR and strip_padding
    if bpchar:

        def bpchar_masker(value: memoryview) -> bytes | None:
            s = str(value, "utf-8")
            core = s.rstrip(" ")
            return fit(fn(core, limit).ljust(len(s))).encode()

        return bpchar_masker
    if spec.oid == pt.TEXT:

        def text_masker(value: memoryview) -> bytes | None:
            return fn(str(value, "utf-8"), None).encode()

        return text_masker

    def string_masker(value: memoryview) -> bytes | None:
        return fit(fn(str(value, "utf-8"), limit)).encode()

    return string_masker


def _partial_text(s: str, first: int, last: int, ch: str) -> str:
    n = len(s)
    if first + last >= n:
        return ch * n
    return s[:first] + ch * (n - first - last) + s[n - last :]


def _partial_digits(digits: str, first: int, last: int, rep: str) -> str:
    return _partial_text(digits, first, last, rep)


def _build_partial(spec: _Spec) -> FieldMasker:
    first, last, ch = spec.int_param("keep_first"), spec.int_param("keep_last"), spec.char()
    kind = spec.kind
    if kind in _STRINGY:
        return _string_masker(spec, lambda s, _n: _partial_text(s, first, last, ch))
    if kind is Kind.CHAR:
        return _build_redact(spec)
    if kind is Kind.BYTEA:
        b = _byte_char(ch)
        return _values(spec, lambda v: _partial_bytes(_as(v, bytes), first, last, b))
    if kind is Kind.UUID:
        rep = ch.lower() if ch.lower() in "0123456789abcdef" else "0"

        def partial_uuid(v: object) -> object:
            hexs = _partial_text(_as(v, uuidlib.UUID).hex, first, last, rep)
            return uuidlib.UUID(hex=hexs)

        return _values(spec, partial_uuid)
    rep = ch if ch.isascii() and ch.isdigit() else "0"
    if kind is Kind.INT or kind is Kind.OID:
        lo, hi = pt.int_range(spec.oid)

        def partial_int(v: object) -> object:
            i = _as(v, int)
            digits = str(abs(i))
            out = int(_partial_digits(digits, first, last, rep))
            out = -out if i < 0 else out
            if not lo <= out <= hi:
                out = int(_partial_digits(digits, first, last, "0"))
                out = -out if i < 0 else out
            return out

        return _values(spec, partial_int)
    if kind is Kind.NUMERIC:

        def partial_numeric(v: object) -> object:
            d = _as(v, decimal.Decimal)
            if not d.is_finite():
                return d
            return decimal.Decimal(_digitwise(pt.encode_text(pt.NUMERIC, d).decode(), rep))

        def _digitwise(text: str, r: str) -> str:
            digits = _NOT_DIGIT.sub("", text)
            masked = iter(_partial_digits(digits, first, last, r))
            return "".join(next(masked) if c.isdigit() else c for c in text)

        return _values(spec, partial_numeric)
    # floats: digits of the shortest text form (the mantissa only)
    single = spec.oid == pt.FLOAT4

    def partial_float(v: object) -> object:
        f = _as(v, float)
        if not math.isfinite(f):
            return f
        text = pt.encode_text(spec.oid, f).decode()
        mant, e, exp = text.partition("e")
        digits = _NOT_DIGIT.sub("", mant)
        masked = iter(_partial_digits(digits, first, last, rep))
        out = float("".join(next(masked) if c.isdigit() else c for c in mant) + e + exp)
        if single:
            (out,) = _F32.unpack(_F32.pack(out))
        return out

    return _values(spec, partial_float)


def _byte_char(ch: str) -> int:
    return ord(ch) if ord(ch) < 0x80 else ord("*")


def _partial_bytes(b: bytes, first: int, last: int, rep: int) -> bytes:
    n = len(b)
    if first + last >= n:
        return bytes([rep]) * n
    return b[:first] + bytes([rep]) * (n - first - last) + b[n - last :]


def _build_redact(spec: _Spec) -> FieldMasker:
    ch = spec.char()
    kind = spec.kind
    if kind is Kind.STRING or kind is Kind.XML:
        if kind is Kind.XML and ch in "<&":
            raise MaskNotApplicable(f"redact char {ch!r} would make invalid XML")
        return _string_masker(spec, lambda s, _n: ch * len(s), strip_padding=False)
    if kind is Kind.JSON or kind is Kind.JSONB:
        return _string_masker(spec, lambda s, _n: ch * len(s))
    if kind is Kind.BYTEA or kind is Kind.CHAR:
        b = _byte_char(ch)
        return _values(spec, lambda v: bytes([b]) * len(_as(v, bytes)))
    if kind is Kind.INT or kind is Kind.OID:
        zero = spec.encode()(0)
        return lambda v: zero
    if kind is Kind.FLOAT:
        zero = spec.encode()(0.0)
        return lambda v: zero
    if kind is Kind.NUMERIC:

        def redact_numeric(v: object) -> object:
            d = _as(v, decimal.Decimal)
            if not d.is_finite():
                return decimal.Decimal(0)
            return decimal.Decimal(0).scaleb(min(0, _exponent(d)))

        return _values(spec, redact_numeric)
    if kind is Kind.UUID:
        nil = spec.encode()(uuidlib.UUID(int=0))
        return lambda v: nil
    return _null  # bool, dates, times, timestamps, intervals


def _exponent(d: decimal.Decimal) -> int:
    e = d.as_tuple().exponent
    return e if isinstance(e, int) else 0


# -- hash ---------------------------------------------------------------------------------------


def _hash_stream(spec: _Spec, tag: bytes, data: bytes, nbytes: int) -> bytes:
    """At least `nbytes` of keyed hash of (tag, data)."""
    first = spec.digest(tag, data)
    out = first
    counter = 0
    while len(out) < nbytes:
        counter += 1
        out += hmac.digest(spec.key, first + counter.to_bytes(4, "big"), "sha256")
    return out


def _hash_digits(spec: _Spec, tag: bytes, data: bytes, n: int) -> str:
    """n decimal digits from the keyed hash."""
    stream = _hash_stream(spec, tag, data, (n // 70 + 1) * 32)
    digits = "".join(
        str(int.from_bytes(stream[i : i + 32], "big")).zfill(78)[-70:]
        for i in range(0, len(stream) - 31, 32)
    )
    return digits[:n]


def _hash_string(spec: _Spec, s: str, limit: int | None, exact: bool) -> str:
    data = s.encode("utf-8")
    if _DIGITISH.fullmatch(s):
        digits = iter(_hash_digits(spec, b"s:", data, sum(c.isdigit() for c in s)))
        return "".join(next(digits) if c.isdigit() else c for c in s)
    n = _HEX_HASH_LEN if limit is None or (limit > _HEX_HASH_LEN and not exact) else limit
    return _hash_stream(spec, b"s:", data, (n + 1) // 2).hex()[:n]


def _build_hash(spec: _Spec) -> FieldMasker:
    kind = spec.kind
    if kind in _STRINGY:
        exact = spec.oid == pt.BPCHAR
        return _string_masker(spec, lambda s, n: _hash_string(spec, s, n, exact))
    if kind is Kind.XML:
        return _string_masker(
            spec, lambda s, _n: _hash_stream(spec, b"s:", s.encode(), 16).hex()[:_HEX_HASH_LEN]
        )
    if kind is Kind.CHAR:
        return _values(
            spec,
            lambda v: (
                _hash_stream(spec, b"c:", _as(v, bytes), 1).hex()[:1].encode()
                if _as(v, bytes)
                else b""
            ),
        )
    if kind is Kind.BYTEA:
        return _values(spec, lambda v: _hash_stream(spec, b"b:", _as(v, bytes), 32)[:32])
    if kind is Kind.INT or kind is Kind.OID:
        hi = pt.int_range(spec.oid)[1]
        return _values(
            spec,
            lambda v: (
                int.from_bytes(spec.digest(b"n:", str(_as(v, int)).encode()), "big") % (hi + 1)
            ),
        )
    if kind is Kind.NUMERIC:

        def hash_numeric(v: object) -> object:
            d = _as(v, decimal.Decimal)
            if not d.is_finite():
                return d
            canon = format(d.normalize(), "f").encode() if d else b"0"
            text = pt.encode_text(pt.NUMERIC, abs(d)).decode()
            digits = iter(_hash_digits(spec, b"n:", canon, sum(c.isdigit() for c in text)))
            return decimal.Decimal("".join(next(digits) if c.isdigit() else c for c in text))

        return _values(spec, hash_numeric)
    if kind is Kind.FLOAT:
        bits = 24 if spec.oid == pt.FLOAT4 else 53

        def hash_float(v: object) -> object:
            f = _as(v, float)
            canon = repr(0.0 if f == 0 else f).encode()
            return float(int.from_bytes(spec.digest(b"f:", canon), "big") % (1 << bits))

        return _values(spec, hash_float)
    if kind is Kind.DATE:
        return _values(
            spec,
            lambda v: (
                _HASH_DATE_FROM
                + int.from_bytes(spec.digest(b"d:", str(_as(v, int)).encode()), "big")
                % _HASH_DATE_SPAN
            ),
        )
    if kind is Kind.TIMESTAMP or kind is Kind.TIMESTAMPTZ:
        span = _HASH_DATE_SPAN * 86_400
        base = _HASH_DATE_FROM * _DAY_US
        if kind is Kind.TIMESTAMPTZ and spec.fmt == 0:

            def hash_tstz_text(value: memoryview) -> bytes | None:
                local, offset = pt.decode_timestamptz_text(value)
                utc = local - offset * 1_000_000
                h = int.from_bytes(spec.digest(b"t:", str(utc).encode()), "big") % span
                return pt.encode_timestamptz_text(base + h * 1_000_000 + offset * 1_000_000, offset)

            return hash_tstz_text
        return _values(
            spec,
            lambda v: (
                base
                + int.from_bytes(spec.digest(b"t:", str(_as(v, int)).encode()), "big")
                % span
                * 1_000_000
            ),
        )
    if kind is Kind.TIME:
        return _values(
            spec,
            lambda v: (
                int.from_bytes(spec.digest(b"T:", str(_as(v, int)).encode()), "big")
                % 86_400
                * 1_000_000
            ),
        )
    # uuid

    def hash_uuid(v: object) -> object:
        raw = bytearray(spec.digest(b"u:", _as(v, uuidlib.UUID).bytes)[:16])
        raw[6] = (raw[6] & 0x0F) | 0x40
        raw[8] = (raw[8] & 0x3F) | 0x80
        return uuidlib.UUID(bytes=bytes(raw))

    return _values(spec, hash_uuid)


# -- email, fake --------------------------------------------------------------------------------


def _email_text(s: str, limit: int | None) -> str:
    at = s.rfind("@")
    if at <= 0:
        return "*" * len(s)
    local, domain = s[:at], s[at:]
    head = local[0] if len(local) > 1 else ""
    stars = 3 if head else 1
    if limit is not None and len(head) + stars + len(domain) > limit:
        stars = max(1, limit - len(domain) - len(head))
    return head + "*" * stars + domain


def _build_email(spec: _Spec) -> FieldMasker:
    return _string_masker(spec, _email_text)


def _build_fake(spec: _Spec) -> FieldMasker:
    kind = spec.params.get("kind")
    if kind not in fakedata.FAKE_KINDS:
        raise MaskNotApplicable(
            f"fake needs kind: one of {', '.join(fakedata.FAKE_KINDS)}; got {kind!r}"
        )
    assert isinstance(kind, str)
    return _string_masker(spec, lambda s, n: fakedata.fake(kind, spec.digest(b"s:", s.encode()), n))


# -- round --------------------------------------------------------------------------------------


def _build_round(spec: _Spec) -> FieldMasker:
    to = spec.params.get("to")
    kind = spec.kind
    if kind in _TEMPORAL:
        if to not in ("month", "year"):
            raise MaskNotApplicable(
                f"round on {spec.t.name} columns needs to: month or year; got {to!r}"
            )
        return _round_temporal(spec, to == "year")
    if isinstance(to, bool) or not isinstance(to, int | float | decimal.Decimal) or to <= 0:
        raise MaskNotApplicable(
            f"round on {spec.t.name} columns needs to: a positive number; got {to!r}"
        )
    step = decimal.Decimal(str(to))
    if kind is Kind.INT or kind is Kind.OID:
        if step != step.to_integral_value():
            raise MaskNotApplicable(
                f"round on {spec.t.name} columns needs an integral `to`; got {to!r}"
            )
        istep = int(step)

        def round_int(v: object) -> object:
            i = _as(v, int)
            q = abs(i) // istep * istep
            return -q if i < 0 else q

        return _values(spec, round_int)
    if kind is Kind.NUMERIC and spec.fmt == 0:
        return _round_numeric_text(step, _values(spec, _round_numeric_value(step)))
    if kind is Kind.NUMERIC:
        return _values(spec, _round_numeric_value(step))
    fstep = float(step)

    def round_float(v: object) -> object:
        f = _as(v, float)
        if not math.isfinite(f):
            return f
        return math.trunc(f / fstep) * fstep

    return _values(spec, round_float)


_PLAIN_NUMERIC: Final = re.compile(rb"(-?)(\d+)(?:\.(\d+))?")
_ROUND_CONTEXT: Final = decimal.Context(prec=1000)


def _round_numeric_value(step: decimal.Decimal) -> Callable[[object], object]:
    def round_numeric(v: object) -> object:
        d = _as(v, decimal.Decimal)
        if not d.is_finite():
            return d
        ctx = _ROUND_CONTEXT
        q = (d / step).to_integral_value(rounding=decimal.ROUND_DOWN, context=ctx) * step
        exp = min(0, _exponent(d))
        return q.quantize(decimal.Decimal(1).scaleb(exp), decimal.ROUND_DOWN, ctx)

    return round_numeric


def _round_numeric_text(step: decimal.Decimal, general: FieldMasker) -> FieldMasker:
    """Fast path for numeric text: integer arithmetic on the digits, in units of the scale."""
    units: dict[int, int | None] = {}

    def step_units(scale: int) -> int | None:
        if scale not in units:
            u = step.scaleb(scale)
            units[scale] = int(u) if u == u.to_integral_value() else None
        return units[scale]

    match = _PLAIN_NUMERIC.fullmatch

    def round_text(value: memoryview) -> bytes | None:
        m = match(value)
        if m is None:
            return general(value)
        sign, whole, frac = m.groups()
        scale = len(frac) if frac else 0
        su = step_units(scale)
        if su is None:
            return general(value)
        q = int(whole + frac) // su * su if frac else int(whole) // su * su
        digits = str(q)
        if scale:
            digits = digits.rjust(scale + 1, "0")
            digits = digits[:-scale] + "." + digits[-scale:]
        return (b"-" if sign and q else b"") + digits.encode()

    return _guard(round_text)


def _round_days(days: int, year: bool) -> int:
    if days in (pt.DATE_POS_INF, pt.DATE_NEG_INF):
        return days
    y, m, _ = pt.date_to_ymd(days)
    if days < pt.DATE_MIN + 400:  # the month or year began before the first valid date
        try:
            return pt.date_from_ymd(y, 1 if year else m, 1)
        except ValueError:
            return pt.DATE_MIN
    return pt.date_from_ymd(y, 1 if year else m, 1)


def _round_us(us: int, year: bool) -> int:
    if us in (pt.TS_POS_INF, pt.TS_NEG_INF):
        return us
    return _round_days(us // _DAY_US, year) * _DAY_US


def _round_temporal(spec: _Spec, year: bool) -> FieldMasker:
    if spec.kind is Kind.DATE:
        return _values(spec, lambda v: _round_days(_as(v, int), year))
    if spec.kind is Kind.TIMESTAMPTZ and spec.fmt == 0:

        def round_tstz_text(value: memoryview) -> bytes | None:
            local, offset = pt.decode_timestamptz_text(value)
            return pt.encode_timestamptz_text(_round_us(local, year), offset)

        return round_tstz_text
    return _values(spec, lambda v: _round_us(_as(v, int), year))


# -- constant -----------------------------------------------------------------------------------


def _constant(spec: _Spec) -> FieldMasker:
    value = spec.params.get("value")
    if value is None:
        return _null
    try:
        converted = _convert_constant(spec, value)
        out = spec.encode()(converted)
    except MaskNotApplicable:
        raise
    except (ValueError, ArithmeticError, OverflowError) as exc:
        raise MaskNotApplicable(
            f"constant {value!r} is not a valid {spec.t.name} value: {exc}"
        ) from None
    return lambda v: out


def _constant_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat(" ")
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def _convert_constant(spec: _Spec, value: object) -> object:
    kind, oid, name = spec.kind, spec.oid, spec.t.name
    if kind is Kind.STRING:
        s = _constant_text(value)
        limit, fit = _string_limit(spec)
        if limit is not None and (
            len(s) > limit or (oid == pt.NAME and len(s.encode()) > pt.NAME_MAX_BYTES)
        ):
            raise MaskNotApplicable(
                f"constant {s!r} is longer than the column's limit of {limit} characters"
            )
        return fit(s)
    if kind is Kind.XML:
        s = _constant_text(value)
        if "<" in s or "&" in s:
            raise MaskNotApplicable("constant for an xml column must be plain text (no < or &)")
        return s
    if kind is Kind.JSON or kind is Kind.JSONB:
        if isinstance(value, str):
            try:
                json.loads(value)
                return value
            except ValueError:
                return json.dumps(value, ensure_ascii=False)
        if isinstance(value, date):
            return json.dumps(_constant_text(value))
        return json.dumps(value)
    if kind is Kind.INT or kind is Kind.OID:
        if isinstance(value, bool):
            raise MaskNotApplicable(f"constant {value!r} is not a valid {name} value")
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int):
            return pt.decode_text(oid, str(value).encode())
        return pt.decode_text(oid, _constant_text(value).encode())
    if kind is Kind.NUMERIC:
        if isinstance(value, bool):
            raise MaskNotApplicable(f"constant {value!r} is not a valid numeric value")
        d = pt.decode_text(oid, _constant_text(value).encode())
        assert isinstance(d, decimal.Decimal)
        return _fit_numeric(d, spec.typmod)
    if kind is Kind.FLOAT:
        if isinstance(value, bool):
            raise MaskNotApplicable(f"constant {value!r} is not a valid {name} value")
        return pt.decode_text(oid, _constant_text(value).encode())
    if kind is Kind.BOOL:
        if isinstance(value, bool):
            return value
        return pt.decode_text(oid, _constant_text(value).encode())
    if kind is Kind.DATE:
        if isinstance(value, datetime):
            value = value.date()
        if isinstance(value, date):
            return pt.date_from_ymd(value.year, value.month, value.day)
        return pt.decode_text(oid, _constant_text(value).encode())
    if kind is Kind.TIMESTAMP or kind is Kind.TIMESTAMPTZ:
        if isinstance(value, date) and not isinstance(value, datetime):
            value = datetime(value.year, value.month, value.day)
        if isinstance(value, datetime):
            if value.tzinfo is not None:
                value = value.astimezone(UTC).replace(tzinfo=None)
            return (value - _EPOCH_DT) // timedelta(microseconds=1)
        return pt.decode_text(oid, _constant_text(value).encode())
    if kind is Kind.TIME:
        if isinstance(value, time):
            return ((value.hour * 60 + value.minute) * 60 + value.second) * 1_000_000 + (
                value.microsecond
            )
        if isinstance(value, int) and not isinstance(value, bool):  # YAML reads 12:30 as 45000
            raise MaskNotApplicable("constant for a time column must be a quoted string")
        return pt.decode_text(oid, _constant_text(value).encode())
    if kind is Kind.CHAR:
        b = _constant_text(value).encode()
        if len(b) > 1:
            raise MaskNotApplicable('constant for a "char" column must be one byte')
        return b
    # bytea, uuid, interval: the type's text input
    return pt.decode_text(oid, _constant_text(value).encode())


def _fit_numeric(d: decimal.Decimal, typmod: int) -> decimal.Decimal:
    pm = pt.numeric_typmod(typmod)
    if pm is None or not d.is_finite():
        if pm is not None and d.is_infinite():
            raise MaskNotApplicable("numeric(p, s) columns cannot hold infinity")
        return d
    precision, scale = pm
    q = d.quantize(decimal.Decimal(1).scaleb(-scale), decimal.ROUND_HALF_UP)
    if q.adjusted() >= precision - scale and q != 0:
        raise MaskNotApplicable(f"constant {d} does not fit numeric({precision},{scale})")
    return q


# -- arrays -------------------------------------------------------------------------------------


def _array_masker(elem: FieldMasker, elem_oid: int, fmt: int) -> FieldMasker:
    if elem is _null:
        return _null
    if fmt == 0:

        def text_array(value: memoryview) -> bytes | None:
            dims, lbs, elems = pt.split_array_text(value)
            out: list[str | None] = []
            for e in elems:
                if e is None:
                    out.append(None)
                else:
                    m = elem(memoryview(e.encode("utf-8")))
                    out.append(None if m is None else m.decode("utf-8"))
            return pt.join_array_text(dims, lbs, out)

        return _guard(text_array)

    def binary_array(value: memoryview) -> bytes | None:
        oid, dims, lbs, elems = pt.split_array_binary(value)
        if elems and oid != elem_oid:
            raise ValueError("array element type differs from the column's")
        masked = [None if e is None else elem(memoryview(e)) for e in elems]
        return pt.join_array_binary(elem_oid, dims, lbs, masked)

    return _guard(binary_array)


def _as(value: object, cls: type[_T]) -> _T:
    if not isinstance(value, cls):
        raise ValueError(f"expected {cls.__name__}")
    return value


_VALUE_MASKS: Final[Mapping[str, Callable[[_Spec], FieldMasker]]] = {
    "partial": _build_partial,
    "redact": _build_redact,
    "hash": _build_hash,
    "email": _build_email,
    "round": _build_round,
    "fake": _build_fake,
}


# --------------------------------------------------------------------------------------------
# DataRow


class MaskedCounter:
    """Counts of a row masker: `masked_counts` (label -> non-NULL values masked since the last
    take) is worked out, when read, from the rows and the NULLs of each masked column;
    `take_masked_counts()` reads and resets it. `_collect()` brings counts kept elsewhere in."""

    __slots__ = ("_columns", "_labels", "_rows", "_nulls")

    def __init__(self, labels: Mapping[int, str], columns: int) -> None:
        for index in labels:
            if not 0 <= index < columns:
                raise ValueError(f"masked column {index} is outside 0..{columns - 1}")
        self._columns = columns
        self._labels = dict(labels)
        self._rows = 0
        self._nulls = [0] * (max(labels, default=-1) + 1)

    @property
    def columns(self) -> int:
        return self._columns

    def _collect(self) -> None:
        pass

    @property
    def masked_counts(self) -> dict[str, int]:
        """Label -> non-NULL values masked since the last take."""
        self._collect()
        counts: dict[str, int] = {}
        for i, label in self._labels.items():
            counts[label] = counts.get(label, 0) + self._rows - self._nulls[i]
        return counts

    def take_masked_counts(self) -> dict[str, int]:
        counts = self.masked_counts
        self._rows = 0
        self._nulls = [0] * len(self._nulls)
        return counts


class RowMasker(MaskedCounter):
    """Rewrites the masked fields of DataRow bodies; every other field's bytes pass untouched.

    Strategy: one pass over the length words. Unmasked fields are never copied on their own:
    the bytes between two masked fields (length words included) go out as one memoryview slice,
    and the new message is a single `b"".join` with the header computed from the size delta.
    The loop counts only rows and NULLs (see MaskedCounter).
    """

    __slots__ = ("_head",)

    def __init__(self, maskers: Mapping[int, tuple[FieldMasker, str]], columns: int) -> None:
        super().__init__({i: label for i, (_, label) in maskers.items()}, columns)
        last = max(maskers, default=-1)
        # The maskers of the columns up to the last masked one (None: passes untouched).
        self._head: tuple[FieldMasker | None, ...] = tuple(
            maskers[i][0] if i in maskers else None for i in range(last + 1)
        )

    def __call__(self, body: memoryview) -> bytes:
        """The whole new DataRow message (type byte, length, body) for a DataRow body."""
        end = len(body)
        if end < 2:
            raise ProtocolViolation("DataRow: message too short")
        if (body[0] << 8 | body[1]) != self._columns:
            raise ProtocolViolation(
                f"DataRow has {body[0] << 8 | body[1]} fields where RowDescription announced "
                f"{self._columns}"
            )
        unpack = _I32.unpack_from
        pack = _I32.pack
        parts: list[bytes | memoryview] = [b""]
        append = parts.append
        pos = 2
        run = 0  # start of the current run of untouched bytes
        delta = 0
        index = 0
        # Fields after the last masked one go out as one slice, unparsed (the framing layer
        # has checked the message length; the client parses them as the server sent them).
        for masker in self._head:
            if pos + 4 > end:
                raise ProtocolViolation("DataRow: message too short")
            (size,) = unpack(body, pos)
            if size < 0:
                if size != -1:
                    raise ProtocolViolation("DataRow: invalid field length")
                if masker is not None:
                    self._nulls[index] += 1
                pos += 4
                index += 1
                continue
            nxt = pos + 4 + size
            if nxt > end:
                raise ProtocolViolation("DataRow: invalid field length")
            if masker is not None:
                new = masker(body[pos + 4 : nxt])
                if run < pos:
                    append(body[run:pos])
                if new is None:
                    append(_NULL_LEN)
                    delta -= size
                else:
                    append(pack(len(new)))
                    append(new)
                    delta += len(new) - size
                run = nxt
            pos = nxt
            index += 1
        self._rows += 1
        if run < end:
            append(body[run:end])
        parts[0] = _HEAD.pack(b"D", end + delta + 4)
        return b"".join(parts)


# --------------------------------------------------------------------------------------------
# COPY TO STDOUT


class MaskCounts(Protocol):
    """What a masker counted: label -> non-NULL values masked since the last take (the
    server adds them to topeng_masked_values_total)."""

    def take_masked_counts(self) -> dict[str, int]: ...


class CopyMasker(Protocol):
    """Masks `COPY ... TO STDOUT` data: feed CopyData payloads, get the bytes to send on."""

    masked_counts: dict[str, int]

    def take_masked_counts(self) -> dict[str, int]: ...

    def feed(self, data: bytes | memoryview) -> bytes:
        """The masked bytes of every row completed by `data` (partial rows are held back)."""
        ...

    def finish(self) -> bytes:
        """At CopyDone: what is left; raises ProtocolViolation if a row was cut short."""
        ...


ColumnMaskers = Mapping[int, FieldMasker | tuple[FieldMasker, str]]


def build_copy_masker(
    fmt: Literal["text", "csv", "binary"],
    columns: ColumnMaskers,
    *,
    column_count: int | None = None,
    delimiter: str | None = None,
    quote: str | None = None,
    escape: str | None = None,
    null: str | None = None,
    header: bool = False,
) -> CopyMasker:
    """A masker for COPY TO STDOUT output with the COPY's options.

    `columns` maps a column index to its FieldMasker, built with format 0 for text and CSV and
    format 1 for binary (optionally with a label: `(masker, label)`, counted in
    `masked_counts`). `column_count` (when known) is checked against every row. Defaults are
    PostgreSQL's: text: tab, `\\N`; CSV: comma, double quote, escape = quote, empty NULL.
    """
    plan: dict[int, tuple[FieldMasker, str]] = {}
    for index, m in sorted(columns.items(), key=lambda item: item[0]):
        plan[index] = m if isinstance(m, tuple) else (m, "")
    if fmt == "binary":
        return _CopyBinary(plan, column_count)
    if fmt == "text":
        d = delimiter if delimiter is not None else "\t"
        return _CopyText(plan, column_count, d, null if null is not None else "\\N", header)
    if fmt == "csv":
        d = delimiter if delimiter is not None else ","
        q = quote if quote is not None else '"'
        e = escape if escape is not None else q
        return _CopyCsv(plan, column_count, d, q, e, null if null is not None else "", header)
    raise ValueError(f"unknown COPY format {fmt!r}")


class _CopyBase:
    __slots__ = ("_plan", "_count", "_buf", "masked_counts", "_header")

    def __init__(
        self, plan: dict[int, tuple[FieldMasker, str]], count: int | None, header: bool
    ) -> None:
        self._plan = plan
        self._count = count
        self._buf = b""
        self._header = header
        self.masked_counts: dict[str, int] = {label: 0 for _, label in plan.values()}

    def take_masked_counts(self) -> dict[str, int]:
        """Label -> non-NULL values masked since the last take."""
        counts = self.masked_counts
        self.masked_counts = dict.fromkeys(counts, 0)
        return counts

    def _check_count(self, n: int) -> None:
        if self._count is not None and n != self._count:
            raise ProtocolViolation(f"COPY row has {n} fields where {self._count} were expected")

    def finish(self) -> bytes:
        if self._buf:
            raise ProtocolViolation("COPY data ends inside a row")
        return b""


_TEXT_ESCAPES: Final = {
    ord("\b"): b"\\b",
    ord("\f"): b"\\f",
    ord("\n"): b"\\n",
    ord("\r"): b"\\r",
    ord("\t"): b"\\t",
    ord("\v"): b"\\v",
    ord("\\"): b"\\\\",
}
_TEXT_UNESCAPE: Final = {
    ord("b"): b"\b",
    ord("f"): b"\f",
    ord("n"): b"\n",
    ord("r"): b"\r",
    ord("t"): b"\t",
    ord("v"): b"\v",
}
_COPY_ESCAPE_RE: Final = re.compile(rb"\\(?:([0-7]{1,3})|x([0-9a-fA-F]{1,2})|(.))", re.DOTALL)


class _CopyText(_CopyBase):
    __slots__ = ("_delim", "_null", "_special")

    def __init__(
        self,
        plan: dict[int, tuple[FieldMasker, str]],
        count: int | None,
        delimiter: str,
        null: str,
        header: bool,
    ) -> None:
        super().__init__(plan, count, header)
        self._delim = delimiter.encode()
        self._null = null.encode()
        specials = set(_TEXT_ESCAPES) | {self._delim[0]}
        self._special = re.compile(b"[" + b"".join(re.escape(bytes([c])) for c in specials) + b"]")

    def feed(self, data: bytes | memoryview) -> bytes:
        buf = self._buf + bytes(data)
        cut = buf.rfind(b"\n") + 1
        self._buf = buf[cut:]
        if not cut:
            return b""
        out = []
        for line in buf[:cut].split(b"\n")[:-1]:
            if self._header:
                self._header = False
                out.append(line)
                continue
            out.append(self._row(line))
        out.append(b"")
        return b"\n".join(out)

    def _split(self, line: bytes) -> list[bytes]:
        d = self._delim
        if b"\\" not in line:
            return line.split(d)
        fields: list[bytes] = []
        start = i = 0
        n = len(line)
        while i < n:
            c = line[i : i + 1]
            if c == b"\\":
                i += 2
                continue
            if c == d:
                fields.append(line[start:i])
                start = i + 1
            i += 1
        fields.append(line[start:])
        return fields

    def _row(self, line: bytes) -> bytes:
        fields = self._split(line.removesuffix(b"\r"))
        self._check_count(len(fields))
        for index, (masker, label) in self._plan.items():
            if index >= len(fields):
                raise ProtocolViolation("COPY row has fewer fields than expected")
            raw = fields[index]
            if raw == self._null:
                continue
            new = masker(memoryview(self._unescape(raw)))
            self.masked_counts[label] += 1
            fields[index] = self._null if new is None else self._escape(new)
        return self._delim.join(fields)

    @staticmethod
    def _unescape(raw: bytes) -> bytes:
        if b"\\" not in raw:
            return raw

        def one(m: re.Match[bytes]) -> bytes:
            if m.group(1):
                return bytes([int(m.group(1), 8) & 0xFF])
            if m.group(2):
                return bytes([int(m.group(2), 16)])
            c = m.group(3)[0]
            return _TEXT_UNESCAPE.get(c, m.group(3))

        return _COPY_ESCAPE_RE.sub(one, raw)

    def _escape(self, value: bytes) -> bytes:
        if not self._special.search(value):
            return value
        d = self._delim[0]
        return b"".join(
            _TEXT_ESCAPES.get(c, b"\\" + bytes([c]) if c == d else bytes([c])) for c in value
        )


class _CopyCsv(_CopyBase):
    __slots__ = ("_delim", "_quote", "_escape", "_null", "_specials")

    def __init__(
        self,
        plan: dict[int, tuple[FieldMasker, str]],
        count: int | None,
        delimiter: str,
        quote: str,
        escape: str,
        null: str,
        header: bool,
    ) -> None:
        super().__init__(plan, count, header)
        self._delim = ord(delimiter)
        self._quote = ord(quote)
        self._escape = ord(escape)
        self._null = null.encode()
        self._specials = frozenset({self._delim, self._quote, ord("\n"), ord("\r")})

    def feed(self, data: bytes | memoryview) -> bytes:
        buf = self._buf + bytes(data)
        out: list[bytes] = []
        pos = 0
        while True:
            parsed = self._record(buf, pos)
            if parsed is None:
                break
            fields, end, eol = parsed
            if self._header:
                self._header = False
                out.append(buf[pos:end])
            else:
                out.append(self._row(fields) + eol)
            pos = end
        self._buf = buf[pos:]
        return b"".join(out)

    def _record(
        self, buf: bytes, pos: int
    ) -> tuple[list[tuple[bytes, bytes | None]], int, bytes] | None:
        """[(raw field, value or None for NULL)], the record's end, its line ending; or None."""
        n = len(buf)
        fields: list[tuple[bytes, bytes | None]] = []
        q, esc, d = self._quote, self._escape, self._delim
        i = pos
        while True:
            start = i
            if i < n and buf[i] == q:
                value = bytearray()
                i += 1
                while True:
                    if i >= n:
                        return None
                    c = buf[i]
                    if (
                        c == esc
                        and i + 1 < n
                        and buf[i + 1] in (q, esc)
                        and (esc != q or buf[i + 1] == q)
                    ):
                        value.append(buf[i + 1])
                        i += 2
                        continue
                    if c == esc and esc != q and i + 1 >= n:
                        return None
                    if c == q:
                        if esc == q and i + 1 >= n:
                            return None  # might be a doubled quote split across messages
                        i += 1
                        break
                    value.append(c)
                    i += 1
                # after the closing quote, take unquoted bytes up to the delimiter too
                while i < n and buf[i] not in (d, 10, 13):
                    value.append(buf[i])
                    i += 1
                fields.append((buf[start:i], bytes(value)))
            else:
                while i < n and buf[i] not in (d, 10, 13):
                    i += 1
                raw = buf[start:i]
                fields.append((raw, None if raw == self._null else raw))
            if i >= n:
                return None
            c = buf[i]
            if c == d:
                i += 1
                continue
            if c == 13:
                if i + 1 >= n:
                    return None
                if buf[i + 1] == 10:
                    return fields, i + 2, b"\r\n"
                return fields, i + 1, b"\r"
            return fields, i + 1, b"\n"

    def _row(self, fields: list[tuple[bytes, bytes | None]]) -> bytes:
        self._check_count(len(fields))
        raws = [raw for raw, _ in fields]
        for index, (masker, label) in self._plan.items():
            if index >= len(fields):
                raise ProtocolViolation("COPY row has fewer fields than expected")
            value = fields[index][1]
            if value is None:
                continue
            new = masker(memoryview(value))
            self.masked_counts[label] += 1
            raws[index] = self._null if new is None else self._quoted(new)
        return bytes([self._delim]).join(raws)

    def _quoted(self, value: bytes) -> bytes:
        if value != self._null and not any(c in self._specials for c in value):
            if value != b"\\.":
                return value
        q, esc = self._quote, self._escape
        out = bytearray([q])
        for c in value:
            if c == q or c == esc:
                out.append(esc)
            out.append(c)
        out.append(q)
        return bytes(out)


_PGCOPY_SIGNATURE: Final = b"PGCOPY\n\xff\r\n\x00"
_COPY_HEAD: Final = struct.Struct("!11sii")


class _CopyBinary(_CopyBase):
    __slots__ = ("_seen_header", "_done")

    def __init__(self, plan: dict[int, tuple[FieldMasker, str]], count: int | None) -> None:
        super().__init__(plan, count, False)
        self._seen_header = False
        self._done = False

    def feed(self, data: bytes | memoryview) -> bytes:
        buf = self._buf + bytes(data)
        view = memoryview(buf)
        out: list[bytes | memoryview] = []
        pos = 0
        n = len(buf)
        if not self._seen_header:
            if n < _COPY_HEAD.size:
                self._buf = buf
                return b""
            sig, _flags, ext = _COPY_HEAD.unpack_from(buf, 0)
            if sig != _PGCOPY_SIGNATURE or ext < 0:
                raise ProtocolViolation("binary COPY data has no valid PGCOPY header")
            hend = _COPY_HEAD.size + ext
            if n < hend:
                self._buf = buf
                return b""
            out.append(view[:hend])
            pos = hend
            self._seen_header = True
        unpack16, unpack32 = _I16.unpack_from, _I32.unpack_from
        plan = self._plan
        while pos + 2 <= n and not self._done:
            (count,) = unpack16(buf, pos)
            if count == -1:
                out.append(view[pos : pos + 2])
                pos += 2
                self._done = True
                break
            if count < 0:
                raise ProtocolViolation("binary COPY tuple has a negative field count")
            # find the tuple's end first; it may not have arrived yet
            p = pos + 2
            spans: list[tuple[int, int]] = []
            complete = True
            for _ in range(count):
                if p + 4 > n:
                    complete = False
                    break
                (size,) = unpack32(buf, p)
                if size < -1:
                    raise ProtocolViolation("binary COPY field has an invalid length")
                spans.append((p, size))
                p += 4 + max(size, 0)
                if p > n:
                    complete = False
                    break
            if not complete:
                break
            self._check_count(count)
            run = pos
            for index, (masker, label) in plan.items():
                if index >= count:
                    raise ProtocolViolation("COPY row has fewer fields than expected")
                at, size = spans[index]
                if size < 0:
                    continue
                out.append(view[run:at])
                new = masker(view[at + 4 : at + 4 + size])
                self.masked_counts[label] += 1
                if new is None:
                    out.append(_NULL_LEN)
                else:
                    out.append(_I32.pack(len(new)))
                    out.append(new)
                run = at + 4 + size
            out.append(view[run:p])
            pos = p
        if self._done and pos < n:
            out.append(view[pos:])
            pos = n
        self._buf = buf[pos:]
        return b"".join(out)
