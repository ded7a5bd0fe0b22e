"""peftkit: parameter-efficient fine-tuning for PyTorch, with HF PEFT's names and adapter files."""

from . import distributed  # peftkit.distributed.shard(model): FSDP2 sharding for a user's own loop
from .adapterhub import save_adapterhub
from .config import PeftConfig, TaskType
from .errors import (
    AdapterFileError,
    AdapterNameError,
    NoTrainableParametersError,
    PeftConfigError,
    PeftError,
    TargetModulesError,
)
from .methods.adapters import BottleneckConfig
from .methods.bitfit import BeftConfig, BitFitConfig
from .methods.delta_lora import DeltaLoraConfig
from .methods.ia3 import IA3Config
from .methods.lora import LoraConfig
from .methods.lora_fa import LoraFAConfig, create_lorafa_optimizer
from .methods.prompts import (
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptLearningConfig,
    PromptTuningConfig,
    PromptTuningInit,
)
from .methods.vera import VeraConfig
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

__version__ = "0.1.0"

__all__ = [
    "AdapterFileError",
    "AdapterNameError",
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
    "distributed",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "prepare_model_for_kbit_training",
    "quantize_base",
    "save_adapterhub",
    "set_peft_model_state_dict",
]
