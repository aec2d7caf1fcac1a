"""Tokens per second of the local swarm against `iota.model.train_local` on
the same model, data and machine, and bytes on the wire per token with and
without compression.

    python bench/swarm.py [--samples 200] [--repeats 3] [--quick] [--append]

For each compression setting, each repeat runs (in this order, never at the
same time) a local swarm (`iota.node.local.LocalSwarm`: orchestrator plus
stages x miners-per-stage miner processes, no validator, one torch thread
per miner) and the single-process baseline: the same stages chained in one
process (`Pipeline`, boundaries compressed the same way) trained by
`train_local` on the same number of samples, with torch's default threads.
Swarm throughput counts from the first lease to the last finished sample.
Prints one JSON line per measurement and one summary line per setting with
medians and ratios; `--append` adds them to bench/results/swarm.jsonl.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import iota.data
from iota.model import Pipeline, TrainConfig, train_local
from iota.model.recipe import Recipe
from iota.node.local import LocalSwarm

RESULTS = Path(__file__).parent / "results" / "swarm.jsonl"


def run_swarm(recipe: Recipe, miners_per_stage: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="iota-bench-swarm-") as directory:
        swarm = LocalSwarm(Path(directory), recipe, miners_per_stage=miners_per_stage, threads=1, validator=False)
        try:
            swarm.start()
            deadline = time.monotonic() + timeout
            while True:
                swarm.supervise()
                state = swarm.state()
                if swarm.finished(state):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the swarm did not finish {recipe.samples} samples in {timeout}s")
                time.sleep(0.25)
        finally:
            swarm.stop()
    traffic = state["traffic"]
    boundary = traffic["activations"] + traffic["gradients"]
    return {
        "tokens_per_second": state["tokens_per_second"],
        "training_seconds": state["training_seconds"],
        "boundary_bytes_per_token": boundary / state["tokens"],
        "allreduce_bytes_per_token": traffic["allreduce"] / state["tokens"],
        "wire_bytes_per_token": (boundary + traffic["allreduce"]) / state["tokens"],
        "compression_ratio": state["compression_ratio"],
        "last_loss": statistics.mean(loss for _, loss in state["losses"][-20:]),
        "merges": sum(m["outcome"] == "merged" for m in state["merges"]),
    }


def run_local(recipe: Recipe) -> dict:
    train, _, tokenizer = iota.data.load(recipe.data, recipe.tokenizer)
    compression = recipe.compression_parts()
    pipe = Pipeline.build(recipe.model_config(tokenizer.vocab_size), recipe.stages, compression.bottleneck,
                          compression.forward, compression.backward, seed=recipe.seed)
    batches = (train.batch(i, recipe.batch, recipe.seq_len, seed=recipe.seed) for i in range(recipe.samples))
    val = [train.batch(0, recipe.batch, recipe.seq_len, seed=recipe.seed)]
    history = train_local(pipe, batches, val,
                          TrainConfig(steps=recipe.samples, lr=recipe.lr, warmup_steps=recipe.warmup_samples,
                                      eval_every=recipe.samples + 1, seed=recipe.seed), progress=False)
    return {
        "tokens_per_second": history.tokens / history.seconds,
        "training_seconds": history.seconds,
        "last_loss": statistics.mean(loss for _, loss in history.train_loss[-20:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--miners-per-stage", type=int, default=2)
    parser.add_argument("--compressions", default="128x,none")
    parser.add_argument("--quick", action="store_true", help="one repeat of 60 samples")
    parser.add_argument("--append", action="store_true", help=f"append the lines to {RESULTS}")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.repeats = 60, 1

    lines = []

    def emit(line: dict) -> None:
        line = {"bench": "swarm", "threads_main": torch.get_num_threads(), **line}
        print(json.dumps(line), flush=True)
        lines.append(line)

    bytes_per_token = {}
    for compression in args.compressions.split(","):
        recipe = Recipe(stages=args.stages, compression=compression, samples=args.samples,
                        merge_every=max(1, args.samples // 4))
        swarm, local = [], []
        for repeat in range(args.repeats):
            swarm.append(run_swarm(recipe, args.miners_per_stage, timeout=60 + 5.0 * args.samples))
            emit({"run": "swarm", "compression": compression, "repeat": repeat, **swarm[-1]})
            local.append(run_local(recipe))
            emit({"run": "train_local", "compression": compression, "repeat": repeat, **local[-1]})
        swarm_tps = statistics.median(r["tokens_per_second"] for r in swarm)
        local_tps = statistics.median(r["tokens_per_second"] for r in local)
        bytes_per_token[compression] = statistics.median(r["wire_bytes_per_token"] for r in swarm)
        emit({"run": "summary", "compression": compression, "samples": args.samples, "repeats": args.repeats,
              "stages": args.stages, "miners_per_stage": args.miners_per_stage,
              "recipe": recipe.to_dict(),
              "swarm_tokens_per_second": swarm_tps, "train_local_tokens_per_second": local_tps,
              "swarm_over_train_local": swarm_tps / local_tps,
              "wire_bytes_per_token": bytes_per_token[compression],
              "boundary_bytes_per_token": statistics.median(r["boundary_bytes_per_token"] for r in swarm),
              "boundary_compression_vs_bf16": statistics.median(r["compression_ratio"] for r in swarm)})
    if "none" in bytes_per_token and len(bytes_per_token) > 1:
        for compression, value in bytes_per_token.items():
            if compression != "none":
                emit({"run": "wire_ratio", "compression": compression,
                      "wire_bytes_per_token_none_over_compressed": bytes_per_token["none"] / value})
    if args.append:
        RESULTS.parent.mkdir(exist_ok=True)
        with RESULTS.open("a") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
