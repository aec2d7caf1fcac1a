"""The holder role: keep the parts of the shards this peer owns or backs up,
close at the deadline, record the decision once, serve the mean; and keep
what this peer sent, for a backup that has to pull it.

A backup gets no parts of the shard it backs up. When the owner is lost, the
backup pulls the senders' parts from them: for a peer that asks for the full
have-set of the shard (it found the owner gone before the decision), or to
reduce the decided contributions (the owner died after it: the owner's own
parts then died with it, and the round fails for everyone alike, to be run
again). Holders keep frames, not a running sum, so a sender can still be
dropped after its parts arrived (because they did not reach every shard).

An owner does not wait for the decision to start reducing: once every member's
frame of a part is in, it reduces that part for "everyone, at the declared
weights", which is what nearly every decision says. The decision then only
confirms the guess (or the part is reduced again for what it does say), so the
reduce runs while the scatter is still finishing instead of after it.

Every mean a holder serves comes with its attestation: the holder's signature
over the round, the part, the decision, the mean's digest and the inner products
of the contributions to the part (`mean_message`).
Any member can check it, so a member that fetched a mean can hand it on
(`relay`) to one that no holder serves (a holder gone after serving some
peers, or cut off from some): then if any peer completes, all can.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from iota._C import ByteBlock
from iota.allreduce.config import AllReduceConfig
from iota.allreduce.decision import Decision, HaveSet
from iota.allreduce.faults import Faults
from iota.allreduce.gram import gram_text
from iota.allreduce.group import Part, RoundPlan
from iota.codec import Codec
from iota.errors import CodecError
from iota.net import NetError, Refused
from iota.net.answers import Buffer, payload_digest

if TYPE_CHECKING:
    from bittensor.sp_core import Keypair

log = logging.getLogger(__name__)

ATTESTATION_BYTES = 64  # an sr25519 signature: a served mean is its attestation, then its frame
MEAN_CONTEXT = b"iota-allreduce-mean/1\n"


class Refusal(Refused):
    """Why a holder will not take or serve something; the caller gets it as a PeerError."""


@dataclass
class Traffic:
    """Body bytes this peer moved for one round, as client and as server."""

    sent: int = 0
    received: int = 0


def stochastic_seed(plan: RoundPlan, who: str, part: int) -> int | None:
    """A per-round, per-sender, per-part seed for stochastic rounding.

    One seed for everyone would round every sender's values the same way at
    the same index, and the noise would add up instead of averaging out.
    """
    if not plan.codec.stochastic:
        return None
    material = f"{plan.codec.seed}/{plan.fingerprint}/{who}/{part}".encode()
    return int.from_bytes(hashlib.sha256(material).digest()[:8], "little")


def check_frame(frame: Buffer, part: Part, codec: Codec, digest: str | None = None) -> str:
    """Validate a received part (checksum, shape, codec) and return its digest (`digest`
    when the transport has already checked the frame against it): `payload_digest`, as streams sign."""
    header = Codec.header(frame)  # FrameError on a bad checksum or a truncated frame
    expected = codec.header_fields()
    got = {key: header[key] for key in ("kind", "bits", "block", "flags")}
    if got != {key: expected[key] for key in got}:
        raise CodecError(f"part {part.index} is encoded as {got}, the round uses {codec}")
    if header["dtype"] != 0 or tuple(header["shape"]) != (part.end - part.begin,):
        raise CodecError(
            f"part {part.index} has shape {tuple(header['shape'])} (dtype code {header['dtype']}); "
            f"expected ({part.end - part.begin},) float32"
        )
    return digest or payload_digest(frame)


def mean_message(plan: RoundPlan, part: int, decision_key: str, digest: str, gram: str) -> bytes:
    """What a holder signs for the mean of `part` it serves under a decision, given the
    `payload_digest` of its frame and the contributions' Gram matrix of the part
    (`gram_text`): bound to the round (its id and plan) and to the decision, so it vouches
    for nothing else."""
    fields = (plan.group.round_id, plan.fingerprint, str(part), decision_key, digest, gram)
    return MEAN_CONTEXT + "\n".join(fields).encode()


@dataclass(frozen=True)
class AttestedMean:
    """The mean of one part as a holder serves it: the frame, its `payload_digest`, the
    inner products of the decided contributions to the part (sorted hotkey order, as the
    holder decoded them) and the holder's signature over them (`mean_message`)."""

    frame: Buffer
    digest: str
    gram: str  # `gram_text`
    attestation: bytes

    def extra(self) -> dict[str, object]:
        """What travels beside the frame, in a stream answer's signed meta."""
        return {"attestation": self.attestation.hex(), "gram": self.gram}


