"""Errors of the all-reduce."""

from __future__ import annotations

from typing import TYPE_CHECKING

from iota.errors import IotaError

if TYPE_CHECKING:
    from iota.allreduce.result import AllReduceReport


class GroupError(IotaError, ValueError):
    """A group, vector, weight or config that no round can be run with."""


class AllReduceError(IotaError):
    """A round that did not complete consistently; `report` says what it has and lacks.

    Raised instead of returning a partial or mixed average: a peer either
    ends with the same bytes as every other peer that completed, or with this.
    """

    def __init__(self, message: str, report: AllReduceReport) -> None:
        super().__init__(message)
        self.report = report


class MeanLostError(AllReduceError):
    """A round whose decided mean nobody alive can serve in full: its owner died after the
    decision with its own parts of its shard, which no other peer holds. No peer can
    complete such a round, so `AllReducePeer.allreduce` runs it once more, as
    `Group.again()`, among whoever is left (the dead owner is then excluded there)."""
