"""PostgreSQL data types: OIDs, and the text and binary wire formats of the types Topeng masks.

Strategy: one table (`TYPES`) says, for every supported type OID, what kind of value it holds
(`Kind`), its array type and, for an array type, its element type. Four functions convert
between wire bytes and Python values: `decode_text` / `encode_text` for format 0 and
`decode_binary` / `encode_binary` for format 1. The formats are those of the server's own
`typinput` / `typoutput` / `typreceive` / `typsend` functions (PostgreSQL 12 and later,
DateStyle ISO, IntervalStyle postgres, bytea_output hex, client_encoding UTF8; the input side
also accepts bytea escape format). Encoders produce exactly what the server would send, so a
masked value is indistinguishable in form from a real one.

Python values by kind:
- bool -> bool; bytea -> bytes; char ("char", one byte) -> bytes of length 0 or 1
- string (text, varchar, bpchar, name), xml, json, jsonb -> str (bpchar keeps its padding)
- int (int2, int4, int8), oid -> int; float (float4, float8) -> float
- numeric -> decimal.Decimal (its exponent is the display scale; NaN and +-Infinity too)
- date -> int days since 2000-01-01 (`DATE_POS_INF` / `DATE_NEG_INF` for +-infinity), because
  PostgreSQL dates span 4713 BC to 5874897 AD, far beyond `datetime.date`
- time -> int microseconds since midnight
- timestamp, timestamptz -> int microseconds since 2000-01-01 00:00 (UTC for timestamptz;
  `TS_POS_INF` / `TS_NEG_INF`). The text form of timestamptz also carries the session's UTC
  offset: `decode_timestamptz_text` / `encode_timestamptz_text` keep it.
- interval -> `Interval(months, days, micros)`; uuid -> uuid.UUID
- arrays -> `PgArray(elements, dims, lbounds)`, elements flat in row-major order, None = NULL.
  `split_array_text` / `join_array_text` and `split_array_binary` / `join_array_binary` work on
  the raw element bytes, so a masker can rewrite elements without decoding them.

Every decoder raises ValueError (never anything else) on malformed input.
"""

from __future__ import annotations

import decimal
import math
import re
import struct
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import Final, NamedTuple, TypeVar

__all__ = [
    "DATE_MIN",
    "DATE_NEG_INF",
    "DATE_POS_INF",
    "TS_NEG_INF",
    "TS_POS_INF",
    "TYPES",
    "Interval",
    "Kind",
    "PgArray",
    "PgType",
    "bpchar_length",
    "date_from_ymd",
    "date_to_ymd",
    "decode_binary",
    "decode_text",
    "decode_timestamptz_text",
    "encode_binary",
    "encode_text",
    "encode_timestamptz_text",
    "join_array_binary",
    "join_array_text",
    "numeric_typmod",
    "split_array_binary",
    "split_array_text",
    "type_info",
    "varchar_length",
]

_T = TypeVar("_T")

# -- OIDs ------------------------------------------------------------------------------------

BOOL: Final = 16
BYTEA: Final = 17
CHAR: Final = 18
NAME: Final = 19
INT8: Final = 20
INT2: Final = 21
INT4: Final = 23
TEXT: Final = 25
OID: Final = 26
JSON: Final = 114
XML: Final = 142
FLOAT4: Final = 700
FLOAT8: Final = 701
BPCHAR: Final = 1042
VARCHAR: Final = 1043
DATE: Final = 1082
TIME: Final = 1083
TIMESTAMP: Final = 1114
TIMESTAMPTZ: Final = 1184
INTERVAL: Final = 1186
NUMERIC: Final = 1700
UUID: Final = 2950
JSONB: Final = 3802

BOOL_ARRAY: Final = 1000
BYTEA_ARRAY: Final = 1001
CHAR_ARRAY: Final = 1002
NAME_ARRAY: Final = 1003
INT2_ARRAY: Final = 1005
INT4_ARRAY: Final = 1007
TEXT_ARRAY: Final = 1009
BPCHAR_ARRAY: Final = 1014
VARCHAR_ARRAY: Final = 1015
INT8_ARRAY: Final = 1016
FLOAT4_ARRAY: Final = 1021
FLOAT8_ARRAY: Final = 1022
OID_ARRAY: Final = 1028
XML_ARRAY: Final = 143
JSON_ARRAY: Final = 199
TIMESTAMP_ARRAY: Final = 1115
DATE_ARRAY: Final = 1182
TIME_ARRAY: Final = 1183
TIMESTAMPTZ_ARRAY: Final = 1185
INTERVAL_ARRAY: Final = 1187
NUMERIC_ARRAY: Final = 1231
UUID_ARRAY: Final = 2951
JSONB_ARRAY: Final = 3807


class Kind(Enum):
    """What a type's values are, which decides which masks apply and how."""

    BOOL = "bool"
    BYTEA = "bytea"
    CHAR = "char"  # the one-byte "char"
    STRING = "string"  # text, varchar, bpchar, name
    XML = "xml"
    JSON = "json"
    JSONB = "jsonb"
    INT = "int"
    OID = "oid"
    FLOAT = "float"
    NUMERIC = "numeric"
    DATE = "date"
    TIME = "time"
    TIMESTAMP = "timestamp"
    TIMESTAMPTZ = "timestamptz"
    INTERVAL = "interval"
    UUID = "uuid"
    ARRAY = "array"


@dataclass(frozen=True, slots=True)
class PgType:
    oid: int
    name: str
    kind: Kind
    array_oid: int = 0  # the array type of this type (0 for an array type)
    elem_oid: int = 0  # the element type (arrays only)


