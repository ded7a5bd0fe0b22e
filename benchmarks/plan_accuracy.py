"""How close is ``peftkit plan`` to measured memory? Plan vs measured peak torch memory of one training step.

For each model that runs here (Llama-style configs with realistic shapes at three sizes, all-MiniLM-L6-v2's
config, SmolLM2-135M's config read from its GGUF; random weights, since memory does not depend on their values)
and each method (lora, dora, qlora, full; fp32 and bf16 for the Llama shapes), ``peftkit.plan.measure_step``
builds the model, takes one AdamW step and measures the second with ``TorchMemoryTracker`` (peak live tensor
bytes: parameters, buffers, optimizer state, gradients, activations and every temporary — what a GPU's
``max_memory_allocated`` reports), also per phase (forward, backward, optimizer step). AdamW runs its foreach
implementation, as torch picks on CUDA (``--adamw loop``: CPU's default, one tensor at a time, whose step holds
far fewer temporaries). The plan's torch-level total (its fixed CUDA/NCCL overhead left out) is compared with
that peak (``precision="pure"``: gradients and AdamW state in the parameters' dtype, as ``peftkit train`` keeps
them; the CLI's default "mixed" adds the fp32 master copy a bf16 full fine-tune usually has); ``compare`` is
``peftkit compare``'s accounting (weights + gradients + optimizer state + saved activations) for reference. The
goal is plan/measured within 15%.

``--fsdp`` adds rows on 2 processes (torchrun, gloo): ``peftkit.plan.measure_sharded_step`` shards the model
with ``peftkit.distributed.shard`` (or wraps it in DDP) and each process measures its own peak and counts the
bytes it holds (its local shards; DDP's gradient buckets); the plan for the same per-device batch, strategy and
2 devices. A row shows the larger process.

MiniLM's batches are padded (an attention mask), so on CPU SDPA takes the math path and keeps the attention
scores: the plan is made with ``attention="math"`` there (on a GPU, SDPA's fused kernels keep none).

    python benchmarks/plan_accuracy.py            # every single-process row (about 10 minutes on 2 busy cores)
    python benchmarks/plan_accuracy.py --quick    # the smallest Llama shape only
    python benchmarks/plan_accuracy.py --fsdp --only llama-h256 --out /tmp/f.json   # fsdp rows too
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
DISTRIBUTED_ROWS = [  # (shape, strategy, method, checkpointing), fp32, 2 processes; qlora needs NF4 weights whose
    # rows and scaler blocks split evenly in 2 (llama-h512's MLP has 43 scaler blocks of 256: qlora is h256 only)
    ("llama-h256-L2", "fsdp", "lora", False), ("llama-h256-L2", "fsdp", "qlora", False),
    ("llama-h256-L2", "fsdp", "full", False), ("llama-h256-L2", "fsdp", "lora", True),
    ("llama-h256-L2", "fsdp", "full", True), ("llama-h256-L2", "ddp", "lora", False),
    ("llama-h256-L2", "ddp", "full", False),
    ("llama-h512-L4", "fsdp", "lora", False), ("llama-h512-L4", "fsdp", "full", False),
    ("llama-h512-L4", "ddp", "lora", False), ("llama-h512-L4", "ddp", "full", False),
]
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
          f"{'activ.':>7} {'total GiB':>9}  {'peak':<15} verdict")
    for model, method, gpus, memory, strategy, ckpt in PUBLIC_SETTINGS:
        config = P.load_config(PUBLIC[model])
        arch = P.architecture_of(config, model)
        if (model, method) not in counted:
            counted[(model, method)] = P.count_parameters(config, arch, method, "bf16")
        p = P.plan_memory(arch, counted[(model, method)], P.Setting(method, strategy, ckpt), gpus=gpus,
                          batch=1, seq=2048, capacity=P.parse_memory(memory), dtype="bf16")
        g = {k: v / 2**30 for k, v in p.parts.items()}
        r = {k: v / 2**30 for k, v in p.resident.items()}
        activ = p.phases["backward"]["activations"] / 2**30
        label = strategy + ("+checkpointing" if ckpt else "")
        print(f"{model:<12} {method:<6} {f'{gpus}×{memory}':<14} {label:<22} {r['weights']:8.1f} "
              f"{r['gradients']:7.2f} {r['optimizer']:7.2f} {activ:7.1f} "
              f"{p.total / 2**30:9.1f}  {p.phase:<15} {'fits' if p.fits else 'does not fit'}", flush=True)
        rows.append({"model": model, "method": method, "gpus": gpus, "memory": memory, "strategy": label,
                     "parts_gib": g, "resident_gib": r, "activations_gib": activ, "peak_phase": p.phase,
                     "total_gib": p.total / 2**30, "fits": p.fits,
                     "trainable": counted[(model, method)].trainable, "total_params": counted[(model, method)].total})
    return rows


def plan_row(config: object, name: str, method: str, dtype: str, batch: int, seq: int, attention: str,
             ckpt: bool, strategy: str = "ddp", gpus: int = 1) -> object:
    from peftkit import plan as P

    arch = P.architecture_of(config, name)
    counts = P.count_parameters(config, arch, method, dtype, num_labels=5)
    return P.plan_memory(arch, counts, P.Setting(method, strategy, ckpt), gpus=gpus, batch=batch, seq=seq,
                         capacity=2**40, dtype=dtype, attention=attention, precision="pure")


def key(row: dict) -> tuple:
    return (row["model"], row["method"], row["dtype"], row.get("checkpointing", False), row.get("strategy", "ddp"),
            row.get("adamw", "loop"), row.get("processes", 1))


def replan(files: list[str], out: str) -> None:
    """Rows measured by earlier runs (measurements do not change with the plan), planned again, into ``out``."""
    rows: dict[tuple, dict] = {}
    for path in files:
        with open(path, encoding="utf-8") as fh:
            for row in json.load(fh)["rows"]:
                rows[key(row)] = row
    configs = {(name, method, dtype, ckpt): (config, batch, seq, attention)
               for name, config, method, dtype, batch, seq, _pad, attention, ckpt in rows_to_run(False)}
    merged = []
    for row in rows.values():
        found = configs.get((row["model"], row["method"], row["dtype"], row.get("checkpointing", False)))
        if found is None:
            continue
        config, batch, seq, attention = found
        planned = plan_row(config, row["model"], row["method"], row["dtype"], batch, seq, attention,
                           row.get("checkpointing", False), row.get("strategy", "ddp"), row.get("processes", 1))
        row.update(plan_parts=planned.parts, plan_phases=planned.phases, plan_torch_bytes=planned.torch_bytes,
                   plan_phase=planned.phase,
                   plan_activation_terms_per_token_layer=planned.activation_terms,
                   ratio=planned.torch_bytes / row["measured"]["peak_bytes"])
        merged.append(row)
        print(line(row, planned))
    write(out, merged, public_plans())


def line(row: dict, planned: object) -> str:
    mib = 2**20
    m = row["measured"]
    label = row["method"] + ("+ckpt" if row.get("checkpointing") else "")
    strategy = row.get("strategy", "ddp") + (f"×{row['processes']}" if row.get("processes", 1) > 1 else "")
    shape = f"{row['batch']}×{row['seq']}"
    phase = max(m["phases"], key=m["phases"].get) if m.get("phases") else ""
    return (f"{row['model']:<18} {label:<10} {row['dtype']:<5} {strategy:<7} {row.get('adamw', 'loop'):<7} "
            f"{shape:>7} {planned.torch_bytes / mib:9.1f} {m['peak_bytes'] / mib:9.1f} {row['ratio']:6.3f}  "
            f"{planned.phase:<15} {phase:<15}")


HEADER = (f"{'model':<18} {'method':<10} {'dtype':<5} {'strat.':<7} {'adamw':<7} {'B×S':>7} {'plan MiB':>9} "
          f"{'measured':>9} {'ratio':>6}  {'plan peak':<15} {'measured peak':<15}")


def write(path: str, rows: list[dict], public: list[dict] | None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump({"rows": rows, "public_plans": public, "note": "plan = torch-level total (fixed overhead "
                   "excluded); measured = peak live tensor bytes of the second training step (TorchMemoryTracker), "
                   "CPU, 2 shared cores; adamw foreach = CUDA's default implementation, loop = CPU's; fsdp rows: "
                   "the largest peak of the 2 processes"}, fh, indent=1)


def fsdp_worker(out: str, only: str) -> None:
    """Under torchrun: every 2-process row measured on each process; the main one writes all processes' numbers."""
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig

    from peftkit import plan as P

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rows = []
    for name, strategy, method, ckpt in DISTRIBUTED_ROWS:
        if only and not any(part in name for part in only.split(",")):
            continue
        values, batch, seq = LLAMA_SHAPES[name]
        mine = P.measure_sharded_step(LlamaConfig(**values), method, batch=batch, seq=seq, dtype="fp32",
                                      checkpointing=ckpt, strategy=strategy)
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        rows.append({"model": name, "method": method, "checkpointing": ckpt, "strategy": strategy,
                     "per_process": every})
    if dist.get_rank() == 0:
        with open(out, "w", encoding="utf-8") as fh:
            json.dump(rows, fh)
    dist.destroy_process_group()


