"""Incremental framing of the PostgreSQL v3 protocol, sans-I/O.

Strategy: bytes arrive in arbitrary chunks. A reader buffers them and hands out whole messages
only; a message split across chunks is never half-consumed. The type byte and the length are
checked before a body is waited for, with limits like the server's own (a small cap for
messages that are always small, a configurable cap for the rest), so a hostile length can
neither make Topeng wait for a gigabyte nor smuggle a second message inside a first.

Two readers:
- `StartupReader` frames the untyped packets of the startup phase (StartupMessage, SSLRequest,
  GSSENCRequest, CancelRequest): int32 length, int32 code, body.
- `MessageReader` frames typed messages: byte type, int32 length (counting itself), body.
  It yields `(type, body)` where body is a memoryview into an immutable bytes buffer, so fields
  can be sliced without copying and forwarded as they came.

`MessageScanner` is the fast path for a relay that changes nothing: it forwards every byte at
once and only walks the message headers, buffering just the bodies of the few message types
the caller asked to see.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

HEADER = struct.Struct("!cI")
INT32 = struct.Struct("!I")
TYPED_HEADER = struct.Struct("!BI")

# The server refuses a startup packet longer than this (MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP_PACKET = 10_000
# The server's cap for messages that are always small (PQ_SMALL_MESSAGE_LIMIT).
SMALL_MESSAGE_LIMIT = 10_000
# Default cap for everything else; the server's own is 1 GB, a proxy holding thousands of
# sessions wants less. Configurable as `max_message_size`.
DEFAULT_MAX_MESSAGE = 256 * 1024 * 1024

# Frontend (client to server) message types, as in the PostgreSQL docs.
FRONTEND_TYPES = frozenset(b"BCdcfDEHFPpQSX")
# Frontend types the server reads with the small limit; the others may be large.
FRONTEND_SMALL = frozenset(b"CcDEHSXf")
# Backend (server to client) message types.
BACKEND_TYPES = frozenset(b"RK23CdcGHWDIEVvnNAtS1sZT")


class ProtocolViolation(Exception):
    """The peer broke the protocol; the session it belongs to must end."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Size caps for one direction of a connection."""

    max_message: int = DEFAULT_MAX_MESSAGE
    allowed_types: frozenset[int] = FRONTEND_TYPES
    small_types: frozenset[int] = FRONTEND_SMALL
    small_limit: int = SMALL_MESSAGE_LIMIT

    def check(self, mtype: int, length: int) -> None:
        """Raise ProtocolViolation if a message of this type and length is not acceptable."""
        if mtype not in self.allowed_types:
            raise ProtocolViolation(f"invalid message type {_show_type(mtype)}")
        if length < 4:
            raise ProtocolViolation(
                f"invalid message length {length} for message type {_show_type(mtype)}"
            )
        cap = self.small_limit if mtype in self.small_types else self.max_message
        if length - 4 > cap:
            raise ProtocolViolation(
                f"message of type {_show_type(mtype)} is {length - 4} bytes, "
                f"over the limit of {cap}"
            )


FRONTEND_LIMITS = Limits()
BACKEND_LIMITS = Limits(allowed_types=BACKEND_TYPES, small_types=frozenset())


def _show_type(mtype: int) -> str:
    ch = chr(mtype)
    return repr(ch) if ch.isprintable() else f"0x{mtype:02x}"


class _Buffer:
    """An immutable-bytes buffer with a read position: slices never see later writes.

    Chunks fed while a message is incomplete are only listed, and joined once the message is
    whole (`_fill`), so a large message arriving in many chunks costs linear, not quadratic,
    copying.
    """

    __slots__ = ("_buf", "_pos", "_more", "_more_len")

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0
        self._more: list[bytes] = []  # chunks fed after _buf, not joined yet
        self._more_len = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        self._more.append(bytes(data))
        self._more_len += len(data)

    def _fill(self, need: int) -> bool:
        """Make `need` bytes readable in _buf at _pos; False while they have not all arrived."""
        have = len(self._buf) - self._pos
        if have >= need:
            return True
        if have + self._more_len < need:
            return False
        if have == 0 and len(self._more) == 1:
            self._buf = self._more[0]
        else:
            self._buf = b"".join([self._buf[self._pos :], *self._more])
        self._pos = 0
        self._more.clear()
        self._more_len = 0
        return True

    def pending(self) -> int:
        return len(self._buf) - self._pos + self._more_len

    def take_rest(self) -> bytes:
        rest = b"".join([self._buf[self._pos :], *self._more])
        self._buf = b""
        self._pos = 0
        self._more.clear()
        self._more_len = 0
        return rest


