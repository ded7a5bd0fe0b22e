"""The fused LoRA path (lora_kernels.LoraFunction) against the plain-torch reference: equal outputs and gradients
in fp64 (dropout included, same seed), one mask per shared input, and fewer saved bytes."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import tiny_gpt2, tiny_llama

from peftkit import LoraConfig, VeraConfig, get_peft_model
from peftkit.methods import lora_kernels
from peftkit.methods.lora import LoraLinear
from peftkit.methods.lora_joint import use_joint
from peftkit.methods.lora_kernels import (
    LoraFunction,
    dropout_keep,
    keep_probability,
    use_fused,
    use_packed_mask,
)


def _grads(pm: nn.Module, ids: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    pm.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = pm(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}


def _count_nodes(loss: torch.Tensor, name: str) -> int:
    seen, stack, count = set(), [loss.grad_fn], 0
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        count += name in fn.name()
        stack.extend(f for f, _ in fn.next_functions)
    return count


@pytest.mark.parametrize("make, cfg", [
    (tiny_llama, {"target_modules": "all-linear"}),
    (tiny_llama, {"target_modules": "all-linear", "lora_dropout": 0.3}),
    (tiny_gpt2, {"target_modules": ["c_attn", "c_proj", "c_fc"], "lora_dropout": 0.2, "fan_in_fan_out": True}),
    (tiny_llama, {"target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.1, "bias": "all"}),
    (tiny_gpt2, {"target_modules": ["c_attn", "c_fc"], "lora_dropout": 0.1, "bias": "lora_only"}),  # base bias trains
])
def test_fused_equals_reference_fp64(make, cfg) -> None:
    pm = get_peft_model(make().double(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **cfg))
    pm.add_adapter("second", LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, **cfg))
    pm.set_adapter(["default", "second"])  # two adapters: the second adds into the first's output
    pm.train()
    ids = torch.randint(1, 128, (3, 9))
    torch.manual_seed(5)
    out = pm(ids, labels=ids)
    assert _count_nodes(out.loss, "LoraFunction") > 0
    fused_logits, fused = _grads(pm, ids, seed=1)
    with use_fused(False):
        torch.manual_seed(5)
        assert _count_nodes(pm(ids, labels=ids).loss, "LoraFunction") == 0
        ref_logits, ref = _grads(pm, ids, seed=1)
    assert fused.keys() == ref.keys() and len(fused) > 0
    torch.testing.assert_close(fused_logits, ref_logits, rtol=0, atol=1e-6)
    for name in fused:
        torch.testing.assert_close(fused[name], ref[name], rtol=0, atol=1e-6, msg=name)
    pm.eval()  # no dropout at inference: equal to the reference too
    with torch.no_grad():
        eval_fused = pm(ids).logits
        with use_fused(False):
            torch.testing.assert_close(eval_fused, pm(ids).logits, rtol=0, atol=1e-9)


def _gaps(keep: torch.Tensor) -> torch.Tensor:
    """The gaps between a mask's dropped elements, flattened row-major (the first counted from index -1), found
    from the dense mask itself (independently of lora_kernels' drawing), in uint8 as forward keeps them."""
    dropped = torch.nonzero(~keep.reshape(-1).bool()).reshape(-1)
    return torch.diff(dropped, prepend=torch.tensor([-1])).to(torch.uint8)


def _bits(keep: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask packed eight elements a byte, element 8k + j at bit j of byte k, as forward keeps a dense mask
    (p ≥ 1/8), written out with a weighted sum (independently of lora_kernels' bit tricks)."""
    flags = keep.reshape(-1).to(torch.int64)
    flags = torch.cat([flags, flags.new_zeros((-flags.numel()) % 8)]).view(-1, 8)
    return (flags * (2 ** torch.arange(8))).sum(1).to(torch.uint8)


def _kept(keep: torch.Tensor, p: float) -> torch.Tensor:
    """What forward keeps of the mask for backward: its gaps below p = 1/8, its bits from there."""
    return _bits(keep) if p >= 0.125 else _gaps(keep)


@pytest.mark.parametrize("p", [0.1, 0.4])
@pytest.mark.parametrize("packed", [False, True])
def test_fused_function_gradcheck(packed: bool, p: float) -> None:
    """LoraFunction's backward against finite differences (both routes: base inside and base given), the mask
    drawn again from its seed in backward or rebuilt from what forward kept (gaps at p 0.1, bits at 0.4)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    W, b = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, dtype=torch.float64, requires_grad=True)
    A = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    B = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    seed = 1234 if p > 0.2 else 1
    dropped = x.detach() * dropout_keep(x.shape, p, seed, x.device) / keep_probability(p)

    def routed(x, b, A, B):  # x̄ = x ⊙ keep must follow x for finite differences: rebuild it from the same mask
        xd = x.detach() * dropout_keep(x.shape, p, seed, x.device)  # the function folds 1/(1 − p) into s
        kept = _kept(dropout_keep(x.shape, p, seed, x.device), p) if packed else None
        return LoraFunction.apply(x, xd, None, W, b, A, B, 1.5, p, seed, kept, False)

    assert torch.autograd.gradcheck(routed, (x, b, A, B))
    result = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, r, A, B: LoraFunction.apply(x, x.detach(), r, None, None, A, B, 0.7, 0.0, 0, None, False),
        (x, result, A, B))
    assert 0 < dropped.eq(0).sum() < x.numel()  # the mask really drops, and keeps


@pytest.mark.parametrize("joint", [False, True])
def test_siblings_share_one_mask_and_one_saved_input(joint: bool) -> None:
    """q, k and v read one tensor: one seed, one x storage and one kept mask saved for all three; per target
    (lora_joint off) each saves its own h = A x̄, jointly one H = [h_q h_k h_v]."""
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"],
                                                 lora_dropout=0.05, init_lora_weights=False)).train()
    attn = pm.base_model.model.model.layers[0].self_attn
    x = torch.randn(2, 5, 32, requires_grad=True)
    stores: list[int] = []
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        stores.append(t.untyped_storage().data_ptr())
        sizes[stores[-1]] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with use_joint(joint):
            outs = [getattr(attn, n)(x) for n in ("q_proj", "k_proj", "v_proj")]
    assert len({o.grad_fn for o in outs}) == (1 if joint else 3)
    seeds = {o.grad_fn.seed for o in outs}  # ctx attributes of each LoraFunction node
    assert len(seeds) == 1 and seeds == {lora_kernels._cache.seed}
    params = {p.untyped_storage().data_ptr() for p in pm.parameters()}
    saved = {ptr for ptr in stores if ptr not in params}
    keep = dropout_keep(x.shape, 0.05, lora_kernels._cache.seed, x.device)
    assert len(saved) == (3 if joint else 5)  # x (shared), the mask's gaps (shared), the h's
    drops = int((~keep).sum())
    assert 0 < drops < x.numel() // 8 and lora_kernels._cache.gaps.dtype == torch.uint8
    assert sorted(sizes[ptr] for ptr in saved)[0] == drops  # the gaps: a byte per dropped element
    # the same x̃ as the reference builds with that seed
    q = attn.q_proj
    A, B = q.lora_A["default"].weight, q.lora_B["default"].weight
    expected = q.base_layer(x) + q.scaling["default"] * ((x * keep / keep_probability(0.05)) @ A.T @ B.T)
    torch.testing.assert_close(outs[0], expected)
    sum(o.sum() for o in outs).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def _saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    stores: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            stores[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    return sum(stores.values())


def _kept_mask_bytes(shape: torch.Size, p: float) -> int:
    """Bytes of the mask forward keeps for the last seed drawn: from p = 1/8 its bits (⌈n/8⌉); below, its gaps, a
    byte each where all fit in uint8 (two where one is wider), none where they would take more than bits."""
    if p == 0:
        return 0
    if p >= 0.125:
        return (shape.numel() + 7) // 8
    gaps = _gaps(dropout_keep(shape, p, lora_kernels._cache.seed, torch.device("cpu"))).to(torch.int64)
    width = 1 if gaps.numel() == 0 or gaps.max() <= 255 else 2
    return gaps.numel() * width if gaps.numel() * width * 8 <= shape.numel() else 0


@pytest.mark.parametrize("p", [0.0, 0.1, 0.3])
def test_fused_saves_less_than_reference(p: float) -> None:
    tokens, d_in, r = 64, 96, 4
    layer = LoraLinear(nn.Linear(d_in, 80).requires_grad_(False))
    layer.update_layer("default", LoraConfig(r=r, lora_dropout=p, init_lora_weights=False), "m")
    layer.set_adapter(["default"])
    layer.train()
    x = torch.randn(tokens, d_in, requires_grad=True)
    fused = _saved_bytes(layer, x)
    with use_fused(False):
        reference = _saved_bytes(layer, x)
    # x and h, and with dropout the mask's gaps (~p bytes an element) or bits; with use_packed_mask(False) only its seed
    mask = _kept_mask_bytes(x.shape, p)
    assert fused == tokens * (d_in + r) * 4 + mask and (mask > 0.05 * x.numel() if p > 0 else mask == 0)
    assert fused < reference if p > 0 else fused <= reference
    with use_packed_mask(False):
        assert _saved_bytes(layer, torch.randn(tokens, d_in, requires_grad=True)) == tokens * (d_in + r) * 4


_ELEMENTWISE = {"ge", "lt", "mul", "mul_", "add", "add_", "addcmul", "addcmul_", "where", "masked_fill",
                "masked_fill_", "_to_copy", "copy_", "clone", "div", "div_", "sub", "sub_", "random_", "index_fill_"}


def _input_sized_passes(layer: nn.Module, x: torch.Tensor, held: bool = True) -> list[str]:
    """The elementwise ATen ops writing an x-sized tensor in one forward + backward of ``layer`` on x; with
    ``held=False`` on a copy of x that nothing holds after the forward (as a norm's output in a model: x̄ is then
    saved instead of it)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name in _ELEMENTWISE and isinstance(out, torch.Tensor) and out.numel() == x.numel():
                self.ops.append(name)
            return out

    params = [p for p in layer.parameters() if p.requires_grad]
    given = x if held else x.clone()  # saves nothing, passes the gradient through: the copy dies with the forward
    with Recorder() as recorder:
        out = layer(given).sum()
        del given
        torch.autograd.grad(out, [x, *params])
    return recorder.ops


def _dropout_layer(p: float) -> LoraLinear:
    layer = LoraLinear(nn.Linear(96, 80).requires_grad_(False))
    layer.update_layer("default", LoraConfig(r=4, lora_dropout=p, init_lora_weights=False), "m")
    layer.set_adapter(["default"])
    return layer.train()


def test_dropout_costs_the_fewest_passes_over_the_input() -> None:
    """Dropout's passes over input-sized tensors in one forward + backward of a target: x copied once (x̄) and the
    dropped elements zeroed in place (``index_fill_``: a write of p·n elements, not a pass) in forward; in backward
    only the LoRA term g_h A's dropped elements zeroed, into which the matmul then accumulates g W, since x̄ itself
    was saved (x is not kept by anything else); the 1/(1 − p) rides on the scalar s. Where something else keeps x
    (here the caller holds it until backward), that is found at the start of backward and from then on x is saved
    and backward copies and zeroes x̄ again (session 13's passes). Before session 13: the mask compared (ge), copied
    into x's dtype and multiplied in each way, plus a multiply per target (6 passes; 8 before session 6). The mask
    is drawn as ~p·n gaps, kept for backward or (use_packed_mask(False)) drawn again: the same passes either way."""
    tokens, d_in = 64, 96
    layer = _dropout_layer(0.1)
    x = torch.randn(tokens, d_in, requires_grad=True)
    saved_dropped, saved_x = ["clone", "index_fill_", "index_fill_"], ["clone", "index_fill_", "clone", "index_fill_", "index_fill_"]
    for _ in range(2):
        assert _input_sized_passes(layer, x, held=False) == saved_dropped
    with use_packed_mask(False):
        assert _input_sized_passes(layer, x, held=False) == saved_dropped
    assert not layer._lora_input_choice.keep_input
    assert _input_sized_passes(layer, x) == saved_dropped  # x̄ saved; x found alive when backward starts
    assert layer._lora_input_choice.keep_input
    for held in (True, False):  # x from then on, held or not
        assert _input_sized_passes(layer, torch.randn(tokens, d_in, requires_grad=True), held) == saved_x
    with use_packed_mask(False):
        assert _input_sized_passes(layer, torch.randn(tokens, d_in, requires_grad=True)) == saved_x
    layer.eval()  # without dropout none at all: the LoRA term is added inside the matmuls (addmm_)
    assert _input_sized_passes(layer, x) == []


def test_dense_dropout_mask_passes_over_the_input() -> None:
    """From p = 1/8 the mask is dense (a 16-bit lane an element): forward compares the lanes into 0/1 bytes (ge),
    copies them into x's dtype and multiplies x in (x̄ is made in the mask's buffer); backward unpacks the bits
    forward kept (on eighth-sized words, no input-sized pass), copies them into x's dtype and multiplies the LoRA
    term by it (x̄ was saved); where x is saved instead (something else keeps it), x too. Drawn again
    (use_packed_mask(False)), backward compares lanes once more."""
    tokens, d_in = 64, 96
    layer = _dropout_layer(0.3)
    assert _input_sized_passes(layer, torch.randn(tokens, d_in, requires_grad=True), held=False) == \
        ["ge", "copy_", "mul_", "copy_", "mul_"]  # x̄ saved: backward masks the LoRA term only
    with use_packed_mask(False):
        assert _input_sized_passes(layer, torch.randn(tokens, d_in, requires_grad=True), held=False) == \
            ["ge", "copy_", "mul_", "ge", "copy_", "mul_"]
    layer._lora_input_choice.keep_input = True  # x saved (something else keeps it): backward makes x̄ again
    assert _input_sized_passes(layer, torch.randn(tokens, d_in, requires_grad=True)) == \
        ["ge", "copy_", "mul_", "copy_", "mul", "mul_"]
    with use_packed_mask(False):
        assert _input_sized_passes(layer, torch.randn(tokens, d_in, requires_grad=True)) == \
            ["ge", "copy_", "mul_", "ge", "copy_", "mul", "mul_"]


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 1001])
def test_mask_bits_pack_and_unpack_exactly(n: int) -> None:
    torch.manual_seed(n)
    flags = (torch.rand(n) < 0.5).to(torch.uint8)
    bits = lora_kernels.pack_bits(flags)
    assert torch.equal(bits, _bits(flags)) and bits.numel() == (n + 7) // 8
    assert torch.equal(lora_kernels.unpack_bits(bits, n), flags)
    every = torch.arange(256, dtype=torch.uint8)  # every byte value round trip
    assert torch.equal(lora_kernels.pack_bits(lora_kernels.unpack_bits(every, 2048)), every)


def _runs(flags: torch.Tensor) -> torch.Tensor:
    """Lengths of the runs of kept elements before each drop in a flat 0/1 mask (a drop right after a drop: 0)."""
    dropped = torch.nonzero(flags == 0).reshape(-1)
    return torch.diff(dropped, prepend=torch.tensor([-1])) - 1


@pytest.mark.parametrize("p", [0.05, 0.12, 0.125, 0.3, 0.7])
def test_dropout_mask_is_a_bernoulli_process_of_rate_p(p: float) -> None:
    """Each element dropped independently with probability p: the drop rate is p (to 5 standard errors), the runs
    of kept elements before each drop are geometric, P(run = j) = (1 − p)ʲ p, pairs of neighbours both drop at
    p², and the rate is the same at the start and the end of the tensor. Deterministic per seed. Below p = 1/8
    the mask is drawn as gaps from p itself; from 1/8 dense, from 16-bit lanes: p in steps of 2⁻¹⁶, and the keep
    rate the function scales by is that mask's own."""
    shape = torch.Size((500, 800))
    n = shape.numel()
    keep = dropout_keep(shape, p, 7, torch.device("cpu"))
    flags = keep.reshape(-1).to(torch.int64)
    rate = 1 - flags.double().mean().item()
    assert abs(rate - p) < 5 * (p * (1 - p) / n) ** 0.5
    if p < 0.125:
        assert keep_probability(p) == 1 - p
    else:
        assert keep_probability(p) == 1 - round(p * 65536) / 65536 and abs(keep_probability(p) - (1 - p)) <= 2**-17
    for half in (flags[: n // 2], flags[n // 2:]):
        assert abs((1 - half.double().mean().item()) - p) < 5 * (p * (1 - p) / (n // 2)) ** 0.5
    both = ((flags[:-1] == 0) & (flags[1:] == 0)).double().mean().item()
    assert abs(both - p * p) < 5 * (p * p * (1 - p * p) / n) ** 0.5
    runs = _runs(flags)
    for j in range(4):
        expected = (1 - p) ** j * p
        got = (runs == j).double().mean().item()
        assert abs(got - expected) < 5 * (expected * (1 - expected) / runs.numel()) ** 0.5, (j, got, expected)
    assert torch.equal(keep, dropout_keep(shape, p, 7, torch.device("cpu")))
    assert not torch.equal(keep, dropout_keep(shape, p, 8, torch.device("cpu")))
    as_float = dropout_keep(shape, p, 7, torch.device("cpu"), torch.float32)
    assert as_float.dtype == torch.float32 and torch.equal(as_float, keep.float())  # the same mask as 0/1


def test_the_mask_is_dense_from_one_eighth_and_always_off_the_cpu() -> None:
    """The gaps serve the CPU below p = 1/8; from 1/8, and on any other device at every p (no host waits on a
    GPU), the mask is dense, and the keep rate the functions scale by follows the mask actually drawn."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert [lora_kernels.dense_mask_from(p, cpu) for p in (0.05, 0.1249, 0.125, 0.5)] == [False, False, True, True]
    assert all(lora_kernels.dense_mask_from(p, gpu) for p in (0.01, 0.05, 0.5))
    assert lora_kernels.dense_mask_from(0.05) is False  # no device: the CPU's rule
    p = 0.05 + 1e-6  # not a multiple of 2⁻¹⁶
    assert keep_probability(p, cpu) == keep_probability(p) == 1 - p
    assert keep_probability(p, gpu) == 1 - round(p * 2**16) / 2**16 != 1 - p


def test_dropout_mask_draws_more_gaps_when_the_first_batch_falls_short(monkeypatch) -> None:
    """The gaps come in batches sized to cover n with ~8 standard deviations to spare; made to fall short, the
    mask draws further batches from the same generator and is still a rate-p mask over all n elements."""
    n, p = 100_000, 0.05
    full = lora_kernels.drop_gaps(n, p, 3, torch.device("cpu"))
    monkeypatch.setattr(lora_kernels, "_SIGMAS", -60.0)  # a first batch of ~900 gaps where ~5,000 are needed
    short = lora_kernels.drop_gaps(n, p, 3, torch.device("cpu"))
    positions = lora_kernels.drop_positions(short)
    assert positions[-1] < n <= positions[-1] + 1 + 300 and torch.all(short >= 1)
    assert abs(short.numel() / n - p) < 5 * (p * (1 - p) / n) ** 0.5
    assert short.numel() > 4000 and torch.equal(short[:800], full[:800])  # the first batch: the same draws


def test_kept_gaps_take_the_narrowest_dtype_and_never_more_than_bits() -> None:
    """Forward keeps the gaps in uint8 when all are ≤ 255, else wider; where that takes more bytes than the mask as
    bits (n/8: from p ≈ 1/8 up) nothing is kept and backward draws the gaps again."""
    n = 80_000
    at = {p: lora_kernels.drop_gaps(n, p, 1, torch.device("cpu")) for p in (0.002, 0.05, 0.5)}
    kept = {p: lora_kernels.kept_gaps(g, n) for p, g in at.items()}
    assert at[0.002].max() > 255 and kept[0.002].dtype == torch.int16
    assert at[0.05].max() <= 255 and kept[0.05].dtype == torch.uint8
    assert kept[0.5] is None
    for p in (0.002, 0.05):
        assert torch.equal(kept[p].to(torch.int64), at[p]) and kept[p].numel() * kept[p].element_size() <= n // 8
    x = torch.randn(8, 16)
    lora_kernels.clear_caches()
    with use_packed_mask(False):
        assert lora_kernels.shared_dropout(x, 0.05)[2] is None


def test_other_methods_and_bf16_still_take_their_paths(ids) -> None:
    """A VeRA adapter nested under LoRA: LoRA's function adds into the base output the VeRA layer gives;
    a bf16 base with fp32 adapters (GPT-2's transposed Conv1D weight) fuses too, with bf16 outputs."""
    pm = get_peft_model(tiny_llama(), VeraConfig(r=4, target_modules=["q_proj"], init_weights=False))
    pm.add_adapter("lora", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    pm.set_adapter(["default", "lora"])
    fused = pm(ids).logits
    with use_fused(False):
        torch.testing.assert_close(fused, pm(ids).logits)
    model = tiny_gpt2().to(torch.bfloat16)
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False)).train()
    out = pm(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and _count_nodes(out.loss, "LoraFunction") == 2
    pm.eval()  # GPT-2's own dropout off
    fused = pm(ids).logits
    with use_fused(False):
        torch.testing.assert_close(pm(ids).logits, fused, rtol=0, atol=0)  # the reference's op order: same bits


# ---- a bf16 base with fp32 adapters (autocast_adapter_dtype, the default) -------------------------------------
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_bf16_base_saves_x_in_bf16_not_an_fp32_copy(p: float) -> None:
    """One target: the fused path keeps x as it is (bf16) and h = A x̃ (fp32), with dropout also the mask's gaps;
    the reference keeps x̃ in fp32 (and the bool mask with dropout), i.e. 2 more bytes per input element (~2.9 with
    dropout)."""
    tokens, d_in, r = 64, 96, 4
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(d_in, 80).to(torch.bfloat16).requires_grad_(False))
    layer.update_layer("default", LoraConfig(r=r, lora_dropout=p, init_lora_weights=False), "m")
    layer.set_adapter(["default"])
    layer.train()
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(tokens, d_in, dtype=torch.bfloat16, requires_grad=True)
    fused = _saved_bytes(layer, x)
    with use_fused(False):
        reference = _saved_bytes(layer, x)
    mask = _kept_mask_bytes(x.shape, p)  # with dropout, the mask's gaps (~p bytes an element)
    assert fused == tokens * (2 * d_in + 4 * r) + mask and (mask > 0.05 * x.numel() if p > 0 else mask == 0)
    assert reference == tokens * (4 * d_in + 4 * r + (d_in if p > 0 else 0))


def _bf16_llama_targets() -> tuple[dict[str, int], dict[str, int]]:
    """tiny_llama's LoRA targets per block: input width by target, and by group of targets reading one tensor."""
    widths = {"q_proj": 32, "k_proj": 32, "v_proj": 32, "o_proj": 32, "gate_proj": 32, "up_proj": 32, "down_proj": 64}
    groups = {"q/k/v": 32, "o": 32, "gate/up": 32, "down": 64}
    return widths, groups


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_bf16_llama_saved_bytes_drop_the_fp32_copies(p: float, ids) -> None:
    """Whole model (tests/saved_bytes.py): fused keeps each sibling group's bf16 input once where the reference
    keeps an fp32 copy per target (and, with dropout, a bool mask per target whose input needs a gradient: not
    layer 0's q/k/v, whose input comes from the frozen embeddings). o_proj's input is the attention's output,
    which SDPA keeps anyway, so only q/k/v, gate/up and down add an input. Dropout costs the fused path each group's
    mask (o's included) as gaps between its drops: ~p bytes an element, never more than one bit."""
    from saved_bytes import saved_bytes

    pm = get_peft_model(tiny_llama().to(torch.bfloat16),
                        LoraConfig(r=4, target_modules="all-linear", lora_dropout=p, init_lora_weights=False))
    tokens, layers = ids.numel(), 2
    torch.manual_seed(0)
    fused = saved_bytes(pm, ids)
    torch.manual_seed(0)
    gaps = saved_bytes(pm, ids, integers=True)  # the masks' gaps, and the model's own integer tensors (ids, ...)
    with use_packed_mask(False):
        torch.manual_seed(0)
        gaps -= saved_bytes(pm, ids, integers=True)
    with use_fused(False):
        reference = saved_bytes(pm, ids)
    widths = {"q_proj": 32, "k_proj": 32, "v_proj": 32, "o_proj": 32, "gate_proj": 32, "up_proj": 32, "down_proj": 64}
    groups = {"q/k/v": 32, "gate/up": 32, "down": 64}  # o's input is SDPA's saved output
    fp32_copies = layers * 4 * sum(widths.values())
    bf16_inputs = layers * 2 * sum(groups.values())
    masks = (layers * sum(widths.values()) - 3 * 32) if p > 0 else 0
    elements = layers * (32 + 32 + 32 + 64)  # per token, every group's input: q/k/v, o, gate/up, down
    assert (0.5 * p * elements * tokens < gaps <= elements * tokens // 8) if p > 0 else gaps == 0
    assert reference - fused == tokens * (fp32_copies - bf16_inputs + masks) - gaps
    assert fused == 41_780 + gaps  # the floor's tensors + x once per group (bf16) + A·x per target (fp32)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_bf16_fused_equals_reference_and_hf_peft(p: float, ids) -> None:
    """Logits and adapter gradients of the fused bf16 path against peftkit's reference path (same masks) and,
    without dropout, HF PEFT 0.21 (which also casts x to fp32 per target) with the same adapter weights: equal
    to bf16 rounding."""
    import peft

    import peftkit

    def build(lib):
        cfg = lib.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=p, init_lora_weights=False)
        return lib.get_peft_model(tiny_llama().to(torch.bfloat16), cfg).train()

    pm = build(peftkit)
    runs = {"fused": (pm, True), "reference": (pm, False)}
    if p == 0:
        hf = build(peft)
        trainable = {n: t for n, t in pm.named_parameters() if t.requires_grad}
        hf_trainable = {n: t for n, t in hf.named_parameters() if t.requires_grad}
        assert trainable.keys() == hf_trainable.keys()
        with torch.no_grad():
            for n, t in trainable.items():
                hf_trainable[n].copy_(t)
        runs["hf"] = (hf, True)
    results = {}
    for key, (model, fused) in runs.items():
        with use_fused(fused):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(7)
            out = model(ids, labels=ids)
            assert (_count_nodes(out.loss, "LoraFunction") > 0) == (key == "fused")
            out.loss.backward()
            results[key] = (out.logits.float(), {n: t.grad.clone() for n, t in model.named_parameters()
                                                 if t.grad is not None})
    logits, grads = results["fused"]
    assert len(grads) == 2 * 7 * 2
    for key in runs.keys() - {"fused"}:
        other_logits, other_grads = results[key]
        torch.testing.assert_close(logits, other_logits, rtol=2e-2, atol=2e-2, msg=key)
        assert grads.keys() == other_grads.keys()
        for n, g in grads.items():
            scale = other_grads[n].abs().max().item()
            assert (g - other_grads[n]).abs().max().item() <= 5e-2 * scale, (key, n)  # bf16 through 2 blocks


class _Gemms(torch.utils._python_dispatch.TorchDispatchMode):
    """Records (dtype, shape of each operand) of every mm / addmm."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[torch.dtype, tuple[int, ...], tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default):
            a, b = args[-2:]
            self.seen.append((a.dtype, tuple(a.shape), tuple(b.shape)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_half_base_matmuls_widen_to_fp32_only_on_cpus_without_half_units(dtype, p, monkeypatch) -> None:
    """On an x86 CPU without bf16 (AVX512-BF16, AMX) or fp16 (AMX-FP16) units, the fused path computes x Wᵀ + b
    and g W as fp32 products rounded back to the base's dtype (torch's emulated half-precision matmul is 5-30x
    slower there); elsewhere in the dtype itself. Forced either way, one bf16/fp16 target with fp32 adapters gives
    the same output and gradients to the dtype's rounding, and its base gemms run in the dtype said."""
    import platform

    cpu = torch.device("cpu")
    native = (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
              if dtype == torch.bfloat16 else torch.cpu._is_amx_fp16_supported())
    monkeypatch.setattr(lora_kernels, "_WIDE_ENABLED", True)
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    assert lora_kernels.wide_matmul_dtype(dtype, cpu) == (torch.float32 if x86 and not native else None)
    assert lora_kernels.wide_matmul_dtype(torch.float32, cpu) is None
    with lora_kernels.use_wide_matmul(False):
        assert lora_kernels.wide_matmul_dtype(dtype, cpu) is None
    tokens, d_in, d_out = 48, 96, 80
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(d_in, d_out).to(dtype).requires_grad_(False))
    layer.update_layer("default", LoraConfig(r=4, lora_dropout=p, init_lora_weights=False), "m")
    layer.set_adapter(["default"])
    layer.train()
    x = torch.randn(tokens, d_in, dtype=dtype)
    runs = {}
    for wide in (torch.float32, None):
        monkeypatch.setattr(lora_kernels, "_WIDE", {(dtype, "cpu"): wide})
        xi = x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        with _Gemms() as gemms:
            out = layer(xi)
            out.float().square().sum().backward()
        base = [(dt, a, b) for dt, a, b in gemms.seen if {a[-1], b[-1]} & {d_in, d_out} and 4 not in (*a, *b)]
        assert sorted(base) == sorted([(wide or dtype, (tokens, d_in), (d_in, d_out)),
                                       (wide or dtype, (tokens, d_out), (d_out, d_in))])
        runs[wide] = (out.float(), xi.grad.float(), layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad)
    eps = torch.finfo(dtype).eps
    for wide, narrow in zip(runs[torch.float32], runs[None], strict=True):
        assert wide.abs().max() > 0
        torch.testing.assert_close(wide, narrow, rtol=2 * eps, atol=2 * eps * narrow.abs().max().item())


def test_autocast_and_inference_mode() -> None:
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1,
                                                 init_lora_weights=False)).train()
    ids = torch.randint(1, 128, (2, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pm(ids, labels=ids).loss
    loss.backward()  # the reference path under autocast: backward dtypes follow autograd's
    assert all(p.grad is not None for p in pm.parameters() if p.requires_grad)
    with torch.inference_mode():
        assert torch.isfinite(pm(ids).logits).all()


def test_gradient_checkpointing_redraws_the_same_masks() -> None:
    from torch.utils.checkpoint import checkpoint

    layer = LoraLinear(nn.Linear(16, 12).requires_grad_(False))
    layer.update_layer("default", LoraConfig(r=4, lora_dropout=0.5, init_lora_weights=False), "m")
    layer.set_adapter(["default"])
    layer.train()
    x = torch.randn(5, 16, requires_grad=True)
    torch.manual_seed(3)
    layer(x).pow(2).sum().backward()
    plain = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad()
    torch.manual_seed(3)
    checkpoint(layer, x, use_reentrant=False).pow(2).sum().backward()
    for n, p in layer.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, plain[n])


@pytest.mark.parametrize("joint", [False, True])
def test_packed_mask_gives_the_gradients_of_the_drawn_again_mask(joint: bool, ids) -> None:
    """The mask backward rebuilds from the gaps forward kept is the one it would draw again from the seed: same
    loss, same gradients, bit for bit, on a model whose every target drops (per target and jointly)."""
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.05,
                                                 init_lora_weights=False)).train()
    params = [p for p in pm.parameters() if p.requires_grad]
    results, kept = [], []
    for packed in (True, False):
        torch.manual_seed(5)
        with use_joint(joint), use_packed_mask(packed):
            loss = pm(ids, labels=ids).loss
            kept.append(lora_kernels._cache.gaps is not None)  # the last group's mask
            results.append((loss.detach(), torch.autograd.grad(loss, params)))
    assert kept == [True, False]
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
    assert max(g.abs().max().item() for g in grads_a) > 0


