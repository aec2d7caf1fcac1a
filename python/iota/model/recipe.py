"""`Recipe`: everything every node of one training run must agree on.

The orchestrator holds the recipe and hands it to each node that registers,
so miners never disagree about the model, the stage split, the codecs, the
data or the schedule."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from iota.codec import Codec
from iota.model.stages import Bottleneck, Stage, build_stages, split
from iota.model.transformer import ModelConfig

# name: (bottleneck width as a fraction of dim, activation codec, gradient codec, reembed)
COMPRESSION_PRESETS: dict[str, tuple[float, str | None, str | None, bool]] = {
    "none": (0, None, None, False),
    "32x": (1 / 8, "int4/b64", "int4/b64/stochastic/fp32scale", False),
    "128x": (1 / 32, "int4/b256", "int4/b256/stochastic/fp32scale", True),
}


@dataclass(frozen=True)
class Compression:
    """What crosses each stage boundary: the bottleneck and the two codecs (None: bf16)."""

    bottleneck: Bottleneck
    forward: Codec | None
    backward: Codec | None


def compression_of(name: str, dim: int) -> Compression:
    """A named preset (`none`, `32x`, `128x`) or a codec spec used both ways with no bottleneck."""
    if name in COMPRESSION_PRESETS:
        fraction, forward, backward, reembed = COMPRESSION_PRESETS[name]
        return Compression(
            Bottleneck(int(dim * fraction), reembed=reembed),
            Codec.from_string(forward) if forward else None,
            Codec.from_string(backward) if backward else None,
        )
    try:
        codec = Codec.from_string(name)
    except ValueError as exc:
        raise ValueError(
            f"compression {name!r} is neither a preset ({', '.join(COMPRESSION_PRESETS)}) nor a codec spec: {exc}"
        ) from None
    return Compression(Bottleneck(), codec, codec)


@dataclass(frozen=True)
class Recipe:
    """The model, its split, compression, data and schedule of one run.

    A *sample* is one batch of `batch` sequences of `seq_len` tokens; the run
    trains on `samples` of them. Every miner takes an AdamW step after
    `accumulate` samples' backward passes, and the miners of a stage merge
    (DiLoCo outer step) after every `merge_every` samples the swarm finished.
    """

    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    stages: int = 2
    compression: str = "128x"
    data: str = "stdlib"
    tokenizer: str = "byte"
    batch: int = 8
    seq_len: int = 128
    samples: int = 1000
    lr: float = 3e-3
    warmup_samples: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    accumulate: int = 1
    merge_every: int = 100
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, int) or value < (0 if f.name == "seed" else 1)):
                raise ValueError(f"recipe.{f.name} must be a positive integer, got {value!r}")
        if not 1 <= self.stages <= self.n_layers:
            raise ValueError(f"recipe.stages must be between 1 and n_layers ({self.n_layers}), got {self.stages}")
        compression_of(self.compression, self.dim)
        self.model_config()

    def model_config(self, vocab_size: int = 257) -> ModelConfig:
        return ModelConfig(vocab_size=vocab_size, dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
                           n_kv_heads=self.n_kv_heads, max_seq_len=self.seq_len)

    def compression_parts(self) -> Compression:
        return compression_of(self.compression, self.dim)

    def build(self, vocab_size: int) -> list[Stage]:
        """The initial stages, identical on every machine for the same recipe."""
        return build_stages(self.model_config(vocab_size), self.stages, self.compression_parts().bottleneck,
                            seed=self.seed, seq_len=self.seq_len)

    def stage_costs(self, vocab_size: int) -> list[float]:
        """Forward FLOPs per token of each stage: what stage assignment balances."""
        cfg = self.model_config(vocab_size)
        block, head = cfg.block_flops_per_token(self.seq_len), cfg.head_flops_per_token()
        return [(p.end_layer - p.first_layer) * block + (head if p.is_last else 0.0)
                for p in split(cfg, self.stages, self.seq_len)]

    def tokens_per_sample(self) -> int:
        return self.batch * self.seq_len

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Recipe:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown recipe fields {unknown}; known: {sorted(known)}")
        return cls(**values)

    def with_overrides(self, **values: Any) -> Recipe:
        return replace(self, **{k: v for k, v in values.items() if v is not None})
