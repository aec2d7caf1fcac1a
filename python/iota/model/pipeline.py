"""The stages chained in one process, crossing each boundary through its
codec: the single-process twin of the swarm, used for training experiments
and as the reference a distributed run must match."""

from __future__ import annotations

import torch
from torch import nn

from iota.codec import Codec
from iota.model.boundary import BoundaryLink
from iota.model.stages import Bottleneck, Stage, build_stages
from iota.model.transformer import ModelConfig


class Pipeline(nn.Module):
    def __init__(self, stages: list[Stage], links: list[BoundaryLink]):
        super().__init__()
        if len(links) != len(stages) - 1:
            raise ValueError("a pipeline of N stages needs N - 1 boundary links")
        self.stages = nn.ModuleList(stages)
        self.links = links

    @classmethod
    def build(cls, cfg: ModelConfig, n_stages: int, bottleneck: Bottleneck = Bottleneck(),
              forward_codec: Codec | None = None, backward_codec: Codec | None = None, seed: int = 0) -> "Pipeline":
        stages = build_stages(cfg, n_stages, bottleneck, seed)
        links = [BoundaryLink(cfg.dim, forward_codec, backward_codec) for _ in stages[1:]]
        return cls(stages, links)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        x = tokens
        for stage, link in zip(self.stages, self.links):
            x = link(stage(x, tokens=tokens))
        return self.stages[-1](x, targets, tokens=tokens)

    def compression_ratio(self) -> float:
        """Mean over boundaries of bf16 bytes over bytes actually sent."""
        return sum(link.ratio() for link in self.links) / len(self.links) if self.links else 1.0
