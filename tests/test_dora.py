"""DoRA against its equation (W' = m · (W + sBA) / ‖W + sBA‖, norm detached) and against the real HF ``peft``."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import tiny_gpt2, tiny_llama
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D

import peftkit
from peftkit import LoraConfig, TargetModulesError, get_peft_model
from peftkit.methods.base import AdapterLayer, adapter_layers
from peftkit.methods.dora import DoraVariant
from peftkit.methods.lora import LoraLinear

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
LIBS = {"peftkit": peftkit, "hf": peft}
CASES = {
    "llama_all_linear": (tiny_llama, {"target_modules": "all-linear"}),
    "gpt2_c_attn_c_fc": (tiny_gpt2, {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True}),
}


# ---- one layer against the formula ------------------------------------------------------------------
def _dora_layer(base: nn.Module, *, perturb: bool = True, **cfg) -> LoraLinear:
    layer = LoraLinear(base)
    layer.update_layer("default", LoraConfig(**{"r": 4, "lora_alpha": 6, "use_dora": True, **cfg}), "m")
    layer.set_adapter(["default"])
    if perturb:  # non-zero B, and m away from its initial norm: a fresh adapter proves little
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_(0, 0.5)
            layer.lora_magnitude_vector["default"].mul_(torch.rand_like(layer.lora_magnitude_vector["default"]) + 0.5)
    return layer


def _reference_weight(layer: LoraLinear, detach_norm: bool = True) -> torch.Tensor:
    """The paper's W' = m · (W + sBA) / ‖W + sBA‖ per output row, as (d_out, d_in)."""
    W = layer.base_layer.weight.T if layer.fan_in_fan_out else layer.base_layer.weight
    V = W + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    norm = V.norm(dim=1, keepdim=True)
    return layer.lora_magnitude_vector["default"][:, None] * V / (norm.detach() if detach_norm else norm)


BASES = {"linear": lambda: nn.Linear(10, 6), "conv1d": lambda: Conv1D(6, 10)}  # both 10 -> 6, with bias


@pytest.mark.parametrize("kind", list(BASES))
def test_forward_equals_formula(kind: str) -> None:
    torch.manual_seed(0)
    layer = _dora_layer(BASES[kind](), fan_in_fan_out=kind == "conv1d")
    x = torch.randn(3, 5, 10)
    expected = x @ _reference_weight(layer).T + layer.base_layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert (layer(x) - layer.base_layer(x)).abs().max() > 0.1


def test_dropout_in_training_matches_hf_decomposition() -> None:
    """With dropout, W x̃ is recomputed from the dropped input (bias once, from the base output)."""
    torch.manual_seed(0)
    layer = _dora_layer(nn.Linear(10, 6), lora_dropout=0.5).train()
    x = torch.randn(4, 10)
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    xd = F.dropout(x, 0.5, training=True)
    W, m = layer.base_layer.weight, layer.lora_magnitude_vector["default"]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    factor = m / (W + 1.5 * B @ A).norm(dim=1)
    expected = layer.base_layer(x) + (factor - 1) * (xd @ W.T) + factor * 1.5 * (xd @ A.T @ B.T)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_fresh_adapter_equals_base_and_magnitude_is_row_norm() -> None:
    torch.manual_seed(0)
    base = nn.Linear(10, 6)
    layer = _dora_layer(base, perturb=False)
    torch.testing.assert_close(layer.lora_magnitude_vector["default"], base.weight.norm(dim=1), rtol=0, atol=0)
    x = torch.randn(4, 10)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-6, atol=1e-6)
    # as HF: with a non-zero B at creation, m = ‖W + sBA‖ and the adapter starts as plain LoRA
    layer = _dora_layer(nn.Linear(10, 6), perturb=False, init_lora_weights=False)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(layer(x), layer.base_layer(x) + 1.5 * x @ A.T @ B.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", list(BASES))
def test_gradients_treat_the_norm_as_constant(kind: str) -> None:
    torch.manual_seed(0)
    layer = _dora_layer(BASES[kind](), fan_in_fan_out=kind == "conv1d")
    params = [layer.lora_magnitude_vector["default"], layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    x, target = torch.randn(5, 10), torch.randn(5, 6)
    grads = {}
    for name, run in [("ours", lambda: layer(x)),
                      ("detached", lambda: x @ _reference_weight(layer).T + layer.base_layer.bias),
                      ("attached", lambda: x @ _reference_weight(layer, detach_norm=False).T + layer.base_layer.bias)]:
        grads[name] = torch.autograd.grad(((run() - target) ** 2).sum(), params)
    for ours, ref in zip(grads["ours"], grads["detached"], strict=True):
        assert ours.abs().max() > 1e-3
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    for ours, attached in zip(grads["ours"][1:], grads["attached"][1:], strict=True):  # A and B: the norm's inputs
        assert (ours - attached).abs().max() > 1e-3  # the detach matters: the reference can tell


@pytest.mark.parametrize("kind", list(BASES))
def test_merge_equals_unmerged_and_unmerge_restores(kind: str) -> None:
    torch.manual_seed(0)
    layer = _dora_layer(BASES[kind](), fan_in_fan_out=kind == "conv1d")
    # a second DoRA adapter active on top: merged in turn, its norm is still taken from the base W
    layer.update_layer("b", LoraConfig(r=2, use_dora=True, init_lora_weights=False, fan_in_fan_out=kind == "conv1d"), "m")
    with torch.no_grad():
        layer.lora_magnitude_vector["b"].mul_(1.3)
    layer.set_adapter(["default", "b"])
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(4, 10)
    unmerged = layer(x)
    layer.merge()
    merged = layer(x)
    assert (merged - unmerged).abs().max() <= 1e-5 * max(1.0, unmerged.abs().max().item())
    layer.set_adapter(["default"])
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-5)  # |W + ΔW| ~ 3: fp32 rounding
    torch.testing.assert_close(layer(x), x @ _reference_weight(layer).T + layer.base_layer.bias, rtol=1e-5, atol=1e-5)


def test_trainable_count_and_keys() -> None:
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True))
    # q: 32->32, v: 32->16, down: 64->32; two layers; each target adds r(d_in + d_out) + d_out
    assert pm.get_nb_trainable_parameters()[0] == 2 * (4 * (64 + 48 + 96) + (32 + 16 + 32))
    keys = peftkit.get_peft_model_state_dict(pm)
    assert keys["base_model.model.model.layers.0.self_attn.v_proj.lora_magnitude_vector"].shape == (16,)


def test_refuses_embedding_clearly() -> None:
    model = tiny_llama()
    with pytest.raises(TargetModulesError, match="use_dora=True supports Linear and Conv1D targets only, not Embedding"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj", "embed_tokens"], use_dora=True))
    assert not list(adapter_layers(model))  # checked before any module was replaced
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)).eval()
    assert isinstance(pm.base_model.model.model.layers[0].self_attn.q_proj.variant["default"], DoraVariant)
    ids = torch.ones(2, 3, dtype=torch.long)  # DoRA mixes per row now (tests/test_mixed_batch.py checks the values)
    assert pm(ids, adapter_names=["default", "__base__"]).logits.shape == (2, 3, 128)


# ---- against HF PEFT -------------------------------------------------------------------------------
@torch.no_grad()
def _create(lib: str, case: str, adapter: str = "default", model=None, **extra):
    make, cfg = CASES[case]
    config = LIBS[lib].LoraConfig(**{"r": 4, "lora_alpha": 8, "use_dora": True, "init_lora_weights": False, **cfg, **extra})
    if model is None:
        model = LIBS[lib].get_peft_model(make(), config)
    else:
        model.add_adapter(adapter, config)
        model.set_adapter(adapter)
    g = torch.Generator().manual_seed(len(adapter))
    for p in [p for p in model.parameters() if p.requires_grad]:
        p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("src", list(LIBS))
def test_interop_both_ways(case: str, src: str, tmp_path, ids) -> None:
    dst = "hf" if src == "peftkit" else "peftkit"
    source = _create(src, case)
    expected = _logits(source, ids)
    assert (expected - _logits(CASES[case][0](), ids)).abs().max() > 1e-2
    source.save_pretrained(str(tmp_path))
    with open(tmp_path / "adapter_config.json") as fh:
        assert json.load(fh)["use_dora"] is True
    loaded = LIBS[dst].PeftModel.from_pretrained(CASES[case][0](), str(tmp_path)).eval()
    assert loaded.peft_config["default"].use_dora
    assert (_logits(loaded, ids) - expected).abs().max() <= 1e-5
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    got = LIBS[dst].get_peft_model_state_dict(loaded)
    assert sorted(saved) == sorted(got) and any(k.endswith(".lora_magnitude_vector") for k in saved)
    assert all(torch.equal(got[k], v) for k, v in saved.items())
    # the other library writes the same keys and shapes
    other = tmp_path / "again"
    loaded.save_pretrained(str(other))
    assert {k: v.shape for k, v in load_file(str(other / "adapter_model.safetensors")).items()} == {
        k: v.shape for k, v in saved.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_merge_and_unload_of_hf_file_equals_hf(case: str, tmp_path, ids) -> None:
    make = CASES[case][0]
    source = _create("hf", case)
    adapted = _logits(source, ids)
    source.save_pretrained(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(make(), str(tmp_path)).merge_and_unload()
        ours = peftkit.PeftModel.from_pretrained(make(), str(tmp_path)).merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in ours.modules())
    assert (_logits(ours, ids) - adapted).abs().max() <= 1e-5
    their_state = theirs.state_dict()
    assert sorted(ours.state_dict()) == sorted(their_state)
    for key, tensor in ours.state_dict().items():
        torch.testing.assert_close(tensor, their_state[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("first_dora", [True, False])
def test_two_active_adapters_match_hf(first_dora: bool, ids) -> None:
    """A DoRA adapter after another active adapter scales the running output (base + earlier adapters), as HF."""
    outputs = {}
    for lib in LIBS:
        pm = _create(lib, "llama_all_linear", use_dora=first_dora)
        pm = _create(lib, "llama_all_linear", "second", model=pm)
        if lib == "hf":
            pm.base_model.set_adapter(["default", "second"])
        else:
            pm.set_adapter(["default", "second"])
        outputs[lib] = _logits(pm, ids)
        pm.merge_adapter()
        assert (_logits(pm, ids) - outputs[lib]).abs().max() <= 1e-5
    assert (outputs["hf"] - outputs["peftkit"]).abs().max() <= 1e-5


# ---- the fused training path (dora.DoraFunction) -------------------------------------------------------
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


def _step(pm, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    pm.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # GPT-2's own dropout draws the same masks in both runs
    out = pm(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads, _count_nodes(out.loss, "DoraFunction")


@pytest.mark.parametrize("make, cfg, second_dora", [
    (tiny_llama, {"target_modules": "all-linear"}, True),
    (tiny_llama, {"target_modules": "all-linear"}, False),  # DoRA first, then a plain LoRA into its output
    (tiny_llama, {"target_modules": ["q_proj", "v_proj"], "bias": "all"}, True),
    (tiny_gpt2, {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True, "bias": "all"}, True),
    (tiny_gpt2, {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True, "bias": "lora_only"}, True),
])
def test_fused_equals_reference_fp64(make, cfg, second_dora: bool) -> None:
    """Outputs and every gradient (A, B, m, trained biases) of the fused path equal the reference's in fp64,
    with a second adapter scaling or adding into the first's output."""
    pm = get_peft_model(make().double(), LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False, **cfg))
    pm.add_adapter("second", LoraConfig(r=2, lora_alpha=3, use_dora=second_dora, init_lora_weights=False, **cfg))
    pm.set_adapter(["default", "second"])
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "magnitude" in name:
                p.mul_(torch.rand_like(p) + 0.5)
    ids = torch.randint(1, 128, (3, 9))
    pm.train()
    fused_logits, fused, nodes = _step(pm, ids)
    assert nodes > 0
    with peftkit.methods.lora_kernels.use_fused(False):
        ref_logits, ref, ref_nodes = _step(pm, ids)
    assert ref_nodes == 0
    assert fused.keys() == ref.keys() and any("magnitude" in n for n in fused)
    torch.testing.assert_close(fused_logits, ref_logits, rtol=0, atol=1e-10)
    for name in fused:
        torch.testing.assert_close(fused[name], ref[name], rtol=1e-9, atol=1e-10, msg=name)


