"""BitFit and HF PEFT's BEFT: only bias deltas train; merge adds them to the bias; files interoperate."""

from __future__ import annotations

import peft
import pytest
import torch
import torch.nn as nn
from conftest import TinyNet, tiny_bert_cls, tiny_llama
from test_peft_model import randomize

from peftkit import BeftConfig, BitFitConfig, PeftError, PeftModel, TargetModulesError, get_peft_model
from peftkit.methods.base import adapter_layers
from peftkit.methods.bitfit import BiasLayer


def test_output_equals_base_plus_delta_per_module_type() -> None:
    torch.manual_seed(0)
    cases = [(nn.Linear(6, 4), torch.randn(2, 3, 6)), (nn.LayerNorm(6), torch.randn(2, 3, 6)),
             (nn.Conv2d(2, 3, 3, padding=1), torch.randn(2, 2, 5, 5))]
    for base, x in cases:
        layer = BiasLayer(base)
        layer.update_layer("default", BitFitConfig(init_weights=False), "m")
        layer.set_adapter(["default"])
        delta = layer.beft_bias["default"].flatten()
        shape = (1, -1, 1, 1) if isinstance(base, nn.Conv2d) else (-1,)
        torch.testing.assert_close(layer(x), base(x) + delta.reshape(shape))
        assert (layer(x) - base(x)).abs().max() > 1e-2


def test_bert_all_biases_train_and_count_matches() -> None:
    model = tiny_bert_cls()
    expected_biases = sum(m.bias.numel() for n, m in model.named_modules()
                          if isinstance(getattr(m, "bias", None), torch.Tensor) and not n.startswith("classifier"))
    pm = get_peft_model(model, BitFitConfig(task_type="SEQ_CLS"))
    head = sum(p.numel() for p in tiny_bert_cls().classifier.parameters())
    assert pm.get_nb_trainable_parameters()[0] == expected_biases + head
    names = {n for n, _ in adapter_layers(pm.base_model.model)}
    assert "bert.encoder.layer.0.attention.output.LayerNorm" in names and "bert.pooler.dense" in names
    assert "classifier" not in names  # the head trains in full through modules_to_save
    ids = torch.randint(1, 128, (2, 6))
    torch.testing.assert_close(pm(ids).logits, tiny_bert_cls()(ids).logits, rtol=0, atol=0)  # fresh = base
    pm.train()
    loss = pm(ids, labels=torch.tensor([0, 2])).loss
    loss.backward()
    with_grad = {n for n, p in pm.named_parameters() if p.grad is not None}
    assert with_grad and all(".beft_bias." in n or "classifier.modules_to_save" in n for n in with_grad)


def test_merge_unmerge_exact_and_switching(tmp_path) -> None:
    ids = torch.randint(1, 128, (2, 6))
    pm = get_peft_model(tiny_bert_cls(), BitFitConfig())
    pm.add_adapter("other", BitFitConfig(target_modules=["dense"]))
    randomize(pm, "default")
    randomize(pm, "other")
    out = pm(ids).logits
    pm.set_adapter("other")
    out_other = pm(ids).logits
    assert (out - out_other).abs().max() > 1e-3
    pm.set_adapter("default")
    bias0 = pm.base_model.model.bert.pooler.dense.base_layer.bias.detach().clone()
    pm.merge_adapter()
    torch.testing.assert_close(pm(ids).logits, out, rtol=1e-5, atol=1e-5)
    pm.unmerge_adapter()
    torch.testing.assert_close(pm.base_model.model.bert.pooler.dense.base_layer.bias, bias0, rtol=0, atol=1e-6)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert_cls(), tmp_path)
    loaded.load_adapter(tmp_path / "other", "other")
    assert torch.equal(loaded(ids).logits, out)
    loaded.set_adapter("other")
    assert torch.equal(loaded(ids).logits, out_other)
    merged = loaded.merge_and_unload()
    assert not list(adapter_layers(merged))
    torch.testing.assert_close(merged(ids).logits, out_other, rtol=1e-5, atol=1e-5)


def test_llama_has_no_biases_unless_asked(ids) -> None:
    with pytest.raises(TargetModulesError, match="add_missing_biases=True"):
        get_peft_model(tiny_llama(), BitFitConfig())
    pm = get_peft_model(tiny_llama(), BitFitConfig(add_missing_biases=True))
    names = {n.rsplit(".", 1)[-1] for n, _ in adapter_layers(pm.base_model.model)}
    assert {"q_proj", "down_proj", "input_layernorm", "norm"} <= names and "lm_head" not in names
    randomize(pm)
    out = pm.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (2, 10)
    before = pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    with pytest.raises(PeftError, match="no bias to merge into.*nothing was changed"):
        pm.merge_and_unload()
    assert not any(layer.merged for _, layer in adapter_layers(pm))
    assert torch.equal(pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, before)


def test_users_model_and_per_row() -> None:
    torch.manual_seed(0)
    pm = get_peft_model(TinyNet().eval(), BitFitConfig())
    pm.add_adapter("b", BitFitConfig())
    randomize(pm, "default")
    randomize(pm, "b")
    ids = torch.randint(0, 20, (3, 5))
    mixed = pm(ids, adapter_names=["b", "__base__", "default"])
    pm.set_adapter("b")
    torch.testing.assert_close(mixed[0], pm(ids[:1])[0])
    pm.set_adapter("default")
    torch.testing.assert_close(mixed[2], pm(ids[2:])[0])
    with pm.disable_adapter():
        torch.testing.assert_close(mixed[1], pm(ids[1:2])[0])


@pytest.mark.parametrize("direction", ["peftkit->hf", "hf->peftkit"])
@pytest.mark.parametrize("make, kwargs", [
    (tiny_bert_cls, {"task_type": "SEQ_CLS"}),
    (tiny_llama, {"target_modules": ["v_proj", "o_proj"]}),
])
def test_beft_files_interoperate(tmp_path, direction, make, kwargs) -> None:
    ids = torch.randint(1, 128, (2, 6))
    if direction == "peftkit->hf":
        src = get_peft_model(make(), BeftConfig(**kwargs))
    else:
        src = peft.get_peft_model(make(), peft.BeftConfig(**kwargs))
    with torch.no_grad():  # every trainable tensor (bias deltas, the head copy) made non-trivial
        for p in src.parameters():
            if p.requires_grad:
                p.normal_(std=2.0)
    src.eval()
    out = src(ids).logits
    assert (out - make()(ids).logits).abs().max() > 1e-2
    src.save_pretrained(tmp_path)
    loader = peft.PeftModel if direction == "peftkit->hf" else PeftModel
    loaded = loader.from_pretrained(make(), tmp_path).eval()
    torch.testing.assert_close(loaded(ids).logits, out, rtol=0, atol=1e-5)


def test_beft_default_targets_and_linear_only() -> None:
    pm = get_peft_model(tiny_llama(), BeftConfig())
    assert {n.rsplit(".", 1)[-1] for n, _ in adapter_layers(pm)} == {"v_proj"}
    with pytest.raises(TargetModulesError, match="LlamaRMSNorm.*supported: Linear"):
        get_peft_model(tiny_llama(), BeftConfig(target_modules=["input_layernorm"]))
