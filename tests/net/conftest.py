from types import SimpleNamespace

import pytest

from iota.chain import LocalChain, dev_keypair


@pytest.fixture(scope="session")
def keys() -> SimpleNamespace:
    # Dev keys: deterministic, real sr25519, derived offline.
    return SimpleNamespace(
        server=dev_keypair("iota-test-server"),
        miner=dev_keypair("iota-test-miner"),
        validator=dev_keypair("iota-test-validator"),
        stranger=dev_keypair("iota-test-stranger"),
    )


@pytest.fixture
def chain(keys: SimpleNamespace) -> LocalChain:
    return LocalChain(
        {
            keys.server.ss58_address: "orchestrator",
            keys.miner.ss58_address: "miner",
            keys.validator.ss58_address: "validator",
        }
    )
