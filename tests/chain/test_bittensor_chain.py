"""BittensorChain against the real bittensor SDK over an in-memory chain.

`FakeSubstrate` (tests/chain/fake_substrate.py) implements the SDK's
chain-access contract, so everything above it is the SDK's own code: the
metagraph read and decode, the SetWeights intent, the executor and signer
resolution, and the storage reads of weights() and of the rate limit.
"""

from __future__ import annotations

import asyncio
import math
import random
import socket
import time
from typing import Any

import aiohttp
import bittensor
import pytest
from aiohttp import web
from bittensor import wallets
from bittensor.sp_core import verify

from iota.chain import ChainError, Neuron, dev_keypair
from iota.chain.bittensor import BittensorChain, WeightsRateLimited, wallet_hotkey
from iota.net import PeerError, SignedClient, request_sender, route_policy, serve, signed_app
from tests.chain.fake_substrate import U16_MAX, FakeNeuron, FakeSubstrate

NETUID = 7
RAO = 10**9
TIMEOUT = 10.0

OWNER = dev_keypair("iota-bt-owner")
VALIDATOR = dev_keypair("iota-bt-validator")
MINER = dev_keypair("iota-bt-miner")
MINER2 = dev_keypair("iota-bt-miner2")
MINER3 = dev_keypair("iota-bt-miner3")
STRANGER = dev_keypair("iota-bt-stranger")


