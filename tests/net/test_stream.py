"""Stream requests on a real server on 127.0.0.1: the same port as HTTP, real
btauth/1 signatures, and raw sockets for what an honest client never sends."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web
from bittensor import http_auth

from iota._C import block_pool_stats
from iota.chain import LocalChain
from iota.net import (
    NetError,
    PeerError,
    Refused,
    SignedClient,
    StreamAnswer,
    StreamClient,
    StreamRequest,
    serve,
    signed_app,
)
from iota.net.answers import EMPTY_DIGEST, REQUEST_SIGNATURE, answer_message, payload_digest
from iota.net.stream import HEADER, MAGIC, MAX_ANSWER_META, MAX_META, POOLED_READ

LIMIT = 4 << 20
TIMEOUT = 30.0


class Echo:
    """Answers POST /echo with the payload reversed, POST /tagged with the payload as it
    came and a tag beside it, POST /refuse with a refusal."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, int, str]] = []  # (role, path, payload size, digest)

    def limit(self, method: str, path: str) -> int:
        if path.split("?")[0] not in ("/echo", "/tagged", "/refuse"):
            raise Refused(404, "NoRoute", f"no stream route {method} {path}")
        return LIMIT

    idle = 5.0  # seconds the server keeps a connection with no request

    def read_bound(self, nbytes: int) -> float:
        return self.idle + nbytes / 1e6

    async def handle(self, request: StreamRequest) -> bytes | StreamAnswer:
        self.seen.append((request.sender.role, request.path, len(request.payload), request.digest))
        if request.path == "/refuse":
            raise Refused(409, "Closed", "this round closed already")
        if request.path == "/tagged":  # the same bytes: the request's digest is the answer's
            return StreamAnswer((request.payload,), request.digest, {"tag": len(request.payload)})
        return bytes(request.payload[::-1])


@asynccontextmanager
async def serving(keys: SimpleNamespace, chain: LocalChain, idle: float = 5.0) -> AsyncIterator[tuple[str, Echo]]:
    app = signed_app(keys.server, chain)

    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"hello": True})

    app.router.add_get("/hello", hello)
    echo = Echo()
    echo.idle = idle
    async with serve(app, shutdown_timeout=0.5, streams=echo) as url:
        yield url, echo


def run(
    keys: SimpleNamespace, chain: LocalChain, body: Callable[[str, Echo], Awaitable[None]], idle: float = 5.0
) -> None:
    async def main() -> None:
        async with serving(keys, chain, idle) as (url, echo):
            await asyncio.wait_for(body(url, echo), TIMEOUT)

    asyncio.run(main())


@pytest.mark.parametrize("size", [0, 1, 65536, 3 << 20])
def test_payload_round_trips_exactly_and_the_port_still_serves_http(keys, chain, size):
    payload = os.urandom(size)

    async def body(url: str, echo: Echo) -> None:
        client = StreamClient(keys.miner)
        try:
            for _ in range(3):  # the second and third reuse the connection
                answer = await client.request(
                    "POST", url, "/echo?x=1", receiver=keys.server.ss58_address, timeout=TIMEOUT,
                    payload=payload, max_response=LIMIT,
                )
                assert bytes(answer.payload) == payload[::-1]
                assert answer.digest == payload_digest(payload[::-1]) and answer.extra == {}
            assert len(client._idle[("127.0.0.1", int(url.rsplit(":", 1)[1]))]) == 1
        finally:
            client.close()
        assert echo.seen == [("miner", "/echo?x=1", size, payload_digest(payload))] * 3
        async with aiohttp.ClientSession() as session:
            signed = SignedClient(keys.miner, session)
            assert (await signed.get_json(url, "/hello", receiver=keys.server.ss58_address, timeout=TIMEOUT)) == {
                "hello": True
            }

    run(keys, chain, body)


def test_an_answer_can_carry_signed_facts_beside_its_payload_and_a_digest_its_route_had(keys, chain):
    payload = os.urandom(100_000)

    async def body(url: str, echo: Echo) -> None:
        client = StreamClient(keys.miner)
        try:
            answer = await client.request("POST", url, "/tagged", receiver=keys.server.ss58_address,
                                          timeout=TIMEOUT, payload=payload, max_response=LIMIT)
        finally:
            client.close()
        assert bytes(answer.payload) == payload and answer.digest == payload_digest(payload)
        assert answer.extra == {"tag": 100_000}

    run(keys, chain, body)