def fsdp_rows(only: str) -> list[dict]:
    """Launch the 2-process rows (gloo) and compare each with its plan (the same strategy, 2 devices)."""
    import subprocess
    import sys
    import tempfile

    from transformers import LlamaConfig

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "fsdp.json")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29651", __file__, "--fsdp-worker", out, "--only", only], env=env, check=True)
        with open(out, encoding="utf-8") as fh:
            measured = json.load(fh)
    rows = []
    for row in measured:
        values, batch, seq = LLAMA_SHAPES[row["model"]]
        planned = plan_row(LlamaConfig(**values), row["model"], row["method"], "fp32", batch, seq, "fused",
                           row["checkpointing"], row["strategy"], 2)
        every = row.pop("per_process")
        peak = max(every, key=lambda r: r["peak_bytes"])
        held = {"weights": max(r["parameters_local"] + r["buffers"] for r in every),
                "gradients": max(r["gradients_local"] for r in every),
                "optimizer": max(r["optimizer_moments_local"] for r in every)}
        if row["strategy"] == "ddp":
            held["comm buffers"] = max(r["comm_buffers"] for r in every)
        expected = {**planned.resident, **({"comm buffers": planned.parts["comm buffers"]}
                                           if row["strategy"] == "ddp" else {})}
        row.update(dtype="fp32", batch=batch, seq=seq, processes=2, adamw="foreach",
                   measured=peak, per_process=every, plan_parts=planned.parts, plan_phase=planned.phase,
                   plan_torch_bytes=planned.torch_bytes, plan_phases=planned.phases,
                   plan_resident=planned.resident, measured_resident=held,
                   resident_equal=held == expected, ratio=planned.torch_bytes / peak["peak_bytes"])
        rows.append(row)
        print(line(row, planned), "held per process equal to the plan:", held == expected, flush=True)
    return rows


