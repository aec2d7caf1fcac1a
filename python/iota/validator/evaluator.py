"""A validator: it follows the merged model (the validation loss of every
new set of merged weights), audits a random share of the miners' finished
work by recomputing it (iota.validator.audit), every finished sample for
frames sent twice (iota.validator.replays) and every merge round's
contributions against their consensus (iota.validator.consensus), flags the
miners that fail, and scores miners from the losses of the paths through them
(iota.validator.scoring), publishing the scores as chain weights."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp
import torch
from bittensor.signing import resolve_signer

import iota.data
from iota.allreduce import OuterNesterov
from iota.allreduce.outer import flatten, unflatten_into
from iota.chain import Chain, ChainError
from iota.miner.worker import StageWorker
from iota.model import Pipeline, evaluate
from iota.model.boundary import BoundaryLink
from iota.model.recipe import Recipe
from iota.net import NetError, PeerError, SignedClient
from iota.net.envelope import pack, unpack
from iota.orchestrator.client import OrchestratorClient
from iota.validator.audit import Verdict, check, check_backward, stale_work
from iota.validator.consensus import POISONED_MERGE, MergeVotes, Strikes
from iota.validator.feeders import Feeders
from iota.validator.replays import Replays
from iota.validator.scoring import PathLoss, score_miners, weights_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidatorConfig:
    """How a validator samples and scores the swarm's work.

    `batches`: validation batches per evaluation (the same ones every time);
    `timeout` (s) per request; `audit_rate`: the fraction of finished samples
    whose work at one (random) stage is recomputed; `score_every` (s): how
    often scores are computed and published; `score_window`: the number of
    latest finished samples scores are computed over.
    """

    batches: int = 4
    timeout: float = 30.0
    audit_rate: float = 0.5
    score_every: float = 5.0
    score_window: int = 400
    seed: int = 0


def evaluate_state(recipe: Recipe, vocab_size: int, states: list[bytes], val: iota.data.TokenDataset,
                   batches: int) -> float:
    """Validation loss of the pipeline whose stage s has outer-optimizer state `states[s]`."""
    stages = recipe.build(vocab_size)
    for stage, state in zip(stages, states):
        outer = OuterNesterov(flatten(list(stage.parameters())))
        outer.load_bytes(state)
        unflatten_into(outer.weights, list(stage.parameters()))
    compression = recipe.compression_parts()
    links = [BoundaryLink(recipe.dim, compression.forward, compression.backward) for _ in stages[1:]]
    return evaluate(Pipeline(stages, links), val.fixed_batches(recipe.batch, recipe.seq_len, num_batches=batches))


class Validator:
    def __init__(self, wallet: Any, orchestrator: str, orchestrator_hotkey: str, chain: Chain,
                 config: ValidatorConfig | None = None) -> None:
        self.signer = resolve_signer(wallet, role="hotkey")
        self.orchestrator_address, self.orchestrator_hotkey = orchestrator, orchestrator_hotkey
        self.chain = chain
        self.config = config or ValidatorConfig()
        self.rng = random.Random(f"{self.config.seed}/{self.signer.ss58_address}")
        self.paths: list[PathLoss] = []
        self.since = 0
        self.merge_since = 0
        self.merge_votes = MergeVotes()
        self.strikes = Strikes()
        self.replays = Replays()
        self.audits = {"passed": 0, "failed": 0, "unavailable": 0}
        self.flagged: dict[str, str] = {}  # miner hotkey -> why we flagged it
        self.feeders = Feeders()
        self.scratch: dict[int, StageWorker] = {}
        self.global_cache: dict[tuple[int, int], torch.Tensor] = {}
        self.beat: dict[str, Any] = {}
        self.beats = asyncio.Event()  # set by each heartbeat reply

    async def run(self) -> None:
        """Evaluate merged models, audit and score miners, until the run is finished."""
        async with aiohttp.ClientSession() as session:
            self.client = SignedClient(self.signer, session)
            self.orchestrator = OrchestratorClient(self.client, self.orchestrator_address, self.orchestrator_hotkey,
                                                   timeout=self.config.timeout)
            reply = await self.register()
            self.recipe, self.vocab_size = Recipe.from_dict(reply["recipe"]), int(reply["vocab_size"])
            interval = float(reply["heartbeat"])
            self.train, val, _ = await asyncio.to_thread(iota.data.load, self.recipe.data, self.recipe.tokenizer)
            # Heartbeats have their own task: a long audit pass must not get the validator dropped as silent.
            loop = asyncio.get_running_loop()
            beats, work = loop.create_task(self.heartbeat_loop(interval)), loop.create_task(self.follow(val))
            try:
                # Whichever ends first ends the run: the work when the run is finished, or the
                # heartbeats with an error (raised here).
                done, _ = await asyncio.wait({beats, work}, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
            finally:
                for task in (beats, work):
                    task.cancel()
                await asyncio.gather(beats, work, return_exceptions=True)

    async def register(self) -> dict[str, Any]:
        """Register (retrying while the orchestrator is unreachable); returns its reply."""
        while True:
            try:
                return await self.orchestrator.register(0.0)
            except NetError as exc:
                log.warning("cannot register yet (%s); retrying", exc)
                await asyncio.sleep(1.0)

    async def heartbeat_loop(self, interval: float) -> None:
        """Heartbeat every `interval` s; each reply is handed to `follow` through `self.beats`."""
        while True:
            try:
                reply = await self.orchestrator.heartbeat({"audits": self.audits})
                self.beat = reply
                self.beats.set()
            except PeerError as exc:
                if exc.status == 409:
                    log.warning("the orchestrator does not know us (%s); registering again", exc.detail)
                    await self.register()
                    continue
                log.warning("heartbeat refused: %s", exc)
            except NetError as exc:
                log.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(interval)

    async def follow(self, val: iota.data.TokenDataset) -> None:
        """At each new heartbeat reply: audit new work, tally merges, score, and evaluate new merged
        models, until the run is finished."""
        # Built before work arrives: building one on the first audit made that audit seconds
        # late, and a cheat's bad gradients trained the stage before it for all that time.
        for stage in range(self.recipe.stages):
            await self.scratch_worker(stage)
        evaluated: list[int] | None = None
        last_score = time.monotonic()
        while True:
            await self.beats.wait()
            self.beats.clear()
            beat = self.beat
            self.latest = [v["version"] for v in beat["versions"]]
            try:
                await self.audit_new_work()
                await self.check_merges()
                if time.monotonic() - last_score >= self.config.score_every or beat["status"] == "finished":
                    await self.publish_scores()
                    last_score = time.monotonic()
            except NetError as exc:
                log.warning("auditing or scoring failed this round: %s", exc)
            versions = list(self.latest)
            if versions != evaluated:
                evaluated = versions
                await self.evaluate(versions, val)
            elif beat["status"] == "finished":
                return

    async def evaluate(self, versions: list[int], val: iota.data.TokenDataset) -> None:
        states = []
        for stage in range(self.recipe.stages):
            version, digest, state = await self.orchestrator.weights(stage, versions[stage])
            if hashlib.sha256(state).hexdigest() != digest:
                raise NetError(f"stage {stage} weights do not match their digest")
            states.append(state)
        try:
            loss = await asyncio.to_thread(evaluate_state, self.recipe, self.vocab_size, states, val,
                                           self.config.batches)
        except ValueError as exc:  # e.g. activations too large to encode: the model diverged
            log.error("the merged model at versions %s cannot be evaluated: %s", versions, exc)
            return
        if not math.isfinite(loss):
            log.error("the merged model at versions %s has a non-finite loss", versions)
            return
        await self.orchestrator.evaluation(versions, loss)
        log.info("validation loss %.4f at versions %s", loss, versions)

    # -- audits ----------------------------------------------------------------------

    async def audit_new_work(self) -> None:
        rows = await self.orchestrator.work(self.since)
        if not rows:
            return
        self.since = rows[-1]["row"]
        self.paths.extend(PathLoss(r["sample"], r["loss"], tuple(r["path"])) for r in rows)
        del self.paths[:-self.config.score_window]
        # Checks on the records alone, for every sample. A repeated frame is only a suspect: a
        # miner whose output no longer depends on its input repeats frames honestly, so it is audited.
        audits: list[tuple[dict[str, Any], int, dict[str, Any] | None]] = []
        for row in rows:
            self.feeders.record(row["path"], row["commits"])
            for hotkey, detail in stale_work(row["path"], row["commits"], row["versions"]).items():
                if hotkey not in self.flagged:
                    await self.flag(hotkey, "stale_weights", {"sample": row["sample"], **detail})
            for detail in self.replays.check(row["sample"], row["path"], row["commits"]).values():
                audits.append((row, detail["stage"], detail))
            if self.rng.random() < self.config.audit_rate:
                audits.append((row, self.rng.randrange(self.recipe.stages), None))
        # Middle stages also send gradients back: audit a share of their backward passes too.
        middle = range(1, self.recipe.stages - 1)
        backward = [(row, self.rng.choice(middle)) for row in rows
                    if middle and self.rng.random() < self.config.audit_rate]
        if not (audits or backward):
            return
        addresses = {m["hotkey"]: m["address"] for st in (await self.client.get_json(
            self.orchestrator_address, "/api/state", receiver=self.orchestrator_hotkey,
            timeout=self.config.timeout))["stages"] for m in st["miners"]}
        # Suspects first (each is likely a cheat still at work), then the random share; newest first
        # in each, while the miners still keep the work.
        audits.sort(key=lambda audit: (audit[2] is None, -audit[0]["row"]))
        for row, stage, repeated in audits:
            hotkey = row["path"][stage]
            if hotkey in self.flagged or hotkey not in addresses:
                continue
            await self.audit(row, stage, hotkey, addresses[hotkey], repeated)
        for row, stage in reversed(backward):
            if row["path"][stage] not in self.flagged and all(h in addresses for h in row["path"]):
                await self.audit_backward(row, stage, addresses)

    async def ask(self, row: dict[str, Any], kind: str, hotkey: str, address: str) -> tuple[dict[str, Any], bytes] | None:
        """A miner's record of kind `kind` of `row`'s sample (see the miner's /audit), or None if it no longer keeps it."""
        try:
            body = await self.client.post_bytes(address, "/audit", pack({"sample": row["sample"],
                                                                          "attempt": row["attempt"], "kind": kind}),
                                                receiver=hotkey, timeout=self.config.timeout, max_response=1 << 30)
        except PeerError as exc:
            if exc.status == 404:
                self.audits["unavailable"] += 1
                return None
            raise
        header, payload = unpack(body)
        return header, bytes(payload)

    async def audit(self, row: dict[str, Any], stage: int, hotkey: str, address: str,
                    repeated: dict[str, Any] | None = None) -> None:
        """Recompute `row`'s work at `stage`; `repeated` says the frame was sent for another sample too."""
        answer = await self.ask(row, "forward", hotkey, address)
        if answer is None:
            return
        header, payload = answer
        worker = await self.scratch_worker(stage)
        v = row["commits"][stage].get("global_version", -1)
        if v >= 0 and (stage, v) not in self.global_cache:
            _, _, state = await self.orchestrator.weights(stage, v)
            outer = OuterNesterov(flatten(worker.params))
            outer.load_bytes(state)
            self.global_cache[(stage, v)] = outer.weights
        verdict = await asyncio.to_thread(check, worker, row["sample"], row["attempt"], header, payload,
                                          row["commits"], row["loss"],
                                          lambda v: self.global_cache[(stage, v)])
        if repeated is not None and not verdict.ok:  # a frame sent twice that is wrong the second time: replayed
            verdict = Verdict(False, "replayed_work", {**repeated, "audit": verdict.reason, **verdict.detail})
        await self.judged(hotkey, verdict)

    async def audit_backward(self, row: dict[str, Any], stage: int, addresses: dict[str, str]) -> None:
        """Recompute the backward of middle stage `stage` for `row`'s sample, checking the gradient it
        got against what the next stage's miner sent and the one it sent against what the previous
        stage's miner received."""
        path = row["path"]
        hotkey, before, after = path[stage], path[stage - 1], path[stage + 1]
        answers = [await self.ask(row, "backward", hotkey, addresses[hotkey]),
                   await self.ask(row, "sent", after, addresses[after]),
                   await self.ask(row, "received", before, addresses[before])]
        if any(a is None for a in answers):
            return  # one of them no longer keeps it (or the backward has not happened): nobody is judged
        (header, payload), (sent, _), (received, _) = answers  # type: ignore[misc]
        worker = await self.scratch_worker(stage)
        verdict = await asyncio.to_thread(check_backward, worker, row["sample"], row["attempt"], header, payload,
                                          row["commits"], sent, received)
        await self.judged(hotkey, verdict)

    async def judged(self, hotkey: str, verdict: Verdict) -> None:
        if verdict.ok:
            self.audits["passed"] += 1
            return
        self.audits["failed"] += 1
        await self.flag(hotkey, verdict.reason, verdict.detail)

    async def flag(self, hotkey: str, reason: str, detail: dict[str, Any]) -> None:
        self.flagged[hotkey] = reason
        log.warning("flagging miner %s: %s %s", hotkey, reason, detail)
        await self.orchestrator.flag(hotkey, reason, detail)

    async def check_merges(self) -> None:
        """Tally new merge reports; flag a contributor a majority of its rounds' reports found far off
        in STRIKES rounds close together (consensus.Strikes)."""
        reports = await self.orchestrator.merge_reports(self.merge_since)
        for report in reports:
            self.merge_since = report["row"]
            if report["reporter"] not in report["contributors"]:
                continue
            found = self.merge_votes.add(report["stage"], report["round"], report["reporter"],
                                         report["contributors"], report["gram"])
            stage, base = report["stage"], report["base_version"]
            # Its members trained from the round's base version, or the one before if they lagged.
            # Judged by the round's own base, not our latest: a validator behind on reports still spares.
            versions = (base - 1, base)
            for hotkey, figures in found.items():
                detail = {"stage": stage, "round": report["round"], **figures}
                # Flagged for what they computed: a merge contribution feeds nobody's training directly.
                fed_by = {h for h in self.feeders.of(stage, hotkey, versions)
                          if self.flagged.get(h, POISONED_MERGE) != POISONED_MERGE}
                if fed_by:
                    log.warning("not flagging %s for merge round %s: its training was fed by %s, flagged: %s",
                                hotkey, report["round"], sorted(fed_by), detail)
                    continue
                rounds = self.strikes.add(stage, report["round"], hotkey)
                if not rounds:
                    log.warning("merge round %s: %s is an outlier, a strike, not yet a flag: %s", report["round"], hotkey, detail)
                    continue
                await self.flag(hotkey, POISONED_MERGE, {**detail, "outlier_rounds": rounds})
            # Reports come in round order: the ones after this are judged on training from base - 1 on.
            self.feeders.forget_before(stage, base - 1)

    async def scratch_worker(self, stage: int) -> StageWorker:
        if stage not in self.scratch:
            self.scratch[stage] = await asyncio.to_thread(StageWorker, self.recipe, self.vocab_size, stage, self.train)
        return self.scratch[stage]

    # -- scores ------------------------------------------------------------------------

    async def publish_scores(self) -> None:
        scores = score_miners(self.paths, self.flagged)
        if not scores:
            return
        await self.orchestrator.scores({h: asdict(s) for h, s in scores.items()})
        weights = weights_of(scores)
        if any(w > 0 for w in weights.values()):
            try:
                await self.chain.publish_weights(self.signer, weights)
            except ChainError as exc:
                log.warning("could not publish weights: %s", exc)
