"""LoRA-FA's memory claim, measured side by side with plain LoRA and HF PEFT in one run.

A Llama-style causal LM built from a config (random weights, nothing downloaded): hidden 512, intermediate
1376, 8 layers, 8 heads, vocabulary 8000; batch 4 × 128 tokens; LoRA r=16 (alpha 32) on all linear layers.
Rows, each with lora_dropout 0 and 0.1:

    peftkit_lora     peftkit LoraConfig, torch AdamW                    (A and B train: x is kept for A)
    peftkit_lora_fa  peftkit LoraFAConfig + create_lorafa_optimizer     (keeps h = A·x and a seed only)
    hf_lora          HF PEFT LoraConfig, torch AdamW
    hf_lora_fa       HF PEFT LoraConfig + its create_lorafa_optimizer   (HF's LoRA-FA: A frozen by the
                     optimizer helper, plain autograd otherwise)
    base_floor       the frozen model, no adapter, with gradient flowing from the output of layer 0's first
                     norm (the input of the first adapted linears) on: what adapters on every linear
                     layer must keep anyway (attention, MLP, norms, logits)

Per row: saved-activation bytes of one training step (every tensor autograd keeps for backward, through
torch.autograd.graph.saved_tensors_hooks, each storage counted once, parameters excluded) and the part
above the floor (what the adapters add), the process's peak RSS and its growth over the RSS after setup
(each row runs in a fresh subprocess; CPU only, so RSS stands in for the CUDA allocator's peak), and the
time of a full step (forward, backward, optimizer), the best of ``--steps`` after the measured warm-up
step, as the machine may be shared (the median is in the JSON; one torch thread by default, see --threads). Prints a table with ratios to peftkit's
plain LoRA at the same dropout and writes JSON.

    python benchmarks/lora_fa_memory.py            # about 2 minutes on 2 CPU cores
    python benchmarks/lora_fa_memory.py --quick    # smoke run: a 2-layer model, batch 2 × 32
"""

# ruff: noqa: E402  (HF_HUB_OFFLINE must be set before transformers is imported)
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

ROWS = ("peftkit_lora", "peftkit_lora_fa", "hf_lora", "hf_lora_fa")
FLOOR = "base_floor"
RANK, ALPHA = 16, 32


def build_model(args) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=8000, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                      max_position_embeddings=max(args.seq, 128))
    return LlamaForCausalLM(cfg)


def wrap(row: str, model: nn.Module, dropout: float) -> tuple[nn.Module, torch.optim.Optimizer | None]:
    """The row's PEFT model and its optimizer."""
    if row == FLOOR:
        model.requires_grad_(False)
        model.model.layers[0].input_layernorm.register_forward_hook(lambda _m, _i, out: out.requires_grad_())
        return model, None
    kwargs = {"r": RANK, "lora_alpha": ALPHA, "lora_dropout": dropout, "target_modules": "all-linear"}
    if row.startswith("peftkit"):
        import peftkit

        config = peftkit.LoraFAConfig(**kwargs) if row.endswith("lora_fa") else peftkit.LoraConfig(**kwargs)
        pm = peftkit.get_peft_model(model, config)
        if row.endswith("lora_fa"):
            return pm, peftkit.create_lorafa_optimizer(pm, r=RANK, lora_alpha=ALPHA, lr=1e-4)
    else:
        import peft

        pm = peft.get_peft_model(model, peft.LoraConfig(**kwargs))
        if row.endswith("lora_fa"):
            from peft.optimizers import create_lorafa_optimizer

            return pm, create_lorafa_optimizer(pm, r=RANK, lora_alpha=ALPHA, lr=1e-4)
    return pm, torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)



def train_step(model: nn.Module, optimizer: torch.optim.Optimizer | None, ids: torch.Tensor) -> float:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return loss.item()


