"""(IA)³ (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning"): a learned vector l rescales a layer's activations, elementwise.

    y = l ⊙ (W x + b)          a target that is not feedforward (keys, values): the output, bias included
    y = W (l ⊙ x) + b          a feedforward target (``feedforward_modules``): the input

The paper (§3.3) places three vectors per block: softmax(Q (l_k ⊙ Kᵀ) / √d_k) (l_v ⊙ V) in attention and
(l_ff ⊙ γ(W_1 x)) W_2 in the FFN, i.e. keys and values as outputs and the FFN's down projection as a
feedforward (input-side) target. HF PEFT's default table below is kept for ``IA3Config()`` (files must mean
the same in both libraries) although for BERT-style models its "output.dense" suffix also hits
``attention.output.dense``; ``peftkit train``'s ``ia3`` preset uses the paper's three (train/methods.py).

Several active adapters multiply: l = l_1 ⊙ l_2 ⊙ ... . Merging is exact: W's rows (output side) or columns
(input side) are multiplied by l, and so is the bias of a non-feedforward target; unmerging divides.

Shapes of ``ia3_l`` (HF PEFT's, so files interoperate): Linear and GPT-2 Conv1D (d_in -> d_out) (d_out, 1),
or (1, d_in) when feedforward; Conv2d/Conv3d (1, C, 1, 1[, 1]) with C = out_channels, or in_channels when
feedforward. Initialised to ones (a fresh adapter is the base model); ``init_ia3_weights=False``: N(0, 1).
Defaults by ``model.config.model_type`` when ``target_modules`` / ``feedforward_modules`` are None (HF PEFT's
table, e.g. llama: k_proj, v_proj, down_proj with down_proj feedforward). A module is feedforward by HF
PEFT's rule: ``re.fullmatch`` for a regex, else its name ends with an entry (no "." boundary).

Unmerge and zeros: where some |l| < 1e-8, W·l / l no longer gives W back (a zero scale erases a row), so
merging such an adapter keeps a copy of the layer's pre-merge weight and bias and unmerge restores it exactly
(memory: one weight copy per such layer, only while merged). Elsewhere unmerge divides, to rounding.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn as nn

from .. import patterns
from ..configs.ia3 import IA3Config
from ..errors import PeftConfigError, PeftError, TargetModulesError
from ..quantize import dequantize_for_merge, restore_after_unmerge
from ..targeting import describe_candidates, find_targets, is_conv1d
from ..targeting import model_type as family
from .base import AdapterLayer, MethodSpec, adapter_layers, register_method

NEAR_ZERO = 1e-8  # |l| below this: merge keeps the original weight so that unmerge is exact

# HF PEFT's default (target_modules, feedforward_modules) by model_type, as space-separated names
_FAMILIES: list[tuple[tuple[str, ...], str, str]] = [
    (("llama", "mistral"), "k_proj v_proj down_proj", "down_proj"),
    (("llama4", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"), "q_proj v_proj down_proj", "down_proj"),
    (("mixtral",), "k_proj v_proj w2", "w2"),
    (("gpt2", "gpt_bigcode"), "c_attn mlp.c_proj", "mlp.c_proj"),
    (("bert", "roberta"), "key value output.dense", "output.dense"),
    (("deberta-v2",), "key_proj value_proj output.dense", "output.dense"),
    (("deberta",), "in_proj output.dense", "output.dense"),
    (("t5",), "k v wo", "wo"),
    (("mt5",), "k v wi_1", ""),
    (("bart", "phi"), "q_proj v_proj fc2", "fc2"),
    (("opt",), "q_proj k_proj fc2", "fc2"),
    (("gptj",), "q_proj v_proj fc_out", "fc_out"),
    (("gpt_neo",), "q_proj v_proj c_proj", "c_proj"),
    (("gpt_neox", "falcon", "RefinedWeb", "RefinedWebModel"), "query_key_value dense_4h_to_h", "dense_4h_to_h"),
    (("bloom",), "query_key_value mlp.dense_4h_to_h", "mlp.dense_4h_to_h"),
]
DEFAULT_MODULES: dict[str, tuple[list[str], list[str]]] = {
    model_type: (targets.split(), feedforward.split()) for types, targets, feedforward in _FAMILIES for model_type in types
}


def is_feedforward_module(feedforward_modules: list[str] | str | None, module_name: str) -> bool:
    """HF PEFT's rule: a regex must match the whole name; a list entry must end it (plain suffix)."""
    if isinstance(feedforward_modules, str):
        return patterns.fullmatch(feedforward_modules, module_name, "feedforward_modules") is not None
    return any(module_name.endswith(f) for f in feedforward_modules or [])


