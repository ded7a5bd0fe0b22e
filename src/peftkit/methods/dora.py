"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"): ``LoraConfig(use_dora=True)``.

    W' = m · (W + ΔW) / ‖W + ΔW‖,      ΔW = s · B A

‖·‖ is the L2 norm of each output row of the (d_out, d_in) weight (the paper's column norm in its
(d_in, d_out) notation; HF PEFT's ``norm(dim=1)``). m (d_out,) is trainable and saved as
``<path>.lora_magnitude_vector``; it starts at ‖W + ΔW‖ (= ‖W‖ when B = 0, so a fresh adapter is the
base). The norm is a constant in backward (detached, paper §4.3), as in HF PEFT. The forward never
builds W' (HF PEFT's computation, matched exactly):

    y = result + (m/n − 1) · base + (m/n) · s · B A x̃,      n = ‖W + ΔW‖ (detached)

``result`` is the running output (base layer plus the adapters before this one). Without dropout (p = 0
or eval) x̃ = x and base = result − bias; with dropout in training x̃ = dropout(x) and base = W x̃.
Merge: W ← (m/n) (W + ΔW), n taken from the base weight with earlier merges undone; n is kept so that
unmerge inverts it exactly: W = W'· n/m − ΔW. DoRA runs on Linear and GPT-2 Conv1D targets.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import PeftConfigError, PeftError
from ..quantize import base_weight, dense_weight
from .lora import LoraConfig, LoraLayer, LoraLinear, LoraVariant, lora_delta_weight, register_variant


# ---- the maths, as pure functions ------------------------------------------------------------------
def _rows(factor: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """A per-output factor shaped to scale the weight: (d_out, 1), or (1, d_out) for Conv1D's (d_in, d_out)."""
    return factor.view(1, -1) if fan_in_fan_out else factor.view(-1, 1)


def dora_weight_norm(weight: torch.Tensor, delta: torch.Tensor, fan_in_fan_out: bool = False) -> torch.Tensor:
    """n = ‖W + ΔW‖ per output row, (d_out,). ``weight`` and ``delta`` in the base weight's layout."""
    full = weight + delta
    return torch.linalg.norm(full.T if fan_in_fan_out else full, dim=1)


def dora_merged_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor,
                       fan_in_fan_out: bool = False) -> torch.Tensor:
    """W' = m/n · (W + ΔW)."""
    return _rows(magnitude / norm, fan_in_fan_out) * (weight + delta)


def dora_unmerged_weight(merged: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor,
                         fan_in_fan_out: bool = False) -> torch.Tensor:
    """The inverse of :func:`dora_merged_weight`: W = W' / (m/n) − ΔW (n as it was at merge time)."""
    return merged / _rows(magnitude / norm, fan_in_fan_out) - delta


def dora_output(base: torch.Tensor, lora: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor,
                scaling: float) -> torch.Tensor:
    """What DoRA adds to the output: (m/n − 1) · W x̃ + (m/n) · s · B A x̃ (``lora`` is B A x̃)."""
    factor = magnitude / norm
    return (factor - 1) * base + factor * lora * scaling


# ---- the variant -----------------------------------------------------------------------------------
class DoraVariant(LoraVariant):
    """One DoRA adapter of a :class:`LoraLinear`: its magnitude lives in ``layer.lora_magnitude_vector``."""

    # adapter_names batching: lora_kernels.per_row_lora applies m / ‖W + ΔW‖ per row (no dropout there)

    def __init__(self) -> None:
        self.merge_norm: torch.Tensor | None = None  # n at merge time, for an exact unmerge

    def init(self, layer: LoraLayer, adapter_name: str, config: LoraConfig) -> None:
        if not isinstance(layer, LoraLinear):
            kind = type(layer.get_base_layer()).__name__
            layer.delete_adapter(adapter_name)
            raise PeftConfigError(
                f"use_dora=True supports Linear and Conv1D targets only, not {kind}; leave {kind} modules out of "
                "target_modules (or add them to exclude_modules)"
            )
        A = layer.lora_A[adapter_name].weight
        with torch.no_grad():
            norm = dora_weight_norm(base_weight(layer), layer.delta_weight(adapter_name), layer.fan_in_fan_out)
        layer.lora_magnitude_vector[adapter_name] = nn.Parameter(norm.to(A.dtype))

    def weight_norm(self, layer: LoraLinear, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """n = ‖W + s·B A‖ in ``weight``'s dtype, detached."""
        with torch.no_grad():
            A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            delta = lora_delta_weight(A.to(weight.dtype), B.to(weight.dtype), layer.scaling[adapter_name],
                                      layer.fan_in_fan_out)
            return dora_weight_norm(weight, delta, layer.fan_in_fan_out)

    def forward(self, layer: LoraLinear, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        A, B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        dropout = layer.lora_dropout[adapter_name]
        base_layer = layer.get_base_layer()
        x = x.to(A.weight.dtype)
        weight = dense_weight(base_layer.weight, x.dtype)  # dequantised if the base is quantised (QLoRA)
        norm = self.weight_norm(layer, adapter_name, weight)
        if isinstance(dropout, nn.Identity) or not layer.training:
            bias = getattr(base_layer, "bias", None)
            base = result if bias is None else result - bias
        else:  # the dropped-out input goes through W too, without the bias
            x = dropout(x)
            base = F.linear(x, weight.T if layer.fan_in_fan_out else weight)
        out = dora_output(base, B(A(x)), layer.lora_magnitude_vector[adapter_name], norm, layer.scaling[adapter_name])
        return (result + out).to(result.dtype)  # summed in the adapter dtype, as HF PEFT

    def merged_weight(self, layer: LoraLayer, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        delta = layer.delta_weight(adapter_name)
        base = weight  # the norm is the forward's: of the base weight, adapters merged before this one undone
        for name in reversed(layer.merged_adapters):
            base = layer.variant[name].unmerged_weight(layer, name, base)
        self.merge_norm = dora_weight_norm(base, delta, layer.fan_in_fan_out)
        magnitude = layer.lora_magnitude_vector[adapter_name].float()
        return dora_merged_weight(weight, delta, magnitude, self.merge_norm, layer.fan_in_fan_out)

    def unmerged_weight(self, layer: LoraLayer, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        if self.merge_norm is None:
            raise PeftError(f"DoRA adapter {adapter_name!r} is not merged; there is nothing to unmerge")
        magnitude = layer.lora_magnitude_vector[adapter_name].float()
        return dora_unmerged_weight(weight, layer.delta_weight(adapter_name), magnitude,
                                    self.merge_norm.to(weight.device), layer.fan_in_fan_out)


register_variant("dora", DoraVariant)
