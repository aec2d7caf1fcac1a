"""Miners: serve one pipeline stage (forward, backward, local steps, merges)."""
