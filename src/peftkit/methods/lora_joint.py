"""Sibling LoRA targets that read one input (q, k, v; gate, up) computed jointly, in one autograd node.

Per target, :class:`~peftkit.methods.lora_kernels.LoraFunction` already saves x once for the whole group and
draws one dropout mask for it. What it cannot share is the work: each target reads x̄ for its own A x̄ (forward)
and again for its g_A = g_hᵀ x̄ (backward), writes its own g_h A term into a fresh input-sized tensor, masks
it, and autograd then adds the targets' input gradients one by one. With rank 16 on hidden 512 those are passes
over tokens × hidden tensors, each as dear as a skinny matmul. :class:`JointLoraFunction` does, for targets
i = 1..n reading x:

    forward        H = x̄ [A₁; …; Aₙ]ᵀ                        (one read of x̄ for every target's A)
                   yᵢ = x Wᵢᵀ + bᵢ + s̄ᵢ · Hᵢ Bᵢᵀ              (Hᵢ the i-th block of H's columns; the term
                                                              first, x Wᵢᵀ accumulated into it by the matmul)
    backward       g_Hᵢ = s̄ᵢ · gᵢ Bᵢ,   g_Bᵢ = s̄ᵢ · gᵢᵀ Hᵢ
                   [g_A₁; …; g_Aₙ] = g_Hᵀ x̄                   (one read of x̄)
                   g_x = (g_H [A₁; …; Aₙ]) ⊙ keep + Σ gᵢ Wᵢ   (one masked term; each gᵢ Wᵢ accumulated into it
                                                              by the matmul, no autograd sums)

The same numbers as the per-target path up to the order of the sums (tested against it and against the
plain-torch reference), the same saved bytes (x once; H is the targets' h side by side), the same masks (one
seed per input, as the siblings share on the per-target path).

Which targets are siblings is decided when LoRA is added, from the model's structure: LoRA layers that are
children of one module under the names of one known set (q_proj, k_proj, v_proj; query, key, value; q, k, v;
gate_proj, up_proj; w1, w3, ...) form a group led by the first of the set (the one a model calls first).
Cross-attention modules (encoder_attn, EncDecAttention, crossattention, cross_attn) are left out: their q reads
another input than k and v. A decision that depends on the module tree, not on earlier calls, keeps a run
bit-identical to a resumed one (both join from their first step). When the leader is called with gradients
enabled, the group's output for every member is computed at once; each follower, called next with the very same
input (same tensor, same version, same parameter versions), takes its output instead of computing it. A follower
called with anything else computes its own output as before, and the group is dropped for good (a model whose
siblings do not read one input, or not in the set's order, pays the joint computation once; the drop takes
effect at the leader's next call outside a backward pass, so that a checkpointed forward, replayed inside
backward, saves what it saved the first time). Joining happens only with gradients on (inference keeps the
per-target path), not in inference mode (no version counters), not under torch.compile or autocast, with no
forward pre-hooks on any member (FSDP's per-module unsharding, parametrisations), every member plain LoRA with one
active adapter, one dropout probability, base weights of x's dtype and adapters of one dtype, x's or wider (fp32
adapters on a bf16 base: x̄ and H in the adapters' dtype from a transient cast of x, each term cast and added to
x Wᵢᵀ + bᵢ in the per-target path's order; the input gradient's LoRA terms are summed in the adapters' dtype).

``use_joint(False)`` or ``PEFTKIT_LORA_JOINT=0`` turns it off (each target then takes its own node).
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from ..quantize import dense_weight
from .lora_kernels import (
    _base_matmul,
    _dropped_for_backward,
    _frozen_base_weight,
    adapter_weights,
    as_dtype,
    drop_,
    dropout_p,
    fused_enabled,
    input_choice,
    keep_probability,
    lora_term_plus_base,
    outer_grad,
    saves_dropped,
    shared_dropout,
    verify_inputs,
    version_of,
    wide_matmul_dtype,
)

_JOINT = os.environ.get("PEFTKIT_LORA_JOINT", "1").lower() not in ("0", "false", "no", "off")


@contextlib.contextmanager
def use_joint(enabled: bool) -> Iterator[None]:
    """``with use_joint(False): ...`` computes every LoRA target in its own node inside the block (process-wide)."""
    global _JOINT
    before, _JOINT = _JOINT, enabled
    try:
        yield
    finally:
        _JOINT = before


SIBLING_NAMES: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q", "k", "v"), ("q_lin", "k_lin", "v_lin"),
    ("wq", "wk", "wv"), ("gate_proj", "up_proj"), ("w1", "w3"),
)  # each in the order models call them
CROSS_ATTENTION = ("encoder_attn", "encdecattention", "crossattention", "cross_attn")
_FOLLOWERS = "_lora_followers"  # on a leader: its followers (modules), () once dropped
_DROP = "_lora_drop_group"  # on a leader: True once a follower read another input (dropped at its next call)


def link_siblings(model: nn.Module, *_: Any) -> None:
    """Mark the sibling groups among ``model``'s LoRA layers (run after every LoRA injection: ``after_inject``)."""
    from .lora import LoraLinear  # lora.py imports this module

    for path, module in model.named_modules():
        if any(word in path.lower() for word in CROSS_ATTENTION):
            continue
        children = dict(module.named_children())
        for names in SIBLING_NAMES:
            members = [children[n] for n in names if type(children.get(n)) is LoraLinear]
            for member in members:
                member.__dict__.pop(_FOLLOWERS, None)
                member.__dict__.pop(_DROP, None)
            if len(members) >= 2:
                members[0].__dict__[_FOLLOWERS] = tuple(members[1:])  # plain attribute: not a submodule


