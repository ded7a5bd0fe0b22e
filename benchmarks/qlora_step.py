"""QLoRA's step time against LoRA's, with peftkit's NF4 decode and with torchao's own, interleaved in one process.

A Llama-style model shaped like SmolLM2-135M's blocks (hidden 576, intermediate 1536, 9 heads, 3 KV heads; 6 layers,
vocabulary 8000, random weights from a config: nothing downloaded), batch 4 × 64 tokens, LoRA r=16 alpha 32 on all
linear layers, AdamW, gradient checkpointing (transformers', reentrant) in every row as in benchmarks/qlora.py.
Rows: LoRA on the fp32 base; QLoRA NF4 (fp32 compute) decoding with peftkit's one-gather table (what quantize_base
installs); the same QLoRA model decoding with torchao 0.18's ``get_original_weight`` (swapped in for its turns).
The rows step in turn (LoRA, fast, torchao, LoRA, ...) so that a busy machine slows all alike; ratios are per turn,
median over turns. Writes benchmarks/results/qlora_step.json.

    PYTHONPATH=src python benchmarks/qlora_step.py [--turns 5] [--layers 6]
"""

# ruff: noqa: E402  (HF_HUB_OFFLINE must be set before transformers is imported)
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch


def torchao_dequantize(self: object) -> torch.Tensor:
    """torchao 0.18's NF4Tensor.get_original_weight, as it ships (two int64 code copies, two gathers)."""
    first, second = (self.quantized_data >> 4).to(torch.long), (self.quantized_data & 0b1111).to(torch.long)
    scalers = self.dequantize_scalers(self.quantized_scalers, self.quantization_factor, self.scaler_block_size)
    repeated = scalers.unsqueeze(-1).expand(scalers.size(0), self.block_size // 2).flatten()
    halves = [(self.nf4[codes] * repeated).unsqueeze(-1).transpose(0, 1) for codes in (first, second)]
    return torch.stack(halves, dim=-1).reshape(self.shape)


def build(args: argparse.Namespace, quantized: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    import peftkit

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8000, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg)
    if quantized:
        peftkit.quantize_base(model, "nf4")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    pm = peftkit.get_peft_model(model, peftkit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    pm.train()
    optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    torch.manual_seed(1)
    ids = torch.randint(0, 8000, (4, 64))

    def step() -> None:
        pm(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "qlora_step.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from peftkit import quantize

    lora, qlora = build(args, False), build(args, True)
    _, nf4 = quantize._torchao()
    fast = nf4.NF4Tensor.get_original_weight

    def with_decode(decode):
        def run() -> None:
            nf4.NF4Tensor.get_original_weight = decode
            try:
                qlora()
            finally:
                nf4.NF4Tensor.get_original_weight = fast
        return run

    rows = {"lora_fp32": lora, "qlora_nf4_peftkit_decode": with_decode(fast),
            "qlora_nf4_torchao_decode": with_decode(torchao_dequantize)}
    for run in rows.values():
        run()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in rows}
    for _ in range(args.turns):
        for name, run in rows.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    ratios = {name: statistics.median(a / b for a, b in zip(times[name], times["lora_fp32"], strict=True))
              for name in rows}
    for name in rows:
        print(f"{name:28s} step {statistics.median(times[name]):6.2f} s   × LoRA {ratios[name]:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "step_s": times,
                                    "vs_lora": ratios, "torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
