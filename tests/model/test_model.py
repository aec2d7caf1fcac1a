"""The model and its split: stages reproduce the whole model exactly, the
bottleneck starts as an identity on its subspace, compressed boundaries carry
real frames both ways, and training lowers the loss."""

import itertools

import pytest
import torch

from iota.codec import Codec
from iota.model import (
    Bottleneck, ModelConfig, Pipeline, TrainConfig, Transformer, build_stages, evaluate, load_checkpoint,
    save_checkpoint, split, train_local,
)

CFG = ModelConfig(vocab_size=64, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=32)


def batch(seed=0, b=2, t=32, vocab=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, t), generator=g), torch.randint(0, vocab, (b, t), generator=g)


@pytest.mark.parametrize("n_stages", [1, 2, 3, 4])
def test_split_covers_every_layer_once(n_stages):
    plans = split(CFG, n_stages)
    assert [p.index for p in plans] == list(range(n_stages))
    assert plans[0].first_layer == 0 and plans[-1].end_layer == CFG.n_layers
    assert all(a.end_layer == b.first_layer and a.end_layer > a.first_layer for a, b in zip(plans, plans[1:]))


def test_split_balances_compute_with_a_heavy_head():
    cfg = ModelConfig(vocab_size=50_000, dim=64, n_layers=8, n_heads=4, n_kv_heads=2)
    plans = split(cfg, 2)
    # The LM head costs several blocks, so the last stage gets fewer layers.
    assert plans[1].end_layer - plans[1].first_layer < plans[0].end_layer - plans[0].first_layer
    with pytest.raises(ValueError):
        split(CFG, 5)


@pytest.mark.parametrize("n_stages", [2, 3, 4])
def test_stages_in_sequence_equal_the_whole_model(n_stages):
    torch.manual_seed(0)
    whole = Transformer(CFG)
    pipe = Pipeline.build(CFG, n_stages, seed=0)
    x, y = batch()
    loss_whole, loss_pipe = whole(x, y), pipe(x, y)
    assert torch.equal(loss_whole, loss_pipe)
    loss_whole.backward()
    loss_pipe.backward()
    grads = {}
    for stage in pipe.stages:
        for name, p in stage.named_parameters():
            if name.startswith("blocks."):
                i = int(name.split(".")[1]) + stage.plan.first_layer
                name = f"blocks.{i}." + name.split(".", 2)[2]
            grads[name] = p.grad
    for name, p in whole.named_parameters():
        assert torch.allclose(grads[name], p.grad, rtol=1e-5, atol=1e-7), name


def test_each_stage_trains_alone_from_its_input():
    stages = build_stages(CFG, 3, Bottleneck(width=16), seed=0)
    x, y = batch()
    boundary = stages[0](x).detach()
    assert boundary.shape == (2, 32, 16)
    middle_in = boundary.clone().requires_grad_()
    middle_out = stages[1](middle_in)
    middle_out.backward(torch.ones_like(middle_out))
    assert middle_in.grad is not None and stages[1].up.weight.grad is not None
    loss = stages[2](stages[1](boundary).detach(), y)
    loss.backward()
    assert stages[2].head.weight.grad is not None and loss.item() > 0


@pytest.mark.parametrize("init", ["identity", "orthogonal"])
def test_bottleneck_starts_as_identity_on_its_subspace(init):
    stages = build_stages(CFG, 2, Bottleneck(width=16, init=init), seed=0)
    down, up = stages[0].down.weight, stages[1].up.weight
    assert torch.allclose(down @ up, torch.eye(16), atol=1e-5)  # up(down(.)) is a projection
    h = torch.randn(5, CFG.dim)
    kept = up @ (down @ h.T)
    assert torch.allclose(down @ kept, down @ h.T, atol=1e-5)


def test_compressed_boundaries_send_real_frames_both_ways():
    fwd, bwd = Codec(bits=4, block=64), Codec(bits=8, block=64, scale_dtype="fp32")
    pipe = Pipeline.build(CFG, 3, Bottleneck(width=16), fwd, bwd, seed=0)
    x, y = batch(b=4)
    pipe(x, y).backward()
    tokens = 4 * 32
    for link in pipe.links:
        per_token = link.stats.bytes_per_token()
        frame = len(fwd.encode(torch.zeros(4, 32, 16)))
        assert per_token["forward"] == frame / tokens
        assert per_token["backward"] == len(bwd.encode(torch.zeros(4, 32, 16))) / tokens
        # 64-wide bf16 residual is 128 bytes/token; int4 of a 16-wide bottleneck ~8.5.
        assert link.ratio() == pytest.approx(2 * 128 / (per_token["forward"] + per_token["backward"]))
    assert pipe.compression_ratio() > 8


