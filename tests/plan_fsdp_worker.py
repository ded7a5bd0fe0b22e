"""Run by tests/test_plan.py under torchrun (2 gloo processes): peftkit.plan.measure_sharded_step for each case
("fsdp:lora", "ddp:full", ...) on one Llama config (given as JSON values); the main process writes every process's
numbers, by case, as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import LlamaConfig

from peftkit import plan as P


def main(out: Path, cases: list[str], values: dict, batch: int, seq: int) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    report: dict[str, list] = {}
    for case in cases:
        strategy, method = case.split(":")
        mine = P.measure_sharded_step(LlamaConfig(**values), method, batch=batch, seq=seq, dtype="fp32",
                                      strategy=strategy)
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        report[case] = every
    if dist.get_rank() == 0:
        out.write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2].split(","), json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
