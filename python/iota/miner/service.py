"""A miner: serves its stage's forward and backward over signed HTTP, pushes
its outputs to the next stage by stochastic wiring, merges with its stage's
other miners when the orchestrator says so, and heartbeats.

    forward:  POST /forward  envelope {sample, attempt, path, route} + activation frame  -> 202
    backward: POST /backward envelope {sample, attempt} + gradient frame                 -> 202

Both only queue work (503 Busy when the queue is full: the sender tries
another miner); one compute task takes backward work before forward work,
and sends results on in the background. Stage 0 leases samples from the
orchestrator and keeps at most `window` of them in flight; a sample whose
backward never returns (a miner on its path died) is dropped here and
re-leased by the orchestrator when its lease expires.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import torch
from aiohttp import web
from bittensor.signing import resolve_signer

import iota.data
from iota.allreduce import AllReduceError, AllReducePeer, Group, Member, diloco_round
from iota.chain import Chain
from iota.codec import Codec
from iota.miner.wiring import Peer, Wiring
from iota.miner.worker import StageWorker, WorkError
from iota.model.recipe import Recipe
from iota.net import (
    JsonHTTPError,
    NetError,
    PeerError,
    SignedClient,
    json_error,
    request_body,
    request_sender,
    route_policy,
    serve,
    signed_app,
)
from iota.net.envelope import pack, unpack
from iota.orchestrator.client import OrchestratorClient

log = logging.getLogger(__name__)

CONTROL, BACKWARD, FORWARD = -1, 0, 1  # queue priorities: merges and weight loads, then backward, then forward
CONTROL_KINDS = ("merge", "resync", "stage")


@dataclass(frozen=True)
class MinerConfig:
    """Where a miner serves and how much work it takes on.

    `window`: samples a stage-0 miner keeps in flight (0: the number of stages). More keeps
    the pipeline fuller but trains on staler weights: on the default local swarm,
    4 in flight per miner instead of 2 gave a clearly worse loss at equal samples
    (2.97 vs 2.76 after 500) for no gain in tokens/s.
    `queue`: forward jobs waiting before new ones are refused with 503.
    `timeout` (s): one request to a peer or the orchestrator.
    `ban_base`/`ban_max` (s): how long a failing peer is avoided (doubling per failure).
    `merge_codec`: how pseudo-gradients cross in the all-reduce.
    `flops`: this machine's compute as declared to the orchestrator (0: measure it at start).
    `stage`: the stage to join and keep (-1: the one the orchestrator finds slowest, and
    rebalancing may move it).
    `adversary`: misbehave on purpose, for tests and demos of the validators: "random" (send noise
    instead of outputs), "stale" (never merge nor load merged weights), "lazy" (skip the optimizer
    steps), "poison" (merge noise 8x the size of an honest contribution), "replay" (send again the
    frame sent for another sample), "random_backward" (honest forwards, noise instead of input
    gradients).
    """

    host: str = "127.0.0.1"
    port: int = 0
    merge_port: int = 0
    window: int = 0
    queue: int = 8
    timeout: float = 10.0
    ban_base: float = 1.0
    ban_max: float = 30.0
    merge_codec: str = "int8/b64"
    flops: float = 0.0
    stage: int = -1
    adversary: str = ""
    seed: int = 0


@dataclass(order=True)
class Job:
    priority: int
    order: int
    kind: str = field(compare=False)
    header: dict[str, Any] = field(compare=False)
    frame: bytes | None = field(compare=False, default=None)


@dataclass
class Traffic:
    activations: int = 0
    gradients: int = 0
    tokens_forward: int = 0
    tokens_backward: int = 0


def measure_flops(seconds: float = 0.2) -> float:
    """This machine's float32 matmul rate (FLOP/s) on the threads torch uses: what stage assignment balances."""
    a = torch.randn(256, 256)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ a
        done += 1
    return 2 * 256**3 * done / (time.perf_counter() - start)


