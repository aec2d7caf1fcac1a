"""Running nodes: `python -m iota.node {local,orchestrator,miner,validator}`."""
