"""A tiny raw PostgreSQL v3 protocol client for the differential and operations tests.

Strategy: blocking sockets and hand-built messages, so a test says exactly which bytes go out
and sees every message that comes back, `(type, body)` as the server framed it. It
authenticates with trust, cleartext, md5 or SCRAM-SHA-256 (RFC 5802/7677, written out here with
hashlib and hmac), and knows nothing else: no types, no state, no retries.

Also here, because every client test module needs it: `unrestricted_rules()`, a rules file in
which the test users are unrestricted (the bank rules would give them the restricted default
role), and `start_modes()` / `MODES`: one Topeng per relay mode, the fast path and
`--track-all` (every message parsed, the reply queue kept, nothing changed).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness import PgServer, TopengProcess, start_topeng

PROTOCOL_3 = 196608
CANCEL_CODE = 80877102
SSL_CODE = 80877103

Message = tuple[bytes, bytes]  # (type byte, body)

MODES = ("fast", "tracked")
MODE_ARGS: dict[str, tuple[str, ...]] = {"fast": (), "tracked": ("--track-all",)}

UNRESTRICTED_RULES = """\
version: 1
roles:
  dba: {users: [postgres, "dba_*", alice, md5user, plainuser], unrestricted: true}
  agent: {users: ["agent_*", "ai_*"], statements: [select], max_rows_per_query: 50}
default_role: agent
"""


def unrestricted_rules(directory: Path) -> Path:
    """Write the client tests' rules (test users unrestricted) into `directory`."""
    path = directory / "clients.yaml"
    path.write_text(UNRESTRICTED_RULES)
    return path


class RawError(AssertionError):
    """The server (or Topeng) said something a raw test did not expect."""


# -- message builders (frontend) ------------------------------------------------------------------


def _msg(mtype: bytes, body: bytes) -> bytes:
    return mtype + struct.pack("!I", len(body) + 4) + body


def _cstr(text: str | bytes) -> bytes:
    return (text.encode() if isinstance(text, str) else text) + b"\0"


def startup_message(params: dict[str, str]) -> bytes:
    body = struct.pack("!I", PROTOCOL_3)
    body += b"".join(_cstr(k) + _cstr(v) for k, v in params.items()) + b"\0"
    return struct.pack("!I", len(body) + 4) + body


def cancel_request(process_id: int, secret_key: int) -> bytes:
    return struct.pack("!IIII", 16, CANCEL_CODE, process_id, secret_key)


def query(sql: str) -> bytes:
    return _msg(b"Q", _cstr(sql))


def parse(name: str, sql: str, param_types: Sequence[int] = ()) -> bytes:
    body = _cstr(name) + _cstr(sql) + struct.pack("!H", len(param_types))
    body += b"".join(struct.pack("!I", t) for t in param_types)
    return _msg(b"P", body)


def bind(
    portal: str,
    statement: str,
    params: Sequence[bytes | None] = (),
    *,
    param_formats: Sequence[int] = (),
    result_formats: Sequence[int] = (),
) -> bytes:
    body = _cstr(portal) + _cstr(statement)
    body += struct.pack(f"!H{len(param_formats)}H", len(param_formats), *param_formats)
    body += struct.pack("!H", len(params))
    for value in params:
        if value is None:
            body += struct.pack("!i", -1)
        else:
            body += struct.pack("!i", len(value)) + value
    body += struct.pack(f"!H{len(result_formats)}H", len(result_formats), *result_formats)
    return _msg(b"B", body)


def describe(kind: str, name: str = "") -> bytes:
    return _msg(b"D", kind.encode() + _cstr(name))


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return _msg(b"E", _cstr(portal) + struct.pack("!I", max_rows))


def close(kind: str, name: str = "") -> bytes:
    return _msg(b"C", kind.encode() + _cstr(name))


