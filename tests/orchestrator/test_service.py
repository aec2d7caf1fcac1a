"""The orchestrator served for real on loopback: signed requests from miners and a validator on a
LocalChain, the train/merge phase machine driven by tick(), refusals, public views, and restarts.

Each test runs its own event loop (asyncio.run) and starts and stops its server inside it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch
from bittensor import http_auth

from iota.allreduce import OuterNesterov
from iota.allreduce.outer import flatten
from iota.chain import LocalChain, dev_keypair
from iota.model import Pipeline, load_checkpoint
from iota.model.boundary import BoundaryLink
from iota.model.recipe import Recipe
from iota.net import GuardConfig, NetError, PeerError, SignedClient, serve
from iota.orchestrator.client import OrchestratorClient
from iota.orchestrator.config import OrchestratorConfig
from iota.orchestrator.service import MAX_WEIGHTS_BODY, Orchestrator
from iota.orchestrator.store import Store

TINY = Recipe(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, stages=2, batch=2, seq_len=16, samples=6, merge_every=2)
TIMEOUT = 30.0

KEYS = {name: dev_keypair(f"iota-orchestrator-test-{name}")
        for name in ("orchestrator", "miner-a", "miner-b", "miner-c", "validator", "stranger")}
HOTKEY = {name: key.ss58_address for name, key in KEYS.items()}
ROLES = {"orchestrator": "orchestrator", "miner-a": "miner", "miner-b": "miner", "miner-c": "miner",
         "validator": "validator"}  # the stranger is not on the chain


def address_of(name: str) -> str:
    """Where a test miner says it serves forward/backward (nothing listens: the orchestrator never calls it)."""
    return f"http://127.0.0.1:{9000 + sorted(KEYS).index(name)}"


def merge_address_of(name: str) -> str:
    return f"http://127.0.0.1:{9100 + sorted(KEYS).index(name)}"


def make_chain() -> LocalChain:
    return LocalChain({HOTKEY[name]: role for name, role in ROLES.items()})


def state_bytes(n_values: int, seed: int) -> bytes:
    """A well-formed outer-optimizer state (weights and momentum) of `n_values` floats."""
    generator = torch.Generator().manual_seed(seed)
    outer = OuterNesterov(torch.randn(n_values, generator=generator))
    outer.momentum_buffer.normal_(generator=generator)
    return outer.to_bytes()


def commits_of(path: list[str]) -> list[dict[str, Any]]:
    """What each miner on `path` vouches for (digests are placeholders: the orchestrator only stores them)."""
    return [{"hotkey": h, "stage": s, "output": f"{s:064x}", "weights": f"{s + 1:064x}", "global_version": 0,
             "backward_since_merge": 0} for s, h in enumerate(path)]


@dataclass
class Harness:
    orchestrator: Orchestrator
    url: str
    session: aiohttp.ClientSession

    def signed(self, name: str) -> SignedClient:
        return SignedClient(KEYS[name], self.session)

    def client(self, name: str) -> OrchestratorClient:
        return OrchestratorClient(self.signed(name), self.url, HOTKEY["orchestrator"], timeout=TIMEOUT)

    async def register_miner(self, name: str, flops: float = 1e9) -> int:
        reply = await self.client(name).register(flops, address_of(name), merge_address_of(name))
        return reply["stage"]

    async def orchestrator_work(self, since: int) -> list[dict[str, Any]]:
        validator = self.client("validator")
        await validator.register(0.0)
        return await validator.work(since)

    async def refusal(self, call: Awaitable[Any]) -> tuple[int, str]:
        with pytest.raises(PeerError) as caught:
            await call
        return caught.value.status, caught.value.kind

    def stage_bytes(self, stage: int, seed: int) -> bytes:
        return state_bytes(self.orchestrator.weight_bytes[stage] // 4, seed)

    async def train_samples(self, n: int) -> list[tuple[int, int]]:
        """miner-a (stage 0) leases n samples, miner-b (last stage) reports their losses, miner-a completes them."""
        first, last = self.client("miner-a"), self.client("miner-b")
        done = []
        for _ in range(n):
            lease = await first.lease()
            sample, attempt = lease["sample"], lease["attempt"]
            path = [HOTKEY["miner-a"], HOTKEY["miner-b"]]
            reply = await last.loss(sample, attempt, 5.0 - 0.25 * sample, path, commits_of(path))
            assert reply == {"accepted": True}
            assert await first.complete(sample, attempt) == {"accepted": True}
            done.append((sample, attempt))
        return done

    async def merge(self, stage: int, miner: str, seed: int) -> int:
        """Report and upload merge round `round` of `stage` as `miner`; returns the version stored."""
        round_ = self.orchestrator.store.stage(stage).round
        data = self.stage_bytes(stage, seed)
        client = self.client(miner)
        reply = await client.merged(stage, round_, hashlib.sha256(data).hexdigest(), {}, None)
        assert reply == {"upload": True, "accepted": True}
        return (await client.upload(stage, round_, [HOTKEY[miner]], data))["version"]


@asynccontextmanager
async def running(store: Store, recipe: Recipe | None = TINY,
                  config: OrchestratorConfig | None = None) -> AsyncIterator[Harness]:
    orchestrator = Orchestrator(store, KEYS["orchestrator"], make_chain(), recipe, config)
    async with serve(orchestrator.app(), shutdown_timeout=0.5) as url, aiohttp.ClientSession() as session:
        yield Harness(orchestrator, url, session)


def run(store: Store, body: Callable[[Harness], Awaitable[None]], *, recipe: Recipe | None = TINY,
        config: OrchestratorConfig | None = None) -> None:
    async def main() -> None:
        async with running(store, recipe, config) as harness:
            await body(harness)

    asyncio.run(main())


@pytest.fixture
def store(tmp_path: Path):
    s = Store(tmp_path / "run" / "orchestrator.sqlite")
    yield s
    s.close()


# -- registration and heartbeats ------------------------------------------------------------------


def test_a_joining_miner_gets_the_stage_it_asks_for(store: Store) -> None:
    async def body(h: Harness) -> None:
        reply = await h.client("miner-a").register(1e9, address_of("miner-a"), merge_address_of("miner-a"), stage=1)
        assert reply["stage"] == 1  # though stage 0 is empty
        assert await h.register_miner("miner-b") == 0  # the orchestrator fills the empty one next

    run(store, body)


def test_register_fills_empty_stages_first_and_heartbeats_tell_the_state(store: Store) -> None:
    async def body(h: Harness) -> None:
        orchestrator = h.orchestrator
        assert orchestrator.costs[1] > orchestrator.costs[0]  # the last stage carries the head

        reply = await h.client("miner-a").register(1e9, "http://127.0.0.1:9001", "http://127.0.0.1:9101")
        assert reply["stage"] == 0
        assert Recipe.from_dict(reply["recipe"]) == TINY
        assert reply["vocab_size"] == orchestrator.vocab_size == 257
        assert reply["heartbeat"] == orchestrator.config.heartbeat
        # Stage 1 is empty: it is filled next, though stage 0 holds a miner already.
        assert await h.register_miner("miner-b") == 1
        # Both stages hold one equal miner; stage 1 costs more, so it gets the third.
        assert await h.register_miner("miner-c") == 1
        # A validator serves no stage.
        assert (await h.client("validator").register(5e8))["stage"] is None
        # A live miner registering again keeps its stage.
        assert await h.register_miner("miner-a") == 0
        # A miner may ask for a stage; a live one still keeps its own, and a stage out of range is refused.
        assert (await h.client("miner-a").register(1e9, address_of("miner-a"), merge_address_of("miner-a"),
                                                   stage=1))["stage"] == 0
        for wanted in (2, -1, "1"):
            with pytest.raises(PeerError) as refused:
                await h.client("validator").register(5e8, stage=wanted)
            assert refused.value.status == 400

        await h.client("miner-b").heartbeat({"queue": 3})
        await h.client("miner-c").heartbeat({"queue": 1})
        beat = await h.client("miner-a").heartbeat({"queue": 0, "activations": 10})
        assert beat["status"] == "training" and beat["samples_done"] == 0
        assert beat["lr"] > 0 and beat["lease_timeout"] == orchestrator.config.lease_floor
        for s, info in enumerate(beat["versions"]):
            version = store.latest_version(s)
            assert info == {"version": 0, "digest": version.digest}
            assert hashlib.sha256(version.file.read_bytes()).hexdigest() == version.digest
        assert beat["stage"] == 0
        assert beat["phase"] == {"phase": "train", "round": 0, "members": []}
        # The next stage's peers, with the queue each last reported.
        assert sorted((p["hotkey"], p["address"], p["flops"], p["queue"]) for p in beat["next"]) == sorted([
            (HOTKEY["miner-b"], address_of("miner-b"), 1e9, 3),
            (HOTKEY["miner-c"], address_of("miner-c"), 1e9, 1)])
        # The last stage has no next stage; a validator no stage at all.
        last = await h.client("miner-b").heartbeat({})
        assert last["stage"] == 1 and "next" not in last
        validator = await h.client("validator").heartbeat({})
        assert not {"stage", "phase", "next"} & set(validator)
        assert len(validator["versions"]) == TINY.stages
        # Stats land in the state the dashboard shows.
        stage0 = h.orchestrator.state()["stages"][0]
        assert stage0["miners"][0]["stats"] == {"queue": 0, "activations": 10}
        assert h.orchestrator.state()["traffic"]["activations"] == 10

    run(store, body)


# -- samples and merges ---------------------------------------------------------------------------


def test_leases_losses_completions_and_a_merge_round_per_stage(store: Store) -> None:
    async def body(h: Harness) -> None:
        orchestrator = h.orchestrator
        assert [await h.register_miner(n) for n in ("miner-a", "miner-b")] == [0, 1]
        first, last = h.client("miner-a"), h.client("miner-b")

        lease = await first.lease()
        assert lease == {"sample": 0, "attempt": 0, "timeout": orchestrator.config.lease_floor}
        path = [HOTKEY["miner-a"], HOTKEY["miner-b"]]
        assert await last.loss(0, 0, 4.5, path, commits_of(path)) == {"accepted": True}
        assert await last.loss(0, 1, 4.0, path, commits_of(path)) == {"accepted": False}  # no such attempt
        assert await h.refusal(last.loss(0, 0, 4.5, path[:1], commits_of(path[:1]))) == (400, "BadRequest")
        assert await h.refusal(last.loss(0, 0, float("nan"), path, commits_of(path))) == (400, "BadRequest")
        # Commitments must name the path's miners in order.
        assert await h.refusal(last.loss(0, 0, 4.5, path, commits_of(path[::-1]))) == (400, "BadRequest")
        work = await h.orchestrator_work(0)
        assert work[0]["commits"] == commits_of(path)
        assert work[0]["versions"] == [0, 0]  # the stages' versions when the loss was recorded
        assert await first.complete(0, 0) == {"accepted": True}
        assert await first.complete(0, 0) == {"accepted": False}  # once
        state = orchestrator.state()
        assert state["samples"] == {"done": 1, "total": TINY.samples}
        assert state["losses"] == [[0, 4.5]]
        assert state["tokens"] == TINY.batch * TINY.seq_len

        orchestrator.tick()  # one sample since the start: below merge_every
        assert [st["phase"] for st in orchestrator.state()["stages"]] == ["train", "train"]
        await h.train_samples(1)
        orchestrator.tick()
        stages = orchestrator.state()["stages"]
        assert [(st["phase"], st["round"], st["since_merge"]) for st in stages] == [("merge", 1, 0)] * 2
        beat = await first.heartbeat({})
        assert beat["phase"] == {"phase": "merge", "round": 1, "members": [
            {"hotkey": HOTKEY["miner-a"], "address": merge_address_of("miner-a")}]}
        # Training goes on during a merge, and counts toward the next one.
        await h.train_samples(1)
        assert orchestrator.store.stage(0).since_merge == 1

        # Stage 0: the first report is asked to upload; the upload becomes version 1 and closes the round.
        data = h.stage_bytes(0, seed=1)
        digest = hashlib.sha256(data).hexdigest()
        assert await first.merged(0, 2, digest, {HOTKEY["miner-a"]: 3.0}, None) == {"upload": False, "accepted": False}  # not the open round
        assert await first.merged(0, 1, digest, {HOTKEY["miner-a"]: 3.0}, [[4.0]]) == {"upload": True, "accepted": True}
        assert await first.upload(0, 1, [HOTKEY["miner-a"]], data) == {"version": 1}
        assert orchestrator.store.stage(0).phase == "train"
        assert orchestrator.store.stage(1).phase == "merge"  # stages merge independently
        merges = orchestrator.state()["merges"]
        assert [(m["stage"], m["round"], m["outcome"]) for m in merges] == [(0, 1, "merged")]
        assert json.loads(merges[0]["detail"]) == {"version": 1, "uploader": HOTKEY["miner-a"],
                                                   "contributors": [HOTKEY["miner-a"]]}
        # The same bytes again (a racing member) are fine; other bytes are refused and recorded.
        assert await first.upload(0, 1, [HOTKEY["miner-a"]], data) == {"version": 1}
        assert await h.refusal(first.upload(0, 1, [], h.stage_bytes(0, seed=2))) == (409, "MergeMismatch")
        assert await first.merged(0, 1, digest, {HOTKEY["miner-a"]: 3.0}, None) == {"upload": False, "accepted": True}
        assert await first.merged(0, 1, "0" * 64, {HOTKEY["miner-a"]: 3.0}, None) == {"upload": False, "accepted": False}
        # Merge reports (contributors and the Gram matrix of their contributions) are kept for validators.
        assert await h.refusal(first.merged(0, 1, digest, {HOTKEY["miner-a"]: 3.0}, [[1.0, 2.0]])) == (400, "BadRequest")
        assert await h.refusal(first.merged(0, 1, digest, {HOTKEY["miner-a"]: 3.0}, [[float("nan")]])) == (400, "BadRequest")
        assert await h.refusal(first.merged(0, 1, digest, {}, [])) == (400, "BadRequest")
        assert await h.refusal(first.merged(0, 1, digest, {HOTKEY["miner-a"]: 0.0}, [[4.0]])) == (400, "BadRequest")
        reports = await h.client("validator").merge_reports(0)
        assert [(r["stage"], r["round"], r["reporter"], r["contributors"], r["gram"]) for r in reports] == [
            (0, 1, HOTKEY["miner-a"], {HOTKEY["miner-a"]: 3.0}, [[4.0]])]
        assert await h.client("validator").merge_reports(reports[-1]["row"]) == []
        assert await h.refusal(first.merge_reports(0)) == (403, "WrongRole")
        assert await h.refusal(first.merged(0, 1, digest, {HOTKEY["miner-b"]: 1.0}, [[1.0]])) == (403, "NotMember")
        assert len(store.events("merge_mismatch")) == 2
        # A closed round takes no new upload.
        assert await h.refusal(first.upload(0, 2, [], h.stage_bytes(0, seed=3))) == (409, "RoundClosed")

        # Downloads: the latest version, its bytes matching the digest header.
        version, got_digest, got = await first.weights(0)
        assert (version, got_digest, got) == (1, digest, data)
        assert hashlib.sha256(got).hexdigest() == got_digest
        version, got_digest, got = await h.client("validator").weights(1)
        assert version == 0 and hashlib.sha256(got).hexdigest() == got_digest == store.latest_version(1).digest
        beat = await first.heartbeat({})
        assert beat["versions"][0] == {"version": 1, "digest": digest}
        await h.train_samples(1)
        assert (await h.orchestrator_work(0))[-1]["versions"] == [1, 0]

        # Stage 1's round: wrong sizes and garbage are refused with 400, a non-member with 403.
        assert await h.refusal(last.upload(1, 1, [], h.stage_bytes(0, seed=4))) == (400, "BadWeights")
        assert await h.refusal(last.upload(1, 1, [], b"not safetensors at all")) == (400, "BadWeights")
        too_big = b"\0" * (2 * orchestrator.weight_bytes[1] + 4097)
        assert await h.refusal(last.upload(1, 1, [], too_big)) == (400, "BadRequest")
        good = h.stage_bytes(1, seed=5)
        assert await h.refusal(first.upload(1, 1, [], good)) == (403, "NotMember")
        assert await h.refusal(last.upload(7, 1, [], good)) == (404, "NoSuchStage")
        assert orchestrator.store.stage(1).phase == "merge"  # none of that closed the round
        assert await h.merge(1, "miner-b", seed=5) == 1
        assert [st["version"] for st in orchestrator.state()["stages"]] == [1, 1]

        # An evaluation of the merged weights.
        assert await h.client("validator").register(1e9) is not None
        assert await h.client("validator").evaluation([1, 1], 4.2) == {"accepted": True}
        evals = orchestrator.state()["evals"]
        assert [(e["versions"], e["val_loss"], e["node"], e["samples_done"]) for e in evals] == [
            ([1, 1], 4.2, HOTKEY["validator"], 4)]

    run(store, body)


def test_a_run_finishes_with_a_last_merge_and_exports_the_merged_model(store: Store) -> None:
    async def body(h: Harness) -> None:
        orchestrator = h.orchestrator
        assert [await h.register_miner(n) for n in ("miner-a", "miner-b")] == [0, 1]
        await h.train_samples(2)
        orchestrator.tick()
        uploaded: dict[int, bytes] = {}
        for s, miner in enumerate(("miner-a", "miner-b")):
            assert await h.merge(s, miner, seed=10 + s) == 1
        await h.train_samples(TINY.samples - 3)
        assert (await h.client("miner-a").lease())["sample"] == TINY.samples - 1
        # The last sample's lease is out: nothing more to lease, though the run is not done.
        assert await h.client("miner-a").lease() == {"sample": None, "status": "training"}
        orchestrator.tick()  # 3 samples since round 1 opened: round 2 opens
        assert orchestrator.status == "training"
        assert [(orchestrator.store.stage(s).phase, orchestrator.store.stage(s).round) for s in range(2)] == [
            ("merge", 2)] * 2
        # The last sample completes while round 2 runs: it counts toward a round after it.
        assert await h.client("miner-a").complete(TINY.samples - 1, 0) == {"accepted": True}
        orchestrator.tick()
        assert orchestrator.status == "finishing"
        assert await h.client("miner-a").lease() == {"sample": None, "status": "finishing"}
        for s, miner in enumerate(("miner-a", "miner-b")):
            assert await h.merge(s, miner, seed=20 + s) == 2
        # Finishing: one last round for the stages that trained since their last round opened.
        orchestrator.tick()
        assert orchestrator.status == "finishing"
        assert [(orchestrator.store.stage(s).phase, orchestrator.store.stage(s).round) for s in range(2)] == [
            ("merge", 3)] * 2
        for s, miner in enumerate(("miner-a", "miner-b")):
            uploaded[s] = h.stage_bytes(s, seed=30 + s)
            assert await h.merge(s, miner, seed=30 + s) == 3
        orchestrator.tick()
        assert orchestrator.status == "finished"
        assert (await h.client("miner-b").heartbeat({}))["status"] == "finished"
        # The export holds every stage's latest merged weights.
        weights, config = load_checkpoint(store.path.parent / "export")
        assert config["versions"] == [3, 3] and Recipe.from_dict(config["recipe"]) == TINY
        stages = TINY.build(config["vocab_size"])
        Pipeline(stages, [BoundaryLink(TINY.dim)]).load_state_dict(weights)
        for s, stage in enumerate(stages):
            outer = OuterNesterov(torch.zeros(orchestrator.weight_bytes[s] // 4))
            outer.load_bytes(uploaded[s])
            assert torch.equal(flatten(list(stage.parameters())), outer.weights)

    run(store, body)


def test_flagged_miners_sit_out_merges_and_a_stage_with_none_left_does_not_hold_the_run(store: Store) -> None:
    async def body(h: Harness) -> None:
        orchestrator = h.orchestrator
        assert [await h.register_miner(n) for n in ("miner-a", "miner-b", "miner-c")] == [0, 1, 1]
        validator = h.client("validator")
        await validator.register(0.0)
        assert await h.refusal(validator.flag(HOTKEY["validator"], "wrong_output", {})) == (404, "NoSuchMiner")
        assert await h.refusal(validator.flag(HOTKEY["miner-c"], "", {})) == (400, "BadRequest")
        assert await h.refusal(h.client("miner-a").flag(HOTKEY["miner-c"], "x", {})) == (403, "WrongRole")
        assert await validator.flag(HOTKEY["miner-c"], "wrong_output", {"sample": 3}) == {"accepted": True}
        # The flagged miner gets no work: stage 0 no longer sees it among stage 1's peers.
        assert [p["hotkey"] for p in (await h.client("miner-a").heartbeat({}))["next"]] == [HOTKEY["miner-b"]]
        await h.train_samples(2)
        orchestrator.tick()
        assert [m["hotkey"] for m in orchestrator.store.stage(1).members] == [HOTKEY["miner-b"]]
        for s, miner in enumerate(("miner-a", "miner-b")):
            assert await h.merge(s, miner, seed=s) == 1
        # Now stage 1's only miner is flagged too: the last samples finish, stage 0 merges them, the run ends.
        assert await validator.flag(HOTKEY["miner-b"], "poisoned_merge", {"round": 1}) == {"accepted": True}
        await h.train_samples(TINY.samples - 2)
        orchestrator.tick()
        assert orchestrator.status == "finishing"
        assert [orchestrator.store.stage(s).phase for s in range(2)] == ["merge", "train"]
        assert await h.merge(0, "miner-a", seed=5) == 2
        orchestrator.tick()
        assert orchestrator.status == "finished"
        assert [(f["hotkey"], f["reason"]) for f in orchestrator.state()["flags"]] == [
            (HOTKEY["miner-c"], "wrong_output"), (HOTKEY["miner-b"], "poisoned_merge")]

    run(store, body)


def test_a_flagged_first_stage_miner_leases_nothing(store: Store) -> None:
    async def body(h: Harness) -> None:
        assert [await h.register_miner(n) for n in ("miner-a", "miner-b")] == [0, 1]
        validator = h.client("validator")
        await validator.register(0.0)
        assert (await h.client("miner-a").lease())["sample"] == 0
        await validator.flag(HOTKEY["miner-a"], "replayed_work", {"sample": 0})
        reply = await h.client("miner-a").lease()
        assert reply["sample"] is None and reply["flagged"] is True

    run(store, body)


def test_a_silent_miner_is_dropped_its_leases_freed_and_the_empty_stage_refilled(store: Store) -> None:
    # Silent for 1 s means gone: far longer than the requests in between take, even on a busy machine.
    config = OrchestratorConfig(heartbeat=0.5, missed_heartbeats=2, rebalance_every=0.01)

    async def body(h: Harness) -> None:
        orchestrator = h.orchestrator
        assert [await h.register_miner(n) for n in ("miner-a", "miner-b", "miner-c")] == [0, 1, 1]
        leases = [await h.client("miner-a").lease() for _ in range(2)]
        assert [lease["sample"] for lease in leases] == [0, 1]
        orchestrator.tick()  # everyone is fresh: no drop, and no move (stage 1 is the costlier one)
        assert orchestrator.state()["moves"] == []
        await asyncio.sleep(orchestrator.config.node_timeout + 0.2)
        await h.client("miner-b").heartbeat({})
        await h.client("miner-c").heartbeat({})
        orchestrator.tick()
        state = orchestrator.state()
        assert state["miners_lost"] == [HOTKEY["miner-a"]]
        assert await h.refusal(h.client("miner-a").heartbeat({})) == (409, "NotRegistered")
        assert await h.refusal(h.client("miner-a").lease()) == (409, "NotRegistered")
        # Stage 0 lost its only miner: the same tick moved one of stage 1's two miners there.
        [move] = state["moves"]
        assert (move["from"], move["to"]) == (1, 0) and move["hotkey"] in {HOTKEY["miner-b"], HOTKEY["miner-c"]}
        moved = "miner-b" if move["hotkey"] == HOTKEY["miner-b"] else "miner-c"
        assert (await h.client(moved).heartbeat({}))["stage"] == 0
        # The dropped miner's samples are leased again at once, to the miner now on stage 0.
        again = [await h.client(moved).lease() for _ in range(3)]
        assert [(r["sample"], r["attempt"]) for r in again] == [(0, 1), (1, 1), (2, 0)]
        # The dropped miner's stale attempt no longer counts.
        assert await h.client(moved).complete(0, 1) == {"accepted": True}
        await h.register_miner("miner-a")
        assert await h.client("miner-a").complete(0, 0) == {"accepted": False}

    run(store, body, config=config)


# -- refusals ---------------------------------------------------------------------------------------


def test_refusals_carry_the_json_error_body(store: Store) -> None:
    async def body(h: Harness) -> None:
        assert [await h.register_miner(n) for n in ("miner-a", "miner-b")] == [0, 1]
        # Unsigned: 401 before anything else.
        async with h.session.post(h.url + "/lease", json={}) as reply:
            assert reply.status == 401
            assert await reply.json() == {"error": "Unsigned", "detail": (await reply.json())["detail"]}
        # Signed for another receiver: refused, and our client takes no answer signed by
        # another hotkey than the one it addressed.
        headers = http_auth.sign(KEYS["miner-a"], method="POST", path="/lease", body=b"{}",
                                 receiver_ss58=HOTKEY["miner-b"])
        async with h.session.post(h.url + "/lease", data=b"{}", headers=headers) as reply:
            assert reply.status == 401 and (await reply.json())["error"] == "WrongReceiver"
        wrong = SignedClient(KEYS["miner-a"], h.session)
        with pytest.raises(NetError, match="without .*signature"):
            await wrong.post_json(h.url, "/lease", {}, receiver=HOTKEY["miner-b"], timeout=TIMEOUT)
        # A tampered body no longer matches its signature.
        headers = http_auth.sign(KEYS["miner-a"], method="POST", path="/lease", body=b"{}",
                                 receiver_ss58=HOTKEY["orchestrator"])
        async with h.session.post(h.url + "/lease", data=b'{"x":1}', headers=headers) as reply:
            assert reply.status == 401 and set(await reply.json()) == {"error", "detail"}
        # Not on the chain at all.
        assert await h.refusal(h.client("stranger").register(1e9)) == (403, "NotRegistered")
        # Roles: a miner cannot report evaluations, a validator cannot lease or upload.
        assert await h.refusal(h.client("miner-a").evaluation([0, 0], 4.0)) == (403, "WrongRole")
        assert await h.refusal(h.client("validator").lease()) == (403, "WrongRole")
        assert await h.refusal(h.client("validator").upload(0, 1, [], b"x")) == (403, "WrongRole")
        assert await h.refusal(h.client("orchestrator").heartbeat({})) == (403, "WrongRole")
        # Malformed bodies.
        signed = h.signed("miner-b")
        for bad in (b"{not json", b"[1, 2]", b""):
            call = signed.request("POST", h.url, "/loss", receiver=HOTKEY["orchestrator"], timeout=TIMEOUT,
                                  body=bad, content_type="application/json")
            assert await h.refusal(call) == (400, "BadRequest"), bad
        assert await h.refusal(h.client("miner-a").register(-1.0, "http://a", "http://b")) == (400, "BadRequest")
        assert await h.refusal(h.client("miner-c").register(1e9, None, None)) == (400, "BadRequest")
        assert await h.refusal(h.client("miner-a").complete(-1, 0)) == (400, "BadRequest")
        assert await h.refusal(h.client("miner-a").heartbeat([1])) == (400, "BadRequest")  # type: ignore[arg-type]
        assert await h.refusal(h.client("miner-a").merged(0, 1, None, {}, None)) == (400, "BadRequest")  # type: ignore[arg-type]
        for query in ("", "?round=x", "?round=-1", "?round=%C2%B2"):
            call = signed.request("POST", h.url, "/weights/1" + query, receiver=HOTKEY["orchestrator"],
                                  timeout=TIMEOUT, body=b"x")
            assert await h.refusal(call) == (400, "BadRequest"), query
        assert await h.refusal(signed.get_bytes(h.url, "/weights/x", receiver=HOTKEY["orchestrator"],
                                                timeout=TIMEOUT)) == (400, "BadRequest")
        assert await h.refusal(signed.get_bytes(h.url, "/weights/2", receiver=HOTKEY["orchestrator"],
                                                timeout=TIMEOUT)) == (404, "NoSuchStage")
        assert await h.refusal(h.client("miner-a").merged(2, 1, "0" * 64, {}, None)) == (404, "NoSuchStage")
        # Only stage 0 leases; a miner on the chain but not in the run must register first.
        assert await h.refusal(h.client("miner-b").lease()) == (409, "WrongStage")
        assert await h.refusal(h.client("miner-c").lease()) == (409, "NotRegistered")
        assert await h.refusal(h.client("miner-c").complete(0, 0)) == (409, "NotRegistered")
        assert await h.refusal(h.client("validator").evaluation([0, 0], 4.0)) == (409, "NotRegistered")
        # Bodies over the route's limit: refused before they are read.
        assert await announce_body(h.url, "/loss", GuardConfig().max_body + 1) == (413, "BodyTooLarge")
        assert await announce_body(h.url, "/weights/0?round=1", MAX_WEIGHTS_BODY + 1) == (413, "BodyTooLarge")
        # None of that changed the run.
        state = h.orchestrator.state()
        assert state["samples"]["done"] == 0 and state["losses"] == [] and state["evals"] == []

    run(store, body)


async def announce_body(url: str, path: str, length: int) -> tuple[int, str]:
    """Send signed headers announcing a `length`-byte body, and no body: (status, error kind) of the answer."""
    headers = http_auth.sign(KEYS["miner-a"], method="POST", path=path, body=b"", receiver_ss58=HOTKEY["orchestrator"])
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {length}",
                 "Content-Type: application/octet-stream", *(f"{k}: {v}" for k, v in headers.items())]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        size = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.strip().lower() == "content-length":
                size = int(value)
        return status, json.loads(await reader.readexactly(size))["error"]
    finally:
        writer.close()


# -- public views -----------------------------------------------------------------------------------

PROM_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
PROM_LABELS = r'\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"(?:,|(?=\})))*\}'
PROM_SAMPLE = re.compile(rf"^({PROM_NAME})({PROM_LABELS})? (\S+)(?: -?\d+)?$")
PROM_HELP = re.compile(rf"^# HELP ({PROM_NAME}) .+$")
PROM_TYPE = re.compile(rf"^# TYPE ({PROM_NAME}) (counter|gauge|histogram|summary|untyped)$")


def parse_prometheus(text: str) -> dict[str, dict[str, float]]:
    """Check the text exposition format line by line; {family: {labels: value}}."""
    assert text.endswith("\n")
    families: dict[str, dict[str, float]] = {}
    helped: set[str] = set()
    current = None
    for number, line in enumerate(text.splitlines(), 1):
        if m := PROM_HELP.match(line):
            assert m[1] not in helped, f"line {number}: a second HELP for {m[1]}"
            helped.add(m[1])
        elif m := PROM_TYPE.match(line):
            assert m[1] not in families, f"line {number}: a second TYPE for {m[1]}"
            assert m[1] in helped, f"line {number}: TYPE before HELP for {m[1]}"
            current = m[1]
            families[current] = {}
        elif m := PROM_SAMPLE.match(line):
            assert m[1] == current, f"line {number}: sample {m[1]} outside its family's block"
            labels = m[2] or ""
            assert labels not in families[current], f"line {number}: a duplicate sample"
            families[current][labels] = float(m[3])  # also takes NaN, +Inf, -Inf
        else:
            raise AssertionError(f"line {number} is not Prometheus text: {line!r}")
    return families


def openapi_doc() -> dict[str, Any]:
    return json.loads(resources.files("iota.orchestrator").joinpath("openapi.json").read_text())


def test_public_views_need_no_signature(store: Store) -> None:
    async def body(h: Harness) -> None:
        assert [await h.register_miner(n) for n in ("miner-a", "miner-b")] == [0, 1]
        await h.client("miner-b").heartbeat({"activations": 1000, "gradients": 500, "allreduce": 7,
                                             "tokens_forward": 64, "tokens_backward": 64})
        await h.train_samples(2)
        h.orchestrator.tick()
        await h.merge(0, "miner-a", seed=0)
        await h.client("validator").register(1e9)
        await h.client("validator").evaluation([1, 0], 3.75)

        async with h.session.get(h.url + "/") as reply:
            assert reply.status == 200 and reply.content_type == "text/html"
            page = await reply.text()
            assert "<title>iota swarm</title>" in page and 'fetch("api/state")' in page

        async with h.session.get(h.url + "/api/state") as reply:
            assert reply.status == 200 and reply.content_type == "application/json"
            state = await reply.json()
        assert state == json.loads(json.dumps(h.orchestrator.state()))
        assert set(state) == set(openapi_doc()["components"]["schemas"]["State"]["required"])
        assert state["samples"] == {"done": 2, "total": TINY.samples}
        assert state["losses"] == [[0, 5.0], [1, 4.75]]
        assert state["training_seconds"] > 0 and state["tokens_per_second"] > 0
        assert state["compression_ratio"] == pytest.approx(2 * TINY.dim * 128 / 1500)

        async with h.session.get(h.url + "/metrics") as reply:
            assert reply.status == 200 and reply.content_type == "text/plain"
            metrics = parse_prometheus(await reply.text())
        assert metrics["iota_samples_done_total"] == {"": 2.0}
        assert metrics["iota_samples_target"] == {"": float(TINY.samples)}
        assert metrics["iota_train_loss"] == {"": 4.75}
        assert metrics["iota_val_loss"] == {"": 3.75}
        assert metrics["iota_miners"] == {'{stage="0"}': 1.0, '{stage="1"}': 1.0}
        assert metrics["iota_stage_version"] == {'{stage="0"}': 1.0, '{stage="1"}': 0.0}
        assert metrics["iota_merges_total"] == {'{outcome="merged"}': 1.0, '{outcome="timeout"}': 0.0}
        assert metrics["iota_wire_bytes_total"] == {
            '{kind="activations"}': 1000.0, '{kind="gradients"}': 500.0, '{kind="allreduce"}': 7.0}
        assert metrics["iota_miners_lost_total"] == {"": 0.0}
        assert metrics["iota_tokens_per_second"][""] > 0

        # HEAD works too (aiohttp answers it for every GET route), still unsigned.
        async with h.session.head(h.url + "/api/state") as reply:
            assert reply.status == 200

    run(store, body)


def test_metrics_of_a_fresh_run_parse_too(store: Store) -> None:
    async def body(h: Harness) -> None:
        async with h.session.get(h.url + "/metrics") as reply:
            metrics = parse_prometheus(await reply.text())
        assert metrics["iota_train_loss"] == {}  # declared, with no sample yet
        assert "iota_val_loss" not in metrics
        assert metrics["iota_tokens_per_second"] == {"": 0.0}

    run(store, body)


def test_openapi_document_is_served_and_matches_the_apps_routes(store: Store) -> None:
    async def body(h: Harness) -> None:
        async with h.session.get(h.url + "/openapi.json") as reply:
            assert reply.status == 200 and reply.content_type == "application/json"
            served = await reply.json()
        doc = openapi_doc()
        assert served == doc
        assert doc["openapi"].startswith("3.1")

        # Exactly the app's routes (aiohttp adds HEAD to each GET by itself).
        app = h.orchestrator.app()
        routes = {}
        for route in app.router.routes():
            if route.method != "HEAD":
                routes[(route.resource.canonical, route.method.lower())] = route.handler
        methods = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
        documented = {(path, method) for path, item in doc["paths"].items() for method in item if method in methods}
        assert documented == set(routes)

        default_limit = GuardConfig().max_body
        for (path, method), handler in routes.items():
            op = doc["paths"][path][method]
            policy = handler.__iota_route_policy__ if hasattr(handler, "__iota_route_policy__") else None
            assert policy is not None, f"{method} {path} has no route policy"
            if policy.public:
                assert op["security"] == [] and op.get("x-iota-public") is True, (path, method)
                continue
            # Signed routes: the roles and the body limit are those the guard enforces.
            assert op["security"] == [{"btauth": []}], (path, method)
            assert set(op["x-iota-roles"]) == set(policy.roles), (path, method)
            assert op["x-iota-max-body"] == (default_limit if policy.max_body is None else policy.max_body)
            assert {"401", "403", "413"} <= set(op["responses"]), (path, method)
            for status in ("400", "401", "403", "404", "409", "413"):
                if status in op["responses"]:
                    assert resolve(doc, op["responses"][status])["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/Error"}
            # Path parameters are declared.
            params = {p["name"] for p in op.get("parameters", []) + doc["paths"][path].get("parameters", [])}
            assert set(re.findall(r"\{(\w+)\}", path)) <= params

        error = doc["components"]["schemas"]["Error"]
        assert error["required"] == ["error", "detail"]
        recipe = doc["components"]["schemas"]["Recipe"]
        assert set(recipe["properties"]) == {f.name for f in fields(Recipe)}
        assert doc["components"]["securitySchemes"]["btauth"]["name"] == http_auth.HEADER_SIGNATURE
        # Every $ref points at something.
        for ref in refs(doc):
            resolve(doc, {"$ref": ref})

    run(store, body)


def resolve(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node and len(node) == 1:
        target: Any = doc
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return ([node["$ref"]] if "$ref" in node else []) + [r for v in node.values() for r in refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


# -- restarts ---------------------------------------------------------------------------------------


def test_a_restart_on_the_same_store_keeps_the_run(tmp_path: Path) -> None:
    path = tmp_path / "orchestrator.sqlite"
    first = Store(path)
    before: dict[str, Any] = {}

    async def train(h: Harness) -> None:
        assert [await h.register_miner(n) for n in ("miner-a", "miner-b")] == [0, 1]
        await h.train_samples(2)
        h.orchestrator.tick()
        await h.merge(0, "miner-a", seed=7)
        before.update(h.orchestrator.state())

    run(first, train)
    first.close()

    second = Store(path)
    try:
        async def resume(h: Harness) -> None:
            assert h.orchestrator.recipe == TINY
            state = h.orchestrator.state()
            for key in ("recipe", "samples", "losses", "merges", "status"):
                assert state[key] == before[key], key
            assert [st["version"] for st in state["stages"]] == [1, 0]
            assert [(st["phase"], st["round"]) for st in state["stages"]] == [("train", 1), ("merge", 1)]
            # The nodes are still registered, with their stages; leasing goes on after sample 1.
            assert (await h.client("miner-a").heartbeat({}))["stage"] == 0
            assert (await h.client("miner-a").lease())["sample"] == 2
            version, digest, data = await h.client("miner-b").weights(0)
            assert version == 1 and hashlib.sha256(data).hexdigest() == digest == before["stages"][0]["digest"]
            # Stage 1's round is still open and can still be uploaded.
            assert await h.merge(1, "miner-b", seed=8) == 1

        run(second, resume, recipe=None)
        with pytest.raises(ValueError, match="different recipe"):
            Orchestrator(second, KEYS["orchestrator"], make_chain(), Recipe.from_dict({**TINY.to_dict(),
                                                                                         "samples": 7}))
        # The same recipe given again is fine.
        assert Orchestrator(second, KEYS["orchestrator"], make_chain(), TINY).recipe == TINY
    finally:
        second.close()

    empty = Store(tmp_path / "other" / "orchestrator.sqlite")
    try:
        with pytest.raises(ValueError, match="give a recipe"):
            Orchestrator(empty, KEYS["orchestrator"], make_chain(), None)
    finally:
        empty.close()


def test_a_first_start_killed_before_it_stored_the_recipe_starts_cleanly_again(store: Store) -> None:
    Orchestrator(store, KEYS["orchestrator"], make_chain(), TINY)
    digests = [store.latest_version(s).digest for s in range(TINY.stages)]
    # What a SIGKILL between writing the initial weights and the recipe leaves behind.
    store.db.execute("DELETE FROM meta WHERE key='recipe'")
    with pytest.raises(ValueError, match="give a recipe"):
        Orchestrator(store, KEYS["orchestrator"], make_chain(), None)
    orchestrator = Orchestrator(store, KEYS["orchestrator"], make_chain(), TINY)
    # Still one initial version per stage (version 0, the same weights): merged rounds number from 1.
    assert [(st["version"], st["digest"]) for st in orchestrator.state()["stages"]] == [(0, d) for d in digests]
    assert store.db.execute("SELECT COUNT(*) FROM versions").fetchone()[0] == TINY.stages
