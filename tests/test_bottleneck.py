"""Bottleneck adapters (Houlsby, Pfeiffer) against their equation: references, placement, files, batches."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import TinyNet, rows_match_alone, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_t5
from safetensors.torch import load_file, save_file

import peftkit.methods.adapters  # noqa: F401  (registers BOTTLENECK)
from peftkit import PeftConfigError, PeftError, PeftModel, TargetModulesError, get_peft_model
from peftkit.methods.adapters import BottleneckConfig, BottleneckLayer, bottleneck_size
from peftkit.methods.base import adapter_layers, modules_to_save_wrappers


def randomize(model, name: str = "default", scale: float = 0.3, norms: bool = True) -> None:
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for p in layer.adapter_parameters(name):
                p.copy_(torch.randn_like(p) * scale)
        for _, wrapper in modules_to_save_wrappers(model):
            if norms and name in wrapper.modules_to_save:
                for p in wrapper.modules_to_save[name].parameters():
                    p.add_(torch.randn_like(p) * scale)


def _layer(base: nn.Module, **cfg) -> BottleneckLayer:
    layer = BottleneckLayer(base)
    cfg.setdefault("original_ln_before", False)  # a bare layer: the adapter reads the projection's output
    layer.update_layer("default", BottleneckConfig(**cfg), "m")
    layer.set_adapter(["default"])
    randomize(nn.Sequential(layer))
    return layer


ACTS = {"relu": torch.relu, "gelu": F.gelu, "swish": lambda z: z * torch.sigmoid(z), "tanh": torch.tanh}


@pytest.mark.parametrize("act", sorted(ACTS))
def test_linear_equals_hand_written_formula(act: str) -> None:
    torch.manual_seed(0)
    base = nn.Linear(10, 12)
    layer = _layer(base, reduction_factor=4, non_linearity=act, scaling=0.7)
    down, up = layer.adapter_down["default"], layer.adapter_up["default"]
    assert down.weight.shape == (3, 12) and up.weight.shape == (12, 3)
    x = torch.randn(2, 5, 10)
    h = x @ base.weight.T + base.bias
    expected = h + 0.7 * (ACTS[act](h @ down.weight.T + down.bias) @ up.weight.T + up.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert (layer(x) - h).abs().max() > 0.1


def test_conv1d_equals_formula() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(12, 8)  # 8 inputs, 12 outputs, weight (8, 12)
    layer = _layer(base, bottleneck_size=5)
    assert layer.features == 12 and layer.adapter_down["default"].weight.shape == (5, 12)
    down, up = layer.adapter_down["default"], layer.adapter_up["default"]
    x = torch.randn(3, 8)
    h = x @ base.weight + base.bias
    expected = h + torch.relu(h @ down.weight.T + down.bias) @ up.weight.T + up.bias
    torch.testing.assert_close(layer(x), expected)


def test_adapters_run_in_sequence() -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 8)
    layer = _layer(base, bottleneck_size=2)
    layer.update_layer("b", BottleneckConfig(bottleneck_size=3, non_linearity="tanh", original_ln_before=False), "m")
    randomize(nn.Sequential(layer), "b")
    layer.set_adapter(["default", "b"])
    x = torch.randn(4, 6)

    def delta(name, h, act):
        d, u = layer.adapter_down[name], layer.adapter_up[name]
        return act(h @ d.weight.T + d.bias) @ u.weight.T + u.bias

    h1 = base(x) + delta("default", base(x), torch.relu)
    torch.testing.assert_close(layer(x), h1 + delta("b", h1, torch.tanh))


def test_bottleneck_size_rule() -> None:
    assert bottleneck_size(768, 16) == 48
    assert bottleneck_size(32, 64) == 1
    assert bottleneck_size(768, 16, size=7) == 7


@pytest.mark.parametrize("kwargs, match", [
    ({"placement": "parallel"}, "placement must be 'houlsby' or 'pfeiffer'"),
    ({"reduction_factor": 0}, "reduction_factor must be a positive number"),
    ({"bottleneck_size": 0}, "bottleneck_size must be a positive integer"),
    ({"non_linearity": "sigmoid"}, "non_linearity must be one of"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"layers_pattern": "layers"}, "layers_pattern needs layers_to_transform"),
    ({"target_modules": ".*o_proj", "layers_to_transform": [0]}, "regex target_modules"),
])
def test_config_errors_name_the_fix(kwargs, match) -> None:
    with pytest.raises(PeftConfigError, match=match):
        BottleneckConfig(**kwargs)


def _run(model, ids):
    if model.config.model_type == "t5":
        return model(input_ids=ids, decoder_input_ids=ids).logits
    return model(input_ids=ids).logits


PLACEMENTS = {
    tiny_llama: ({"model.layers.{i}.self_attn.o_proj"}, {"model.layers.{i}.mlp.down_proj"}),
    tiny_gpt2: ({"transformer.h.{i}.attn.c_proj"}, {"transformer.h.{i}.mlp.c_proj"}),
    tiny_bert_cls: ({"bert.encoder.layer.{i}.attention.output.dense"},
                    {"bert.encoder.layer.{i}.output.dense"}),  # not attention.output.dense
    tiny_t5: ({"encoder.block.{i}.layer.0.SelfAttention.o", "decoder.block.{i}.layer.0.SelfAttention.o"},
              {"encoder.block.{i}.layer.1.DenseReluDense.wo", "decoder.block.{i}.layer.2.DenseReluDense.wo"}),
}


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("make", list(PLACEMENTS), ids=lambda f: f.__name__)
def test_placement_and_fresh_adapter_equals_base(make, placement: str, ids) -> None:
    attention, ffn = PLACEMENTS[make]
    wanted = ffn | attention if placement == "houlsby" else ffn
    expected = {n.format(i=i) for n in wanted for i in range(2)}
    base = make().requires_grad_(False)
    pm = get_peft_model(make(), BottleneckConfig(placement=placement, init_weights="mam_adapter"))
    assert {n for n, _ in adapter_layers(pm.model)} == expected
    config = pm.peft_config["default"]
    assert set(config.target_modules) == expected and config.train_layer_norms == (placement == "houlsby")
    norms = {n for n, m in base.named_modules() if type(m).__name__.endswith(("LayerNorm", "RMSNorm"))}
    assert {n for n, _ in modules_to_save_wrappers(pm.model)} == (norms if placement == "houlsby" else set())
    fresh = _run(pm, ids)
    torch.testing.assert_close(fresh, _run(base, ids), rtol=0, atol=1e-5)
    with pm.disable_adapter():
        assert torch.equal(fresh, _run(pm, ids))  # a fresh adapter is exactly the base
    randomize(pm)
    assert (_run(pm, ids) - _run(base, ids)).abs().max() > 1e-3


def test_layers_to_transform_limits_targets_and_norms() -> None:
    pm = get_peft_model(tiny_llama(), BottleneckConfig(placement="houlsby", layers_to_transform=[1]))
    assert {n for n, _ in adapter_layers(pm.model)} == {
        "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"}
    assert {n for n, _ in modules_to_save_wrappers(pm.model)} == {
        "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm"}


def test_unknown_model_needs_target_modules_and_lists_candidates() -> None:
    with pytest.raises(TargetModulesError, match=r"no default placement for model_type None.*fc, head"):
        get_peft_model(TinyNet(), BottleneckConfig())
    pm = get_peft_model(TinyNet(), BottleneckConfig(target_modules=["fc"], placement="houlsby"))
    assert len(list(adapter_layers(pm))) == 3 and len(list(modules_to_save_wrappers(pm))) == 3  # the norms


def test_trainable_count_and_gradients(ids) -> None:
    d, m = 32, 2  # tiny Llama: hidden 32, reduction 16
    pm = get_peft_model(tiny_llama(), BottleneckConfig())
    assert pm.get_nb_trainable_parameters()[0] == 2 * (2 * d * m + d + m)  # two FFN outputs
    pm = get_peft_model(tiny_llama(), BottleneckConfig(placement="houlsby"))
    adapter = 4 * (2 * d * m + d + m)
    norms = 5 * d  # 2 x (input, post-attention) RMSNorm + final norm
    assert pm.get_nb_trainable_parameters()[0] == adapter + norms
    pm.train()
    pm(ids, labels=ids).loss.backward()
    with_grad = {n for n, p in pm.named_parameters() if p.grad is not None}
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert with_grad == trainable and sum(pm.get_parameter(n).numel() for n in with_grad) == adapter + norms
    assert all(".adapter_" in n or ".modules_to_save.default." in n for n in with_grad)
    assert all(pm.get_parameter(n).grad.abs().sum() > 0 for n in with_grad if "adapter_up" in n)


def test_adapter_dtype_on_bf16_base(ids) -> None:
    pm = get_peft_model(tiny_llama().to(torch.bfloat16), BottleneckConfig())
    randomize(pm)
    layer = next(layer for _, layer in adapter_layers(pm))
    assert layer.adapter_up["default"].weight.dtype == torch.float32
    assert pm(ids).logits.dtype == torch.bfloat16


def test_save_and_load_with_norm_copies_and_head(tmp_path, ids) -> None:
    pm = get_peft_model(tiny_bert_cls(), BottleneckConfig(placement="houlsby", task_type="SEQ_CLS"))
    randomize(pm)
    expected = pm(ids).logits
    pm.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    prefix = "base_model.model.bert."
    assert {prefix + "encoder.layer.0.output.dense.adapter_down.weight",
            prefix + "encoder.layer.0.output.dense.adapter_up.bias",
            prefix + "embeddings.LayerNorm.weight", "base_model.model.classifier.weight"} <= keys
    assert not any("base_layer" in k or "original_module" in k for k in keys)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "BOTTLENECK"
    loaded = PeftModel.from_pretrained(tiny_bert_cls(), tmp_path)
    torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)
    assert loaded.get_nb_trainable_parameters()[0] == 0


def test_switching_and_disabling(ids) -> None:
    base_out = tiny_llama()(ids).logits
    pm = get_peft_model(tiny_llama(), BottleneckConfig(placement="houlsby"))
    pm.add_adapter("other", BottleneckConfig(placement="houlsby", bottleneck_size=3, non_linearity="gelu"))
    randomize(pm, "default")
    randomize(pm, "other")
    out_default = pm(ids).logits
    pm.set_adapter("other")
    out_other = pm(ids).logits
    assert (out_default - out_other).abs().max() > 1e-2
    assert pm.model.model.norm.active_adapter == "other"  # the norm copies switch with the adapter
    with pm.disable_adapter():
        torch.testing.assert_close(pm(ids).logits, base_out, rtol=0, atol=1e-5)
    pm.set_adapter("default")
    torch.testing.assert_close(pm(ids).logits, out_default, rtol=0, atol=0)
    pm.delete_adapter("other")
    torch.testing.assert_close(pm(ids).logits, out_default, rtol=0, atol=0)


def test_merge_refused_and_model_unchanged(ids) -> None:
    pm = get_peft_model(tiny_llama(), BottleneckConfig())
    randomize(pm)
    before = pm(ids).logits
    for call in (pm.merge_adapter, pm.merge_and_unload):
        with pytest.raises(PeftError, match="cannot merge: BottleneckLayer adapters are non-linear"):
            call()
    assert len(list(adapter_layers(pm))) == 2
    torch.testing.assert_close(pm(ids).logits, before, rtol=0, atol=0)


def test_unload_returns_base_model(ids) -> None:
    base_out = tiny_llama()(ids).logits
    pm = get_peft_model(tiny_llama(), BottleneckConfig())
    randomize(pm)
    model = pm.unload()
    assert type(model).__name__ == "LlamaForCausalLM" and not list(adapter_layers(model))
    torch.testing.assert_close(model(ids).logits, base_out, rtol=0, atol=1e-5)


@pytest.mark.parametrize("make, placement", [(tiny_llama, "pfeiffer"), (tiny_gpt2, "houlsby")])
def test_rows_equal_single_adapter_runs(make, placement: str) -> None:
    pm = get_peft_model(make(), BottleneckConfig(placement=placement))
    pm.add_adapter("b", BottleneckConfig(placement=placement, bottleneck_size=5, non_linearity="gelu",
                                         scaling=0.5))
    pm.add_adapter("c", BottleneckConfig(placement=placement, reduction_factor=8, non_linearity="tanh"))
    for name in ("default", "b", "c"):
        randomize(pm, name)
    pm.eval()
    torch.manual_seed(0)
    ids = torch.randint(1, 128, (5, 6))
    names = ["b", "__base__", "default", "c", "b"]
    mixed = rows_match_alone(pm, names, ids)
    assert (mixed[0] - mixed[1]).abs().max() > 1e-2


def test_generate_on_llama(ids) -> None:
    pm = get_peft_model(tiny_llama(), BottleneckConfig())
    randomize(pm)
    pm.add_adapter("b", BottleneckConfig(bottleneck_size=4))
    randomize(pm, "b")
    greedy = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    out = pm.generate(ids, **greedy)
    assert out.shape == (2, 11) and torch.equal(out[:, 7], pm(ids).logits[:, -1].argmax(-1))
    mixed = pm.generate(ids, adapter_names=["b", "default"], **greedy)
    pm.set_adapter("b")
    assert torch.equal(mixed[1:], out[1:])
    assert torch.equal(mixed[:1], pm.generate(ids[:1], **greedy))


def test_training_lowers_loss_and_moves_adapters() -> None:
    torch.manual_seed(0)
    ids, labels = torch.randint(1, 128, (16, 8)), torch.randint(0, 3, (16,))
    pm = get_peft_model(tiny_bert_cls(), BottleneckConfig(placement="houlsby", task_type="SEQ_CLS"))
    pm.train()
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(30):
        loss = pm(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
    ups = [layer.adapter_up["default"].weight for _, layer in adapter_layers(pm)]
    assert all(w.abs().max() > 1e-3 for w in ups)  # the adapters trained, not only the head


# ---- AdapterHub's compositions (tests/test_adapterhub.py checks them against the adapters package) ----
def _adapter_fn(layer: BottleneckLayer, name: str = "default"):
    down, up = layer.adapter_down[name], layer.adapter_up[name]
    act, s = ACTS[layer.non_linearity[name]], layer.scaling[name]
    return lambda v: (act(v @ down.weight.T + down.bias) @ up.weight.T + up.bias) * s


def _adapterhub_bert_block(block: nn.Module, adapter, ln_before: bool):
    """BertSelfOutput / BertOutput forward as AdapterHub computes it, written out from its Adapter's
    pre_forward / forward / post_forward with residual_before_ln=True and original_ln_after=True."""
    def forward(hidden_states, input_tensor):
        h = block.dropout(block.dense(hidden_states))
        residual = h  # residual_before_ln=True: the adapter's skip is h itself
        v = block.LayerNorm(h + input_tensor) if ln_before else h  # original_ln_before
        out = adapter(v) + residual
        return block.LayerNorm(out + input_tensor)  # original_ln_after
    return forward


@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
def test_bert_equals_adapterhubs_formula(placement: str, ids) -> None:
    pm = get_peft_model(tiny_bert_cls(), BottleneckConfig(placement=placement, train_layer_norms=False, scaling=0.8))
    randomize(pm)
    config = pm.peft_config["default"]
    assert config.original_ln_before == (placement == "pfeiffer")
    assert config.non_linearity == ("relu" if placement == "pfeiffer" else "swish")
    reference = tiny_bert_cls()
    for path, layer in adapter_layers(pm.model):
        block = reference.get_submodule(path.rsplit(".", 1)[0])
        block.forward = _adapterhub_bert_block(block, _adapter_fn(layer), config.original_ln_before)
    with torch.no_grad():
        expected = reference(ids).logits
        torch.testing.assert_close(pm(ids).logits, expected, rtol=0, atol=1e-5)
        other = _adapterhub_bert_block  # the other composition differs: the check can fail
        for path, layer in adapter_layers(pm.model):
            block = reference.get_submodule(path.rsplit(".", 1)[0])
            block.forward = other(block, _adapter_fn(layer), not config.original_ln_before)
        assert (reference(ids).logits - expected).abs().max() > 1e-3


# pre-norm whose input is the residual x, for each projection the adapter wraps
_PRE_NORMS = {
    tiny_llama: {"self_attn.o_proj": "input_layernorm", "mlp.down_proj": "post_attention_layernorm"},
    tiny_gpt2: {"attn.c_proj": "ln_1", "mlp.c_proj": "ln_2"},
    tiny_t5: {"SelfAttention.o": "layer_norm", "DenseReluDense.wo": "layer_norm"},
}


@pytest.mark.parametrize("make", list(_PRE_NORMS), ids=lambda f: f.__name__)
@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
def test_pre_norm_models_equal_adapterhubs_formula(make, placement: str, ids) -> None:
    """No norm after the residual sum: AdapterHub's pfeiffer gives x + h + A(x + h), houlsby x + h + A(h)."""
    pm = get_peft_model(make(), BottleneckConfig(placement=placement, train_layer_norms=False))
    randomize(pm)
    reads_sum = pm.peft_config["default"].original_ln_before
    reference, seen = make(), {}
    for path, layer in adapter_layers(pm.model):
        prefix, norm = next((path[: -len(k)], v) for k, v in _PRE_NORMS[make].items() if path.endswith(k))
        reference.get_submodule(f"{prefix}{norm}").register_forward_pre_hook(
            lambda m, args, key=path: seen.__setitem__(key, args[0]))
        adapter = _adapter_fn(layer)
        reference.get_submodule(path).register_forward_hook(
            lambda m, args, h, key=path, a=adapter: h + a(h + seen[key] if reads_sum else h))
    with torch.no_grad():
        torch.testing.assert_close(_run(pm, ids), _run(reference, ids), rtol=0, atol=1e-5)
        assert (_run(pm, ids) - _run(make(), ids)).abs().max() > 1e-3


