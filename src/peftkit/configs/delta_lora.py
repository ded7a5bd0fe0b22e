"""Delta-LoRA's config (the paper, its update of W and the file it writes: :mod:`peftkit.methods.delta_lora`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import register_config
from ..errors import PeftConfigError
from .lora import LoraConfig


@register_config
@dataclass
class DeltaLoraConfig(LoraConfig):
    """LoRA's fields plus ``delta_lambda`` (λ, the update ratio) and ``update_start`` (K, the start steps: W
    first moves in iteration K + 1, counting from 0, i.e. with the delta of the (K + 2)-th optimizer step)."""

    PEFT_TYPE: ClassVar[str] = "DELTA_LORA"

    delta_lambda: float = 2.0  # the paper's experiments: λ = 2, K = 500
    update_start: int = 500

    def variant_name(self) -> str:
        return "delta_lora"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lora_dropout:
            raise PeftConfigError(
                f"Delta-LoRA needs lora_dropout=0 (got {self.lora_dropout}): the paper removes dropout so that "
                "the delta of A·B stands in for W's gradient; set lora_dropout=0.0"
            )
        if not isinstance(self.update_start, int) or self.update_start < 0:
            raise PeftConfigError(f"update_start must be an integer ≥ 0, got {self.update_start!r}")
