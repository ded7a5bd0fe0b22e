"""Methods by the short names that ``peftkit train``, ``demo`` and ``compare`` use.

One row per name: the config class, the options it fixes (``dora`` is LoRA with ``use_dora=True``), the
defaults the trainer fills in when the YAML leaves them out, and the learning rate its paper recommends
for the setting closest to ours (used when ``training.lr`` is not given; ``peftkit compare`` uses it too).
Two baselines have no config: ``full`` (every weight trains) and ``head`` (only the classifier trains).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from ..config import PeftConfig


@dataclass(frozen=True)
class RunContext:
    """What a preset may read about the run besides the model."""

    task: str
    total_steps: int | None = None
    """The run's optimizer steps (None: unknown)."""
    tokenizer: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    """The run's own options (they override whatever the preset returns)."""


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
    quantization: dict[str, Any] | None = None
    """A frozen quantised base this method implies (QLoRA), unless the run's ``quantization:`` says otherwise."""
    configure: Callable[[nn.Module, RunContext], dict[str, Any]] | None = None
    """Defaults that depend on the model or the run (its length, tokenizer); the run's options win."""

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
        if self.quantization is not None:
            import importlib.util

            import peftkit

            return hasattr(peftkit, "quantize_base") and importlib.util.find_spec("torchao") is not None
        return True

    def option_names(self) -> set[str]:
        cls = self.config_class()
        if cls is None:
            return set()
        return {f.name for f in dataclasses.fields(cls)} - set(self.fixed) - {"task_type"}

    def make_config(self, task: str, options: dict[str, Any], model: nn.Module, total_steps: int | None = None,
                    tokenizer: Any = None) -> PeftConfig | None:
        cls = self.config_class()
        if cls is None:
            return None
        kwargs = dict(self.defaults)
        if self.configure is not None:
            kwargs.update(self.configure(model, RunContext(task, total_steps, tokenizer, dict(options))))
        kwargs.update(options)
        kwargs.update(self.fixed)
        kwargs["task_type"] = "SEQ_CLS" if task == "classification" else "CAUSAL_LM"
        return cls(**kwargs)


_LORA_DEFAULTS = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}

PREFIX_INIT_TEXT = "Read the following text and continue it in the same style."
"""Li & Liang start the prefix from the activations of real words (task words such as "summarize"); the
preset's causal-LM prefix starts from the frozen model's own keys and values for this neutral instruction."""


def _prefix_configure(model: nn.Module, run: RunContext) -> dict[str, Any]:
    """The run's tokenizer for ``prefix_init_text``, and the preset's start (the run's own start wins): on a
    causal LM the keys and values of real words (Li & Liang); on an encoder zero keys and values, because real
    words measurably hurt there. On MiniLM (mean-pooled sentence embeddings of 4 news sentences) the untrained
    prefix of "Classify the following text." left cosine 0.61-0.79 to the bare encoder's, zero keys/values
    0.83-0.93; compare's 25-step BBC News run reached accuracy 0.23 (one class) from those words at 3e-3 and
    0.9167 from zero."""
    tokenizer = {} if run.tokenizer is None else {"tokenizer": run.tokenizer}
    if run.options.get("init_weights") is not None or run.options.get("inference_mode") or run.options.get(
            "prefix_init_text") is not None:
        return tokenizer
    if run.task != "causal_lm":
        return {**tokenizer, "init_weights": "zero"}
    return {**tokenizer, "prefix_init_text": PREFIX_INIT_TEXT} if tokenizer else {}

DELTA_LORA_PAPER_START, DELTA_LORA_PAPER_STEPS = 500, 26_290
"""Zi et al. 2023 start Delta-LoRA's W update after K = 500 steps (with λ = 2) in runs that follow LoRA's E2E
setting (GPT-2, 5 epochs of 42,061 examples at batch 8: 26,290 optimizer steps), i.e. after ~1.9% of the run."""


def delta_lora_start(total_steps: int | None) -> int:
    """The paper's K = 500, scaled to the run where it is shorter than the paper's ~26k steps (K/T kept)."""
    if total_steps is None or total_steps >= DELTA_LORA_PAPER_STEPS:
        return DELTA_LORA_PAPER_START
    return round(DELTA_LORA_PAPER_START * total_steps / DELTA_LORA_PAPER_STEPS)


