"""VeRA: the paper's formula per layer, shared projections, merging, files, HF PEFT interop, errors, mixing.

Every adapter compared here is non-zero (b and d perturbed), so equal outputs mean the vectors travelled.
"""

from __future__ import annotations

import math
import os

import peft
import pytest
import torch
import torch.nn as nn
from conftest import tiny_gpt2, tiny_llama
from peft.tuners.vera.model import _kaiming_init
from safetensors.torch import load_file
from test_peft_model import randomize

from peftkit import (
    LoraConfig,
    PeftConfigError,
    PeftModel,
    TargetModulesError,
    VeraConfig,
    get_peft_model,
    get_peft_model_state_dict,
)
from peftkit.methods.base import AdapterLayer, adapter_layers
from peftkit.methods.vera import VeraLinear, find_projections, vera_projections

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
LIBS = {"peftkit": __import__("peftkit"), "hf": peft}


class TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(6, 10), nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def vera_layers(model: nn.Module) -> list[VeraLinear]:
    return [layer for _, layer in adapter_layers(model) if isinstance(layer, VeraLinear)]


def test_each_layer_is_the_papers_formula_on_sliced_shared_projections() -> None:
    pm = get_peft_model(TwoLinear(), VeraConfig(r=3, target_modules=["up", "down"], projection_prng_key=5))
    randomize(pm)
    A, B = find_projections(pm).get("default")
    assert A.shape == (3, 10) and B.shape == (10, 3)  # the element-wise largest (d_out, d_in) = (10, 10)
    g = torch.Generator().manual_seed(5)  # by hand: A then B, U(±sqrt(6 / fan_in))
    torch.testing.assert_close(A, torch.empty(3, 10).uniform_(-math.sqrt(0.6), math.sqrt(0.6), generator=g))
    torch.testing.assert_close(B, torch.empty(10, 3).uniform_(-math.sqrt(2), math.sqrt(2), generator=g))
    x = torch.randn(2, 5, 10)
    for layer, d_in, d_out in ((pm.model.up, 6, 10), (pm.model.down, 10, 4)):
        d, b = layer.vera_lambda_d["default"], layer.vera_lambda_b["default"]
        delta = torch.diag(b) @ B[:d_out] @ torch.diag(d) @ A[:, :d_in]  # Λ_b B Λ_d A
        xi = x[..., :d_in]
        torch.testing.assert_close(layer(xi), layer.base_layer(xi) + xi @ delta.T)
        torch.testing.assert_close(layer.delta_weight("default"), delta)


def test_fresh_adapter_is_the_base_model_and_init_weights_false_is_not(ids) -> None:
    pm = get_peft_model(tiny_llama(), VeraConfig(r=4, target_modules=["q_proj", "v_proj"], d_initial=0.2))
    layer = vera_layers(pm)[0]
    assert torch.all(layer.vera_lambda_b["default"] == 0) and torch.all(layer.vera_lambda_d["default"] == 0.2)
    torch.testing.assert_close(pm(ids).logits, tiny_llama()(ids).logits)
    other = get_peft_model(tiny_llama(), VeraConfig(r=4, target_modules=["q_proj"], init_weights=False))
    assert torch.all(vera_layers(other)[0].vera_lambda_b["default"] == 1)
    assert (other(ids).logits - tiny_llama()(ids).logits).abs().max() > 1e-3


def test_only_the_lambda_vectors_train_and_count(ids) -> None:
    pm = get_peft_model(tiny_llama(), VeraConfig(r=4, target_modules="all-linear")).train()
    # per decoder layer: q 32, k 16, v 16, o 32, gate 64, up 64, down 32 outputs, plus r=4 each; two layers
    assert pm.get_nb_trainable_parameters() == (2 * (256 + 7 * 4), sum(p.numel() for p in tiny_llama().parameters())
                                                 + 2 * (256 + 7 * 4))
    randomize(pm)
    pm(ids).logits.square().mean().backward()
    lambdas = [p for layer in vera_layers(pm) for p in layer.adapter_parameters("default")]
    assert len(lambdas) == 28 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lambdas)
    assert all(p.grad is None for n, p in pm.named_parameters() if "vera_lambda" not in n)
    A, B = find_projections(pm).get("default")
    assert not A.requires_grad and not B.requires_grad and A.grad is None
    assert all(layer.vera_projections is vera_layers(pm)[0].vera_projections for layer in vera_layers(pm))
    pm.to(torch.float64)  # one module shared by all layers: moved once, still shared
    assert find_projections(pm).get("default")[0].dtype == torch.float64
    assert all(layer.vera_projections is find_projections(pm) for layer in vera_layers(pm))


