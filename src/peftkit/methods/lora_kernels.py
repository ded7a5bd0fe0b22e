"""The fast LoRA paths: a fused training/inference function, shared dropout masks, cached per-row stacks.

Plain LoRA on a Linear (or GPT-2 Conv1D) computes, for x (..., d_in) and each active adapter,

    y = W x + b + s · B A x̃,      x̃ = x ⊙ keep / (1 − p)   (training with lora_dropout p > 0), else x̃ = x

:class:`LoraFunction` does that in one autograd node and saves only what backward needs:

    saved          x, or with dropout x̄ where nothing else keeps x (:class:`InputChoice`), one tensor for every
                   sibling that reads the same input (q, k, v; gate, up); h = A x̄ (tokens × r); the dropout
                   mask's gaps or bits (or only its seed): backward makes x̄ again, once per sibling group,
                   only where it saved x
    forward        y = addmm(b, x, Wᵀ); y += s̄ · h Bᵀ          (one add-matmul into the output)
    backward       g_B = s̄ · gᵀ h,   g_h = s̄ · g B,   g_A = g_hᵀ x̄
                   g_x = g W  +  (g_h A) ⊙ keep                (without dropout the LoRA term is added into g W
                                                               in place; with it, g W is accumulated into the
                                                               masked term by the matmul)

with x̄ = x ⊙ keep and s̄ = s / (1 − p) (without dropout x̄ = x, s̄ = s): the dropout's 1/(1 − p) rides on the
scalar instead of costing a pass over every input element (forward and backward) and one more over every input
gradient (per target).

With gradients off (evaluation, generation) the same forward computation runs as a plain function
(:func:`lora_forward`), without building the node, whose own cost (~30 µs a call on this project's CPU) is
felt in a generate step, where each matmul sees a few rows.

A frozen W needs no saved input for its own backward (g W only). An NF4 W (QLoRA) is decoded by the function
itself, in forward and again in backward (the packed weight is saved, never the dense one), so a QLoRA target is
one node like a LoRA target (torchao's own linear would be a second node, its g W added to the adapter's by autograd).
When the base is not a plain frozen Linear/Conv1D (nested adapter layers, an int8 base, a trainable W) or when
another adapter came first, the base output ``result`` is computed as usual and the function only adds
``s · h Bᵀ`` into it.

Dropout: the mask comes from one integer seed as the gaps between its dropped elements (:func:`drop_gaps`:
each element dropped independently with probability p, so the run of kept elements before each drop is
geometric; ~p·n draws instead of one per element). x̄ = x ⊙ keep is a copy of x with those elements zeroed, and
backward zeroes them in the input's gradient term the same way (:func:`drop_`: a write of p·n elements, not a
multiply over n). One seed, hence one mask, serves every target that reads the same input tensor (q, k and v read
one normed hidden state): the first target draws it, its siblings find it in a small per-thread cache keyed by the
input tensor's identity and version. HF PEFT draws an independent mask per target; in expectation the two are the
same estimator. In training such siblings usually run as one node instead (methods/lora_joint.py); this function
is the path for every other target and case. The gaps are kept for backward in the narrowest integer dtype that
holds them (uint8 at p = 0.05: ~p bytes an element, 1/80 of x in fp32; never more than the mask as bits would
take); inside torch.compile, with ``use_packed_mask(False)``, or where they would take more, backward draws them
again from the seed. From p = 1/8 (:data:`DENSE_FROM`), where the gaps would take more bytes than the mask as bits,
the mask is drawn dense instead, a 16-bit lane an element (:func:`dense_keep`), and kept as bits
(:func:`pack_bits`): there a gap per few elements costs more time than that too. On a GPU the mask is always
dense and drawn again in backward (the gaps would make the host wait on the device; a draw there is cheap).

The reference: with ``use_fused(False)`` (or ``PEFTKIT_LORA_FUSED=0`` in the environment) every LoRA layer runs
plain torch ops under ordinary autograd, with the same seeds and masks, so outputs and gradients match the
fused path (tested to 1e-6 in fp64). The fused path runs when autocast is off and input and base weight share a
dtype; the adapter's may differ (fp32 adapters on a bf16/fp16 base, the default): then x is saved as it is (bf16,
once per sibling group), x̄ and h = A x̄ are computed in the adapter's dtype from a transient cast, and s̄·h Bᵀ is
cast to x's dtype and added, in the reference's order; the reference (and HF PEFT) keeps an fp32 copy of x per
target instead. DoRA fuses there too (methods/dora.py).
Gradient checkpointing: seeds come from torch's default generator, whose state checkpointing restores, so a
recomputed forward redraws the same masks.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn

from ..quantize import dense_weight, quantization_of
from ..targeting import is_conv1d

_FUSED = os.environ.get("PEFTKIT_LORA_FUSED", "1").lower() not in ("0", "false", "no", "off")


def fused_enabled() -> bool:
    """Whether LoRA layers take the fused path (default True; ``PEFTKIT_LORA_FUSED=0`` turns it off)."""
    return _FUSED


@contextlib.contextmanager
def use_fused(enabled: bool) -> Iterator[None]:
    """``with use_fused(False): ...`` runs the plain-torch reference path inside the block (process-wide)."""
    global _FUSED
    before, _FUSED = _FUSED, enabled
    try:
        yield
    finally:
        _FUSED = before


# ---- dropout: a mask from a seed, shared by the targets that read one input ----------------------------
_KEEP = os.environ.get("PEFTKIT_LORA_PACKED_MASK", "1").lower() not in ("0", "false", "no", "off")
_SIGMAS = 8.0  # gaps drawn beyond the expected count: a second batch is needed with probability ~1e-15


@contextlib.contextmanager
def use_packed_mask(enabled: bool) -> Iterator[None]:
    """``with use_packed_mask(False): ...`` draws dropout masks again in backward instead of keeping their gaps
    (process-wide; ``PEFTKIT_LORA_PACKED_MASK=0`` in the environment for good)."""
    global _KEEP
    before, _KEEP = _KEEP, enabled
    try:
        yield
    finally:
        _KEEP = before


def keep_probability(p: float, device: torch.device | None = None) -> float:
    """The keep rate of the mask of probability p on ``device`` (default CPU): 1 − p for the gaps (drawn from p
    itself); for a dense mask (:func:`dense_mask_from`) 1 − p rounded to its lanes' 2⁻¹⁶ steps, the rate it really
    keeps, so that x̃ = x̄ / keep rate stays unbiased."""
    return 1.0 - (round(p * 2**16) / 2**16 if dense_mask_from(p, device) else p)


def drop_gaps(n: int, p: float, seed: int, device: torch.device) -> torch.Tensor:
    """The dropout mask of probability p over n elements (flattened in row-major order) that ``seed`` determines,
    as the gaps between its dropped elements: int64, each ≥ 1, the k-th dropped element at index
    gap₁ + … + gapₖ − 1, every index < n.

    Each element is dropped independently with probability p (a Bernoulli process), so the number of kept
    elements before each drop is geometric, P(G = j) = (1 − p)ʲ p: G = ⌊ln U / ln(1 − p)⌋ for U uniform on (0, 1)
    (32 random bits each, two per 64-bit draw of a torch generator seeded with ``seed``; logarithm in fp64; the
    distribution is exact but for U's 2⁻³² steps). ~p·n draws instead of one per element, and applying the mask a
    sparse write (:func:`drop_`) instead of a multiply: at p = 0.05 a sibling group's dropout work took 0.43-0.49×
    the time of session 12's dense 16-bit mask in forward, 0.48-0.75× in backward (benchmarks/lora_floor.py
    --parts mask, one thread)."""
    _check_p(p)
    return _gap_drops(n, p, seed, device)[0]


def _check_p(p: float) -> None:
    if not 0 < p < 1:
        raise ValueError(f"a dropout mask needs 0 < p < 1, got p = {p}")


def dense_mask_from(p: float, device: torch.device | None = None) -> bool:
    """Whether a mask of probability p on ``device`` (default CPU) is drawn dense (:func:`dense_keep`) rather than
    as gaps. On CPU from p = 1/8 (:data:`DENSE_FROM`) on, where the gaps in uint8 would take more bytes than bits
    (~p bytes an element against 1/8) and cost more time: the gaps' work grows with p (~10 ns a drop to draw, sum
    and write, and above 1/8 backward draws them again), a dense mask's is ~4 ns an element at every p, forward
    and backward together (benchmarks/lora_floor.py --parts mask: at p 0.1 the gaps were 0.7-0.9× its time, at
    0.05 0.6-0.7×). Elsewhere (a GPU) always: there a draw per element costs next to nothing, and the gaps would
    make the host wait for the device three times a mask (how many gaps cover n, how many fall in it, their
    largest), which a dense mask never does."""
    return p >= DENSE_FROM or (device is not None and device.type != "cpu")


DENSE_FROM = 0.125


def dense_keep(n: int, p: float, seed: int, device: torch.device) -> torch.Tensor:
    """The kept elements (uint8 (n,), 1 where kept, 0 where dropped) of the mask of probability p over n elements
    that ``seed`` determines, where :func:`dense_mask_from` says so: element i is dropped where the i-th 16-bit
    lane of a torch generator seeded with ``seed`` (four a 64-bit draw, every pattern equally likely) is among the
    lowest round(p·2¹⁶) of its 2¹⁶ values: a drop rate of p in 2⁻¹⁶ steps (:func:`keep_probability` scales by the
    rate kept). Kept for backward as bits on CPU (:func:`pack_bits`), drawn again elsewhere."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(2**63), None, generator=generator)  # every 64-bit pattern (no modulo)
    lanes = words.view(torch.int16)[:n]
    return torch.ge(lanes, -(2**15) + round(p * 2**16), out=torch.empty(n, dtype=torch.uint8, device=device))


