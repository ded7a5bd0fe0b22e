"""The LoRA family side by side in one run: peftkit's LoRA, LoRA-FA, VeRA, DoRA and Delta-LoRA, and HF PEFT's.

One model built from a config (random weights, seeded, nothing downloaded): a Llama-style LlamaForCausalLM,
hidden 512, intermediate 1376, 8 layers, 8 heads (8 KV heads), vocabulary 8000; one batch of 4 × 128
random token ids with labels = ids; every adapter on all linear layers (``target_modules="all-linear"``,
which leaves lm_head out). Rows, each in a fresh subprocess (so its memory is its own):

    peftkit_lora        peftkit LoraConfig(r=16, lora_alpha=32), torch AdamW
    peftkit_lora_fa     peftkit LoraFAConfig + peftkit.create_lorafa_optimizer
    peftkit_vera        peftkit VeraConfig(r=256: the paper's and HF PEFT's default), torch AdamW
    peftkit_dora        peftkit LoraConfig(use_dora=True), torch AdamW
    peftkit_delta_lora  peftkit DeltaLoraConfig(update_start=0, lora_dropout=0), torch AdamW
                        + peftkit.optim.attach(model, optimizer)
    hf_lora, hf_lora_fa (HF LoraConfig + peft.optimizers.create_lorafa_optimizer), hf_vera, hf_dora

lora_dropout (vera_dropout) is 0 everywhere; ``--dropout 0.05`` adds rows at 0.05 for every method that
allows it (Delta-LoRA refuses dropout, as its paper removes it).

Per row:

* trainable parameters, counted after the optimizer is built (the LoRA-FA helpers freeze A);
* step time: forward + backward + optimizer step, the median of ``--steps`` steps after ``--warmup``
  warm-up steps and one instrumented step (one torch thread by default: the machine may be shared);
* saved-activation bytes of one training step: every tensor autograd keeps for backward, seen through
  ``torch.autograd.graph.saved_tensors_hooks``, each storage counted once (by
  ``untyped_storage().data_ptr()``), the model's parameters and buffers (VeRA's shared projections,
  Delta-LoRA's snapshots, rotary tables) excluded; only tensors that backward unpacks count (a graph built
  and dropped inside the forward, as HF DoRA's weight norm, is not kept; the JSON also has the count over
  every pack, ``packed_bytes_every_pack``);
* peak RSS growth: the process's ``ru_maxrss`` at the end of training minus its RSS after setup (model
  built, adapter added, optimizer created). The kernel's peak counter is reset after setup (``5`` written
  to /proc/self/clear_refs) so a setup-time peak does not hide training's; CPU only, so RSS stands in for
  the accelerator allocator's peak (it includes gradients and optimizer state, not only activations);
* adapter file size: bytes of ``adapter_model.safetensors`` after ``save_pretrained``;
* sanity checks: the first step's loss minus the frozen base model's loss on the same batch (every method
  starts as a no-op, so this should be ~0) and the last timed step's loss minus the first (training moves).

Prints a table with ratios to peftkit_lora (time, saved activations) at the same dropout, then peftkit / HF
PEFT ratios per method, and writes JSON. A row that crashes is recorded with its error; the others still run.

    python benchmarks/lora_variants.py             # about 3 minutes on 2 CPU cores
    python benchmarks/lora_variants.py --quick     # smoke run (< 1 minute): a tiny 2-layer model, 2 steps
    python benchmarks/lora_variants.py --dropout 0.05   # also the rows at lora_dropout 0.05
"""

# ruff: noqa: E402  (HF_HUB_OFFLINE must be set before transformers is imported)
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

METHODS = ("lora", "lora_fa", "vera", "dora", "delta_lora")
LIBS = ("peftkit", "hf")
ROWS = tuple(f"{lib}_{m}" for lib in LIBS for m in METHODS if not (lib == "hf" and m == "delta_lora"))
NO_DROPOUT = ("delta_lora",)  # methods that refuse lora_dropout > 0
RANK, ALPHA = 16, 32  # the LoRA family
VERA_RANK = 256  # VeRA paper / HF PEFT default
REFERENCE = "peftkit_lora"
VOCAB = 8000


