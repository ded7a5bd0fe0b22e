"""VeRA (Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation").

    y = W x + Λ_b B Λ_d A dropout(x),      ΔW = Λ_b B Λ_d A      (Λ_v = diag(v))

One pair of frozen random matrices per adapter, shared by all its layers: A (r, d_in_max) and B (d_out_max, r),
sized to the element-wise largest (d_out, d_in) of the adapter's targets; a layer with d_in inputs and d_out
outputs uses A[:, :d_in] and B[:d_out, :]. Each layer trains only d (r,) and b (d_out,): r + d_out parameters.
Defaults are HF PEFT's: r=256, d = d_initial = 0.1 and b = 0 (a fresh adapter is the base model);
``init_weights=False``: b = 1, d ~ N(0, 1). Targets: ``nn.Linear`` and GPT-2's ``Conv1D`` (fan_in_fan_out).

A and B come from ``projection_prng_key`` by HF PEFT's recipe, bit for bit: one CPU ``torch.Generator`` seeded
with the key draws A then B, each fp32 Kaiming-uniform over its fan-in (columns): U(±sqrt(3)·sqrt(2)/sqrt(fan)).
Files hold ``base_model.vera_A`` / ``base_model.vera_B`` when ``save_projection`` (else they are regenerated)
and per layer ``<path>.vera_lambda_b`` / ``<path>.vera_lambda_d``. The projections live in one
:class:`VeraProjections` module referenced by every VeRA layer of a model (``.to()`` moves it once).
Unlike HF PEFT, where later adapters reuse the first adapter's projections (and fail for another r), each
adapter gets its own, as if it were alone: its outputs and files do not depend on what else is loaded.

Training (:class:`VeraFunction`, without dropout): one autograd node per adapter that saves only u = x Aᵀ
(tokens × r), and one u serves every sibling target reading the same input with the same A slice (q, k, v;
gate, up): it is computed once. Plain autograd keeps u and the (tokens × d_out) output of B per target; the
gradient of b needs Σ_tokens g ⊙ (u Λ_d Bᵀ) = rowsum(B ⊙ (gᵀ u) Λ_d), one (d_out × r) matmul instead.
"""

from __future__ import annotations

import math
import threading
import warnings
import weakref
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..configs.vera import SharedProjections, VeraConfig
from ..errors import PeftConfigError, PeftError, TargetModulesError
from ..targeting import describe_candidates, find_targets, is_conv1d
from ..targeting import model_type as family
from .base import AdapterLayer, MethodSpec, adapter_layers, register_method
from .lora_kernels import fused_enabled, version_of

# HF PEFT's default target_modules for VeRA, by model_type (the common families)
DEFAULT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(["llama", "llama4", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                     "opt", "phi", "bart", "gptj", "gpt_neo"], ["q_proj", "v_proj"]),
    **dict.fromkeys(["gpt2", "gpt_bigcode"], ["c_attn"]),
    **dict.fromkeys(["bert", "roberta"], ["query", "value"]),
    **dict.fromkeys(["bloom", "gpt_neox", "falcon"], ["query_key_value"]),
    "t5": ["q", "v"], "deberta-v2": ["query_proj", "value_proj"],
}


# ---- the maths, as pure functions ------------------------------------------------------------------
def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """HF PEFT's ``_kaiming_init``: fp32 on CPU, U(-bound, bound), bound = sqrt(3)·sqrt(2)/sqrt(shape[1])."""
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