def _signed(v: int) -> int:
    return v - 2**64 if v >= 2**63 else v


_PACK = 0x0102040810204080  # Σ 2^(56 − 7j): byte j's low bit lands on bit 56 + j of the product
_SPREAD = 0x0101010101010101  # a byte repeated into all eight
_BIT_J = _signed(0x8040201008040201)  # byte j keeps its bit j
_CARRY = 0x7F7F7F7F7F7F7F7F  # a byte's nonzero value carries into its bit 7, never into the next byte


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """0/1 bytes (uint8 (n,)) packed eight a byte, element 8k + j at bit j of byte k (uint8 (⌈n/8⌉,)). The eight
    flags of a 64-bit word gathered by one multiply (in uint64: wraps, as in C) and a shift: ~0.2 ns an element."""
    pad = (-flags.numel()) % 8
    if pad:
        flags = torch.cat([flags, flags.new_zeros(pad)])
    top = flags.view(torch.uint64).mul(_PACK).view(torch.int64)
    return top.bitwise_right_shift_(56).bitwise_and_(0xFF).to(torch.uint8)


def unpack_bits(bits: torch.Tensor, n: int) -> torch.Tensor:
    """:func:`pack_bits`' inverse: uint8 (n,) of 0/1. Each byte spread into a 64-bit word's eight bytes (one
    multiply), byte j masked to bit j, then every nonzero byte turned into 1 (+0x7F carries into bit 7, a shift by 7
    brings it down)."""
    words = bits.to(torch.uint64).mul_(_SPREAD).view(torch.int64)
    words.bitwise_and_(_BIT_J).add_(_CARRY).bitwise_right_shift_(7).bitwise_and_(_SPREAD)
    return words.view(torch.uint8)[:n]


