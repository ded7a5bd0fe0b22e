"""LoRA-FA: the plain LoRA formula with A frozen, gradients equal to autograd's with the same dropout mask,
only h = A·dropout(x) kept for backward, a plain LoRA file, and HF PEFT's LoRA-FA optimizer step for step."""

from __future__ import annotations

import copy
import json
import math

import peft
import pytest
import torch
import torch.nn as nn
from conftest import tiny_bert_cls, tiny_gpt2, tiny_llama
from peft.optimizers import create_lorafa_optimizer as hf_create_lorafa_optimizer

import peftkit
from peftkit import (
    LoraConfig,
    LoraFAConfig,
    PeftConfigError,
    PeftError,
    TargetModulesError,
    create_lorafa_optimizer,
    get_peft_model,
)
from peftkit.config import PeftConfig, config_class_for
from peftkit.methods.lora import LoraLinear
from peftkit.methods.lora_fa import LoraFAVariant, draw_seed, dropout_mask, project_lora_fa_gradient

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _layer(d_in: int = 12, d_out: int = 10, dropout: float = 0.0, **cfg) -> LoraLinear:
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(d_in, d_out).requires_grad_(False))  # a frozen base, as PeftModel makes it
    layer.update_layer("default", LoraFAConfig(r=4, lora_alpha=6, lora_dropout=dropout, init_lora_weights=False,
                                               **cfg), "m")
    layer.set_adapter(["default"])
    return layer


