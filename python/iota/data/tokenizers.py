"""Text to token ids and back: bytes by default, or a byte-level BPE learned
from the corpus's training split with Hugging Face `tokenizers` (optional).

Both end every document with an end-of-document id `eod_id`; `encode` never
emits it (documents are joined by the token cache) and `decode` drops it."""

import hashlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

import numpy as np

from iota.data.cache import PathLike, atomic_file, cache_root, fingerprint
from iota.data.corpus import VAL_FRACTION, Corpus, split_of
from iota.data.errors import TokenizerError, require

log = logging.getLogger(__name__)

EOD = "<|endoftext|>"
BPE_VOCAB_SIZE = 4096
"""Vocabulary of "bpe" without a size."""
BPE_TRAIN_CHARS = 50_000_000
"""BPE learns from at most this much training text: all of the standard
library, and a bounded pass over an endless stream."""


class Tokenizer(Protocol):
    @property
    def name(self) -> str:
        """Identifies the exact mapping, so token caches are keyed by it."""
        ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def eod_id(self) -> int: ...

    def encode(self, text: str) -> np.ndarray:
        """A 1-D array of unsigned ids, each < vocab_size."""
        ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...


class ByteTokenizer:
    """The UTF-8 bytes of the text are the ids 0..255; 256 ends a document, so
    vocab_size is 257. Needs no training and is the same everywhere."""

    name = "byte"
    vocab_size = 257
    eod_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        a = _checked(ids, self.vocab_size)
        # A window cut mid-character decodes to U+FFFD rather than failing.
        return a[a != self.eod_id].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class BPETokenizer:
    """A byte-level BPE (GPT-2 style: lossless for any text) around a Hugging
    Face `tokenizers.Tokenizer`; EOD is the special token "<|endoftext|>"."""

    def __init__(self, serialized: str) -> None:
        """From the JSON that `to_str()` returns."""
        hf = require("tokenizers", "the BPE tokenizer")
        self._tok = hf.Tokenizer.from_str(serialized)
        # Text that happens to contain "<|endoftext|>" must encode as ordinary
        # bytes, or decode(encode(text)) would lose it.
        self._tok.encode_special_tokens = True
        eod = self._tok.token_to_id(EOD)
        if eod is None:
            raise TokenizerError(f"this BPE has no {EOD} token; train it with train_bpe()")
        self.eod_id: int = eod
        self.vocab_size: int = self._tok.get_vocab_size()
        self.name = f"bpe{self.vocab_size}-{hashlib.sha256(serialized.encode()).hexdigest()[:12]}"

    def to_str(self) -> str:
        return self._tok.to_str()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.uint32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tok.decode(_checked(ids, self.vocab_size).tolist(), skip_special_tokens=True)


def _checked(ids: Sequence[int] | np.ndarray, vocab_size: int) -> np.ndarray:
    a = np.asarray(ids, dtype=np.int64).reshape(-1)
    if a.size and (a.min() < 0 or a.max() >= vocab_size):
        raise TokenizerError(f"ids must lie in [0, {vocab_size}); got {a.min()}..{a.max()}")
    return a


def train_bpe(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
    """Learn a byte-level BPE of `vocab_size` ids (fewer if the text runs out of
    pairs to merge), deterministic for the same texts."""
    if not 258 <= vocab_size <= 2**31:
        raise TokenizerError(f"BPE vocab_size must be at least 258 (256 bytes, EOD, one merge); got {vocab_size}")
    hf = require("tokenizers", "the BPE tokenizer")
    tok = hf.Tokenizer(hf.models.BPE())
    # No normalizer and no prefix space: decode(encode(text)) == text exactly.
    tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = hf.decoders.ByteLevel()
    trainer = hf.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD],
        initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return BPETokenizer(tok.to_str())


def corpus_bpe(
    corpus: Corpus,
    vocab_size: int = BPE_VOCAB_SIZE,
    *,
    cache_dir: PathLike | None = None,
    val_fraction: float = VAL_FRACTION,
) -> BPETokenizer:
    """The BPE for a corpus: learned from its training split (validation text
    stays unseen) on first use, then read from
    <cache>/tokenizers/bpe<vocab_size>-<hash of corpus identity and settings>.json."""
    key = fingerprint(corpus.identity(), vocab_size, val_fraction, BPE_TRAIN_CHARS)
    path = cache_root(cache_dir) / "tokenizers" / f"bpe{vocab_size}-{key}.json"
    if path.is_file():
        return BPETokenizer(path.read_text(encoding="utf-8"))
    log.info("training a %d-id BPE on %s into %s", vocab_size, corpus.name, path)
    tok = train_bpe(_training_texts(corpus, val_fraction), vocab_size)
    with atomic_file(path) as f:
        f.write(tok.to_str().encode("utf-8"))
    return tok


def _training_texts(corpus: Corpus, val_fraction: float) -> Iterator[str]:
    budget = BPE_TRAIN_CHARS
    for doc in corpus.documents():
        if budget <= 0:
            return
        if split_of(doc.key, val_fraction) == "train":
            yield doc.text[:budget]
            budget -= len(doc.text)


def get_tokenizer(
    spec: "str | Tokenizer",
    corpus: Corpus | None = None,
    *,
    cache_dir: PathLike | None = None,
    val_fraction: float = VAL_FRACTION,
) -> Tokenizer:
    """A tokenizer from a spec: "byte"; "bpe" or "bpe:<vocab_size>" (learned
    from `corpus`, cached); or a Tokenizer, returned as is."""
    if not isinstance(spec, str):
        return spec
    if spec == "byte":
        return ByteTokenizer()
    kind, _, size = spec.partition(":")
    if spec == "bpe" or (kind == "bpe" and size.isdigit()):
        if corpus is None:
            raise TokenizerError("a BPE tokenizer is learned from a corpus: pass one")
        return corpus_bpe(corpus, int(size or BPE_VOCAB_SIZE), cache_dir=cache_dir, val_fraction=val_fraction)
    raise TokenizerError(f"unknown tokenizer {spec!r}: use 'byte', 'bpe' or 'bpe:<vocab_size>'")
