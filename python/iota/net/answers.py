"""Signed answers: a server signs every answer, over HTTP or a stream, with its hotkey.

The signature covers the signature of the request it answers (so an answer fits
that request alone: a replayed or redirected answer does not verify) and the
answer's meta: its status, the BLAKE3 digest of its body and, on a stream,
the refusal's kind and detail. A client takes an answer, a refusal included,
only if the hotkey it addressed signed it; a man in the middle, or another
server on the address, can then neither forge a decision, a lease or a mean
nor fake a refusal.

Over HTTP the signature and the digest travel as the headers `ANSWER_SIGNATURE`
and `ANSWER_DIGEST`; the signed meta is {"status", "digest"}.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import blake3
from aiohttp import web
from bittensor import http_auth
from bittensor.sp_core import Keypair

from iota.net.errors import NetError
from iota.net.guard import SMALL_BODY

ANSWER_CONTEXT = b"iota-answer/1\n"
ANSWER_SIGNATURE = "X-Iota-Answer-Signature"
ANSWER_DIGEST = "X-Iota-Answer-Digest"
REQUEST_SIGNATURE = http_auth.HEADER_SIGNATURE  # of the btauth/1 request headers

Buffer = bytes | bytearray | memoryview


def payload_digest(*payload: Buffer) -> str:
    """BLAKE3-256, hex, of the pieces back to back: what signatures over bodies cover."""
    hasher = blake3.blake3()
    for piece in payload:
        hasher.update(piece)
    return hasher.hexdigest()


async def digest_off_loop(*payload: Buffer) -> str:
    """`payload_digest`, in a thread for a payload large enough to stall the loop."""
    if sum(len(piece) for piece in payload) > SMALL_BODY:
        return await asyncio.to_thread(payload_digest, *payload)
    return payload_digest(*payload)


EMPTY_DIGEST = payload_digest(b"")


def answer_message(request_signature: str, meta: Mapping[str, Any]) -> bytes:
    """What a server signs for an answer: the signature of the request it answers and
    the answer's meta but its signature, as canonical JSON."""
    fields = {key: value for key, value in meta.items() if key != "signature"}
    return ANSWER_CONTEXT + request_signature.encode() + b"\n" + json.dumps(
        fields, sort_keys=True, separators=(",", ":")
    ).encode()


def sign_answer(signer: Keypair, request_signature: str, meta: Mapping[str, Any]) -> str:
    """`signer`'s signature, hex, over the answer with `meta` to the request signed `request_signature`."""
    return signer.sign(answer_message(request_signature, meta)).hex()


class AnswerChecker:
    """Checks answers against the hotkeys they come from (public keys kept per hotkey)."""

    def __init__(self) -> None:
        self._keys: dict[str, Keypair] = {}

    def signed_by(self, hotkey: str, request_signature: str, meta: Mapping[str, Any], signature: object) -> bool:
        """Whether `signature` (hex) is `hotkey`'s over the answer with `meta` to that request."""
        if hotkey not in self._keys:
            self._keys[hotkey] = Keypair(ss58_address=hotkey)
        try:
            return isinstance(signature, str) and self._keys[hotkey].verify(
                answer_message(request_signature, meta), bytes.fromhex(signature)
            )
        except ValueError:  # not hex, or not 64 bytes long
            return False

    async def check(
        self, hotkey: str, request_signature: str, meta: Mapping[str, Any], signature: object, payload: Buffer,
        where: str,
    ) -> None:
        """NetError unless `hotkey` signed the answer with `meta` (its status and its payload's
        digest among them) to that request, and `payload` matches the digest."""
        if not self.signed_by(hotkey, request_signature, meta, signature):
            raise NetError(
                f"{where} answered {meta.get('status')} without {hotkey}'s signature over this request's answer"
            )
        if await digest_off_loop(payload) != meta.get("digest"):
            raise NetError(f"{where} answered with a payload that does not match the digest {hotkey} signed")

    async def check_http(
        self, hotkey: str, request_signature: str, status: int, headers: Mapping[str, str], body: Buffer, where: str
    ) -> None:
        """`check` for an HTTP answer: its status, and the digest and signature in its headers."""
        meta = {"status": status, "digest": headers.get(ANSWER_DIGEST, "")}
        await self.check(hotkey, request_signature, meta, headers.get(ANSWER_SIGNATURE), body, where)


def answer_signing_middleware(
    signer: Keypair,
) -> Callable[[web.Request, Callable[[web.Request], Awaitable[web.StreamResponse]]], Awaitable[web.StreamResponse]]:
    """An aiohttp middleware that signs every answer of the app with `signer`, refusals,
    errors raised by handlers and the router's 404/405 included. An answer whose body
    is not bytes (a streamed one) cannot be signed: it becomes a 500 rather than go out
    unsigned."""

    @web.middleware
    async def sign_answers(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = web.Response(status=exc.status, body=exc.body, headers=_without_length(exc.headers))
        body = response.body if isinstance(response, web.Response) else None
        if body is None and isinstance(response, web.Response) and response.status in (204, 304):
            body = b""
        if not isinstance(body, (bytes, bytearray, memoryview)):
            detail = f"{request.path} answered with a body that is not bytes, which cannot be signed"
            response = web.json_response({"error": "UnsignableAnswer", "detail": detail}, status=500)
            body = response.body
        digest = await digest_off_loop(body)
        response.headers[ANSWER_DIGEST] = digest
        response.headers[ANSWER_SIGNATURE] = sign_answer(
            signer, request.headers.get(REQUEST_SIGNATURE, ""), {"status": response.status, "digest": digest}
        )
        return response

    return sign_answers


def _without_length(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() != "content-length"}