def test_files_without_the_new_keys_load_as_they_were_trained(tmp_path, ids) -> None:
    """A file written before original_ln_before / init_weights existed: the adapter read h, ReLU, identity init."""
    pm = get_peft_model(tiny_bert_cls(), BottleneckConfig(original_ln_before=False, non_linearity="relu"))
    randomize(pm)
    expected = pm(ids).logits
    pm.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    for key in ("original_ln_before", "init_weights", "non_linearity"):
        del data[key]
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    loaded = PeftModel.from_pretrained(tiny_bert_cls(), tmp_path)
    config = loaded.peft_config["default"]
    assert (config.original_ln_before, config.non_linearity, config.init_weights) == (False, "relu", "mam_adapter")
    torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)


def test_new_configs_get_adapterhubs_defaults() -> None:
    assert (BottleneckConfig().original_ln_before, BottleneckConfig().non_linearity) == (True, "relu")
    houlsby = BottleneckConfig(placement="houlsby")
    assert (houlsby.original_ln_before, houlsby.non_linearity, houlsby.init_weights) == (False, "swish", "bert")
    torch.manual_seed(0)
    base = nn.Linear(64, 256)
    layer = BottleneckLayer(base)
    for init in ("bert", "houlsby", "mam_adapter"):
        layer.update_layer(init, BottleneckConfig(init_weights=init, bottleneck_size=64), "m")
    bert, houlsby_up = layer.adapter_up["bert"].weight, layer.adapter_up["houlsby"].weight
    assert abs(bert.std().item() - 0.02) < 2e-3 and abs(layer.adapter_down["bert"].weight.std().item() - 0.02) < 2e-3
    assert houlsby_up.abs().max() <= 0.02 and houlsby_up.std() > 5e-3
    assert torch.count_nonzero(layer.adapter_up["mam_adapter"].weight) == 0
    assert all(torch.count_nonzero(layer.adapter_down[n].bias) == 0 for n in ("bert", "houlsby", "mam_adapter"))
    with pytest.raises(PeftConfigError, match="init_weights must be one of"):
        BottleneckConfig(init_weights="xavier")