@pytest.mark.parametrize("d_out", [8, 600])
def test_outer_grad_is_s_gT_h_in_either_orientation(d_out: int) -> None:
    """B's gradient s · gᵀ h, contiguous, on both sides of the width where outer_grad changes orientation."""
    from peftkit.methods.lora_kernels import outer_grad

    g, h = torch.randn(50, d_out, dtype=torch.float64), torch.randn(50, 3, dtype=torch.float64)
    out = outer_grad(g, h, 1.5)
    assert out.shape == (d_out, 3) and out.is_contiguous()
    torch.testing.assert_close(out, 1.5 * torch.einsum("ti,tj->ij", g, h), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make, cfg, dtype", [
    (tiny_llama, {"target_modules": "all-linear", "lora_dropout": 0.3}, torch.float32),
    (tiny_llama, {"target_modules": "all-linear", "bias": "all"}, torch.bfloat16),  # fp32 adapters on bf16
    (tiny_gpt2, {"target_modules": ["c_attn", "c_proj", "c_fc"], "lora_dropout": 0.2, "fan_in_fan_out": True},
     torch.float32),
])
def test_without_gradients_the_same_computation_runs_without_a_node(make, cfg, dtype, monkeypatch) -> None:
    """With gradients off (generation) a LoRA layer runs LoraFunction's forward computation as a plain function:
    no autograd node is built, and the outputs are bit for bit those of the node (dropout in train mode included,
    same seed; two adapters, the second adding into the first's output)."""
    pm = get_peft_model(make().to(dtype), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **cfg))
    pm.add_adapter("second", LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, **cfg))
    pm.set_adapter(["default", "second"])
    ids = torch.randint(1, 128, (3, 9))
    calls = []
    apply = LoraFunction.apply
    monkeypatch.setattr(LoraFunction, "apply", lambda *a: calls.append(1) or apply(*a))
    for mode in (pm.train, pm.eval):
        mode()
        with use_joint(False):  # siblings one by one, as without gradients
            torch.manual_seed(5)
            with_node = pm(ids).logits.detach()
            nodes, calls[:] = len(calls), []
            torch.manual_seed(5)
            with torch.no_grad():
                without = pm(ids).logits
        assert nodes > 0 and calls == []
        assert torch.equal(with_node, without)
        assert with_node.dtype == dtype
    if cfg.get("lora_dropout"):  # train mode really drops without gradients too: another seed, another output
        pm.train()
        torch.manual_seed(6)
        with torch.no_grad():
            assert not torch.equal(pm(ids).logits, without)


