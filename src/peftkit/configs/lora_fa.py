"""LoRA-FA's config (the frozen-A maths and its optimizer: :mod:`peftkit.methods.lora_fa`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..config import PeftConfig, register_config
from ..errors import PeftConfigError
from .lora import LoraConfig

if TYPE_CHECKING:
    import torch.nn as nn


@register_config
@dataclass
class LoraFAConfig(LoraConfig):
    """LoRA's fields; A stays frozen. Saved as a plain LoRA (``peft_type: "LORA"``).

    In memory it is keyed ``LORA_FA`` (its own registry entry with LoRA's layers), so a ``"LORA"`` file still
    loads as :class:`LoraConfig`; ``LoraFAConfig.from_pretrained(folder)`` reads a LoRA file as LoRA-FA, to
    resume training one."""

    PEFT_TYPE: ClassVar[str] = "LORA_FA"

    def refuse_target(self, module: nn.Module) -> str | None:
        import torch.nn as nn  # a module to adapt means torch is loaded; reading a config does not need it

        if isinstance(module, nn.Embedding):
            return ("LoRA-FA freezes A, but LoRA on an embedding starts with A = 0, so it could never learn; leave "
                    "embeddings out of target_modules (or give them a plain LoraConfig adapter)")
        return super().refuse_target(module)

    def variant_name(self) -> str:
        return "lora_fa"

    def __post_init__(self) -> None:
        super().__post_init__()
        if getattr(self, "use_dora", False):
            raise PeftConfigError("LoRA-FA does not combine with DoRA (use_dora=True); use one or the other")

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "peft_type": LoraConfig.PEFT_TYPE}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeftConfig:
        if str(data.get("peft_type", LoraConfig.PEFT_TYPE)).upper() == LoraConfig.PEFT_TYPE:
            data = {**data, "peft_type": cls.PEFT_TYPE}
        return super().from_dict(data)