# ---- the config: IA3Config lives in peftkit.configs.ia3 (torch-free: reading a file needs no tensors) ----


def prepare_ia3_config(model: nn.Module, config: IA3Config) -> IA3Config:
    """Fill target_modules / feedforward_modules from the model_type table. A default feedforward list keeps
    only the names in target_modules (HF PEFT keeps all, and then cannot load the file it wrote)."""
    model_type = family(model)
    targets, feedforward = DEFAULT_MODULES.get(model_type, (None, []))
    changes: dict[str, Any] = {}
    if config.target_modules is None:
        if targets is None:
            raise TargetModulesError(
                f"IA3 has no default target_modules for model_type {model_type!r}; set target_modules (and "
                f"feedforward_modules) to some of: {describe_candidates(model)}"
            )
        changes["target_modules"] = list(targets)
    if config.feedforward_modules is None:
        chosen = changes.get("target_modules", config.target_modules)
        changes["feedforward_modules"] = [f for f in feedforward if not isinstance(chosen, list) or f in chosen]
    config = config.copy(**changes) if changes else config
    # a layer scales its input or its output for all its adapters: refuse a mismatch before any change
    layers = {name: layer for name, layer in adapter_layers(model) if isinstance(layer, IA3Layer)}
    for name in find_targets(model, config) if layers else []:
        layer = layers.get(name)
        if layer is not None and is_feedforward_module(config.feedforward_modules, name) != layer.is_feedforward:
            raise PeftConfigError(
                f"module {name!r} is {'' if layer.is_feedforward else 'not '}feedforward for its adapter(s) "
                f"{layer.adapter_names} but not so in this config; use the same feedforward_modules for all adapters"
            )
    return config


