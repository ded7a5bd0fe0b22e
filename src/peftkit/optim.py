"""Optimizer helpers: LoRA+ parameter groups and the Delta-LoRA step hook.

* ``create_loraplus_optimizer`` (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large
  Models"): B learns ``loraplus_lr_ratio`` times faster than A. HF PEFT 0.21's name, signature and
  grouping: A matrices at ``lr``; B matrices and every other 1-D trainable tensor (biases, norms, DoRA
  magnitudes, VeRA vectors) at ``lr * loraplus_lr_ratio``, with weight decay ``loraplus_weight_decay``
  except for biases and norm weights; LoRA on embeddings at the absolute ``loraplus_lr_embedding``.
* ``attach(model, optimizer)``: counts optimizer steps for Delta-LoRA adapters (Algorithm 1 moves W in every
  iteration t > ``update_start``, counting from 0); ``delta_lora_callback()`` does the same inside
  transformers' Trainer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .errors import PeftConfigError, PeftError
from .methods.lora import LoraEmbedding


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def loraplus_param_groups(
    model: nn.Module, *, lr: float, loraplus_lr_ratio: float, weight_decay: float = 0.0,
    lr_embedding: float = 1e-6, exclude: frozenset[int] = frozenset(),
) -> list[dict[str, Any]]:
    """LoRA+'s parameter groups (Hayou et al. 2024: η_B = λ·η_A, a fixed ratio λ, ~2⁴), HF PEFT 0.21's grouping: A
    matrices at ``lr``; B matrices and other 1-D trainable tensors at ``lr * loraplus_lr_ratio``, decayed
    except biases and norm weights; LoRA on embeddings at ``lr_embedding``. Parameters whose ``id`` is in
    ``exclude`` are left out (a caller that groups them itself, e.g. the trainer's classifier head)."""
    if not loraplus_lr_ratio > 0:
        raise PeftConfigError(
            f"loraplus_lr_ratio must be > 0, got {loraplus_lr_ratio!r}; the paper suggests about 16 (B faster than A)"
        )
    in_norm = {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
    modules = dict(model.named_modules())
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in exclude:
            continue
        owner = modules.get(".".join(name.split(".")[:-2]))
        if isinstance(owner, LoraEmbedding):
            groups["embedding"].append(param)
        elif "lora_B" in name or param.ndim == 1:
            decays = "bias" not in name and id(param) not in in_norm
            groups["B" if decays else "B_no_decay"].append(param)
        else:
            groups["A"].append(param)
    return [
        {"params": groups["A"], "weight_decay": weight_decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": weight_decay, "lr": lr_embedding},
        {"params": groups["B"], "weight_decay": weight_decay, "lr": lr * loraplus_lr_ratio},
        {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ]


def create_loraplus_optimizer(
    model: nn.Module, optimizer_cls: type[torch.optim.Optimizer], *, lr: float, loraplus_lr_ratio: float,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """An optimizer whose LoRA B matrices learn ``loraplus_lr_ratio`` times faster than A (LoRA+), with HF
    PEFT's signature: weight decay is ``loraplus_weight_decay`` (a plain ``weight_decay`` is overridden by
    every group, as in HF PEFT)."""
    weight_decay = kwargs.pop("loraplus_weight_decay", 0.0)
    lr_embedding = kwargs.pop("loraplus_lr_embedding", 1e-6)
    groups = loraplus_param_groups(model, lr=lr, loraplus_lr_ratio=loraplus_lr_ratio, weight_decay=weight_decay,
                                   lr_embedding=lr_embedding)
    return optimizer_cls(groups, lr=lr, **kwargs)


class DeltaLoraHandle:
    """Returned by :func:`attach`; ``remove()`` detaches the step hook."""

    def __init__(self, hook: Any, variants: list) -> None:
        self._hook, self._variants = hook, variants

    def remove(self) -> None:
        self._hook.remove()
        for *_, variant in self._variants:
            variant.attached = False


def _innermost(optimizer: Any) -> torch.optim.Optimizer:
    while not isinstance(optimizer, torch.optim.Optimizer) or type(optimizer).__name__ == "AcceleratedOptimizer":
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            break
        optimizer = inner
    return optimizer


def attach(model: nn.Module, optimizer: torch.optim.Optimizer) -> DeltaLoraHandle:
    """Count ``optimizer``'s steps for the model's trained Delta-LoRA adapters, so each starts moving W
    (implicitly, see peftkit.methods.delta_lora) after its ``update_start`` + 1 steps. One call before training."""
    from .methods.delta_lora import delta_lora_layers

    variants = list(delta_lora_layers(model))
    if not variants:
        raise PeftError("attach() found no Delta-LoRA adapter in this model; it is only needed for DeltaLoraConfig")
    optimizer = _innermost(optimizer)

    def trained(layer, name: str) -> bool:
        return layer.lora_B[name].weight.requires_grad and name in layer.active_adapters

    def after_step(*_: Any) -> None:
        for _, layer, name, variant in variants:
            if trained(layer, name):
                variant.on_step(layer, name)

    for *_, variant in variants:
        variant.attached = True
    return DeltaLoraHandle(optimizer.register_step_post_hook(after_step), variants)


def delta_lora_callback():
    """A transformers ``TrainerCallback`` that attaches the Delta-LoRA step hook to the Trainer's optimizer."""
    from transformers import TrainerCallback

    class DeltaLoraCallback(TrainerCallback):
        handle: DeltaLoraHandle | None = None

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            self.handle = attach(model, optimizer)

        def on_train_end(self, args, state, control, **kwargs):
            if self.handle is not None:
                self.handle.remove()

    return DeltaLoraCallback()
