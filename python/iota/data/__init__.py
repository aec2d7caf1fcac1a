"""Tokens for training: a corpus (the Python standard library by default, local
files, or a Hugging Face stream), a tokenizer (bytes by default, or a BPE), and
a token cache addressed by shard, so any machine can read exactly the tokens
another one did.

    import iota.data
    train, val, tok = iota.data.load()                 # stdlib, byte tokenizer
    x, y = train.batch(step, batch_size=8, seq_len=256, seed=0)
    val_batches = val.fixed_batches(8, 256, num_batches=16)
    tokens = train.shard(shard_id, shard_tokens=1 << 20)
"""

from collections.abc import Sequence

from iota.data.cache import PathLike
from iota.data.corpus import (
    VAL_FRACTION,
    Corpus,
    Document,
    FileCorpus,
    HFCorpus,
    open_corpus,
    split_of,
    stdlib_corpus,
)
from iota.data.errors import CorpusError, DataError, MissingDependencyError, TokenizerError
from iota.data.tokenizers import BPETokenizer, ByteTokenizer, Tokenizer, corpus_bpe, get_tokenizer, train_bpe
from iota.data.tokens import TokenDataset, build_datasets

__all__ = [
    "VAL_FRACTION",
    "BPETokenizer",
    "ByteTokenizer",
    "Corpus",
    "CorpusError",
    "DataError",
    "Document",
    "FileCorpus",
    "HFCorpus",
    "MissingDependencyError",
    "TokenDataset",
    "Tokenizer",
    "TokenizerError",
    "build_datasets",
    "corpus_bpe",
    "get_tokenizer",
    "load",
    "open_corpus",
    "split_of",
    "stdlib_corpus",
    "train_bpe",
]


def load(
    source: str | PathLike | Sequence[PathLike] | Corpus = "stdlib",
    tokenizer: str | Tokenizer = "byte",
    *,
    cache_dir: PathLike | None = None,
    max_tokens: int | None = None,
    val_fraction: float = VAL_FRACTION,
) -> tuple[TokenDataset, TokenDataset, Tokenizer]:
    """(train, val, tokenizer), tokenized on first use and cached after that.

    source: "stdlib", a file or directory path or a list of them,
        "hf:<dataset>[:<config>]" (needs `datasets`, network and max_tokens), or a Corpus.
    tokenizer: "byte", "bpe", "bpe:<vocab_size>" (needs `tokenizers`), or a Tokenizer.
    cache_dir: default $IOTA_CACHE_DIR/data, else ~/.cache/iota/data.
    max_tokens: cap on the training tokens (validation gets val_fraction of it).
    """
    corpus = open_corpus(source)
    if isinstance(corpus, HFCorpus) and max_tokens is None:
        raise CorpusError(f"{corpus.name} is a stream too large to read whole: pass max_tokens")
    tok = get_tokenizer(tokenizer, corpus, cache_dir=cache_dir, val_fraction=val_fraction)
    train, val = build_datasets(corpus, tok, cache_dir=cache_dir, max_tokens=max_tokens, val_fraction=val_fraction)
    return train, val, tok
