"""How close is ``peftkit plan`` to measured memory? Plan vs measured peak torch memory of one training step.

For each model that runs here (Llama-style configs with realistic shapes at three sizes, all-MiniLM-L6-v2's
config, SmolLM2-135M's config read from its GGUF; random weights, since memory does not depend on their values)
and each method (lora, dora, qlora, full; fp32 and bf16 for the Llama shapes), ``peftkit.plan.measure_step``
builds the model, takes one AdamW step and measures the second with ``TorchMemoryTracker`` (peak live tensor
bytes: parameters, buffers, optimizer state, gradients, activations and every temporary — what a GPU's
``max_memory_allocated`` reports). The plan's torch-level total (its fixed CUDA/NCCL overhead left out) is
compared with that peak (``precision="pure"``: gradients and AdamW state in the parameters' dtype, as
``peftkit train`` keeps them; the CLI's default "mixed" adds the fp32 master copy a bf16 full fine-tune usually has); ``compare`` is ``peftkit compare``'s accounting (weights + gradients + optimizer state
+ saved activations) for reference. The goal is plan/measured within 15%.

MiniLM's batches are padded (an attention mask), so on CPU SDPA takes the math path and keeps the attention
scores: the plan is made with ``attention="math"`` there (on a GPU, SDPA's fused kernels keep none).

    python benchmarks/plan_accuracy.py            # every row (about 10 minutes on 2 busy cores)
    python benchmarks/plan_accuracy.py --quick    # the smallest Llama shape only
    python benchmarks/plan_accuracy.py --public-only --out /tmp/p.json   # the 7B / 70B plans alone
Writes benchmarks/results/plan_accuracy.json.
"""

# ruff: noqa: E402  (HF_HUB_OFFLINE must be set before transformers is imported)
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import json
import time
import warnings

warnings.filterwarnings("ignore")

