"""The token cache and the datasets read from it.

A corpus is tokenized once into two flat arrays, train and val: each document's
ids followed by the tokenizer's end-of-document id, in corpus order. They are
stored under <cache>/<corpus>-<tokenizer>-<hash>/ as {split}.tokens (raw
little-endian uint16 for vocabularies up to 65536 ids, else uint32) beside a
{split}.json manifest, and memory-mapped when read.

Positions in a split are the shared address space of the swarm: shard i of
size n is the token range [i*n, min((i+1)*n, num_tokens)), so an orchestrator
can lease shard ids and a validator can replay exactly what a miner read."""

import hashlib
import json
import logging
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from iota.data.cache import PathLike, atomic_file, cache_root, fingerprint, safe_name, write_json
from iota.data.corpus import VAL_FRACTION, Corpus, split_of
from iota.data.errors import CorpusError, DataError
from iota.data.tokenizers import Tokenizer

log = logging.getLogger(__name__)

FORMAT = 1
"""Bumped whenever the layout of the cache changes, so old caches are not reused."""
SPLITS = ("train", "val")

Batch = tuple[torch.Tensor, torch.Tensor]


def storage_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


class TokenDataset:
    """One split's token stream, addressed by position and by shard."""

    def __init__(self, tokens: np.ndarray, manifest: Mapping[str, Any] | None = None) -> None:
        """`tokens` is a 1-D integer array, usually a read-only memmap of the cache;
        `manifest` describes where it came from (see build_datasets)."""
        if tokens.ndim != 1:
            raise DataError(f"tokens must be 1-D; got shape {tokens.shape}")
        self.tokens = tokens
        self.manifest: dict[str, Any] = dict(manifest or {})

    @classmethod
    def open(cls, directory: Path, split: str) -> "TokenDataset":
        """The split cached in `directory`; raises DataError if it is missing or
        does not match its manifest (e.g. a build was killed)."""
        try:
            manifest = json.loads((directory / f"{split}.json").read_text(encoding="utf-8"))
            dtype = np.dtype(manifest["dtype"])
            n = int(manifest["num_tokens"])
            path = directory / f"{split}.tokens"
            size = path.stat().st_size
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"no usable {split} cache in {directory}: {e}") from e
        if manifest.get("format") != FORMAT or size != n * dtype.itemsize or n == 0:
            raise DataError(f"{path} does not match its manifest (an interrupted or damaged build)")
        return cls(np.memmap(path, dtype=dtype, mode="r", shape=(n,)), manifest)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    # -- shards ---------------------------------------------------------------

    def num_shards(self, shard_tokens: int) -> int:
        """Shards of `shard_tokens` tokens cover the stream; the last may be shorter."""
        _positive(shard_tokens=shard_tokens)
        return -(-self.num_tokens // shard_tokens)

    def shard_range(self, shard_id: int, shard_tokens: int) -> tuple[int, int]:
        """Token positions [start, end) of shard `shard_id`."""
        count = self.num_shards(shard_tokens)
        if not 0 <= shard_id < count:
            raise DataError(f"shard {shard_id} is out of range: {count} shards of {shard_tokens} tokens")
        start = shard_id * shard_tokens
        return start, min(start + shard_tokens, self.num_tokens)

    def shard(self, shard_id: int, shard_tokens: int) -> np.ndarray:
        """The shard's tokens (a read-only view of the cache)."""
        start, end = self.shard_range(shard_id, shard_tokens)
        return self.tokens[start:end]

    def shard_batches(self, shard_id: int, shard_tokens: int, batch_size: int, seq_len: int) -> Iterator[Batch]:
        """The shard in order, as batches of consecutive windows.

        Window k's inputs are the shard's tokens [k*seq_len, (k+1)*seq_len); its
        targets are shifted by one, so the last target may be the first token of
        the next shard. Windows that do not fill a whole batch are left out: a
        shard_tokens that is a multiple of batch_size*seq_len uses every token."""
        start, end = self.shard_range(shard_id, shard_tokens)
        _positive(batch_size=batch_size, seq_len=seq_len)
        windows = (min(end, self.num_tokens - 1) - start) // seq_len
        for b in range(windows // batch_size):
            first = start + b * batch_size * seq_len
            yield self._gather(first + seq_len * np.arange(batch_size), seq_len)

    # -- batches --------------------------------------------------------------

    def batch(self, step: int, batch_size: int, seq_len: int, *, seed: int = 0) -> Batch:
        """(inputs, targets), int64 tensors of shape [batch_size, seq_len], targets
        shifted by one: windows at positions that depend only on (seed, step).

        The positions come from a hash rather than a numpy or torch generator,
        whose streams may change between versions: any machine can replay or
        resume a run from its seed and step."""
        _positive(batch_size=batch_size, seq_len=seq_len)
        positions = self.num_tokens - seq_len  # window starts 0..N-seq_len-1
        if positions < 1:
            raise DataError(f"{self.num_tokens} tokens are too few for a window of {seq_len}+1")
        starts = [_hash64(f"{seed}/{step}/{row}") % positions for row in range(batch_size)]
        return self._gather(np.asarray(starts, dtype=np.int64), seq_len)

    def batches(self, batch_size: int, seq_len: int, *, seed: int = 0, start_step: int = 0) -> Iterator[Batch]:
        """batch(step) for step = start_step, start_step+1, ... without end."""
        step = start_step
        while True:
            yield self.batch(step, batch_size, seq_len, seed=seed)
            step += 1

    def fixed_batches(self, batch_size: int, seq_len: int, num_batches: int | None = None) -> list[Batch]:
        """The same batches on every call, run and machine, for comparable
        validation losses: num_batches*batch_size non-overlapping windows spread
        evenly over the split; by default as many as fit (every token once)."""
        _positive(batch_size=batch_size, seq_len=seq_len)
        fit = (self.num_tokens - 1) // seq_len // batch_size
        if num_batches is None:
            num_batches = fit
        _positive(num_batches=num_batches)
        if num_batches > fit:
            raise DataError(
                f"{self.num_tokens} tokens hold {fit} batches of {batch_size}x{seq_len}, "
                f"not {num_batches}: ask for fewer or smaller batches"
            )
        windows = num_batches * batch_size
        stride = (self.num_tokens - 1) // windows
        starts = stride * np.arange(windows, dtype=np.int64)
        return [self._gather(rows, seq_len) for rows in starts.reshape(num_batches, batch_size)]

    def _gather(self, starts: np.ndarray, seq_len: int) -> Batch:
        index = starts[:, None] + np.arange(seq_len + 1)
        windows = torch.from_numpy(np.array(self.tokens[index], dtype=np.int64))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def _positive(**values: int) -> None:
    for name, v in values.items():
        if v < 1:
            raise DataError(f"{name} must be at least 1; got {v}")


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def build_datasets(
    corpus: Corpus,
    tokenizer: Tokenizer,
    *,
    cache_dir: PathLike | None = None,
    max_tokens: int | None = None,
    val_fraction: float = VAL_FRACTION,
) -> tuple[TokenDataset, TokenDataset]:
    """(train, val) for the corpus and tokenizer, built on first use and read
    from the cache after that.

    Documents go to the split `split_of(key, val_fraction)` names. `max_tokens`
    caps train at max_tokens and val at ceil(max_tokens*val_fraction) tokens
    (the last document cut short); reading stops once both are full, so a cap
    also makes the first build fast."""
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must lie strictly between 0 and 1; got {val_fraction}")
    if max_tokens is not None:
        _positive(max_tokens=max_tokens)
    corpus_identity = corpus.identity()
    key = fingerprint(FORMAT, corpus_identity, tokenizer.name, max_tokens, val_fraction)
    directory = cache_root(cache_dir) / safe_name(f"{corpus.name}-{tokenizer.name}-{key}")
    try:
        return TokenDataset.open(directory, "train"), TokenDataset.open(directory, "val")
    except DataError:
        pass
    log.info("tokenizing %s with %s into %s", corpus.name, tokenizer.name, directory)
    caps = {"train": max_tokens, "val": None if max_tokens is None else math.ceil(max_tokens * val_fraction)}
    stats = _write_splits(corpus, tokenizer, directory, caps, val_fraction)
    for split in SPLITS:
        # The manifest goes last: its presence is what marks a split as complete.
        write_json(
            directory / f"{split}.json",
            {
                "format": FORMAT,
                "identity": directory.name,
                "split": split,
                "corpus": corpus.name,
                "corpus_identity": corpus_identity,
                "tokenizer": tokenizer.name,
                "vocab_size": tokenizer.vocab_size,
                "eod_id": tokenizer.eod_id,
                "dtype": storage_dtype(tokenizer.vocab_size).str,
                "max_tokens": caps[split],
                "val_fraction": val_fraction,
                **stats[split],
            },
        )
    return TokenDataset.open(directory, "train"), TokenDataset.open(directory, "val")


class _SplitWriter:
    """Appends documents to one split's file, up to an optional cap."""

    def __init__(self, file: IO[bytes], cap: int | None) -> None:
        self.file, self.cap = file, cap
        self.num_tokens = self.num_documents = 0
        self.sha256 = hashlib.sha256()

    @property
    def full(self) -> bool:
        return self.cap is not None and self.num_tokens >= self.cap

    def write(self, ids: np.ndarray) -> None:
        if self.cap is not None:
            ids = ids[: self.cap - self.num_tokens]
        data = ids.tobytes()
        self.file.write(data)
        self.sha256.update(data)
        self.num_tokens += len(ids)
        self.num_documents += 1

    def stats(self) -> dict[str, Any]:
        """The manifest's account of what was written; sha256 lets machines
        check they hold the same stream."""
        return {"num_tokens": self.num_tokens, "num_documents": self.num_documents, "sha256": self.sha256.hexdigest()}


def _write_splits(
    corpus: Corpus, tokenizer: Tokenizer, directory: Path, caps: Mapping[str, int | None], val_fraction: float
) -> dict[str, dict[str, Any]]:
    dtype = storage_dtype(tokenizer.vocab_size)
    eod = np.array([tokenizer.eod_id], dtype=dtype)
    with atomic_file(directory / "train.tokens") as train, atomic_file(directory / "val.tokens") as val:
        writers = {"train": _SplitWriter(train, caps["train"]), "val": _SplitWriter(val, caps["val"])}
        for doc in corpus.documents():
            writer = writers[split_of(doc.key, val_fraction)]
            # Empty documents add nothing, not even an EOD, so a corpus of empty
            # files is reported as empty.
            if doc.text and not writer.full:
                writer.write(np.concatenate([tokenizer.encode(doc.text).astype(dtype, copy=False), eod]))
            if all(w.full for w in writers.values()):
                break
        for split, w in writers.items():
            if w.num_tokens == 0:
                raise CorpusError(
                    f"the {split} split of {corpus.name} is empty ({writers['train'].num_documents} train, "
                    f"{writers['val'].num_documents} val documents): documents are split by a hash of "
                    f"their name: give more files or another val_fraction"
                )
        return {split: w.stats() for split, w in writers.items()}
