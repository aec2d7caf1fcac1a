"""Real aiohttp servers on 127.0.0.1, real btauth/1 signatures, no mocked auth.

Each test drives its own event loop with asyncio.run and starts and stops
its server inside it.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import aiohttp
import bittensor
import pytest
from aiohttp import web
from bittensor import http_auth, wallets

from iota.chain import LocalChain, generate_keypair
from iota.net import (
    BodyTooLarge,
    GuardConfig,
    JsonHTTPError,
    NetError,
    PeerError,
    SignedClient,
    json_error,
    request_body,
    request_sender,
    route_policy,
    serve,
    signed_app,
)

from iota.net.answers import (
    ANSWER_DIGEST,
    ANSWER_SIGNATURE,
    REQUEST_SIGNATURE,
    AnswerChecker,
    payload_digest,
    sign_answer,
)

SMALL_LIMIT = 1 << 20
TIMEOUT = 30.0


@dataclass
class Server:
    url: str
    hotkey: str
    calls: list[tuple[str, str, int]] = field(default_factory=list)  # (route, sender role, body size)
    received: dict[str, int] = field(default_factory=dict)  # path -> bytes the server took off the socket


def build_app(
    keys: SimpleNamespace, chain: LocalChain, server: Server, config: GuardConfig | None
) -> web.Application:
    def record(route: str, request: web.Request) -> None:
        server.calls.append((route, request_sender(request).role, len(request_body(request))))

    async def echo(request: web.Request) -> web.StreamResponse:
        record("echo", request)
        return web.Response(body=request_body(request), content_type="application/octet-stream")

    @route_policy(roles=("validator",))
    async def validators_only(request: web.Request) -> web.StreamResponse:
        record("validators_only", request)
        return web.json_response({"ok": True})

    @route_policy(max_body=SMALL_LIMIT)
    async def small(request: web.Request) -> web.StreamResponse:
        record("small", request)
        return web.json_response({"size": len(request_body(request))})

    async def whoami(request: web.Request) -> web.StreamResponse:
        record("whoami", request)
        sender = request_sender(request)
        return web.json_response({"hotkey": sender.hotkey, "role": sender.role, "query": dict(request.query)})

    async def slow(request: web.Request) -> web.StreamResponse:
        record("slow", request)
        await asyncio.sleep(5)
        return web.json_response({})

    async def conflict(request: web.Request) -> web.StreamResponse:
        record("conflict", request)
        return json_error(409, "RoundClosed", "the merge round already closed")

    async def gone(request: web.Request) -> web.StreamResponse:
        record("gone", request)
        raise JsonHTTPError(410, "Gone", "raised deep in a handler")

    async def empty(request: web.Request) -> web.StreamResponse:
        record("empty", request)
        return web.Response(status=204)

    @route_policy(public=True)
    async def health(request: web.Request) -> web.StreamResponse:
        try:
            request_sender(request)
        except NetError:
            return web.json_response({"ok": True, "sender": None})
        raise AssertionError("a public route has no verified sender")

    # Outermost, so it sees how many body bytes the server took off the
    # socket when the guard answered (before aiohttp drains the rest).
    @web.middleware
    async def count_received(request: web.Request, handler: Any) -> web.StreamResponse:
        response = await handler(request)
        server.received[request.path] = request.content.total_bytes
        return response

    app = signed_app(keys.server, chain, config)
    app.middlewares.insert(0, count_received)
    app.router.add_post("/echo", echo)
    app.router.add_post("/validators-only", validators_only)
    app.router.add_post("/small", small)
    app.router.add_get("/whoami", whoami)
    app.router.add_get("/slow", slow)
    app.router.add_post("/conflict", conflict)
    app.router.add_post("/gone", gone)
    app.router.add_post("/empty", empty)
    app.router.add_get("/health", health)
    return app


@asynccontextmanager
async def running(
    keys: SimpleNamespace, chain: LocalChain, config: GuardConfig | None = None
) -> AsyncIterator[tuple[Server, aiohttp.ClientSession]]:
    server = Server(url="", hotkey=keys.server.ss58_address)
    app = build_app(keys, chain, server, config)
    # A short grace: refused uploads and the slow handler must not hold the test up.
    async with serve(app, shutdown_timeout=0.5) as url, aiohttp.ClientSession() as session:
        server.url = url
        yield server, session


def run(
    keys: SimpleNamespace,
    chain: LocalChain,
    body: Callable[[Server, aiohttp.ClientSession], Awaitable[None]],
    config: GuardConfig | None = None,
) -> Server:
    async def main() -> Server:
        async with running(keys, chain, config) as (server, session):
            await body(server, session)
            return server

    return asyncio.run(main())


async def send_raw(
    session: aiohttp.ClientSession,
    server: Server,
    path: str,
    *,
    headers: dict[str, str],
    body: bytes = b"",
    method: str = "POST",
) -> tuple[int, Any]:
    """Send exactly these headers and body; return the status and the JSON (or raw) reply."""
    async with session.request(method, server.url + path, data=body, headers=headers) as response:
        if response.content_type == "application/json":
            return response.status, await response.json()
        return response.status, await response.read()


def signed_headers(
    signer: Any, server: Server, path: str, body: bytes = b"", **kwargs: Any
) -> dict[str, str]:
    return http_auth.sign(
        signer,
        method=kwargs.pop("method", "POST"),
        path=path,
        body=body,
        receiver_ss58=kwargs.pop("receiver", server.hotkey),
        **kwargs,
    )


def test_signed_request_is_accepted_and_handler_sees_sender(keys, chain):
    async def body(server, session):
        client = SignedClient(keys.miner, session)
        assert client.hotkey == keys.miner.ss58_address
        # The signature covers the target exactly as sent, percent-escapes included.
        reply = await client.get_json(
            server.url, "/whoami?stage=2&tag=a%7Eb", receiver=server.hotkey, timeout=TIMEOUT
        )
        assert reply == {
            "hotkey": keys.miner.ss58_address,
            "role": "miner",
            "query": {"stage": "2", "tag": "a~b"},
        }
        echoed = await client.post_bytes(
            server.url, "/echo", b"frame", receiver=server.hotkey, timeout=TIMEOUT
        )
        assert echoed == b"frame"

    server = run(keys, chain, body)
    assert server.calls == [("whoami", "miner", 0), ("echo", "miner", 5)]


def test_a_bittensor_wallet_hotkey_signs_too(keys, chain, tmp_path):
    mnemonic, keypair = generate_keypair()
    wallets.regen_hotkey(mnemonic, name="cold", hotkey="hot", path=str(tmp_path))
    chain.register(keypair.ss58_address, "miner")

    async def body(server, session):
        client = SignedClient(bittensor.Wallet(name="cold", hotkey="hot", path=str(tmp_path)), session)
        assert client.hotkey == keypair.ss58_address
        reply = await client.get_json(server.url, "/whoami", receiver=server.hotkey, timeout=TIMEOUT)
        assert reply["hotkey"] == keypair.ss58_address

    run(keys, chain, body)


def test_unsigned_request_is_refused_without_reading_the_body(keys, chain):
    async def body(server, session):
        status, error = await send_raw(session, server, "/echo", headers={}, body=bytes(8 << 20))
        assert (status, error["error"]) == (401, "Unsigned")

    server = run(keys, chain, body)
    assert server.calls == []
    assert server.received["/echo"] < 1 << 20


def test_tampered_body_is_refused(keys, chain):
    async def body(server, session):
        headers = signed_headers(keys.miner, server, "/echo", b"grad frame v1")
        status, error = await send_raw(session, server, "/echo", headers=headers, body=b"grad frame v2")
        assert (status, error["error"]) == (401, "BadSignature")

    assert run(keys, chain, body).calls == []


@pytest.mark.parametrize(
    ("signed", "sent"),
    [
        (("GET", "/whoami?stage=1"), ("GET", "/whoami?stage=2")),
        (("POST", "/small"), ("POST", "/echo")),
        (("POST", "/echo"), ("PUT", "/echo")),
    ],
)
def test_tampered_method_or_target_is_refused(keys, chain, signed, sent):
    async def body(server, session):
        headers = signed_headers(keys.miner, server, signed[1], method=signed[0])
        status, error = await send_raw(session, server, sent[1], headers=headers, method=sent[0])
        assert (status, error["error"]) == (401, "BadSignature")

    assert run(keys, chain, body).calls == []


def test_impersonating_another_registered_hotkey_is_refused(keys, chain):
    async def body(server, session):
        headers = signed_headers(keys.miner, server, "/validators-only")
        headers[http_auth.HEADER_HOTKEY] = keys.validator.ss58_address
        status, error = await send_raw(session, server, "/validators-only", headers=headers)
        assert (status, error["error"]) == (401, "BadSignature")

    assert run(keys, chain, body).calls == []


@pytest.mark.parametrize("receiver", ["other", "none"])
def test_request_for_another_receiver_is_refused(keys, chain, receiver):
    async def body(server, session):
        if receiver == "other":
            headers = http_auth.sign(
                keys.miner, method="POST", path="/echo", body=b"x", receiver_ss58=keys.validator.ss58_address
            )
            status, error = await send_raw(session, server, "/echo", headers=headers, body=b"x")
            assert (status, error["error"]) == (401, "WrongReceiver")
            # Our client takes no answer, not even a refusal, from a hotkey it did not address.
            client = SignedClient(keys.miner, session)
            with pytest.raises(NetError, match="answered 401 without .*signature"):
                await client.post_bytes(
                    server.url, "/echo", b"x", receiver=keys.validator.ss58_address, timeout=TIMEOUT
                )
        else:
            headers = http_auth.sign(keys.miner, method="POST", path="/echo", body=b"x")
            status, error = await send_raw(session, server, "/echo", headers=headers, body=b"x")
            assert (status, error["error"]) == (401, "WrongReceiver")

    assert run(keys, chain, body).calls == []


@pytest.mark.parametrize("offset_s", [-60.0, +30.0])
def test_stale_or_future_nonce_is_refused(keys, chain, offset_s):
    async def body(server, session):
        nonce = time.time_ns() + int(offset_s * 1e9)
        headers = signed_headers(keys.miner, server, "/echo", b"x", nonce_ns=nonce)
        status, error = await send_raw(session, server, "/echo", headers=headers, body=b"x")
        assert (status, error["error"]) == (401, "StaleRequest")

    assert run(keys, chain, body).calls == []


def test_replayed_request_is_refused_and_handler_runs_once(keys, chain):
    async def body(server, session):
        headers = signed_headers(keys.miner, server, "/echo", b"apply this gradient")
        first = await send_raw(session, server, "/echo", headers=headers, body=b"apply this gradient")
        second, error = await send_raw(session, server, "/echo", headers=headers, body=b"apply this gradient")
        assert first == (200, b"apply this gradient")
        assert (second, error["error"]) == (401, "ReplayedRequest")

    assert run(keys, chain, body).calls == [("echo", "miner", 19)]


def test_unregistered_sender_is_forbidden(keys, chain):
    async def body(server, session):
        client = SignedClient(keys.stranger, session)
        with pytest.raises(PeerError) as refused:
            await client.post_bytes(server.url, "/echo", b"x", receiver=server.hotkey, timeout=TIMEOUT)
        assert (refused.value.status, refused.value.kind) == (403, "NotRegistered")
        assert keys.stranger.ss58_address in refused.value.detail

    assert run(keys, chain, body).calls == []


def test_validator_only_route_refuses_a_miner_and_admits_a_validator(keys, chain):
    async def body(server, session):
        miner = SignedClient(keys.miner, session)
        with pytest.raises(PeerError) as refused:
            await miner.post_json(server.url, "/validators-only", {}, receiver=server.hotkey, timeout=TIMEOUT)
        assert (refused.value.status, refused.value.kind) == (403, "WrongRole")
        validator = SignedClient(keys.validator, session)
        ok = await validator.post_json(
            server.url, "/validators-only", {}, receiver=server.hotkey, timeout=TIMEOUT
        )
        assert ok == {"ok": True}

    assert run(keys, chain, body).calls == [("validators_only", "validator", 2)]


def test_declared_oversized_body_is_refused_before_reading(keys, chain):
    async def body(server, session):
        client = SignedClient(keys.miner, session, chunk_size=1 << 16)
        with pytest.raises(PeerError) as refused:
            await client.post_bytes(
                server.url, "/small", bytes(4 * SMALL_LIMIT), receiver=server.hotkey, timeout=TIMEOUT
            )
        assert (refused.value.status, refused.value.kind) == (413, "BodyTooLarge")

    server = run(keys, chain, body)
    assert server.calls == []
    assert server.received["/small"] <= SMALL_LIMIT


def test_streamed_oversized_body_is_refused_without_buffering_it(keys, chain):
    part = bytes(1 << 16)
    parts_total = 256  # 16 MiB offered against a 1 MiB limit

    async def endless() -> AsyncIterator[bytes]:
        for _ in range(parts_total):
            yield part

    async def body(server, session):
        headers = signed_headers(keys.miner, server, "/small", b"whatever")
        # No Content-Length: chunked transfer, so only counting while reading can stop it.
        async with session.post(server.url + "/small", data=endless(), headers=headers) as response:
            assert response.status == 413
            assert (await response.json())["error"] == "BodyTooLarge"

    server = run(keys, chain, body)
    assert server.calls == []
    # The guard stopped within one read part (plus socket buffering) past the limit.
    assert server.received["/small"] < 2 * SMALL_LIMIT


def test_large_binary_body_round_trips_in_bounded_parts(keys, chain):
    data = random.Random(1234).randbytes(6 << 20)

    async def body(server, session):
        client = SignedClient(keys.miner, session, chunk_size=1 << 16)
        echoed = await client.post_bytes(server.url, "/echo", data, receiver=server.hotkey, timeout=TIMEOUT)
        assert echoed == data

    assert run(keys, chain, body).calls == [("echo", "miner", len(data))]


def test_reply_over_the_clients_limit_raises(keys, chain):
    async def body(server, session):
        client = SignedClient(keys.miner, session)
        with pytest.raises(BodyTooLarge):
            await client.post_bytes(
                server.url,
                "/echo",
                bytes(100_000),
                receiver=server.hotkey,
                timeout=TIMEOUT,
                max_response=50_000,
            )

    run(keys, chain, body)


def test_handler_error_reaches_the_client_as_peer_error(keys, chain):
    async def body(server, session):
        client = SignedClient(keys.miner, session)
        with pytest.raises(PeerError) as refused:
            await client.post_json(server.url, "/conflict", {}, receiver=server.hotkey, timeout=TIMEOUT)
        assert (refused.value.status, refused.value.kind, refused.value.detail) == (
            409,
            "RoundClosed",
            "the merge round already closed",
        )

    run(keys, chain, body)


def test_public_route_needs_no_signature(keys, chain):
    async def body(server, session):
        async with session.get(server.url + "/health") as response:
            assert response.status == 200
            assert await response.json() == {"ok": True, "sender": None}

    run(keys, chain, body)


def test_timeout_is_the_callers(keys, chain):
    async def body(server, session):
        client = SignedClient(keys.miner, session)
        started = time.monotonic()
        with pytest.raises(NetError, match="timed out"):
            await client.get_bytes(server.url, "/slow", receiver=server.hotkey, timeout=0.3)
        assert time.monotonic() - started < 3

    run(keys, chain, body)


def test_unreachable_peer_raises_net_error(keys):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # The port is closed again: connecting is refused at once.

    async def main() -> None:
        async with aiohttp.ClientSession() as session:
            client = SignedClient(keys.miner, session)
            with pytest.raises(NetError, match="failed"):
                await client.get_bytes(
                    f"http://127.0.0.1:{port}", "/x", receiver=keys.server.ss58_address, timeout=5
                )

    asyncio.run(main())


def test_full_replay_cache_refuses_rather_than_forgets(keys, chain):
    async def body(server, session):
        client = SignedClient(keys.miner, session)
        old = signed_headers(keys.miner, server, "/echo", b"x")
        await asyncio.sleep(0.001)
        for _ in range(3):  # fills and overflows a 2-entry cache
            await client.post_bytes(server.url, "/echo", b"y", receiver=server.hotkey, timeout=TIMEOUT)
        status, error = await send_raw(session, server, "/echo", headers=old, body=b"x")
        assert (status, error["error"]) == (401, "StaleRequest")
        assert "replay cache is full" in error["detail"]

    run(keys, chain, body, GuardConfig(replay_capacity=2))


def test_every_answer_of_a_signed_app_is_signed_by_its_hotkey_for_the_request_it_answers(keys, chain):
    """Successes, the handler's own refusals, refusals raised deep in a handler, the guard's
    refusals and the router's 404/405: each carries the server's signature over its status
    and its body's digest, bound to the request's signature."""
    checker = AnswerChecker()

    async def body(server, session):
        cases = [  # (method, path, signed, expected status)
            ("POST", "/echo", True, 200), ("GET", "/whoami", True, 200), ("POST", "/empty", True, 204),
            ("POST", "/conflict", True, 409), ("POST", "/gone", True, 410), ("POST", "/echo", False, 401),
            ("POST", "/no-such-route", True, 404), ("GET", "/echo", True, 405),
        ]
        for method, path, signed, status in cases:
            headers = signed_headers(keys.miner, server, path, b"abc", method=method) if signed else {}
            async with session.request(method, server.url + path, data=b"abc", headers=headers) as reply:
                answer = await reply.read()
                assert reply.status == status, (method, path)
                assert reply.headers[ANSWER_DIGEST] == payload_digest(answer)
                request_signature = headers.get(REQUEST_SIGNATURE, "")
                await checker.check_http(server.hotkey, request_signature, status, reply.headers, answer, path)
                # Bound to this request, this status and this server: nothing else verifies.
                for hotkey, signature, answered in ((server.hotkey, "0x" + "00" * 64, status),
                                                    (server.hotkey, request_signature, status + 1),
                                                    (keys.miner.ss58_address, request_signature, status)):
                    with pytest.raises(NetError, match="without .*signature"):
                        await checker.check_http(hotkey, signature, answered, reply.headers, answer, path)

    run(keys, chain, body)


FORGERIES = ["honest", "unsigned", "signed_by_another_hotkey", "body_swapped", "signed_for_another_request",
             "refusal_unsigned", "refusal_signed_by_another_hotkey", "honest_refusal"]


@pytest.mark.parametrize("forgery", FORGERIES)
def test_a_client_takes_an_http_answer_only_if_the_addressed_server_signed_it(keys, forgery):
    """A hand-written impostor at the server's address answers the second of two requests
    (the first is answered honestly, so it has a genuine answer to replay)."""
    honest_body, answered = b"the real decision", []

    def signed(signer: Any, request_signature: str, status: int, answer: bytes) -> dict[str, str]:
        digest = payload_digest(answer)
        return {ANSWER_DIGEST: digest,
                ANSWER_SIGNATURE: sign_answer(signer, request_signature, {"status": status, "digest": digest})}

    async def impostor(request: web.Request) -> web.StreamResponse:
        request_signature = request.headers[REQUEST_SIGNATURE]
        if not answered or forgery == "honest":
            answered.append(signed(keys.server, request_signature, 200, honest_body))
            return web.Response(body=honest_body, headers=answered[-1])
        refusal = b'{"error": "RoundClosed", "detail": "go away"}'
        json_type = {"Content-Type": "application/json"}
        if forgery == "unsigned":
            return web.Response(body=honest_body)
        if forgery == "signed_by_another_hotkey":
            return web.Response(body=honest_body, headers=signed(keys.stranger, request_signature, 200, honest_body))
        if forgery == "body_swapped":
            return web.Response(body=b"a forged decision", headers=signed(keys.server, request_signature, 200,
                                                                           honest_body))
        if forgery == "signed_for_another_request":
            return web.Response(body=honest_body, headers=answered[0])
        if forgery == "refusal_unsigned":
            return web.Response(status=409, body=refusal, headers=json_type)
        if forgery == "refusal_signed_by_another_hotkey":
            return web.Response(status=409, body=refusal,
                                headers={**json_type, **signed(keys.stranger, request_signature, 409, refusal)})
        assert forgery == "honest_refusal"
        return web.Response(status=409, body=refusal,
                            headers={**json_type, **signed(keys.server, request_signature, 409, refusal)})

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/decision", impostor)
        async with serve(app, shutdown_timeout=0.5) as url, aiohttp.ClientSession() as session:
            client = SignedClient(keys.miner, session)

            async def ask() -> bytes:
                return await client.post_bytes(url, "/decision", b"x", receiver=keys.server.ss58_address,
                                               timeout=TIMEOUT)

            assert await ask() == honest_body
            if forgery == "honest":
                assert await ask() == honest_body
            elif forgery == "honest_refusal":
                with pytest.raises(PeerError) as refused:
                    await ask()
                assert (refused.value.status, refused.value.kind) == (409, "RoundClosed")
            else:
                with pytest.raises(NetError) as rejected:
                    await ask()
                assert not isinstance(rejected.value, PeerError)
                assert "signature" in str(rejected.value) or "digest" in str(rejected.value)

    asyncio.run(main())
