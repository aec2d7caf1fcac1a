"""LocalChain: the offline, in-memory registry that plays the metagraph.

Construct it from a dict of hotkey -> role (or -> Neuron) so that tests and
every process of a local swarm can be handed the same view; `save`/`load`
carry that view between processes through one JSON file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bittensor.sp_core import ss58_decode

from iota.chain.base import Chain, ChainError, Neuron, Role, weights_total

if TYPE_CHECKING:
    from bittensor.signing import Signer

_FILE_VERSION = 1


def _check_hotkey(hotkey: str) -> None:
    # A misspelled hotkey would otherwise never match a signed request, and
    # every call from that node would fail with a puzzling 403.
    try:
        ss58_decode(hotkey)
    except (ValueError, TypeError) as exc:
        raise ChainError(
            f"{hotkey!r} is not an ss58 hotkey address ({exc}); "
            "use the keypair's ss58_address (see iota.chain.keys)"
        ) from None


class LocalChain(Chain):
    """An in-memory registry of hotkeys, their roles, addresses and published weights."""

    def __init__(self, neurons: Mapping[str, Role | Neuron] | None = None) -> None:
        self._neurons: dict[str, Neuron] = {}
        self._weights: dict[str, dict[str, float]] = {}
        for hotkey, entry in (neurons or {}).items():
            if isinstance(entry, Neuron):
                if entry.hotkey != hotkey:
                    raise ChainError(
                        f"the entry for {hotkey} describes {entry.hotkey}; key the dict by the neuron's hotkey"
                    )
                self.register(hotkey, entry.role, address=entry.address, stake=entry.stake)
            else:
                self.register(hotkey, entry)

    def register(self, hotkey: str, role: Role, *, address: str | None = None, stake: float = 0.0) -> Neuron:
        """Add `hotkey`, or replace its role, address and stake if already registered."""
        _check_hotkey(hotkey)
        neuron = Neuron(hotkey=hotkey, role=role, address=address, stake=stake)
        self._neurons[hotkey] = neuron
        return neuron

    async def neuron(self, hotkey: str) -> Neuron | None:
        return self._neurons.get(hotkey)

    async def neurons(self) -> list[Neuron]:
        return list(self._neurons.values())

    async def publish_weights(self, validator: Signer, weights: Mapping[str, float]) -> None:
        hotkey = validator.ss58_address
        registered = self._neurons.get(hotkey)
        if registered is None or registered.role != "validator":
            raise ChainError(
                f"{hotkey} cannot publish weights: it is "
                f"{'not registered' if registered is None else 'registered as ' + registered.role}; "
                "register it with role 'validator' first"
            )
        unknown = sorted(set(weights) - set(self._neurons))
        if unknown:
            raise ChainError(f"weights name unregistered hotkeys {unknown}; drop them or register them first")
        total = weights_total(weights)
        self._weights[hotkey] = {k: w / total for k, w in weights.items()}

    async def weights(self, validator_hotkey: str) -> dict[str, float]:
        return dict(self._weights.get(validator_hotkey, {}))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the registry and weights to `path` as JSON, atomically.

        Atomic (temporary file + rename) so another process loading the same
        file never reads it half-written.
        """
        path = Path(path)
        state: dict[str, Any] = {
            "version": _FILE_VERSION,
            "neurons": [
                {"hotkey": n.hotkey, "role": n.role, "address": n.address, "stake": n.stake}
                for n in self._neurons.values()
            ],
            "weights": self._weights,
        }
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(state, f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LocalChain:
        """Read a registry written by `save`."""
        try:
            state = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ChainError(f"cannot read a LocalChain from {path}: {exc}") from None
        if not isinstance(state, dict) or state.get("version") != _FILE_VERSION:
            raise ChainError(
                f"{path} is not a LocalChain file of version {_FILE_VERSION}; write it with LocalChain.save"
            )
        try:
            chain = cls({n["hotkey"]: Neuron(**n) for n in state["neurons"]})
            chain._weights = {v: {k: float(w) for k, w in ws.items()} for v, ws in state["weights"].items()}
        except (KeyError, TypeError, AttributeError) as exc:
            raise ChainError(
                f"{path} is a malformed LocalChain file ({exc!r}); rewrite it with LocalChain.save"
            ) from None
        return chain