_BASE: Final = (
    (BOOL, "bool", Kind.BOOL, BOOL_ARRAY),
    (BYTEA, "bytea", Kind.BYTEA, BYTEA_ARRAY),
    (CHAR, "char", Kind.CHAR, CHAR_ARRAY),
    (NAME, "name", Kind.STRING, NAME_ARRAY),
    (INT8, "int8", Kind.INT, INT8_ARRAY),
    (INT2, "int2", Kind.INT, INT2_ARRAY),
    (INT4, "int4", Kind.INT, INT4_ARRAY),
    (TEXT, "text", Kind.STRING, TEXT_ARRAY),
    (OID, "oid", Kind.OID, OID_ARRAY),
    (JSON, "json", Kind.JSON, JSON_ARRAY),
    (XML, "xml", Kind.XML, XML_ARRAY),
    (FLOAT4, "float4", Kind.FLOAT, FLOAT4_ARRAY),
    (FLOAT8, "float8", Kind.FLOAT, FLOAT8_ARRAY),
    (BPCHAR, "bpchar", Kind.STRING, BPCHAR_ARRAY),
    (VARCHAR, "varchar", Kind.STRING, VARCHAR_ARRAY),
    (DATE, "date", Kind.DATE, DATE_ARRAY),
    (TIME, "time", Kind.TIME, TIME_ARRAY),
    (TIMESTAMP, "timestamp", Kind.TIMESTAMP, TIMESTAMP_ARRAY),
    (TIMESTAMPTZ, "timestamptz", Kind.TIMESTAMPTZ, TIMESTAMPTZ_ARRAY),
    (INTERVAL, "interval", Kind.INTERVAL, INTERVAL_ARRAY),
    (NUMERIC, "numeric", Kind.NUMERIC, NUMERIC_ARRAY),
    (UUID, "uuid", Kind.UUID, UUID_ARRAY),
    (JSONB, "jsonb", Kind.JSONB, JSONB_ARRAY),
)


def _build_types() -> Mapping[int, PgType]:
    out: dict[int, PgType] = {}
    for oid, name, kind, array_oid in _BASE:
        out[oid] = PgType(oid, name, kind, array_oid=array_oid)
        out[array_oid] = PgType(array_oid, f"{name}[]", Kind.ARRAY, elem_oid=oid)
    return MappingProxyType(out)


TYPES: Final[Mapping[int, PgType]] = _build_types()
"""Every supported type, by OID: the base types above and one-dimensional-or-more arrays."""


def type_info(oid: int) -> PgType | None:
    return TYPES.get(oid)


# -- typmods ---------------------------------------------------------------------------------

VARHDRSZ: Final = 4
NAME_MAX_BYTES: Final = 63


def varchar_length(typmod: int) -> int | None:
    """The n of varchar(n) / char(n) from a column's typmod (None when unconstrained)."""
    return typmod - VARHDRSZ if typmod >= VARHDRSZ else None


bpchar_length = varchar_length


def numeric_typmod(typmod: int) -> tuple[int, int] | None:
    """(precision, scale) of numeric(p, s) from a typmod, None when unconstrained."""
    if typmod < VARHDRSZ:
        return None
    t = typmod - VARHDRSZ
    scale = t & 0x7FF
    if scale & 0x400:  # PostgreSQL 15 allows negative scales, stored in 11 bits
        scale -= 0x800
    return (t >> 16) & 0xFFFF, scale


# -- structs ---------------------------------------------------------------------------------

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_I64 = struct.Struct("!q")
_F32 = struct.Struct("!f")
_F64 = struct.Struct("!d")
_NUMERIC_HEAD = struct.Struct("!hhHh")
_INTERVAL = struct.Struct("!qii")
_ARRAY_HEAD = struct.Struct("!iiI")
_DIM = struct.Struct("!ii")

_INT_RANGE: Final = {
    INT2: (-(2**15), 2**15 - 1),
    INT4: (-(2**31), 2**31 - 1),
    INT8: (-(2**63), 2**63 - 1),
    OID: (0, 2**32 - 1),
}
_INT_STRUCT: Final = {INT2: _I16, INT4: _I32, INT8: _I64, OID: _U32}


def int_range(oid: int) -> tuple[int, int]:
    """The (min, max) of an integer type."""
    return _INT_RANGE[oid]


# -- dates and times (PostgreSQL's proleptic Gregorian Julian-day arithmetic) ----------------

USECS_PER_DAY: Final = 86_400_000_000
POSTGRES_EPOCH_JDATE: Final = 2_451_545
DATE_NEG_INF: Final = -(2**31)
DATE_POS_INF: Final = 2**31 - 1
TS_NEG_INF: Final = -(2**63)
TS_POS_INF: Final = 2**63 - 1
# The server's valid ranges: dates from 4714-11-24 BC (Julian day 0) to 5874897-12-31,
# timestamps from 4714-11-24 BC to 294276-12-31 (END_TIMESTAMP).
_DATE_MIN: Final = -POSTGRES_EPOCH_JDATE
_DATE_MAX: Final = 2_147_483_494 - POSTGRES_EPOCH_JDATE  # date2j(5874898, 1, 1) - epoch - 1
_TS_MIN: Final = _DATE_MIN * USECS_PER_DAY
_TS_MAX: Final = 9_224_318_016_000_000_000 - 1  # END_TIMESTAMP - 1
DATE_MIN: Final = _DATE_MIN
"""The first valid date, 4714-11-24 BC, in days since 2000-01-01."""


def _date2j(year: int, month: int, day: int) -> int:
    if month > 2:
        month += 1
        year += 4800
    else:
        month += 13
        year += 4799
    century = year // 100
    julian = year * 365 - 32167
    julian += year // 4 - century + century // 4
    julian += 7834 * month // 256 + day
    return julian


