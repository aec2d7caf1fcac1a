"""Client side of signed requests: every request signed with our hotkey for one named receiver."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from bittensor import http_auth
from bittensor.signing import resolve_signer
from yarl import URL

from iota.net.answers import REQUEST_SIGNATURE, AnswerChecker
from iota.net.body import check_part_size, iter_parts, read_bounded
from iota.net.errors import BodyTooLarge, NetError, PeerError

if TYPE_CHECKING:
    from bittensor.signing import WalletLike

DEFAULT_MAX_RESPONSE = 64 << 20


@dataclass(frozen=True)
class Reply:
    """A successful (2xx) answer, its body read in full."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise NetError(
                f"expected a JSON reply, got {len(self.body)} bytes that do not parse: {exc}"
            ) from None


class SignedClient:
    """Signs each request with a hotkey over a caller-owned aiohttp session.

    `wallet` is anything `bittensor.http_auth.sign` accepts: a Keypair
    (see iota.chain.keys), a bittensor Wallet (its hotkey signs), or a
    Signer. Bodies go out and come back in parts of at most `chunk_size`
    bytes. Nothing retries: each call signs a fresh nonce, so retrying is
    calling again.
    """

    def __init__(
        self, wallet: WalletLike, session: aiohttp.ClientSession, *, chunk_size: int = 1 << 20
    ) -> None:
        check_part_size(chunk_size)
        # Resolved once, so a Wallet's hotkey is unlocked once, not per request.
        self.signer = resolve_signer(wallet, role="hotkey")
        self.session = session
        self.chunk_size = chunk_size
        self._answers = AnswerChecker()

    @property
    def hotkey(self) -> str:
        """The ss58 address every request is signed as."""
        return self.signer.ss58_address

    async def request(
        self,
        method: str,
        address: str,
        path: str,
        *,
        receiver: str,
        timeout: float | aiohttp.ClientTimeout,
        body: bytes = b"",
        content_type: str = "application/octet-stream",
        max_response: int = DEFAULT_MAX_RESPONSE,
    ) -> Reply:
        """Send a request signed for the hotkey `receiver` to `address` + `path`.

        `path` is the request target exactly as sent (percent-encoded, with
        any ?query), because that is what the signature covers. `timeout` is
        in seconds for the whole exchange, or an aiohttp.ClientTimeout.
        Raises PeerError on a non-2xx answer, BodyTooLarge if the answer
        exceeds `max_response` bytes, NetError if the peer cannot be reached,
        the timeout expires or the answer is not `receiver`'s signed answer to
        this request (iota.net.answers).
        """
        if not path.startswith("/"):
            raise NetError(f"path {path!r} must start with '/'")
        url = URL(address.rstrip("/") + path, encoded=True)
        # Signing hashes the body: off the loop, or a big frame stalls it.
        headers = await asyncio.to_thread(
            http_auth.sign, self.signer, method=method, path=path, body=body, receiver_ss58=receiver
        )
        data = None
        if body:
            headers["Content-Type"] = content_type
            # An explicit length lets the receiver refuse an oversized body
            # (413) before reading any of it, and avoids chunked encoding.
            headers["Content-Length"] = str(len(body))
            data = iter_parts(body, self.chunk_size)
        client_timeout = (
            timeout if isinstance(timeout, aiohttp.ClientTimeout) else aiohttp.ClientTimeout(total=timeout)
        )
        try:
            async with self.session.request(
                method, url, data=data, headers=headers, timeout=client_timeout, allow_redirects=False
            ) as response:
                if response.content_length is not None and response.content_length > max_response:
                    raise BodyTooLarge(
                        f"{url} announced a {response.content_length}-byte reply, over the {max_response}-byte limit"
                    )
                try:
                    payload = await read_bounded(
                        response.content, limit=max_response, chunk_size=self.chunk_size
                    )
                except BodyTooLarge:
                    raise BodyTooLarge(f"{url} sent a reply over the {max_response}-byte limit") from None
                await self._answers.check_http(
                    receiver, headers[REQUEST_SIGNATURE], response.status, response.headers, payload, str(url)
                )
                if not 200 <= response.status < 300:
                    raise _peer_error(response.status, payload, str(url))
                return Reply(response.status, response.headers, payload)
        except asyncio.TimeoutError:
            raise NetError(
                f"{method} {url} timed out (timeout={timeout}); the peer is down or slow, or the timeout too short"
            ) from None
        except aiohttp.ClientError as exc:
            raise NetError(f"{method} {url} failed: {exc!r}") from None

    async def post_bytes(
        self,
        address: str,
        path: str,
        data: bytes,
        *,
        receiver: str,
        timeout: float | aiohttp.ClientTimeout,
        max_response: int = DEFAULT_MAX_RESPONSE,
    ) -> bytes:
        """POST a binary body (a frame); return the binary reply."""
        reply = await self.request(
            "POST", address, path, receiver=receiver, timeout=timeout, body=data, max_response=max_response
        )
        return reply.body

    async def get_bytes(
        self,
        address: str,
        path: str,
        *,
        receiver: str,
        timeout: float | aiohttp.ClientTimeout,
        max_response: int = DEFAULT_MAX_RESPONSE,
    ) -> bytes:
        """GET a binary reply."""
        reply = await self.request(
            "GET", address, path, receiver=receiver, timeout=timeout, max_response=max_response
        )
        return reply.body

    async def post_json(
        self,
        address: str,
        path: str,
        payload: Any,
        *,
        receiver: str,
        timeout: float | aiohttp.ClientTimeout,
        max_response: int = DEFAULT_MAX_RESPONSE,
    ) -> Any:
        """POST a JSON document; return the parsed JSON reply."""
        reply = await self.request(
            "POST",
            address,
            path,
            receiver=receiver,
            timeout=timeout,
            body=json.dumps(payload).encode(),
            content_type="application/json",
            max_response=max_response,
        )
        return reply.json()

    async def get_json(
        self,
        address: str,
        path: str,
        *,
        receiver: str,
        timeout: float | aiohttp.ClientTimeout,
        max_response: int = DEFAULT_MAX_RESPONSE,
    ) -> Any:
        """GET a JSON reply, parsed."""
        reply = await self.request(
            "GET", address, path, receiver=receiver, timeout=timeout, max_response=max_response
        )
        return reply.json()


def _peer_error(status: int, payload: bytes, url: str) -> PeerError:
    try:
        parsed = json.loads(payload)
        return PeerError(status, str(parsed["error"]), str(parsed["detail"]), url)
    except (ValueError, TypeError, KeyError):
        # Not an iota server's error body: show the start of whatever it sent.
        return PeerError(status, "HTTPError", payload[:200].decode("utf-8", "replace"), url)
