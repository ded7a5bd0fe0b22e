"""LoRA+: the same parameter groups and learning rates as HF PEFT 0.21's create_loraplus_optimizer."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import tiny_bert_cls, tiny_gpt2
from peft.optimizers import create_loraplus_optimizer as hf_create

from peftkit import BitFitConfig, LoraConfig, PeftConfigError, get_peft_model
from peftkit.optim import create_loraplus_optimizer


def _groups(model, optimizer) -> dict[str, tuple[float, float]]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {name_of[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize("make, kwargs", [
    (tiny_gpt2, {"target_modules": ["c_attn", "c_fc", "wte"], "bias": "all"}),
    (tiny_bert_cls, {"target_modules": ["query", "value"], "task_type": "SEQ_CLS", "bias": "lora_only"}),
])
def test_groups_and_rates_match_hf(make, kwargs) -> None:
    ours = get_peft_model(make(), LoraConfig(r=4, **kwargs))
    theirs = peft.get_peft_model(make(), peft.LoraConfig(r=4, **kwargs))
    extra = {"loraplus_weight_decay": 0.01, "loraplus_lr_embedding": 1e-5}
    opt_ours = create_loraplus_optimizer(ours, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=16, **extra)
    opt_theirs = hf_create(theirs, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=16, **extra)
    groups = _groups(ours, opt_ours)
    assert groups == _groups(theirs, opt_theirs)
    b_rates = {lr for n, (lr, _) in groups.items() if "lora_B" in n}
    a_rates = {lr for n, (lr, _) in groups.items() if "lora_A" in n}
    assert a_rates == {2e-4} and b_rates == {2e-4 * 16}


def test_other_methods_and_bad_ratio() -> None:
    pm = get_peft_model(tiny_bert_cls(), BitFitConfig(task_type="SEQ_CLS"))
    opt = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=4)
    groups = _groups(pm, opt)
    # BEFT's vectors are stored (1, d) as in HF PEFT, so HF's rule puts them with A; the 1-D head bias goes to B
    assert {lr for n, (lr, _) in groups.items() if "beft_bias" in n} == {1e-3}
    assert groups["base_model.model.classifier.modules_to_save.default.bias"] == (4e-3, 0.0)
    for bad in (0, -1.0):
        with pytest.raises(PeftConfigError, match="loraplus_lr_ratio must be > 0"):
            create_loraplus_optimizer(pm, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=bad)
