"""The orchestrator's API as seen by miners and validators: signed JSON calls."""

from __future__ import annotations

from typing import Any

from iota.net import SignedClient


class OrchestratorClient:
    """Calls one orchestrator (at `address`, signing for its `hotkey`); `timeout` bounds each call in seconds."""

    def __init__(self, client: SignedClient, address: str, hotkey: str, *, timeout: float) -> None:
        self.client, self.address, self.hotkey, self.timeout = client, address, hotkey, timeout

    async def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        return await self.client.post_json(self.address, path, payload, receiver=self.hotkey, timeout=self.timeout)

    async def register(self, flops: float, address: str | None = None,
                       merge_address: str | None = None) -> dict[str, Any]:
        return await self._post("/register", {"flops": flops, "address": address, "merge_address": merge_address})

    async def heartbeat(self, stats: dict[str, Any]) -> dict[str, Any]:
        return await self._post("/heartbeat", {"stats": stats})

    async def lease(self) -> dict[str, Any]:
        return await self._post("/lease", {})

    async def loss(self, sample: int, attempt: int, loss: float, path: list[str]) -> dict[str, Any]:
        return await self._post("/loss", {"sample": sample, "attempt": attempt, "loss": loss, "path": path})

    async def complete(self, sample: int, attempt: int) -> dict[str, Any]:
        return await self._post("/complete", {"sample": sample, "attempt": attempt})

    async def merged(self, stage: int, round_: int, digest: str) -> dict[str, Any]:
        return await self._post("/merged", {"stage": stage, "round": round_, "digest": digest})

    async def upload(self, stage: int, round_: int, contributors: list[str], data: bytes) -> dict[str, Any]:
        path = f"/weights/{stage}?round={round_}&contributors={','.join(contributors)}"
        reply = await self.client.request("POST", self.address, path, receiver=self.hotkey,
                                          timeout=self.timeout, body=data)
        return reply.json()

    async def weights(self, stage: int) -> tuple[int, str, bytes]:
        """(version, sha256 digest, outer-optimizer state bytes) of the stage's latest merged weights."""
        reply = await self.client.request("GET", self.address, f"/weights/{stage}", receiver=self.hotkey,
                                          timeout=self.timeout, max_response=1 << 30)
        return int(reply.headers["X-Iota-Version"]), reply.headers["X-Iota-Digest"], reply.body

    async def evaluation(self, versions: list[int], val_loss: float) -> dict[str, Any]:
        return await self._post("/eval", {"versions": versions, "val_loss": val_loss})
