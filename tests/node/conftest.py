from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from iota.model.recipe import Recipe
from iota.node.local import LocalSwarm
from tests.node.swarm import TINY


@pytest.fixture
def swarm_factory(tmp_path: Path):
    swarms: list[LocalSwarm] = []

    def make(recipe: Recipe = TINY, **options: Any) -> LocalSwarm:
        swarm = LocalSwarm(tmp_path / f"run{len(swarms)}", recipe, threads=1, **options)
        swarms.append(swarm)
        swarm.start()
        return swarm

    yield make
    for swarm in swarms:
        swarm.stop()
        assert all(c.process.poll() is not None for c in swarm.children.values())