def _j2date(jd: int) -> tuple[int, int, int]:
    julian = jd + 32044
    quad = julian // 146097
    extra = (julian - quad * 146097) * 4 + 3
    julian += 60 + quad * 3 + extra // 146097
    quad = julian // 1461
    julian -= quad * 1461
    y = julian * 4 // 1461
    julian = ((julian + 305) % 365 if y != 0 else (julian + 306) % 366) + 123
    y += quad * 4
    quad = julian * 2141 // 65536
    return y - 4800, (quad + 10) % 12 + 1, julian - 7834 * quad // 256


def date_to_ymd(days: int) -> tuple[int, int, int]:
    """(year, month, day) of a date in days since 2000-01-01; year 0 is 1 BC, -1 is 2 BC."""
    return _j2date(days + POSTGRES_EPOCH_JDATE)


def date_from_ymd(year: int, month: int, day: int) -> int:
    """Days since 2000-01-01 of a (proleptic Gregorian, astronomical year) date."""
    if not 1 <= month <= 12 or not 1 <= day <= _days_in_month(year, month):
        raise ValueError(f"date out of range: {year}-{month}-{day}")
    days = _date2j(year, month, day) - POSTGRES_EPOCH_JDATE
    if not _DATE_MIN <= days <= _DATE_MAX:
        raise ValueError("date out of range")
    return days


def _days_in_month(year: int, month: int) -> int:
    if month == 2:
        return 29 if (year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)) else 28
    return 30 if month in (4, 6, 9, 11) else 31


def _year_text(year: int) -> tuple[str, str]:
    """The printed year and the era suffix of an astronomical year."""
    if year <= 0:
        return f"{1 - year:04d}", " BC"
    return f"{year:04d}", ""


def _date_text(days: int) -> str:
    if days == DATE_POS_INF:
        return "infinity"
    if days == DATE_NEG_INF:
        return "-infinity"
    y, m, d = date_to_ymd(days)
    year, era = _year_text(y)
    return f"{year}-{m:02d}-{d:02d}{era}"


def _time_text(us: int) -> str:
    secs, frac = divmod(us, 1_000_000)
    mins, sec = divmod(secs, 60)
    hour, minute = divmod(mins, 60)
    out = f"{hour:02d}:{minute:02d}:{sec:02d}"
    if frac:
        out += "." + f"{frac:06d}".rstrip("0")
    return out


def _offset_text(offset_s: int) -> str:
    sign = "-" if offset_s < 0 else "+"
    mins, sec = divmod(abs(offset_s), 60)
    hour, minute = divmod(mins, 60)
    out = f"{sign}{hour:02d}"
    if minute or sec:
        out += f":{minute:02d}"
    if sec:
        out += f":{sec:02d}"
    return out


def _timestamp_text(us: int, offset_s: int | None) -> str:
    if us == TS_POS_INF:
        return "infinity"
    if us == TS_NEG_INF:
        return "-infinity"
    local = us + (offset_s or 0) * 1_000_000
    days, time_us = divmod(local, USECS_PER_DAY)
    y, m, d = date_to_ymd(days)
    year, era = _year_text(y)
    zone = "" if offset_s is None else _offset_text(offset_s)
    return f"{year}-{m:02d}-{d:02d} {_time_text(time_us)}{zone}{era}"


_DATE_RE = re.compile(r"\s*(\d{4,})-(\d{1,2})-(\d{1,2})(\s+BC)?\s*", re.ASCII)
_TIME_RE = r"(\d{1,2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6})\d*)?)?"
_TS_RE = re.compile(
    r"\s*(\d{4,})-(\d{1,2})-(\d{1,2})[ T]"
    + _TIME_RE
    + r"(?:\s*([+-])(\d{1,2})(?::?(\d{2}))?(?::(\d{2}))?)?(\s+BC)?\s*",
    re.ASCII,
)
_TIME_ONLY_RE = re.compile(r"\s*" + _TIME_RE + r"\s*", re.ASCII)


def _parse_infinity(text: str) -> int:
    t = text.strip().lower()
    if t in ("infinity", "+infinity"):
        return 1
    if t == "-infinity":
        return -1
    return 0


def _astronomical(year: int, bc: str | None) -> int:
    if bc:
        if year == 0:
            raise ValueError("year 0 BC does not exist")
        return 1 - year
    if year == 0:
        raise ValueError("year 0 does not exist")
    return year


def _parse_date(text: str) -> int:
    inf = _parse_infinity(text)
    if inf:
        return DATE_POS_INF if inf > 0 else DATE_NEG_INF
    m = _DATE_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"invalid date (ISO format expected): {text!r}")
    year = _astronomical(int(m.group(1)), m.group(4))
    return date_from_ymd(year, int(m.group(2)), int(m.group(3)))


def _time_us(hour: str, minute: str, sec: str | None, frac: str | None) -> int:
    h, mi, s = int(hour), int(minute), int(sec or 0)
    us = int((frac or "").ljust(6, "0") or 0)
    if mi > 59 or s > 60 or h > 24 or (h == 24 and (mi or s or us)):
        raise ValueError("time out of range")
    return ((h * 60 + mi) * 60 + s) * 1_000_000 + us


def _parse_time(text: str) -> int:
    m = _TIME_ONLY_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"invalid time: {text!r}")
    return _time_us(*m.groups())


def _parse_timestamp(text: str, with_zone: bool) -> tuple[int, int]:
    """(local microseconds since 2000-01-01, UTC offset in seconds) of a timestamp's text."""
    inf = _parse_infinity(text)
    if inf:
        return (TS_POS_INF if inf > 0 else TS_NEG_INF), 0
    m = _TS_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"invalid timestamp (ISO format expected): {text!r}")
    g = m.groups()
    year = _astronomical(int(g[0]), g[11])
    days = date_from_ymd(year, int(g[1]), int(g[2]))
    local = days * USECS_PER_DAY + _time_us(g[3], g[4], g[5], g[6])
    offset = 0
    if g[7] is not None:
        if not with_zone:
            raise ValueError(f"timestamp without time zone has a zone: {text!r}")
        offset = int(g[8]) * 3600 + int(g[9] or 0) * 60 + int(g[10] or 0)
        if g[7] == "-":
            offset = -offset
    return local, offset


