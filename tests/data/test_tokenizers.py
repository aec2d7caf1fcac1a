"""Tokenizers: exact round trips, the EOD id, names that identify the mapping."""

import importlib.util
import sys
from pathlib import Path

import iota.data.tokenizers as tokenizers_module
import numpy as np
import pytest
from iota.data import (
    BPETokenizer,
    ByteTokenizer,
    FileCorpus,
    MissingDependencyError,
    TokenizerError,
    corpus_bpe,
    get_tokenizer,
    train_bpe,
)

TEXTS = ["", "hello", "tabs\tand\r\nnewlines\n", "ünïcödé 東京 😀 ζ", "x <|endoftext|> y", "  leading and trailing  "]

needs_tokenizers = pytest.mark.skipif(
    importlib.util.find_spec("tokenizers") is None,
    reason="the BPE needs the optional 'tokenizers' package: pip install tokenizers",
)


@pytest.mark.parametrize("text", TEXTS)
def test_byte_round_trip_is_exact(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text


def test_byte_vocabulary_is_bytes_plus_eod() -> None:
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eod_id, tok.name) == (257, 256, "byte")
    assert tok.decode([104, 256, 105]) == "hi"  # EOD separates documents and decodes to nothing
    assert tok.decode([0xE6, 0x9D]) == "\ufffd"  # a character cut by a window does not raise
    with pytest.raises(TokenizerError, match=r"\[0, 257\)"):
        tok.decode([257])
    with pytest.raises(TokenizerError):
        tok.decode([-1])


def test_unknown_tokenizer_names_are_clear_errors() -> None:
    assert isinstance(get_tokenizer("byte"), ByteTokenizer)
    for spec in ["bytes", "gpt2", "bpe:", "bpe:many", ""]:
        with pytest.raises(TokenizerError, match="unknown tokenizer"):
            get_tokenizer(spec)
    with pytest.raises(TokenizerError, match="from a corpus"):
        get_tokenizer("bpe")
    tok = ByteTokenizer()
    assert get_tokenizer(tok) is tok


def test_missing_tokenizers_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(MissingDependencyError, match="pip install tokenizers"):
        train_bpe(["some text"], 300)


@needs_tokenizers
def test_bpe_learns_a_lossless_deterministic_vocabulary(corpus_dir: Path) -> None:
    texts = [d.text for d in FileCorpus(corpus_dir).documents()]
    tok = train_bpe(texts, 300)
    assert tok.vocab_size == 300 and 0 <= tok.eod_id < 300
    for text in TEXTS + texts[:5]:
        ids = tok.encode(text)
        assert ids.ndim == 1 and (ids < tok.vocab_size).all()
        assert tok.decode(ids) == text
    # Merges actually compress the text they were learned from.
    assert len(tok.encode(texts[0])) < 0.7 * len(texts[0].encode())
    # A vocabulary larger than the text supports stops where the merges run out.
    assert 258 <= train_bpe(texts[:2], 5000).vocab_size < 5000
    # The literal EOD string is text, never the EOD id.
    assert tok.eod_id not in tok.encode("a <|endoftext|> b").tolist()
    assert tok.decode([*tok.encode("a"), tok.eod_id, *tok.encode("b")]) == "ab"
    again = train_bpe(texts, 300)
    assert again.name == tok.name and again.to_str() == tok.to_str()
    assert BPETokenizer(tok.to_str()).name == tok.name
    with pytest.raises(TokenizerError, match="at least 258"):
        train_bpe(texts, 257)


@needs_tokenizers
def test_corpus_bpe_is_cached_by_corpus_and_size(
    corpus_dir: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = FileCorpus(corpus_dir)
    tok = get_tokenizer("bpe:300", corpus, cache_dir=cache_dir)
    [cached] = (cache_dir / "tokenizers").iterdir()
    assert cached.name.startswith("bpe300-") and tok.vocab_size == 300

    def no_training(*args: object) -> None:
        raise AssertionError("the cached BPE should have been reused")

    monkeypatch.setattr(tokenizers_module, "train_bpe", no_training)
    assert corpus_bpe(corpus, 300, cache_dir=cache_dir).name == tok.name
    with pytest.raises(AssertionError, match="reused"):
        corpus_bpe(corpus, 320, cache_dir=cache_dir)  # another size is another tokenizer


@needs_tokenizers
def test_corpus_bpe_learns_only_from_the_training_split(corpus_dir: Path, cache_dir: Path) -> None:
    from iota.data import split_of

    corpus = FileCorpus(corpus_dir)
    seen: list[str] = []
    original = tokenizers_module.train_bpe

    def spy(texts, vocab_size):  # type: ignore[no-untyped-def]
        texts = list(texts)
        seen.extend(texts)
        return original(texts, vocab_size)

    mp = pytest.MonkeyPatch()
    mp.setattr(tokenizers_module, "train_bpe", spy)
    try:
        corpus_bpe(corpus, 300, cache_dir=cache_dir, val_fraction=0.25)
    finally:
        mp.undo()
    train = [d.text for d in corpus.documents() if split_of(d.key, 0.25) == "train"]
    assert seen == train and len(train) < 40


def test_byte_encode_is_a_view_of_the_utf8_bytes() -> None:
    ids = ByteTokenizer().encode("abc")
    assert ids.dtype == np.uint8 and not ids.flags.writeable