LLAMA_SHAPES = {  # name: (config values, batch, seq)
    "llama-h256-L2": (dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8,
                           num_key_value_heads=4, vocab_size=1000), 2, 64),
    "llama-h512-L4": (dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=2, vocab_size=4096), 2, 128),
    "llama-h768-L6": (dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=12,
                           num_key_value_heads=4, vocab_size=8192), 1, 256),
}
METHODS = ("lora", "dora", "qlora", "full")
# public configs (values from the models' config.json on the Hub), planned only: nothing is downloaded
PUBLIC = {
    "Llama-2-7B": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                   "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False},
    "Llama-3-70B": {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
                    "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False},
}
PUBLIC_SETTINGS = [  # (model, method, gpus, memory, strategy, checkpointing), batch 1 × 2048 tokens per device, bf16
    ("Llama-2-7B", "lora", 1, "24GiB", "ddp", False), ("Llama-2-7B", "lora", 1, "24GiB", "ddp", True),
    ("Llama-2-7B", "qlora", 1, "24GiB", "ddp", True), ("Llama-2-7B", "full", 1, "80GiB", "ddp", True),
    ("Llama-2-7B", "full", 4, "80GiB", "fsdp", True),
    ("Llama-3-70B", "lora", 1, "80GiB", "ddp", True), ("Llama-3-70B", "qlora", 1, "80GiB", "ddp", True),
    ("Llama-3-70B", "lora", 8, "80GiB", "fsdp", False), ("Llama-3-70B", "lora", 8, "80GiB", "fsdp", True),
    ("Llama-3-70B", "qlora", 2, "80GiB", "fsdp", True), ("Llama-3-70B", "full", 8, "80GiB", "fsdp", True),
    ("Llama-3-70B", "full", 16, "80GiB", "fsdp", True),
]


def rows_to_run(quick: bool) -> list[tuple[str, object, str, str, int, int, int, str, bool]]:
    """(name, config, method, dtype, batch, seq, pad, attention, checkpointing) for every row."""
    from transformers import AutoConfig, LlamaConfig

    from peftkit.embedded import minilm_dir, smollm2_gguf

    rows = []
    if not quick:
        minilm = AutoConfig.from_pretrained(minilm_dir())
        for method in METHODS:
            rows.append(("all-MiniLM-L6-v2", minilm, method, "fp32", 4, 128, 32, "math", False))
        folder, gguf = smollm2_gguf()
        smol = AutoConfig.from_pretrained(folder, gguf_file=gguf)
        for method in METHODS:
            rows.append(("SmolLM2-135M", smol, method, "fp32", 2, 128, 0, "fused", False))
        for method in ("lora", "full"):  # activation checkpointing
            rows.append(("SmolLM2-135M", smol, method, "fp32", 2, 128, 0, "fused", True))
    shapes = dict(list(LLAMA_SHAPES.items())[:1]) if quick else LLAMA_SHAPES
    for name, (values, batch, seq) in shapes.items():
        for dtype in ("fp32", "bf16"):
            for method in METHODS:
                rows.append((name, LlamaConfig(**values), method, dtype, batch, seq, 0, "fused", False))
        for method in ("lora", "full"):  # activation checkpointing
            rows.append((name, LlamaConfig(**values), method, "fp32", batch, seq, 0, "fused", True))
    return rows


def public_plans() -> list[dict]:
    """Plans of the public 7B / 70B configs (batch 1 × 2048 per device, bf16, mixed precision)."""
    from peftkit import plan as P

    counted: dict[tuple[str, str], object] = {}
    rows = []
    print(f"\n{'model':<12} {'method':<6} {'devices':<14} {'strategy':<22} {'weights':>8} {'grads':>7} {'optim':>7} "
          f"{'activ.':>7} {'other':>6} {'total GiB':>9}  verdict")
    for model, method, gpus, memory, strategy, ckpt in PUBLIC_SETTINGS:
        config = P.load_config(PUBLIC[model])
        arch = P.architecture_of(config, model)
        if (model, method) not in counted:
            counted[(model, method)] = P.count_parameters(config, arch, method, "bf16")
        p = P.plan_memory(arch, counted[(model, method)], P.Setting(method, strategy, ckpt), gpus=gpus,
                          batch=1, seq=2048, capacity=P.parse_memory(memory), dtype="bf16")
        g = {k: v / 2**30 for k, v in p.parts.items()}
        other = sum(v for k, v in g.items() if k not in ("weights", "gradients", "optimizer", "activations"))
        label = strategy + ("+checkpointing" if ckpt else "")
        print(f"{model:<12} {method:<6} {f'{gpus}×{memory}':<14} {label:<22} {g['weights']:8.1f} "
              f"{g['gradients']:7.2f} {g['optimizer']:7.2f} {g['activations']:7.1f} {other:6.1f} "
              f"{p.total / 2**30:9.1f}  {'fits' if p.fits else 'does not fit'}", flush=True)
        rows.append({"model": model, "method": method, "gpus": gpus, "memory": memory, "strategy": label,
                     "parts_gib": g, "total_gib": p.total / 2**30, "fits": p.fits,
                     "trainable": counted[(model, method)].trainable, "total_params": counted[(model, method)].total})
    return rows


def plan_row(config: object, name: str, method: str, dtype: str, batch: int, seq: int, attention: str,
             ckpt: bool) -> object:
    from peftkit import plan as P

    arch = P.architecture_of(config, name)
    counts = P.count_parameters(config, arch, method, dtype, num_labels=5)
    return P.plan_memory(arch, counts, P.Setting(method, "ddp", ckpt), gpus=1, batch=batch, seq=seq,
                         capacity=2**40, dtype=dtype, attention=attention, precision="pure")


def replan(files: list[str], out: str) -> None:
    """Rows measured by earlier runs (measurements do not change with the plan), planned again, into ``out``."""
    rows: dict[tuple, dict] = {}
    for path in files:
        with open(path, encoding="utf-8") as fh:
            for row in json.load(fh)["rows"]:
                rows[(row["model"], row["method"], row["dtype"], row.get("checkpointing", False))] = row
    merged = []
    for name, config, method, dtype, batch, seq, _pad, attention, ckpt in rows_to_run(False):
        row = rows.get((name, method, dtype, ckpt))
        if row is None:
            continue
        planned = plan_row(config, name, method, dtype, batch, seq, attention, ckpt)
        row.update(plan_parts=planned.parts, plan_torch_bytes=planned.torch_bytes,
                   plan_activation_terms_per_token_layer=planned.activation_terms,
                   ratio=planned.torch_bytes / row["measured"]["peak_bytes"])
        merged.append(row)
        print(f"{name:<18} {method + ('+ckpt' if ckpt else ''):<10} {dtype:<5} plan {planned.torch_bytes / 2**20:9.1f}"
              f" measured {row['measured']['peak_bytes'] / 2**20:9.1f} ratio {row['ratio']:.3f}")
    write(out, merged, public_plans())


def write(path: str, rows: list[dict], public: list[dict] | None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump({"rows": rows, "public_plans": public, "note": "plan = torch-level total (fixed overhead "
                   "excluded); measured = peak live tensor bytes of the second training step (TorchMemoryTracker), "
                   "CPU, 2 shared cores"}, fh, indent=1)


def main() -> None:
    import copy

    import torch

    from peftkit import plan as P

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="", help="run rows whose model name contains one of these (comma-separated)")
    parser.add_argument("--replan", nargs="*", default=None, metavar="JSON",
                        help="no measuring: merge these result files into --out, the plan recomputed by this peftkit")
    parser.add_argument("--checkpointing-only", action="store_true", help="only the activation checkpointing rows")
    parser.add_argument("--public-only", action="store_true", help="only the 7B / 70B plans (nothing measured)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "plan_accuracy.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.replan is not None:
        replan(args.replan, args.out)
        return
    results = []
    print(f"{'model':<18} {'method':<10} {'dtype':<5} {'B×S':>7} {'plan MiB':>9} {'measured':>9} {'ratio':>6} "
          f"{'compare':>8}  {'plan act':>8} {'meas act':>8}")
    for name, config, method, dtype, batch, seq, pad, attention, ckpt in ([] if args.public_only else
                                                                          rows_to_run(args.quick)):
        if args.only and not any(part in name for part in args.only.split(",")):
            continue
        if args.checkpointing_only and not ckpt:
            continue
        t0 = time.perf_counter()
        arch = P.architecture_of(config, name)
        counts = P.count_parameters(config, arch, method, dtype, num_labels=5)
        planned = P.plan_memory(arch, counts, P.Setting(method, "ddp", ckpt), gpus=1, batch=batch, seq=seq,
                                capacity=2**40, dtype=dtype, attention=attention,
                                precision="pure")
        measured = P.measure_step(copy.deepcopy(config), method, batch=batch, seq=seq, dtype=dtype, pad=pad,
                                  num_labels=5, checkpointing=ckpt)
        ratio = planned.torch_bytes / measured["peak_bytes"]
        plan_act = planned.parts["activations"]
        meas_act = measured["peak_bytes"] - measured["start_bytes"]
        mib = 2**20
        print(f"{name:<18} {method + ('+ckpt' if ckpt else ''):<10} {dtype:<5} {f'{batch}×{seq}':>7} {planned.torch_bytes / mib:9.1f} "
              f"{measured['peak_bytes'] / mib:9.1f} {ratio:6.3f} {measured['compare_accounting'] / mib:8.1f}  "
              f"{plan_act / mib:8.1f} {meas_act / mib:8.1f}", flush=True)
        results.append({
            "model": name, "method": method, "checkpointing": ckpt, "dtype": dtype, "batch": batch, "seq": seq, "pad": pad,
            "attention": attention, "plan_parts": planned.parts, "plan_torch_bytes": planned.torch_bytes,
            "plan_activation_terms_per_token_layer": planned.activation_terms,
            "trainable_planned": counts.trainable, "trainable_measured": measured["trainable"],
            "weights_planned": counts.weight_bytes, "weights_measured": measured["weights"],
            "measured": measured, "ratio": ratio, "seconds": time.perf_counter() - t0})
        write(args.out, results, None)
    write(args.out, results, public_plans())
    worst = max((abs(r["ratio"] - 1) for r in results), default=0.0)
    print(f"worst |plan/measured - 1| = {worst:.3f}; written {args.out}")


if __name__ == "__main__":
    main()
