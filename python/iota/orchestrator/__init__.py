"""The orchestrator: the swarm's control plane (registry, stage assignment, leases, merge phases, weights)."""