# ---- the layer -------------------------------------------------------------------------------------
class IA3Layer(AdapterLayer):
    """(IA)³ on ``nn.Linear``, GPT-2's ``Conv1D`` (weight (d_in, d_out)) and ``nn.Conv2d`` / ``nn.Conv3d``."""

    ADAPTER_ATTRS = ("ia3_l",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward: bool | None = None  # fixed by the first adapter (HF PEFT's rule)
        base_layer = self.get_base_layer()
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.is_conv = isinstance(base_layer, nn.Conv2d | nn.Conv3d)
        w = base_layer.weight
        if self.is_conv:
            self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        else:
            self.in_features, self.out_features = (w.shape[0], w.shape[1]) if self.fan_in_fan_out else (w.shape[1], w.shape[0])
        self._unmerged_copy: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def update_layer(self, adapter_name: str, config: IA3Config, module_name: str) -> None:
        if not self.is_conv and config.fan_in_fan_out != self.fan_in_fan_out:
            warnings.warn(
                f"fan_in_fan_out={config.fan_in_fan_out} does not fit {type(self.get_base_layer()).__name__} targets "
                f"(Conv1D stores its weight transposed, Linear does not); using {self.fan_in_fan_out}", stacklevel=4,
            )
        if self.is_feedforward is None:
            self.is_feedforward = is_feedforward_module(config.feedforward_modules, module_name)
        n = self.in_features if self.is_feedforward else self.out_features
        if self.is_conv:
            shape = (1, n, *[1] * (self.base_layer.weight.dim() - 2))
        else:
            shape = (1, n) if self.is_feedforward else (n, 1)
        dtype = self.base_layer.weight.dtype
        if not dtype.is_floating_point or (config.autocast_adapter_dtype and dtype in (torch.float16, torch.bfloat16)):
            dtype = torch.float32
        l = torch.randn(shape, device=self.base_layer.weight.device, dtype=dtype)  # noqa: E741 (the paper's name)
        self.ia3_l[adapter_name] = nn.Parameter(l.fill_(1.0) if config.init_ia3_weights else l)

    # ---- the maths -------------------------------------------------------------------------------
    def _channel_view(self, scale: torch.Tensor, ndim: int) -> torch.Tensor:
        """A (features,) or per-row (batch, features) scale, shaped to broadcast over an activation."""
        shape = [1] * ndim
        shape[1 if self.is_conv else ndim - 1] = scale.shape[-1]
        if scale.dim() == 2:
            shape[0] = scale.shape[0]
        return scale.reshape(shape)

    def _weight_scale(self, v: torch.Tensor) -> torch.Tensor:
        """The vector l shaped to multiply ``base_layer.weight`` (its output rows, or its input columns)."""
        w = self.base_layer.weight
        groups = getattr(self.get_base_layer(), "groups", 1)
        if self.is_feedforward and groups > 1:  # input channel j of group g feeds that group's outputs only
            v = v.reshape(groups, 1, -1).expand(groups, self.out_features // groups, -1).reshape(w.shape[:2])
            return v.reshape(*w.shape[:2], *[1] * (w.dim() - 2))
        shape = [1] * w.dim()
        shape[int(self.is_feedforward) ^ int(self.fan_in_fan_out)] = -1  # out dim 0, in dim 1 (swapped for Conv1D)
        return v.reshape(shape)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """W ⊙ l − W: the change merging this adapter alone makes to the current weight (bias aside)."""
        w = self.base_layer.weight.float()
        return w * self._weight_scale(self.ia3_l[adapter_name].detach().float().flatten()) - w

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.adapters_off():
            return self.base_layer(x, *args, **kwargs)
        if self.row_adapters is not None:
            scale = self._per_row(x)
        else:
            vectors = [self.ia3_l[n].flatten() for n in self.active_adapters if n in self.ia3_l]
            if not vectors:
                return self.base_layer(x, *args, **kwargs)
            scale = math.prod(vectors[1:], start=vectors[0])
        if self.is_feedforward:
            x = (x.to(scale.dtype) * self._channel_view(scale, x.dim())).to(x.dtype)
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result * self._channel_view(scale, result.dim())).to(result.dtype)

    def _per_row(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, features): each row's l, gathered from the adapters' stacked vectors (ones for base rows)."""
        rows = self.row_adapters
        index = rows.for_batch(x.shape[0], x.device)
        some = next(iter(self.ia3_l.values()))  # a layer always holds at least one adapter
        ones = torch.ones(some.numel(), dtype=some.dtype, device=some.device)
        table = torch.stack([self.ia3_l[n].flatten() if n in self.ia3_l else ones for n in rows.names] + [ones])
        return table[torch.where(index < 0, len(rows.names), index)]

    # ---- merging: multiply, divide ---------------------------------------------------------------
    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        names = [a for a in (adapter_names or self.active_adapters) if a in self.ia3_l]
        if names:
            dequantize_for_merge(self)  # a quantised base weight becomes a dense copy while merged
        base = self.base_layer
        bias = None if self.is_feedforward else getattr(base, "bias", None)
        for name in names:
            if name in self.merged_adapters:
                continue
            v = self.ia3_l[name].detach().float().flatten()
            weight = base.weight.float() * self._weight_scale(v)
            new_bias = bias.float() * v if bias is not None else None
            if safe_merge and not (torch.isfinite(weight).all() and (new_bias is None or torch.isfinite(new_bias).all())):
                raise PeftError(
                    f"merging adapter {name!r} into {type(base).__name__} gives NaN/inf weights; the adapter is "
                    "broken (check its training) — nothing was changed"
                )
            if (v.abs() < NEAR_ZERO).any():  # W·l/l would not give W back: keep the original to restore
                self._unmerged_copy[name] = (base.weight.clone(), None if bias is None else bias.clone())
            base.weight.copy_(weight.to(base.weight.dtype))
            if new_bias is not None:
                bias.copy_(new_bias.to(bias.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        base = self.base_layer
        bias = None if self.is_feedforward else getattr(base, "bias", None)
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self._unmerged_copy:
                weight, old_bias = self._unmerged_copy.pop(name)
                base.weight.copy_(weight)
                if bias is not None:
                    bias.copy_(old_bias)
                continue
            v = self.ia3_l[name].detach().float().flatten()
            base.weight.copy_((base.weight.float() / self._weight_scale(v)).to(base.weight.dtype))
            if bias is not None:
                bias.copy_((bias.float() / v).to(bias.dtype))
        restore_after_unmerge(self)


def ia3_layer_for(module: nn.Module) -> type[IA3Layer] | None:
    if isinstance(module, nn.Linear | nn.Conv2d | nn.Conv3d) or is_conv1d(module):
        return IA3Layer
    return None


IA3 = register_method(MethodSpec(
    config_cls=IA3Config, layer_base=IA3Layer, layer_for=ia3_layer_for,
    supported="Linear, transformers Conv1D, Conv2d, Conv3d", prepare_config=prepare_ia3_config,
))