class _State(threading.local):
    """Per thread: the outputs computed for a group's followers and not taken yet."""

    def __init__(self) -> None:
        self.pending: dict[int, tuple[Any, ...]] = {}


_state = _State()


def _member(layer: Any, x: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor, Any, float] | None:
    """(adapter, A, B, base Linear, p) where ``layer`` may join a group on input x now, else None."""
    if (layer.row_adapters is not None or layer.adapters_off() or len(layer.active_adapters) != 1
            or layer._forward_pre_hooks or layer.fan_in_fan_out):
        return None
    name = layer.active_adapters[0]
    if name not in layer.r or type(layer.variant[name]) is not _plain_variant():
        return None
    base = layer._modules["base_layer"]
    A, B = adapter_weights(layer, name)
    weight = _frozen_base_weight(base)
    if weight is None or weight.dtype != x.dtype or A.dtype != B.dtype:
        return None
    if A.dtype != x.dtype and not (A.is_floating_point() and x.is_floating_point()):
        return None  # the adapter may be wider than x (fp32 adapters on a bf16 base, the default there)
    if type(A) is not nn.Parameter or type(B) is not nn.Parameter or A.device != x.device:
        return None  # e.g. a DTensor shard (FSDP2 per module)
    return name, A, B, base, dropout_p(layer, name)


def _plain_variant() -> type:
    from .lora import LoraVariant  # lora.py imports this module

    return LoraVariant


def _param_versions(member: tuple[str, torch.Tensor, torch.Tensor, Any, float]) -> tuple[int, ...]:
    _, A, B, base, _ = member
    return A._version, B._version, base.weight._version


def _joinable_now(x: torch.Tensor) -> bool:
    return (_JOINT and fused_enabled() and torch.is_grad_enabled() and not x.is_inference() and not nn.modules.module._global_forward_pre_hooks
            and not torch.is_autocast_enabled(x.device.type))


def _drop_group(leader: nn.Module) -> None:
    """Ask that ``leader``'s group be dropped: done at its next call outside a backward pass. A checkpointed
    forward replayed inside backward must save what the original forward saved, so the replay still joins."""
    if leader.__dict__.get(_FOLLOWERS):
        leader.__dict__[_DROP] = True


