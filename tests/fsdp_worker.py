"""Run by tests/test_fsdp.py under torchrun (2 gloo processes): peftkit.distributed.shard in a user's own loop.

For each case it trains the same model twice from the same start, sharded across the processes (each takes
its half of every global batch) and unsharded on the main process alone (the whole batch), and saves both
final adapters with save_pretrained; it records every process's base-parameter bytes before and after
sharding. The test compares the files and the bytes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import tiny_llama

import peftkit
from peftkit import distributed as pd

STEPS, BATCH, LENGTH = 3, 4, 10


def config(name: str):
    lora = {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"], "lora_dropout": 0.0}
    return {
        "lora": lambda: peftkit.LoraConfig(**lora),
        "qlora": lambda: peftkit.LoraConfig(**lora),
        "lora_dropout_ac": lambda: peftkit.LoraConfig(**{**lora, "lora_dropout": 0.2}),
        "lora_dropout": lambda: peftkit.LoraConfig(**{**lora, "lora_dropout": 0.2}),
        "lora_bf16": lambda: peftkit.LoraConfig(**lora),
        "dora": lambda: peftkit.LoraConfig(**lora, use_dora=True),
        "rslora": lambda: peftkit.LoraConfig(**lora, use_rslora=True),
        "lora_fa": lambda: peftkit.LoraFAConfig(**lora),
        "vera": lambda: peftkit.VeraConfig(r=8, target_modules=["q_proj", "v_proj"]),
        "ia3": lambda: peftkit.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "houlsby": lambda: peftkit.BottleneckConfig(),
        "bitfit": lambda: peftkit.BitFitConfig(add_missing_biases=True),
        "prompt": lambda: peftkit.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
        "p_tuning": lambda: peftkit.PromptEncoderConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
        "prefix": lambda: peftkit.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    }[name]()


def build(name: str):
    base = tiny_llama(seed=0)
    if name == "qlora":
        peftkit.quantize_base(base, "nf4", block_size=16, scaler_block_size=16)
    torch.manual_seed(1)  # adapter initialisation (B made non-zero below, so every factor gets gradient)
    model = peftkit.get_peft_model(base, config(name))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and "lora_B" in n:
                p.normal_(0, 0.1)
    return model.train()


def loss_of(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, -ids.shape[1]:]  # prompt methods put virtual positions first
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def train(model, rows: slice, seed: int) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = torch.Generator().manual_seed(7)
    torch.manual_seed(seed)  # dropout masks
    for _ in range(STEPS):
        ids = torch.randint(5, 128, (BATCH, LENGTH), generator=data)
        loss_of(model, ids[rows]).backward()  # a per-process mean: gradient_reduction "mean" averages them
        opt.step()
        opt.zero_grad(set_to_none=True)


def main(out: Path, cases: list[str]) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    bytes_report: dict[str, list] = {}
    for name in cases:
        if rank == 0 and name not in ("lora_dropout_ac", "lora_dropout", "lora_bf16"):
            alone = build(name)
            train(alone, slice(None), seed=0)
            alone.save_pretrained(out / name / "alone")
        model = build(name)
        whole = pd.local_parameter_bytes(model, trainable=False)
        pd.shard(model, activation_checkpointing=name == "lora_dropout_ac",
                 mixed_precision="bf16" if name == "lora_bf16" else None)
        mine = pd.local_parameter_bytes(model, trainable=False)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (whole, mine))
        bytes_report[name] = gathered
        half = BATCH // world
        train(model, slice(rank * half, (rank + 1) * half), seed=100 + rank)
        pd.save_pretrained(model, out / name / "sharded")  # every process: gathered, rank 0 writes
    if rank == 0:
        (out / "bytes.json").write_text(json.dumps(bytes_report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2].split(","))
