"""Helpers of the local-swarm tests: a tiny recipe, polling until a state, loss checks."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from iota.model.recipe import Recipe
from iota.node.local import LocalSwarm

TINY = Recipe(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, stages=2, batch=4, seq_len=64, samples=120,
              merge_every=30, warmup_samples=10)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def run_until(swarm: LocalSwarm, done: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
    """Poll the orchestrator (replacing dead miners) until `done(state)`; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        swarm.supervise()
        try:
            state = swarm.state()
            if done(state):
                return state
        except OSError:
            pass
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {c.name}\n" + c.log.read_text()[-2000:] for c in swarm.children.values())
            raise AssertionError(f"swarm did not get there within {timeout}s\n{logs}")
        time.sleep(0.25)


def loss_fell(state: dict[str, Any], by: float) -> bool:
    losses = [loss for _, loss in state["losses"]]
    return mean(losses[-10:]) < mean(losses[:10]) - by
