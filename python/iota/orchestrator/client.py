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

    async def register(self, flops: float, address: str | None = None, merge_address: str | None = None,
                       stage: int | None = None) -> dict[str, Any]:
        return await self._post("/register", {"flops": flops, "address": address, "merge_address": merge_address,
                                              "stage": stage})

    async def heartbeat(self, stats: dict[str, Any]) -> dict[str, Any]:
        return await self._post("/heartbeat", {"stats": stats})

    async def lease(self) -> dict[str, Any]:
        return await self._post("/lease", {})

    async def loss(self, sample: int, attempt: int, loss: float, path: list[str],
                   commits: list[dict[str, Any]]) -> dict[str, Any]:
        return await self._post("/loss", {"sample": sample, "attempt": attempt, "loss": loss, "path": path,
                                          "commits": commits})

    async def work(self, since: int) -> list[dict[str, Any]]:
        """Finished samples recorded after row `since`: loss, path and each stage's commitment."""
        reply = await self.client.get_json(self.address, f"/work?since={since}", receiver=self.hotkey,
                                           timeout=self.timeout)
        return reply["work"]

    async def flag(self, hotkey: str, reason: str, detail: dict[str, Any]) -> dict[str, Any]:
        return await self._post("/flag", {"hotkey": hotkey, "reason": reason, "detail": detail})

    async def scores(self, scores: dict[str, Any]) -> dict[str, Any]:
        return await self._post("/scores", {"scores": scores})

    async def complete(self, sample: int, attempt: int) -> dict[str, Any]:
        return await self._post("/complete", {"sample": sample, "attempt": attempt})

    async def merged(self, stage: int, round_: int, digest: str, contributors: dict[str, float],
                     gram: list[list[float]] | None) -> dict[str, Any]:
        return await self._post("/merged", {"stage": stage, "round": round_, "digest": digest,
                                            "contributors": contributors, "gram": gram})

    async def merge_reports(self, since: int) -> list[dict[str, Any]]:
        """Merge reports recorded after row `since`: contributors, their Gram matrix, and the
        version the round trained from."""
        reply = await self.client.get_json(self.address, f"/merge-reports?since={since}", receiver=self.hotkey,
                                           timeout=self.timeout)
        return reply["reports"]

    async def upload(self, stage: int, round_: int, contributors: list[str], data: bytes) -> dict[str, Any]:
        path = f"/weights/{stage}?round={round_}&contributors={','.join(contributors)}"
        reply = await self.client.request("POST", self.address, path, receiver=self.hotkey,
                                          timeout=self.timeout, body=data)
        return reply.json()

    async def weights(self, stage: int, version: int | None = None) -> tuple[int, str, bytes]:
        """(version, sha256 digest, outer-optimizer state bytes) of the stage's latest (or given) merged weights."""
        path = f"/weights/{stage}" + ("" if version is None else f"?version={version}")
        reply = await self.client.request("GET", self.address, path, receiver=self.hotkey,
                                          timeout=self.timeout, max_response=1 << 30)
        return int(reply.headers["X-Iota-Version"]), reply.headers["X-Iota-Digest"], reply.body

    async def evaluation(self, versions: list[int], val_loss: float) -> dict[str, Any]:
        return await self._post("/eval", {"versions": versions, "val_loss": val_loss})
