"""Delta-LoRA (Zi et al. 2023, "Delta-LoRA: Fine-Tuning High-Rank Parameters with the Delta of Low-Rank
Matrices", arXiv 2309.02411).

Besides training A and B, the paper moves the frozen W after the optimizer step of every iteration t > K by
the change of the LoRA product, with no gradient and no optimizer state for W. Its Algorithm 1, the lines
that matter (t counts iterations from 0; the product A⁽ᵗ⁾B⁽ᵗ⁾ is the paper's order for peftkit's B·A):

    for t = 0, ..., T − 1 do
        ...  A⁽ᵗ⁺¹⁾, B⁽ᵗ⁺¹⁾ ← the optimizer step
        if t > K do
            W⁽ᵗ⁺¹⁾ ← W⁽ᵗ⁾ + λ · (α/r) · (A⁽ᵗ⁺¹⁾B⁽ᵗ⁺¹⁾ − A⁽ᵗ⁾B⁽ᵗ⁾)

with K = ``update_start`` ("start steps") and λ = ``delta_lambda`` ("update ratio"); the paper's experiments
use λ = 2, K = 500. Write P_n = s · B_n A_n for the product after n optimizer steps (s = α/r). The first move
of W is in iteration t = K + 1 and the sum telescopes: after n ≥ K + 1 steps,

    W_n = W_0 + λ (P_n − P_{K+1})

(and W_n = W_0 before). peftkit therefore never writes W; it keeps the two frozen factors of P_{K+1}
(snapshotted by the optimizer step hook after step K + 1) and computes the same forward as the paper,

    y = W_0 x + P_n x + λ (sg(P_n) − P_{K+1}) x            (sg: stop-gradient on the weights, not on x)

which is exact in any base dtype (a bf16 W would round per-step updates away), leaves W_0 untouched (so
disabling, unloading or deleting the adapter restores W exactly) and costs one more frozen rank-r path
per target instead of a d_out × d_in write per step. The gradients of A and B are the paper's: the λ
term passes gradient to x only, as the paper's W does. Dropout is refused on this path, as the paper
removes it (the delta of A·B stands in for W's gradient only without dropout).

The whole fine-tune is W_0 + (1 + λ) P_T − λ P_{K+1}: a LoRA of rank ≤ 2r, written as a plain LoRA file
(A' = [A_T; A_{K+1}], B' = s·[(1+λ) B_T, −λ B_{K+1}], lora_alpha = r') that HF PEFT and peftkit load onto the
untouched base model; where the snapshot's B is exactly zero the second half would be zeros and the file
keeps rank r. Training needs the step count: ``peftkit.optim.attach(model, optimizer)`` in a plain loop, or
``peftkit.optim.delta_lora_callback()`` in transformers' Trainer.
"""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.nn as nn

from ..config import PeftConfig
from ..configs.delta_lora import DeltaLoraConfig
from ..errors import PeftError
from ..targeting import is_linear_like
from .base import MethodSpec, adapter_layers, logical_path, register_method
from .lora import LoraConfig, LoraLayer, LoraLinear, LoraVariant, register_variant

# DeltaLoraConfig: peftkit.configs.delta_lora (torch-free: reading a file needs no tensors)


