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


def test_trainer_honours_weight_decay_and_head_lr_with_loraplus(tmp_path) -> None:
    """``peftkit train`` with LoRA+: A at lr, B at 16·lr (both decayed), the head at head_lr with weight_decay;
    one step equals torch's AdamW run by hand with those groups, bit for bit (fused, as the trainer runs it on CPU)."""
    import tiny_run

    from peftkit.train import Runner, parse_spec

    tiny_run.model_folder(tmp_path, "bert")
    tiny_run.classification_data(tmp_path / "cls.jsonl", n=16)
    lr, head_lr, wd = 1e-2, 3e-3, 0.1
    spec = parse_spec({
        "model": {"name": str(tmp_path / "tiny-bert"), "max_length": 32, "pooling": "mean"},
        "method": {"name": "loraplus", "r": 4, "target_modules": ["query", "value"]},
        "data": {"train": str(tmp_path / "cls.jsonl")},
        "training": {"max_steps": 1, "batch_size": 8, "lr": lr, "head_lr": head_lr, "weight_decay": wd,
                     "output_dir": str(tmp_path / "out")}})
    runner = Runner(spec, quiet=True)
    named = [(n, p) for n, p in runner.model.named_parameters() if p.requires_grad]
    intended = {"A": (lr, wd), "B": (lr * 16, wd), "head": (head_lr, wd)}

    def group_of(name: str) -> str:
        return "head" if "modules_to_save" in name else "B" if "lora_B" in name else "A"

    assert {group_of(n) for n, _ in named} == set(intended)
    torch.manual_seed(0)
    grads = {n: torch.randn_like(p) for n, p in named}
    copies = {n: p.detach().clone().requires_grad_(True) for n, p in named}
    by_hand = torch.optim.AdamW([{"params": [copies[n] for n, _ in named if group_of(n) == g], "lr": rate,
                                  "weight_decay": decay} for g, (rate, decay) in intended.items()], fused=True)
    for n, p in named:
        p.grad, copies[n].grad = grads[n].clone(), grads[n].clone()
    runner.optimizer.step()
    by_hand.step()
    for n, p in named:
        assert torch.equal(p, copies[n]), n
