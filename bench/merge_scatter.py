"""How far apart are honest merge contributions, against a poisoner's?

The validator calls a merge contribution an outlier from the Gram matrix of
the round's pseudo-gradients (`iota.validator.consensus.outliers`). This
runs honest DiLoCo in one process: `--miners` replicas of the recipe's
pipeline (boundaries compressed as in the swarm), each with its own AdamW
kept across rounds, the samples of each round dealt at random among them
(as leases race in a swarm), an outer Nesterov step on the weighted mean
after every `merge_every` samples, the learning-rate schedule of the
orchestrator. Every round and stage it reports the honest contributions'
norm ratio (|x_i| over the consensus's weight-scaled yardstick) and median
cosine, and the same for a poisoner in the honest baseline's place (noise
POISON_SCALE times that replica's norm, as the `poison` adversary sends).
One JSON line per round and stage, then a summary per stage: the largest
honest ratio, the smallest poisoned one, and their quotient (the margin the
NORM_RATIO limit sits in).

    python bench/merge_scatter.py                 # 3 seeds of the test swarm's 3-stage recipe, ~2 min
    python bench/merge_scatter.py --seeds 1 --miners 3
"""

from __future__ import annotations

import argparse
import json

import torch

import iota.data
from iota.allreduce import OuterNesterov
from iota.allreduce.outer import flatten, unflatten_into
from iota.miner.worker import POISON_SCALE
from iota.model import Pipeline
from iota.model.boundary import BoundaryLink
from iota.model.recipe import Recipe
from iota.model.train import TrainConfig, lr_at, make_optimizer
from iota.validator.consensus import NORM_RATIO, Contributions, outliers

# The middle-stage adversary test's swarm (tests/node/test_adversaries.py).
RECIPE = Recipe(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, stages=3, batch=4, seq_len=64, samples=240,
                merge_every=30, warmup_samples=10)


def gram(contributions: list[torch.Tensor]) -> list[list[float]]:
    return [[torch.dot(a, b).item() for b in contributions] for a in contributions]


def run(recipe: Recipe, miners: int, seed: int) -> list[dict]:
    torch.manual_seed(seed)
    train, _, tokenizer = iota.data.load(recipe.data, recipe.tokenizer)
    compression = recipe.compression_parts()
    stages = recipe.build(tokenizer.vocab_size)
    replicas = [Pipeline(recipe.build(tokenizer.vocab_size),
                         [BoundaryLink(recipe.dim, compression.forward, compression.backward) for _ in stages[1:]])
                for _ in range(miners)]
    inner = TrainConfig(lr=recipe.lr, weight_decay=recipe.weight_decay, grad_clip=recipe.grad_clip)
    schedule = TrainConfig(steps=recipe.samples, lr=recipe.lr, warmup_steps=recipe.warmup_samples)
    optimizers = [make_optimizer(replica, inner) for replica in replicas]
    outers = [OuterNesterov(flatten(list(s.parameters())), lr=recipe.outer_lr, momentum=recipe.outer_momentum)
              for s in stages]
    deal = torch.Generator().manual_seed(seed)
    noise = torch.Generator().manual_seed(seed + 1)
    rows = []
    for round_, first in enumerate(range(0, recipe.samples, recipe.merge_every), start=1):
        counts = [0] * miners
        for sample in range(first, min(first + recipe.merge_every, recipe.samples)):
            k = int(torch.randint(miners, (1,), generator=deal))
            for group in optimizers[k].param_groups:
                group["lr"] = lr_at(sample, schedule)
            x, y = train.batch(sample, recipe.batch, recipe.seq_len, seed=recipe.seed)
            loss = replicas[k](x, y)
            optimizers[k].zero_grad()
            loss.backward()
            for stage in replicas[k].stages:  # each miner clips its own stage's gradient
                torch.nn.utils.clip_grad_norm_(stage.parameters(), recipe.grad_clip)
            optimizers[k].step()
            counts[k] += 1
        members = [k for k in range(miners) if counts[k]]
        weights = [float(counts[k]) for k in members]
        for index, outer in enumerate(outers):
            honest = [outer.pseudo_gradient(flatten(list(replicas[k].stages[index].parameters()))) for k in members]
            row = {"seed": seed, "round": round_, "stage": index, "weights": weights}
            if len(members) >= 2:
                poison = torch.randn(honest[0].shape, generator=noise)
                poisoned = [poison * (POISON_SCALE * honest[0].norm() / poison.norm())] + honest[1:]
                grams = gram(honest), gram(poisoned)
                seen, bad = (Contributions(weights, g).figures(0) for g in grams)
                if seen and bad:  # else contribution 0 has no reference this round (weights too far apart)
                    row.update(honest_ratio=round(seen["norm"] / seen["others_typical_norm"], 3),
                               honest_cosine=round(seen["median_cosine"], 3),
                               poisoned_ratio=round(bad["norm"] / bad["others_typical_norm"], 3),
                               poisoned_cosine=round(bad["median_cosine"], 3),
                               honest_outliers=len(outliers(dict(enumerate(weights)), grams[0])),
                               poisoner_caught=0 in outliers(dict(enumerate(weights)), grams[1]))
            rows.append(row)
            print(json.dumps(row), flush=True)
            mean = sum(w * h for w, h in zip(weights, honest)) / sum(weights)
            merged = outer.step(mean)
            for replica in replicas:
                unflatten_into(merged, list(replica.stages[index].parameters()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--miners", type=int, default=2, help="replicas per stage (2 in the adversary tests)")
    args = parser.parse_args()
    rows = [row for seed in range(args.seeds) for row in run(RECIPE, args.miners, seed) if "honest_ratio" in row]
    for stage in range(RECIPE.stages):
        mine = [row for row in rows if row["stage"] == stage]
        honest, poisoned = max(r["honest_ratio"] for r in mine), min(r["poisoned_ratio"] for r in mine)
        print(json.dumps({"summary": True, "stage": stage, "rounds": len(mine), "miners": args.miners,
                          "max_honest_ratio": honest, "min_poisoned_ratio": poisoned,
                          "poisoned_over_honest": round(poisoned / honest, 2), "norm_ratio_limit": NORM_RATIO,
                          "honest_cosines": [min(r["honest_cosine"] for r in mine),
                                             max(r["honest_cosine"] for r in mine)],
                          "honest_outlier_rounds": sum(r["honest_outliers"] > 0 for r in mine),
                          "poisoner_missed_rounds": sum(not r["poisoner_caught"] for r in mine)}))


if __name__ == "__main__":
    main()