class _Snapshot(nn.Module):
    """The frozen factors of P_{K+1} (buffers, so they move with the model)."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("A", A.detach().clone())
        self.register_buffer("B", B.detach().clone())


class DeltaLoraVariant(LoraVariant):
    per_row = False

    def init(self, layer: LoraLayer, adapter_name: str, config: DeltaLoraConfig) -> None:
        self.delta_lambda = float(config.delta_lambda)
        self.update_start = config.update_start
        self.step = 0
        self.attached = False
        if not hasattr(layer, "delta_lora_start"):
            layer.delta_lora_start = nn.ModuleDict()

    def snapshot(self, layer: LoraLinear, adapter_name: str) -> None:
        layer.delta_lora_start[adapter_name] = _Snapshot(layer.lora_A[adapter_name].weight,
                                                         layer.lora_B[adapter_name].weight)

    def on_step(self, layer: LoraLinear, adapter_name: str) -> None:
        self.step += 1
        if self.step == self.update_start + 1:  # P_{K+1}: Algorithm 1 moves W from iteration t = K + 1 on
            self.snapshot(layer, adapter_name)

    def forward(self, layer: LoraLinear, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        if layer.training and torch.is_grad_enabled() and not self.attached and adapter_name not in layer.delta_lora_start:
            raise PeftError(
                f"Delta-LoRA adapter {adapter_name!r} counts optimizer steps to start at update_start="
                f"{self.update_start}: call peftkit.optim.attach(model, optimizer) before training (with "
                "transformers' Trainer: callbacks=[peftkit.optim.delta_lora_callback()])"
            )
        if layer.training and torch.is_grad_enabled():
            others = [n for n in layer.active_adapters
                      if n != adapter_name and isinstance(layer.variant.get(n), DeltaLoraVariant)]
            if others:
                raise PeftError(
                    f"Delta-LoRA adapters {[adapter_name, *others]} are active together in training; W moves with "
                    "one adapter at a time: set_adapter() a single Delta-LoRA adapter to train"
                )
        A, B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        s = layer.scaling[adapter_name]
        xa = x.to(A.weight.dtype)
        p = B(A(xa)) * s
        if adapter_name in layer.delta_lora_start:
            # W's move λ(P_n − P_{K+1}) x as one frozen rank-2r path: gradient flows to x (W is a constant in the
            # paper), never to A or B
            start = layer.delta_lora_start[adapter_name]
            A_cat = torch.cat([A.weight.detach(), start.A])
            B_cat = torch.cat([B.weight.detach(), -start.B], dim=1)
            p = p + (xa @ A_cat.T) @ B_cat.T * (self.delta_lambda * s)
        return result + p.to(result.dtype)

    def total_delta(self, layer: LoraLinear, adapter_name: str) -> torch.Tensor:
        """W_eff − W_0 = (1 + λ) P_T − λ P_{K+1} (or P_T before step K + 1), in the base weight's layout."""
        delta = layer.delta_weight(adapter_name)
        if adapter_name in layer.delta_lora_start:
            start = layer.delta_lora_start[adapter_name]
            p_k = (start.B.float() @ start.A.float()) * layer.scaling[adapter_name]
            delta = (1 + self.delta_lambda) * delta - self.delta_lambda * (p_k.T if layer.fan_in_fan_out else p_k)
        return delta

    def merged_weight(self, layer: LoraLinear, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.total_delta(layer, adapter_name)

    def unmerged_weight(self, layer: LoraLinear, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight - self.total_delta(layer, adapter_name)


register_variant("delta_lora", DeltaLoraVariant)


def delta_lora_layers(model: nn.Module):
    """(path, layer, adapter_name, variant) for every Delta-LoRA adapter in ``model``."""
    for path, layer in adapter_layers(model):
        for name, variant in getattr(layer, "variant", {}).items():
            if isinstance(variant, DeltaLoraVariant):
                yield path, layer, name, variant


def to_lora_file(
    model: nn.Module, adapter_name: str, config: DeltaLoraConfig, tensors: dict[str, torch.Tensor], prefix: str
) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """The exact plain-LoRA form of a Delta-LoRA adapter: rank 2r where step K + 1 was reached and P_{K+1} ≠ 0
    (rank r where it is exactly zero: its half of B' would be zeros), scaling folded into B (lora_alpha = r per
    layer, so s' = 1)."""
    out = dict(tensors)
    ranks: dict[str, int] = {}
    for path, layer, name, variant in delta_lora_layers(model):
        if name != adapter_name:
            continue
        key = f"{prefix}{logical_path(path)}"
        A = layer.lora_A[name].weight.detach().float()
        B = layer.lora_B[name].weight.detach().float() * layer.scaling[name]
        if name in layer.delta_lora_start:
            start = layer.delta_lora_start[name]
            lam = variant.delta_lambda
            B = (1 + lam) * B
            if bool(start.B.any()):  # P_{K+1} = 0 adds nothing: keep rank r, so the file's size is honest
                A = torch.cat([A, start.A.float()], dim=0)
                B = torch.cat([B, -lam * start.B.float() * layer.scaling[name]], dim=1)
        out[f"{key}.lora_A.weight"] = A.to(layer.lora_A[name].weight.dtype)
        out[f"{key}.lora_B.weight"] = B.to(layer.lora_B[name].weight.dtype)
        ranks[logical_path(path)] = A.shape[0]
    base = {f.name: getattr(config, f.name) for f in dataclasses.fields(LoraConfig) if not f.metadata.get("local")}
    r = max(ranks.values(), default=config.r)
    # exact per-layer ranks; lora_alpha = rank everywhere, so the scaling folded into B is not applied twice
    pattern = {re.escape(path): rank for path, rank in ranks.items() if rank != r}
    base.update(r=r, lora_alpha=r, use_rslora=False, rank_pattern=pattern, alpha_pattern=dict(pattern),
                lora_dropout=0.0, init_lora_weights=True)
    return LoraConfig(**base), out


DELTA_LORA = register_method(MethodSpec(
    config_cls=DeltaLoraConfig, layer_base=LoraLayer, layer_for=lambda m: LoraLinear if is_linear_like(m) else None,
    supported="Linear, transformers Conv1D", to_file=to_lora_file,
))
