"""Combining LoRA adapters into a new one: HF PEFT's ``add_weighted_adapter`` (names, defaults and meanings).

For adapters i with weights w_i and per-layer updates ΔW_i = s_i B_i A_i, the new adapter (r = its rank,
lora_alpha = r, so its scaling is 1) is, per combination_type:

    "cat"     A = [w_1 s_1 A_1; w_2 s_2 A_2; ...],  B = [B_1, B_2, ...]           exact: ΔW = Σ w_i ΔW_i, r = Σ r_i
    "svd"     the rank-r truncated SVD of Σ w_i ΔW_i  (r = svd_rank or the largest r_i): B = U_r S_r, A = V_rᵀ;
              exact when r ≥ rank(Σ w_i ΔW_i), e.g. r ≥ Σ r_i
    "linear"  A = Σ sign_i √|w_i s_i| A_i,  B = Σ √|w_i s_i| B_i    (equal ranks; an approximation: cross terms)
    "ties", "dare_linear", "dare_ties", "magnitude_prune": the same merge functions applied to the A's and the
              B's separately (as "linear"); with the "_svd" suffix, applied to the ΔW_i and then truncated by SVD

The merge functions are :func:`task_arithmetic`, :func:`ties` (Yadav et al. 2023: keep the top ``density``
fraction by magnitude, elect a sign per element, average the agreeing entries), :func:`dare_linear` /
:func:`dare_ties` (Yu et al. 2023: keep each entry with probability ``density``, rescale by 1/density) and
:func:`magnitude_prune`, with HF PEFT's definitions (random pruning draws from torch's default generator).
Only plain LoRA adapters combine (not DoRA, VeRA, IA3, ...), as in HF PEFT.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn as nn

from .errors import AdapterNameError, PeftError
from .methods.base import ModulesToSaveWrapper, adapter_layers, logical_path, modules_to_save_wrappers
from .methods.lora import LoraConfig, LoraConv2d, LoraEmbedding, LoraLayer, LoraVariant

COMBINATIONS = ("svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd",
                "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd")
NEEDS_DENSITY = ("ties", "dare", "magnitude_prune")


# ---- the merge functions, pure (task tensors of one shape, weights (n,)) -----------------------------------
def _weighted(tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return tensors * weights.view(weights.shape + (1,) * (tensors.dim() - 1))


def prune(tensor: torch.Tensor, density: float, method: Literal["magnitude", "random"],
          rescale: bool = False) -> torch.Tensor:
    """Keep the ``density`` fraction of entries: the largest by magnitude, or at random (then ÷ density)."""
    if density >= 1:
        return tensor
    if density < 0:
        raise PeftError(f"density must be in [0, 1], got {density}")
    if method == "magnitude":
        k = int(density * tensor.numel())
        mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
        mask[torch.topk(tensor.abs().reshape(-1), k=k, largest=True).indices] = 1
        return tensor * mask.view(tensor.shape)
    kept = tensor * torch.bernoulli(torch.full_like(tensor, density))
    return kept / density if rescale else kept


def majority_sign_mask(tensors: torch.Tensor, method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """Where each task's entry agrees with the elected sign (of the sum, or of the count of signs)."""
    sign = tensors.sign()
    magnitude = tensors.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(magnitude >= 0, 1, -1)


