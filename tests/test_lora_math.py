"""LoRA against its equation: hand-written references, merge = unmerged, exact unmerge, counts, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import TinyNet, tiny_gpt2, tiny_llama

from peftkit import LoraConfig, PeftError, get_peft_model
from peftkit.methods.lora import LoraConv2d, LoraEmbedding, LoraLinear, lora_scaling


def _random_adapter(layer, name: str = "default") -> None:
    """Make B non-zero: a fresh B = 0 adapter proves nothing."""
    with torch.no_grad():
        for p in layer.adapter_parameters(name):
            p.copy_(torch.randn_like(p) * 0.5)


def _wrap(base: nn.Module, cls, **cfg) -> nn.Module:
    layer = cls(base)
    layer.update_layer("default", LoraConfig(**{"r": 4, "lora_alpha": 6, **cfg}), "m")
    layer.set_adapter(["default"])
    _random_adapter(layer)
    return layer


@pytest.mark.parametrize("use_rslora", [False, True])
def test_linear_equals_hand_written_formula(use_rslora: bool) -> None:
    torch.manual_seed(0)
    base = nn.Linear(10, 6)
    layer = _wrap(base, LoraLinear, use_rslora=use_rslora)
    x = torch.randn(3, 5, 10)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = 6 / math.sqrt(4) if use_rslora else 6 / 4
    assert layer.scaling["default"] == pytest.approx(s)
    expected = x @ base.weight.T + base.bias + s * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert (layer(x) - base(x)).abs().max() > 0.1  # the adapter really changes the output


def test_scaling_function() -> None:
    assert lora_scaling(16, 8) == 2.0
    assert lora_scaling(16, 4, use_rslora=True) == 8.0


def test_gpt2_conv1d_equals_formula_with_transposed_weight() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(12, 8)  # nf=12 outputs, nx=8 inputs, weight (8, 12)
    layer = _wrap(base, LoraLinear, fan_in_fan_out=True)
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (8, 12)
    x = torch.randn(2, 3, 8)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = x @ base.weight + base.bias + 1.5 * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert layer.delta_weight("default").shape == base.weight.shape


def test_embedding_equals_formula() -> None:
    torch.manual_seed(0)
    base = nn.Embedding(20, 6, padding_idx=0)
    layer = _wrap(base, LoraEmbedding)
    ids = torch.tensor([[0, 3, 19], [5, 5, 1]])
    A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    assert A.shape == (4, 20) and B.shape == (6, 4)
    expected = base.weight[ids] + 1.5 * (A.T[ids] @ B.T)
    torch.testing.assert_close(layer(ids), expected, rtol=1e-5, atol=1e-6)


def test_conv2d_equals_formula() -> None:
    torch.manual_seed(0)
    base = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    layer = _wrap(base, LoraConv2d)
    x = torch.randn(2, 3, 9, 9)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = base(x) + 1.5 * F.conv2d(F.conv2d(x, A, stride=2, padding=1), B)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "make, x",
    [
        (lambda: nn.Linear(10, 6), torch.randn(4, 10)),
        (lambda: nn.Embedding(20, 6), torch.randint(0, 20, (3, 5))),
        (lambda: nn.Conv2d(3, 5, 3, padding=1), torch.randn(2, 3, 7, 7)),
    ],
    ids=["linear", "embedding", "conv2d"],
)
def test_merge_equals_unmerged_and_unmerge_restores(make, x) -> None:
    from peftkit.methods.lora import lora_layer_for

    torch.manual_seed(1)
    base = make()
    w0 = base.weight.detach().clone()
    layer = _wrap(base, lora_layer_for(base))
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    merged = layer(x)
    assert (merged - unmerged).abs().max() <= 1e-5 * max(1.0, unmerged.abs().max().item())
    assert not torch.equal(base.weight, w0)
    layer.unmerge()
    torch.testing.assert_close(base.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-6, atol=1e-6)


def test_fresh_adapter_is_identity_for_every_init() -> None:
    ids = torch.randint(0, 20, (2, 5))
    torch.manual_seed(0)
    ref = TinyNet().eval()(ids)
    for init in (True, "gaussian"):
        torch.manual_seed(0)
        pm = get_peft_model(TinyNet().eval(), LoraConfig(target_modules=["fc", "emb", "conv"], init_lora_weights=init))
        torch.testing.assert_close(pm(ids), ref, rtol=0, atol=0)


def test_trainable_count_is_r_times_din_plus_dout() -> None:
    model = tiny_llama()
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    # q: 32->32, v: 32->16 (2 kv heads x 8), down: 64->32; two layers
    expected = 2 * 4 * ((32 + 32) + (32 + 16) + (64 + 32))
    trainable, total = pm.get_nb_trainable_parameters()
    assert trainable == expected
    assert total == sum(p.numel() for p in pm.parameters())


def test_rank_and_alpha_pattern() -> None:
    pm = get_peft_model(tiny_llama(), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
        rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 32},
    ))
    layers = pm.base_model.model.model.layers
    assert layers[0].self_attn.q_proj.r["default"] == 4 and layers[1].self_attn.q_proj.r["default"] == 2
    assert layers[1].self_attn.q_proj.lora_A["default"].weight.shape == (2, 32)
    assert layers[0].self_attn.v_proj.scaling["default"] == 8.0  # 32 / 4
    assert layers[0].self_attn.q_proj.scaling["default"] == 2.0
    assert layers[1].self_attn.q_proj.scaling["default"] == 4.0  # 8 / 2


def test_only_adapter_parameters_get_gradients(ids) -> None:
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1))
    pm.train()
    pm(ids, labels=ids).loss.backward()
    with_grad = {n for n, p in pm.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_A." in n or ".lora_B." in n for n in with_grad)
    assert with_grad == {n for n, p in pm.named_parameters() if p.requires_grad}
    assert not any("lm_head" in n for n in with_grad)  # all-linear leaves the output head alone


def test_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    layer = _wrap(nn.Linear(16, 16), LoraLinear, lora_dropout=0.5)
    x = torch.randn(8, 16)
    layer.eval()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(layer(x), layer.base_layer(x) + 1.5 * x @ A.T @ B.T)
    layer.train()
    assert (layer(x) - layer.base_layer(x) - 1.5 * x @ A.T @ B.T).abs().max() > 1e-3


def test_bf16_base_keeps_fp32_adapter(ids) -> None:
    model = tiny_gpt2().to(torch.bfloat16)
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn"]))
    layer = pm.base_model.model.transformer.h[0].attn.c_attn
    assert layer.lora_A["default"].weight.dtype == torch.float32
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert pm(ids).logits.dtype == torch.bfloat16
    pm2 = get_peft_model(tiny_gpt2().to(torch.bfloat16),
                         LoraConfig(r=4, target_modules=["c_attn"]), autocast_adapter_dtype=False)
    assert pm2.base_model.model.transformer.h[0].attn.c_attn.lora_A["default"].weight.dtype == torch.bfloat16
    assert "autocast_adapter_dtype" not in pm2.peft_config["default"].to_dict()  # never written to a file


def test_safe_merge_refuses_nan_and_changes_nothing(ids) -> None:
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    layer = pm.base_model.model.model.layers[1].self_attn.q_proj
    w_other = pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(PeftError, match="NaN/inf"):
        pm.merge_and_unload(safe_merge=True)
    assert torch.equal(pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, w_other)
    assert not any(lyr.merged for lyr in (layer, pm.base_model.model.model.layers[0].self_attn.q_proj))
