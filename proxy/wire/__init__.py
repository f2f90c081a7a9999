"""PostgreSQL v3 protocol, sans-I/O: bytes in, messages out, messages to bytes.

Nothing in this package does I/O or imports asyncio.
"""

from __future__ import annotations

from proxy.wire.framing import (
    BACKEND_LIMITS,
    FRONTEND_LIMITS,
    Limits,
    MessageReader,
    MessageScanner,
    ProtocolViolation,
    StartupReader,
)

__all__ = [
    "BACKEND_LIMITS",
    "FRONTEND_LIMITS",
    "Limits",
    "MessageReader",
    "MessageScanner",
    "ProtocolViolation",
    "StartupReader",
]