def test_concurrent_requests_use_their_own_connections(keys, chain):
    payloads = [os.urandom(100_000 + i) for i in range(8)]

    async def body(url: str, echo: Echo) -> None:
        client = StreamClient(keys.validator)
        try:
            answers = await asyncio.gather(*(
                client.request("POST", url, "/echo", receiver=keys.server.ss58_address, timeout=TIMEOUT,
                               payload=p, max_response=LIMIT)
                for p in payloads
            ))
        finally:
            client.close()
        assert [bytes(a.payload) for a in answers] == [p[::-1] for p in payloads]

    run(keys, chain, body)


def test_refusals_reach_the_caller(keys, chain):
    async def body(url: str, echo: Echo) -> None:
        client = StreamClient(keys.miner)
        try:
            with pytest.raises(PeerError) as refused:
                await client.request("POST", url, "/refuse", receiver=keys.server.ss58_address,
                                     timeout=TIMEOUT, payload=b"abc", max_response=LIMIT)
            assert (refused.value.status, refused.value.kind) == (409, "Closed")
            with pytest.raises(PeerError) as missing:
                await client.request("GET", url, "/nowhere", receiver=keys.server.ss58_address,
                                     timeout=TIMEOUT, max_response=LIMIT)
            assert (missing.value.status, missing.value.kind) == (404, "NoRoute")
            with pytest.raises(PeerError) as large:
                await client.request("POST", url, "/echo", receiver=keys.server.ss58_address,
                                     timeout=TIMEOUT, payload=bytes(LIMIT + 1), max_response=LIMIT)
            assert (large.value.status, large.value.kind) == (413, "BodyTooLarge")
            stranger = StreamClient(keys.stranger)
            with pytest.raises(PeerError) as unknown:
                await stranger.request("POST", url, "/echo", receiver=keys.server.ss58_address,
                                       timeout=TIMEOUT, payload=b"abc", max_response=LIMIT)
            assert (unknown.value.status, unknown.value.kind) == (403, "NotRegistered")
            # The server refuses a request addressed to another hotkey (401 WrongReceiver), but that
            # refusal is signed by the server, not by whom the client addressed: the client takes none.
            with pytest.raises(NetError, match="signature") as misaddressed:
                await client.request("POST", url, "/echo", receiver=keys.validator.ss58_address,
                                     timeout=TIMEOUT, payload=b"abc", max_response=LIMIT)
            assert not isinstance(misaddressed.value, PeerError)
            # The client still works after refusals (they closed their connections).
            again = await client.request("POST", url, "/echo", receiver=keys.server.ss58_address,
                                         timeout=TIMEOUT, payload=b"abc", max_response=LIMIT)
            assert bytes(again.payload) == b"cba"
        finally:
            client.close()
        assert [path for _, path, _, _ in echo.seen] == ["/refuse", "/echo"]  # refused ones never reached it

    run(keys, chain, body)


def test_a_connection_the_server_let_go_of_is_replaced(keys, chain):
    async def body(url: str, echo: Echo) -> None:
        client = StreamClient(keys.miner)
        try:
            ask = lambda: client.request("POST", url, "/echo", receiver=keys.server.ss58_address,  # noqa: E731
                                         timeout=TIMEOUT, payload=b"abc", max_response=LIMIT)
            assert bytes((await ask()).payload) == b"cba"
            (kept,) = [conn for conns in client._idle.values() for conn in conns]
            await asyncio.sleep(0.6)  # past the server's idle bound: it closed the connection
            assert bytes((await ask()).payload) == b"cba"
            (replacement,) = [conn for conns in client._idle.values() for conn in conns]
            assert replacement is not kept and kept.transport is None
        finally:
            client.close()
        assert len(echo.seen) == 2

    run(keys, chain, body, idle=0.3)


def _raw_request(meta: dict, payload: bytes) -> bytes:
    encoded = json.dumps(meta).encode()
    return MAGIC + HEADER.pack(len(encoded), len(payload)) + encoded + payload


