"""PostgreSQL v3 messages that Topeng reads or writes, named as in the PostgreSQL docs.

Each class decodes from a message body (`decode(body)`) and encodes to the whole message,
header included (`encode()`). Messages Topeng never needs to look inside are forwarded as the
bytes they came as and have no class here beyond their type byte.

Decoding is strict: a body that is short, has trailing bytes, or lacks a string terminator
raises ProtocolViolation.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from proxy.wire.framing import ProtocolViolation

_I16 = struct.Struct("!h")
_U16 = struct.Struct("!H")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_HEAD = struct.Struct("!cI")

Body = bytes | bytearray | memoryview


class Cursor:
    """Bounds-checked reading of a message body."""

    __slots__ = ("buf", "pos", "what", "encoding")

    def __init__(self, buf: Body, what: str, encoding: str = "utf-8") -> None:
        self.buf = buf if isinstance(buf, bytes) else bytes(buf)
        self.pos = 0
        self.what = what
        self.encoding = encoding  # of strings: the connection's client_encoding

    def _need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise ProtocolViolation(f"{self.what}: message too short")

    def int16(self) -> int:
        self._need(2)
        (v,) = _I16.unpack_from(self.buf, self.pos)
        self.pos += 2
        return int(v)

    def uint16(self) -> int:
        self._need(2)
        (v,) = _U16.unpack_from(self.buf, self.pos)
        self.pos += 2
        return int(v)

    def int32(self) -> int:
        self._need(4)
        (v,) = _I32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(v)

    def uint32(self) -> int:
        self._need(4)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(v)

    def byte(self) -> int:
        self._need(1)
        v = self.buf[self.pos]
        self.pos += 1
        return v

    def raw(self, n: int) -> bytes:
        if n < 0:
            raise ProtocolViolation(f"{self.what}: negative length")
        self._need(n)
        v = self.buf[self.pos : self.pos + n]
        self.pos += n
        return v

    def cstring(self) -> str:
        end = self.buf.find(b"\0", self.pos)
        if end < 0:
            raise ProtocolViolation(f"{self.what}: string is not terminated")
        v = self.buf[self.pos : end]
        self.pos = end + 1
        try:
            return v.decode(self.encoding)
        except UnicodeDecodeError as exc:
            raise ProtocolViolation(
                f"{self.what}: invalid {self.encoding.upper()} in string"
            ) from exc

    def rest(self) -> bytes:
        v = self.buf[self.pos :]
        self.pos = len(self.buf)
        return v

    def done(self) -> None:
        if self.pos != len(self.buf):
            raise ProtocolViolation(f"{self.what}: unexpected trailing bytes")


def frame(mtype: bytes, body: bytes) -> bytes:
    """A whole typed message: type byte, length, body."""
    return _HEAD.pack(mtype, len(body) + 4) + body


def cstr(s: str, encoding: str = "utf-8") -> bytes:
    return s.encode(encoding) + b"\0"


def _int16s(values: Sequence[int]) -> bytes:
    return _I16.pack(len(values)) + b"".join(_I16.pack(v) for v in values)


def _read_int16s(c: Cursor) -> tuple[int, ...]:
    n = c.int16()
    if n < 0:
        raise ProtocolViolation(f"{c.what}: negative count")
    return tuple(c.int16() for _ in range(n))


def _fast_int16s(b: bytes, pos: int) -> tuple[tuple[int, ...], int]:
    """A count and that many int16s at `pos` (struct.error if short, ValueError if negative),
    and the position after them: the unchecked path of the decoders, whose checked path
    (Cursor) names what is wrong."""
    (n,) = _I16.unpack_from(b, pos)
    pos += 2
    if n == 0:
        return (), pos
    if n < 0:
        raise ValueError
    if n == 1:
        return _I16.unpack_from(b, pos), pos + 2
    return struct.unpack_from(f"!{n}h", b, pos), pos + 2 * n


def _read_bind(
    b: bytes, *, keep_params: bool, encoding: str = "utf-8"
) -> tuple[str, str, tuple[int, ...], tuple[bytes | None, ...], tuple[int, ...]] | None:
    """The fields of a well-formed Bind body (parameter values only if `keep_params`), or None
    for anything else: the checked decoder then says what is wrong."""
    try:
        end = b.index(0)
        portal = b[:end].decode(encoding)
        pos = b.index(0, end + 1)
        statement = b[end + 1 : pos].decode(encoding)
        pos += 1
        param_formats, pos = _fast_int16s(b, pos)
        (n,) = _I16.unpack_from(b, pos)
        pos += 2
        if n < 0:
            return None
        params: list[bytes | None] = []
        for _ in range(n):
            (size,) = _I32.unpack_from(b, pos)
            pos += 4
            if size == -1:
                if keep_params:
                    params.append(None)
                continue
            if size < 0 or pos + size > len(b):
                return None
            if keep_params:
                params.append(b[pos : pos + size])
            pos += size
        result_formats, pos = _fast_int16s(b, pos)
    except (ValueError, struct.error):  # UnicodeDecodeError is a ValueError
        return None
    if pos != len(b):
        return None
    return portal, statement, param_formats, tuple(params), result_formats


def bind_target(body: Body, encoding: str = "utf-8") -> tuple[str, str, tuple[int, ...]]:
    """(portal, statement, result formats) of a Bind body, read as strictly as Bind.decode
    reads them, without keeping the parameter values."""
    b = body if type(body) is bytes else bytes(body)
    read = _read_bind(b, keep_params=False, encoding=encoding)
    if read is not None:
        return read[0], read[1], read[4]
    bind = Bind._decode_checked(b, encoding)  # raises, saying what is wrong
    return bind.portal, bind.statement, bind.result_formats


# Describe / Close kinds by byte.
_KINDS = {ord("S"): "S", ord("P"): "P"}


def _values(values: Sequence[bytes | None]) -> bytes:
    parts = [_I16.pack(len(values))]
    for v in values:
        if v is None:
            parts.append(_I32.pack(-1))
        else:
            parts.append(_I32.pack(len(v)))
            parts.append(bytes(v))
    return b"".join(parts)


def _read_values(c: Cursor) -> tuple[bytes | None, ...]:
    n = c.int16()
    if n < 0:
        raise ProtocolViolation(f"{c.what}: negative count")
    out: list[bytes | None] = []
    for _ in range(n):
        size = c.int32()
        out.append(None if size == -1 else c.raw(size))
    return tuple(out)


# --------------------------------------------------------------------------- frontend


@dataclass(frozen=True, slots=True)
class Query:
    TYPE: ClassVar[bytes] = b"Q"
    sql: str

    @classmethod
    def decode(cls, body: Body, encoding: str = "utf-8") -> Query:
        return cls(query_sql(body, encoding))

    @classmethod
    def _decode_checked(cls, body: Body, encoding: str = "utf-8") -> Query:
        c = Cursor(body, "Query", encoding)
        sql = c.cstring()
        c.done()
        return cls(sql)

    def encode(self) -> bytes:
        return frame(self.TYPE, cstr(self.sql))


def query_sql(body: Body, encoding: str = "utf-8") -> str:
    """The SQL of a Query body, without building the message object."""
    b = body if type(body) is bytes else bytes(body)
    end = len(b) - 1
    if end >= 0 and b.find(0) == end:
        try:
            return b[:end].decode(encoding)
        except UnicodeDecodeError:
            pass
    return Query._decode_checked(b, encoding).sql  # raises, saying what is wrong


@dataclass(frozen=True, slots=True)
class Parse:
    TYPE: ClassVar[bytes] = b"P"
    name: str
    sql: str
    param_types: tuple[int, ...] = ()

    @classmethod
    def decode(cls, body: Body, encoding: str = "utf-8") -> Parse:
        c = Cursor(body, "Parse", encoding)
        name = c.cstring()
        sql = c.cstring()
        n = c.int16()
        if n < 0:
            raise ProtocolViolation("Parse: negative count")
        types = tuple(c.uint32() for _ in range(n))
        c.done()
        return cls(name, sql, types)

    def encode(self) -> bytes:
        body = (
            cstr(self.name)
            + cstr(self.sql)
            + _I16.pack(len(self.param_types))
            + b"".join(_U32.pack(t) for t in self.param_types)
        )
        return frame(self.TYPE, body)


@dataclass(frozen=True, slots=True)
class Bind:
    TYPE: ClassVar[bytes] = b"B"
    portal: str
    statement: str
    param_formats: tuple[int, ...] = ()
    params: tuple[bytes | None, ...] = ()
    result_formats: tuple[int, ...] = ()

    @classmethod
    def decode(cls, body: Body, encoding: str = "utf-8") -> Bind:
        b = body if type(body) is bytes else bytes(body)
        read = _read_bind(b, keep_params=True, encoding=encoding)
        if read is not None:
            return cls(*read)
        return cls._decode_checked(b, encoding)

    @classmethod
    def _decode_checked(cls, body: Body, encoding: str = "utf-8") -> Bind:
        c = Cursor(body, "Bind", encoding)
        portal = c.cstring()
        statement = c.cstring()
        param_formats = _read_int16s(c)
        params = _read_values(c)
        result_formats = _read_int16s(c)
        c.done()
        return cls(portal, statement, param_formats, params, result_formats)

    def encode(self) -> bytes:
        body = (
            cstr(self.portal)
            + cstr(self.statement)
            + _int16s(self.param_formats)
            + _values(self.params)
            + _int16s(self.result_formats)
        )
        return frame(self.TYPE, body)

    def result_format(self, column: int) -> int:
        """The format code (0 text, 1 binary) the client asked for one result column."""
        f = self.result_formats
        if not f:
            return 0
        if len(f) == 1:
            return f[0]
        return f[column] if column < len(f) else 0


@dataclass(frozen=True, slots=True)
class Describe:
    TYPE: ClassVar[bytes] = b"D"
    kind: str  # 'S' statement or 'P' portal
    name: str

    @classmethod
    def decode(cls, body: Body, encoding: str = "utf-8") -> Describe:
        return cls(*describe_target(body, encoding))

    @classmethod
    def _decode_checked(cls, body: Body, encoding: str = "utf-8") -> Describe:
        c = Cursor(body, "Describe", encoding)
        kind = chr(c.byte())
        if kind not in "SP":
            raise ProtocolViolation(f"Describe: invalid kind {kind!r}")
        name = c.cstring()
        c.done()
        return cls(kind, name)

    def encode(self) -> bytes:
        return frame(self.TYPE, self.kind.encode() + cstr(self.name))


@dataclass(frozen=True, slots=True)
class Execute:
    TYPE: ClassVar[bytes] = b"E"
    portal: str
    max_rows: int = 0

    @classmethod
    def decode(cls, body: Body, encoding: str = "utf-8") -> Execute:
        return cls(*execute_target(body, encoding))

    @classmethod
    def _decode_checked(cls, body: Body, encoding: str = "utf-8") -> Execute:
        c = Cursor(body, "Execute", encoding)
        portal = c.cstring()
        max_rows = c.int32()
        c.done()
        return cls(portal, max_rows)

    def encode(self) -> bytes:
        return frame(self.TYPE, cstr(self.portal) + _I32.pack(self.max_rows))


def describe_target(body: Body, encoding: str = "utf-8") -> tuple[str, str]:
    """(kind, name) of a Describe body, without building the message object."""
    b = body if type(body) is bytes else bytes(body)
    last = len(b) - 1
    if last >= 1 and b.find(0, 1) == last:
        kind = _KINDS.get(b[0])
        if kind is not None:
            try:
                return kind, b[1:last].decode(encoding)
            except UnicodeDecodeError:
                pass
    checked = Describe._decode_checked(b, encoding)  # raises, saying what is wrong
    return checked.kind, checked.name


def execute_target(body: Body, encoding: str = "utf-8") -> tuple[str, int]:
    """(portal, max_rows) of an Execute body, without building the message object."""
    b = body if type(body) is bytes else bytes(body)
    end = b.find(0)
    if end >= 0 and len(b) == end + 5:
        try:
            return b[:end].decode(encoding), _I32.unpack_from(b, end + 1)[0]
        except UnicodeDecodeError:
            pass
    checked = Execute._decode_checked(b, encoding)  # raises, saying what is wrong
    return checked.portal, checked.max_rows


@dataclass(frozen=True, slots=True)
class Close:
    TYPE: ClassVar[bytes] = b"C"
    kind: str  # 'S' or 'P'
    name: str

    @classmethod
    def decode(cls, body: Body, encoding: str = "utf-8") -> Close:
        c = Cursor(body, "Close", encoding)
        kind = chr(c.byte())
        if kind not in "SP":
            raise ProtocolViolation(f"Close: invalid kind {kind!r}")
        name = c.cstring()
        c.done()
        return cls(kind, name)

    def encode(self) -> bytes:
        return frame(self.TYPE, self.kind.encode() + cstr(self.name))


@dataclass(frozen=True, slots=True)
class FunctionCall:
    TYPE: ClassVar[bytes] = b"F"
    function_oid: int
    arg_formats: tuple[int, ...] = ()
    args: tuple[bytes | None, ...] = ()
    result_format: int = 0

    @classmethod
    def decode(cls, body: Body) -> FunctionCall:
        c = Cursor(body, "FunctionCall")
        oid = c.uint32()
        arg_formats = _read_int16s(c)
        args = _read_values(c)
        result_format = c.int16()
        c.done()
        return cls(oid, arg_formats, args, result_format)

    def encode(self) -> bytes:
        body = (
            _U32.pack(self.function_oid)
            + _int16s(self.arg_formats)
            + _values(self.args)
            + _I16.pack(self.result_format)
        )
        return frame(self.TYPE, body)


@dataclass(frozen=True, slots=True)
class CopyFail:
    TYPE: ClassVar[bytes] = b"f"
    message: str

    @classmethod
    def decode(cls, body: Body, encoding: str = "utf-8") -> CopyFail:
        c = Cursor(body, "CopyFail", encoding)
        msg = c.cstring()
        c.done()
        return cls(msg)

    def encode(self) -> bytes:
        return frame(self.TYPE, cstr(self.message))


SYNC = b"S\x00\x00\x00\x04"
FLUSH = b"H\x00\x00\x00\x04"
TERMINATE = b"X\x00\x00\x00\x04"
COPY_DONE = b"c\x00\x00\x00\x04"

# --------------------------------------------------------------------------- both ways


@dataclass(frozen=True, slots=True)
class CopyData:
    TYPE: ClassVar[bytes] = b"d"
    data: bytes

    @classmethod
    def decode(cls, body: Body) -> CopyData:
        return cls(bytes(body))

    def encode(self) -> bytes:
        return frame(self.TYPE, self.data)


# --------------------------------------------------------------------------- backend

AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


@dataclass(frozen=True, slots=True)
class Authentication:
    """Any AuthenticationXXX message: the code and whatever data follows it."""

    TYPE: ClassVar[bytes] = b"R"
    code: int
    data: bytes = b""

    @classmethod
    def decode(cls, body: Body) -> Authentication:
        c = Cursor(body, "Authentication")
        code = c.int32()
        return cls(code, c.rest())

    def encode(self) -> bytes:
        return frame(self.TYPE, _I32.pack(self.code) + self.data)


AUTHENTICATION_OK = Authentication(AUTH_OK).encode()


@dataclass(frozen=True, slots=True)
class BackendKeyData:
    TYPE: ClassVar[bytes] = b"K"
    process_id: int
    secret_key: bytes  # 4 bytes in protocol 3.0; longer in 3.2

    @classmethod
    def decode(cls, body: Body) -> BackendKeyData:
        c = Cursor(body, "BackendKeyData")
        pid = c.int32()
        key = c.rest()
        if not 4 <= len(key) <= 256:
            raise ProtocolViolation("BackendKeyData: invalid secret key length")
        return cls(pid, key)

    def encode(self) -> bytes:
        return frame(self.TYPE, _I32.pack(self.process_id) + self.secret_key)


@dataclass(frozen=True, slots=True)
class ParameterStatus:
    TYPE: ClassVar[bytes] = b"S"
    name: str
    value: str

    @classmethod
    def decode(cls, body: Body) -> ParameterStatus:
        c = Cursor(body, "ParameterStatus")
        name = c.cstring()
        value = c.cstring()
        c.done()
        return cls(name, value)

    def encode(self) -> bytes:
        return frame(self.TYPE, cstr(self.name) + cstr(self.value))


@dataclass(frozen=True, slots=True)
class ReadyForQuery:
    TYPE: ClassVar[bytes] = b"Z"
    status: str  # 'I' idle, 'T' in a transaction, 'E' in a failed transaction

    @classmethod
    def decode(cls, body: Body) -> ReadyForQuery:
        if len(body) == 1:
            known = _READY.get(body[0])
            if known is not None:
                return known
        return cls._decode_checked(body)

    @classmethod
    def _decode_checked(cls, body: Body) -> ReadyForQuery:
        c = Cursor(body, "ReadyForQuery")
        status = chr(c.byte())
        c.done()
        if status not in "ITE":
            raise ProtocolViolation(f"ReadyForQuery: invalid status {status!r}")
        return cls(status)

    def encode(self) -> bytes:
        return frame(self.TYPE, self.status.encode())


# The three ReadyForQuery messages, by status byte (they are immutable: decode hands them out).
_READY = {ord(s): ReadyForQuery(s) for s in "ITE"}


@dataclass(frozen=True, slots=True)
class CommandComplete:
    TYPE: ClassVar[bytes] = b"C"
    tag: str

    @classmethod
    def decode(cls, body: Body, encoding: str = "utf-8") -> CommandComplete:
        c = Cursor(body, "CommandComplete", encoding)
        tag = c.cstring()
        c.done()
        return cls(tag)

    def encode(self) -> bytes:
        return frame(self.TYPE, cstr(self.tag))


@dataclass(frozen=True, slots=True)
class FieldDescription:
    name: str
    table_oid: int
    column: int
    type_oid: int
    type_size: int
    type_modifier: int
    format: int

    _TAIL: ClassVar[struct.Struct] = struct.Struct("!IhIhih")


@dataclass(frozen=True, slots=True)
class RowDescription:
    TYPE: ClassVar[bytes] = b"T"
    fields: tuple[FieldDescription, ...]

    @classmethod
    def decode(cls, body: Body, encoding: str = "utf-8") -> RowDescription:
        c = Cursor(body, "RowDescription", encoding)
        n = c.int16()
        if n < 0:
            raise ProtocolViolation("RowDescription: negative count")
        tail = FieldDescription._TAIL
        out = []
        for _ in range(n):
            name = c.cstring()
            c._need(tail.size)
            vals = tail.unpack_from(c.buf, c.pos)
            c.pos += tail.size
            out.append(FieldDescription(name, *vals))
        c.done()
        return cls(tuple(out))

    def encode(self, encoding: str = "utf-8") -> bytes:
        tail = FieldDescription._TAIL
        parts = [_I16.pack(len(self.fields))]
        for f in self.fields:
            parts.append(cstr(f.name, encoding))
            parts.append(
                tail.pack(f.table_oid, f.column, f.type_oid, f.type_size, f.type_modifier, f.format)
            )
        return frame(self.TYPE, b"".join(parts))


@dataclass(frozen=True, slots=True)
class DataRow:
    TYPE: ClassVar[bytes] = b"D"
    values: tuple[bytes | memoryview | None, ...]

    @classmethod
    def decode(cls, body: Body) -> DataRow:
        return cls(split_data_row(body))

    def encode(self) -> bytes:
        return encode_data_row(self.values)


def split_data_row(body: Body) -> tuple[memoryview | None, ...]:
    """The fields of a DataRow body as memoryviews (None for NULL), without copying."""
    view = body if isinstance(body, memoryview) else memoryview(body)
    if len(view) < 2:
        raise ProtocolViolation("DataRow: message too short")
    (n,) = _I16.unpack_from(view, 0)
    if n < 0:
        raise ProtocolViolation("DataRow: negative count")
    pos = 2
    end = len(view)
    out: list[memoryview | None] = []
    unpack = _I32.unpack_from
    for _ in range(n):
        if pos + 4 > end:
            raise ProtocolViolation("DataRow: message too short")
        (size,) = unpack(view, pos)
        pos += 4
        if size == -1:
            out.append(None)
            continue
        if size < 0 or pos + size > end:
            raise ProtocolViolation("DataRow: invalid field length")
        out.append(view[pos : pos + size])
        pos += size
    if pos != end:
        raise ProtocolViolation("DataRow: unexpected trailing bytes")
    return tuple(out)


def encode_data_row(values: Sequence[bytes | memoryview | None]) -> bytes:
    parts: list[bytes | memoryview] = [_I16.pack(len(values))]
    size = 2
    for v in values:
        if v is None:
            parts.append(b"\xff\xff\xff\xff")
            size += 4
        else:
            parts.append(_I32.pack(len(v)))
            parts.append(v)
            size += 4 + len(v)
    return _HEAD.pack(b"D", size + 4) + b"".join(parts)


@dataclass(frozen=True, slots=True)
class ParameterDescription:
    TYPE: ClassVar[bytes] = b"t"
    type_oids: tuple[int, ...]

    @classmethod
    def decode(cls, body: Body) -> ParameterDescription:
        c = Cursor(body, "ParameterDescription")
        n = c.uint16()
        oids = tuple(c.uint32() for _ in range(n))
        c.done()
        return cls(oids)

    def encode(self) -> bytes:
        return frame(
            self.TYPE,
            _U16.pack(len(self.type_oids)) + b"".join(_U32.pack(o) for o in self.type_oids),
        )


@dataclass(frozen=True, slots=True)
class CopyResponse:
    """CopyInResponse ('G'), CopyOutResponse ('H') or CopyBothResponse ('W')."""

    kind: bytes
    format: int  # 0 text, 1 binary (overall)
    column_formats: tuple[int, ...] = ()

    @classmethod
    def decode_as(cls, kind: bytes, body: Body) -> CopyResponse:
        c = Cursor(body, "CopyResponse")
        fmt = c.byte()
        cols = _read_int16s(c)
        c.done()
        return cls(kind, fmt, cols)

    def encode(self) -> bytes:
        return frame(self.kind, bytes([self.format]) + _int16s(self.column_formats))


@dataclass(frozen=True, slots=True)
class NotificationResponse:
    TYPE: ClassVar[bytes] = b"A"
    process_id: int
    channel: str
    payload: str

    @classmethod
    def decode(cls, body: Body, encoding: str = "utf-8") -> NotificationResponse:
        c = Cursor(body, "NotificationResponse", encoding)
        pid = c.int32()
        channel = c.cstring()
        payload = c.cstring()
        c.done()
        return cls(pid, channel, payload)

    def encode(self) -> bytes:
        return frame(
            self.TYPE, _I32.pack(self.process_id) + cstr(self.channel) + cstr(self.payload)
        )


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion:
    TYPE: ClassVar[bytes] = b"v"
    newest_minor: int
    unrecognized: tuple[str, ...] = ()

    @classmethod
    def decode(cls, body: Body) -> NegotiateProtocolVersion:
        c = Cursor(body, "NegotiateProtocolVersion")
        minor = c.int32()
        n = c.int32()
        if n < 0:
            raise ProtocolViolation("NegotiateProtocolVersion: negative count")
        names = tuple(c.cstring() for _ in range(n))
        c.done()
        return cls(minor, names)

    def encode(self) -> bytes:
        body = _I32.pack(self.newest_minor) + _I32.pack(len(self.unrecognized))
        return frame(self.TYPE, body + b"".join(cstr(n) for n in self.unrecognized))


# ErrorResponse and NoticeResponse field codes.
SEVERITY = "S"
SEVERITY_NONLOCALIZED = "V"
SQLSTATE = "C"
MESSAGE = "M"
DETAIL = "D"
HINT = "H"
POSITION = "P"


@dataclass(frozen=True, slots=True)
class ErrorFields:
    """The body shared by ErrorResponse ('E') and NoticeResponse ('N'): code -> text."""

    fields: tuple[tuple[str, str], ...]

    @classmethod
    def decode(cls, body: Body, encoding: str = "utf-8") -> ErrorFields:
        c = Cursor(body, "ErrorResponse", encoding)
        out = []
        while True:
            code = c.byte()
            if code == 0:
                break
            out.append((chr(code), c.cstring()))
        c.done()
        return cls(tuple(out))

    def get(self, code: str, default: str = "") -> str:
        for k, v in self.fields:
            if k == code:
                return v
        return default

    @property
    def sqlstate(self) -> str:
        return self.get(SQLSTATE)

    @property
    def message(self) -> str:
        return self.get(MESSAGE)

    @property
    def severity(self) -> str:
        return self.get(SEVERITY_NONLOCALIZED) or self.get(SEVERITY)

    def encode_as(self, mtype: bytes, encoding: str = "utf-8") -> bytes:
        body = b"".join(k.encode() + cstr(v, encoding) for k, v in self.fields) + b"\0"
        return frame(mtype, body)


def error_severity(body: Body) -> str:
    """The severity of an ErrorResponse or NoticeResponse body, read without decoding its text:
    the other fields are in the connection's client_encoding, the severity keywords that matter
    ('ERROR', 'FATAL', 'PANIC') are ASCII. The non-localized field (V) if there is one, else the
    localized one (S); "" if the body has neither or is malformed."""
    b = body if type(body) is bytes else bytes(body)
    pos, localized = 0, ""
    while pos < len(b) and b[pos] != 0:
        end = b.find(0, pos + 1)
        if end < 0:
            break
        code = b[pos]
        if code == 0x56:  # 'V'
            return b[pos + 1 : end].decode("latin-1")
        if code == 0x53:  # 'S'
            localized = b[pos + 1 : end].decode("latin-1")
        pos = end + 1
    return localized


def error_response(
    sqlstate: str,
    message: str,
    *,
    severity: str = "ERROR",
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    """An ErrorResponse as the server would write it."""
    fields = [(SEVERITY, severity), (SEVERITY_NONLOCALIZED, severity), (SQLSTATE, sqlstate)]
    fields.append((MESSAGE, message))
    if detail:
        fields.append((DETAIL, detail))
    if hint:
        fields.append((HINT, hint))
    return ErrorFields(tuple(fields)).encode_as(b"E")


def notice_response(message: str, *, severity: str = "NOTICE", sqlstate: str = "00000") -> bytes:
    fields = ((SEVERITY, severity), (SEVERITY_NONLOCALIZED, severity), (SQLSTATE, sqlstate))
    return ErrorFields((*fields, (MESSAGE, message))).encode_as(b"N")


EMPTY_QUERY_RESPONSE = b"I\x00\x00\x00\x04"
PARSE_COMPLETE = b"1\x00\x00\x00\x04"
BIND_COMPLETE = b"2\x00\x00\x00\x04"
CLOSE_COMPLETE = b"3\x00\x00\x00\x04"
NO_DATA = b"n\x00\x00\x00\x04"
PORTAL_SUSPENDED = b"s\x00\x00\x00\x04"


@dataclass(frozen=True, slots=True)
class FunctionCallResponse:
    TYPE: ClassVar[bytes] = b"V"
    value: bytes | None

    @classmethod
    def decode(cls, body: Body) -> FunctionCallResponse:
        c = Cursor(body, "FunctionCallResponse")
        size = c.int32()
        value = None if size == -1 else c.raw(size)
        c.done()
        return cls(value)

    def encode(self) -> bytes:
        if self.value is None:
            return frame(self.TYPE, _I32.pack(-1))
        return frame(self.TYPE, _I32.pack(len(self.value)) + self.value)


__all__ = [
    "Authentication",
    "BackendKeyData",
    "Bind",
    "Close",
    "CommandComplete",
    "CopyData",
    "CopyFail",
    "CopyResponse",
    "Cursor",
    "DataRow",
    "Describe",
    "ErrorFields",
    "Execute",
    "FieldDescription",
    "FunctionCall",
    "FunctionCallResponse",
    "NegotiateProtocolVersion",
    "NotificationResponse",
    "ParameterDescription",
    "ParameterStatus",
    "Parse",
    "Query",
    "ReadyForQuery",
    "RowDescription",
    "error_response",
    "notice_response",
    "split_data_row",
]
