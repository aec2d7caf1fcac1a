"""Signed requests over persistent TCP connections, for bulk bytes.

Per-request HTTP costs about 4.6 ms of CPU per MiB moved here (bench/transport.py),
so on a small machine an all-reduce spends its time parsing, not sending. A
stream request is the same btauth/1-signed request with less around it: on a
connection opened by `StreamClient`, each request is

    header  struct "!IQ": length of the meta, length of the payload
    meta    JSON {"method", "path", "headers": the btauth/1 headers, "digest": BLAKE3 hex of the payload}
    payload the body

and each answer the same header, meta {"status", "digest" of the answer's payload,
"error"/"detail" when refused, "extra": what the route says beside the payload
(a mean's attestation), "signature"} and payload. The request's signature covers
the method, the path and the payload's
digest (the signed "body" is the 32 raw digest bytes), so the server checks
the signature, freshness, replay, receiver and the sender's registration
before it reads a payload byte, reads the payload straight into its own
buffer, then checks the payload against the digest once. The digest is
BLAKE3-256: as strong as sha256 for this, and 2.2x faster here (3.2 against
1.45 GB/s), which matters as every byte of an all-reduce part is hashed by its
sender and by each receiver.

Answers are signed too, by the server's hotkey, over the request's own signature
and the answer's meta (`iota.net.answers`): a client takes an answer, or a refusal,
only from the server it addressed and only for the request it sent, so neither a
forged mean nor a replayed or forged refusal gets past it. A connection
carries one request at a time; clients open more connections for more at once.

Streams share the HTTP server's port: a connection whose first byte is
`MAGIC[0]` (never the start of an HTTP request) is a stream, any other goes to
the aiohttp app (`iota.net.serve(..., streams=service)`). A payload refused before it is read (404, 401, 403, 413)
is read and dropped after the answer, unless it is far over the route's
limit: then the connection ends.
"""

from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from bittensor import http_auth
from bittensor.signing import resolve_signer
from bittensor.sp_core import Keypair

from iota._C import ByteBlock
from iota.chain.base import ROLES, Neuron
from iota.net.answers import (
    EMPTY_DIGEST,
    REQUEST_SIGNATURE,
    AnswerChecker,
    Buffer,
    digest_off_loop,
    payload_digest,
    sign_answer,
)
from iota.net.errors import NetError, PeerError, Refused

if TYPE_CHECKING:
    from bittensor.signing import WalletLike

    from iota.net.guard import RequestGuard

MAGIC = b"\x00iota-stream/1\n"
HEADER = struct.Struct("!IQ")
MAX_META = 64 << 10  # a request's meta, read before its signature is checked
MAX_ANSWER_META = 1 << 20  # an answer's, from the server the client chose: its extra may be large (a Gram matrix)
POOLED_READ = 64 << 10  # reads larger than this (never a meta) go into pooled blocks (iota._C.ByteBlock)
DISCARD_PIECE = 1 << 20
DISCARD_FACTOR = 4


class ConnectionClosed(NetError):
    """The other end closed the connection (or it broke) before a whole message arrived."""


