"""Training: ``peftkit train``'s run description, loop, checkpoints and reports (needs the hf and cli extras)."""

from .loop import Runner, RunResult, evaluate_adapter, run_training
from .methods import METHODS, method_entry
from .spec import RunSpec, SpecError, load_spec, parse_spec

__all__ = ["METHODS", "RunResult", "RunSpec", "Runner", "SpecError", "evaluate_adapter", "load_spec",
           "method_entry", "parse_spec", "run_training"]
