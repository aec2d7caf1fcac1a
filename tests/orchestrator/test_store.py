"""The orchestrator's SQLite store: leases, losses, drops, phases, versions, persistence.

Time is a fake clock patched into the store module, so expiry is exact and no test sleeps.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

import iota.orchestrator.store as store_module
from iota.orchestrator.store import Store, StoreError


class Clock:
    """Stands in for the `time` module inside iota.orchestrator.store."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(store_module, "time", fake)
    return fake


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[Store]:
    s = Store(tmp_path / "run" / "orchestrator.sqlite")
    yield s
    s.close()


def test_new_samples_are_leased_in_order_and_none_past_the_total(store: Store, clock: Clock) -> None:
    leases = [store.lease("miner-a", total=4, timeout=30.0) for _ in range(3)]
    leases.append(store.lease("miner-b", total=4, timeout=30.0))
    assert [(lease.sample, lease.attempt) for lease in leases] == [(0, 0), (1, 0), (2, 0), (3, 0)]
    assert leases[0].expires == clock.now + 30.0
    assert store.lease("miner-a", total=4, timeout=30.0) is None
    # Still none while every lease is live, however often it is asked.
    clock.advance(29.0)
    assert store.lease("miner-b", total=4, timeout=30.0) is None


def test_an_expired_lease_is_issued_again_with_the_next_attempt(store: Store, clock: Clock) -> None:
    first = store.lease("miner-a", total=10, timeout=5.0)
    second = store.lease("miner-a", total=10, timeout=50.0)
    assert (first.sample, second.sample) == (0, 1)
    clock.advance(5.0)  # the first lease ends now; the second is still live
    again = store.lease("miner-b", total=10, timeout=5.0)
    assert (again.sample, again.attempt) == (0, 1)
    # Nothing else expired: the next lease is a new sample.
    assert (store.lease("miner-b", total=10, timeout=5.0).sample) == 2
    # It can expire again: attempt 2, to whoever asks.
    clock.advance(6.0)
    assert store.lease("miner-c", total=10, timeout=5.0) is not None
    row = store.db.execute("SELECT attempt, holder FROM samples WHERE id=0").fetchone()
    assert (row["attempt"], row["holder"]) == (2, "miner-c")


def test_a_stale_attempt_cannot_report_a_loss_or_complete(store: Store, clock: Clock) -> None:
    store.init_stages(2)
    store.lease("miner-a", total=10, timeout=5.0)
    clock.advance(10.0)
    lease = store.lease("miner-b", total=10, timeout=5.0)
    assert (lease.sample, lease.attempt) == (0, 1)

    assert store.record_loss(0, 0, 3.5, ["miner-a", "last"]) is False
    assert store.complete(0, 0, 2) is False
    assert store.record_loss(0, 1, 2.5, ["miner-b", "last"]) is True
    assert store.complete(0, 1, 2) is True
    # Done is done: neither attempt may report again.
    assert store.record_loss(0, 1, 1.0, ["miner-b", "last"]) is False
    assert store.complete(0, 1, 2) is False
    assert store.complete(0, 0, 2) is False
    # Unknown samples are refused too.
    assert store.record_loss(7, 0, 1.0, ["x", "y"]) is False
    assert store.complete(7, 0, 2) is False

    assert [(sample, loss) for sample, loss, _ in store.losses()] == [(0, 2.5)]
    assert store.samples_done() == 1
    # A done sample is never leased again, even after its lease time.
    clock.advance(100.0)
    assert store.lease("miner-b", total=10, timeout=5.0).sample == 1


def test_complete_counts_toward_every_stages_next_merge(store: Store) -> None:
    store.init_stages(3)
    for _ in range(2):
        lease = store.lease("miner-a", total=10, timeout=60.0)
        assert store.complete(lease.sample, lease.attempt, 3)
    assert [store.stage(s).since_merge for s in range(3)] == [2, 2, 2]
    # A merge opened on one stage resets only that stage's count.
    store.open_merge(1, [], deadline=0.0)
    lease = store.lease("miner-a", total=10, timeout=60.0)
    store.complete(lease.sample, lease.attempt, 3)
    assert [store.stage(s).since_merge for s in range(3)] == [3, 1, 3]


