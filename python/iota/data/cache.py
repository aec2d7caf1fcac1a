"""Where the data cache lives and how files get into it without ever being
seen half-written."""

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TypeAlias

PathLike: TypeAlias = str | os.PathLike[str]


def cache_root(cache_dir: PathLike | None = None) -> Path:
    """The data cache directory: `cache_dir` if given, else $IOTA_CACHE_DIR/data,
    else $XDG_CACHE_HOME/iota/data, else ~/.cache/iota/data."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("IOTA_CACHE_DIR"):
        return Path(os.environ["IOTA_CACHE_DIR"]) / "data"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "iota" / "data"


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts, for cache keys."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def safe_name(text: str) -> str:
    """`text` reduced to characters that are safe in a file name on any OS."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


@contextmanager
def atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """Write to a temp file beside `path` and rename it into place on success.

    Readers only ever look at `path`, so a build killed part-way leaves at worst
    a stray temp file, never a truncated cache; concurrent builders of the same
    file each rename a complete copy. The temp file is removed on any exception
    (a SIGKILL can still leave one behind; it is never read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""
    with atomic_file(path) as f:
        f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
