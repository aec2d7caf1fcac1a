"""The orchestrator: registration, stage assignment, sample leases, the
per-stage train/merge phase machine, merged weights, and the public views
(dashboard, JSON state, Prometheus metrics). Control plane only: activations
never pass through here. Everything that matters is in the `Store`, so a
restarted orchestrator on the same database picks up where it stopped."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

import torch
from aiohttp import web
from bittensor.signing import resolve_signer

import iota.data
from iota.allreduce import OuterNesterov
from iota.allreduce.outer import flatten, unflatten_into
from iota.chain import Chain
from iota.model import Pipeline, TrainConfig, save_checkpoint
from iota.model.boundary import BoundaryLink
from iota.model.recipe import Recipe
from iota.model.train import lr_at
from iota.net import JsonHTTPError, json_error, request_body, request_sender, route_policy, signed_app
from iota.orchestrator import views
from iota.orchestrator.assign import choose_stage, rebalance
from iota.orchestrator.config import OrchestratorConfig
from iota.orchestrator.store import StagePhase, Store

if TYPE_CHECKING:
    from bittensor.signing import WalletLike

log = logging.getLogger(__name__)

MAX_WEIGHTS_BODY = 1 << 30


class Orchestrator:
    """One run's control plane over `store`; `recipe` is required on the first start only."""

    def __init__(self, store: Store, wallet: WalletLike, chain: Chain, recipe: Recipe | None = None,
                 config: OrchestratorConfig | None = None) -> None:
        self.signer = resolve_signer(wallet, role="hotkey")  # signs every answer of the app
        self.store, self.hotkey, self.chain = store, self.signer.ss58_address, chain
        self.config = config or OrchestratorConfig()
        stored = store.get_meta("recipe")
        if stored is None:
            if recipe is None:
                raise ValueError(f"{store.path} holds no run yet: give a recipe to start one")
            self.recipe = recipe
            self._start_run()
        else:
            self.recipe = Recipe.from_dict(stored)
            if recipe is not None and recipe != self.recipe:
                raise ValueError(
                    f"{store.path} holds a run with a different recipe; use another --dir, or leave the "
                    f"recipe options out to resume it (stored: {stored})"
                )
        self.vocab_size: int = store.get_meta("vocab_size")
        self.costs = self.recipe.stage_costs(self.vocab_size)
        self.weight_bytes: list[int] = store.get_meta("weight_bytes")
        self.last_move = 0.0
        # Miners that asked for a stage when they registered with this process (not persisted:
        # after a restart they are pinned again when they re-register).
        self.pinned: set[str] = set()

    def _start_run(self) -> None:
        _, _, tokenizer = iota.data.load(self.recipe.data, self.recipe.tokenizer)
        stages = self.recipe.build(tokenizer.vocab_size)
        self.store.init_stages(self.recipe.stages)
        for s, stage in enumerate(stages):
            if self.store.latest_version(s) is not None:
                continue  # a start killed before it stored the recipe: version 0 is already there
            outer = OuterNesterov(flatten(list(stage.parameters())))
            data = outer.to_bytes()
            self.store.add_version(s, None, hashlib.sha256(data).hexdigest(), data, [])
        self.store.set_meta("weight_bytes", [4 * sum(p.numel() for p in st.parameters()) for st in stages])
        self.store.set_meta("vocab_size", tokenizer.vocab_size)
        self.store.set_meta("status", "training")
        self.store.set_meta("recipe", self.recipe.to_dict())

    # -- the app ----------------------------------------------------------------

    def app(self) -> web.Application:
        app = signed_app(self.signer, self.chain)
        app.router.add_post("/register", self.register)
        app.router.add_post("/heartbeat", self.heartbeat)
        app.router.add_post("/lease", self.lease)
        app.router.add_post("/loss", self.loss)
        app.router.add_post("/complete", self.complete)
        app.router.add_post("/merged", self.merged)
        app.router.add_post("/weights/{stage}", self.upload_weights)
        app.router.add_get("/weights/{stage}", self.download_weights)
        app.router.add_post("/eval", self.evaluation)
        app.router.add_get("/work", self.work)
        app.router.add_post("/flag", self.flag)
        app.router.add_get("/merge-reports", self.merge_reports)
        app.router.add_post("/scores", self.scores)
        app.router.add_get("/", self.dashboard)
        app.router.add_get("/api/state", self.state_json)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/openapi.json", self.openapi)
        return app

    @property
    def status(self) -> str:
        return self.store.get_meta("status")

    def _json(self, request: web.Request) -> dict[str, Any]:
        try:
            value = json.loads(request_body(request))
        except ValueError as exc:
            raise JsonHTTPError(400, "BadRequest", f"body is not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise JsonHTTPError(400, "BadRequest", "body must be a JSON object")
        return value

    def _member(self, request: web.Request) -> str:
        """The sender's hotkey, if it is a live registered node (else 409: register again)."""
        hotkey = request_sender(request).hotkey
        node = self.store.node(hotkey)
        if node is None or not node.alive:
            raise JsonHTTPError(409, "NotRegistered", f"{hotkey} is not a live node of this run; POST /register first")
        return hotkey

    @route_policy(roles=("miner", "validator"))
    async def register(self, request: web.Request) -> web.Response:
        body = self._json(request)
        sender = request_sender(request)
        flops = _number(body, "flops", minimum=0.0)
        address, merge_address = body.get("address"), body.get("merge_address")
        if sender.role == "miner" and not all(isinstance(a, str) and a.startswith("http")
                                              for a in (address, merge_address)):
            return json_error(400, "BadRequest", "a miner must give the http addresses it serves on "
                                                 "(address: forward/backward, merge_address: all-reduce)")
        wanted = body.get("stage")
        if wanted is not None and not (isinstance(wanted, int) and 0 <= wanted < self.recipe.stages):
            return json_error(400, "BadRequest", f"stage must be null or an integer in [0, {self.recipe.stages})")
        stage = None
        if sender.role == "miner":
            existing = self.store.node(sender.hotkey)
            if existing is not None and existing.alive:
                stage = existing.stage
            else:
                stage = self._assign() if wanted is None else wanted
            # A miner that asked for its stage stays there: rebalancing moves only the others.
            if wanted is None:
                self.pinned.discard(sender.hotkey)
            else:
                self.pinned.add(sender.hotkey)
        self.store.upsert_node(sender.hotkey, sender.role, address, merge_address, stage, flops)
        self.store.add_event("node_joined", {"hotkey": sender.hotkey, "role": sender.role, "stage": stage})
        log.info("%s %s joined%s", sender.role, sender.hotkey, "" if stage is None else f" on stage {stage}")
        return web.json_response({"stage": stage, "recipe": self.recipe.to_dict(), "vocab_size": self.vocab_size,
                                  "heartbeat": self.config.heartbeat})

    def _capacity(self) -> list[float]:
        capacity = [0.0] * self.recipe.stages
        for node in self.store.nodes(role="miner"):
            if node.stage is not None:
                capacity[node.stage] += max(node.flops, 1.0)
        return capacity

    def _assign(self) -> int:
        return choose_stage(self.costs, self._capacity())

    @route_policy(roles=("miner", "validator"))
    async def heartbeat(self, request: web.Request) -> web.Response:
        hotkey = request_sender(request).hotkey
        stats = self._json(request).get("stats", {})
        if not isinstance(stats, dict):
            return json_error(400, "BadRequest", "stats must be a JSON object")
        if not self.store.heartbeat(hotkey, stats):
            return json_error(409, "NotRegistered", f"{hotkey} is not a live node of this run; POST /register first")
        node = self.store.node(hotkey)
        assert node is not None
        done = self.store.samples_done()
        reply: dict[str, Any] = {
            "status": self.status,
            "samples_done": done,
            "lr": lr_at(min(done, self.recipe.samples - 1), self._train_config()),
            "versions": [self._version_info(s) for s in range(self.recipe.stages)],
            "lease_timeout": self.config.lease_timeout(self.store.median_latency()),
        }
        if node.stage is not None:
            phase = self.store.stage(node.stage)
            reply["stage"] = node.stage
            reply["phase"] = {"phase": phase.phase, "round": phase.round, "members": phase.members}
            if node.stage + 1 < self.recipe.stages:
                # A miner a validator flagged lately gets no work: what it returns would train the others on garbage.
                flagged = self._recently_flagged()
                reply["next"] = [
                    {"hotkey": n.hotkey, "address": n.address, "flops": n.flops, "queue": n.stats.get("queue", 0)}
                    for n in self.store.nodes(role="miner") if n.stage == node.stage + 1 and n.hotkey not in flagged
                ]
        return web.json_response(reply)

    def _train_config(self) -> TrainConfig:
        return TrainConfig(steps=self.recipe.samples, lr=self.recipe.lr, warmup_steps=self.recipe.warmup_samples)

    def _version_info(self, s: int) -> dict[str, Any]:
        version = self.store.latest_version(s)
        assert version is not None
        return {"version": version.version, "digest": version.digest}

    @route_policy(roles=("miner",))
    async def lease(self, request: web.Request) -> web.Response:
        hotkey = self._member(request)
        node = self.store.node(hotkey)
        if node is None or node.stage != 0:
            return json_error(409, "WrongStage", "only miners of stage 0 lease samples")
        if self.status != "training":
            return web.json_response({"sample": None, "status": self.status})
        if hotkey in self._recently_flagged():
            return web.json_response({"sample": None, "status": self.status, "flagged": True})
        timeout = self.config.lease_timeout(self.store.median_latency())
        lease = self.store.lease(hotkey, self.recipe.samples, timeout)
        if lease is None:
            return web.json_response({"sample": None, "status": self.status})
        return web.json_response({"sample": lease.sample, "attempt": lease.attempt, "timeout": timeout})

    @route_policy(roles=("miner",))
    async def loss(self, request: web.Request) -> web.Response:
        self._member(request)
        body = self._json(request)
        loss = _number(body, "loss")
        path = body.get("path")
        if not (isinstance(path, list) and len(path) == self.recipe.stages and all(isinstance(h, str) for h in path)):
            return json_error(400, "BadRequest", f"path must list the {self.recipe.stages} hotkeys the sample visited")
        commits = body.get("commits", [])
        if not (isinstance(commits, list) and len(commits) == self.recipe.stages
                and all(isinstance(c, dict) and c.get("hotkey") == h for c, h in zip(commits, path))):
            return json_error(400, "BadRequest", "commits must hold each stage's commitment, in path order")
        accepted = self.store.record_loss(_integer(body, "sample"), _integer(body, "attempt"), loss, path, commits)
        return web.json_response({"accepted": accepted})

    @route_policy(roles=("miner",))
    async def complete(self, request: web.Request) -> web.Response:
        self._member(request)
        body = self._json(request)
        accepted = self.store.complete(_integer(body, "sample"), _integer(body, "attempt"), self.recipe.stages)
        return web.json_response({"accepted": accepted})

    @route_policy(roles=("miner",))
    async def merged(self, request: web.Request) -> web.Response:
        """A miner finished merge round `round` of its stage with weights of sha256 `digest`.

        The first report of a round is asked to upload; later ones are
        checked against what was stored (a mismatch is recorded as an event).
        `contributors` (hotkey -> merge weight) and their `gram` (inner
        products, from the round's holders) are kept for validators to find
        poisoned contributions.
        """
        hotkey = self._member(request)
        body = self._json(request)
        stage, round_ = _integer(body, "stage"), _integer(body, "round")
        digest = body.get("digest")
        if not isinstance(digest, str):
            return json_error(400, "BadRequest", "digest must be the sha256 hex of the merged state")
        contributors, gram = body.get("contributors", {}), body.get("gram")
        if gram is not None:
            problem = _gram_problem(contributors, gram)
            if problem:
                return json_error(400, "BadRequest", problem)
            if hotkey not in contributors:
                return json_error(403, "NotMember", f"{hotkey} reports on a round it did not contribute to")
            self.store.add_merge_report(stage, round_, hotkey, dict(sorted(contributors.items())), gram)
        phase = self.store.stage(_stage_index(stage, self.recipe.stages))
        stored = self.store.version_of_round(stage, round_)
        if stored is not None:
            if stored.digest != digest:
                self.store.add_event("merge_mismatch", {"hotkey": hotkey, "stage": stage, "round": round_})
            return web.json_response({"upload": False, "accepted": stored.digest == digest})
        open_round = phase.phase == "merge" and phase.round == round_
        return web.json_response({"upload": open_round, "accepted": open_round})

    @route_policy(roles=("miner",), max_body=MAX_WEIGHTS_BODY)
    async def upload_weights(self, request: web.Request) -> web.Response:
        hotkey = self._member(request)
        stage = _stage_index(request.match_info["stage"], self.recipe.stages)
        round_ = _integer(dict(request.query), "round")
        contributors = request.query.get("contributors", "").split(",")
        data = request_body(request)
        if len(data) > 2 * self.weight_bytes[stage] + 4096:
            return json_error(400, "BadRequest", f"stage {stage} weights cannot be {len(data)} bytes")
        digest = hashlib.sha256(data).hexdigest()
        stored = self.store.version_of_round(stage, round_)
        if stored is not None:
            # Two members may race to upload the same round: the same bytes are fine.
            if stored.digest != digest:
                self.store.add_event("merge_mismatch", {"hotkey": hotkey, "stage": stage, "round": round_})
                return json_error(409, "MergeMismatch", f"round {round_} of stage {stage} was stored with "
                                                        "other weights than these")
            return web.json_response({"version": stored.version})
        phase = self.store.stage(stage)
        if not (phase.phase == "merge" and phase.round == round_):
            return json_error(409, "RoundClosed", f"merge round {round_} of stage {stage} is not open")
        if hotkey not in {m["hotkey"] for m in phase.members}:
            return json_error(403, "NotMember", f"{hotkey} is not a member of merge round {round_} of stage {stage}")
        # Only well-formed state of the right size becomes a version.
        probe = OuterNesterov(torch.zeros(self.weight_bytes[stage] // 4))
        try:
            probe.load_bytes(data)
        except ValueError as exc:
            return json_error(400, "BadWeights", str(exc))
        version = self.store.add_version(stage, round_, digest, bytes(data), sorted(set(contributors) - {""}))
        self.store.close_merge(stage, round_, "merged", {"version": version.version, "uploader": hotkey,
                                                         "contributors": sorted(set(contributors) - {""})})
        log.info("stage %d merged round %d into version %d", stage, round_, version.version)
        return web.json_response({"version": version.version})

    @route_policy(roles=("miner", "validator"))
    async def download_weights(self, request: web.Request) -> web.StreamResponse:
        stage = _stage_index(request.match_info["stage"], self.recipe.stages)
        if "version" in request.query:
            wanted = _integer(dict(request.query), "version")
            version = self.store.version(stage, wanted)
            if version is None:
                return json_error(404, "NoSuchVersion", f"stage {stage} has no merged version {wanted}")
        else:
            version = self.store.latest_version(stage)
        assert version is not None
        data = version.file.read_bytes()
        return web.Response(body=data, content_type="application/octet-stream",
                            headers={"X-Iota-Version": str(version.version), "X-Iota-Digest": version.digest})

    @route_policy(roles=("validator",))
    async def evaluation(self, request: web.Request) -> web.Response:
        hotkey = self._member(request)
        body = self._json(request)
        versions = body.get("versions")
        if not (isinstance(versions, list) and all(isinstance(v, int) for v in versions)):
            return json_error(400, "BadRequest", "versions must list the stage versions evaluated")
        self.store.add_eval(versions, _number(body, "val_loss"), hotkey)
        return web.json_response({"accepted": True})

    @route_policy(roles=("validator",))
    async def work(self, request: web.Request) -> web.Response:
        """Finished samples after row `since`: loss, path and commitments, for audits and scoring."""
        self._member(request)
        since = _integer(dict(request.query), "since") if "since" in request.query else 0
        return web.json_response({"work": self.store.work(since)})

    @route_policy(roles=("validator",))
    async def merge_reports(self, request: web.Request) -> web.Response:
        """Merge reports after row `since`: each member's view of its round's contributions."""
        self._member(request)
        since = _integer(dict(request.query), "since") if "since" in request.query else 0
        return web.json_response({"reports": self.store.merge_reports(since)})

    @route_policy(roles=("validator",))
    async def flag(self, request: web.Request) -> web.Response:
        """A validator caught a miner: it sits out merges for `flag_memory` seconds and scores 0 while flagged."""
        validator = self._member(request)
        body = self._json(request)
        hotkey, reason, detail = body.get("hotkey"), body.get("reason"), body.get("detail", {})
        node = self.store.node(hotkey) if isinstance(hotkey, str) else None
        if node is None or node.role != "miner":
            return json_error(404, "NoSuchMiner", f"{hotkey!r} is not a miner of this run")
        if not (isinstance(reason, str) and reason and isinstance(detail, dict)):
            return json_error(400, "BadRequest", "a flag needs a reason (string) and a detail (object)")
        self.store.add_flag(hotkey, reason, validator, detail)
        log.warning("validator %s flagged miner %s: %s", validator, hotkey, reason)
        return web.json_response({"accepted": True})

    @route_policy(roles=("validator",))
    async def scores(self, request: web.Request) -> web.Response:
        validator = self._member(request)
        scores = self._json(request).get("scores")
        if not isinstance(scores, dict):
            return json_error(400, "BadRequest", "scores must map miner hotkeys to their score records")
        self.store.set_meta(f"scores:{validator}", scores)
        return web.json_response({"accepted": True})

    def _recently_flagged(self) -> set[str]:
        """Miners flagged within `flag_memory` seconds: they sit out merges and get no work."""
        return {f["hotkey"] for f in self.store.flags(time.time() - self.config.flag_memory)}

    # -- public views -----------------------------------------------------------

    @route_policy(public=True)
    async def dashboard(self, request: web.Request) -> web.Response:
        return web.Response(text=views.DASHBOARD_HTML, content_type="text/html")

    @route_policy(public=True)
    async def state_json(self, request: web.Request) -> web.Response:
        return web.json_response(self.state())

    @route_policy(public=True)
    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=views.prometheus(self.state()), content_type="text/plain")

    @route_policy(public=True)
    async def openapi(self, request: web.Request) -> web.Response:
        text = resources.files("iota.orchestrator").joinpath("openapi.json").read_text()
        return web.Response(text=text, content_type="application/json")

    def state(self) -> dict[str, Any]:
        """Everything the dashboard, /metrics and `local`'s live view show."""
        miners = self.store.nodes(role="miner")
        gone = self.store.nodes(role="miner", alive=False)
        done = self.store.samples_done()
        losses = self.store.losses()
        stages = []
        for s in range(self.recipe.stages):
            phase = self.store.stage(s)
            stages.append({
                "stage": s, "phase": phase.phase, "round": phase.round, "since_merge": phase.since_merge,
                **self._version_info(s),
                "miners": [{"hotkey": n.hotkey, "address": n.address, "flops": n.flops, "stats": n.stats}
                           for n in miners if n.stage == s],
            })
        traffic = {"activations": 0, "gradients": 0, "allreduce": 0, "tokens_forward": 0, "tokens_backward": 0}
        for node in miners + gone:
            for key in traffic:
                traffic[key] += int(node.stats.get(key, 0))
        boundary = traffic["activations"] + traffic["gradients"]
        bf16 = 2 * self.recipe.dim * (traffic["tokens_forward"] + traffic["tokens_backward"])
        training = self.store.training_seconds()
        return {
            "status": self.status,
            "recipe": self.recipe.to_dict(),
            "samples": {"done": done, "total": self.recipe.samples},
            "tokens": done * self.recipe.tokens_per_sample(),
            "training_seconds": training,
            "tokens_per_second": done * self.recipe.tokens_per_sample() / training if training else 0.0,
            "stages": stages,
            "losses": [[sample, loss] for sample, loss, _ in losses],
            "evals": self.store.evals(),
            "merges": self.store.merges(),
            "traffic": traffic,
            "compression_ratio": bf16 / boundary if boundary else None,
            "miners_lost": [e["hotkey"] for e in self.store.events("node_lost") if e.get("role") == "miner"],
            "moves": self.store.events("miner_moved"),
            "flags": self.store.flags(),
            "scores": {n.hotkey: self.store.get_meta(f"scores:{n.hotkey}")
                       for n in self.store.nodes(role="validator", alive=True) + self.store.nodes(role="validator",
                                                                                                   alive=False)},
        }

    # -- the control loop ---------------------------------------------------------

    async def run(self) -> None:
        """Drive phases, drops and rebalancing until cancelled."""
        while True:
            try:
                self.tick()
            except Exception:  # a bad tick must not stop the swarm's control loop
                log.exception("control loop tick failed")
            await asyncio.sleep(self.config.heartbeat / 2)

    def tick(self) -> None:
        now = time.time()
        for node in self.store.drop_silent(now - self.config.node_timeout):
            log.warning("%s %s went silent; dropped", node.role, node.hotkey)
        status = self.status
        if status == "training" and self.store.samples_done() >= self.recipe.samples:
            self.store.set_meta("status", status := "finishing")
        for s in range(self.recipe.stages):
            self._advance_phase(s, now, final=status == "finishing")
        # A stage whose miners are all flagged or absent has no one to merge its last samples: it is done too.
        if status == "finishing" and all(
            (p := self.store.stage(s)).phase == "train" and (p.since_merge == 0 or not self._merge_members(s, p))
            for s in range(self.recipe.stages)
        ):
            self.export()
            self.store.set_meta("status", "finished")
            log.info("run finished: %d samples", self.store.samples_done())
        elif status == "training" and now - self.last_move >= self.config.rebalance_every:
            self._rebalance(now)

    def _advance_phase(self, s: int, now: float, *, final: bool) -> None:
        phase = self.store.stage(s)
        if phase.phase == "merge":
            if now > phase.deadline:
                self.store.close_merge(s, phase.round, "timeout", {"members": [m["hotkey"] for m in phase.members]})
                log.warning("stage %d merge round %d timed out; training goes on", s, phase.round)
            return
        due = phase.since_merge >= self.recipe.merge_every or (final and phase.since_merge > 0)
        members = self._merge_members(s, phase) if due else []
        if members:
            deadline = now + self.config.merge_timeout(self.weight_bytes[s])
            opened = self.store.open_merge(s, members, deadline)
            log.info("stage %d merge round %d among %d miners", s, opened.round, len(members))

    def _merge_members(self, s: int, phase: StagePhase) -> list[dict[str, Any]]:
        """The miners of stage `s` that take part in its next merge round."""
        # Miners a validator flagged lately sit merges out: their contributions cannot be trusted.
        excluded = self._recently_flagged()
        # A member that did not contribute to the stage's last merged round (it never joined) would
        # make every round wait for it: it sits out until it has caught up by loading the merged weights.
        excluded |= self._absent(s, phase.round)
        return [{"hotkey": n.hotkey, "address": n.merge_address}
                for n in self.store.nodes(role="miner") if n.stage == s and n.hotkey not in excluded]

    def _absent(self, s: int, round_: int) -> set[str]:
        last = next((m for m in self.store.merges() if m["stage"] == s and m["round"] == round_), None)
        if last is None or last["outcome"] != "merged":
            return set()
        members = {m["hotkey"] for m in self.store.stage(s).members}
        absent = members - set(json.loads(last["detail"]).get("contributors", []))
        latest = self.store.latest_version(s)
        # Caught up: heartbeats say it now holds the latest merged weights.
        return {h for h in absent if (node := self.store.node(h)) is None or latest is None
                or node.stats.get("version") != latest.version}

    def _rebalance(self, now: float) -> None:
        miners = [[(n.hotkey, max(n.flops, 1.0)) for n in self.store.nodes(role="miner") if n.stage == s]
                  for s in range(self.recipe.stages)]
        move = rebalance(self.costs, miners, self.config.rebalance_gain, self.pinned)
        if move is None:
            return
        self.store.set_stage(move.hotkey, move.target)
        self.store.add_event("miner_moved", {"hotkey": move.hotkey, "from": move.source, "to": move.target})
        self.last_move = now
        log.info("moved miner %s from stage %d to %d", move.hotkey, move.source, move.target)

    def export(self) -> None:
        """Write the whole model (every stage's latest merged weights) as one checkpoint in `export/`."""
        stages = self.recipe.build(self.vocab_size)
        versions = []
        for s, stage in enumerate(stages):
            version = self.store.latest_version(s)
            assert version is not None
            outer = OuterNesterov(flatten(list(stage.parameters())))
            outer.load_bytes(version.file.read_bytes())
            unflatten_into(outer.weights, list(stage.parameters()))
            versions.append(version.version)
        dim = self.recipe.dim
        pipeline = Pipeline(stages, [BoundaryLink(dim) for _ in stages[1:]])
        save_checkpoint(self.store.path.parent / "export", pipeline,
                        {"recipe": self.recipe.to_dict(), "vocab_size": self.vocab_size, "versions": versions})


def _number(body: dict[str, Any], key: str, *, minimum: float | None = None) -> float:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            minimum is not None and value < minimum):
        raise JsonHTTPError(400, "BadRequest", f"{key} must be a finite number"
                             + ("" if minimum is None else f" >= {minimum}") + f", got {value!r}")
    return float(value)


def _gram_problem(contributors: Any, gram: Any) -> str | None:
    """Why (contributors, gram) is not hotkeys with positive weights and a square matrix of finite numbers."""
    if not (isinstance(contributors, dict) and contributors and all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w > 0
            for w in contributors.values())):
        return "contributors must map the round's contributor hotkeys to their (positive) merge weights"
    n = len(contributors)
    if not (isinstance(gram, list) and len(gram) == n and all(isinstance(row, list) and len(row) == n for row in gram)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    for row in gram for v in row)):
        return f"gram must be a {n}x{n} matrix of finite numbers (the contributions' inner products)"
    return None


def _integer(body: dict[str, Any], key: str) -> int:
    value = body.get(key)
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise JsonHTTPError(400, "BadRequest", f"{key} must be an integer >= 0, got {value!r}")
    return value


def _stage_index(value: Any, stages: int) -> int:
    index = _integer({"stage": value}, "stage")
    if index >= stages:
        raise JsonHTTPError(404, "NoSuchStage", f"this run has stages 0..{stages - 1}, not {index}")
    return index
