"""`AllReducePeer`: a hotkey that serves its holder role and runs rounds.

    async with AllReducePeer(keypair, chain).serving("0.0.0.0", 8123) as peer:
        result = await peer.allreduce(group, flat_fp32, weight=tokens_seen, codec=Codec.from_string("int8/b64"))
        result.mean, result.report.contributors
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import aiohttp
import torch
from bittensor.signing import resolve_signer

from iota.allreduce.butterfly import ButterflyRound
from iota.allreduce.config import AllReduceConfig
from iota.allreduce.errors import GroupError, MeanLostError
from iota.allreduce.faults import Faults
from iota.allreduce.group import Group, RoundPlan
from iota.allreduce.holder import HolderRound, Traffic
from iota.allreduce.result import AllReduceResult
from iota.allreduce.server import HolderStreams, Rounds, holder_app
from iota.chain import Chain
from iota.codec import Codec
from iota.net import GuardConfig, SignedClient, StreamClient, serve

if TYPE_CHECKING:
    from bittensor.signing import WalletLike

log = logging.getLogger(__name__)


class AllReducePeer:
    """Serves the holder routes for `wallet`'s hotkey and runs rounds as that hotkey.

    `faults` makes this peer misbehave on purpose (chaos tests only).
    """

    def __init__(
        self,
        wallet: WalletLike,
        chain: Chain,
        config: AllReduceConfig | None = None,
        *,
        guard: GuardConfig | None = None,
        faults: Faults | None = None,
    ) -> None:
        self.signer = resolve_signer(wallet, role="hotkey")
        self.hotkey: str = self.signer.ss58_address
        self.chain = chain
        self.config = config or AllReduceConfig()
        self.guard = guard or GuardConfig()
        self.faults = faults or Faults()
        self.address: str | None = None
        self._client: SignedClient | None = None
        self._streams: StreamClient | None = None
        self._rounds: Rounds | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        # Two integers per round for the peer's lifetime; they keep growing
        # after a round returns, while others fetch the mean from here.
        self._traffic: dict[str, Traffic] = {}

    @asynccontextmanager
    async def serving(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[AllReducePeer]:
        """Serve on host:port (0: any free port; see `address`) until the block exits."""
        self._rounds = Rounds(self.config)
        app = holder_app(self.signer, self.chain, self._rounds, self.guard)
        streams = HolderStreams(self._rounds)
        async with (
            serve(app, host, port, shutdown_timeout=self.config.floor, streams=streams) as url,
            aiohttp.ClientSession() as session,
        ):
            self.address = url
            self._client = SignedClient(self.signer, session, chunk_size=self.guard.chunk_size)
            self._streams = StreamClient(self.signer)
            try:
                yield self
            finally:
                for task in self._retiring:
                    task.cancel()
                await asyncio.gather(*self._retiring, return_exceptions=True)
                self._streams.close()
                self._client = self._streams = None
                self.address = None

    async def allreduce(
        self, group: Group, vector: torch.Tensor, weight: float, codec: Codec, *, out: torch.Tensor | None = None
    ) -> AllReduceResult:
        """The weighted mean of the members' `vector`s, identical on every peer that completes.

        `vector` is this peer's flat float32 CPU tensor (same length on every
        peer), `weight` its positive weight in the mean. Raises AllReduceError,
        with a report, if the round cannot complete consistently; GroupError if
        the vector holds NaN or infinity (unless the codec allows them). The
        codec finds those as it encodes the parts, with no pass of its own
        over the vector: the parts already sent then count for nothing, and
        the others complete without this peer.

        `out`, a float32 CPU tensor of the vector's length and not the vector
        itself, receives the mean (result.mean is then `out`); reusing one
        across rounds saves faulting in fresh memory each time. It is left
        partly written if the round fails.

        A round no peer can complete because an owner died after the decision
        (`MeanLostError`) runs once more among the same members, as
        `group.again()`; its report's `again_after` says why.
        """
        started = time.monotonic()
        if self._client is None or self._streams is None or self._rounds is None:
            raise GroupError("AllReducePeer.allreduce runs inside `async with peer.serving(...)`")
        if self.hotkey not in group.hotkeys:
            raise GroupError(f"{self.hotkey} is not a member of round {group.round_id}")
        if not (isinstance(vector, torch.Tensor) and vector.dtype == torch.float32 and vector.dim() == 1):
            raise GroupError("the vector must be a 1-D float32 torch tensor (flatten the parameters first)")
        if vector.device.type != "cpu":
            raise GroupError(f"the vector must be on the CPU, not {vector.device}")
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
            raise GroupError(f"weight must be a positive finite number, got {weight!r}")
        if out is not None and not (
            isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.device.type == "cpu"
            and out.is_contiguous() and out.shape == vector.shape and out.data_ptr() != vector.data_ptr()
        ):
            raise GroupError("out must be a contiguous float32 CPU tensor shaped like the vector, and not the vector")
        vector = vector.contiguous()
        try:
            return await self._round(group, vector, weight, codec, out, started)
        except MeanLostError as lost:
            # Nobody completed that round, or it would have handed the lost part on: every
            # survivor gets here and runs the round again, where the dead owner is excluded.
            again = group.again()
            log.warning("%s; running the round again as %s", lost, again.round_id)
            result = await self._round(again, vector, weight, codec, out, started)
            result.report.again_after = str(lost)
            return result

    async def _round(
        self, group: Group, vector: torch.Tensor, weight: float, codec: Codec, out: torch.Tensor | None,
        started: float,
    ) -> AllReduceResult:
        """One try of the round `group`."""
        assert self._client is not None and self._streams is not None and self._rounds is not None
        plan = RoundPlan(group, vector.numel(), codec, self.config.part_bytes)
        holder = HolderRound(plan, self.signer, self.config, self.faults)
        try:
            self._rounds.open(holder)
        except GroupError:
            holder.stop()
            raise
        self._traffic[group.round_id] = holder.traffic
        runner = ButterflyRound(
            plan, holder, self._client, self._streams, self.config, self.faults, vector, float(weight), out
        )
        try:
            return await runner.run(started)
        finally:
            task = asyncio.get_running_loop().create_task(self._retire(holder, runner))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def _retire(self, holder: HolderRound, runner: ButterflyRound) -> None:
        # Others may still be fetching from us: serve until they are done.
        try:
            await asyncio.gather(runner.announce_done(), holder.linger())
        finally:
            holder.stop()
            if self._rounds is not None:
                self._rounds.drop(holder.plan.group.round_id)

    def traffic(self, round_id: str) -> dict[str, int]:
        """Body bytes sent and received in a round so far, serving included."""
        traffic = self._traffic[round_id]
        return {"sent": traffic.sent, "received": traffic.received}

    def bytes_sent(self) -> int:
        """Body bytes sent over all rounds so far, serving included."""
        return sum(traffic.sent for traffic in self._traffic.values())

    async def drain(self) -> None:
        """Wait until every finished round stopped serving (others fetched from us, or had their chance)."""
        while self._retiring:
            await asyncio.gather(*list(self._retiring), return_exceptions=True)
