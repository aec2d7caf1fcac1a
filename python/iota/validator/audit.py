"""Checking one forward a miner did, from what it vouched for and what it hands over.

Along the pipeline every miner attaches a commitment to what it sends (the
sha256 of its output frame and of its weights, its merged-weights version,
its backward passes since the last merge); the next miner checks the frame
against it and the last stage reports all of them with the loss. An audit
asks the miner for that forward's input, output and weights, and the
validator recomputes it. Compressed frames are compared after decoding, by
relative error, because two machines' float arithmetic may differ in the
last bit and move a value across a quantization boundary.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from iota.allreduce.outer import unflatten_into
from iota.codec import Codec
from iota.miner.worker import StageWorker, weights_digest

# Honest recomputation differs by rounding only; noise sent in place of the work differs by ~100%.
MAX_RELATIVE_ERROR = 0.05


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str = ""
    detail: dict[str, Any] = field(default_factory=dict)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a.float() - b.float()) / (torch.linalg.vector_norm(b.float()) + 1e-12))


def sections(payload: bytes, header: dict[str, Any], *names: str) -> list[bytes]:
    """The payload cut into the sections whose sizes the header gives (`{name}_bytes`), then the rest."""
    cuts, at = [], 0
    for name in names:
        end = at + int(header[f"{name}_bytes"])
        cuts.append(payload[at:end])
        at = end
    return cuts + [payload[at:]]


def shown_weights(worker: StageWorker, raw: bytes, digest: str) -> torch.Tensor | None:
    """The flat float32 weights a miner handed over, if they are the stage's size and hash to `digest`."""
    weights = torch.frombuffer(bytearray(raw), dtype=torch.float32)
    if weights.numel() != sum(p.numel() for p in worker.params) or weights_digest(weights) != digest:
        return None
    return weights


def stale_work(path: Sequence[str], commits: Sequence[dict[str, Any]],
               versions: Sequence[int]) -> dict[str, dict[str, Any]]:
    """The miners on a sample's path whose merged weights were stale: more than one version
    behind `versions`, each stage's latest when the sample was leased. Every forward of it came
    after that, and an honest miner may still be loading one merge it missed. Not the latest at
    the loss: merges land every second or so in a small swarm, and a sample slowed on its way
    looked stale (CI flagged an honest miner 3 versions behind). From the records alone, so
    every sample is checked."""
    return {hotkey: {"stage": stage, "global_version": commit["global_version"], "latest_at_lease": latest}
            for stage, (hotkey, commit, latest) in enumerate(zip(path, commits, versions))
            if commit["global_version"] < latest - 1}


def check(worker: StageWorker, sample: int, attempt: int, header: dict[str, Any], payload: bytes,
          commits: list[dict[str, Any]], recorded_loss: float,
          global_weights: Callable[[int], torch.Tensor]) -> Verdict:
    """Judge an audit answer (`header`, `payload` from the miner's /audit) of stage `worker.index`.

    `commits` are the sample's recorded commitments (one per stage) and
    `recorded_loss` the loss the last stage reported for it;
    `global_weights(v)` gives the stage's merged weights of version v.
    `worker` is a scratch worker of the stage: its weights are overwritten.
    """
    stage = worker.index
    commit = commits[stage]
    inputs, output, weights_bytes = sections(payload, header, "input", "output")
    where = {"sample": sample, "attempt": attempt, "stage": stage}
    if hashlib.sha256(output).hexdigest() != commit["output"]:
        return Verdict(False, "audit_output_mismatch", {**where, "why": "the output shown is not the one sent"})
    weights = shown_weights(worker, weights_bytes, commit["weights"])
    if weights is None:
        return Verdict(False, "audit_weights_mismatch", {**where, "why": "the weights shown are not the ones vouched for"})
    if stage > 0 and hashlib.sha256(inputs).hexdigest() != commits[stage - 1]["output"]:
        return Verdict(False, "audit_input_mismatch", {**where, "why": "the input shown is not the one received"})
    if (commit["backward_since_merge"] >= worker.recipe.accumulate and commit["global_version"] >= 0
            and torch.equal(weights, global_weights(commit["global_version"]))):
        return Verdict(False, "skipped_training", {**where, "backward_since_merge": commit["backward_since_merge"]})

    unflatten_into(weights, worker.params)
    worker.kept.clear()
    recomputed, loss = worker.forward(sample, attempt, bytes(inputs) if stage > 0 else None)
    worker.kept.clear()
    worker.work.clear()
    error = relative_error(Codec.decode(recomputed), Codec.decode(bytes(output)))
    if error > MAX_RELATIVE_ERROR:
        return Verdict(False, "wrong_output", {**where, "relative_error": round(error, 4)})
    if loss is not None and not math.isclose(loss, recorded_loss, rel_tol=1e-3, abs_tol=1e-3):
        return Verdict(False, "wrong_loss", {**where, "loss": recorded_loss, "recomputed": round(loss, 5)})
    return Verdict(True, detail={**where, "relative_error": error})


def check_backward(worker: StageWorker, sample: int, attempt: int, header: dict[str, Any], payload: bytes,
                   commits: list[dict[str, Any]], sent_by_next: dict[str, Any],
                   received_by_previous: dict[str, Any]) -> Verdict:
    """Judge the backward a middle stage `worker.index` did for a sample, from its audit answer
    (`header`, `payload` of /audit kind "backward"), the forward commitments `commits`, what the
    next stage's miner says it sent back (`sent_by_next`) and what the previous stage's miner says
    came with the gradient it received (`received_by_previous`): both other parties to the exchange.

    `worker` is a scratch worker of the stage: its weights are overwritten.
    """
    stage = worker.index
    inputs, gradient, output, weights_bytes = sections(payload, header, "input", "gradient", "output")
    where = {"sample": sample, "attempt": attempt, "stage": stage, "direction": "backward"}
    digest = hashlib.sha256(output).hexdigest()
    if digest != header["output"] or digest != received_by_previous.get("output"):
        return Verdict(False, "audit_output_mismatch",
                       {**where, "why": "the gradient shown is not the one the previous stage received"})
    weights = shown_weights(worker, weights_bytes, header["weights"])
    if weights is None or header["weights"] != received_by_previous.get("weights"):
        return Verdict(False, "audit_weights_mismatch", {**where, "why": "the weights shown are not the ones vouched for"})
    if hashlib.sha256(inputs).hexdigest() != commits[stage - 1]["output"]:
        return Verdict(False, "audit_input_mismatch", {**where, "why": "the input shown is not the one received"})
    if hashlib.sha256(gradient).hexdigest() != sent_by_next.get("output"):
        return Verdict(False, "audit_gradient_mismatch",
                       {**where, "why": "the gradient shown is not the one the next stage sent"})
    unflatten_into(weights, worker.params)
    recomputed = worker.recompute_backward(sample, attempt, bytes(inputs), bytes(gradient))
    error = relative_error(Codec.decode(recomputed), Codec.decode(bytes(output)))
    if error > MAX_RELATIVE_ERROR:
        return Verdict(False, "wrong_gradient", {**where, "relative_error": round(error, 4)})
    return Verdict(True, detail={**where, "relative_error": error})