def function_call(
    oid: int,
    args: Sequence[bytes | None],
    *,
    arg_formats: Sequence[int] = (1,),
    result_format: int = 1,
) -> bytes:
    body = struct.pack("!I", oid)
    body += struct.pack(f"!H{len(arg_formats)}H", len(arg_formats), *arg_formats)
    body += struct.pack("!H", len(args))
    for value in args:
        if value is None:
            body += struct.pack("!i", -1)
        else:
            body += struct.pack("!i", len(value)) + value
    body += struct.pack("!H", result_format)
    return _msg(b"F", body)


def copy_data(data: bytes) -> bytes:
    return _msg(b"d", data)


def copy_fail(message: str) -> bytes:
    return _msg(b"f", _cstr(message))


SYNC = _msg(b"S", b"")
FLUSH = _msg(b"H", b"")
COPY_DONE = _msg(b"c", b"")
TERMINATE = _msg(b"X", b"")


# -- reading replies ------------------------------------------------------------------------------


def error_fields(body: bytes) -> dict[str, str]:
    """ErrorResponse / NoticeResponse body -> {field code: value}, e.g. {"C": "57014"}."""
    out: dict[str, str] = {}
    for part in body.split(b"\0"):
        if part:
            out[chr(part[0])] = part[1:].decode(errors="replace")
    return out


def errors_in(messages: Iterable[Message]) -> list[dict[str, str]]:
    return [error_fields(body) for mtype, body in messages if mtype == b"E"]