def vera_projections(prng_key: int, r: int, d_in: int, d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, d_in) then B (d_out, r) from one CPU generator seeded with ``prng_key`` (HF PEFT's order)."""
    generator = torch.Generator(device="cpu").manual_seed(prng_key)
    return kaiming_uniform((r, d_in), generator), kaiming_uniform((d_out, r), generator)


def vera_delta_weight(A: torch.Tensor, B: torch.Tensor, d: torch.Tensor, b: torch.Tensor,
                      fan_in_fan_out: bool = False) -> torch.Tensor:
    """ΔW = Λ_b B Λ_d A for sliced A (r, d_in), B (d_out, r); (d_in, d_out) for Conv1D (fan_in_fan_out)."""
    delta = (b[:, None] * B) @ (d[:, None] * A)
    return delta.T if fan_in_fan_out else delta


def out_in_features(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a Linear (weight (out, in)) or a GPT-2 Conv1D (weight (in, out))."""
    out_features, in_features = module.weight.shape
    return (in_features, out_features) if is_conv1d(module) else (out_features, in_features)


# ---- the shared projections ------------------------------------------------------------------------
class VeraProjections(nn.Module):
    """Each VeRA adapter's frozen A and B, buffers ``vera_A.<adapter>`` / ``vera_B.<adapter>``; one per model,
    a child of every VeRA layer. ``users`` counts the layers holding each adapter: the last to let go drops it."""

    def __init__(self, prng_key: int, save_projection: bool) -> None:
        super().__init__()
        self.prng_key = prng_key
        self.save_projection = save_projection
        self.vera_A = nn.Module()
        self.vera_B = nn.Module()
        self.users: dict[str, int] = {}

    def acquire(self, adapter_name: str, r: int, shape: tuple[int, int], like: torch.Tensor) -> None:
        if adapter_name not in self.users:
            A, B = vera_projections(self.prng_key, r, shape[1], shape[0])
            for holder, tensor in ((self.vera_A, A), (self.vera_B, B)):  # persistent as in HF PEFT
                holder.register_buffer(adapter_name, tensor.to(like), persistent=self.save_projection)
        self.users[adapter_name] = self.users.get(adapter_name, 0) + 1

    def release(self, adapter_name: str) -> None:
        self.users[adapter_name] -= 1
        if not self.users[adapter_name]:
            del self.users[adapter_name], self.vera_A._buffers[adapter_name], self.vera_B._buffers[adapter_name]

    def get(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.vera_A._buffers[adapter_name], self.vera_B._buffers[adapter_name]

    def extra_repr(self) -> str:
        return f"prng_key={self.prng_key}, adapters={list(self.users)}"


# SharedProjections and VeraConfig: peftkit.configs.vera (torch-free: reading a file needs no tensors)


def find_projections(model: nn.Module) -> VeraProjections | None:
    """The model's projections module: the one every VeRA layer holds (None while it has no VeRA adapter)."""
    return next((layer.vera_projections for _, layer in adapter_layers(model) if isinstance(layer, VeraLinear)), None)


def prepare_vera_config(model: nn.Module, config: VeraConfig) -> VeraConfig:
    """Default targets; HF PEFT's rules for several adapters (one key, one save_projection); the largest
    (d_out, d_in) of the targets. Raises before the model is touched."""
    if config.target_modules is None:
        model_type = family(model)
        if model_type not in DEFAULT_TARGETS:
            raise TargetModulesError(
                f"VeRA has no default target_modules for model_type {model_type!r}; set target_modules to some "
                f"of: {describe_candidates(model)}"
            )
        config = config.copy(target_modules=list(DEFAULT_TARGETS[model_type]))
    module = find_projections(model)
    if module is not None and module.prng_key != config.projection_prng_key:
        raise PeftConfigError(
            f"projection_prng_key={config.projection_prng_key} differs from the key {module.prng_key} of this model's "
            f"VeRA adapter(s) {list(module.users)}; all VeRA adapters of a model share one key: use {module.prng_key}"
        )
    if module is not None and module.save_projection != config.save_projection:
        raise PeftConfigError(
            f"save_projection={config.save_projection} differs from this model's VeRA adapter(s) {list(module.users)}; "
            f"projections are saved for all VeRA adapters or none: use save_projection={module.save_projection}"
        )
    shape: tuple[int, int] | None = None
    for name in find_targets(model, config):
        target = model.get_submodule(name)
        base = target.get_base_layer() if isinstance(target, AdapterLayer) else target
        if vera_layer_for(base) is None:
            raise TargetModulesError(
                f"target {name!r} is a {type(base).__name__}, which VERA cannot adapt (supported: Linear, "
                "transformers Conv1D); narrow target_modules"
            )
        here = out_in_features(base)
        shape = here if shape is None else (max(shape[0], here[0]), max(shape[1], here[1]))
    module = module or VeraProjections(config.projection_prng_key, config.save_projection)
    return config.copy(projections=SharedProjections(module, shape))


def vera_shared_tensors(model: nn.Module, adapter_name: str, config: VeraConfig) -> dict[str, torch.Tensor]:
    """The adapter's live A and B (file keys ``base_model.vera_A/B``) when ``save_projection``, else nothing."""
    module = find_projections(model)
    if not config.save_projection or module is None or adapter_name not in module.users:
        return {}
    A, B = module.get(adapter_name)
    return {"vera_A": A, "vera_B": B}


# ---- the fused training path ----------------------------------------------------------------------------
def vera_forward(projected: torch.Tensor, result: torch.Tensor, B: torch.Tensor, d: torch.Tensor,
                 b: torch.Tensor) -> torch.Tensor:
    """result + b ⊙ ((u ⊙ d) Bᵀ): :class:`VeraFunction`'s forward computation, called directly (no node) when
    gradients are off."""
    y = torch.addcmul(result.reshape(-1, B.shape[0]), (projected * d) @ B.T, b)
    return y.view(result.shape)


class VeraFunction(torch.autograd.Function):
    """y = result + b ⊙ ((u ⊙ d) Bᵀ), u = x Aᵀ given (no graph: :func:`shared_projection`); saves u, not x.

    x (..., d_in); u (tokens, r); result (..., d_out); A (r, d_in), B (d_out, r) frozen; d (r,), b (d_out,).
    Backward (g = ∂L/∂y, g_u = (g ⊙ b) B): g_b = rowsum(B ⊙ (gᵀ u) ⊙ d), g_d = Σ g_u ⊙ u, g_x = (g_u ⊙ d) A."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, projected: torch.Tensor, result: torch.Tensor, A: torch.Tensor,
                B: torch.Tensor, d: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(projected, A, B, d, b)
        ctx.x_shape = x.shape
        return vera_forward(projected, result, B, d, b)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        projected, A, B, d, b = ctx.saved_tensors
        need = ctx.needs_input_grad
        g = grad_out.reshape(-1, B.shape[0])
        grad_x = grad_d = grad_b = None
        if need[6]:
            grad_b = ((g.T @ projected) * B).mul_(d).sum(1)
        if need[0] or need[5]:
            g_u = (g * b) @ B  # (tokens, r)
            if need[5]:
                grad_d = torch.linalg.vecdot(g_u.T, projected.T)
            if need[0]:
                grad_x = (g_u * d) @ A
                grad_x = grad_x.view(ctx.x_shape)
        return grad_x, None, grad_out if need[2] else None, None, None, grad_d, grad_b


class _ProjectionCache(threading.local):
    """The last u = x Aᵀ: (input (weakly), its version, A's storage, offset, shape and version) -> u."""

    def __init__(self) -> None:
        self.key: tuple[Any, ...] | None = None
        self.projected: torch.Tensor | None = None


_projections = _ProjectionCache()


def shared_projection(x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """u = x Aᵀ (tokens, r) without a graph; a sibling target calling with the same x (same version) and the same
    A slice gets the same tensor, computed once and saved once. Holds one u until another input arrives."""
    version = version_of(x)
    key = (version, A.data_ptr(), A.storage_offset(), A.shape, A._version, A.dtype)
    cached = _projections.key
    if cached is not None and cached[0]() is x and cached[1:] == key:
        return _projections.projected
    _projections.projected = None
    with torch.no_grad():
        projected = x.detach().reshape(-1, A.shape[1]) @ A.T
    _projections.key, _projections.projected = (weakref.ref(x), *key), projected
    return projected


# ---- the layer -------------------------------------------------------------------------------------
class VeraLinear(AdapterLayer):
    """VeRA on ``nn.Linear`` and GPT-2's ``Conv1D``: trains ``vera_lambda_d`` (r,) and ``vera_lambda_b`` (d_out,)."""

    ADAPTER_ATTRS = ("vera_lambda_b", "vera_lambda_d")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        base = self.get_base_layer()
        self.fan_in_fan_out = is_conv1d(base)
        self.out_features, self.in_features = out_in_features(base)
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.register_module("vera_projections", None)

    def update_layer(self, adapter_name: str, config: VeraConfig, module_name: str) -> None:
        shared = config.projections
        if shared is None:
            raise PeftError("this VeraConfig was not prepared for the model; add VeRA adapters with get_peft_model, "
                            "add_adapter or inject_adapter_in_model")
        if config.fan_in_fan_out != self.fan_in_fan_out:
            warnings.warn(
                f"fan_in_fan_out={config.fan_in_fan_out} does not fit {type(self.get_base_layer()).__name__} targets "
                f"(Conv1D stores its weight transposed, Linear does not); using {self.fan_in_fan_out}", stacklevel=4,
            )
        if self.vera_projections is None:
            self.vera_projections = shared.module
        weight = self.base_layer.weight
        dtype = weight.dtype
        if not dtype.is_floating_point or (config.autocast_adapter_dtype and dtype in (torch.float16, torch.bfloat16)):
            dtype = torch.float32
        b, d = torch.ones(self.out_features), torch.randn(config.r)  # HF PEFT's draws, then its init
        if config.init_weights:
            b.zero_()
            d.fill_(config.d_initial)
        self.vera_lambda_b[adapter_name] = nn.Parameter(b.to(weight.device, dtype))
        self.vera_lambda_d[adapter_name] = nn.Parameter(d.to(weight.device, dtype))
        self.vera_dropout[adapter_name] = nn.Dropout(config.vera_dropout) if config.vera_dropout > 0 else nn.Identity()
        self.r[adapter_name] = config.r
        self.vera_projections.acquire(adapter_name, config.r, shared.shape, self.vera_lambda_d[adapter_name])

    def _forget(self, adapter_name: str) -> None:
        if self.r.pop(adapter_name, None) is not None:
            del self.vera_dropout[adapter_name]
            self.vera_projections.release(adapter_name)

    def sliced_projections(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's part of the adapter's projections: A[:, :d_in] (r, d_in) and B[:d_out, :] (d_out, r)."""
        A, B = self.vera_projections.get(adapter_name)
        return A[:, : self.in_features], B[: self.out_features, :]

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        A, B = self.sliced_projections(adapter_name)
        d, b = self.vera_lambda_d[adapter_name], self.vera_lambda_b[adapter_name]
        return vera_delta_weight(A.float(), B.float(), d.float(), b.float(), self.fan_in_fan_out)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        off = self.adapters_off()
        result = self.base_layer(x, *args, **kwargs)
        if off:
            return result
        if self.row_adapters is not None:
            return result + self._per_row(x).to(result.dtype)
        for name in self.active_adapters:
            d, b = self.vera_lambda_d[name], self.vera_lambda_b[name]
            A, B = (t.to(d) for t in self.sliced_projections(name))
            if (fused_enabled() and (isinstance(self.vera_dropout[name], nn.Identity) or not self.training)
                    and x.dtype == result.dtype == d.dtype == b.dtype):
                if torch.is_grad_enabled():
                    result = VeraFunction.apply(x, shared_projection(x, A), result, A, B, d, b)
                else:  # no node to record
                    result = vera_forward(shared_projection(x, A), result, B, d, b)
                continue
            xd = self.vera_dropout[name](x.to(d.dtype))
            result = result + (b * F.linear(d * F.linear(xd, A), B)).to(result.dtype)
        return result

    def _per_row(self, x: torch.Tensor) -> torch.Tensor:
        """Each row through its own adapter: stack the distinct adapters' (A, B, d, b), zero-padded to the largest
        r (the last, all-zero slot serves base rows), gather per row, two batched matmuls."""
        rows = self.row_adapters
        index = rows.for_batch(x.shape[0], x.device)
        names = [n for n in rows.names if n in self.r]
        if self.training and any(not isinstance(self.vera_dropout[n], nn.Identity) for n in names):
            raise PeftError("adapters mixed per row run without dropout: call model.eval() first")
        like = next(iter(self.vera_lambda_d.values()))  # a layer always holds at least one adapter
        k, r_max = len(rows.names), max((self.r[n] for n in names), default=1)
        pick = torch.where(index < 0, k, index)
        shared = self._shared_projection(names)
        if shared is not None:  # one A and B for all: two plain matmuls, only d and b gathered per row
            like = self.vera_lambda_d[names[0]]
            A, B = (t.to(like) for t in shared)
            d = torch.stack([self.vera_lambda_d[n] if n in self.r else torch.zeros_like(like)
                             for n in rows.names] + [torch.zeros_like(like)])
            b = torch.stack([self.vera_lambda_b[n] if n in self.r else like.new_zeros(self.out_features)
                             for n in rows.names] + [like.new_zeros(self.out_features)])
            xb = x.reshape(x.shape[0], -1, self.in_features).to(A.dtype)
            out = F.linear(F.linear(xb, A) * d[pick, None], B) * b[pick, None]
            return out.reshape(*x.shape[:-1], self.out_features)
        A = like.new_zeros(k + 1, r_max, self.in_features)
        B = like.new_zeros(k + 1, self.out_features, r_max)
        d, b = like.new_zeros(k + 1, r_max), like.new_zeros(k + 1, self.out_features)
        for i, name in enumerate(rows.names):
            if name in self.r:
                r = self.r[name]
                A_i, B_i = self.sliced_projections(name)
                A[i, :r], B[i, :, :r] = A_i, B_i
                d[i, :r], b[i] = self.vera_lambda_d[name], self.vera_lambda_b[name]
        xb = x.reshape(x.shape[0], -1, self.in_features).to(A.dtype)
        h = torch.bmm(xb, A[pick].transpose(1, 2)) * d[pick, None]
        out = torch.bmm(h, B[pick].transpose(1, 2)) * b[pick, None]
        return out.reshape(*x.shape[:-1], self.out_features)


    def _shared_projection(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This layer's (A, B) slices if every named adapter has the same ones (the usual case: one
        projection_prng_key, one r and target set, so the projections regenerate identically), else None.
        Compared once per set of projections (cached by storage and version)."""
        if not names:
            return None
        pairs = [self.sliced_projections(n) for n in names]
        key = tuple((a.data_ptr(), a._version, b.data_ptr(), b._version) for a, b in pairs)
        cached = getattr(self, "_shared_check", None)
        if cached is None or cached[0] != key:
            A0, B0 = pairs[0]
            same = all(a.shape == A0.shape and b.shape == B0.shape and torch.equal(a, A0) and torch.equal(b, B0)
                       for a, b in pairs[1:])
            self._shared_check = cached = (key, same)
        return pairs[0] if cached[1] else None


def vera_layer_for(module: nn.Module) -> type[VeraLinear] | None:
    return VeraLinear if isinstance(module, nn.Linear) or is_conv1d(module) else None


VERA = register_method(MethodSpec(
    config_cls=VeraConfig, layer_base=VeraLinear, layer_for=vera_layer_for, supported="Linear, transformers Conv1D",
    prepare_config=prepare_vera_config, shared_tensors=vera_shared_tensors,
))
