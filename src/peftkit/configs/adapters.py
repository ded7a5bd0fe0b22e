"""The bottleneck adapters' config (Houlsby, Pfeiffer; the maths, placements and layer:
:mod:`peftkit.methods.adapters`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..config import PeftConfig, register_config
from ..errors import PeftConfigError

# the activations the layer knows (methods/adapters.py's NON_LINEARITIES maps each name to its function)
NON_LINEARITY_NAMES = ("relu", "gelu", "swish", "tanh")
PLACEMENTS = ("houlsby", "pfeiffer")
INIT_WEIGHTS = ("bert", "houlsby", "mam_adapter")
# placement -> (original_ln_before, non_linearity): the papers' placements with AdapterHub's defaults
PLACEMENT_DEFAULTS = {"pfeiffer": (True, "relu"), "houlsby": (False, "swish")}


@register_config
@dataclass
class BottleneckConfig(PeftConfig):
    """Bottleneck adapters after the attention and/or feed-forward output projections (see peftkit.methods.adapters)."""

    PEFT_TYPE: ClassVar[str] = "BOTTLENECK"

    # Defaults for keys a file lacks: files written before the key existed load as they were trained.
    FILE_DEFAULTS: ClassVar[dict[str, Any]] = {
        "original_ln_before": False, "non_linearity": "relu", "init_weights": "mam_adapter",
    }

    placement: str = "pfeiffer"
    reduction_factor: float = 16
    bottleneck_size: int | None = None
    non_linearity: str | None = None  # None: the placement's (relu for pfeiffer, swish for houlsby)
    original_ln_before: bool | None = None  # None: the placement's (True for pfeiffer, False for houlsby)
    init_weights: str = "bert"
    scaling: float = 1.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    train_layer_norms: bool | None = None  # None: on for houlsby, off for pfeiffer
    autocast_adapter_dtype: bool = field(default=True, metadata={"local": True})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.placement not in PLACEMENTS:
            raise PeftConfigError(f"placement must be 'houlsby' or 'pfeiffer', got {self.placement!r}")
        if not _is_number(self.reduction_factor) or self.reduction_factor <= 0:
            raise PeftConfigError(
                f"reduction_factor must be a positive number, got {self.reduction_factor!r}; use e.g. 16"
            )
        size = self.bottleneck_size
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
            raise PeftConfigError(f"bottleneck_size must be a positive integer or None, got {size!r}")
        ln_before, act = PLACEMENT_DEFAULTS[self.placement]
        if self.original_ln_before is None:
            self.original_ln_before = ln_before
        if self.non_linearity is None:
            self.non_linearity = act
        if self.original_ln_before not in (True, False):
            raise PeftConfigError(
                f"original_ln_before must be True, False or None, got {self.original_ln_before!r}"
            )
        if self.init_weights not in INIT_WEIGHTS:
            raise PeftConfigError(f"init_weights must be one of {list(INIT_WEIGHTS)}, got {self.init_weights!r}")
        if self.non_linearity not in NON_LINEARITY_NAMES:
            raise PeftConfigError(
                f"non_linearity must be one of {sorted(NON_LINEARITY_NAMES)}, got {self.non_linearity!r}"
            )
        if not _is_number(self.scaling) or not math.isfinite(self.scaling):
            raise PeftConfigError(f"scaling must be a finite number, got {self.scaling!r}; use e.g. 1.0")
        if not 0.0 <= self.dropout < 1.0:
            raise PeftConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.train_layer_norms not in (None, True, False):
            raise PeftConfigError(
                f"train_layer_norms must be True, False or None, got {self.train_layer_norms!r}"
            )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
