"""Prompt tuning, P-tuning and prefix tuning against the real HF ``peft`` 0.21: files written by one library load
in the other with equal logits and equal greedy generations, the configs carry the same sizes, and the
trainable-parameter counts agree. Base weights are equal in both libraries because every tiny model is built
from a fixed seed; every adapter is perturbed so that it clearly moves the output."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from conftest import tiny_bert_cls, tiny_gpt2, tiny_llama
from safetensors.torch import load_file
from test_prompts import tiny_qwen2

import peftkit

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

ATOL = 1e-5
MARGIN = 1e-2


MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2, "bert": tiny_bert_cls}
TASK = {"llama": "CAUSAL_LM", "qwen2": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}
METHODS = {  # (HF PEFT config class, peftkit config class, keyword arguments both take)
    "prompt": (peft.PromptTuningConfig, peftkit.PromptTuningConfig, {"num_virtual_tokens": 4}),
    "ptuning": (peft.PromptEncoderConfig, peftkit.PromptEncoderConfig, {"num_virtual_tokens": 4, "encoder_hidden_size": 16}),
    "ptuning_lstm": (peft.PromptEncoderConfig, peftkit.PromptEncoderConfig,
                     {"num_virtual_tokens": 4, "encoder_hidden_size": 8, "encoder_reparameterization_type": "LSTM"}),
    "prefix": (peft.PrefixTuningConfig, peftkit.PrefixTuningConfig, {"num_virtual_tokens": 4}),
    "prefix_proj": (peft.PrefixTuningConfig, peftkit.PrefixTuningConfig,
                    {"num_virtual_tokens": 4, "prefix_projection": True, "encoder_hidden_size": 8}),
}
# HF PEFT refuses prefix tuning on BERT classifiers (peftkit's own tests cover it)
CASES = [(m, k) for m in MODELS for k in METHODS if not (m == "bert" and k.startswith("prefix"))]


def perturb(model: torch.nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.7)


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(11)
    ids = torch.randint(1, 128, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    return ids, mask


def hf_greedy(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding over HF PEFT's forward, stopping rows at EOS as generate() does (then padding with EOS)."""
    eos = model.base_model.generation_config.eos_token_id
    eos = -1 if eos is None else eos  # no EOS: never stops
    seq, done = ids, torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(steps):
        step = model(input_ids=seq).logits[:, -1].argmax(-1)
        step = torch.where(done, eos, step)
        done |= step == eos
        seq = torch.cat([seq, step.unsqueeze(1)], dim=1)
    return seq


def check_outputs(hf_model, kit_model, model_name: str) -> None:
    ids, mask = inputs()
    with torch.no_grad():
        hf_out = hf_model(input_ids=ids, attention_mask=mask).logits
        kit_out = kit_model(input_ids=ids, attention_mask=mask).logits
        base = MODELS[model_name]()(input_ids=ids, attention_mask=mask).logits
        moved = kit_out[:, -base.shape[1]:] if kit_out.dim() == 3 else kit_out
        assert (moved - base).abs().max() > MARGIN
        assert hf_out.shape == kit_out.shape
        torch.testing.assert_close(kit_out, hf_out, atol=ATOL, rtol=1e-4)
        if TASK[model_name] == "CAUSAL_LM":
            kit_gen = kit_model.generate(input_ids=ids[1:], max_new_tokens=5, do_sample=False)
            assert torch.equal(kit_gen, hf_greedy(hf_model, ids[1:], 5))


@pytest.mark.parametrize(("model_name", "method"), CASES)
def test_hf_file_loads_in_peftkit(tmp_path, model_name, method):
    hf_cls, _, kw = METHODS[method]
    hf_model = peft.get_peft_model(MODELS[model_name](), hf_cls(task_type=TASK[model_name], **kw))
    perturb(hf_model, 1)
    hf_model.eval().save_pretrained(tmp_path)
    kit_model = peftkit.PeftModel.from_pretrained(MODELS[model_name](), tmp_path)
    check_outputs(hf_model, kit_model, model_name)


@pytest.mark.parametrize(("model_name", "method"), CASES)
def test_peftkit_file_loads_in_hf(tmp_path, model_name, method):
    _, kit_cls, kw = METHODS[method]
    kit_model = peftkit.get_peft_model(MODELS[model_name](), kit_cls(task_type=TASK[model_name], **kw))
    perturb(kit_model, 2)
    kit_model.eval().save_pretrained(tmp_path)
    hf_model = peft.PeftModel.from_pretrained(MODELS[model_name](), tmp_path).eval()
    check_outputs(hf_model, kit_model, model_name)


@pytest.mark.parametrize(("model_name", "method"), CASES)
def test_same_file_layout_config_sizes_and_parameter_counts(tmp_path, model_name, method):
    hf_cls, kit_cls, kw = METHODS[method]
    hf_model = peft.get_peft_model(MODELS[model_name](), hf_cls(task_type=TASK[model_name], **kw))
    kit_model = peftkit.get_peft_model(MODELS[model_name](), kit_cls(task_type=TASK[model_name], **kw))
    assert kit_model.get_nb_trainable_parameters() == hf_model.get_nb_trainable_parameters()
    hf_model.save_pretrained(tmp_path / "hf")
    kit_model.save_pretrained(tmp_path / "kit")
    hf_file, kit_file = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("hf", "kit"))
    assert {k: v.shape for k, v in kit_file.items()} == {k: v.shape for k, v in hf_file.items()}
    hf_json, kit_json = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("hf", "kit"))
    sizes = ["num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers", "num_transformer_submodules",
             "encoder_hidden_size", "peft_type", "task_type", "inference_mode"]
    assert {k: kit_json.get(k) for k in sizes} == {k: hf_json.get(k) for k in sizes}
