"""The holder routes every peer serves, signed (btauth/1, registered hotkeys only).

On streams (iota.net.stream: the bulk bytes, on persistent connections):

    POST /allreduce/{round}/parts/{part}?fp=&weight=   a sender's frame of one part
    GET  /allreduce/{round}/results/{part}?fp=&decision=   the reduced part under that decision; in the
                                                       answer's extra {"attestation": hex, "gram":
                                                       the contributions' inner products}, both in
                                                       the holder's attestation (`mean_message`)
    GET  /allreduce/{round}/relays/{part}?fp=&decision=    the attested mean this peer's gather got from
                                                       a holder (the same way), for a member no holder
                                                       serves
    GET  /allreduce/{round}/contributions/{part}?fp=   this peer's own frame of a part (a backup pulls it)

Over HTTP, on the same port (small JSON documents):

    GET  /allreduce/{round}/have?fp=&full=             the closed have-set (waits for the close); `full`
                                                       lists shards to pull from their senders first
    POST /allreduce/{round}/decision?fp=               write-once contributor decision (JSON)
    POST /allreduce/{round}/done?fp=                   the sender fetches nothing more (holders may let go)

`fp` is the round plan's fingerprint: a peer whose view of the round
differs (members, bandwidths, length, codec, part size) is refused rather
than mixed in. Only members of the round get past the lookup.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import parse_qsl, urlsplit

from aiohttp import web

from iota.allreduce.config import AllReduceConfig
from iota.allreduce.decision import Decision
from iota.allreduce.errors import GroupError
from iota.allreduce.holder import HolderRound, Refusal
from iota.chain import Chain
from iota.codec import Codec
from iota.net import (
    GuardConfig,
    StreamAnswer,
    StreamRequest,
    json_error,
    request_body,
    request_sender,
    route_policy,
    signed_app,
)
from iota.net.answers import Buffer

if TYPE_CHECKING:
    from bittensor.signing import WalletLike

MAX_BLOCK = 4096  # the largest quantization block a codec accepts
_STREAM_ROUTES = {("POST", "parts"), ("GET", "results"), ("GET", "relays"), ("GET", "contributions")}
_STREAM_PATH = re.compile(r"/allreduce/(?P<round>[^/]+)/(?P<what>parts|results|relays|contributions)/(?P<part>[^/]+)")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")


class Rounds:
    """The rounds this peer holds, by id."""

    def __init__(self, config: AllReduceConfig) -> None:
        self.config = config
        self._rounds: dict[str, HolderRound] = {}
        self._opened = asyncio.Event()

    def open(self, holder: HolderRound) -> None:
        round_id = holder.plan.group.round_id
        if round_id in self._rounds:
            raise GroupError(f"round {round_id} is already running on this peer; give every round a new id")
        self._rounds[round_id] = holder
        # Wake every request waiting for a round to open; they re-check their id.
        self._opened.set()
        self._opened = asyncio.Event()

    def drop(self, round_id: str) -> None:
        self._rounds.pop(round_id, None)

    async def lookup(self, round_id: str, fingerprint: str, sender: str, *, wait: bool = True) -> HolderRound:
        """The open round `round_id` as `sender`, a member with the same plan, sees it.

        Peers join a round at slightly different moments, so a request for a
        round not open yet waits up to `floor` seconds for it (if `wait`).
        """
        deadline = time.monotonic() + (self.config.floor if wait else 0.0)
        while (holder := self._rounds.get(round_id)) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Refusal(425, "RoundNotOpen", f"round {round_id} is not open on this peer")
            try:
                async with asyncio.timeout(remaining):
                    await self._opened.wait()
            except asyncio.TimeoutError:
                pass
        if sender not in holder.plan.members:
            raise Refusal(403, "NotMember", f"{sender} is not a member of round {round_id}")
        if holder.plan.fingerprint != fingerprint:
            raise Refusal(
                409,
                "GroupMismatch",
                f"round {round_id} here has plan {holder.plan.fingerprint}, the request {fingerprint}: "
                "the peers disagree on members, bandwidths, vector length, codec or part size",
            )
        return holder


def parameter(path: str, values: Mapping[str, str], name: str, kind: Callable[[str], T]) -> T:
    """`values[name]` as a `kind`; Refusal(400) if it is missing or malformed."""
    raw = values.get(name)
    try:
        return kind(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise Refusal(400, "BadRequest", f"{path}: {name}={raw!r} is missing or not a {kind.__name__}") from None


def shard_list(text: str) -> list[int]:
    """"2,0" -> [2, 0]; "" -> []."""
    return [int(shard) for shard in text.split(",")] if text else []


class HolderStreams:
    """The holder's stream routes (parts in, means out) for every open round."""

    def __init__(self, rounds: Rounds) -> None:
        self.rounds = rounds
        self.config = rounds.config
        # A part is about part_bytes, or one block when that is larger (blocks
        # hold at most MAX_BLOCK values, and raw fp32 is the widest encoding).
        self.largest_part = self.config.part_bytes + Codec(kind="raw").frame_size((MAX_BLOCK,))

    def limit(self, method: str, path: str) -> int:
        route = _STREAM_PATH.fullmatch(urlsplit(path).path)
        if route is None or (method, route["what"]) not in _STREAM_ROUTES:
            raise Refusal(404, "NoRoute", f"no stream route {method} {urlsplit(path).path}")
        return self.largest_part if method == "POST" else 0

    def read_bound(self, nbytes: int) -> float:
        return self.config.wait_bound(nbytes)

    async def handle(self, request: StreamRequest) -> Buffer | StreamAnswer:
        split = urlsplit(request.path)
        route = _STREAM_PATH.fullmatch(split.path)
        assert route is not None  # limit() let it through
        values = {**dict(parse_qsl(split.query)), **route.groupdict()}
        holder = await self.rounds.lookup(route["round"], values.get("fp", ""), request.sender.hotkey)
        holder.traffic.received += len(request.payload)
        part = parameter(split.path, values, "part", int)
        if route["what"] == "parts":
            weight = parameter(split.path, values, "weight", float)
            await holder.receive(request.sender.hotkey, part, weight, request.payload, remote=True,
                                 digest=request.digest)
            return b""
        if route["what"] == "contributions":
            data = holder.contribution(part)
            holder.traffic.sent += len(data)
            return data
        key = parameter(split.path, values, "decision", str)
        if route["what"] == "relays":
            mean = holder.faults.tamper_relay(await holder.relay(part, key))
        elif holder.faults.withholds_means_from(request.sender.hotkey):
            raise Refusal(503, "Withheld", f"{holder.me} serves no mean to {request.sender.hotkey} (a test fault)")
        else:
            mean = await holder.mean(part, key)
        holder.traffic.sent += len(mean.frame)
        return StreamAnswer((mean.frame,), mean.digest, mean.extra())


