"""VeRA's config (the maths, the shared projections and the layer: :mod:`peftkit.methods.vera`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from ..config import PeftConfig, register_config
from ..errors import PeftConfigError

if TYPE_CHECKING:
    from ..methods.vera import VeraProjections


@dataclass(frozen=True)
class SharedProjections:
    """What ``prepare_config`` hands the layers: the model's projections module and this adapter's (d_out, d_in).
    Defined here because :class:`VeraConfig`'s ``projections`` field is checked against it."""

    module: VeraProjections
    shape: tuple[int, int]


@register_config
@dataclass
class VeraConfig(PeftConfig):
    """HF PEFT 0.21's VeraConfig fields and defaults (it has no option that peftkit lacks)."""

    PEFT_TYPE: ClassVar[str] = "VERA"
    UNSUPPORTED_KEYS: ClassVar[frozenset[str]] = frozenset()

    r: int = 256
    target_modules: list[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    # HF PEFT passes this to get_peft_model, not to the config: it is never written to adapter_config.json
    autocast_adapter_dtype: bool = field(default=True, metadata={"local": True})
    # set by prepare_config for the model the adapter is added to; never written
    projections: SharedProjections | None = field(default=None, repr=False, compare=False, metadata={"local": True})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise PeftConfigError(f"r must be a positive integer, got {self.r!r}; use e.g. r=256 (VeRA's default)")
        if not isinstance(self.projection_prng_key, int) or isinstance(self.projection_prng_key, bool):
            raise PeftConfigError(f"projection_prng_key must be an integer, got {self.projection_prng_key!r}")
        if not 0.0 <= self.vera_dropout < 1.0:
            raise PeftConfigError(f"vera_dropout must be in [0, 1), got {self.vera_dropout!r}")
        if self.bias not in ("none", "all", "vera_only"):
            raise PeftConfigError(f"bias must be 'none', 'all' or 'vera_only', got {self.bias!r}")
