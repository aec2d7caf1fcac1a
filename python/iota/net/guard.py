"""Server side of signed requests: an aiohttp middleware that lets only verified, authorized requests through.

For each request, before the handler runs: the body is read in bounded parts
(413 past the route's limit), the btauth/1 signature is verified over
method, path, body hash, nonce, sender and receiver (401 if missing, stale,
replayed, tampered or addressed to another hotkey), and the sender is looked
up on the chain (403 if unregistered or of a role the route does not allow).
Refusals carry a JSON body {"error": kind, "detail": message}; the handler is
never called for them. Handlers read the verified body with `request_body`
and the sender with `request_sender`, so they only ever see bytes whose
hash the signature covered.

Every route is guarded unless its handler is marked `route_policy(public=True)`:
a forgotten policy fails closed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from aiohttp import web
from bittensor import http_auth

from iota.chain.base import ROLES, Chain, Neuron, Role
from iota.net.body import check_part_size, read_bounded
from iota.net.errors import BodyTooLarge, NetError, Refused
from iota.net.replay import ReplayCache

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
H = TypeVar("H", bound=Handler)

_POLICY_ATTR = "__iota_route_policy__"
_SENDER = web.RequestKey("iota_sender", Neuron)
_BODY = web.RequestKey("iota_body", bytes)
SMALL_BODY = 64 << 10  # verified on the loop; larger bodies are hashed in a thread


@dataclass(frozen=True)
class RoutePolicy:
    """Who may call a route and how large its body may be.

    `max_body` None means the guard's default. A `public` route skips
    signatures entirely (dashboards, health checks: browsers cannot sign).
    """

    roles: frozenset[Role] = frozenset(ROLES)
    max_body: int | None = None
    public: bool = False


def route_policy(
    *, roles: Iterable[Role] = ROLES, max_body: int | None = None, public: bool = False
) -> Callable[[H], H]:
    """Decorate a handler with the roles allowed to call it and its body limit."""
    policy = RoutePolicy(frozenset(roles), max_body, public)
    unknown = policy.roles - set(ROLES)
    if unknown or not policy.roles:
        raise ValueError(f"roles must be a non-empty subset of {ROLES}, got {sorted(policy.roles)}")
    if max_body is not None and max_body < 0:
        raise ValueError(f"max_body must be >= 0 bytes, got {max_body}")

    def attach(handler: H) -> H:
        setattr(handler, _POLICY_ATTR, policy)
        return handler

    return attach


@dataclass(frozen=True)
class GuardConfig:
    """Limits of the guard; the defaults suit a laptop swarm.

    `max_age` and `allowed_skew` are the freshness window in seconds
    (http_auth's defaults); `replay_capacity` bounds the replay cache.
    """

    max_body: int = 64 << 20
    chunk_size: int = 1 << 20
    max_age: float = http_auth.DEFAULT_MAX_AGE
    allowed_skew: float = http_auth.DEFAULT_ALLOWED_SKEW
    replay_capacity: int = 100_000


def json_error(status: int, kind: str, detail: str) -> web.Response:
    """The JSON error response every iota server sends: {"error": kind, "detail": detail}."""
    return web.json_response({"error": kind, "detail": detail}, status=status)


class JsonHTTPError(web.HTTPException):
    """Raise from a handler (at any depth) to answer with iota's JSON error body."""

    def __init__(self, status: int, kind: str, detail: str) -> None:
        self.status_code = status
        super().__init__(text=json.dumps({"error": kind, "detail": detail}), content_type="application/json")


def request_sender(request: web.Request) -> Neuron:
    """The verified, registered sender of a guarded request."""
    try:
        return request[_SENDER]
    except KeyError:
        raise NetError(
            f"{request.path} has no verified sender: it is a public route or the guard middleware is not installed"
        ) from None


def request_body(request: web.Request) -> bytes:
    """The body of a request that passed the guard (verified unless the route is public)."""
    try:
        return request[_BODY]
    except KeyError:
        raise NetError(
            f"{request.path} has no body read by the guard: install RequestGuard.middleware on the app"
        ) from None


class RequestGuard:
    """Verifies every request addressed to `hotkey` against `chain`."""

    def __init__(self, hotkey: str, chain: Chain, config: GuardConfig | None = None) -> None:
        self.hotkey = hotkey
        self.chain = chain
        self.config = config or GuardConfig()
        check_part_size(self.config.chunk_size)
        # Entries must outlive the whole freshness window, or a replay could
        # arrive after its nonce was forgotten but while it is still fresh.
        self.replay = ReplayCache(
            retention=self.config.max_age + self.config.allowed_skew,
            capacity=self.config.replay_capacity,
        )

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        policy: RoutePolicy = getattr(request.match_info.handler, _POLICY_ATTR, RoutePolicy())
        limit = self.config.max_body if policy.max_body is None else policy.max_body
        if request.content_length is not None and request.content_length > limit:
            return _too_large(limit)
        if not policy.public and http_auth.HEADER_SIGNATURE not in request.headers:
            # Refused before reading, so an unsigned body is never buffered.
            return json_error(
                401, "Unsigned", "request carries no btauth/1 signature; sign it with the sender's hotkey"
            )
        try:
            body = await read_bounded(request.content, limit=limit, chunk_size=self.config.chunk_size)
        except BodyTooLarge:
            return _too_large(limit)
        if policy.public:
            request[_BODY] = body
            return await handler(request)

        try:
            sender = await self.authenticate(
                request.headers, body, method=request.method, path=request.raw_path, roles=policy.roles
            )
        except Refused as refusal:
            return json_error(refusal.status, refusal.kind, refusal.detail)
        request[_SENDER] = sender
        request[_BODY] = body
        return await handler(request)

    async def authenticate(
        self, headers: Mapping[str, str], body: bytes, *, method: str, path: str, roles: frozenset[Role]
    ) -> Neuron:
        """The registered sender whose btauth/1 signature over (method, path, body) is valid,
        fresh, unreplayed and addressed to us, if its role is one of `roles`; else Refused
        (401 for the signature, 403 for the chain)."""
        try:
            if len(body) > SMALL_BODY:  # hashing a multi-MB body would stall every connection on the loop
                caller = await asyncio.to_thread(self._verify, headers, body, method, path)
            else:
                caller = self._verify(headers, body, method, path)
        except http_auth.AuthError as exc:
            # AuthError messages never echo secrets, so they are safe to return.
            raise Refused(401, type(exc).__name__, str(exc)) from None
        sender = await self.chain.neuron(caller.hotkey_ss58)
        if sender is None:
            raise Refused(403, "NotRegistered", f"hotkey {caller.hotkey_ss58} is not registered on this chain")
        if sender.role not in roles:
            allowed = ", ".join(sorted(roles))
            raise Refused(403, "WrongRole", f"{path} accepts {allowed}, and {sender.hotkey} is a {sender.role}")
        return sender

    def _verify(self, headers: Mapping[str, str], body: bytes, method: str, path: str) -> http_auth.Caller:
        return http_auth.verify(
            headers,
            body,
            method=method,
            path=path,
            self_hotkey_ss58=self.hotkey,
            max_age=self.config.max_age,
            allowed_skew=self.config.allowed_skew,
            nonce_store=self.replay,
        )


def _too_large(limit: int) -> web.Response:
    return json_error(413, "BodyTooLarge", f"body exceeds this route's {limit}-byte limit")
