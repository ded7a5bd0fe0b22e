"""BitFit's and HF PEFT's BEFT configs (the maths and the bias layer: :mod:`peftkit.methods.bitfit`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import PeftConfig, register_config


@register_config
@dataclass
class BitFitConfig(PeftConfig):
    """Only biases train. target_modules None = every module with a bias (all of them, as in the paper)."""

    PEFT_TYPE: ClassVar[str] = "BITFIT"

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    add_missing_biases: bool = False
    init_weights: bool = True


@register_config
@dataclass
class BeftConfig(PeftConfig):
    """HF PEFT 0.21's BEFT: an additive bias vector on Linear layers (``beft_bias``, shape (1, out))."""

    PEFT_TYPE: ClassVar[str] = "BEFT"
    DEFAULT_TARGETS: ClassVar[dict[str, list[str]]] = {
        "bert": ["value"], "roberta": ["value"], "llama": ["v_proj"], "mistral": ["v_proj"],
        "qwen2": ["v_proj"], "qwen3": ["v_proj"], "gemma": ["v_proj"], "t5": ["v"], "opt": ["v_proj"],
    }

    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    init_weights: bool = True
