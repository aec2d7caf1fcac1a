"""Serving: a guarded aiohttp app, with stream requests beside it on the same port, and start/stop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from aiohttp import web
from bittensor.signing import resolve_signer
from bittensor.sp_core import Keypair

from iota.chain.base import Chain
from iota.net.answers import answer_signing_middleware
from iota.net.guard import GuardConfig, RequestGuard
from iota.net.stream import MAGIC, Connection, StreamService, serve_connection

if TYPE_CHECKING:
    from bittensor.signing import WalletLike

APP_GUARD = web.AppKey("iota_guard", RequestGuard)
APP_SIGNER = web.AppKey("iota_signer", Keypair)


def signed_app(wallet: WalletLike, chain: Chain, config: GuardConfig | None = None) -> web.Application:
    """An aiohttp app whose every route is guarded by a RequestGuard for `wallet`'s hotkey,
    and whose every answer, refusals included, that hotkey signs (iota.net.answers)."""
    signer = resolve_signer(wallet, role="hotkey")
    guard = RequestGuard(signer.ss58_address, chain, config)
    # The guard reads bodies itself under its own limit; aiohttp's limit only
    # applies to request.read()/post(), which guarded handlers never call.
    app = web.Application(middlewares=[answer_signing_middleware(signer), guard.middleware])
    app[APP_GUARD] = guard  # streams served beside the app share its replay cache
    app[APP_SIGNER] = signer  # and sign their answers as the app does
    return app


@asynccontextmanager
async def serve(
    app: web.Application,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    shutdown_timeout: float = 60.0,
    streams: StreamService | None = None,
) -> AsyncIterator[str]:
    """Serve `app` on host:port (0 picks a free port) and yield its base URL; stop on exit.

    On exit, requests in flight get `shutdown_timeout` seconds to finish
    before they are cancelled. That includes connections aiohttp is still
    draining after a refusal (it reads and discards a refused body for up
    to 10 s so the peer can read the error instead of a reset).

    With `streams`, the same port also answers stream requests (iota.net.stream)
    for that service, verified by the guard of `app` (a `signed_app`), each answer
    signed by the hotkey that signs the app's.
    """
    runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        if streams is None:
            site = web.TCPSite(runner, host, port)
            await site.start()
            yield _base_url(*runner.addresses[0][:2])
        else:
            async with _serve_both(runner, app[APP_GUARD], streams, app[APP_SIGNER], host, port) as url:
                yield url
    finally:
        await runner.cleanup()


@asynccontextmanager
async def _serve_both(
    runner: web.AppRunner, guard: RequestGuard, service: StreamService, signer: Keypair, host: str, port: int
) -> AsyncIterator[str]:
    tasks: set[asyncio.Task[None]] = set()
    undecided: set[_Sniffer] = set()  # connected, first byte not in yet

    def start_stream(conn: Connection) -> None:
        task = asyncio.get_running_loop().create_task(serve_connection(conn, guard, service, signer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    http = runner.server
    assert http is not None  # set up by runner.setup()
    # A connection that never says what it is goes after the bound for a request to start.
    first_byte_bound = service.read_bound(0)
    server = await asyncio.get_running_loop().create_server(
        lambda: _Sniffer(http, start_stream, undecided, first_byte_bound), host, port
    )
    try:
        yield _base_url(*server.sockets[0].getsockname()[:2])
    finally:
        server.close()
        for sniffer in list(undecided):
            sniffer.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Sniffer(asyncio.Protocol):
    """Hands a new connection to a stream Connection or to aiohttp, by its first byte."""

    def __init__(
        self,
        http: Callable[[], asyncio.BaseProtocol],
        start_stream: Callable[[Connection], None],
        undecided: set[_Sniffer],
        bound: float,
    ) -> None:
        self.http = http
        self.start_stream = start_stream
        self.undecided = undecided
        self.bound = bound
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.undecided.add(self)
        self._timer = asyncio.get_running_loop().call_later(self.bound, self.close)

    def close(self) -> None:
        self._decided()
        if self.transport is not None:
            self.transport.close()

    def _decided(self) -> None:
        self.undecided.discard(self)
        if self._timer is not None:
            self._timer.cancel()

    def connection_lost(self, exc: Exception | None) -> None:
        self._decided()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self._decided()
        if data[:1] == MAGIC[:1]:  # no HTTP request starts with this byte
            stream = Connection(data)
            self.transport.set_protocol(stream)
            stream.connection_made(self.transport)
            self.start_stream(stream)
        else:
            http = self.http()
            self.transport.set_protocol(http)
            http.connection_made(self.transport)
            http.data_received(data)  # type: ignore[attr-defined]


def _base_url(host: str, port: int) -> str:
    netloc = f"[{host}]" if ":" in host else host
    return f"http://{netloc}:{port}"
