"""What moving bulk bytes costs per transport, in one process on loopback.

The all-reduce is CPU-bound on small machines (see bench/allreduce.py), and
its parts travel as signed HTTP requests. This measures, in the same run, the
CPU time (client + server, one event loop) and wall time to POST 1 MiB bodies:
through iota.net's signed client and guard (btauth/1), through plain aiohttp,
as iota.net stream requests (btauth/1-signed, on persistent connections), and
as a length-less byte stream on a raw asyncio BufferedProtocol (the floor). Prints JSON lines; medians over repeats.

    python bench/transport.py [--bodies 200] [--repeats 5] [--inflight 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from iota.chain import LocalChain, dev_keypair
from iota.net import SignedClient, StreamClient, StreamRequest, request_body, route_policy, serve, signed_app

BODY_BYTES = 1 << 20


async def timed(send: Callable[[], Awaitable[None]], bodies: int, inflight: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) to send `bodies` bodies with `inflight` at once."""
    slots = asyncio.Semaphore(inflight)

    async def one() -> None:
        async with slots:
            await send()

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one() for _ in range(bodies)))
    return time.perf_counter() - wall, time.process_time() - cpu


async def over_http(signed: bool, body: bytes, bodies: int, inflight: int) -> tuple[float, float]:
    sender, receiver = dev_keypair("iota-bench-transport-a"), dev_keypair("iota-bench-transport-b")
    if signed:
        app = signed_app(receiver, LocalChain({sender.ss58_address: "miner"}))

        @route_policy(max_body=2 * len(body))
        async def take(request: web.Request) -> web.Response:
            request_body(request)  # read (and verified) by the guard
            return web.Response(status=204)
    else:
        app = web.Application(client_max_size=2 * len(body))

        async def take(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(status=204)

    app.router.add_post("/part", take)
    async with serve(app) as url, aiohttp.ClientSession() as session:
        client = SignedClient(sender, session)

        async def send() -> None:
            if signed:
                await client.post_bytes(url, "/part", body, receiver=receiver.ss58_address, timeout=60)
            else:
                async with session.post(url + "/part", data=body) as reply:
                    await reply.read()

        return await timed(send, bodies, inflight)


class Taker:
    """A stream service that takes any body on any path."""

    def limit(self, method: str, path: str) -> int:
        return 2 * BODY_BYTES

    def read_bound(self, nbytes: int) -> float:
        return 60.0

    async def handle(self, request: StreamRequest) -> bytes:
        return b""


async def over_signed_stream(body: bytes, bodies: int, inflight: int) -> tuple[float, float]:
    sender, receiver = dev_keypair("iota-bench-transport-a"), dev_keypair("iota-bench-transport-b")
    app = signed_app(receiver, LocalChain({sender.ss58_address: "miner"}))
    async with serve(app, streams=Taker()) as url:
        client = StreamClient(sender)

        async def send() -> None:
            await client.request("POST", url, "/part", receiver=receiver.ss58_address, timeout=60,
                                 payload=body, max_response=0)

        try:
            return await timed(send, bodies, inflight)
        finally:
            client.close()


class Sink(asyncio.BufferedProtocol):
    """Reads into one preallocated buffer and acknowledges every whole body with one byte."""

    def __init__(self) -> None:
        self.buffer = bytearray(BODY_BYTES)
        self.received = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buffer)[self.received % BODY_BYTES:]

    def buffer_updated(self, nbytes: int) -> None:
        self.received += nbytes
        if self.received % BODY_BYTES == 0:
            assert self.transport is not None
            self.transport.write(b"k")


async def over_stream(body: bytes, bodies: int) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Sink, "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(bodies):
            writer.write(body)
            await writer.drain()
            await reader.readexactly(1)  # one body at a time, acknowledged, like a request
        elapsed = time.perf_counter() - wall, time.process_time() - cpu
        writer.close()
        await writer.wait_closed()
        return elapsed
    finally:
        server.close()
        await server.wait_closed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bodies", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--inflight", type=int, default=4, help="HTTP requests at once")
    args = parser.parse_args()
    body = os.urandom(BODY_BYTES)
    runs = {
        "stream": lambda: over_stream(body, args.bodies),
        "aiohttp": lambda: over_http(False, body, args.bodies, args.inflight),
        "signed_http": lambda: over_http(True, body, args.bodies, args.inflight),
        "signed_stream": lambda: over_signed_stream(body, args.bodies, args.inflight),
    }
    results: dict[str, dict[str, float]] = {}
    for name, run in runs.items():
        measured = [asyncio.run(run()) for _ in range(args.repeats)]
        mib = args.bodies * BODY_BYTES / (1 << 20)
        results[name] = {"mib_per_s": statistics.median(mib / wall for wall, _ in measured),
                         "cpu_ms_per_mib": statistics.median(1e3 * cpu / mib for _, cpu in measured)}
    for name, figures in results.items():
        print(json.dumps({"bench": "transport", "transport": name, "body_bytes": BODY_BYTES,
                          "bodies": args.bodies, "repeats": args.repeats, **figures,
                          "cpu_vs_stream": figures["cpu_ms_per_mib"] / results["stream"]["cpu_ms_per_mib"]}))


if __name__ == "__main__":
    main()