# ---- the worker: one row, in its own process ----------------------------------------------------------
def build_model(args: argparse.Namespace) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                      max_position_embeddings=max(args.seq, 128))
    return LlamaForCausalLM(cfg)


def wrap(row: str, model: nn.Module, dropout: float, lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The row's PEFT model and its optimizer (AdamW unless the method brings its own)."""
    lib, method = row.split("_", 1)
    lora_kwargs: dict[str, Any] = {"r": RANK, "lora_alpha": ALPHA, "lora_dropout": dropout,
                                   "target_modules": "all-linear"}
    vera_kwargs: dict[str, Any] = {"r": VERA_RANK, "vera_dropout": dropout, "target_modules": "all-linear"}
    if lib == "peftkit":
        import peftkit
        import peftkit.optim

        config = {
            "lora": lambda: peftkit.LoraConfig(**lora_kwargs),
            "lora_fa": lambda: peftkit.LoraFAConfig(**lora_kwargs),
            "vera": lambda: peftkit.VeraConfig(**vera_kwargs),
            "dora": lambda: peftkit.LoraConfig(**lora_kwargs, use_dora=True),
            "delta_lora": lambda: peftkit.DeltaLoraConfig(**lora_kwargs, update_start=0),
        }[method]()
        pm = peftkit.get_peft_model(model, config)
        if method == "lora_fa":
            return pm, peftkit.create_lorafa_optimizer(pm, r=RANK, lora_alpha=ALPHA, lr=lr)
        optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
        if method == "delta_lora":
            peftkit.optim.attach(pm, optimizer)
        return pm, optimizer
    import peft

    config = {
        "lora": lambda: peft.LoraConfig(**lora_kwargs),
        "lora_fa": lambda: peft.LoraConfig(**lora_kwargs),
        "vera": lambda: peft.VeraConfig(**vera_kwargs),
        "dora": lambda: peft.LoraConfig(**lora_kwargs, use_dora=True),
    }[method]()
    pm = peft.get_peft_model(model, config)
    if method == "lora_fa":
        from peft.optimizers import create_lorafa_optimizer

        return pm, create_lorafa_optimizer(pm, r=RANK, lora_alpha=ALPHA, lr=lr)
    return pm, torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)



def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def saved_activation_bytes(model: nn.Module, optimizer: torch.optim.Optimizer,
                           ids: torch.Tensor) -> tuple[int, int, float]:
    """Bytes autograd keeps for backward in one training step, and that step's loss.

    Every tensor autograd saves goes through ``pack``; each storage is counted once (by data_ptr), the
    model's parameters and buffers excluded. Only tensors that backward actually unpacks count: a graph
    built in the forward and then dropped (e.g. a weight norm computed with grad and detached) frees its
    saved tensors, whose addresses later tensors may reuse, so counting every pack would be both too high
    and unstable. The second number is that every-pack count, for reference."""
    packed: list[tuple[int, int]] = []  # (storage data_ptr, nbytes) per pack call
    unpacked: set[int] = set()  # indices into packed

    def pack(t: torch.Tensor) -> tuple[int, torch.Tensor]:
        storage = t.untyped_storage()
        packed.append((storage.data_ptr(), storage.nbytes()))
        return len(packed) - 1, t

    def unpack(token: tuple[int, torch.Tensor]) -> torch.Tensor:
        unpacked.add(token[0])
        return token[1]

    state = [*model.parameters(), *model.buffers()]
    excluded = {t.untyped_storage().data_ptr() for t in state}
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        loss = train_step(model, optimizer, ids)
    kept = {packed[i][0]: packed[i][1] for i in unpacked}
    every = dict(packed)
    return (sum(n for ptr, n in kept.items() if ptr not in excluded),
            sum(n for ptr, n in every.items() if ptr not in excluded), loss)


