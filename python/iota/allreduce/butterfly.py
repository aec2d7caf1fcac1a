"""One peer's side of a round: scatter parts to holders, agree on the
contributors, gather the reduced shards.

1. Scatter: each part of shard s goes, encoded, to its owner; this peer keeps
   every frame it sent (a backup pulls them if the owner is lost).
2. Decide: read the closed have-sets of the holders (asking the backup of a
   shard whose owner is gone for its full have-set: it pulls the parts from
   their senders), propose the contributors whose parts of every shard some
   live holder has in full (`decision.propose`), then write the proposal to
   the holders' write-once registers in sorted order until one answers,
   adopting what it holds, and that to all later registers at once; a later
   register holding anything else fails the round. Every peer does this, so
   the first live register settles it for all of them.
3. Gather: fetch each part of the mean from its owner, else its backup, under
   that decision, checking it is that decision; else from any member whose own
   gather got it, checking the holder's attestation (so a holder that served
   some peers and not others leaves none behind). Each part's mean comes with
   the inner products of the contributions to it, in the attestation too; their
   sum over the parts goes in the report (for validators). A part none of them has
   (its owner died after the decision, taking its own parts of the shard with
   it) fails the round with `MeanLostError` on every peer alike.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Iterable
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import quote

import aiohttp
import numpy as np
import torch
from bittensor.sp_core import Keypair

from iota._C import ByteBlock
from iota.allreduce.config import AllReduceConfig
from iota.allreduce.decision import Decision, HaveSet, MeanLost, RoundFailed, propose
from iota.allreduce.errors import AllReduceError, GroupError, MeanLostError
from iota.allreduce.faults import Faults
from iota.allreduce.gram import gram_of_text
from iota.allreduce.group import Part, RoundPlan
from iota.allreduce.holder import (
    ATTESTATION_BYTES,
    AttestedMean,
    HolderRound,
    Refusal,
    mean_message,
    stochastic_seed,
)
from iota.allreduce.result import AllReduceReport, AllReduceResult, ShardReport
from iota.codec import Codec
from iota.codec.tensors import huge_page_tensor
from iota.errors import CodecError
from iota.net import NetError, PeerError, SignedClient, StreamClient, StreamReply
from iota.net.answers import payload_digest

if TYPE_CHECKING:
    from iota.net.answers import Buffer

log = logging.getLogger(__name__)
T = TypeVar("T")


async def run_all(coros: Iterable[Awaitable[T]]) -> list[T]:
    """Run concurrently; on the first failure cancel the rest, then raise it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class ButterflyRound:
    """Runs one round for this peer; `run` returns the result or raises AllReduceError."""

    def __init__(
        self,
        plan: RoundPlan,
        holder: HolderRound,
        client: SignedClient,
        streams: StreamClient,
        config: AllReduceConfig,
        faults: Faults,
        vector: torch.Tensor,
        weight: float,
        out: torch.Tensor | None = None,
    ) -> None:
        self.plan = plan
        self.me = holder.me
        self.holder = holder
        self.client = client
        self.streams = streams
        self.config = config
        self.faults = faults
        self.vector = vector
        self.out = out
        self.weight = weight
        self.traffic = holder.traffic
        self.unreachable: dict[str, str] = {}
        self.closed_early: set[str] = set()  # holders that closed before all our parts arrived
        self.served_by: dict[int, set[str]] = {s: set() for s in range(plan.size)}
        self.relayed_by: dict[int, set[str]] = {s: set() for s in range(plan.size)}
        self.served_parts: set[int] = set()
        self.decision: Decision | None = None
        self.gram: list[list[float]] | None = None
        self.timings: dict[str, float] = {}
        self.started_at = 0.0
        holder.fetch = self.fetch_contribution

    async def run(self, started: float) -> AllReduceResult:
        """The round's result; `started` is when the caller asked (time.monotonic)."""
        self.started_at = time.time() - (time.monotonic() - started)
        mark = started

        def lap(phase: str) -> None:
            nonlocal mark
            now = time.monotonic()
            self.timings[phase], mark = now - mark, now

        try:
            await self.scatter()
            lap("scatter")
            self.decision, later = await self.decide()
            lap("decide")
            # Holders serve a mean only under the decision their own register holds, so
            # the gather need not wait for the later registers: a split fails it, or the spread.
            (mean, means), _ = await run_all([self.gather(self.decision), self.spread(self.decision, later)])
            self.gram = summed_gram(means, len(self.decision.contributors))
            lap("gather")
        except RoundFailed as exc:
            report = self.report(time.monotonic() - started, error=str(exc))
            error = MeanLostError if isinstance(exc, MeanLost) else AllReduceError
            raise error(f"round {self.plan.group.round_id} failed on {self.me}: {exc}", report) from None
        finally:
            self.holder.gather_ended()
        frames, digests = [m.frame for m in means], [m.digest for m in means]
        return AllReduceResult(mean, frames, digests, self.report(time.monotonic() - started))

    # -- talking to holders -------------------------------------------------------

    def _path(self, what: str, **query: str) -> str:
        params = "&".join(f"{k}={v}" for k, v in {"fp": self.plan.fingerprint, **query}.items())
        return f"/allreduce/{self.plan.group.round_id}/{what}?{params}"

    async def _call(self, holder: str, method: str, path: str, body: bytes, timeout: float) -> bytes:
        self.traffic.sent += len(body)
        # A peer that cannot even be connected to within the floor is gone;
        # `timeout` bounds the whole exchange (long-polls included).
        limits = aiohttp.ClientTimeout(total=timeout, sock_connect=self.config.floor)
        reply = await self.client.request(
            method, self.plan.group.address(holder), path, receiver=holder, timeout=limits, body=body
        )
        self.traffic.received += len(reply.body)
        return reply.body

    async def _stream(
        self, holder: str, method: str, path: str, timeout: float, *, max_response: int,
        payload: bytes = b"", digest: str | None = None,
    ) -> StreamReply:
        self.traffic.sent += len(payload)
        reply = await self.streams.request(
            method, self.plan.group.address(holder), path, receiver=holder, timeout=timeout,
            payload=payload, digest=digest, max_response=max_response,
        )
        self.traffic.received += len(reply.payload)
        return reply

    def _lost(self, holder: str, what: str, exc: Exception) -> None:
        if holder not in self.unreachable:
            log.warning("round %s: %s cannot %s %s: %s", self.plan.group.round_id, self.me, what, holder, exc)
            self.unreachable[holder] = f"{what}: {exc}"

    # -- 1. scatter ----------------------------------------------------------------

    async def scatter(self) -> None:
        if self.faults.send_delay:
            await asyncio.sleep(self.faults.send_delay)
        self.faults.reached("before_send")
        order = self._rotation()
        slots = asyncio.Semaphore(self.config.max_inflight)
        delivered = 0

        async def send(sent: int, part: Part) -> None:
            nonlocal delivered
            async with slots:
                frame, digest = await asyncio.to_thread(self._encode, sent, part)
                self.holder.keep(part.index, frame, digest)
                await self._deliver(self.plan.members[part.shard], part, frame, digest)
            delivered += 1
            if delivered == len(order) // 2:
                self.faults.reached("mid_send")

        await run_all(send(i, part) for i, part in enumerate(order))

    def _rotation(self) -> list[Part]:
        """Every part, the shards taken in turn part by part from the shard after our own
        on. With a few parts in flight they go to (or come from) different holders at once,
        and peers start on different holders: every link carries a flow, even when peers
        drift a few parts apart (one shard after another left links idle while two peers
        queued at one holder: 1 Gbit/s int8 1.47 against 1.33 s, bench/allreduce.py)."""
        mine = self.plan.members.index(self.me)
        first = {s: parts[0] for s, parts in enumerate(self.plan.shard_parts) if parts}  # a shard's first part
        return sorted(
            self.plan.parts, key=lambda p: (p.index - first[p.shard], (p.shard - mine - 1) % self.plan.size)
        )

    def _encode(self, sent: int, part: Part) -> tuple[Buffer, str]:
        """The frame of `part` to send (in a pooled block) and its digest, which every request carrying it signs."""
        seed = stochastic_seed(self.plan, self.me, part.index)
        try:
            frame = self.plan.codec.encode_into(self.vector[part.begin : part.end], ByteBlock(part.frame_bytes),
                                                seed=seed)
        except CodecError as exc:  # NaN or infinity in the vector
            raise GroupError(f"part {part.index} of the vector: {exc}; it would poison every peer's mean") from None
        frame = self.faults.tamper(sent, frame)
        return frame, payload_digest(frame)

    async def _deliver(self, holder: str, part: Part, frame: bytes | memoryview, digest: str) -> None:
        if holder in self.unreachable or holder in self.closed_early:
            return
        try:
            if holder == self.me:
                await self.holder.receive(self.me, part.index, self.weight, frame, remote=False, digest=digest)
            else:
                path = self._path(f"parts/{part.index}", weight=quote(repr(self.weight), safe=""))
                # The part shares the uplink with up to 2 * max_inflight others.
                timeout = self.config.wait_bound(2 * self.config.max_inflight * len(frame))
                await self._stream(holder, "POST", path, timeout, max_response=0, payload=frame, digest=digest)
        except (Refusal, PeerError) as exc:
            if exc.kind == "Closed":
                self.closed_early.add(holder)
            elif exc.kind in ("BadPart", "Excluded"):
                log.error("round %s: %s refused our part %d: %s", self.plan.group.round_id, holder, part.index, exc)
            else:
                self._lost(holder, "send to", exc)
        except NetError as exc:
            self._lost(holder, "send to", exc)

    # -- 2. decide -------------------------------------------------------------------

    async def decide(self) -> tuple[Decision, list[str]]:
        """The round's decision, as the first live register holds it, and the registers after that one."""
        # A holder we could not deliver to (dead, or it joined too late) has an
        # incomplete have-set at best; waiting for it would only delay the round.
        holders = [h for h in self.plan.active_holders if h not in self.unreachable]
        asked = {h: self._orphans(h) for h in holders}
        answers = await run_all(self._have(h, asked[h]) for h in holders)
        haves = {h: have for h, have in zip(holders, answers) if have is not None}
        # An owner lost while we read: its backup's answer lacks the other senders of that shard.
        again = [h for h in haves if self._orphans(h) != asked[h]]
        for h, have in zip(again, await run_all(self._have(h, self._orphans(h)) for h in again)):
            if have is None:
                del haves[h]
            else:
                haves[h] = have
        recorded = [have.decision for have in haves.values() if have.decision is not None]
        proposal = recorded[0] if recorded else propose(self.plan, haves)
        # The registers in the same (sorted) order on every peer, even one we could not
        # read, until one answers: then the first live register is the same for all,
        # and what it holds settles the round. The rest get that, all at once.
        registers = list(self.plan.active_holders)
        while registers:
            decision = await self._record(registers.pop(0), proposal)
            if decision is not None:
                break
        else:
            raise RoundFailed(f"no holder could record the decision: {self.unreachable}")
        return decision, registers

    async def spread(self, decision: Decision, registers: list[str]) -> None:
        """Write the decision to the `registers` all at once; RoundFailed if one holds another."""
        for holder, stored in zip(registers, await run_all(self._record(h, decision) for h in registers)):
            if stored is not None and stored.key != decision.key:
                raise RoundFailed(
                    f"holders recorded different decisions ({decision.key} and {stored.key} at {holder}): "
                    "peers saw different holders alive; the round cannot complete consistently"
                )

    def _orphans(self, holder: str) -> list[int]:
        """The shards `holder` backs up whose owner we cannot reach."""
        return [s for s in self.plan.held_by(holder) if self.plan.members[s] in self.unreachable.keys() - {holder}]

    async def _have(self, holder: str, full: list[int]) -> HaveSet | None:
        """`holder`'s have-set; for the shards in `full` it first pulls every sender's parts."""
        try:
            if holder == self.me:
                return await self.holder.have_set(full)
            # The holder answers once it closes (at most its own deadline bound after opening)
            # and has pulled the shards in `full` from their senders.
            pulled = sum(self.plan.frame_bytes(s) for s in full) * self.plan.size
            timeout = self.config.wait_bound(self.plan.expected_bytes(holder) + pulled) + self.config.floor
            path = self._path("have", full=",".join(map(str, full))) if full else self._path("have")
            body = await self._call(holder, "GET", path, b"", timeout)
            return HaveSet.from_json(json.loads(body))
        except (Refusal, NetError, ValueError) as exc:
            self._lost(holder, "read the have-set of", exc)
            return None

    async def _record(self, holder: str, proposal: Decision) -> Decision | None:
        try:
            if holder == self.me:
                return self.holder.record(proposal)
            body = json.dumps(proposal.to_json()).encode()
            reply = await self._call(holder, "POST", self._path("decision"), body, self.config.wait_bound(len(body)))
            return Decision.from_json(json.loads(reply))
        except (Refusal, NetError, ValueError) as exc:
            self._lost(holder, "record the decision at", exc)
            return None

    # -- 3. gather ---------------------------------------------------------------------

    async def gather(self, decision: Decision) -> tuple[torch.Tensor, list[AttestedMean]]:
        """The mean decoded, and each part's attested mean as it arrived (checked)."""
        mean = self.out if self.out is not None else huge_page_tensor(self.plan.numel)
        means: list[AttestedMean | None] = [None] * len(self.plan.parts)
        slots = asyncio.Semaphore(self.config.max_inflight)

        async def fetch(part: Part) -> None:
            async with slots:
                problems: list[str] = []
                try:
                    got = await self._from_holders(part, decision, mean, problems)
                finally:
                    self.holder.tried(part.index)
                if got is None:  # no holder serves us this part: a member whose own gather got it hands it on
                    got = await self._from_relays(part, decision, mean, problems)
                if got is None:
                    raise MeanLost(f"no holder served part {part.index} of shard {part.shard}, "
                                   f"and no member had it: {'; '.join(problems)}")
                means[part.index] = got
                self.served_parts.add(part.index)

        await run_all(fetch(part) for part in self._rotation())
        return mean, means  # type: ignore[return-value]  # every part is in, or run_all raised

    async def _from_holders(
        self, part: Part, decision: Decision, mean: torch.Tensor, problems: list[str]
    ) -> AttestedMean | None:
        """The mean of `part` from its owner, else its backup, decoded into `mean`; None if
        neither serves it."""
        for holder in self._sources(part.shard):
            try:
                got = await self._result(holder, part, decision)
                await asyncio.to_thread(decode_checked, got.frame, mean[part.begin : part.end])
            except (Refusal, PeerError) as exc:
                if exc.kind == "DecisionMismatch":
                    raise RoundFailed(str(exc)) from None
                problems.append(f"{holder}: {exc}")
                continue
            except (NetError, CodecError) as exc:
                problems.append(f"{holder}: {exc}")
                self._lost(holder, "fetch the mean from", exc)
                continue
            self.holder.relayable[part.index] = (decision.key, got)
            self.served_by[part.shard].add(holder)
            return got
        return None

    async def _from_relays(
        self, part: Part, decision: Decision, mean: torch.Tensor, problems: list[str]
    ) -> AttestedMean | None:
        """The mean of `part` as another member's gather got it, decoded into `mean`; None if
        none has it."""
        for member in self._relays():
            try:
                got = await self._relayed(member, part, decision)
                await asyncio.to_thread(decode_checked, got.frame, mean[part.begin : part.end])
            except (Refusal, NetError, CodecError) as exc:  # PeerError is a NetError
                problems.append(f"{member} (relay): {exc}")
                continue
            self.relayed_by[part.shard].add(member)
            return got
        return None

    def _sources(self, shard: int) -> list[str]:
        """Where to fetch a shard: the owner, then the backup (which may have to pull the
        contributions first, even if it is this peer); known-dead last."""
        return sorted(self.plan.holders(shard), key=lambda h: h in self.unreachable)

    async def fetch_contribution(self, sender: str, part: int) -> Buffer:
        """`sender`'s own frame of `part`, for this peer's holder (which checks it)."""
        frame_bytes = self.plan.parts[part].frame_bytes
        path = self._path(f"contributions/{part}")
        reply = await self._stream(sender, "GET", path, self.config.wait_bound(frame_bytes), max_response=frame_bytes)
        return reply.payload

    async def _result(self, holder: str, part: Part, decision: Decision) -> AttestedMean:
        """`holder`'s attested mean of `part`."""
        if holder == self.me:
            return await self.holder.mean(part.index, decision.key)
        # The holder may still be reducing: everything it holds, at the slowest rate we wait for.
        timeout = self.config.wait_bound(self.plan.shard_bytes(holder) * self.plan.size)
        path = self._path(f"results/{part.index}", decision=decision.key)
        reply = await self._stream(holder, "GET", path, timeout, max_response=part.frame_bytes)
        return _attested(reply, len(decision.contributors))

    def _relays(self) -> list[str]:
        """Whom to ask for a part no holder serves us: every other member, known-dead last."""
        return sorted((m for m in self.plan.members if m != self.me), key=lambda m: m in self.unreachable)

    async def _relayed(self, member: str, part: Part, decision: Decision) -> AttestedMean:
        """The attested mean of `part` `member`'s gather got; NetError unless a holder of
        the part's shard signed it (its digest and Gram matrix) for this round and decision."""
        owner = self.plan.members[part.shard]
        # The member may still be asking the holders for it, as long as we did.
        timeout = self.config.wait_bound(self.plan.shard_bytes(owner) * self.plan.size)
        path = self._path(f"relays/{part.index}", decision=decision.key)
        reply = await self._stream(member, "GET", path, timeout, max_response=part.frame_bytes)
        got = _attested(reply, len(decision.contributors))
        message = mean_message(self.plan, part.index, decision.key, got.digest, got.gram)
        for holder in self.plan.holders(part.shard):
            try:
                if Keypair(ss58_address=holder).verify(message, got.attestation):
                    return got
            except ValueError:  # not a 64-byte signature
                break
        raise NetError(f"{member} handed on a mean of part {part.index} that no holder of shard {part.shard} signed")

    async def announce_done(self) -> None:
        """Tell every other member we fetch nothing more, so they can stop serving early.

        Best effort: a member that does not hear it serves until its bound.
        """

        async def tell(member: str) -> None:
            try:
                await self._call(member, "POST", self._path("done"), b"", self.config.wait_bound(0))
            except NetError as exc:
                log.debug("round %s: %s did not take our done: %s", self.plan.group.round_id, member, exc)

        await asyncio.gather(*(tell(m) for m in self.plan.members if m != self.me))

    # -- report ---------------------------------------------------------------------------

    def report(self, duration: float, error: str | None = None) -> AllReduceReport:
        decision = self.decision
        shards = []
        for s, (begin, end) in enumerate(self.plan.shards):
            owner, backup = self.plan.members[s], self.plan.members[(s + 1) % self.plan.size]
            complete = all(p in self.served_parts for p in self.plan.shard_parts[s])
            shards.append(ShardReport(s, begin, end, owner, backup, sorted(self.served_by[s]), complete,
                                      sorted(self.relayed_by[s])))
        return AllReduceReport(
            round_id=self.plan.group.round_id,
            peer=self.me,
            fingerprint=self.plan.fingerprint,
            codec=str(self.plan.codec),
            numel=self.plan.numel,
            contributors=dict(decision.contributors) if decision else {},
            excluded=dict(decision.excluded) if decision else {},
            shards=shards,
            unreachable=dict(self.unreachable),
            decision=decision.key if decision else None,
            started_at=self.started_at,
            bytes_sent=self.traffic.sent,
            bytes_received=self.traffic.received,
            duration=duration,
            phases=dict(self.timings),
            gram=self.gram,
            error=error,
        )