def joined_forward(layer: Any, x: torch.Tensor) -> torch.Tensor | None:
    """``layer``'s output on x from its group's joint computation, or None (then the caller computes it alone).

    Called by ``LoraLinear.forward`` on the fused path, before anything else."""
    if torch.compiler.is_compiling():
        return None
    followers = layer.__dict__.get(_FOLLOWERS)
    pending = _state.pending
    if not followers and not pending:  # the usual case for a layer outside any group: nothing to look up
        return None
    if not _joinable_now(x):
        _state.pending = {}
        return None
    entry = pending.pop(id(layer), None)
    if entry is not None:
        x_ref, version, leader_ref, versions, out = entry
        member = _member(layer, x)
        if x_ref() is x and version == version_of(x) and member is not None and _param_versions(member) == versions:
            return out
        leader = leader_ref()
        if leader is not None:
            _drop_group(leader)  # the follower read something else: no group, ever
    if not followers:
        return None
    if layer.__dict__.get(_DROP) and torch._C._current_graph_task_id() == -1:
        layer.__dict__[_FOLLOWERS] = ()
        return None
    lead = _member(layer, x)
    if lead is None:
        return None
    members, layers = [lead], [layer]
    for follower in followers:
        member = _member(follower, x)
        if member is None or member[4] != lead[4] or member[1].dtype != lead[1].dtype:
            return None  # not now (eval mode, another adapter, ...): the group stays for later calls
        members.append(member)
        layers.append(follower)
    if pending:  # a previous group's outputs never taken: its followers read other inputs
        for _, _, leader_ref, _, _ in pending.values():
            leader = leader_ref()
            if leader is not None:
                _drop_group(leader)
        _state.pending = pending = {}
    p = lead[4]
    dropped, seed, gaps = shared_dropout(x, p, lead[1].dtype) if p > 0 else (None, 0, None)  # x̄ in A's dtype
    tensors: list[torch.Tensor | None] = []
    for _, A, B, base, _ in members:
        tensors += [base.weight, base.bias, A, B]
    scalings = tuple(m_layer.scaling[m[0]] for m_layer, m in zip(layers, members, strict=True))
    choice = input_choice(layer) if p > 0 else None
    outs = JointLoraFunction.apply(x, dropped, scalings, p, seed, gaps, choice, *tensors)
    x_ref, version, leader_ref = weakref.ref(x), version_of(x), weakref.ref(layer)
    for follower, member, out in zip(layers[1:], members[1:], outs[1:], strict=True):
        pending[id(follower)] = (x_ref, version, leader_ref, _param_versions(member), out)
    return outs[0]


