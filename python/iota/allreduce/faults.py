"""Deliberate misbehaviour of one peer, for chaos tests; the defaults do nothing.

A peer dies by SIGKILL at a named point of the protocol (no cleanup, no
goodbye: what a crash or the OOM killer does), sends late, or corrupts one
part *before* signing it, so only the frame's own checksum can catch it.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

KILL_POINTS = ("before_send", "mid_send", "after_decision")


@dataclass(frozen=True)
class Faults:
    """`kill_at`: "before_send" (round joined, nothing sent), "mid_send" (half the
    parts delivered) or "after_decision" (as a holder, right after recording the
    contributor decision, before reducing or answering). `send_delay`: seconds to
    sleep before sending anything. `corrupt_part`: the n-th part this peer sends
    gets one payload byte flipped."""

    kill_at: str | None = None
    send_delay: float = 0.0
    corrupt_part: int | None = None

    def __post_init__(self) -> None:
        if self.kill_at is not None and self.kill_at not in KILL_POINTS:
            raise ValueError(f"kill_at={self.kill_at!r}; use one of {KILL_POINTS}")

    def reached(self, point: str) -> None:
        if self.kill_at == point:
            os.kill(os.getpid(), signal.SIGKILL)

    def tamper(self, sent: int, frame: bytes | memoryview) -> bytes | memoryview:
        if sent != self.corrupt_part:
            return frame
        damaged = bytearray(frame)
        damaged[len(damaged) // 2] ^= 0xFF  # mid-frame: codes, past the header
        return bytes(damaged)
