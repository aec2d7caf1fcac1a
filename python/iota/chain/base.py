"""The Chain interface: who is registered, in which role, where it serves, and its weights.

Every role asks the chain the same questions (is this hotkey registered? may
it call this route? where do I reach it?), whether the answers come from the
in-memory `LocalChain` or from a Bittensor metagraph. Methods are async
because a real chain answers over the network.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

from iota.errors import IotaError

if TYPE_CHECKING:
    from bittensor.signing import Signer

Role = Literal["miner", "validator", "orchestrator"]
ROLES: tuple[Role, ...] = get_args(Role)


class ChainError(IotaError):
    """A chain query or update that cannot be done as asked."""


@dataclass(frozen=True)
class Neuron:
    """One registered hotkey.

    `address` is the base URL it serves on ("http://host:port"), or None for
    a node that accepts no connections (behind NAT, reached through a relay).
    """

    hotkey: str
    role: Role
    address: str | None = None
    stake: float = 0.0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ChainError(f"hotkey {self.hotkey} has role {self.role!r}; use one of {', '.join(ROLES)}")
        if not math.isfinite(self.stake) or self.stake < 0:
            raise ChainError(
                f"hotkey {self.hotkey} has stake {self.stake!r}; stake must be a finite number >= 0"
            )


class Chain(ABC):
    """A read view of the registry plus weight publishing."""

    @abstractmethod
    async def neuron(self, hotkey: str) -> Neuron | None:
        """The registered neuron with this hotkey, or None if it is not registered."""

    @abstractmethod
    async def neurons(self) -> list[Neuron]:
        """Every registered neuron."""

    @abstractmethod
    async def publish_weights(self, validator: Signer, weights: Mapping[str, float]) -> None:
        """Set `validator`'s weights over registered hotkeys (normalized to sum 1).

        Takes the validator's signer, not just its hotkey, because a real
        chain only accepts weights signed by the validator itself.
        """

    @abstractmethod
    async def weights(self, validator_hotkey: str) -> dict[str, float]:
        """The weights `validator_hotkey` last published (empty if none)."""


def weights_total(weights: Mapping[str, float]) -> float:
    """The sum of weights to publish; ChainError if any is negative or not finite, or all are 0."""
    bad = {k: w for k, w in weights.items() if not (math.isfinite(w) and w >= 0)}
    if bad:
        raise ChainError(f"weights must be finite and >= 0, got {bad}")
    total = math.fsum(weights.values())
    if total <= 0:
        raise ChainError("weights sum to 0; give at least one hotkey a positive weight")
    return total