def _attested(reply: StreamReply, contributors: int) -> AttestedMean:
    """A served mean with its attestation and Gram matrix (`contributors` square);
    NetError if either is missing or malformed."""
    try:
        attestation = bytes.fromhex(reply.extra["attestation"])
    except (KeyError, TypeError, ValueError):
        attestation = b""
    if len(attestation) != ATTESTATION_BYTES:
        raise NetError(f"a mean came without its {ATTESTATION_BYTES}-byte attestation: {reply.extra!r}")
    gram = reply.extra.get("gram")
    try:
        gram_of_text(gram, contributors)
    except ValueError as exc:
        raise NetError(f"a mean came without the Gram matrix of its {contributors} contributions: {exc}") from None
    return AttestedMean(reply.payload, reply.digest, gram, attestation)


def decode_checked(frame: Buffer, out: torch.Tensor) -> None:
    """Decode a mean whose bytes were checked against the digest its holder signed (the
    answer's signature, or its attestation): its own checksum would say nothing more."""
    Codec.decode_into(frame, out, verify=False)


def summed_gram(means: list[AttestedMean], n: int) -> list[list[float]]:
    """The parts' n x n Gram matrices summed in part order: the same float64 additions,
    so the same sum, on every peer."""
    total = np.zeros((n, n))
    for mean in means:
        total += gram_of_text(mean.gram, n)
    return total.tolist()