class Miner:
    def __init__(self, wallet: Any, chain: Chain, orchestrator: str, orchestrator_hotkey: str,
                 config: MinerConfig | None = None) -> None:
        self.signer = resolve_signer(wallet, role="hotkey")
        self.hotkey: str = self.signer.ss58_address
        self.chain = chain
        self.orchestrator_address, self.orchestrator_hotkey = orchestrator, orchestrator_hotkey
        self.config = config or MinerConfig()
        self.rng = random.Random(f"{self.config.seed}/{self.hotkey}")
        self.wiring = Wiring(self.rng, ban_base=self.config.ban_base, ban_max=self.config.ban_max)
        self.queue: asyncio.PriorityQueue[Job] = asyncio.PriorityQueue()
        self.order = itertools.count()
        self.forward_waiting = 0
        self.traffic = Traffic()
        self.worker: StageWorker | None = None
        self.recipe: Recipe | None = None
        self.vocab_size = 0
        self.data = None
        self.address = self.merge_address = ""
        self.lease_timeout = 60.0
        self.finished = asyncio.Event()
        self.in_flight: set[tuple[int, int]] = set()
        self.merged_rounds: set[tuple[int, int]] = set()
        self.control_jobs = 0  # merges, resyncs and stage changes queued or running
        self.upstream: dict[tuple[int, int], tuple[str, str]] = {}  # (sample, attempt) -> (address, hotkey)
        self.tasks: set[asyncio.Task[Any]] = set()
        self.done_forward = self.done_backward = 0
        self.failures = 0  # work that failed here; stage 0 slows its leasing while it keeps failing
        self.flops = 0.0
        self.peer: AllReducePeer | None = None
        self.orchestrator: OrchestratorClient | None = None
        self.client: SignedClient | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def run(self) -> None:
        """Serve, register, and work until the orchestrator says the run is finished (or cancelled)."""
        self.flops = self.config.flops or await asyncio.to_thread(measure_flops)
        app = self.app()
        self.peer = AllReducePeer(self.signer, self.chain)
        async with (
            serve(app, self.config.host, self.config.port) as address,
            self.peer.serving(self.config.host, self.config.merge_port),
            aiohttp.ClientSession() as session,
        ):
            self.address, self.merge_address = address, self.peer.address or ""
            self.client = SignedClient(self.signer, session)
            self.orchestrator = OrchestratorClient(self.client, self.orchestrator_address, self.orchestrator_hotkey,
                                                   timeout=self.config.timeout)
            stage = await self.register()
            # Heartbeats start before the (slow) stage setup, so a loaded machine is not taken for dead.
            loops = [self._spawn(self.heartbeat_loop())]
            await self.take_stage(stage)
            loops += [self._spawn(self.compute_loop()), self._spawn(self.feed_loop())]
            try:
                await self.finished.wait()
            finally:
                for task in list(self.tasks):
                    task.cancel()
                await asyncio.gather(*loops, *self.tasks, return_exceptions=True)

    def _spawn(self, coroutine: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("miner task failed", exc_info=task.exception())

    async def register(self) -> int:
        """Register (retrying while the orchestrator is unreachable); returns the stage assigned."""
        assert self.orchestrator is not None
        while True:
            try:
                reply = await self.orchestrator.register(self.flops, self.address, self.merge_address,
                                                         None if self.config.stage < 0 else self.config.stage)
                break
            except NetError as exc:
                log.warning("cannot register yet (%s); retrying", exc)
                await asyncio.sleep(self.config.ban_base)
        recipe = Recipe.from_dict(reply["recipe"])
        if self.recipe is None:
            self.recipe, self.vocab_size = recipe, reply["vocab_size"]
            self.data = await asyncio.to_thread(lambda: iota.data.load(recipe.data, recipe.tokenizer)[0])
        self.heartbeat_interval = float(reply["heartbeat"])
        return int(reply["stage"])

    async def take_stage(self, stage: int) -> None:
        if self.worker is not None and self.worker.index == stage:
            return
        assert self.recipe is not None and self.data is not None
        log.info("miner %s serves stage %d", self.hotkey, stage)
        self.worker = await asyncio.to_thread(StageWorker, self.recipe, self.vocab_size, stage, self.data,
                                              self.config.adversary or None)
        await self.sync_weights()

    async def sync_weights(self) -> None:
        assert self.orchestrator is not None and self.worker is not None
        worker = self.worker
        version, digest, state = await self.orchestrator.weights(worker.index)
        if hashlib.sha256(state).hexdigest() != digest:
            raise NetError(f"stage {worker.index} weights do not match their digest; the orchestrator is corrupt")
        await asyncio.to_thread(worker.load_global, version, digest, state)
        log.info("stage %d: loaded merged weights version %d", worker.index, version)

    # -- serving -------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = signed_app(self.signer, self.chain)
        app.router.add_post("/forward", self.handle_forward)
        app.router.add_post("/backward", self.handle_backward)
        app.router.add_post("/audit", self.handle_audit)
        return app

    @route_policy(roles=("miner",))
    async def handle_forward(self, request: web.Request) -> web.Response:
        header, frame = self._envelope(request)
        worker = self.worker
        if worker is None or worker.is_first:
            return json_error(409, "WrongStage", "this miner does not take forward frames (it serves stage 0)")
        if header.get("stage") != worker.index:
            return json_error(409, "WrongStage", f"this miner serves stage {worker.index}, not {header.get('stage')}")
        path, route, commits = header.get("path"), header.get("route"), header.get("commits")
        if not (isinstance(path, list) and isinstance(route, list) and isinstance(commits, list)
                and len(path) == len(route) == len(commits) == worker.index
                and path[-1] == request_sender(request).hotkey and all(isinstance(c, dict) for c in commits)):
            return json_error(400, "BadRequest", "path, route and commits must list the previous stages' miners, "
                                                 "ending with the sender")
        if commits[-1].get("output") != hashlib.sha256(frame).hexdigest():
            return json_error(400, "BadFrame", "the frame does not match the sender's commitment")
        self._check_frame(worker, frame, "forward")
        if self.forward_waiting >= self.config.queue:
            return json_error(503, "Busy", f"{self.forward_waiting} forward jobs queued; try another miner")
        self._enqueue(FORWARD, "forward", header, bytes(frame))
        return web.json_response({"queued": self.forward_waiting}, status=202)

    @route_policy(roles=("miner",))
    async def handle_backward(self, request: web.Request) -> web.Response:
        header, frame = self._envelope(request)
        worker = self.worker
        if worker is None or (header["sample"], header["attempt"]) not in worker.kept:
            return json_error(404, "UnknownSample", f"no forward of sample {header['sample']} "
                                                    f"attempt {header['attempt']} is kept here")
        commit = header.get("commit")
        if not (isinstance(commit, dict) and commit.get("output") == hashlib.sha256(frame).hexdigest()):
            return json_error(400, "BadFrame", "the frame does not match the sender's commitment")
        self._check_frame(worker, frame, "backward")
        worker.note_received(header["sample"], header["attempt"], {**commit, "hotkey": request_sender(request).hotkey})
        self._enqueue(BACKWARD, "backward", header, bytes(frame))
        return web.json_response({"queued": self.queue.qsize()}, status=202)

    @route_policy(roles=("validator",))
    async def handle_audit(self, request: web.Request) -> web.Response:
        """Recent work of this miner for a validator, by `kind`: "forward" (its record, input frame,
        output frame and weights: to recompute it), "backward" (a middle stage's backward: input,
        gradient received, gradient sent, weights), "sent" (the commitment of the backward frame it
        sent) or "received" (the commitment that came with the backward frame it received)."""
        header, _ = self._envelope(request)
        worker, key, kind = self.worker, (header["sample"], header["attempt"]), header.get("kind", "forward")
        found: tuple[dict[str, Any], bytes] | None = None
        if worker is None:
            pass
        elif kind == "forward":
            found = worker.audit(*key)
        elif kind == "backward":
            found = worker.audit_backward(*key)
        elif kind == "sent":
            commit = worker.backward_commitment(*key)
            found = None if commit is None else (commit, b"")
        elif kind == "received":
            if key in worker.received:
                found = dict(worker.received[key]), b""
        else:
            return json_error(400, "BadRequest", "kind must be forward, backward, sent or received")
        if found is None:
            return json_error(404, "NotKept", f"no {kind} record of sample {key[0]} attempt {key[1]} is kept "
                                              "for audits")
        return web.Response(body=pack(*found), content_type="application/octet-stream")

    def _envelope(self, request: web.Request) -> tuple[dict[str, Any], memoryview]:
        try:
            header, frame = unpack(request_body(request))
        except NetError as exc:
            raise JsonHTTPError(400, "BadEnvelope", str(exc)) from None
        for key in ("sample", "attempt"):
            if not (isinstance(header.get(key), int) and header[key] >= 0):
                raise JsonHTTPError(400, "BadRequest", f"{key} must be an integer >= 0")
        return header, frame

    @staticmethod
    def _check_frame(worker: StageWorker, frame: memoryview, direction: str) -> None:
        try:
            worker.check_frame(frame, direction)
        except WorkError as exc:
            raise JsonHTTPError(400, "BadFrame", str(exc)) from None

    def _enqueue(self, priority: int, kind: str, header: dict[str, Any], frame: bytes | None = None) -> None:
        if kind == "forward":
            self.forward_waiting += 1
        elif kind in CONTROL_KINDS:
            self.control_jobs += 1
        self.queue.put_nowait(Job(priority, next(self.order), kind, header, frame))

    # -- compute ---------------------------------------------------------------------------

    async def compute_loop(self) -> None:
        while True:
            job = await self.queue.get()
            if job.kind == "forward":
                self.forward_waiting -= 1
            try:
                await self._run(job)
            except (WorkError, ValueError, NetError) as exc:
                log.warning("%s of sample %s failed: %s", job.kind, job.header.get("sample"), exc)
                self._release(job.header)
                self.failures += 1
            finally:
                if job.kind in CONTROL_KINDS:
                    self.control_jobs -= 1

    async def _run(self, job: Job) -> None:
        worker = self.worker
        assert worker is not None
        sample, attempt = job.header["sample"], job.header["attempt"]
        if job.kind == "forward":
            if worker.index != job.header.get("stage"):
                return  # we changed stage since it was queued; the sender's sample times out
            frame, loss = await asyncio.to_thread(worker.forward, sample, attempt, job.frame)
            self.done_forward += 1
            path = job.header.get("path", []) + [self.hotkey]
            route = job.header.get("route", []) + [self.address]
            commits = job.header.get("commits", []) + [{**worker.commitment(sample, attempt), "hotkey": self.hotkey}]
            if not worker.is_first:
                upstream = (job.header["route"][-1], job.header["path"][-1])
            if loss is None:
                if not worker.is_first:
                    self.upstream[(sample, attempt)] = upstream
                self._spawn(self.send_forward(sample, attempt, frame, path, route, commits))
            else:
                self.done_backward += 1
                self._spawn(self.report_loss(sample, attempt, loss, path, commits))
                self._spawn(self.send_backward(sample, attempt, frame, worker.backward_commitment(sample, attempt),
                                               *upstream))
        elif job.kind == "backward":
            if (sample, attempt) not in worker.kept:
                return  # expired while queued
            frame = await asyncio.to_thread(worker.backward, sample, attempt, job.frame)
            self.done_backward += 1
            if frame is None:
                self._release(job.header)
                self._spawn(self.complete(sample, attempt))
            else:
                self._spawn(self.send_backward(sample, attempt, frame, worker.backward_commitment(sample, attempt),
                                               *self.upstream.pop((sample, attempt))))
        elif job.kind == "merge":
            await self.merge(job.header)
        elif job.kind == "resync":
            await self.sync_weights()
        elif job.kind == "stage":
            await self.take_stage(job.header["stage"])

    # -- sending ---------------------------------------------------------------------------

    async def send_forward(self, sample: int, attempt: int, frame: bytes, path: list[str], route: list[str],
                           commits: list[dict[str, Any]]) -> None:
        """Push an activation frame to some miner of the next stage; try others until the sample expires."""
        assert self.client is not None and self.worker is not None
        stage = self.worker.index + 1
        body = pack({"sample": sample, "attempt": attempt, "stage": stage, "path": path, "route": route,
                     "commits": commits}, frame)
        deadline = time.monotonic() + self.lease_timeout
        while time.monotonic() < deadline:
            peer = self.wiring.choose()
            if peer is None:
                await asyncio.sleep(min(self.config.ban_base, max(0.0, deadline - time.monotonic())))
                continue
            try:
                await self.client.post_bytes(peer.address, "/forward", body, receiver=peer.hotkey,
                                             timeout=self.config.timeout)
            except PeerError as exc:
                self.wiring.failed(peer.hotkey)
                log.info("forward of sample %d to %s refused: %s", sample, peer.hotkey, exc.kind)
                continue
            except NetError as exc:
                ban = self.wiring.failed(peer.hotkey)
                log.warning("forward of sample %d to %s failed (%s); banned for %.1fs", sample, peer.hotkey, exc, ban)
                continue
            self.wiring.succeeded(peer.hotkey)
            self.traffic.activations += len(frame)
            self.traffic.tokens_forward += self.recipe.tokens_per_sample() if self.recipe else 0
            return
        log.warning("sample %d attempt %d: no miner of stage %d took it before it expired", sample, attempt, stage)
        self.worker.drop(sample, attempt)
        self._release({"sample": sample, "attempt": attempt})

    async def send_backward(self, sample: int, attempt: int, frame: bytes, commit: dict[str, object] | None,
                            address: str, hotkey: str) -> None:
        assert self.client is not None and self.recipe is not None
        body = pack({"sample": sample, "attempt": attempt, "commit": commit}, frame)
        try:
            await self.client.post_bytes(address, "/backward", body, receiver=hotkey, timeout=self.config.timeout)
        except NetError as exc:
            # Only that miner holds the sample's forward: nothing to retry; the lease expires and it is redone.
            log.warning("backward of sample %d to %s failed: %s", sample, hotkey, exc)
            return
        self.traffic.gradients += len(frame)
        self.traffic.tokens_backward += self.recipe.tokens_per_sample()

    async def report_loss(self, sample: int, attempt: int, loss: float, path: list[str],
                          commits: list[dict[str, Any]]) -> None:
        assert self.orchestrator is not None
        try:
            await self.orchestrator.loss(sample, attempt, loss, path, commits)
        except NetError as exc:
            log.warning("could not report the loss of sample %d: %s", sample, exc)

    async def complete(self, sample: int, attempt: int) -> None:
        assert self.orchestrator is not None
        try:
            await self.orchestrator.complete(sample, attempt)
        except NetError as exc:
            log.warning("could not report sample %d done: %s", sample, exc)

    # -- stage 0: feeding samples ------------------------------------------------------------

    async def feed_loop(self) -> None:
        assert self.orchestrator is not None
        while True:
            worker, recipe = self.worker, self.recipe
            assert worker is not None and recipe is not None
            window = self.config.window or recipe.stages
            if not worker.is_first or len(self.in_flight) >= window or self.merging:
                await asyncio.sleep(0.05)
                continue
            if self.failures:
                # Our own work keeps failing (e.g. diverged weights): do not spin through the data.
                self.failures = 0
                await asyncio.sleep(self.config.ban_base)
            try:
                lease = await self.orchestrator.lease()
            except NetError as exc:
                log.info("no lease (%s)", exc)
                await asyncio.sleep(self.heartbeat_interval)
                continue
            if lease.get("sample") is None:
                await asyncio.sleep(self.heartbeat_interval)
                continue
            self.lease_timeout = float(lease["timeout"])
            self.in_flight.add((lease["sample"], lease["attempt"]))
            self._enqueue(FORWARD, "forward", {"sample": lease["sample"], "attempt": lease["attempt"], "stage": 0})

    def _release(self, header: dict[str, Any]) -> None:
        self.in_flight.discard((header.get("sample"), header.get("attempt")))

    # -- heartbeats, merges -----------------------------------------------------------------

    @property
    def merging(self) -> bool:
        return self.control_jobs > 0

    def stats(self) -> dict[str, Any]:
        worker = self.worker
        allreduce = self.peer.bytes_sent() if self.peer is not None else 0
        return {"queue": self.forward_waiting, "forward": self.done_forward, "backward": self.done_backward,
                "activations": self.traffic.activations, "gradients": self.traffic.gradients,
                "tokens_forward": self.traffic.tokens_forward, "tokens_backward": self.traffic.tokens_backward,
                "allreduce": allreduce, "kept": len(worker.kept) if worker else 0, "failures": self.failures,
                "version": worker.global_version if worker else -1}

    async def heartbeat_loop(self) -> None:
        assert self.orchestrator is not None
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                reply = await self.orchestrator.heartbeat(self.stats())
            except PeerError as exc:
                if exc.status == 409:
                    log.warning("the orchestrator does not know us (%s); registering again", exc.detail)
                    stage = await self.register()
                    if self.worker is not None and stage != self.worker.index:
                        self._enqueue(CONTROL, "stage", {"stage": stage, "sample": -1, "attempt": -1})
                continue
            except NetError as exc:
                log.warning("heartbeat failed (%s); still working", exc)
                continue
            self.on_heartbeat(reply)

    def on_heartbeat(self, reply: dict[str, Any]) -> None:
        worker = self.worker
        if worker is None:
            return  # still setting up our stage
        if reply["status"] == "finished":
            self.finished.set()
            return
        worker.lr = float(reply["lr"])
        self.lease_timeout = float(reply["lease_timeout"])
        for key in worker.forget(time.monotonic() - self.lease_timeout):
            self.upstream.pop(key, None)
            self._release({"sample": key[0], "attempt": key[1]})
        self.wiring.update([Peer(p["hotkey"], p["address"], p["flops"], p["queue"]) for p in reply.get("next", [])])
        if self.control_jobs or self.config.adversary == "stale":
            return
        if reply["stage"] != worker.index:
            self._enqueue(CONTROL, "stage", {"stage": reply["stage"], "sample": -1, "attempt": -1})
            return
        phase = reply["phase"]
        members = [m["hotkey"] for m in phase["members"]]
        if (phase["phase"] == "merge" and self.hotkey in members
                and (worker.index, phase["round"]) not in self.merged_rounds):
            self.merged_rounds.add((worker.index, phase["round"]))
            self._enqueue(CONTROL, "merge", {**phase, "stage": worker.index, "sample": -1, "attempt": -1})
            return
        latest = reply["versions"][worker.index]
        if (latest["version"], latest["digest"]) != (worker.global_version, worker.global_digest):
            self._enqueue(CONTROL, "resync", {"sample": -1, "attempt": -1})

    async def merge(self, phase: dict[str, Any]) -> None:
        """One DiLoCo merge with the stage's other miners, then report (and maybe upload) the result."""
        worker, peer, orchestrator = self.worker, self.peer, self.orchestrator
        assert worker is not None and peer is not None and orchestrator is not None
        stage, round_ = phase["stage"], phase["round"]
        group = Group(f"s{stage}-r{round_}", tuple(Member(m["hotkey"], m["address"]) for m in phase["members"]))
        started = time.monotonic()
        if self.config.adversary == "poison":
            await asyncio.to_thread(worker.poison)
        try:
            result = await diloco_round(peer, group, worker.outer, worker.params,
                                        float(max(worker.samples_since_merge, 1)),
                                        Codec.from_string(self.config.merge_codec))
        except AllReduceError as exc:
            log.warning("stage %d merge round %d failed: %s", stage, round_, exc)
            return  # the next heartbeat sees our version is not the latest and resyncs
        digest = worker.merged(worker.global_version + 1)
        contributors = sorted(result.report.contributors)
        log.info("stage %d merge round %d done in %.1fs with %d contributors", stage, round_,
                 time.monotonic() - started, len(contributors))
        try:
            reply = await orchestrator.merged(stage, round_, digest, result.report.contributors, result.report.gram)
            if reply["upload"]:
                await orchestrator.upload(stage, round_, contributors, worker.outer.to_bytes())
        except NetError as exc:
            log.warning("could not report merge round %d: %s", round_, exc)


