"""Serving: a guarded aiohttp app, binary responses in bounded parts, and start/stop."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from iota.chain.base import Chain
from iota.net.body import check_part_size
from iota.net.guard import GuardConfig, RequestGuard


def signed_app(hotkey: str, chain: Chain, config: GuardConfig | None = None) -> web.Application:
    """An aiohttp app whose every route is guarded by a RequestGuard for `hotkey`."""
    guard = RequestGuard(hotkey, chain, config)
    # The guard reads bodies itself under its own limit; aiohttp's limit only
    # applies to request.read()/post(), which guarded handlers never call.
    return web.Application(middlewares=[guard.middleware])


async def bytes_response(
    request: web.Request,
    data: bytes,
    *,
    chunk_size: int,
    status: int = 200,
    content_type: str = "application/octet-stream",
) -> web.StreamResponse:
    """Send `data` in parts of at most `chunk_size` bytes, waiting for the socket between parts.

    A plain web.Response hands the whole body to the transport at once, which
    copies whatever the socket cannot take yet: a second copy of a big frame.
    """
    check_part_size(chunk_size)
    response = web.StreamResponse(status=status, headers={"Content-Type": content_type})
    response.content_length = len(data)
    await response.prepare(request)
    view = memoryview(data)
    for start in range(0, len(view), chunk_size):
        await response.write(view[start : start + chunk_size])
    await response.write_eof()
    return response


@asynccontextmanager
async def serve(
    app: web.Application, host: str = "127.0.0.1", port: int = 0, *, shutdown_timeout: float = 60.0
) -> AsyncIterator[str]:
    """Serve `app` on host:port (0 picks a free port) and yield its base URL; stop on exit.

    On exit, requests in flight get `shutdown_timeout` seconds to finish
    before they are cancelled. That includes connections aiohttp is still
    draining after a refusal (it reads and discards a refused body for up
    to 10 s so the peer can read the error instead of a reset).
    """
    runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        netloc = f"[{bound_host}]" if ":" in bound_host else bound_host
        yield f"http://{netloc}:{bound_port}"
    finally:
        await runner.cleanup()
