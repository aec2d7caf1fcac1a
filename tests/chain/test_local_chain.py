import asyncio
import math

import pytest

from iota.chain import ROLES, ChainError, LocalChain, Neuron, dev_keypair

MINER = dev_keypair("iota-test-chain-miner")
MINER2 = dev_keypair("iota-test-chain-miner2")
VALIDATOR = dev_keypair("iota-test-chain-validator")
ORCHESTRATOR = dev_keypair("iota-test-chain-orchestrator")


def make_chain() -> LocalChain:
    return LocalChain(
        {
            MINER.ss58_address: "miner",
            MINER2.ss58_address: Neuron(MINER2.ss58_address, "miner", "http://127.0.0.1:9001", 2.5),
            VALIDATOR.ss58_address: "validator",
            ORCHESTRATOR.ss58_address: "orchestrator",
        }
    )


def test_built_from_a_dict_of_roles_and_neurons():
    chain = make_chain()
    assert asyncio.run(chain.neuron(MINER.ss58_address)) == Neuron(MINER.ss58_address, "miner")
    assert asyncio.run(chain.neuron(MINER2.ss58_address)).address == "http://127.0.0.1:9001"
    assert asyncio.run(chain.neuron(dev_keypair("nobody").ss58_address)) is None
    assert sorted(n.role for n in asyncio.run(chain.neurons())) == sorted(
        ["miner", "miner", "validator", "orchestrator"]
    )
    assert set(ROLES) == {"miner", "validator", "orchestrator"}


def test_register_adds_or_updates():
    chain = LocalChain()
    chain.register(MINER.ss58_address, "miner")
    chain.register(MINER.ss58_address, "miner", address="http://10.0.0.2:8000")
    assert asyncio.run(chain.neurons()) == [Neuron(MINER.ss58_address, "miner", "http://10.0.0.2:8000")]


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({MINER.ss58_address: "trainer"}, "role 'trainer'"),
        ({"alice": "miner"}, "not an ss58 hotkey"),
        ({MINER.ss58_address: Neuron(MINER2.ss58_address, "miner")}, "key the dict"),
    ],
)
def test_bad_entries_are_refused(entries, message):
    with pytest.raises(ChainError, match=message):
        LocalChain(entries)


@pytest.mark.parametrize("stake", [math.nan, -1.0])
def test_bad_stake_is_refused(stake):
    with pytest.raises(ChainError, match="stake"):
        LocalChain().register(MINER.ss58_address, "miner", stake=stake)


def test_published_weights_are_normalized():
    chain = make_chain()
    asyncio.run(chain.publish_weights(VALIDATOR, {MINER.ss58_address: 3.0, MINER2.ss58_address: 1.0}))
    assert asyncio.run(chain.weights(VALIDATOR.ss58_address)) == {
        MINER.ss58_address: 0.75,
        MINER2.ss58_address: 0.25,
    }
    assert asyncio.run(chain.weights(MINER.ss58_address)) == {}


@pytest.mark.parametrize(
    ("publisher", "weights", "message"),
    [
        (MINER, {MINER2.ss58_address: 1.0}, "registered as miner"),
        (dev_keypair("nobody"), {MINER.ss58_address: 1.0}, "not registered"),
        (VALIDATOR, {dev_keypair("nobody").ss58_address: 1.0}, "unregistered"),
        (VALIDATOR, {MINER.ss58_address: -1.0}, "finite and >= 0"),
        (VALIDATOR, {MINER.ss58_address: math.inf}, "finite and >= 0"),
        (VALIDATOR, {MINER.ss58_address: 0.0}, "sum to 0"),
    ],
)
def test_bad_weights_are_refused(publisher, weights, message):
    chain = make_chain()
    with pytest.raises(ChainError, match=message):
        asyncio.run(chain.publish_weights(publisher, weights))
    assert asyncio.run(chain.weights(publisher.ss58_address)) == {}


def test_save_and_load_share_one_view(tmp_path):
    chain = make_chain()
    asyncio.run(chain.publish_weights(VALIDATOR, {MINER.ss58_address: 1.0}))
    path = tmp_path / "chain.json"
    chain.save(path)
    loaded = LocalChain.load(path)
    assert asyncio.run(loaded.neurons()) == asyncio.run(chain.neurons())
    assert asyncio.run(loaded.weights(VALIDATOR.ss58_address)) == {MINER.ss58_address: 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["chain.json"]


@pytest.mark.parametrize(
    "content", ["not json", '{"version": 99}', '{"version": 1, "neurons": [{"role": "miner"}]}']
)
def test_load_refuses_other_files(tmp_path, content):
    path = tmp_path / "chain.json"
    path.write_text(content)
    with pytest.raises(ChainError, match="chain.json"):
        LocalChain.load(path)


def test_load_of_a_missing_file_says_which(tmp_path):
    with pytest.raises(ChainError, match="missing.json"):
        LocalChain.load(tmp_path / "missing.json")
