"""Running one role in this process: the orchestrator, a miner or a validator.

Each runs on one event loop until it is done, SIGTERM/SIGINT arrives, or
(with `parent_pid`) the process that started it is gone, so children of
`local` never outlive it.

A role is given an `Identity`: its hotkey keypair, and how to open the
process's one Chain. `local_identity` is a dev key (//NAME) on a LocalChain
file; `bittensor_identity` is a wallet hotkey on a subnet's metagraph. The
role opens the chain inside its own coroutine (a BittensorChain binds to
the event loop that first connects it) and closes it when it stops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from iota.chain import BittensorChain, Chain, ChainError, LocalChain, dev_keypair, wallet_hotkey
from iota.chain.bittensor import DEFAULT_REFRESH_INTERVAL
from iota.miner.service import Miner, MinerConfig
from iota.model.recipe import Recipe
from iota.net import serve
from iota.orchestrator.config import OrchestratorConfig
from iota.orchestrator.service import Orchestrator
from iota.orchestrator.store import Store
from iota.process import freeze_startup_objects
from iota.validator import Validator, ValidatorConfig

if TYPE_CHECKING:
    from bittensor import Client, Subtensor
    from bittensor.sp_core import Keypair

log = logging.getLogger(__name__)


def setup_process(threads: int, log_level: str = "INFO") -> None:
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if threads > 0:
        torch.set_num_threads(threads)
    freeze_startup_objects()


@dataclass(frozen=True)
class Identity:
    """Who this node is: the keypair it signs with, and `open_chain`, which gives the process's Chain.

    `open_chain()` is an async context manager: enter it once, on the event
    loop the role runs on; it yields the chain ready to answer lookups and
    closes it on exit.
    """

    keypair: Keypair
    open_chain: Callable[[], contextlib.AbstractAsyncContextManager[Chain]]

    @property
    def hotkey(self) -> str:
        return self.keypair.ss58_address


def local_identity(key: str, chain_path: str) -> Identity:
    """Dev key //`key` on the LocalChain saved at `chain_path` (local swarms and tests)."""

    @contextlib.asynccontextmanager
    async def open_chain() -> AsyncIterator[Chain]:
        yield LocalChain.load(chain_path)

    return Identity(dev_keypair(key), open_chain)


def bittensor_identity(
    netuid: int,
    network: str | None,
    wallet_name: str,
    wallet_hotkey_name: str = "default",
    wallet_path: str | None = None,
    orchestrator_hotkeys: Iterable[str] = (),
    *,
    orchestrator: bool = False,
    refresh: float = DEFAULT_REFRESH_INTERVAL,
    subtensor: Subtensor | Client | None = None,
) -> Identity:
    """The hotkey of wallet `wallet_name` on subnet `netuid` of `network` ("finney" when None).

    The wallet is read now (SystemExit saying what is wrong if it cannot
    be); the BittensorChain is made when `open_chain()` is entered, synced
    (SystemExit if that fails), re-synced every `refresh` seconds, and
    closed on exit. The chain gives the orchestrator role to
    `orchestrator_hotkeys`, and to this node's own hotkey when
    `orchestrator` is true (so an orchestrator sees itself as the miners
    see it). `subtensor` replaces the SDK client `network` would give
    (tests inject one on a fake substrate).
    """
    try:
        keypair = wallet_hotkey(wallet_name, wallet_hotkey_name, wallet_path)
    except ChainError as exc:
        raise SystemExit(str(exc)) from None
    hotkeys = tuple(dict.fromkeys([*orchestrator_hotkeys, *([keypair.ss58_address] if orchestrator else [])]))

    @contextlib.asynccontextmanager
    async def open_chain() -> AsyncIterator[Chain]:
        try:
            chain = BittensorChain(netuid, network, subtensor=subtensor, orchestrator_hotkeys=hotkeys)
        except ChainError as exc:
            raise SystemExit(str(exc)) from None
        try:
            try:
                await chain.start_refresh(refresh)
            except ChainError as exc:
                raise SystemExit(str(exc)) from None
            yield chain
        finally:
            await chain.close()

    return Identity(keypair, open_chain)


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


async def orchestrator(directory: str, identity: Identity, recipe: Recipe | None, config: OrchestratorConfig,
                       host: str, port: int, parent_pid: int | None) -> None:
    Path(directory).mkdir(parents=True, exist_ok=True)
    async with identity.open_chain() as chain:
        store = Store(Path(directory) / "orchestrator.sqlite")
        try:
            service = Orchestrator(store, identity.keypair, chain, recipe, config)

            async def main() -> None:
                async with serve(service.app(), host, port) as url:
                    (Path(directory) / "orchestrator.url").write_text(url)
                    log.info("orchestrator serving on %s (dashboard %s/)", url, url)
                    await service.run()

            await run_until_stopped(main(), parent_pid)
        finally:
            store.close()


async def miner(orchestrator_url: str, identity: Identity, hotkey: str | None, config: MinerConfig,
                parent_pid: int | None) -> None:
    async with identity.open_chain() as chain:
        node = Miner(identity.keypair, chain, orchestrator_url, await orchestrator_hotkey(chain, hotkey), config)
        await run_until_stopped(node.run(), parent_pid)


async def validator(orchestrator_url: str, identity: Identity, hotkey: str | None, config: ValidatorConfig,
                    parent_pid: int | None) -> None:
    async with identity.open_chain() as chain:
        node = Validator(identity.keypair, orchestrator_url, await orchestrator_hotkey(chain, hotkey), chain, config)
        await run_until_stopped(node.run(), parent_pid)