def holder_app(wallet: WalletLike, chain: Chain, rounds: Rounds, guard: GuardConfig | None = None) -> web.Application:
    """The signed aiohttp app serving this peer's holder role in every open round
    (serve it with `streams=HolderStreams(rounds)` for the parts and means)."""

    def answer(
        handler: Callable[[web.Request, HolderRound, str], Awaitable[web.StreamResponse]], *, wait: bool = True
    ) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            sender = request_sender(request).hotkey
            try:
                round_id, fingerprint = request.match_info["round"], request.query.get("fp", "")
                holder = await rounds.lookup(round_id, fingerprint, sender, wait=wait)
                holder.traffic.received += len(request_body(request))
                return await handler(request, holder, sender)
            except Refusal as refusal:
                return json_error(refusal.status, refusal.kind, refusal.detail)

        return wrapped

    def param(request: web.Request, name: str, kind: Callable[[str], T]) -> T:
        return parameter(request.path, {**request.query, **request.match_info}, name, kind)

    def reply_json(holder: HolderRound, payload: object) -> web.Response:
        body = json.dumps(payload).encode()
        holder.traffic.sent += len(body)
        return web.Response(body=body, content_type="application/json")

    @route_policy(max_body=0)
    @answer
    async def get_have(request: web.Request, holder: HolderRound, sender: str) -> web.StreamResponse:
        return reply_json(holder, (await holder.have_set(param(request, "full", shard_list))).to_json())

    @route_policy()
    @answer
    async def post_decision(request: web.Request, holder: HolderRound, sender: str) -> web.StreamResponse:
        try:
            proposal = Decision.from_json(json.loads(request_body(request)))
        except ValueError as exc:  # json.JSONDecodeError included
            raise Refusal(400, "BadRequest", f"not a decision: {exc}") from None
        return reply_json(holder, holder.record(proposal).to_json())

    async def done(request: web.Request, holder: HolderRound, sender: str) -> web.StreamResponse:
        holder.done(sender)
        return web.Response(status=204)

    # A round already let go of has nothing to release: no waiting for it.
    post_done = route_policy(max_body=0)(answer(done, wait=False))

    app = signed_app(wallet, chain, guard)
    app.router.add_get("/allreduce/{round}/have", get_have)
    app.router.add_post("/allreduce/{round}/decision", post_decision)
    app.router.add_post("/allreduce/{round}/done", post_done)
    return app
