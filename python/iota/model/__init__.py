"""The model: a Llama-style transformer, its split into pipeline stages with
bottlenecked, codec-compressed boundaries, and a single-process trainer."""

from iota.model.boundary import BoundaryLink, BoundaryStats
from iota.model.checkpoint import load_checkpoint, save_checkpoint
from iota.model.pipeline import Pipeline
from iota.model.stages import Bottleneck, Stage, StagePlan, build_stages, split
from iota.model.train import TrainConfig, TrainHistory, evaluate, train_local
from iota.model.transformer import ModelConfig, Transformer

__all__ = [
    "Bottleneck", "BoundaryLink", "BoundaryStats", "ModelConfig", "Pipeline", "Stage", "StagePlan", "TrainConfig",
    "TrainHistory", "Transformer", "build_stages", "evaluate", "load_checkpoint", "save_checkpoint", "split",
    "train_local",
]
