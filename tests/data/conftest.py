import random
from pathlib import Path

import pytest

WORDS = ["alpha", "beta", "gamma", "delta", "épsilon", "ζήτα", "東京", "😀", "def", "return", "class", "lambda\n\t"]


def write_corpus(root: Path, files: int = 40, seed: int = 0) -> Path:
    """A directory of small seeded text files, some in subdirectories."""
    rng = random.Random(seed)
    for i in range(files):
        path = root / f"d{i % 3}" / f"doc{i:03d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        words = rng.choices(WORDS, k=rng.randint(20, 400))
        path.write_text(" ".join(words) + f"\nfile {i}\n", encoding="utf-8")
    return root


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus")


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # Nothing a test does may touch the user's real cache.
    monkeypatch.setenv("IOTA_CACHE_DIR", str(tmp_path / "not-used"))
    return tmp_path / "cache"