def disjoint_merge(tensors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of the agreeing entries (0 where none agree)."""
    return (tensors * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def task_arithmetic(tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Σ w_i T_i."""
    return _weighted(torch.stack(list(tensors)), weights).sum(dim=0)


def magnitude_prune(tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    return task_arithmetic([prune(t, density, "magnitude") for t in tensors], weights)


def ties(tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float,
         majority_sign_method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    stacked = torch.stack([prune(t, density, "magnitude") for t in tensors])
    mask = majority_sign_mask(stacked, majority_sign_method)
    return disjoint_merge(_weighted(stacked, weights), mask)


def dare_linear(tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    return task_arithmetic([prune(t, density, "random", rescale=True) for t in tensors], weights)


def dare_ties(tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float,
              majority_sign_method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    stacked = torch.stack([prune(t, density, "random", rescale=True) for t in tensors])
    mask = majority_sign_mask(stacked, majority_sign_method)
    return disjoint_merge(_weighted(stacked, weights), mask)


def merge_tensors(kind: str, tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float | None,
                  majority_sign_method: Literal["total", "frequency"]) -> torch.Tensor:
    """One of the merge functions by its combination_type name (``"svd"`` and ``"linear"``: task arithmetic)."""
    kind = kind.removesuffix("_svd")
    if kind in ("svd", "linear"):
        return task_arithmetic(tensors, weights)
    if kind == "magnitude_prune":
        return magnitude_prune(tensors, weights, density)
    if kind == "ties":
        return ties(tensors, weights, density, majority_sign_method)
    if kind == "dare_linear":
        return dare_linear(tensors, weights, density)
    if kind == "dare_ties":
        return dare_ties(tensors, weights, density, majority_sign_method)
    raise PeftError(f"unknown combination_type {kind!r}; use one of {', '.join(COMBINATIONS)}")


def svd_factors(delta: torch.Tensor, rank: int, clamp: float | None = None, full_matrices: bool = True,
                driver: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """B (m, rank) = U_r S_r and A (rank, n) = V_rᵀ of a 2-D ΔW (m, n); zero-padded where rank > min(m, n)."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    k = min(rank, S.shape[0])
    B = delta.new_zeros(delta.shape[0], rank)
    A = delta.new_zeros(rank, delta.shape[1])
    B[:, :k] = U[:, :k] * S[:k]
    A[:k] = Vh[:k]
    if clamp is not None:  # HF PEFT's quantile clamp of the factors
        high = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-high, high), A.clamp(-high, high)
    return B, A


# ---- one layer ----------------------------------------------------------------------------------------------
def _factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one adapter as stored: Linear (r, d_in)/(d_out, r), Embedding (r, num)/(dim, r), Conv2d 4-D."""
    if isinstance(layer, LoraEmbedding):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def _delta_as_BA(layer: LoraLayer, name: str) -> torch.Tensor:
    """ΔW of one adapter in B·A layout: (d_out, d_in) for Linear/Conv1D, (dim, num) for Embedding, flattened
    (out, in·k·k) for Conv2d."""
    delta = layer.delta_weight(name)
    if isinstance(layer, LoraEmbedding) or getattr(layer, "fan_in_fan_out", False):
        delta = delta.T
    return delta.flatten(1) if isinstance(layer, LoraConv2d) else delta


def combine_layer(layer: LoraLayer, adapters: Sequence[str], weights: Sequence[float], new_name: str,
                  combination_type: str, density: float | None, majority_sign_method: Literal["total", "frequency"],
                  svd_clamp: float | None, svd_full_matrices: bool, svd_driver: str | None) -> None:
    """Fill adapter ``new_name`` (already created with its rank, scaling 1) of one layer."""
    present = [(a, w) for a, w in zip(adapters, weights, strict=True) if a in layer.r]
    if not present:
        return
    A_new, B_new = _factors(layer, new_name)
    rank = layer.r[new_name]
    with torch.no_grad():
        A_new.zero_()
        B_new.zero_()
        if combination_type == "cat":
            As = torch.cat([_factors(layer, a)[0].float() * (w * layer.scaling[a]) for a, w in present], dim=0)
            Bs = torch.cat([_factors(layer, a)[1].float() for a, _ in present], dim=1)
            A_new[: As.shape[0]] = As.to(A_new.dtype)
            B_new[:, : Bs.shape[1]] = Bs.to(B_new.dtype)
        elif combination_type.endswith("svd"):
            w = torch.tensor([w for _, w in present], dtype=torch.float32, device=A_new.device)
            delta = merge_tensors(combination_type, [_delta_as_BA(layer, a) for a, _ in present], w, density,
                                  majority_sign_method)
            B, A = svd_factors(delta, rank, svd_clamp, svd_full_matrices, svd_driver)
            A_new.copy_(A.reshape(A_new.shape).to(A_new.dtype))
            B_new.copy_(B.reshape(B_new.shape).to(B_new.dtype))
        else:  # "linear" and the other merges of the A's and B's (equal ranks)
            signed = [w * layer.scaling[a] for a, w in present]
            w_A = torch.tensor([abs(v) ** 0.5 * (1 if v >= 0 else -1) for v in signed], device=A_new.device)
            w_B = torch.tensor([abs(v) ** 0.5 for v in signed], device=A_new.device)
            As = [_factors(layer, a)[0].float() for a, _ in present]
            Bs = [_factors(layer, a)[1].float() for a, _ in present]
            if {t.shape for t in As} != {A_new.shape}:
                raise PeftError(f"combination_type={combination_type!r} needs adapters of equal rank in every layer; "
                                "use 'svd' or 'cat' for adapters of different ranks")
            A_new.copy_(merge_tensors(combination_type, As, w_A, density, majority_sign_method).to(A_new.dtype))
            B_new.copy_(merge_tensors(combination_type, Bs, w_B, density, majority_sign_method).to(B_new.dtype))


# ---- the model-level verb ---------------------------------------------------------------------------------
def add_weighted_adapter(peft_model: Any, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None, svd_clamp: float | None = None,
                         svd_full_matrices: bool = True, svd_driver: str | None = None, density: float | None = None,
                         majority_sign_method: Literal["total", "frequency"] = "total") -> None:
    """Add adapter ``adapter_name``, the combination of LoRA ``adapters`` with ``weights`` (see the module
    docstring). Like HF PEFT: one adapter always combines linearly; the new adapter is not made active."""
    configs = peft_model.peft_config
    if adapter_name in configs:
        raise AdapterNameError(f"an adapter named {adapter_name!r} already exists; pick another name")
    unknown = [a for a in adapters if a not in configs]
    if unknown or not adapters:
        raise AdapterNameError(f"add_weighted_adapter: unknown adapter(s) {unknown or adapters}; this model has "
                               f"{sorted(configs)}")
    if len(weights) != len(adapters):
        raise PeftError(f"add_weighted_adapter: {len(adapters)} adapters but {len(weights)} weights")
    if combination_type not in COMBINATIONS:
        raise PeftError(f"unknown combination_type {combination_type!r}; use one of {', '.join(COMBINATIONS)}")
    not_lora = [a for a in adapters if type(configs[a]) is not LoraConfig or configs[a].variant_name() != "lora"]
    if not_lora:
        raise PeftError(f"add_weighted_adapter combines plain LoRA adapters only; {not_lora} are "
                        f"{sorted({type(configs[a]).__name__ + (' (DoRA)' if getattr(configs[a], 'use_dora', False) else '') for a in not_lora})}")
    combination_type = "linear" if len(adapters) == 1 else combination_type
    if any(combination_type.startswith(k) for k in NEEDS_DENSITY) and density is None:
        raise PeftError(f"combination_type={combination_type!r} needs density (the fraction of entries to keep), "
                        "e.g. density=0.5")
    ranks = [max([configs[a].r, *configs[a].rank_pattern.values()]) for a in adapters]
    if combination_type == "cat":
        rank = sum(ranks)
    elif combination_type.endswith("svd"):
        rank = svd_rank or max(ranks)
    else:
        if len(set(ranks)) != 1:
            raise PeftError(f"combination_type={combination_type!r} needs adapters of one rank (got {ranks}); use "
                            "'svd' (svd_rank=...) or 'cat'")
        rank = ranks[0]
    heads = [w for _, w in modules_to_save_wrappers(peft_model) if sum(a in w.modules_to_save for a in adapters) > 1]
    if heads:
        raise PeftError(f"cannot combine adapters that each train the same module in full (modules_to_save: "
                        f"{len(heads)} module(s)); a trained head has no weighted combination")

    model = peft_model.base_model.model
    paths = sorted({logical_path(path) for path, layer in adapter_layers(model)
                    if isinstance(layer, LoraLayer) and any(a in layer.r for a in adapters)})
    first = configs[adapters[0]]
    lists = [configs[a].target_modules for a in adapters]
    if all(isinstance(t, list | set | tuple) for t in lists):
        targets: list[str] | str = sorted({n for t in lists for n in t})  # HF PEFT's union
        extra: dict[str, Any] = {}
    else:  # a regex or "all-linear": name exactly the modules the adapters live on
        targets, extra = paths, {"layers_to_transform": None, "layers_pattern": None, "exclude_modules": None}
    config = first.copy(r=rank, lora_alpha=rank, target_modules=targets, rank_pattern={}, alpha_pattern={},
                        init_lora_weights=True, **extra)
    peft_model.add_adapter(adapter_name, config)
    for _, layer in adapter_layers(model):
        if isinstance(layer, LoraLayer) and adapter_name in layer.r:
            if not isinstance(layer.variant[adapter_name], LoraVariant):
                continue
            combine_layer(layer, adapters, weights, adapter_name, combination_type, density, majority_sign_method,
                          svd_clamp, svd_full_matrices, svd_driver)
    for _, wrapper in modules_to_save_wrappers(model):  # the one adapter with a trained head passes it on
        _copy_head(wrapper, adapters, adapter_name)
    peft_model._refresh()


def _copy_head(wrapper: ModulesToSaveWrapper, adapters: Sequence[str], adapter_name: str) -> None:
    owners = [a for a in adapters if a in wrapper.modules_to_save]
    if owners and adapter_name in wrapper.modules_to_save:
        module: nn.Module = wrapper.modules_to_save[adapter_name]
        module.load_state_dict(wrapper.modules_to_save[owners[0]].state_dict())


def weighted_delta(peft_model: Any, adapters: Sequence[str], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Σ w_i ΔW_i per adapted module (logical path -> tensor in the base weight's layout): what "cat" and a full
    "svd" reproduce exactly (for tests and checks)."""
    out: dict[str, torch.Tensor] = {}
    for path, layer in adapter_layers(peft_model.base_model.model):
        if isinstance(layer, LoraLayer):
            parts = [w * layer.delta_weight(a) for a, w in zip(adapters, weights, strict=True) if a in layer.r]
            if parts:
                out[logical_path(path)] = torch.stack(parts).sum(0)
    if not out:
        warnings.warn(f"no LoRA layer holds any of {list(adapters)}", stacklevel=2)
    return out
