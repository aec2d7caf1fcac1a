"""A bounded, expiring replay cache: the nonce store for `bittensor.http_auth.verify`."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from bittensor import http_auth


class ReplayCache:
    """Remembers accepted (hotkey, nonce) pairs for `retention` seconds, at most `capacity` of them.

    When full, the oldest entry is evicted and every nonce at or below the
    evicted one is refused from then on: the cache forgets, but a forgotten
    request can never be replayed. Under a flood this shrinks the freshness
    window instead of growing memory; honest senders retry with a new nonce.

    Thread-safe, since `verify` runs in worker threads.
    """

    def __init__(self, retention: float, capacity: int, clock: Callable[[], float] = time.monotonic) -> None:
        if retention <= 0 or capacity <= 0:
            raise ValueError(f"retention and capacity must be positive, got {retention}, {capacity}")
        # `verify` reads `retention` to check it covers the freshness window.
        self.retention = retention
        self.capacity = capacity
        self._clock = clock
        self._seen: set[tuple[str, int]] = set()
        self._expiry: deque[tuple[float, tuple[str, int]]] = deque()
        self._floor_ns = -1
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def check_and_store(self, hotkey_ss58: str, nonce_ns: int) -> bool:
        """True (and remember the pair) if new; False if already seen.

        Raises `http_auth.StaleRequest` for a nonce at or below an evicted one,
        because the cache can no longer tell whether it was seen.
        """
        key = (hotkey_ss58, nonce_ns)
        with self._lock:
            now = self._clock()
            while self._expiry and self._expiry[0][0] <= now:
                self._seen.discard(self._expiry.popleft()[1])
            if nonce_ns <= self._floor_ns:
                raise http_auth.StaleRequest(
                    "the receiver's replay cache is full and no longer covers this nonce; "
                    "retry with a freshly signed request"
                )
            if key in self._seen:
                return False
            if len(self._seen) >= self.capacity:
                _, evicted = self._expiry.popleft()
                self._seen.discard(evicted)
                self._floor_ns = max(self._floor_ns, evicted[1])
            self._seen.add(key)
            self._expiry.append((now + self.retention, key))
            return True
