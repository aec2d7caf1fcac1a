"""Errors of the signed transport."""

from __future__ import annotations

from iota.errors import IotaError


class NetError(IotaError):
    """A request that could not be made, or a body that could not be taken, as asked."""


class BodyTooLarge(NetError):
    """A body exceeded the size limit the reader set; it was not read to the end."""


class PeerError(NetError):
    """A peer answered with an error status.

    `kind` and `detail` come from the peer's JSON error body when it sent one
    (e.g. kind "StaleRequest": check this machine's clock).
    """

    def __init__(self, status: int, kind: str, detail: str, url: str) -> None:
        super().__init__(f"{url} answered {status} {kind}: {detail}")
        self.status = status
        self.kind = kind
        self.detail = detail
        self.url = url


class Refused(IotaError):
    """A server's reasoned refusal of a request, sent to the caller as status, kind and detail
    (over HTTP as iota's JSON error body; the caller sees a PeerError)."""

    def __init__(self, status: int, kind: str, detail: str) -> None:
        super().__init__(f"{status} {kind}: {detail}")
        self.status = status
        self.kind = kind
        self.detail = detail
