"""`local`: a whole swarm on this machine, every node its own process on loopback.

An orchestrator, `stages x miners_per_stage` miners and one validator, with
dev keys registered on a LocalChain file. Dead miners are replaced by fresh
ones (new hotkeys), which join and load the latest merged weights. Tests use
`LocalSwarm` directly to kill nodes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iota.chain import LocalChain, dev_keypair
from iota.miner.service import measure_flops
from iota.model.recipe import Recipe

ORCHESTRATOR_KEY = "iota-local-orchestrator"
VALIDATOR_KEY = "iota-local-validator"


def miner_key(i: int) -> str:
    return f"iota-local-miner-{i}"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: Path


@dataclass
class LocalSwarm:
    directory: Path
    recipe: Recipe
    miners_per_stage: int = 2
    spare_miners: int = 8
    threads: int = 1
    orchestrator_settings: dict[str, Any] = field(default_factory=dict)
    miner_settings: dict[str, Any] = field(default_factory=dict)
    validator: bool = True
    adversaries: dict[int, str] = field(default_factory=dict)  # miner number -> MinerConfig.adversary
    miner_stages: dict[int, int] = field(default_factory=dict)  # miner number -> the stage it asks for
    port: int = 0
    children: dict[str, Child] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    next_miner: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def miner_names(self) -> list[str]:
        return [name for name in self.children if name.startswith("iota-local-miner-")]

    def start(self, timeout: float = 120.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "logs").mkdir(exist_ok=True)
        total = self.recipe.stages * self.miners_per_stage + self.spare_miners
        neurons: dict[str, Any] = {dev_keypair(ORCHESTRATOR_KEY).ss58_address: "orchestrator",
                                   dev_keypair(VALIDATOR_KEY).ss58_address: "validator"}
        neurons.update({dev_keypair(miner_key(i)).ss58_address: "miner" for i in range(total)})
        LocalChain(neurons).save(self.directory / "chain.json")
        self.port = self.port or free_port()
        # Miners share this machine: measured once here, before they compete for it, so
        # stage assignment sees equal miners instead of measurement noise.
        self.miner_settings.setdefault("flops", measure_flops())
        self.start_orchestrator(timeout)
        for _ in range(self.recipe.stages * self.miners_per_stage):
            self.start_miner()
        if self.validator:
            self._spawn(VALIDATOR_KEY, ["validator", "--key", VALIDATOR_KEY, "--orchestrator", self.url,
                                        *self._common()])

    def _common(self) -> list[str]:
        return ["--chain", str(self.directory / "chain.json"), "--threads", str(self.threads),
                "--parent-pid", str(os.getpid())]

    def _spawn(self, name: str, args: list[str]) -> Child:
        log = self.directory / "logs" / f"{name}.log"
        with open(log, "ab") as out:
            process = subprocess.Popen([sys.executable, "-m", "iota.node", *args], stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        child = Child(name, process, log)
        self.children[name] = child
        return child

    def start_orchestrator(self, timeout: float = 120.0) -> None:
        args = ["orchestrator", "--dir", str(self.directory), "--key", ORCHESTRATOR_KEY, "--port", str(self.port),
                *self._common()]
        for name, value in self.recipe.to_dict().items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        for name, value in self.orchestrator_settings.items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        child = self._spawn("orchestrator", args)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.state()
                return
            except OSError:
                if child.process.poll() is not None:
                    raise RuntimeError(f"the orchestrator exited with {child.process.returncode}; see {child.log}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the orchestrator did not answer within {timeout}s; see {child.log}")
                time.sleep(0.2)

    def start_miner(self) -> str:
        name = miner_key(self.next_miner)
        self.next_miner += 1
        if self.next_miner > self.recipe.stages * self.miners_per_stage + self.spare_miners:
            raise RuntimeError("no registered miner keys left; raise spare_miners")
        args = ["miner", "--key", name, "--orchestrator", self.url, *self._common()]
        number = self.next_miner - 1
        settings = {**self.miner_settings, "adversary": self.adversaries.get(number, ""),
                    "stage": self.miner_stages.get(number, -1)}
        for setting, value in settings.items():
            args += [f"--{setting.replace('_', '-')}", str(value)]
        self._spawn(name, args)
        return name

    def state(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/api/state", timeout=10) as reply:
            return json.loads(reply.read())

    def kill(self, name: str) -> None:
        """SIGKILL a child (no chance to clean up, as a power cut)."""
        child = self.children[name]
        child.process.send_signal(signal.SIGKILL)
        child.process.wait()

    def supervise(self) -> None:
        """Replace miners that died (a miner exits 0 only when the run is finished); raise if the orchestrator died."""
        for name in list(self.miner_names):
            child = self.children[name]
            if child.process.poll() not in (None, 0) and name not in self.lost:
                self.lost.append(name)
                self.replaced.append(self.start_miner())
        orchestrator = self.children["orchestrator"]
        if orchestrator.process.poll() is not None:
            raise RuntimeError(f"the orchestrator exited with {orchestrator.process.returncode}; "
                               f"see {orchestrator.log}")

    def finished(self, state: dict[str, Any]) -> bool:
        return state["status"] == "finished"

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every child, SIGKILL those still alive after `grace` seconds."""
        for child in self.children.values():
            if child.process.poll() is None:
                child.process.terminate()
        deadline = time.monotonic() + grace
        for child in self.children.values():
            try:
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()

    def wait_validator(self, timeout: float) -> None:
        """Give the validator its chance to evaluate the final model."""
        child = self.children.get(VALIDATOR_KEY)
        if child is None:
            return
        try:
            child.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass


def report(swarm: LocalSwarm, state: dict[str, Any], seconds: float) -> dict[str, Any]:
    """What a run did, as `--report` writes it."""
    traffic = state["traffic"]
    wire = traffic["activations"] + traffic["gradients"] + traffic["allreduce"]
    tokens = state["tokens"]
    evals = state["evals"]
    losses = state["losses"]
    return {
        "recipe": state["recipe"],
        "miners_per_stage": swarm.miners_per_stage,
        "samples": state["samples"],
        "tokens": tokens,
        "wall_seconds": round(seconds, 2),
        "training_seconds": round(state["training_seconds"], 2),
        "tokens_per_second": round(state["tokens_per_second"], 1),
        "loss_curve": losses,
        "first_loss": _mean([loss for _, loss in losses[:10]]),
        "last_loss": _mean([loss for _, loss in losses[-10:]]),
        "val_curve": [[e["samples_done"], e["val_loss"]] for e in evals],
        "final_val_loss": evals[-1]["val_loss"] if evals else None,
        "compression_ratio": state["compression_ratio"],
        "bytes_on_wire": {**{k: traffic[k] for k in ("activations", "gradients", "allreduce")}, "total": wire},
        "wire_bytes_per_token": wire / tokens if tokens else None,
        "merges_done": sum(1 for m in state["merges"] if m["outcome"] == "merged"),
        "merges_failed": sum(1 for m in state["merges"] if m["outcome"] != "merged"),
        "miners_lost": swarm.lost,
        "miners_replaced": swarm.replaced,
        "miners_dropped_by_orchestrator": state["miners_lost"],
        "moves": state["moves"],
        # Who the validators caught, and the scores they published (validator -> miner -> score).
        "flags": [{k: f[k] for k in ("hotkey", "reason", "validator")} for f in state["flags"]],
        "scores": {v: {h: s["score"] for h, s in (scores or {}).items()} for v, scores in state["scores"].items()},
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