def _draw_drops(n: int, p: float, seed: int, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(gaps, drops) of the mask that ``seed`` determines: below :data:`DENSE_FROM` the gaps (:func:`drop_gaps`) and
    the dropped elements' flat positions (:func:`drop_positions`, from the same cumulative sum that finds where the
    gaps pass n); from it (None, :func:`dense_keep`)."""
    _check_p(p)
    if dense_mask_from(p, device):
        return None, dense_keep(n, p, seed, device)
    return _gap_drops(n, p, seed, device)


def _gap_drops(n: int, p: float, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    scale = 1.0 / math.log1p(-p)
    chunks: list[torch.Tensor] = []
    covered = 0  # elements the gaps so far span
    while covered < n:
        mean = (n - covered) * p
        m = max(int(mean + _SIGMAS * math.sqrt(mean * (1.0 - p))), 0) + 16
        words = torch.empty((m + 1) // 2, dtype=torch.int64, device=device)
        words.random_(-(2**63), None, generator=generator)  # every 64-bit pattern (no modulo)
        u = words.view(torch.int32)[:m].to(torch.float64)  # k ∈ [−2³¹, 2³¹)
        u.mul_(2.0**-32).add_(0.5 + 2.0**-33)  # U = (k + 2³¹ + ½) / 2³² ∈ (0, 1)
        # G + 1 as ⌈ln U / ln(1 − p)⌉: the two differ only where that quotient is exactly a whole number ≥ 1 in fp64
        gaps = u.log_().mul_(scale).ceil_().to(torch.int64)
        chunks.append(gaps)
        ends = gaps.cumsum(0)  # each drop's index + 1, from ``covered`` on
        covered += int(ends[-1])
    if len(chunks) > 1:
        gaps = torch.cat(chunks)
        ends = gaps.cumsum(0)
    count = int(torch.searchsorted(ends, n, right=True))
    return gaps[:count], ends[:count].sub_(1)


def drop_positions(gaps: torch.Tensor) -> torch.Tensor:
    """The flat indices (int64, ascending) of the dropped elements whose gaps :func:`drop_gaps` gave (int64 or
    one of :func:`kept_gaps`' narrow dtypes)."""
    return gaps.to(torch.int64).cumsum(0).sub_(1)


def dropout_keep(shape: torch.Size, p: float, seed: int, device: torch.device,
                 dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """The keep-mask (``shape``) of dropout probability p that ``seed`` determines (:func:`drop_gaps`), on
    ``device``, dense: bool, or 0/1 in ``dtype``. The fused path never builds it; the reference path multiplies
    by it."""
    drops = _draw_drops(shape.numel(), p, seed, device)[1]
    if drops.dtype == torch.uint8:  # dense: already the keep mask
        return _keep_as(drops, shape, dtype)
    return torch.ones(shape.numel(), dtype=dtype, device=device).index_fill_(0, drops, 0).view(shape)


def drop_(t: torch.Tensor, drops: torch.Tensor) -> torch.Tensor:
    """Zero the dropped elements of ``t`` in place (a contiguous tensor of the input's shape, or one viewed as
    (tokens, d_in)). ``drops``: their flat positions (int64, :func:`drop_positions`: a write of p·n elements, no
    pass over the rest), or for a dense mask (p ≥ :data:`DENSE_FROM`) the keep mask over the elements, 0/1 in a
    floating dtype or as :func:`dense_keep`'s bytes: t is multiplied by it, as the reference does."""
    if drops.dtype == torch.int64:
        t.view(-1).index_fill_(0, drops, 0)
    else:
        t.view(-1).mul_(drops.view(-1) if drops.is_floating_point() else drops.view(-1).to(t.dtype))
    return t


def _keep_as(flags: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """:func:`dense_keep`'s bytes as a 0/1 tensor of ``shape`` in ``dtype``."""
    return torch.empty(shape, dtype=dtype, device=flags.device).copy_(flags.view(shape))


def kept_gaps(gaps: torch.Tensor, n: int) -> torch.Tensor | None:
    """The gaps to keep for backward in the narrowest integer dtype that holds them (uint8 when all are ≤ 255, as
    at p = 0.05 nearly always), or None where that would take more bytes than the mask as bits (n/8): then
    backward draws the gaps again from the seed."""
    if gaps.numel() == 0:
        return gaps.to(torch.uint8)
    top = int(gaps.max())
    dtype = next((d for d in (torch.uint8, torch.int16, torch.int32) if top <= torch.iinfo(d).max), torch.int64)
    return gaps.to(dtype) if gaps.numel() * dtype.itemsize * 8 <= n else None


def draw_seed() -> int:
    """One draw from torch's default generator (so ``torch.manual_seed`` governs every mask)."""
    return int(torch.randint(0, 2**62, (1,)).item())


class _SiblingCache(threading.local):
    """Forward: the last dropped input, (input (weakly), its version, p, x̄'s dtype) -> (seed, x̄, kept gaps or bits); x̄ is
    held until another input arrives (at most one input-sized tensor). Backward: the last (drops, x̄) by seed,
    input and dtype, so siblings whose backwards run one after another rebuild x̄ once."""

    def __init__(self) -> None:
        self.key: tuple[Any, int, float, torch.dtype] | None = None
        self.seed = 0
        self.dropped: torch.Tensor | None = None
        self.gaps: torch.Tensor | None = None
        self.backward: tuple[tuple[int, int, torch.Size, torch.dtype], torch.Tensor, torch.Tensor | None] | None = None


_cache = _SiblingCache()


def version_of(x: torch.Tensor) -> int:
    """x's in-place version counter, or -1 for an inference tensor (which keeps none)."""
    return -1 if x.is_inference() else x._version


def shared_dropout(x: torch.Tensor, p: float, dtype: torch.dtype | None = None
                   ) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """(x̄, seed, gaps): x̄ = x ⊙ keep in ``dtype`` (default x's; the adapter's where they differ, e.g. a bf16 x under
    fp32 adapters; x̃ = x̄ / (1 − p), the caller folds the factor into its scaling) with no autograd graph (the
    caller's backward applies the mask), its seed, and the mask's gaps for backward (:func:`kept_gaps`: ~p bytes an
    element) or None (backward draws them again). A sibling target calling with the same tensor (same version)
    gets the same three."""
    dtype = x.dtype if dtype is None else dtype
    key = _cache.key
    version = version_of(x)
    if key is not None and key[0]() is x and key[1:] == (version, p, dtype):
        return _cache.dropped, _cache.seed, _cache.gaps
    seed = draw_seed()
    _cache.dropped = _cache.gaps = None  # free the previous input's x̄ first
    with torch.no_grad():
        gaps, drops = _draw_drops(x.numel(), p, seed, x.device)
        if gaps is None:  # dense (p ≥ DENSE_FROM): x̄ = keep ⊙ x made in the keep mask's buffer, its bits kept
            dropped = _keep_as(drops, x.shape, dtype).mul_(x.detach())
            kept = pack_bits(drops) if keeps_mask() and x.device.type == "cpu" else None
        else:
            dropped = drop_(_dense_copy(x.detach(), dtype), drops)
            kept = kept_gaps(gaps, x.numel()) if keeps_mask() else None
    _cache.key, _cache.seed, _cache.dropped, _cache.gaps = (weakref.ref(x), version, p, dtype), seed, dropped, kept
    return dropped, seed, kept


def shared_seed(x: torch.Tensor, p: float, dtype: torch.dtype | None = None) -> int:
    """The seed :func:`shared_dropout` gives this input (the reference path builds x̃ with autograd from it)."""
    return shared_dropout(x, p, dtype)[1]


def keeps_mask() -> bool:
    """Whether dropout masks are kept for backward (default; not inside torch.compile, where backward draws them
    again): as their gaps below p = 1/8 (at p = 0.05 about 1/20 byte an element, 1/80 of x in fp32; rebuilding
    the positions costs a cumulative sum over p·n numbers), as bits from it (1/8 byte an element, on CPU;
    elsewhere a dense mask is drawn again)."""
    return _KEEP and not torch.compiler.is_compiling()


def _dense_copy(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A new contiguous tensor of x's values in ``dtype`` (x itself is never written)."""
    cast = x.to(dtype, memory_format=torch.contiguous_format)
    return cast.clone() if cast is x else cast


def _dropped_for_backward(x: torch.Tensor, p: float, seed: int, dtype: torch.dtype, need_dropped: bool,
                          gaps: torch.Tensor | None, saved_dropped: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the dropped elements (:func:`drop_`'s ``drops``), x̄ = x ⊙ keep in ``dtype`` or None) of ``seed`` for the
    saved input x, from what forward kept (``gaps``: the gaps, or a dense mask's bits) or drawn again; once for
    siblings whose backwards run in a row. With ``saved_dropped`` forward saved x̄ itself (:class:`InputChoice`): x
    is x̄, returned as it is (never held by the cache)."""
    if saved_dropped:
        return _dropped_for_backward(x, p, seed, dtype, False, gaps)[0], x
    key = (seed, x.data_ptr(), x.shape, dtype)
    cached = _cache.backward
    if cached is not None and cached[0] == key and (cached[2] is not None or not need_dropped):
        return cached[1], cached[2]
    _cache.backward = None
    drops = _drops_for_backward(x.numel(), p, seed, x.device, gaps)
    if drops.dtype == torch.uint8:  # dense: the keep mask in the adapter's dtype, multiplied by twice
        drops = _keep_as(drops, x.shape, dtype)
        dropped = None if not need_dropped else drops.mul(x) if x.dtype == dtype else \
            _dense_copy(x, dtype).mul_(drops)
    else:
        dropped = drop_(_dense_copy(x, dtype), drops) if need_dropped else None
    _cache.backward = (key, drops, dropped)
    return drops, dropped


def _drops_for_backward(n: int, p: float, seed: int, device: torch.device, kept: torch.Tensor | None) -> torch.Tensor:
    """The dropped elements (:func:`drop_`'s ``drops``) from what forward kept of the mask (its gaps, or for a dense
    mask its bits), or drawn again from the seed."""
    if kept is None:
        return _draw_drops(n, p, seed, device)[1]
    return unpack_bits(kept, n) if dense_mask_from(p, device) else drop_positions(kept)


def clear_caches() -> None:
    """Drop this thread's dropout caches (each holds at most one input-sized x̄ and a mask until replaced)."""
    _cache.key, _cache.dropped, _cache.gaps, _cache.backward = None, None, None, None
    _inputs.unverified = {}


# ---- what a node with dropout saves: x, or x̄ where nothing else keeps x ------------------------------------
class InputChoice:
    """Whether a LoRA layer (or a sibling group's leader) with dropout saves its input x for backward, from which
    backward makes x̄ again (a copy of x and a write of the drops), or x̄ itself, which backward reads as it is.

    Backward needs x̄ (g_A = g_hᵀ x̄) and the mask (g_x's term), never x. x̄ takes as many bytes as x (same dtype), so
    saving it instead costs nothing where nothing else keeps x until backward: a norm's output read only by q, k,
    v (or gate, up), an MLP's product read only by down_proj. Where another node saves x too (o_proj's input on
    CPU is a view of the attention's saved output), x̄ would be a second input-sized tensor. So x̄ is saved unless
    x is a view (of something another node may keep) or this layer's input has been found alive at the start of
    a backward pass (:func:`verify_inputs`: it is then kept by something else, and x is saved from then on)."""

    __slots__ = ("keep_input",)

    def __init__(self) -> None:
        self.keep_input = False


class _Inputs:
    """The inputs whose x̄ was saved instead of them, by id(choice): each layer's latest (so at most one a layer).
    One for the process, not per thread: on a GPU autograd runs backward on a device thread of its own."""

    def __init__(self) -> None:
        self.unverified: dict[int, tuple[weakref.ref, InputChoice]] = {}


_inputs = _Inputs()
_CHOICE = "_lora_input_choice"


def input_choice(layer: Any) -> InputChoice:
    """``layer``'s :class:`InputChoice` (made on first use)."""
    choice = layer.__dict__.get(_CHOICE)
    if choice is None:
        choice = layer.__dict__[_CHOICE] = InputChoice()
    return choice


def saves_dropped(x: torch.Tensor, dropped: torch.Tensor | None, choice: InputChoice | None) -> bool:
    """Whether a node saves x̄ (``dropped``) instead of x (:class:`InputChoice`); if so, x is noted, to be looked
    for at the start of backward (:func:`verify_inputs`)."""
    if (dropped is None or choice is None or choice.keep_input or dropped.dtype != x.dtype or x._is_view()
            or torch.compiler.is_compiling()):
        return False
    _inputs.unverified[id(choice)] = (weakref.ref(x), choice)
    return True


def verify_inputs() -> None:
    """At a LoRA node's backward: each input whose x̄ was saved instead of it and that is still alive is kept by
    something else (another node saved it, or the caller holds it): its layer saves x from its next call on, the
    choice that keeps the fewest bytes. Checked once, at the first LoRA node to run in a backward pass: the nodes
    nearest the loss may have freed what they saved by then, so an input only they kept can be missed (costing its
    bytes, never a number); a LoRA input in any earlier block is still held by whatever keeps it. Not while
    compiling: a compiled node never saves x̄ in x's place (:func:`saves_dropped`), and touching this process-wide
    record from a traced backward would break its graph; inputs an eager forward left noted wait for the next
    eager backward."""
    if torch.compiler.is_compiling():
        return
    unverified = _inputs.unverified
    if unverified:
        _inputs.unverified = {}
        for ref, choice in unverified.values():
            if ref() is not None:
                choice.keep_input = True


# ---- the fused function ----------------------------------------------------------------------------------
def lora_forward(x: torch.Tensor, dropped: torch.Tensor | None, result: torch.Tensor | None,
                 weight: torch.Tensor | None, bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor,
                 scaling: float, fan_in_fan_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h): :class:`LoraFunction`'s forward computation (its arguments; ``scaling`` is already s̄), with h =
    x̄ Aᵀ (tokens, r) for its backward. Called directly, without an autograd node, when gradients are off
    (inference, generation)."""
    d_in, d_out = A.shape[1], B.shape[0]
    x2 = x.reshape(-1, d_in)
    # the adapter's dtype may be wider than x's (fp32 adapters on a bf16 base): x̄ and h are in A's dtype, the
    # output in x's; x is cast here and in backward, never kept cast
    h = (dropped.reshape(-1, d_in) if dropped is not None else as_dtype(x2, A.dtype)) @ A.T
    # with the adapter's dtype other than x's, the reference's order: (h Bᵀ)·s in A's dtype, cast, added
    term = None if A.dtype == x.dtype else (h @ B.T).mul_(scaling).to(x.dtype)
    if result is None:
        w = dense_weight(weight, x.dtype)  # a 4-bit (NF4) W is decoded here and again in backward, never saved dense
        w_t = w if fan_in_fan_out else w.T  # W as (d_in, d_out)
        if term is None and wide_matmul_dtype(x.dtype, x.device) is None:
            y = lora_term_plus_base(h, B, scaling, bias, x2, w_t)  # b + s̄ h Bᵀ + x Wᵀ, the term first
        else:
            y = _base_matmul(x2, w_t, bias)  # x Wᵀ + b
            y = y.addmm_(h, B.T, alpha=scaling) if term is None else y.add_(term)
    else:
        y = result.reshape(-1, d_out)
        y = torch.addmm(y, h, B.T, alpha=scaling) if term is None else y + term
    return y.view(*x.shape[:-1], d_out), h


class LoraFunction(torch.autograd.Function):
    """y = (result, or x Wᵀ + b) + s · (x̃ Aᵀ) Bᵀ in one node; saves x, h = x̄ Aᵀ and the parameters.

    x, x̄ (..., d_in); result (..., d_out) or None; weight (d_out, d_in), or (d_in, d_out) when
    ``fan_in_fan_out``, or None (then ``result`` is given); A (r, d_in); B (d_out, r). ``dropped`` is None
    without dropout, else x̄ = x ⊙ keep in A's dtype (``shared_dropout(x, p, A.dtype)``, mask of seed ``seed``,
    its gaps ``gaps`` kept for backward or None; the function folds 1/(1 − p) into ``scaling``). W must be frozen (no gradient for
    it)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dropped: torch.Tensor | None, result: torch.Tensor | None,
                weight: torch.Tensor | None, bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor,
                scaling: float, p: float, seed: int, gaps: torch.Tensor | None, fan_in_fan_out: bool,
                choice: InputChoice | None = None) -> torch.Tensor:
        if p > 0:
            scaling = scaling / keep_probability(p, x.device)  # s̄: (x̃ Aᵀ) Bᵀ s = (x̄ Aᵀ) Bᵀ s̄
        y, h = lora_forward(x, dropped, result, weight, bias, A, B, scaling, fan_in_fan_out)
        need = ctx.needs_input_grad
        # x̄ where nothing else keeps x (InputChoice; the siblings save the same x̄), else x, from which backward
        # rebuilds x̄ with the mask's gaps (or its seed), once per sibling group
        ctx.saved_dropped = need[5] and saves_dropped(x, dropped, choice)
        ctx.save_for_backward(dropped if ctx.saved_dropped else x if need[5] else None, h if need[6] else None,
                              A, B, weight if need[0] else None, gaps if p > 0 else None)
        ctx.scaling, ctx.p, ctx.seed, ctx.fan_in_fan_out = scaling, p, seed, fan_in_fan_out
        ctx.x_shape, ctx.x_dtype, ctx.has_result = x.shape, x.dtype, result is not None
        return y

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        verify_inputs()
        x, h, A, B, weight, gaps = ctx.saved_tensors
        need = ctx.needs_input_grad
        s, p = ctx.scaling, ctx.p
        g = grad_out.reshape(-1, B.shape[0])
        ga = as_dtype(g, A.dtype)
        drops = dropped = None
        if p > 0 and (need[0] or need[5]):
            drops, dropped = _dropped_for_backward(x, p, ctx.seed, A.dtype, need[5], gaps, ctx.saved_dropped) \
                if x is not None else \
                (_drops_for_backward(ctx.x_shape.numel(), p, ctx.seed, g.device, gaps), None)
        elif need[5]:
            dropped = as_dtype(x, A.dtype)
        grad_x = grad_result = grad_bias = grad_A = grad_B = None
        if need[6]:
            grad_B = outer_grad(ga, h, s)
        if need[0] or need[5]:
            grad_h = (ga @ B).mul_(s)  # (tokens, r)
            if need[5]:
                grad_A = grad_h.T @ dropped.reshape(-1, A.shape[1])
            if need[0]:
                w = None if weight is None else dense_weight(weight, g.dtype)
                w = None if w is None else (w.T if ctx.fan_in_fan_out else w)  # (d_out, d_in)
                grad_x = _input_grad(g, w, grad_h, A, drops, ctx.x_dtype).view(ctx.x_shape)
        if ctx.has_result and need[2]:
            grad_result = grad_out
        if need[4]:
            grad_bias = g.sum(0)
        return grad_x, None, grad_result, None, grad_bias, grad_A, grad_B, None, None, None, None, None, None


def wide_matmul_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype | None:
    """fp32 where the base's matmuls in ``dtype`` run faster as fp32 products rounded back: bf16 / fp16 on an x86
    CPU without units for them (no AVX512-BF16 or AMX for bf16, no AMX-FP16 for fp16). There torch's half-precision
    matmul is emulated: measured on an AVX2 machine (256 × 1536 by 1536 × 576, one thread), g W with W contiguous
    took 250 ms in bf16 (183 in fp16), x Wᵀ 52 ms, and the fp32 product of the same values with both casts 8 ms.
    Both accumulate in fp32 and round once to ``dtype``; only the order of the sums differs (on that machine 0.01-0.03 %
    of a product's elements differed, in the last bit). None elsewhere, and inside ``use_wide_matmul(False)``."""
    if dtype not in _HALF or not _WIDE_ENABLED or device.type != "cpu":
        return None
    return _WIDE[(dtype, "cpu")]


def _cpu_widening() -> dict[tuple[torch.dtype, str], torch.dtype | None]:
    """Per half dtype: fp32 where this CPU is x86 without units for it, else None (read once, at import: the
    lookup then traces under torch.compile)."""
    import platform

    x86 = platform.machine().lower() in ("x86_64", "amd64")
    bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    fp16 = torch.cpu._is_amx_fp16_supported()
    return {(dtype, "cpu"): torch.float32 if x86 and not native else None
            for dtype, native in ((torch.bfloat16, bf16), (torch.float16, fp16))}


_WIDE = _cpu_widening()
_HALF = (torch.bfloat16, torch.float16)
_WIDE_ENABLED = os.environ.get("PEFTKIT_WIDE_MATMUL", "1").lower() not in ("0", "false", "no", "off")


@contextlib.contextmanager
def use_wide_matmul(enabled: bool) -> Iterator[None]:
    """``with use_wide_matmul(False): ...`` multiplies half-precision bases in their own dtype inside the block
    (process-wide; ``PEFTKIT_WIDE_MATMUL=0`` in the environment turns the widening off for good)."""
    global _WIDE_ENABLED
    before, _WIDE_ENABLED = _WIDE_ENABLED, enabled
    try:
        yield
    finally:
        _WIDE_ENABLED = before


def _base_matmul(x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x w_t (+ bias), in fp32 and rounded back where :func:`wide_matmul_dtype` says so."""
    wide = wide_matmul_dtype(x.dtype, x.device)
    if wide is None:
        return torch.addmm(bias, x, w_t) if bias is not None else x @ w_t
    xw, ww = x.to(wide), w_t.to(wide)
    out = torch.addmm(bias.to(wide), xw, ww) if bias is not None else xw @ ww
    return out.to(x.dtype)


def lora_term_plus_base(h: torch.Tensor, B: torch.Tensor, s: float, bias: torch.Tensor | None, x: torch.Tensor,
                        w_t: torch.Tensor) -> torch.Tensor:
    """b + s · h Bᵀ + x w_t: the rank-r term first, written into a fresh (tokens, d_out) tensor, then the base matmul
    accumulates into it (β = 1, inside its own pass over the output). The other order, x w_t then ``addmm_`` of the
    term, reads and writes the whole output once more: with 2048 tokens at hidden 256 the term cost 6-9 % of x w_t
    this way against 9-14 % the other way, with 1024 tokens about the same or less (one thread,
    benchmarks/lora_floor.py --parts order)."""
    if bias is not None:
        y = torch.addmm(bias, h, B.T, alpha=s)
    else:
        y = torch.empty((h.shape[0], B.shape[0]), dtype=h.dtype, device=h.device)
        torch.addmm(y, h, B.T, beta=0, alpha=s, out=y)  # β = 0: y's uninitialised values are ignored
    return y.addmm_(x, w_t)


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in ``dtype``: t itself when it already is (a no-op ``.to`` still costs ~3 µs of dispatch, several times a
    target's step)."""
    return t if t.dtype == dtype else t.to(dtype)


OUTER_TRANSPOSED_UP_TO = 512  # outer_grad's orientation switch (d_out); benchmarks/lora_floor.py uses it too


def outer_grad(g: torch.Tensor, h: torch.Tensor, s: float) -> torch.Tensor:
    """s · gᵀ h, B's gradient (g (tokens, d_out), h (tokens, r)), as a contiguous (d_out, r) tensor. For d_out up to
    512 computed as (hᵀ g)ᵀ: on this project's CPU machine (MKL, one thread, r 16, 1024-2048 tokens) that orientation
    took 0.64-0.83 × the time of gᵀ h at d_out 256 and 512, but 1.05-1.20 × at 688 and 1376
    (benchmarks/lora_floor.py --parts orient). Same products, summed in another order."""
    out = torch.empty((g.shape[1], h.shape[1]), dtype=g.dtype, device=g.device)
    return torch.mul((h.T @ g).T if g.shape[1] <= OUTER_TRANSPOSED_UP_TO else g.T @ h, s, out=out)


def _input_grad(g: torch.Tensor, w: torch.Tensor | None, grad_h: torch.Tensor, A: torch.Tensor,
                drops: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """g W (``w``: W as (d_out, d_in), or None when the base's own backward gives it) + (g_h A) ⊙ keep, in x's
    ``dtype`` (``drops``: the dropped elements, as :func:`drop_` takes them, or None without dropout). The LoRA term is made first
    (with dropout, its dropped elements zeroed in place) and the big matmul accumulates g W into it (``addmm_``, β = 1, inside the matmul's own pass,
    as :func:`lora_term_plus_base` does in forward): adding the term into g W afterwards would be one more pass
    over an input-sized tensor. An adapter wider than x: the term is computed in the adapter's dtype and cast, as
    autograd does for the reference's cast of x, then added into g W."""
    wide = w is not None and wide_matmul_dtype(g.dtype, g.device) is not None
    lora = grad_h @ A
    if drops is not None:
        drop_(lora, drops)
    if A.dtype != dtype:
        lora = lora.to(dtype)
        return lora if w is None else _base_matmul(g, w, None).add_(lora)
    if w is None:
        return lora
    return lora.add_(_base_matmul(g, w, None)) if wide else lora.addmm_(g, w)


# Variants other than plain LoRA with a fused training path (DoRA: methods/dora.py), by exact variant type:
# fn(layer, name, x, result, weight, bias) -> the new running output, or None where the fused path does not apply
# (then the variant's reference forward runs). ``weight``/``bias`` are given iff ``result`` is None.
FUSED_VARIANTS: dict[type, Callable[..., torch.Tensor | None]] = {}


def _frozen_base_weight(base: nn.Module) -> torch.Tensor | None:
    """The weight of a Linear / Conv1D the fused function may compute itself, else None: exact type, frozen
    weight, no hooks. The weight is a plain tensor, or (a Linear's) NF4 from :func:`~peftkit.quantize.quantize_base`
    (QLoRA): the function then decodes it in forward and in backward, as torchao's own linear does, in one node
    with the adapters."""
    if type(base) is not nn.Linear and not is_conv1d(base):
        return None
    weight = base._parameters.get("weight")
    if weight is None:
        weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.requires_grad or base._forward_hooks or base._forward_pre_hooks:
        return None
    if type(weight) in (torch.Tensor, nn.Parameter) or (type(base) is nn.Linear and quantization_of(weight) == "nf4"):
        return weight
    return None


def _base_bias(base: nn.Module) -> torch.Tensor | None:
    params = base._parameters
    return params["bias"] if "bias" in params else getattr(base, "bias", None)


def lora_linear_forward(layer: Any, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    """The active plain-LoRA adapters ``names`` of a LoraLinear on x, through :class:`LoraFunction`."""
    base = layer._modules["base_layer"]
    if torch.is_autocast_enabled(x.device.type):  # autocast picks the dtypes op by op: the reference path
        result = base(x)
        for name in names:
            result = layer.variant[name].forward(layer, name, x, result)
        return result
    result = None
    bias = None
    weight = _frozen_base_weight(base)
    if weight is not None and weight.dtype == x.dtype:
        bias = _base_bias(base)
    else:
        weight, result = None, base(x)
    for name in names:
        A, B = adapter_weights(layer, name)
        fused = FUSED_VARIANTS.get(type(layer.variant[name]))
        # LoRA and DoRA also fuse with an adapter dtype other than x's (fp32 adapters on a bf16 base): they keep x
        # as it is, where the reference keeps a cast copy per target (a variant's function returns None where it
        # cannot)
        dtypes_fit = (A.dtype == B.dtype and (result is None or result.dtype == x.dtype)
                      and (A.dtype == x.dtype or (A.is_floating_point() and x.is_floating_point())))
        if not dtypes_fit:
            if result is None:
                result = base(x)
            result = layer.variant[name].forward(layer, name, x, result)  # casts, as HF PEFT
            continue
        if fused is not None:
            if result is None and type(weight) not in (torch.Tensor, nn.Parameter):  # a variant takes W dense
                result = base(x)
            out = fused(layer, name, x, result, weight if result is None else None, bias if result is None else None)
            if out is None:  # not for this call (e.g. dropout): the variant's reference forward
                out = layer.variant[name].forward(layer, name, x, base(x) if result is None else result)
            result = out
            continue
        p = dropout_p(layer, name)
        # without dropout x̃ is x: passed as None, since torch.compile cannot trace one tensor given twice
        dropped, seed, gaps = shared_dropout(x, p, A.dtype) if p > 0 else (None, 0, None)
        args = (x, dropped, result, weight if result is None else None, bias if result is None else None, A, B)
        if torch.is_grad_enabled():
            result = LoraFunction.apply(*args, layer.scaling[name], p, seed, gaps, layer.fan_in_fan_out,
                                        input_choice(layer) if p > 0 else None)
        else:  # no node to record: the same computation, without the autograd.Function's cost
            s = layer.scaling[name] / keep_probability(p, x.device) if p > 0 else layer.scaling[name]
            result = lora_forward(*args, s, layer.fan_in_fan_out)[0]
    return result if result is not None else base(x)


def dropout_p(layer: Any, name: str) -> float:
    """The adapter's dropout probability if it applies now (training), else 0."""
    dropout = layer._modules["lora_dropout"]._modules[name]
    return dropout.p if dropout.training and isinstance(dropout, nn.Dropout) else 0.0


def reference_dropped(x: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
    """x̃ = x cast to ``dtype`` (the adapter's), then masked with the fused path's mask (same seed, shared by the
    siblings that read x), as ordinary autograd ops."""
    xa = x.to(dtype)
    if p == 0:
        return xa
    keep = dropout_keep(x.shape, p, shared_seed(x, p, dtype), x.device)
    return xa * keep * (1.0 / keep_probability(p, x.device))


# ---- many adapters in one batch (S-LoRA / Punica): stacked weights, gathered per row -------------------------
def _weight(module: nn.Module) -> torch.Tensor:
    w = module._parameters.get("weight")
    return module.weight if w is None else w  # a parametrised weight is read the usual way


def adapter_weights(layer: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(``layer.lora_A[name].weight``, ``layer.lora_B[name].weight``), the same tensors, read from the modules'
    own dicts: the attribute path (``Module.__getattr__``, ``ModuleDict.__getitem__``, ``Module.__getattr__``)
    took ~3.5 µs a weight, which every LoRA call and every cache check pays."""
    modules = layer._modules
    return _weight(modules["lora_A"]._modules[name]), _weight(modules["lora_B"]._modules[name])


def _row_key(layer: Any, names: tuple[str, ...]) -> tuple:
    """What the stacked tables depend on: the adapters, their weights (identity and in-place version), scalings.
    Checked on every call of a generate step's every layer, so the modules are looked up once, not per name."""
    key: list[Any] = [names]
    ranks, scaling = layer.r, layer.scaling
    modules = layer._modules
    A_of, B_of, magnitudes = modules["lora_A"]._modules, modules["lora_B"]._modules, modules["lora_magnitude_vector"]
    for name in names:
        if name in ranks:
            A, B = _weight(A_of[name]), _weight(B_of[name])
            entry = (scaling[name], A.data_ptr(), A._version, B.data_ptr(), B._version)
            if magnitudes and name in magnitudes:
                m, w = magnitudes[name], layer.get_base_layer().weight
                entry += (m.data_ptr(), m._version, w.data_ptr(), w._version)
            key.append(entry)
    return tuple(key)


def row_tables(layer: Any, names: tuple[str, ...], rows: Any = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Aᵀ (k+1, d_in, r_max) and (s·B)ᵀ (k+1, r_max, d_out) of the named adapters, zero-padded to the largest
    rank, and for DoRA adapters the per-output factor m / ‖W + ΔW‖ (k+1, d_out; 1 for plain LoRA), or None
    without DoRA. The last slot serves rows on the base model (or an adapter this layer lacks).

    Built once and reused while no weight changed (inference); rebuilt with autograd when gradients flow. With
    ``rows`` (the call's :class:`~peftkit.methods.base.RowAdapters`) a layer's tables are checked on its first
    call under them and then reused for the rest of that call (a generate call's later steps): the check reads
    every adapter's weights (~10 µs a layer with 8 adapters), as much as a decode step's LoRA matmuls take."""
    grad = torch.is_grad_enabled() and any(
        p.requires_grad for n in names if n in layer.r for p in adapter_weights(layer, n))
    compiling = torch.compiler.is_compiling()
    if rows is not None and not grad and not compiling:
        kept = rows._tables.get(layer)
        if kept is not None:
            return kept
    layer._check_row_mix(names)
    # under torch.compile the stacking is part of the graph (the cache key reads storage addresses, untraceable)
    key = None if grad or compiling else _row_key(layer, names)
    cached = getattr(layer, "_row_tables", None)
    if key is not None and cached is not None and cached[0] == key:
        tables = cached[1]
    else:
        tables = _stack_rows(layer, names)
        if key is not None:
            layer._row_tables = (key, tables)
    if rows is not None and key is not None:
        rows._tables[layer] = tables
    return tables


def _stack_rows(layer: Any, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    present = [n for n in names if n in layer.r]
    r_max = max([layer.r[n] for n in present] or [1])
    like = layer.lora_A[present[0]].weight if present else layer.lora_A[next(iter(layer.r))].weight
    k = len(names)
    A_t = like.new_zeros(k + 1, layer.in_features, r_max)
    B_t = like.new_zeros(k + 1, r_max, layer.out_features)
    dora = [n for n in present if n in layer.lora_magnitude_vector]
    factor = like.new_ones(k + 1, layer.out_features) if dora else None
    for i, name in enumerate(names):
        if name not in layer.r:
            continue
        r = layer.r[name]
        A_t[i, :, :r] = layer.lora_A[name].weight.T
        B_t[i, :r, :] = (layer.lora_B[name].weight * layer.scaling[name]).T
        if name in dora:
            from ..quantize import dense_weight  # a quantised base is dequantised, never cast as integers

            weight = dense_weight(layer.get_base_layer().weight, like.dtype)
            norm = layer.variant[name].weight_norm(layer, name, weight)  # detached, as in training
            factor[i] = layer.lora_magnitude_vector[name] / norm
    return A_t, B_t, factor


def _plain_base(layer: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(W as (d_in, d_out), bias) where this module may compute the base layer's x Wᵀ + b itself, as the fused
    path does: an exact Linear / Conv1D with a frozen dense weight in x's dtype, no hooks, no autocast, no widened
    matmul. Else None (the base layer runs as a module)."""
    base = layer._modules["base_layer"]
    weight = _frozen_base_weight(base)
    if (weight is None or type(weight) not in (torch.Tensor, nn.Parameter) or weight.dtype != x.dtype
            or torch.is_autocast_enabled(x.device.type) or wide_matmul_dtype(x.dtype, x.device) is not None):
        return None
    return (weight if layer.fan_in_fan_out else weight.T), _base_bias(base)


def per_row_lora(layer: Any, x: torch.Tensor, result: torch.Tensor | None, rows: Any) -> torch.Tensor:
    """result + each row's adapter, ``rows`` a :class:`~peftkit.methods.base.RowAdapters`. With ``result`` None
    the base layer's output is made here: without gradients, on a plain dense frozen Linear / Conv1D in x's dtype
    (:func:`_plain_base`), the rows' s·B A x first and x Wᵀ accumulated into it (one op and one module call fewer
    than base then delta, ~10 µs of a decode step's layer call); else by the base layer.

    Grouped (the usual case, and always in a generate step): the rows are gathered adapter by adapter into
    (groups, rows per group · tokens, d_in), and two batched matmuls against the stacked tables give every
    row's s·B A x, each adapter's weights read once; the deltas are gathered back to row order and added in.
    Gathered (skewed groups with long rows, see ``RowGroups.worth_it``): h = x Aᵀ[pick] per row, then
    (s·B)ᵀ[pick] added into the output by one baddbmm. DoRA rows: result + (f − 1)·(result − b) + f · s·B A x,
    f = m / ‖W + ΔW‖."""
    A_t, B_t, factor = row_tables(layer, rows.names, rows)
    _, pick, slot_rows, row_slot = rows.on(x.device)
    batch = x.shape[0]
    xb = x.reshape(batch, -1, x.shape[-1]).to(A_t.dtype)
    tokens, groups = xb.shape[1], rows.groups
    if result is None:
        plain = _plain_base(layer, x) if factor is None and A_t.dtype == x.dtype and not torch.is_grad_enabled() \
            else None
        if plain is None:
            result = layer._modules["base_layer"](x)
        else:  # every row's s·B A x first, then x Wᵀ accumulated into it (as lora_term_plus_base for one adapter)
            w_t, bias = plain
            delta = _grouped_delta(xb, A_t, B_t, groups, slot_rows, row_slot) if groups.worth_it(batch, tokens) else \
                torch.bmm(torch.bmm(xb, A_t[pick]), B_t[pick])
            y = delta.view(-1, delta.shape[-1])
            if bias is not None:
                y.add_(bias)
            return y.addmm_(x.reshape(-1, x.shape[-1]), w_t).view(*x.shape[:-1], y.shape[-1])
    res = result.reshape(batch, -1, result.shape[-1])
    if groups.worth_it(batch, tokens):
        delta = _grouped_delta(xb, A_t, B_t, groups, slot_rows, row_slot)
        if factor is None and res.dtype == delta.dtype:
            if not torch.is_grad_enabled() and not res.requires_grad:
                return res.add_(delta).view(result.shape)
            return (res + delta).view(result.shape)
    else:
        h = torch.bmm(xb, A_t[pick])  # (batch, tokens, r_max)
        if factor is None and res.dtype == A_t.dtype:
            if not torch.is_grad_enabled() and not res.requires_grad:
                return res.baddbmm_(h, B_t[pick]).view(result.shape)
            return torch.baddbmm(res, h, B_t[pick]).view(result.shape)
        delta = torch.bmm(h, B_t[pick])
    if factor is not None:
        f = factor[pick][:, None, :]
        bias = layer.get_base_layer().bias if hasattr(layer.get_base_layer(), "bias") else None
        base = res.to(delta.dtype) if bias is None else res.to(delta.dtype) - bias.to(delta.dtype)
        delta = delta * f + (f - 1) * base
    return (res + delta.to(res.dtype)).view(result.shape)


def _grouped_delta(xb: torch.Tensor, A_t: torch.Tensor, B_t: torch.Tensor, groups: Any, slot_rows: torch.Tensor,
                   row_slot: torch.Tensor) -> torch.Tensor:
    """Every row's s·B A x (batch, tokens, d_out), rows grouped by adapter (a ``RowGroups``): two batched matmuls,
    each adapter's weights read once."""
    tokens, count = xb.shape[1], groups.count
    xg = xb.index_select(0, slot_rows).view(count, groups.width * tokens, xb.shape[-1])
    delta = torch.bmm(torch.bmm(xg, A_t[:count]), B_t[:count])
    return delta.view(count * groups.width, tokens, -1).index_select(0, row_slot)
