"""Hotkeys for local swarms and tests, made offline and never written to disk.

Keys are `bittensor.sp_core.Keypair`s (sr25519), which `bittensor.http_auth`
accepts as signers directly.
"""

from __future__ import annotations

from bittensor.sp_core import Keypair

from iota.chain.base import ChainError


def dev_keypair(name: str) -> Keypair:
    """The well-known keypair for the dev URI `//name` (as "//Alice" on Substrate).

    Deterministic, so every process of a local swarm derives the same keys
    from names alone. Anyone can derive them too: local use and tests only.
    """
    if not name or "/" in name:
        raise ChainError(f"dev key name {name!r} must be non-empty and contain no '/'")
    return Keypair.create_from_uri(f"//{name}")


def generate_keypair(words: int = 12) -> tuple[str, Keypair]:
    """A fresh random keypair and the mnemonic that restores it (keep the mnemonic secret)."""
    try:
        mnemonic = Keypair.generate_mnemonic(words)
    except ValueError as exc:
        raise ChainError(f"cannot generate a {words}-word mnemonic: {exc}") from None
    return mnemonic, Keypair.create_from_mnemonic(mnemonic)


def keypair_from_mnemonic(mnemonic: str) -> Keypair:
    """The keypair a BIP39 mnemonic restores (the same one btcli would)."""
    try:
        return Keypair.create_from_mnemonic(mnemonic)
    except (ValueError, TypeError) as exc:
        raise ChainError(f"not a valid BIP39 mnemonic ({exc}); check the words and their order") from None


def keypair_from_seed(seed: bytes) -> Keypair:
    """The keypair for a 32-byte secret seed."""
    try:
        return Keypair.create_from_seed(seed)
    except (ValueError, TypeError) as exc:
        raise ChainError(f"cannot make a keypair from that seed ({exc}); pass exactly 32 bytes") from None
