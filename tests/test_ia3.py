"""(IA)³ against its equation and against HF PEFT: hand-written references for each layer type, merge = unmerged,
exact unmerge, gradients and counts, files in both directions, several adapters per batch, clear errors.

Every adapter whose effect is checked is non-zero: its vectors are perturbed away from ones first.
"""

from __future__ import annotations

import peft
import pytest
import torch
import torch.nn as nn
from conftest import TinyNet, rows_match_alone, tiny_bert_cls, tiny_gpt2, tiny_llama
from safetensors.torch import load_file

import peftkit
import peftkit.methods.ia3  # noqa: F401  (registers IA3)
from peftkit import PeftConfigError, PeftError, TargetModulesError, get_peft_model
from peftkit.methods.base import AdapterLayer
from peftkit.methods.ia3 import DEFAULT_MODULES, IA3Config, IA3Layer, is_feedforward_module

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # fan_in_fan_out on GPT-2; HF's unmerge note
LIBS = {"peftkit": peftkit, "hf": peft}
CONFIGS = {"peftkit": IA3Config, "hf": peft.IA3Config}  # (peftkit.IA3Config once the package exports it)
ATOL = 1e-5


@torch.no_grad()
def perturb(params, seed: int = 0, scale: float = 0.3) -> int:
    """l = 1 + noise (and noise on head copies): a vector of ones proves nothing."""
    g = torch.Generator().manual_seed(seed)
    params = list(params)
    for p in params:
        p.add_(torch.randn(p.shape, generator=g) * scale)
    return len(params)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def biased(make):
    """The tiny models start with zero biases; give them some, or the bias handling goes untested."""

    def make_biased() -> nn.Module:
        model = make()
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
        return model

    make_biased.__name__ = f"{make.__name__}_biased"
    return make_biased


def layer_of(base: nn.Module, feedforward: bool, names: tuple[str, ...] = ("default",)) -> IA3Layer:
    layer = IA3Layer(base)
    config = IA3Config(target_modules=["m"], feedforward_modules=["m"] if feedforward else [],
                       fan_in_fan_out=type(base).__name__ == "Conv1D")
    for i, name in enumerate(names):
        layer.update_layer(name, config, "m")
        perturb([layer.ia3_l[name]], seed=i)
    layer.set_adapter(list(names))
    return layer


