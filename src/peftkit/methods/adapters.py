"""Bottleneck adapters: Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", and
Pfeiffer et al. 2020, "AdapterFusion: Non-Destructive Task Composition for Transfer Learning".

An adapter wraps a sub-layer's output projection (a Linear or GPT-2 Conv1D with d outputs) and acts on
its output h, before the model adds the residual and normalises:

    h ← h + s · (W_up f(W_down dropout(h) + b_down) + b_up)

W_down is (m, d), b_down (m,), W_up (d, m), b_up (d,): 2·d·m + d + m trainable parameters per target,
m = bottleneck_size or max(1, d // reduction_factor). f ∈ {relu, gelu, swish, tanh}. W_down keeps
nn.Linear's Kaiming-uniform init; b_down, W_up and b_up start at zero, so a fresh adapter is exactly the
base. Placement: "houlsby" wraps the attention output and the feed-forward output projections (and trains
the layer norms, as the paper does); "pfeiffer" — the default, AdapterHub's too — only the feed-forward
output: half the parameters, on par in Pfeiffer et al.'s experiments. ``target_modules`` overrides it.

Default targets come from a small table of module-name patterns by ``model.config.model_type``; the
filled config lists the full module names, so ``adapter_config.json`` records exactly what was wrapped.
Trained layer norms are a per-adapter copy (modules_to_save), saved with the adapter and switched with it.
Several active adapters run in sequence, in ``set_adapter`` order (AdapterHub's Stack, e.g. a language
adapter then a task adapter); with ``adapter_names`` each row uses one adapter (gathered batched matmuls).
Non-linear, so never merged. Adapter weights are fp32 on a bf16/fp16 base (``autocast_adapter_dtype``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import PeftConfig
from ..errors import PeftConfigError, PeftError, TargetModulesError
from ..targeting import candidate_modules, describe_candidates, is_conv1d, is_linear_like, layer_index
from ..targeting import model_type as family
from .base import AdapterLayer, MethodSpec, ModulesToSaveWrapper, register_method

NON_LINEARITIES = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu, "tanh": torch.tanh}
PLACEMENTS = ("houlsby", "pfeiffer")

# model_type -> (attention output, feed-forward output): regexes for the end of a module's name
_DECODER = (r"self_attn\.o_proj", r"mlp\.down_proj")
_BERT = (r"attention\.output\.dense", r"layer\.\d+\.output\.dense")  # FFN output: layer.N.output.dense
DEFAULT_TARGETS: dict[str, tuple[str, str]] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"), _DECODER),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra"), _BERT),
    "gpt2": (r"attn\.c_proj", r"mlp\.c_proj"),
    "distilbert": (r"attention\.out_lin", r"ffn\.lin2"),
    # T5: encoder and decoder self-attention; cross-attention (EncDecAttention.o) is left out, as AdapterHub
    **dict.fromkeys(("t5", "mt5"), (r"SelfAttention\.o", r"DenseReluDense\.wo")),
}


# ---- the maths, as pure functions ------------------------------------------------------------------
def bottleneck_size(d: int, reduction_factor: float, size: int | None = None) -> int:
    """m = size, or d // reduction_factor (at least 1)."""
    return size if size is not None else max(1, int(d // reduction_factor))


def bottleneck_delta(h: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor, w_up: torch.Tensor,
                     b_up: torch.Tensor, non_linearity: str, scaling: float) -> torch.Tensor:
    """s · (W_up f(W_down h + b_down) + b_up), for h of shape (..., d)."""
    return scaling * F.linear(NON_LINEARITIES[non_linearity](F.linear(h, w_down, b_down)), w_up, b_up)


# ---- the config ----------------------------------------------------------------------------------
@dataclass
class BottleneckConfig(PeftConfig):
    """Bottleneck adapters after the attention and/or feed-forward output projections (see module doc)."""

    PEFT_TYPE: ClassVar[str] = "BOTTLENECK"

    placement: str = "pfeiffer"
    reduction_factor: float = 16
    bottleneck_size: int | None = None
    non_linearity: str = "relu"
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
        if self.non_linearity not in NON_LINEARITIES:
            raise PeftConfigError(
                f"non_linearity must be one of {sorted(NON_LINEARITIES)}, got {self.non_linearity!r}"
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


def _in_layers(config: BottleneckConfig, name: str) -> bool:
    """layers_to_transform / layers_pattern, HF PEFT's rule (modules outside numbered layers are left out)."""
    wanted = config.layers_to_transform
    if wanted is None or wanted == []:
        return True
    index = layer_index(name, config.layers_pattern)
    return index is not None and (index == wanted if isinstance(wanted, int) else index in wanted)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def prepare_bottleneck_config(model: nn.Module, config: BottleneckConfig) -> BottleneckConfig:
    """Fill target_modules from the placement table and add the layer norms to modules_to_save."""
    modules = candidate_modules(model)
    changes: dict[str, Any] = {}
    if config.target_modules is None:
        model_type = family(model)
        if model_type not in DEFAULT_TARGETS:
            raise TargetModulesError(
                f"bottleneck adapters have no default placement for model_type {model_type!r} (known: "
                f"{', '.join(sorted(DEFAULT_TARGETS))}); set target_modules to the attention / feed-forward "
                f"output projections, among: {describe_candidates(model)}"
            )
        attention, ffn = DEFAULT_TARGETS[model_type]
        wanted = ffn if config.placement == "pfeiffer" else f"{attention}|{ffn}"
        pattern = re.compile(rf"(?:.*\.)?(?:{wanted})")
        names = [
            n for n, m in modules
            if pattern.fullmatch(n) and _in_layers(config, n)
            and is_linear_like(m.get_base_layer() if isinstance(m, AdapterLayer) else m)
        ]
        if not names:
            raise TargetModulesError(
                f"no {config.placement} placement found in this {model_type} model (layers_to_transform="
                f"{config.layers_to_transform!r}); set target_modules, among: {describe_candidates(model)}"
            )
        changes["target_modules"] = names
    norms = config.placement == "houlsby" if config.train_layer_norms is None else config.train_layer_norms
    changes["train_layer_norms"] = norms
    if norms:
        found = [n for n, m in modules if _in_layers(config, n)
                 and _is_norm(m.original_module if isinstance(m, ModulesToSaveWrapper) else m)]
        changes["modules_to_save"] = list(dict.fromkeys([*(config.modules_to_save or []), *found]))
    return config.copy(**changes)


# ---- the layer -------------------------------------------------------------------------------------
class BottleneckLayer(AdapterLayer):
    """Bottleneck adapters on the output of an ``nn.Linear`` or GPT-2 ``Conv1D`` (d = its output features)."""

    ADAPTER_ATTRS = ("adapter_down", "adapter_up")
    MERGEABLE = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        w = self.get_base_layer().weight
        self.features = w.shape[1] if is_conv1d(self.get_base_layer()) else w.shape[0]
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.non_linearity: dict[str, str] = {}



    def update_layer(self, adapter_name: str, config: BottleneckConfig, module_name: str) -> None:
        d = self.features
        m = bottleneck_size(d, config.reduction_factor, config.bottleneck_size)
        dtype = self.base_layer.weight.dtype
        if not dtype.is_floating_point or (config.autocast_adapter_dtype and dtype.itemsize < 4):
            dtype = torch.float32  # fp32 adapters on a bf16/fp16 base
        kw = {"device": self.base_layer.weight.device, "dtype": dtype}
        down, up = nn.Linear(d, m, **kw), nn.Linear(m, d, **kw)  # down keeps Kaiming-uniform(a=sqrt(5))
        for p in (down.bias, up.weight, up.bias):
            nn.init.zeros_(p)
        self.adapter_down[adapter_name] = down
        self.adapter_up[adapter_name] = up
        self.adapter_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.scaling[adapter_name] = config.scaling
        self.non_linearity[adapter_name] = config.non_linearity

    def _forget(self, adapter_name: str) -> None:
        self.scaling.pop(adapter_name, None)
        self.non_linearity.pop(adapter_name, None)
        if adapter_name in self.adapter_dropout:
            del self.adapter_dropout[adapter_name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        h = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return h
        if self.row_adapters is not None:
            return h + self._per_row(h).to(h.dtype)
        for name in self.active_adapters:  # in sequence (Stack): each adapter reads the previous one's output
            down, up = self.adapter_down[name], self.adapter_up[name]
            z = self.adapter_dropout[name](h.to(down.weight.dtype))
            delta = bottleneck_delta(z, down.weight, down.bias, up.weight, up.bias,
                                     self.non_linearity[name], self.scaling[name])
            h = h + delta.to(h.dtype)
        return h

    def _per_row(self, h: torch.Tensor) -> torch.Tensor:
        """Each row through its own adapter: the adapters' weights stacked (zero-padded to the largest m; the
        last slot, all zeros, serves base rows), gathered per row, two batched matmuls. f(0) = 0 for every
        non-linearity, so the padding is exact."""
        rows = self.row_adapters
        index = rows.for_batch(h.shape[0], h.device)
        held = [n for n in rows.names if n in self.scaling]
        if self.training and any(not isinstance(self.adapter_dropout[n], nn.Identity) for n in held):
            raise PeftError("adapters mixed per row run without dropout: call model.eval() first")
        some = self.adapter_down[next(iter(self.scaling))].weight  # a layer always holds an adapter
        d, k = self.features, len(rows.names) + 1
        m_max = max((self.adapter_down[n].out_features for n in held), default=1)
        w_down, b_down = some.new_zeros(k, m_max, d), some.new_zeros(k, m_max)
        w_up, b_up = some.new_zeros(k, d, m_max), some.new_zeros(k, d)
        acts = sorted({self.non_linearity[n] for n in held}) or ["relu"]
        act_of = torch.zeros(k, dtype=torch.long)
        for i, name in enumerate(rows.names):
            if name in self.scaling:
                down, up, s = self.adapter_down[name], self.adapter_up[name], self.scaling[name]
                m = down.out_features
                w_down[i, :m], b_down[i, :m] = down.weight, down.bias
                w_up[i, :, :m], b_up[i] = up.weight * s, up.bias * s
                act_of[i] = acts.index(self.non_linearity[name])
        pick = torch.where(index < 0, k - 1, index)
        hb = h.reshape(h.shape[0], -1, d).to(some.dtype)
        z = torch.baddbmm(b_down[pick].unsqueeze(1), hb, w_down[pick].transpose(1, 2))
        a = NON_LINEARITIES[acts[0]](z)
        row_act = act_of.to(h.device)[pick][:, None, None]
        for j, act in enumerate(acts[1:], start=1):  # at most one pass per distinct non-linearity
            a = torch.where(row_act == j, NON_LINEARITIES[act](z), a)
        out = torch.baddbmm(b_up[pick].unsqueeze(1), a, w_up[pick].transpose(1, 2))
        return out.reshape(h.shape)

    def extra_repr(self) -> str:
        sizes = {n: self.adapter_down[n].out_features for n in self.adapter_down}
        return f"features={self.features}, bottleneck={sizes}, active={self.active_adapters}"


def bottleneck_layer_for(module: nn.Module) -> type[BottleneckLayer] | None:
    return BottleneckLayer if is_linear_like(module) else None


BOTTLENECK = register_method(MethodSpec(
    config_cls=BottleneckConfig, layer_base=BottleneckLayer, layer_for=bottleneck_layer_for,
    supported="Linear, transformers Conv1D", prepare_config=prepare_bottleneck_config,
))
