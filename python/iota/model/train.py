"""`train_local`: a plain single-process training loop (AdamW, warmup +
cosine schedule, gradient clipping), the baseline the swarm is compared to."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 50
    seed: int = 0


@dataclass
class TrainHistory:
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    val_loss: list[tuple[int, float]] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0

    @property
    def final_val_loss(self) -> float:
        return self.val_loss[-1][1]

    def to_dict(self) -> dict:
        return asdict(self)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on matrices only (not norms' gains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    was_training = model.training
    model.eval()
    losses = [float(model(x, y)) for x, y in batches]
    model.train(was_training)
    return sum(losses) / len(losses)


def train_local(
    model: nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    val_batches: list[tuple[torch.Tensor, torch.Tensor]],
    cfg: TrainConfig = TrainConfig(),
    progress: bool = True,
    on_eval: Callable[[int, float], None] | None = None,
) -> TrainHistory:
    """Train `model` (any module with forward(tokens, targets) -> loss) for
    cfg.steps batches; validation loss every cfg.eval_every steps and at the end."""
    torch.manual_seed(cfg.seed)
    optimizer = make_optimizer(model, cfg)
    history = TrainHistory()
    model.train()
    start = time.perf_counter()
    bar = _progress(progress, cfg.steps)
    with bar:
        task = bar.add_task("training", total=cfg.steps, loss=float("nan"), val=float("nan"))
        for step in range(cfg.steps):
            x, y = next(batches)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            loss = model(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            history.train_loss.append((step, loss.item()))
            history.tokens += y.numel()
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                val = evaluate(model, val_batches)
                history.val_loss.append((step + 1, val))
                if on_eval:
                    on_eval(step + 1, val)
                bar.update(task, val=val)
            bar.update(task, advance=1, loss=history.train_loss[-1][1])
    history.seconds = time.perf_counter() - start
    return history


def _progress(enabled: bool, total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}  val {task.fields[val]:.3f}"), TimeRemainingColumn(),
        disable=not enabled,
    )