class StartupReader(_Buffer):
    """Frames the untyped packets of the startup phase.

    `next_packet()` returns `(code, body)` with body after the code, or None until a whole
    packet has arrived. `take_rest()` returns what came after the last packet (after an
    SSLRequest that must be nothing: plaintext before the handshake is a protocol error).
    """

    __slots__ = ("max_packet",)

    def __init__(self, max_packet: int = MAX_STARTUP_PACKET) -> None:
        super().__init__()
        self.max_packet = max_packet

    def next_packet(self) -> tuple[int, bytes] | None:
        if not self._fill(4):
            return None
        (length,) = INT32.unpack_from(self._buf, self._pos)
        if length < 8 or length > self.max_packet:
            raise ProtocolViolation(f"invalid length of startup packet ({length})")
        if not self._fill(length):
            return None
        start = self._pos
        (code,) = INT32.unpack_from(self._buf, start + 4)
        body = self._buf[start + 8 : start + length]
        self._pos = start + length
        return code, body


class MessageReader(_Buffer):
    """Frames typed messages; `next_message()` returns `(type, body)` or None for more data."""

    __slots__ = ("limits", "_longest", "_view")

    def __init__(self, limits: Limits) -> None:
        super().__init__()
        self.limits = limits
        # The longest acceptable length field by type (-1: type not allowed), so that an
        # acceptable header costs one comparison; anything else goes to limits.check.
        self._longest = tuple(
            (limits.small_limit if t in limits.small_types else limits.max_message) + 4
            if t in limits.allowed_types
            else -1
            for t in range(256)
        )
        self._view = memoryview(b"")  # of the buffer being read

    def next_message(self) -> tuple[int, memoryview] | None:
        msg = self.next_raw()
        return None if msg is None else (msg[0], msg[1])

    def next_raw(self) -> tuple[int, memoryview, memoryview] | None:
        """Like next_message, also returning the whole message (header included)."""
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < 5:
            if not self._fill(5):
                return None
            buf = self._buf
            pos = self._pos
        mtype, length = TYPED_HEADER.unpack_from(buf, pos)
        if not 4 <= length <= self._longest[mtype]:
            self.limits.check(mtype, length)  # raises, saying what is wrong
        end = pos + 1 + length
        if end > len(buf):
            if not self._fill(1 + length):
                return None
            buf = self._buf
            pos = self._pos
            end = pos + 1 + length
        self._pos = end
        view = self._view
        if view.obj is not buf:
            view = self._view = memoryview(buf)
        return mtype, view[pos + 5 : end], view[pos:end]

    @property
    def longest(self) -> tuple[int, ...]:
        """The largest acceptable length word by type byte (-1: type not allowed)."""
        return self._longest

    def max_length(self, mtype: int) -> int:
        """The largest length word (itself included) accepted for a message of this type."""
        limits = self.limits
        cap = limits.small_limit if mtype in limits.small_types else limits.max_message
        return cap + 4

    def take_run(self, mtype: int, max_count: int) -> tuple[memoryview, int]:
        """The run of whole messages of type `mtype` (at most `max_count`) that follows, as one
        slice: (messages, count). What is not whole, too long or of another type stays unread."""
        buf = self._buf
        start = pos = self._pos
        size = len(buf)
        most = self.max_length(mtype)
        unpack = TYPED_HEADER.unpack_from
        count = 0
        while count < max_count and size - pos >= 5:
            t, length = unpack(buf, pos)
            if t != mtype or length < 4 or length > most or length > size - pos - 1:
                break
            pos += 1 + length
            count += 1
        self._pos = pos
        return memoryview(buf)[start:pos], count

    def messages(self) -> Iterable[tuple[int, memoryview]]:
        while (msg := self.next_message()) is not None:
            yield msg


