"""Who is who: the Chain interface, the offline LocalChain, and local hotkeys."""

from iota.chain.base import ROLES, Chain, ChainError, Neuron, Role
from iota.chain.keys import dev_keypair, generate_keypair, keypair_from_mnemonic, keypair_from_seed
from iota.chain.local import LocalChain

__all__ = [
    "ROLES",
    "Chain",
    "ChainError",
    "LocalChain",
    "Neuron",
    "Role",
    "dev_keypair",
    "generate_keypair",
    "keypair_from_mnemonic",
    "keypair_from_seed",
]