async def until(lookup: Any, timeout: float) -> None:
    """Poll the async `lookup()` until it returns something other than None."""
    deadline = time.monotonic() + timeout
    while await lookup() is None:
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def standard_chain(**kwargs: Any) -> FakeSubstrate:
    return FakeSubstrate(
        NETUID,
        [
            FakeNeuron(OWNER.ss58_address, permit=True, stake_rao=1_000 * RAO, axon=("10.1.2.3", 8000)),
            FakeNeuron(VALIDATOR.ss58_address, permit=True, stake_rao=2_500 * RAO + RAO // 2),
            FakeNeuron(MINER.ss58_address, stake_rao=3 * RAO, axon=("192.168.0.7", 8091)),
            FakeNeuron(MINER2.ss58_address, axon=("2001:db8::7", 9000)),
            FakeNeuron(MINER3.ss58_address, stake_rao=RAO // 4),
        ],
        **kwargs,
    )


def make_chain(fake: FakeSubstrate, netuid: int = NETUID, **kwargs: Any) -> BittensorChain:
    kwargs.setdefault("orchestrator_hotkeys", [OWNER.ss58_address])
    return BittensorChain(netuid, subtensor=bittensor.Subtensor("local", substrate=fake), **kwargs)


@pytest.fixture(autouse=True)
def _sdk_caches_in_tmp(tmp_path, monkeypatch):
    # Connecting caches token symbols on disk; keep that out of the home directory.
    monkeypatch.setenv("BTCLI_TOKEN_SYMBOLS_CACHE", str(tmp_path / "token_symbols.json"))


# -- the metagraph cache ---------------------------------------------------------------


def test_sync_maps_permits_stakes_and_axons_to_neurons():
    fake = standard_chain()

    async def main() -> None:
        async with make_chain(fake) as chain:
            neurons = await chain.sync()
            assert neurons == [
                Neuron(OWNER.ss58_address, "orchestrator", "http://10.1.2.3:8000", 1000.0),
                Neuron(VALIDATOR.ss58_address, "validator", None, 2500.5),
                Neuron(MINER.ss58_address, "miner", "http://192.168.0.7:8091", 3.0),
                Neuron(MINER2.ss58_address, "miner", "http://[2001:db8::7]:9000", 0.0),
                Neuron(MINER3.ss58_address, "miner", None, 0.25),
            ]
            assert chain.synced_block == fake.block
            assert await chain.neuron(MINER.ss58_address) == neurons[2]
            assert await chain.neuron(STRANGER.ss58_address) is None
            assert await chain.uid(MINER2.ss58_address) == 3
            assert await chain.neurons() == neurons
        assert not fake.connected  # closed with the chain

    asyncio.run(main())


def test_without_orchestrator_hotkeys_a_permit_holder_is_a_validator():
    fake = standard_chain()

    async def main() -> None:
        chain = make_chain(fake, orchestrator_hotkeys=())
        assert (await chain.neuron(OWNER.ss58_address)).role == "validator"  # the first lookup syncs
        await chain.close()

    asyncio.run(main())


def test_lookups_are_served_from_the_cache_and_refresh_follows_the_chain():
    fake = standard_chain()
    newcomer = dev_keypair("iota-bt-newcomer")

    async def main() -> None:
        chain = make_chain(fake)
        for _ in range(200):
            assert (await chain.neuron(MINER.ss58_address)).role == "miner"
            assert await chain.neuron(STRANGER.ss58_address) is None
        assert fake.count("SubnetInfoRuntimeApi", "get_metagraph") == 1

        await chain.start_refresh(interval=0.05)
        with pytest.raises(ChainError, match="already refreshing"):
            await chain.start_refresh(interval=0.05)
        fake.register(FakeNeuron(newcomer.ss58_address, axon=("10.9.9.9", 7000)))
        fake.replace(2, FakeNeuron(STRANGER.ss58_address))  # MINER deregistered, STRANGER took uid 2
        fake.block += 3
        await until(lambda: chain.neuron(newcomer.ss58_address), timeout=TIMEOUT)
        assert await chain.neuron(newcomer.ss58_address) == Neuron(
            newcomer.ss58_address, "miner", "http://10.9.9.9:7000", 0.0
        )
        assert await chain.neuron(MINER.ss58_address) is None
        assert await chain.uid(STRANGER.ss58_address) == 2
        assert chain.synced_block == fake.block

        await chain.close()
        reads = fake.count("SubnetInfoRuntimeApi", "get_metagraph")
        await asyncio.sleep(0.15)
        assert fake.count("SubnetInfoRuntimeApi", "get_metagraph") == reads  # the refresh stopped
        assert await chain.neuron(newcomer.ss58_address) is not None  # the cache still answers
        with pytest.raises(ChainError, match="closed"):
            await chain.sync()

    asyncio.run(main())


def test_a_failed_background_refresh_keeps_the_last_view():
    fake = standard_chain()

    async def main() -> None:
        chain = make_chain(fake)
        await chain.start_refresh(interval=0.02)
        block = chain.synced_block
        fake.netuid = NETUID + 1  # the subnet "disappears": every refresh fails
        await asyncio.sleep(0.1)
        assert chain.synced_block == block
        assert (await chain.neuron(VALIDATOR.ss58_address)).role == "validator"
        await chain.close()

    asyncio.run(main())


# -- publishing and reading weights -------------------------------------------------------


def test_publish_weights_normalizes_and_sends_uids_the_sdk_expects():
    fake = standard_chain()

    async def main() -> None:
        async with make_chain(fake) as chain:
            await chain.publish_weights(VALIDATOR, {MINER2.ss58_address: 1.0, MINER.ss58_address: 3.0})
            assert fake.submitted == [
                (
                    VALIDATOR.ss58_address,
                    "set_mechanism_weights",
                    # Sorted uids and max-upscaled u16 values: MINER (uid 2) 3.0, MINER2 (uid 3) 1.0.
                    {"netuid": NETUID, "mecid": 0, "dests": [2, 3], "weights": [U16_MAX, 21845],
                     "version_key": 0},
                ),
            ]
            assert fake.last_update[1] == fake.block  # included in the block that followed
            assert await chain.weights(VALIDATOR.ss58_address) == pytest.approx(
                {MINER.ss58_address: 0.75, MINER2.ss58_address: 0.25}, abs=1 / U16_MAX
            )
            assert await chain.weights(MINER.ss58_address) == {}  # never published
            assert await chain.weights(STRANGER.ss58_address) == {}  # not registered

    asyncio.run(main())


def test_random_weights_read_back_within_u16_quantization():
    rng = random.Random(1234)
    fake = standard_chain(rate_limit=0)
    hotkeys = [OWNER.ss58_address, MINER.ss58_address, MINER2.ss58_address, MINER3.ss58_address]

    async def main() -> None:
        async with make_chain(fake, version_key=3) as chain:
            for _ in range(5):
                weights = {h: rng.uniform(0.05, 10.0) for h in rng.sample(hotkeys, rng.randint(1, 4))}
                await chain.publish_weights(VALIDATOR, weights)
                total = sum(weights.values())
                read = await chain.weights(VALIDATOR.ss58_address)
                assert read == pytest.approx({h: w / total for h, w in weights.items()}, abs=2 / U16_MAX)
                assert math.isclose(sum(read.values()), 1.0)
                assert fake.submitted[-1][2]["version_key"] == 3

    asyncio.run(main())


def test_a_subnet_max_weight_limit_is_applied_by_the_sdk():
    fake = standard_chain(max_weights_limit=U16_MAX // 2)  # no uid above half the row

    async def main() -> None:
        async with make_chain(fake) as chain:
            await chain.publish_weights(
                VALIDATOR, {MINER.ss58_address: 8.0, MINER2.ss58_address: 1.0, MINER3.ss58_address: 1.0}
            )
            read = await chain.weights(VALIDATOR.ss58_address)
            assert read[MINER.ss58_address] == pytest.approx(0.5, abs=1e-3)

    asyncio.run(main())


@pytest.mark.parametrize(
    ("signer", "weights", "message"),
    [
        (VALIDATOR, {STRANGER.ss58_address: 1.0, MINER.ss58_address: 1.0}, "not registered on netuid 7"),
        (VALIDATOR, {MINER.ss58_address: float("nan")}, "finite and >= 0"),
        (VALIDATOR, {MINER.ss58_address: -1.0}, "finite and >= 0"),
        (VALIDATOR, {MINER.ss58_address: 0.0}, "sum to 0"),
        (VALIDATOR, {}, "sum to 0"),
        (STRANGER, {MINER.ss58_address: 1.0}, "cannot publish weights: it is not registered"),
    ],
)
def test_bad_weights_are_refused_before_anything_is_signed(signer, weights, message):
    fake = standard_chain()

    async def main() -> None:
        async with make_chain(fake) as chain:
            with pytest.raises(ChainError, match=message):
                await chain.publish_weights(signer, weights)
        assert fake.submitted == []

    asyncio.run(main())


def test_a_failed_extrinsic_is_a_chain_error_with_the_sdk_message():
    fake = standard_chain()

    async def main() -> None:
        async with make_chain(fake) as chain:
            # MINER holds no validator permit: the chain rejects the extrinsic.
            with pytest.raises(ChainError, match="without being a permitted validator") as caught:
                await chain.publish_weights(MINER, {MINER2.ss58_address: 1.0})
            assert "NeuronNoValidatorPermit" in str(caught.value)
            assert not isinstance(caught.value, WeightsRateLimited)
        assert [f for _, f, _ in fake.submitted] == ["set_mechanism_weights"]

    asyncio.run(main())


def test_rate_limit_is_a_chain_error_saying_when_to_retry():
    fake = standard_chain(rate_limit=100)

    async def main() -> None:
        async with make_chain(fake) as chain:
            await chain.publish_weights(VALIDATOR, {MINER.ss58_address: 1.0})
            fake.block += 30
            with pytest.raises(WeightsRateLimited) as caught:
                await chain.publish_weights(VALIDATOR, {MINER2.ss58_address: 1.0})
            limited = caught.value
            assert isinstance(limited, ChainError)
            assert (limited.blocks, limited.seconds) == (70, 70 * 12.0)
            assert limited.retry_block == fake.last_update[1] + 100
            assert "retry in 70 blocks (~840 s" in str(limited)
            # The SDK's preflight refused it: nothing second was signed or sent.
            assert len(fake.submitted) == 1
            assert await chain.weights(VALIDATOR.ss58_address) == {MINER.ss58_address: 1.0}
            with pytest.raises(WeightsRateLimited):  # waiting longer than allowed
                await chain.publish_weights(VALIDATOR, {MINER2.ss58_address: 1.0}, wait=True, max_wait=60)
            fake.block += 70
            await chain.publish_weights(VALIDATOR, {MINER2.ss58_address: 1.0})
            assert await chain.weights(VALIDATOR.ss58_address) == {MINER2.ss58_address: 1.0}

    asyncio.run(main())


def test_wait_sleeps_out_the_rate_limit_then_publishes():
    fake = standard_chain(rate_limit=6, ticking=True, seconds_per_block=0.03)

    async def main() -> None:
        async with make_chain(fake) as chain:
            await chain.publish_weights(VALIDATOR, {MINER.ss58_address: 1.0})
            start = time.monotonic()
            weights = {MINER2.ss58_address: 2.0, MINER3.ss58_address: 2.0}
            await chain.publish_weights(VALIDATOR, weights, wait=True)
            assert time.monotonic() - start >= 4 * 0.03
            assert await chain.weights(VALIDATOR.ss58_address) == {h: 0.5 for h in weights}
            assert [f for _, f, _ in fake.submitted] == ["set_mechanism_weights"] * 2

    asyncio.run(main())


def test_a_rate_limit_reported_by_the_chain_after_submission_is_rate_limited_too():
    # The RPC node lags: the SDK's preflight sees no recent update, the chain does.
    fake = standard_chain(rate_limit=100, stale_last_update=True)

    async def main() -> None:
        async with make_chain(fake) as chain:
            await chain.publish_weights(VALIDATOR, {MINER.ss58_address: 1.0})
            with pytest.raises(WeightsRateLimited, match="as too frequent .*retry in 1 block "):
                await chain.publish_weights(VALIDATOR, {MINER2.ss58_address: 1.0})
        assert len(fake.submitted) == 2  # this time it was signed and sent, and failed on chain

    asyncio.run(main())


def test_on_a_commit_reveal_subnet_weights_are_committed_not_shown():
    fake = standard_chain(commit_reveal=True)

    async def main() -> None:
        async with make_chain(fake) as chain:
            await chain.publish_weights(VALIDATOR, {MINER.ss58_address: 1.0, MINER2.ss58_address: 1.0})
            ((signer, function, params),) = fake.submitted
            assert (signer, function) == (VALIDATOR.ss58_address, "commit_timelocked_mechanism_weights")
            assert params["netuid"] == NETUID and params["reveal_round"] > 0 and len(params["commit"]) > 0
            assert await chain.weights(VALIDATOR.ss58_address) == {}  # until the chain reveals them

    asyncio.run(main())


# -- construction and connection ----------------------------------------------------------


def test_construction_is_cold_and_checks_its_arguments():
    chain = BittensorChain(NETUID, "test")  # no I/O until first use
    assert (chain.network, chain.netuid, chain.synced_block) == ("test", NETUID, None)
    assert BittensorChain(1).network == "finney"
    with pytest.raises(ChainError, match="Unknown network"):
        BittensorChain(1, "moon")
    with pytest.raises(ChainError, match="netuid"):
        BittensorChain(-1, "test")
    with pytest.raises(ChainError, match="does not match"):
        BittensorChain(1, "test", subtensor=bittensor.Subtensor("local", substrate=standard_chain()))
    with pytest.raises(ChainError, match="not an ss58"):
        BittensorChain(1, "test", orchestrator_hotkeys=["orchestrator"])


def test_an_unknown_subnet_or_unreachable_node_is_a_chain_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens here once closed

    async def main() -> None:
        with pytest.raises(ChainError, match="netuid 8 does not exist on local"):
            await make_chain(standard_chain(), netuid=NETUID + 1).sync()
        chain = BittensorChain(NETUID, f"ws://127.0.0.1:{port}")
        with pytest.raises(ChainError, match="cannot connect"):
            await chain.neuron(MINER.ss58_address)

    asyncio.run(main())


def test_an_sdk_client_is_accepted_too():
    fake = standard_chain()

    async def main() -> None:
        async with BittensorChain(NETUID, subtensor=bittensor.Client("local", substrate=fake)) as chain:
            assert (await chain.neuron(VALIDATOR.ss58_address)).role == "validator"

    asyncio.run(main())


def test_a_chain_stays_on_the_event_loop_it_connected_on():
    chain = make_chain(standard_chain())
    asyncio.run(chain.sync())
    with pytest.raises(ChainError, match="bound to the event loop"):
        asyncio.run(chain.sync())
    assert asyncio.run(chain.neuron(MINER.ss58_address)).role == "miner"  # the cache answers anywhere


# -- wallets ----------------------------------------------------------------------------------


def test_wallet_hotkey_loads_from_a_wallet_directory(tmp_path, monkeypatch):
    quiet = {"on_mnemonic": lambda *_: None}
    created = wallets.create("cold", "hot", path=str(tmp_path), use_password=False, **quiet)
    keypair = wallet_hotkey("cold", "hot", tmp_path)
    assert keypair.ss58_address == created.hotkey.ss58_address
    assert verify(b"msg", bytes(keypair.sign(b"msg")), keypair.ss58_address)  # it holds the private key

    monkeypatch.setenv("BT_WALLET_PATH", str(tmp_path))
    assert wallet_hotkey("cold/hot").ss58_address == keypair.ss58_address

    with pytest.raises(ChainError, match="no wallet 'nope'"):
        wallet_hotkey("nope", "hot", tmp_path)
    with pytest.raises(ChainError, match="has no hotkey 'other'.*new-hotkey"):
        wallet_hotkey("cold", "other", tmp_path)


def test_an_encrypted_wallet_hotkey_needs_its_password(tmp_path):
    # Each encryption or decryption runs the keyfile KDF (~2 s here).
    quiet = {"on_mnemonic": lambda *_: None}
    locked = bittensor.Wallet("cold", "locked", path=str(tmp_path))
    locked.create_new_hotkey(hotkey_password="s3cret", **quiet)
    with pytest.raises(ChainError, match="encrypted; pass password="):
        wallet_hotkey("cold", "locked", tmp_path)
    with pytest.raises(ChainError, match="wrong password"):
        wallet_hotkey("cold", "locked", tmp_path, password="guess")
    unlocked = wallet_hotkey("cold", "locked", tmp_path, password="s3cret")
    assert unlocked.ss58_address == locked.hotkeypub.ss58_address


def test_a_wallet_hotkey_publishes_weights(tmp_path):
    wallets.create("vali", "default", path=str(tmp_path), use_password=False, on_mnemonic=lambda *_: None)
    hotkey = wallet_hotkey("vali", path=tmp_path)
    fake = standard_chain()
    fake.register(FakeNeuron(hotkey.ss58_address, permit=True))

    async def main() -> None:
        async with make_chain(fake) as chain:
            assert (await chain.neuron(hotkey.ss58_address)).role == "validator"
            await chain.publish_weights(hotkey, {MINER.ss58_address: 1.0})
            assert await chain.weights(hotkey.ss58_address) == {MINER.ss58_address: 1.0}
        assert fake.submitted[0][0] == hotkey.ss58_address

    asyncio.run(main())


# -- a RequestGuard on this chain -------------------------------------------------------------


def test_request_guard_accepts_registered_hotkeys_and_refuses_others():
    fake = standard_chain()
    calls: list[str] = []

    async def whoami(request: web.Request) -> web.Response:
        sender = request_sender(request)
        calls.append(sender.role)
        return web.json_response({"hotkey": sender.hotkey, "role": sender.role})

    @route_policy(roles=("validator",))
    async def validators_only(request: web.Request) -> web.Response:
        calls.append("validators_only")
        return web.json_response({"ok": True})

    async def main() -> None:
        async with make_chain(fake) as chain:
            app = signed_app(OWNER, chain)
            app.router.add_get("/whoami", whoami)
            app.router.add_post("/validators-only", validators_only)
            async with serve(app, shutdown_timeout=0.5) as url, aiohttp.ClientSession() as session:

                async def ask(signer: Any, path: str = "/whoami") -> Any:
                    client = SignedClient(signer, session)
                    if path == "/whoami":
                        return await client.get_json(url, path, receiver=OWNER.ss58_address, timeout=TIMEOUT)
                    return await client.post_json(url, path, {}, receiver=OWNER.ss58_address, timeout=TIMEOUT)

                assert await ask(MINER) == {"hotkey": MINER.ss58_address, "role": "miner"}
                assert await ask(VALIDATOR) == {"hotkey": VALIDATOR.ss58_address, "role": "validator"}
                assert await ask(VALIDATOR, "/validators-only") == {"ok": True}
                with pytest.raises(PeerError) as refused:
                    await ask(STRANGER)
                assert (refused.value.status, refused.value.kind) == (403, "NotRegistered")
                with pytest.raises(PeerError) as wrong_role:
                    await ask(MINER, "/validators-only")
                assert (wrong_role.value.status, wrong_role.value.kind) == (403, "WrongRole")
        assert calls == ["miner", "validator", "validators_only"]
        assert fake.count("SubnetInfoRuntimeApi", "get_metagraph") == 1  # one sync served every request

    asyncio.run(main())