class MessageScanner:
    """Walks message headers of a stream that is forwarded unchanged.

    `feed(data)` returns the messages of the types in `watch` that completed in this chunk, as
    `(type, body bytes)` (or None when there were none); every other message is skipped without
    copying. Counts of every type seen are kept in `counts` (indexed by type byte). The caller
    forwards `data` itself.

    This is the hot loop of every unrestricted session, so it is written flat: one unpack and
    a few comparisons per message, no calls unless a limit is broken.

    Two message types can be followed without copying their bodies: `status_type` (the last
    status byte of a ReadyForQuery is kept in `last_status`) and `tag_type` (`tag_seen` is set
    when a CommandComplete tag starts with one of `tag_prefixes`). They are handed out like
    watched messages only when split across chunks. `last_type` is the type of the last message
    whose header has arrived.
    """

    __slots__ = (
        "limits",
        "watch",
        "counts",
        "partial_type",
        "last_type",
        "status_type",
        "last_status",
        "tag_type",
        "tag_prefixes",
        "tag_seen",
        "_skip",
        "_head",
        "_body_type",
        "_body",
        "_need",
    )

    def __init__(
        self,
        limits: Limits,
        watch: frozenset[int],
        *,
        status_type: int = -1,
        tag_type: int = -1,
        tag_prefixes: tuple[bytes, ...] = (),
    ) -> None:
        self.limits = limits
        self.status_type = status_type
        self.tag_type = tag_type
        self.tag_prefixes = tag_prefixes
        self.watch = watch | {t for t in (status_type, tag_type) if t >= 0}
        self.last_type = -1
        self.last_status = -1
        self.tag_seen = False
        self.counts = [0] * 256
        # The type of a message counted (its header arrived) whose body has not all arrived.
        self.partial_type = -1
        self._skip = 0  # bytes of an unwatched body still to pass
        self._head = b""  # a header split across chunks
        self._body_type = -1  # type of the watched body being collected, or -1
        self._body = bytearray()
        self._need = 0  # bytes of the watched body still missing

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[int, bytes]] | None:
        if isinstance(data, memoryview):
            data = data.tobytes()
        out: list[tuple[int, bytes]] | None = None
        n = len(data)
        pos = 0
        if self._skip:
            if self._skip >= n:
                self._skip -= n
                if not self._skip:
                    self.partial_type = -1
                return None
            pos = self._skip
            self._skip = 0
            self.partial_type = -1
        elif self._body_type >= 0:
            take = min(self._need, n)
            self._body += data[:take]
            self._need -= take
            pos = take
            if self._need:
                return None
            out = [(self._body_type, bytes(self._body))]
            self.partial_type = -1
            self._body_type = -1
            self._body = bytearray()
        if self._head:
            # Complete the split header, then handle that one message like any other.
            need = 5 - len(self._head)
            self._head += bytes(data[pos : pos + need])
            if len(self._head) < 5:
                return out
            data = self._head + bytes(data[pos + need :])
            n = len(data)
            pos = 0
            self._head = b""
        limits = self.limits
        allowed = limits.allowed_types
        small = limits.small_types
        small_limit = limits.small_limit + 4
        big_limit = limits.max_message + 4
        counts = self.counts
        watch = self.watch
        status_type = self.status_type
        tag_type = self.tag_type
        unpack = TYPED_HEADER.unpack_from
        mtype = -1
        while pos < n:
            if n - pos < 5:
                self._head = bytes(data[pos:n])
                break
            mtype, length = unpack(data, pos)
            if (
                mtype not in allowed
                or length < 4
                or length > (small_limit if mtype in small else big_limit)
            ):
                limits.check(mtype, length)
            counts[mtype] += 1
            end = pos + 1 + length
            if mtype in watch:
                if end <= n:
                    if mtype == status_type and length == 5:
                        self.last_status = data[pos + 5]
                    elif mtype == tag_type:
                        if data.startswith(self.tag_prefixes, pos + 5):
                            self.tag_seen = True
                    else:
                        if out is None:
                            out = []
                        out.append((mtype, bytes(data[pos + 5 : end])))
                else:
                    self._body_type = mtype
                    self._body = bytearray(data[pos + 5 : n])
                    self._need = end - n
                    self.partial_type = mtype
                    break
            elif end > n:
                self._skip = end - n
                self.partial_type = mtype
                break
            pos = end
        if mtype >= 0:
            self.last_type = mtype
        return out

    def at_boundary(self) -> bool:
        """True when the bytes fed so far end exactly at a message boundary."""
        return not (self._skip or self._head or self._body_type >= 0)

    # The relay thread (proxy/relay.py) walks headers exactly as feed() does; these hand the
    # scanner's configuration and position to it and take them back.

    def relay_config(self) -> ScanConfig:
        """What the relay needs to walk this stream as feed() would."""
        limits = self.limits
        return (
            _table(limits.allowed_types),
            _table(limits.small_types),
            _table(self.watch),
            limits.small_limit,
            limits.max_message,
            self.status_type,
            self.tag_type,
            self.tag_prefixes,
        )

    def relay_state(self) -> ScanState:
        """Where the stream is; None while a watched body is being collected (the relay does
        not collect bodies)."""
        if self._body_type >= 0:
            return None
        return (
            self._skip,
            self._head,
            self.partial_type,
            self.last_type,
            self.last_status,
            int(self.tag_seen),
        )

    def absorb(
        self,
        skip: int,
        head: bytes,
        partial_type: int,
        last_type: int,
        last_status: int,
        tag_seen: int,
        counts: list[tuple[int, int]],
    ) -> None:
        """Take over the position the relay reached and add the messages it counted."""
        self._skip = skip
        self._head = head
        self.partial_type = partial_type
        self.last_type = last_type
        self.last_status = last_status
        self.tag_seen = bool(tag_seen)
        mine = self.counts
        for mtype, count in counts:
            mine[mtype] += count


ScanConfig = tuple[bytes, bytes, bytes, int, int, int, int, tuple[bytes, ...]]
"""(allowed, small, watch, small_limit, max_message, status_type, tag_type, tag_prefixes): the
first three as 256-byte tables indexed by message type."""

ScanState = tuple[int, bytes, int, int, int, int] | None
"""(skip, head, partial_type, last_type, last_status, tag_seen) of a MessageScanner."""


def _table(types: frozenset[int]) -> bytes:
    return bytes(1 if t in types else 0 for t in range(256))