def test_residual_sum_needs_a_known_source_and_leaves_the_model_untouched() -> None:
    model = TinyNet()
    with pytest.raises(TargetModulesError, match=r"original_ln_before=True needs the residual input of target 'blocks.0.fc'.*original_ln_before=False"):
        get_peft_model(model, BottleneckConfig(target_modules=["fc"]))
    assert not list(adapter_layers(model))
    pm = get_peft_model(model, BottleneckConfig(target_modules=["fc"], original_ln_before=False))
    assert len(list(adapter_layers(pm))) == 3


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) for m in model.modules())


def test_taps_go_with_the_adapter_and_copies_keep_their_own(ids) -> None:
    import copy

    pm = get_peft_model(tiny_bert_cls(), BottleneckConfig())
    randomize(pm)
    assert _hooks(pm.model) == 2  # one tap per adapted layer
    twin = copy.deepcopy(pm)
    with torch.no_grad():
        torch.testing.assert_close(twin(ids).logits, pm(ids).logits, rtol=0, atol=0)
    pm.add_adapter("houlsby", BottleneckConfig(placement="houlsby", original_ln_before=False))
    pm.delete_adapter("default")
    assert _hooks(pm.model) == 0
    assert _hooks(pm.unload()) == 0 and _hooks(twin.unload()) == 0