async def _raw_exchange(url: str, data: bytes) -> dict:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        meta_len, payload_len = HEADER.unpack(await reader.readexactly(HEADER.size))
        meta = json.loads(await reader.readexactly(meta_len))
        await reader.readexactly(payload_len)
        return meta
    finally:
        writer.close()


def test_tampered_unsigned_and_replayed_requests_are_refused(keys, chain):
    payload = b"the frame"
    digest = payload_digest(payload)

    async def body(url: str, echo: Echo) -> None:
        headers = http_auth.sign(keys.miner, method="POST", path="/echo", body=bytes.fromhex(digest),
                                 receiver_ss58=keys.server.ss58_address)
        meta = {"method": "POST", "path": "/echo", "headers": headers, "digest": digest}
        # The payload changed in transit: the signature still verifies, the digest does not.
        tampered = await _raw_exchange(url, _raw_request(meta, b"the frime"))
        assert (tampered["status"], tampered["error"]) == (400, "DigestMismatch")
        # The same signed request again: its nonce was taken by the first.
        replayed = await _raw_exchange(url, _raw_request(meta, payload))
        assert (replayed["status"], replayed["error"]) == (401, "ReplayedRequest")
        unsigned = await _raw_exchange(url, _raw_request({**meta, "headers": {}}, payload))
        assert unsigned["status"] == 401
        other_path = http_auth.sign(keys.miner, method="POST", path="/refuse", body=bytes.fromhex(digest),
                                    receiver_ss58=keys.server.ss58_address)
        moved = await _raw_exchange(url, _raw_request({**meta, "headers": other_path}, payload))
        assert (moved["status"], moved["error"]) == (401, "BadSignature")
        garbage = await _raw_exchange(url, MAGIC + HEADER.pack(5, 0) + b"nope!")
        assert (garbage["status"], garbage["error"]) == (400, "BadMessage")
        assert echo.seen == []

    run(keys, chain, body)


def test_a_dead_server_is_a_net_error(keys, chain):
    async def body() -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        client = StreamClient(keys.miner)
        with pytest.raises(NetError):
            await client.request("POST", f"http://127.0.0.1:{port}", "/echo", receiver=keys.server.ss58_address,
                                 timeout=5, payload=b"x", max_response=LIMIT)

    asyncio.run(body())


def test_a_server_that_never_answers_times_out(keys, chain):
    async def body() -> None:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # takes everything, answers nothing
            writer.close()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = StreamClient(keys.miner)
        try:
            with pytest.raises(NetError, match="timed out"):
                await client.request("POST", f"http://127.0.0.1:{port}", "/echo",
                                     receiver=keys.server.ss58_address, timeout=0.5, payload=b"x",
                                     max_response=LIMIT)
            assert client._idle == {}  # the broken connection is not kept
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(body())


