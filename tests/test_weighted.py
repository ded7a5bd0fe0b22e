"""add_weighted_adapter: each combination against the weighted sum of the adapters' ΔW (and HF PEFT's merge
functions for TIES / DARE / magnitude pruning)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from test_peft_model import randomize

from peftkit import AdapterNameError, LoraConfig, PeftError, get_peft_model
from peftkit.methods.base import adapter_layers, logical_path
from peftkit.weighted import dare_linear, dare_ties, magnitude_prune, ties, weighted_delta


def _model(make=tiny_llama, ranks=(4, 2, 3), targets=("q_proj", "v_proj", "down_proj"), **cfg):
    pm = get_peft_model(make().double(), LoraConfig(r=ranks[0], lora_alpha=8, target_modules=list(targets),
                                                    init_lora_weights=False, **cfg))
    for i, r in enumerate(ranks[1:]):
        pm.add_adapter(f"a{i}", LoraConfig(r=r, lora_alpha=3 + i, target_modules=list(targets),
                                           init_lora_weights=False, **cfg))
    for name in pm.peft_config:
        randomize(pm, name)
    return pm


def _deltas(pm, name: str) -> dict[str, torch.Tensor]:
    return {logical_path(p): layer.delta_weight(name) for p, layer in adapter_layers(pm.base_model.model)
            if name in getattr(layer, "r", {})}


@pytest.mark.parametrize("combination", ["cat", "svd"])
@pytest.mark.parametrize("make, targets", [
    (tiny_llama, ("q_proj", "v_proj", "down_proj")),
    (tiny_gpt2, ("c_attn", "c_fc", "wte")),  # Conv1D (transposed weights) and an embedding
])
def test_exact_combinations_equal_weighted_sum(combination, make, targets) -> None:
    pm = _model(make, targets=targets)
    adapters, weights = ["default", "a0", "a1"], [0.7, -1.3, 2.0]
    expected = weighted_delta(pm, adapters, weights)
    svd_rank = 9 if combination == "svd" else None  # ≥ 4 + 2 + 3: exact
    pm.add_weighted_adapter(adapters, weights, "mix", combination_type=combination, svd_rank=svd_rank)
    got = _deltas(pm, "mix")
    assert got.keys() == expected.keys() and len(got) > 0
    for path in got:
        torch.testing.assert_close(got[path], expected[path], rtol=1e-5, atol=2e-5, msg=path)  # ΔW is fp32 (delta_weight)
    cfg = pm.peft_config["mix"]
    assert cfg.r == cfg.lora_alpha == 9
    if make is tiny_gpt2:
        return  # GPT-2 ties wte to lm_head: merging into wte changes the head too
    # the model with "mix" active computes the base + Σ w_i ΔW_i
    pm.set_adapter("mix")
    ids = torch.randint(1, 100, (2, 5))
    out = pm(ids).logits
    pm.merge_adapter()
    torch.testing.assert_close(pm(ids).logits, out)


def test_svd_default_rank_truncates_and_is_best_rank_r() -> None:
    pm = _model()
    pm.add_weighted_adapter(["default", "a0", "a1"], [1.0, 1.0, 1.0], "mix")  # svd, rank = max r = 4
    assert pm.peft_config["mix"].r == 4
    expected = weighted_delta(pm, ["default", "a0", "a1"], [1.0, 1.0, 1.0])
    for path, delta in _deltas(pm, "mix").items():
        S = torch.linalg.svdvals(expected[path])
        err = torch.linalg.matrix_norm(delta - expected[path])  # Eckart–Young: the tail singular values
        torch.testing.assert_close(err, S[4:].pow(2).sum().sqrt(), rtol=1e-4, atol=1e-6)


def test_linear_is_the_square_root_split_formula() -> None:
    pm = _model(ranks=(4, 4, 4))
    adapters, weights = ["default", "a0"], [0.5, -2.0]
    pm.add_weighted_adapter(adapters, weights, "lin", combination_type="linear")
    for _, layer in adapter_layers(pm.base_model.model):
        signed = [w * layer.scaling[a] for a, w in zip(adapters, weights, strict=True)]
        A = sum((abs(v) ** 0.5) * (1 if v >= 0 else -1) * layer.lora_A[a].weight
                for a, v in zip(adapters, signed, strict=True))
        B = sum((abs(v) ** 0.5) * layer.lora_B[a].weight for a, v in zip(adapters, signed, strict=True))
        torch.testing.assert_close(layer.delta_weight("lin"), (B @ A).float(), rtol=1e-5, atol=1e-6)
    # one adapter: linear is exact
    pm.add_weighted_adapter(["a1"], [-0.3], "one", combination_type="svd")  # one adapter: linear, as in HF PEFT
    expected = weighted_delta(pm, ["a1"], [-0.3])
    for path, delta in _deltas(pm, "one").items():
        torch.testing.assert_close(delta, expected[path], rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("kind", ["ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_merge_functions_equal_hf_peft(kind) -> None:
    from peft.utils import merge_utils

    torch.manual_seed(0)
    tensors = [torch.randn(6, 7, dtype=torch.float64) for _ in range(3)]
    weights = torch.tensor([0.5, 1.5, -0.7], dtype=torch.float64)
    ours = {"ties": lambda: ties(tensors, weights, 0.5), "dare_linear": lambda: dare_linear(tensors, weights, 0.5),
            "dare_ties": lambda: dare_ties(tensors, weights, 0.5, "frequency"),
            "magnitude_prune": lambda: magnitude_prune(tensors, weights, 0.5)}[kind]
    hf = {"ties": lambda: merge_utils.ties(tensors, weights, 0.5),
          "dare_linear": lambda: merge_utils.dare_linear(tensors, weights, 0.5),
          "dare_ties": lambda: merge_utils.dare_ties(tensors, weights, 0.5, "frequency"),
          "magnitude_prune": lambda: merge_utils.magnitude_prune(tensors, weights, 0.5)}[kind]
    torch.manual_seed(1)
    a = ours()
    torch.manual_seed(1)
    torch.testing.assert_close(a, hf(), rtol=0, atol=0)


def test_ties_svd_on_the_model_equals_ties_of_deltas() -> None:
    pm = _model()
    adapters, weights = ["default", "a0", "a1"], [1.0, 0.5, 0.8]
    before = {p: [layer.delta_weight(a) for a in adapters] for p, layer in
              ((logical_path(p), lyr) for p, lyr in adapter_layers(pm.base_model.model))}
    pm.add_weighted_adapter(adapters, weights, "t", combination_type="ties_svd", density=0.4, svd_rank=32)
    for path, delta in _deltas(pm, "t").items():
        expected = ties(before[path], torch.tensor(weights, dtype=torch.float32), 0.4)
        torch.testing.assert_close(delta, expected.to(delta.dtype), rtol=1e-5, atol=2e-5)


def test_matches_hf_peft_cat() -> None:
    import peft

    from peftkit import PeftModel

    pm = _model(ranks=(4, 2))
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        pm.save_pretrained(tmp)
        hf = peft.PeftModel.from_pretrained(tiny_llama().double(), tmp)
        hf.load_adapter(f"{tmp}/a0", "a0")
        hf.add_weighted_adapter(["default", "a0"], [0.6, 1.4], "mix", combination_type="cat")
        pm.add_weighted_adapter(["default", "a0"], [0.6, 1.4], "mix", combination_type="cat")
        hf.set_adapter("mix")
        pm.set_adapter("mix")
        ids = torch.randint(1, 100, (2, 5))
        torch.testing.assert_close(pm(ids).logits, hf(ids).logits)
        assert isinstance(pm, PeftModel)


def test_errors() -> None:
    pm = _model()
    with pytest.raises(AdapterNameError, match="unknown adapter"):
        pm.add_weighted_adapter(["nope"], [1.0], "x")
    with pytest.raises(PeftError, match="one rank"):
        pm.add_weighted_adapter(["default", "a0"], [1.0, 1.0], "x", combination_type="linear")
    with pytest.raises(PeftError, match="density"):
        pm.add_weighted_adapter(["default", "a0"], [1.0, 1.0], "x", combination_type="ties_svd")
    with pytest.raises(AdapterNameError, match="already exists"):
        pm.add_weighted_adapter(["default", "a0"], [1.0, 1.0], "a1")
    pm.add_adapter("d", LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(PeftError, match="plain LoRA"):
        pm.add_weighted_adapter(["default", "d"], [1.0, 1.0], "x")
    assert "x" not in pm.peft_config
