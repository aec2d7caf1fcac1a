"""Butterfly all-reduce among the miners of one stage, and the DiLoCo outer step.

Each member owns a shard of the flat vector (in proportion to its declared
bandwidth) and the next member backs it up; parts stream to both; holders
agree on exactly whose contributions are complete everywhere before anyone
reduces; every peer that completes ends with the same bytes, and one that
cannot raises AllReduceError with a report. Never a silent mixture.
"""

from iota.allreduce.config import AllReduceConfig
from iota.allreduce.errors import AllReduceError, GroupError
from iota.allreduce.faults import Faults
from iota.allreduce.group import Group, Member, RoundPlan
from iota.allreduce.outer import OuterNesterov, diloco_round
from iota.allreduce.peer import AllReducePeer
from iota.allreduce.result import AllReduceReport, AllReduceResult, ShardReport

__all__ = [
    "AllReduceConfig",
    "AllReduceError",
    "AllReducePeer",
    "AllReduceReport",
    "AllReduceResult",
    "Faults",
    "Group",
    "GroupError",
    "Member",
    "OuterNesterov",
    "RoundPlan",
    "ShardReport",
    "diloco_round",
]
