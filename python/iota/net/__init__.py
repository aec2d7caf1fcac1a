"""Signed transport: every request carries the sender's hotkey signature (btauth/1),
over HTTP or, for bulk bytes, over persistent stream connections on the same port."""

from iota.net.client import DEFAULT_MAX_RESPONSE, Reply, SignedClient
from iota.net.errors import BodyTooLarge, NetError, PeerError, Refused
from iota.net.guard import (
    GuardConfig,
    JsonHTTPError,
    RequestGuard,
    RoutePolicy,
    json_error,
    request_body,
    request_sender,
    route_policy,
)
from iota.net.replay import ReplayCache
from iota.net.server import serve, signed_app
from iota.net.stream import StreamAnswer, StreamClient, StreamReply, StreamRequest, StreamService

__all__ = [
    "DEFAULT_MAX_RESPONSE",
    "BodyTooLarge",
    "GuardConfig",
    "JsonHTTPError",
    "NetError",
    "PeerError",
    "ReplayCache",
    "Refused",
    "Reply",
    "RequestGuard",
    "RoutePolicy",
    "SignedClient",
    "StreamAnswer",
    "StreamClient",
    "StreamReply",
    "StreamRequest",
    "StreamService",
    "json_error",
    "request_body",
    "request_sender",
    "route_policy",
    "serve",
    "signed_app",
]
