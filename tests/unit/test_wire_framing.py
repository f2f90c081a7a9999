"""proxy.wire.framing: MessageReader, StartupReader and MessageScanner, fed in every way."""

from __future__ import annotations

import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wirekit import (
    bytewise,
    chunkings_of,
    data_row,
    message_streams,
    query,
    ready,
    row_desc,
)

from proxy.wire import messages as m
from proxy.wire.framing import (
    BACKEND_LIMITS,
    BACKEND_TYPES,
    FRONTEND_LIMITS,
    FRONTEND_TYPES,
    MAX_STARTUP_PACKET,
    SMALL_MESSAGE_LIMIT,
    Limits,
    MessageReader,
    MessageScanner,
    ProtocolViolation,
    StartupReader,
)
from proxy.wire.startup import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST,
    GSSENC_REQUEST_CODE,
    SSL_REQUEST,
    SSL_REQUEST_CODE,
    CancelRequest,
    StartupMessage,
)

HYP = settings(deadline=None, max_examples=200)


def read_all(reader: MessageReader, chunks: list[bytes]) -> list[tuple[int, bytes]]:
    out = []
    for chunk in chunks:
        reader.feed(chunk)
        out.extend((t, bytes(b)) for t, b in reader.messages())
    return out


def expected(msgs: list[bytes]) -> list[tuple[int, bytes]]:
    return [(msg[0], msg[5:]) for msg in msgs]


SAMPLE = [
    row_desc("id", "nik"),
    data_row("1", "3171011708900001"),
    data_row(None, b""),
    m.CommandComplete("SELECT 2").encode(),
    ready("T"),
]

# --------------------------------------------------------------------------- MessageReader


def test_reader_whole_and_bytewise_give_the_same_messages() -> None:
    data = b"".join(SAMPLE)
    assert read_all(MessageReader(BACKEND_LIMITS), [data]) == expected(SAMPLE)
    assert read_all(MessageReader(BACKEND_LIMITS), bytewise(data)) == expected(SAMPLE)


def test_reader_returns_none_until_a_message_is_whole() -> None:
    msg = data_row("abc")
    reader = MessageReader(BACKEND_LIMITS)
    for i in range(len(msg) - 1):
        reader.feed(msg[i : i + 1])
        assert reader.next_message() is None
    reader.feed(msg[-1:])
    got = reader.next_message()
    assert got is not None and got[0] == ord("D") and bytes(got[1]) == msg[5:]
    assert reader.next_message() is None
    assert reader.pending() == 0


def test_reader_next_raw_returns_the_whole_message() -> None:
    reader = MessageReader(FRONTEND_LIMITS)
    reader.feed(query("SELECT 1") + m.SYNC)
    first = reader.next_raw()
    assert first is not None
    assert first[0] == ord("Q")
    assert bytes(first[1]) == b"SELECT 1\0"
    assert bytes(first[2]) == query("SELECT 1")
    second = reader.next_raw()
    assert second is not None and bytes(second[2]) == m.SYNC and bytes(second[1]) == b""
    assert reader.next_raw() is None


def test_reader_bodies_are_not_changed_by_later_feeds() -> None:
    reader = MessageReader(BACKEND_LIMITS)
    reader.feed(data_row("first") + b"D\x00")
    got = reader.next_message()
    assert got is not None
    body = got[1]
    reader.feed(b"\x00\x00\x06\x00\x00")
    reader.feed(b"X" * 100)
    assert bytes(body) == data_row("first")[5:]


def test_reader_take_rest_returns_unread_bytes() -> None:
    reader = MessageReader(BACKEND_LIMITS)
    reader.feed(ready("I") + b"Z\x00\x00")
    assert reader.next_message() is not None
    assert reader.take_rest() == b"Z\x00\x00"
    assert reader.pending() == 0
    assert reader.next_message() is None


