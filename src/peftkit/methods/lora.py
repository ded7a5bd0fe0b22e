"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") and rsLoRA.

    y = W x + s · B A dropout(x),      s = lora_alpha / r      (rsLoRA: s = lora_alpha / sqrt(r))

Shapes for a Linear target with d_in inputs and d_out outputs: A is (r, d_in), B is (d_out, r).
Initialisation (HF PEFT's, so a fresh adapter is a no-op): A Kaiming-uniform(a=sqrt(5)) and B = 0;
``"gaussian"``: A ~ N(0, σ²) with σ = 1/r (std 1/r, as HF PEFT); ``False``: both random (a non-zero adapter, for tests). For embeddings
A (r, num_embeddings) = 0 and B (dim, r) ~ N(0, 1), stored as ``lora_embedding_A/B``.
Conv2d: A is a Conv2d(d_in, r, kernel, stride, padding), B a 1x1 Conv2d(r, d_out).
Adapter weights are fp32 by default even on a bf16/fp16 base (``autocast_adapter_dtype``).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..configs.lora import LoraConfig
from ..errors import PeftConfigError, PeftError
from ..patterns import match as safe_match
from ..quantize import dequantize_for_merge, restore_after_unmerge
from ..targeting import is_conv1d
from .base import AdapterLayer, MethodSpec, register_method
from .lora_joint import joined_forward, link_siblings
from .lora_kernels import (
    FUSED_VARIANTS,
    dropout_p,
    fused_enabled,
    lora_linear_forward,
    per_row_lora,
    reference_dropped,
)


# ---- the maths, as pure functions ------------------------------------------------------------------
def lora_scaling(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """alpha / r, or alpha / sqrt(r) for rsLoRA (Kalajdzievski 2023)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def lora_delta_weight(A: torch.Tensor, B: torch.Tensor, scaling: float, fan_in_fan_out: bool = False) -> torch.Tensor:
    """ΔW = s · B A, shaped like the base weight ((d_out, d_in), or (d_in, d_out) for Conv1D)."""
    delta = (B @ A) * scaling
    return delta.T if fan_in_fan_out else delta


def pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """rank_pattern / alpha_pattern lookup, HF PEFT's rule: the first key that matches the end of the name."""
    for key, value in patterns.items():
        if safe_match(rf"(.*\.)?({key})$", module_name, "rank_pattern/alpha_pattern key", shown=key):
            return value
    return default


# ---- the config: LoraConfig lives in peftkit.configs.lora (torch-free: reading a file needs no tensors) ---

# ---- variants: how one adapter of a LoRA layer computes, merges and unmerges -----------------------
class LoraVariant:
    """Plain LoRA. Variants of the family (DoRA, LoRA-FA, Delta-LoRA) subclass this in their own files and
    register with :func:`register_variant`; a config picks its variant by ``config.variant_name()``. One
    instance per (layer, adapter). ``per_row`` says whether adapter_names batching may gather this adapter."""

    per_row: ClassVar[bool] = True

    def init(self, layer: LoraLayer, adapter_name: str, config: LoraConfig) -> None:
        """Called after A and B exist (e.g. to create extra parameters or freeze A)."""

    def forward(self, layer: LoraLinear, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The plain-torch reference of ``lora_kernels.LoraFunction`` (same dropout masks, ordinary autograd)."""
        A = layer.lora_A[adapter_name]
        xa = reference_dropped(x, dropout_p(layer, adapter_name), A.weight.dtype)
        return result + (layer.lora_B[adapter_name](A(xa)) * layer.scaling[adapter_name]).to(result.dtype)

    def merged_weight(self, layer: LoraLayer, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """The base weight (fp32) with this adapter merged in."""
        return weight + layer.delta_weight(adapter_name)

    def unmerged_weight(self, layer: LoraLayer, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """The inverse of ``merged_weight``."""
        return weight - layer.delta_weight(adapter_name)


LORA_VARIANTS: dict[str, type[LoraVariant]] = {"lora": LoraVariant}


def register_variant(name: str, variant: type[LoraVariant]) -> type[LoraVariant]:
    LORA_VARIANTS[name] = variant
    return variant


# ---- the layers ------------------------------------------------------------------------------------
class LoraLayer(AdapterLayer):
    """Per-adapter hyper-parameters shared by every LoRA layer type."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict()
        self.variant: dict[str, LoraVariant] = {}

    def _init_variant(self, adapter_name: str, config: LoraConfig) -> None:
        name = config.variant_name()
        if name not in LORA_VARIANTS:
            raise PeftConfigError(f"LoRA variant {name!r} is not available; known: {sorted(LORA_VARIANTS)}")
        self.variant[adapter_name] = LORA_VARIANTS[name]()
        self.variant[adapter_name].init(self, adapter_name, config)

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        names = [a for a in (adapter_names or self.active_adapters) if a in self.r]
        if names:
            dequantize_for_merge(self)  # a quantised base weight becomes a dense copy while merged
        weight = self.base_layer.weight
        for name in names:
            if name in self.merged_adapters:
                continue
            merged = self.variant[name].merged_weight(self, name, weight.float())
            if safe_merge and not torch.isfinite(merged).all():
                raise PeftError(f"merging adapter {name!r} gives NaN/inf weights; nothing was changed")
            weight.copy_(merged.to(weight.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        weight = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight.copy_(self.variant[name].unmerged_weight(self, name, weight.float()).to(weight.dtype))
        restore_after_unmerge(self)

    def _set_hyper(self, adapter_name: str, config: LoraConfig, module_name: str) -> tuple[int, float]:
        r = pattern_value(config.rank_pattern, module_name, config.r)
        alpha = pattern_value(config.alpha_pattern, module_name, config.lora_alpha)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = alpha
        self.scaling[adapter_name] = lora_scaling(alpha, r, config.use_rslora)
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        return r, alpha

    def _forget(self, adapter_name: str) -> None:
        for d in (self.r, self.lora_alpha, self.scaling, self.variant):
            d.pop(adapter_name, None)
        if adapter_name in self.lora_dropout:
            del self.lora_dropout[adapter_name]

    def _adapter_dtype(self, config: LoraConfig) -> torch.dtype:
        dtype = self.base_layer.weight.dtype
        if config.autocast_adapter_dtype and dtype in (torch.float16, torch.bfloat16):
            return torch.float32
        return dtype if dtype.is_floating_point else torch.float32

    def _check_row_mix(self, names: tuple[str, ...]) -> None:
        if self.training and any(not isinstance(self.lora_dropout[n], nn.Identity) for n in names if n in self.r):
            raise PeftError("adapters mixed per row run without dropout: call model.eval() first")
        special = sorted({type(self.variant[n]).__name__ for n in names if n in self.r and not self.variant[n].per_row})
        if special:
            raise PeftError(f"adapter_names cannot mix {', '.join(special)} adapters per row yet; run them one at a time")

    def _stacked(self, names: tuple[str, ...], A_of, B_of) -> tuple[torch.Tensor, torch.Tensor]:
        """A (k+1, r_max, d_in) and s·B (k+1, d_out, r_max) of the named adapters, zero-padded to the largest
        rank; the last slot (all zeros) serves rows that use the base model or an adapter this layer lacks."""
        self._check_row_mix(names)
        r_max = max((self.r[n] for n in names if n in self.r), default=1)
        some = next(iter(self.r))  # a layer always holds at least one adapter: it gives the shapes
        A_some, B_some = A_of(some), B_of(some)
        A = A_some.new_zeros(len(names) + 1, r_max, A_some.shape[-1])
        B = B_some.new_zeros(len(names) + 1, B_some.shape[0], r_max)
        for i, name in enumerate(names):
            if name in self.r:
                r = self.r[name]
                A[i, :r] = A_of(name)
                B[i, :, :r] = B_of(name) * self.scaling[name]
        return A, B


class LoraLinear(LoraLayer):
    """LoRA on ``nn.Linear`` and on GPT-2's ``Conv1D`` (weight stored transposed: fan_in_fan_out)."""

    ADAPTER_ATTRS = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        base = self.get_base_layer()
        self.fan_in_fan_out = is_conv1d(base)
        w = base.weight
        self.in_features, self.out_features = (w.shape[0], w.shape[1]) if self.fan_in_fan_out else (w.shape[1], w.shape[0])
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA's m, per adapter

    def update_layer(self, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        if config.fan_in_fan_out != self.fan_in_fan_out:
            warnings.warn(
                f"fan_in_fan_out={config.fan_in_fan_out} does not fit {type(self.get_base_layer()).__name__} targets "
                f"(Conv1D stores its weight transposed, Linear does not); using {self.fan_in_fan_out}", stacklevel=4,
            )
        r, _ = self._set_hyper(adapter_name, config, module_name)
        kw = {"device": self.base_layer.weight.device, "dtype": self._adapter_dtype(config)}
        A = nn.Linear(self.in_features, r, bias=False, **kw)
        B = nn.Linear(r, self.out_features, bias=False, **kw)
        if config.init_lora_weights is True:
            nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
            nn.init.zeros_(B.weight)
        elif config.init_lora_weights == "gaussian":
            nn.init.normal_(A.weight, std=1 / r)
            nn.init.zeros_(B.weight)
        self.lora_A[adapter_name] = A
        self.lora_B[adapter_name] = B
        self._init_variant(adapter_name, config)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        return lora_delta_weight(
            self.lora_A[adapter_name].weight.float(), self.lora_B[adapter_name].weight.float(),
            self.scaling[adapter_name], self.fan_in_fan_out,
        )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        off = self.adapters_off()
        # ---- the fused path (lora_kernels.py): plain LoRA adapters, base + s·B A x̃ in one autograd node ----
        if (not off and self.row_adapters is None and not args and not kwargs and fused_enabled()
                and self.active_adapters and all(type(v) is LoraVariant or type(v) in FUSED_VARIANTS
                                                for v in map(self.variant.__getitem__, self.active_adapters))):
            # siblings reading this x (q, k, v; gate, up) as one node, grouped when LoRA was added (lora_joint.py)
            out = joined_forward(self, x) if len(self.active_adapters) == 1 else None
            return out if out is not None else lora_linear_forward(self, x, self.active_adapters)
        # ---- the reference path: base layer, then each adapter's variant --------------------------------
        if not off and self.row_adapters is not None:  # each row through its own adapter (lora_kernels.per_row_lora)
            rows = self.row_adapters
            rows.check_batch(x.shape[0])
            return per_row_lora(self, x, None if not args and not kwargs else self.base_layer(x, *args, **kwargs),
                                rows)
        result = self.base_layer(x, *args, **kwargs)
        if off:
            return result
        for name in self.active_adapters:
            result = self.variant[name].forward(self, name, x, result)
        return result


class LoraEmbedding(LoraLayer):
    """LoRA on ``nn.Embedding``: y = E[ids] + s · (A^T[ids]) B^T. No dropout (as in HF PEFT)."""

    ADAPTER_ATTRS = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def update_layer(self, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        r, _ = self._set_hyper(adapter_name, config, module_name)
        base = self.get_base_layer()
        kw = {"device": base.weight.device, "dtype": self._adapter_dtype(config)}
        A = torch.empty(r, base.num_embeddings, **kw)
        B = torch.empty(base.embedding_dim, r, **kw)
        if config.init_lora_weights is False:
            nn.init.normal_(A)  # a non-zero adapter, as HF PEFT's init_lora_weights=False
        else:
            nn.init.zeros_(A)
        nn.init.normal_(B)
        self.lora_embedding_A[adapter_name] = nn.Parameter(A)
        self.lora_embedding_B[adapter_name] = nn.Parameter(B)
        self._init_variant(adapter_name, config)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        A = self.lora_embedding_A[adapter_name].float()
        B = self.lora_embedding_B[adapter_name].float()
        return lora_delta_weight(A, B, self.scaling[adapter_name]).T  # (num_embeddings, dim)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        off = self.adapters_off()
        result = self.base_layer(x, *args, **kwargs)
        if off:
            return result
        if self.row_adapters is not None:
            return result + self._per_row(x).to(result.dtype)
        base = self.get_base_layer()
        for name in self.active_adapters:
            A = self.lora_embedding_A[name]
            after_a = F.embedding(x, A.T, base.padding_idx, base.max_norm, base.norm_type,
                                  base.scale_grad_by_freq, base.sparse)
            result = result + ((after_a @ self.lora_embedding_B[name].T) * self.scaling[name]).to(result.dtype)
        return result

    def _per_row(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.row_adapters
        index = rows.for_batch(ids.shape[0], ids.device)
        A, B = self._stacked(rows.names, self.lora_embedding_A.__getitem__, self.lora_embedding_B.__getitem__)
        pick = torch.where(index < 0, len(rows.names), index)
        flat = ids.reshape(ids.shape[0], -1)
        after_a = A.transpose(1, 2)[pick[:, None], flat]  # (batch, tokens, r_max)
        out = torch.bmm(after_a, B[pick].transpose(1, 2))
        return out.reshape(*ids.shape, B.shape[1])


class LoraConv2d(LoraLayer):
    """LoRA on ``nn.Conv2d``: A has the base's kernel, stride and padding; B is a 1x1 convolution."""

    ADAPTER_ATTRS = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Conv2d) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def update_layer(self, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        r, _ = self._set_hyper(adapter_name, config, module_name)
        base = self.get_base_layer()
        kw = {"device": base.weight.device, "dtype": self._adapter_dtype(config)}
        A = nn.Conv2d(base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation,
                      bias=False, **kw)
        B = nn.Conv2d(r, base.out_channels, 1, 1, bias=False, **kw)
        if config.init_lora_weights is True:
            nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
            nn.init.zeros_(B.weight)
        elif config.init_lora_weights == "gaussian":
            nn.init.normal_(A.weight, std=1 / r)
            nn.init.zeros_(B.weight)
        self.lora_A[adapter_name] = A
        self.lora_B[adapter_name] = B
        self._init_variant(adapter_name, config)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        A = self.lora_A[adapter_name].weight.float()  # (r, in, kh, kw)
        B = self.lora_B[adapter_name].weight.float()  # (out, r, 1, 1)
        return torch.einsum("or,rikl->oikl", B[:, :, 0, 0], A) * self.scaling[adapter_name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        off = self.adapters_off()
        result = self.base_layer(x, *args, **kwargs)
        if off:
            return result
        rows = self.row_adapters
        if rows is not None:  # a convolution per distinct adapter, on its rows
            index = rows.for_batch(x.shape[0], x.device)
            for i, name in enumerate(rows.names):
                picked = (index == i).nonzero().squeeze(1)
                if picked.numel() and name in self.r:
                    xa = x[picked].to(self.lora_A[name].weight.dtype)
                    delta = self.lora_B[name](self.lora_A[name](xa)) * self.scaling[name]
                    result = result.index_add(0, picked, delta.to(result.dtype))
            return result
        for name in self.active_adapters:
            A = self.lora_A[name]
            xa = self.lora_dropout[name](x.to(A.weight.dtype))
            result = result + (self.lora_B[name](A(xa)) * self.scaling[name]).to(result.dtype)
        return result


def lora_layer_for(module: nn.Module) -> type[LoraLayer] | None:
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return LoraLinear
    if isinstance(module, nn.Embedding):
        return LoraEmbedding
    if isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros":
        return LoraConv2d
    return None


LORA = register_method(MethodSpec(
    config_cls=LoraConfig, layer_base=LoraLayer, layer_for=lora_layer_for, after_inject=link_siblings,
    supported="Linear, transformers Conv1D, Embedding, Conv2d (groups=1)",
))
