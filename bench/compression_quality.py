"""How much can stage boundaries be compressed before the model learns worse?

Trains the same pipeline (same seed, data order and token budget) with each
boundary preset: uncompressed, then about 8x, 32x, 64x, 128x and 256x less
traffic than the bf16 residual stream, combining a residual bottleneck with
codec quantization of activations (forward) and activation-gradients
(backward). The uncompressed run is repeated with other seeds to measure the
seed-to-seed noise. Writes JSON lines, a markdown table and a PNG of the
validation-loss curves to bench/results/.

    python bench/compression_quality.py              # the sweep, ~27 min on 2 cores
    python bench/compression_quality.py --ablations  # plus alternatives (~45 min)
    python bench/compression_quality.py --quick      # under a minute
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import iota.data
from iota.codec import Codec
from iota.model import Bottleneck, ModelConfig, Pipeline, TrainConfig, train_local

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Preset:
    name: str
    width: int  # bottleneck width (0: none)
    forward: str | None  # codec of activations
    backward: str | None  # codec of activation-gradients
    init: str = "identity"
    reembed: bool = False


def presets(dim: int) -> list[Preset]:
    """The sweep: one named configuration per target ratio (the best found)."""
    # Gradients are small: fp32 scales keep them from flushing to zero, and
    # stochastic rounding keeps their quantization unbiased. From 64x on,
    # later stages re-embed the sample's tokens (read from the shared corpus
    # by sample id: no bytes per token), so the bottleneck carries context only.
    return [
        Preset("1x (bf16)", 0, None, None),
        Preset("8x", dim // 8, None, None),
        Preset("32x", dim // 8, "int4/b64", "int4/b64/stochastic/fp32scale"),
        Preset("64x+reembed", dim // 16, "int4/b64", "int4/b64/stochastic/fp32scale", reembed=True),
        Preset("128x+reembed", dim // 32, "int4/b256", "int4/b256/stochastic/fp32scale", reembed=True),
        Preset("256x+reembed", dim // 64, "int4/b256", "int4/b256/stochastic/fp32scale", reembed=True),
    ]


def ablations(dim: int) -> list[Preset]:
    """Alternatives at the same ratios (--ablations)."""
    return [
        Preset("64x", dim // 16, "int4/b64", "int4/b64/stochastic/fp32scale"),
        Preset("128x", dim // 32, "int4/b256", "int4/b256/stochastic/fp32scale"),
        Preset("128x-ternary", dim // 16, "int2/b256", "int2/b256/stochastic/fp32scale"),
        Preset("256x", dim // 64, "int4/b256", "int4/b256/stochastic/fp32scale"),
        Preset("128x+reembed+orthogonal", dim // 32, "int4/b256", "int4/b256/stochastic/fp32scale", "orthogonal", True),
        # The same forward traffic with finer (int8) gradients on the way back.
        Preset("128x+reembed+int8grad", dim // 32, "int4/b256", "int8/b256/stochastic/fp32scale", reembed=True),
    ]


def run(preset: Preset, cfg: ModelConfig, stages: int, train_cfg: TrainConfig, train, val_batches, batch: int,
        seq: int, seed: int) -> dict:
    pipe = Pipeline.build(
        cfg, stages, Bottleneck(preset.width, preset.init, preset.reembed),
        Codec.from_string(preset.forward) if preset.forward else None,
        Codec.from_string(preset.backward) if preset.backward else None,
        seed=seed,
    )
    batches = train.batches(batch, seq, seed=seed)
    history = train_local(pipe, batches, val_batches, TrainConfig(**{**train_cfg.__dict__, "seed": seed}), progress=False)
    per_token = [link.stats.bytes_per_token() for link in pipe.links]
    bf16 = pipe.links[0].bf16_bytes_per_token()
    return {
        "preset": preset.name, "seed": seed, "width": preset.width, "forward_codec": preset.forward,
        "backward_codec": preset.backward, "final_val_loss": history.final_val_loss,
        "val_curve": history.val_loss, "tokens": history.tokens, "seconds": round(history.seconds, 1),
        "bf16_bytes_per_token": bf16,
        "bytes_per_token": per_token,  # per boundary, forward and backward
        "forward_ratio": bf16 / per_token[0]["forward"],
        "backward_ratio": bf16 / per_token[0]["backward"],
        "ratio": pipe.compression_ratio(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--noise-seeds", type=int, default=2, help="extra seeds of the uncompressed run")
    parser.add_argument("--preset-seeds", type=int, default=0, help="extra seeds of every chosen compressed preset")
    parser.add_argument("--only", nargs="*", help="preset names to run (default: the sweep)")
    parser.add_argument("--ablations", action="store_true", help="also run the alternative presets")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--append", action="store_true",
                        help="keep the runs already in the results file (same setup) and run only missing presets")
    args = parser.parse_args()

    if args.quick:
        cfg = ModelConfig(vocab_size=257, dim=128, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=64)
        batch, seq, steps, stages = 8, 64, args.steps or 150, 3
    else:
        cfg = ModelConfig(vocab_size=257, dim=256, n_layers=6, n_heads=8, n_kv_heads=4, max_seq_len=128)
        batch, seq, steps, stages = 16, 128, args.steps or 300, 3
    train_cfg = TrainConfig(steps=steps, lr=3e-3, warmup_steps=max(1, steps // 15), eval_every=max(1, steps // 6))
    train, val, tok = iota.data.load("stdlib", "byte")
    if tok.vocab_size != cfg.vocab_size:
        raise SystemExit(f"the byte tokenizer has {tok.vocab_size} ids, the config {cfg.vocab_size}")
    val_batches = val.fixed_batches(batch, seq, num_batches=8 if args.quick else 16)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    results = out / f"compression_quality{suffix}.jsonl"
    candidates = presets(cfg.dim) + (ablations(cfg.dim) if args.ablations or args.only else [])
    chosen = [p for p in candidates if not args.only or p.name in args.only]
    setup = {"model": cfg.to_dict(), "stages": stages, "batch": batch, "seq_len": seq, "steps": steps,
             "tokens_per_run": steps * batch * seq, "threads": torch.get_num_threads(), "corpus": "stdlib",
             "tokenizer": "byte", "train": train_cfg.__dict__}
    rows = []
    if args.append and results.exists():
        lines = [json.loads(line) for line in results.read_text().splitlines()]
        if lines[0]["setup"] != json.loads(json.dumps(setup)):
            raise SystemExit(f"{results} was made with another setup; run without --append")
        rows = lines[1:]
    done = {(r["preset"], r["seed"]) for r in rows}
    baseline = presets(cfg.dim)[0]
    jobs = [(p, 0) for p in chosen] + [(baseline, s) for s in range(1, 1 + args.noise_seeds)]
    jobs += [(p, s) for p in chosen if p.width for s in range(1, 1 + args.preset_seeds)]
    jobs = [(p, s) for p, s in jobs if (p.name, s) not in done]
    print(json.dumps({"setup": setup}), flush=True)
    start = time.perf_counter()
    with open(results, "a" if rows else "w") as log:
        if not rows:
            log.write(json.dumps({"setup": setup}) + "\n")
        for preset, seed in jobs:
            row = run(preset, cfg, stages, train_cfg, train, val_batches, batch, seq, seed)
            rows.append(row)
            line = json.dumps(row)
            print(line, flush=True)
            log.write(line + "\n")
            log.flush()
    summary = summarize(rows, time.perf_counter() - start, setup)
    (out / f"compression_quality{suffix}.md").write_text(summary)
    plot(rows, out / f"compression_quality{suffix}.png")
    print(summary)


def summarize(rows: list[dict], seconds: float, setup: dict) -> str:
    rows.sort(key=lambda r: (r["seed"] != 0, r["ratio"]))
    base = [r["final_val_loss"] for r in rows if r["width"] == 0 and r["forward_codec"] is None]
    ref = next(r["final_val_loss"] for r in rows if r["width"] == 0 and r["forward_codec"] is None and r["seed"] == 0)
    noise = statistics.stdev(base) if len(base) > 1 else float("nan")
    lines = [
        f"Model {setup['model']['dim']}d x {setup['model']['n_layers']} layers, {setup['stages']} stages "
        f"({setup['stages'] - 1} boundaries), {setup['tokens_per_run']:,} training tokens per run, byte-level "
        f"stdlib corpus, {setup['threads']} threads. Training time summed over the {len(rows)} runs: "
        f"{sum(r['seconds'] for r in rows) / 60:.1f} min (this invocation: {seconds / 60:.1f} min).",
        f"Seed-to-seed noise of the uncompressed run: std {noise:.4f} over {len(base)} seeds "
        f"({', '.join(f'{v:.4f}' for v in base)}), i.e. {100 * noise / ref:.2f}% of the loss.",
        "",
        "| preset | width | forward codec | backward codec | fwd ratio | bwd ratio | ratio | fwd B/token | bwd B/token | val loss | vs 1x | time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    within = []
    for r in rows:
        if r["seed"] != 0:
            continue
        bpt = r["bytes_per_token"][0]
        rel = r["final_val_loss"] / ref - 1
        if rel <= 0.02:
            within.append((r["ratio"], r["preset"]))
        lines.append(
            f"| {r['preset']} | {r['width'] or '-'} | {r['forward_codec'] or '-'} | {r['backward_codec'] or '-'} | "
            f"{r['forward_ratio']:.1f} | {r['backward_ratio']:.1f} | {r['ratio']:.1f} | {bpt['forward']:.1f} | "
            f"{bpt['backward']:.1f} | {r['final_val_loss']:.4f} | {100 * rel:+.2f}% | {r['seconds']:.0f}s |"
        )
    repeats = [r for r in rows if r["seed"] != 0 and r["width"]]
    if repeats:
        lines += ["", "Other seeds of compressed presets: " + "; ".join(
            f"{r['preset']} seed {r['seed']}: {r['final_val_loss']:.4f} ({100 * (r['final_val_loss'] / ref - 1):+.2f}%)"
            for r in repeats) + "."]
    compressed = [(ratio, name) for ratio, name in within if ratio > 1.5]
    if compressed:
        ratio, name = max(compressed)
        lines += ["", f"Largest ratio within 2% of the uncompressed validation loss: {ratio:.1f}x ({name})."]
    else:
        best = min((r for r in rows if r["seed"] == 0 and r["ratio"] >= 100), key=lambda r: r["final_val_loss"], default=None)
        lines += ["", "No compressed preset came within 2% of the uncompressed validation loss."]
        if best:
            lines[-1] += (f" Best at >= 100x: {best['preset']} ({best['ratio']:.0f}x), "
                          f"{100 * (best['final_val_loss'] / ref - 1):+.1f}%.")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.cm.tab20.colors
    for i, r in enumerate(rows):
        steps, losses = zip(*r["val_curve"])
        style = ":" if r["seed"] else "-"
        label = f"{r['preset']}, {r['ratio']:.0f}x measured" + (f", seed {r['seed']}" if r["seed"] else "")
        ax.plot(steps, losses, style, color=colors[i % len(colors)], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("Boundary compression vs validation loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