def test_quantized_gradients_flow_to_the_first_stage():
    pipe = Pipeline.build(CFG, 2, Bottleneck(width=32), Codec(bits=8), Codec(bits=8, scale_dtype="fp32"), seed=0)
    ref = Pipeline.build(CFG, 2, Bottleneck(width=32), seed=0)
    x, y = batch()
    pipe(x, y).backward()
    ref(x, y).backward()
    g, g_ref = pipe.stages[0].embed.weight.grad, ref.stages[0].embed.weight.grad
    assert g.abs().sum() > 0
    cosine = torch.nn.functional.cosine_similarity(g.flatten(), g_ref.flatten(), dim=0)
    assert cosine > 0.95  # int8 both ways: the gradient keeps its direction


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    # A learnable stream: repeating sequences of period 8.
    pattern = torch.randint(0, 64, (8,))
    def batches():
        g = torch.Generator().manual_seed(1)
        while True:
            offsets = torch.randint(0, 8, (8,), generator=g)
            seq = torch.stack([pattern[(torch.arange(33) + o) % 8] for o in offsets])
            yield seq[:, :-1], seq[:, 1:]
    val = list(itertools.islice(batches(), 2))
    pipe = Pipeline.build(CFG, 2, Bottleneck(width=16), Codec(bits=4), Codec(bits=8, scale_dtype="fp32"), seed=0)
    before = evaluate(pipe, val)
    history = train_local(pipe, batches(), val, TrainConfig(steps=60, lr=3e-3, warmup_steps=5, eval_every=30), progress=False)
    assert history.final_val_loss < 0.5 * before
    assert history.tokens == 60 * 8 * 32 and len(history.val_loss) == 2


def test_checkpoint_round_trip(tmp_path):
    pipe = Pipeline.build(CFG, 2, Bottleneck(width=16), seed=0)
    save_checkpoint(tmp_path / "ckpt", pipe, {"model": CFG.to_dict(), "stages": 2, "bottleneck": 16})
    state, config = load_checkpoint(tmp_path / "ckpt")
    other = Pipeline.build(CFG, 2, Bottleneck(width=16), seed=1)
    other.load_state_dict(state)
    x, y = batch()
    assert torch.equal(other(x, y), pipe(x, y))
    assert ModelConfig(**config["model"]) == CFG
    assert not list((tmp_path / "ckpt").glob("*.tmp"))


def test_reembedding_stages_need_and_use_the_tokens():
    stages = build_stages(CFG, 2, Bottleneck(width=8, reembed=True), seed=0)
    x, y = batch()
    boundary = stages[0](x)
    with pytest.raises(ValueError, match="tokens"):
        stages[1](boundary, y)
    loss = stages[1](boundary, y, tokens=x)
    loss.backward()
    assert stages[1].embed.weight.grad.abs().sum() > 0
    pipe = Pipeline.build(CFG, 2, Bottleneck(width=8, reembed=True), Codec(bits=4), Codec(bits=4, scale_dtype="fp32"))
    assert torch.isfinite(pipe(x, y))


@pytest.mark.slow
def test_main_job_trains_on_the_stdlib(tmp_path):
    """`python -m iota.model` on a fresh cache: it tokenizes the stdlib, trains
    a compressed pipeline, lowers the loss and saves a checkpoint."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "IOTA_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "iota.model", "--steps", "30", "--dim", "64", "--layers", "3", "--batch", "8",
         "--seq-len", "64", "--checkpoint", str(tmp_path / "ckpt")],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    before = float(result.stdout.split("validation loss before training: ")[1].split()[0])
    report = json.loads(result.stdout[result.stdout.index("{"): result.stdout.rindex("}") + 1])
    assert report["final_val_loss"] < before - 1.0
    assert report["compression_ratio_vs_bf16"] > 100
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
