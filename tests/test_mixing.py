"""Adapters of different methods on one model, even on the same modules: they nest, switch and save apart."""

from __future__ import annotations

import torch
from conftest import tiny_llama
from safetensors.torch import load_file
from test_peft_model import randomize

from peftkit import BitFitConfig, IA3Config, LoraConfig, PeftModel, get_peft_model
from peftkit.methods.base import adapter_layers


def _mixed():
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), adapter_name="lora")
    pm.add_adapter("ia3", IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    pm.add_adapter("bias", BitFitConfig(target_modules=["q_proj"], add_missing_biases=True))
    for name in ("lora", "ia3", "bias"):
        randomize(pm, name)
    return pm.eval()


def test_each_adapter_alone_equals_a_model_with_only_that_adapter(tmp_path, ids) -> None:
    pm = _mixed()
    v_proj = pm.base_model.model.model.layers[0].self_attn.v_proj
    assert type(v_proj).__name__ == "IA3Layer" and type(v_proj.base_layer).__name__ == "LoraLinear"
    outs = {}
    for name in ("lora", "ia3", "bias"):
        pm.set_adapter(name)
        outs[name] = pm(ids).logits
    assert (outs["lora"] - outs["ia3"]).abs().max() > 1e-2 and (outs["ia3"] - outs["bias"]).abs().max() > 1e-2
    pm.save_pretrained(tmp_path, selected_adapters=["lora", "ia3", "bias"])
    keys = set(load_file(tmp_path / "lora" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight" in keys  # no nested base_layer hop
    for name in ("lora", "ia3", "bias"):
        alone = PeftModel.from_pretrained(tiny_llama(), tmp_path / name)
        torch.testing.assert_close(alone(ids).logits, outs[name], rtol=1e-5, atol=1e-6)


def test_switching_per_row_merging_and_unloading_across_methods(ids) -> None:
    ref = tiny_llama()(ids).logits
    pm = _mixed()
    singles = {}
    for name in ("lora", "ia3", "bias"):
        pm.set_adapter(name)
        singles[name] = pm(ids).logits
    mixed = pm(torch.cat([ids, ids[:1]]), adapter_names=["ia3", "lora", "__base__"]).logits
    torch.testing.assert_close(mixed[0], singles["ia3"][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mixed[1], singles["lora"][1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mixed[2], ref[0], rtol=1e-4, atol=1e-5)
    pm.set_adapter("ia3")
    pm.merge_adapter()
    torch.testing.assert_close(pm(ids).logits, singles["ia3"], rtol=1e-4, atol=1e-5)
    pm.unmerge_adapter()
    pm.delete_adapter("ia3")
    assert type(pm.base_model.model.model.layers[0].self_attn.v_proj).__name__ == "LoraLinear"
    pm.set_adapter("lora")
    torch.testing.assert_close(pm(ids).logits, singles["lora"], rtol=1e-5, atol=1e-6)
    model = pm.unload()
    assert not list(adapter_layers(model))
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-6)