def test_fused_function_gradcheck() -> None:
    """DoraFunction's backward against finite differences: base inside (weight given) and base given (result)."""
    from peftkit.methods.dora import DoraFunction

    torch.manual_seed(0)
    kw = {"dtype": torch.float64}
    x = torch.randn(2, 3, 5, **kw, requires_grad=True)
    W = torch.randn(4, 5, **kw)
    b, A, B = (torch.randn(*s, **kw, requires_grad=True) for s in ((4,), (2, 5), (4, 2)))
    m = (torch.rand(4, **kw) + 0.5).requires_grad_()
    n = torch.rand(4, **kw) + 1.0
    assert torch.autograd.gradcheck(lambda x, b, A, B, m: DoraFunction.apply(x, None, W, b, A, B, m, n, 1.5, False),
                                    (x, b, A, B, m))
    assert torch.autograd.gradcheck(
        lambda x, b, A, B, m: DoraFunction.apply(x, None, W.T.contiguous(), b, A, B, m, n, 0.5, True), (x, b, A, B, m))
    result = torch.randn(2, 3, 4, **kw, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, r, b, A, B, m: DoraFunction.apply(x, r, None, b, A, B, m, n, 0.7, False), (x, result, b, A, B, m))


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_norm_identity_equals_literal_norm(fan_in_fan_out: bool) -> None:
    """‖W_i + sB_iA‖ by the low-rank identity equals the literal norm; where the adapter cancels a row of W the
    identity has no digits left and the literal norm is used."""
    from peftkit.methods.dora import dora_weight_norm, dora_weight_norm_lowrank

    torch.manual_seed(0)
    W, A, B = torch.randn(48, 40, dtype=torch.float64), torch.randn(3, 40, dtype=torch.float64), torch.randn(48, 3,
                                                                                                              dtype=torch.float64)
    w = W.T.contiguous() if fan_in_fan_out else W
    delta = (1.7 * B @ A).T if fan_in_fan_out else 1.7 * B @ A
    literal = dora_weight_norm(w, delta, fan_in_fan_out)
    fast = dora_weight_norm_lowrank((W * W).sum(1), w, A, B, 1.7, fan_in_fan_out)
    torch.testing.assert_close(fast, literal, rtol=1e-12, atol=0)
    fast32 = dora_weight_norm_lowrank((W * W).sum(1).float(), w.float(), A.float(), B.float(), 1.7, fan_in_fan_out)
    torch.testing.assert_close(fast32, literal.float(), rtol=1e-5, atol=0)
    # a layer whose adapter cancels row 0 of W exactly (rank-1 A: A = W_0ᵀ, B_0 = −1/s)
    layer = _dora_layer(nn.Linear(10, 6))
    with torch.no_grad():
        layer.lora_A["default"].weight.zero_()
        layer.lora_A["default"].weight[0] = layer.base_layer.weight[0]
        layer.lora_B["default"].weight.zero_()
        layer.lora_B["default"].weight[0, 0] = -1 / layer.scaling["default"]
        layer.lora_B["default"].weight[1, 0] = 0.3
    variant, weight = layer.variant["default"], layer.base_layer.weight
    exact = variant.weight_norm(layer, "default", weight)
    assert exact[0] < 1e-6
    torch.testing.assert_close(variant.fast_weight_norm(layer, "default", weight), exact, rtol=0, atol=0)


