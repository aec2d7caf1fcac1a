"""Validators: evaluate the merged model, audit miners' work by recomputing it, score miners."""

from iota.validator.evaluator import Validator, ValidatorConfig, evaluate_state

__all__ = ["Validator", "ValidatorConfig", "evaluate_state"]