def test_drop_silent_frees_the_dropped_nodes_leases_at_once(store: Store, clock: Clock) -> None:
    store.upsert_node("miner-a", "miner", "http://a", "http://a-merge", 0, 1e9)
    store.upsert_node("miner-b", "miner", "http://b", "http://b-merge", 0, 1e9)
    store.upsert_node("validator", "validator", None, None, None, 1e9)
    assert [store.lease("miner-a", total=10, timeout=600.0).sample for _ in range(2)] == [0, 1]
    assert store.lease("miner-b", total=10, timeout=600.0).sample == 2

    clock.advance(30.0)
    assert store.heartbeat("miner-b", {"queue": 1})
    assert store.heartbeat("validator", {})
    dropped = store.drop_silent(older_than=clock.now - 10.0)
    assert [n.hotkey for n in dropped] == ["miner-a"]
    assert [n.hotkey for n in store.nodes(role="miner")] == ["miner-b"]
    assert store.node("miner-a").alive is False
    assert store.heartbeat("miner-a", {}) is False  # it must register again

    # miner-a's two leases come back at once (their 600 s are not waited out), oldest first;
    # miner-b's own lease stays with miner-b.
    again = [store.lease("miner-b", total=10, timeout=600.0) for _ in range(3)]
    assert [(lease.sample, lease.attempt) for lease in again] == [(0, 1), (1, 1), (3, 0)]
    lost = store.events("node_lost")
    assert [(e["hotkey"], e["role"], e["stage"]) for e in lost] == [("miner-a", "miner", 0)]
    # Nobody else is silent now.
    assert store.drop_silent(older_than=clock.now - 10.0) == []

    # Registering again brings the node back alive.
    store.upsert_node("miner-a", "miner", "http://a", "http://a-merge", 1, 2e9)
    node = store.node("miner-a")
    assert (node.alive, node.stage, node.flops) == (True, 1, 2e9)


def test_versions_are_numbered_per_stage_and_written_to_files(store: Store) -> None:
    blobs = {(s, v): f"stage {s} version {v}".encode() * (v + 1) for s in range(2) for v in range(3)}
    made = []
    for v in range(3):
        for s in range(2):
            data = blobs[(s, v)]
            made.append(store.add_version(s, None if v == 0 else v, hashlib.sha256(data).hexdigest(), data,
                                          ["miner-a"]))
    assert [(m.stage, m.version) for m in made] == [(s, v) for v in range(3) for s in range(2)]
    for m in made:
        assert m.file.parent == store.weights_dir
        assert m.file.read_bytes() == blobs[(m.stage, m.version)]
        assert m.digest == hashlib.sha256(m.file.read_bytes()).hexdigest()
    assert not list(store.weights_dir.glob("*.tmp"))
    latest = store.latest_version(1)
    assert (latest.version, latest.file.read_bytes()) == (2, blobs[(1, 2)])
    assert store.version_of_round(0, 1).version == 1
    assert store.version_of_round(0, 5) is None
    assert store.latest_version(2) is None


def test_work_gives_the_versions_at_the_lease_not_at_the_loss(store: Store, clock: Clock) -> None:
    for s in range(2):
        store.add_version(s, None, "0" * 64, b"v0", [])
    clock.advance(1.0)
    lease = store.lease("miner-a", total=10, timeout=60.0)
    leased_at = clock.now
    # Merges land while the sample is on its way: they do not make its forwards stale.
    for round_ in (1, 2):
        clock.advance(1.0)
        store.add_version(0, round_, "1" * 64, b"v", ["miner-a"])
    clock.advance(1.0)
    assert store.record_loss(lease.sample, lease.attempt, 2.0, ["miner-a", "last"], [{"global_version": 0}] * 2)
    later = store.lease("miner-b", total=10, timeout=60.0)
    assert store.record_loss(later.sample, later.attempt, 1.5, ["miner-b", "last"])
    rows = store.work(0)
    assert [(r["sample"], r["leased"], r["versions"]) for r in rows] == [
        (lease.sample, leased_at, [0, 0]), (later.sample, clock.now, [2, 0])]
    # Its lease ran out and it was leased again after the loss was recorded: the row keeps its own lease.
    clock.advance(100.0)
    again = store.lease("miner-b", total=10, timeout=60.0)
    assert (again.sample, again.attempt) == (lease.sample, 1)
    assert store.work(0)[0]["versions"] == [0, 0]


def test_losses_of_an_older_database_take_their_record_time_as_lease_time(tmp_path: Path) -> None:
    path = tmp_path / "orchestrator.sqlite"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE losses(sample INTEGER NOT NULL, attempt INTEGER NOT NULL, loss REAL NOT NULL,"
                " at REAL NOT NULL, path TEXT NOT NULL, commits TEXT NOT NULL DEFAULT '[]')")
    old.execute("INSERT INTO losses VALUES(4, 0, 2.5, 1700000123.0, '[\"a\"]', '[]')")
    old.commit()
    old.close()
    store = Store(path)
    try:
        assert [(r["sample"], r["loss"], r["leased"]) for r in store.work(0)] == [(4, 2.5, 1700000123.0)]
    finally:
        store.close()


