"""Signed HTTP transport: every request carries the sender's hotkey signature (btauth/1)."""

from iota.net.client import DEFAULT_MAX_RESPONSE, Reply, SignedClient
from iota.net.errors import BodyTooLarge, NetError, PeerError
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
from iota.net.server import bytes_response, serve, signed_app

__all__ = [
    "DEFAULT_MAX_RESPONSE",
    "BodyTooLarge",
    "GuardConfig",
    "JsonHTTPError",
    "NetError",
    "PeerError",
    "ReplayCache",
    "Reply",
    "RequestGuard",
    "RoutePolicy",
    "SignedClient",
    "bytes_response",
    "json_error",
    "request_body",
    "request_sender",
    "route_policy",
    "serve",
    "signed_app",
]