def _delta_lora_configure(model: nn.Module, run: RunContext) -> dict[str, Any]:
    return {"update_start": delta_lora_start(run.total_steps)}


# IA3's paper form (Liu et al. 2022, §3.3: l_k, l_v in every attention, l_ff on the FFN's intermediate
# activation) where HF PEFT's default table differs: BERT-style "output.dense" also matches the attention's
# output projection (an extra vector the paper has not), and some families target q_proj instead of k_proj.
_BERT_IA3 = {"target_modules": r".*\.attention\.self\.(key|value)|.*\.layer\.\d+\.output\.dense",
             "feedforward_modules": r".*\.layer\.\d+\.output\.dense"}
_IA3_PAPER_TARGETS: dict[str, dict[str, Any]] = {
    "bert": _BERT_IA3, "roberta": _BERT_IA3,
    **{family: {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}
       for family in ("llama4", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")},
}


def _ia3_configure(model: nn.Module, run: RunContext) -> dict[str, Any]:
    """The paper's targets, unless the run names its own (then HF PEFT's feedforward rule applies to them)."""
    from ..targeting import model_type

    if {"target_modules", "feedforward_modules"} & set(run.options):
        return {}
    return dict(_IA3_PAPER_TARGETS.get(model_type(model) or "", {}))

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
    MethodEntry("delta_lora", "DeltaLoraConfig", defaults={**_LORA_DEFAULTS, "delta_lambda": 2.0}, lr=5e-4,
                delta_lora=True, configure=_delta_lora_configure,
                source="Zi et al. 2023 (LoRA's rate; λ = 2, K = 500 scaled to the run's length)",
                description="LoRA whose product also moves W"),
    MethodEntry("qlora", "LoraConfig", defaults=_LORA_DEFAULTS, lr=5e-4, quantization={"method": "nf4"},
                source="Dettmers et al. 2023 (LoRA's rate on an NF4 base)",
                description="LoRA on a frozen 4-bit NormalFloat base"),
    MethodEntry("vera", "VeraConfig", defaults={"r": 256}, lr=4e-3,
                source="Kopiczko et al. 2024 (RoBERTa-base GLUE: 4e-3 to 1e-2)", description="shared frozen A, B; trains d, b"),
    MethodEntry("houlsby", "BottleneckConfig", fixed={"placement": "houlsby"}, lr=1e-3,
                source="Houlsby et al. 2019 (1e-4 to 1e-3)", description="bottleneck adapters after attention and FFN"),
    MethodEntry("pfeiffer", "BottleneckConfig", fixed={"placement": "pfeiffer"}, lr=1e-3,
                source="Pfeiffer et al. 2021 (1e-4 to 1e-3)", description="bottleneck adapter after the FFN"),
    MethodEntry("bitfit", "BitFitConfig", lr=1e-3, source="Ben Zaken et al. 2022 (1e-4 to 1e-3)",
                description="only biases train"),
    MethodEntry("ia3", "IA3Config", lr=3e-3, configure=_ia3_configure, source="Liu et al. 2022 (T-Few: 3e-3)",
                description="learned rescaling of keys, values and FFN activations"),
    MethodEntry("prompt", "PromptTuningConfig", defaults={"num_virtual_tokens": 20}, lr=3e-2,
                source="Lester et al. 2021 (0.3 with Adafactor; 3e-2 with AdamW is common)",
                description="trained soft-prompt embeddings"),
    MethodEntry("p_tuning", "PromptEncoderConfig", defaults={"num_virtual_tokens": 20, "encoder_hidden_size": 128},
                lr=1e-3, source="Liu et al. 2021", description="prompt encoder producing virtual tokens"),
    MethodEntry("prefix", "PrefixTuningConfig", defaults={"num_virtual_tokens": 20, "prefix_projection": True},
                lr=5e-5, configure=_prefix_configure,
                source="Li & Liang 2021 (5e-5 to 8e-5, with the MLP reparametrisation)",
                description="trained key/value prefixes in every layer (MLP-reparametrised, from real words)"),
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
