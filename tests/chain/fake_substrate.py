"""An in-memory subtensor for tests: `FakeSubstrate` speaks the bittensor SDK's `Substrate` protocol.

It implements the SDK's chain-access contract (`bittensor.Substrate`,
injected with `bittensor.Subtensor(substrate=...)`), so everything above it
is the SDK's own code: the metagraph read and decode, the SetWeights intent
(preflight, rate limit, clip/normalize/u16 quantize, plain or timelocked
commit), the executor and signer resolution, and the storage reads of
weights() and of the rate limit. The fake answers storage items and the
get_metagraph runtime API from plain Python state, and "executes"
set-weights extrinsics the way the pallet does (registration, validator
permit, rate limit, max-upscaled u16 rows), after checking the extrinsic was
really signed by the submitting key. Chain failures come back as the SDK
decodes a DispatchError (`chain_error_from_dispatch`).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from bittensor._generated.errors import ERRORS
from bittensor.balance import Balance
from bittensor.result import ExtrinsicResult, chain_error_from_dispatch
from bittensor.sp_core import verify

from iota.chain import dev_keypair

U16_MAX = 65535
COLD = dev_keypair("iota-bt-cold")

_ERROR_INDEX = {(info.pallet, info.name): key for key, info in ERRORS.items()}


def _dispatch_error(name: str) -> Any:
    """A DispatchError::Module for a SubtensorModule error, as a node reports it."""
    pallet, index = _ERROR_INDEX[("SubtensorModule", name)]
    return {"Module": {"index": pallet, "error": f"0x{index:02x}000000"}}


@dataclass
class FakeNeuron:
    hotkey: str
    permit: bool = False
    stake_rao: int = 0
    axon: tuple[str, int] | None = None  # (ip, port); ip with ':' is IPv6
    coldkey: str = COLD.ss58_address


@dataclass
class Composed:
    """What `Substrate.compose` returns: a chain-ready call (with SCALE-ish bytes in `data`)."""

    module: str
    function: str
    params: dict[str, Any]
    data: bytes = b""


@dataclass
class FakeSubstrate:
    """An in-memory subtensor speaking the SDK's `Substrate` protocol (bittensor/_substrate.py)."""

    netuid: int
    neurons: list[FakeNeuron]
    block: int = 5_000
    seconds_per_block: float = 12.0
    ticking: bool = False  # blocks advance with wall-clock time (else only on inclusion)
    rate_limit: int = 100
    commit_reveal: bool = False
    max_weights_limit: int = U16_MAX
    min_allowed_weights: int = 0
    stale_last_update: bool = False  # reads lag the chain: LastUpdate reads back as all zeros
    token_symbols: dict[int, str] = field(default_factory=dict)
    weights: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    last_update: list[int] = field(default_factory=list)
    # (signer, function, params) of every extrinsic submitted
    submitted: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    reads: list[tuple[str, str]] = field(default_factory=list)
    connected: bool = False

    def __post_init__(self) -> None:
        self.last_update = [0] * len(self.neurons)
        self._t0 = time.monotonic()

    # -- helpers the tests use --------------------------------------------------------

    def register(self, neuron: FakeNeuron) -> int:
        self.neurons.append(neuron)
        self.last_update.append(0)
        return len(self.neurons) - 1

    def replace(self, uid: int, neuron: FakeNeuron) -> None:
        """Deregister the neuron at `uid` and register `neuron` in its slot."""
        self.neurons[uid] = neuron
        self.last_update[uid] = 0
        self.weights.pop(uid, None)

    def uid_of(self, hotkey: str) -> int | None:
        return next((uid for uid, n in enumerate(self.neurons) if n.hotkey == hotkey), None)

    def count(self, module: str, name: str) -> int:
        return self.reads.count((module, name))

    def head(self) -> int:
        if self.ticking:
            return self.block + int((time.monotonic() - self._t0) / self.seconds_per_block)
        return self.block

    # -- Substrate: lifecycle and display ---------------------------------------------

    def balance(self, rao: int, netuid: int = 0) -> Balance:
        return Balance(int(rao), netuid, self.token_symbols.get(netuid) if netuid else None)

    async def connect(self) -> None:
        self.connected = True

    async def close(self) -> None:
        self.connected = False

    # -- Substrate: reads -------------------------------------------------------------

    async def block_number(self) -> int:
        return self.head()

    async def finalized_block_number(self) -> int:
        return self.head()

    async def block_hash(self, block: int | None = None) -> str:
        return f"0x{(self.head() if block is None else block):064x}"

    async def block_time(self) -> float:
        return self.seconds_per_block

    async def spec_version(self) -> int:
        return 400

    async def query(
        self, module: str, storage_function: str, params: list | None = None, block_hash: str | None = None
    ) -> Any:
        self.reads.append((module, storage_function))
        params = list(params or [])
        if module == "SubtensorModule" and storage_function not in ("Uids", "Weights"):
            assert params[:1] == [self.netuid], f"{storage_function} read for netuid {params[:1]}"
        if (module, storage_function) == ("SubtensorModule", "Uids"):
            return self.uid_of(params[1]) if params[0] == self.netuid else None
        if (module, storage_function) == ("SubtensorModule", "Weights"):
            assert params[0] == self.netuid  # mechanism 0: the storage index is the netuid
            return list(self.weights.get(params[1], []))
        values = {
            "CommitRevealWeightsEnabled": self.commit_reveal,
            "WeightsSetRateLimit": self.rate_limit,
            "LastUpdate": [0] * len(self.neurons) if self.stale_last_update else list(self.last_update),
            "MinAllowedWeights": self.min_allowed_weights,
            "MaxWeightsLimit": self.max_weights_limit,
            "SubnetEpochConsensus": "Yuma",
            "ValidatorPermit": [n.permit for n in self.neurons],
            # Read by the timelocked commit (commit-reveal subnets).
            "Tempo": 360,
            "RevealPeriodEpochs": 1,
            "LastEpochBlock": self.head() - 10,
            "PendingEpochAt": 0,
            "SubnetEpochIndex": 12,
            "BlocksSinceLastStep": 10,
        }
        if module == "SubtensorModule" and storage_function in values:
            return values[storage_function]
        raise AssertionError(f"unexpected storage read {module}.{storage_function}{params}")

    async def query_map(
        self, module: str, storage_function: str, params: list | None = None, block_hash: str | None = None
    ) -> list[tuple[Any, Any]]:
        self.reads.append((module, storage_function))
        if (module, storage_function) == ("SubtensorModule", "TokenSymbol"):
            return [(self.netuid, list("ι".encode()))]
        raise AssertionError(f"unexpected storage map read {module}.{storage_function}{params}")

    async def runtime_call(self, api: str, method: str, params: list, block_hash: str | None = None) -> Any:
        self.reads.append((api, method))
        assert (api, method) == ("SubnetInfoRuntimeApi", "get_metagraph"), f"unexpected call {api}.{method}"
        if params != [self.netuid]:
            return None  # no such subnet
        n = len(self.neurons)
        block = int(block_hash, 16) if block_hash else self.head()

        def axon(entry: FakeNeuron) -> dict[str, int]:
            if entry.axon is None:
                return {"block": 0, "version": 0, "ip": 0, "port": 0, "ip_type": 0, "protocol": 0}
            ip, port = entry.axon
            if ":" in ip:
                address, ip_type = int.from_bytes(socket.inet_pton(socket.AF_INET6, ip), "big"), 6
            else:
                address, ip_type = int.from_bytes(socket.inet_aton(ip), "big"), 4
            return {"block": 1, "version": 1, "ip": address, "port": port, "ip_type": ip_type, "protocol": 4}

        return {
            "netuid": self.netuid,
            "name": list(b"iota"),
            "symbol": list("ι".encode()),
            "block": block,
            "tempo": 360,
            "last_step": block - 10,
            "blocks_since_last_step": 10,
            "owner_hotkey": self.neurons[0].hotkey,
            "owner_coldkey": self.neurons[0].coldkey,
            "network_registered_at": 1,
            "num_uids": n,
            "max_uids": 256,
            "hotkeys": [x.hotkey for x in self.neurons],
            "coldkeys": [x.coldkey for x in self.neurons],
            "identities": [None] * n,
            "axons": [axon(x) for x in self.neurons],
            "active": [True] * n,
            "validator_permit": [x.permit for x in self.neurons],
            "last_update": list(self.last_update),
            "block_at_registration": [1] * n,
            "rank": [0] * n,
            "trust": [0] * n,
            "consensus": [0] * n,
            "incentives": [0] * n,
            "dividends": [0] * n,
            "pruning_score": [0] * n,
            "emission": [0] * n,
            "alpha_stake": [x.stake_rao for x in self.neurons],
            "tao_stake": [0] * n,
            "total_stake": [x.stake_rao for x in self.neurons],
        }

    # -- Substrate: calls and writes --------------------------------------------------

    async def compose(self, call: Any) -> Composed:
        module, function, params = call
        data = json.dumps([module, function, params], sort_keys=True, default=lambda b: bytes(b).hex())
        return Composed(module, function, dict(params), data.encode())

    async def estimate_fee(self, call: Any, keypair: Any) -> Balance:
        return Balance.from_rao(100_000)

    async def submit(
        self,
        call: Composed,
        keypair: Any,
        *,
        nonce: int | None = None,
        period: int | None = 128,
        wait_for_inclusion: bool = True,
        wait_for_finalization: bool = True,
    ) -> ExtrinsicResult:
        signature = await _maybe_await(keypair.sign(call.data))
        assert verify(call.data, bytes(signature), keypair.ss58_address), "not signed by its sender"
        signer = keypair.ss58_address
        self.submitted.append((signer, call.function, call.params))
        block = self.head() + 1  # the block that includes it
        error = self._dispatch(signer, call, block)
        self.block += 1  # the head is now the including block
        block_hash = f"0x{block:064x}"
        if error is not None:
            failure = chain_error_from_dispatch(_dispatch_error(error))
            return ExtrinsicResult(success=False, message=failure.message, block_hash=block_hash,
                                   extrinsic_id=f"{block}-0001", error=failure)
        return ExtrinsicResult(success=True, message="Success", block_hash=block_hash,
                               extrinsic_id=f"{block}-0001", fee=Balance.from_rao(100_000))

    def _dispatch(self, signer: str, call: Composed, block: int) -> str | None:
        """The pallet's checks and effects for the weight extrinsics; the error name on failure."""
        assert call.module == "SubtensorModule", call
        params = call.params
        if params["netuid"] != self.netuid:
            return "MechanismDoesNotExist"
        uid = self.uid_of(signer)
        if uid is None:
            return "HotKeyNotRegisteredInSubNet"
        last = self.last_update[uid]
        too_fast = self.rate_limit and last > 0 and block - last < self.rate_limit
        if call.function == "commit_timelocked_mechanism_weights":
            if too_fast:
                return "CommittingWeightsTooFast"
            self.last_update[uid] = block
            return None
        assert call.function == "set_mechanism_weights", call
        dests, values = list(params["dests"]), list(params["weights"])
        if dests != [uid] and not self.neurons[uid].permit:
            return "NeuronNoValidatorPermit"
        if too_fast:
            return "SettingWeightsTooFast"
        if len(dests) != len(values):
            return "WeightVecNotEqualSize"
        if len(set(dests)) != len(dests):
            return "DuplicateUids"
        if any(d >= len(self.neurons) for d in dests):
            return "UidVecContainInvalidOne"
        top = max(values)
        self.weights[uid] = [(d, round(v * U16_MAX / top)) for d, v in zip(dests, values)]
        self.last_update[uid] = block
        return None


async def _maybe_await(value: Any) -> Any:
    return await value if asyncio.iscoroutine(value) else value

