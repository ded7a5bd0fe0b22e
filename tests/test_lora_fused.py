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


def _packed(keep: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask packed 8 a byte, most significant bit first (independently of lora_kernels: numpy's packbits)."""
    import numpy as np

    return torch.from_numpy(np.packbits(keep.to(torch.uint8).numpy().reshape(-1)))


@pytest.mark.parametrize("packed", [False, True])
def test_fused_function_gradcheck(packed: bool) -> None:
    """LoraFunction's backward against finite differences (both routes: base inside and base given), the mask
    drawn again from its seed in backward or unpacked from the bits forward kept."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    W, b = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, dtype=torch.float64, requires_grad=True)
    A = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    B = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    p, seed = 0.4, 1234
    dropped = x.detach() * dropout_keep(x.shape, p, seed, x.device) / keep_probability(p)

    def routed(x, b, A, B):  # x̄ = x ⊙ keep must follow x for finite differences: rebuild it from the same mask
        xd = x.detach() * dropout_keep(x.shape, p, seed, x.device)  # the function folds 1/(1 − p) into s
        bits = _packed(dropout_keep(x.shape, p, seed, x.device)) if packed else None
        return LoraFunction.apply(x, xd, None, W, b, A, B, 1.5, p, seed, bits, False)

    assert torch.autograd.gradcheck(routed, (x, b, A, B))
    result = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, r, A, B: LoraFunction.apply(x, x.detach(), r, None, None, A, B, 0.7, 0.0, 0, None, False),
        (x, result, A, B))
    assert dropped.ne(0).float().mean() < 0.9  # the mask really drops


@pytest.mark.parametrize("joint", [False, True])
def test_siblings_share_one_mask_and_one_saved_input(joint: bool) -> None:
    """q, k and v read one tensor: one seed, one x storage and one packed mask saved for all three; per target
    (lora_joint off) each saves its own h = A x̄, jointly one H = [h_q h_k h_v]."""
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"],
                                                 lora_dropout=0.5, init_lora_weights=False)).train()
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
    assert len(saved) == (3 if joint else 5)  # x (shared), the mask's bits (shared), the h's
    assert sorted(sizes[ptr] for ptr in saved)[0] == x.numel() // 8  # the bits: one per element of x
    # the same x̃ as the reference builds with that seed
    q = attn.q_proj
    A, B = q.lora_A["default"].weight, q.lora_B["default"].weight
    keep = dropout_keep(x.shape, 0.5, lora_kernels._cache.seed, x.device)
    expected = q.base_layer(x) + q.scaling["default"] * ((x * keep / keep_probability(0.5)) @ A.T @ B.T)
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


@pytest.mark.parametrize("p", [0.0, 0.1])
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
    # x and h, and with dropout the mask as bits (1/32 of x); with use_packed_mask(False) only its seed
    assert fused == tokens * (d_in + r) * 4 + (tokens * d_in // 8 if p > 0 else 0)
    assert fused < reference if p > 0 else fused <= reference
    with use_packed_mask(False):
        assert _saved_bytes(layer, torch.randn(tokens, d_in, requires_grad=True)) == tokens * (d_in + r) * 4


_ELEMENTWISE = {"ge", "lt", "mul", "mul_", "add", "add_", "addcmul", "addcmul_", "where", "masked_fill",
                "masked_fill_", "_to_copy", "copy_", "div", "div_", "sub", "sub_", "random_"}


def _input_sized_passes(layer: nn.Module, x: torch.Tensor) -> list[str]:
    """The elementwise ATen ops writing an x-sized tensor in one forward + backward of ``layer`` on x."""
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
    with Recorder() as recorder:
        torch.autograd.grad(layer(x).sum(), [x, *params])
    return recorder.ops


def test_dropout_costs_the_fewest_passes_over_the_input() -> None:
    """Dropout's elementwise passes over input-sized tensors in one forward + backward of a target: the mask
    compared and x ⊙ keep applied once each way, and per target the LoRA term g_h A masked in place (mul_), into
    which the matmul then accumulates g W; the 1/(1 − p) rides on the scalar s (before: 8 passes, 2 of them for
    the scale and one more per target; an addcmul_ of the term into g W until session 8). Forward keeps the mask
    as bits (a 0/1 byte per element compared, packed by numpy, copied into x's dtype), so backward unpacks it
    (numpy, then a copy) instead of drawing it again; with use_packed_mask(False) it draws again. The random
    draw itself fills x.numel() / 4 int64 words, not counted here (benchmarks/lora_floor.py times it)."""
    tokens, d_in = 64, 96
    layer = LoraLinear(nn.Linear(d_in, 80).requires_grad_(False))
    layer.update_layer("default", LoraConfig(r=4, lora_dropout=0.1, init_lora_weights=False), "m")
    layer.set_adapter(["default"])
    layer.train()
    x = torch.randn(tokens, d_in, requires_grad=True)
    assert _input_sized_passes(layer, x) == ["ge", "copy_", "mul", "copy_", "mul", "mul_"]
    with use_packed_mask(False):  # a new input (the same one would find its x̄ in the siblings' cache)
        assert _input_sized_passes(layer, torch.randn(tokens, d_in, requires_grad=True)) == [
            "ge", "mul", "ge", "mul", "mul_"]
    layer.eval()  # without dropout none at all: the LoRA term is added inside the matmuls (addmm_)
    assert _input_sized_passes(layer, x) == []


def test_dropout_keep_rate_and_determinism() -> None:
    keep = dropout_keep(torch.Size((400, 500)), 0.05, 7, torch.device("cpu"))
    assert abs(keep.float().mean().item() - keep_probability(0.05)) < 2e-3
    assert torch.equal(keep, dropout_keep(torch.Size((400, 500)), 0.05, 7, torch.device("cpu")))
    assert not torch.equal(keep, dropout_keep(torch.Size((400, 500)), 0.05, 8, torch.device("cpu")))
    as_float = dropout_keep(torch.Size((400, 500)), 0.05, 7, torch.device("cpu"), torch.float32)
    assert as_float.dtype == torch.float32 and torch.equal(as_float, keep.float())  # the same mask as 0/1
    assert abs(keep_probability(0.05) - 0.95) < 2**-16


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
    """One target: the fused path keeps x as it is (bf16) and h = A x̃ (fp32), with dropout also the mask as bits;
    the reference keeps x̃ in fp32 (and the bool mask with dropout), i.e. 2 more bytes per input element (2⅞ with
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
    assert fused == tokens * (2 * d_in + 4 * r + (d_in // 8 if p > 0 else 0))  # with dropout, the mask as bits
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
    which SDPA keeps anyway, so only q/k/v, gate/up and down add an input. Dropout costs the fused path one bit
    per element of each group's input (o's included), its mask packed for backward."""
    from saved_bytes import saved_bytes

    pm = get_peft_model(tiny_llama().to(torch.bfloat16),
                        LoraConfig(r=4, target_modules="all-linear", lora_dropout=p, init_lora_weights=False))
    tokens, layers = ids.numel(), 2
    fused = saved_bytes(pm, ids)
    with use_fused(False):
        reference = saved_bytes(pm, ids)
    widths = {"q_proj": 32, "k_proj": 32, "v_proj": 32, "o_proj": 32, "gate_proj": 32, "up_proj": 32, "down_proj": 64}
    groups = {"q/k/v": 32, "gate/up": 32, "down": 64}  # o's input is SDPA's saved output
    fp32_copies = layers * 4 * sum(widths.values())
    bf16_inputs = layers * 2 * sum(groups.values())
    masks = (layers * sum(widths.values()) - 3 * 32) if p > 0 else 0
    bits = layers * (32 + 32 + 32 + 64) // 8 if p > 0 else 0  # per token: q/k/v, o, gate/up, down
    assert reference - fused == tokens * (fp32_copies - bf16_inputs + masks - bits)
    assert fused == 41_780 + tokens * bits  # the floor's tensors + x once per group (bf16) + A·x per target (fp32)


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
    """The mask backward unpacks from forward's bits is the one it would draw again from the seed: same loss,
    same gradients, bit for bit, on a model whose every target drops (per target and jointly)."""
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.3,
                                                 init_lora_weights=False)).train()
    params = [p for p in pm.parameters() if p.requires_grad]
    results = []
    for packed in (True, False):
        torch.manual_seed(5)
        with use_joint(joint), use_packed_mask(packed):
            loss = pm(ids, labels=ids).loss
            results.append((loss.detach(), torch.autograd.grad(loss, params)))
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


def test_without_numpy_the_mask_is_drawn_again(monkeypatch) -> None:
    """numpy is not a core dependency: without it nothing is packed and backward draws the mask again."""
    x = torch.randn(8, 16)
    assert lora_kernels.packs_mask(x)
    monkeypatch.setattr(lora_kernels, "_np", None)
    assert not lora_kernels.packs_mask(x)
    lora_kernels.clear_caches()
    _, _, bits = lora_kernels.shared_dropout(x, 0.2)
    assert bits is None


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
