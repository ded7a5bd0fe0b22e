"""QLoRA: the LoRA family on a quantised (NF4 / int8) frozen base, checked on numbers.

NF4's bound per weight: the code is picked with the block's true absmax s but decoded with the
double-quantised ŝ, so |w − ŵ| ≤ 0.1519·s (half the widest gap between NF4 levels, −1 → −0.6962) + |s − ŝ|,
and |s − ŝ| ≤ (largest |s − mean| of the scaler block) / 256 (int8 rounding of the scale).
"""

from __future__ import annotations

import copy
import importlib
import sys
import warnings

import peft
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import peftkit
from peftkit import (
    DeltaLoraConfig,
    LoraConfig,
    LoraFAConfig,
    PeftConfigError,
    PeftError,
    PeftModel,
    VeraConfig,
    get_peft_model,
    prepare_model_for_kbit_training,
    quantize_base,
)
from peftkit import quantize as q
from peftkit.optim import attach

pytest.importorskip("torchao")
NF4_HALF_GAP = (1.0 - 0.6962) / 2  # the widest gap between NF4 levels, halved


def small_llama(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A Llama whose linear weights fit NF4's 64-element blocks (hidden 64, intermediate 128)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def quantized_llama(seed: int = 0, method: str = "nf4", **kwargs):
    model = small_llama(seed)
    quantize_base(model, method, **kwargs)
    return model


def packed(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Copies of every quantised weight's packed tensors (codes, scales, ...), by parameter name."""
    out = {}
    for name, p in model.named_parameters():
        if q.quantization_of(p) is not None:
            out[name] = [getattr(p, n).clone() for n in p.__tensor_flatten__()[0] if getattr(p, n) is not None]
    return out


@pytest.fixture
def ids() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(1, 128, (2, 12))


# ---- quantisation itself ---------------------------------------------------------------------------
def test_nf4_dequantisation_error_within_its_bound():
    torch.manual_seed(0)
    lin = nn.Linear(512, 256, bias=False)
    nn.init.normal_(lin.weight, std=0.02)
    w = lin.weight.detach().clone()
    report = quantize_base(nn.Sequential(lin), "nf4", block_size=64, scaler_block_size=256)
    assert report.quantized == ["0"] and not report.adjusted
    w_hat = q.dense_weight(lin.weight)
    blocks = w.reshape(-1, 64)
    s = blocks.abs().amax(dim=1)  # (2048,) the blocks' absmax
    dev = (s - s.mean()).reshape(-1, 256).abs().amax(dim=1)  # per scaler block
    bound = NF4_HALF_GAP * s + (dev / 256).repeat_interleave(256) + 1e-7
    err = (w_hat - w).reshape(-1, 64).abs()
    assert (err <= bound[:, None]).all(), (err / bound[:, None]).max()
    rel = ((w_hat - w).norm() / w.norm()).item()
    assert 0.05 < rel < 0.11  # NF4 on Gaussian weights: about 9-10 % RMS error (4 bits)
    assert report.bytes_after / report.bytes_before < 0.13  # 0.516 byte per weight at the defaults


def _torchao_literal_dequantize(t) -> torch.Tensor:
    """torchao 0.18's NF4Tensor.get_original_weight, step for step (peftkit replaces it with a one-gather decode)."""
    first, second = (t.quantized_data >> 4).to(torch.long), (t.quantized_data & 0b1111).to(torch.long)
    scalers = t.dequantize_scalers(t.quantized_scalers, t.quantization_factor, t.scaler_block_size)
    repeated = scalers.unsqueeze(-1).expand(scalers.size(0), t.block_size // 2).flatten()
    halves = [(t.nf4[codes] * repeated).unsqueeze(-1).transpose(0, 1) for codes in (first, second)]
    return torch.stack(halves, dim=-1).reshape(t.shape)


@pytest.mark.parametrize("dtype, block, scaler_block", [(torch.float32, 64, 256), (torch.bfloat16, 64, 256),
                                                        (torch.float32, 32, 128), (torch.float16, 64, 64)])
def test_fast_nf4_dequantisation_is_torchaos_bit_for_bit(dtype, block, scaler_block):
    """Every path that dequantises (F.linear forward and backward, .to(dtype)) goes through the one-gather decode;
    it must equal torchao's own, bit for bit, in every dtype and block size."""
    _, nf4 = q._torchao()
    assert nf4.NF4Tensor.get_original_weight is q._fast_nf4_dequantize
    torch.manual_seed(0)
    t = nf4.to_nf4(torch.randn(256, 64, dtype=dtype) * 0.05, block, scaler_block)
    fast = t.get_original_weight()
    assert fast.dtype == dtype and fast.shape == (256, 64)
    assert torch.equal(fast, _torchao_literal_dequantize(t))
    assert torch.equal(t.to(torch.float32), fast.float())
    x = torch.randn(3, 64, dtype=dtype, requires_grad=True)
    y = F.linear(x, t)
    y.backward(torch.ones_like(y))
    assert torch.equal(y, x @ fast.T) and torch.equal(x.grad, torch.ones_like(y) @ fast)


def test_int8_dequantisation_error_within_half_a_step():
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    w = lin.weight.detach().clone()
    quantize_base(nn.Sequential(lin), "int8")
    step = w.abs().amax(dim=1, keepdim=True) / 127  # symmetric, one scale per output row
    err = (q.dense_weight(lin.weight) - w).abs()
    assert (err <= step / 2 * 1.001 + 1e-7).all()
    assert err.max() > 0


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_quantized_linear_equals_its_dequantized_weight(method):
    torch.manual_seed(0)
    lin = nn.Linear(128, 64)
    quantize_base(nn.Sequential(lin), method)
    dense = q.dense_weight(lin.weight).clone()
    x = torch.randn(3, 5, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = lin(x), F.linear(x_ref, dense, lin.bias)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    assert not lin.weight.requires_grad and lin.weight.grad is None


def test_report_lists_what_stays_dense():
    model = small_llama()
    model.model.layers[0].mlp.odd = nn.Linear(10, 6)  # 60 weights: not a multiple of 64
    report = quantize_base(model, "nf4", skip=["layers.1.mlp.down_proj"])
    assert "model.layers.0.mlp.odd" in report.skipped and "block_size=64" in report.skipped["model.layers.0.mlp.odd"]
    assert report.skipped["lm_head"].startswith("output head")
    assert report.skipped["model.layers.1.mlp.down_proj"] == "named in skip"
    assert len(report.quantized) == 13
    # k_proj: 32 blocks, fewer than scaler_block_size=256: a smaller scaler block, said so
    assert "256 -> 32" in report.adjusted["model.layers.0.self_attn.k_proj"]
    assert q.quantization_of(model.lm_head.weight) is None
    assert q.quantization_of(model.model.embed_tokens.weight) is None
    assert q.quantization_of(model.model.layers[0].self_attn.q_proj.weight) == "nf4"
    assert "kept dense: lm_head" in str(report)


def test_tied_weights_stay_dense():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64))
    model[1].weight = model[0].weight
    report = quantize_base(model, "nf4")
    assert report.quantized == ["2"] and set(report.skipped) == {"0", "1"}
    assert report.skipped["0"] == "weight tied to 1.weight"


def test_quantize_base_errors():
    with pytest.raises(PeftConfigError, match="use one of nf4, int8"):
        quantize_base(small_llama(), "fp4")
    with pytest.raises(PeftConfigError, match="compute_dtype 'half' is not known"):
        quantize_base(small_llama(), "nf4", compute_dtype="half")
    with pytest.raises(PeftConfigError, match="block_size must be a positive even integer"):
        quantize_base(small_llama(), "nf4", block_size=63)
    pm = get_peft_model(small_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(PeftError, match="before adapters are added"):
        quantize_base(pm.base_model.model, "nf4")
    with pytest.raises(PeftError, match="no nn.Linear weight to quantise"):
        quantize_base(nn.Sequential(nn.Linear(3, 5)), "nf4")


def test_missing_torchao_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(q, "_TORCHAO", None)
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(PeftError, match=r'pip install "peftkit\[quant\]"'):
        quantize_base(small_llama(), "nf4")
    assert q.quantization_of(torch.zeros(2)) is None


def test_import_peftkit_works_without_torchao(monkeypatch):
    """A fresh import of every peftkit module with torchao unimportable (the originals come back afterwards)."""
    ours = [m for m in sys.modules if m == "peftkit" or m.startswith("peftkit.")]
    for name in ours:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchao", None)  # `import torchao` now raises ImportError
    try:
        fresh = importlib.import_module("peftkit")
        assert fresh is not peftkit and fresh.quantize._TORCHAO is None
        with pytest.raises(fresh.PeftError, match=r'pip install "peftkit\[quant\]"'):
            fresh.quantize_base(nn.Sequential(nn.Linear(64, 64)), "nf4")
    finally:  # fresh modules the first import did not have must not outlive the test
        for name in [m for m in sys.modules if (m == "peftkit" or m.startswith("peftkit.")) and m not in ours]:
            del sys.modules[name]


def test_deepcopy_and_device_moves_keep_the_packed_weights():
    model = quantized_llama()
    before = packed(model)
    twin = copy.deepcopy(model).to("cpu")
    after = packed(twin)
    assert before.keys() == after.keys() and before
    for name in before:
        assert all(torch.equal(a, b) for a, b in zip(before[name], after[name], strict=True))


# ---- training on the quantised base ----------------------------------------------------------------
CONFIGS = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    "rslora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True, lora_dropout=0.1),
    "dora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True),
    "lora_fa": lambda: LoraFAConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1),
    "vera": lambda: VeraConfig(r=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
    "delta_lora": lambda: DeltaLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", update_start=1),
}


def train(pm: PeftModel, ids: torch.Tensor, steps: int = 4, lr: float = 1e-2) -> list[float]:
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
    if any(isinstance(c, DeltaLoraConfig) for c in pm.peft_config.values()):
        attach(pm, opt)  # Delta-LoRA counts optimizer steps
    losses = []
    for _ in range(steps):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        for name, p in pm.named_parameters():
            assert (p.grad is not None) == p.requires_grad, name  # gradients on adapter parameters only
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    pm.eval()
    return losses


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_family_trains_on_nf4_with_checkpointing_and_the_base_never_changes(kind, ids):
    model = quantized_llama()
    before = packed(model)
    prepare_model_for_kbit_training(model)  # frozen base, gradient checkpointing (reentrant), input grads
    assert model.is_gradient_checkpointing
    pm = get_peft_model(model, CONFIGS[kind]())
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(q.quantization_of(p) is None for n, p in pm.named_parameters() if n in trainable)
    losses = train(pm, ids)
    assert losses[-1] < losses[0] - 1e-3, losses
    after = packed(pm)
    assert len(after) == 14
    for name, tensors in before.items():
        twin = next(v for k, v in after.items() if k.endswith(name.replace(".weight", "") + ".base_layer.weight")
                    or k.endswith(name))
        assert all(torch.equal(a, b) for a, b in zip(tensors, twin, strict=True)), name


def graph_nodes(output: torch.Tensor) -> set[str]:
    """The names of the autograd nodes behind ``output``."""
    seen, todo, names = set(), [output.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(next_fn for next_fn, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("dropout, compute", [(0.0, None), (0.1, None), (0.0, "bf16")])
def test_lora_on_nf4_fuses_the_base_and_equals_the_reference(dropout, compute, ids, monkeypatch):
    """LoRA on an NF4 Linear runs in one LoraFunction node that decodes W itself (forward, and again in backward:
    never kept dense), not torchao's LinearNF4 node plus an adapter node; the loss and every gradient equal the
    reference path's (plain torch ops, torchao's own linear), and both decode each weight as often."""
    from peftkit.methods.lora_kernels import use_fused

    model = small_llama()
    quantize_base(model, "nf4", compute_dtype=compute)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                          init_lora_weights=False))
    pm.train()
    decodes = []
    monkeypatch.setattr(q._torchao()[1].NF4Tensor, "get_original_weight",
                        lambda t: decodes.append(1) or q._fast_nf4_dequantize(t))
    runs = {}
    for fused in (True, False):
        decodes.clear()
        torch.manual_seed(3)  # the same dropout seeds on both paths
        with use_fused(fused):
            loss = pm(input_ids=ids, labels=ids).loss
            nodes = graph_nodes(loss)
            loss.backward()
        grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
        pm.zero_grad(set_to_none=True)
        runs[fused] = (loss.item(), grads, nodes, len(decodes))
    (loss_f, grads_f, nodes_f, decodes_f), (loss_r, grads_r, nodes_r, decodes_r) = runs[True], runs[False]
    assert "LinearNF4Backward" in nodes_r and "LinearNF4Backward" not in nodes_f
    assert "LoraFunctionBackward" in nodes_f
    # 14 NF4 Linears: one decode in forward, one in backward, but for layer 0's q, k, v: their input (the frozen
    # embeddings' output) needs no gradient, so their backward skips g W
    assert decodes_f == decodes_r == 2 * 14 - 3
    # bf16: g_x = g W + the LoRA term rounds once in the fused node, twice as two nodes' sum; the same two paths on
    # a dense bf16 base differ by 1.2 % of a gradient's largest entry (measured), NF4 by 1.7 %
    tol = 1e-5 if compute is None else 2e-2
    assert loss_f == pytest.approx(loss_r, rel=tol)
    assert len(grads_f) == 28
    for name, g in grads_f.items():
        assert g.abs().max() > 0, name
        assert torch.allclose(g, grads_r[name], rtol=tol, atol=tol * g.abs().max().item()), name


def test_bf16_compute_trains_with_fp32_adapters(ids):
    model = small_llama()
    report = quantize_base(model, "nf4", compute_dtype="bf16")  # a YAML run config's spelling
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16 and len(report.quantized) == 14
    assert 0.15 < report.ratio < 0.25  # bf16 embeddings and head + NF4 linears, against the fp32 model as given
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert pm.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    losses = train(pm, ids)
    assert losses[-1] < losses[0] - 1e-3


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_int8_base_trains_lora_and_dora(kind, ids):
    model = quantized_llama(method="int8")
    before = packed(model)
    pm = get_peft_model(model, CONFIGS[kind]())
    losses = train(pm, ids)
    assert losses[-1] < losses[0] - 1e-3
    after = packed(pm)
    assert sum(len(v) for v in before.values()) == sum(len(v) for v in after.values())
    for a, b in zip(before.values(), after.values(), strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_prepare_model_for_kbit_training_keeps_hf_meaning():
    model = small_llama(dtype=torch.bfloat16)
    quantize_base(model, "nf4")
    prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    assert all(not p.requires_grad for p in model.parameters())
    assert model.model.norm.weight.dtype == torch.float32  # fp16/bf16 dense parameters to fp32
    assert model.lm_head.weight is model.model.embed_tokens.weight or not model.config.tie_word_embeddings
    assert q.quantization_of(model.model.layers[0].mlp.up_proj.weight) == "nf4"  # quantised ones untouched
    assert model.is_gradient_checkpointing
    plain = small_llama()
    prepare_model_for_kbit_training(plain)  # not quantised: freeze only, as HF PEFT
    assert not plain.is_gradient_checkpointing and not any(p.requires_grad for p in plain.parameters())


# ---- files and merging -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lora", "dora", "vera", "delta_lora"])
def test_save_then_load_onto_a_fresh_quantized_base_is_identical(kind, ids, tmp_path):
    pm = get_peft_model(quantized_llama(), CONFIGS[kind]())
    train(pm, ids, steps=3)
    with torch.no_grad():
        expected = pm(input_ids=ids).logits
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(quantized_llama(), tmp_path)
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    if kind == "delta_lora":  # saved as its exact rank-2r LoRA, scaling folded into B: float rounding differs
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got, expected)
    with loaded.disable_adapter(), torch.no_grad():
        base = loaded(input_ids=ids).logits
    assert (base - expected).abs().max() > 1e-3  # the adapter moved the output: the comparison means something


MERGEABLE = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    "dora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, use_dora=True),
    "vera": lambda: VeraConfig(r=8, target_modules=["q_proj", "v_proj"], init_weights=False),
    "ia3": lambda: peftkit.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"],
                                     init_ia3_weights=False),
}


