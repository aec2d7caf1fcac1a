"""Peers as real processes on loopback: a test starts a Swarm, the peers run
their rounds (iota.allreduce.worker), and the test reads what each wrote.

Children are forked from a forkserver that imported torch once, so a peer
starts in milliseconds instead of seconds; they are real processes all the
same (own sockets, own event loop, killable with SIGKILL).
"""

from __future__ import annotations

import json
import multiprocessing
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy
import torch

from iota.allreduce.worker import run_from_file, synthetic_vector
from iota.chain import LocalChain, dev_keypair

_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["iota.allreduce.worker"])


def peer_name(i: int) -> str:
    return f"iota-allreduce-test-{i}"


def hotkey(i: int) -> str:
    return dev_keypair(peer_name(i)).ss58_address


@dataclass
class Swarm:
    """`n` peers, each running `rounds` (per peer: seed and weight filled in)."""

    directory: Path
    n: int
    rounds: list[dict[str, Any]]
    config: dict[str, Any]
    faults: dict[int, dict[str, Any]] = field(default_factory=dict)
    bandwidths: list[float] | None = None
    processes: list[multiprocessing.process.BaseProcess] = field(default_factory=list)

    def seed(self, round_index: int, peer: int) -> int:
        return 1000 * round_index + peer

    def weight(self, round_index: int, peer: int) -> float:
        return 1.0 + peer + 0.5 * round_index

    def start(self, timeout: float = 30.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        LocalChain({hotkey(i): "miner" for i in range(self.n)}).save(self.directory / "chain.json")
        for i in range(self.n):
            spec = {
                "name": peer_name(i),
                "chain": str(self.directory / "chain.json"),
                "dir": str(self.directory),
                "wait": timeout,
                "rounds": [
                    {**r, "seed": self.seed(k, i), "weight": self.weight(k, i)} for k, r in enumerate(self.rounds)
                ],
                "config": self.config,
                "faults": self.faults.get(i, {}),
                "save_means": True,
            }
            path = self.directory / f"{peer_name(i)}.json"
            path.write_text(json.dumps(spec))
            process = _CONTEXT.Process(target=run_from_file, args=(str(path),), name=peer_name(i))
            process.start()
            self.processes.append(process)
        deadline = time.monotonic() + timeout
        members = []
        for i in range(self.n):
            address = self.directory / f"{peer_name(i)}.address"
            while not address.exists():
                if time.monotonic() > deadline or not self.processes[i].is_alive():
                    raise RuntimeError(f"peer {i} did not start serving")
                time.sleep(0.01)
            entry = json.loads(address.read_text())
            bandwidth = self.bandwidths[i] if self.bandwidths else 1.0
            members.append({**entry, "bandwidth": bandwidth})
        tmp = self.directory / ".group.json.tmp"
        tmp.write_text(json.dumps({"members": members}))
        tmp.rename(self.directory / "group.json")

    def wait_results(self, peers: list[int], timeout: float) -> float:
        """Wait until each of `peers` wrote a line for every round; returns the seconds it took.

        Peers keep serving a while after their last round (others may still
        fetch from them); tests stop them once everyone has its result.
        """
        started = time.monotonic()
        round_ids = {r["round_id"] for r in self.rounds}
        while True:
            pending = [i for i in peers if not round_ids <= {r.get("round_id") for r in self.results(i)}]
            if not pending:
                return time.monotonic() - started
            dead = [i for i in pending if not self.processes[i].is_alive()]
            if dead:
                raise AssertionError(f"peers {dead} exited (codes {[self.exitcode(i) for i in dead]}) without results")
            if time.monotonic() - started > timeout:
                raise AssertionError(f"peers {pending} have no result after {timeout}s")
            time.sleep(0.02)

    def join(self, timeout: float) -> float:
        """Wait for every peer to exit; returns the seconds it took."""
        started = time.monotonic()
        for process in self.processes:
            process.join(max(0.0, started + timeout - time.monotonic()))
        alive = [p.name for p in self.processes if p.is_alive()]
        if alive:
            raise AssertionError(f"peers still running after {timeout}s: {alive}")
        return time.monotonic() - started

    def stop(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.kill()
        for process in self.processes:
            process.join(10)

    def exitcode(self, i: int) -> int | None:
        return self.processes[i].exitcode

    def results(self, i: int) -> list[dict[str, Any]]:
        path = self.directory / f"{peer_name(i)}.results.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def round_results(self, round_index: int, peers: list[int]) -> dict[int, dict[str, Any]]:
        round_id = self.rounds[round_index]["round_id"]
        return {i: next(r for r in self.results(i) if r.get("round_id") == round_id) for i in peers}

    def mean(self, round_index: int, peer: int) -> torch.Tensor:
        """The mean `peer` ended the round with."""
        path = self.directory / f"{peer_name(peer)}.{self.rounds[round_index]['round_id']}.f32"
        return torch.from_numpy(numpy.fromfile(path, dtype=numpy.float32))

    def inputs_max(self, round_index: int) -> float:
        numel = self.rounds[round_index]["numel"]
        return max(synthetic_vector(numel, self.seed(round_index, i)).abs().max().item() for i in range(self.n))

    def exact_mean(self, round_index: int, contributors: dict[str, float]) -> torch.Tensor:
        """The weighted mean of the contributors' vectors, computed here in float64."""
        numel = self.rounds[round_index]["numel"]
        total = torch.zeros(numel, dtype=torch.float64)
        weights = 0.0
        for i in range(self.n):
            if hotkey(i) in contributors:
                w = contributors[hotkey(i)]
                assert w == self.weight(round_index, i)
                total += w * synthetic_vector(numel, self.seed(round_index, i)).double()
                weights += w
        return total / weights
