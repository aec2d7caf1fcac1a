"""Large buffers a peer reuses from round to round.

A round's frames and sums are tens to hundreds of MB. Memory fresh from the
OS is cleared page by page on its first write, which cost about 5% of a
round's CPU; memory a past round faulted in costs nothing. A buffer goes
back only once nothing can still write into it: a round's sent frames when
the round stops serving, a holder's sum when its reduce finished. A reader
that outlives its round (a straggler fetching from a stopped round) could see
the next round's bytes, but every transfer is checked against its signed
digest, so that ends in an error, not a wrong frame.
"""

from __future__ import annotations

import torch

from iota.codec.tensors import huge_page_tensor


class BufferPool:
    """Byte buffers (uint8 CPU tensors) by exact size. The pool holds at most as many
    bytes as were ever out at once, so it keeps no more than one busy moment needed.
    Used from the event loop's thread only."""

    def __init__(self) -> None:
        self._free: dict[int, list[torch.Tensor]] = {}
        self._pooled = 0
        self._out = 0
        self._peak = 0
        self.fresh_bytes = 0  # allocated from the OS over the pool's life

    def take(self, nbytes: int) -> torch.Tensor:
        """A buffer of `nbytes` bytes with arbitrary contents."""
        free = self._free.get(nbytes)
        if free:
            buffer = free.pop()
            self._pooled -= nbytes
        else:
            buffer = huge_page_tensor(nbytes, torch.uint8)
            self.fresh_bytes += nbytes
        self._out += nbytes
        self._peak = max(self._peak, self._out)
        return buffer

    def give(self, buffer: torch.Tensor) -> None:
        """Return a buffer from `take`; nothing may use it afterwards."""
        nbytes = buffer.numel()
        self._out -= nbytes
        if self._pooled + nbytes <= self._peak:
            self._free.setdefault(nbytes, []).append(buffer)
            self._pooled += nbytes

    @property
    def pooled_bytes(self) -> int:
        return self._pooled
