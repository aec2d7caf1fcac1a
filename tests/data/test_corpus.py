"""Corpora: which documents, in which order, in which split."""

import sys
from pathlib import Path

import pytest
from iota.data import CorpusError, FileCorpus, HFCorpus, MissingDependencyError, open_corpus, split_of, stdlib_corpus
from iota.data.corpus import documents_from_records


def test_directory_documents_are_sorted_by_relative_path(corpus_dir: Path) -> None:
    docs = list(FileCorpus(corpus_dir).documents())
    keys = [d.key for d in docs]
    assert keys == sorted(keys) and len(keys) == 40
    assert keys[0] == "d0/doc000.txt"
    assert docs[0].text == (corpus_dir / "d0/doc000.txt").read_text(encoding="utf-8")


def test_paths_keep_their_given_order_and_files_are_keyed_by_name(corpus_dir: Path) -> None:
    b, a = corpus_dir / "d1" / "doc001.txt", corpus_dir / "d0" / "doc000.txt"
    assert [d.key for d in FileCorpus([b, a]).documents()] == ["doc001.txt", "doc000.txt"]


def test_hidden_binary_and_filtered_files_are_skipped(tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("hidden")
    (tmp_path / ".secret").write_text("hidden")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02")
    (tmp_path / "a.py").write_text("print(1)\n")
    (tmp_path / "b.txt").write_text("text\n")
    assert [d.key for d in FileCorpus(tmp_path).documents()] == ["a.py", "b.txt"]
    assert [d.key for d in FileCorpus(tmp_path, suffixes=[".py"]).documents()] == ["a.py"]


def test_invalid_utf8_is_replaced_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    assert [d.text for d in FileCorpus(tmp_path).documents()] == ["caf\ufffd"]


def test_missing_path_and_empty_directory_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="no such file or directory"):
        FileCorpus(tmp_path / "nope")
    with pytest.raises(CorpusError, match="no files"):
        FileCorpus(tmp_path)
    with pytest.raises(CorpusError, match="no paths"):
        FileCorpus([])


def test_identity_follows_file_changes(corpus_dir: Path) -> None:
    before = FileCorpus(corpus_dir).identity()
    assert FileCorpus(corpus_dir).identity() == before
    (corpus_dir / "d0" / "doc000.txt").write_text("changed, and longer than before " * 50)
    assert FileCorpus(corpus_dir).identity() != before


def test_split_is_a_stable_hash_with_the_asked_fraction() -> None:
    keys = [f"pkg/module_{i}.py" for i in range(20000)]
    val = [k for k in keys if split_of(k, 0.03) == "val"]
    assert 0.025 < len(val) / len(keys) < 0.035
    # Not random state: the same answer in any process and version, pinned here.
    pinned = [85, 113, 147, 160, 238, 259, 287, 289, 311, 348]
    assert [i for i in range(400) if split_of(keys[i], 0.03) == "val"] == pinned
    # A larger fraction only moves documents into val, never out of it.
    assert all(split_of(k, 0.1) == "val" for k in val)


def test_stdlib_corpus_is_sorted_python_without_site_packages() -> None:
    corpus = stdlib_corpus()
    keys = [key for key, _ in corpus.files]
    assert len(keys) > 500 and keys == sorted(keys)
    assert all(k.endswith(".py") for k in keys)
    assert "os.py" in keys and not any(k.startswith(("site-packages/", "dist-packages/")) for k in keys)
    assert not any("__pycache__" in k for k in keys)
    assert corpus.identity() == stdlib_corpus().identity()
    assert corpus.name.startswith(f"stdlib-{sys.implementation.name}{sys.version_info.major}.")


def test_open_corpus_understands_each_source(corpus_dir: Path) -> None:
    assert open_corpus("stdlib").name == stdlib_corpus().name
    assert isinstance(open_corpus(str(corpus_dir)), FileCorpus)
    assert isinstance(open_corpus([corpus_dir]), FileCorpus)
    hf = open_corpus("hf:HuggingFaceFW/fineweb:sample-10BT")
    assert isinstance(hf, HFCorpus) and (hf.path, hf.config) == ("HuggingFaceFW/fineweb", "sample-10BT")
    corpus = FileCorpus(corpus_dir)
    assert open_corpus(corpus) is corpus
    with pytest.raises(CorpusError, match="names no dataset"):
        open_corpus("hf:")


def test_hf_rows_become_documents_keyed_by_content() -> None:
    rows = [{"text": "one", "id": 1}, {"text": "two", "id": 2}, {"text": "one", "id": 3}]
    docs = list(documents_from_records(iter(rows), "text"))
    assert [d.text for d in docs] == ["one", "two", "one"]
    assert docs[0].key == docs[2].key != docs[1].key
    with pytest.raises(CorpusError, match="no field 'content'"):
        list(documents_from_records(rows, "content"))


def test_hf_corpus_without_datasets_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    corpus = HFCorpus("HuggingFaceFW/fineweb", "sample-10BT")
    assert corpus.identity() != HFCorpus("HuggingFaceFW/fineweb", "sample-100BT").identity()
    with pytest.raises(MissingDependencyError, match="pip install datasets"):
        next(corpus.documents())
