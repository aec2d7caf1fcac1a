"""`python -m iota.model`: train the stage-split model in one process, with
every stage boundary compressed as the swarm will compress it, on the Python
standard library's source (already on this machine). Shows a falling loss and
the real bytes per token that crossed each boundary."""

from __future__ import annotations

import argparse
import json

import iota.data
from iota.model import ModelConfig, Pipeline, TrainConfig, evaluate, save_checkpoint, train_local
from iota.model.recipe import COMPRESSION_PRESETS, compression_of



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--compression", default="128x",
                        help=f"a preset ({', '.join(COMPRESSION_PRESETS)}) or a codec spec used both ways")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", help="directory to save the trained model to")
    args = parser.parse_args()

    train, val, tok = iota.data.load("stdlib", "byte")
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=args.dim, n_layers=args.layers, max_seq_len=args.seq_len)
    compression = compression_of(args.compression, cfg.dim)
    pipe = Pipeline.build(cfg, args.stages, compression.bottleneck, compression.forward, compression.backward,
                          seed=args.seed)
    val_batches = val.fixed_batches(args.batch, args.seq_len, num_batches=8)
    print(f"training {args.stages} stages of a {cfg.dim}-wide, {cfg.n_layers}-layer model on "
          f"{train.num_tokens:,} stdlib tokens; boundary compression {args.compression}")
    print(f"validation loss before training: {evaluate(pipe, val_batches):.3f} nats/byte")
    history = train_local(
        pipe, train.batches(args.batch, args.seq_len, seed=args.seed), val_batches,
        TrainConfig(steps=args.steps, warmup_steps=max(1, args.steps // 15), eval_every=max(1, args.steps // 5),
                    seed=args.seed),
    )
    report = {
        "final_val_loss": round(history.final_val_loss, 4),
        "val_curve": [(s, round(v, 4)) for s, v in history.val_loss],
        "tokens_per_second": round(history.tokens / history.seconds),
        "compression_ratio_vs_bf16": round(pipe.compression_ratio(), 1),
        "bytes_per_token_per_boundary": [link.stats.bytes_per_token() for link in pipe.links],
    }
    print(json.dumps(report, indent=2))
    if args.checkpoint:
        save_checkpoint(args.checkpoint, pipe, {"model": cfg.to_dict(), "stages": args.stages,
                                                "compression": args.compression})
        print(f"saved to {args.checkpoint}")


if __name__ == "__main__":
    main()