def test_fused_saves_at_most_1_25x_lora() -> None:
    """Saved activations of a DoRA step on a Llama-style model: ≤ 1.25× LoRA's (the reference path keeps the base
    output and B A x per target, ~2×). Deterministic bytes, no timing."""
    from saved_bytes import saved_bytes

    ids = torch.randint(1, 128, (2, 24))
    measured = {}
    for kind in ("lora", "dora"):
        pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", use_dora=kind == "dora"))
        measured[kind] = saved_bytes(pm, ids)
        if kind == "dora":
            with peftkit.methods.lora_kernels.use_fused(False):
                measured["dora_reference"] = saved_bytes(pm, ids)
    assert measured["dora"] <= 1.25 * measured["lora"]
    assert measured["dora_reference"] > 1.6 * measured["lora"]  # what the fused path saves us


def test_zero_magnitude_and_dropout_take_the_reference_path() -> None:
    """g_m divides by m: a zero in m runs the reference (finite, equal gradients); dropout in training too."""
    torch.manual_seed(0)
    layer = _dora_layer(nn.Linear(10, 6)).train()
    with torch.no_grad():
        layer.lora_magnitude_vector["default"][2] = 0.0
    x = torch.randn(4, 10, requires_grad=True)
    out = layer(x)
    assert _count_nodes(out.sum(), "DoraFunction") == 0
    torch.testing.assert_close(out, x @ _reference_weight(layer).T + layer.base_layer.bias, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert torch.isfinite(layer.lora_magnitude_vector["default"].grad).all()
    dropped = _dora_layer(nn.Linear(10, 6), lora_dropout=0.2).train()
    assert _count_nodes(dropped(x).sum(), "DoraFunction") == 0
    assert _count_nodes(dropped.eval()(x).sum(), "DoraFunction") == 1  # eval: no dropout, fused


def test_bf16_fused_takes_the_literal_norm_and_matches_the_reference() -> None:
    """16-bit weights: the norm identity would keep ~3 digits, so the fused path takes the literal norm; outputs
    equal the reference's to bf16 rounding (the sum's order differs)."""
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(64, 48).to(torch.bfloat16))
    layer.update_layer("default", LoraConfig(r=4, use_dora=True, init_lora_weights=False, autocast_adapter_dtype=False),
                       "m")
    layer.set_adapter(["default"])
    variant, weight = layer.variant["default"], layer.base_layer.weight
    assert torch.equal(variant.fast_weight_norm(layer, "default", weight), variant.weight_norm(layer, "default", weight))
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    out = layer.train()(x)
    assert out.grad_fn.name() == "DoraFunctionBackward"
    with peftkit.methods.lora_kernels.use_fused(False):
        ref = layer(x)
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=2 * 2 ** -8 * ref.abs().max().item())


