"""peftkit models inside transformers' Trainer: adapter-only checkpoints and exact resume."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file

from peftkit import LoraConfig, get_peft_model
from peftkit.integrations.transformers import STATE_NAME, adapter_checkpoints


def _data(n: int = 16):
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(1, 128, (12,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return rows


def _trainer(out, max_steps: int, patched: bool = True):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=max_steps,
                             learning_rate=1e-2, save_strategy="steps", save_steps=2, report_to=[], use_cpu=True,
                             logging_strategy="no", seed=0, data_seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=_data())
    return adapter_checkpoints(trainer) if patched else trainer


def test_checkpoints_hold_only_the_adapter(tmp_path):
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.train()
    ckpt = tmp_path / "checkpoint-2"
    files = set(os.listdir(ckpt))
    assert {"adapter_config.json", "adapter_model.safetensors", STATE_NAME} <= files
    assert not {"model.safetensors", "pytorch_model.bin"} & files
    weights = load_file(ckpt / "adapter_model.safetensors")
    assert sum(t.numel() for t in weights.values()) == 2 * (4 * 32 + 32 * 4) + 2 * (4 * 32 + 16 * 4)
    # the unpatched Trainer would have written the whole model into the checkpoint
    plain = _trainer(tmp_path / "plain", max_steps=2, patched=False)
    plain.train()
    assert "model.safetensors" in os.listdir(tmp_path / "plain" / "checkpoint-2")


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    full = _trainer(tmp_path / "full", max_steps=4)
    full.train()
    # a fresh process-like start (new model, new Trainer) from the run's step-2 checkpoint
    resumed = _trainer(tmp_path / "resumed", max_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    a = {n: p for n, p in full.model.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.model.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys()
    moved = 0
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=1e-5)
        moved += int(not torch.equal(a[n], _trainer(tmp_path / "x", 1).model.get_parameter(n)))
    assert moved > 0


def test_resume_refuses_a_folder_without_an_adapter(tmp_path):
    trainer = _trainer(tmp_path, max_steps=2)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="holds no peftkit adapter"):
        trainer._load_from_checkpoint(str(tmp_path / "empty"))