def test_a_merge_round_opens_and_closes_once(store: Store) -> None:
    store.init_stages(2)
    lease = store.lease("miner-a", total=10, timeout=60.0)
    store.complete(lease.sample, lease.attempt, 2)
    members = [{"hotkey": "miner-a", "address": "http://a-merge"}]

    opened = store.open_merge(0, members, deadline=123.0)
    assert (opened.phase, opened.round, opened.members, opened.deadline, opened.since_merge) == (
        "merge", 1, members, 123.0, 0)
    with pytest.raises(StoreError):
        store.open_merge(0, members, deadline=456.0)
    assert store.stage(0).round == 1 and store.stage(0).deadline == 123.0
    assert store.stage(1).phase == "train"  # stages are independent

    assert store.close_merge(0, 2, "merged", {}) is False  # not the open round
    assert store.close_merge(1, 1, "merged", {}) is False  # that stage is not merging
    assert store.close_merge(0, 1, "merged", {"version": 1}) is True
    assert store.close_merge(0, 1, "timeout", {}) is False  # once only
    assert store.stage(0).phase == "train"
    merges = store.merges()
    assert [(m["stage"], m["round"], m["outcome"], json.loads(m["detail"])) for m in merges] == [
        (0, 1, "merged", {"version": 1})]

    assert store.open_merge(0, members, deadline=789.0).round == 2
    with pytest.raises(StoreError):
        store.stage(5)


def test_everything_survives_closing_and_reopening_the_database(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "orchestrator.sqlite"
    store = Store(path)
    store.set_meta("recipe", {"dim": 32})
    store.init_stages(2)
    store.upsert_node("miner-a", "miner", "http://a", "http://a-merge", 0, 1e9)
    store.heartbeat("miner-a", {"queue": 4})
    for _ in range(2):
        lease = store.lease("miner-a", total=10, timeout=60.0)
        store.record_loss(lease.sample, lease.attempt, 5.0 - lease.sample, ["miner-a", "miner-b"])
        store.complete(lease.sample, lease.attempt, 2)
    store.lease("miner-a", total=10, timeout=60.0)  # sample 2 stays in flight
    store.open_merge(1, [{"hotkey": "miner-b", "address": "http://b-merge"}], deadline=clock.now + 60)
    store.add_version(0, None, hashlib.sha256(b"w0").hexdigest(), b"w0", [])
    version = store.add_version(0, 1, hashlib.sha256(b"w").hexdigest(), b"w", ["miner-a"])
    store.add_eval([1, 0], 4.25, "validator")
    store.add_event("miner_moved", {"hotkey": "miner-c", "from": 1, "to": 0})
    store.close()

    store = Store(path)
    try:
        assert store.get_meta("recipe") == {"dim": 32}
        node = store.node("miner-a")
        assert (node.alive, node.stage, node.stats, node.merge_address) == (True, 0, {"queue": 4}, "http://a-merge")
        assert store.samples_done() == 2
        assert [(s, loss) for s, loss, _ in store.losses()] == [(0, 5.0), (1, 4.0)]
        assert [store.stage(s).since_merge for s in range(2)] == [2, 0]
        assert (store.stage(1).phase, store.stage(1).round) == ("merge", 1)
        latest = store.latest_version(0)
        assert (latest.version, latest.digest, latest.file.read_bytes()) == (1, version.digest, b"w")
        assert store.evals()[0]["versions"] == [1, 0] and store.evals()[0]["val_loss"] == 4.25
        assert store.events("miner_moved")[0]["to"] == 0
        # Leasing goes on where it stopped: sample 2 is still held, so 3 is next.
        assert store.lease("miner-a", total=10, timeout=60.0).sample == 3
    finally:
        store.close()


def test_training_seconds_run_from_the_first_lease_to_the_latest_completion(store: Store, clock: Clock) -> None:
    store.init_stages(1)
    assert store.training_seconds() == 0.0
    first = store.lease("miner-a", total=10, timeout=5.0)
    clock.advance(2.0)
    second = store.lease("miner-a", total=10, timeout=60.0)
    assert store.training_seconds() == 0.0  # nothing completed yet
    clock.advance(3.0)
    store.complete(second.sample, second.attempt, 1)
    assert store.training_seconds() == pytest.approx(5.0)
    # Sample 0 is leased again after its lease ran out: the run still started at its first lease.
    clock.advance(10.0)
    again = store.lease("miner-b", total=10, timeout=60.0)
    assert (again.sample, again.attempt) == (first.sample, 1)
    clock.advance(4.0)
    store.complete(again.sample, again.attempt, 1)
    assert store.training_seconds() == pytest.approx(19.0)
    # The latency of a sample is that of the attempt that finished it.
    assert sorted(store.recent_latencies(10)) == pytest.approx([3.0, 4.0])
    assert store.median_latency() == pytest.approx(3.5)