def run_row(row: str, dropout: float, args: argparse.Namespace) -> dict[str, Any]:
    """One row, in this process."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    model = build_model(args)
    torch.manual_seed(args.seed + 1)
    ids = torch.randint(0, VOCAB, (args.batch, args.seq))
    with torch.no_grad():
        base_loss = model(input_ids=ids, labels=ids).loss.item()
    torch.manual_seed(args.seed + 2)  # the adapter's initialisation
    pm, optimizer = wrap(row, model, dropout, args.lr)
    pm.train()
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    gc.collect()
    from peftkit.measure import current_rss, reset_peak_rss
    rss_setup = current_rss()
    peak_reset = reset_peak_rss()

    losses = [train_step(pm, optimizer, ids) for _ in range(args.warmup)]
    activation_bytes, packed_bytes, loss = saved_activation_bytes(pm, optimizer, ids)
    losses.append(loss)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        losses.append(train_step(pm, optimizer, ids))
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    with tempfile.TemporaryDirectory() as tmp:
        pm.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file()}
        adapter_config = json.loads((Path(tmp) / "adapter_config.json").read_text())
    return {
        "row": row, "lora_dropout": dropout, "trainable_params": trainable,
        "step_time_median_s": statistics.median(times), "step_times_s": times,
        "saved_activation_bytes": activation_bytes, "packed_bytes_every_pack": packed_bytes,
        "rss_setup_bytes": rss_setup, "peak_rss_bytes": peak, "rss_growth_bytes": peak - rss_setup,
        "peak_rss_reset_after_setup": peak_reset,
        "adapter_file_bytes": files.get("adapter_model.safetensors"), "saved_files": files,
        "saved_peft_type": adapter_config.get("peft_type"), "saved_r": adapter_config.get("r"),
        "base_loss": base_loss, "losses": losses,
        "init_loss_delta": losses[0] - base_loss, "train_loss_delta": losses[-1] - losses[0],
    }


# ---- the parent: one subprocess per row, the table, the JSON --------------------------------------------
def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(value: float | None, spec: str, width: int) -> str:
    return f"{value:{width}{spec}}" if value is not None else f"{'-':>{width}s}"


def print_tables(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    ok = {(r["row"], r["lora_dropout"]): r for r in results if "error" not in r}
    print(f"\nLlama-style LM: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
          f"vocab {VOCAB}; batch {args.batch}×{args.seq}; all-linear; LoRA family r={RANK} alpha={ALPHA}, "
          f"VeRA r={VERA_RANK}; lr {args.lr}; {args.threads} thread(s); median of {args.steps} steps; "
          f"ratios to {REFERENCE} at the same dropout")
    header = (f"{'row':19s} {'p':>4s} {'trainable':>10s} {'step ms':>8s} {'ratio':>6s} {'saved MiB':>9s} "
              f"{'ratio':>6s} {'RSS+ MiB':>8s} {'file KiB':>9s} {'init Δloss':>10s} {'train Δloss':>11s}")
    print(header)
    print("-" * len(header))
    for r in results:
        if "error" in r:
            print(f"{r['row']:19s} {r['lora_dropout']:4.2f} FAILED: {r['error']}")
            continue
        ref = ok.get((REFERENCE, r["lora_dropout"]))
        r["step_time_vs_lora"] = ratio(r["step_time_median_s"], ref and ref["step_time_median_s"])
        r["saved_activation_vs_lora"] = ratio(r["saved_activation_bytes"], ref and ref["saved_activation_bytes"])
        size = r["adapter_file_bytes"]
        print(f"{r['row']:19s} {r['lora_dropout']:4.2f} {r['trainable_params']:10,d} "
              f"{1000 * r['step_time_median_s']:8.0f} {fmt(r['step_time_vs_lora'], '.2f', 6)} "
              f"{r['saved_activation_bytes'] / 2**20:9.1f} {fmt(r['saved_activation_vs_lora'], '.2f', 6)} "
              f"{r['rss_growth_bytes'] / 2**20:8.0f} {fmt(size / 2**10 if size is not None else None, '.0f', 9)} "
              f"{r['init_loss_delta']:10.1e} {r['train_loss_delta']:11.1e}")

    print("\npeftkit / HF PEFT, per method (same dropout); max |Δloss|: largest loss difference over the same steps")
    header = (f"{'method':11s} {'p':>4s} {'trainable':>9s} {'step time':>9s} {'saved act':>9s} "
              f"{'RSS growth':>10s} {'file size':>9s} {'max |Δloss|':>11s}")
    print(header)
    print("-" * len(header))
    for (row, dropout), r in ok.items():
        if not row.startswith("peftkit_"):
            continue
        method = row.removeprefix("peftkit_")
        hf = ok.get((f"hf_{method}", dropout))
        if hf is None:
            continue
        cmp = {key: ratio(r[key], hf[key]) for key in ("trainable_params", "step_time_median_s",
                                                        "saved_activation_bytes", "rss_growth_bytes",
                                                        "adapter_file_bytes")}
        n = min(len(r["losses"]), len(hf["losses"]))
        cmp["max_abs_loss_diff"] = max(abs(a - b) for a, b in zip(r["losses"][:n], hf["losses"][:n], strict=True))
        r["vs_hf"] = cmp
        print(f"{method:11s} {dropout:4.2f} {fmt(cmp['trainable_params'], '.2f', 9)} "
              f"{fmt(cmp['step_time_median_s'], '.2f', 9)} {fmt(cmp['saved_activation_bytes'], '.2f', 9)} "
              f"{fmt(cmp['rss_growth_bytes'], '.2f', 10)} {fmt(cmp['adapter_file_bytes'], '.2f', 9)} "
              f"{cmp['max_abs_loss_diff']:11.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    parser.add_argument("--dropout", type=float, action="append", default=[],
                        help="also run the rows at this lora_dropout (Delta-LoRA is skipped: it refuses dropout)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the instrumented step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after warm-up")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: a tiny model and batch, 2 timed steps")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/lora_variants.json; --quick: a temp file)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.batch, args.seq = 64, 172, 2, 2, 32
        args.warmup, args.steps = 1, 2
    args.steps = max(args.steps, 1)

    if args.worker:  # child process: one row, its result as JSON on stdout's last line
        row, dropout = args.worker.split("@")
        print(json.dumps(run_row(row, float(dropout), args)))
        return

    if args.out is None:
        args.out = (Path(tempfile.gettempdir()) / "lora_variants_quick.json" if args.quick
                    else Path(__file__).resolve().parent / "results" / "lora_variants.json")
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown row(s) {unknown}; choose from {list(ROWS)}")
    jobs = [(row, 0.0) for row in rows]
    jobs += [(row, p) for p in args.dropout if p for row in rows if not row.endswith(NO_DROPOUT)]
    passthrough = [f"--{k}={getattr(args, k)}" for k in ("hidden", "intermediate", "layers", "batch", "seq",
                                                          "warmup", "steps", "lr", "threads", "seed")]
    results: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for row, dropout in jobs:
        t0 = time.perf_counter()
        cmd = [sys.executable, str(Path(__file__).resolve()), *passthrough, "--worker", f"{row}@{dropout}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:  # a crash is a row too; the others still run
            lines = proc.stderr.strip().splitlines() or ["?"]
            results.append({"row": row, "lora_dropout": dropout, "error": lines[-1], "traceback": lines[-30:],
                            "wall_s": wall})
            print(f"{row:19s} p={dropout:.2f} FAILED in {wall:.0f}s: {lines[-1]}", flush=True)
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["wall_s"] = wall
        results.append(result)
        print(f"{row:19s} p={dropout:.2f} done in {wall:.0f}s", flush=True)
    total = time.perf_counter() - t_start

    print_tables(results, args)
    print(f"\nwall time {total:.0f}s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "out")}
    payload = {
        "settings": {**settings, "r": RANK, "lora_alpha": ALPHA, "vera_r": VERA_RANK, "target_modules": "all-linear"},
        "rows": results, "wall_s": total, "torch": torch.__version__,
    }
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
