"""Settings from defaults, then a TOML file, then command-line flags (last wins)."""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def read_toml(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SystemExit(f"cannot read the config file {path}: {exc}") from None


def add_fields(parser: argparse.ArgumentParser, cls: type, *, prefix: str = "", skip: tuple[str, ...] = ()) -> None:
    """One flag per dataclass field (`--{prefix}{name}`), default None so unset flags do not override the file."""
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = {"int": int, "float": float, "str": str}.get(str(f.type))
        if kind is None:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        group.add_argument(f"--{prefix}{f.name.replace('_', '-')}", dest=f"{prefix}{f.name}", type=kind,
                           default=None, help=f"(default {default})")


def build(cls: type[T], section: dict[str, Any], args: argparse.Namespace, *, prefix: str = "",
          **fixed: Any) -> T:
    """`cls` from the TOML `section`, overridden by flags given on the command line."""
    if not isinstance(section, dict):
        raise SystemExit(f"the settings for {cls.__name__} must be a TOML table ([section]), got {section!r}")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(section) - names)
    if unknown:
        raise SystemExit(f"unknown settings {unknown} for {cls.__name__}; known: {sorted(names)}")
    values = dict(section)
    for name in names:
        flag = getattr(args, f"{prefix}{name}", None)
        if flag is not None:
            values[name] = flag
    values.update(fixed)
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"bad {cls.__name__} settings: {exc}") from None
