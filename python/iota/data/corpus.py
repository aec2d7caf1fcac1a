"""Where text comes from: the Python standard library (on every machine, no
download), local files and directories, or a Hugging Face dataset stream; and
the rule that puts each document in the train or validation split."""

import hashlib
import os
import sys
import sysconfig
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from iota.data.cache import PathLike, fingerprint
from iota.data.errors import CorpusError, require

VAL_FRACTION = 0.03
"""Share of documents held out for validation, by default."""


@dataclass(frozen=True)
class Document:
    key: str
    """A name that is the same on every machine (a relative path, a content
    hash); it alone decides the document's split."""
    text: str


class Corpus(Protocol):
    """An ordered, repeatable sequence of documents."""

    @property
    def name(self) -> str:
        """Short and readable; goes into cache directory names."""
        ...

    def identity(self) -> str:
        """Changes whenever `documents()` could yield something different."""
        ...

    def documents(self) -> Iterator[Document]: ...


def split_of(key: str, val_fraction: float) -> str:
    """'train' or 'val' for a document key.

    A hash of the key rather than random state, so every machine, run and
    corpus cap agrees on the split, and a document never changes sides when
    others are added or removed."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    return "val" if h < val_fraction * 2**64 else "train"


class FileCorpus:
    """Text files, each one document, in a fixed order: the given paths in turn,
    a directory's files sorted by relative path.

    Directories are walked recursively, skipping hidden entries (".git") and
    directories named in `skip_dirs`; `suffixes` keeps only matching files.
    Files holding a NUL byte are taken as binary and skipped; other bytes that
    are not valid UTF-8 decode to U+FFFD, so odd test fixtures cannot stop a
    build. The file list is taken when the corpus is made."""

    def __init__(
        self,
        paths: PathLike | Sequence[PathLike],
        *,
        suffixes: Collection[str] | None = None,
        skip_dirs: Collection[str] = (),
        name: str = "files",
    ) -> None:
        roots = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
        if not roots:
            raise CorpusError("no paths given: pass at least one file or directory")
        self._name = name
        self._suffixes = sorted(suffixes) if suffixes is not None else None
        self._skip_dirs = set(skip_dirs)
        self.files: list[tuple[str, Path]] = []
        """(key, path) of every file, in document order."""
        for root in roots:
            if root.is_dir():
                self.files += self._walk(root)
            elif root.is_file():
                self.files.append((root.name, root))
            else:
                raise CorpusError(f"no such file or directory: {root}")
        if not self.files:
            wanted = f" ending in {', '.join(self._suffixes)}" if self._suffixes else ""
            raise CorpusError(f"no files{wanted} found under {', '.join(map(str, roots))}")

    def _walk(self, root: Path) -> list[tuple[str, Path]]:
        found = []
        for folder, dirs, names in os.walk(root):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d not in self._skip_dirs]
            for n in names:
                if n.startswith(".") or (self._suffixes and not n.endswith(tuple(self._suffixes))):
                    continue
                path = Path(folder, n)
                found.append((path.relative_to(root).as_posix(), path))
        return sorted(found)

    @property
    def name(self) -> str:
        return self._name

    def identity(self) -> str:
        # Sizes and mtimes rather than contents: cheap for any corpus size, and
        # an edited file changes its mtime. Absolute paths are left out so a
        # moved copy keeps its identity.
        stats = [(key, st.st_size, st.st_mtime_ns) for key, st in ((k, p.stat()) for k, p in self.files)]
        return f"{self._name}-{fingerprint(self._suffixes, stats)}"

    def documents(self) -> Iterator[Document]:
        for key, path in self.files:
            data = path.read_bytes()
            if b"\0" not in data:
                yield Document(key, data.decode("utf-8", errors="replace"))


def stdlib_corpus() -> FileCorpus:
    """Every .py file of this interpreter's standard library, site-packages left out.

    Deterministic for a given Python installation; other Python versions give
    other text (the identity says which)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    v = sys.version_info
    return FileCorpus(
        root,
        suffixes=(".py",),
        skip_dirs=("site-packages", "dist-packages", "__pycache__"),
        name=f"stdlib-{sys.implementation.name}{v.major}.{v.minor}.{v.micro}",
    )


class HFCorpus:
    """A Hugging Face dataset read as a stream (e.g. "HuggingFaceFW/fineweb",
    config "sample-10BT"), in the dataset's own order. Needs `pip install
    datasets` and network access; nothing is downloaded until `documents()`."""

    def __init__(
        self,
        path: str,
        config: str | None = None,
        *,
        split: str = "train",
        text_field: str = "text",
        revision: str | None = None,
    ) -> None:
        self.path, self.config, self.split = path, config, split
        self.text_field, self.revision = text_field, revision

    @property
    def name(self) -> str:
        return "hf-" + self.path.rsplit("/", 1)[-1] + (f"-{self.config}" if self.config else "")

    def identity(self) -> str:
        # Without a pinned revision the stream may change upstream; the cache
        # cannot notice that, which is why `revision` is worth pinning.
        parts = (self.path, self.config, self.split, self.text_field, self.revision)
        return f"{self.name}-{fingerprint(*parts)}"

    def documents(self) -> Iterator[Document]:
        return documents_from_records(self._records(), self.text_field)

    def _records(self) -> Iterable[Mapping[str, Any]]:
        datasets = require("datasets", "a Hugging Face dataset source")
        return datasets.load_dataset(self.path, self.config, split=self.split, streaming=True, revision=self.revision)


def documents_from_records(records: Iterable[Mapping[str, Any]], text_field: str) -> Iterator[Document]:
    """Documents from dataset rows; the key is a hash of the text, since rows
    have no path and not every dataset has an id column."""
    for row in records:
        if text_field not in row:
            raise CorpusError(f"dataset rows have no field {text_field!r}; fields: {sorted(row)}")
        text = row[text_field]
        yield Document(hashlib.blake2b(text.encode(), digest_size=16).hexdigest(), text)


def open_corpus(source: "str | PathLike | Sequence[PathLike] | Corpus") -> Corpus:
    """A corpus from a source spec: "stdlib"; "hf:<dataset>" or
    "hf:<dataset>:<config>"; a file or directory path (use "./stdlib" for a
    directory of that name) or a list of them; or a Corpus, returned as is."""
    if isinstance(source, str) and source == "stdlib":
        return stdlib_corpus()
    if isinstance(source, str) and source.startswith("hf:"):
        path, _, config = source[3:].partition(":")
        if not path:
            raise CorpusError(f"{source!r} names no dataset: use hf:<dataset>[:<config>]")
        return HFCorpus(path, config or None)
    if isinstance(source, (str, os.PathLike, Sequence)):
        return FileCorpus(source)
    return source