@pytest.mark.parametrize("make, config", [
    (tiny_llama, {"target_modules": "all-linear"}),
    (tiny_gpt2, {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True}),
])
def test_merge_equals_unmerged_and_unmerge_restores(make, config, ids) -> None:
    pm = get_peft_model(make(), VeraConfig(r=8, **config)).eval()
    randomize(pm)
    before = {n: p.clone() for n, p in pm.named_parameters() if "vera_lambda" not in n}
    unmerged = pm(ids).logits
    assert (unmerged - make()(ids).logits).abs().max() > 1e-2
    layer = vera_layers(pm)[0]
    A, B = layer.sliced_projections("default")
    delta = torch.diag(layer.vera_lambda_b["default"]) @ B @ torch.diag(layer.vera_lambda_d["default"]) @ A
    torch.testing.assert_close(layer.delta_weight("default"), delta.T if layer.fan_in_fan_out else delta)
    pm.merge_adapter()
    torch.testing.assert_close(pm(ids).logits, unmerged, rtol=1e-4, atol=1e-5)
    pm.unmerge_adapter()
    for n, p in pm.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(pm.merge_and_unload()(ids).logits, unmerged, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("save_projection", [True, False])
def test_save_load_round_trip(save_projection, tmp_path, ids) -> None:
    pm = get_peft_model(tiny_llama(), VeraConfig(r=4, target_modules="all-linear", save_projection=save_projection))
    randomize(pm)
    with torch.no_grad():  # projections not from the key (another platform's RNG): only a saved copy restores them
        find_projections(pm).get("default")[0].mul_(1.5)
    expected = pm(ids).logits
    pm.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert ({"base_model.vera_A", "base_model.vera_B"} <= keys) == save_projection
    assert "base_model.model.model.layers.1.mlp.down_proj.vera_lambda_d" in keys and len(keys) == 28 + 2 * save_projection
    from_state = get_peft_model_state_dict(pm, state_dict=pm.state_dict())  # the same tensors, by name
    assert from_state.keys() == keys
    assert all(torch.equal(t, from_state[k]) for k, t in get_peft_model_state_dict(pm).items())
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.allclose(loaded(ids).logits, expected, atol=1e-6) == save_projection


# ---- HF PEFT ---------------------------------------------------------------------------------------
INTEROP = {
    "llama_all_linear": (tiny_llama, {"r": 4, "target_modules": "all-linear", "projection_prng_key": 7}),
    "gpt2_conv1d_vera_only_bias": (tiny_gpt2, {"r": 6, "target_modules": ["c_attn", "c_proj", "c_fc"],
                                               "fan_in_fan_out": True, "bias": "vera_only"}),
}


def create(lib: str, make, config: dict, save_projection: bool) -> nn.Module:
    model = LIBS[lib].get_peft_model(make(), LIBS[lib].VeraConfig(**config, save_projection=save_projection))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):  # b, d (and the biases of "vera_only")
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("src", ["peftkit", "hf"])
@pytest.mark.parametrize("case", list(INTEROP))
def test_hf_interop_both_ways(case, src, save_projection, tmp_path, ids) -> None:
    make, config = INTEROP[case]
    dst = "hf" if src == "peftkit" else "peftkit"
    source = create(src, make, config, save_projection)
    expected = source(ids).logits
    assert (expected - make()(ids).logits).abs().max() > 1e-2
    source.save_pretrained(tmp_path / src)
    create(dst, make, config, save_projection).save_pretrained(tmp_path / dst)
    files = {lib: load_file(tmp_path / lib / "adapter_model.safetensors") for lib in LIBS}
    assert {k: v.shape for k, v in files["peftkit"].items()} == {k: v.shape for k, v in files["hf"].items()}
    assert ("base_model.vera_A" in files["hf"]) == save_projection
    loaded = LIBS[dst].PeftModel.from_pretrained(make(), tmp_path / src)
    assert (loaded(ids).logits - expected).abs().max() <= 1e-5
    with torch.no_grad():
        for key, tensor in LIBS[dst].get_peft_model_state_dict(loaded).items():
            assert torch.equal(tensor, files[src][key]), key


@pytest.mark.parametrize("case", list(INTEROP))
def test_projections_from_the_key_equal_hf_bit_for_bit(case) -> None:
    make, config = INTEROP[case]
    ours = create("peftkit", make, config, False)
    theirs = create("hf", make, config, False)
    A, B = find_projections(ours).get("default")
    assert torch.equal(A, theirs.base_model.vera_A["default"]) and torch.equal(B, theirs.base_model.vera_B["default"])
    for key, r, d_in, d_out in ((0, 256, 4096, 11008), (12345, 3, 7, 5)):  # HF's recipe on its own
        g = torch.Generator().manual_seed(key)
        A_hf, B_hf = _kaiming_init((r, d_in), generator=g), _kaiming_init((d_out, r), generator=g)
        A, B = vera_projections(key, r, d_in, d_out)
        assert torch.equal(A, A_hf) and torch.equal(B, B_hf)


