"""LoRA's config (the maths and the layers: :mod:`peftkit.methods.lora`; DoRA is ``use_dora``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from ..config import PeftConfig, register_config
from ..errors import PeftConfigError

if TYPE_CHECKING:
    import torch.nn as nn


@register_config
@dataclass
class LoraConfig(PeftConfig):
    """HF PEFT's LoraConfig fields and defaults (those that change the maths and that peftkit implements)."""

    PEFT_TYPE: ClassVar[str] = "LORA"
    UNSUPPORTED_KEYS: ClassVar[frozenset[str]] = frozenset({
        "lora_bias", "layer_replication", "trainable_token_indices", "loftq_config",
        "eva_config", "corda_config", "lora_ga_config", "velora_config", "alora_invocation_tokens",
        "use_qalora", "monteclora_config", "target_parameters", "use_bdlora", "arrow_config",
        "kasa_config", "megatron_config", "ensure_weight_tying",
    })

    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False  # DoRA (methods/dora.py)
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    # HF PEFT passes this to get_peft_model, not to the config: it is never written to adapter_config.json
    autocast_adapter_dtype: bool = field(default=True, metadata={"local": True})
    qalora_group_size: int = 16  # only read by QA-LoRA (use_qalora), accepted for HF files

    def refuse_target(self, module: nn.Module) -> str | None:
        import torch.nn as nn  # a module to adapt means torch is loaded; reading a config does not need it

        from ..targeting import is_conv1d

        if self.use_dora and not (isinstance(module, nn.Linear) or is_conv1d(module)):
            kind = type(module).__name__
            return (f"use_dora=True supports Linear and Conv1D targets only, not {kind}; leave {kind} modules out "
                    "of target_modules (or add them to exclude_modules)")
        return None

    def variant_name(self) -> str:
        """Which LoraVariant computes this config's adapters (subclasses and flags pick others)."""
        return "dora" if self.use_dora else "lora"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, value in [("r", self.r), *((f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items())]:
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise PeftConfigError(f"{name} must be a positive integer, got {value!r}; use e.g. r=8")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise PeftConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise PeftConfigError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise PeftConfigError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported; use True, False or 'gaussian'"
            )