# ---- AdapterHub's folders without AdapterHub (tests/test_adapterhub.py runs them through the package) ----
def _adapterhub_pm(**cfg):
    pm = get_peft_model(tiny_bert_cls(), BottleneckConfig(train_layer_norms=False, **cfg))  # no head copy
    randomize(pm)
    return pm.eval()


@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
def test_adapterhub_layout_round_trip(tmp_path, ids, placement: str) -> None:
    from peftkit import save_adapterhub

    pm = _adapterhub_pm(placement=placement, scaling=0.5)
    expected = pm(ids).logits
    (tmp_path / "notes.txt").write_text("mine")
    save_adapterhub(pm, tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "peft_type" not in data and data["version"] == "adapters.1.3.0" and data["model_type"] == "bert"
    assert (data["config"]["mh_adapter"], data["config"]["original_ln_before"]) == (
        placement == "houlsby", placement == "pfeiffer")
    assert "bert.encoder.layer.1.output.adapters.default.adapter_down.0.weight" in load_file(tmp_path / "adapter.safetensors")
    assert (tmp_path / "notes.txt").read_text() == "mine"  # the user's other files stay
    loaded = PeftModel.from_pretrained(tiny_bert_cls(), tmp_path)
    torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)


def test_adapterhub_options_peftkit_lacks_are_refused_by_name(tmp_path, ids) -> None:
    from peftkit import AdapterFileError, save_adapterhub

    save_adapterhub(_adapterhub_pm(), tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    good = json.dumps(data)
    data["config"].update(ln_after=True, scaling="learned")
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    model = tiny_bert_cls()
    with pytest.raises(AdapterFileError, match=r"does not implement: ln_after=True, scaling='learned'"):
        PeftModel.from_pretrained(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(good)
    (tmp_path / "adapter.safetensors").rename(tmp_path / "pytorch_adapter.bin")
    with pytest.raises(AdapterFileError, match=r"only pytorch_adapter.bin \(a pickle\).*use_safetensors=True"):
        PeftModel.from_pretrained(model, tmp_path)
    assert not list(adapter_layers(model))
    with pytest.raises(AdapterFileError, match=r"trains whole modules .*LayerNorm.*train_layer_norms=False"):
        save_adapterhub(get_peft_model(tiny_bert_cls(), BottleneckConfig(placement="houlsby")), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_adapterhub_folder_for_another_model_or_method_is_refused(tmp_path) -> None:
    from peftkit import AdapterFileError, save_adapterhub

    save_adapterhub(_adapterhub_pm(), tmp_path)
    llama = tiny_llama()
    with pytest.raises(AdapterFileError, match=r"location 'bert.encoder.layer.0.output' has no place in this llama model"):
        PeftModel.from_pretrained(llama, tmp_path)
    assert not list(adapter_layers(llama))
    model = tiny_bert_cls()  # AdapterHub's static head: the model's own classifier, saved beside the adapter
    (tmp_path / "head_config.json").write_text('{"config": null}')
    head = {"classifier.weight": model.classifier.weight.detach().clone()}
    save_file(head, tmp_path / "model_head.safetensors")
    PeftModel.from_pretrained(model, tmp_path).unload()
    save_file({"classifier.weight": head["classifier.weight"] + 1}, tmp_path / "model_head.safetensors")
    with pytest.raises(AdapterFileError, match=r"prediction head \(head_config.json\) that is not this model's own"):
        PeftModel.from_pretrained(model, tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data["config"] = {"architecture": "lora", "r": 8}
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(AdapterFileError, match=r"AdapterHub 'lora' adapter; peftkit reads AdapterHub's bottleneck"):
        PeftModel.from_pretrained(tiny_bert_cls(), tmp_path)
