"""Backward audits (iota.validator.audit.check_backward): recomputing the input gradient a
middle stage sent back, checked against what its neighbours sent and received."""

from __future__ import annotations

import hashlib

import pytest

import iota.data
from iota.miner.worker import StageWorker
from iota.model.recipe import Recipe
from iota.validator.audit import check_backward

RECIPE = Recipe(dim=32, n_layers=3, n_heads=2, n_kv_heads=1, stages=3, batch=2, seq_len=16, samples=50)
VOCAB = 257


@pytest.fixture(scope="module")
def data() -> iota.data.TokenDataset:
    return iota.data.load("stdlib", "byte")[0]


def workers(data, middle: str | None = None) -> list[StageWorker]:
    stages = [StageWorker(RECIPE, VOCAB, s, data, middle if s == 1 else None) for s in range(3)]
    for w in stages:
        state = w.outer.to_bytes()
        w.load_global(0, hashlib.sha256(state).hexdigest(), state)
    return stages


def run_sample(stages: list[StageWorker], sample: int) -> list[dict]:
    """One sample through the pipeline and back, the way miners pass frames and commitments."""
    first, middle, last = stages
    frame, _ = first.forward(sample, 0, None)
    commits = [first.commitment(sample, 0)]
    frame, _ = middle.forward(sample, 0, frame)
    commits.append(middle.commitment(sample, 0))
    grad, _ = last.forward(sample, 0, frame)
    commits.append(last.commitment(sample, 0))
    middle.note_received(sample, 0, last.backward_commitment(sample, 0))
    grad = middle.backward(sample, 0, grad)
    first.note_received(sample, 0, middle.backward_commitment(sample, 0))
    first.backward(sample, 0, grad)
    return commits


def judge(stages: list[StageWorker], data, sample: int, commits: list[dict], payload_edit=None,
          sent_edit=None, received_edit=None):
    first, middle, last = stages
    header, payload = middle.audit_backward(sample, 0)
    sent = last.backward_commitment(sample, 0)
    received = dict(first.received[(sample, 0)])
    scratch = StageWorker(RECIPE, VOCAB, 1, data)
    return check_backward(scratch, sample, 0, header, payload_edit(payload) if payload_edit else payload, commits,
                          sent_edit(sent) if sent_edit else sent, received_edit(received) if received_edit else received)


def test_honest_backward_passes(data) -> None:
    stages = workers(data)
    # Optimizer steps land between samples: each audit must use the weights of its own backward.
    commits = [run_sample(stages, sample) for sample in range(3)]
    assert stages[1].version > 1
    for sample in range(3):
        verdict = judge(stages, data, sample, commits[sample])
        assert verdict.ok, verdict
        assert verdict.detail["relative_error"] < 1e-6  # same machine, same arithmetic


def test_noise_sent_back_is_caught(data) -> None:
    stages = workers(data, middle="random_backward")
    commits = run_sample(stages, 0)
    verdict = judge(stages, data, 0, commits)
    assert (verdict.ok, verdict.reason) == (False, "wrong_gradient")
    assert verdict.detail["relative_error"] > 0.5


def test_answers_that_contradict_the_neighbours_are_caught(data) -> None:
    stages = workers(data)
    commits = run_sample(stages, 0)
    flip_last = lambda payload: payload[:-1] + bytes([payload[-1] ^ 1])  # noqa: E731 (a weight's bit)
    assert judge(stages, data, 0, commits, payload_edit=flip_last).reason == "audit_weights_mismatch"
    other = {"output": "0" * 64}
    assert judge(stages, data, 0, commits, sent_edit=lambda c: {**c, **other}).reason == "audit_gradient_mismatch"
    assert judge(stages, data, 0, commits, received_edit=lambda c: {**c, **other}).reason == "audit_output_mismatch"
    forged = [dict(c) for c in commits]
    forged[0]["output"] = "0" * 64
    assert judge(stages, data, 0, forged).reason == "audit_input_mismatch"


def test_only_kept_backward_work_is_handed_out(data) -> None:
    stages = workers(data)
    run_sample(stages, 0)
    assert stages[1].audit_backward(10**6, 0) is None
    assert stages[1].audit_backward(0, 0) is not None
    assert stages[0].audit_backward(0, 0) is None  # stage 0 sends no gradient back
