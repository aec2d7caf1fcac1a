"""Butterfly all-reduce against torch.distributed gloo, in the same run.

4 peers as processes on 127.0.0.1, each with its own fp32 vector (64 Mi
elements by default), average them: first with gloo's all_reduce (ring, no
signing, no compression, no fault tolerance), then with iota.allreduce for
each codec. Per codec: seconds per round (each round starts once every peer
finished the one before, as gloo's start at a barrier; timed from the last
peer joining to the last one finishing; median over --repeats)
beside gloo's, the CPU seconds all peers spent in it (summed; beside
seconds x cores this tells a CPU-bound round from a link-bound one), their
minor page faults and context switches (summed), the slowest peer's seconds
in each phase (scatter, decide, gather), and body bytes each peer sent and received per round (HTTP headers not counted) against the bandwidth-optimal 2(N-1)/N x
the fp32 vector. Prints JSON lines.

With --netlab RATE (root, the netlab tool in ../shared/tools) every peer, gloo rank or
iota peer, runs in its own network namespace at 10.77.0.{i+1}, each host's
uplink and downlink shaped to RATE (e.g. 1gbit); the lab is taken down at the
end. Every line says its "link": RATE, or "loopback" without --netlab, and for
a RATE in bit/kbit/mbit/gbit its "wire_seconds": how long the bytes a peer sends
(or receives, if more) take at RATE alone, the bound no round can beat.

With --authenticated-floor, gloo runs once more with each rank BLAKE3-hashing,
in a thread beside its all_reduce, as many bytes as a butterfly peer hashes to
authenticate a round (its parts sent and received, its mean, the means it
receives): what signing every byte adds to gloo at the least, so the floor
for any signed uncompressed round on this machine ("gloo+blake3").

    python bench/allreduce.py [--authenticated-floor] [--elements N] [--repeats R] [--codecs raw fp16 int8/b64 int4/b64] [--netlab RATE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch.distributed as dist

from iota.allreduce import AllReduceConfig
from iota.allreduce.worker import synthetic_vector
from iota.chain import LocalChain, dev_keypair
from iota.codec import Codec
from iota.net.answers import payload_digest

# The team's netlab tool sits in shared/ beside the checkout; IOTA_NETLAB points elsewhere.
NETLAB = Path(os.environ.get("IOTA_NETLAB", Path(__file__).resolve().parents[2] / "shared" / "tools" / "netlab"))
LAB = "iotabench"  # our own netlab prefix, apart from the labs others bring up


def peer_name(i: int) -> str:
    return f"iota-bench-allreduce-{i}"


def weight(i: int) -> float:
    return 1.0 + i


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rate_bits(rate: str) -> float | None:
    """tc's RATE (e.g. 1gbit, 250mbit) in bits per second; None for units this does not read."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)", rate.lower())
    if match is None:
        return None
    return float(match[1]) * {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}[match[2]]


def wire_seconds(nbytes: float, bits_per_second: float | None) -> float | None:
    """How long `nbytes` take through one shaped uplink: the bound no round can beat."""
    return None if bits_per_second is None else 8 * nbytes / bits_per_second


def peer_host(i: int, lab: bool) -> str:
    """The address peer i listens on: netlab puts its host i at 10.77.0.{i+1}."""
    return f"10.77.0.{i + 1}" if lab else "127.0.0.1"


def start_peer(i: int, argv: list[str], lab: bool, lab_env: dict[str, str] | None = None) -> subprocess.Popen:
    """Peer i's process: on this machine, or inside netlab host i with lab_env added to its environment."""
    if not lab:
        return subprocess.Popen(argv)
    env = {**os.environ, "NETLAB_PREFIX": LAB, **(lab_env or {})}
    # netlab exec ends in `exec ip netns exec`, which execs argv: the Popen is the peer itself, kill() reaches it.
    return subprocess.Popen([str(NETLAB), "exec", str(i), *argv], env=env)


