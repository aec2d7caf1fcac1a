"""Validators: evaluate the swarm's merged model (recomputation and scoring of miners' work come with issue 6)."""

from iota.validator.evaluator import Validator, ValidatorConfig, evaluate_state

__all__ = ["Validator", "ValidatorConfig", "evaluate_state"]
