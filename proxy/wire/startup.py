"""The untyped packets of the startup phase: StartupMessage, SSLRequest, GSSENCRequest and
CancelRequest, told apart by their code."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from proxy.wire.framing import ProtocolViolation

PROTOCOL_3_0 = 196608  # 3 << 16
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

_II = struct.Struct("!II")
_I = struct.Struct("!i")

SSL_REQUEST = _II.pack(8, SSL_REQUEST_CODE)
GSSENC_REQUEST = _II.pack(8, GSSENC_REQUEST_CODE)


@dataclass(frozen=True, slots=True)
class StartupMessage:
    protocol: int
    params: tuple[tuple[str, str], ...]

    @property
    def major(self) -> int:
        return self.protocol >> 16

    @property
    def minor(self) -> int:
        return self.protocol & 0xFFFF

    def get(self, name: str, default: str | None = None) -> str | None:
        for k, v in self.params:
            if k == name:
                return v
        return default

    @property
    def user(self) -> str:
        return self.get("user") or ""

    @property
    def database(self) -> str:
        return self.get("database") or self.user

    @classmethod
    def decode(cls, protocol: int, body: bytes) -> StartupMessage:
        if not body.endswith(b"\0"):
            raise ProtocolViolation(
                "invalid startup packet layout: expected terminator as last byte"
            )
        parts = body[:-1].split(b"\0")
        if parts[-1] != b"":
            raise ProtocolViolation(
                "invalid startup packet layout: expected terminator as last byte"
            )
        parts.pop()
        if len(parts) % 2:
            raise ProtocolViolation("invalid startup packet layout: odd number of strings")
        try:
            strings = [p.decode("utf-8") for p in parts]
        except UnicodeDecodeError as exc:
            raise ProtocolViolation("invalid startup packet: not UTF-8") from exc
        pairs = tuple(zip(strings[::2], strings[1::2], strict=True))
        names = [k for k, _ in pairs]
        if "" in names:
            raise ProtocolViolation("invalid startup packet layout: empty parameter name")
        if len(set(names)) != len(names):
            raise ProtocolViolation("invalid startup packet: a parameter is given twice")
        return cls(protocol, pairs)

    def encode(self) -> bytes:
        body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in self.params) + b"\0"
        return _II.pack(len(body) + 8, self.protocol) + body


@dataclass(frozen=True, slots=True)
class CancelRequest:
    process_id: int
    secret_key: bytes

    @classmethod
    def decode(cls, body: bytes) -> CancelRequest:
        if len(body) < 8 or len(body) > 260:
            raise ProtocolViolation("invalid length of cancel request packet")
        (pid,) = _I.unpack_from(body, 0)
        return cls(pid, body[4:])

    def encode(self) -> bytes:
        return (
            _II.pack(8 + 4 + len(self.secret_key), CANCEL_REQUEST_CODE)
            + _I.pack(self.process_id)
            + self.secret_key
        )


@dataclass(frozen=True, slots=True)
class SSLRequest:
    def encode(self) -> bytes:
        return SSL_REQUEST


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    def encode(self) -> bytes:
        return GSSENC_REQUEST


StartupPacket = StartupMessage | CancelRequest | SSLRequest | GSSENCRequest


def decode_startup_packet(code: int, body: bytes) -> StartupPacket:
    """Tell a startup-phase packet by its code, as the server does."""
    if code == SSL_REQUEST_CODE:
        if body:
            raise ProtocolViolation("invalid length of SSL request packet")
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE:
        if body:
            raise ProtocolViolation("invalid length of GSSENC request packet")
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        return CancelRequest.decode(body)
    if code >> 16 != 3:
        raise ProtocolViolation(
            f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: "
            "server supports 3.0 to 3.0"
        )
    return StartupMessage.decode(code, body)