def test_x_bar_is_saved_until_something_else_is_found_keeping_x() -> None:
    """A target whose input another node keeps (Sigmoid saves its output): the first step saves x̄ beside that x
    (one input-sized tensor more), finds x alive when backward starts, and every later step saves x instead; the
    gradients are the same either way (x̄ is the same numbers whether saved or made again)."""
    tokens, d_in = 48, 96
    torch.manual_seed(0)
    layer = _dropout_layer(0.1)
    model = nn.Sequential(nn.Linear(32, d_in).requires_grad_(False), nn.Sigmoid(), layer).train()
    x = torch.randn(tokens, 32, requires_grad=True)
    grads, sizes = [], []
    for _ in range(3):
        torch.manual_seed(5)
        sizes.append(_saved_bytes(model, x))
        grads.append([p.grad.clone() for p in layer.parameters() if p.requires_grad])
        layer.zero_grad(set_to_none=True)
    assert sizes[0] - sizes[1] == tokens * d_in * 4 and sizes[1] == sizes[2]
    assert layer._lora_input_choice.keep_input
    for a, b in zip(grads[0], grads[1], strict=True):
        assert torch.equal(a, b)


def test_inputs_to_verify_are_seen_by_a_backward_on_another_thread() -> None:
    """On a GPU autograd runs backward on a device thread of its own: the inputs a forward noted (x̄ saved in x's
    place) must be visible there. Here the backward runs on another Python thread, with x held by the caller: the
    layer switches to saving x."""
    import threading

    layer = _dropout_layer(0.1)
    x = torch.randn(32, 96, requires_grad=True)
    out = layer(x).sum()
    assert not layer._lora_input_choice.keep_input
    thread = threading.Thread(target=out.backward)
    thread.start()
    thread.join()
    assert x.grad is not None and layer._lora_input_choice.keep_input
