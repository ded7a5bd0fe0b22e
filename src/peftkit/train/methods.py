"""Methods by the short names that ``peftkit train``, ``demo`` and ``compare`` use.

One row per name: the config class, the options it fixes (``dora`` is LoRA with ``use_dora=True``), the
defaults the trainer fills in when the YAML leaves them out, and the learning rate its paper recommends
for the setting closest to ours (used when ``training.lr`` is not given; ``peftkit compare`` uses it too).
Two baselines have no config: ``full`` (every weight trains) and ``head`` (only the classifier trains).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from ..config import PeftConfig


@dataclass(frozen=True)
class MethodEntry:
    name: str
    config_cls: str | None
    """Name of the config class exported by ``peftkit`` (None for the ``full`` / ``head`` baselines)."""
    fixed: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    lr: float = 2e-4
    """Recommended learning rate (paper, or the method's common practice; see ``source``)."""
    source: str = ""
    loraplus_lr_ratio: float | None = None
    delta_lora: bool = False
    tasks: tuple[str, ...] = ("classification", "causal_lm")
    description: str = ""

    def config_class(self) -> type[PeftConfig] | None:
        if self.config_cls is None:
            return None
        import peftkit

        cls = getattr(peftkit, self.config_cls, None)
        if cls is None:
            raise LookupError(f"peftkit has no {self.config_cls}")
        return cls

    def available(self) -> bool:
        try:
            self.config_class()
        except LookupError:
            return False
        return True

    def option_names(self) -> set[str]:
        cls = self.config_class()
        if cls is None:
            return set()
        return {f.name for f in dataclasses.fields(cls)} - set(self.fixed) - {"task_type"}

    def make_config(self, task: str, options: dict[str, Any], model: nn.Module) -> PeftConfig | None:
        cls = self.config_class()
        if cls is None:
            return None
        kwargs = dict(self.defaults)
        kwargs.update(options)
        kwargs.update(self.fixed)
        kwargs["task_type"] = "SEQ_CLS" if task == "classification" else "CAUSAL_LM"
        return cls(**kwargs)


_LORA_DEFAULTS = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}

_ENTRIES = [
    MethodEntry("full", None, lr=2e-5, source="common full fine-tuning rate for BERT / small LMs",
                description="every weight trains (the baseline PEFT is measured against)"),
    MethodEntry("head", None, lr=1e-3, tasks=("classification",), source="linear probe",
                description="frozen model, only the classification head trains"),
    MethodEntry("lora", "LoraConfig", defaults=_LORA_DEFAULTS, lr=5e-4,
                source="Hu et al. 2021 (RoBERTa-base GLUE: 4e-4 to 5e-4)", description="W + (alpha/r)·B·A"),
    MethodEntry("rslora", "LoraConfig", fixed={"use_rslora": True}, defaults=_LORA_DEFAULTS, lr=5e-4,
                source="Kalajdzievski 2023 (LoRA's rate, scale alpha/sqrt(r))", description="LoRA with alpha/sqrt(r)"),
    MethodEntry("dora", "LoraConfig", fixed={"use_dora": True}, defaults=_LORA_DEFAULTS, lr=5e-4,
                source="Liu et al. 2024 (LoRA's rate)", description="magnitude · direction of W + ΔW"),
    MethodEntry("lora_fa", "LoraFAConfig", defaults=_LORA_DEFAULTS, lr=5e-4,
                source="Zhang et al. 2023 (LoRA's rate)", description="LoRA with A frozen (less activation memory)"),
    MethodEntry("loraplus", "LoraConfig", defaults=_LORA_DEFAULTS, lr=2e-4, loraplus_lr_ratio=16.0,
                source="Hayou et al. 2024 (ratio 16)", description="LoRA with B's rate 16× A's"),
    MethodEntry("delta_lora", "DeltaLoraConfig", defaults={**_LORA_DEFAULTS, "update_start": 0}, lr=5e-4,
                delta_lora=True, source="Zi et al. 2023 (LoRA's rate)", description="LoRA whose product also moves W"),
    MethodEntry("vera", "VeraConfig", defaults={"r": 256}, lr=4e-3,
                source="Kopiczko et al. 2024 (RoBERTa-base GLUE: 4e-3 to 1e-2)", description="shared frozen A, B; trains d, b"),
    MethodEntry("houlsby", "BottleneckConfig", fixed={"placement": "houlsby"}, lr=1e-3,
                source="Houlsby et al. 2019 (1e-4 to 1e-3)", description="bottleneck adapters after attention and FFN"),
    MethodEntry("pfeiffer", "BottleneckConfig", fixed={"placement": "pfeiffer"}, lr=1e-3,
                source="Pfeiffer et al. 2021 (1e-4 to 1e-3)", description="bottleneck adapter after the FFN"),
    MethodEntry("bitfit", "BitFitConfig", lr=1e-3, source="Ben Zaken et al. 2022 (1e-4 to 1e-3)",
                description="only biases train"),
    MethodEntry("ia3", "IA3Config", lr=3e-3, source="Liu et al. 2022 (T-Few: 3e-3)",
                description="learned rescaling of keys, values and FFN activations"),
    MethodEntry("prompt", "PromptTuningConfig", defaults={"num_virtual_tokens": 20}, lr=3e-2,
                source="Lester et al. 2021 (0.3 with Adafactor; 3e-2 with AdamW is common)",
                description="trained soft-prompt embeddings"),
    MethodEntry("p_tuning", "PromptEncoderConfig", defaults={"num_virtual_tokens": 20, "encoder_hidden_size": 128},
                lr=1e-3, source="Liu et al. 2021", description="prompt encoder producing virtual tokens"),
    MethodEntry("prefix", "PrefixTuningConfig", defaults={"num_virtual_tokens": 20}, lr=1e-2,
                source="Li & Liang 2021 (5e-5 to 8e-5 with projection; 1e-2 without is common)",
                description="trained key/value prefixes in every layer"),
]

_ALL = {entry.name: entry for entry in _ENTRIES}


def _available() -> dict[str, MethodEntry]:
    return {name: entry for name, entry in _ALL.items() if entry.available()}


METHODS: dict[str, MethodEntry] = _available()
"""The methods this peftkit has, in table order."""


def method_entry(name: str) -> MethodEntry:
    from ..errors import PeftError

    if name not in METHODS:
        raise PeftError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]