def test_generate_equals_hf(tmp_path) -> None:
    make, config = INTEROP["llama_all_linear"]
    create("hf", make, config, False).save_pretrained(tmp_path)
    prompt = torch.tensor([[5, 9, 17, 3]])
    outs = [LIBS[lib].PeftModel.from_pretrained(make(), tmp_path).generate(
        input_ids=prompt, max_new_tokens=6, do_sample=False, pad_token_id=0) for lib in LIBS]
    assert outs[0].shape == (1, 10) and torch.equal(outs[0], outs[1])


# ---- bad input ---------------------------------------------------------------------------------------
def test_bad_input_fails_clearly_and_leaves_the_model_untouched(ids) -> None:
    with pytest.raises(PeftConfigError, match="r must be a positive integer"):
        VeraConfig(r=0)
    pm = get_peft_model(tiny_llama(), VeraConfig(r=4, target_modules=["q_proj"]))
    state = {n: t.clone() for n, t in pm.state_dict().items()}
    for bad, error, words in [
        (VeraConfig(r=4, target_modules=["v_proj"], projection_prng_key=1), PeftConfigError, "use 0"),
        (VeraConfig(r=4, target_modules=["v_proj"], save_projection=False), PeftConfigError, "save_projection=True"),
        (VeraConfig(r=4, target_modules=["k_proj", "embed_tokens"]), TargetModulesError, "is a Embedding"),
    ]:
        with pytest.raises(error, match=words):
            pm.add_adapter("bad", bad)
        assert len(vera_layers(pm)) == 2 and all(layer.adapter_names == ["default"] for layer in vera_layers(pm))
        assert list(find_projections(pm).users) == ["default"] and list(pm.peft_config) == ["default"]
        after = pm.state_dict()
        assert after.keys() == state.keys() and all(torch.equal(after[n], t) for n, t in state.items())
    model = tiny_llama()
    with pytest.raises(TargetModulesError, match="narrow target_modules"):
        get_peft_model(model, VeraConfig(r=4, target_modules=["lm_head", "embed_tokens"]))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