@pytest.mark.parametrize("kind", list(MERGEABLE))
def test_merge_equals_unmerged_and_unmerge_restores_the_quantized_weight(kind, ids):
    pm = get_peft_model(quantized_llama(), MERGEABLE[kind]())
    q_proj = pm.model.model.layers[0].self_attn.q_proj
    original = q_proj.base_layer.weight
    with torch.no_grad():
        unmerged = pm(input_ids=ids).logits
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pm.merge_adapter()
        assert any("dequantised" in str(w.message) for w in caught)
        assert q.quantization_of(q_proj.base_layer.weight) is None  # dense while merged
        torch.testing.assert_close(pm(input_ids=ids).logits, unmerged, rtol=1e-5, atol=1e-5)
        pm.unmerge_adapter()
        assert q_proj.base_layer.weight is original  # the quantised original, not a re-quantised copy
        assert torch.equal(pm(input_ids=ids).logits, unmerged)


@pytest.mark.parametrize("requantize", [False, True])
def test_merge_and_unload_dense_or_requantized(requantize, ids):
    pm = get_peft_model(quantized_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                       init_lora_weights=False))
    layer = pm.model.model.layers[1].mlp.up_proj
    original = layer.base_layer.weight
    expected_weight = q.dense_weight(original) + layer.delta_weight("default")
    with torch.no_grad():
        unmerged = pm(input_ids=ids).logits
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merged_model = pm.merge_and_unload(requantize=requantize)
        merged = merged_model(input_ids=ids).logits
    up = merged_model.model.layers[1].mlp.up_proj
    assert not hasattr(up, q.MERGE_STASH)
    if requantize:  # the merged weight, rounded to NF4 again with the original's block sizes
        assert q.quantization_of(up.weight) == "nf4" and up.weight.scaler_block_size == original.scaler_block_size
        assert torch.equal(q.dense_weight(up.weight), q.dense_weight(q.quantize_like(expected_weight, original)))
        rel = (q.dense_weight(up.weight) - expected_weight).norm() / expected_weight.norm()
        assert 0 < rel < 0.11
        assert not torch.allclose(merged, unmerged, atol=1e-4)
    else:
        assert all(q.quantization_of(p) is None for p in merged_model.parameters())
        torch.testing.assert_close(up.weight, expected_weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)


