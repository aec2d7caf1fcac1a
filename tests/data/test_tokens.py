"""The token cache and TokenDataset: exact streams, shards, batches, atomic
builds and cache reuse."""

import hashlib
import itertools
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import iota
import iota.data.tokens as tokens_module
import numpy as np
import pytest
import torch
from iota.data import (
    ByteTokenizer,
    CorpusError,
    DataError,
    Document,
    FileCorpus,
    TokenDataset,
    build_datasets,
    split_of,
)
from iota.data.tokens import storage_dtype

VF = 0.25  # a small corpus needs a large share to put several files in val


def expected_stream(corpus: FileCorpus, split: str, val_fraction: float = VF) -> list[int]:
    """What the cache must hold: each document's bytes then EOD, in corpus order."""
    out: list[int] = []
    for doc in corpus.documents():
        if split_of(doc.key, val_fraction) == split and doc.text:
            out += [*doc.text.encode("utf-8"), 256]
    return out


def build(corpus_dir: Path, cache_dir: Path, **kw: object) -> tuple[TokenDataset, TokenDataset]:
    return build_datasets(FileCorpus(corpus_dir), ByteTokenizer(), cache_dir=cache_dir, val_fraction=VF, **kw)


def cache_files(cache_dir: Path) -> list[str]:
    return sorted(p.relative_to(cache_dir).as_posix() for p in cache_dir.rglob("*") if p.is_file())


# -- the cache --------------------------------------------------------------


def test_splits_hold_exactly_the_tokenized_documents(corpus_dir: Path, cache_dir: Path) -> None:
    train, val = build(corpus_dir, cache_dir)
    corpus = FileCorpus(corpus_dir)
    assert train.tokens.tolist() == expected_stream(corpus, "train")
    assert val.tokens.tolist() == expected_stream(corpus, "val")
    assert train.tokens.dtype == np.uint16 and isinstance(train.tokens, np.memmap)
    # Every document is in exactly one split.
    docs = {d.key for d in corpus.documents()}
    train_keys = {k for k in docs if split_of(k, VF) == "train"}
    assert train.manifest["num_documents"] + val.manifest["num_documents"] == len(docs)
    assert 0 < len(docs - train_keys) < len(docs) // 2


def test_manifest_describes_the_stream(corpus_dir: Path, cache_dir: Path) -> None:
    train, val = build(corpus_dir, cache_dir)
    [directory] = cache_dir.iterdir()
    assert directory.name.startswith("files-byte-")
    assert cache_files(cache_dir) == [
        f"{directory.name}/{f}" for f in ["train.json", "train.tokens", "val.json", "val.tokens"]
    ]
    m = json.loads((directory / "train.json").read_text())
    assert m == train.manifest
    assert m["identity"] == directory.name == val.manifest["identity"]
    assert (m["split"], m["tokenizer"], m["dtype"], m["vocab_size"], m["eod_id"]) == ("train", "byte", "<u2", 257, 256)
    assert m["num_tokens"] == train.num_tokens == len(train)
    assert m["sha256"] == hashlib.sha256(np.asarray(train.tokens).tobytes()).hexdigest()