class JointLoraFunction(torch.autograd.Function):
    """The outputs y₁..yₙ of n LoRA targets on one input x in one node (see the module's docstring).

    ``tensors``: per target (W (d_out, d_in), frozen, plain or NF4, and bias or None, in x's dtype; A (r, d_in) and
    B (d_out, r) in the adapters' dtype, x's or wider); ``dropped`` is x̄ = x ⊙ keep in the adapters' dtype (mask of
    ``seed``) or None without dropout; ``gaps`` the mask's gaps kept for backward or None (backward draws them
    again from ``seed``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dropped: torch.Tensor | None, scalings: tuple[float, ...], p: float,
                seed: int, gaps: torch.Tensor | None, choice: Any, *tensors: torch.Tensor | None
                ) -> tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)
        n = len(scalings)
        weights, biases, As, Bs = tensors[0::4], tensors[1::4], tensors[2::4], tensors[3::4]
        if p > 0:
            scalings = tuple(s / keep_probability(p, x.device) for s in scalings)
        d_in = x.shape[-1]
        x2 = x.reshape(-1, d_in)
        ad = As[0].dtype  # the adapters' dtype: x's, or wider (fp32 adapters on a bf16 base); x is cast, never kept
        H = (dropped.reshape(-1, d_in) if dropped is not None else as_dtype(x2, ad)
             ) @ torch.cat(As).T  # (tokens, Σ r)
        outs, start = [], 0
        term_first = ad == x.dtype and wide_matmul_dtype(x.dtype, x.device) is None
        for i in range(n):
            r = Bs[i].shape[1]
            w_t, h = dense_weight(weights[i], x.dtype).T, H[:, start:start + r]
            if ad != x.dtype:  # the reference's order: (h Bᵀ)·s in the adapter's dtype, cast, added to x Wᵀ + b
                y = _base_matmul(x2, w_t, biases[i]).add_((h @ Bs[i].T).mul_(scalings[i]).to(x.dtype))
            elif term_first:
                y = lora_term_plus_base(h, Bs[i], scalings[i], biases[i], x2, w_t)  # the term first, then x Wᵢᵀ into it
            else:
                y = _base_matmul(x2, w_t, biases[i]).addmm_(h, Bs[i].T, alpha=scalings[i])
            outs.append(y.view(*x.shape[:-1], -1))
            start += r
        # x̄ where nothing else keeps x (lora_kernels.InputChoice), else x
        need_A = any(ctx.needs_input_grad[7 + 4 * i + 2] for i in range(n))
        ctx.saved_dropped = need_A and saves_dropped(x, dropped, choice)
        ctx.save_for_backward(dropped if ctx.saved_dropped else x, H, gaps, *weights, *As, *Bs)
        ctx.scalings, ctx.p, ctx.seed, ctx.n = scalings, p, seed, n
        ctx.has_bias = tuple(b is not None for b in biases)
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        verify_inputs()
        n = ctx.n
        x, H, gaps, *rest = ctx.saved_tensors
        weights, As, Bs = rest[:n], rest[n:2 * n], rest[2 * n:]
        need = ctx.needs_input_grad  # x, dropped, scalings, p, seed, gaps, choice, then (W, b, A, B) per target
        need = need[:6] + need[7:]  # without choice's: need[6 + 4i + k] is target i's k-th tensor
        d_in, ad = x.shape[-1], H.dtype  # H is in the adapters' dtype
        gs = [None if g is None else g.reshape(-1, g.shape[-1]) for g in grads]
        grad_H = H.new_zeros(H.shape) if any(g is None for g in gs) else None
        parts, grad_tensors, start = [], [], 0
        for i in range(n):
            r, g, s = Bs[i].shape[1], gs[i], ctx.scalings[i]
            gb = None
            if g is None:
                parts.append(None if grad_H is None else grad_H[:, start:start + r])
            else:
                ga = as_dtype(g, ad)
                gh = (ga @ Bs[i]).mul_(s)
                if grad_H is not None:
                    grad_H[:, start:start + r] = gh
                parts.append(gh)
                if need[6 + 4 * i + 3]:
                    gb = outer_grad(ga, H[:, start:start + r], s)
            grad_tensors.append([None, g.sum(0) if g is not None and need[6 + 4 * i + 1] else None, None, gb])
            start += r
        if grad_H is None:
            grad_H = torch.cat(parts, 1)
        drops = dropped = None
        need_A = any(need[6 + 4 * i + 2] for i in range(n))
        if ctx.p > 0:
            drops, dropped = _dropped_for_backward(x, ctx.p, ctx.seed, ad, need_A, gaps, ctx.saved_dropped)
        elif need_A:
            dropped = as_dtype(x, ad)
        if need_A:
            grad_A = grad_H.T @ dropped.reshape(-1, d_in)  # (Σ r, d_in)
            start = 0
            for i in range(n):
                r = Bs[i].shape[1]
                if need[6 + 4 * i + 2] and gs[i] is not None:
                    grad_tensors[i][2] = grad_A[start:start + r]
                start += r
        grad_x = None
        if need[0]:
            grad_x = grad_H @ torch.cat(As)
            if drops is not None:
                drop_(grad_x, drops)
            if ad != x.dtype:
                grad_x = grad_x.to(x.dtype)  # the LoRA terms summed in the adapters' dtype, then cast
            for i in range(n):
                if gs[i] is None:
                    continue
                w = dense_weight(weights[i], gs[i].dtype)
                if wide_matmul_dtype(gs[i].dtype, gs[i].device) is None:
                    grad_x.addmm_(gs[i], w)
                else:
                    grad_x.add_(_base_matmul(gs[i], w, None))
            grad_x = grad_x.view(x.shape)
        flat = [t for per in grad_tensors for t in per]
        return (grad_x, None, None, None, None, None, None, *flat)
