"""Groups, plans and deadlines: what every peer derives identically from the same inputs."""

import pytest

from iota.allreduce import AllReduceConfig, Group, GroupError, Member, RoundPlan
from iota.chain import dev_keypair
from iota.codec import Codec

HOTKEYS = [dev_keypair(f"iota-plan-{i}").ss58_address for i in range(4)]


def group(bandwidths=(1.0, 1.0, 1.0, 1.0), round_id="r1") -> Group:
    members = [Member(h, f"http://127.0.0.1:{9000 + i}", b) for i, (h, b) in enumerate(zip(HOTKEYS, bandwidths))]
    return Group(round_id, tuple(reversed(members)))


def test_a_round_run_again_has_the_same_members_and_a_new_id_of_a_valid_length():
    assert group().again() == Group("r1.again", group().members)
    longest = group(round_id="x" * 128).again()
    assert longest.round_id == "x" * 122 + ".again" and longest.members == group().members
    assert RoundPlan(group().again(), 1000, Codec(kind="raw"), 256).fingerprint != RoundPlan(
        group(), 1000, Codec(kind="raw"), 256).fingerprint


def test_members_are_sorted_and_unique():
    assert group().hotkeys == sorted(HOTKEYS)
    with pytest.raises(GroupError, match="twice"):
        Group("r", (Member(HOTKEYS[0], "a"), Member(HOTKEYS[0], "b")))
    with pytest.raises(GroupError, match="round id"):
        Group("no spaces", (Member(HOTKEYS[0], "a"),))
    with pytest.raises(GroupError, match="bandwidth"):
        Member(HOTKEYS[0], "a", 0.0)


def test_shards_follow_bandwidth_on_block_boundaries_and_parts_are_bounded():
    g = group(bandwidths=(1, 2, 3, 4))
    codec = Codec.from_string("int8/b64")
    plan = RoundPlan(g, 64 * 1000 + 5, codec, part_bytes=4096)
    by_hotkey = {m.hotkey: m.bandwidth for m in g.members}
    sizes = [end - begin for begin, end in plan.shards]
    assert sum(sizes) == plan.numel
    # Proportional to the sorted members' bandwidths, to within a block.
    total = sum(by_hotkey.values())
    for (begin, end), hotkey in zip(plan.shards, plan.members):
        assert begin % 64 == 0
        assert abs((end - begin) - plan.numel * by_hotkey[hotkey] / total) <= 64
    # Parts are whole blocks whose frames stay within the part size (plus a header).
    header = codec.frame_size((64,)) - (codec.frame_size((128,)) - codec.frame_size((64,)))
    assert all(p.begin % 64 == 0 and p.frame_bytes <= 4096 + header for p in plan.parts)
    assert plan.part_elements == 64 * (4096 * 64 // (64 + 2) // 64)  # int8 with fp16 scales: 66 bytes a block
    assert [p.index for p in plan.parts] == list(range(len(plan.parts)))
    assert plan.parts[-1].end == plan.numel


def test_each_shard_has_an_owner_and_the_next_member_as_backup():
    plan = RoundPlan(group(), 100_000, Codec(kind="raw"), part_bytes=8192)
    m = plan.members
    assert [plan.holders(s) for s in range(4)] == [[m[0], m[1]], [m[1], m[2]], [m[2], m[3]], [m[3], m[0]]]
    assert plan.held_by(m[0]) == [0, 3]
    one = RoundPlan(Group("solo", (Member(HOTKEYS[0], "a"),)), 1000, Codec(kind="raw"), 256)
    assert one.holders(0) == [HOTKEYS[0]] and one.expected_bytes(HOTKEYS[0]) == 0


def test_expected_bytes_are_exact_frame_sizes():
    codec = Codec.from_string("int4/b64")
    plan = RoundPlan(group(), 100_000, codec, part_bytes=8192)
    holder = plan.members[2]
    owned = [codec.frame_size((p.end - p.begin,)) for p in plan.parts if p.shard == 2]
    # The three others' parts of the shard it owns; none of the shard it backs up.
    assert plan.expected_bytes(holder) == 3 * sum(owned)
    assert plan.frame_bytes(2) == sum(owned)
    assert plan.owned_by(holder) == [2] and plan.held_by(holder) == [1, 2]


def test_the_fingerprint_covers_what_the_plan_depends_on():
    base = RoundPlan(group(), 1000, Codec.from_string("int8/b64"), 256).fingerprint
    assert base == RoundPlan(group(), 1000, Codec.from_string("int8/b64"), 256).fingerprint
    assert base != RoundPlan(group(), 1001, Codec.from_string("int8/b64"), 256).fingerprint
    assert base != RoundPlan(group(), 1000, Codec.from_string("int4/b64"), 256).fingerprint
    assert base != RoundPlan(group(), 1000, Codec.from_string("int8/b64"), 512).fingerprint
    assert base != RoundPlan(group(bandwidths=(1, 1, 1, 2)), 1000, Codec.from_string("int8/b64"), 256).fingerprint
    assert base != RoundPlan(group(round_id="r2"), 1000, Codec.from_string("int8/b64"), 256).fingerprint


def test_deadline_follows_measured_throughput_within_the_floor_and_the_bound():
    config = AllReduceConfig(floor=2.0, slack=3.0, min_throughput=1e6)
    expected = 10_000_000
    bound = config.wait_bound(expected)
    assert bound == pytest.approx(2.0 + 30.0)
    assert config.deadline(expected, 0, 0.0) == pytest.approx(bound)  # nothing measured yet
    # Half arrived in 0.5 s: 10 MB/s, so 1 s for everything, times slack, plus the floor.
    assert config.deadline(expected, expected // 2, 0.5) == pytest.approx(2.0 + 3.0)
    # A trickle slower than the minimum never pushes past the bound.
    assert config.deadline(expected, 10, 100.0) == pytest.approx(bound)
    with pytest.raises(GroupError):
        AllReduceConfig(floor=0)
