"""Deliberate misbehaviour of one peer, for chaos tests; the defaults do nothing.

A peer dies by SIGKILL at a named point of the protocol (no cleanup, no
goodbye: what a crash or the OOM killer does), sends late, corrupts one
part *before* signing it, so only the frame's own checksum can catch it, or
as a holder serves its means to some peers only.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from iota.allreduce.gram import gram_text, gram_values
from iota.codec import Codec
from iota.net.answers import payload_digest

if TYPE_CHECKING:
    from iota.allreduce.holder import AttestedMean

KILL_POINTS = ("before_send", "mid_send", "after_decision")
RELAY_LIES = ("mean", "gram")


@dataclass(frozen=True)
class Faults:
    """`kill_at`: "before_send" (round joined, nothing sent), "mid_send" (half the
    parts delivered) or "after_decision" (as a holder, right after recording the
    contributor decision, before reducing or answering). `send_delay`: seconds to
    sleep before sending anything. `corrupt_part`: the n-th part this peer sends
    gets one payload byte flipped. `withhold_means_from`: as a holder, refuse every
    mean to this hotkey (as if the link between them were down); `serve_no_means`:
    refuse every mean to everyone (as if this holder had lost what it held);
    `corrupt_relays`: every mean this peer hands on to another comes with a different
    "mean" (well-formed and checksummed) or "gram" (inner products) than the holder
    attested: only the attestation can tell."""

    kill_at: str | None = None
    send_delay: float = 0.0
    corrupt_part: int | None = None
    withhold_means_from: str | None = None
    serve_no_means: bool = False
    corrupt_relays: str | None = None

    def __post_init__(self) -> None:
        if self.kill_at is not None and self.kill_at not in KILL_POINTS:
            raise ValueError(f"kill_at={self.kill_at!r}; use one of {KILL_POINTS}")
        if self.corrupt_relays is not None and self.corrupt_relays not in RELAY_LIES:
            raise ValueError(f"corrupt_relays={self.corrupt_relays!r}; use one of {RELAY_LIES}")

    def reached(self, point: str) -> None:
        if self.kill_at == point:
            os.kill(os.getpid(), signal.SIGKILL)

    def withholds_means_from(self, hotkey: str) -> bool:
        return self.serve_no_means or hotkey == self.withhold_means_from

    def tamper_relay(self, mean: AttestedMean) -> AttestedMean:
        if self.corrupt_relays == "gram":
            return replace(mean, gram=gram_text(gram_values(mean.gram) + 1.0))
        if self.corrupt_relays == "mean":
            values = Codec.decode(mean.frame)
            values[0] += 1.0
            frame = Codec.of_frame(mean.frame).encode(values)
            return replace(mean, frame=frame, digest=payload_digest(frame))
        return mean

    def tamper(self, sent: int, frame: bytes | memoryview) -> bytes | memoryview:
        if sent != self.corrupt_part:
            return frame
        damaged = bytearray(frame)
        damaged[len(damaged) // 2] ^= 0xFF  # mid-frame: codes, past the header
        return bytes(damaged)
