"""BittensorChain: the Chain answered by a subnet's metagraph, through the bittensor SDK 11.x.

One per process: make a single `BittensorChain` at startup and hand the same
object to every part of the node (the RequestGuard of its server, the
validator's evaluator, ...). It owns the process's only SDK client (one
websocket to the chain) and the metagraph cache every lookup reads. The SDK's
async client is bound to the event loop that first connects it, so the chain
must be used from that one loop.

Lookups never touch the network per request: `neuron`/`neurons` answer from
a hotkey -> Neuron cache that `sync()` fills from one metagraph read (the
first lookup syncs if nothing has yet). `start_refresh(interval)` re-syncs in
the background; a hotkey registered since the last sync is unknown (None, so
403 at a guard) until the next one. Roles: a hotkey named in
`orchestrator_hotkeys` is "orchestrator", one holding a validator permit is
"validator", every other registered hotkey is "miner". Stake is the
neuron's total stake in the subnet's own unit (alpha); the address is
"http://ip:port" of its served axon, None when it serves none.

`publish_weights` re-reads the metagraph (uids change on deregistration),
maps hotkeys to uids and submits the SDK's `SetWeights` intent, which picks
the plain or commit-reveal extrinsic the subnet runs. When the chain's
weights rate limit has not passed it raises `WeightsRateLimited` (a
ChainError saying when to retry), or with `wait=True` sleeps until then and
submits again. On a commit-reveal subnet the published weights show up in
`weights()` only once the chain reveals them.

Mechanism 0 only (the one mechanism of ordinary subnets).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bittensor import Subtensor
from bittensor import storage as sdk_storage
from bittensor.client import Client
from bittensor.error_map import ErrorCode
from bittensor.intents.weights import SetWeights
from bittensor.keyfiles import resolve_key_password
from bittensor.metagraph import Metagraph
from bittensor.result import BittensorError
from bittensor.result import ChainError as SdkChainError
from bittensor.signing import public_view
from bittensor.sp_core import Keypair, KeyfileError, WrongPasswordError, ss58_decode
from bittensor.wallet import DEFAULT_WALLET_PATH, Wallet

from iota.chain.base import Chain, ChainError, Neuron, Role, weights_total

if TYPE_CHECKING:
    from bittensor.signing import Signer

log = logging.getLogger(__name__)

_ST = sdk_storage.SubtensorModule
DEFAULT_REFRESH_INTERVAL = 60.0


class WeightsRateLimited(ChainError):
    """The chain refuses new weights from this validator until `retry_block`.

    `blocks` and `seconds` say how long that is from when the error was raised.
    """

    def __init__(self, message: str, *, blocks: int, seconds: float, retry_block: int) -> None:
        super().__init__(message)
        self.blocks = blocks
        self.seconds = seconds
        self.retry_block = retry_block


@dataclass(frozen=True)
class _View:
    """One metagraph read: every registered neuron, by hotkey and by uid."""

    block: int | None = None
    neurons: dict[str, Neuron] = field(default_factory=dict)  # in uid order
    uids: dict[str, int] = field(default_factory=dict)
    hotkeys: tuple[str, ...] = ()  # hotkeys[uid]


def _check_hotkey(hotkey: str, what: str) -> None:
    try:
        ss58_decode(hotkey)
    except (ValueError, TypeError) as exc:
        raise ChainError(f"{what} {hotkey!r} is not an ss58 hotkey address ({exc})") from None


def _address(axon: str | None) -> str | None:
    # The SDK renders a served axon as "ip:port" ("[v6]:port"); an unserved one as None.
    if not axon or axon.endswith(":0"):
        return None
    return f"http://{axon}"


def _blocks(n: int) -> str:
    return f"{n} block" if n == 1 else f"{n} blocks"


def _sdk_message(exc: BaseException) -> str:
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    name = getattr(exc, "name", None)
    return f"{message} ({name})" if name and name not in message else message


class BittensorChain(Chain):
    """The registry of subnet `netuid` on a Bittensor network, cached from its metagraph.

    Give either `network` ("finney", "test", "local" or a ws:// / wss:// URL;
    "finney" when neither is given) or an SDK client to use instead:
    `subtensor` may be a `bittensor.Subtensor` (not yet used in blocking
    mode) or a `bittensor.Client`, e.g. one built on an injected fake
    substrate for tests. `version_key` is sent with weights (leave 0 unless
    the subnet owner requires one); `retries` resubmits on transient pool
    rejections; `wait_for_finalization` makes publish_weights return only
    once the weights are finalized, not just included.
    """

    def __init__(
        self,
        netuid: int,
        network: str | None = None,
        *,
        subtensor: Subtensor | Client | None = None,
        orchestrator_hotkeys: Iterable[str] = (),
        version_key: int = 0,
        retries: int = 2,
        wait_for_finalization: bool = False,
    ) -> None:
        if isinstance(netuid, bool) or not isinstance(netuid, int) or netuid < 0:
            raise ChainError(f"netuid must be an integer >= 0, got {netuid!r}")
        if subtensor is None:
            try:
                subtensor = Subtensor(network or "finney")
            except ValueError as exc:
                raise ChainError(str(exc)) from None
        elif network is not None and network != subtensor.network:
            raise ChainError(
                f"network {network!r} does not match the given client's network {subtensor.network!r}; "
                "pass one or the other"
            )
        self.netuid = netuid
        self.network: str = subtensor.network
        self.orchestrator_hotkeys = frozenset(orchestrator_hotkeys)
        for hotkey in sorted(self.orchestrator_hotkeys):
            _check_hotkey(hotkey, "orchestrator hotkey")
        self.version_key = version_key
        self.retries = retries
        self.wait_for_finalization = wait_for_finalization
        self._sdk = subtensor
        self._client: Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._view = _View()
        self._connect_lock = asyncio.Lock()
        self._sync_lock = asyncio.Lock()
        self._refresher: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return (
            f"BittensorChain(netuid={self.netuid}, network={self.network!r}, "
            f"neurons={len(self._view.neurons)}, block={self._view.block})"
        )

    # -- connection ------------------------------------------------------------------

    async def _connected(self) -> Client:
        if self._closed:
            raise ChainError(f"this BittensorChain ({self.network}) is closed; make a new one")
        loop = asyncio.get_running_loop()
        if self._loop is not None and self._loop is not loop:
            raise ChainError(
                "BittensorChain is bound to the event loop it first connected on; "
                "make one per process and use it from that loop only"
            )
        if self._client is None:
            async with self._connect_lock:
                if self._client is None:
                    try:
                        if isinstance(self._sdk, Client):
                            client = await self._sdk.connect()
                        else:
                            client = await self._sdk  # Subtensor: connects the async client on this loop
                    except (BittensorError, OSError) as exc:
                        raise ChainError(f"cannot connect to {self.network}: {_sdk_message(exc)}") from None
                    self._client, self._loop = client, loop
        return self._client

    async def close(self) -> None:
        """Stop the refresh and close the SDK connection (the given client's too).

        Final for network work (sync, publish, weights); cached lookups keep answering.
        """
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        client, self._client, self._closed = self._client, None, True
        if client is None:
            return
        if isinstance(self._sdk, Subtensor):
            await self._sdk.__aexit__(None, None, None)  # closes its client and marks it closed
        else:
            await client.close()

    async def __aenter__(self) -> BittensorChain:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    # -- the metagraph cache -----------------------------------------------------------

    @property
    def synced_block(self) -> int | None:
        """The block of the metagraph the cache holds (None before the first sync)."""
        return self._view.block

    async def sync(self) -> list[Neuron]:
        """Read the subnet's metagraph and replace the cache with it; returns every neuron."""
        client = await self._connected()
        self._install(await self._metagraph(client))
        return list(self._view.neurons.values())

    async def start_refresh(self, interval: float = DEFAULT_REFRESH_INTERVAL) -> None:
        """Sync now (raising if that fails), then again every `interval` seconds until close().

        A failed background sync is logged and the previous view kept.
        """
        if not (math.isfinite(interval) and interval > 0):
            raise ChainError(f"refresh interval must be a positive number of seconds, got {interval!r}")
        if self._refresher is not None and not self._refresher.done():
            raise ChainError("this chain is already refreshing; close() it first")
        await self.sync()
        self._refresher = asyncio.get_running_loop().create_task(
            self._refresh_forever(interval), name=f"iota-metagraph-refresh-{self.netuid}"
        )

    async def _refresh_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            kept = (self.netuid, self._view.block)
            try:
                await self.sync()
            except ChainError as exc:
                log.warning("metagraph refresh of netuid %d failed, keeping block %s: %s", *kept, exc)
            except Exception:  # a refresh must never die: the guard reads this cache on every request
                log.exception("metagraph refresh of netuid %d failed, keeping block %s", *kept)

    async def _metagraph(self, view: Any) -> Metagraph:
        """The metagraph at `view` (a client: the head; a snapshot: its block)."""
        try:
            graph = await view.subnets.metagraph(self.netuid, commitments=False)
        except (BittensorError, OSError) as exc:
            raise ChainError(
                f"cannot read the metagraph of netuid {self.netuid} on {self.network}: {_sdk_message(exc)}"
            ) from None
        if graph is None:
            raise ChainError(
                f"netuid {self.netuid} does not exist on {self.network}; check the netuid and network"
            )
        return graph

    def _role(self, hotkey: str, validator_permit: bool) -> Role:
        if hotkey in self.orchestrator_hotkeys:
            return "orchestrator"
        return "validator" if validator_permit else "miner"

    def _install(self, graph: Metagraph) -> None:
        neurons: dict[str, Neuron] = {}
        uids: dict[str, int] = {}
        for n in graph.neurons:
            stake = n.total_stake.amount
            neurons[n.hotkey] = Neuron(
                hotkey=n.hotkey,
                role=self._role(n.hotkey, n.validator_permit),
                address=_address(n.axon),
                stake=stake if math.isfinite(stake) and stake >= 0 else 0.0,
            )
            uids[n.hotkey] = n.uid
        if self._view.block is None:
            missing = sorted(self.orchestrator_hotkeys - set(neurons))
            if missing:
                log.warning("orchestrator hotkeys %s are not registered on netuid %d", missing, self.netuid)
        self._view = _View(graph.block, neurons, uids, tuple(graph.hotkeys))

    async def _ensure_synced(self) -> _View:
        if self._view.block is None:
            async with self._sync_lock:
                if self._view.block is None:
                    await self.sync()
        return self._view

    # -- Chain -----------------------------------------------------------------------

    async def neuron(self, hotkey: str) -> Neuron | None:
        return (await self._ensure_synced()).neurons.get(hotkey)

    async def neurons(self) -> list[Neuron]:
        return list((await self._ensure_synced()).neurons.values())

    async def uid(self, hotkey: str) -> int | None:
        """The hotkey's uid on the subnet as of the last sync, None if it is not registered."""
        return (await self._ensure_synced()).uids.get(hotkey)

    async def publish_weights(
        self,
        validator: Signer,
        weights: Mapping[str, float],
        *,
        wait: bool = False,
        max_wait: float | None = None,
    ) -> None:
        """Set `validator`'s weights on the subnet (normalized to sum 1, sent as uids).

        If the chain's weights rate limit has not passed since the validator's
        last update this raises `WeightsRateLimited` (saying when to retry),
        unless `wait` is true: then it sleeps until the limit passes (at most
        `max_wait` seconds, else it raises) and submits again.
        """
        total = weights_total(weights)
        hotkey = public_view(validator, "hotkey").ss58_address
        loop = asyncio.get_running_loop()
        deadline = None if max_wait is None else loop.time() + max_wait
        while True:
            client = await self._connected()
            # Fresh uids: a deregistered hotkey's uid may already belong to someone else.
            self._install(await self._metagraph(client))
            view = self._view
            uid = view.uids.get(hotkey)
            if uid is None:
                raise ChainError(
                    f"{hotkey} cannot publish weights: it is not registered on netuid {self.netuid} "
                    f"({self.network}); register it first"
                )
            unknown = sorted(set(weights) - set(view.uids))
            if unknown:
                raise ChainError(
                    f"weights name hotkeys not registered on netuid {self.netuid}: {unknown}; "
                    "drop them or register them first"
                )
            by_uid = {view.uids[k]: w / total for k, w in weights.items()}
            if await self._submit(client, validator, by_uid):
                return
            limited = await self._rate_limit(client, hotkey, uid)
            if not wait or (deadline is not None and loop.time() + limited.seconds > deadline):
                raise limited
            log.info("weights rate limited on netuid %d; waiting %.1f s", self.netuid, limited.seconds)
            await asyncio.sleep(limited.seconds)

    async def _submit(self, client: Client, validator: Signer, by_uid: dict[int, float]) -> bool:
        """Submit SetWeights; True once on chain, False if rate limited, ChainError otherwise."""
        intent = SetWeights(netuid=self.netuid, weights=by_uid, version_key=self.version_key)
        try:
            result = await client.execute(
                intent,
                validator,
                wait_for_inclusion=True,
                wait_for_finalization=self.wait_for_finalization,
                retries=self.retries,
            )
        except SdkChainError as exc:  # raised by the SDK's preflight, before signing
            if exc.code is ErrorCode.RATE_LIMITED:
                return False
            raise ChainError(
                f"setting weights on netuid {self.netuid} ({self.network}) refused: {_sdk_message(exc)}"
            ) from None
        except (BittensorError, OSError) as exc:
            raise ChainError(
                f"setting weights on netuid {self.netuid} ({self.network}) failed: {_sdk_message(exc)}"
            ) from None
        if result.success:
            return True
        if result.error is not None and result.error.code is ErrorCode.RATE_LIMITED:
            return False
        raise ChainError(
            f"the set-weights extrinsic on netuid {self.netuid} ({self.network}) failed: "
            f"{_sdk_message(result.error) if result.error is not None else result.message}"
        )

    async def _rate_limit(self, client: Client, hotkey: str, uid: int) -> WeightsRateLimited:
        """How long until `uid` may set weights again, read at one block."""
        try:
            snapshot = await client.at()
            rate_raw, last_raw = await asyncio.gather(
                snapshot.query(_ST.WeightsSetRateLimit, [self.netuid]),
                snapshot.query(_ST.LastUpdate, [self.netuid]),  # mechanism 0: indexed by netuid
            )
            block_time = await client.block_time()
        except (BittensorError, OSError) as exc:
            raise ChainError(
                f"weights on netuid {self.netuid} are rate limited, and reading the limit failed: "
                f"{_sdk_message(exc)}"
            ) from None
        rate = int(rate_raw or 0)
        last = int(last_raw[uid]) if isinstance(last_raw, (list, tuple)) and uid < len(last_raw) else 0
        since = snapshot.block - last
        where = f"on netuid {self.netuid}"
        if last > 0 and since < rate:
            why = f"{hotkey} set weights {where} {_blocks(since)} ago and the rate limit is {_blocks(rate)}"
        else:  # the chain saw an update our read (of a lagging node) does not show yet
            why = f"the chain refused {hotkey}'s weights {where} as too frequent (rate limit {_blocks(rate)})"
        # At least one block: the chain said "too soon" even if our read lags it.
        blocks = max(1, rate - since)
        seconds = blocks * block_time
        retry_block = snapshot.block + blocks
        return WeightsRateLimited(
            f"{why}: retry in {_blocks(blocks)} (~{seconds:.0f} s, at block {retry_block}), "
            "or pass wait=True",
            blocks=blocks,
            seconds=seconds,
            retry_block=retry_block,
        )

    async def weights(self, validator_hotkey: str) -> dict[str, float]:
        """The validator's weights row as the chain holds it now, keyed by hotkey, summing to 1."""
        client = await self._connected()
        try:
            snapshot = await client.at()
        except (BittensorError, OSError) as exc:
            raise ChainError(f"cannot read the chain head of {self.network}: {_sdk_message(exc)}") from None
        graph = await self._metagraph(snapshot)
        self._install(graph)
        validator = graph.by_hotkey(validator_hotkey)
        if validator is None:
            return {}
        try:
            row = await snapshot.query(_ST.Weights, [self.netuid, validator.uid])
        except (BittensorError, OSError) as exc:
            raise ChainError(
                f"cannot read the weights of {validator_hotkey} on netuid {self.netuid}: {_sdk_message(exc)}"
            ) from None
        pairs = [(int(dest), int(value)) for dest, value in row or [] if int(value) > 0]
        total = sum(value for _, value in pairs)
        hotkeys = graph.hotkeys
        return {hotkeys[dest]: value / total for dest, value in pairs if dest < len(hotkeys)} if total else {}


def wallet_hotkey(
    name: str,
    hotkey: str = "default",
    path: str | os.PathLike[str] | None = None,
    *,
    password: str | None = None,
) -> Keypair:
    """The hotkey keypair of wallet `name` (as btcli keeps it: <path>/<name>/hotkeys/<hotkey>).

    `path` defaults to $BT_WALLET_PATH, else ~/.bittensor/wallets. An
    encrypted hotkey needs `password` or the keyfile's BT_PW_... environment
    variable; this never prompts.
    """
    if path is None:
        path = os.environ.get("BT_WALLET_PATH") or DEFAULT_WALLET_PATH
    root = Path(path).expanduser()
    try:
        wallet = Wallet(name=name, hotkey=hotkey, path=str(root))
    except ValueError as exc:
        raise ChainError(f"bad wallet name: {exc}") from None
    keyfile = wallet.hotkey_file
    if not keyfile.exists_on_device():
        if not (root / wallet.name).is_dir():
            raise ChainError(
                f"no wallet {wallet.name!r} in {root}; create it with `btcli wallet create -w {wallet.name}` "
                "or pass the wallets directory as path"
            )
        raise ChainError(
            f"wallet {wallet.name!r} has no hotkey {wallet.hotkey_str!r} (no file {keyfile.path}); "
            f"create it with `btcli wallet new-hotkey -w {wallet.name} -H {wallet.hotkey_str}`"
        )
    try:
        if keyfile.is_encrypted():
            secret = resolve_key_password(password, env_var_name=keyfile.env_var_name(), allow_prompt=False)
            if secret is None:
                raise ChainError(
                    f"hotkey {keyfile.path} is encrypted; pass password= or set {keyfile.env_var_name()}"
                )
            return wallet.get_hotkey(password=secret)
        return wallet.get_hotkey()
    except WrongPasswordError:
        raise ChainError(f"wrong password for hotkey {keyfile.path}") from None
    except (KeyfileError, OSError, ValueError) as exc:
        raise ChainError(f"cannot read hotkey {keyfile.path}: {exc}") from None