# ---- several adapters, other methods ---------------------------------------------------------------
def test_adapters_have_their_own_projections_switch_per_row_and_delete(tmp_path, ids) -> None:
    pm = get_peft_model(tiny_llama(), VeraConfig(r=4, target_modules="all-linear"), adapter_name="big")
    pm.add_adapter("small", VeraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    pm.add_adapter("lora", LoraConfig(r=2, target_modules=["q_proj", "o_proj"], init_lora_weights=False))
    for name in ("big", "small", "lora"):
        randomize(pm, name)
    A, B = find_projections(pm).get("small")  # as if "small" were alone: largest of q (32, 32) and v (16, 32)
    assert all(torch.equal(x, y) for x, y in zip((A, B), vera_projections(0, 2, 32, 32), strict=True))
    q_proj = pm.model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "LoraLinear" and type(q_proj.base_layer).__name__ == "VeraLinear"
    singles = {}
    for name in ("big", "small", "lora"):
        pm.set_adapter(name)
        singles[name] = pm(ids).logits
    pm.save_pretrained(tmp_path, selected_adapters=["big", "small", "lora"])
    for name in ("big", "small", "lora"):
        alone = PeftModel.from_pretrained(tiny_llama(), tmp_path / name)
        torch.testing.assert_close(alone(ids).logits, singles[name], rtol=1e-5, atol=1e-6)
    batch = torch.cat([ids, ids[:1], ids[1:]])
    mixed = pm(batch, adapter_names=["small", "big", "__base__", "lora"]).logits
    for row, expected in enumerate([singles["small"][0], singles["big"][1], tiny_llama()(ids).logits[0],
                                    singles["lora"][1]]):
        torch.testing.assert_close(mixed[row], expected, rtol=1e-4, atol=1e-5)
    pm.set_adapter("small")  # VeRA nested in q_proj's LoRA layer merges into W
    pm.merge_adapter()
    torch.testing.assert_close(pm(ids).logits, singles["small"], rtol=1e-4, atol=1e-5)
    pm.unmerge_adapter()
    pm.delete_adapter("big")
    assert list(find_projections(pm).users) == ["small"] and not hasattr(find_projections(pm).vera_A, "big")
    pm.delete_adapter("small")
    assert find_projections(pm) is None and not vera_layers(pm)
    pm.set_adapter("lora")
    torch.testing.assert_close(pm(ids).logits, singles["lora"], rtol=1e-5, atol=1e-6)
    assert os.path.isfile(tmp_path / "small" / "adapter_config.json")


# ---- the fused training path (vera.VeraFunction) --------------------------------------------------------
def _vera_step(pm, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    pm.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # GPT-2's own dropout draws the same masks in both runs
    out = pm(input_ids=ids, labels=ids)
    out.loss.backward()
    seen, stack, nodes = set(), [out.loss.grad_fn], 0
    while stack:
        fn = stack.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            nodes += "VeraFunction" in fn.name()
            stack.extend(f for f, _ in fn.next_functions)
    return out.logits.detach(), {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}, nodes


@pytest.mark.parametrize("make, cfg", [
    (tiny_llama, {"target_modules": "all-linear"}),
    (tiny_gpt2, {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True, "bias": "all"}),
])
def test_fused_equals_reference_fp64(make, cfg) -> None:
    """Outputs and the gradients of d, b (and trained biases) of the fused path equal plain autograd's in fp64,
    two adapters active."""
    from peftkit.methods.lora_kernels import use_fused

    pm = get_peft_model(make().double(), VeraConfig(r=8, init_weights=False, **cfg))
    pm.add_adapter("second", VeraConfig(r=4, init_weights=False, **cfg))
    pm.set_adapter(["default", "second"])
    ids = torch.randint(1, 128, (3, 9))
    pm.train()
    fused_logits, fused, nodes = _vera_step(pm, ids)
    assert nodes > 0
    with use_fused(False):
        ref_logits, ref, ref_nodes = _vera_step(pm, ids)
    assert ref_nodes == 0 and fused.keys() == ref.keys() and any("lambda_b" in n for n in fused)
    torch.testing.assert_close(fused_logits, ref_logits, rtol=0, atol=1e-10)
    for name in fused:
        torch.testing.assert_close(fused[name], ref[name], rtol=1e-9, atol=1e-10, msg=name)


def test_fused_function_gradcheck_and_one_projection_per_sibling_group() -> None:
    from peftkit.methods.vera import VeraFunction, shared_projection

    torch.manual_seed(0)
    kw = {"dtype": torch.float64}
    x = torch.randn(2, 3, 5, **kw, requires_grad=True)
    A, B = torch.randn(4, 5, **kw), torch.randn(6, 4, **kw)
    result, d, b = (torch.randn(*s, **kw, requires_grad=True) for s in ((2, 3, 6), (4,), (6,)))
    assert torch.autograd.gradcheck(
        lambda x, r, d, b: VeraFunction.apply(x, x.reshape(-1, 5) @ A.T, r, A, B, d, b), (x, result, d, b))
    u = shared_projection(x, A)
    assert shared_projection(x, A) is u and shared_projection(x, A[:3]) is not u  # another slice: its own
    assert shared_projection(x.clone(), A) is not u


def test_fused_saves_at_most_lora_bytes() -> None:
    """Saved activations of a VeRA step: ≤ 1.05× LoRA's on a Llama-style model at the benchmark's proportions
    (VeRA r / hidden = 1/2, LoRA r 16 / 512 -> 1 here); plain autograd keeps u and B's output per target."""
    from saved_bytes import saved_bytes

    from peftkit.methods.lora_kernels import use_fused

    ids = torch.randint(1, 128, (2, 24))
    lora = saved_bytes(get_peft_model(tiny_llama(), LoraConfig(r=1, target_modules="all-linear")), ids)
    pm = get_peft_model(tiny_llama(), VeraConfig(r=16, target_modules="all-linear", init_weights=False))
    fused = saved_bytes(pm, ids)
    with use_fused(False):
        reference = saved_bytes(pm, ids)
    assert fused <= 1.05 * lora
    assert reference > 1.3 * lora  # what the fused path saves


@pytest.mark.parametrize("make, cfg", [
    (tiny_llama, {"target_modules": "all-linear"}),
    (tiny_gpt2, {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True}),
])
def test_without_gradients_the_same_computation_runs_without_a_node(make, cfg, monkeypatch) -> None:
    """Generation (no gradients): VeraFunction's forward as a plain function, outputs bit for bit the node's."""
    from peftkit.methods import vera as vera_module

    pm = get_peft_model(make(), VeraConfig(r=8, init_weights=False, **cfg))
    pm.add_adapter("second", VeraConfig(r=4, init_weights=False, **cfg))
    pm.set_adapter(["default", "second"])
    pm.eval()
    ids = torch.randint(1, 128, (3, 9))
    calls = []
    apply = vera_module.VeraFunction.apply
    monkeypatch.setattr(vera_module.VeraFunction, "apply", lambda *a: calls.append(1) or apply(*a))
    with_node = pm(ids).logits.detach()
    assert len(calls) > 0
    calls[:] = []
    with torch.no_grad():
        assert torch.equal(pm(ids).logits, with_node) and calls == []
    with pm.disable_adapter(), torch.no_grad():
        assert not torch.equal(pm(ids).logits, with_node)  # the adapters are in play