Contributors = tuple[tuple[str, float], ...]  # (sender, declared weight), sorted by sender


def reduce_part(codec: Codec, inputs: list[tuple[Buffer, float]], seed: int | None,
                scratch: torch.Tensor) -> tuple[memoryview, torch.Tensor]:
    """sum(weight * decoded) in fp32, in the given order, encoded with the round's codec;
    and the inner products of the decoded inputs (their Gram matrix, float64).

    The mean follows the core's decode-accumulate contract, so every holder writes the same
    bytes; each input is decoded once for both. The inputs' checksums were verified on
    receipt (`check_frame`). `scratch` is the fp32 sum, reused from part to part, and the
    mean is encoded into a pooled block: fresh pages cost more to fault in than the
    decoding itself."""
    acc = scratch.zero_()
    frames, weights = [frame for frame, _ in inputs], [weight for _, weight in inputs]
    products = Codec.decode_reduce(frames, weights, acc, verify=False)
    return codec.encode_into(acc, ByteBlock(codec.frame_size(acc.shape)), seed=seed), products


class HolderRound:
    """This peer's holder state for one round."""

    def __init__(self, plan: RoundPlan, signer: Keypair, config: AllReduceConfig, faults: Faults) -> None:
        self.plan = plan
        self.signer = signer  # this peer's hotkey: it attests the means it serves
        self.me: str = signer.ss58_address
        self.config = config
        self.faults = faults
        self.shards = plan.held_by(self.me)
        self.parts = plan.held_parts(self.me)
        self.held = frozenset(self.parts)
        self.traffic = Traffic()
        self.frames: dict[int, dict[str, Buffer]] = {p: {} for p in self.parts}
        self.digests: dict[int, dict[str, str]] = {p: {} for p in self.parts}
        self.sent: dict[int, tuple[Buffer, str]] = {}  # this peer's frames (and digests) of every part
        # How to get `sender`'s frame of a part from it (set by the round; `pull` uses it).
        self.fetch: Callable[[str, int], Awaitable[Buffer]] | None = None
        self._pulls: dict[tuple[int, str], asyncio.Task[None]] = {}
        self.weights: dict[str, float] = {}
        self.bad: dict[str, str] = {}
        self.have: HaveSet | None = None
        self.decision: Decision | None = None
        self.means: dict[int, AttestedMean] = {}  # part -> its mean under the decision: hashed once, served often
        # What this peer's own gather got (decision key, mean), for members no holder serves.
        self.relayable: dict[int, tuple[str, AttestedMean]] = {}
        self._tried = {p.index: asyncio.Event() for p in plan.parts}  # our gather is done asking holders for it
        self.unservable: dict[int, str] = {}  # shard -> why this holder cannot serve it
        self.opened = time.monotonic()
        self._received = 0
        self._last_arrival = self.opened
        self._arrival = asyncio.Event()
        self._closed = asyncio.Event()
        self._decided = asyncio.Event()
        self._ready = {p: asyncio.Event() for p in self.parts}
        self._reducing: set[int] = set()
        # part -> (whom the guess counts, its reduce): the owner's reduce before the decision.
        self._guesses: dict[int, tuple[Contributors, asyncio.Task[tuple[Buffer, torch.Tensor]]]] = {}
        self._reducer = asyncio.Lock()  # one reduce at a time: they share the cores with everything else
        # One size for every part's fp32 sum: the block pool then reuses a single block for them all.
        self._sum_bytes = 4 * max(p.end - p.begin for p in plan.parts)
        self._done: set[str] = set()
        self._all_done = asyncio.Event()
        self._tasks = [asyncio.get_running_loop().create_task(self._close_when_due())]

    # -- receiving ---------------------------------------------------------

    async def receive(
        self, sender: str, part: int, weight: float, frame: Buffer, *, remote: bool, digest: str | None = None
    ) -> None:
        """Keep `sender`'s frame of `part`; a bad one excludes the sender from the round.
        `digest` is the frame's `payload_digest` if the caller computed it."""
        if self.have is not None:
            raise Refusal(409, "Closed", f"{self.me} closed round {self.plan.group.round_id} already")
        if sender in self.bad:
            raise Refusal(400, "Excluded", f"{sender} is excluded from this round: {self.bad[sender]}")
        if part not in self.held:
            raise Refusal(400, "NotHeld", f"{self.me} holds no part {part} of round {self.plan.group.round_id}")
        if not (math.isfinite(weight) and weight > 0):
            self._exclude(sender, f"weight {weight!r} is not a positive finite number")
        elif self.weights.setdefault(sender, weight) != weight:
            self._exclude(sender, f"weight changed from {self.weights[sender]!r} to {weight!r}")
        if sender in self.bad:
            raise Refusal(400, "BadPart", self.bad[sender])
        try:
            digest = await asyncio.to_thread(check_frame, frame, self.plan.parts[part], self.plan.codec, digest)
            problem = None
        except CodecError as exc:  # FrameError included
            digest, problem = "", f"part {part}: {exc}"
        if self.have is not None:  # closed while the frame was being checked: the have-set is final
            raise Refusal(409, "Closed", f"{self.me} closed round {self.plan.group.round_id} already")
        if problem is not None:
            self._exclude(sender, problem)
            raise Refusal(400, "BadPart", self.bad[sender])
        if sender in self.bad:
            return  # an excluded sender's frame is dropped
        self._store(sender, part, frame, digest)
        self._guess(part)
        if remote:
            self._received += len(frame)
            self._last_arrival = time.monotonic()
        self._arrival.set()

    def _store(self, sender: str, part: int, frame: Buffer, digest: str) -> None:
        frames = self.frames.get(part)  # None once the part is reduced: nothing needs it any more
        if frames is not None and sender not in frames:  # a duplicate keeps the first copy
            frames[sender] = frame
            self.digests[part][sender] = digest

    def _guess(self, part: int) -> None:
        """If this peer owns `part` and every member's frame of it is in, start reducing it
        as the decision will most likely have it: everyone, at their declared weights."""
        frames = self.frames.get(part)
        shard = self.plan.parts[part].shard
        if (self.decision is not None or part in self._guesses or frames is None
                or self.plan.members[shard] != self.me or len(frames) < len(self.plan.members)):
            return
        everyone: Contributors = tuple((sender, self.weights[sender]) for sender in sorted(frames))
        task = asyncio.get_running_loop().create_task(self._reduce_part(part, everyone))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # an unused guess may fail unseen
        self._guesses[part] = (everyone, task)
        self._tasks.append(task)

    async def _reduce_part(self, p: int, contributors: Contributors) -> tuple[Buffer, torch.Tensor]:
        """The encoded mean of part `p` over `contributors` and their Gram matrix."""
        frames = self.frames[p]
        total = math.fsum(weight for _, weight in contributors)
        inputs = [(frames[sender], weight / total) for sender, weight in contributors]
        part = self.plan.parts[p]
        async with self._reducer:
            # A pooled block: faulted in by an earlier part or round, not fresh pages.
            sum_ = torch.frombuffer(ByteBlock(self._sum_bytes), dtype=torch.float32)[: part.end - part.begin]
            reduced = await asyncio.to_thread(
                reduce_part, self.plan.codec, inputs, stochastic_seed(self.plan, "mean", p), sum_
            )
        return reduced

    def _exclude(self, sender: str, reason: str) -> None:
        log.warning("round %s: excluding %s: %s", self.plan.group.round_id, sender, reason)
        self.bad.setdefault(sender, reason)
        for frames in self.frames.values():
            frames.pop(sender, None)
        self._arrival.set()

    def _expected(self, shard: int) -> set[str]:
        """Who sends this holder its parts of `shard`: everyone to the owner, nobody to the backup."""
        if self.plan.members[shard] != self.me:
            return set()
        return set(self.plan.members) - set(self.bad)

    def _all_in(self) -> bool:
        return all(
            self._expected(s) <= set(self.frames[p]) for s in self.shards for p in self.plan.shard_parts[s]
        )

    def _digest(self, shard: int, sender: str) -> str | None:
        """The digest of all of `sender`'s parts of `shard` here, as decisions record it; None if some are missing."""
        parts = self.plan.shard_parts[shard]
        if sender in self.bad or any(sender not in self.digests[p] for p in parts):
            return None
        return hashlib.sha256("".join(self.digests[p][sender] for p in parts).encode()).hexdigest()[:32]

    def _complete(self, shard: int) -> dict[str, str]:
        """Every sender whose parts of `shard` are all here, with their digest."""
        digests = {sender: self._digest(shard, sender) for sender in self.plan.members}
        return {sender: digest for sender, digest in sorted(digests.items()) if digest is not None}

    # -- what this peer sent, and pulling what others sent ----------------------

    def keep(self, part: int, frame: Buffer, digest: str) -> None:
        """Remember this peer's frame of `part` for a backup that may pull it."""
        self.sent[part] = (frame, digest)

    def contribution(self, part: int) -> Buffer:
        """This peer's frame of `part`, for a holder pulling it."""
        if part not in self.sent:
            raise Refusal(404, "NotSent", f"{self.me} has not sent part {part} of round {self.plan.group.round_id}")
        return self.sent[part][0]

    async def pull(self, shard: int, senders: Iterable[str], *, again: bool = False) -> None:
        """Fetch the parts of `shard` this holder lacks from `senders` themselves, checked as on
        receipt; once per sender, or `again` after a pull that failed. A sender that cannot
        deliver them just stays incomplete here: a frame taken after the close must not
        exclude anyone, whose other parts a have-set already reported."""
        tasks = []
        for sender in senders:
            if sender in self.bad or self._digest(shard, sender) is not None:
                continue
            previous = self._pulls.get((shard, sender))
            if previous is None or (again and previous.done()):
                task = asyncio.get_running_loop().create_task(self._pull_from(shard, sender))
                self._pulls[shard, sender] = task
                self._tasks.append(task)
            tasks.append(self._pulls[shard, sender])
        await asyncio.gather(*tasks)

    async def _pull_from(self, shard: int, sender: str) -> None:
        for p in self.plan.shard_parts[shard]:
            if sender in self.digests[p]:
                continue
            try:
                if sender == self.me:
                    frame, digest = self.contribution(p), self.sent[p][1]
                else:
                    assert self.fetch is not None, "the round sets HolderRound.fetch"
                    frame = await self.fetch(sender, p)
                    digest = await asyncio.to_thread(check_frame, frame, self.plan.parts[p], self.plan.codec)
            except (Refused, NetError, CodecError) as exc:
                log.warning("round %s: %s cannot pull part %d from %s: %s", self.plan.group.round_id, self.me, p,
                            sender, exc)
                return
            self._store(sender, p, frame, digest)

    # -- closing -------------------------------------------------------------

    async def _close_when_due(self) -> None:
        while self.have is None and not self._all_in():
            deadline = self.opened + self.config.deadline(
                self.plan.expected_bytes(self.me), self._received, self._last_arrival - self.opened
            )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._arrival.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._arrival.wait()
            except asyncio.TimeoutError:
                pass
        self.close()

    def close(self) -> None:
        """Freeze the have-set: from now on no part is taken."""
        if self.have is not None:
            return
        shards = {shard: self._complete(shard) for shard in self.shards}
        self.have = HaveSet(shards, dict(self.weights), dict(self.bad), None)
        elapsed = time.monotonic() - self.opened
        log.info("round %s: %s closed after %.2fs with %s", self.plan.group.round_id, self.me, elapsed,
                 {s: len(d) for s, d in shards.items()})
        self._closed.set()

    async def have_set(self, full: Iterable[int] = ()) -> HaveSet:
        """The have-set frozen at the close (waiting for it), with the decision if recorded.

        For each shard in `full` (the asker lost its owner) this holder first pulls
        every sender's missing parts of it, and reports what it has then: one pull
        per sender, so every asker gets the same answer."""
        full = sorted(set(full))
        if any(shard not in self.shards for shard in full):
            raise Refusal(404, "NotHeld", f"{self.me} holds no shard {full} of round {self.plan.group.round_id}")
        try:
            async with asyncio.timeout(self.config.wait_bound(self.plan.expected_bytes(self.me))):
                await self._closed.wait()
        except asyncio.TimeoutError:
            raise Refusal(503, "NotClosed", f"{self.me} has not closed round {self.plan.group.round_id}") from None
        assert self.have is not None
        shards = dict(self.have.shards)
        if full and self.decision is None:
            await asyncio.gather(*(self.pull(shard, self.plan.members) for shard in full))
            shards.update({shard: self._complete(shard) for shard in full})
        return HaveSet(shards, self.have.weights, self.have.bad, self.decision)

    # -- deciding and reducing -------------------------------------------------

    def record(self, proposal: Decision) -> Decision:
        """Write-once register: the first decision stays; every caller gets it back."""
        if self.decision is None:
            self.close()
            self.decision = proposal
            self._decided.set()
            self.faults.reached("after_decision")
            for shard in self.shards:
                if self.plan.members[shard] == self.me:
                    self._start_reducing(shard)
        return self.decision

    def _start_reducing(self, shard: int) -> None:
        """Reduce `shard` under the decision, once. The owner starts on its shard as soon as
        the decision is in (everyone fetches it); a backup only when someone asks it for
        the shard (the owner did not serve them), so in a healthy round no backup reduces."""
        if shard not in self._reducing:
            self._reducing.add(shard)
            self._tasks.append(asyncio.get_running_loop().create_task(self._reduce(shard)))

    async def _reduce(self, shard: int) -> None:
        """Reduce every part of `shard`; each part can be served as soon as it is done."""
        assert self.decision is not None and self.have is not None
        parts = self.plan.shard_parts[shard]
        decided: Contributors = tuple(sorted(self.decision.contributors.items()))
        try:
            digests = self.decision.digests[shard]

            def lacking() -> list[str]:
                return [sender for sender, _ in decided if self._digest(shard, sender) != digests.get(sender)]

            await self.pull(shard, lacking(), again=True)
            missing = lacking()
            if missing:
                # Nobody may serve a mean of anything else.
                self.unservable[shard] = f"{self.me} lacks the decided contributions of {', '.join(missing)}"
                return
            for p in parts:
                guessed, guess = self._guesses.get(p, ((), None))
                if guess is not None and guessed == decided:
                    frame, products = await guess
                else:
                    frame, products = await self._reduce_part(p, decided)
                digest = await asyncio.to_thread(payload_digest, frame)
                gram = gram_text(products.numpy())
                attestation = self.signer.sign(mean_message(self.plan, p, self.decision.key, digest, gram))
                self.means[p] = AttestedMean(frame, digest, gram, attestation)
                del self.frames[p]  # the inputs are no longer needed
                self._ready[p].set()
        except CodecError as exc:  # frames were checked on receipt: only a bug or bad memory gets here
            log.error("round %s: %s cannot reduce shard %d: %s", self.plan.group.round_id, self.me, shard, exc)
            self.unservable.setdefault(shard, f"{self.me} failed to reduce: {exc}")
        finally:
            for p in parts:
                self.frames.pop(p, None)
                self._ready[p].set()

    async def mean(self, part: int, key: str) -> AttestedMean:
        """The mean of `part` under the decision `key` (the caller's), attested."""
        if part not in self.held:
            raise Refusal(404, "NotHeld", f"{self.me} holds no part {part} of round {self.plan.group.round_id}")
        await self._reduced([part], key)
        return self.means[part]

    def tried(self, part: int) -> None:
        """Our gather is done asking holders for `part` (whether one served it or not)."""
        self._tried[part].set()

    def gather_ended(self) -> None:
        """Our gather stopped, complete or not: relays answer from what it got."""
        for event in self._tried.values():
            event.set()

    async def relay(self, part: int, key: str) -> AttestedMean:
        """The attested mean of `part` our gather got from a holder under the decision `key`,
        once our gather is done asking holders for it;
        Refusal if it got none. Relays wait on our asking holders only, never on our own
        relays: two peers short of the same part cannot wait on each other."""
        if part not in self._tried:
            raise Refusal(404, "NoPart", f"round {self.plan.group.round_id} has no part {part}")
        owner = self.plan.members[self.plan.parts[part].shard]
        bound = self.config.wait_bound(self.plan.shard_bytes(owner) * self.plan.size)
        try:
            async with asyncio.timeout(bound):
                await self._tried[part].wait()
        except asyncio.TimeoutError:
            raise Refusal(409, "NotReady", f"{self.me} has no mean of part {part} to hand on yet") from None
        if part not in self.relayable:
            raise Refusal(404, "NotFetched", f"{self.me} got no mean of part {part} from a holder either")
        decided, mean = self.relayable[part]
        if decided != key:
            raise Refusal(409, "DecisionMismatch", f"{self.me} gathered under decision {decided}, not {key}")
        return mean

    async def _reduced(self, parts: list[int], key: str) -> None:
        """Wait until `parts` are reduced under the decision `key`; Refusal if they cannot be."""
        bound = self.config.wait_bound(self.plan.shard_bytes(self.me) * self.plan.size)
        not_ready = Refusal(409, "NotReady", f"{self.me} has no decision or mean for parts {parts} yet")
        try:
            async with asyncio.timeout(bound):
                await self._decided.wait()
        except asyncio.TimeoutError:
            raise not_ready from None
        assert self.decision is not None
        if self.decision.key != key:
            raise Refusal(
                409,
                "DecisionMismatch",
                f"{self.me} recorded decision {self.decision.key}, not {key}: the round split and cannot complete",
            )
        shard = self.plan.parts[parts[0]].shard
        self._start_reducing(shard)
        try:
            for part in parts:
                async with asyncio.timeout(bound):
                    await self._ready[part].wait()
        except asyncio.TimeoutError:
            raise not_ready from None
        if shard in self.unservable:
            raise Refusal(409, "Incomplete", self.unservable[shard])

    def done(self, member: str) -> None:
        """`member` finished the round (with the mean or without): it fetches nothing more."""
        self._done.add(member)
        if set(self.plan.members) - {self.me} <= self._done:
            self._all_done.set()

    async def linger(self) -> None:
        """Keep serving after this peer's round ended: until every other member
        said it is done, or as long as the slowest member the round tolerates
        could still need (sending all it holds, then fetching it)."""
        if not self.parts and not self.sent:
            return
        handled = self.plan.expected_bytes(self.me) + self.plan.shard_bytes(self.me) * self.plan.size
        bound = self.config.wait_bound(handled)
        try:
            async with asyncio.timeout(bound):
                await self._all_done.wait()
        except asyncio.TimeoutError:
            pass

    def stop(self) -> None:
        """Stop serving and let go of every frame: the round's tasks reference this holder,
        so it may wait for the cyclic GC, but its frames and means (pooled blocks) go now."""
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        self._guesses.clear()
        self.frames.clear()
        self.means.clear()
        self.relayable.clear()
        self.sent.clear()
