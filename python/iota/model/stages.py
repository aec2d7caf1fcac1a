"""Pipeline stages: the model cut into pieces that can each be trained alone.

The first stage holds the embedding, the last the final norm, LM head and
loss; every stage but the last may end with a bottleneck down-projection of
the residual stream, and every stage but the first then starts with the
matching up-projection (IOTA / ResBM's residual bottleneck). At init the
down-projection selects `width` directions of the residual stream and the
up-projection is its transpose, so the pair is an exact identity on those
directions: gradients and information flow through unchanged from step one,
and training learns which subspace to keep."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from iota.model.transformer import ModelConfig, Transformer, rotary_tables

BOTTLENECK_INITS = ("identity", "orthogonal")


@dataclass(frozen=True)
class StagePlan:
    """Layers [first_layer, end_layer) of stage `index` of `n_stages`."""

    index: int
    n_stages: int
    first_layer: int
    end_layer: int

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.n_stages - 1


@dataclass(frozen=True)
class Bottleneck:
    """The residual bottleneck at every stage boundary (width 0: none).

    reembed: every later stage also adds its own embedding of the input
    tokens to what it receives. A miner can read a sample's tokens from the
    shared corpus given the sample's id, so this costs no bytes per token on
    the wire; the bottleneck then only has to carry context."""

    width: int = 0
    init: str = "identity"
    reembed: bool = False

    def __post_init__(self) -> None:
        if self.init not in BOTTLENECK_INITS:
            raise ValueError(f"bottleneck init must be one of {BOTTLENECK_INITS}, not {self.init!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def split(cfg: ModelConfig, n_stages: int, seq_len: int | None = None) -> list[StagePlan]:
    """Cut the layers into n_stages contiguous stages that minimise the most
    expensive stage's forward FLOPs (the LM head counts toward the last stage),
    so no stage limits the pipeline more than it must."""
    if not 1 <= n_stages <= cfg.n_layers:
        raise ValueError(f"need 1 <= n_stages <= n_layers ({cfg.n_layers}), got {n_stages}")
    block = cfg.block_flops_per_token(seq_len or cfg.max_seq_len)
    head = cfg.head_flops_per_token()
    n = cfg.n_layers

    def cost(first: int, end: int, last: bool) -> float:
        return (end - first) * block + (head if last else 0.0)

    # best[s][e]: minimal max-cost of covering layers [0, e) with s stages.
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, n_stages + 1):
        for e in range(s, n + 1):
            for b in range(s - 1, e):
                value = max(best[s - 1][b], cost(b, e, s == n_stages and e == n))
                if value < best[s][e]:
                    best[s][e], cut[s][e] = value, b
    bounds, e = [], n
    for s in range(n_stages, 0, -1):
        bounds.append((cut[s][e], e))
        e = cut[s][e]
    return [StagePlan(i, n_stages, b, e) for i, (b, e) in enumerate(reversed(bounds))]


class Stage(nn.Module):
    """One pipeline stage. forward(x) takes token ids (first stage) or the
    boundary tensor from the previous stage, and returns the boundary tensor
    for the next stage, or (last stage) the loss given targets, else logits."""

    def __init__(self, cfg: ModelConfig, plan: StagePlan, bottleneck: Bottleneck, source: Transformer):
        super().__init__()
        self.cfg, self.plan, self.bottleneck = cfg, plan, bottleneck
        width = bottleneck.width
        if plan.is_first or bottleneck.reembed:
            self.embed = copy.deepcopy(source.embed)
        if not plan.is_first and width:
            self.up = nn.Linear(width, cfg.dim, bias=False)
        self.blocks = nn.ModuleList(copy.deepcopy(source.blocks[i]) for i in range(plan.first_layer, plan.end_layer))
        if plan.is_last:
            self.norm = copy.deepcopy(source.norm)
            self.head = copy.deepcopy(source.head)
        elif width:
            self.down = nn.Linear(cfg.dim, width, bias=False)

    @property
    def boundary_width(self) -> int:
        """Width of the tensor this stage sends (0 for the last stage)."""
        return 0 if self.plan.is_last else (self.bottleneck.width or self.cfg.dim)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None,
                tokens: torch.Tensor | None = None) -> torch.Tensor:
        """`tokens`: the sample's token ids, needed by later stages when reembedding."""
        if self.plan.is_first:
            x = self.embed(x)
        elif self.bottleneck.width:
            x = self.up(x)
        if not self.plan.is_first and self.bottleneck.reembed:
            if tokens is None:
                raise ValueError("a reembedding stage needs the sample's tokens")
            x = x + self.embed(tokens)
        cos, sin = rotary_tables(self.cfg, x.shape[1], x.device)
        for block in self.blocks:
            x = block(x, cos, sin)
        if not self.plan.is_last:
            return self.down(x) if self.bottleneck.width else x
        logits = self.head(self.norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def bottleneck_pair(dim: int, width: int, init: str, generator: torch.Generator) -> torch.Tensor:
    """Initial down-projection rows (width x dim): orthonormal, so down then up
    (its transpose) is the identity on the kept subspace."""
    if init == "identity":
        return torch.eye(width, dim)
    q, _ = torch.linalg.qr(torch.randn(dim, width, generator=generator))
    return q.T.contiguous()


def build_stages(cfg: ModelConfig, n_stages: int, bottleneck: Bottleneck = Bottleneck(), seed: int = 0,
                 seq_len: int | None = None) -> list[Stage]:
    """Stages initialised exactly like Transformer(cfg) under the same seed."""
    torch.manual_seed(seed)
    source = Transformer(cfg)
    stages = [Stage(cfg, plan, bottleneck, source) for plan in split(cfg, n_stages, seq_len)]
    if bottleneck.width:
        if not 0 < bottleneck.width <= cfg.dim:
            raise ValueError(f"bottleneck width must be in (0, {cfg.dim}], got {bottleneck.width}")
        g = torch.Generator().manual_seed(seed + 1)
        for sender, receiver in zip(stages, stages[1:]):
            rows = bottleneck_pair(cfg.dim, bottleneck.width, bottleneck.init, g)
            with torch.no_grad():
                sender.down.weight.copy_(rows)
                receiver.up.weight.copy_(rows.T)
    return stages

