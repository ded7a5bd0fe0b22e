"""(IA)³'s config (the maths, HF PEFT's default targets and the layer: :mod:`peftkit.methods.ia3`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..config import PeftConfig, register_config
from ..errors import PeftConfigError


@register_config
@dataclass
class IA3Config(PeftConfig):
    """HF PEFT's IA3Config fields and defaults (it has no option that peftkit lacks)."""

    PEFT_TYPE: ClassVar[str] = "IA3"
    UNSUPPORTED_KEYS: ClassVar[frozenset[str]] = frozenset()

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True
    # HF PEFT passes this to get_peft_model, not to the config: it is never written to adapter_config.json
    autocast_adapter_dtype: bool = field(default=True, metadata={"local": True})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            if isinstance(getattr(self, name), set | tuple | list):
                setattr(self, name, sorted(getattr(self, name)))
        if not isinstance(self.init_ia3_weights, bool):
            raise PeftConfigError(f"init_ia3_weights must be True or False, got {self.init_ia3_weights!r}")
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise PeftConfigError(
                    f"feedforward_modules {extra} are not in target_modules {self.target_modules}; feedforward "
                    "modules must be targeted too: add them to target_modules or drop them from feedforward_modules"
                )