@dataclass
class RawConn:
    """One blocking connection; `startup` holds every message up to the first ReadyForQuery."""

    sock: socket.socket
    startup: list[Message] = field(default_factory=list)
    backend_key: tuple[int, int] | None = None
    chunk_size: int = 0  # > 0: send() writes pieces this small, one system call each
    _buf: bytes = b""

    # -- low level

    def send(self, data: bytes) -> None:
        if self.chunk_size <= 0:
            self.sock.sendall(data)
            return
        for i in range(0, len(data), self.chunk_size):
            self.sock.sendall(data[i : i + self.chunk_size])

    def _recv_exactly(self, n: int, deadline: float) -> bytes:
        while len(self._buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no complete reply within the timeout; have {self._buf!r}")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionResetError(f"connection closed; unread: {self._buf!r}")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def read_message(self, timeout: float = 10.0) -> Message:
        deadline = time.monotonic() + timeout
        header = self._recv_exactly(5, deadline)
        mtype, length = header[:1], struct.unpack("!I", header[1:])[0]
        return mtype, self._recv_exactly(length - 4, deadline)

    def read_until_ready(self, count: int = 1, timeout: float = 10.0) -> list[Message]:
        """Every message up to and including the `count`-th ReadyForQuery."""
        deadline = time.monotonic() + timeout
        out: list[Message] = []
        while count > 0:
            msg = self.read_message(max(deadline - time.monotonic(), 0.001))
            out.append(msg)
            if msg[0] == b"Z":
                count -= 1
        return out

    def read_until(self, mtype: bytes, timeout: float = 10.0) -> list[Message]:
        """Every message up to and including the first of type `mtype`."""
        deadline = time.monotonic() + timeout
        out: list[Message] = []
        while True:
            msg = self.read_message(max(deadline - time.monotonic(), 0.001))
            out.append(msg)
            if msg[0] == mtype:
                return out

    def read_to_eof(self, timeout: float = 10.0) -> list[Message]:
        """Every message until the peer closes the connection (raises TimeoutError if not)."""
        deadline = time.monotonic() + timeout
        out: list[Message] = []
        while True:
            try:
                out.append(self.read_message(max(deadline - time.monotonic(), 0.001)))
            except (ConnectionResetError, BrokenPipeError):
                return out

    def roundtrip(self, data: bytes, count: int = 1, timeout: float = 10.0) -> list[Message]:
        self.send(data)
        return self.read_until_ready(count, timeout)

    def close(self) -> None:
        try:
            self.sock.sendall(TERMINATE)
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_socket(host: str, port: int, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def connect(
    host: str,
    port: int,
    user: str,
    password: str | None,
    database: str,
    *,
    params: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> RawConn:
    """Connect and authenticate; raises RawError with the server's error if refused."""
    conn = RawConn(open_socket(host, port, timeout))
    try:
        conn.send(startup_message({"user": user, "database": database, **(params or {})}))
        _authenticate(conn, user, password, timeout)
    except BaseException:
        conn.sock.close()
        raise
    return conn


def _authenticate(conn: RawConn, user: str, password: str | None, timeout: float) -> None:
    scram: _Scram | None = None
    while True:
        mtype, body = conn.read_message(timeout)
        conn.startup.append((mtype, body))
        if mtype == b"E":
            raise RawError(f"connection refused: {error_fields(body)}")
        if mtype == b"K":
            conn.backend_key = struct.unpack("!II", body[:8])
        if mtype == b"Z":
            return
        if mtype != b"R":
            continue
        code = struct.unpack("!I", body[:4])[0]
        if code == 0:
            continue
        if password is None:
            raise RawError(f"the server wants a password (authentication request {code})")
        if code == 3:  # cleartext
            conn.send(_msg(b"p", _cstr(password)))
        elif code == 5:  # md5: md5(md5(password + user) + salt)
            inner = hashlib.md5((password + user).encode()).hexdigest().encode()
            outer = hashlib.md5(inner + body[4:8]).hexdigest()
            conn.send(_msg(b"p", _cstr("md5" + outer)))
        elif code == 10:  # SASL: mechanism list
            if b"SCRAM-SHA-256\0" not in body[4:]:
                raise RawError(f"no SCRAM-SHA-256 in {body[4:]!r}")
            scram = _Scram(password)
            first = scram.client_first()
            conn.send(_msg(b"p", _cstr("SCRAM-SHA-256") + struct.pack("!I", len(first)) + first))
        elif code == 11 and scram is not None:
            conn.send(_msg(b"p", scram.client_final(body[4:])))
        elif code == 12 and scram is not None:
            scram.verify_server(body[4:])
        else:
            raise RawError(f"unsupported authentication request {code}")


class _Scram:
    """The client side of SCRAM-SHA-256 without channel binding."""

    def __init__(self, password: str) -> None:
        self.password = password.encode()
        self.nonce = base64.b64encode(os.urandom(18)).decode()
        self.first_bare = f"n=,r={self.nonce}"
        self.auth_message = b""
        self.salted = b""

    def client_first(self) -> bytes:
        return ("n,," + self.first_bare).encode()

    def client_final(self, server_first: bytes) -> bytes:
        attrs = dict(part.split("=", 1) for part in server_first.decode().split(","))
        if not attrs["r"].startswith(self.nonce):
            raise RawError("SCRAM: the server's nonce does not extend ours")
        self.salted = hashlib.pbkdf2_hmac(
            "sha256", self.password, base64.b64decode(attrs["s"]), int(attrs["i"])
        )
        client_key = hmac.digest(self.salted, b"Client Key", "sha256")
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = f"c=biws,r={attrs['r']}"
        self.auth_message = f"{self.first_bare},{server_first.decode()},{without_proof}".encode()
        signature = hmac.digest(stored_key, self.auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify_server(self, server_final: bytes) -> None:
        server_key = hmac.digest(self.salted, b"Server Key", "sha256")
        expected = hmac.digest(server_key, self.auth_message, "sha256")
        if server_final.decode() != "v=" + base64.b64encode(expected).decode():
            raise RawError("SCRAM: the server's signature is wrong")


def send_cancel(host: str, port: int, key: tuple[int, int], timeout: float = 10.0) -> None:
    """A CancelRequest on a new connection; waits until the other side closes it."""
    with open_socket(host, port, timeout) as sock:
        sock.sendall(cancel_request(*key))
        sock.settimeout(timeout)
        try:
            while sock.recv(1024):
                pass
        except OSError:
            pass


def start_mode(pg: PgServer, mode: str, directory: Path) -> TopengProcess:
    """A Topeng in front of `pg` in relay mode `mode`, with the unrestricted client rules."""
    rules = unrestricted_rules(directory)
    return start_topeng(pg, *MODE_ARGS[mode], rules=rules, log_dir=directory)
