"""LoRA-FA (Zhang et al. 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models
Fine-tuning"): LoRA with A frozen at its random initialisation; only B trains.

    y = W x + s · B A dropout(x),      A (r, d_in) frozen,  B (d_out, r) trained,  s = lora_alpha / r

The point is activation memory. With A frozen, backward needs neither x nor the dropped copy of x:

    h      = A dropout(x)                                   (..., r)        saved: the only activation
    ∂L/∂B  = s · Σ_tokens (∂L/∂y)ᵀ h                        (d_out, r)
    ∂L/∂x  = dropout_backward(s · (∂L/∂y) B A)              (..., d_in)

so :class:`LoraFAFunction` keeps h (r numbers per token), A and B (parameters, no new memory) and, with
dropout, one integer seed from which backward regenerates the mask — no per-element storage at all.
Plain LoRA keeps x (d_in numbers per token) for A's gradient, plus a dropped copy and a bool mask with
dropout. At inference LoRA-FA is plain LoRA: :class:`LoraFAConfig` writes ``peft_type: "LORA"``, so HF PEFT
and peftkit load its files as LoRA.

The paper's optimizer (:func:`create_lorafa_optimizer`, HF PEFT 0.21's name, signature and update)
projects B's gradient so that the step on B best follows full fine-tuning's gradient of W (``min ‖s·ĝ_B A
− g_W‖_F``, with g_B = s·g_W Aᵀ), then takes an AdamW step:

    ĝ_B = (1 / s²) · g_B · (A Aᵀ + δ I)⁺,        δ = 1e-8

Both parts work alone: LoraFAConfig with torch's AdamW, or a plain LoRA model with the LoRA-FA optimizer
(which freezes every lora_A, as HF PEFT does).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn

from ..configs.lora_fa import LoraFAConfig
from ..errors import PeftConfigError, PeftError
from .base import adapter_layers, register_method
from .lora import LORA, LoraConfig, LoraEmbedding, LoraLayer, LoraLinear, LoraVariant, register_variant
from .lora_kernels import outer_grad

# LoraFAConfig: peftkit.configs.lora_fa (torch-free: reading a file needs no tensors)


# ---- the maths: a dropout mask from a seed, and the memory-light autograd function --------------------
def draw_seed() -> int:
    """One draw from torch's default generator: the seed of one dropout mask (so torch.manual_seed governs it)."""
    return int(torch.randint(0, 2**62, (1,)).item())


def dropout_mask(shape: torch.Size, p: float, seed: int, device: torch.device) -> torch.Tensor:
    """The keep-mask (bool, True = kept with probability 1 - p) that ``seed`` determines, on ``device``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return torch.rand(shape, generator=generator, device=device) >= p


class LoraFAFunction(torch.autograd.Function):
    """s · B A dropout(x) with A frozen, saving only h = A·dropout(x) (+ A, B) for backward.

    x (..., d_in), A (r, d_in), B (d_out, r) -> (..., d_out). ``p`` is the dropout probability (0: none) and
    ``seed`` the mask's seed (see :func:`dropout_mask`); backward regenerates the mask instead of storing it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, p: float,
                seed: int) -> torch.Tensor:
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        if p > 0:  # A (x ⊙ m) / (1 - p): the 1 / (1 - p) is applied to the r-dimensional h
            x = x * dropout_mask(x.shape, p, seed, x.device)
        h = x @ A.T
        if p > 0:
            h = h * (1.0 / (1.0 - p))
        ctx.save_for_backward(h, A, B)
        ctx.scaling, ctx.p, ctx.seed = scaling, p, seed
        return (h @ B.T) * scaling

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, A, B = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(B.dtype) * ctx.scaling  # (tokens, d_out)
        grad_x = grad_B = None
        if ctx.needs_input_grad[2]:
            grad_B = outer_grad(g, h.reshape(-1, h.shape[-1]).to(B.dtype), 1.0)
        if ctx.needs_input_grad[0]:
            grad_h = g @ B  # (tokens, r)
            if ctx.p > 0:
                grad_h = grad_h * (1.0 / (1.0 - ctx.p))
            grad_x = (grad_h @ A.to(B.dtype)).reshape(ctx.x_shape)
            if ctx.p > 0:  # the forward's mask, regenerated from its seed
                grad_x.mul_(dropout_mask(ctx.x_shape, ctx.p, ctx.seed, grad_x.device))
            grad_x = grad_x.to(ctx.x_dtype)
        return grad_x, None, grad_B, None, None, None


def lora_fa_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, p: float = 0.0) -> torch.Tensor:
    """s · B A dropout_p(x), with backward through :class:`LoraFAFunction` (A must be frozen)."""
    if A.requires_grad and torch.is_grad_enabled():
        raise PeftError(
            "LoRA-FA keeps lora_A frozen, but it requires grad here (was it unfrozen by hand?); call "
            "lora_A[...].weight.requires_grad_(False), or use a plain LoraConfig to train A too"
        )
    return LoraFAFunction.apply(x, A, B, scaling, p, draw_seed() if p > 0 else 0)