# ---- maths -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_rslora", [False, True])
def test_output_equals_lora_formula(use_rslora: bool) -> None:
    layer = _layer(use_rslora=use_rslora)
    assert isinstance(layer.variant["default"], LoraFAVariant)
    x = torch.randn(3, 5, 12)
    A, B, base = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.base_layer
    s = 6 / math.sqrt(4) if use_rslora else 6 / 4
    expected = x @ base.weight.T + base.bias + s * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert (layer(x) - base(x)).abs().max() > 0.1


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_gradients_equal_plain_autograd_with_the_same_mask(p: float) -> None:
    layer = _layer(dropout=p).train()
    A, B, base = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.base_layer
    s = layer.scaling["default"]
    x = torch.randn(4, 7, 12, requires_grad=True)
    upstream = torch.randn(4, 7, 10)
    torch.manual_seed(42)
    out = layer(x)
    (out * upstream).sum().backward()

    torch.manual_seed(42)  # the reference: plain autograd through the very mask the layer drew
    mask = dropout_mask(x.shape, p, draw_seed(), x.device) if p > 0 else torch.ones(x.shape, dtype=torch.bool)
    x_ref, B_ref = x.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    ref = base(x_ref) + s * ((x_ref * mask / (1 - p)) @ A.T @ B_ref.T)
    (ref * upstream).sum().backward()

    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(B.grad, B_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    assert A.grad is None and not A.requires_grad
    if p > 0:
        assert abs((~mask).float().mean().item() - p) < 0.05  # a real dropout mask
        assert (out - base(x) - s * (x @ A.T @ B.T)).abs().max() > 1e-3  # and it was applied
        layer.eval()  # no dropout at inference
        torch.testing.assert_close(layer(x), base(x) + s * (x @ A.T @ B.T), rtol=1e-5, atol=1e-6)


def test_dropout_masks_differ_between_calls_and_follow_the_seed() -> None:
    layer = _layer(dropout=0.5).train()
    x = torch.randn(6, 12)
    torch.manual_seed(1)
    first, second = layer(x), layer(x)
    assert not torch.allclose(first, second)
    torch.manual_seed(1)
    torch.testing.assert_close(layer(x), first, rtol=0, atol=0)


def test_bf16_base_trains_with_fp32_adapter() -> None:
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(12, 10).to(torch.bfloat16))
    layer.update_layer("default", LoraFAConfig(r=4, lora_dropout=0.1, init_lora_weights=False), "m")
    layer.set_adapter(["default"])
    layer.train()
    x = torch.randn(3, 12, dtype=torch.bfloat16, requires_grad=True)
    out = layer(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert layer.lora_B["default"].weight.grad.dtype == torch.float32


# ---- memory: what backward keeps ---------------------------------------------------------------------
def _saved(layer: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    out.sum().backward()
    return saved


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_backward_keeps_only_h(p: float) -> None:
    """LoRA-FA keeps h = A·dropout(x): tokens × r numbers, never x, a dropped copy of x or a mask."""
    tokens, d_in, r = 2 * 16, 64, 4
    layer = _layer(d_in=d_in, d_out=48, dropout=p).train()
    x = torch.randn(2, 16, d_in, requires_grad=True)
    saved = _saved(layer, x)
    assert not any(t.shape[-1] == d_in for t in saved)
    assert sum(t.untyped_storage().nbytes() for t in saved) <= tokens * r * 4
    plain = LoraLinear(nn.Linear(d_in, 48).requires_grad_(False))  # plain LoRA keeps x (and with dropout a dropped copy and a mask)
    plain.update_layer("default", LoraConfig(r=r, lora_dropout=p), "m")
    plain.set_adapter(["default"])
    plain.train()
    assert sum(t.untyped_storage().nbytes() for t in _saved(plain, x)) >= tokens * d_in * 4


# ---- the model level -----------------------------------------------------------------------------------
def test_only_b_trains_and_a_stays_frozen_through_adapter_switches(ids) -> None:
    targets = ["q_proj", "v_proj", "down_proj"]
    pm = get_peft_model(tiny_llama(), LoraFAConfig(r=4, target_modules=targets, lora_dropout=0.1))
    d_out = {"q_proj": 32, "v_proj": 16, "down_proj": 32}  # tiny_llama: hidden 32, 2 kv heads of 8
    expected = 2 * sum(4 * d for d in d_out.values())
    assert pm.get_nb_trainable_parameters()[0] == expected
    assert all(not p.requires_grad for n, p in pm.named_parameters() if ".lora_A." in n)
    pm.add_adapter("plain", LoraConfig(r=2, target_modules=["q_proj"]))
    for active in ("plain", ["default", "plain"], "default"):
        pm.set_adapter(active)
        assert all(not p.requires_grad for n, p in pm.named_parameters() if ".lora_A.default" in n)
    pm.set_adapter(["default", "plain"])
    assert all(p.requires_grad for n, p in pm.named_parameters() if ".lora_A.plain" in n)  # plain LoRA's A trains
    twin = copy.deepcopy(pm)
    twin.set_adapter("default")
    assert twin.get_nb_trainable_parameters()[0] == expected


def test_model_gradients_equal_plain_lora_on_gpt2_conv1d(ids) -> None:
    """Whole-model check through GPT-2's transposed Conv1D: B's gradients equal plain LoRA's (dropout 0)."""
    cfg = {"r": 4, "target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True, "init_lora_weights": False}
    fa, plain = get_peft_model(tiny_gpt2(), LoraFAConfig(**cfg)), get_peft_model(tiny_gpt2(), LoraConfig(**cfg))
    with torch.no_grad():
        weights = dict(fa.named_parameters())
        for name, p in plain.named_parameters():
            p.copy_(weights[name])
    for model in (fa, plain):
        model.train()
        torch.manual_seed(0)  # GPT-2's own dropout draws the same masks in both
        model(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in fa.named_parameters() if p.grad is not None}
    assert grads and all(".lora_B." in n for n in grads)
    for name, p in plain.named_parameters():
        if name in grads:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6)


def test_a_unchanged_after_optimizer_steps_and_loss_falls(ids) -> None:
    pm = get_peft_model(tiny_llama(), LoraFAConfig(r=4, target_modules="all-linear", lora_dropout=0.1))
    pm.train()
    a0 = {n: p.detach().clone() for n, p in pm.named_parameters() if ".lora_A." in n}
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for _ in range(8):
        loss = pm(ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is None for n, p in pm.named_parameters() if ".lora_A." in n)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.equal(p, a0[n]) for n, p in pm.named_parameters() if n in a0)
    assert losses[-1] < losses[0]
    assert any(p.abs().max() > 0 for n, p in pm.named_parameters() if ".lora_B." in n)


def test_unfreezing_a_by_hand_is_refused(ids) -> None:
    pm = get_peft_model(tiny_llama(), LoraFAConfig(r=4, target_modules=["q_proj"]))
    pm.train()
    pm.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.requires_grad_(True)
    with pytest.raises(PeftError, match="keeps lora_A frozen"):
        pm(ids)


def test_embedding_target_is_refused() -> None:
    model = tiny_llama()
    with pytest.raises(TargetModulesError, match="embedding"):
        get_peft_model(model, LoraFAConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    assert not any(type(m).__name__.startswith("Lora") for m in model.modules())  # model untouched
    with pytest.raises(PeftConfigError, match="DoRA"):
        LoraFAConfig(r=4, target_modules=["q_proj"], use_dora=True)


def test_merge_equals_unmerged(ids) -> None:
    pm = get_peft_model(tiny_llama(), LoraFAConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    base = tiny_llama()(ids).logits
    unmerged = pm(ids).logits
    assert (unmerged - base).abs().max() > 1e-2
    pm.merge_adapter()
    torch.testing.assert_close(pm(ids).logits, unmerged, rtol=1e-5, atol=1e-5)
    pm.unmerge_adapter()
    torch.testing.assert_close(pm(ids).logits, unmerged, rtol=1e-5, atol=1e-5)


# ---- files -------------------------------------------------------------------------------------------
def test_config_registry_keeps_lora_for_lora_files() -> None:
    assert config_class_for("LORA") is LoraConfig and config_class_for("LORA_FA") is LoraFAConfig
    config = LoraFAConfig(r=4, target_modules=["q_proj"])
    assert config.to_dict()["peft_type"] == "LORA"
    assert type(PeftConfig.from_dict(config.to_dict())) is LoraConfig
    resumed = LoraFAConfig.from_dict(config.to_dict())  # read a LoRA file as LoRA-FA, to resume training
    assert type(resumed) is LoraFAConfig and resumed.r == 4


def test_saved_file_is_a_plain_lora_that_hf_peft_loads(tmp_path, ids) -> None:
    pm = get_peft_model(tiny_llama(), LoraFAConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                   init_lora_weights=False))
    pm.eval()
    ours = pm(ids).logits
    assert (ours - tiny_llama()(ids).logits).abs().max() > 1e-2
    pm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    hf = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(hf(ids).logits, ours, rtol=1e-5, atol=1e-5)
    again = peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert type(again.peft_config["default"]) is LoraConfig
    torch.testing.assert_close(again(ids).logits, ours, rtol=1e-5, atol=1e-5)
    resumed = peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True,
                                                config=LoraFAConfig.from_pretrained(tmp_path))
    assert resumed.get_nb_trainable_parameters()[0] == pm.get_nb_trainable_parameters()[0]


# ---- the optimizer against HF PEFT's ----------------------------------------------------------------
def test_projection_formula() -> None:
    torch.manual_seed(0)
    A, g = torch.randn(4, 12), torch.randn(10, 4)
    expected = g @ torch.linalg.inv(A @ A.T) / 1.5**2
    torch.testing.assert_close(project_lora_fa_gradient(g, A, 1.5), expected, rtol=1e-4, atol=1e-5)


def _hf_lorafa_exact(monkeypatch) -> None:
    """HF PEFT 0.21 projects under bf16 autocast when bf16 is available (on CPU too); peftkit in fp32. With
    bf16 the projection (an ill-conditioned (A Aᵀ)⁻¹) loses so much that B drifts by ~20 % of its size in 5 steps
    on tiny_llama, so the exact comparison turns HF's autocast off."""
    import peft.optimizers.lorafa as hf_lorafa

    monkeypatch.setattr(hf_lorafa, "is_bf16_available", lambda: False)


OPTIMIZER_CASES = {
    "llama_patterns_rslora": (tiny_llama, {
        "r": 4, "lora_alpha": 8, "target_modules": "all-linear", "use_rslora": True,
        "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"down_proj": 3},
    }),
    "bert_seq_cls_head": (tiny_bert_cls, {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"],
                                          "task_type": "SEQ_CLS"}),
}


@pytest.mark.parametrize("case", OPTIMIZER_CASES, ids=list(OPTIMIZER_CASES))
def test_optimizer_matches_hf_peft_step_for_step(case: str, monkeypatch, ids) -> None:
    """The same model trained by both libraries: LoRA-FA in peftkit (the memory-light backward) against HF's
    LoRA with its LoRA-FA optimizer. Each step the gradients must agree; HF's are then copied over, so the
    updates are compared on equal gradients."""
    _hf_lorafa_exact(monkeypatch)
    make, cfg = OPTIMIZER_CASES[case]
    hf = peft.get_peft_model(make(), peft.LoraConfig(**cfg))
    ours = get_peft_model(make(), LoraFAConfig(**cfg))
    with torch.no_grad():  # identical starting adapters (HF's random A; B = 0 as both init)
        theirs = dict(hf.named_parameters())
        for name, p in ours.named_parameters():
            p.copy_(theirs[name])
    hf.train()
    ours.train()
    hf_opt = hf_create_lorafa_optimizer(hf, r=4, lora_alpha=8, lr=1e-2, weight_decay=0.05)
    our_opt = create_lorafa_optimizer(ours, r=4, lora_alpha=8, lr=1e-2, weight_decay=0.05)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
           {n for n, p in hf.named_parameters() if p.requires_grad}
    labels = torch.tensor([0, 2]) if "SEQ_CLS" in str(cfg.get("task_type")) else ids
    a0 = {n: p.detach().clone() for n, p in ours.named_parameters() if ".lora_A." in n}
    theirs = dict(hf.named_parameters())
    for step in range(5):
        for model in (hf, ours):  # the same seed: BERT's own dropout draws the same masks in both
            torch.manual_seed(step)
            model(ids, labels=labels).loss.backward()
        for name, p in ours.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-4, atol=1e-6)
                p.grad.copy_(theirs[name].grad)
            else:
                assert theirs[name].grad is None, name
        hf_opt.step()
        our_opt.step()
        hf_opt.zero_grad()
        our_opt.zero_grad()
        for name, p in ours.named_parameters():
            assert (p - theirs[name]).abs().max() <= 1e-6, name
    moved = [n for n, p in ours.named_parameters() if ".lora_B." in n and p.abs().max() > 1e-3]
    assert moved
    assert all(torch.equal(p, a0[n]) for n, p in ours.named_parameters() if n in a0)


def test_optimizer_on_plain_lora_freezes_a_and_checks_use_rslora() -> None:
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    create_lorafa_optimizer(pm, r=4, lora_alpha=8, lr=1e-3)
    assert all(not p.requires_grad for n, p in pm.named_parameters() if ".lora_A." in n)
    with pytest.raises(PeftConfigError, match="use_rslora"):
        create_lorafa_optimizer(pm, r=4, lora_alpha=8, lr=1e-3, use_rslora=True)
    with pytest.warns(UserWarning, match="differs"):
        create_lorafa_optimizer(pm, r=8, lora_alpha=8, lr=1e-3)
