"""StageWorker: one miner's compute. Chained workers reproduce the
single-process Pipeline exactly, backward passes stay exact when the weights
changed since the forward, optimizer steps come every `accumulate` passes,
frames are reproducible from the work alone, bad frames are refused, and
merged weights travel between miners bit for bit."""

from __future__ import annotations

import copy
import hashlib
from types import SimpleNamespace

import pytest
import torch

import iota.data
from iota.allreduce import OuterNesterov
from iota.allreduce.errors import GroupError
from iota.allreduce.outer import flatten, unflatten_into
from iota.codec import Codec
from iota.miner import worker as worker_module
from iota.miner.worker import StageWorker, WorkError, frame_seed
from iota.model.boundary import BoundaryLink
from iota.model.pipeline import Pipeline
from iota.model.recipe import Recipe

TIGHT = dict(rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def data():
    train, _, tokenizer = iota.data.load("stdlib", "byte")
    return train, tokenizer.vocab_size


def recipe(**overrides) -> Recipe:
    values = dict(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, stages=2, batch=2, seq_len=16, compression="fp32")
    values.update(overrides)
    return Recipe(**values)


def workers(r: Recipe, data) -> list[StageWorker]:
    train, vocab = data
    return [StageWorker(r, vocab, i, train) for i in range(r.stages)]


def run_sample(chain: list[StageWorker], sample: int, attempt: int = 0) -> tuple[float, list[bytes], list[bytes]]:
    """One sample through every stage and back: (loss, forward frames, backward frames)."""
    forward, backward = [], []
    frame = None
    for w in chain[:-1]:
        frame, _ = w.forward(sample, attempt, frame)
        forward.append(frame)
    grad, loss = chain[-1].forward(sample, attempt, frame)
    backward.append(grad)
    for w in reversed(chain[:-1]):
        grad = w.backward(sample, attempt, grad)
        if grad is not None:
            backward.append(grad)
    assert loss is not None
    return loss, forward, backward


def random_frame(codec: Codec, shape: tuple[int, ...], seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return codec.encode(torch.randn(shape, generator=g), seed=seed)


def grads(params) -> list[torch.Tensor]:
    return [p.grad.clone() for p in params]


# -- the distributed stages equal the single-process pipeline ----------------------------


@pytest.mark.parametrize("stages", [2, 3])
def test_chained_workers_equal_the_pipeline_with_fp32_boundaries(data, stages):
    train, vocab = data
    r = recipe(stages=stages, n_layers=stages, accumulate=2)  # no optimizer step after the first backward
    chain = workers(r, data)
    loss, forward, backward = run_sample(chain, sample=3)
    assert len(forward) == len(backward) == stages - 1
    for w in chain:
        assert w.version == 0 and w.pending == 1  # gradients accumulated, not applied

    fp32 = Codec.from_string("fp32")
    pipe = Pipeline(r.build(vocab), [BoundaryLink(r.dim, fp32, fp32) for _ in range(stages - 1)])
    tokens, targets = train.batch(3, r.batch, r.seq_len, seed=r.seed)
    ref = pipe(tokens, targets)
    (ref / r.accumulate).backward()  # the last worker scales its loss the same way

    assert loss == pytest.approx(ref.item(), rel=1e-6)
    for w, stage in zip(chain, pipe.stages):
        names = [n for n, _ in stage.named_parameters()]
        assert names == [n for n, _ in w.module.named_parameters()]
        for name, mine, theirs in zip(names, w.params, stage.parameters()):
            assert mine.grad is not None and theirs.grad is not None, name
            torch.testing.assert_close(mine.grad, theirs.grad, **TIGHT, msg=f"stage {w.index} {name}")


def test_128x_workers_give_the_pipeline_loss_and_last_stage_gradients(data):
    """The 128x activations codec rounds to nearest: the forward is the pipeline's exactly.
    (Stage 0's gradients differ only by the stochastic rounding seed of the backward frame.)"""
    train, vocab = data
    r = recipe(compression="128x", accumulate=2)
    chain = workers(r, data)
    width = r.compression_parts().bottleneck.width
    assert width == 1 and chain[1].reembed
    loss, forward, backward = run_sample(chain, sample=4)
    assert Codec.header(forward[0])["shape"] == (r.batch, r.seq_len, width)
    assert Codec.header(backward[0])["shape"] == (r.batch, r.seq_len, width)

    parts = r.compression_parts()
    pipe = Pipeline(r.build(vocab), [BoundaryLink(r.dim, parts.forward, parts.backward)])
    tokens, targets = train.batch(4, r.batch, r.seq_len, seed=r.seed)
    ref = pipe(tokens, targets)
    (ref / r.accumulate).backward()
    assert loss == pytest.approx(ref.item(), rel=1e-6)
    for mine, theirs in zip(chain[1].params, pipe.stages[1].parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, **TIGHT)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in chain[0].params)


# -- exact backward after the weights changed ------------------------------------------------


@pytest.mark.parametrize("compression", ["fp32", "128x"])
@pytest.mark.parametrize("change", ["optimizer-step", "load-global"])
@pytest.mark.parametrize("stages,index", [(2, 0), (3, 1)], ids=["first-stage", "middle-stage"])
def test_backward_after_the_weights_changed_recomputes_the_forward(data, compression, change, stages, index):
    train, vocab = data
    r = recipe(stages=stages, n_layers=stages, accumulate=2, compression=compression)
    w = StageWorker(r, vocab, index, train)
    in_shape = (r.batch, r.seq_len, w.in_width)
    out_shape = (r.batch, r.seq_len, w.module.boundary_width)
    inputs = {s: None if index == 0 else random_frame(w.forward_codec, in_shape, 100 + s) for s in (10, 11, 12)}
    grad_frames = {s: random_frame(w.backward_codec, out_shape, 200 + s) for s in (10, 11, 12)}

    w.forward(10, 0, inputs[10])
    before_change = copy.deepcopy(w.module)
    version = w.version
    if change == "optimizer-step":
        for s in (11, 12):
            w.forward(s, 0, inputs[s])
        for s in (11, 12):
            w.backward(s, 0, grad_frames[s])  # the second one steps AdamW
    else:
        g = torch.Generator().manual_seed(7)
        moved = OuterNesterov(flatten(w.params) + 0.05 * torch.randn(flatten(w.params).shape, generator=g))
        w.load_global(1, "digest", moved.to_bytes())
    assert w.version == version + 1 and w.pending == 0
    assert not torch.equal(flatten(w.params), flatten(list(before_change.parameters())))
    current = copy.deepcopy(w.module)

    sent = w.backward(10, 0, grad_frames[10])  # must not hit autograd's "modified by an inplace operation"
    assert w.pending == 1  # accumulate=2: the gradients stay in .grad

    def fresh(module: torch.nn.Module) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        tokens = train.batch(10, r.batch, r.seq_len, seed=r.seed)[0]
        x = tokens if index == 0 else Codec.decode(inputs[10]).float().requires_grad_()
        extra = {"tokens": tokens} if w.reembed and index > 0 else {}
        module(x, **extra).backward(Codec.decode(grad_frames[10]).float())
        return [p.grad for p in module.parameters()], (None if index == 0 else x.grad)

    expected, expected_input_grad = fresh(current)
    for name, mine, want in zip([n for n, _ in current.named_parameters()], w.params, expected):
        torch.testing.assert_close(mine.grad, want, **TIGHT, msg=name)
    stale, _ = fresh(before_change)  # the gradient at the forward's weights is a different one
    assert any(not torch.allclose(mine.grad, old, rtol=1e-3, atol=1e-6) for mine, old in zip(w.params, stale))

    if index == 0:
        assert sent is None
    else:
        assert sent == w.backward_codec.encode(expected_input_grad, seed=frame_seed(10, 0, index, "backward"))


def test_backward_without_a_weight_change_uses_the_kept_graph(data):
    train, vocab = data
    r = recipe(accumulate=4)
    w = StageWorker(r, vocab, 0, train)
    calls = []
    w.module.register_forward_hook(lambda *_: calls.append(1))
    w.forward(1, 0, None)
    w.forward(2, 0, None)
    w.backward(2, 0, random_frame(w.backward_codec, (2, 16, 32), 2))  # no step: version unchanged
    w.backward(1, 0, random_frame(w.backward_codec, (2, 16, 32), 1))
    assert len(calls) == 2  # no recompute
    assert w.version == 0 and w.pending == 2


# -- optimizer cadence ------------------------------------------------------------------------


@pytest.mark.parametrize("accumulate", [1, 3])
def test_an_optimizer_step_every_accumulate_backward_passes(data, accumulate):
    chain = workers(recipe(accumulate=accumulate), data)
    weights = [flatten(w.params) for w in chain]
    for k in range(1, 8):
        run_sample(chain, sample=k)
        stepped = k % accumulate == 0
        for i, w in enumerate(chain):
            assert w.version == k // accumulate, (k, i)
            assert w.pending == k % accumulate
            assert w.samples_since_merge == k
            now = flatten(w.params)
            assert torch.equal(now, weights[i]) != stepped, (k, i)
            weights[i] = now
            if stepped:
                assert all(p.grad is None for p in w.params)  # zeroed for the next accumulation
            else:
                assert all(p.grad is not None for p in w.params)


# -- reproducible frames ------------------------------------------------------------------


def test_frames_are_reproducible_from_sample_and_attempt(data):
    r = recipe(compression="128x")
    first, second, retry = workers(r, data), workers(r, data), workers(r, data)
    loss_a, fwd_a, bwd_a = run_sample(first, sample=21, attempt=0)
    loss_b, fwd_b, bwd_b = run_sample(second, sample=21, attempt=0)
    assert loss_a == loss_b and fwd_a == fwd_b and bwd_a == bwd_b  # byte for byte
    assert all(torch.equal(a, b) for a, b in zip(flatten(first[0].params), flatten(second[0].params)))

    # the gradient frame is stochastically rounded with the work's own seed
    assert Codec.of_frame(bwd_a[0]).rounding == "stochastic"
    assert Codec.header(bwd_a[0])["seed"] == frame_seed(21, 0, 1, "backward")

    loss_c, fwd_c, bwd_c = run_sample(retry, sample=21, attempt=1)
    assert loss_c == loss_a
    assert Codec.header(bwd_c[0])["seed"] == frame_seed(21, 1, 1, "backward") != frame_seed(21, 0, 1, "backward")
    assert bwd_c[0] != bwd_a[0]
    assert not torch.equal(Codec.decode(bwd_c[0]), Codec.decode(bwd_a[0]))  # other rounding noise

    seeds = {frame_seed(s, a, st, d)
             for s in (0, 1, 21) for a in (0, 1) for st in (0, 1) for d in ("forward", "backward")}
    assert len(seeds) == 24 and all(0 <= s < 2**32 for s in seeds)
    assert frame_seed(21, 0, 1, "backward") == frame_seed(21, 0, 1, "backward")


# -- refusing bad work --------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["fp32", "128x"])
def test_check_frame_refuses_bad_frames(data, compression):
    r = recipe(compression=compression)
    first, last = workers(r, data)
    good, _ = first.forward(5, 0, None)
    last.check_frame(good, "forward")
    last.check_frame(memoryview(good), "forward")
    width = first.module.boundary_width
    first.check_frame(random_frame(first.backward_codec, (2, 16, width), 1), "backward")

    corrupted = bytearray(good)
    corrupted[-1] ^= 0x40
    with pytest.raises(WorkError, match="bad forward frame: .*checksum"):
        last.check_frame(bytes(corrupted), "forward")
    with pytest.raises(WorkError, match="bad forward frame: .*truncated"):
        last.check_frame(b"not a frame at all", "forward")
    with pytest.raises(WorkError, match="bad forward frame"):
        last.check_frame(good[: len(good) // 2], "forward")
    with pytest.raises(WorkError, match=r"stage 1 takes forward frames of shape \(2, 16, %d\), got \(2, 17, %d\)"
                                        % (width, width)):
        last.check_frame(random_frame(first.forward_codec, (2, 17, width), 2), "forward")
    with pytest.raises(WorkError, match=r"stage 0 takes backward frames of shape \(2, 16, %d\)" % width):
        first.check_frame(random_frame(first.backward_codec, (2, 16, width + 1), 3), "backward")

    # the compute itself refuses them too
    with pytest.raises(WorkError, match="bad frame"):
        last.forward(5, 0, bytes(corrupted))
    with pytest.raises(WorkError, match="needs an input frame"):
        last.forward(5, 0, None)
    with pytest.raises(WorkError, match="takes frames of shape"):
        last.forward(5, 0, random_frame(first.forward_codec, (2, 16, width + 1), 4))
    with pytest.raises(WorkError, match="gradient of shape|takes frames of shape"):
        first.backward(5, 0, random_frame(first.backward_codec, (1, 16, width), 5))
    assert last.version == 0 and last.pending == 0  # nothing was trained on


def test_backward_of_an_unknown_sample_and_forget(data, monkeypatch):
    train, vocab = data
    clock = SimpleNamespace(now=100.0)
    monkeypatch.setattr(worker_module, "time", SimpleNamespace(monotonic=lambda: clock.now))
    w = StageWorker(recipe(), vocab, 0, train)
    grad = random_frame(w.backward_codec, (2, 16, 32), 0)
    with pytest.raises(WorkError, match="stage 0 holds no forward of sample 99 attempt 0"):
        w.backward(99, 0, grad)

    w.forward(1, 0, None)
    clock.now = 101.0
    w.forward(2, 0, None)
    w.forward(2, 1, None)
    clock.now = 105.0
    w.forward(3, 0, None)
    assert w.forget(older_than=101.0) == [(1, 0)]
    assert set(w.kept) == {(2, 0), (2, 1), (3, 0)}
    assert sorted(w.forget(older_than=102.0)) == [(2, 0), (2, 1)]
    assert w.forget(older_than=102.0) == []
    with pytest.raises(WorkError, match="sample 1 attempt 0"):
        w.backward(1, 0, grad)
    with pytest.raises(WorkError, match="sample 2 attempt 1"):
        w.backward(2, 1, grad)
    w.drop(3, 0)
    assert w.kept == {}
    with pytest.raises(WorkError):
        w.backward(3, 0, grad)
    w.forward(4, 0, None)
    assert w.backward(4, 0, grad) is None  # what is kept still works
    with pytest.raises(WorkError):
        w.backward(4, 0, grad)  # but only once


# -- global weights ---------------------------------------------------------------------------


def test_load_global_of_anothers_outer_state_gives_identical_parameters(data):
    train, vocab = data
    r = recipe()
    a = StageWorker(r, vocab, 0, train)
    for s in range(3):  # local training moves a's weights away from the global ones
        a.forward(s, 0, None)
        a.backward(s, 0, random_frame(a.backward_codec, (2, 16, 32), s))
    assert a.version == 3
    a.outer.step(a.outer.pseudo_gradient(flatten(a.params)))  # a merge of a group of one
    unflatten_into(a.outer.weights, a.params)
    digest = a.merged(5)
    state = a.outer.to_bytes()
    assert digest == hashlib.sha256(state).hexdigest() and a.global_version == 5 and a.version == 4
    assert a.outer.momentum_buffer.abs().sum() > 0

    b = StageWorker(r, vocab, 0, train)
    assert not torch.equal(flatten(b.params), flatten(a.params))
    b.forward(9, 0, None)  # a forward kept across the load is recomputed, not broken
    b.load_global(5, digest, state)
    assert (b.global_version, b.global_digest, b.version, b.pending) == (5, digest, 1, 0)
    for (name, pa), pb in zip(a.module.named_parameters(), b.params):
        assert torch.equal(pa, pb), name
    assert b.outer.to_bytes() == state  # momentum too
    assert a.forward(8, 0, None)[0] == b.forward(8, 0, None)[0]  # same weights, same frame
    b.backward(9, 0, random_frame(b.backward_codec, (2, 16, 32), 9))
    assert b.version == 2 and not torch.equal(flatten(b.params), flatten(a.params))  # b trained on

    # the same next outer step on both lands on the same digest
    pseudo = torch.full_like(a.outer.weights, 1e-3)
    a.outer.step(pseudo)
    b.outer.step(pseudo.clone())
    assert a.merged(6) == b.merged(6)

    # a state of another stage's size is refused and leaves the weights alone
    other = StageWorker(r, vocab, 1, train)
    kept = flatten(b.params)
    with pytest.raises(GroupError, match="this stage needs"):
        b.load_global(7, "x", other.outer.to_bytes())
    with pytest.raises(GroupError, match="not an outer-optimizer state"):
        b.load_global(7, "x", b"garbage")
    assert torch.equal(flatten(b.params), kept) and b.global_version == 6


def test_the_poison_adversary_merges_large_noise_instead_of_its_training(data):
    train, vocab = data
    poisoner = StageWorker(recipe(), vocab, 0, train, adversary="poison")
    chain = [poisoner, StageWorker(recipe(), vocab, 1, train)]
    for k in range(4):
        run_sample(chain, sample=k)
    trained = poisoner.outer.pseudo_gradient(flatten(poisoner.params))
    assert trained.norm() > 0  # it trains like anyone
    version = poisoner.version
    poisoner.poison()
    merged = poisoner.outer.pseudo_gradient(flatten(poisoner.params))
    assert poisoner.version == version + 1  # its kept graphs are no longer valid
    assert float(merged.norm() / trained.norm()) == pytest.approx(worker_module.POISON_SCALE, rel=1e-3)
    assert abs(float(torch.nn.functional.cosine_similarity(merged, trained, dim=0))) < 0.1
