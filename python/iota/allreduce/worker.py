"""A peer in its own process, for tests and benchmarks:

    python -m iota.allreduce.worker CONFIG.json

CONFIG is JSON:
    name     dev key name (the hotkey is iota.chain.dev_keypair(name))
    host     address to serve on (optional, default 127.0.0.1; e.g. the
             peer's own address inside a network namespace)
    chain    a LocalChain file (LocalChain.save) that registers every peer
    dir      where the peer writes `{name}.address` once it serves, waits for
             `group.json` ({"members": [{"hotkey", "address", "bandwidth"}]}),
             and appends one JSON line per round to `{name}.results.jsonl`
    wait     seconds to wait for group.json before giving up
    rounds   [{"round_id", "numel", "seed", "weight", "codec"}]: the vector is
             synthetic_vector(numel, seed)
    config   AllReduceConfig fields (optional)
    faults   Faults fields (optional)
    barrier  names of peers (optional): each round after the first starts only once
             all of them wrote their line of the round before, as gloo's
             benchmark rounds start at a barrier (without it a peer that
             finished early starts sending while others still fetch means)
    save_means  if true, also write each mean as raw float32 to
             `{name}.{round_id}.f32` (tests compare it with the exact mean)
             and put its XXH64 in the result line

Each result line holds the round id, `ok`, the BLAKE3 digest of the mean's
frames (`frames_digest`) and the report. Peers still in the round share
the machine, so a benchmark run hashes only the frames: a quarter of the
mean's bytes at int8. After the last round the peer keeps serving
until the others had their chance to fetch from it, then writes a line with
the final byte counts per round and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch

from iota._C import block_pool_stats
from iota.allreduce.config import AllReduceConfig
from iota.allreduce.errors import AllReduceError
from iota.allreduce.faults import Faults
from iota.allreduce.group import Group, Member
from iota.allreduce.peer import AllReducePeer
from iota.chain import LocalChain, dev_keypair
from iota.codec import Codec, checksum
from iota.codec.tensors import huge_page_tensor
from iota.process import freeze_startup_objects

log = logging.getLogger(__name__)


def synthetic_vector(numel: int, seed: int) -> torch.Tensor:
    """A peer's test vector: standard normal values from a seeded generator."""
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def wait_for_file(path: Path, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout}s")
        await asyncio.sleep(0.01)
    return json.loads(path.read_text())


async def wait_for_round(directory: Path, names: list[str], round_id: str, timeout: float) -> None:
    """Until each of `names` wrote its result line of `round_id`."""
    deadline = time.monotonic() + timeout
    waiting = list(names)
    while waiting:
        path = directory / f"{waiting[0]}.results.jsonl"
        # Only whole lines: the peer may be appending one right now.
        lines = path.read_text().split("\n")[:-1] if path.exists() else []
        if any(json.loads(line).get("round_id") == round_id for line in lines):
            waiting.pop(0)
            continue
        if time.monotonic() > deadline:
            raise TimeoutError(f"{waiting[0]} did not finish round {round_id} within {timeout}s")
        await asyncio.sleep(0.005)


async def run(spec: dict[str, Any]) -> None:
    directory = Path(spec["dir"])
    name = spec["name"]
    chain = LocalChain.load(spec["chain"])
    peer = AllReducePeer(
        dev_keypair(name),
        chain,
        AllReduceConfig(**spec.get("config", {})),
        faults=Faults(**spec.get("faults", {})),
    )
    results = directory / f"{name}.results.jsonl"
    async with peer.serving(spec.get("host", "127.0.0.1"), 0):
        write_atomic(directory / f"{name}.address", json.dumps({"hotkey": peer.hotkey, "address": peer.address}))
        members = (await wait_for_file(directory / "group.json", spec["wait"]))["members"]
        reports = {}
        vectors: dict[tuple[int, int], torch.Tensor] = {}
        means: dict[int, torch.Tensor] = {}  # one output buffer per length, reused round after round
        for index, round_spec in enumerate(spec["rounds"]):
            if index and spec.get("barrier"):
                await wait_for_round(directory, spec["barrier"], spec["rounds"][index - 1]["round_id"], spec["wait"])
            group = Group(round_spec["round_id"], tuple(Member(**m) for m in members))
            key = (round_spec["numel"], round_spec["seed"])
            if key not in vectors:  # rounds often repeat a vector: make it once, keep only the last
                vectors = {key: synthetic_vector(*key)}
            vector = vectors[key]
            codec = Codec.from_string(round_spec["codec"])
            line: dict[str, Any] = {"round_id": group.round_id}
            cpu, usage = time.process_time(), _usage()
            try:
                if vector.numel() not in means:
                    means[vector.numel()] = huge_page_tensor(vector.numel())
                out = means[vector.numel()]
                result = await peer.allreduce(group, vector, round_spec["weight"], codec, out=out)
            except AllReduceError as exc:
                line.update(ok=False, cpu_seconds=time.process_time() - cpu, **_since(usage), error=str(exc),
                            report=exc.report.to_json())
                reports[group.round_id] = exc.report
            else:
                line.update(
                    ok=True,
                    # Every thread of this process during the call: its own round and serving others.
                    cpu_seconds=time.process_time() - cpu,
                    **_since(usage),
                    # In a thread: the loop goes on serving the peers still in the round.
                    frames_digest=await asyncio.to_thread(lambda: result.digest),
                    report=result.report.to_json(),
                )
                reports[group.round_id] = result.report
                if spec.get("save_means"):
                    line["mean_xxh64"] = checksum(result.mean)
                    (directory / f"{name}.{group.round_id}.f32").write_bytes(result.mean.numpy().tobytes())
            with results.open("a") as f:
                f.write(json.dumps(line) + "\n")
        await peer.drain()
        traffic = {round_id: peer.traffic(round_id) for round_id in reports}
        with results.open("a") as f:
            f.write(json.dumps({"drained": True, "traffic": traffic}) + "\n")


def _usage() -> dict[str, int]:
    """Page faults (the kernel clearing fresh memory), context switches and bytes the block
    pool mapped fresh, so far."""
    now = resource.getrusage(resource.RUSAGE_SELF)
    return {"minor_faults": now.ru_minflt, "context_switches": now.ru_nvcsw + now.ru_nivcsw,
            "fresh_block_bytes": block_pool_stats()["fresh_bytes"]}


def _since(before: dict[str, int]) -> dict[str, int]:
    return {key: value - before[key] for key, value in _usage().items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="path of the peer's JSON config")
    args = parser.parse_args(argv)
    run_from_file(args.config)


def run_from_file(path: str) -> None:
    """Entry point for a child process (multiprocessing target or CLI)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(process)d %(name)s %(message)s")
    freeze_startup_objects()
    asyncio.run(run(json.loads(Path(path).read_text())))


if __name__ == "__main__":
    main()
