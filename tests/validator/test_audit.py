"""Audits (iota.validator.audit): recomputing a miner's forward from what it vouched for."""

from __future__ import annotations

import hashlib

import pytest

import iota.data
from iota.miner.worker import StageWorker
from iota.model.recipe import Recipe
from iota.validator.audit import check, stale_work

RECIPE = Recipe(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, stages=2, batch=2, seq_len=16, samples=50)
VOCAB = 257


@pytest.fixture(scope="module")
def data() -> iota.data.TokenDataset:
    return iota.data.load("stdlib", "byte")[0]


def workers(data, adversaries=(None, None)) -> list[StageWorker]:
    stages = [StageWorker(RECIPE, VOCAB, s, data, adversary) for s, adversary in enumerate(adversaries)]
    for w in stages:  # every miner starts from merged version 0
        state = w.outer.to_bytes()
        w.load_global(0, hashlib.sha256(state).hexdigest(), state)
    return stages


def run_sample(stages: list[StageWorker], sample: int) -> tuple[list[dict], float]:
    """One sample through the pipeline: the commitments the last stage reports, and the loss."""
    first, last = stages
    frame, _ = first.forward(sample, 0, None)
    commits = [{**first.commitment(sample, 0), "hotkey": "first"}]
    grad, loss = last.forward(sample, 0, frame)
    commits.append({**last.commitment(sample, 0), "hotkey": "last"})
    first.backward(sample, 0, grad)
    return commits, loss


def judge(stage: StageWorker, data, sample: int, commits: list[dict], loss: float,
          header_edit=None, payload_edit=None):
    header, payload = stage.audit(sample, 0)
    if header_edit:
        header = header_edit(header)
    if payload_edit:
        payload = payload_edit(payload)
    scratch = StageWorker(RECIPE, VOCAB, stage.index, data)
    return check(scratch, sample, 0, header, payload, commits, loss, lambda v: stage.outer.weights)


@pytest.mark.parametrize("stage", [0, 1])
def test_honest_work_passes(data, stage: int) -> None:
    stages = workers(data)
    for sample in range(3):  # weights move between samples: each audit must use its own snapshot
        commits, loss = run_sample(stages, sample)
    verdict = judge(stages[stage], data, 2, commits, loss)
    assert verdict.ok, verdict
    assert verdict.detail["relative_error"] < 1e-6  # same machine, same arithmetic


@pytest.mark.parametrize("stage, reasons", [(0, {"wrong_output"}), (1, {"wrong_output", "wrong_loss"})])
def test_random_outputs_are_caught(data, stage: int, reasons: set[str]) -> None:
    stages = workers(data, ("random", None) if stage == 0 else (None, "random"))
    commits, loss = run_sample(stages, 0)
    verdict = judge(stages[stage], data, 0, commits, loss)
    assert not verdict.ok and verdict.reason in reasons


def test_skipped_training_is_caught(data) -> None:
    stages = workers(data, (None, "lazy"))
    for sample in range(3):
        commits, loss = run_sample(stages, sample)
    verdict = judge(stages[1], data, 2, commits, loss)
    assert (verdict.ok, verdict.reason) == (False, "skipped_training")
    assert verdict.detail["backward_since_merge"] == 2


def test_stale_weights_are_caught_from_the_records(data) -> None:
    stages = workers(data)
    for stage in stages:
        stage.global_version = 3
    stages[1].global_version = 1
    commits, _ = run_sample(stages, 0)
    path = ["first", "last"]
    assert stale_work(path, commits, [3, 2]) == {}  # one merge behind: still in step
    assert stale_work(path, commits, [4, 3]) == {"last": {"stage": 1, "global_version": 1, "latest_at_lease": 3}}


def test_answers_that_contradict_the_commitments_are_caught(data) -> None:
    stages = workers(data)
    commits, loss = run_sample(stages, 0)

    def other_weights(payload: bytes) -> bytes:
        flipped = bytearray(payload)
        flipped[-1] ^= 1
        return bytes(flipped)

    def other_input(payload: bytes) -> bytes:
        flipped = bytearray(payload)
        flipped[0] ^= 1
        return bytes(flipped)

    assert judge(stages[0], data, 0, commits, loss, payload_edit=other_weights).reason == "audit_weights_mismatch"
    assert judge(stages[1], data, 0, commits, loss, payload_edit=other_input).reason == "audit_input_mismatch"
    forged = [dict(c) for c in commits]
    forged[0]["output"] = "0" * 64
    header, payload = stages[0].audit(0, 0)
    scratch = StageWorker(RECIPE, VOCAB, 0, data)
    assert check(scratch, 0, 0, header, payload, forged, loss, lambda v: None).reason == "audit_output_mismatch"
    assert stages[0].audit(10**6, 0) is None  # not kept: the miner says so (404), nobody is flagged