class LoraFAVariant(LoraVariant):
    """Freezes A for good (``adapter_frozen`` on its module: PeftModel never unfreezes it) and runs Linear /
    Conv1D targets through :class:`LoraFAFunction`. Conv2d targets only freeze A (plain autograd already
    keeps no input for a frozen convolution's weight). Merge and unmerge are plain LoRA's."""

    def init(self, layer: LoraLayer, adapter_name: str, config: LoraConfig) -> None:
        if isinstance(layer, LoraEmbedding):
            raise PeftConfigError(
                "LoRA-FA freezes A, but LoRA on an embedding starts with A = 0, so it could never learn; "
                "leave embeddings out of target_modules (or give them a plain LoraConfig adapter)"
            )
        A = layer.lora_A[adapter_name]
        A.requires_grad_(False)
        A.adapter_frozen = True

    def forward(self, layer: LoraLinear, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        dropout = layer.lora_dropout[adapter_name]
        p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        delta = lora_fa_delta(x.to(A.dtype), A, B, layer.scaling[adapter_name], p)
        return result + delta.to(result.dtype)


register_variant("lora_fa", LoraFAVariant)
LORA_FA = register_method(dataclasses.replace(LORA, config_cls=LoraFAConfig))


# ---- the optimizer ---------------------------------------------------------------------------------
LORA_FA_DELTA = 1e-8  # HF PEFT's ridge on A Aᵀ before the pseudo-inverse


def project_lora_fa_gradient(grad_B: torch.Tensor, A: torch.Tensor, scaling: float) -> torch.Tensor:
    """ĝ_B = (1 / s²) · g_B · (A Aᵀ + δ I)⁺ for B (d_out, r) and A (r, d_in) (Conv2d: (out, r, 1, 1), (r, in, k, k))."""
    A2 = A.reshape(A.shape[0], -1)
    AA_T_inv = torch.linalg.pinv(A2 @ A2.T + LORA_FA_DELTA * torch.eye(A2.shape[0], device=A.device))
    projected = (1 / scaling**2) * (grad_B.reshape(grad_B.shape[0], -1) @ AA_T_inv)
    return projected.reshape(grad_B.shape).to(grad_B.dtype)


class LoraFAOptimizer(torch.optim.Optimizer):
    """AdamW (transformers' "adamw_hf": eps 1e-6, bias correction, decoupled weight decay applied after the
    step) in which each LoRA B's gradient is first projected by :func:`project_lora_fa_gradient`.

    Param groups carry HF PEFT's keys: ``params``, ``names`` (parallel, model parameter names) and
    ``scaling_factors`` (parallel, s of each LoRA B, None elsewhere). B ``<m>.lora_B.<adapter>.weight`` pairs
    with A ``<m>.lora_A.<adapter>.weight`` of the same group; A is never updated. Other parameters with a
    gradient get plain AdamW."""

    def __init__(self, params: Iterable[dict[str, Any]], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True) -> None:
        if lr < 0.0 or eps < 0.0 or not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid LoRA-FA optimizer settings: lr={lr}, betas={betas}, eps={eps}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "correct_bias": correct_bias}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_name = dict(zip(group["names"], group["params"], strict=True))
            for p, name, scaling in zip(group["params"], group["names"], group["scaling_factors"], strict=True):
                if p.grad is None:
                    continue
                if ".lora_A." in name and name.replace(".lora_A.", ".lora_B.") in by_name:
                    continue  # A of a LoRA-FA pair: fixed
                grad = p.grad
                A = by_name.get(name.replace(".lora_B.", ".lora_A.")) if ".lora_B." in name else None
                if A is not None and scaling is not None:
                    grad = project_lora_fa_gradient(grad, A, scaling)
                self._adamw(p, grad, group)
        return loss

    def _adamw(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        state["exp_avg"].mul_(beta1).add_(grad, alpha=1.0 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = state["exp_avg_sq"].sqrt().add_(group["eps"])
        step_size = group["lr"]
        if group["correct_bias"]:
            step_size *= math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
        p.addcdiv_(state["exp_avg"], denom, value=-step_size)
        if group["weight_decay"] > 0.0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])


def create_lorafa_optimizer(model: nn.Module, r: int, lora_alpha: float, lr: float, weight_decay: float = 0.0,
                            use_rslora: bool | None = None) -> LoraFAOptimizer:
    """HF PEFT 0.21's helper: freeze every LoRA A and return a :class:`LoraFAOptimizer` over all of the model's
    parameters, each B projected with its own layer's scaling (so rank_pattern / alpha_pattern hold).

    As in HF PEFT, ``r`` and ``lora_alpha`` do not enter the update (each layer's scaling does; a warning
    says when they disagree with the active adapter's config) and ``use_rslora`` is deprecated: if given it
    must match the active adapters' configs. LoRA on embeddings (A starts at 0) gets plain AdamW on A and B."""
    configs = getattr(model, "peft_config", {}) or {}
    active = [a for a in getattr(model, "active_adapters", list(configs)) if a in configs]
    if use_rslora is not None:
        mismatched = [a for a in active if bool(getattr(configs[a], "use_rslora", False)) != use_rslora]
        if mismatched:
            raise PeftConfigError(
                f"use_rslora={use_rslora} was passed but adapters {mismatched} have use_rslora set differently; "
                "set use_rslora in the LoraConfig and drop the argument (it is deprecated in HF PEFT too)"
            )
    off = [a for a in active if (getattr(configs[a], "r", r), getattr(configs[a], "lora_alpha", lora_alpha)) != (r, lora_alpha)]
    if off:
        warnings.warn(f"create_lorafa_optimizer(r={r}, lora_alpha={lora_alpha}) differs from adapter(s) {off}'s "
                      "config; the update uses each layer's own scaling, as HF PEFT does", stacklevel=2)
    scaling: dict[int, float] = {}
    for _, layer in adapter_layers(model):
        if isinstance(layer, LoraLayer) and not isinstance(layer, LoraEmbedding):
            for name in layer.r:
                layer.lora_A[name].weight.requires_grad_(False)
                scaling[id(layer.lora_B[name].weight)] = layer.scaling[name]
    named = list(model.named_parameters())
    group = {
        "params": [p for _, p in named], "names": [n for n, _ in named],
        "scaling_factors": [scaling.get(id(p)) for _, p in named],
        "lr": lr, "betas": (0.9, 0.999), "weight_decay": weight_decay,
    }
    return LoraFAOptimizer([group])
