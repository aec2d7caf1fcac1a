"""The orchestrator's state in one SQLite file (WAL): nodes, stage phases,
sample leases, losses, merged-weight versions, evaluations and events.

Every change is one transaction, committed before the orchestrator answers,
so a SIGKILL loses nothing it acknowledged. Times are wall-clock seconds
(they must mean the same after a restart). Weight files live beside the
database and are written (atomically) before the row that names them."""

from __future__ import annotations

import json
import os
import sqlite3
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iota.errors import IotaError

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes(
    hotkey TEXT PRIMARY KEY, role TEXT NOT NULL, address TEXT, merge_address TEXT, stage INTEGER, flops REAL NOT NULL,
    joined REAL NOT NULL, last_seen REAL NOT NULL, alive INTEGER NOT NULL, stats TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS samples(
    id INTEGER PRIMARY KEY, attempt INTEGER NOT NULL, holder TEXT NOT NULL, leased REAL NOT NULL,
    expires REAL NOT NULL, done REAL, loss REAL, path TEXT);
CREATE TABLE IF NOT EXISTS losses(
    sample INTEGER NOT NULL, attempt INTEGER NOT NULL, loss REAL NOT NULL, at REAL NOT NULL, path TEXT NOT NULL,
    commits TEXT NOT NULL DEFAULT '[]', leased REAL NOT NULL);
CREATE TABLE IF NOT EXISTS flags(
    at REAL NOT NULL, hotkey TEXT NOT NULL, reason TEXT NOT NULL, validator TEXT NOT NULL, detail TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS stages(
    stage INTEGER PRIMARY KEY, phase TEXT NOT NULL, round INTEGER NOT NULL, members TEXT NOT NULL,
    opened REAL NOT NULL, deadline REAL NOT NULL, since_merge INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS versions(
    stage INTEGER NOT NULL, version INTEGER NOT NULL, round INTEGER, digest TEXT NOT NULL, file TEXT NOT NULL,
    created REAL NOT NULL, contributors TEXT NOT NULL, PRIMARY KEY(stage, version));
CREATE TABLE IF NOT EXISTS merges(
    stage INTEGER NOT NULL, round INTEGER NOT NULL, outcome TEXT NOT NULL, at REAL NOT NULL, detail TEXT NOT NULL,
    PRIMARY KEY(stage, round));
CREATE TABLE IF NOT EXISTS merge_reports(
    stage INTEGER NOT NULL, round INTEGER NOT NULL, hotkey TEXT NOT NULL, contributors TEXT NOT NULL,
    gram TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY(stage, round, hotkey));
CREATE TABLE IF NOT EXISTS evals(
    at REAL NOT NULL, versions TEXT NOT NULL, val_loss REAL NOT NULL, node TEXT NOT NULL, samples_done INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS events(at REAL NOT NULL, kind TEXT NOT NULL, detail TEXT NOT NULL);
"""


class StoreError(IotaError):
    """The orchestrator's database cannot be used as asked."""


@dataclass(frozen=True)
class Node:
    hotkey: str
    role: str
    address: str | None
    merge_address: str | None
    stage: int | None
    flops: float
    last_seen: float
    alive: bool
    stats: dict[str, Any]


@dataclass(frozen=True)
class StagePhase:
    stage: int
    phase: str  # "train" or "merge"
    round: int
    members: list[dict[str, Any]]
    opened: float
    deadline: float
    since_merge: int


@dataclass(frozen=True)
class Lease:
    sample: int
    attempt: int
    expires: float


@dataclass(frozen=True)
class Version:
    stage: int
    version: int
    digest: str
    file: Path


class Store:
    """One SQLite database (and its weights directory) per run."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.weights_dir = self.path.parent / "weights"
        self.weights_dir.mkdir(exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL survives a killed process (not a power cut) without an fsync per commit.
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
            self._add_lease_times()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the orchestrator database {self.path}: {exc}") from None
        self.db.row_factory = sqlite3.Row

    def _add_lease_times(self) -> None:
        """A database an earlier version wrote has losses without their lease time: those take the time
        they were recorded, the bound that version checked stale weights against."""
        if "leased" not in {column[1] for column in self.db.execute("PRAGMA table_info(losses)")}:
            self.db.execute("ALTER TABLE losses ADD COLUMN leased REAL")
            self.db.execute("UPDATE losses SET leased=at")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- meta ---------------------------------------------------------------

    def get_meta(self, key: str) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else json.loads(row["value"])

    def set_meta(self, key: str, value: Any) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)", (key, json.dumps(value)))

    # -- nodes --------------------------------------------------------------

    def upsert_node(self, hotkey: str, role: str, address: str | None, merge_address: str | None,
                    stage: int | None, flops: float) -> None:
        now = time.time()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO nodes(hotkey, role, address, merge_address, stage, flops, joined, last_seen, alive) "
                "VALUES(?, ?, ?, ?, ?, ?, ?, ?, 1) ON CONFLICT(hotkey) DO UPDATE SET role=excluded.role, "
                "address=excluded.address, merge_address=excluded.merge_address, stage=excluded.stage, "
                "flops=excluded.flops, last_seen=excluded.last_seen, alive=1",
                (hotkey, role, address, merge_address, stage, flops, now, now),
            )

    def heartbeat(self, hotkey: str, stats: dict[str, Any]) -> bool:
        """Record a heartbeat; False if the node is unknown or was dropped (it must register again)."""
        with self.transaction() as db:
            cursor = db.execute(
                "UPDATE nodes SET last_seen=?, stats=? WHERE hotkey=? AND alive=1",
                (time.time(), json.dumps(stats), hotkey),
            )
        return cursor.rowcount == 1

    def node(self, hotkey: str) -> Node | None:
        row = self.db.execute("SELECT * FROM nodes WHERE hotkey=?", (hotkey,)).fetchone()
        return None if row is None else _node(row)

    def nodes(self, *, role: str | None = None, alive: bool = True) -> list[Node]:
        query, args = "SELECT * FROM nodes WHERE alive=?", [int(alive)]
        if role is not None:
            query += " AND role=?"
            args.append(role)
        return [_node(r) for r in self.db.execute(query + " ORDER BY hotkey", args)]

    def set_stage(self, hotkey: str, stage: int) -> None:
        with self.transaction() as db:
            db.execute("UPDATE nodes SET stage=? WHERE hotkey=?", (stage, hotkey))

    def drop_silent(self, older_than: float) -> list[Node]:
        """Mark nodes silent since `older_than` as gone, and free their sample leases at once."""
        with self.transaction() as db:
            rows = db.execute("SELECT * FROM nodes WHERE alive=1 AND last_seen<?", (older_than,)).fetchall()
            now = time.time()
            for row in rows:
                db.execute("UPDATE nodes SET alive=0 WHERE hotkey=?", (row["hotkey"],))
                db.execute("UPDATE samples SET expires=? WHERE holder=? AND done IS NULL", (now, row["hotkey"]))
                db.execute("INSERT INTO events VALUES(?, 'node_lost', ?)",
                           (now, json.dumps({"hotkey": row["hotkey"], "role": row["role"], "stage": row["stage"]})))
        return [_node(r) for r in rows]

    # -- samples ------------------------------------------------------------

    def lease(self, holder: str, total: int, timeout: float) -> Lease | None:
        """The oldest expired lease again (attempt + 1), else the next new sample, else None."""
        now = time.time()
        with self.transaction() as db:
            row = db.execute(
                "SELECT id, attempt FROM samples WHERE done IS NULL AND expires<=? ORDER BY id LIMIT 1", (now,)
            ).fetchone()
            if row is not None:
                sample, attempt = row["id"], row["attempt"] + 1
                db.execute("UPDATE samples SET attempt=?, holder=?, leased=?, expires=? WHERE id=?",
                           (attempt, holder, now, now + timeout, sample))
            else:
                sample = db.execute("SELECT COALESCE(MAX(id) + 1, 0) FROM samples").fetchone()[0]
                if sample >= total:
                    return None
                attempt = 0
                db.execute("INSERT INTO samples(id, attempt, holder, leased, expires) VALUES(?, 0, ?, ?, ?)",
                           (sample, holder, now, now + timeout))
                # `leased` moves when a sample is leased again; the run's start must not.
                db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES('first_lease', ?)", (json.dumps(now),))
        return Lease(sample, attempt, now + timeout)

    def record_loss(self, sample: int, attempt: int, loss: float, path: list[str],
                    commits: list[dict[str, Any]] | None = None) -> bool:
        """Keep the loss of the sample's current attempt, the miners on its path and what each
        vouched for; False if stale (it was re-leased or is done)."""
        with self.transaction() as db:
            cursor = db.execute(
                "UPDATE samples SET loss=?, path=? WHERE id=? AND attempt=? AND done IS NULL",
                (loss, json.dumps(path), sample, attempt),
            )
            if cursor.rowcount:
                db.execute("INSERT INTO losses(sample, attempt, loss, at, path, commits, leased)"
                           " SELECT ?, ?, ?, ?, ?, ?, leased FROM samples WHERE id=?",
                           (sample, attempt, loss, time.time(), json.dumps(path), json.dumps(commits or []), sample))
        return cursor.rowcount == 1

    def work(self, since: int, limit: int = 500) -> list[dict[str, Any]]:
        """Recorded losses after row `since`, with their row id, path, commitments, the time their
        attempt was leased, and `versions`: each stage's latest merged version at that lease. Every
        stage's forward of the sample came after its lease, however long it then took to reach the loss."""
        rows = self.db.execute("SELECT rowid, * FROM losses WHERE rowid>? ORDER BY rowid LIMIT ?",
                               (since, limit)).fetchall()
        created: dict[int, list[tuple[float, int]]] = {}
        for v in self.db.execute("SELECT stage, version, created FROM versions ORDER BY created"):
            created.setdefault(v["stage"], []).append((v["created"], v["version"]))

        def latest(stage: int, at: float) -> int:
            return max((version for when, version in created.get(stage, []) if when <= at), default=-1)

        return [{"row": r["rowid"], "sample": r["sample"], "attempt": r["attempt"], "loss": r["loss"],
                 "at": r["at"], "leased": r["leased"], "path": json.loads(r["path"]),
                 "commits": json.loads(r["commits"]),
                 "versions": [latest(stage, r["leased"]) for stage in sorted(created)]} for r in rows]

    def add_flag(self, hotkey: str, reason: str, validator: str, detail: dict[str, Any]) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO flags VALUES(?, ?, ?, ?, ?)",
                       (time.time(), hotkey, reason, validator, json.dumps(detail)))

    def flags(self, since: float = 0.0) -> list[dict[str, Any]]:
        return [{"at": r["at"], "hotkey": r["hotkey"], "reason": r["reason"], "validator": r["validator"],
                 **json.loads(r["detail"])}
                for r in self.db.execute("SELECT * FROM flags WHERE at>=? ORDER BY at", (since,))]

    def complete(self, sample: int, attempt: int, stages: int) -> bool:
        """Mark a sample done (its backward reached the first stage); counts toward every stage's merge."""
        with self.transaction() as db:
            cursor = db.execute(
                "UPDATE samples SET done=? WHERE id=? AND attempt=? AND done IS NULL", (time.time(), sample, attempt)
            )
            if cursor.rowcount:
                db.execute("UPDATE stages SET since_merge=since_merge+1")
        return cursor.rowcount == 1

    def samples_done(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM samples WHERE done IS NOT NULL").fetchone()[0]

    def training_seconds(self) -> float:
        """From the first lease to the latest completion: the time the swarm spent training."""
        last = self.db.execute("SELECT MAX(done) FROM samples").fetchone()[0]
        first = self.get_meta("first_lease")
        return max(0.0, last - first) if last is not None and first is not None else 0.0

    def recent_latencies(self, n: int) -> list[float]:
        rows = self.db.execute(
            "SELECT done - leased FROM samples WHERE done IS NOT NULL ORDER BY done DESC LIMIT ?", (n,)
        ).fetchall()
        return [r[0] for r in rows]

    def median_latency(self, n: int = 50) -> float | None:
        latencies = self.recent_latencies(n)
        return statistics.median(latencies) if latencies else None

    def losses(self) -> list[tuple[int, float, float]]:
        """(sample, loss, time) of every recorded loss, in the order they arrived."""
        return [(r[0], r[1], r[2]) for r in self.db.execute("SELECT sample, loss, at FROM losses ORDER BY rowid")]

    # -- stages, merges and versions -----------------------------------------

    def init_stages(self, n: int) -> None:
        with self.transaction() as db:
            for s in range(n):
                db.execute("INSERT OR IGNORE INTO stages VALUES(?, 'train', 0, '[]', ?, 0, 0)", (s, time.time()))

    def stage(self, s: int) -> StagePhase:
        row = self.db.execute("SELECT * FROM stages WHERE stage=?", (s,)).fetchone()
        if row is None:
            raise StoreError(f"stage {s} does not exist")
        return StagePhase(row["stage"], row["phase"], row["round"], json.loads(row["members"]), row["opened"],
                          row["deadline"], row["since_merge"])

    def open_merge(self, s: int, members: list[dict[str, Any]], deadline: float) -> StagePhase:
        """Start the next merge round of stage `s`; StoreError if one is already open."""
        with self.transaction() as db:
            cursor = db.execute("UPDATE stages SET phase='merge', round=round+1, members=?, opened=?, deadline=?, "
                                "since_merge=0 WHERE stage=? AND phase='train'",
                                (json.dumps(members), time.time(), deadline, s))
        if cursor.rowcount != 1:
            raise StoreError(f"stage {s} has a merge round open already (or does not exist)")
        return self.stage(s)

    def close_merge(self, s: int, round_: int, outcome: str, detail: dict[str, Any]) -> bool:
        """End merge round `round_` of stage `s` (once); False if it is not the open one."""
        with self.transaction() as db:
            cursor = db.execute("UPDATE stages SET phase='train' WHERE stage=? AND round=? AND phase='merge'",
                                (s, round_))
            if cursor.rowcount:
                db.execute("INSERT OR REPLACE INTO merges VALUES(?, ?, ?, ?, ?)",
                           (s, round_, outcome, time.time(), json.dumps(detail)))
        return cursor.rowcount == 1

    def add_merge_report(self, s: int, round_: int, hotkey: str, contributors: dict[str, float],
                         gram: list[list[float]]) -> None:
        """What a member of merge round `round_` learned about the contributions (one report per member)."""
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO merge_reports VALUES(?, ?, ?, ?, ?, ?)",
                       (s, round_, hotkey, json.dumps(contributors), json.dumps(gram), time.time()))

    def merge_reports(self, since: int, limit: int = 500) -> list[dict[str, Any]]:
        """Reports after row `since`, each with the version its round trained from (`base_version`:
        the stage's newest version stored before that round)."""
        rows = self.db.execute(
            "SELECT r.rowid, r.*, (SELECT MAX(v.version) FROM versions v WHERE v.stage = r.stage"
            " AND (v.round IS NULL OR v.round < r.round)) AS base_version"
            " FROM merge_reports r WHERE r.rowid>? ORDER BY r.rowid LIMIT ?", (since, limit))
        return [{"row": r["rowid"], "stage": r["stage"], "round": r["round"], "reporter": r["hotkey"],
                 "base_version": r["base_version"], "contributors": json.loads(r["contributors"]),
                 "gram": json.loads(r["gram"])} for r in rows]

    def merges(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.execute("SELECT * FROM merges ORDER BY at")]

    def add_version(self, s: int, round_: int | None, digest: str, data: bytes, contributors: list[str]) -> Version:
        """Store merged weights as the stage's next version (file first, then the row naming it)."""
        with self.transaction() as db:
            version = db.execute("SELECT COALESCE(MAX(version) + 1, 0) FROM versions WHERE stage=?",
                                 (s,)).fetchone()[0]
            file = self.weights_dir / f"stage{s}-v{version}.safetensors"
            tmp = file.with_name(file.name + ".tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, file)
            db.execute("INSERT INTO versions VALUES(?, ?, ?, ?, ?, ?, ?)",
                       (s, version, round_, digest, file.name, time.time(), json.dumps(contributors)))
        return Version(s, version, digest, file)

    def latest_version(self, s: int) -> Version | None:
        row = self.db.execute("SELECT * FROM versions WHERE stage=? ORDER BY version DESC LIMIT 1", (s,)).fetchone()
        return None if row is None else Version(s, row["version"], row["digest"], self.weights_dir / row["file"])

    def version(self, s: int, version: int) -> Version | None:
        row = self.db.execute("SELECT * FROM versions WHERE stage=? AND version=?", (s, version)).fetchone()
        return None if row is None else Version(s, row["version"], row["digest"], self.weights_dir / row["file"])

    def version_of_round(self, s: int, round_: int) -> Version | None:
        row = self.db.execute("SELECT * FROM versions WHERE stage=? AND round=?", (s, round_)).fetchone()
        return None if row is None else Version(s, row["version"], row["digest"], self.weights_dir / row["file"])

    # -- evaluations and events ------------------------------------------------

    def add_eval(self, versions: list[int], val_loss: float, node: str) -> None:
        """A validation loss of the merged weights `versions` (one per stage), at the current progress."""
        with self.transaction() as db:
            done = db.execute("SELECT COUNT(*) FROM samples WHERE done IS NOT NULL").fetchone()[0]
            db.execute("INSERT INTO evals VALUES(?, ?, ?, ?, ?)",
                       (time.time(), json.dumps(versions), val_loss, node, done))

    def evals(self) -> list[dict[str, Any]]:
        return [{"at": r["at"], "versions": json.loads(r["versions"]), "val_loss": r["val_loss"], "node": r["node"],
                 "samples_done": r["samples_done"]} for r in self.db.execute("SELECT * FROM evals ORDER BY at")]

    def add_event(self, kind: str, detail: dict[str, Any]) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO events VALUES(?, ?, ?)", (time.time(), kind, json.dumps(detail)))

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        query, args = "SELECT * FROM events", ()
        if kind:
            query, args = query + " WHERE kind=?", (kind,)
        return [{"at": r["at"], "kind": r["kind"], **json.loads(r["detail"])}
                for r in self.db.execute(query + " ORDER BY at", args)]


def _node(row: sqlite3.Row) -> Node:
    return Node(row["hotkey"], row["role"], row["address"], row["merge_address"], row["stage"], row["flops"], row["last_seen"],
                bool(row["alive"]), json.loads(row["stats"]))