@pytest.mark.parametrize(
    "forgery",
    ["honest", "honest_with_extra_over_a_request_meta", "unsigned", "signature_truncated",
     "signed_by_another_hotkey", "payload_swapped", "signed_for_another_request",
     "refusal_signed_by_another_hotkey", "extra_added_after_signing", "meta_not_json", "meta_over_the_limit"],
)
def test_an_answer_counts_only_if_the_addressed_server_signed_it_for_this_request(keys, chain, forgery):
    """A hand-written server answers the way an impostor or a tampering middlebox would."""
    payload, other = b"the mean", b"not the mean"
    large = {"gram": "A" * (4 * MAX_META)}  # e.g. the inner products of many contributions

    def signed(signer, request_signature: str, meta: dict) -> dict:
        return {**meta, "signature": signer.sign(answer_message(request_signature, meta)).hex()}

    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readexactly(len(MAGIC)) == MAGIC
        meta_len, payload_len = HEADER.unpack(await reader.readexactly(HEADER.size))
        request = json.loads(await reader.readexactly(meta_len))
        await reader.readexactly(payload_len)
        asked = request["headers"][REQUEST_SIGNATURE]
        sent = payload
        answer = {"status": 200, "digest": payload_digest(payload)}
        if forgery == "honest":
            answer = signed(keys.server, asked, answer)
        elif forgery == "honest_with_extra_over_a_request_meta":
            answer = signed(keys.server, asked, {**answer, "extra": large})
        elif forgery == "signature_truncated":
            answer = signed(keys.server, asked, answer)
            answer["signature"] = answer["signature"][:-2]
        elif forgery == "signed_by_another_hotkey":
            answer = signed(keys.stranger, asked, answer)
        elif forgery == "payload_swapped":
            answer, sent = signed(keys.server, asked, answer), other
        elif forgery == "signed_for_another_request":
            answer = signed(keys.server, "0x" + "00" * 64, answer)
        elif forgery == "extra_added_after_signing":  # e.g. another attestation beside an honest mean
            answer = {**signed(keys.server, asked, answer), "extra": {"attestation": "00" * 64}}
        elif forgery == "refusal_signed_by_another_hotkey":
            refusal = {"status": 409, "error": "Closed", "detail": "go away", "digest": EMPTY_DIGEST}
            answer, sent = signed(keys.stranger, asked, refusal), b""
        encoded = json.dumps(answer).encode()
        if forgery == "meta_not_json":
            encoded = b"{not json"
        announced = MAX_ANSWER_META + 1 if forgery == "meta_over_the_limit" else len(encoded)
        writer.write(HEADER.pack(announced, len(sent)) + encoded + sent)
        await writer.drain()
        writer.close()

    async def body() -> None:
        server = await asyncio.start_server(impostor, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        client = StreamClient(keys.miner)
        try:
            ask = client.request("GET", url, "/results/0", receiver=keys.server.ss58_address, timeout=TIMEOUT,
                                 max_response=LIMIT)
            if forgery.startswith("honest"):
                answer = await ask
                assert bytes(answer.payload) == payload
                assert answer.extra == (large if forgery != "honest" else {})
                return
            with pytest.raises(NetError) as taken:
                await ask
            assert not isinstance(taken.value, PeerError)  # not even a refusal is believed
            expected = {"payload_swapped": "digest", "meta_not_json": "malformed", "meta_over_the_limit": "malformed"}
            assert expected.get(forgery, "signature") in str(taken.value)
            assert client._idle == {}  # nor is the connection kept
        finally:
            client.close()
            server.close()
            await server.wait_closed()

    asyncio.run(body())


def test_a_connection_that_never_speaks_is_closed_after_the_bound(keys, chain):
    async def body(url: str, echo: Echo) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            # Nothing sent: the server neither knows nor waits forever what this is.
            assert await asyncio.wait_for(reader.read(), 5.0) == b""
        finally:
            writer.close()

    run(keys, chain, body, idle=0.3)


def test_the_signed_digest_is_blake3_256():
    # BLAKE3's published test value for b"abc" and the empty input: a peer on another build must agree.
    assert payload_digest(b"abc") == "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
    assert EMPTY_DIGEST == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    assert payload_digest(memoryview(bytearray(b"abc"))) == payload_digest(b"abc")


def test_large_reads_land_in_pooled_blocks_that_go_back_once_no_view_is_left(keys, chain):
    """An answer over POOLED_READ is read into a block of the process's pool: writable to
    its last byte, alive while any view of it is, and reused by the next read of its size
    class once freed, so steady traffic maps no fresh memory."""
    async def body(url: str, echo: Echo) -> None:
        client = StreamClient(keys.miner)

        async def echoed(payload: bytes) -> bytearray | memoryview:
            reply = await client.request("POST", url, "/echo", receiver=keys.server.ss58_address, timeout=TIMEOUT,
                                         payload=payload, max_response=len(payload))
            return reply.payload

        payload = os.urandom(3 << 20)
        first = await echoed(payload)
        assert isinstance(first, memoryview) and not first.readonly and first == payload[::-1]
        first[-1] = 7  # writable to the last byte
        tail, before = first[-4:], block_pool_stats()
        del first  # a slice keeps the block alive
        assert bytes(tail) == payload[3::-1][:3] + b"\x07" and block_pool_stats()["out_bytes"] == before["out_bytes"]
        del tail
        freed = block_pool_stats()
        assert freed["pooled_bytes"] > before["pooled_bytes"]
        # The next reads of about that size (the server's and ours) take pooled memory, not fresh pages.
        second = await echoed(payload[:-64])
        assert second == payload[:-64][::-1]
        assert block_pool_stats()["fresh_bytes"] == freed["fresh_bytes"]
        small = await echoed(b"x" * POOLED_READ)
        assert type(small) is bytearray and small == b"x" * POOLED_READ
        client.close()

    run(keys, chain, body)