# ---- fp32 adapters on a 16-bit base (the default: autocast_adapter_dtype) ------------------------------------
@pytest.mark.parametrize("given", ["weight", "result"])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_fused_mixed_dtypes_equal_one_dtype(given: str, fan_in_fan_out: bool) -> None:
    """DoraFunction with the adapter wider than x (here fp64 adapters on an fp32 base, so the check is tight):
    output and every gradient equal the all-fp64 function's on the same values, to fp32 rounding; x, y and the
    gradients of x, result and bias come back in x's dtype."""
    from peftkit.methods.dora import DoraFunction

    torch.manual_seed(0)
    d64 = {"dtype": torch.float64}
    x = torch.randn(3, 7, 10)
    W = torch.randn(10, 6) if fan_in_fan_out else torch.randn(6, 10)
    b, result = torch.randn(6), torch.randn(3, 7, 6)
    A, B, m = torch.randn(4, 10, **d64), torch.randn(6, 4, **d64), torch.rand(6, **d64) + 0.5
    n = torch.rand(6, **d64) + 1.0

    def run(cast):
        leaves = [cast(t).requires_grad_() for t in (x, b)] + [t.clone().requires_grad_() for t in (A, B, m)]
        res = cast(result).requires_grad_() if given == "result" else None
        out = DoraFunction.apply(leaves[0], res, cast(W) if given == "weight" else None, leaves[1], *leaves[2:], n,
                                 1.3, fan_in_fan_out)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape))
        return out, [t.grad for t in leaves + ([res] if res is not None else [])]

    out32, grads32 = run(lambda t: t.clone())
    out64, grads64 = run(lambda t: t.double())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out64, rtol=1e-6, atol=1e-6)
    for name, g32, g64 in zip(["x", "b", "A", "B", "m", "result"], grads32, grads64, strict=False):
        assert g32.dtype == (torch.float64 if name in "ABm" else torch.float32), name
        torch.testing.assert_close(g32.double(), g64, rtol=1e-5, atol=1e-5, msg=name)