@given(msgs=message_streams(), data=st.data())
@HYP
def test_reader_at_random_chunk_boundaries(msgs: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(msgs)
    chunks = data.draw(chunkings_of(stream))
    assert read_all(MessageReader(BACKEND_LIMITS), chunks) == expected(msgs)


@pytest.mark.parametrize("mtype", [b"x", b"\x00", b"\xff", b"R"])
def test_reader_refuses_unknown_frontend_type_from_the_header(mtype: bytes) -> None:
    reader = MessageReader(FRONTEND_LIMITS)
    reader.feed(mtype + struct.pack("!I", 8))
    with pytest.raises(ProtocolViolation, match="invalid message type"):
        reader.next_message()


@pytest.mark.parametrize("chunk", [4096, 65536])
def test_reader_large_message_in_many_chunks_is_linear(chunk: int) -> None:
    # Fed chunk by chunk, a large message must not be re-copied on every chunk: 16 MB in
    # 4 KB chunks took seconds with a buffer that joined on each feed.
    value = bytes(range(256)) * (16 * 4096)
    msg = m.encode_data_row([value])
    reader = MessageReader(BACKEND_LIMITS)
    started = time.perf_counter()
    got = None
    for i in range(0, len(msg), chunk):
        reader.feed(msg[i : i + chunk])
        got = reader.next_raw()
        assert got is None or i + chunk >= len(msg)
    assert time.perf_counter() - started < 1.0
    assert got is not None and bytes(got[2]) == msg
    assert reader.pending() == 0


def test_reader_pending_counts_unjoined_chunks() -> None:
    reader = MessageReader(BACKEND_LIMITS)
    msg = data_row("abcdef")
    reader.feed(msg[:3])
    reader.feed(msg[3:8])
    assert reader.pending() == 8
    assert reader.next_message() is None
    assert reader.pending() == 8
    reader.feed(msg[8:] + b"Z")
    assert reader.next_message() is not None
    assert reader.pending() == 1
    assert reader.take_rest() == b"Z"


def test_reader_refuses_frontend_type_from_a_server() -> None:
    reader = MessageReader(BACKEND_LIMITS)
    reader.feed(b"Q" + struct.pack("!I", 8))  # Query is not a backend message
    with pytest.raises(ProtocolViolation, match="invalid message type 'Q'"):
        reader.next_message()


def test_reader_shows_unprintable_type_in_hex() -> None:
    reader = MessageReader(BACKEND_LIMITS)
    reader.feed(b"\x01\x00\x00\x00\x04")
    with pytest.raises(ProtocolViolation, match="0x01"):
        reader.next_message()


@pytest.mark.parametrize("length", [0, 1, 3])
def test_reader_refuses_length_below_four(length: int) -> None:
    reader = MessageReader(FRONTEND_LIMITS)
    reader.feed(b"Q" + struct.pack("!I", length))
    with pytest.raises(ProtocolViolation, match=f"invalid message length {length}"):
        reader.next_message()


@pytest.mark.parametrize("mtype", sorted(b"CcDEHSXf"))
def test_reader_refuses_oversized_small_message_before_its_body(mtype: int) -> None:
    reader = MessageReader(FRONTEND_LIMITS)
    reader.feed(bytes([mtype]) + struct.pack("!I", 20000 + 4))  # header only
    with pytest.raises(ProtocolViolation, match="over the limit of 10000"):
        reader.next_message()


def test_reader_small_cap_is_inclusive() -> None:
    reader = MessageReader(FRONTEND_LIMITS)
    body = b"S" + b"a" * (SMALL_MESSAGE_LIMIT - 2) + b"\0"
    reader.feed(m.frame(b"D", body))
    got = reader.next_message()
    assert got is not None and len(got[1]) == SMALL_MESSAGE_LIMIT


def test_reader_large_types_are_not_held_to_the_small_cap() -> None:
    reader = MessageReader(FRONTEND_LIMITS)
    sql = "SELECT '" + "x" * 50_000 + "'"
    reader.feed(query(sql))
    got = reader.next_message()
    assert got is not None and m.Query.decode(got[1]).sql == sql


def test_reader_refuses_over_max_message_before_its_body() -> None:
    limits = Limits(max_message=1000)
    reader = MessageReader(limits)
    reader.feed(b"Q" + struct.pack("!I", 1000 + 4 + 1))
    with pytest.raises(ProtocolViolation, match="1001 bytes, over the limit of 1000"):
        reader.next_message()
    ok = MessageReader(limits)
    ok.feed(b"Q" + struct.pack("!I", 1000 + 4))
    assert ok.next_message() is None  # acceptable header: waits for the body


def test_reader_refuses_huge_backend_length_from_header_alone() -> None:
    reader = MessageReader(BACKEND_LIMITS)
    reader.feed(b"D" + struct.pack("!I", 0xFFFFFFFF))
    with pytest.raises(ProtocolViolation, match="over the limit"):
        reader.next_message()


def test_next_raw_checks_limits_too() -> None:
    reader = MessageReader(FRONTEND_LIMITS)
    reader.feed(b"S" + struct.pack("!I", 20004))
    with pytest.raises(ProtocolViolation):
        reader.next_raw()


def test_type_tables() -> None:
    assert FRONTEND_TYPES == frozenset(b"BCdcfDEHFPpQSX")
    for t in b"RK23CdcGHWDIEVvnNAtS1sZT":
        assert t in BACKEND_TYPES
    assert ord("Q") not in BACKEND_TYPES
    assert ord("Z") not in FRONTEND_TYPES


# --------------------------------------------------------------------------- StartupReader


def packets(reader: StartupReader) -> list[tuple[int, bytes]]:
    out = []
    while (p := reader.next_packet()) is not None:
        out.append(p)
    return out


STARTUP = StartupMessage(196608, (("user", "alice"), ("database", "bank")))


@pytest.mark.parametrize(
    ("packet", "code", "body"),
    [
        (SSL_REQUEST, SSL_REQUEST_CODE, b""),
        (GSSENC_REQUEST, GSSENC_REQUEST_CODE, b""),
        (
            CancelRequest(99, b"\x00\x01\x02\x03").encode(),
            CANCEL_REQUEST_CODE,
            b"\x00\x00\x00\x63\x00\x01\x02\x03",
        ),
        (STARTUP.encode(), 196608, b"user\0alice\0database\0bank\0\0"),
    ],
)
@pytest.mark.parametrize("split", [False, True])
def test_startup_reader_frames_each_packet(
    packet: bytes, code: int, body: bytes, split: bool
) -> None:
    reader = StartupReader()
    chunks = bytewise(packet) if split else [packet]
    got = []
    for chunk in chunks:
        reader.feed(chunk)
        got.extend(packets(reader))
    assert got == [(code, body)]
    assert reader.pending() == 0


def test_startup_reader_take_rest_after_ssl_request() -> None:
    reader = StartupReader()
    reader.feed(SSL_REQUEST + b"\x16\x03\x01")  # a TLS ClientHello starts right after
    assert reader.next_packet() == (SSL_REQUEST_CODE, b"")
    assert reader.take_rest() == b"\x16\x03\x01"
    assert reader.take_rest() == b""


def test_startup_reader_two_packets_in_one_chunk() -> None:
    reader = StartupReader()
    reader.feed(SSL_REQUEST + STARTUP.encode())
    assert packets(reader) == [(SSL_REQUEST_CODE, b""), (196608, STARTUP.encode()[8:])]


@pytest.mark.parametrize("length", [0, 4, 7, MAX_STARTUP_PACKET + 1, 0xFFFFFFFF])
def test_startup_reader_refuses_bad_length_from_the_length_alone(length: int) -> None:
    reader = StartupReader()
    reader.feed(struct.pack("!I", length))  # nothing after the length
    with pytest.raises(ProtocolViolation, match=rf"invalid length of startup packet \({length}\)"):
        reader.next_packet()


def test_startup_reader_accepts_the_maximum_length() -> None:
    reader = StartupReader()
    packet = struct.pack("!II", MAX_STARTUP_PACKET, 196608) + b"\0" * (MAX_STARTUP_PACKET - 8)
    reader.feed(packet[:-1])
    assert reader.next_packet() is None
    reader.feed(packet[-1:])
    got = reader.next_packet()
    assert got is not None and len(got[1]) == MAX_STARTUP_PACKET - 8


def test_startup_reader_needs_four_bytes_for_a_length() -> None:
    reader = StartupReader()
    reader.feed(b"\x00\x00\x00")
    assert reader.next_packet() is None


# --------------------------------------------------------------------------- MessageScanner


def scan(
    msgs: list[bytes], chunks: list[bytes], watch: frozenset[int]
) -> tuple[list[int], list[tuple[int, bytes]], list[bool]]:
    scanner = MessageScanner(BACKEND_LIMITS, watch)
    seen: list[tuple[int, bytes]] = []
    boundaries = []
    for chunk in chunks:
        seen.extend(scanner.feed(chunk) or ())
        boundaries.append(scanner.at_boundary())
    return scanner.counts, seen, boundaries


@given(
    msgs=message_streams(),
    watch=st.frozensets(st.sampled_from(sorted(BACKEND_TYPES))),
    data=st.data(),
)
@HYP
def test_scanner_agrees_with_reader(
    msgs: list[bytes], watch: frozenset[int], data: st.DataObject
) -> None:
    stream = b"".join(msgs)
    chunks = data.draw(chunkings_of(stream))
    counts, seen, boundaries = scan(msgs, chunks, watch)

    framed = read_all(MessageReader(BACKEND_LIMITS), [stream])
    want_counts = [0] * 256
    for t, _ in framed:
        want_counts[t] += 1
    assert counts == want_counts
    assert seen == [(t, b) for t, b in framed if t in watch]

    ends = {0}
    pos = 0
    for msg in msgs:
        pos += len(msg)
        ends.add(pos)
    fed = 0
    for chunk, boundary in zip(chunks, boundaries, strict=True):
        fed += len(chunk)
        assert boundary == (fed in ends), (fed, sorted(ends))


def test_scanner_bytewise_reports_boundaries_exactly() -> None:
    msgs = [ready("I"), data_row("ab"), m.CommandComplete("SELECT 1").encode()]
    stream = b"".join(msgs)
    scanner = MessageScanner(BACKEND_LIMITS, frozenset(b"ZC"))
    ends = {len(msgs[0]), len(msgs[0]) + len(msgs[1]), len(stream)}
    seen = []
    assert scanner.at_boundary()
    for i in range(len(stream)):
        seen.extend(scanner.feed(stream[i : i + 1]) or ())
        assert scanner.at_boundary() == (i + 1 in ends)
    assert seen == [(ord("Z"), b"I"), (ord("C"), b"SELECT 1\0")]
    assert scanner.counts[ord("D")] == 1


def test_scanner_returns_bytes_not_views() -> None:
    scanner = MessageScanner(BACKEND_LIMITS, frozenset(b"Z"))
    buf = bytearray(ready("T"))
    out = scanner.feed(buf)
    buf[5] = ord("E")
    assert out == [(ord("Z"), b"T")]
    assert isinstance(out[0][1], bytes)


def test_scanner_accepts_memoryview_chunks() -> None:
    stream = ready("I") + data_row("x") + ready("E")
    scanner = MessageScanner(BACKEND_LIMITS, frozenset(b"Z"))
    view = memoryview(stream)
    out = [*(scanner.feed(view[:3]) or ()), *(scanner.feed(view[3:9]) or ())]
    out += scanner.feed(view[9:]) or ()
    assert out == [(ord("Z"), b"I"), (ord("Z"), b"E")]


def test_scanner_empty_feed_is_harmless() -> None:
    scanner = MessageScanner(BACKEND_LIMITS, frozenset(b"Z"))
    msg = ready("T")
    assert not scanner.feed(msg[:2])  # None or [] when nothing watched completed
    assert not scanner.feed(b"")
    assert scanner.feed(msg[2:]) == [(ord("Z"), b"T")]
    assert scanner.at_boundary()


@pytest.mark.parametrize("watched", [False, True])
@pytest.mark.parametrize("split_at", [1, 3, 5])
def test_scanner_checks_limits_on_split_headers(watched: bool, split_at: int) -> None:
    scanner = MessageScanner(FRONTEND_LIMITS, frozenset(b"S") if watched else frozenset())
    header = b"S" + struct.pack("!I", 20004)
    with pytest.raises(ProtocolViolation, match="over the limit"):
        scanner.feed(header[:split_at])
        scanner.feed(header[split_at:])


@pytest.mark.parametrize("watched", [False, True])
def test_scanner_refuses_bad_type_and_length(watched: bool) -> None:
    watch = frozenset(b"Q") if watched else frozenset()
    with pytest.raises(ProtocolViolation, match="invalid message type"):
        MessageScanner(FRONTEND_LIMITS, watch).feed(b"z\x00\x00\x00\x04")
    with pytest.raises(ProtocolViolation, match="invalid message length 2"):
        MessageScanner(FRONTEND_LIMITS, watch).feed(b"Q\x00\x00\x00\x02")


def test_take_run_takes_whole_messages_of_one_type_only() -> None:
    row = b"D" + struct.pack("!I", 10) + struct.pack("!hi", 1, 0)
    done = b"C" + struct.pack("!I", 13) + b"SELECT 3\x00"
    reader = MessageReader(BACKEND_LIMITS)
    reader.feed(row * 3 + done + row)
    assert reader.next_raw() is not None  # the first row, read as usual
    run, count = reader.take_run(ord("D"), 10)
    assert (bytes(run), count) == (row * 2, 2)
    assert reader.take_run(ord("D"), 10)[1] == 0  # CommandComplete stops it
    msg = reader.next_message()
    assert msg is not None and msg[0] == ord("C")
    assert reader.take_run(ord("D"), 0)[1] == 0  # the count caps it
    run, count = reader.take_run(ord("D"), 1)
    assert (bytes(run), count) == (row, 1)
    # an incomplete message stays for later, and so does one over the size limit
    reader.feed(row[:7])
    assert reader.take_run(ord("D"), 10)[1] == 0
    reader.feed(row[7:])
    assert reader.take_run(ord("D"), 10)[1] == 0  # not joined yet: next_raw joins it
    assert reader.next_raw() is not None
    small = MessageReader(
        Limits(allowed_types=frozenset({ord("D")}), small_types=frozenset(), max_message=6)
    )
    small.feed(row + b"D" + struct.pack("!I", 20) + bytes(16))
    assert small.next_raw() is not None
    assert small.take_run(ord("D"), 10)[1] == 0
    with pytest.raises(ProtocolViolation):
        small.next_raw()