def check_netlab() -> None:
    if os.geteuid() != 0:
        sys.exit("--netlab needs root: it creates network namespaces")
    if not os.access(NETLAB, os.X_OK):
        sys.exit(f"--netlab needs the netlab tool at {NETLAB}, which is missing")
    namespaces = subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True).stdout
    if any(line.startswith(f"{LAB}-") for line in namespaces.splitlines()):
        # Left alone: they may belong to another bench that is still running.
        sys.exit(f"netlab namespaces {LAB}-* exist already (another bench's, or a killed one's: {NETLAB} down {LAB})")


@contextmanager
def netlab(hosts: int, rate: str) -> Iterator[None]:
    """netlab hosts LAB-0..hosts-1 with links at rate, taken down however the block exits."""
    try:
        # netlab's progress line goes to stderr: stdout stays JSON lines.
        subprocess.run([str(NETLAB), "up", str(hosts), rate, LAB], check=True, stdout=sys.stderr)
        yield
    finally:
        subprocess.run([str(NETLAB), "down", LAB], check=True)


def gloo_rank(
    rank: int, world: int, host: str, port: int, numel: int, repeats: int, out: str, hash_wire: bool
) -> None:
    """One gloo process: the weighted sum by all_reduce, then the division; seconds and CPU seconds per round.

    With hash_wire a thread BLAKE3-hashes, beside each all_reduce, as many bytes in parts as a
    butterfly peer must hash to authenticate its round (`authenticated_bytes`): the least an
    all-reduce that signs every byte can add to gloo's CPU.
    """
    dist.init_process_group("gloo", init_method=f"tcp://{host}:{port}", rank=rank, world_size=world)
    try:
        source = synthetic_vector(numel, rank) * weight(rank)
        total = sum(weight(i) for i in range(world))
        parts = hashed_parts(memoryview(source.numpy()).cast("B"), authenticated_bytes(4 * numel, world))
        times, cpu = [], []
        for _ in range(repeats + 1):  # the first round warms up connections and pages
            x = source.clone()
            dist.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            hashing = threading.Thread(target=lambda: [payload_digest(p) for p in parts]) if hash_wire else None
            if hashing is not None:
                hashing.start()
            dist.all_reduce(x)
            x /= total
            if hashing is not None:
                hashing.join()
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        Path(out).write_text(json.dumps({"seconds": times[1:], "cpu_seconds": cpu[1:]}))
    finally:
        dist.destroy_process_group()


def authenticated_bytes(frame_bytes: int, world: int) -> int:
    """Bytes one butterfly peer BLAKE3-hashes per round: the parts it sends and receives
    ((N-1)/N of a frame each way), its shard's mean once, and the means it receives."""
    return frame_bytes * (2 * (world - 1) + 1 + (world - 1)) // world


def hashed_parts(frame: memoryview, nbytes: int, part_bytes: int = 4 * 2**20) -> list[memoryview]:
    """`nbytes` of `frame` (round and round) as parts of at most part_bytes, as the streams hash them."""
    parts, offset = [], 0
    while nbytes > 0:
        size = min(part_bytes, nbytes, len(frame) - offset)
        parts.append(frame[offset:offset + size])
        offset, nbytes = (offset + size) % len(frame), nbytes - size
    return parts