def _peftkit_name(name: str) -> str:
    """HF PEFT's parameter name in peftkit's spelling (HF's magnitude is a module: ``...default.weight``)."""
    return name.removesuffix(".weight") if "lora_magnitude_vector" in name else name


def _bf16_step(model, ids: torch.Tensor, fused: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    with peftkit.methods.lora_kernels.use_fused(fused):
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids)
        out.loss.backward()
    grads = {_peftkit_name(n): t.grad.clone() for n, t in model.named_parameters() if t.grad is not None}
    return out.logits.float(), grads, _count_nodes(out.loss, "DoraFunction")


@pytest.mark.parametrize("cfg", [{"target_modules": "all-linear"},
                                 {"target_modules": ["q_proj", "v_proj", "down_proj"], "bias": "all"}])
def test_bf16_base_fp32_adapters_fuse_and_match_the_reference_and_hf_peft(cfg) -> None:
    """A bf16 Llama with fp32 DoRA adapters (the default) takes the fused path; logits and every trained
    gradient equal peftkit's reference path and HF PEFT 0.21's (same adapter weights), to bf16 rounding through
    two blocks (each of the three differs from the others by as much)."""
    ids = torch.randint(1, 128, (2, 12))

    def build(lib):
        config = lib.LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False, **cfg)
        torch.manual_seed(0)
        return lib.get_peft_model(tiny_llama().to(torch.bfloat16), config).train()

    pm, hf = build(peftkit), build(peft)
    trainable = {n: t for n, t in pm.named_parameters() if t.requires_grad}
    hf_trainable = {_peftkit_name(n): t for n, t in hf.named_parameters() if t.requires_grad}
    assert trainable.keys() == hf_trainable.keys()
    assert {t.dtype for n, t in trainable.items() if "lora" in n} == {torch.float32}
    with torch.no_grad():
        for n, t in trainable.items():
            if "magnitude" in n:
                t.mul_(torch.rand_like(t) + 0.5)
            hf_trainable[n].copy_(t)
    logits, grads, nodes = _bf16_step(pm, ids, True)
    assert nodes == 2 * (7 if cfg["target_modules"] == "all-linear" else 3)
    # the truth: the same (bf16-valued) model in fp64; the fused path is no further from it than the reference
    _, exact, _ = _bf16_step(copy.deepcopy(pm).double(), ids, False)
    _, reference, _ = _bf16_step(pm, ids, False)

    def error(got: dict[str, torch.Tensor]) -> float:
        return max(((got[n].double() - g).abs().max() / g.abs().max()).item() for n, g in exact.items())

    assert error(grads) <= 1.1 * error(reference), (error(grads), error(reference))
    for key, (other_logits, other, other_nodes) in {"reference": _bf16_step(pm, ids, False),
                                                    "hf": _bf16_step(hf, ids, True)}.items():
        assert other_nodes == 0
        torch.testing.assert_close(logits, other_logits, rtol=2e-2, atol=2e-2, msg=key)
        assert grads.keys() == other.keys() and any("magnitude" in n for n in grads)
        for n, g in grads.items():
            assert g.dtype == other[n].dtype, n
            scale = other[n].abs().max().item()
            assert (g - other[n]).abs().max().item() <= 5e-2 * scale, (key, n)


