"""A validator keeps heartbeating while it audits: a pass over a long backlog of work must not get it
dropped as silent (it was, and its audits came late while it registered again). Real orchestrator on
loopback, real validator; only the audit pass is made slow."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from iota.orchestrator.config import OrchestratorConfig
from iota.orchestrator.store import Store
from iota.validator import Validator, ValidatorConfig
from tests.orchestrator.test_service import HOTKEY, KEYS, Harness, make_chain, run

CONFIG = OrchestratorConfig(heartbeat=0.05, missed_heartbeats=4)  # silent after 0.2 s
SLOW_PASS = 1.0  # five silence timeouts


class SlowAuditor(Validator):
    """A validator whose every audit pass takes SLOW_PASS seconds, as one with a long backlog does."""

    passes = 0

    async def audit_new_work(self) -> None:
        self.passes += 1
        await asyncio.sleep(SLOW_PASS)


def test_a_long_audit_pass_does_not_get_the_validator_dropped(tmp_path: Path) -> None:
    store = Store(tmp_path / "orchestrator.sqlite")

    async def body(h: Harness) -> None:
        control = asyncio.create_task(h.orchestrator.run())  # drops silent nodes
        validator = SlowAuditor(KEYS["validator"], h.url, HOTKEY["orchestrator"], make_chain(),
                                ValidatorConfig(batches=1))
        running = asyncio.create_task(validator.run())
        try:
            deadline = time.monotonic() + 120  # data loading and the scratch models come first
            while validator.passes < 1:
                assert time.monotonic() < deadline and not running.done()
                await asyncio.sleep(0.05)
            alive = []
            while validator.passes < 3:  # two whole slow passes
                assert time.monotonic() < deadline and not running.done()
                node = store.node(HOTKEY["validator"])
                alive.append(node is not None and node.alive)
                await asyncio.sleep(0.05)
            assert len(alive) >= 20 and all(alive)
        finally:
            for task in (running, control):
                task.cancel()
            await asyncio.gather(running, control, return_exceptions=True)

    try:
        run(store, body, config=CONFIG)
    finally:
        store.close()
