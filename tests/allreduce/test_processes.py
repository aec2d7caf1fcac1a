"""Peers as separate processes on loopback, with real signatures, killed with
SIGKILL at chosen points of the protocol, slowed down, or sending a corrupted
part. Whatever happens, every surviving peer ends with the same bytes and the
same report of whose contributions they hold, or every one of them raises.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest
from iota.codec import Codec
from tests.allreduce.swarm import Swarm, hotkey

pytestmark = pytest.mark.slow

NUMEL = 100_003  # not a multiple of the block: the last part is short
# Loopback moves far more than min_throughput, so holders close early on the
# measured rate, while every bound stays generous for a loaded 2-core machine.
CONFIG = {"floor": 1.0, "slack": 3.0, "min_throughput": 1e5, "part_bytes": 8192, "max_inflight": 2}
# The survivors' own deadline is ~floor + slack * (measured transfer time);
# this is what a test allows them, process start-up excluded.
SURVIVORS_FINISH_WITHIN = 15.0


@pytest.fixture
def swarms(tmp_path) -> Iterator[list[Swarm]]:
    started: list[Swarm] = []
    try:
        yield started
    finally:
        for swarm in started:
            swarm.stop()


def launch(swarms, tmp_path, n, rounds, faults=None, bandwidths=None, config=None) -> Swarm:
    swarm = Swarm(tmp_path / f"swarm{len(swarms)}", n, rounds, {**CONFIG, **(config or {})}, faults or {}, bandwidths)
    swarms.append(swarm)
    swarm.start()
    return swarm


def sorted_index(n: int, position: int) -> int:
    """The peer whose hotkey comes `position`-th in sorted order (members are sorted)."""
    return sorted(range(n), key=hotkey)[position]


def error_bound(codec: str, inputs_max: float, mean_max: float) -> float:
    """Worst-case error of the mean: each input's encoding error, then the mean's own."""
    spec = Codec.from_string(codec)
    if spec.kind == "raw":
        return 1e-5 * inputs_max
    if spec.kind == "fp16":
        return (inputs_max + mean_max) * 2.0**-10
    qmax = 2 ** (spec.bits - 1) - 1
    return (inputs_max + mean_max) / qmax


def check_round(swarm: Swarm, round_index: int, survivors: list[int]) -> dict:
    """Every survivor completed with identical bytes and report; the mean is right. Returns one report."""
    results = swarm.round_results(round_index, survivors)
    for i, line in results.items():
        assert line["ok"], f"peer {i}: {line.get('error')}"
    assert len({line["frames_digest"] for line in results.values()}) == 1
    assert len({line["mean_xxh64"] for line in results.values()}) == 1
    reports = [line["report"] for line in results.values()]
    for key in ("contributors", "excluded", "decision", "fingerprint"):
        assert all(r[key] == reports[0][key] for r in reports), key
    report = reports[0]
    assert all(s["complete"] and (s["served_by"] or s["relayed_by"]) for r in reports for s in r["shards"])
    assert all(r["bytes_sent"] > 0 and r["bytes_received"] > 0 for r in reports)
    # The mean the survivors hold is the exact weighted mean of the reported contributors.
    exact = swarm.exact_mean(round_index, report["contributors"])
    mean = swarm.mean(round_index, survivors[0]).double()
    bound = error_bound(swarm.rounds[round_index]["codec"], swarm.inputs_max(round_index), exact.abs().max().item())
    assert (mean - exact).abs().max().item() <= bound
    return report


def one_round(codec: str = "int8/b64", numel: int = NUMEL) -> list[dict]:
    return [{"round_id": "merge", "numel": numel, "codec": codec}]


def test_four_peers_agree_on_the_exact_weighted_mean_for_every_codec(swarms, tmp_path):
    codecs = {"raw": "raw", "fp16": "fp16", "int8": "int8/b64", "int4": "int4/b64"}
    rounds = [{"round_id": name, "numel": NUMEL, "codec": codec} for name, codec in codecs.items()]
    bandwidths = [1.0, 2.0, 3.0, 4.0]
    swarm = launch(swarms, tmp_path, 4, rounds, bandwidths=bandwidths)
    swarm.wait_results([0, 1, 2, 3], timeout=60)
    for k in range(len(rounds)):
        report = check_round(swarm, k, [0, 1, 2, 3])
        assert report["contributors"] == {hotkey(i): swarm.weight(k, i) for i in range(4)}
        assert report["excluded"] == {} and report["unreachable"] == {}
        # Each shard is in proportion to its owner's declared bandwidth (to a block).
        bandwidth = {hotkey(i): b for i, b in enumerate(bandwidths)}
        for shard in report["shards"]:
            share = NUMEL * bandwidth[shard["owner"]] / sum(bandwidths)
            assert abs(shard["end"] - shard["begin"] - share) <= 64


def test_eight_peers_agree(swarms, tmp_path):
    swarm = launch(swarms, tmp_path, 8, one_round(numel=50_000))
    swarm.wait_results(list(range(8)), timeout=60)
    report = check_round(swarm, 0, list(range(8)))
    assert len(report["contributors"]) == 8


@pytest.mark.parametrize("point", ["before_send", "mid_send"])
def test_a_peer_killed_before_or_while_sending_is_excluded_everywhere(swarms, tmp_path, point):
    victim, survivors = 1, [0, 2, 3]
    swarm = launch(swarms, tmp_path, 4, one_round(), faults={victim: {"kill_at": point}})
    elapsed = swarm.wait_results(survivors, timeout=60)
    swarm.processes[victim].join(10)
    assert swarm.exitcode(victim) == -signal.SIGKILL
    report = check_round(swarm, 0, survivors)
    assert set(report["contributors"]) == {hotkey(i) for i in survivors}
    assert hotkey(victim) in report["excluded"]
    # The victim owned a shard: its backup served it to everyone.
    owned = next(s for s in report["shards"] if s["owner"] == hotkey(victim))
    for line in swarm.round_results(0, survivors).values():
        served = next(s for s in line["report"]["shards"] if s["index"] == owned["index"])["served_by"]
        assert served == [owned["backup"]]
    assert elapsed < SURVIVORS_FINISH_WITHIN


@pytest.mark.parametrize("victims", [(0,), (0, 2)], ids=["owner", "owner-and-another"])
def test_owners_killed_after_the_decision_are_excluded_when_the_survivors_run_the_round_again(
    swarms, tmp_path, victims
):
    # The first member in sorted order holds the first decision register and owns shard 0;
    # it dies on recording the decision, taking its own parts of shard 0 (nobody else has
    # them) with it. The third dies as it records the decision too: the double failure.
    killed = [sorted_index(4, position) for position in victims]
    survivors = [i for i in range(4) if i not in killed]
    swarm = launch(swarms, tmp_path, 4, one_round(), faults={i: {"kill_at": "after_decision"} for i in killed})
    elapsed = swarm.wait_results(survivors, timeout=60)
    for i in killed:
        swarm.processes[i].join(10)
        assert swarm.exitcode(i) == -signal.SIGKILL
    report = check_round(swarm, 0, survivors)
    assert set(report["contributors"]) == {hotkey(i) for i in survivors}
    assert set(report["excluded"]) == {hotkey(i) for i in killed}
    for line in swarm.round_results(0, survivors).values():
        assert line["report"]["round_id"] == "merge.again"
        assert "no holder served part" in line["report"]["again_after"]
        for shard in line["report"]["shards"]:  # each dead owner's shard came from its backup
            if shard["owner"] in report["excluded"]:
                assert shard["served_by"] == [shard["backup"]]
    assert elapsed < SURVIVORS_FINISH_WITHIN


@pytest.mark.parametrize("delay, counted", [(0.2, True), (2.5, False)])
def test_a_slow_sender_is_counted_or_not_consistently_and_gets_the_mean(swarms, tmp_path, delay, counted):
    # A holder closes no earlier than `floor` (1 s) after opening and no later
    # than floor + slack * bytes / min_throughput (~1.5 s with this config),
    # whatever it measures: 0.2 s late is in time everywhere, 2.5 s nowhere.
    slow = 2
    config = {"min_throughput": 1e6}
    swarm = launch(swarms, tmp_path, 4, one_round(), faults={slow: {"send_delay": delay}}, config=config)
    swarm.wait_results([0, 1, 2, 3], timeout=60)
    report = check_round(swarm, 0, [0, 1, 2, 3])  # the slow peer ends with the same bytes
    assert (hotkey(slow) in report["contributors"]) == counted
    assert (hotkey(slow) in report["excluded"]) == (not counted)


def test_a_corrupted_part_excludes_its_sender_and_is_reported(swarms, tmp_path):
    # The part is damaged before it is signed: the signature verifies, only
    # the frame's checksum can tell.
    bad = 3
    swarm = launch(swarms, tmp_path, 4, one_round(), faults={bad: {"corrupt_part": 0}})
    swarm.wait_results([0, 1, 2, 3], timeout=60)
    report = check_round(swarm, 0, [0, 1, 2, 3])
    assert set(report["contributors"]) == {hotkey(i) for i in range(3)}
    assert "checksum" in report["excluded"][hotkey(bad)]


@pytest.mark.parametrize("liar", [None, "mean", "gram"], ids=["honest-relays", "first-relay-lies", "first-relay-lies-about-gram"])
def test_a_peer_no_holder_serves_gets_the_attested_mean_from_a_member_that_fetched_it(swarms, tmp_path, liar):
    # The owner of shard 1 serves every peer but one (as if the link between them were down)
    # and its backup serves no mean at all: without relays, that one peer would raise while
    # the others complete. The member it asks first may hand on damaged means or inner
    # products: the holder's attestation does not fit them, and the next member's do.
    first, owner, backup, cut_off = (sorted_index(4, position) for position in range(4))
    faults = {owner: {"withhold_means_from": hotkey(cut_off)}, backup: {"serve_no_means": True}}
    if liar:
        faults[first] = {"corrupt_relays": liar}
    swarm = launch(swarms, tmp_path, 4, one_round(), faults=faults)
    swarm.wait_results([0, 1, 2, 3], timeout=60)
    report = check_round(swarm, 0, [0, 1, 2, 3])
    assert set(report["contributors"]) == {hotkey(i) for i in range(4)}
    lines = swarm.round_results(0, [0, 1, 2, 3])
    shard = lines[cut_off]["report"]["shards"][1]
    assert shard["served_by"] == [] and shard["relayed_by"] and hotkey(cut_off) not in shard["relayed_by"]
    assert (hotkey(first) in shard["relayed_by"]) == (liar is None)
    assert all(line["report"]["gram"] == lines[0]["report"]["gram"] for line in lines.values())
    # Everyone else got every shard from a holder; shard 2, whose owner serves no one but
    # itself, from its backup.
    for i, line in lines.items():
        if i != cut_off:
            assert all(s["relayed_by"] == [] for s in line["report"]["shards"])
        assert line["report"]["shards"][2]["served_by"] == [hotkey(backup if i == backup else cut_off)]


def test_losing_both_holders_of_a_shard_fails_the_round_on_every_survivor(swarms, tmp_path):
    owner, backup = sorted_index(4, 1), sorted_index(4, 2)  # the holders of shard 1
    survivors = [i for i in range(4) if i not in (owner, backup)]
    faults = {owner: {"kill_at": "before_send"}, backup: {"kill_at": "before_send"}}
    swarm = launch(swarms, tmp_path, 4, one_round(), faults=faults)
    elapsed = swarm.wait_results(survivors, timeout=60)
    for i, line in swarm.round_results(0, survivors).items():
        assert not line["ok"], f"peer {i} returned a mean without shard 1"
        assert "shard 1" in line["error"] and line["report"]["error"]
        assert line["report"]["decision"] is None and line["report"]["contributors"] == {}
    assert elapsed < SURVIVORS_FINISH_WITHIN
