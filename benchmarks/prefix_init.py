"""An untrained prefix's damage: perplexity of SmolLM2-135M-Instruct on general text with 20 virtual tokens of
prefix tuning, for each way to start it.

The probe is ``peftkit compare``'s forgetting probe (BBC News test articles, seed 1, the first 64 tokens of
each), so the "before training" end of the compare table's forgetting column can be read off here:
random N(0, 1) keys and values (HF PEFT's default, the old preset), HF PEFT's MLP reparametrisation at its
random init, zero keys and values, and Li & Liang's start from real words (``prefix_init_text``: the frozen
model's own keys and values for a text), plain and through the MLP (the new preset). Writes JSON.

    python benchmarks/prefix_init.py            # ~3 minutes on 2 idle CPU cores
    python benchmarks/prefix_init.py --only "from text"
"""

# ruff: noqa: E402  (HF_HUB_OFFLINE must be set before transformers is imported)
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import copy
import json
import math
from pathlib import Path

import torch

from peftkit import PrefixTuningConfig, get_peft_model
from peftkit.embedded import load_bbc_split, smollm2_gguf
from peftkit.train.methods import PREFIX_INIT_TEXT


def perplexity(model: torch.nn.Module, chunks: list[torch.Tensor]) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in chunks:
            total += float(model(input_ids=ids[None], labels=ids[None]).loss) * (len(ids) - 1)
            count += len(ids) - 1
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--articles", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--virtual", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/prefix_init.json")
    parser.add_argument("--only", default="", help="run only the starts whose label contains this text")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    texts = load_bbc_split(seed=1, test_frac=0.2).test_texts[: args.articles]
    chunks = [torch.tensor(tok(t, truncation=True, max_length=args.tokens)["input_ids"]) for t in texts]
    starts = {
        "random N(0, 1), no projection (HF PEFT's default; the old preset)": {},
        "random, prefix_projection=True (HF PEFT's MLP at its init)": {"prefix_projection": True},
        "zero (init_weights='zero')": {"init_weights": "zero"},
        "from text, no projection": {"prefix_init_text": PREFIX_INIT_TEXT, "tokenizer": tok},
        "from text, prefix_projection=True (the new preset)": {"prefix_projection": True,
                                                               "prefix_init_text": PREFIX_INIT_TEXT, "tokenizer": tok},
    }
    rows = {"no prefix": perplexity(base, chunks)}
    print(f"no prefix: {rows['no prefix']:.2f}", flush=True)
    for label, options in starts.items():
        if args.only not in label:
            continue
        torch.manual_seed(0)
        config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.virtual, **options)
        rows[label] = perplexity(get_peft_model(copy.deepcopy(base), config).eval(), chunks)
        print(f"{label}: {rows[label]:.2f}", flush=True)
    result = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)", "init_text": PREFIX_INIT_TEXT,
              "probe": f"BBC News test articles (seed 1), first {args.tokens} tokens of {len(texts)}",
              "virtual_tokens": args.virtual, "perplexity": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
