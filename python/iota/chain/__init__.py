"""Who is who: the Chain interface, LocalChain (offline), BittensorChain (a subnet metagraph), hotkeys."""

from iota.chain.base import ROLES, Chain, ChainError, Neuron, Role
from iota.chain.bittensor import BittensorChain, WeightsRateLimited, wallet_hotkey
from iota.chain.keys import dev_keypair, generate_keypair, keypair_from_mnemonic, keypair_from_seed
from iota.chain.local import LocalChain

__all__ = [
    "ROLES",
    "BittensorChain",
    "Chain",
    "ChainError",
    "LocalChain",
    "Neuron",
    "Role",
    "WeightsRateLimited",
    "dev_keypair",
    "generate_keypair",
    "keypair_from_mnemonic",
    "keypair_from_seed",
    "wallet_hotkey",
]