# ---- the equation, layer by layer -------------------------------------------------------------------
@pytest.mark.parametrize("feedforward", [False, True])
def test_linear_equals_formula(feedforward: bool) -> None:
    torch.manual_seed(0)
    base = nn.Linear(10, 6)
    layer = layer_of(base, feedforward)
    l = layer.ia3_l["default"]  # noqa: E741
    x = torch.randn(3, 5, 10)
    if feedforward:  # y = W (l ⊙ x) + b, l of shape (1, d_in)
        assert l.shape == (1, 10)
        expected = (x * l[0]) @ base.weight.T + base.bias
    else:  # y = l ⊙ (W x + b): the bias is scaled too, l of shape (d_out, 1)
        assert l.shape == (6, 1)
        expected = l[:, 0] * (x @ base.weight.T + base.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert (layer(x) - base(x)).abs().max() > 0.1


@pytest.mark.parametrize("feedforward", [False, True])
def test_gpt2_conv1d_equals_formula(feedforward: bool) -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(12, 8)  # 8 inputs, 12 outputs, weight (8, 12)
    layer = layer_of(base, feedforward)
    l = layer.ia3_l["default"]  # noqa: E741
    x = torch.randn(2, 3, 8)
    if feedforward:
        assert l.shape == (1, 8)
        expected = (x * l[0]) @ base.weight + base.bias
    else:
        assert l.shape == (12, 1)
        expected = l[:, 0] * (x @ base.weight + base.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("feedforward", [False, True])
def test_conv2d_equals_formula_and_merges(feedforward: bool, groups: int) -> None:
    torch.manual_seed(0)
    base = nn.Conv2d(4, 6, 3, padding=1, groups=groups)
    layer = layer_of(base, feedforward)
    l = layer.ia3_l["default"]  # noqa: E741
    assert l.shape == ((1, 4, 1, 1) if feedforward else (1, 6, 1, 1))
    x = torch.randn(2, 4, 5, 5)
    expected = base(x * l) if feedforward else base(x) * l
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    weight, bias = base.weight.clone(), base.bias.clone()
    layer.merge()
    torch.testing.assert_close(base(x), expected, rtol=1e-5, atol=1e-6)
    layer.unmerge()
    torch.testing.assert_close(base.weight, weight, rtol=1e-6, atol=0)
    torch.testing.assert_close(base.bias, bias, rtol=1e-6, atol=0)


def test_several_active_adapters_multiply() -> None:
    torch.manual_seed(0)
    base = nn.Linear(10, 6)
    layer = layer_of(base, feedforward=False, names=("a", "b"))
    x = torch.randn(4, 10)
    la, lb = layer.ia3_l["a"][:, 0], layer.ia3_l["b"][:, 0]
    expected = la * lb * base(x)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    weight = base.weight.clone()
    layer.merge()  # both, one after the other
    torch.testing.assert_close(base(x), expected, rtol=1e-5, atol=1e-6)
    layer.unmerge()
    torch.testing.assert_close(base.weight, weight, rtol=1e-6, atol=0)


# ---- whole models -----------------------------------------------------------------------------------
def test_fresh_adapter_is_the_base_exactly(ids) -> None:
    model = get_peft_model(tiny_llama(), IA3Config())
    assert all(torch.equal(p, torch.ones_like(p)) for p in trainable(model))
    assert torch.equal(model(ids).logits, tiny_llama()(ids).logits)


def test_only_the_vectors_train_and_are_counted(ids) -> None:
    model = get_peft_model(tiny_llama(), IA3Config()).train()
    # per layer: k_proj and v_proj (16 outputs each, 2 kv heads x 8) scale outputs, down_proj its 64 inputs
    assert model.get_nb_trainable_parameters()[0] == 2 * (16 + 16 + 64)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(names) == 6 and all(n.endswith(".ia3_l.default") for n in names)
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


@pytest.mark.parametrize("make", [tiny_llama, biased(tiny_gpt2), biased(tiny_bert_cls)], ids=lambda f: f.__name__)
def test_merge_equals_unmerged_and_unmerge_restores(make, ids) -> None:
    kw = {"task_type": "SEQ_CLS"} if "bert" in make.__name__ else {}
    model = get_peft_model(make(), IA3Config(**kw))
    model.add_adapter("other", IA3Config(**kw))
    model.set_adapter(["default", "other"])
    perturb(trainable(model))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = model(ids).logits
    model.merge_adapter()
    merged = model(ids).logits
    assert (merged - expected).abs().max() <= 1e-5 * expected.abs().max()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.endswith("base_layer.weight") for k in changed)
    if "bert" in make.__name__:  # key/value scale their output, bias included; output.dense its input
        assert "base_model.model.bert.encoder.layer.0.attention.self.key.base_layer.bias" in changed
        assert "base_model.model.bert.encoder.layer.0.output.dense.base_layer.bias" not in changed
    model.unmerge_adapter()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=1e-6, atol=1e-7, msg=key)
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-6)


def test_zero_scale_unmerge_is_exact() -> None:
    """A zero in l erases a row of W when merged; merge keeps the original so unmerge gives it back."""
    torch.manual_seed(0)
    base = nn.Linear(8, 5)
    layer = layer_of(base, feedforward=False)
    with torch.no_grad():
        layer.ia3_l["default"][2] = 0.0
    x = torch.randn(3, 8)
    expected = layer(x)
    weight, bias = base.weight.clone(), base.bias.clone()
    layer.merge()
    assert torch.equal(base.weight[2], torch.zeros(8))
    torch.testing.assert_close(base(x), expected, rtol=1e-5, atol=1e-6)
    layer.unmerge()
    assert torch.equal(base.weight, weight) and torch.equal(base.bias, bias)
    assert not layer._unmerged_copy  # the copy lives only while merged


