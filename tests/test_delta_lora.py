"""Delta-LoRA against the paper's Algorithm 1 (W moved in place after each step), its exact rank-2r LoRA
file, and the step hook in a plain loop and in transformers' Trainer."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
import torch.nn as nn
from conftest import tiny_llama
from safetensors.torch import load_file

import peftkit
from peftkit import DeltaLoraConfig, LoraConfig, PeftConfigError, PeftError, PeftModel, get_peft_model
from peftkit.optim import attach


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def paper_algorithm_1(model: TwoLayer, A0, B0, x, y, steps: int, lam: float, K: int, s: float, lr: float):
    """Zi et al. 2023, Algorithm 1, literally: the weight W is a tensor written in place after each
    iteration, and the forward reads it.

        for t = 0, ..., T − 1 do
            (gradients, optimizer step) A⁽ᵗ⁺¹⁾, B⁽ᵗ⁺¹⁾
            if t > K do
                W⁽ᵗ⁺¹⁾ ← W⁽ᵗ⁾ + λ · (α/r) · (A⁽ᵗ⁺¹⁾B⁽ᵗ⁺¹⁾ − A⁽ᵗ⁾B⁽ᵗ⁾)

    (the paper's product A·B is B @ A in torch's (out, in) layout)."""
    W = {n: getattr(model, n).weight.detach().clone() for n in ("fc1", "fc2")}
    b = {n: getattr(model, n).bias.detach() for n in ("fc1", "fc2")}
    A = {n: A0[n].clone().requires_grad_(True) for n in W}
    B = {n: B0[n].clone().requires_grad_(True) for n in W}
    opt = torch.optim.AdamW([*A.values(), *B.values()], lr=lr)
    for t in range(steps):
        h = torch.tanh(x @ (W["fc1"] + s * B["fc1"] @ A["fc1"]).T + b["fc1"])
        loss = nn.functional.mse_loss(h @ (W["fc2"] + s * B["fc2"] @ A["fc2"]).T + b["fc2"], y)
        AB_t = {n: (B[n] @ A[n]).detach().clone() for n in W}
        opt.zero_grad()
        loss.backward()
        opt.step()
        if t > K:
            with torch.no_grad():
                for n in W:
                    W[n] += lam * s * (B[n] @ A[n] - AB_t[n])
    return W, A, B, b


def test_matches_the_papers_algorithm_and_saves_an_exact_lora(tmp_path) -> None:
    torch.manual_seed(0)
    base = TwoLayer()
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    lam, K, steps, lr = 2.0, 3, 8, 0.05
    pm = get_peft_model(copy.deepcopy(base), DeltaLoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"],
                                                            delta_lambda=lam, update_start=K, init_lora_weights=False))
    layers = {n: getattr(pm.base_model.model, n) for n in ("fc1", "fc2")}
    A0 = {n: lyr.lora_A["default"].weight.detach().clone() for n, lyr in layers.items()}
    B0 = {n: lyr.lora_B["default"].weight.detach().clone() for n, lyr in layers.items()}
    w0 = {n: lyr.base_layer.weight.detach().clone() for n, lyr in layers.items()}
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
    attach(pm, opt)
    pm.train()
    for _ in range(steps):
        loss = nn.functional.mse_loss(pm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    W, A, B, b = paper_algorithm_1(base, A0, B0, x, y, steps, lam, K, 2.0, lr)
    for n, lyr in layers.items():
        torch.testing.assert_close(lyr.lora_A["default"].weight, A[n], rtol=1e-5, atol=1e-6)
        assert torch.equal(lyr.base_layer.weight, w0[n])  # W itself is never written
        assert (W[n] - w0[n]).abs().max() > 1e-3  # ... yet the paper's W did move
        torch.testing.assert_close(w0[n] + lyr.variant["default"].total_delta(lyr, "default") - 2.0 * (
            lyr.lora_B["default"].weight @ lyr.lora_A["default"].weight), W[n], rtol=1e-4, atol=1e-5)
    pm.eval()
    with torch.no_grad():
        h = torch.tanh(x @ (W["fc1"] + 2.0 * B["fc1"] @ A["fc1"]).T + b["fc1"])
        paper_out = h @ (W["fc2"] + 2.0 * B["fc2"] @ A["fc2"]).T + b["fc2"]
    out = pm(x)
    torch.testing.assert_close(out, paper_out, rtol=1e-4, atol=1e-5)

    pm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 4
    assert load_file(tmp_path / "adapter_model.safetensors")["base_model.model.fc1.lora_A.weight"].shape == (4, 6)
    for loader in (PeftModel, peft.PeftModel):
        loaded = loader.from_pretrained(copy.deepcopy(base), tmp_path).eval()
        torch.testing.assert_close(loaded(x), out, rtol=1e-4, atol=1e-5)
    merged = pm.merge_and_unload()
    torch.testing.assert_close(merged(x), out, rtol=1e-4, atol=1e-5)


def test_disable_unload_restore_the_original_weights_and_bf16_is_exact() -> None:
    torch.manual_seed(0)
    base = TwoLayer().to(torch.bfloat16)
    w0 = base.fc1.weight.detach().clone()
    x = torch.randn(4, 6, dtype=torch.bfloat16)
    ref = base(x)
    pm = get_peft_model(base, DeltaLoraConfig(r=2, target_modules=["fc1"], update_start=0, init_lora_weights=False))
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    attach(pm, opt)
    for _ in range(3):
        pm(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert (pm(x) - ref).abs().max() > 0
    with pm.disable_adapter():
        assert torch.equal(pm(x), ref)
    model = pm.unload()
    assert torch.equal(model.fc1.weight, w0)


def test_bad_input() -> None:
    with pytest.raises(PeftConfigError, match="lora_dropout=0"):
        DeltaLoraConfig(target_modules=["fc1"], lora_dropout=0.1)
    pm = get_peft_model(TwoLayer(), DeltaLoraConfig(target_modules=["fc1"], update_start=10))
    pm.train()
    with pytest.raises(PeftError, match=r"peftkit\.optim\.attach"):
        pm(torch.randn(2, 6))
    pm.add_adapter("b", DeltaLoraConfig(target_modules=["fc1"], update_start=0))
    pm.set_adapter(["default", "b"])
    attach(pm, torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1))
    with pytest.raises(PeftError, match="one adapter at a time"):
        pm(torch.randn(2, 6))
    with pytest.raises(PeftError, match="no Delta-LoRA adapter"):
        attach(get_peft_model(TwoLayer(), LoraConfig(target_modules=["fc1"])), torch.optim.SGD([nn.Parameter(
            torch.zeros(1))], lr=0.1))


def test_trainer_callback_counts_steps(tmp_path) -> None:
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class Tokens(Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> dict:
            ids = torch.arange(i, i + 6) % 120 + 1
            return {"input_ids": ids, "labels": ids}

    pm = get_peft_model(tiny_llama(), DeltaLoraConfig(r=2, target_modules=["q_proj"], update_start=2))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4,
                             report_to=[], use_cpu=True, logging_steps=100, save_strategy="no")
    Trainer(model=pm, args=args, train_dataset=Tokens(), callbacks=[peftkit.optim.delta_lora_callback()]).train()
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.variant["default"].step == 4 and "default" in layer.delta_lora_start


def _train(pm, x, y, steps: int, lr: float = 0.05) -> None:
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
    if any(True for _ in peftkit.methods.delta_lora.delta_lora_layers(pm)):
        attach(pm, opt)
    pm.train()
    for _ in range(steps):
        loss = nn.functional.mse_loss(pm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.eval()


@pytest.mark.parametrize("K", [0, 2])
def test_w_first_moves_in_iteration_k_plus_one(K) -> None:
    """After K + 1 steps W has not moved (the model is plain LoRA); the (K + 2)-th step moves it."""
    torch.manual_seed(0)
    base = TwoLayer()
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    cfg = dict(r=2, lora_alpha=4, target_modules=["fc1", "fc2"], init_lora_weights=False)
    for steps, moved in ((K + 1, False), (K + 2, True)):
        pm = get_peft_model(copy.deepcopy(base), DeltaLoraConfig(**cfg, delta_lambda=2.0, update_start=K))
        _train(pm, x, y, steps)
        lyr = pm.base_model.model.fc1
        extra = lyr.variant["default"].total_delta(lyr, "default") - lyr.delta_weight("default")
        assert bool(extra.abs().max() > 1e-4) is moved


def test_file_keeps_rank_r_when_the_start_product_is_zero(tmp_path) -> None:
    """B stays zero until step K + 1 (only A in the optimizer): P_{K+1} = 0 adds nothing, so the file is rank r."""
    torch.manual_seed(0)
    base = TwoLayer()
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    pm = get_peft_model(copy.deepcopy(base), DeltaLoraConfig(r=2, lora_alpha=4, target_modules=["fc1"],
                                                            delta_lambda=2.0, update_start=0))
    layer = pm.base_model.model.fc1
    opt = torch.optim.SGD([layer.lora_A["default"].weight], lr=0.1)
    attach(pm, opt)
    pm.train()
    nn.functional.mse_loss(pm(x), y).backward()
    opt.step()  # step 1 = K + 1: snapshot taken with B = 0
    assert "default" in layer.delta_lora_start and not layer.delta_lora_start["default"].B.any()
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # B moves afterwards (any optimizer would)
    pm.eval()
    out = pm(x)
    pm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 2
    assert load_file(tmp_path / "adapter_model.safetensors")["base_model.model.fc1.lora_B.weight"].shape == (8, 2)
    for loader in (PeftModel, peft.PeftModel):
        torch.testing.assert_close(loader.from_pretrained(copy.deepcopy(base), tmp_path).eval()(x), out,
                                   rtol=1e-5, atol=1e-6)


def test_train_preset_uses_the_papers_lambda_and_start_and_is_not_a_scaled_lora() -> None:
    from peftkit.train.methods import delta_lora_start, method_entry

    assert [delta_lora_start(n) for n in (None, 26_290, 100_000, 2_629, 40)] == [500, 500, 500, 50, 1]
    entry = method_entry("delta_lora")
    cfg = entry.make_config("causal_lm", {}, tiny_llama(), total_steps=40)
    assert (cfg.delta_lambda, cfg.update_start, cfg.lora_dropout) == (2.0, 1, 0.0)
    assert entry.make_config("causal_lm", {"update_start": 7}, tiny_llama(), total_steps=40).update_start == 7
    # B = 0 at the start, so a Delta-LoRA whose W moved from step 0 would be LoRA with α·(1 + λ) (the old preset,
    # 5e-7 apart); starting after step K + 1 it is not
    ids = torch.randint(1, 120, (4, 10))
    outs = []
    for config in (cfg, LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha * (1 + cfg.delta_lambda),
                                   target_modules="all-linear", task_type="CAUSAL_LM")):
        torch.manual_seed(1)
        pm = get_peft_model(tiny_llama(), config)
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
        if isinstance(config, DeltaLoraConfig):
            attach(pm, opt)
        pm.train()
        for _ in range(6):
            loss = pm(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        pm.eval()
        with torch.no_grad():
            outs.append(pm(input_ids=ids).logits)
    assert (outs[0] - outs[1]).abs().max() > 1e-3