def run_gloo(world: int, numel: int, repeats: int, directory: Path, lab: bool, hash_wire: bool) -> dict:
    """gloo's rounds (a round ends when its slowest rank does) and their CPU seconds, summed over ranks."""
    port = free_port()  # free on this machine, and in a fresh netlab host too
    outs = [directory / f"gloo-{r}.json" for r in range(world)]
    procs = [
        start_peer(
            r,
            [sys.executable, __file__, "--gloo-rank", str(r), "--world", str(world), "--host", peer_host(0, lab),
             "--port", str(port), "--elements", str(numel), "--repeats", str(repeats), "--out", str(outs[r]),
             *(["--hash-wire"] if hash_wire else [])],
            lab,
            # Gloo picks its interface from the hostname, which resolves to 127.0.0.1; ranks in other
            # namespaces cannot reach that, so name the host's link.
            {"GLOO_SOCKET_IFNAME": f"h{r}"},
        )
        for r in range(world)
    ]
    try:
        for p in procs:
            if p.wait() != 0:
                raise RuntimeError(f"a gloo process exited with {p.returncode}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    per_rank = [json.loads(o.read_text()) for o in outs]
    return {
        "rounds": [max(ts) for ts in zip(*(r["seconds"] for r in per_rank))],
        "cpu_seconds_all_ranks": statistics.median(sum(cs) for cs in zip(*(r["cpu_seconds"] for r in per_rank))),
    }


def run_iota(
    world: int, numel: int, repeats: int, codecs: list[str], config: dict, directory: Path, lab: bool
) -> dict[int, list[dict]]:
    """Every codec's rounds in one set of peer processes; returns each peer's result lines."""
    keys = [dev_keypair(peer_name(i)) for i in range(world)]
    LocalChain({k.ss58_address: "miner" for k in keys}).save(directory / "chain.json")
    rounds = []
    for c, codec in enumerate(codecs):
        # One warm-up round per codec, then the measured ones.
        rounds += [{"round_id": f"c{c}-r{r}", "numel": numel, "codec": codec} for r in range(repeats + 1)]
    procs = []
    try:
        for i in range(world):
            # Namespaces share the filesystem: specs, addresses and results all go through `directory`.
            spec = {
                "name": peer_name(i), "host": peer_host(i, lab), "chain": str(directory / "chain.json"),
                "dir": str(directory), "wait": 120, "barrier": [peer_name(j) for j in range(world)],
                "rounds": [{**r, "seed": i, "weight": weight(i)} for r in rounds], "config": config,
            }
            path = directory / f"{peer_name(i)}.json"
            path.write_text(json.dumps(spec))
            procs.append(start_peer(i, [sys.executable, "-m", "iota.allreduce.worker", str(path)], lab))
        members = []
        for i in range(world):
            address = directory / f"{peer_name(i)}.address"
            while not address.exists():
                if procs[i].poll() is not None:
                    raise RuntimeError(f"peer {i} exited before serving")
                time.sleep(0.05)
            members.append({**json.loads(address.read_text()), "bandwidth": 1.0})
        (directory / ".group.tmp").write_text(json.dumps({"members": members}))
        os.replace(directory / ".group.tmp", directory / "group.json")
        for p in procs:
            if p.wait() != 0:
                raise RuntimeError(f"a peer exited with {p.returncode}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    lines = {}
    for i in range(world):
        text = (directory / f"{peer_name(i)}.results.jsonl").read_text()
        lines[i] = [json.loads(x) for x in text.splitlines()]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--elements", type=int, default=64 * 2**20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--codecs", nargs="+", default=["raw", "fp16", "int8/b64", "int4/b64"])
    defaults = AllReduceConfig()
    parser.add_argument("--part-bytes", type=int, default=defaults.part_bytes, help="wire bytes per streamed part")
    parser.add_argument("--max-inflight", type=int, default=defaults.max_inflight)
    parser.add_argument("--workdir", help="keep the peers' configs and result lines here (default: a temporary dir)")
    parser.add_argument("--netlab", metavar="RATE", help="run each peer in its own netlab host, links shaped to RATE")
    parser.add_argument("--authenticated-floor", action="store_true",
                        help="also run gloo with each rank hashing what a signing peer must: the floor for uncompressed")
    # Internal: one gloo rank (the script runs itself for each).
    parser.add_argument("--gloo-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--host", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--hash-wire", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gloo_rank is not None:
        gloo_rank(args.gloo_rank, args.world, args.host, args.port, args.elements, args.repeats, args.out,
                  args.hash_wire)
        return
    lab = args.netlab is not None
    if lab:
        check_netlab()
        # SIGTERM (kill, timeout) ends the run through the finally blocks too, so the lab comes down.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    link = args.netlab if lab else "loopback"
    bits_per_second = rate_bits(args.netlab) if lab else None

    n, world = args.elements, args.peers
    fp32_bytes = 4 * n
    optimal = 2 * (world - 1) / world * fp32_bytes
    config = {"part_bytes": args.part_bytes, "max_inflight": args.max_inflight}
    print(json.dumps({"bench": "allreduce", "link": link, "peers": world, "elements": n, "fp32_bytes": fp32_bytes,
                      "optimal_bytes_per_peer": optimal, "cpus": os.cpu_count(), "config": config}), flush=True)
    with (
        tempfile.TemporaryDirectory(prefix="iota-bench-allreduce-") as tmp,
        netlab(world, args.netlab) if lab else nullcontext(),
    ):
        directory = Path(args.workdir or tmp)
        directory.mkdir(parents=True, exist_ok=True)
        gloo = run_gloo(world, n, args.repeats, directory, lab, hash_wire=False)
        gloo_seconds = statistics.median(gloo["rounds"])
        print(json.dumps({"bench": "gloo", "link": link, "seconds": gloo_seconds, **gloo,
                          "bytes_per_peer_ring": optimal, "wire_seconds": wire_seconds(optimal, bits_per_second)}),
              flush=True)
        if args.authenticated_floor:
            floor = run_gloo(world, n, args.repeats, directory, lab, hash_wire=True)
            print(json.dumps({"bench": "gloo+blake3", "link": link, "seconds": statistics.median(floor["rounds"]),
                              **floor, "hashed_bytes_per_peer": authenticated_bytes(fp32_bytes, world),
                              "time_vs_gloo": statistics.median(floor["rounds"]) / gloo_seconds}), flush=True)
        lines = run_iota(world, n, args.repeats, args.codecs, config, directory, lab)
    for c, codec in enumerate(args.codecs):
        round_ids = [f"c{c}-r{r}" for r in range(1, args.repeats + 1)]
        seconds, cpu, faults, switches, sent, received, failures, phases = [], [], [], [], [], [], [], []
        for round_id in round_ids:
            round_lines = [next(x for x in lines[i] if x.get("round_id") == round_id) for i in range(world)]
            per_peer = [x["report"] for x in round_lines]
            cpu.append(sum(x["cpu_seconds"] for x in round_lines))
            faults.append(sum(x["minor_faults"] for x in round_lines))
            switches.append(sum(x["context_switches"] for x in round_lines))
            failures += [r["error"] for r in per_peer if r["error"]]
            # The slowest peer's phases: where the round's wall time went.
            phases.append(max(per_peer, key=lambda r: r["duration"])["phases"])
            # Like gloo's barrier: from the moment the last peer joined to the moment the last one finished.
            last_join = max(r["started_at"] for r in per_peer)
            seconds.append(max(r["started_at"] + r["duration"] for r in per_peer) - last_join)
            traffic = [next(x for x in lines[i] if x.get("drained"))["traffic"][round_id] for i in range(world)]
            sent.append(statistics.mean(t["sent"] for t in traffic))
            received.append(statistics.mean(t["received"] for t in traffic))
        digests = {x["frames_digest"] for i in range(world) for x in lines[i]
                   if x.get("ok") and x["round_id"].startswith(f"c{c}-")}
        frame_bytes = Codec.from_string(codec).frame_size((n,))
        median = statistics.median(seconds)
        print(json.dumps({
            "bench": "iota.allreduce", "link": link, "codec": codec, "seconds": median, "rounds": seconds,
            "gloo_seconds": gloo_seconds, "time_vs_gloo": median / gloo_seconds,
            "cpu_seconds_all_peers": statistics.median(cpu),
            "minor_faults_all_peers": statistics.median(faults),
            "context_switches_all_peers": statistics.median(switches),
            "phase_seconds_slowest_peer": {p: statistics.median(x.get(p, 0.0) for x in phases) for p in phases[0]},
            "sent_per_peer": statistics.mean(sent), "received_per_peer": statistics.mean(received),
            "wire_seconds": wire_seconds(max(statistics.mean(sent), statistics.mean(received)), bits_per_second),
            "sent_vs_optimal_fp32": statistics.mean(sent) / optimal,
            "sent_vs_optimal_same_codec": statistics.mean(sent) / (2 * (world - 1) / world * frame_bytes),
            "vector_frame_bytes": frame_bytes, "failures": failures,
            "identical_across_peers": not failures and len(digests) == 1,  # every round averages the same vectors
        }), flush=True)


if __name__ == "__main__":
    main()
