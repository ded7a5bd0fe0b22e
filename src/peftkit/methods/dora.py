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

Training (the fused path, :class:`DoraFunction`, without dropout): y = f ⊙ (result − b + s · h Bᵀ) + b with
f = m/n and h = x Aᵀ, in one autograd node that saves x (shared with the sibling targets), h and its own
output y. Backward needs Σ_tokens g ⊙ (base + s B h) for m, which is (y − b)/f: no base-sized tensor is kept
(the reference keeps two per target: the base output and B A x), and where the next op saves y anyway (v_proj
for attention, gate/up for the MLP) the output costs nothing extra. The norm comes from the identity
‖W_i + s B_i A‖² = ‖W_i‖² + 2s · B_i (A W_iᵀ) + s² · B_i (A Aᵀ) B_iᵀ (:func:`dora_weight_norm_lowrank`, ‖W_i‖²
cached while W is unchanged): no (d_out, d_in) temporary. fp32 adapters on a bf16/fp16 base (the default) fuse too:
x and y stay 16-bit, the rest is computed in fp32 from transient casts. Dropout in training, a zero in m or
adapter tensors of mixed dtypes take the reference path (``variant.forward``), as does
``lora_kernels.use_fused(False)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import PeftConfigError, PeftError
from ..quantize import base_weight, dense_weight
from .lora import LoraConfig, LoraLayer, LoraLinear, LoraVariant, lora_delta_weight, register_variant
from .lora_kernels import FUSED_VARIANTS, _base_matmul, adapter_weights, dropout_p, outer_grad