def test_bf16_base_fused_saves_at_most_1_25x_lora() -> None:
    """Saved activations on a bf16 Llama with fp32 adapters: fused DoRA ≤ 1.25× fused LoRA (both keep x in bf16
    once per sibling group); the reference keeps fp32 copies of x, the base output and B A x per target."""
    from saved_bytes import saved_bytes

    ids = torch.randint(1, 128, (2, 24))
    measured = {}
    for kind in ("lora", "dora"):
        pm = get_peft_model(tiny_llama().to(torch.bfloat16),
                            LoraConfig(r=4, target_modules="all-linear", use_dora=kind == "dora"))
        measured[kind] = saved_bytes(pm, ids)
        if kind == "dora":
            with peftkit.methods.lora_kernels.use_fused(False):
                measured["dora_reference"] = saved_bytes(pm, ids)
    assert measured["dora"] <= 1.25 * measured["lora"], measured
    assert measured["dora_reference"] > 2 * measured["lora"], measured


@pytest.mark.parametrize("make, cfg, dtype", [
    (tiny_llama, {"target_modules": "all-linear", "bias": "all"}, torch.float32),
    (tiny_llama, {"target_modules": "all-linear"}, torch.bfloat16),  # fp32 adapters on a bf16 base
    (tiny_gpt2, {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True}, torch.float32),
])
def test_without_gradients_no_node_and_a_kept_norm_that_follows_every_change(make, cfg, dtype, monkeypatch) -> None:
    """Without gradients (generation) DoRA runs DoraFunction's forward as a plain function and keeps n = ‖W + sBA‖
    between calls: outputs bit for bit those of the node, and every change to A, B, s or W (in place, as an
    optimizer step or a merge) is seen at the next call, equal to a fresh model's output."""
    from peftkit.methods import dora as dora_module

    pm = get_peft_model(make().to(dtype), LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False,
                                                     **cfg))
    pm.add_adapter("second", LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, **cfg))  # plain LoRA after
    pm.set_adapter(["default", "second"])
    pm.eval()
    ids = torch.randint(1, 128, (3, 9))
    calls, norms = [], []
    apply, fast = dora_module.DoraFunction.apply, DoraVariant.fast_weight_norm
    monkeypatch.setattr(dora_module.DoraFunction, "apply", lambda *a: calls.append(1) or apply(*a))
    monkeypatch.setattr(DoraVariant, "fast_weight_norm", lambda *a: norms.append(1) or fast(*a))
    with_node = pm(ids).logits.detach()
    targets = len(norms)
    assert len(calls) == targets > 0
    calls[:], norms[:] = [], []
    with torch.no_grad():
        assert torch.equal(pm(ids).logits, with_node)
        assert calls == [] and len(norms) == targets  # computed once ...
        assert torch.equal(pm(ids).logits, with_node)
        assert len(norms) == targets  # ... and kept

    layer = next(m for m in pm.modules() if isinstance(m, LoraLinear))
    changes = [lambda: layer.lora_A["default"].weight.mul_(1.5), lambda: layer.lora_B["default"].weight.add_(0.1),
               lambda: layer.scaling.update(default=layer.scaling["default"] * 2),
               lambda: layer.get_base_layer().weight.mul_(0.9)]
    before = with_node
    for change in changes:
        with torch.no_grad():
            change()
            kept = pm(ids).logits
        fresh = pm(ids).logits.detach()  # with gradients: n computed anew in the node
        assert torch.equal(kept, fresh) and not torch.equal(kept, before)
        before = kept