def test_safe_merge_refuses_nan_and_changes_nothing() -> None:
    model = get_peft_model(tiny_llama(), IA3Config())
    with torch.no_grad():
        trainable(model)[-1][0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PeftError, match="NaN"):
        model.merge_adapter(safe_merge=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, equal_nan=True, msg=key)


def test_save_and_load_round_trip(tmp_path, ids) -> None:
    model = get_peft_model(tiny_gpt2(), IA3Config(fan_in_fan_out=True))
    perturb(trainable(model))
    model.save_pretrained(str(tmp_path))
    loaded = peftkit.PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path))
    assert isinstance(loaded.peft_config["default"], IA3Config)
    assert loaded.peft_config["default"].feedforward_modules == ["mlp.c_proj"]
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_generate_with_ia3(ids) -> None:
    model = get_peft_model(tiny_llama(), IA3Config()).eval()
    perturb(trainable(model), scale=1.0)
    out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (2, 11) and torch.equal(out[:, :7], ids)
    with model.disable_adapter():
        base = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert not torch.equal(out, base)  # the adapter steers generation


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_adapters_mixed_per_row_equal_single_runs(make) -> None:
    model = get_peft_model(make(), IA3Config()).eval()
    model.add_adapter("b", IA3Config(target_modules=["c_attn"] if make is tiny_gpt2 else ["v_proj"]))
    for seed, name in enumerate(("default", "b")):
        model.set_adapter(name)
        perturb(trainable(model), seed=seed, scale=0.5)
    ids = torch.randint(1, 128, (4, 6), generator=torch.Generator().manual_seed(1))
    names = ["b", "__base__", "default", "b"]
    mixed = rows_match_alone(model, names, ids, rtol=1e-5, atol=1e-6)
    assert (mixed[0] - mixed[2]).abs().max() > 1e-2


def test_conv2d_mixed_per_row() -> None:
    from peftkit.methods.base import RowAdapters

    torch.manual_seed(0)
    layer = layer_of(nn.Conv2d(3, 4, 3), feedforward=True, names=("a", "b"))
    x = torch.randn(3, 3, 6, 6)
    layer.row_adapters = RowAdapters.from_names(["b", "__base__", "a"])
    mixed = layer(x)
    layer.row_adapters = None
    base = layer.base_layer
    for row, scale in enumerate([layer.ia3_l["b"], torch.ones(1, 3, 1, 1), layer.ia3_l["a"]]):
        torch.testing.assert_close(mixed[row:row + 1], base(x[row:row + 1] * scale), rtol=1e-5, atol=1e-6)


# ---- HF PEFT: the same files, the same numbers --------------------------------------------------------
CASES = {
    "llama_defaults": (tiny_llama, {}),
    "llama_explicit": (tiny_llama, {"target_modules": ["q_proj", "o_proj", "up_proj"], "feedforward_modules": ["up_proj"]}),
    # HF's feedforward rule for a list is a plain suffix: "p_proj" makes up_proj (not k_proj) feedforward
    "llama_regex_plain_suffix": (tiny_llama, {"target_modules": r".*\.(k_proj|up_proj)", "feedforward_modules": ["p_proj"]}),
    "gpt2_defaults": (biased(tiny_gpt2), {}),
    "bert_seq_cls": (biased(tiny_bert_cls), {"task_type": "SEQ_CLS"}),
}