def test_qlora_lora_file_loads_in_hf_peft_on_the_fp32_base(ids, tmp_path):
    pm = get_peft_model(quantized_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    train(pm, ids, steps=3)
    with torch.no_grad():
        qlora_out = pm(input_ids=ids).logits
    pm.save_pretrained(tmp_path)
    hf = peft.PeftModel.from_pretrained(small_llama(), tmp_path).eval()
    ours = PeftModel.from_pretrained(small_llama(), tmp_path)
    with torch.no_grad():
        hf_out, our_out = hf(input_ids=ids).logits, ours(input_ids=ids).logits
        fp32_base = small_llama()(input_ids=ids).logits
    torch.testing.assert_close(hf_out, our_out, rtol=1e-5, atol=1e-5)
    assert (hf_out - fp32_base).abs().max() > 1e-2  # the trained adapter is really in the file
    # on the fp32 base the adapter gives what it gave on NF4, up to the base's quantisation error
    assert (hf_out - qlora_out).abs().max() < 0.1 * qlora_out.abs().max()


def test_delta_lora_on_nf4_keeps_the_base_and_saves_a_lora_file(ids, tmp_path):
    """Delta-LoRA never writes W in peftkit (W_0 + λ(P_t − P_K) is a frozen rank-2r path), so it needs no
    refusal on a quantised base: the base stays bit for bit, and its rank-2r LoRA file loads anywhere."""
    pm = get_peft_model(quantized_llama(), CONFIGS["delta_lora"]())
    before = packed(pm)
    train(pm, ids, steps=3)
    for name, tensors in packed(pm).items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, before[name], strict=True))
    with torch.no_grad():
        expected = pm(input_ids=ids).logits
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(quantized_llama(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_peftkit_namespace():
    assert peftkit.quantize_base is q.quantize_base
    assert peftkit.prepare_model_for_kbit_training is q.prepare_model_for_kbit_training


def test_trainer_quantization_section_reaches_quantize_base():
    """The run config's ``quantization: {method: nf4, compute_dtype: bf16}`` goes through quantize_base."""
    from types import SimpleNamespace

    from peftkit.train.modeling import quantize

    model = small_llama()
    report = quantize(model, SimpleNamespace(quantization={"method": "nf4", "block_size": 32, "compute_dtype": "bf16"}))
    assert report.method == "nf4" and report.settings["block_size"] == 32 and len(report.quantized) == 14
    assert model.model.norm.weight.dtype == torch.bfloat16
