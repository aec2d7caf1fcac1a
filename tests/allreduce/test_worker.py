"""The process worker's bench barrier: a round starts once every named peer wrote its
line of the round before, read only as whole lines."""

from __future__ import annotations

import asyncio
import json

import pytest

from iota.allreduce.worker import wait_for_round


def test_the_barrier_waits_for_every_peers_whole_line_of_the_round_before(tmp_path):
    (tmp_path / "a.results.jsonl").write_text(json.dumps({"round_id": "r0", "ok": True}) + "\n")
    partial = json.dumps({"round_id": "r0", "ok": True})
    (tmp_path / "b.results.jsonl").write_text(partial[:12])  # b is appending its line right now

    async def main() -> bool:
        waiting = asyncio.create_task(wait_for_round(tmp_path, ["a", "b"], "r0", timeout=10))
        await asyncio.sleep(0.1)
        held = not waiting.done()
        (tmp_path / "b.results.jsonl").write_text(partial + "\n")
        await asyncio.wait_for(waiting, 5)
        return held

    assert asyncio.run(main())


def test_the_barrier_gives_up_after_its_bound(tmp_path):
    (tmp_path / "a.results.jsonl").write_text(json.dumps({"round_id": "r1"}) + "\n")
    with pytest.raises(TimeoutError, match="a did not finish round r0"):
        asyncio.run(wait_for_round(tmp_path, ["a"], "r0", timeout=0.1))