def make_adapted(lib: str, case: str) -> nn.Module:
    make, kw = CASES[case]
    model = LIBS[lib].get_peft_model(make(), CONFIGS[lib](**kw))
    assert perturb(trainable(model), seed=1, scale=0.5) > 0
    return model.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_interop_with_hf_both_ways(case: str, tmp_path, ids) -> None:
    make = CASES[case][0]
    base = make()(ids).logits
    sources = {lib: make_adapted(lib, case) for lib in LIBS}
    for src, model in sources.items():
        model.save_pretrained(str(tmp_path / src))
    files = {lib: load_file(str(tmp_path / lib / "adapter_model.safetensors")) for lib in LIBS}
    shapes = {lib: {k: tuple(v.shape) for k, v in f.items()} for lib, f in files.items()}
    assert shapes["peftkit"] == shapes["hf"]
    assert any(k.endswith(".ia3_l") for k in shapes["hf"])
    for src, dst in (("peftkit", "hf"), ("hf", "peftkit")):
        expected = sources[src](ids).logits
        assert (expected - base).abs().max() > 1e-2, "the adapter does not change the output"
        loaded = LIBS[dst].PeftModel.from_pretrained(make(), str(tmp_path / src)).eval()
        got = loaded(ids).logits
        assert (got - expected).abs().max() <= ATOL, f"{src} -> {dst}"
        state = LIBS[dst].get_peft_model_state_dict(loaded)
        assert all(torch.equal(state[k], v) for k, v in files[src].items()), f"{src} -> {dst} tensors"
        config = LIBS[dst].PeftConfig.from_pretrained(str(tmp_path / src))
        assert sorted(config.feedforward_modules) == sorted(sources[src].peft_config["default"].feedforward_modules)


@pytest.mark.parametrize("case", ["llama_defaults", "bert_seq_cls"])
def test_merge_and_unload_of_hf_adapter_equals_hf(case: str, tmp_path, ids) -> None:
    make_adapted("hf", case).save_pretrained(str(tmp_path))
    make = CASES[case][0]
    theirs = peft.PeftModel.from_pretrained(make(), str(tmp_path)).merge_and_unload()
    ours = peftkit.PeftModel.from_pretrained(make(), str(tmp_path)).merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in ours.modules())
    their_state = theirs.state_dict()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, their_state[key], rtol=1e-6, atol=1e-7, msg=key)


def test_feedforward_rule_is_hf_s() -> None:
    assert is_feedforward_module(["down_proj"], "model.layers.0.mlp.down_proj")
    assert is_feedforward_module(["p_proj"], "model.layers.0.mlp.up_proj")  # a plain suffix, no "." needed
    assert not is_feedforward_module(["up_proj"], "model.layers.0.mlp.up_proj.x")
    assert is_feedforward_module(r".*mlp\..*", "model.layers.0.mlp.up_proj")  # a regex matches the whole name
    assert not is_feedforward_module(r"mlp\..*", "model.layers.0.mlp.up_proj")
    assert not is_feedforward_module(None, "model.layers.0.mlp.up_proj")


def test_default_modules_match_hf_tables() -> None:
    from peft.utils import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as HF_FEEDFORWARD,
    )
    from peft.utils import (
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as HF_TARGETS,
    )

    assert set(DEFAULT_MODULES) == set(HF_TARGETS)
    for model_type, (targets, feedforward) in DEFAULT_MODULES.items():
        assert sorted(targets) == sorted(HF_TARGETS[model_type]), model_type
        assert sorted(feedforward) == sorted(HF_FEEDFORWARD[model_type]), model_type


def test_default_feedforward_keeps_only_targeted_names(tmp_path) -> None:
    """llama's default feedforward (down_proj) is dropped when down_proj is not targeted, so the file's config
    holds the subset rule and HF PEFT can load it (HF keeps down_proj and then refuses its own file)."""
    model = get_peft_model(tiny_llama(), IA3Config(target_modules=["k_proj", "v_proj"]))
    assert model.peft_config["default"].feedforward_modules == []
    model.save_pretrained(str(tmp_path))
    peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))


def test_user_model_without_defaults() -> None:
    model = get_peft_model(TinyNet(), IA3Config(target_modules=["fc", "conv"], feedforward_modules=["fc"]))
    layers = dict((n, m) for n, m in model.named_modules() if isinstance(m, IA3Layer))
    assert layers["base_model.model.blocks.0.fc"].is_feedforward and not layers["base_model.model.conv"].is_feedforward
    assert get_peft_model(TinyNet(), IA3Config(target_modules=["fc"])).peft_config["default"].feedforward_modules == []


# ---- errors: one line, naming the fix -------------------------------------------------------------------
def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_feedforward_must_be_targeted() -> None:
    with pytest.raises(PeftConfigError) as excinfo:
        IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=["down_proj"])
    assert "['down_proj'] are not in target_modules" in _one_line(excinfo)


