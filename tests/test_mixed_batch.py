"""Several adapters in one batch: each row through its own adapter equals running that adapter alone."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert_cls, tiny_gpt2, tiny_llama
from test_peft_model import randomize

from peftkit import AdapterNameError, LoraConfig, PeftError, get_peft_model


def _three_adapters(make, **cfg):
    pm = get_peft_model(make(), LoraConfig(r=4, init_lora_weights=False, **cfg))
    pm.add_adapter("b", LoraConfig(r=2, init_lora_weights=False, **cfg))
    pm.add_adapter("c", LoraConfig(r=8, lora_alpha=3, init_lora_weights=False, **cfg))
    for name in ("default", "b", "c"):
        randomize(pm, name)
    return pm.eval()


@pytest.mark.parametrize("make, targets", [
    (tiny_llama, "all-linear"),
    (tiny_gpt2, ["c_attn", "c_proj", "c_fc", "wte"]),
    (tiny_llama, ["q_proj", "embed_tokens"]),
])
def test_rows_equal_single_adapter_runs(make, targets) -> None:
    pm = _three_adapters(make, target_modules=targets)
    torch.manual_seed(0)
    ids = torch.randint(1, 128, (5, 6))
    names = ["b", "__base__", "default", "c", "b"]
    mixed = pm(ids, adapter_names=names).logits
    for row, name in enumerate(names):
        if name == "__base__":
            with pm.disable_adapter():
                expected = pm(ids[row:row + 1]).logits
        else:
            pm.set_adapter(name)
            expected = pm(ids[row:row + 1]).logits
        torch.testing.assert_close(mixed[row:row + 1], expected, rtol=1e-4, atol=1e-5)
    assert (mixed[0] - mixed[1]).abs().max() > 1e-2  # the adapters really differ


def test_per_row_heads_for_sequence_classification() -> None:
    pm = _three_adapters(tiny_bert_cls, target_modules=["query", "value"], task_type="SEQ_CLS")
    with torch.no_grad():
        for name in ("default", "b", "c"):
            pm.base_model.model.classifier.modules_to_save[name].weight.normal_()
    ids = torch.randint(1, 128, (3, 6))
    names = ["c", "default", "b"]
    mixed = pm(ids, adapter_names=names).logits
    for row, name in enumerate(names):
        pm.set_adapter(name)
        torch.testing.assert_close(mixed[row], pm(ids[row:row + 1]).logits[0], rtol=1e-4, atol=1e-5)


def test_generate_with_adapter_names() -> None:
    pm = _three_adapters(tiny_llama, target_modules=["q_proj", "v_proj"])
    ids = torch.randint(1, 128, (2, 5))
    out = pm.generate(ids, adapter_names=["b", "c"], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    for row, name in enumerate(["b", "c"]):
        pm.set_adapter(name)
        alone = pm.generate(ids[row:row + 1], max_new_tokens=5, min_new_tokens=5, do_sample=False)
        assert torch.equal(out[row:row + 1], alone)


def test_adapter_names_errors() -> None:
    pm = _three_adapters(tiny_llama, target_modules=["q_proj"])
    ids = torch.randint(1, 128, (2, 5))
    with pytest.raises(AdapterNameError, match=r"unknown adapter\(s\) \['x'\]"):
        pm(ids, adapter_names=["x", "b"])
    with pytest.raises(PeftError, match="3 entries but the batch has 2 rows"):
        pm(ids, adapter_names=["b", "c", "b"])
    pm.merge_adapter()
    with pytest.raises(PeftError, match="unmerge_adapter"):
        pm(ids, adapter_names=["b", "c"])
