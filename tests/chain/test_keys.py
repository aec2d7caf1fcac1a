import pytest

from iota.chain import ChainError, dev_keypair, generate_keypair, keypair_from_mnemonic, keypair_from_seed


def test_dev_keys_are_deterministic_and_substrate_compatible():
    # "//Alice" is Substrate's well-known development account.
    assert dev_keypair("Alice").ss58_address == "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"
    assert dev_keypair("miner-0").ss58_address == dev_keypair("miner-0").ss58_address
    assert dev_keypair("miner-0").ss58_address != dev_keypair("miner-1").ss58_address


@pytest.mark.parametrize("name", ["", "a/b"])
def test_dev_key_names_are_checked(name):
    with pytest.raises(ChainError, match="dev key name"):
        dev_keypair(name)


def test_generated_keypair_is_restored_by_its_mnemonic_and_signs_bytes():
    mnemonic, keypair = generate_keypair()
    assert len(mnemonic.split()) == 12
    restored = keypair_from_mnemonic(mnemonic)
    assert restored.ss58_address == keypair.ss58_address
    signature = keypair.sign(b"payload")
    assert restored.verify(b"payload", signature)
    assert not restored.verify(b"other payload", signature)


def test_seed_keypairs_need_32_bytes():
    assert keypair_from_seed(bytes(32)).ss58_address == keypair_from_seed(bytes(32)).ss58_address
    with pytest.raises(ChainError, match="32 bytes"):
        keypair_from_seed(b"short")


@pytest.mark.parametrize(
    "bad", [lambda: keypair_from_mnemonic("not a mnemonic"), lambda: generate_keypair(13)]
)
def test_bad_key_material_is_refused(bad):
    with pytest.raises(ChainError):
        bad()