def test_unsupported_target_type() -> None:
    with pytest.raises(TargetModulesError) as excinfo:
        get_peft_model(tiny_llama(), IA3Config(target_modules=["embed_tokens", "k_proj"], feedforward_modules=[]))
    assert "Embedding" in _one_line(excinfo) and "supported: Linear, transformers Conv1D" in str(excinfo.value)


def test_unknown_model_without_targets_lists_candidates() -> None:
    with pytest.raises(TargetModulesError) as excinfo:
        get_peft_model(TinyNet(), IA3Config())
    assert "set target_modules" in _one_line(excinfo) and "fc, head" in str(excinfo.value)


def test_feedforward_disagreement_between_adapters() -> None:
    model = get_peft_model(tiny_llama(), IA3Config())
    with pytest.raises(PeftConfigError) as excinfo:
        model.add_adapter("b", IA3Config(target_modules=["down_proj"], feedforward_modules=[]))
    assert "same feedforward_modules" in _one_line(excinfo)
    assert list(model.peft_config) == ["default"]  # nothing changed


def test_bad_init_value() -> None:
    with pytest.raises(PeftConfigError, match="init_ia3_weights"):
        IA3Config(init_ia3_weights="ones")


def test_train_preset_has_the_papers_vectors_on_bert() -> None:
    """Liu et al. 2022 (§3.3): l_k, l_v per attention and l_ff on the FFN's intermediate activation, i.e.
    L·(d_k + d_v + d_ff) numbers. HF PEFT's BERT default ("output.dense") also hits attention.output.dense."""
    from peftkit.train.methods import method_entry

    def ia3_numbers(pm) -> dict[str, int]:
        return {n: p.numel() for n, p in pm.named_parameters() if "ia3_l" in n}

    model = tiny_bert_cls()
    cfg = model.config
    L, d, d_ff = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    preset = get_peft_model(model, method_entry("ia3").make_config("classification", {}, model))
    numbers = ia3_numbers(preset)
    assert sum(numbers.values()) == L * (d + d + d_ff) == 256
    assert not any("attention.output" in n for n in numbers)
    ffn = [n for n in numbers if n.endswith(".output.dense.ia3_l.default")]
    assert len(ffn) == L and all(numbers[n] == d_ff for n in ffn)
    # HF PEFT's defaults stay as they are for IA3Config() (files keep loading in either library)
    hf_default = get_peft_model(tiny_bert_cls(), IA3Config(task_type="SEQ_CLS"))
    assert sum(ia3_numbers(hf_default).values()) == L * (d + d + d_ff + d)
    # a run that names its own targets gets HF PEFT's feedforward rule for them, not the preset's regex
    own = method_entry("ia3").make_config("classification", {"target_modules": ["key", "value"]}, tiny_bert_cls())
    assert (own.target_modules, own.feedforward_modules) == (["key", "value"], None)
    # a llama-family model keeps HF PEFT's table, which already is the paper's (k_proj, v_proj, down_proj)
    llama = tiny_llama()
    assert method_entry("ia3").make_config("causal_lm", {}, llama).target_modules is None


def test_saves_no_more_activations_than_lora() -> None:
    """Issue 20's bound: an (IA)³ step (Llama defaults: k, v as outputs, down_proj as a feedforward input) keeps
    ≤ 1.05× the bytes a LoRA step on all linear layers keeps (tiny model at LoRA r 16 / hidden 512 proportions).
    It keeps k's and v's outputs and down_proj's input for the gradients of l; LoRA keeps each sibling group's input.
    Deterministic bytes (saved_tensors_hooks), no timing."""
    from saved_bytes import saved_bytes

    ids = torch.randint(1, 128, (2, 24))
    lora = saved_bytes(get_peft_model(tiny_llama(), peftkit.LoraConfig(r=1, target_modules="all-linear")), ids)
    ia3 = saved_bytes(get_peft_model(tiny_llama(), IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                             feedforward_modules=["down_proj"])), ids)
    floor_model = tiny_llama().requires_grad_(False)
    floor_model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_())
    floor = saved_bytes(floor_model, ids)
    assert floor < ia3 <= 1.05 * lora