def saved_activation_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None, ids: torch.Tensor) -> int:
    """Bytes autograd keeps for backward in one training step (each storage once, parameters excluded)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train_step(model, optimizer, ids)
    return sum(n for ptr, n in storages.items() if ptr not in params)


def run_row(row: str, dropout: float, args) -> dict:
    """One row, in this process."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    pm, optimizer = wrap(row, build_model(args), dropout)
    pm.train()
    torch.manual_seed(args.seed + 1)
    ids = torch.randint(0, 8000, (args.batch, args.seq))
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    from peftkit.measure import current_rss
    rss_setup = current_rss()
    activation_bytes = saved_activation_bytes(pm, optimizer, ids)  # also the warm-up step
    times, losses = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        losses.append(train_step(pm, optimizer, ids))
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "row": row, "lora_dropout": dropout, "trainable_params": trainable,
        "saved_activation_bytes": activation_bytes, "peak_rss_bytes": peak,
        "rss_growth_bytes": peak - rss_setup, "step_time_s": min(times),
        "step_time_median_s": statistics.median(times), "losses": losses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--dropouts", default="0.0,0.1")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="timed steps after the measured warm-up step")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per row; 1 by default: on a shared 2-core machine two threads ran 30x slower")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: a tiny model and batch")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lora_fa_memory.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.layers, args.batch, args.seq, args.steps = 2, 2, 32, 1
    args.steps = max(args.steps, 1)

    if args.worker:  # child process: one row, its result as JSON on stdout's last line
        row, dropout = args.worker.split("@")
        print(json.dumps(run_row(row, float(dropout), args)))
        return

    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown row(s) {unknown}; choose from {list(ROWS)}")
    results = []
    jobs = [(FLOOR, 0.0)] + [(row, float(d)) for d in args.dropouts.split(",") for row in rows]
    passthrough = [f"--{k}={getattr(args, k)}" for k in ("hidden", "intermediate", "layers", "batch", "seq", "steps",
                                                          "threads", "seed")]
    for row, dropout in jobs:
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, *passthrough, "--worker", f"{row}@{dropout}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:  # a crash is a row too; the others still run
            error = (proc.stderr.strip().splitlines() or ["?"])[-1]
            results.append({"row": row, "lora_dropout": dropout, "error": error})
            print(f"{row} p={dropout} FAILED: {error}", flush=True)
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["wall_s"] = time.perf_counter() - t0
        results.append(result)
        print(f"{row:16s} p={dropout:.1f} done in {result['wall_s']:.0f}s", flush=True)

    base = {r["lora_dropout"]: r for r in results if r["row"] == "peftkit_lora" and "error" not in r}
    floor = next((r["saved_activation_bytes"] for r in results if r["row"] == FLOOR and "error" not in r), None)
    print(f"\nLlama-style LM: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, vocab 8000; "
          f"batch {args.batch}×{args.seq}; all-linear r={RANK}; {args.threads} threads; "
          "ratios to peftkit_lora at the same dropout; >floor: saved bytes above the frozen model's own")
    header = (f"{'row':16s} {'p':>4s} {'trainable':>10s} {'saved MiB':>10s} {'ratio':>6s} {'>floor MiB':>10s} "
              f"{'ratio':>6s} {'peak RSS MiB':>12s} {'growth MiB':>10s} {'ratio':>6s} {'step ms':>8s} {'ratio':>6s}")
    print(header)
    print("-" * len(header))
    for r in results:
        if "error" in r:
            print(f"{r['row']:16s} {r['lora_dropout']:4.1f} FAILED: {r['error']}")
            continue
        if floor is not None:
            r["above_floor_bytes"] = r["saved_activation_bytes"] - floor
        ref = base.get(r["lora_dropout"]) if r["row"] != FLOOR else None
        cells = []
        for key in ("saved_activation_bytes", "above_floor_bytes", "rss_growth_bytes", "step_time_s"):
            r[f"{key}_vs_lora"] = r[key] / ref[key] if ref and r.get(key) is not None and ref.get(key) else None
            cells.append(f"{r[key + '_vs_lora']:6.2f}" if r[key + "_vs_lora"] is not None else f"{'-':>6s}")
        above = f"{r['above_floor_bytes'] / 2**20:10.1f}" if floor is not None else f"{'-':>10s}"
        dropout = f"{r['lora_dropout']:4.1f}" if r["row"] != FLOOR else f"{'-':>4s}"
        print(f"{r['row']:16s} {dropout} {r['trainable_params']:10,d} {r['saved_activation_bytes'] / 2**20:10.1f} "
              f"{cells[0]} {above} {cells[1]} {r['peak_rss_bytes'] / 2**20:12.0f} "
              f"{r['rss_growth_bytes'] / 2**20:10.0f} {cells[2]} {1000 * r['step_time_s']:8.0f} {cells[3]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "out")}
    payload = {"settings": {**settings, "r": RANK, "lora_alpha": ALPHA}, "rows": results,
               "torch": torch.__version__}
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
