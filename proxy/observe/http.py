"""The HTTP endpoint: /metrics (Prometheus text format), /healthz and /readyz.

A few lines of HTTP/1.0 on the event loop: nothing here must ever block the proxy.

- /healthz: 200 while the process runs its event loop (liveness: restart it if this fails).
- /readyz: 200 when the rules are loaded and the upstream accepts a TCP connection, else 503
  with the reason (readiness: send it no new clients while this fails).
- /metrics: this process's metrics, or with `--workers N` the sum over all workers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy.observe import multiproc, tally
from proxy.observe.metrics import REGISTRY

PATHS = ("/metrics", "/healthz", "/readyz")

ReadyCheck = Callable[[], Awaitable[tuple[bool, str]]]


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


async def _handle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ready: ReadyCheck
) -> None:
    try:
        request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
        line = request.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split()
        method, path = (parts[0], parts[1].split("?", 1)[0]) if len(parts) >= 2 else ("", "")
        if method not in ("GET", "HEAD"):
            out = _response("405 Method Not Allowed", b"only GET\n")
        elif path == "/metrics":
            tally.flush_all()  # this process's figures are exact; other workers' <= 0.25 s old
            body = generate_latest(multiproc.scrape_registry(REGISTRY))
            out = _response("200 OK", body, CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            out = _response("200 OK", b"ok\n")
        elif path == "/readyz":
            ok, why = await ready()
            out = _response("200 OK" if ok else "503 Service Unavailable", why.encode() + b"\n")
        else:
            out = _response("404 Not Found", b"try /metrics, /healthz or /readyz\n")
        writer.write(out)
        await writer.drain()
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()


async def start_http(
    host: str, port: int, ready: ReadyCheck, *, reuse_port: bool = False
) -> asyncio.Server:
    return await asyncio.start_server(
        lambda r, w: _handle(r, w, ready), host, port, reuse_port=reuse_port or None
    )