class Connection(asyncio.BufferedProtocol):
    """One end of a stream connection: whole reads straight into their own buffers, and
    writes that wait for the socket to drain. Reading is paused except while a read waits,
    so bytes nobody asked for stay in the kernel.

    A large read lands in a pooled block (memory an earlier payload used, already faulted
    in), seen through a memoryview; the block goes back to the pool once every view of it
    is gone, so a payload lives exactly as long as whoever keeps it."""

    def __init__(self, prefix: bytes = b"") -> None:
        self.transport: asyncio.Transport | None = None
        self._prefix = bytearray(prefix)  # bytes a sniffer read before handing over
        self._target: memoryview | None = None
        self._filled = 0
        self._want: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._paused = False
        self._lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.pause_reading()

    async def read(self, nbytes: int) -> bytearray | memoryview:
        """Exactly `nbytes` bytes; ConnectionClosed if the connection ends first."""
        # Returned only once every byte is written.
        buffer = memoryview(ByteBlock(nbytes)) if nbytes > POOLED_READ else bytearray(nbytes)
        view = memoryview(buffer)
        taken = min(nbytes, len(self._prefix))
        view[:taken] = self._prefix[:taken]
        del self._prefix[:taken]
        if taken == nbytes:
            return buffer
        if self._lost is not None or self.transport is None:
            raise ConnectionClosed(f"connection closed: {self._lost}")
        self._target, self._filled = view, taken
        self._want = asyncio.get_running_loop().create_future()
        self.transport.resume_reading()
        try:
            await self._want
        finally:
            self._target = None
            if self.transport is not None:
                self.transport.pause_reading()  # a cancelled read must not leave reading on
        return buffer

    async def discard(self, nbytes: int) -> None:
        """Read and drop `nbytes` bytes, a bounded piece at a time."""
        while nbytes > 0:
            nbytes -= len(await self.read(min(nbytes, DISCARD_PIECE)))

    def get_buffer(self, sizehint: int) -> memoryview:
        assert self._target is not None, "reading resumed with no read waiting"
        return self._target[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        assert self._target is not None and self.transport is not None and self._want is not None
        self._filled += nbytes
        if self._filled == len(self._target):
            self.transport.pause_reading()
            if not self._want.done():
                self._want.set_result(None)

    def eof_received(self) -> bool:
        self._fail(ConnectionClosed("the other end closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionClosed(f"connection lost: {exc}" if exc else "connection closed"))
        self.transport = None

    def _fail(self, exc: Exception) -> None:
        self._lost = self._lost or exc
        for waiter in (self._want, self._drained):
            if waiter is not None and not waiter.done():
                waiter.set_exception(self._lost)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    async def send(self, meta: dict[str, Any], *payload: Buffer) -> None:
        """One message, its payload the pieces of `payload` back to back; returns once the
        socket took all but a high-water mark of it."""
        if self._lost is not None or self.transport is None:
            raise ConnectionClosed(f"connection closed: {self._lost}")
        encoded = json.dumps(meta).encode()
        self.transport.write(HEADER.pack(len(encoded), sum(len(piece) for piece in payload)) + encoded)
        for piece in payload:
            if piece:
                self.transport.write(piece)
        if self._paused:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained

    async def receive_header(self, max_meta: int = MAX_META) -> tuple[dict[str, Any], int]:
        """The next message's meta and payload length (the payload is left to `read`);
        Refused(400) if the meta is over `max_meta` bytes or not a JSON object."""
        meta_len, payload_len = HEADER.unpack(await self.read(HEADER.size))
        if meta_len > max_meta:
            raise Refused(400, "BadMessage", f"message meta of {meta_len} bytes; the limit is {max_meta}")
        try:
            meta = json.loads(bytes(await self.read(meta_len)))  # a large one arrives as a view of a pooled block
        except ValueError as exc:
            raise Refused(400, "BadMessage", f"message meta is not JSON: {exc}") from None
        if not isinstance(meta, dict):
            raise Refused(400, "BadMessage", "message meta is not a JSON object")
        return meta, payload_len

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


# -- server ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamAnswer:
    """An answer with more to it than its payload: `digest` is `payload_digest(*pieces)`
    when the route has it (a mean served to three peers is hashed once), `extra` small
    JSON-able facts that go in the signed answer meta."""

    pieces: tuple[Buffer, ...]
    digest: str | None = None
    extra: dict[str, Any] | None = None


@dataclass(frozen=True)
class StreamRequest:
    """A verified stream request: `payload_digest(payload)` is `digest`, and `sender` signed both."""

    sender: Neuron
    method: str
    path: str
    payload: bytearray | memoryview
    digest: str


class StreamService(Protocol):
    """What a server answers on streams."""

    def limit(self, method: str, path: str) -> int:
        """The largest payload `method path` takes; Refused(404) if there is no such route."""

    def read_bound(self, nbytes: int) -> float:
        """Seconds a payload of `nbytes` may take to arrive (and the next request, if 0)."""

    async def handle(self, request: StreamRequest) -> Buffer | StreamAnswer:
        """The answer's payload, or a StreamAnswer; Refused for a reasoned refusal."""


async def serve_connection(conn: Connection, guard: RequestGuard, service: StreamService, signer: Keypair) -> None:
    """Answer `conn`'s requests in turn, each answer signed by `signer` (the server's hotkey)."""
    try:
        async with asyncio.timeout(service.read_bound(0)):
            magic = await conn.read(len(MAGIC))
        if bytes(magic) != MAGIC:
            return
        while True:
            # A connection idle past the bound is dropped; clients open another.
            async with asyncio.timeout(service.read_bound(0)):
                meta, payload_len = await conn.receive_header()
            if not await _answer(conn, guard, service, signer, meta, payload_len):
                return
    except (ConnectionClosed, asyncio.TimeoutError):
        return
    except Refused as refusal:  # the message itself is malformed: answer, then end the connection
        await _refuse(conn, signer, "", refusal)
    finally:
        conn.close()


async def _answer(
    conn: Connection, guard: RequestGuard, service: StreamService, signer: Keypair, meta: dict[str, Any],
    payload_len: int,
) -> bool:
    """Answer one request; False if the connection must end (its payload was left unread)."""
    limit = 0
    headers = meta.get("headers")
    request_signature = str(headers.get(REQUEST_SIGNATURE, "")) if isinstance(headers, dict) else ""
    try:
        method, path, digest = (meta.get(k) for k in ("method", "path", "digest"))
        if not (isinstance(method, str) and isinstance(path, str) and isinstance(headers, dict)):
            raise Refused(400, "BadMessage", "a request names its method, path and btauth/1 headers")
        try:
            signed_body = bytes.fromhex(digest)
        except (TypeError, ValueError):
            raise Refused(400, "BadMessage", "a request carries its payload's BLAKE3 digest as hex") from None
        limit = service.limit(method, path)
        if payload_len > limit:
            raise Refused(413, "BodyTooLarge", f"body exceeds this route's {limit}-byte limit")
        sender = await guard.authenticate(
            {str(k): str(v) for k, v in headers.items()}, signed_body, method=method, path=path, roles=frozenset(ROLES)
        )
    except Refused as refusal:
        await _refuse(conn, signer, request_signature, refusal)
        # Read the refused payload to keep the connection in step (closing with bytes
        # unread resets it, and the caller would lose the answer); a far larger one than
        # the route takes is not worth reading.
        if payload_len > DISCARD_FACTOR * max(limit, DISCARD_PIECE):
            return False
        async with asyncio.timeout(service.read_bound(payload_len)):
            await conn.discard(payload_len)
        return True
    async with asyncio.timeout(service.read_bound(payload_len)):
        payload = await conn.read(payload_len)
    try:
        if await digest_off_loop(payload) != digest:
            raise Refused(400, "DigestMismatch", "the payload does not match the digest its sender signed")
        answer = await service.handle(StreamRequest(sender, method, path, payload, digest))
    except Refused as refusal:
        await _refuse(conn, signer, request_signature, refusal)
        return True
    if not isinstance(answer, StreamAnswer):
        answer = StreamAnswer((answer,))
    meta = {"status": 200, "digest": answer.digest or await digest_off_loop(*answer.pieces)}
    if answer.extra:
        meta["extra"] = answer.extra
    await conn.send(_signed(signer, request_signature, meta), *answer.pieces)
    return True


def _signed(signer: Keypair, request_signature: str, meta: dict[str, Any]) -> dict[str, Any]:
    return {**meta, "signature": sign_answer(signer, request_signature, meta)}


async def _refuse(conn: Connection, signer: Keypair, request_signature: str, refusal: Refused) -> None:
    meta = {"status": refusal.status, "error": refusal.kind, "detail": refusal.detail, "digest": EMPTY_DIGEST}
    try:
        await conn.send(_signed(signer, request_signature, meta))
    except ConnectionClosed:
        pass


# -- client ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamReply:
    """A checked answer: its payload, the payload's digest (as the server signed it and
    the client checked it) and the route's `extra` facts (empty if none)."""

    payload: bytearray | memoryview
    digest: str
    extra: dict[str, Any]


class StreamClient:
    """Signed stream requests as `wallet`'s hotkey, over connections kept open per address.

    Like SignedClient, nothing retries: each call signs a fresh nonce. A
    connection whose exchange failed or timed out is closed, never reused.
    """

    def __init__(self, wallet: WalletLike) -> None:
        self.signer = resolve_signer(wallet, role="hotkey")
        self._idle: dict[tuple[str, int], list[Connection]] = {}
        self._answers = AnswerChecker()

    async def request(
        self,
        method: str,
        address: str,
        path: str,
        *,
        receiver: str,
        timeout: float,
        payload: bytes | bytearray | memoryview = b"",
        digest: str | None = None,
        max_response: int,
    ) -> StreamReply:
        """Send a signed request to the server at `address` (its HTTP base URL) and return
        its answer. `digest` is `payload_digest(payload)` when the caller has it.
        PeerError on a refusal, NetError if the server cannot be reached, its answer is
        not `receiver`'s signed answer to this request, or `timeout` (seconds for the
        whole exchange) expires."""
        target = _host_port(address)
        digest = digest or (payload_digest(payload) if payload else EMPTY_DIGEST)
        try:
            async with asyncio.timeout(timeout):
                return await self._exchange(target, method, path, receiver, payload, digest, max_response)
        except asyncio.TimeoutError:
            raise NetError(f"{method} {address}{path} over a stream timed out after {timeout:.1f}s") from None
        except (ConnectionClosed, OSError) as exc:
            raise NetError(f"{method} {address}{path} over a stream failed: {exc}") from None

    async def _exchange(
        self,
        target: tuple[str, int],
        method: str,
        path: str,
        receiver: str,
        payload: bytes | bytearray | memoryview,
        digest: str,
        max_response: int,
    ) -> StreamReply:
        # A kept connection the server has since let go of fails before any answer
        # arrives: then the request goes again, once, on a new connection.
        for reuse in (True, False):
            conn, reused = await self._connection(target, reuse)
            try:
                headers = http_auth.sign(
                    self.signer, method=method, path=path, body=bytes.fromhex(digest), receiver_ss58=receiver
                )
                await conn.send({"method": method, "path": path, "headers": headers, "digest": digest}, payload)
                meta, payload_len = await conn.receive_header(MAX_ANSWER_META)
                signed_request = headers[REQUEST_SIGNATURE]
            except ConnectionClosed:
                conn.close()
                if reused:
                    continue
                raise
            except Refused as malformed:  # the server's answer, not a refusal it sent
                conn.close()
                raise NetError(f"stream://{target[0]}:{target[1]}{path} answered a malformed message: "
                               f"{malformed.detail}") from None
            except BaseException:
                conn.close()
                raise
            break
        try:
            if payload_len > max_response:
                raise NetError(f"{target} announced a {payload_len}-byte answer, over the {max_response}-byte limit")
            answer = await conn.read(payload_len)
            where = f"stream://{target[0]}:{target[1]}"
            await self._answers.check(receiver, signed_request, meta, meta.get("signature"), answer, where)
        except BaseException:
            conn.close()
            raise
        extra = meta.get("extra", {})
        status = meta.get("status")
        if status == 200 and not isinstance(extra, dict):
            conn.close()
            raise NetError(f"stream://{target[0]}:{target[1]}{path} answered with extra {extra!r}, not an object")
        if status != 200:
            conn.close()  # after a refusal the server may end the connection
            raise PeerError(
                int(status) if isinstance(status, int) else 0,
                str(meta.get("error", "BadMessage")),
                str(meta.get("detail", "")),
                f"stream://{target[0]}:{target[1]}{path}",
            )
        self._idle.setdefault(target, []).append(conn)
        return StreamReply(answer, str(meta["digest"]), extra)

    async def _connection(self, target: tuple[str, int], reuse: bool) -> tuple[Connection, bool]:
        """A connection to `target` and whether it was kept from an earlier exchange."""
        idle = self._idle.get(target, []) if reuse else []
        while idle:
            conn = idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                return conn, True
        transport, conn = await asyncio.get_running_loop().create_connection(Connection, *target)
        transport.write(MAGIC)
        return conn, False

    def close(self) -> None:
        """Close every idle connection (those in use close when their exchange ends)."""
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()


def _host_port(address: str) -> tuple[str, int]:
    parts = urlsplit(address)
    if parts.hostname is None or parts.port is None:
        raise NetError(f"address {address!r} has no host and port")
    return parts.hostname, parts.port
