"""iota.data.load: each source and tokenizer end to end."""

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from iota.data import (
    VAL_FRACTION,
    ByteTokenizer,
    CorpusError,
    FileCorpus,
    HFCorpus,
    TokenizerError,
    load,
    split_of,
    stdlib_corpus,
)


def test_stdlib_with_a_cap(cache_dir: Path) -> None:
    train, val, tok = load("stdlib", cache_dir=cache_dir, max_tokens=200_000)
    assert isinstance(tok, ByteTokenizer)
    assert train.num_tokens == 200_000 and val.num_tokens == 6_000
    assert train.manifest["corpus"].startswith("stdlib-")
    # The stream starts with the first training file in sorted order, byte for byte.
    first = next(d for d in stdlib_corpus().documents() if d.text and split_of(d.key, VAL_FRACTION) == "train")
    n = len(first.text.encode())
    assert tok.decode(train.tokens[:n]) == first.text and train.tokens[n] == tok.eod_id
    x, _ = train.batch(0, batch_size=8, seq_len=128, seed=0)
    assert x.shape == (8, 128) and int(x.max()) < tok.vocab_size


def test_whole_stdlib(cache_dir: Path) -> None:
    train, val, _ = load(cache_dir=cache_dir)
    assert train.num_tokens > 5_000_000 and 0.01 < val.num_tokens / train.num_tokens < 0.06
    assert train.manifest["sha256"] != val.manifest["sha256"]


def test_local_directory_and_files(corpus_dir: Path, cache_dir: Path) -> None:
    train, val, _ = load(corpus_dir, cache_dir=cache_dir, val_fraction=0.25)
    files = sorted(corpus_dir.rglob("*.txt"))
    train2, val2, _ = load([str(f) for f in files], cache_dir=cache_dir, val_fraction=0.25)
    # Different keys (names instead of relative paths), so possibly other splits,
    # but the same text overall.
    total = train.num_tokens + val.num_tokens
    assert total == train2.num_tokens + val2.num_tokens == sum(len(f.read_bytes()) + 1 for f in files)


def test_errors_name_the_problem(tmp_path: Path, cache_dir: Path) -> None:
    with pytest.raises(CorpusError, match="no such file or directory"):
        load(tmp_path / "missing", cache_dir=cache_dir)
    with pytest.raises(TokenizerError, match="unknown tokenizer 'sentencepiece'"):
        load("stdlib", tokenizer="sentencepiece", cache_dir=cache_dir, max_tokens=1000)
    with pytest.raises(CorpusError, match="pass max_tokens"):
        load("hf:HuggingFaceFW/fineweb", cache_dir=cache_dir)


def test_hf_stream_through_a_fake_dataset(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"text": f"web page {i}: " + "lorem ipsum " * (i % 7), "url": f"u{i}"} for i in range(400)]
    served: list[int] = []

    def fake_records(self: HFCorpus) -> Iterator[dict[str, str]]:
        assert (self.path, self.config) == ("HuggingFaceFW/fineweb", "sample-10BT")
        for i, row in enumerate(rows):
            served.append(i)
            yield row

    monkeypatch.setattr(HFCorpus, "_records", fake_records)
    train, val, tok = load("hf:HuggingFaceFW/fineweb:sample-10BT", cache_dir=cache_dir, max_tokens=2000)
    assert train.num_tokens == 2000 and val.num_tokens == 60
    assert len(served) < len(rows)  # the stream is read only as far as the cap needs
    assert tok.decode(train.shard(0, 13)) == "web page 0: "
    assert train.manifest["corpus"] == "hf-fineweb-sample-10BT"


needs_tokenizers = pytest.mark.skipif(
    importlib.util.find_spec("tokenizers") is None,
    reason="the BPE needs the optional 'tokenizers' package: pip install tokenizers",
)


@needs_tokenizers
def test_bpe_end_to_end(corpus_dir: Path, cache_dir: Path) -> None:
    train, _, tok = load(corpus_dir, tokenizer="bpe:300", cache_dir=cache_dir, val_fraction=0.25)
    assert tok.vocab_size == 300 and train.tokens.dtype == np.uint16
    assert train.manifest["tokenizer"] == tok.name and tok.name.startswith("bpe300-")
    # EOD decodes to nothing, so the decoded stream is the training text itself.
    assert tok.decode(train.tokens) == "".join(
        d.text for d in FileCorpus(corpus_dir).documents() if split_of(d.key, 0.25) == "train"
    )
    again = load(corpus_dir, tokenizer="bpe:300", cache_dir=cache_dir, val_fraction=0.25)
    assert again[2].name == tok.name and again[0].tokens.tolist() == train.tokens.tolist()
