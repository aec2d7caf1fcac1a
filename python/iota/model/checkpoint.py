"""Checkpoints as safetensors weights plus a JSON config, readable without iota."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from iota.errors import IotaError

WEIGHTS, CONFIG = "model.safetensors", "config.json"


class CheckpointError(IotaError):
    pass


def save_checkpoint(directory: str | os.PathLike, model: nn.Module, config: dict) -> Path:
    """Write weights and config atomically (temp files then rename), so a
    crash mid-save never leaves a half-written checkpoint behind."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp_weights, tmp_config = path / (WEIGHTS + ".tmp"), path / (CONFIG + ".tmp")
    save_file(state, str(tmp_weights), metadata={"format": "pt"})
    tmp_config.write_text(json.dumps(config, indent=2, sort_keys=True))
    os.replace(tmp_weights, path / WEIGHTS)
    os.replace(tmp_config, path / CONFIG)
    return path


def load_checkpoint(directory: str | os.PathLike) -> tuple[dict, dict]:
    """(state_dict, config) of a checkpoint directory."""
    path = Path(directory)
    if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
        raise CheckpointError(f"{path} is not a checkpoint: it needs {WEIGHTS} and {CONFIG}")
    return load_file(str(path / WEIGHTS)), json.loads((path / CONFIG).read_text())
