"""The nodes' identity flags: --key/--chain (a LocalChain) or a Bittensor wallet on a subnet.

Mixed, partial or missing identities stop the CLI with a message naming the
flags; wallet problems stop it naming the wallet; the Bittensor flags build
one BittensorChain per process, opened on the role's event loop and closed
when the role stops. The chain runs on the in-memory FakeSubstrate: nothing
here touches a network.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import aiohttp
import bittensor
import pytest
from bittensor import wallets
from bittensor.sp_core import verify

from iota.chain import BittensorChain, LocalChain, dev_keypair
from iota.miner.service import MinerConfig
from iota.net import PeerError, SignedClient
from iota.node import roles
from iota.node.__main__ import build_parser, identity, main
from iota.orchestrator.config import OrchestratorConfig
from iota.validator import ValidatorConfig
from tests.chain.fake_substrate import FakeNeuron, FakeSubstrate
from tests.node.swarm import TINY

NETUID = 7
URL = "http://127.0.0.1:9"  # never contacted: every test stops before a role talks to its orchestrator
ORCH = dev_keypair("iota-flags-orchestrator")
ORCH2 = dev_keypair("iota-flags-orchestrator2")
VALIDATOR = dev_keypair("iota-flags-validator")
MINER = dev_keypair("iota-flags-miner")
STRANGER = dev_keypair("iota-flags-stranger")
QUIET = {"on_mnemonic": lambda *_: None}


@pytest.fixture(autouse=True)
def _sdk_caches_in_tmp(tmp_path, monkeypatch):
    # Connecting caches token symbols on disk; keep that out of the home directory.
    monkeypatch.setenv("BTCLI_TOKEN_SYMBOLS_CACHE", str(tmp_path / "token_symbols.json"))
    monkeypatch.delenv("BT_WALLET_PATH", raising=False)


@pytest.fixture
def wallet(tmp_path) -> tuple[Path, str]:
    """A wallet 'cold' with an unencrypted hotkey 'hot' in tmp_path/wallets; (path, hotkey ss58)."""
    path = tmp_path / "wallets"
    created = wallets.create("cold", "hot", path=str(path), use_password=False, **QUIET)
    return path, created.hotkey.ss58_address


def subnet(*extra: FakeNeuron, netuid: int = NETUID) -> FakeSubstrate:
    return FakeSubstrate(netuid, [FakeNeuron(ORCH.ss58_address), FakeNeuron(ORCH2.ss58_address),
                                  FakeNeuron(VALIDATOR.ss58_address, permit=True),
                                  FakeNeuron(MINER.ss58_address), *extra])


def local_client(fake: FakeSubstrate) -> bittensor.Subtensor:
    return bittensor.Subtensor("local", substrate=fake)


def wallet_flags(path: Path, *, netuid: int = NETUID, network: str | None = "local") -> list[str]:
    network_flags = ["--network", network] if network else []
    return [*network_flags, "--netuid", str(netuid), "--wallet-name", "cold", "--wallet-hotkey", "hot",
            "--wallet-path", str(path)]


def exit_message(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert isinstance(exc.value.code, str), exc.value.code
    return exc.value.code


# -- choosing an identity ----------------------------------------------------------------------

EITHER = ("give either --key and --chain (a LocalChain) or --netuid and --wallet-name (a Bittensor subnet), "
          "not both; got ")


@pytest.mark.parametrize(("argv", "message"), [
    (["miner", "--orchestrator", URL],
     "say who this node is: give either --key and --chain (a LocalChain) or --netuid and --wallet-name "
     "(a Bittensor subnet; --network defaults to finney)"),
    (["validator", "--orchestrator", URL, "--key", "v", "--chain", "c.json", "--netuid", "1"],
     EITHER + "--key, --chain, --netuid"),
    (["miner", "--orchestrator", URL, "--key", "m", "--wallet-name", "cold"], EITHER + "--key, --wallet-name"),
    (["miner", "--orchestrator", URL, "--key", "m", "--chain", "c.json", "--orchestrator-hotkeys", ORCH.ss58_address],
     EITHER + "--key, --chain, --orchestrator-hotkeys"),
    (["miner", "--orchestrator", URL, "--chain", "c.json", "--network", "test", "--netuid", "3",
      "--wallet-name", "cold", "--wallet-path", "w"],
     EITHER + "--chain, --network, --netuid, --wallet-name, --wallet-path"),
    (["miner", "--orchestrator", URL, "--key", "m"], "--key and --chain go together; --key was given without --chain"),
    (["validator", "--orchestrator", URL, "--chain", "c.json"],
     "--key and --chain go together; --chain was given without --key"),
    (["miner", "--orchestrator", URL, "--network", "test", "--wallet-name", "cold"],
     "--netuid is required with --network: the subnet the swarm runs on"),
    (["miner", "--orchestrator", URL, "--wallet-name", "cold"],
     "--netuid is required with --wallet-name: the subnet the swarm runs on"),
    (["validator", "--orchestrator", URL, "--netuid", "3"],
     "--wallet-name is required with --netuid: the wallet whose hotkey this node signs with "
     "(see also --wallet-hotkey and --wallet-path)"),
    (["miner", "--orchestrator", URL, "--network", "finney", "--netuid", "-1", "--wallet-name", "cold"],
     "--netuid must be >= 0, got -1"),
], ids=["neither", "key-chain-netuid", "key-wallet", "key-chain-orchestrators", "chain-and-wallet",
        "key-alone", "chain-alone", "network-no-netuid", "wallet-no-netuid", "netuid-no-wallet", "negative-netuid"])
def test_an_identity_must_be_one_of_the_two(argv, message):
    assert exit_message(argv) == message


def test_a_bad_identity_stops_the_orchestrator_before_anything_starts(tmp_path):
    run = tmp_path / "run"
    assert exit_message(["orchestrator", "--dir", str(run), "--key", "o"]) == (
        "--key and --chain go together; --key was given without --chain")
    assert exit_message(["orchestrator", "--dir", str(run), "--key", "o", "--chain", "c.json",
                         "--wallet-name", "cold"]) == EITHER + "--key, --chain, --wallet-name"
    assert not run.exists()


def test_every_node_role_shows_the_identity_flags(capsys):
    for role in ("orchestrator", "miner", "validator"):
        with pytest.raises(SystemExit) as exc:
            main([role, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        for flag in ("--key", "--chain", "--network", "--netuid", "--wallet-name", "--wallet-hotkey",
                     "--wallet-path", "--orchestrator-hotkeys"):
            assert flag in out, (role, flag)
        assert "$BT_WALLET_PATH or ~/.bittensor/wallets" in " ".join(out.split())


# -- wallets ---------------------------------------------------------------------------------------


def test_a_missing_wallet_or_hotkey_stops_the_cli_naming_it(tmp_path, wallet):
    path, _ = wallet
    assert exit_message(["miner", "--orchestrator", URL, "--netuid", "1", "--wallet-name", "nope",
                         "--wallet-path", str(path)]) == (
        f"no wallet 'nope' in {path}; create it with `btcli wallet create -w nope` "
        "or pass the wallets directory as path")
    message = exit_message(["validator", "--orchestrator", URL, "--netuid", "1", "--wallet-name", "cold",
                            "--wallet-hotkey", "other", "--wallet-path", str(path)])
    assert message == (f"wallet 'cold' has no hotkey 'other' (no file {path / 'cold' / 'hotkeys' / 'other'}); "
                       "create it with `btcli wallet new-hotkey -w cold -H other`")
    # --wallet-hotkey defaults to "default", which this wallet does not have
    message = exit_message(["miner", "--orchestrator", URL, "--netuid", "1", "--wallet-name", "cold",
                            "--wallet-path", str(path)])
    assert message.startswith("wallet 'cold' has no hotkey 'default' (no file ")


def test_an_encrypted_hotkey_without_its_password_stops_the_cli(tmp_path, monkeypatch):
    locked = bittensor.Wallet("cold", "locked", path=str(tmp_path))
    locked.create_new_hotkey(hotkey_password="s3cret", **QUIET)  # the keyfile KDF: ~2 s
    monkeypatch.setenv("BT_WALLET_PATH", str(tmp_path))  # the default --wallet-path
    message = exit_message(["miner", "--orchestrator", URL, "--netuid", "1", "--wallet-name", "cold",
                            "--wallet-hotkey", "locked"])
    assert message.startswith(f"hotkey {tmp_path / 'cold' / 'hotkeys' / 'locked'} is encrypted; ")
    assert "BT_PW_" in message


def test_the_wallet_flags_give_the_wallet_hotkey(tmp_path, wallet, monkeypatch):
    path, hotkey = wallet
    node = identity(build_parser().parse_args(["miner", "--orchestrator", URL, *wallet_flags(path)]))
    assert node.hotkey == node.keypair.ss58_address == hotkey
    assert verify(b"msg", bytes(node.keypair.sign(b"msg")), hotkey)  # it holds the private key
    monkeypatch.setenv("BT_WALLET_PATH", str(path))
    default_path = identity(build_parser().parse_args(
        ["validator", "--orchestrator", URL, "--netuid", "1", "--wallet-name", "cold", "--wallet-hotkey", "hot"]))
    assert default_path.hotkey == hotkey


def test_key_and_chain_still_give_a_dev_key_on_a_local_chain(tmp_path):
    LocalChain({dev_keypair("m").ss58_address: "miner"}).save(tmp_path / "chain.json")
    node = identity(build_parser().parse_args(
        ["miner", "--orchestrator", URL, "--key", "m", "--chain", str(tmp_path / "chain.json")]))
    assert node.hotkey == dev_keypair("m").ss58_address

    async def main() -> None:
        async with node.open_chain() as chain:
            assert isinstance(chain, LocalChain)
            assert (await chain.neuron(node.hotkey)).role == "miner"

    asyncio.run(main())


# -- the BittensorChain the flags build ------------------------------------------------------------


def test_the_chain_is_built_from_the_flags_synced_and_closed(wallet):
    path, hotkey = wallet
    fake = subnet(FakeNeuron(hotkey))
    args = build_parser().parse_args(
        ["miner", "--orchestrator", URL, *wallet_flags(path), "--orchestrator-hotkey", ORCH.ss58_address,
         "--orchestrator-hotkeys", f" {ORCH2.ss58_address},,{STRANGER.ss58_address} "])
    node = identity(args, subtensor=local_client(fake))
    assert not fake.connected  # nothing connects before the role's loop opens the chain
    seen: dict[str, Any] = {}

    async def main() -> None:
        async with node.open_chain() as chain:
            assert isinstance(chain, BittensorChain)
            assert (chain.netuid, chain.network) == (NETUID, "local")
            assert chain.orchestrator_hotkeys == {ORCH.ss58_address, ORCH2.ss58_address, STRANGER.ss58_address}
            assert chain.synced_block == fake.block and fake.connected  # synced on entry
            roles_seen = {n.hotkey: n.role for n in await chain.neurons()}
            assert roles_seen == {ORCH.ss58_address: "orchestrator", ORCH2.ss58_address: "orchestrator",
                                  VALIDATOR.ss58_address: "validator", MINER.ss58_address: "miner",
                                  hotkey: "miner"}
            assert await roles.orchestrator_hotkey(chain, args.orchestrator_hotkey) == ORCH.ss58_address
            seen["refresher"] = chain._refresher
            assert seen["refresher"] is not None and not seen["refresher"].done()  # re-syncs in the background
        assert not fake.connected  # closed on exit, the refresh with it
        assert seen["refresher"].cancelled()

    asyncio.run(main())
    assert fake.count("SubnetInfoRuntimeApi", "get_metagraph") == 1


def test_an_orchestrator_counts_its_own_hotkey_as_an_orchestrator(wallet):
    path, hotkey = wallet
    fake = subnet(FakeNeuron(hotkey, permit=True))
    args = build_parser().parse_args(["orchestrator", "--dir", "run", *wallet_flags(path),
                                      "--orchestrator-hotkeys", ORCH2.ss58_address])
    node = identity(args, subtensor=local_client(fake))

    async def main() -> None:
        async with node.open_chain() as chain:
            assert chain.orchestrator_hotkeys == {hotkey, ORCH2.ss58_address}
            assert (await chain.neuron(hotkey)).role == "orchestrator"  # not "validator" for its permit
            assert (await chain.neuron(ORCH.ss58_address)).role == "miner"  # not named anywhere

    asyncio.run(main())


@pytest.mark.parametrize("network", [None, "finney", "test", "wss://subtensor.example:443"])
def test_the_network_flag_reaches_the_chain(wallet, monkeypatch, network):
    path, _ = wallet
    built: list[tuple[int, str | None]] = []
    fake = subnet()

    class Recorded(BittensorChain):
        def __init__(self, netuid: int, network: str | None = None, **kwargs: Any) -> None:
            built.append((netuid, network))
            assert kwargs.pop("subtensor") is None  # the CLI leaves the client to the network name
            super().__init__(netuid, subtensor=local_client(fake), **kwargs)  # ...which the test swaps for a fake

    monkeypatch.setattr(roles, "BittensorChain", Recorded)
    node = identity(build_parser().parse_args(["validator", "--orchestrator", URL,
                                               *wallet_flags(path, netuid=NETUID, network=network)]))

    async def main() -> None:
        async with node.open_chain():
            pass

    asyncio.run(main())
    assert built == [(NETUID, network)]


@pytest.mark.parametrize(("flags", "message"), [
    (["--netuid", str(NETUID + 1)], f"netuid {NETUID + 1} does not exist on local; check the netuid and network"),
    (["--network", "test"], "network 'test' does not match the given client's network 'local'; pass one or the other"),
    (["--orchestrator-hotkeys", "orchestrator"], "orchestrator hotkey 'orchestrator' is not an ss58 hotkey address"),
], ids=["unknown-netuid", "other-network", "bad-orchestrator-hotkey"])
def test_a_chain_that_cannot_start_stops_the_role_with_its_message(wallet, flags, message):
    path, _ = wallet
    fake = subnet()
    args = build_parser().parse_args(["miner", "--orchestrator", URL, *wallet_flags(path), *flags])
    node = identity(args, subtensor=local_client(fake))
    with pytest.raises(SystemExit) as exc:  # out of asyncio.run, as main() runs the role
        asyncio.run(roles.miner(URL, node, None, MinerConfig(), None))
    assert str(exc.value.code).startswith(message)
    assert not fake.connected


def test_a_role_with_no_orchestrator_on_the_subnet_stops_and_closes_the_chain(wallet):
    path, _ = wallet
    fake = subnet()
    node = identity(build_parser().parse_args(["validator", "--orchestrator", URL, *wallet_flags(path)]),
                    subtensor=local_client(fake))
    with pytest.raises(SystemExit, match="the chain lists 0 orchestrators; pass --orchestrator-hotkey"):
        asyncio.run(roles.validator(URL, node, None, ValidatorConfig(), None))
    assert fake.count("SubnetInfoRuntimeApi", "get_metagraph") == 1 and not fake.connected


def test_the_orchestrator_role_serves_guarded_by_the_subnet_and_closes_it(tmp_path, wallet):
    path, hotkey = wallet
    fake = subnet(FakeNeuron(hotkey))
    run = tmp_path / "run"
    node = identity(build_parser().parse_args(["orchestrator", "--dir", str(run), *wallet_flags(path)]),
                    subtensor=local_client(fake))

    async def main() -> None:
        role = asyncio.ensure_future(roles.orchestrator(str(run), node, TINY, OrchestratorConfig(),
                                                        "127.0.0.1", 0, None))
        try:
            for _ in range(1200):
                if (run / "orchestrator.url").exists() or role.done():
                    break
                await asyncio.sleep(0.05)
            assert not role.done(), role.result()
            url = (run / "orchestrator.url").read_text()
            assert fake.connected
            async with aiohttp.ClientSession() as session:
                with pytest.raises(PeerError) as refused:  # not on the subnet
                    await SignedClient(STRANGER, session).get_json(url, "/merge-reports", receiver=hotkey,
                                                                   timeout=10.0)
                assert (refused.value.status, refused.value.kind) == (403, "NotRegistered")
                with pytest.raises(PeerError) as not_joined:  # on the subnet, not yet in the run
                    await SignedClient(VALIDATOR, session).get_json(url, "/merge-reports", receiver=hotkey,
                                                                    timeout=10.0)
                assert not_joined.value.status == 409
        finally:
            role.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await role
        assert not fake.connected

    asyncio.run(main())