def main() -> None:
    import copy

    import torch

    from peftkit import plan as P

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="", help="run rows whose model name contains one of these (comma-separated)")
    parser.add_argument("--methods", default="", help="only these methods (comma-separated)")
    parser.add_argument("--replan", nargs="*", default=None, metavar="JSON",
                        help="no measuring: merge these result files into --out, the plan recomputed by this peftkit")
    parser.add_argument("--checkpointing-only", action="store_true", help="only the activation checkpointing rows")
    parser.add_argument("--public-only", action="store_true", help="only the 7B / 70B plans (nothing measured)")
    parser.add_argument("--no-public", action="store_true", help="leave out the 7B / 70B plans")
    parser.add_argument("--adamw", choices=("foreach", "loop", "both"), default="foreach",
                        help="AdamW's implementation in the measured step (foreach: CUDA's default; loop: CPU's)")
    parser.add_argument("--fsdp", action="store_true", help="also the fsdp / ddp rows (2 processes, torchrun, gloo)")
    parser.add_argument("--fsdp-only", action="store_true", help="only the fsdp / ddp rows")
    parser.add_argument("--fsdp-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "plan_accuracy.json"))
    args = parser.parse_args()
    if args.fsdp_worker:
        fsdp_worker(args.fsdp_worker, args.only)
        return
    torch.set_num_threads(2)
    if args.replan is not None:
        replan(args.replan, args.out)
        return
    results = []
    print(HEADER)
    adamws = ("foreach", "loop") if args.adamw == "both" else (args.adamw,)
    singles = [] if args.public_only or args.fsdp_only else rows_to_run(args.quick)
    for name, config, method, dtype, batch, seq, pad, attention, ckpt in singles:
        if args.only and not any(part in name for part in args.only.split(",")):
            continue
        if (args.checkpointing_only and not ckpt) or (args.methods and method not in args.methods.split(",")):
            continue
        for adamw in adamws:
            t0 = time.perf_counter()
            planned = plan_row(config, name, method, dtype, batch, seq, attention, ckpt)
            measured = P.measure_step(copy.deepcopy(config), method, batch=batch, seq=seq, dtype=dtype, pad=pad,
                                      num_labels=5, checkpointing=ckpt, foreach=adamw == "foreach")
            counts = planned.counts
            row = {"model": name, "method": method, "checkpointing": ckpt, "dtype": dtype, "batch": batch,
                   "seq": seq, "pad": pad, "attention": attention, "strategy": "ddp", "processes": 1, "adamw": adamw,
                   "plan_parts": planned.parts, "plan_phase": planned.phase, "plan_phases": planned.phases,
                   "plan_torch_bytes": planned.torch_bytes,
                   "plan_activation_terms_per_token_layer": planned.activation_terms,
                   "trainable_planned": counts.trainable, "trainable_measured": measured["trainable"],
                   "weights_planned": counts.weight_bytes, "weights_measured": measured["weights"],
                   "measured": measured, "ratio": planned.torch_bytes / measured["peak_bytes"],
                   "seconds": time.perf_counter() - t0}
            results.append(row)
            print(line(row, planned), flush=True)
            write(args.out, results, None)
    if (args.fsdp or args.fsdp_only) and not args.public_only:
        results += fsdp_rows(args.only)
    write(args.out, results, None if args.no_public else public_plans())
    worst = max((abs(r["ratio"] - 1) for r in results), default=0.0)
    print(f"worst |plan/measured - 1| = {worst:.3f}; written {args.out}")


if __name__ == "__main__":
    main()
