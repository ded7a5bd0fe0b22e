"""BitFit (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based
Masked Language-models") and HF PEFT's BEFT, which is BitFit restricted to Linear layers.

    y = f(x) + Δb            Δb: one vector per adapter, shape (1, d_out), initialised to zero

Only bias terms train. peftkit stores each adapter's *difference* from the base bias (HF PEFT's
``beft_bias`` key), so several BitFit adapters live on one model, switch, merge (b ← b + Δb) and unmerge
exactly. ``BitFitConfig`` targets every module that has a bias (Linear, Conv1D, LayerNorm, Conv2d) by
default — the paper's "all bias terms"; ``add_missing_biases=True`` also gives bias-free modules (Linear
and RMSNorm in the Llama family) a zero-initialised bias to tune. The task head trains through
``task_type="SEQ_CLS"`` / ``modules_to_save`` as in the paper. ``BeftConfig`` is HF PEFT's config (Linear
targets, default target_modules by model family) and reads and writes its files.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..config import PeftConfig
from ..configs.bitfit import BeftConfig, BitFitConfig
from ..errors import PeftConfigError, TargetModulesError
from ..targeting import candidate_modules, is_conv1d, is_excluded, output_head_names
from ..targeting import model_type as family
from .base import AdapterLayer, MethodSpec, register_method


def _out_features(module: nn.Module) -> int | None:
    """The size of the feature dimension a bias is added to, or None if this module type has no bias slot."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if is_conv1d(module):
        return module.weight.shape[1]
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return module.normalized_shape[0]
    if type(module).__name__.endswith("RMSNorm") and getattr(module, "weight", None) is not None:
        return module.weight.shape[-1]
    return None


def _has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), torch.Tensor)


# ---- the configs: BitFitConfig and BeftConfig live in peftkit.configs.bitfit (torch-free) ----


class BiasLayer(AdapterLayer):
    """Adds a learned bias delta to a module's output along its feature dimension (dim 1 for Conv2d)."""

    ADAPTER_ATTRS = ("beft_bias",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.out_features = _out_features(self.get_base_layer())
        self.feature_dim = 1 if isinstance(self.get_base_layer(), nn.Conv2d) else -1
        self.beft_bias = nn.ParameterDict()

    def update_layer(self, adapter_name: str, config: PeftConfig, module_name: str) -> None:
        ref = self.base_layer.weight if getattr(self.base_layer, "weight", None) is not None else None
        dtype = torch.float32 if ref is None or ref.dtype in (torch.float16, torch.bfloat16) else ref.dtype
        delta = torch.zeros(1, self.out_features, dtype=dtype, device=None if ref is None else ref.device)
        if not config.init_weights:
            nn.init.normal_(delta)
        self.beft_bias[adapter_name] = nn.Parameter(delta)

    def merge_blocker(self) -> str | None:
        if not _has_bias(self.base_layer):
            return f"{type(self.get_base_layer()).__name__} has no bias to merge into"
        return None

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        bias = self.base_layer.bias
        for name in [a for a in (adapter_names or self.active_adapters) if a in self.beft_bias]:
            if name not in self.merged_adapters:
                bias.data += self.beft_bias[name].detach().flatten().to(bias.dtype)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        bias = self.base_layer.bias
        while self.merged_adapters:
            bias.data -= self.beft_bias[self.merged_adapters.pop()].detach().flatten().to(bias.dtype)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        return self.beft_bias[adapter_name].detach().flatten()  # the change to the bias (for NaN checks)

    def _shaped(self, delta: torch.Tensor, ndim: int) -> torch.Tensor:
        """(rows or 1, d) → broadcastable onto an output with ``ndim`` dimensions."""
        if self.feature_dim == 1:  # (batch, C, H, W)
            return delta.reshape(delta.shape[0], -1, *([1] * (ndim - 2)))
        return delta.reshape(delta.shape[0], *([1] * (ndim - 2)), -1) if ndim > 1 else delta.flatten()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        off = self.adapters_off()
        result = self.base_layer(x, *args, **kwargs)
        if off:
            return result
        rows = self.row_adapters
        if rows is not None:  # gather each row's delta: one indexing op, no loop over adapters
            index = rows.for_batch(result.shape[0], result.device)
            some = next(iter(self.beft_bias.values()))
            stacked = some.new_zeros(len(rows.names) + 1, self.out_features)
            for i, name in enumerate(rows.names):
                if name in self.beft_bias:
                    stacked[i] = self.beft_bias[name].flatten()
            delta = stacked[torch.where(index < 0, len(rows.names), index)]
            return result + self._shaped(delta, result.ndim).to(result.dtype)
        for name in self.active_adapters:
            if name in self.beft_bias:
                result = result + self._shaped(self.beft_bias[name], result.ndim).to(result.dtype)
        return result


def bitfit_layer_for(module: nn.Module) -> type[BiasLayer] | None:
    return BiasLayer if _out_features(module) is not None else None


def beft_layer_for(module: nn.Module) -> type[BiasLayer] | None:
    return BiasLayer if isinstance(module, nn.Linear) else None


def prepare_bitfit(model: nn.Module, config: BitFitConfig) -> BitFitConfig:
    """target_modules None → the full names of every module with a bias (or a bias slot, if allowed)."""
    if config.target_modules is not None:
        return config
    heads = output_head_names(model, config.task_type)
    skip = set(config.modules_to_save or [])
    modules = [(n, m.get_base_layer() if isinstance(m, AdapterLayer) else m) for n, m in candidate_modules(model)]
    names = [
        name for name, m in modules
        if _out_features(m) is not None and name not in heads and not is_excluded(config, name)
        and name.rsplit(".", 1)[-1] not in skip
        and (_has_bias(m) or config.add_missing_biases)
    ]
    if not names:
        raise TargetModulesError(
            "this model has no bias terms to tune (Llama-style models have none); set add_missing_biases=True "
            "to give its Linear and norm layers a zero-initialised bias, or use another method"
        )
    return config.copy(target_modules=names)


def prepare_beft(model: nn.Module, config: BeftConfig) -> BeftConfig:
    if config.target_modules is not None:
        return config
    model_type = family(model)
    if model_type not in BeftConfig.DEFAULT_TARGETS:
        raise PeftConfigError(
            f"BEFT has no default target_modules for model type {model_type!r}; set target_modules, "
            "e.g. target_modules=['v_proj']"
        )
    return config.copy(target_modules=list(BeftConfig.DEFAULT_TARGETS[model_type]))


BITFIT = register_method(MethodSpec(
    config_cls=BitFitConfig, layer_base=BiasLayer, layer_for=bitfit_layer_for,
    supported="Linear, Conv1D, Conv2d, LayerNorm, *RMSNorm", prepare_config=prepare_bitfit,
))
BEFT = register_method(MethodSpec(
    config_cls=BeftConfig, layer_base=BiasLayer, layer_for=beft_layer_for, supported="Linear",
    prepare_config=prepare_beft,
))
