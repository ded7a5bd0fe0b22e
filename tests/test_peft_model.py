"""PeftModel: named adapters, switching, disabling, saving and loading, heads, targeting, forwarding."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import TinyNet, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_t5
from safetensors.torch import load_file

from peftkit import (
    LoraConfig,
    NoTrainableParametersError,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peftkit.methods.base import adapter_layers


def randomize(model, adapter_name: str = "default", scale: float = 0.3) -> None:
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for p in layer.adapter_parameters(adapter_name):
                p.copy_(torch.randn_like(p) * scale)


def test_switching_and_disabling_give_expected_outputs(ids) -> None:
    base_out = tiny_llama()(ids).logits
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize(pm, "default")
    pm.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    randomize(pm, "other")
    assert pm.active_adapter == "default"
    out_default = pm(ids).logits
    pm.set_adapter("other")
    out_other = pm(ids).logits
    assert (out_default - out_other).abs().max() > 1e-2 and (out_default - base_out).abs().max() > 1e-2
    # "other" alone equals a model that only ever had "other"
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert q.active_adapters == ["other"]
    with pm.disable_adapter():
        torch.testing.assert_close(pm(ids).logits, base_out, rtol=0, atol=1e-6)
    torch.testing.assert_close(pm(ids).logits, out_other)
    pm.set_adapter("default")
    torch.testing.assert_close(pm(ids).logits, out_default)
    # only the active adapter trains
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    pm.delete_adapter("default")
    assert pm.active_adapter == "other" and list(pm.peft_config) == ["other"]
    torch.testing.assert_close(pm(ids).logits, out_other)


def test_two_active_adapters_sum(ids) -> None:
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    pm.add_adapter("b", LoraConfig(r=4, target_modules=["q_proj"]))
    randomize(pm, "default")
    randomize(pm, "b")
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32)
    pm.set_adapter(["default", "b"])
    expected = layer.base_layer(x) + x @ (layer.delta_weight("default") + layer.delta_weight("b")).T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_save_load_identical_outputs_and_layout(tmp_path, ids) -> None:
    pm = get_peft_model(tiny_gpt2(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "wte"]))
    randomize(pm)
    pm.add_adapter("second", LoraConfig(r=2, target_modules=["c_proj"]))
    randomize(pm, "second")
    out = pm(ids).logits
    pm.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors", "second"]
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in keys
    assert "base_model.model.transformer.wte.lora_embedding_A" in keys
    assert len(keys) == 2 * (2 + 2) + 2
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["inference_mode"] is True and cfg["r"] == 4
    loaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    assert torch.equal(loaded(ids).logits, out)
    loaded.load_adapter(tmp_path / "second", "second")
    loaded.set_adapter("second")
    pm.set_adapter("second")
    assert torch.equal(loaded(ids).logits, pm(ids).logits)
    # selected_adapters writes only those
    pm.save_pretrained(tmp_path / "only", selected_adapters=["second"])
    assert os.listdir(tmp_path / "only") == ["second"]


def test_loaded_without_is_trainable_refuses_to_train(tmp_path, ids) -> None:
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert frozen.get_nb_trainable_parameters()[0] == 0 and not frozen.training
    frozen.train()
    with pytest.raises(NoTrainableParametersError, match="is_trainable=True"):
        frozen(ids, labels=ids)
    with torch.no_grad():
        frozen(ids)  # inference is fine
    trainable = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == 2 * 4 * (32 + 32)


def test_seq_cls_head_is_saved_and_restored(tmp_path) -> None:
    ids = torch.randint(1, 128, (2, 6))
    pm = get_peft_model(tiny_bert_cls(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    assert pm.peft_config["default"].modules_to_save == ["classifier", "score"]
    assert type(pm).__name__ == "PeftModelForSequenceClassification"
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert "base_model.model.classifier.modules_to_save.default.weight" in trainable
    assert not any("original_module" in n for n in trainable)
    randomize(pm)
    with torch.no_grad():
        pm.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    out = pm(ids).logits
    pm.save_pretrained(tmp_path)
    assert "base_model.model.classifier.weight" in load_file(tmp_path / "adapter_model.safetensors")
    fresh = tiny_bert_cls()
    torch.nn.init.normal_(fresh.classifier.weight)  # a different random head: the saved one must replace it
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert torch.equal(loaded(ids).logits, out)
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(merged(ids).logits, out, rtol=1e-5, atol=1e-5)


def test_targeting_rules() -> None:
    model = tiny_llama()
    pm = get_peft_model(model, LoraConfig(target_modules="all-linear"))
    names = {n for n, _ in adapter_layers(pm.base_model.model)}
    assert "lm_head" not in names and len(names) == 2 * 7
    pm = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "k_proj"], layers_to_transform=[1]))
    assert {n for n, _ in adapter_layers(pm)} == {
        "base_model.model.model.layers.1.self_attn.q_proj", "base_model.model.model.layers.1.self_attn.k_proj"}
    pm = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], layers_to_transform=0,
                                                 layers_pattern="layers"))
    assert [n for n, _ in adapter_layers(pm)] == ["base_model.model.model.layers.0.self_attn.q_proj"]
    pm = get_peft_model(tiny_llama(), LoraConfig(target_modules=r".*\.mlp\.(up|down)_proj"))
    assert len(list(adapter_layers(pm))) == 4
    pm = get_peft_model(tiny_llama(), LoraConfig(target_modules="all-linear", exclude_modules=["o_proj", "mlp.up_proj"]))
    assert not any(n.endswith(("o_proj", "up_proj")) for n, _ in adapter_layers(pm))
    assert len(list(adapter_layers(pm))) == 2 * 5


def test_users_own_model_with_mixed_layers(tmp_path) -> None:
    torch.manual_seed(0)
    model = TinyNet().eval()
    ids = torch.randint(0, 20, (3, 5))
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=["emb", "conv", "fc"], modules_to_save=["head"]))
    randomize(pm)
    out = pm(ids)
    pm.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(TinyNet().eval(), tmp_path)
    assert torch.equal(loaded(ids), out)
    merged = loaded.merge_and_unload()
    assert isinstance(merged.blocks[0]["fc"], torch.nn.Linear)
    torch.testing.assert_close(merged(ids), out, rtol=1e-5, atol=1e-5)


def test_unload_gives_back_original_weights(ids) -> None:
    ref = tiny_llama()(ids).logits
    pm = get_peft_model(tiny_llama(), LoraConfig(target_modules="all-linear"))
    randomize(pm)
    pm.merge_adapter()
    model = pm.unload()
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
    assert not list(adapter_layers(model))


def test_forwarding_attributes_and_generate(ids) -> None:
    model = tiny_llama()
    pm = get_peft_model(model, LoraConfig(target_modules=["q_proj"]))
    assert pm.config is model.config and pm.model is model
    assert pm.get_input_embeddings() is model.get_input_embeddings()
    randomize(pm)
    out = pm.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 11)
    with pm.disable_adapter():
        base = pm.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(base, tiny_llama().generate(ids, max_new_tokens=4, do_sample=False))


def test_gradient_checkpointing_with_frozen_base(ids) -> None:
    grads = []
    for checkpointing in (False, True):
        pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        torch.manual_seed(5)
        randomize(pm)
        if checkpointing:
            pm.gradient_checkpointing_enable()
            assert pm.base_model.model.model.gradient_checkpointing or any(
                getattr(m, "gradient_checkpointing", False) for m in pm.modules())
        pm.train()
        pm(ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in pm.parameters() if p.requires_grad]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_inject_and_state_dict_functions(ids) -> None:
    model = inject_adapter_in_model(LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), tiny_llama())
    sd = get_peft_model_state_dict(model)
    assert set(sd) == {f"model.layers.{i}.self_attn.q_proj.lora_{ab}.weight" for i in (0, 1) for ab in "AB"}
    out = model(ids).logits
    other = inject_adapter_in_model(LoraConfig(r=4, target_modules=["q_proj"]), tiny_llama())
    assert not torch.allclose(other(ids).logits, out)
    result = set_peft_model_state_dict(other, sd)
    assert result.missing_keys == [] and result.unexpected_keys == []
    torch.testing.assert_close(other(ids).logits, out, rtol=0, atol=0)
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    full = {k: v.clone() + 1 for k, v in pm.state_dict().items()}
    from_full = get_peft_model_state_dict(pm, state_dict=full)
    assert all(k.startswith("base_model.model.") for k in from_full)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    torch.testing.assert_close(from_full[key], full["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"])


def test_t5_reads_weight_through_the_adapter_layer() -> None:
    model = tiny_t5()
    ids = torch.randint(1, 64, (2, 5))
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=["wo", "q"], init_lora_weights=False))
    assert pm.base_model.model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    out = pm(input_ids=ids, decoder_input_ids=ids).logits
    assert torch.isfinite(out).all()


def test_unload_restores_original_heads_merge_and_unload_keeps_trained(ids) -> None:
    ids = torch.randint(1, 128, (2, 6))
    ref = tiny_bert_cls()(ids).logits
    for unload in (True, False):
        pm = get_peft_model(tiny_bert_cls(), LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
        with torch.no_grad():
            pm.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
        trained = pm(ids).logits
        model = pm.unload() if unload else pm.merge_and_unload()
        torch.testing.assert_close(model(ids).logits, ref if unload else trained, rtol=1e-5, atol=1e-5)


def test_trainable_parameters_by_kind() -> None:
    from peftkit import BottleneckConfig

    pm = get_peft_model(tiny_bert_cls(), BottleneckConfig(placement="houlsby", task_type="SEQ_CLS"))
    kinds = pm.trainable_parameters_by_kind()
    d, m, layers = 32, 2, 2
    assert kinds["adapter"] == layers * 2 * (2 * d * m + d + m)
    assert kinds["heads"] == 32 * 3 + 3
    assert kinds["norms"] == (1 + layers * 2) * 2 * d  # embeddings + two per layer, weight and bias
    assert sum(kinds.values()) == pm.get_nb_trainable_parameters()[0]
    pm = get_peft_model(tiny_bert_cls(), LoraConfig(r=2, target_modules=["query"], bias="lora_only"))
    assert pm.trainable_parameters_by_kind() == {"adapter": 2 * 2 * 64, "heads": 0, "norms": 0, "biases": 2 * 32}


def test_forward_shows_the_models_signature_and_copies_cleanly(ids) -> None:
    import copy
    import inspect

    pm = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    assert "input_ids" in inspect.signature(pm.forward).parameters  # what transformers' Trainer inspects
    clone = copy.deepcopy(pm)
    with torch.no_grad():
        clone.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.add_(1.0)
    assert not torch.allclose(clone(ids).logits, pm(ids).logits)  # the copy runs its own weights
