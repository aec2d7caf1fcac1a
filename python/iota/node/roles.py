"""Running one role in this process: the orchestrator, a miner or a validator.

Each runs on one event loop until it is done, SIGTERM/SIGINT arrives, or
(with `parent_pid`) the process that started it is gone, so children of
`local` never outlive it."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import torch

from iota.chain import Chain, LocalChain, dev_keypair
from iota.miner.service import Miner, MinerConfig
from iota.model.recipe import Recipe
from iota.net import serve
from iota.orchestrator.config import OrchestratorConfig
from iota.orchestrator.service import Orchestrator
from iota.orchestrator.store import Store
from iota.validator import Validator, ValidatorConfig

log = logging.getLogger(__name__)


def setup_process(threads: int, log_level: str = "INFO") -> None:
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if threads > 0:
        torch.set_num_threads(threads)


def load_chain(path: str) -> LocalChain:
    return LocalChain.load(path)


async def orchestrator_hotkey(chain: Chain, given: str | None) -> str:
    if given:
        return given
    found = [n.hotkey for n in await chain.neurons() if n.role == "orchestrator"]
    if len(found) != 1:
        raise SystemExit(f"the chain lists {len(found)} orchestrators; pass --orchestrator-hotkey")
    return found[0]


async def run_until_stopped(main: Awaitable[Any], parent_pid: int | None) -> None:
    """Run `main` until it returns, a stop signal arrives, or the parent process dies."""
    task = asyncio.ensure_future(main)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)

    async def watch_parent() -> None:
        while os.getppid() == parent_pid:
            await asyncio.sleep(0.5)
        log.warning("parent process %d is gone; stopping", parent_pid)
        task.cancel()

    watcher = asyncio.ensure_future(watch_parent()) if parent_pid else None
    try:
        await task
    except asyncio.CancelledError:
        log.info("stopped")
    finally:
        if watcher:
            watcher.cancel()


async def orchestrator(directory: str, key: str, chain_path: str, recipe: Recipe | None,
                       config: OrchestratorConfig, host: str, port: int, parent_pid: int | None) -> None:
    Path(directory).mkdir(parents=True, exist_ok=True)
    store = Store(Path(directory) / "orchestrator.sqlite")
    service = Orchestrator(store, dev_keypair(key).ss58_address, load_chain(chain_path), recipe, config)

    async def main() -> None:
        async with serve(service.app(), host, port) as url:
            (Path(directory) / "orchestrator.url").write_text(url)
            log.info("orchestrator serving on %s (dashboard %s/)", url, url)
            await service.run()

    try:
        await run_until_stopped(main(), parent_pid)
    finally:
        store.close()


async def miner(orchestrator_url: str, key: str, chain_path: str, hotkey: str | None, config: MinerConfig,
                parent_pid: int | None) -> None:
    chain = load_chain(chain_path)
    node = Miner(dev_keypair(key), chain, orchestrator_url, await orchestrator_hotkey(chain, hotkey), config)
    await run_until_stopped(node.run(), parent_pid)


async def validator(orchestrator_url: str, key: str, chain_path: str, hotkey: str | None,
                    config: ValidatorConfig, parent_pid: int | None) -> None:
    chain = load_chain(chain_path)
    node = Validator(dev_keypair(key), orchestrator_url, await orchestrator_hotkey(chain, hotkey), chain, config)
    await run_until_stopped(node.run(), parent_pid)
