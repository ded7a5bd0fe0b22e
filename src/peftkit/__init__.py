"""peftkit: parameter-efficient fine-tuning for PyTorch, with HF PEFT's names and adapter files.

The public names load on first use (PEP 562): ``import peftkit`` costs nothing, so the command line's
``--help`` and ``inspect`` start in well under a second, while ``from peftkit import LoraConfig`` and
``peftkit.get_peft_model`` work as they always did. A submodule (``peftkit.optim``) also loads on first access.
The configs come from ``peftkit.configs``, which needs no torch: ``from peftkit import LoraConfig`` and reading
an adapter_config.json load no tensor library; the model, layers and files load torch when first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "save_adapterhub": "adapterhub",
    "PeftConfig": "config", "TaskType": "config",
    **dict.fromkeys(["AdapterFileError", "AdapterNameError", "BaseModelMismatchError", "NoTrainableParametersError", "PeftConfigError",
                     "PeftError", "TargetModulesError"], "errors"),
    "BottleneckConfig": "configs.adapters",
    "BeftConfig": "configs.bitfit", "BitFitConfig": "configs.bitfit",
    "DeltaLoraConfig": "configs.delta_lora",
    "IA3Config": "configs.ia3",
    "LoraConfig": "configs.lora",
    "LoraFAConfig": "configs.lora_fa", "create_lorafa_optimizer": "methods.lora_fa",
    **dict.fromkeys(["PrefixTuningConfig", "PromptEncoderConfig", "PromptEncoderReparameterizationType",
                     "PromptLearningConfig", "PromptTuningConfig", "PromptTuningInit"], "configs.prompts"),
    "VeraConfig": "configs.vera",
    **dict.fromkeys(["PeftModel", "PeftModelForCausalLM", "PeftModelForFeatureExtraction", "PeftModelForSeq2SeqLM",
                     "PeftModelForSequenceClassification", "PeftModelForTokenClassification", "get_peft_model",
                     "get_peft_model_state_dict", "inject_adapter_in_model", "set_peft_model_state_dict"], "model"),
    **dict.fromkeys(["QuantizationReport", "prepare_model_for_kbit_training", "quantize_base"], "quantize"),
}

__all__ = [
    "AdapterFileError",
    "AdapterNameError",
    "BaseModelMismatchError",
    "BeftConfig",
    "BitFitConfig",
    "BottleneckConfig",
    "DeltaLoraConfig",
    "IA3Config",
    "LoraConfig",
    "LoraFAConfig",
    "NoTrainableParametersError",
    "PeftConfig",
    "PeftConfigError",
    "PeftError",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "QuantizationReport",
    "TargetModulesError",
    "TaskType",
    "VeraConfig",
    "create_lorafa_optimizer",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "prepare_model_for_kbit_training",
    "quantize_base",
    "save_adapterhub",
    "set_peft_model_state_dict",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (then cache the name here), or a submodule by name."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise  # the submodule exists but a dependency of it is missing: say so
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # what type checkers and editors see: the same names, imported eagerly
    from .adapterhub import save_adapterhub
    from .config import PeftConfig, TaskType
    from .configs.adapters import BottleneckConfig
    from .configs.bitfit import BeftConfig, BitFitConfig
    from .configs.delta_lora import DeltaLoraConfig
    from .configs.ia3 import IA3Config
    from .configs.lora import LoraConfig
    from .configs.lora_fa import LoraFAConfig
    from .configs.prompts import (
        PrefixTuningConfig,
        PromptEncoderConfig,
        PromptEncoderReparameterizationType,
        PromptLearningConfig,
        PromptTuningConfig,
        PromptTuningInit,
    )
    from .configs.vera import VeraConfig
    from .errors import (
        AdapterFileError,
        AdapterNameError,
        BaseModelMismatchError,
        NoTrainableParametersError,
        PeftConfigError,
        PeftError,
        TargetModulesError,
    )
    from .methods.lora_fa import create_lorafa_optimizer
    from .model import (
        PeftModel,
        PeftModelForCausalLM,
        PeftModelForFeatureExtraction,
        PeftModelForSeq2SeqLM,
        PeftModelForSequenceClassification,
        PeftModelForTokenClassification,
        get_peft_model,
        get_peft_model_state_dict,
        inject_adapter_in_model,
        set_peft_model_state_dict,
    )
    from .quantize import QuantizationReport, prepare_model_for_kbit_training, quantize_base
