"""Every documented bad input raises a one-line error that names the problem and the fix,
and leaves the model (and files) untouched."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file

from peftkit import (
    AdapterFileError,
    AdapterNameError,
    LoraConfig,
    PeftConfig,
    PeftConfigError,
    PeftModel,
    TargetModulesError,
    get_peft_model,
)
from peftkit.methods.base import adapter_layers


def _module_ids(model: torch.nn.Module) -> list[tuple[str, int]]:
    return [(n, id(m)) for n, m in model.named_modules()]


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_no_target_matched_lists_candidates() -> None:
    model = tiny_llama()
    before = _module_ids(model)
    with pytest.raises(TargetModulesError) as exc:
        get_peft_model(model, LoraConfig(target_modules=["query", "value"]))
    msg = _one_line(exc)
    assert "no module matched target_modules=['query', 'value']" in msg
    assert "q_proj" in msg and "down_proj" in msg
    assert _module_ids(model) == before


def test_unsupported_target_type_names_it_and_leaves_model_untouched() -> None:
    model = tiny_llama()
    before = _module_ids(model)
    with pytest.raises(TargetModulesError) as exc:
        get_peft_model(model, LoraConfig(target_modules=["q_proj", "input_layernorm"]))
    msg = _one_line(exc)
    assert "LlamaRMSNorm" in msg and "input_layernorm" in msg and "supported:" in msg
    assert _module_ids(model) == before  # q_proj was checked first but not replaced


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_rank_must_be_positive(bad) -> None:
    with pytest.raises(PeftConfigError, match="r must be (a positive integer|an integer)"):
        LoraConfig(r=bad, target_modules=["q_proj"])
    with pytest.raises(PeftConfigError, match=r"rank_pattern\['q'\] must be (a positive integer|an integer)"):
        LoraConfig(r=4, rank_pattern={"q": bad})


def test_unknown_and_duplicate_adapter_names() -> None:
    pm = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(AdapterNameError) as exc:
        pm.set_adapter("nope")
    assert "no adapter named 'nope'" in _one_line(exc) and "default" in str(exc.value)
    with pytest.raises(AdapterNameError):
        pm.delete_adapter("nope")
    before = _module_ids(pm)
    with pytest.raises(AdapterNameError, match="already exists"):
        pm.add_adapter("default", LoraConfig(target_modules=["k_proj"]))
    assert _module_ids(pm) == before


def _saved(tmp_path, **cfg) -> str:
    pm = get_peft_model(tiny_llama(), LoraConfig(**{"r": 4, "target_modules": ["q_proj"], **cfg}))
    pm.save_pretrained(tmp_path)
    return str(tmp_path)


def test_adapter_for_another_model_names_key_and_shapes(tmp_path) -> None:
    folder = _saved(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    bigger = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2))
    before = _module_ids(bigger)
    with pytest.raises(AdapterFileError) as exc:
        PeftModel.from_pretrained(bigger, folder)
    msg = _one_line(exc)
    assert "lora_A.weight" in msg and "(4, 32)" in msg and "(4, 64)" in msg
    assert _module_ids(bigger) == before and not list(adapter_layers(bigger))


def test_adapter_with_foreign_keys_is_refused(tmp_path) -> None:
    folder = _saved(tmp_path)
    sd = load_file(os.path.join(folder, "adapter_model.safetensors"))
    sd["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(sd, os.path.join(folder, "adapter_model.safetensors"))
    model = tiny_llama()
    with pytest.raises(AdapterFileError, match=r"layers\.9.*has no place in this model"):
        PeftModel.from_pretrained(model, folder)
    assert not list(adapter_layers(model))


def test_load_adapter_failure_removes_the_half_added_adapter(tmp_path, ids) -> None:
    folder = _saved(tmp_path)
    sd = load_file(os.path.join(folder, "adapter_model.safetensors"))
    del sd["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    save_file(sd, os.path.join(folder, "adapter_model.safetensors"))
    pm = get_peft_model(tiny_llama(), LoraConfig(target_modules=["k_proj"]))
    before = _module_ids(pm)
    with pytest.raises(AdapterFileError, match="lacks 1 tensor"):
        pm.load_adapter(folder, "other")
    assert list(pm.peft_config) == ["default"] and _module_ids(pm) == before


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage", "pickle_only"])
def test_missing_truncated_corrupt_file(tmp_path, damage) -> None:
    folder = _saved(tmp_path)
    path = os.path.join(folder, "adapter_model.safetensors")
    if damage == "missing":
        os.remove(path)
    elif damage == "truncated":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    elif damage == "garbage":
        open(path, "wb").write(b"\x00\x01not a safetensors file at all")
    else:
        os.remove(path)
        open(os.path.join(folder, "adapter_model.bin"), "wb").write(b"pickle")
    model = tiny_llama()
    before = _module_ids(model)
    with pytest.raises(AdapterFileError) as exc:
        PeftModel.from_pretrained(model, folder)
    msg = _one_line(exc)
    expected = {"missing": "no adapter_model.safetensors", "truncated": "truncated or corrupt",
                "garbage": "truncated or corrupt", "pickle_only": "safetensors only"}[damage]
    assert expected in msg
    assert _module_ids(model) == before


def test_unknown_peft_type_and_corrupt_config(tmp_path) -> None:
    folder = _saved(tmp_path)
    cfg_path = os.path.join(folder, "adapter_config.json")
    cfg = json.load(open(cfg_path))
    cfg["peft_type"] = "MAGIC"
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(PeftConfigError) as exc:
        PeftModel.from_pretrained(tiny_llama(), folder)
    assert "unknown peft_type 'MAGIC'" in _one_line(exc) and "LORA" in str(exc.value)
    open(cfg_path, "w").write('{"peft_type": "LORA", "r": ')
    with pytest.raises(PeftConfigError, match="not valid JSON"):
        PeftModel.from_pretrained(tiny_llama(), folder)
    with pytest.raises(AdapterFileError, match="does not exist"):
        PeftModel.from_pretrained(tiny_llama(), os.path.join(folder, "nowhere"))


def test_hf_config_keys_accepted_or_refused_by_name() -> None:
    hf = json.loads(json.dumps({
        "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
        "base_model_name_or_path": "x", "bias": "none", "corda_config": None, "ensure_weight_tying": False,
        "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
        "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 16, "lora_bias": False,
        "lora_dropout": 0.05, "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core",
        "modules_to_save": None, "monteclora_config": None, "peft_type": "LORA", "peft_version": "0.21.2",
        "qalora_group_size": 16, "r": 8, "rank_pattern": {}, "revision": None, "target_modules": ["q_proj"],
        "target_parameters": None, "task_type": "CAUSAL_LM", "trainable_token_indices": None,
        "use_bdlora": None, "use_dora": False, "use_qalora": False, "use_rslora": False, "velora_config": None,
    }))
    cfg = PeftConfig.from_dict(hf)
    assert isinstance(cfg, LoraConfig) and cfg.lora_alpha == 16 and cfg.task_type == "CAUSAL_LM"
    for key, value in [("lora_bias", True), ("layer_replication", [[0, 2]]),
                       ("trainable_token_indices", [1, 2]), ("use_qalora", True)]:
        with pytest.raises(PeftConfigError) as exc:
            PeftConfig.from_dict({**hf, key: value})
        assert f"{key}=" in _one_line(exc) and "does not implement" in str(exc.value)
    with pytest.raises(PeftConfigError, match="brand_new_option=3 \\(unknown key\\)"):
        PeftConfig.from_dict({**hf, "brand_new_option": 3})
    assert isinstance(PeftConfig.from_dict({**hf, "brand_new_flag": False}), LoraConfig)


def test_config_json_round_trip(tmp_path) -> None:
    cfg = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                     use_rslora=True, bias="lora_only", task_type="CAUSAL_LM", layers_to_transform=[0])
    cfg.save_pretrained(tmp_path)
    assert LoraConfig.from_pretrained(tmp_path) == cfg
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_save_never_leaves_a_half_written_adapter(tmp_path, monkeypatch, ids) -> None:
    pm = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    target = tmp_path / "adapter"
    pm.save_pretrained(target)
    good = (target / "adapter_model.safetensors").read_bytes()
    with torch.no_grad():
        pm.base_model.model.transformer.h[0].attn.c_attn.lora_B["default"].weight.add_(1)

    import peftkit.io as io

    def crash(tensors, path, metadata=None):
        open(path, "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        pm.save_pretrained(target)
    with pytest.raises(OSError):
        pm.save_pretrained(tmp_path / "new_adapter")
    assert (target / "adapter_model.safetensors").read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no temporary or half-written folder left


def test_modules_to_save_that_matches_nothing() -> None:
    model = tiny_llama()
    before = _module_ids(model)
    with pytest.raises(TargetModulesError) as exc:
        get_peft_model(model, LoraConfig(target_modules=["q_proj"], modules_to_save=["clasifier"]))
    assert "['clasifier']" in _one_line(exc) and "lm_head" in str(exc.value)
    assert _module_ids(model) == before
    with pytest.raises(TargetModulesError, match="classifier or score"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], task_type="SEQ_CLS"))


def test_a_file_of_one_method_read_as_another(tmp_path) -> None:
    from peftkit import IA3Config, VeraConfig

    folder = _saved(tmp_path)
    with pytest.raises(PeftConfigError) as exc:
        VeraConfig.from_pretrained(folder)
    assert "peft_type 'LORA', not 'VERA'" in _one_line(exc)
    with pytest.raises(PeftConfigError, match="not 'IA3'"):
        IA3Config.from_pretrained(folder)