# ---- the maths, as pure functions ------------------------------------------------------------------
def _rows(factor: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """A per-output factor shaped to scale the weight: (d_out, 1), or (1, d_out) for Conv1D's (d_in, d_out)."""
    return factor.view(1, -1) if fan_in_fan_out else factor.view(-1, 1)


def dora_weight_norm(weight: torch.Tensor, delta: torch.Tensor, fan_in_fan_out: bool = False) -> torch.Tensor:
    """n = ‖W + ΔW‖ per output row, (d_out,). ``weight`` and ``delta`` in the base weight's layout."""
    full = weight + delta
    return torch.linalg.norm(full.T if fan_in_fan_out else full, dim=1)


def dora_weight_norm_lowrank(weight_sq: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                             scaling: float, fan_in_fan_out: bool = False) -> torch.Tensor:
    """n = ‖W + s B A‖ per output row without forming W + s B A: ‖W_i‖² + 2s · B_i (A W_iᵀ) + s² · B_i (A Aᵀ) B_iᵀ.

    ``weight_sq`` is ‖W_i‖² (d_out,); A (r, d_in), B (d_out, r); ``weight`` in the base layout. Costs two thin
    matmuls (r × d_in × d_out, r² × d_in). Loses digits where W + sBA nearly cancels W (see the caller)."""
    aw = A @ (weight if fan_in_fan_out else weight.T)  # (r, d_out): row i of W seen through A
    cross = (B * aw.T).sum(1)
    own = ((B @ (A @ A.T)) * B).sum(1)  # ‖B_i A‖²
    return (weight_sq + (2 * scaling) * cross + (scaling * scaling) * own).clamp_min(0).sqrt()


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
        self._weight_sq: tuple[tuple, torch.Tensor] | None = None  # ‖W_i‖² for the fused path, keyed by W
        self._norm: tuple[tuple, torch.Tensor] | None = None  # n without gradients, keyed by A, B, s and W

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

    def fast_weight_norm(self, layer: LoraLinear, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """:meth:`weight_norm` by the low-rank identity, ‖W_i‖² cached per base weight (identity and version).
        Rows where the result is under 1e-3 ‖W_i‖ (the adapter cancels W: the identity's digits are gone) fall
        back to the literal norm, and so do 16-bit weights (the identity's sum would keep ~3 digits)."""
        if weight.element_size() < 4:
            return self.weight_norm(layer, adapter_name, weight)
        with torch.no_grad():
            A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            source = layer.get_base_layer().weight
            key = (source.data_ptr(), source._version, weight.dtype, weight.device)
            if self._weight_sq is None or self._weight_sq[0] != key:
                self._weight_sq = (key, (weight * weight).sum(0 if layer.fan_in_fan_out else 1))
            weight_sq = self._weight_sq[1]
            norm = dora_weight_norm_lowrank(weight_sq, weight, A.to(weight.dtype), B.to(weight.dtype),
                                            layer.scaling[adapter_name], layer.fan_in_fan_out)
            if bool((norm * norm < 1e-6 * weight_sq).any()):
                return self.weight_norm(layer, adapter_name, weight)
            return norm

    def cached_weight_norm(self, layer: LoraLinear, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """:meth:`fast_weight_norm`, kept while A, B, s and the base weight stay the same tensors at the same
        versions (and ``weight``'s dtype and device): for calls without gradients (generation), where computing
        n again (A Wᵀ: r · d_in · d_out multiply-adds) cost more than the layer's own 16-row matmul."""
        if torch.compiler.is_compiling():  # storage addresses do not trace: computed in the graph
            return self.fast_weight_norm(layer, adapter_name, weight)
        A, B = adapter_weights(layer, adapter_name)
        source = layer.get_base_layer().weight
        key = (A.data_ptr(), A._version, B.data_ptr(), B._version, source.data_ptr(), source._version,
               layer.scaling[adapter_name], weight.dtype, weight.device)
        if self._norm is None or self._norm[0] != key:
            self._norm = (key, self.fast_weight_norm(layer, adapter_name, weight))
        return self._norm[1]

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


# ---- the fused training path ---------------------------------------------------------------------------
def dora_forward(x: torch.Tensor, result: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
                 A: torch.Tensor, B: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor, scaling: float,
                 fan_in_fan_out: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, f): :class:`DoraFunction`'s forward computation (its arguments), with h = x Aᵀ and f = m / n for its
    backward; called directly, without a node, when gradients are off."""
    d_in, d_out = A.shape[1], B.shape[0]
    x2 = x.reshape(-1, d_in)
    h = x2.to(A.dtype) @ A.T  # (tokens, r); x is cast transiently where the adapter is wider
    factor = magnitude / norm
    if result is None:
        y = _base_matmul(x2, weight if fan_in_fan_out else weight.T, None)
        y = y.to(A.dtype)  # a no-op in one dtype
    else:
        y = result.reshape(-1, d_out)
        if y.dtype != A.dtype:
            y = y.to(A.dtype)  # a new tensor: result is never written
            if bias is not None:
                y.sub_(bias)
        else:
            y = y - bias if bias is not None else y.clone()
    y.addmm_(h, B.T, alpha=scaling).mul_(factor)
    if bias is not None:
        y.add_(bias)
    out = y.to(x.dtype).view(*x.shape[:-1], d_out)
    return out, h, factor


class DoraFunction(torch.autograd.Function):
    """y = f ⊙ (base + s · h Bᵀ) + b in one node, f = m / n (n detached), h = x Aᵀ, base = x Wᵀ (``weight``
    given) or result − b (``result`` given: the running output, earlier adapters included, as HF PEFT).

    x (..., d_in); result (..., d_out) or None; weight (d_out, d_in) or (d_in, d_out) with ``fan_in_fan_out``,
    or None; bias (d_out,) or None; A (r, d_in); B (d_out, r); magnitude and norm (d_out,), m nowhere zero.
    Saves x, h, the parameters and y itself. Backward (g = ∂L/∂y, g_f = g ⊙ f):
    g_m = Σ g ⊙ (y − b) / m,  g_B = s · g_fᵀ h,  g_h = s · g_f B,  g_A = g_hᵀ x,
    g_x = g_f W + g_h A (weight given), g_result = g_f,  g_b = Σ g (weight given) or Σ g ⊙ (1 − f).

    x, result, weight and bias share one dtype; A, B, m and n another, which may be wider (fp32 adapters on a
    bf16 base, the default): then h, f and the sum f ⊙ (base + s · h Bᵀ) + b are computed in the adapter's dtype
    from transient casts and y is cast to x's, as the reference (HF PEFT) sums in the adapter's dtype and casts;
    x and y are kept as they are (16-bit), never as fp32 copies. g_m then reads y as stored: its rounding (one
    16-bit ulp per element, 2⁻⁹ relative) is the output's own."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, result: torch.Tensor | None, weight: torch.Tensor | None,
                bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor, magnitude: torch.Tensor,
                norm: torch.Tensor, scaling: float, fan_in_fan_out: bool) -> torch.Tensor:
        out, h, factor = dora_forward(x, result, weight, bias, A, B, magnitude, norm, scaling, fan_in_fan_out)
        need = ctx.needs_input_grad
        ctx.save_for_backward(x if need[4] else None, h, A, B, weight if need[0] else None, magnitude, factor,
                              bias, out)
        ctx.scaling, ctx.fan_in_fan_out, ctx.has_result = scaling, fan_in_fan_out, result is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, h, A, B, weight, magnitude, factor, bias, out = ctx.saved_tensors
        need = ctx.needs_input_grad
        s, d_out, x_dtype = ctx.scaling, B.shape[0], out.dtype
        g = grad_out.reshape(-1, d_out).to(A.dtype)  # g itself in one dtype
        g_f = g * factor
        grad_x = grad_result = grad_bias = grad_A = grad_B = grad_m = None
        if need[6]:  # Σ g ⊙ (y − b) / m, without a (tokens, d_out) copy of y − b
            g_y = torch.linalg.vecdot(g.T, out.reshape(-1, d_out).to(A.dtype).T)
            if bias is not None:
                g_y = g_y - bias.to(A.dtype) * g.sum(0)
            grad_m = g_y / magnitude
        if need[5]:
            grad_B = outer_grad(g_f, h, s)
        if need[0] or need[4]:
            grad_h = (g_f @ B).mul_(s)
            if need[4]:
                grad_A = grad_h.T @ x.reshape(-1, A.shape[1]).to(A.dtype)
            if need[0]:
                w = None if weight is None else (weight.T if ctx.fan_in_fan_out else weight)
                if x_dtype == A.dtype:
                    grad_x = grad_h @ A if w is None else _base_matmul(g_f, w, None).addmm_(grad_h, A)
                else:  # each term in its own dtype, summed in x's: as autograd does for the reference's casts
                    grad_x = (grad_h @ A).to(x_dtype)
                    if w is not None:
                        grad_x = _base_matmul(g_f.to(x_dtype), w, None).add_(grad_x)
                grad_x = grad_x.view(*grad_out.shape[:-1], A.shape[1])
        if ctx.has_result and need[1]:
            grad_result = g_f.to(x_dtype).view(grad_out.shape)
        if bias is not None and need[3]:
            grad_bias = (g.sum(0) if not ctx.has_result else (g * (1 - factor)).sum(0)).to(bias.dtype)
        return grad_x, grad_result, None, grad_bias, grad_A, grad_B, grad_m, None, None, None


def dora_fused_forward(layer: LoraLinear, adapter_name: str, x: torch.Tensor, result: torch.Tensor | None,
                       weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor | None:
    """One DoRA adapter through :class:`DoraFunction` (lora_kernels calls this), or None where the reference
    must run: dropout in training (its mask and W x̃ are the reference's), a zero in m (g_m divides by m),
    adapter tensors of different dtypes, or an adapter narrower than x (a bf16 adapter on an fp32 base).
    The norm is the reference's: of W in the adapter's dtype (a transient fp32 copy on a bf16 base)."""
    magnitude = layer.lora_magnitude_vector[adapter_name]
    A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
    if (dropout_p(layer, adapter_name) > 0 or not magnitude.dtype == A.dtype == B.dtype
            or not (magnitude.dtype == x.dtype or torch.finfo(magnitude.dtype).bits > torch.finfo(x.dtype).bits)
            or not bool(magnitude.ne(0).all())):
        return None
    if result is None:
        dense = weight
    else:
        base_layer = layer.get_base_layer()
        bias = getattr(base_layer, "bias", None)
        if bias is not None and bias.dtype != x.dtype:
            return None
        dense = base_layer.weight
    variant = layer.variant[adapter_name]
    if not torch.is_grad_enabled():  # no node to record; n kept from the last call while nothing changed
        norm = variant.cached_weight_norm(layer, adapter_name, dense_weight(dense, A.dtype))
        return dora_forward(x, result, weight, bias, A, B, magnitude, norm, layer.scaling[adapter_name],
                            layer.fan_in_fan_out)[0]
    norm = variant.fast_weight_norm(layer, adapter_name, dense_weight(dense, A.dtype))
    return DoraFunction.apply(x, result, weight, bias, A, B, magnitude, norm, layer.scaling[adapter_name],
                              layer.fan_in_fan_out)


FUSED_VARIANTS[DoraVariant] = dora_fused_forward