def test_second_load_reuses_the_cache(corpus_dir: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train, _ = build(corpus_dir, cache_dir)
    mtimes = {p: p.stat().st_mtime_ns for p in cache_dir.rglob("*")}

    def no_build(*args: object) -> None:
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(tokens_module, "_write_splits", no_build)
    again, _ = build(corpus_dir, cache_dir)
    assert again.tokens.tolist() == train.tokens.tolist()
    assert {p: p.stat().st_mtime_ns for p in cache_dir.rglob("*")} == mtimes
    # Another cap, split or corpus is another stream, so another build.
    with pytest.raises(AssertionError, match="reused"):
        build(corpus_dir, cache_dir, max_tokens=100)
    (corpus_dir / "d2" / "new.txt").write_text("a new document")
    with pytest.raises(AssertionError, match="reused"):
        build(corpus_dir, cache_dir)


def test_cache_dir_defaults_to_iota_cache_dir(
    corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IOTA_CACHE_DIR", str(tmp_path / "env-cache"))
    build_datasets(FileCorpus(corpus_dir), ByteTokenizer(), val_fraction=VF)
    [directory] = (tmp_path / "env-cache" / "data").iterdir()
    assert (directory / "train.json").is_file()


def test_max_tokens_caps_each_split_to_a_prefix(corpus_dir: Path, cache_dir: Path) -> None:
    full_train, full_val = build(corpus_dir, cache_dir)
    train, val = build(corpus_dir, cache_dir, max_tokens=1000)
    assert train.num_tokens == 1000 and val.num_tokens == math.ceil(1000 * VF)
    assert train.tokens.tolist() == full_train.tokens[:1000].tolist()
    assert val.tokens.tolist() == full_val.tokens[:250].tolist()
    with pytest.raises(DataError, match="max_tokens must be at least 1"):
        build(corpus_dir, cache_dir, max_tokens=0)


def test_reading_stops_once_both_splits_are_full(corpus_dir: Path, cache_dir: Path) -> None:
    read = []

    class Counting(FileCorpus):
        def documents(self) -> Iterator[Document]:
            for d in super().documents():
                read.append(d.key)
                yield d

    build_datasets(Counting(corpus_dir), ByteTokenizer(), cache_dir=cache_dir, max_tokens=500, val_fraction=VF)
    assert 0 < len(read) < 40


def test_empty_corpus_or_split_is_a_clear_error(tmp_path: Path, cache_dir: Path) -> None:
    (tmp_path / "empty").mkdir()
    for i in range(20):
        (tmp_path / "empty" / f"{i}.txt").write_text("")
    with pytest.raises(CorpusError, match="empty"):
        build(tmp_path / "empty", cache_dir)
    (tmp_path / "one.txt").write_text("a single document lands in a single split")
    with pytest.raises(CorpusError, match=r"split of files is empty .*more files"):
        build(tmp_path / "one.txt", cache_dir)
    assert not [f for f in cache_files(cache_dir) if f.endswith((".tokens", ".json"))]


def test_vocabularies_beyond_uint16_are_stored_as_uint32(tmp_path: Path, cache_dir: Path) -> None:
    class Wide:
        name, vocab_size, eod_id = "wide", 70_000, 69_999

        def encode(self, text: str) -> np.ndarray:
            return np.array([ord(c) + 65_000 for c in text], dtype=np.uint32)

        def decode(self, ids: object) -> str:
            raise NotImplementedError

    for i in range(8):
        (tmp_path / f"{i}.txt").write_text(f"doc {i}")
    train, _ = build_datasets(FileCorpus(tmp_path, suffixes=[".txt"]), Wide(), cache_dir=cache_dir, val_fraction=0.5)
    assert train.tokens.dtype == np.uint32 and train.manifest["dtype"] == "<u4"
    assert int(train.tokens.max()) == 69_999 and int(train.tokens.min()) >= 65_000
    assert storage_dtype(65_536) == np.uint16 and storage_dtype(65_537) == np.uint32


# -- atomic builds ----------------------------------------------------------


def test_an_interrupted_build_leaves_nothing_that_is_read(corpus_dir: Path, cache_dir: Path) -> None:
    class Interrupted(FileCorpus):
        def documents(self) -> Iterator[Document]:
            for i, d in enumerate(super().documents()):
                if i == 20:
                    raise KeyboardInterrupt
                yield d

    with pytest.raises(KeyboardInterrupt):
        build_datasets(Interrupted(corpus_dir), ByteTokenizer(), cache_dir=cache_dir, val_fraction=VF)
    [directory] = cache_dir.iterdir()
    assert list(directory.iterdir()) == []  # temp files removed, nothing renamed into place
    train, _ = build(corpus_dir, cache_dir)
    assert train.tokens.tolist() == expected_stream(FileCorpus(corpus_dir), "train")


def test_leftover_temp_files_are_ignored(corpus_dir: Path, cache_dir: Path) -> None:
    train, _ = build(corpus_dir, cache_dir)
    [directory] = cache_dir.iterdir()
    # What a SIGKILLed builder leaves behind: partial temp files beside the real ones.
    (directory / "train.tokens.abc123.tmp").write_bytes(b"\x01\x02\x03")
    (directory / "train.json.def456.tmp").write_text("{not json")
    again, _ = build(corpus_dir, cache_dir)
    assert again.tokens.tolist() == train.tokens.tolist()


@pytest.mark.parametrize("damage", ["truncate tokens", "delete manifest", "corrupt manifest", "delete tokens"])
def test_a_damaged_cache_is_rebuilt(corpus_dir: Path, cache_dir: Path, damage: str) -> None:
    build(corpus_dir, cache_dir)
    [directory] = cache_dir.iterdir()
    tokens, manifest = directory / "val.tokens", directory / "val.json"
    if damage == "truncate tokens":
        tokens.write_bytes(tokens.read_bytes()[:-2])
    elif damage == "delete manifest":
        manifest.unlink()  # a build killed between the renames
    elif damage == "corrupt manifest":
        manifest.write_text("{")
    else:
        tokens.unlink()
    _, val = build(corpus_dir, cache_dir)
    assert val.tokens.tolist() == expected_stream(FileCorpus(corpus_dir), "val")


# -- shards -----------------------------------------------------------------


@pytest.mark.parametrize("shard_tokens", [1, 7, 100, 1000, 10**9])
def test_shards_cover_the_stream_without_overlap(corpus_dir: Path, cache_dir: Path, shard_tokens: int) -> None:
    train, _ = build(corpus_dir, cache_dir)
    n = train.num_shards(shard_tokens)
    ranges = [train.shard_range(i, shard_tokens) for i in range(n)]
    assert ranges[0][0] == 0 and ranges[-1][1] == train.num_tokens
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert all(0 < end - start <= shard_tokens for start, end in ranges)
    if n < 50:
        assert np.concatenate([train.shard(i, shard_tokens) for i in range(n)]).tolist() == train.tokens.tolist()


def test_shard_arguments_are_checked() -> None:
    ds = TokenDataset(np.arange(10, dtype=np.uint16))
    assert ds.shard_range(3, 3) == (9, 10)
    for bad in [-1, 4]:
        with pytest.raises(DataError, match=f"shard {bad} is out of range: 4 shards"):
            ds.shard(bad, 3)
    with pytest.raises(DataError, match="shard_tokens must be at least 1"):
        ds.num_shards(0)


def test_shard_batches_walk_the_shard_in_order() -> None:
    ds = TokenDataset(np.arange(100, dtype=np.uint32))
    batches = list(ds.shard_batches(1, 24, batch_size=2, seq_len=4))  # shard 1 is tokens 24..47
    assert len(batches) == 3
    inputs = torch.cat([x for x, _ in batches]).reshape(-1)
    assert inputs.tolist() == list(range(24, 48))
    for x, y in batches:
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (2, 4)
        assert (y == x + 1).all()  # targets are the next tokens, the last one from shard 2
    # Windows that do not fill a batch are left out: 6 windows make one batch of 4.
    [(x, _)] = ds.shard_batches(3, 24, batch_size=4, seq_len=4)
    assert x[:, 0].tolist() == [72, 76, 80, 84]
    # The stream's last window has no next token for its last target.
    assert list(ds.shard_batches(4, 24, batch_size=1, seq_len=4)) == []  # tokens 96..99
    assert [x[0, 0].item() for x, _ in ds.shard_batches(0, 100, batch_size=1, seq_len=33)] == [0, 33, 66]
    assert [x[0, 0].item() for x, _ in ds.shard_batches(0, 100, batch_size=1, seq_len=50)] == [0]


# -- training batches -------------------------------------------------------


def test_batches_are_shifted_windows_of_the_stream() -> None:
    ds = TokenDataset(np.arange(1000, dtype=np.uint32))  # each token is its own position
    x, y = ds.batch(0, batch_size=16, seq_len=32, seed=1)
    assert x.shape == y.shape == (16, 32) and x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    assert (x[:, 1:] == x[:, :-1] + 1).all() and (y == x + 1).all()
    assert int(x[:, 0].min()) >= 0 and int(y[:, -1].max()) <= 999
    assert len(set(x[:, 0].tolist())) > 8  # rows start in different places


def test_batches_depend_only_on_seed_and_step(corpus_dir: Path, cache_dir: Path) -> None:
    a, _ = build(corpus_dir, cache_dir)
    b = TokenDataset.open(next(cache_dir.iterdir()), "train")  # a second, independent instance
    for step in [0, 1, 17]:
        assert all(
            torch.equal(p, q) for p, q in zip(a.batch(step, 4, 16, seed=3), b.batch(step, 4, 16, seed=3), strict=True)
        )
    assert not torch.equal(a.batch(0, 4, 16, seed=3)[0], a.batch(1, 4, 16, seed=3)[0])
    assert not torch.equal(a.batch(0, 4, 16, seed=3)[0], a.batch(0, 4, 16, seed=4)[0])
    # Resuming at a step yields what the uninterrupted run saw from that step on.
    run = a.batches(4, 16, seed=3)
    seen = [next(run) for _ in range(6)]
    resumed = a.batches(4, 16, seed=3, start_step=4)
    for expected in seen[4:]:
        assert torch.equal(next(resumed)[0], expected[0])


def test_batch_positions_are_pinned() -> None:
    # Part of the replay contract between machines and versions: changing how
    # positions are drawn must be a deliberate, visible change.
    ds = TokenDataset(np.arange(10**6, dtype=np.uint32))
    assert ds.batch(0, 4, 8, seed=0)[0][:, 0].tolist() == [282125, 159921, 613336, 971667]
    assert ds.batch(7, 4, 8, seed=123)[0][:, 0].tolist() == [801957, 139932, 775393, 871868]


def test_batches_are_identical_in_another_process(corpus_dir: Path, cache_dir: Path) -> None:
    train, _ = build(corpus_dir, cache_dir)
    here = [t.tolist() for t in train.batch(5, 3, 8, seed=42)]
    script = (
        "import json, sys\n"
        "from iota.data import ByteTokenizer, FileCorpus, build_datasets\n"
        "corpus = FileCorpus(sys.argv[1])\n"
        "train, _ = build_datasets(corpus, ByteTokenizer(), cache_dir=sys.argv[2], val_fraction=0.25)\n"
        "print(json.dumps([t.tolist() for t in train.batch(5, 3, 8, seed=42)]))\n"
    )
    package_root = str(Path(iota.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", script, str(corpus_dir), str(cache_dir)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert json.loads(out.stdout) == here


def test_batch_arguments_are_checked() -> None:
    ds = TokenDataset(np.arange(10, dtype=np.uint16))
    with pytest.raises(DataError, match="too few for a window"):
        ds.batch(0, 1, 10)
    with pytest.raises(DataError, match="batch_size must be at least 1"):
        ds.batch(0, 0, 4)
    with pytest.raises(DataError, match="1-D"):
        TokenDataset(np.zeros((2, 2), dtype=np.uint16))


# -- validation batches -----------------------------------------------------


def test_fixed_batches_are_the_same_spread_windows_every_time() -> None:
    ds = TokenDataset(np.arange(1001, dtype=np.uint32))
    batches = ds.fixed_batches(2, 10, num_batches=5)
    assert len(batches) == 5
    starts = torch.cat([x[:, 0] for x, _ in batches]).tolist()
    assert starts == [100 * i for i in range(10)]  # evenly spread, non-overlapping
    assert all((y == x + 1).all() for x, y in batches)
    again = ds.fixed_batches(2, 10, num_batches=5)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(batches, again, strict=True))
    # By default: every window that fits, each token once.
    everything = ds.fixed_batches(4, 10)
    assert len(everything) == 25
    assert torch.cat([x.reshape(-1) for x, _ in everything]).tolist() == list(range(1000))
    with pytest.raises(DataError, match="hold 25 batches of 4x10, not 26"):
        ds.fixed_batches(4, 10, num_batches=26)
