import asyncio

import pytest
from bittensor import http_auth

from iota.chain import dev_keypair
from iota.net import ReplayCache
from iota.net.body import iter_parts

_SENDER = dev_keypair("iota-test-replay-sender")
_RECEIVER = dev_keypair("iota-test-replay-receiver")


def _signed_headers() -> dict[str, str]:
    return http_auth.sign(_SENDER, method="GET", path="/", receiver_ss58=_RECEIVER.ss58_address)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_replay_cache_accepts_a_pair_once():
    cache = ReplayCache(retention=12.0, capacity=10)
    assert cache.check_and_store("alice", 1)
    assert not cache.check_and_store("alice", 1)
    assert cache.check_and_store("bob", 1)
    assert cache.check_and_store("alice", 2)


def test_replay_cache_forgets_after_retention():
    clock = FakeClock()
    cache = ReplayCache(retention=12.0, capacity=10, clock=clock)
    assert cache.check_and_store("alice", 1)
    clock.now += 11.9
    assert not cache.check_and_store("alice", 1)
    clock.now += 0.2
    # Past retention, the freshness window (not the cache) refuses this nonce.
    assert cache.check_and_store("alice", 1)


def test_full_replay_cache_evicts_but_never_accepts_a_forgotten_pair():
    cache = ReplayCache(retention=12.0, capacity=3)
    for nonce in (10, 20, 30):
        assert cache.check_and_store("alice", nonce)
    assert cache.check_and_store("bob", 40)  # evicts ("alice", 10)
    assert len(cache) == 3
    with pytest.raises(http_auth.StaleRequest, match="replay cache is full"):
        cache.check_and_store("alice", 10)
    with pytest.raises(http_auth.StaleRequest):
        cache.check_and_store("carol", 5)
    assert not cache.check_and_store("alice", 20)
    assert cache.check_and_store("carol", 11)


def test_verify_refuses_a_cache_shorter_than_its_freshness_window():
    with pytest.raises(ValueError, match="retention"):
        http_auth.verify(
            _signed_headers(),
            b"",
            method="GET",
            path="/",
            self_hotkey_ss58=_RECEIVER.ss58_address,
            nonce_store=ReplayCache(retention=1.0, capacity=10),
        )


@pytest.mark.parametrize("bad", [{"retention": 0.0, "capacity": 1}, {"retention": 1.0, "capacity": 0}])
def test_replay_cache_rejects_nonsense_limits(bad):
    with pytest.raises(ValueError):
        ReplayCache(**bad)


def test_iter_parts_yields_bounded_zero_copy_slices():
    data = bytes(range(256)) * 41

    async def collect() -> list[memoryview]:
        return [part async for part in iter_parts(data, 1000)]

    parts = asyncio.run(collect())
    assert [len(p) for p in parts] == [1000] * 10 + [len(data) - 10_000]
    assert all(p.obj is data for p in parts)
    assert b"".join(parts) == data
