"""A validator that follows the merged model: whenever any stage has new
merged weights, it loads every stage's latest version, measures the
validation loss of the whole pipeline (boundaries compressed as in
training) and reports it to the orchestrator."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Any

import aiohttp
from bittensor.signing import resolve_signer

import iota.data
from iota.allreduce import OuterNesterov
from iota.allreduce.outer import flatten, unflatten_into
from iota.model import Pipeline, evaluate
from iota.model.boundary import BoundaryLink
from iota.model.recipe import Recipe
from iota.net import NetError, PeerError, SignedClient
from iota.orchestrator.client import OrchestratorClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidatorConfig:
    """`batches`: validation batches per evaluation (the same ones every time); `timeout` (s) per request."""

    batches: int = 4
    timeout: float = 30.0


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
    def __init__(self, wallet: Any, orchestrator: str, orchestrator_hotkey: str,
                 config: ValidatorConfig | None = None) -> None:
        self.signer = resolve_signer(wallet, role="hotkey")
        self.orchestrator_address, self.orchestrator_hotkey = orchestrator, orchestrator_hotkey
        self.config = config or ValidatorConfig()

    async def run(self) -> None:
        """Evaluate each new merged model until the run is finished (the finished model included)."""
        async with aiohttp.ClientSession() as session:
            client = OrchestratorClient(SignedClient(self.signer, session), self.orchestrator_address,
                                        self.orchestrator_hotkey, timeout=self.config.timeout)
            while True:
                try:
                    reply = await client.register(0.0)
                    break
                except NetError as exc:
                    log.warning("cannot register yet (%s); retrying", exc)
                    await asyncio.sleep(1.0)
            recipe, vocab_size = Recipe.from_dict(reply["recipe"]), int(reply["vocab_size"])
            interval = float(reply["heartbeat"])
            _, val, _ = await asyncio.to_thread(iota.data.load, recipe.data, recipe.tokenizer)
            evaluated: list[int] | None = None
            while True:
                try:
                    beat = await client.heartbeat({})
                except PeerError as exc:
                    if exc.status == 409:
                        await client.register(0.0)
                    continue
                except NetError as exc:
                    log.warning("heartbeat failed: %s", exc)
                    await asyncio.sleep(interval)
                    continue
                versions = [v["version"] for v in beat["versions"]]
                if versions != evaluated:
                    states = []
                    for stage in range(recipe.stages):
                        version, digest, state = await client.weights(stage)
                        if hashlib.sha256(state).hexdigest() != digest:
                            raise NetError(f"stage {stage} weights do not match their digest")
                        states.append(state)
                        versions[stage] = version
                    evaluated = versions
                    try:
                        loss = await asyncio.to_thread(evaluate_state, recipe, vocab_size, states, val,
                                                       self.config.batches)
                    except ValueError as exc:  # e.g. activations too large to encode: the model diverged
                        log.error("the merged model at versions %s cannot be evaluated: %s", versions, exc)
                        continue
                    if not math.isfinite(loss):
                        log.error("the merged model at versions %s has a non-finite loss", versions)
                        continue
                    await client.evaluation(versions, loss)
                    log.info("validation loss %.4f at versions %s", loss, versions)
                elif beat["status"] == "finished":
                    return
                await asyncio.sleep(interval)