def _check_ts(us: int) -> int:
    if us in (TS_POS_INF, TS_NEG_INF) or _TS_MIN <= us <= _TS_MAX:
        return us
    raise ValueError("timestamp out of range")


def decode_timestamptz_text(data: bytes | memoryview) -> tuple[int, int]:
    """(local microseconds since 2000-01-01, UTC offset in seconds) of timestamptz text.

    The local time is what the text shows; UTC is `local - offset * 1e6`. +-infinity come
    back as `TS_POS_INF` / `TS_NEG_INF` with offset 0.
    """
    local, offset = _parse_timestamp(_utf8(data), True)
    if local in (TS_POS_INF, TS_NEG_INF):
        return local, 0
    _check_ts(local - offset * 1_000_000)
    return local, offset


def encode_timestamptz_text(local_us: int, offset_s: int) -> bytes:
    """The text of a timestamptz shown at `local_us` in a zone `offset_s` east of UTC."""
    if local_us in (TS_POS_INF, TS_NEG_INF):
        return _timestamp_text(local_us, None).encode()
    return _timestamp_text(local_us - offset_s * 1_000_000, offset_s).encode()


# -- interval --------------------------------------------------------------------------------


class Interval(NamedTuple):
    months: int
    days: int
    micros: int


def _interval_text(iv: Interval) -> str:
    parts: list[str] = []
    is_before = False

    def add(value: int, unit: str) -> None:
        nonlocal is_before
        if value == 0:
            return
        plus = "+" if is_before and value > 0 else ""
        parts.append(f"{plus}{value} {unit}{'s' if value != 1 else ''}")
        is_before = value < 0

    years = int(iv.months / 12) if iv.months >= 0 else -(-iv.months // 12)
    add(years, "year")
    add(iv.months - years * 12, "mon")
    add(iv.days, "day")
    if not parts or iv.micros != 0:
        us = abs(iv.micros)
        secs, frac = divmod(us, 1_000_000)
        mins, sec = divmod(secs, 60)
        hour, minute = divmod(mins, 60)
        sign = "-" if iv.micros < 0 else ("+" if is_before else "")
        t = f"{sign}{hour:02d}:{minute:02d}:{sec:02d}"
        if frac:
            t += "." + f"{frac:06d}".rstrip("0")
        parts.append(t)
    return " ".join(parts)


_IV_UNIT_RE = re.compile(r"([+-]?\d+)\s+(years?|mons?|days?)", re.ASCII)
_IV_TIME_RE = re.compile(r"([+-])?(\d+):(\d{2})(?::(\d{2})(?:\.(\d{1,6})\d*)?)?", re.ASCII)


def _parse_interval(text: str) -> Interval:
    """Parse IntervalStyle postgres output (what the server sends by default)."""
    months = days = micros = 0
    rest = text.strip()
    if not rest:
        raise ValueError("empty interval")
    for token in re.split(r"\s+(?=[+-]?\d)", rest):
        if m := _IV_UNIT_RE.fullmatch(token):
            v, unit = int(m.group(1)), m.group(2)
            if unit.startswith("year"):
                months += v * 12
            elif unit.startswith("mon"):
                months += v
            else:
                days += v
        elif m := _IV_TIME_RE.fullmatch(token):
            sign, h, mi, s, frac = m.groups()
            us = ((int(h) * 60 + int(mi)) * 60 + int(s or 0)) * 1_000_000
            us += int((frac or "").ljust(6, "0") or 0)
            micros += -us if sign == "-" else us
        else:
            raise ValueError(f"invalid interval (IntervalStyle postgres expected): {text!r}")
    if not (-(2**31) <= months < 2**31 and -(2**31) <= days < 2**31 and -(2**63) <= micros < 2**63):
        raise ValueError("interval out of range")
    return Interval(months, days, micros)


# -- numeric ---------------------------------------------------------------------------------

_NUMERIC_POS: Final = 0x0000
_NUMERIC_NEG: Final = 0x4000
_NUMERIC_NAN: Final = 0xC000
_NUMERIC_PINF: Final = 0xD000
_NUMERIC_NINF: Final = 0xF000
_DEC_CONTEXT: Final = decimal.Context(prec=200_000, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN)
_NUMERIC_MAX_DSCALE: Final = 16383  # NUMERIC_DSCALE_MAX
_NUMERIC_MAX_WEIGHT_DIGITS: Final = 131072


def _numeric_text(d: decimal.Decimal) -> str:
    if d.is_nan():
        return "NaN"
    if d.is_infinite():
        return "-Infinity" if d.is_signed() else "Infinity"
    if d.is_zero():
        d = d.copy_abs()
    exp = d.as_tuple().exponent
    assert isinstance(exp, int)
    if exp > 0:
        d = d.quantize(decimal.Decimal(1), context=_DEC_CONTEXT)
    return format(d, "f")


def _parse_numeric(text: str) -> decimal.Decimal:
    t = text.strip()
    low = t.lower()
    if low in ("nan", "infinity", "+infinity", "inf", "+inf", "-infinity", "-inf"):
        if low == "nan":
            return decimal.Decimal("NaN")
        return decimal.Decimal("-Infinity" if low.startswith("-") else "Infinity")
    if not re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", t, re.ASCII):
        raise ValueError(f"invalid numeric: {text!r}")
    d = decimal.Decimal(t)
    exp = d.as_tuple().exponent
    assert isinstance(exp, int)
    if exp > 0:
        d = d.quantize(decimal.Decimal(1), context=_DEC_CONTEXT)
    elif -exp > _NUMERIC_MAX_DSCALE:
        raise ValueError("numeric scale out of range")
    return d


def _numeric_recv(data: bytes) -> decimal.Decimal:
    if len(data) < 8:
        raise ValueError("numeric: too short")
    ndigits, weight, sign, dscale = _NUMERIC_HEAD.unpack_from(data, 0)
    if ndigits < 0 or len(data) != 8 + 2 * ndigits:
        raise ValueError("numeric: bad length")
    if sign == _NUMERIC_NAN:
        return decimal.Decimal("NaN")
    if sign == _NUMERIC_PINF:
        return decimal.Decimal("Infinity")
    if sign == _NUMERIC_NINF:
        return decimal.Decimal("-Infinity")
    if sign not in (_NUMERIC_POS, _NUMERIC_NEG) or not 0 <= dscale <= _NUMERIC_MAX_DSCALE:
        raise ValueError("numeric: bad sign or scale")
    groups = struct.unpack_from(f"!{ndigits}h", data, 8)
    if any(not 0 <= g < 10000 for g in groups):
        raise ValueError("numeric: bad digit")
    digits = "".join(f"{g:04d}" for g in groups) or "0"
    # value = int(digits) * 10^(4 * (weight - ndigits + 1)), shown with dscale decimals
    exponent = 4 * (weight - ndigits + 1)
    d = decimal.Decimal(f"{'-' if sign == _NUMERIC_NEG else ''}{digits}E{exponent}")
    return d.quantize(
        decimal.Decimal(1).scaleb(-dscale), rounding=decimal.ROUND_DOWN, context=_DEC_CONTEXT
    )


def _numeric_send(d: decimal.Decimal) -> bytes:
    if d.is_nan():
        return _NUMERIC_HEAD.pack(0, 0, _NUMERIC_NAN, 0)
    if d.is_infinite():
        # The server sends the display-scale bits of its short header here: 32 for +-inf.
        return _NUMERIC_HEAD.pack(0, 0, _NUMERIC_NINF if d.is_signed() else _NUMERIC_PINF, 32)
    text = _numeric_text(d)
    neg = text.startswith("-")
    if neg:
        text = text[1:]
    int_part, _, frac = text.partition(".")
    dscale = len(frac)
    int_part = int_part.lstrip("0")
    int_part = "0" * (-len(int_part) % 4) + int_part
    frac_p = frac + "0" * (-len(frac) % 4)
    groups = [int(int_part[i : i + 4]) for i in range(0, len(int_part), 4)]
    weight = len(groups) - 1
    groups += [int(frac_p[i : i + 4]) for i in range(0, len(frac_p), 4)]
    while groups and groups[0] == 0:
        groups.pop(0)
        weight -= 1
    while groups and groups[-1] == 0:
        groups.pop()
    if not groups:
        return _NUMERIC_HEAD.pack(0, 0, _NUMERIC_POS, dscale)
    head = _NUMERIC_HEAD.pack(len(groups), weight, _NUMERIC_NEG if neg else _NUMERIC_POS, dscale)
    return head + struct.pack(f"!{len(groups)}h", *groups)


# -- floats ----------------------------------------------------------------------------------


def _shortest_digits(v: float, single: bool) -> tuple[str, int]:
    """The shortest decimal digits that read back as v, and the scientific exponent."""
    s = repr(v)
    if single:
        target = _F32.pack(v)
        for p in range(1, 10):
            s = f"{v:.{p - 1}e}"
            try:
                if _F32.pack(float(s)) == target:
                    break
            except OverflowError:  # rounded up beyond FLT_MAX: needs more digits
                continue
    d = decimal.Decimal(s)
    t = d.as_tuple()
    digits = "".join(map(str, t.digits)).rstrip("0") or "0"
    exp = t.exponent
    assert isinstance(exp, int)
    sci = exp + len(t.digits) - 1
    return digits, sci


def _float_text(v: float, single: bool) -> str:
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "Infinity" if v > 0 else "-Infinity"
    sign = "-" if math.copysign(1.0, v) < 0 else ""
    if v == 0:
        return sign + "0"
    digits, sci = _shortest_digits(abs(v), single)
    if -4 <= sci < (6 if single else 15):
        if sci >= 0:
            whole = digits[: sci + 1].ljust(sci + 1, "0")
            frac = digits[sci + 1 :]
        else:
            whole, frac = "0", "0" * (-sci - 1) + digits
        return sign + whole + ("." + frac if frac else "")
    mant = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    return f"{sign}{mant}e{'-' if sci < 0 else '+'}{abs(sci):02d}"


def _parse_float(text: str, single: bool) -> float:
    t = text.strip()
    if not re.fullmatch(
        r"[+-]?((\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|inf(inity)?|nan)", t, re.ASCII | re.IGNORECASE
    ):
        raise ValueError(f"invalid float: {text!r}")
    v = float(t)
    if single:
        try:
            (v,) = _F32.unpack(_F32.pack(v))
        except OverflowError as exc:
            raise ValueError("real out of range") from exc
    return v


# -- bytea, char, strings --------------------------------------------------------------------


def _utf8(data: bytes | memoryview) -> str:
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError("invalid UTF-8") from exc


def _bytea_text(b: bytes) -> bytes:
    return b"\\x" + b.hex().encode()


_ESC_OCT = re.compile(rb"\\([0-3][0-7]{2})|\\\\")


def _parse_bytea(data: bytes) -> bytes:
    if data.startswith(b"\\x"):
        try:
            return bytes.fromhex(data[2:].decode("ascii"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ValueError("invalid bytea hex") from exc
    out = _ESC_OCT.sub(lambda m: bytes([int(m.group(1), 8)]) if m.group(1) else b"\\", data)
    if b"\\" in _ESC_OCT.sub(b"", data):
        raise ValueError("invalid bytea escape")
    return out


def _char_text(b: bytes) -> bytes:
    if not b:
        return b""
    c = b[0]
    if c & 0x80:
        return b"\\" + f"{c:03o}".encode()
    return bytes(b[:1])


def _parse_char(data: bytes) -> bytes:
    if len(data) == 4 and data[:1] == b"\\" and all(48 <= c <= 55 for c in data[1:]):
        return bytes([int(data[1:], 8) & 0xFF])
    return bytes(data[:1])  # charin takes the first byte


# -- arrays ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PgArray:
    """An array value: its elements in row-major order (None for NULL) and its shape."""

    elements: tuple[object, ...]
    dims: tuple[int, ...]
    lbounds: tuple[int, ...]

    @classmethod
    def of(cls, elements: Sequence[object]) -> PgArray:
        """A one-dimensional array with lower bound 1 (or the empty array)."""
        if not elements:
            return cls((), (), ())
        return cls(tuple(elements), (len(elements),), (1,))


_ARRAY_SPACE: Final = " \t\n\r\v\f"
_DIMS_RE = re.compile(r"\s*([+-]?\d+)\s*:\s*([+-]?\d+)\s*", re.ASCII)
_NEEDS_QUOTE: Final = frozenset('{}"\\' + _ARRAY_SPACE)


def split_array_text(
    data: bytes | memoryview, delim: str = ","
) -> tuple[tuple[int, ...], tuple[int, ...], list[str | None]]:
    """(dims, lbounds, elements) of an array's text form; elements unquoted, None for NULL."""
    s = _utf8(data)
    n = len(s)
    pos = 0
    while pos < n and s[pos] in _ARRAY_SPACE:
        pos += 1
    given: list[tuple[int, int]] = []
    if pos < n and s[pos] == "[":
        while pos < n and s[pos] == "[":
            end = s.find("]", pos)
            m = _DIMS_RE.fullmatch(s[pos + 1 : end]) if end > 0 else None
            if m is None:
                raise ValueError("malformed array dimensions")
            lb, ub = int(m.group(1)), int(m.group(2))
            if ub < lb - 1:
                raise ValueError("array upper bound below lower bound")
            given.append((lb, ub - lb + 1))
            pos = end + 1
        while pos < n and s[pos] in _ARRAY_SPACE:
            pos += 1
        if pos >= n or s[pos] != "=":
            raise ValueError("missing '=' after array dimensions")
        pos += 1
        while pos < n and s[pos] in _ARRAY_SPACE:
            pos += 1
    if pos >= n or s[pos] != "{":
        raise ValueError("array text must start with '{'")
    elements: list[str | None] = []
    # counts[d] = number of items seen at nesting depth d in the current sub-array
    dims: list[int] = []
    counts: list[int] = []
    depth = 0
    expect_item = True
    while True:
        if pos >= n:
            raise ValueError("unterminated array")
        c = s[pos]
        if c == "{":
            if not expect_item:
                raise ValueError("unexpected '{' in array")
            if depth == len(counts):
                counts.append(0)
                if elements:
                    raise ValueError("multidimensional arrays must have matching sub-arrays")
            if depth > 0:
                counts[depth - 1] += 1
            counts[depth] = 0
            depth += 1
            pos += 1
            continue
        if c == "}":
            if depth == 0:
                raise ValueError("unbalanced '}' in array")
            depth -= 1
            cnt = counts[depth]
            if len(dims) <= depth:
                dims.extend([-1] * (depth + 1 - len(dims)))
            if dims[depth] == -1:
                dims[depth] = cnt
            elif dims[depth] != cnt:
                raise ValueError("multidimensional arrays must have matching sub-arrays")
            pos += 1
            expect_item = False
            if depth == 0:
                break
            continue
        if c in _ARRAY_SPACE:
            pos += 1
            continue
        if c == delim:
            if expect_item:
                raise ValueError("unexpected delimiter in array")
            expect_item = True
            pos += 1
            continue
        if not expect_item:
            raise ValueError("unexpected element in array")
        if depth != len(counts):
            raise ValueError("array element at the wrong nesting depth")
        # an element, quoted or not
        buf: list[str] = []
        if c == '"':
            pos += 1
            while True:
                if pos >= n:
                    raise ValueError("unterminated quoted array element")
                ch = s[pos]
                if ch == "\\":
                    if pos + 1 >= n:
                        raise ValueError("unterminated array escape")
                    buf.append(s[pos + 1])
                    pos += 2
                elif ch == '"':
                    pos += 1
                    break
                else:
                    buf.append(ch)
                    pos += 1
            elements.append("".join(buf))
        else:
            trailing = 0  # unescaped trailing whitespace is dropped
            escaped_seen = False
            while pos < n:
                ch = s[pos]
                if ch == "\\":
                    if pos + 1 >= n:
                        raise ValueError("unterminated array escape")
                    buf.append(s[pos + 1])
                    escaped_seen = True
                    trailing = 0
                    pos += 2
                    continue
                if ch in "{}" or ch == delim or ch == '"':
                    break
                buf.append(ch)
                trailing = trailing + 1 if ch in _ARRAY_SPACE else 0
                pos += 1
            if trailing:
                del buf[-trailing:]
            text = "".join(buf)
            elements.append(None if (not escaped_seen and text.upper() == "NULL") else text)
        counts[depth - 1] += 1
        expect_item = False
    rest = s[pos + 1 :]
    if rest.strip(_ARRAY_SPACE):
        raise ValueError("junk after array")
    if not elements:
        if len(dims) > 1 or (dims and dims[0] != 0):
            raise ValueError("malformed empty array")
        if given and any(size for _, size in given):
            raise ValueError("array dimensions do not match the elements")
        return (), (), []
    shape = tuple(dims)
    if given:
        if tuple(size for _, size in given) != shape:
            raise ValueError("array dimensions do not match the elements")
        return shape, tuple(lb for lb, _ in given), elements
    return shape, (1,) * len(shape), elements


def _quote_element(e: str, delim: str) -> str:
    if e == "" or e.upper() == "NULL" or delim in e or any(c in _NEEDS_QUOTE for c in e):
        return '"' + e.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return e


def join_array_text(
    dims: Sequence[int],
    lbounds: Sequence[int],
    elements: Sequence[str | None],
    delim: str = ",",
) -> bytes:
    """The text form of an array, as array_out writes it."""
    if not dims or not elements:
        return b"{}"
    items = ["NULL" if e is None else _quote_element(e, delim) for e in elements]
    for size in reversed(dims):
        items = ["{" + delim.join(items[i : i + size]) + "}" for i in range(0, len(items), size)]
    prefix = ""
    if any(lb != 1 for lb in lbounds):
        prefix = "".join(f"[{lb}:{lb + size - 1}]" for lb, size in zip(lbounds, dims, strict=True))
        prefix += "="
    return (prefix + items[0]).encode("utf-8")


def split_array_binary(
    data: bytes | memoryview,
) -> tuple[int, tuple[int, ...], tuple[int, ...], list[bytes | None]]:
    """(element type OID, dims, lbounds, raw elements) of an array's binary form."""
    b = bytes(data)
    if len(b) < 12:
        raise ValueError("array: too short")
    ndim, flags, elem = _ARRAY_HEAD.unpack_from(b, 0)
    if not 0 <= ndim <= 6 or flags not in (0, 1):
        raise ValueError("array: bad header")
    pos = 12
    dims: list[int] = []
    lbs: list[int] = []
    count = 1 if ndim else 0
    for _ in range(ndim):
        if pos + 8 > len(b):
            raise ValueError("array: too short")
        size, lb = _DIM.unpack_from(b, pos)
        pos += 8
        if size < 0:
            raise ValueError("array: negative dimension")
        dims.append(size)
        lbs.append(lb)
        count *= size
    if count > len(b):
        raise ValueError("array: too many elements")
    out: list[bytes | None] = []
    for _ in range(count):
        if pos + 4 > len(b):
            raise ValueError("array: too short")
        (size,) = _I32.unpack_from(b, pos)
        pos += 4
        if size == -1:
            out.append(None)
            continue
        if size < 0 or pos + size > len(b):
            raise ValueError("array: bad element length")
        out.append(b[pos : pos + size])
        pos += size
    if pos != len(b):
        raise ValueError("array: trailing bytes")
    if count == 0:
        return elem, (), (), []
    return elem, tuple(dims), tuple(lbs), out


def join_array_binary(
    elem_oid: int, dims: Sequence[int], lbounds: Sequence[int], elements: Sequence[bytes | None]
) -> bytes:
    """The binary form of an array, as array_send writes it."""
    if not dims or not elements:
        return _ARRAY_HEAD.pack(0, 0, elem_oid)
    has_null = any(e is None for e in elements)
    parts = [_ARRAY_HEAD.pack(len(dims), 1 if has_null else 0, elem_oid)]
    parts.extend(_DIM.pack(size, lb) for size, lb in zip(dims, lbounds, strict=True))
    for e in elements:
        if e is None:
            parts.append(b"\xff\xff\xff\xff")
        else:
            parts.append(_I32.pack(len(e)))
            parts.append(e)
    return b"".join(parts)


# -- dispatch --------------------------------------------------------------------------------


def _kind(oid: int) -> PgType:
    t = TYPES.get(oid)
    if t is None:
        raise ValueError(f"unsupported type OID {oid}")
    return t


def _int_checked(oid: int, v: int) -> int:
    lo, hi = _INT_RANGE[oid]
    if not lo <= v <= hi:
        raise ValueError(f"value {v} out of range for type {TYPES[oid].name}")
    return v


def _parse_int(text: str, oid: int) -> int:
    t = text.strip()
    if not re.fullmatch(r"[+-]?\d+", t, re.ASCII):
        raise ValueError(f"invalid integer: {text!r}")
    return _int_checked(oid, int(t))


def _parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("t", "true", "y", "yes", "on", "1"):
        return True
    if t in ("f", "false", "n", "no", "off", "0"):
        return False
    raise ValueError(f"invalid boolean: {text!r}")


def decode_text(oid: int, data: bytes | memoryview) -> object:
    """The Python value of a text-format (format 0) field of type `oid`."""
    t = _kind(oid)
    k = t.kind
    if k is Kind.BYTEA:
        return _parse_bytea(bytes(data))
    if k is Kind.CHAR:
        return _parse_char(bytes(data))
    s = _utf8(data)
    if k in (Kind.STRING, Kind.XML, Kind.JSON, Kind.JSONB):
        return s
    if k is Kind.INT or k is Kind.OID:
        return _parse_int(s, oid)
    if k is Kind.NUMERIC:
        return _parse_numeric(s)
    if k is Kind.FLOAT:
        return _parse_float(s, oid == FLOAT4)
    if k is Kind.BOOL:
        return _parse_bool(s)
    if k is Kind.DATE:
        return _parse_date(s)
    if k is Kind.TIME:
        return _parse_time(s)
    if k is Kind.TIMESTAMP:
        return _check_ts(_parse_timestamp(s, False)[0])
    if k is Kind.TIMESTAMPTZ:
        local, offset = decode_timestamptz_text(data)
        if local in (TS_POS_INF, TS_NEG_INF):
            return local
        return local - offset * 1_000_000
    if k is Kind.INTERVAL:
        return _parse_interval(s)
    if k is Kind.UUID:
        try:
            return uuid.UUID(s.strip())
        except ValueError as exc:
            raise ValueError(f"invalid uuid: {s!r}") from exc
    # arrays
    dims, lbs, elems = split_array_text(data)
    values = tuple(None if e is None else decode_text(t.elem_oid, e.encode()) for e in elems)
    return PgArray(values, dims, lbs)


def encode_text(oid: int, value: object) -> bytes:
    """The text-format (format 0) bytes of a value of type `oid`, as the server writes them."""
    t = _kind(oid)
    k = t.kind
    if k is Kind.BYTEA:
        return _bytea_text(_expect(value, bytes))
    if k is Kind.CHAR:
        return _char_text(_expect(value, bytes))
    if k in (Kind.STRING, Kind.XML, Kind.JSON, Kind.JSONB):
        return _expect(value, str).encode("utf-8")
    if k is Kind.INT or k is Kind.OID:
        return str(_int_checked(oid, _expect_int(value))).encode()
    if k is Kind.NUMERIC:
        return _numeric_text(_expect(value, decimal.Decimal)).encode()
    if k is Kind.FLOAT:
        return _float_text(_expect_float(value), oid == FLOAT4).encode()
    if k is Kind.BOOL:
        return b"t" if _expect(value, bool) else b"f"
    if k is Kind.DATE:
        return _date_text(_expect_int(value)).encode()
    if k is Kind.TIME:
        return _time_text(_expect_int(value)).encode()
    if k is Kind.TIMESTAMP:
        return _timestamp_text(_check_ts(_expect_int(value)), None).encode()
    if k is Kind.TIMESTAMPTZ:
        return _timestamp_text(_check_ts(_expect_int(value)), 0).encode()
    if k is Kind.INTERVAL:
        return _interval_text(_expect(value, Interval)).encode()
    if k is Kind.UUID:
        return str(_expect(value, uuid.UUID)).encode()
    arr = _expect(value, PgArray)
    elems = [
        None if e is None else encode_text(t.elem_oid, e).decode("utf-8") for e in arr.elements
    ]
    return join_array_text(arr.dims, arr.lbounds, elems)


def decode_binary(oid: int, data: bytes | memoryview) -> object:
    """The Python value of a binary-format (format 1) field of type `oid`."""
    t = _kind(oid)
    k = t.kind
    b = bytes(data)
    try:
        if k in (Kind.STRING, Kind.XML, Kind.JSON):
            return _utf8(b)
        if k is Kind.JSONB:
            if not b or b[0] != 1:
                raise ValueError("jsonb: unsupported version")
            return _utf8(b[1:])
        if k is Kind.BYTEA:
            return b
        if k is Kind.CHAR:
            if len(b) > 1:
                raise ValueError('"char": more than one byte')
            return b
        if k is Kind.INT or k is Kind.OID:
            (v,) = _INT_STRUCT[oid].unpack(b)
            return int(v)
        if k is Kind.FLOAT:
            (f,) = (_F32 if oid == FLOAT4 else _F64).unpack(b)
            return float(f)
        if k is Kind.NUMERIC:
            return _numeric_recv(b)
        if k is Kind.BOOL:
            if len(b) != 1:
                raise ValueError("bool: bad length")
            return b != b"\x00"
        if k is Kind.DATE:
            (days,) = _I32.unpack(b)
            return int(days)
        if k is Kind.TIME or k is Kind.TIMESTAMP or k is Kind.TIMESTAMPTZ:
            (us,) = _I64.unpack(b)
            return int(us)
        if k is Kind.INTERVAL:
            us, days, months = _INTERVAL.unpack(b)
            return Interval(months, days, us)
        if k is Kind.UUID:
            return uuid.UUID(bytes=b)
    except struct.error as exc:
        raise ValueError(f"{t.name}: bad binary value") from exc
    elem, dims, lbs, elems = split_array_binary(b)
    if elems and elem != t.elem_oid:
        raise ValueError(f"array of type {elem} where {t.elem_oid} was expected")
    values = tuple(None if e is None else decode_binary(t.elem_oid, e) for e in elems)
    return PgArray(values, dims, lbs)


def encode_binary(oid: int, value: object) -> bytes:
    """The binary-format (format 1) bytes of a value of type `oid`, as the server sends them."""
    t = _kind(oid)
    k = t.kind
    if k in (Kind.STRING, Kind.XML, Kind.JSON):
        return _expect(value, str).encode("utf-8")
    if k is Kind.JSONB:
        return b"\x01" + _expect(value, str).encode("utf-8")
    if k is Kind.BYTEA or k is Kind.CHAR:
        return _expect(value, bytes)
    if k is Kind.INT or k is Kind.OID:
        return _INT_STRUCT[oid].pack(_int_checked(oid, _expect_int(value)))
    if k is Kind.FLOAT:
        try:
            return (_F32 if oid == FLOAT4 else _F64).pack(_expect_float(value))
        except OverflowError as exc:
            raise ValueError("real out of range") from exc
    if k is Kind.NUMERIC:
        return _numeric_send(_expect(value, decimal.Decimal))
    if k is Kind.BOOL:
        return b"\x01" if _expect(value, bool) else b"\x00"
    if k is Kind.DATE:
        return _I32.pack(_expect_int(value))
    if k is Kind.TIME or k is Kind.TIMESTAMP or k is Kind.TIMESTAMPTZ:
        return _I64.pack(_expect_int(value))
    if k is Kind.INTERVAL:
        iv = _expect(value, Interval)
        return _INTERVAL.pack(iv.micros, iv.days, iv.months)
    if k is Kind.UUID:
        return _expect(value, uuid.UUID).bytes
    arr = _expect(value, PgArray)
    elems = [None if e is None else encode_binary(t.elem_oid, e) for e in arr.elements]
    return join_array_binary(t.elem_oid, arr.dims, arr.lbounds, elems)


def _expect(value: object, cls: type[_T]) -> _T:
    if not isinstance(value, cls):
        raise ValueError(f"expected {cls.__name__}, got {type(value).__name__}")
    return value


def _expect_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected int, got {type(value).__name__}")
    return value


def _expect_float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected float, got {type(value).__name__}")
    return float(value)
